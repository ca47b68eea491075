#!/usr/bin/env bash
# One entry point for the Linux end-to-end test:
#   1. fetch-guest.sh       Debian cloud kernel, kvm modules, busybox (cached)
#   2. build forkvm static  cargo build --release -p forkvm -p guest-agent (crt-static)
#   3. mk-l2-initramfs.sh   the L2 guest initramfs (with /bin/forkvm-agent)
#   4. mk-l1-initramfs.sh   the L1 initramfs with forkvm + L2 + test script
#   5. run-l1.sh            QEMU TCG (nested SVM) boots L1, which runs the test
# and exits with the test's status.
#
# Usage: run.sh [--placeholder] [--forkvm BIN] [--script FILE] [--timeout S]
#   --placeholder   use tools/e2e/kvm-probe.rs as /forkvm and kvm-probe.sh as
#                   the test (proves the harness + nested KVM without forkvm)
#   --qemu-l2       diagnostic: use mock-forkvm.sh (QEMU -accel kvm, copied
#                   into L1 with its libraries) as /forkvm with l2-boot.sh, to
#                   measure nested L2 Linux boot without the real forkvm
#   --forkvm BIN    use this static binary instead of building one
#   --script FILE   test script run inside L1 (default tools/e2e/l2-suite.sh, which
#                   runs l2-boot.sh and l2-scenario.sh, staged as /e2e/*.sh in L1)
#   --timeout S     QEMU hard timeout (default $E2E_TIMEOUT or 600; a pass needs
#                   ~30 s). If L1's kernel reports a soft lockup, BUG or panic
#                   (QEMU TCG nested-SVM faults, seen about 1 run in 8) and L1
#                   never finishes, the L1 boot is retried once, so the tier
#                   stays under 10 minutes even then.
# Env: FORKVM_CACHE (cache dir), E2E_L2_KERNEL (the L2 kernel, default the L1 one; with
# FORKVM_L2_MODULES for its modules: an L1 kernel A/B keeps the L2 kernel), L1_APPEND (extra L1 kernel args; the test
# script sees NAME=VALUE words as environment, e.g. L2_BOOT_TIMEOUT=600),
# E2E_VERBOSE=1, E2E_PROBE=1 (run the kvm-probe preflight in L1 before the real
# test too; --placeholder always runs it), and everything run-l1.sh accepts.
set -euo pipefail
export E2E_TAG=run
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

placeholder=0
qemu_l2=0
forkvm="${FORKVM_BIN:-}"
script="${E2E_SCRIPT:-}"
timeout_s="${E2E_TIMEOUT:-600}"
while (($#)); do
    case "$1" in
        --placeholder) placeholder=1; shift ;;
        --qemu-l2) qemu_l2=1; shift ;;
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

tdir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
agent_bin="$tdir/$target/release/forkvm-agent"

build_forkvm() { # -> prints path of static forkvm; also builds the static guest agent
    e2e_require cargo "rustup (https://rustup.rs)"
    e2e_log "building static forkvm + forkvm-agent: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target $target -p forkvm -p guest-agent"
    if ! (cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --release --target "$target" -p forkvm -p guest-agent >&2); then
        e2e_die "cargo build of forkvm/guest-agent failed; fix it, pass --forkvm BIN, or use --placeholder to test the harness alone"
    fi
    [[ -x "$tdir/$target/release/forkvm" ]] || e2e_die "built forkvm not found at $tdir/$target/release/forkvm"
    [[ -x "$agent_bin" ]] || e2e_die "built forkvm-agent not found at $agent_bin"
    printf '%s\n' "$tdir/$target/release/forkvm"
}

build_agent() { # static guest agent alone (when --forkvm BIN is given)
    e2e_log "building static forkvm-agent"
    (cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --target "$target" -p guest-agent >&2) \
        || e2e_die "cargo build of guest-agent failed"
}

# Copy qemu-system-x86_64, its shared libraries and the firmware it needs
# into <dir> so that it runs inside L1 (the L1 initramfs has no libc).
stage_qemu() { # dir
    local d="$1" q lib
    q="$(command -v qemu-system-x86_64)" || e2e_die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    rm -rf "$d"; mkdir -p "$d/usr/bin" "$d/usr/share/qemu"
    cp -L "$q" "$d/usr/bin/"
    while read -r lib; do
        mkdir -p "$d$(dirname "$lib")"
        cp -L "$lib" "$d$lib"
    done < <(ldd "$q" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}')
    # Firmware for q35/microvm + -kernel boots: QEMU searches
    # <bindir>/../share/qemu and ../share/seabios (see qemu-system-x86_64 -L help).
    mkdir -p "$d/usr/share/seabios"
    for f in bios-256k.bin bios-microvm.bin qboot.rom linuxboot_dma.bin linuxboot.bin kvmvapic.bin pvh.bin multiboot_dma.bin; do
        if [[ -e "/usr/share/seabios/$f" ]]; then cp -L "/usr/share/seabios/$f" "$d/usr/share/seabios/"
        elif [[ -e "/usr/share/qemu/$f" ]]; then cp -L "/usr/share/qemu/$f" "$d/usr/share/qemu/"; fi
    done
    [[ -e "$d/usr/share/seabios/bios-256k.bin" || -e "$d/usr/share/qemu/bios-256k.bin" ]] \
        || e2e_die "bios-256k.bin not found; apt-get install seabios"
    mkdir -p "$d/usr/lib/x86_64-linux-gnu/qemu"
}

