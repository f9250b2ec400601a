# Control loop of the test guest (sourced last by the per-boot script; runs
# forever as PID 1). Requests are "TOKEN BASE64-COMMAND" lines on the
# org.quiesce.ctl port; answers are "TOKEN RC BASE64-OUTPUT". While no host
# is connected the port reads EOF at once: close, wait, reopen.
ctl_port=/dev/virtio-ports/org.quiesce.ctl
while :; do
    if exec 3<>"$ctl_port"; then
        while read -r token request <&3; do
            [ -n "$token" ] || continue
            echo "$request" | /bin/busybox base64 -d > /run/guest/ctl.sh
            /bin/busybox sh /run/guest/ctl.sh > /run/guest/ctl.out 2>&1 < /dev/null
            rc=$?
            echo "$token $rc $(/bin/busybox base64 -w0 /run/guest/ctl.out)" >&3
        done
        exec 3>&-
    fi
    /bin/busybox sleep 0.2
done
