#!/bin/sh
# Diagnostic /e2e.sh (inside L1, busybox sh), not part of the suite: the parent-after-fork stall
# (issue 10). Boots one L2 Linux guest with the agent (`forkvm run --name lp --detach`), starts a
# process-creation storm in it (LOOP_STORM shell loops of `/bin/true`, default 2: one per vCPU),
# then repeats LOOP_OP and checks the PARENT with a bounded agent exec (`forkvm exec lp -- true`):
#   fork      `forkvm fork lp`, check the parent while the child runs, stop the child (default)
#   forkexit  `forkvm fork lp`, stop the child, then check the parent
#   pause     `forkvm pause lp` + `forkvm resume lp` (no fork at all)
#   none      nothing: the control (the storm and the checks alone)
# A parent that does not answer is a STALL: its console tail, per-CPU interrupt counts and a
# sysrq backtrace of every CPU (typed into its serial shell with builtins only) are printed, the VM
# is stopped and a fresh one booted. Prints "FORKLOOP <i> ok|STALL" and a count line
# "FORKLOOP done: op=... stalls=S of N".
# From the host:
#   E2E_SCRIPT=tools/e2e/l2-forkloop.sh L1_APPEND="LOOP_N=40 LOOP_OP=fork" tools/e2e/run.sh --timeout 900
# Knobs: LOOP_RUN_EXTRA (more `forkvm run` flags, e.g. --no-dirty-log), LOOP_CHECK (agent|serial: the per-check processes started through the agent over vsock, or typed
# into the serial shell), LOOP_THP (on|off), LOOP_DIAG (full|short: at a stall only one state dump and the console tail), LOOP_N (30), LOOP_SECS (600: stop starting new rounds after this many seconds),
# LOOP_OP, LOOP_BURST (1: pause+resume pairs per check), LOOP_VCPUS (2), LOOP_BACKING (anon|shared), LOOP_STORM (2), LOOP_CMDLINE_EXTRA
# (appended to the guest command line, e.g. "nopv" or "no-kvmapf nopvspin"), LOOP_ENV (NAME=VALUE
# words exported to forkvm, e.g. RUST_LOG=debug).
set -u
forkvm="${FORKVM:-/forkvm}"
export FORKVM_RUN_DIR="${FORKVM_RUN_DIR:-/tmp/forkvm-loop-run}"
export FORKVM_STORE="${FORKVM_STORE:-/tmp/forkvm-loop-store}"
n="${LOOP_N:-30}"
secs="${LOOP_SECS:-600}"
op="${LOOP_OP:-fork}"
vcpus="${LOOP_VCPUS:-2}"
backing="${LOOP_BACKING:-anon}"
storm="${LOOP_STORM:-2}"
burst="${LOOP_BURST:-1}"
cmdline="console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1 ${LOOP_CMDLINE_EXTRA:-}"
for kv in ${LOOP_ENV:-}; do export "${kv?}"; done
# LOOP_THP=off: no transparent huge pages in L1 at all (no khugepaged collapses, no THP faults)
# and `forkvm run --no-thp`, for an A/B of L1 page migrations under the running L2.
thp_flag=
if [ "${LOOP_THP:-on}" = off ]; then
    thp_flag=--no-thp
    echo never >/sys/kernel/mm/transparent_hugepage/enabled
    echo never >/sys/kernel/mm/transparent_hugepage/defrag
fi
echo "FORKLOOP: L1 THP $(cat /sys/kernel/mm/transparent_hugepage/enabled), defrag $(cat /sys/kernel/mm/transparent_hugepage/defrag)"
vm=lp
log="$FORKVM_RUN_DIR/$vm/console.log"
t_start=$(cut -d. -f1 /proc/uptime)
elapsed() { echo $(($(cut -d. -f1 /proc/uptime) - t_start)); }

