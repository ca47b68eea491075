#!/usr/bin/env bash
# One entry point for the Linux end-to-end test:
#   1. fetch-guest.sh       Debian cloud kernel, kvm modules, busybox (cached)
#   2. build forkvm static  cargo build --release -p forkvm (crt-static)
#   3. mk-l2-initramfs.sh   the L2 guest initramfs
#   4. mk-l1-initramfs.sh   the L1 initramfs with forkvm + L2 + test script
#   5. run-l1.sh            QEMU TCG (nested SVM) boots L1, which runs the test
# and exits with the test's status.
#
# Usage: run.sh [--placeholder] [--forkvm BIN] [--script FILE] [--timeout S]
#   --placeholder   use tools/e2e/kvm-probe.rs as /forkvm and kvm-probe.sh as
#                   the test (proves the harness + nested KVM without forkvm)
#   --forkvm BIN    use this static binary instead of building one
#   --script FILE   test script run inside L1 (default tools/e2e/l2-boot.sh)
#   --timeout S     QEMU hard timeout (default $E2E_TIMEOUT or 900)
# Env: FORKVM_CACHE (cache dir), L1_APPEND (extra L1 kernel args; the test
# script sees NAME=VALUE words as environment, e.g. L2_BOOT_TIMEOUT=600),
# E2E_VERBOSE=1, and everything run-l1.sh accepts.
set -euo pipefail
E2E_TAG=run
# shellcheck source=tools/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

placeholder=0
forkvm="${FORKVM_BIN:-}"
script="${E2E_SCRIPT:-}"
timeout_s="${E2E_TIMEOUT:-900}"
while (($#)); do
    case "$1" in
        --placeholder) placeholder=1; shift ;;
        --forkvm) forkvm="$2"; shift 2 ;;
        --script) script="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) e2e_log "unknown argument: $1 (see --help)"; exit 2 ;;
    esac
done

target=x86_64-unknown-linux-gnu

build_probe() { # -> $CACHE/build/kvm-probe (dependency-free, plain rustc)
    local src="$E2E_DIR/kvm-probe.rs" bin="$CACHE/build/kvm-probe"
    e2e_require rustc "rustup (https://rustup.rs) or Debian's rustc"
    if [[ ! -x "$bin" || "$src" -nt "$bin" ]]; then
        e2e_log "building $bin"
        mkdir -p "$CACHE/build"
        rustc --edition 2021 -O -C target-feature=+crt-static -C strip=debuginfo \
            --target "$target" "$src" -o "$bin" \
            || e2e_die "building kvm-probe failed (is the $target std installed? rustup target add $target)"
    fi
}

build_forkvm() { # -> prints path of static forkvm
    local tdir
    e2e_require cargo "rustup (https://rustup.rs)"
    e2e_log "building static forkvm: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target $target -p forkvm"
    if ! (cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --release --target "$target" -p forkvm >&2); then
        e2e_die "cargo build of forkvm failed; fix it, pass --forkvm BIN, or use --placeholder to test the harness alone"
    fi
    tdir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
    [[ -x "$tdir/$target/release/forkvm" ]] || e2e_die "built forkvm not found at $tdir/$target/release/forkvm"
    printf '%s\n' "$tdir/$target/release/forkvm"
}

t_start=$SECONDS
"$E2E_DIR/fetch-guest.sh" >&2
build_probe
if ((placeholder)); then
    forkvm="${forkvm:-$CACHE/build/kvm-probe}"
    script="${script:-$E2E_DIR/kvm-probe.sh}"
elif [[ -z "$forkvm" ]]; then
    forkvm="$(build_forkvm)"
fi
script="${script:-$E2E_DIR/l2-boot.sh}"

"$E2E_DIR/mk-l2-initramfs.sh" "$CACHE/l2-initrd.img" >/dev/null
"$E2E_DIR/mk-l1-initramfs.sh" --forkvm "$forkvm" --script "$script" \
    --l2-kernel "$CACHE/vmlinuz" --l2-initrd "$CACHE/l2-initrd.img" \
    --out "$CACHE/l1-initrd.img" >/dev/null
e2e_log "prepared in $((SECONDS - t_start)) s; booting L1 (forkvm=$forkvm script=$script)"

set +e
"$E2E_DIR/run-l1.sh" --initrd "$CACHE/l1-initrd.img" --kernel "$CACHE/vmlinuz" --timeout "$timeout_s"
rc=$?
set -e
if ((rc == 0)); then
    e2e_log "PASS ($((SECONDS - t_start)) s)"
else
    e2e_log "FAIL: exit status $rc ($((SECONDS - t_start)) s); console log: ${E2E_LOG:-$CACHE/l1-console.log}"
fi
exit "$rc"
