#!/usr/bin/env bash
# Boot the L1 "host" (Debian cloud kernel) in QEMU TCG with emulated AMD SVM
# + NPT, using an initramfs from mk-l1-initramfs.sh, and exit with the code
# its /e2e.sh reported ("E2E-EXIT <code>" on the serial console).
#
# Usage: run-l1.sh [--initrd FILE] [--kernel FILE] [--timeout SECS] [--log FILE]
# Env: L1_INITRD, L1_KERNEL, E2E_TIMEOUT (default 900), E2E_LOG,
#      L1_MEM (default 4G), L1_SMP (default 2), L1_CPU, L1_APPEND (extra
#      kernel args, e.g. "loglevel=7" or "E2E_NO_PROBE=1"), E2E_VERBOSE=1
#      (show kernel messages; default boots L1 with "quiet"),
#      E2E_LOCKUP_KILL (default 60): stop QEMU once L1's kernel reports a CPU
#      stuck for this many seconds (a QEMU TCG nested-SVM hang never recovers),
#      E2E_HANG_KILL (default 90): stop QEMU once L1 has printed nothing (not
#      even its L1-HEARTBEAT line, every 10 s) for this many seconds: L1's
#      kernel hung silently. Before stopping it, QEMU's view of every L1 CPU
#      (`info registers -a`, twice, through the HMP monitor socket; needs
#      python3) goes to the log.
#
# Exit status: the E2E-EXIT code; 124 on timeout; 125 if QEMU ended without
# an E2E-EXIT line; 126 if L1 hung (lockup report or silence); 2 for usage errors.
# Also prints host-side timings: L1 init reached, /dev/kvm ready, e2e done.
set -euo pipefail
export E2E_TAG=run-l1
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

initrd="${L1_INITRD:-$CACHE/l1-initrd.img}"
kernel="${L1_KERNEL:-$CACHE/vmlinuz}"
timeout_s="${E2E_TIMEOUT:-900}"
log="${E2E_LOG:-$CACHE/l1-console.log}"
mem="${L1_MEM:-4G}"
smp="${L1_SMP:-2}"
# EPYC + SVM + NPT. The minus-features are ones TCG cannot emulate; listing
# them silences QEMU's per-feature warnings and changes nothing else.
cpu="${L1_CPU:-EPYC,+svm,+npt,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec}"

while (($#)); do
    case "$1" in
        --initrd) initrd="$2"; shift 2 ;;
        --kernel) kernel="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --log) log="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) e2e_log "unknown argument: $1"; exit 2 ;;
    esac
done

# E2E_QEMU: the QEMU command (words: binary and extra arguments such as -L DIR); default
# qemu-system-x86_64 from PATH.
read -r -a qemu_cmd <<<"${E2E_QEMU:-qemu-system-x86_64}"
if [[ -z "${E2E_QEMU:-}" ]]; then e2e_require qemu-system-x86_64 qemu-system-x86; fi
e2e_require timeout coreutils
[[ -f "$kernel" ]] || e2e_die "L1 kernel $kernel missing; run tools/e2e/fetch-guest.sh"
[[ -f "$initrd" ]] || e2e_die "L1 initrd $initrd missing; run tools/e2e/mk-l1-initramfs.sh"

append="console=ttyS0 panic=-1 reboot=k"
if [[ "${E2E_VERBOSE:-0}" != 1 ]]; then append+=" quiet"; fi
append+="${L1_APPEND:+ $L1_APPEND}"

# Only one QEMU at a time on this machine (every worktree's cache included): serialize via a
# machine-wide lock.
lock="${E2E_QEMU_LOCK:-/tmp/forkvm-e2e-qemu.lock}"
mkdir -p "$(dirname "$log")"
exec 9>"$lock"
if ! flock -n 9; then
    e2e_log "another run-l1.sh holds $lock; waiting for it"
    flock 9
fi

qemu=("${qemu_cmd[@]}"
    -machine q35 -accel tcg -cpu "$cpu"
    -m "$mem" -smp "$smp"
    -no-reboot -nodefaults -display none -monitor "unix:$CACHE/.qemu-monitor.sock,server=on,wait=off"
    -serial stdio
    -kernel "$kernel" -initrd "$initrd"
    -pidfile "$CACHE/.qemu.pid"
    -append "$append")

e2e_log "kernel=$kernel initrd=$initrd ($(du -h "$initrd" | cut -f1)) timeout=${timeout_s}s log=$log"
e2e_log "${qemu[*]}"