boot() {
    "$forkvm" stop "$vm" >/dev/null 2>&1
    rm -rf "$FORKVM_RUN_DIR"
    timeout 120 "$forkvm" run --kernel /l2/vmlinuz --initrd /l2/initrd.img --mem 256M --vcpus "$vcpus" \
        --backing "$backing" $thp_flag ${LOOP_RUN_EXTRA:-} --cmdline "$cmdline" --name "$vm" --detach || { echo "FORKLOOP: forkvm run failed"; return 1; }
    w=0
    until grep -q "forkvm-agent: serving" "$log" 2>/dev/null; do
        w=$((w + 1))
        [ "$w" -le 3000 ] || { echo "FORKLOOP: no agent after 300 s"; tail -n 20 "$log"; return 1; }
        [ -d "$FORKVM_RUN_DIR/$vm" ] || { echo "FORKLOOP: the VM exited while booting"; return 1; }
        sleep 0.1
    done
    # Full kernel messages from now on (the boot stays quiet): an RCU stall report then carries
    # the stalled CPU's backtrace.
    timeout 60 "$forkvm" exec "$vm" -- sh -c 'echo 7 >/proc/sys/kernel/printk' || { echo "FORKLOOP: first exec failed"; return 1; }
    if [ "$storm" -gt 0 ]; then
        # shellcheck disable=SC2016  # expanded by the guest's shell
        timeout 60 "$forkvm" exec "$vm" -- sh -c 'i=0; while [ $i -lt '"$storm"' ]; do setsid sh -c "while :; do /bin/true; done" </dev/null >/dev/null 2>&1 & i=$((i+1)); done' \
            || { echo "FORKLOOP: starting the storm failed"; return 1; }
    fi
    echo "FORKLOOP: booted $vm (vcpus $vcpus, backing $backing, run extra '${LOOP_RUN_EXTRA:-}', storm $storm, cmdline extra '${LOOP_CMDLINE_EXTRA:-}', env '${LOOP_ENV:-}') at $(elapsed) s"
}

# The vCPUs of a snapshot's state (JSON after the 56-byte envelope header; kvm structs as byte
# arrays): mp_state, rip, rflags and the LAPIC's TPR, PPR, ISR and IRR (vectors set).
state_dump() { # dir
    dd if="$1/state" bs=56 skip=1 2>/dev/null | tr -d '\n' | sed 's/"id":/\n"id":/g' | grep '"mp_state":\[' | awk '
        BEGIN { pw[0] = 1; for (i = 1; i < 8; i++) pw[i] = pw[i - 1] * 2 }
        function arr(l, k, a,   i, r) { i = index(l, "\"" k "\":["); if (!i) return 0; r = substr(l, i + length(k) + 4)
            return split(substr(r, 1, index(r, "]") - 1), a, ",") }
        function le(a, off, n,   s, j) { s = ""; for (j = off + n - 1; j >= off; j--) s = s sprintf("%02x", a[j + 1]); return s }
        function vecs(a, off,   s, r, b, v) { s = ""; for (r = 0; r < 8; r++) for (b = 0; b < 32; b++) {
            v = r * 32 + b; if (int(a[off + r * 16 + int(b / 8) + 1] / pw[b % 8]) % 2) s = s sprintf(" %x", v) } return s }
        {
            id = substr($0, 6); id = substr(id, 1, index(id, ",") - 1)
            arr($0, "mp_state", m); arr($0, "regs", r); arr($0, "lapic", p); n = arr($0, "events", e); arr($0, "sregs", sr)
            printf "  vcpu %s: mp_state %d rip %s rflags %s rsp %s rax %s rdi %s\n", id, m[1], le(r, 128, 8), le(r, 136, 8), le(r, 48, 8), le(r, 0, 8), le(r, 40, 8)
            printf "  vcpu %s: cr0 %s cr2 %s cr3 %s cr4 %s efer %s\n", id, le(sr, 224, 8), le(sr, 232, 8), le(sr, 240, 8), le(sr, 248, 8), le(sr, 264, 8)
            printf "  vcpu %s: lapic id %s tpr %s ppr %s isr(hex):%s irr(hex):%s\n", id, le(p, 32, 4), le(p, 128, 4), le(p, 160, 4), vecs(p, 256), vecs(p, 512)
            s = ""; for (i = 1; i <= n; i++) s = s " " e[i]; printf "  vcpu %s: events bytes%s\n", id, s
        }'
}

