#!/bin/bash
# The volume group VG on the whole disk DISK, and the guest's logical volume VG/LV (LV_SIZE).
# Both hosts get the same LV: it is the guest's disk on the source and the migration's
# target on the destination (dmmig checks that it is at least as large and unused).
#   VG=vg0 DISK=/dev/vdb LV=dmguest LV_SIZE=256M   (see lib.sh)
#   FORCE=1   wipe DISK even if it holds a partition table or file system
# LVM's own settings come from /etc/lvm, or from $LVM_SYSTEM_DIR when that is set.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

[ -b "$DISK" ] || die "$DISK is not a block device (set DISK= to the disk for the volume group)"

if vgs "$VG" >/dev/null 2>&1; then
    # idempotent, but only for the same disk: never silently use a different VG of that name
    in_vg=$(pvs --noheadings -o vg_name "$DISK" 2>/dev/null | tr -d ' ' || true)   # not a PV: empty
    [ "$in_vg" = "$VG" ] || die "volume group $VG exists, but $DISK is not one of its physical volumes"
    log "volume group $VG on $DISK exists"
else
    # a disk with anything on it is not ours to wipe: this also runs on machines we did not make
    sig=$(wipefs --no-act --noheadings --output TYPE "$DISK" | tr '\n' ' ')
    if [ -n "${sig// /}" ] && [ "${FORCE:-0}" != 1 ]; then
        die "$DISK holds: $sig- refusing to wipe it (FORCE=1 to wipe)"
    fi
    log "creating physical volume $DISK and volume group $VG"
    pvcreate --yes --force "$DISK"
    vgcreate "$VG" "$DISK"
fi

if lvs "$VG/$LV" >/dev/null 2>&1; then
    log "logical volume $VG/$LV exists ($(lvs --noheadings --units m -o lv_size "$VG/$LV" | tr -d ' '))"
else
    log "creating logical volume $VG/$LV ($LV_SIZE)"
    # no stale signatures from whatever the disk held before
    lvcreate --yes --name "$LV" --size "$LV_SIZE" --wipesignatures y "$VG"
fi
log "done: /dev/$VG/$LV"