start_ns=$(date +%s%N)
ms_since_start() { echo $((($(date +%s%N) - start_ns) / 1000000)); }
# Our QEMU only: the pidfile is fresh (removed before start) and names a qemu.
stop_qemu() {
    local qpid
    qpid="$(cat "$CACHE/.qemu.pid" 2>/dev/null || true)"
    if [[ "$qpid" =~ ^[0-9]+$ && "$(cat "/proc/$qpid/comm" 2>/dev/null)" == qemu* ]]; then
        kill "$qpid" 2>/dev/null || true
    fi
}
# QEMU's view of the L1 CPUs (HMP `info registers -a`), for a hang report.
qemu_registers() {
    command -v python3 >/dev/null 2>&1 || { echo "(python3 not installed: no register dump; apt-get install -y python3)"; return; }
    python3 - "$CACHE/.qemu-monitor.sock" <<'PY' 2>&1
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
def drain():
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
            if out.endswith(b"(qemu) "):
                break
    except socket.timeout:
        pass
    return out.decode(errors="replace")
drain()
for i in range(2):
    s.sendall(b"info registers -a\n")
    print(f"---- info registers -a (#{i + 1}) ----")
    print(drain().replace("(qemu) ", ""))
    time.sleep(1)
PY
}
code=""
: >"$log"
rm -f "$CACHE/.qemu.pid"

set +e
# stdin from /dev/null: never let QEMU put a terminal into raw mode.
hang_kill="${E2E_HANG_KILL:-90}"
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 \
| { last_out=$SECONDS; partial=""; while :; do
    # A 5 s read timeout lets a silent (hung) L1 be noticed; a partial line is kept.
    if IFS= read -r -t 5 line; then
        line="$partial$line"; partial=""
    else
        st=$?
        if ((st > 128)); then
            partial+="$line"
            if ((SECONDS - last_out >= hang_kill)) && [[ -z "${hung:-}" ]]; then
                hung=1
                printf '[run-l1] host: L1 printed nothing for %s s (no L1-HEARTBEAT): its kernel hung silently (QEMU TCG nested SVM); QEMU registers, then stopping QEMU\n' "$((SECONDS - last_out))" | tee -a "$log"
                qemu_registers | sed 's/^/[run-l1] qemu| /' | tee -a "$log"
                printf '%s\n' "L1-HANG no output for $((SECONDS - last_out)) s" >>"$log"
                stop_qemu
            fi
            continue
        fi
        [[ -n "$partial$line" ]] || break
        line="$partial$line"; partial=""
    fi
    last_out=$SECONDS
    line="${line%$'\r'}"
    printf '%s\n' "$line" >>"$log"
    printf '%s\n' "$line"
    case "$line" in
        *L1-INIT\ uptime=*) printf '[run-l1] host: L1 /init reached after %s ms\n' "$(ms_since_start)" ;;
        *L1-KVM-READY*)     printf '[run-l1] host: L1 /dev/kvm ready after %s ms\n' "$(ms_since_start)" ;;
        *E2E-EXIT\ *)       printf '[run-l1] host: E2E-EXIT seen after %s ms\n' "$(ms_since_start)" ;;
        *"soft lockup - CPU#"*" stuck for "*)
            stuck="${line##* stuck for }"; stuck="${stuck%%s!*}"
            if [[ "$stuck" =~ ^[0-9]+$ ]] && ((stuck >= ${E2E_LOCKUP_KILL:-60})); then
                printf '[run-l1] host: L1 CPU stuck for %s s (soft lockup); stopping QEMU\n' "$stuck"
                stop_qemu
            fi ;;
    esac
done; }
statuses=("${PIPESTATUS[@]}")
set -e
qemu_rc="${statuses[0]}"
elapsed=$(ms_since_start)

code="$(sed -n 's/^.*E2E-EXIT \([0-9][0-9]*\).*$/\1/p' "$log" | tail -n1)"
if [[ "$qemu_rc" == 124 || "$qemu_rc" == 137 ]]; then
    e2e_log "TIMEOUT: QEMU killed after ${timeout_s}s (elapsed ${elapsed} ms); console log: $log"
    exit 124
fi
if [[ -z "$code" ]] && grep -qE '^L1-HANG |soft lockup - CPU#' "$log"; then
    e2e_log "FAIL: L1's kernel hung ($(grep -m1 -oE '^L1-HANG .*|soft lockup - CPU#.*' "$log")) after ${elapsed} ms, no E2E-EXIT: a QEMU TCG nested-SVM fault in L1, not a test result; console log: $log"
    exit 126
fi
if [[ -z "$code" ]]; then
    e2e_log "FAIL: QEMU exited ($qemu_rc) without an 'E2E-EXIT <code>' line after ${elapsed} ms; console log: $log"
    exit 125
fi
e2e_log "E2E-EXIT $code (QEMU rc $qemu_rc, total ${elapsed} ms)"
exit "$code"
