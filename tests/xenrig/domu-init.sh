#!/bin/sh
# /init of the test domU (busybox): bring up the disk (xen-blkfront) and run the job named on
# the kernel command line (xl config `extra`), reporting on the console (hvc0), which
# xenconsoled in dom0 logs. Lines the rig parses start with XENRIG-.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /modules/xen-blkfront.ko
job=idle
for w in $(cat /proc/cmdline); do
    case "$w" in XENRIG_JOB=*) job="${w#XENRIG_JOB=}" ;; esac
done
if [ "$job" != idle ] && [ "$job" != "${job#*xvda}" ]; then
    i=0
    while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
fi
echo "XENRIG-DOMU up job=$job xvda=$([ -b /dev/xvda ] && echo yes || echo no)"
# job words are separated by ':' on the command line: guest-tool's argv
[ "$job" = idle ] || /bin/guest-tool $(echo "$job" | tr ':' ' ')
echo "XENRIG-DOMU job-exit=$?"
while :; do sleep 3600; done
