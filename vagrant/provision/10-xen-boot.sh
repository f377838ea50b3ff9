#!/bin/bash
# Make "Debian GNU/Linux, with Xen hypervisor" the default GRUB entry, with a fixed dom0
# memory size, and say whether a reboot is still needed (Vagrant reboots after this step).
#   DOM0_MEM (default 1024M)   dom0's memory, fixed: no ballooning, the rest is for guests
#   GRUB_DROPIN                where the settings go (default /etc/default/grub.d/zz-dmmig-xen.cfg)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
: "${DOM0_MEM:=1024M}"
: "${GRUB_DROPIN:=/etc/default/grub.d/zz-dmmig-xen.cfg}"

ls /boot/xen-*.gz >/dev/null 2>&1 || die "no Xen hypervisor in /boot: run 00-packages.sh first"
# dom0 must be a kernel built with CONFIG_XEN_DOM0 (Debian's generic flavour, not "cloud")
grep -lqs '^CONFIG_XEN_DOM0=y' /boot/config-* || die "no kernel in /boot has CONFIG_XEN_DOM0=y (install linux-image-amd64)"

# Debian's own /etc/default/grub.d/xen.cfg already defaults to the Xen entry unless told
# otherwise; say it explicitly in a drop-in sourced after it, so an edited xen.cfg or
# /etc/default/grub cannot silently boot plain Linux.
want=$(cat <<CFG
# written by dmmig's vagrant/provision/${0##*/}
GRUB_DEFAULT="Debian GNU/Linux, with Xen hypervisor"
GRUB_CMDLINE_XEN_DEFAULT="dom0_mem=${DOM0_MEM},max:${DOM0_MEM} dom0_max_vcpus=1-2"
CFG
)
if [ "$(cat "$GRUB_DROPIN" 2>/dev/null)" != "$want" ]; then
    log "writing $GRUB_DROPIN (default entry: Xen; dom0_mem=$DOM0_MEM) and running update-grub"
    mkdir -p "$(dirname "$GRUB_DROPIN")"
    printf '%s\n' "$want" > "$GRUB_DROPIN"
    update-grub
else
    log "$GRUB_DROPIN is up to date"
fi

# /sys/hypervisor/type says "xen" in dom0; /proc/xen/capabilities lists control_d there
if [ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ]; then
    log "running under Xen already: no reboot needed"
else
    log "not running under Xen yet: reboot into the default entry (Vagrant does this now)"
fi
