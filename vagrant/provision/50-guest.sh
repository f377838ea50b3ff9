#!/bin/bash
# The rig's guest: a small PVH domain booting dom0's own kernel with an initramfs that runs
# the project's oracle writer against its disk (see ../guest/init). Its one disk is managed
# by dmmig: script=block-dmmig (issue 5's Xen block script) over /dev/$VG/$LV.
# Writes $GUEST_DIR/{vmlinuz,initrd.gz} and $XEN_CFG_DIR/$GUEST.cfg; starting the guest is
# scenario.sh's job. Made on every host, so the guest can also start on either.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
kver=$(uname -r)
[ -f "/boot/vmlinuz-$kver" ] || die "/boot/vmlinuz-$kver missing"
[ -e "/dev/$VG/$LV" ] || die "/dev/$VG/$LV missing: run 20-lvm.sh first"
[ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ] || log "note: not running under Xen (yet): the guest cannot start here until then"

mkdir -p "$GUEST_DIR" "$XEN_CFG_DIR"
# the same kernel as dom0: Debian's generic kernel boots as a PVH guest too (CONFIG_XEN_PVH)
install -m 0644 "/boot/vmlinuz-$kver" "$GUEST_DIR/vmlinuz"
log "building $GUEST_DIR/initrd.gz"
KVER=$kver ORACLE="$DMMIG_SRC/tests/tools/oracle.py" "$(dirname "$0")/../guest/mkinitramfs.sh" "$GUEST_DIR/initrd.gz"

cat > "$XEN_CFG_DIR/$GUEST.cfg.new" <<CFG
# the dmmig rig's guest, written by vagrant/provision/${0##*/}
name = "$GUEST"
# PVH: Debian's Xen is built without shadow paging, so only PVH/HVM guests can be migrated
# (a PV guest fails with "Failed to enable logdirty"), and those need VT-x/AMD-V with EPT/NPT
type = "pvh"
memory = $GUEST_MEM
vcpus = 1
kernel = "$GUEST_DIR/vmlinuz"
ramdisk = "$GUEST_DIR/initrd.gz"
extra = "console=hvc0 quiet dmmig_seed=$GUEST_SEED dmmig_blocks=$GUEST_BLOCKS"
disk = [ "vdev=xvda,access=rw,script=block-dmmig,target=/dev/$VG/$LV" ]
on_crash = "preserve"
CFG
mv "$XEN_CFG_DIR/$GUEST.cfg.new" "$XEN_CFG_DIR/$GUEST.cfg"
log "wrote $XEN_CFG_DIR/$GUEST.cfg (start it with: xl create $XEN_CFG_DIR/$GUEST.cfg)"
