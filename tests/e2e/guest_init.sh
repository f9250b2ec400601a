#!/bin/busybox sh
# First stage of the test guest (runs from the initramfs as PID 1).
# Loads the modules, mounts the host's root (virtio-9p, read-only) under a
# tmpfs overlay and switches to it; the second stage runs there.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "guest-init: $*"
    poweroff -f
}

for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m" || fail "insmod $m failed"
done

cache=loose
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        quiesce.9pcache=*) cache="${arg#quiesce.9pcache=}" ;;
    esac
done

mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=$cache,msize=262144 hostroot /mnt/host \
    || fail "cannot mount the host root over 9p"
mount -t tmpfs -o size=256m,mode=755 tmpfs /mnt/rw || fail "tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot \
    || fail "overlay mount failed"
for d in proc sys dev; do
    mount --move /$d /newroot/$d || fail "cannot move /$d"
done
mount -t tmpfs -o mode=755 tmpfs /newroot/run || fail "tmpfs on /run"
mkdir -p /newroot/run/guest
cp /stage2 /newroot/run/guest/stage2
exec switch_root /newroot /bin/busybox sh /run/guest/stage2
