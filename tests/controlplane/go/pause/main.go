// Command pause is the sandbox ("infra") container of the test node's pods: it holds the
// pod's namespaces, reaps orphaned children, and exits on SIGINT or SIGTERM. It stands in for
// registry.k8s.io/pause, which these machines cannot pull; containerd's CRI plugin names the
// image built from it as its sandbox_image (see tests/controlplane/node.py).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
