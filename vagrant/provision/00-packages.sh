#!/bin/bash
# Debian packages a dmmig rig host needs beyond what ./install.sh (30-dmmig.sh) installs.
#   00-packages.sh          install them (idempotent: only what is missing)
#   00-packages.sh --list   print them, one a line (the test suite checks each exists in Debian)
set -euo pipefail

PKGS=(
    xen-system-amd64      # the hypervisor, xl and xenstored (Xen 4.17 in Debian 12)
    linux-image-amd64     # the generic kernel: dom0 needs CONFIG_XEN_DOM0, the cloud flavour lacks it
    grub2-common          # update-grub, to make the Xen entry the default
    lvm2                  # the volume group that holds the guest disks
    xenstore-utils        # xenstore-read/-write: the guest's control channel (guest/init, scenario.sh)
    busybox-static        # the guest's userland
    cpio gzip kmod        # building the guest's initramfs (guest/mkinitramfs.sh)
    openssh-server openssh-client   # migration traffic, xl migrate, ssh-keyscan
    python3               # ./install.sh builds dmmig's venv from Debian's python3
    util-linux            # wipefs, flock
)

if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "${PKGS[@]}"
    exit 0
fi

[ "$(id -u)" = 0 ] || { echo "${0##*/}: run as root" >&2; exit 1; }
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "[${0##*/}] all ${#PKGS[@]} packages already installed"
    exit 0
fi
echo "[${0##*/}] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# no recommends: xen-utils recommends qemu-system-xen (device models for HVM), which PVH guests
# do not need
apt-get install -y -qq --no-install-recommends "${missing[@]}"
