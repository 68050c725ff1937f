#!/usr/bin/env bash
# Build the helm v3 CLI from Go modules (helm.sh/helm/v3/cmd/helm) through the wrapper module
# in go/helm, the same way tests/controlplane/build.sh builds the control plane: no download
# site, only the Go module proxy.
#
# The binary, the Go module cache and the Go build cache live outside the repository under
# $ANALYSISQ_CACHE (default ~/.cache/analysisq), keyed by version; a binary that is already
# there is not rebuilt. Prints the helm binary's path on stdout as its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module="$here/go/helm"
cache="${ANALYSISQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/analysisq}"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS=-mod=readonly
export GOMODCACHE="$cache/go/mod"
export GOCACHE="$cache/go/build"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

log() { echo "build-helm.sh: $*" >&2; }
command -v go >/dev/null || { log "go is not installed; helm cannot be built"; exit 1; }

# The versions come from the wrapper's go.mod, so bumping helm is one `go get -tool`.
version="$(cd "$module" && go list -m -f '{{.Version}}' helm.sh/helm/v3)"
client_go="$(cd "$module" && go list -m -f '{{.Version}}' k8s.io/client-go)"
bin="$cache/tools/helm-$version"

if [[ ! -x "$bin/helm" ]]; then
  log "building helm $version (a cold build takes a few minutes on 2 cores)"
  start=$SECONDS
  mkdir -p "$bin"
  # As helm's own Makefile does: the Kubernetes version helm assumes for `helm template` and
  # `helm lint` follows client-go (v0.N.x -> 1.N); left unset it would be 1.20.
  IFS=. read -r _ k8s_minor _ <<<"${client_go#v}"
  pv="helm.sh/helm/v3/internal/version"
  ldflags="-s -w -X $pv.version=$version -X $pv.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
  done
  tmp="$(mktemp -d "$bin/.build.XXXXXX")"
  (cd "$module" && go build -trimpath -ldflags "$ldflags" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm)
  mv "$tmp/helm" "$bin/helm" && rmdir "$tmp"
  log "helm $version built in $((SECONDS - start)) s"
fi

echo "$bin/helm"