t_start=$SECONDS
"$E2E_DIR/module-order.sh" --self-test >&2
"$E2E_DIR/fetch-guest.sh" >&2
build_probe
extra_args=()
if ((qemu_l2)); then
    stage_qemu "$CACHE/build/qemu-stage"
    forkvm="$E2E_DIR/mock-forkvm.sh"
    extra_args=(--extra "$CACHE/build/qemu-stage")
    script="${script:-$E2E_DIR/l2-boot.sh}"
    export L1_APPEND="MOCK_ACCEL=kvm${L1_APPEND:+ $L1_APPEND}"
elif ((placeholder)); then
    forkvm="${forkvm:-$CACHE/build/kvm-probe}"
    script="${script:-$E2E_DIR/kvm-probe.sh}"
elif [[ -z "$forkvm" ]]; then
    forkvm="$(build_forkvm)"
else
    build_agent
fi
if [[ -z "$script" ]]; then
    # The real test: /e2e.sh = l2-suite.sh running /e2e/l2-boot.sh and /e2e/l2-scenario.sh.
    script="$E2E_DIR/l2-suite.sh"
    stage="$CACHE/build/e2e-stage"
    rm -rf "$stage"; mkdir -p "$stage/e2e"
    cp "$E2E_DIR/l2-boot.sh" "$E2E_DIR/l2-scenario.sh" "$E2E_DIR/l2-agent.sh" "$E2E_DIR/l2-netdisk.sh" \
        "$E2E_DIR/l2-snapdisk.sh" "$E2E_DIR/l2-preview.sh" "$E2E_DIR/l1-lib.sh" "$stage/e2e/"
    # l2-netdisk.sh, l2-snapdisk.sh, l2-preview.sh: an ext4 image with a web page (and a static
    # e2fsck the guest runs on its own disk) for --disk, and tun.ko for --net in L1.
    e2e_require mkfs.ext4 e2fsprogs
    e2e_require_cache e2fsck
    ndroot="$CACHE/build/netdisk-root"
    rm -rf "$ndroot"; mkdir -p "$ndroot/www" "$ndroot/sbin"
    echo "netdisk page" >"$ndroot/www/index.html"
    install -m 0755 "$CACHE/e2fsck" "$ndroot/sbin/e2fsck"
    mkfs.ext4 -q -F -L netdisk -E root_owner=0:0 -d "$ndroot" "$stage/e2e/netdisk.ext4" 32M \
        || e2e_die "mkfs.ext4 -d failed"
    tun="$(find "$CACHE/kernel-extract" -name 'tun.ko*' | head -n1)"
    [[ -n "$tun" ]] || e2e_die "tun.ko not in $CACHE/kernel-extract (run tools/e2e/fetch-guest.sh)"
    case "$tun" in
        *.ko) cp "$tun" "$stage/e2e/tun.ko" ;;
        *.xz) xz -dc "$tun" >"$stage/e2e/tun.ko" ;;
        *.zst) zstd -qdc "$tun" >"$stage/e2e/tun.ko" ;;
        *) e2e_die "unknown module format: $tun" ;;
    esac
    extra_args=(--extra "$stage")
fi

agent_args=()
if [[ -x "$agent_bin" ]] && ((!placeholder && !qemu_l2)); then agent_args=(--agent "$agent_bin"); fi
"$E2E_DIR/mk-l2-initramfs.sh" "${agent_args[@]}" "$CACHE/l2-initrd.img" >/dev/null
"$E2E_DIR/mk-l1-initramfs.sh" --forkvm "$forkvm" --script "$script" \
    --l2-kernel "${E2E_L2_KERNEL:-$CACHE/vmlinuz}" --l2-initrd "$CACHE/l2-initrd.img" \
    --out "$CACHE/l1-initrd.img" "${extra_args[@]}" >/dev/null
e2e_log "prepared in $((SECONDS - t_start)) s; booting L1 (forkvm=$forkvm script=$script)"

