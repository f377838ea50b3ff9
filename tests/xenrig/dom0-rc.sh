#!/bin/sh
# dom0's init (PID 1) once its root exists: this machine's root, read-only over 9p, under a
# tmpfs overlay with Debian's Xen tree on top (see dom0-initramfs-init.sh). Brings up the
# Xen control plane and udev, then hands PID 1 to the rig's command agent.
# Parameters arrive as environment variables from dom0's kernel command line (XENRIG_*).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ms() { echo "XENRIG-MILESTONE $*"; }
fatal() { echo "XENRIG-FATAL $*"; }
for d in /run /tmp /var/tmp /dev/shm; do mkdir -p $d; mount -t tmpfs -o mode=1777 tmpfs $d; done
chmod 755 /run
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# root's home: an empty tmpfs, as on a freshly installed host. This machine's /root carries its
# users' shell start-up (e.g. `pyenv init` in .bashrc), which bash runs for every SSH command
mount -t tmpfs -o mode=700 tmpfs /root
# Xen's locking.sh runs `stat /dev/stdin`: without these links the stock block script hangs
# until libxl's 40 s timeout
ln -sf /proc/self/fd /dev/fd; ln -sf fd/0 /dev/stdin; ln -sf fd/1 /dev/stdout; ln -sf fd/2 /dev/stderr
mkdir -p /xchg && mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 xchg /xchg \
    || fatal "mount 9p xchg"
hostname "$XENRIG_NAME"
# block-dmmig runs /usr/local/bin/dmmig when that is executable: dom0 sees this machine's
# /usr/local, whose dmmig may be another checkout's (or a dangling link, so the script fell
# back to a path that does not exist and every xl create failed). dom0 runs this checkout's.
mkdir -p /usr/local/bin && ln -sfn "$XENRIG_ROOT/.venv/bin/dmmig" /usr/local/bin/dmmig || fatal "dmmig link"
dmesg -n 1
modprobe -a xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback dm-mod dm-era dm-mirror dm-log \
    dm-region-hash loop nbd virtio_console virtio_net || fatal "modprobe"
mount -t xenfs xenfs /proc/xen || fatal "mount xenfs"
ms modules
# without udev, /dev/mapper nodes do not appear and dmsetup cannot sync with udev. Coldplug
# only block devices (loop, nbd): a full trigger costs ~10 s under emulation, and the
# Xen daemons start while udev works
/lib/systemd/systemd-udevd --daemon --resolve-names=never || fatal "udevd"
udevadm trigger --action=add --subsystem-match=block >/dev/null 2>&1
mkdir -p /run/xen /run/xenstored /var/lib/xenstored /var/lib/xen /var/log/xen/console /run/lock
xenstored --pid-file=/run/xenstored.pid || fatal "xenstored"
/usr/lib/xen-4.17/bin/xen-init-dom0 >/dev/null || fatal "xen-init-dom0"
ms xenstored
# guest consoles are logged per domain name: tests read what their guests printed there
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || fatal "xenconsoled"
ms xenconsoled
udevadm settle --timeout=60 || fatal "udevadm settle"
ms udev
xl info >/run/xl-info || fatal "xl info"
ms xl-info
ip link set lo up
if [ -n "$XENRIG_IP" ]; then
    ip addr add "$XENRIG_IP" dev eth0 && ip link set eth0 up || fatal "network"
fi
# the agent talks over the virtio-serial port named xenrig.agent
port=
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = xenrig.agent ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] || { sleep 0.1; i=$((i+1)); }
done
[ -n "$port" ] || fatal "no virtio-serial port xenrig.agent"
ms agent-start
# XenHost(serial_shell=True): a root shell on dom0's console, typed into through Xen's serial
# input (XenHost.serial_input); for looking at a dom0 whose agent stopped answering
[ "$XENRIG_SHELL" = 1 ] && ( setsid sh -c 'exec /bin/sh -i </dev/hvc0 >/dev/hvc0 2>&1' & )
cd /
# The agent talks to the port through agent_relay.py, which polls the port: under TCG, dom0
# sometimes stops getting the port's interrupt while a guest runs, and an agent blocked in
# read() on the port then never sees the next request (the relay's docstring has the details)
mkfifo /run/xenrig-agent.in /run/xenrig-agent.out || fatal "mkfifo"
"$XENRIG_PY" "$XENRIG_ROOT/tests/xenrig/agent_relay.py" "$port" /run/xenrig-agent.in /run/xenrig-agent.out &
exec "$XENRIG_PY" "$XENRIG_ROOT/tests/rig/guest_agent.py" </run/xenrig-agent.in >/run/xenrig-agent.out
