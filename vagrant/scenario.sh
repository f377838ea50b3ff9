#!/bin/bash
# The rig's end-to-end check, as root on the host where the guest starts (the source):
#   1. fill the guest's disk with the oracle's seq-0 blocks and start the guest here
#   2. the guest's oracle writer runs; dmmig migrate moves the guest to the peer meanwhile
#   3. on the peer, the guest stops its writer and checks its disk, as the destination's
#      blkback serves it, against the record the writer kept in the guest's memory
#   4. the same back: write on the peer, migrate back here, check here
# Prints each step's time. Exits non-zero on the first failure.
#   WORK_SECONDS (default 10)  how long the writer runs before each migration
#   TRANSPORT (default ssh)    dmmig migrate --transport
#   KEEP_GUEST=1               leave the guest running at the end
# Host names, addresses, VG/LV and the guest's name come from provision/lib.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=provision/lib.sh
. "$here/provision/lib.sh"
: "${WORK_SECONDS:=10}"
: "${TRANSPORT:=ssh}"
[ "$(id -u)" = 0 ] || die "run as root"

peer=$(peers | head -n 1)
peer_addr=$(addr_of "$peer") || die "no peer in HOSTS=\"$HOSTS\""
self_addr=$(addr_of "$SELF") || die "this host ($SELF) is not in HOSTS (set SELF=)"
ssh_opts=(-o StrictHostKeyChecking=yes -o BatchMode=yes -o UserKnownHostsFile="$SSH_DIR/known_hosts"
          -i "$SSH_DIR/id_ed25519")
mig_opts=(--transport "$TRANSPORT" --known-hosts "$SSH_DIR/known_hosts" --identity "$SSH_DIR/id_ed25519")
# ssh hands the remote shell one string: quote each argument for it ("start 1" stays one);
# expanding on this side is the point
# shellcheck disable=SC2029
on_peer() { ssh "${ssh_opts[@]}" "root@$peer_addr" "$(printf '%q ' "$@")"; }
guestctl_here() { bash "$here/guest/guestctl.sh" "$@"; }
guestctl_peer() { on_peer bash -s -- "$@" < "$here/guest/guestctl.sh"; }

summary=()
step() {
    local name=$1 t0 dt
    shift
    log "== $name"
    t0=$(date +%s.%N)
    "$@"
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    log "== $name: ${dt} s"
    summary+=("$(printf '%-48s %7s s' "$name" "$dt")")
}

preflight() {
    xl info >/dev/null || die "xl info failed here: is this host running Xen (provision/10-xen-boot.sh, reboot)?"
    # both directions, with strict host key checking (provision/40-ssh-keys.sh)
    on_peer true || die "ssh root@$peer_addr failed (provision/40-ssh-keys.sh on both hosts)"
    on_peer ssh -o StrictHostKeyChecking=yes -o BatchMode=yes "root@$self_addr" true \
        || die "ssh from $peer back to root@$self_addr failed"
    on_peer xl info >/dev/null || die "xl info failed on $peer"
    log "dmmig here: $(dmmig --version); on $peer: $(on_peer dmmig --version)"
    # a guest left over from an earlier run, on either host
    if xl domid "$GUEST" >/dev/null 2>&1; then log "destroying leftover $GUEST here"; xl destroy "$GUEST"; fi
    if on_peer xl domid "$GUEST" >/dev/null 2>&1; then log "destroying leftover $GUEST on $peer"; on_peer xl destroy "$GUEST"; fi
}

fill_and_start() {
    # every block gets the oracle's seq 0, so the checker can compare every block of the disk
    "$DMMIG_SRC/.venv/bin/python" "$DMMIG_SRC/tests/tools/oracle.py" fill "/dev/$VG/$LV" --seed "$GUEST_SEED"
    xl create "$XEN_CFG_DIR/$GUEST.cfg"
    guestctl_here wait "$GUEST" ready 180
}

# $1: round, $2: "here" or "peer"
write_for_a_while() {
    "guestctl_$2" send "$GUEST" "start $1"
    "guestctl_$2" wait "$GUEST" "writing $1" 60
    sleep "$WORK_SECONDS"
}

stop_and_check() {
    local n=$1 where=$2 writer check
    "guestctl_$where" send "$GUEST" "stop $n"
    "guestctl_$where" wait "$GUEST" "checked $n" 600
    writer=$("guestctl_$where" get "$GUEST" writer)
    check=$("guestctl_$where" get "$GUEST" check)
    log "writer: $writer"
    log "check:  $check"
    # the writer saw no I/O error, and every block on the disk is what the record says
    case $writer in *'"errors": []'*' rc=0') ;; *) die "round $n: the guest's writer failed" ;; esac
    case $check in *'"mismatches": 0,'*' rc=0') ;; *) die "round $n: the disk on $where differs from the guest's record" ;; esac
    # and the check was not vacuous: the writer's record covers blocks it wrote
    if ! [[ $check =~ \"written_blocks\":\ ([1-9][0-9]*) ]]; then
        die "round $n: the guest's record holds no writes"
    fi
}

step "preflight (xl, ssh both ways, dmmig)" preflight
step "fill /dev/$VG/$LV, start $GUEST on $SELF" fill_and_start
step "plan: dmmig migrate --dry-run" dmmig migrate "$GUEST" "$peer_addr" --dry-run "${mig_opts[@]}"
step "round 1: writer runs ${WORK_SECONDS}s on $SELF" write_for_a_while 1 here
step "dmmig migrate $GUEST $SELF -> $peer (writer running)" dmmig migrate "$GUEST" "$peer_addr" "${mig_opts[@]}"
step "round 1: stop writer, check disk on $peer" stop_and_check 1 peer
step "round 2: writer runs ${WORK_SECONDS}s on $peer" write_for_a_while 2 peer
step "dmmig migrate $GUEST $peer -> $SELF (writer running)" on_peer dmmig migrate "$GUEST" "$self_addr" "${mig_opts[@]}"
step "round 2: stop writer, check disk on $SELF" stop_and_check 2 here
if [ "${KEEP_GUEST:-0}" != 1 ]; then
    step "destroy $GUEST" xl destroy "$GUEST"
fi

log "PASS: no acknowledged write lost, both directions"
printf '%s\n' "${summary[@]}"
