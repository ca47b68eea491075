#!/usr/bin/env bash
# Host-only test aid: a stand-in for `forkvm run` that boots the same
# kernel/initrd with QEMU (TCG, q35, acpi=off) so that l2-boot.sh and the L2
# initramfs can be checked on the host without the real VMM:
#   FORKVM=tools/e2e/mock-forkvm.sh L2_DIR=.cache/guest-l2 sh tools/e2e/l2-boot.sh
# Serial console on stdin/stdout like forkvm; exits when the guest resets.
set -euo pipefail
[[ "${1:-}" == run ]] || { echo "usage: mock-forkvm.sh run --kernel K --initrd I --mem M --vcpus N --cmdline C" >&2; exit 2; }
shift
kernel="" initrd="" mem=256M vcpus=1 cmdline="console=ttyS0"
while (($#)); do
    case "$1" in
        --kernel) kernel="$2" ;; --initrd) initrd="$2" ;; --mem) mem="$2" ;;
        --vcpus) vcpus="$2" ;; --cmdline) cmdline="$2" ;;
        *) echo "mock-forkvm: unknown argument $1" >&2; exit 2 ;;
    esac
    shift 2
done
exec qemu-system-x86_64 -machine q35 -accel "${MOCK_ACCEL:-tcg}" -cpu "${MOCK_CPU:-qemu64}" \
    -m "$mem" -smp "$vcpus" -no-reboot -nodefaults -display none -monitor none \
    -serial stdio -kernel "$kernel" -initrd "$initrd" -append "$cmdline ${MOCK_APPEND:-acpi=off}"
