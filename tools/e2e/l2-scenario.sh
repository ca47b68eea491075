#!/bin/sh
# /e2e/l2-scenario.sh, runs inside L1 (busybox sh): `forkvm scenario linux` boots the L2 Linux
# guest in-process and walks it through shell command, pause/resume, snapshot + restore (reseeded)
# and fork (child reseeded by /bin/forkvm-agent, different uuids in parent and child, both keep
# running). Passes when forkvm prints "scenario: PASS" and exits 0.
#
# Tunables (NAME=VALUE words in L1_APPEND):
#   L2_MEM          guest memory (default 256M)
#   L2_CMDLINE      kernel command line (default: forkvm scenario's own default)
#   L2_BOOT_TIMEOUT seconds to wait for FORKVM-READY (default 300)
#   FORKVM, L2_DIR  binary (/forkvm), kernel+initrd dir (/l2)
set -eu
# shellcheck disable=SC3040  # busybox ash supports pipefail
set -o pipefail 2>/dev/null || true

forkvm="${FORKVM:-/forkvm}"
l2dir="${L2_DIR:-/l2}"
log="${L2_SCENARIO_LOG:-/tmp/l2-scenario.log}"
set -- scenario linux --kernel "$l2dir/vmlinuz" --initrd "$l2dir/initrd.img" \
    --mem "${L2_MEM:-256M}" --boot-timeout "${L2_BOOT_TIMEOUT:-300}"
if [ -n "${L2_CMDLINE:-}" ]; then set -- "$@" --cmdline "$L2_CMDLINE"; fi

echo "l2-scenario: $forkvm $*"
rc=0
"$forkvm" "$@" 2>&1 | tee "$log" || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "l2-scenario: FAIL: forkvm exited with status $rc"
    exit 1
fi
if ! grep -q '^scenario: PASS' "$log"; then
    echo "l2-scenario: FAIL: no 'scenario: PASS' line"
    exit 1
fi
echo "l2-scenario: PASS"