diag() {
    if [ "${LOOP_DIAG:-full}" = short ]; then
        rm -rf /tmp/stallsnap
        if timeout 60 "$forkvm" snapshot "$vm" /tmp/stallsnap >/tmp/stallsnap.out 2>&1; then
            echo "  ---- vCPU state of the stalled parent ----"
            state_dump /tmp/stallsnap
        else
            echo "  (snapshot of the stalled parent failed: $(cat /tmp/stallsnap.out))"
        fi
        rm -rf /tmp/stallsnap
        timeout 60 "$forkvm" exec "$vm" --timeout 45 -- true >/dev/null 2>&1 && a=answers || a="does not answer"
        echo "  a second agent exec: the agent $a"
        echo "  ---- parent console (last 30 lines) ----"
        tail -n 30 "$log" | sed 's/^/  L2| /'
        echo "  ---- vmm.log (last 30 lines) ----"
        tail -n 30 "$FORKVM_RUN_DIR/$vm/vmm.log" 2>/dev/null | sed 's/^/  vmm| /'
        echo "  ---- run dir, forkvm processes, their threads (state, wchan), L1 dmesg ----"
        ls -la "$FORKVM_RUN_DIR/$vm" 2>&1 | sed 's/^/  dir| /'
        ps -o pid,stat,args 2>/dev/null | grep '[f]orkvm' | sed 's/^/  ps| /'
        for p in $(ps -o pid,args 2>/dev/null | awk '/[f]orkvm .*run/ {print $1}'); do
            for t in /proc/"$p"/task/*; do
                echo "  task| $p $(cat "$t/comm" 2>/dev/null) state=$(cut -d' ' -f3 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null)"
            done
        done
        dmesg 2>/dev/null | tail -n 30 | sed 's/^/  dmesg| /'
        for f in "$FORKVM_RUN_DIR"/.exited/*/vmm.log "$FORKVM_RUN_DIR"/.exited/*/console.log; do
            [ -f "$f" ] || continue
            echo "  ---- $f (last 60 lines) ----"
            tail -n 60 "$f" | sed 's/^/  exited| /'
        done
        return
    fi
    for sn in 1 2; do
        rm -rf /tmp/stallsnap
        if timeout 60 "$forkvm" snapshot "$vm" /tmp/stallsnap >/dev/null 2>&1; then
            echo "  ---- vCPU state of the stalled parent (snapshot $sn) ----"
            state_dump /tmp/stallsnap
            rm -rf /tmp/stallsnap
        else
            echo "  (snapshot $sn of the stalled parent failed)"
        fi
    done
    # What L1's KVM does for the stalled VM: 2 s of its trace events.
    T=/sys/kernel/tracing
    mount -t tracefs tracefs "$T" 2>/dev/null
    if [ -d "$T/events/kvm" ]; then
        echo 8192 >"$T/buffer_size_kb"; : >"$T/trace"
        for e in kvm_exit kvm_entry kvm_inj_exception kvm_page_fault kvm_emulate_insn kvm_mmio kvm_pio kvm_inj_virq kvm_apic_accept_irq kvm_fpu kvm_userspace_exit; do
            echo 1 >"$T/events/kvm/$e/enable" 2>/dev/null
        done
        echo 1 >"$T/tracing_on"; sleep 2; echo 0 >"$T/tracing_on"
        echo "  ---- L1 kvm trace, 2 s: event counts, then the last 80 lines ----"
        { grep -o ' kvm_[a-z_]*:' "$T/trace"; grep -o 'kvm_exit: vcpu [0-9]* reason [A-Za-z_0-9]*' "$T/trace"; } \
            | sort | uniq -c | sort -rn | head -n 25 | sed 's/^/  tr| /'
        tail -n 80 "$T/trace" | sed 's/^/  tr| /'
        echo 0 >"$T/events/kvm/enable"
    fi
    echo "  ---- guest modules (serial, builtins only) ----"
    timeout 20 "$forkvm" exec "$vm" --timeout 15 --wait-for MOD-42-END \
        'while read -r l; do echo "MOD $l"; done </proc/modules; echo MOD-$((40+2))-END' 2>&1 | grep '^MOD ' | sed 's/^/  /'
    echo "  ---- parent console (last 80 lines) ----"
    tail -n 80 "$log" | sed 's/^/  L2| /'
    # Builtins only: a guest whose process creation hangs still runs its shell's builtins.
    timeout 20 "$forkvm" exec "$vm" --timeout 15 --wait-for IRQ-42-END \
        'echo 7 >/proc/sys/kernel/printk; while read -r l; do echo "IRQ $l"; done </proc/interrupts; echo l >/proc/sysrq-trigger; echo IRQ-$((40+2))-END' 2>&1 \
        | grep -E '^IRQ |CPU|CAL|TLB|RES|LOC|error' | sed 's/^/  serial| /'
    timeout 20 "$forkvm" exec "$vm" --timeout 15 --wait-for W-42-END 'echo w >/proc/sysrq-trigger; echo W-$((40+2))-END' >/dev/null 2>&1
    echo "  ---- parent console after sysrq l, w (last 150 lines) ----"
    tail -n 150 "$log" | sed 's/^/  L2| /'
    echo "  ---- vmm.log (last 20 lines) ----"
    tail -n 20 "$FORKVM_RUN_DIR/$vm/vmm.log" 2>/dev/null | sed 's/^/  vmm| /'
    # A VMM that ended unasked keeps its logs under .exited/.
    for f in "$FORKVM_RUN_DIR"/.exited/*/*; do
        [ -f "$f" ] || continue
        echo "  ---- $f (last 60 lines) ----"
        tail -n 60 "$f" | sed 's/^/  exited| /'
    done
}

