#!/usr/bin/env bash
# Build what the real test node runs besides the Debian packages (containerd, runc, CNI
# plugins): kubelet, kube-proxy and kube-scheduler (nothing else binds pods to a real node)
# from the same k8s.io/kubernetes wrapper module as the control plane (go/kube, sharing its
# module and build caches), and the pod sandbox image (go/pause, packed with buildah as a
# docker archive for `ctr images import`: registry.k8s.io/pause cannot be pulled here).
#
# Everything lives outside the repository under $ANALYSISQ_CACHE (default
# ~/.cache/analysisq), keyed by version, and is built only when missing. Prints the bin
# directory on stdout as its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="v1.34.3"
PAUSE_VERSION="1"
PAUSE_IMAGE="localhost/analysisq-pause:$PAUSE_VERSION"
cache="${ANALYSISQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/analysisq}"
bin="$cache/node/k8s-$K8S_VERSION-pause-$PAUSE_VERSION"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS=-mod=readonly
export GOMODCACHE="$cache/go/mod"
export GOCACHE="$cache/go/build"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

log() { echo "build-node.sh: $*" >&2; }
command -v go >/dev/null || { log "go is not installed; kubelet cannot be built"; exit 1; }
mkdir -p "$bin"

missing=()
for b in kubelet kube-proxy kube-scheduler; do
  [[ -x "$bin/$b" ]] || missing+=("$b")
done
if ((${#missing[@]})); then
  log "building ${missing[*]} $K8S_VERSION (shares the control plane's build cache)"
  start=$SECONDS
  cv="k8s.io/component-base/version"
  cgv="k8s.io/client-go/pkg/version"
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  ldflags="-s -w"
  for p in "$cv" "$cgv"; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=34"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  pkgs=()
  for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  tmp="$(mktemp -d "$bin/.build.XXXXXX")"
  (cd "$here/go/kube" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
  mv "$tmp"/* "$bin/" && rmdir "$tmp"
  log "kubelet, kube-proxy and kube-scheduler built in $((SECONDS - start)) s"
fi

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

echo "$bin"
