#!/usr/bin/env bash
# Build the analysisq image without a container engine daemon: buildah (Debian package) with
# vfs storage and chroot isolation, on a Debian bookworm base made by debootstrap and passed
# to the Dockerfile as BASE_IMAGE. Then run `analysisq --help` inside it and print its size.
#
#   sudo apt-get install buildah debootstrap
#   sudo bash tests/tools/build-image.sh            # tag: localhost/analysisq:<version>
#   IMAGE_ARCHIVE=/tmp/analysisq.tar bash tests/tools/build-image.sh   # and a docker archive
#
# The real node tier (tests/node) builds it this way and imports the archive into containerd
# (`ctr -n k8s.io images import`). The image a rebuild replaced is removed (vfs keeps full
# copies of every layer).
#
# The base (python3, python3-venv, python3-pip; apt lists and docs removed) is cached in
# buildah's storage as localhost/debian-python:bookworm. If PIP_CERT names a CA bundle (a
# TLS-intercepting proxy), it is mounted for the RUN steps only, never stored in the image.
# If WHEELHOUSE names a directory of wheels (tests/wheelhouse.py: the node tier passes
# ~/.cache/analysisq/wheels/<key> when `make wheels` made it), pip installs from it offline,
# mounted for the RUN steps only too: a rebuild then downloads nothing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")"
tag="${IMAGE_TAG:-localhost/analysisq:$version}"
base="localhost/debian-python:bookworm"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
b=(buildah --storage-driver vfs)
log() { echo "build-image.sh: $*" >&2; }

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { log "$tool is not installed (apt-get install buildah debootstrap)"; exit 1; }
done

if ! "${b[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  log "making $base with debootstrap"
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$rootfs" "$mirror" >&2
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/{doc,man,info}/*
  ctr="$("${b[@]}" from scratch)"
  cp -a "$rootfs"/. "$("${b[@]}" mount "$ctr")"/
  "${b[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
  "${b[@]}" commit --rm "$ctr" "$base" >&2
fi

mounts=()
settings=()
if [[ -n "${PIP_CERT:-}" && -f "$PIP_CERT" ]]; then
  settings+=("cert = /etc/pip-build-ca.pem")
  mounts+=(--volume "$PIP_CERT:/etc/pip-build-ca.pem:ro")
fi
if [[ -n "${WHEELHOUSE:-}" && -d "$WHEELHOUSE" ]]; then
  settings+=("no-index = true" "find-links = /wheelhouse")
  mounts+=(--volume "$WHEELHOUSE:/wheelhouse:ro")
  log "installing from the wheelhouse $WHEELHOUSE (offline)"
fi
if [[ ${#settings[@]} -gt 0 ]]; then
  conf="$(mktemp)"
  printf '%s\n' "[global]" "${settings[@]}" >"$conf"
  mounts+=(--volume "$conf:/etc/pip.conf:ro")
fi

log "building $tag"
previous="$("${b[@]}" images -q "$tag" 2>/dev/null || true)"
start=$SECONDS
"${b[@]}" bud --isolation chroot --network host "${mounts[@]}" \
  --build-arg "BASE_IMAGE=$base" -t "$tag" "$root" >&2
log "built in $((SECONDS - start)) s"

ctr="$("${b[@]}" from "$tag")"
"${b[@]}" run --isolation chroot "$ctr" -- analysisq --help >/dev/null
[[ "$("${b[@]}" run --isolation chroot "$ctr" -- id -u)" == 65532 ]]
"${b[@]}" rm "$ctr" >/dev/null
# Drop the image this build replaced (only that one: other builds may be running).
if [[ -n "$previous" && "$previous" != "$("${b[@]}" images -q "$tag")" ]]; then
  "${b[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
if [[ -n "${IMAGE_ARCHIVE:-}" ]]; then
  rm -f "$IMAGE_ARCHIVE"
  "${b[@]}" push -q "$tag" "docker-archive:$IMAGE_ARCHIVE:$tag" >&2
fi
"${b[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag"
