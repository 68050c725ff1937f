#!/usr/bin/env bash
# Install the Debian packages the test tiers run for real, when they are missing:
#   pgbouncer                       the pooler tier (transaction mode in front of PostgreSQL)
#   chromium                        the dashboard's browser tests (driven by Playwright)
#   containerd runc                 the real node's container runtime
#   containernetworking-plugins     the real node's pod networking (bridge, host-local, ...)
#   iptables conntrack socat        what kubelet, CNI portmap and port-forward call
#   buildah debootstrap             the image build (no Docker engine here)
# Idempotent and quiet when everything is there; a missing package that cannot be installed
# fails the run (a tier that cannot run must fail, never skip).
set -euo pipefail

packages=(pgbouncer chromium containerd runc containernetworking-plugins iptables conntrack
  socat buildah debootstrap)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "system-packages.sh: need root to install: ${missing[*]}" >&2
  exit 1
fi
echo "system-packages.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >&2
