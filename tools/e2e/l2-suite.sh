#!/bin/sh
# /e2e.sh of the real Linux e2e test, inside L1 (busybox sh): runs every L2 test in /e2e/
# (l2-boot.sh: `forkvm run` boots L2, shell, reboot exits; l2-scenario.sh: `forkvm scenario linux`;
# l2-agent.sh: the guest agent through the ordinary CLI: exec, fork --count 3, hibernate/wake clock;
# l2-netdisk.sh: disk + network, fork, hibernate; l2-snapdisk.sh: snapshot/restore of a guest
# writing files, then e2fsck and the synced files; l2-preview.sh: the daemon's preview wakes a
# hibernated sandbox with a disk and a network)
# and fails if any fails. Prints "E2E-TEST <name> PASS|FAIL (<s> s)" per test.
# From the host: L1_APPEND=E2E_TESTS=l2-agent tools/e2e/run.sh runs only l2-agent.
set -u
up() { read -r u _ </proc/uptime; echo "$u"; }
failed=0
# E2E_ONLY="l2-netdisk" (an L1_APPEND word; commas or spaces) or E2E_TESTS=a,b runs a subset.
tests=$(echo "${E2E_ONLY:-${E2E_TESTS:-l2-boot l2-scenario l2-agent l2-netdisk l2-snapdisk l2-preview}}" | tr , ' ')
for t in $tests; do
    [ -f "/e2e/$t.sh" ] || { echo "E2E-TEST $t FAIL (no /e2e/$t.sh)"; failed=$((failed + 1)); continue; }
    t0="$(up)"
    if sh "/e2e/$t.sh"; then r=PASS; else r=FAIL; failed=$((failed + 1)); fi
    echo "E2E-TEST $t $r ($(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }') s)"
done
[ "$failed" -eq 0 ]