if ((!placeholder)) && [[ "${E2E_PROBE:-0}" != 1 ]]; then
    # The real test exercises KVM itself; the preflight only adds one more VM teardown.
    export L1_APPEND="E2E_NO_PROBE=1${L1_APPEND:+ $L1_APPEND}"
fi

l1_log="${E2E_LOG:-$CACHE/l1-console.log}"
run_l1() {
    set +e
    "$E2E_DIR/run-l1.sh" --initrd "$CACHE/l1-initrd.img" --kernel "$CACHE/vmlinuz" --timeout "$timeout_s"
    rc=$?
    set -e
}
run_l1
# L1's own kernel failing (no E2E-EXIT, and its log shows a lockup, BUG or panic) is a QEMU TCG
# nested-SVM fault in L1, not a test result: retry the L1 boot once. Seen: soft lockups while an
# L1 KVM VM was torn down, and "stack guard page was hit" in error_entry under KVM_RUN.
# A silent hang of L1's kernel (run-l1.sh: no output, not even its heartbeat, for E2E_HANG_KILL s;
# exit 126) is the same kind of fault: QEMU's register dump of the L1 CPUs is in the log.
l1_crash='^L1-HANG |soft lockup|BUG: |Kernel panic|stack guard page|general protection fault'
# Seen twice in one run (an L1 oops, then a silent hang on the retry): up to E2E_L1_RETRIES (2)
# more L1 boots, each one said and its log kept.
retries="${E2E_L1_RETRIES:-2}"
attempt=1
# An L2 guest that failed with the signature of the open issue-10 fault (tools/e2e/README.md, "The
# parent stall": an L2 vCPU livelocked in L1's KVM on a #PF it cannot deliver, with a CR3 outside
# guest RAM; or an L2 triple fault, whose registers SVM resets) gets the whole suite run once more
# in a fresh L1. That is reported as FLAKY with the first log kept, never as a plain pass: the
# fault is not proven to be QEMU's, and issue 10 stays open for it.
l2_fault='exited unasked \(Some\(GuestShutdown\)\)|forkvm: the guest shut down|rcu_preempt detected stalls'
l2_reruns_max="${E2E_L2_RERUNS:-1}"
l2_reruns=0
flaky=""
while true; do
    if ((attempt <= retries)) && ((rc == 124 || rc == 125 || rc == 126)) && grep -qE "$l1_crash" "$l1_log"; then
        cp -f "$l1_log" "$l1_log.l1-crash.$attempt"
        e2e_log "L1 kernel failure ($(grep -m1 -oE "($l1_crash).*" "$l1_log")) and no E2E-EXIT: a QEMU TCG nested-SVM fault in L1, not a test result; log kept in $l1_log.l1-crash.$attempt; booting L1 again (retry $attempt of $retries)"
        attempt=$((attempt + 1))
        run_l1
        continue
    fi
    if ((rc != 0)) && ((l2_reruns < l2_reruns_max)) && grep -qE "$l2_fault" "$l1_log"; then
        l2_reruns=$((l2_reruns + 1))
        cp -f "$l1_log" "$l1_log.l2-fault.$l2_reruns"
        why="$(grep -m1 -oE "($l2_fault).*" "$l1_log" | cut -c1-160)"
        failed_tests="$(grep -oE '^E2E-TEST [^ ]+ FAIL' "$l1_log" | awk '{print $2}' | tr '\n' ' ')"; failed_tests="${failed_tests% }"
        flaky="${flaky}${flaky:+; }${failed_tests:-a test} failed with the open issue-10 L2 fault ($why), log $l1_log.l2-fault.$l2_reruns"
        e2e_log "FLAKY: ${failed_tests:-a test} failed with the open issue-10 L2 fault ($why); log kept in $l1_log.l2-fault.$l2_reruns; running the suite once more in a fresh L1 ($l2_reruns of $l2_reruns_max)"
        run_l1
        continue
    fi
    break
done
# Trend numbers (L1 wall clock), repeated at the end for CI logs.
grep -E '^(L2-BOOT-TIME|L2 boot time:|fork time:|fork child first answer:|E2E-TEST )' \
    "$l1_log" 2>/dev/null | sed 's/^/[run] trend: /' >&2 || true
if ((rc == 0)) && [[ -n "$flaky" ]]; then
    e2e_log "PASS on a rerun, FLAKY ($((SECONDS - t_start)) s): $flaky"
elif ((rc == 0)); then
    e2e_log "PASS ($((SECONDS - t_start)) s)"
else
    e2e_log "FAIL: exit status $rc ($((SECONDS - t_start)) s); console log: ${E2E_LOG:-$CACHE/l1-console.log}"
fi
exit "$rc"
