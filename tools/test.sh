#!/usr/bin/env bash
# forkvm's whole test suite, the one command in the README and in .ci/run:
#   0. cargo fmt --check and cargo clippy -D warnings (the house rules)
#   1. unit tests (no KVM) and KVM tests (this machine's /dev/kvm, our test guest): cargo test
#   2. fuzzing: every cargo-fuzz target of fuzz/ for 20 s (tools/fuzz.sh; needs the nightly toolchain,
#      installs cargo-fuzz if missing)
#   3. Linux end-to-end: forkvm inside a QEMU TCG L1 with nested SVM boots Debian's cloud kernel
# It installs what it needs (apt packages; guest artifacts cached in .cache/, git-ignored).
# A missing /dev/kvm or QEMU is a failure with instructions, never a skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if [[ ! -e /dev/kvm ]]; then
    echo "tools/test.sh: /dev/kvm is missing: the KVM tests need a host with KVM (load kvm_intel/kvm_amd, or enable nested virtualization)" >&2
    exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test (unit + KVM tiers)"
cargo test --workspace --all-targets

echo "== fuzz (each target 20 s; tools/fuzz.sh SECONDS to run longer)"
tools/fuzz.sh "${FORKVM_FUZZ_SECONDS:-20}"

echo "== Web console in a real browser (Debian chromium + playwright-core)"
tools/console/run.sh

echo "== Linux end-to-end (QEMU TCG L1, nested KVM, Linux L2)"
e2e_rc=0
tools/e2e/run.sh || e2e_rc=$?
if [[ $e2e_rc -eq 0 ]]; then
    echo "e2e: 1 passed, 0 failed"
else
    echo "e2e: 0 passed, 1 failed"
    exit "$e2e_rc"
fi
