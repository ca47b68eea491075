#!/bin/sh
# Test aid: a stand-in for `forkvm run` that boots the given kernel/initrd
# with QEMU instead, so that l2-boot.sh, the L2 initramfs and the nested
# set-up can be checked without the real VMM. POSIX sh (runs in L1 too).
#   host:   FORKVM=tools/e2e/mock-forkvm.sh L2_DIR=<dir with vmlinuz, initrd.img> sh tools/e2e/l2-boot.sh
#   in L1:  tools/e2e/run.sh --qemu-l2   (QEMU + its libraries copied into L1, MOCK_ACCEL=kvm)
# Serial console on stdin/stdout like forkvm; exits when the guest resets.
# Env: MOCK_ACCEL (tcg), MOCK_CPU (qemu64; "host" with kvm), MOCK_MACHINE
# (q35), MOCK_APPEND (extra kernel args, default "acpi=off" like a minimal VMM).
set -eu
[ "${1:-}" = run ] || { echo "usage: mock-forkvm.sh run --kernel K --initrd I --mem M --vcpus N --cmdline C" >&2; exit 2; }
shift
kernel="" initrd="" mem=256M vcpus=1 cmdline="console=ttyS0"
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) kernel="$2" ;; --initrd) initrd="$2" ;; --mem) mem="$2" ;;
        --vcpus) vcpus="$2" ;; --cmdline) cmdline="$2" ;;
        *) echo "mock-forkvm: unknown argument $1" >&2; exit 2 ;;
    esac
    shift 2
done
accel="${MOCK_ACCEL:-tcg}"
cpu="${MOCK_CPU:-}"
if [ -z "$cpu" ]; then if [ "$accel" = kvm ]; then cpu=host; else cpu=qemu64; fi; fi
exec qemu-system-x86_64 -machine "${MOCK_MACHINE:-q35}" -accel "$accel" -cpu "$cpu" \
    -m "$mem" -smp "$vcpus" -no-reboot -nodefaults -display none -monitor none \
    -serial stdio -kernel "$kernel" -initrd "$initrd" -append "$cmdline ${MOCK_APPEND-acpi=off}"
