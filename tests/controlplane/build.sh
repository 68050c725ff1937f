#!/usr/bin/env bash
# Build the test Kubernetes binaries from Go modules, through the wrapper modules beside this
# script:
#
#   build.sh          the control plane: etcd, kube-apiserver, kube-controller-manager, kubectl
#   build.sh node     the real node: kubelet, kube-proxy and kube-scheduler (nothing else binds
#                     pods to a real node), and the pod sandbox image (go/pause, packed with
#                     buildah as a docker archive for `ctr images import`: registry.k8s.io/pause
#                     cannot be pulled here); containerd, runc and CNI are Debian packages
#
# Both share the k8s.io/kubernetes wrapper module (go/kube) and its caches. Binaries, the Go
# module cache and the Go build cache live outside the repository under $ANALYSISQ_CACHE
# (default ~/.cache/analysisq), keyed by version; a binary that is already there is not
# rebuilt. Prints the bin directory on stdout as its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
what="${1:-controlplane}"
K8S_VERSION="v1.34.3"
ETCD_VERSION="v3.6.4"
PAUSE_VERSION="1"
PAUSE_IMAGE="localhost/analysisq-pause:$PAUSE_VERSION"
cache="${ANALYSISQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/analysisq}"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS=-mod=readonly
export GOMODCACHE="$cache/go/mod"
export GOCACHE="$cache/go/build"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

log() { echo "build.sh: $*" >&2; }
command -v go >/dev/null || { log "go is not installed; the $what cannot be built"; exit 1; }

# build_kubernetes BIN_DIR COMMAND...: the k8s.io/kubernetes commands missing from BIN_DIR.
build_kubernetes() {
  local bin="$1" b p
  shift
  local missing=()
  for b in "$@"; do
    [[ -x "$bin/$b" ]] || missing+=("$b")
  done
  ((${#missing[@]})) || return 0
  log "building ${missing[*]} $K8S_VERSION (a cold build takes 10-25 minutes on 2 cores)"
  local start=$SECONDS
  local cv="k8s.io/component-base/version" cgv="k8s.io/client-go/pkg/version"
  local date ldflags="-s -w"
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for p in "$cv" "$cgv"; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=34"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  local pkgs=()
  for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  local tmp
  tmp="$(mktemp -d "$bin/.build.XXXXXX")"
  (cd "$here/go/kube" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
  mv "$tmp"/* "$bin/" && rmdir "$tmp"
  log "${missing[*]} built in $((SECONDS - start)) s"
}

case "$what" in
  controlplane)
    bin="$cache/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
    mkdir -p "$bin"
    build_kubernetes "$bin" kube-apiserver kube-controller-manager kubectl
    if [[ ! -x "$bin/etcd" ]]; then
      log "building etcd $ETCD_VERSION"
      start=$SECONDS
      tmp="$(mktemp -d "$bin/.build.XXXXXX")"
      (cd "$here/go/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
      mv "$tmp/etcd" "$bin/etcd" && rmdir "$tmp"
      log "etcd built in $((SECONDS - start)) s"
    fi
    ;;
  node)
    bin="$cache/node/k8s-$K8S_VERSION-pause-$PAUSE_VERSION"
    mkdir -p "$bin"
    build_kubernetes "$bin" kubelet kube-proxy kube-scheduler
    if [[ ! -f "$bin/pause.tar" ]]; then
      command -v buildah >/dev/null || { log "buildah is not installed (tests/tools/system-packages.sh)"; exit 1; }
      log "building the sandbox image $PAUSE_IMAGE"
      tmp="$(mktemp -d "$bin/.build.XXXXXX")"
      (cd "$here/go/pause" && go build -trimpath -ldflags "-s -w" -o "$tmp/pause" .)
      b=(buildah --storage-driver vfs)
      ctr="$("${b[@]}" from scratch)"
      "${b[@]}" copy "$ctr" "$tmp/pause" /pause >/dev/null
      "${b[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
      "${b[@]}" commit --rm -q "$ctr" "$PAUSE_IMAGE" >/dev/null
      "${b[@]}" push -q "$PAUSE_IMAGE" "docker-archive:$tmp/pause.tar:$PAUSE_IMAGE"
      mv "$tmp/pause.tar" "$bin/pause.tar" && rm -rf "$tmp"
    fi
    ;;
  *)
    log "usage: build.sh [node]"
    exit 2
    ;;
esac

echo "$bin"
