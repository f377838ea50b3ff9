# shellcheck shell=bash
# Shared by the provisioning scripts: defaults (each one can be overridden from the
# environment, so the scripts also run on any two Debian 12 machines without Vagrant)
# and two helpers. Sourced, never run.

: "${DMMIG_SRC:=/vagrant}"              # a checkout of the dmmig repository
: "${SELF:=$(hostname -s)}"             # this host's name in HOSTS
: "${HOSTS:=dmmig-a=192.168.56.11 dmmig-b=192.168.56.12}"   # NAME=ADDR on the migration network
: "${VG:=vg0}"                          # the volume group for guest disks
: "${DISK:=/dev/vdb}"                   # the whole disk that becomes VG's physical volume
: "${LV:=dmguest}"                      # the guest's disk: /dev/$VG/$LV
: "${LV_SIZE:=256M}"
: "${GUEST:=dmguest}"                   # the Xen domain's name
: "${GUEST_DIR:=/var/lib/dmmig-rig/guest}"   # its kernel and initramfs
: "${GUEST_MEM:=256}"                   # MiB
: "${GUEST_SEED:=7}"                    # the oracle's seed: the guest's writer and the fill agree on it
: "${GUEST_BLOCKS:=0:4096}"             # 4 KiB blocks the guest's writer writes (the first 16 MiB)
: "${XEN_CFG_DIR:=/etc/xen}"
: "${SSH_DIR:=/root/.ssh}"              # root's identity, authorized_keys, known_hosts
: "${SSHD_DIR:=/etc/ssh}"               # where sshd reads its host keys
: "${KEYS_DIR:=$DMMIG_SRC/vagrant/.keys}"    # public keys of all hosts (provision/keys-init.sh)
: "${SELF_KEYS:=$KEYS_DIR/$SELF}"       # this host's own private keys

log() { printf '[%s] %s\n' "${0##*/}" "$*"; }
die() { printf '[%s] ERROR: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# the address of host NAME in HOSTS
addr_of() {
    local h
    for h in $HOSTS; do
        if [ "${h%%=*}" = "$1" ]; then printf '%s\n' "${h#*=}"; return 0; fi
    done
    return 1
}

# the names in HOSTS other than SELF
peers() {
    local h
    for h in $HOSTS; do
        if [ "${h%%=*}" != "$SELF" ]; then printf '%s\n' "${h%%=*}"; fi
    done
}
