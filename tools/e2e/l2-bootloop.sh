#!/bin/sh
# Diagnostic /e2e.sh (inside L1, busybox sh): boots the L2 Linux guest N times in a row with
# `forkvm run` (2 vCPUs, the l2-boot command line), each to FORKVM-READY and a shell answer, then
# `exit` (the guest reboots, forkvm exits). L1's KVM trace events (tracefs, ring buffer) are on;
# when a boot ends any other way (e.g. "the guest shut down"), the tail of the trace, forkvm's
# stderr and the L2 console are printed. Prints "BOOTLOOP <i> ok|FAIL ..." per boot and a count.
# From the host: tools/e2e/run.sh --script tools/e2e/l2-bootloop.sh --timeout 1200
#   L1_APPEND="LOOP_N=20 LOOP_CMDLINE=..." (defaults: 20, the l2-boot command line)
#   LOOP_EARLY=1: only the kernel's own boot (SMP bring-up, ACPI, drivers): rdinit= and init=/nonexistent,
#   so the kernel panics for want of an init and resets (panic=-1, reboot=k); a boot passes when
#   forkvm exits 0 with nothing on stderr (~3 s each instead of ~10).
set -u
n="${LOOP_N:-20}"
vcpus="${LOOP_VCPUS:-2}"
cmdline="${LOOP_CMDLINE:-console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1}"
events="${LOOP_EVENTS:-kvm}"
early="${LOOP_EARLY:-0}"
[ "$early" = 1 ] && cmdline="$cmdline rdinit=/nonexistent init=/nonexistent"
forkvm="${FORKVM:-/forkvm}"
T=/sys/kernel/tracing
mount -t tracefs tracefs "$T" 2>/dev/null || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
[ -d "$T/events" ] || T=/sys/kernel/debug/tracing
if [ -d "$T/events" ]; then
    echo 16384 >"$T/buffer_size_kb"
    for e in $events; do echo 1 >"$T/events/$e/enable" || echo "bootloop: cannot enable $e"; done
    echo 1 >"$T/tracing_on"
else
    echo "bootloop: no tracefs; running without L1 traces"
fi
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
work=/tmp/loop
ok=0
bad=0
i=1
while [ "$i" -le "$n" ]; do
    rm -rf "$work"; mkdir -p "$work"
    mkfifo "$work/in"
    : >"$work/out"; : >"$work/err"
    [ -d "$T/events" ] && : >"$T/trace"
    t0=$(now_ms)
    "$forkvm" run --kernel /l2/vmlinuz --initrd /l2/initrd.img --mem 256M --vcpus "$vcpus" \
        --cmdline "$cmdline" <"$work/in" >"$work/out" 2>"$work/err" &
    pid=$!
    exec 3>"$work/in"
    state=boot
    [ "$early" = 1 ] && state=exit
    deadline=$((t0 + 120000))
    while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do
        if [ "$state" = boot ] && grep -qF FORKVM-READY "$work/out"; then
            # shellcheck disable=SC2016  # expanded by the L2 shell
            echo 'echo LOOP-$((6*7))' >&3
            state=ready
        elif [ "$state" = ready ] && grep -qF LOOP-42 "$work/out"; then
            echo 'exit' >&3
            state=exit
        fi
        usleep 20000
    done
    exec 3>&-
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        why="timeout in state $state"
    else
        why=""
    fi
    wait "$pid"
    rc=$?
    ms=$(($(now_ms) - t0))
    if [ "$state" = exit ] && [ -z "$why" ] && [ "$rc" -eq 0 ] && ! grep -q . "$work/err"; then
        ok=$((ok + 1))
        echo "BOOTLOOP $i ok ($ms ms)"
    else
        bad=$((bad + 1))
        echo "BOOTLOOP $i FAIL ($ms ms, state $state, rc $rc${why:+, $why})"
        sed 's/^/  err| /' "$work/err"
        tail -n 30 "$work/out" | sed 's/^/  L2| /'
        if [ -d "$T/events" ]; then
            echo 0 >"$T/tracing_on"
            echo "  ---- L1 trace: shutdown/triple lines ----"
            grep -n -i -E 'shutdown|triple|inj_exception|EXIT_(EXCP|ERR)' "$T/trace" | tail -n 40 | sed 's/^/  tr| /'
            echo "  ---- L1 trace: last 250 lines ----"
            tail -n 250 "$T/trace" | sed 's/^/  tr| /'
            echo 1 >"$T/tracing_on"
        fi
    fi
    i=$((i + 1))
done
echo "BOOTLOOP done: $ok ok, $bad failed of $n"
[ "$bad" -eq 0 ]
