#!/bin/sh
# /e2e.sh that runs inside L1 (busybox sh): boot the L2 Linux guest with
# forkvm, wait for the L2 initramfs' "FORKVM-READY uptime=<s>" line, report
# the L2 boot time, type a command into the L2 shell and check its output,
# then make the guest reboot (reboot=k) and expect forkvm to exit.
#
# Tunables (pass via the L1 kernel command line, e.g.
# L1_APPEND="L2_BOOT_TIMEOUT=600" tools/e2e/run-l1.sh):
#   L2_BOOT_TIMEOUT   seconds to wait for FORKVM-READY (default 300)
#   L2_EXIT_TIMEOUT   seconds to wait for forkvm to exit after reboot (default 60)
#   L2_MEM, L2_VCPUS  (default 256M, 2)
#   L2_CMDLINE        (default: the fast one of `forkvm scenario linux`: ACPI, pci=off,
#                     no i8042 or rtc_cmos driver (their probes cost ~17 s nested),
#                     one 8250 port)
#   L2_REQUIRE_EXIT   1 (default): fail if forkvm does not exit on guest reboot
#   FORKVM, L2_DIR, L2_WORK  binary (/forkvm), kernel+initrd dir (/l2), scratch
#                     dir (/tmp/l2); for running this script outside L1
set -eu
# shellcheck disable=SC3040  # busybox ash supports pipefail
set -o pipefail 2>/dev/null || true

boot_timeout="${L2_BOOT_TIMEOUT:-300}"
exit_timeout="${L2_EXIT_TIMEOUT:-60}"
mem="${L2_MEM:-256M}"
vcpus="${L2_VCPUS:-2}"
cmdline="${L2_CMDLINE:-console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1}"
require_exit="${L2_REQUIRE_EXIT:-1}"

forkvm="${FORKVM:-/forkvm}"
l2dir="${L2_DIR:-/l2}"
work="${L2_WORK:-/tmp/l2}"
rm -rf "$work"
mkdir -p "$work"
in="$work/in" out="$work/out" err="$work/err"
mkfifo "$in"
: >"$out"
: >"$err"

now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
dump() {
    echo "---- L2 console (forkvm stdout) ----"
    sed 's/^/L2| /' "$out" || true
    echo "---- forkvm stderr ----"
    sed 's/^/forkvm| /' "$err" || true
    echo "----"
}
pid=""
fail() {
    echo "l2-boot: FAIL: $*"
    dump
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    exit 1
}
alive() { kill -0 "$pid" 2>/dev/null; }
# wait_for PATTERN TIMEOUT_S : poll $out for a fixed string
wait_for() {
    deadline=$(($(now_ms) + $2 * 1000))
    while ! grep -qF "$1" "$out"; do
        if ! alive; then
            wait "$pid" && rc=0 || rc=$?
            pid=""
            fail "forkvm exited (status $rc) before printing '$1'"
        fi
        [ "$(now_ms)" -lt "$deadline" ] || fail "timeout (${2}s) waiting for '$1'"
        usleep 20000
    done
}

echo "l2-boot: $forkvm run --kernel $l2dir/vmlinuz --initrd $l2dir/initrd.img --mem $mem --vcpus $vcpus --cmdline \"$cmdline\""
t0=$(now_ms)
"$forkvm" run --kernel "$l2dir/vmlinuz" --initrd "$l2dir/initrd.img" --mem "$mem" --vcpus "$vcpus" \
    --cmdline "$cmdline" <"$in" >"$out" 2>"$err" &
pid=$!
# Hold the write end of the guest's serial input open (opening blocks until
# forkvm opened the read end, which the shell does before exec).
exec 3>"$in"

wait_for "FORKVM-READY" "$boot_timeout"
t1=$(now_ms)
guest_up="$(sed -n 's/.*FORKVM-READY uptime=\([0-9.]*\).*/\1/p' "$out" | head -n1)"
echo "L2-BOOT-TIME ms=$((t1 - t0)) guest_uptime=${guest_up}s (L1 wall clock from spawning forkvm to FORKVM-READY, 10ms resolution)"

# Talk to the L2 shell over the serial console.
# shellcheck disable=SC2016  # expanded by the L2 shell, not here
echo 'echo L2-ECHO-$((6*7)) $(uname -r)' >&3
wait_for "L2-ECHO-42" 60
t2=$(now_ms)
echo "l2-boot: L2 shell answered in $((t2 - t1)) ms: $(grep -F 'L2-ECHO-42' "$out" | tail -n1 | tr -d '\r')"

# ACPI: every vCPU is online; the virtio-mmio vsock device (DSDT LNRO0005) was probed.
# shellcheck disable=SC2016  # expanded by the L2 shell, not here
echo 'echo L2-NPROC-$((40+2))-$(nproc)-' >&3
wait_for "L2-NPROC-42-" 60
grep -qF "L2-NPROC-42-$vcpus-" "$out" || fail "the guest sees $(sed -n 's/.*L2-NPROC-42-\([0-9]*\)-.*/\1/p' "$out" | tail -n1) CPUs, not $vcpus"
echo "l2-boot: nproc = $vcpus"
# shellcheck disable=SC2016
echo 'dmesg | grep -i -e virtio -e vsock | sed "s/^/L2-DMESG /"; if [ -c /dev/vsock ]; then echo L2-VSOCK-$((40+2))-yes; else echo L2-VSOCK-$((40+2))-no; fi' >&3
wait_for "L2-VSOCK-42-" 60
grep -qF "L2-VSOCK-42-yes" "$out" || fail "no /dev/vsock in the guest (virtio_mmio did not probe the vsock device?)"
echo "l2-boot: /dev/vsock present; $(grep -F 'L2-DMESG' "$out" | grep -c .) virtio/vsock kernel lines"

# Leave: the L2 /init reboots (-f) when its shell exits; with reboot=k the
# guest resets via the i8042, which the VMM should turn into an exit.
echo 'exit' >&3
deadline=$(($(now_ms) + exit_timeout * 1000))
while alive && [ "$(now_ms)" -lt "$deadline" ]; do usleep 50000; done
if alive; then
    if [ "$require_exit" = 1 ]; then
        fail "forkvm still running ${exit_timeout}s after the guest rebooted"
    fi
    echo "l2-boot: warning: forkvm did not exit after guest reboot; killing it"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
else
    wait "$pid" && rc=0 || rc=$?
    echo "l2-boot: forkvm exited with status $rc after guest reboot ($(($(now_ms) - t2)) ms)"
    if [ "$rc" -ne 0 ]; then
        pid=""
        fail "forkvm exit status $rc"
    fi
fi
exec 3>&-
dump
echo "l2-boot: PASS"
