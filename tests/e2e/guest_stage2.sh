#!/bin/busybox sh
# Second stage of the test guest: PID 1 on the overlay root. Names the
# virtio ports and disks the way udev would, installs a shutdown that works
# without systemd, then runs the per-boot script named on the kernel command
# line (quiesce.run=PATH, a file on the host written before boot).
B=/bin/busybox
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
$B mkdir -p /dev/virtio-ports /dev/disk/by-serial /dev/pts /dev/shm /tmp
$B mount -t devpts devpts /dev/pts
$B mount -t tmpfs tmpfs /dev/shm
for d in /sys/class/virtio-ports/*; do
    name=$($B cat "$d/name" 2>/dev/null)
    [ -n "$name" ] && $B ln -sf "/dev/${d##*/}" "/dev/virtio-ports/$name"
done
for s in /sys/block/vd*/serial; do
    [ -e "$s" ] || continue
    serial=$($B cat "$s")
    dev=${s%/serial}
    [ -n "$serial" ] && $B ln -sf "/dev/${dev##*/}" "/dev/disk/by-serial/$serial"
done

# qemu-ga's guest-shutdown runs /sbin/shutdown, which is systemctl here.
$B mkdir -p /run/guest/sbin
$B cat > /run/guest/sbin/shutdown <<'EOS'
#!/bin/busybox sh
/bin/busybox sync
/bin/busybox umount -a -r 2>/dev/null
case "$*" in
    *-r*) /bin/busybox reboot -f ;;
    *) /bin/busybox poweroff -f ;;
esac
EOS
$B chmod 755 /run/guest/sbin/shutdown
$B rm -f /usr/sbin/shutdown
$B cp /run/guest/sbin/shutdown /usr/sbin/shutdown

run=
for arg in $($B cat /proc/cmdline); do
    case "$arg" in
        quiesce.run=*) run="${arg#quiesce.run=}" ;;
    esac
done
if [ -n "$run" ] && [ -r "$run" ]; then
    $B cp "$run" /run/guest/run.sh
    . /run/guest/run.sh
fi
echo "guest-stage2: nothing to run (quiesce.run=$run); powering off"
$B poweroff -f
