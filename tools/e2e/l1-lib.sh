# shellcheck shell=sh
# Shared by the L2 tests that run inside L1 (busybox sh; staged by run.sh as /e2e/l1-lib.sh):
#   . /e2e/l1-lib.sh
# (tools/e2e/lib.sh is the host side, bash.)

# now_ms: L1's uptime in milliseconds.
now_ms() { read -r u _ </proc/uptime; echo "${u%.*}${u#*.}0" | sed 's/^0*//'; }

# show_kept TAG: the last 40 lines of every kept VM log ($keep/* and $FORKVM_RUN_DIR/.exited/*/*).
show_kept() {
    for f in "$keep"/* "$FORKVM_RUN_DIR"/.exited/*/*; do
        [ -f "$f" ] || continue
        echo "$1: kept log $f (last 40 lines):"; tail -n 40 "$f" | sed 's/^/  | /'
    done
}

# load_tun: /dev/net/tun for --net, loading the tun.ko run.sh staged; fails only if insmod does.
load_tun() {
    [ -c /dev/net/tun ] && return 0
    insmod /e2e/tun.ko || return 1
    mkdir -p /dev/net
    [ -c /dev/net/tun ] || mknod /dev/net/tun c 10 200
    return 0
}
