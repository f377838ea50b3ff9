#!/bin/sh
# init (PID 1) of a rig kernel. The root is this machine's own filesystem over hostfs, so
# everything a guest writes must go to its own tmpfs mounts, never to the host's files.
# Parameters arrive as environment variables from the kernel command line (RIG_*).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for d in /run /tmp /dev/shm; do mkdir -p $d 2>/dev/null; mount -t tmpfs -o mode=1777 tmpfs $d; done
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# root's home: an empty tmpfs, as on a freshly installed host. This machine's /root carries its
# users' shell start-up (e.g. `pyenv init` in .bashrc), which bash runs for every SSH command:
# ~10 s per SSH session in the rig, and writes there would land on the host
mount -t tmpfs -o mode=700 tmpfs /root
ln -sf /proc/self/fd /dev/fd; ln -sf fd/0 /dev/stdin; ln -sf fd/1 /dev/stdout; ln -sf fd/2 /dev/stderr
dmesg -n 1
hostname "$RIG_NAME"
# modules: modprobe -d wants DIR/lib/modules/VERSION
v=$(uname -r)
mkdir -p /run/mods/lib/modules && ln -s /usr/lib/uml/modules/$v /run/mods/lib/modules/$v
for m in dm-mod dm-era dm-mirror dm-log dm-region-hash dm-flakey dm-delay dm-dust loop nbd; do
    modprobe --dirname=/run/mods $m || echo "RIG-INIT: modprobe $m failed"
done
# without udev, /dev/mapper nodes do not appear and dmsetup cannot sync with udev
if [ -n "$RIG_UDEV_RULES" ]; then
    mkdir -p /run/udev/rules.d && cp "$RIG_UDEV_RULES"/*.rules /run/udev/rules.d/ 2>/dev/null
fi
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --action=add >/dev/null 2>&1
udevadm settle --timeout=30
ip link set lo up
if [ -n "$RIG_IP" ]; then
    ip link set vec0 up && ip addr add "$RIG_IP" dev vec0
fi
exec "$RIG_PY" "$RIG_ROOT/tests/rig/guest_agent.py"
