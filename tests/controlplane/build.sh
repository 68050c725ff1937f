#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager, kubectl)
# from Go modules, through the wrapper modules beside this script.
#
# Binaries, the Go module cache and the Go build cache live outside the repository under
# $ANALYSISQ_CACHE (default ~/.cache/analysisq), keyed by version; a binary that is already
# there is not rebuilt. Prints the bin directory on stdout as its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="v1.34.3"
ETCD_VERSION="v3.6.4"
cache="${ANALYSISQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/analysisq}"
bin="$cache/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS=-mod=readonly
export GOMODCACHE="$cache/go/mod"
export GOCACHE="$cache/go/build"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

command -v go >/dev/null || { echo "build.sh: go is not installed; the control plane cannot be built" >&2; exit 1; }
mkdir -p "$bin"

log() { echo "build.sh: $*" >&2; }

missing=()
for b in kube-apiserver kube-controller-manager kubectl; do
  [[ -x "$bin/$b" ]] || missing+=("$b")
done
if ((${#missing[@]})); then
  log "building ${missing[*]} $K8S_VERSION (a cold build takes 10-25 minutes on 2 cores)"
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
  log "kubernetes binaries built in $((SECONDS - start)) s"
fi

if [[ ! -x "$bin/etcd" ]]; then
  log "building etcd $ETCD_VERSION"
  start=$SECONDS
  tmp="$(mktemp -d "$bin/.build.XXXXXX")"
  (cd "$here/go/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  mv "$tmp/etcd" "$bin/etcd" && rmdir "$tmp"
  log "etcd built in $((SECONDS - start)) s"
fi

echo "$bin"
