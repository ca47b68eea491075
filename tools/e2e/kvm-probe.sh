#!/bin/sh
# /e2e.sh variant used to prove the harness with the placeholder forkvm
# (tools/e2e/kvm-probe.rs): runs /forkvm and checks that it could run a
# nested guest. Runs inside L1 under busybox sh.
set -eu
echo "kvm-probe.sh: running /forkvm (placeholder) against /dev/kvm"
out="$(/forkvm run --kernel /l2/vmlinuz --initrd /l2/initrd.img 2>&1)" || { echo "$out"; exit 1; }
echo "$out"
case "$out" in
    *"KVM-PROBE PASS"*) echo "kvm-probe.sh: PASS"; exit 0 ;;
    *) echo "kvm-probe.sh: FAIL"; exit 1 ;;
esac
