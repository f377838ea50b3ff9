#!/bin/bash
# The rig's SSH keys, made once on the machine that runs `vagrant up` (or anywhere, for two
# machines without Vagrant), before any host boots:
#   keys-init.sh DIR NAME...
# makes, for each NAME that lacks them, DIR/NAME/id_ed25519 (root's identity on NAME) and
# DIR/NAME/ssh_host_ed25519_key (NAME's SSH host key), each with its .pub.
# Made ahead, every host's public keys are known before any host is provisioned, in whatever
# order or parallelism the hosts come up: 40-ssh-keys.sh writes authorized_keys and
# known_hosts from them, with no trust-on-first-use. To keep a machine's existing host key,
# put its ssh_host_ed25519_key{,.pub} into DIR/NAME/ first: existing files are kept.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: ${0##*/} DIR NAME..." >&2; exit 2; }
dir=$1; shift
umask 077
mkdir -p "$dir"
# two `vagrant up` machines may run this at the same time
exec 9>"$dir/.lock"
flock 9
for name in "$@"; do
    mkdir -p "$dir/$name"
    for key in id_ed25519 ssh_host_ed25519_key; do
        f=$dir/$name/$key
        [ -s "$f" ] && [ -s "$f.pub" ] && continue
        rm -f "$f" "$f.pub"
        case $key in
            id_ed25519) comment="root@$name (dmmig rig)" ;;
            *) comment="$name host key (dmmig rig)" ;;
        esac
        ssh-keygen -q -t ed25519 -N '' -C "$comment" -f "$f"
        echo "[${0##*/}] made $f"
    done
done
