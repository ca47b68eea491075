#!/bin/sh
# Diagnostic /e2e.sh (inside L1, busybox sh), not part of the suite: the control for the issue-10
# L2 fault with QEMU/KVM as the L2 VMM instead of forkvm. Same L2 kernel and initramfs, 2 vCPUs,
# 256 MiB, the same process storm, the same churn: LOOP_BURST pause/resume pairs (HMP `stop` /
# `cont`) per check, then a check that each guest CPU still starts processes (`taskset -c N echo`
# typed into the serial shell) and that the console reports no RCU stall. Prints
# "QEMULOOP <i> ok|STALL" and "QEMULOOP done: stalls=S ... pauses=P".
# From the host (QEMU and its libraries are staged into L1 by --qemu-l2):
#   tools/e2e/run.sh --qemu-l2 --script tools/e2e/l2-qemuloop.sh --timeout 700 \
#       (with L1_APPEND="LOOP_BURST=32 LOOP_SECS=540")
# The monitor and the serial port are QEMU `pipe` chardevs (FIFOs <name>.in / <name>.out); the
# script waits for each answer it needs (an `info status` after every pair, the echo of each check).
# LOOP_CHURN=N starts N short-lived processes in L1 after each pair (the forkvm loop starts two
# CLI processes per pair: this separates L1 process churn from forkvm's VMM).
set -u
secs="${LOOP_SECS:-540}"
burst="${LOOP_BURST:-32}"
storm="${LOOP_STORM:-2}"
vcpus="${LOOP_VCPUS:-2}"
churn="${LOOP_CHURN:-0}"
cmdline="console=ttyS0 reboot=k panic=-1 quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1 ${LOOP_CMDLINE_EXTRA:-}"
d=/tmp/qloop
t_start=$(cut -d. -f1 /proc/uptime)
elapsed() { echo $(($(cut -d. -f1 /proc/uptime) - t_start)); }

# Waits (polling, bounded) until file $1 has at least $2 lines matching $3.
wait_count() {
    w=0
    while [ "$(grep -c "$3" "$1" 2>/dev/null)" -lt "$2" ]; do
        w=$((w + 1))
        [ "$w" -le "$4" ] || return 1
        sleep 0.05
    done
}

qpid=
boot() {
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
    kill $readers 2>/dev/null
    rm -rf "$d"; mkdir -p "$d"
    for f in mon.in mon.out ser.in ser.out; do mkfifo "$d/$f"; done
    : >"$d/mon.log"; : >"$d/console.log"
    cat "$d/mon.out" >>"$d/mon.log" &
    r1=$!
    cat "$d/ser.out" >>"$d/console.log" &
    readers="$r1 $!"
    qemu-system-x86_64 -machine q35 -accel kvm -cpu host -m 256M -smp "$vcpus" -no-reboot -nodefaults \
        -display none -chardev "pipe,id=mon,path=$d/mon" -mon chardev=mon,mode=readline \
        -chardev "pipe,id=ser,path=$d/ser" -serial chardev:ser \
        -kernel /l2/vmlinuz -initrd /l2/initrd.img -append "$cmdline" 2>"$d/qemu.err" &
    qpid=$!
    wait_count "$d/console.log" 1 FORKVM-READY 6000 || { echo "QEMULOOP: L2 did not boot in 300 s"; tail -n 20 "$d/console.log"; cat "$d/qemu.err"; return 1; }
    sleep 1 # (pacing only) let the shell print its prompt before typing
    # shellcheck disable=SC2016  # expanded by the guest's shell
    echo 'echo 7 >/proc/sys/kernel/printk; i=0; while [ $i -lt '"$storm"' ]; do setsid sh -c "while :; do /bin/true; done" </dev/null >/dev/null 2>&1 & i=$((i+1)); done; echo STORM-$((40+2))' >"$d/ser.in"
    wait_count "$d/console.log" 1 STORM-42 1200 || { echo "QEMULOOP: the storm did not start"; tail -n 20 "$d/console.log"; return 1; }
    echo "QEMULOOP: booted L2 under QEMU/KVM (vcpus $vcpus, storm $storm) at $(elapsed) s"
}

readers=
boot || exit 1
ok=0 stalls=0 pauses=0 i=1 running=0
while [ "$(elapsed)" -lt "$secs" ]; do
    b=0
    while [ "$b" -lt "$burst" ]; do
        # A FIFO with no reader would block the open: QEMU (its only reader) must be alive.
        kill -0 "$qpid" 2>/dev/null || { echo "QEMULOOP $i: the L2's QEMU exited"; sed 's/^/  qemu| /' "$d/qemu.err"; break; }
        printf 'stop\ncont\ninfo status\n' >"$d/mon.in" || continue
        running=$((running + 1))
        wait_count "$d/mon.log" "$running" "VM status: running" 1200 || { echo "QEMULOOP $i: the monitor did not answer"; break; }
        b=$((b + 1)); pauses=$((pauses + 1))
        # LOOP_CHURN short-lived L1 processes per pair, as the forkvm loop's `forkvm pause` and
        # `forkvm resume` CLI processes are (L1 page-table churn, without forkvm's VMM).
        k=0
        while [ "$k" -lt "$churn" ]; do /bin/sh -c 'exit 0'; k=$((k + 1)); done
    done
    c=0 line=
    while [ "$c" -lt "$vcpus" ]; do line="${line}taskset -c $c echo CHK-$i-\$((40+$c)); "; c=$((c + 1)); done
    echo "$line" >"$d/ser.in"
    if wait_count "$d/console.log" 1 "CHK-$i-$((40 + vcpus - 1))" 900 && ! grep -q "detected stalls" "$d/console.log"; then
        ok=$((ok + 1))
        echo "QEMULOOP $i ok ($(elapsed) s)"
    else
        stalls=$((stalls + 1))
        echo "QEMULOOP $i STALL ($(elapsed) s): no answer from every guest CPU within 45 s, or an RCU stall"
        if grep -q "invoked oom-killer" "$d/console.log"; then
            echo "  ---- L2 console: the OOM report (first 70 lines) ----"
            grep -m1 -A70 "invoked oom-killer" "$d/console.log" | sed 's/^/  L2| /'
        fi
        if grep -q "detected stalls" "$d/console.log"; then
            echo "  ---- L2 console: the RCU stall report (first 40 lines) ----"
            grep -m1 -B2 -A40 "detected stalls" "$d/console.log" | sed 's/^/  L2| /'
        fi
        echo "  ---- L2 console (last 40 lines) ----"
        tail -n 40 "$d/console.log" | sed 's/^/  L2| /'
        echo "  ---- qemu stderr ----"
        sed 's/^/  qemu| /' "$d/qemu.err"
        boot || exit 1
        running=0
    fi
    i=$((i + 1))
done
kill "$qpid" 2>/dev/null
echo "QEMULOOP done: stalls=$stalls ok=$ok of $((i - 1)) checks, $pauses pauses (burst $burst, vcpus $vcpus, storm $storm, churn $churn), in $(elapsed) s"
[ "$stalls" -eq 0 ]
