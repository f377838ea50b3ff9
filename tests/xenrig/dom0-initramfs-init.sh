#!/bin/sh
# /init of dom0's initramfs (busybox). dom0's root is this machine's own root filesystem,
# read-only over virtio-9p, under an overlay whose upper layer is a tmpfs (so /etc, /var
# are writable and the host is never modified) and whose top lower layer is the tree
# unpacked from Debian's Xen packages (xl, xenstored, the 6.1 kernel's modules).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "XENRIG-MILESTONE dom0-init"
for m in $(cat /modules/order); do insmod /modules/$m || echo "XENRIG-FATAL insmod $m"; done
mkdir -p /host /xentree /newroot
# cache=loose: the host root is read-only for the session, and page caching makes exec of
# Python and its libraries over 9p much cheaper under emulation
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
    || echo "XENRIG-FATAL mount 9p hostroot"
# the Xen tree is a share of its own: overlayfs refuses a lower layer nested inside another
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 xentree /xentree \
    || echo "XENRIG-FATAL mount 9p xentree"
mount -t tmpfs -o mode=755,size=256m tmpfs /run
mkdir -p /run/ovl/upper /run/ovl/work
mount -t overlay overlay -o "lowerdir=/xentree:/host,upperdir=/run/ovl/upper,workdir=/run/ovl/work" /newroot \
    || echo "XENRIG-FATAL mount overlay"
echo "XENRIG-MILESTONE dom0-root"
mkdir -p /newroot/xenrig-boot
mount --move /run /newroot/xenrig-boot
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh "$XENRIG_RC"
