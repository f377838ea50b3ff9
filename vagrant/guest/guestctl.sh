#!/bin/bash
# Talk to the rig's guest (guest/init) through XenStore, on the host where it runs now:
#   guestctl.sh send GUEST "start N" | "stop N"
#   guestctl.sh wait GUEST STATE [TIMEOUT_S]   until the guest says STATE (e.g. "checked 1")
#   guestctl.sh get GUEST KEY                  state, writer or check
# scenario.sh runs it here, or on the peer as `ssh HOST bash -s -- ARGS < guestctl.sh`.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: ${0##*/} send|wait|get GUEST ..." >&2; exit 2; }
op=$1 guest=$2
shift 2
domid=$(xl domid "$guest") || { echo "${0##*/}: no domain $guest on $(hostname -s)" >&2; exit 1; }
dir=/local/domain/$domid/data/dmmig
case $op in
    send) xenstore-write "$dir/cmd" "$1" ;;
    get) xenstore-read "$dir/$1" ;;
    wait)
        want=$1 timeout=${2:-120} i=0
        while [ "$(xenstore-read "$dir/state" 2>/dev/null || true)" != "$want" ]; do
            if [ $i -ge $((timeout * 2)) ]; then
                echo "${0##*/}: $guest did not reach \"$want\" in ${timeout}s (state: $(xenstore-read "$dir/state" 2>&1 || true))" >&2
                exit 1
            fi
            sleep 0.5
            i=$((i + 1))
        done ;;
    *) echo "${0##*/}: unknown operation $op" >&2; exit 2 ;;
esac
