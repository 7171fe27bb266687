#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tmpfs tmpfs /tmp
# ramfs: page-cache folios that are not swap-backed, i.e. kind "file".
mkdir -p /mnt/ramfs && mount -t ramfs ramfs /mnt/ramfs
ip link set lo up
for m in $(cat /modules.order 2>/dev/null); do insmod /modules/$m; done
if ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
echo "MAPCOUNT-KERNEL $(uname -r)"
