#!/bin/bash
# SSH between the rig's hosts as root, with strict host key checking: installs this host's
# keys from keys-init.sh and trusts exactly the other hosts in HOSTS.
#   SELF_KEYS/id_ed25519            -> SSH_DIR/id_ed25519 (root's identity: dmmig, xl migrate)
#   SELF_KEYS/ssh_host_ed25519_key  -> SSHD_DIR/ (this host's sshd presents it), then SSHD_RELOAD
#   KEYS_DIR/PEER/id_ed25519.pub    -> SSH_DIR/authorized_keys, from="PEER's address" only
#   KEYS_DIR/PEER/ssh_host_ed25519_key.pub -> SSH_DIR/known_hosts as "PEER,ADDR"
# Then ssh-keyscan over the migration network checks that each peer already up presents
# exactly that host key (one still down is checked by scenario.sh's preflight).
#   SSH_PORT (default 22)  the port the peers' sshd listens on
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
: "${SSH_PORT:=22}"
: "${SSHD_RELOAD:=systemctl reload ssh}"

for f in id_ed25519 id_ed25519.pub ssh_host_ed25519_key ssh_host_ed25519_key.pub; do
    [ -s "$SELF_KEYS/$f" ] || die "$SELF_KEYS/$f missing: run keys-init.sh KEYS_DIR NAME... first"
done
addr_of "$SELF" >/dev/null || die "this host ($SELF) is not in HOSTS=\"$HOSTS\" (set SELF=)"

# copy $1 to $2 with mode $3 unless identical, and note the change
changed=0
put() {
    cmp -s "$1" "$2" && return 0
    install -m "$3" "$1" "$2" || die "cannot write $2"
    log "installed $2"
    changed=1
}

install -d -m 700 "$SSH_DIR"
install -d -m 755 "$SSHD_DIR"
put "$SELF_KEYS/id_ed25519" "$SSH_DIR/id_ed25519" 600
put "$SELF_KEYS/id_ed25519.pub" "$SSH_DIR/id_ed25519.pub" 644
changed=0   # only a new host key needs sshd to reload
put "$SELF_KEYS/ssh_host_ed25519_key" "$SSHD_DIR/ssh_host_ed25519_key" 600
put "$SELF_KEYS/ssh_host_ed25519_key.pub" "$SSHD_DIR/ssh_host_ed25519_key.pub" 644
if [ "$changed" = 1 ]; then
    log "host key changed: $SSHD_RELOAD"
    sh -c "$SSHD_RELOAD"
fi

# Each peer's lines carry the marker "dmmig-rig:NAME", so a rerun replaces them (keys made
# anew by a fresh `vagrant up` replace the old ones) and leaves every other line alone.
auth=$SSH_DIR/authorized_keys
known=$SSH_DIR/known_hosts
touch "$auth" "$known"
chmod 600 "$auth"
for peer in $(peers); do
    addr=$(addr_of "$peer")
    for f in id_ed25519.pub ssh_host_ed25519_key.pub; do
        [ -s "$KEYS_DIR/$peer/$f" ] || die "$KEYS_DIR/$peer/$f missing: run keys-init.sh with every host's name"
    done
    read -r ktype key _ < "$KEYS_DIR/$peer/id_ed25519.pub"
    grep -v " dmmig-rig:$peer\$" "$auth" > "$auth.new" || true
    echo "from=\"$addr\",no-agent-forwarding,no-X11-forwarding $ktype $key dmmig-rig:$peer" >> "$auth.new"
    mv "$auth.new" "$auth"
    log "authorized root@$peer's key for logins from $addr"

    read -r htype hkey _ < "$KEYS_DIR/$peer/ssh_host_ed25519_key.pub"
    if [ "$SSH_PORT" = 22 ]; then names="$peer,$addr"; else names="[$peer]:$SSH_PORT,[$addr]:$SSH_PORT"; fi
    grep -v " dmmig-rig:$peer\$" "$known" > "$known.new" || true
    for n in ${names//,/ }; do   # and any older entry for those names, e.g. from an earlier rig
        ssh-keygen -q -R "$n" -f "$known.new" >/dev/null 2>&1 || true
    done
    rm -f "$known.new.old"
    echo "$names $htype $hkey dmmig-rig:$peer" >> "$known.new"
    mv "$known.new" "$known"
    chmod 644 "$known"
    log "known_hosts: $names"

    # the check over the migration network; strict checking stays on, so a mismatch here
    # would only surface later as a refused migration
    seen=$(ssh-keyscan -T 5 -p "$SSH_PORT" -t ed25519 "$addr" 2>/dev/null | awk '{print $3}' || true)
    if [ -z "$seen" ]; then
        log "$peer ($addr:$SSH_PORT) not reachable yet: host key not checked over the network"
    elif [ "$seen" != "$hkey" ]; then
        die "$peer ($addr:$SSH_PORT) presents a different host key than $KEYS_DIR/$peer/ssh_host_ed25519_key.pub"
    else
        log "$peer ($addr:$SSH_PORT) presents the expected host key"
    fi
done
