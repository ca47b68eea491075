#!/usr/bin/env bash
# Build the L1 (QEMU-TCG "host") initramfs. It contains:
#   /bin/busybox + applets
#   /lib/modules/kvm/*.ko + load-order   kvm-amd and its deps, decompressed
#   /l2/vmlinuz, /l2/initrd.img          the L2 guest kernel and initramfs
#   /forkvm                              a static forkvm (or placeholder) binary
#   /kvm-probe                           the kvm-probe preflight tool, if built
#   /e2e.sh                              the test script to run
#   /init                                loads kvm, checks /dev/kvm, runs
#                                        /e2e.sh, prints "E2E-EXIT <code>",
#                                        powers off
#
# Usage:
#   mk-l1-initramfs.sh --forkvm BIN --script E2E.sh [--out FILE]
#                      [--l2-kernel FILE] [--l2-initrd FILE] [--probe BIN]
#                      [--extra DIR]   (copied over the root, e.g. extra tools)
# Env equivalents: FORKVM_BIN, E2E_SCRIPT, L1_INITRD, L2_KERNEL, L2_INITRD,
# KVM_PROBE_BIN. Defaults come from $FORKVM_CACHE (see fetch-guest.sh).
set -euo pipefail
export E2E_TAG=mk-l1-initramfs
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

forkvm="${FORKVM_BIN:-}"
script="${E2E_SCRIPT:-}"
out="${L1_INITRD:-$CACHE/l1-initrd.img}"
l2k="${L2_KERNEL:-$CACHE/vmlinuz}"
l2i="${L2_INITRD:-$CACHE/l2-initrd.img}"
probe="${KVM_PROBE_BIN:-$CACHE/build/kvm-probe}"
extra="${L1_EXTRA_DIR:-}"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
    case "$1" in
        --forkvm) forkvm="$2"; shift 2 ;;
        --script) script="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --l2-kernel) l2k="$2"; shift 2 ;;
        --l2-initrd) l2i="$2"; shift 2 ;;
        --probe) probe="$2"; shift 2 ;;
        --extra) extra="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) e2e_log "unknown argument: $1"; usage 2 ;;
    esac
done

[[ -n "$forkvm" ]] || e2e_die "no forkvm binary given (--forkvm BIN or FORKVM_BIN)"
[[ -n "$script" ]] || e2e_die "no test script given (--script FILE or E2E_SCRIPT)"
[[ -f "$forkvm" ]] || e2e_die "forkvm binary $forkvm does not exist"
[[ -f "$script" ]] || e2e_die "test script $script does not exist"
[[ -f "$l2k" ]] || e2e_die "L2 kernel $l2k missing; run tools/e2e/fetch-guest.sh"
[[ -f "$l2i" ]] || e2e_die "L2 initrd $l2i missing; run tools/e2e/mk-l2-initramfs.sh"
e2e_require_cache modules/load-order

# The binary must run in an initramfs without a libc: insist on static
# (a #! script, like mock-forkvm.sh, is fine too).
if [[ "$(head -c2 "$forkvm")" != '#!' ]] && command -v file >/dev/null 2>&1; then
    desc="$(file -L "$forkvm")"
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) e2e_die "$forkvm is not statically linked ($desc). Build with RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu" ;;
    esac
fi

root="$(mktemp -d "${TMPDIR:-/tmp}/forkvm-l1root.XXXXXX")"
trap 'rm -rf "$root"' EXIT

e2e_install_busybox "$root"

mkdir -p "$root/lib/modules/kvm" "$root/l2"
cp "$CACHE"/modules/*.ko "$CACHE/modules/load-order" "$root/lib/modules/kvm/"
if [[ -d "$CACHE/modules/extra" ]]; then
    mkdir -p "$root/lib/modules/extra"
    cp "$CACHE"/modules/extra/*.ko "$root/lib/modules/extra/" 2>/dev/null || true
fi
cp "$l2k" "$root/l2/vmlinuz"
cp "$l2i" "$root/l2/initrd.img"

# Strip debug info (release profile has debug=1) to keep the cpio small.
install -m 0755 "$forkvm" "$root/forkvm"
if [[ "$(head -c4 "$forkvm")" == $'\x7fELF' ]] && command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$root/forkvm" || true
fi
if [[ -f "$probe" ]]; then
    install -m 0755 "$probe" "$root/kvm-probe"
    if command -v strip >/dev/null 2>&1; then strip --strip-debug "$root/kvm-probe" || true; fi
fi
install -m 0755 "$script" "$root/e2e.sh"
if [[ -n "$extra" ]]; then
    [[ -d "$extra" ]] || e2e_die "--extra $extra is not a directory"
    cp -a "$extra/." "$root/"
fi

cat >"$root/init" <<'INIT'
#!/bin/sh
# forkvm e2e L1 init: load KVM (nested), run /e2e.sh, report, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

up() { read -r u _ </proc/uptime; echo "$u"; }
finish() {
    echo "E2E-EXIT $1"
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger 2>/dev/null
}

echo "L1-INIT uptime=$(up) kernel=$(uname -r)"
grep -qw svm /proc/cpuinfo || echo "L1: warning: no 'svm' flag in /proc/cpuinfo"
grep -qw npt /proc/cpuinfo || echo "L1: warning: no 'npt' flag in /proc/cpuinfo"

while read -r ko args; do
    [ -n "$ko" ] || continue
    # shellcheck disable=SC2086
    if ! insmod "/lib/modules/kvm/$ko" $args; then
        echo "L1: insmod $ko $args failed"
        dmesg | tail -n 20
        finish 97
    fi
done </lib/modules/kvm/load-order

i=0
while [ ! -c /dev/kvm ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -c /dev/kvm ]; then
    echo "L1: /dev/kvm did not appear"
    dmesg | grep -i -E 'kvm|svm' | tail -n 20
    finish 98
fi
echo "L1-KVM-READY uptime=$(up) nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null) npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"

# Optional preflight: prove KVM_RUN works inside L1.
if [ -x /kvm-probe ] && [ "${E2E_NO_PROBE:-0}" != 1 ]; then
    if /kvm-probe; then echo "L1-KVM-PROBE ok uptime=$(up)"; else echo "L1-KVM-PROBE failed"; fi
fi

# Heartbeat: the host (run-l1.sh) stops QEMU when these lines stop, i.e. when L1's kernel hangs
# without a word (seen under QEMU TCG nested SVM: no lockup report, both L1 CPUs busy in QEMU).
( while :; do sleep "${E2E_HEARTBEAT:-10}"; echo "L1-HEARTBEAT uptime=$(up)"; done ) &
hb=$!
echo "L1-E2E-START uptime=$(up)"
cd /
sh /e2e.sh
rc=$?
kill "$hb" 2>/dev/null
echo "L1-E2E-END uptime=$(up)"
finish "$rc"
INIT
chmod 0755 "$root/init"

mkdir -p "$(dirname "$out")"
e2e_pack_cpio "$root" "$out"
e2e_log "wrote $out ($(du -h "$out" | cut -f1)) forkvm=$forkvm script=$script"
printf '%s\n' "$out"