# shellcheck disable=SC2016  # expanded by the guest's shell
pinned='c=0; while [ $c -lt '"$vcpus"' ]; do taskset -c $c true || exit 1; c=$((c+1)); done'
boot || exit 1
ok=0
stalls=0
errors=0
pauses=0
i=1
while [ "$i" -le "$n" ] && [ "$(elapsed)" -lt "$secs" ]; do
    case "$op" in
        fork | forkexit)
            if ! timeout 120 "$forkvm" fork "$vm" --count 1 >/tmp/loop.fork 2>&1; then
                echo "FORKLOOP $i ERROR: fork failed: $(cat /tmp/loop.fork)"
                errors=$((errors + 1)); i=$((i + 1)); boot || exit 1; continue
            fi
            [ "$op" = forkexit ] && "$forkvm" stop "$vm-c1" >/dev/null 2>&1
            ;;
        pause)
            b=0
            while [ "$b" -lt "$burst" ]; do
                timeout 60 "$forkvm" pause "$vm" >/dev/null && timeout 60 "$forkvm" resume "$vm" >/dev/null \
                    || { echo "FORKLOOP $i ERROR: pause/resume failed"; errors=$((errors + 1)); break; }
                b=$((b + 1))
                pauses=$((pauses + 1))
            done
            ;;
        none) ;;
        *) echo "FORKLOOP: unknown LOOP_OP $op"; exit 2 ;;
    esac
    # A new process on every guest CPU (a CPU that stopped would otherwise go unnoticed while the
    # scheduler places new tasks on the other one), and no RCU stall report on the console.
    if [ "${LOOP_CHECK:-agent}" = serial ]; then
        # The same check typed into the serial shell: no vsock traffic at all during the loop.
        c=0 line=
        while [ "$c" -lt "$vcpus" ]; do line="${line}taskset -c $c echo CHK-$i-\$((40+$c)); "; c=$((c + 1)); done
        check() { timeout 60 "$forkvm" exec "$vm" --timeout 45 --wait-for "CHK-$i-$((40 + vcpus - 1))" "$line"; }
    else
        check() { timeout 60 "$forkvm" exec "$vm" --timeout 45 -- sh -c "$pinned"; }
    fi
    if check >/tmp/loop.exec 2>&1 \
        && ! grep -q "detected stalls" "$log"; then
        ok=$((ok + 1))
        echo "FORKLOOP $i ok ($(elapsed) s)"
        [ "$op" = fork ] && "$forkvm" stop "$vm-c1" >/dev/null 2>&1
    else
        stalls=$((stalls + 1))
        echo "FORKLOOP $i STALL ($(elapsed) s): the parent's pinned agent exec failed or its console reports an RCU stall: $(cat /tmp/loop.exec)"
        if [ "$op" = fork ]; then
            timeout 60 "$forkvm" exec "$vm-c1" --timeout 45 -- true >/dev/null 2>&1 && c=answers || c="does not answer"
            echo "  the child $c"
            "$forkvm" stop "$vm-c1" >/dev/null 2>&1
        fi
        diag
        boot || exit 1
    fi
    i=$((i + 1))
done
"$forkvm" stop "$vm" >/dev/null 2>&1
echo "FORKLOOP done: op=$op burst=$burst vcpus=$vcpus backing=$backing storm=$storm extra='${LOOP_CMDLINE_EXTRA:-}' env='${LOOP_ENV:-}': stalls=$stalls ok=$ok errors=$errors of $((i - 1)) checks, $pauses pauses, in $(elapsed) s"
[ "$stalls" -eq 0 ] && [ "$errors" -eq 0 ]
