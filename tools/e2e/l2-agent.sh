#!/bin/sh
# /e2e/l2-agent.sh, runs inside L1 (busybox sh): the guest agent through the ordinary CLI, nothing
# typed into a shell. Boots L2 as a named VM (`forkvm run --name --detach`, 2 vCPUs, ACPI, vsock),
# waits for the agent, then:
#   1. `forkvm exec l2a -- sh -c 'echo out; echo err >&2; exit 3'`: streams apart, exit code 3
#   2. `forkvm fork l2a --count 3`: every child says reseeded: true; parent + 3 children print four
#      different /proc/sys/kernel/random/uuid and four different urandom (getrandom CRNG) bytes
#   3. hibernate, move L1's clock on by an hour (`date -s`), wake: the guest's clock agrees with
#      L1's within L2_CLOCK_TOL (0.5 s)
#   4. `forkvm bench agent --vm l2a` (L2 numbers: vsock round trip, throughput, exec vs serial, fork)
#   5. move L1's clock on by L2_CLOCK_JUMP (600) s, then restore (`forkvm restore --cow --name l2s`)
#      a snapshot taken right after boot: the clone hook stepped the guest's clock by about the
#      snapshot's age (elapsed time + the jump; no waiting), and it agrees with L1's within
#      L2_CLOCK_TOL.
# Clocks are compared by bracketing: L1's clock before and after `forkvm exec` reads the guest's;
# the guest's reading must lie inside [before - tol, after + tol] (its error is printed).
# Tunables: L2_MEM (256M), L2_VCPUS (2), L2_CMDLINE, L2_BOOT_TIMEOUT (300), FORKVM, L2_DIR.
set -u
forkvm="${FORKVM:-/forkvm}"
l2dir="${L2_DIR:-/l2}"
export FORKVM_RUN_DIR="${FORKVM_RUN_DIR:-/tmp/forkvm-agent-run}"
export FORKVM_STORE="${FORKVM_STORE:-/tmp/forkvm-agent-store}"
cmdline="${L2_CMDLINE:-console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1}"
vm=l2a
log="$FORKVM_RUN_DIR/$vm/console.log"

keep=/tmp/l2-agent-logs
# A VMM removes its directory when it is stopped: hard links keep a VM's logs for the failure
# report (a VM that ends unasked moves them to $FORKVM_RUN_DIR/.exited/<name>.<pid>/ itself).
keep_logs() { for v in "$@"; do for f in vmm.log console.log; do
    [ -f "$FORKVM_RUN_DIR/$v/$f" ] && ln -f "$FORKVM_RUN_DIR/$v/$f" "$keep/$v.$f" 2>/dev/null; done; done; }
fail() {
    echo "l2-agent: FAIL: $*"
    if [ -f "$log" ]; then echo "l2-agent: last L2 console lines:"; tail -n 30 "$log" | sed 's/^/  L2| /'; fi
    for f in "$keep"/* "$FORKVM_RUN_DIR"/.exited/*/*; do
        [ -f "$f" ] || continue
        echo "l2-agent: kept log $(basename "$f") (last 40 lines):"; tail -n 40 "$f" | sed 's/^/  | /'
    done
    "$forkvm" stop "$vm" >/dev/null 2>&1
    exit 1
}
now_ms() { read -r u _ </proc/uptime; echo "${u%.*}${u#*.}0" | sed 's/^0*//'; }

rm -rf "$FORKVM_RUN_DIR" "$FORKVM_STORE" "$keep"
mkdir -p "$keep"
t0=$(now_ms)
"$forkvm" run --kernel "$l2dir/vmlinuz" --initrd "$l2dir/initrd.img" --mem "${L2_MEM:-256M}" \
    --vcpus "${L2_VCPUS:-2}" --cmdline "$cmdline" --name "$vm" --detach || fail "forkvm run --detach"
# The agent says it listens on the console (the one thing this script reads from it).
i=0
until grep -q "forkvm-agent: serving" "$log" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -le "$((${L2_BOOT_TIMEOUT:-300} * 10))" ] || fail "no 'forkvm-agent: serving' line"
    grep -q "forkvm-agent: error" "$log" 2>/dev/null && fail "the agent did not start"
    [ -d "$FORKVM_RUN_DIR/$vm" ] || fail "the VM exited before its agent listened"
    if [ $((i % 300)) -eq 0 ]; then echo "l2-agent: waiting for the agent ($((i / 10)) s); L2 console:"; tail -n 3 "$log" | sed 's/^/  L2| /'; fi
    sleep 0.1
done
echo "l2-agent: agent up $(( $(now_ms) - t0 )) ms after forkvm run"

# 1. exec through the agent.
out=$("$forkvm" exec "$vm" -- sh -c 'echo out; echo err >&2; exit 3' 2>/tmp/l2-agent.err); rc=$?
err=$(cat /tmp/l2-agent.err)
[ "$out" = out ] && [ "$err" = err ] && [ "$rc" -eq 3 ] || fail "exec: stdout '$out' stderr '$err' status $rc (want out/err/3)"
echo "l2-agent: exec ok: stdout '$out', stderr '$err', exit $rc"
np=$("$forkvm" exec "$vm" -- nproc) || fail "exec nproc"
echo "l2-agent: guest nproc $np"
# Informational: the guest kernel's view of XSAVE (its boot warns when CPUID leaf 0xd disagrees
# with itself); L1's own lines for comparison.
"$forkvm" exec "$vm" -- sh -c 'dmesg | grep -i -A16 -e "x86/fpu" -e "xsave" | head -n 60' | sed 's/^/l2-agent: L2 dmesg: /'
dmesg | grep -i -e "x86/fpu" -e "xsave" | head -n 20 | sed 's/^/l2-agent: L1 dmesg: /'
# An early snapshot, restored at the end (5.): a clone whose clock is far behind.
snap=/tmp/l2-agent-snap
"$forkvm" snapshot "$vm" "$snap" >/dev/null || fail "snapshot $vm"
read -r snap_up _ </proc/uptime

# busybox date has no %N: a new file's mtime (ns) is the clock, read the same way on both sides.
# shellcheck disable=SC2016  # expanded by the shells that run it
clock='touch /tmp/.clock; s=$(stat -c %y /tmp/.clock); f=${s#*.}; echo "$(date -d "${s%.*}" +%s).${f%% *}"'
tol="${L2_CLOCK_TOL:-0.5}"
# clock_check VM WHAT: the guest's clock read between two readings of L1's; sets clock_err (s
# outside the bracket, 0 inside) and fails beyond the tolerance.
clock_check() {
    # A first exec waits for the clone hook and the lazily served memory; only the second is timed.
    "$forkvm" exec "$1" -- true || fail "exec true in $1 ($2)"
    h0=$(sh -c "$clock")
    g=$("$forkvm" exec "$1" -- sh -c "$clock") || fail "exec date in $1 ($2)"
    h1=$(sh -c "$clock")
    clock_err=$(awk -v g="$g" -v a="$h0" -v b="$h1" 'BEGIN { e = 0; if (g < a) e = a - g; if (g > b) e = g - b; printf "%.3f", e }')
    echo "l2-agent: $2: L1 $h0 .. $h1, guest $g: outside the bracket by $clock_err s (tolerance $tol s)"
    awk -v e="$clock_err" -v t="$tol" 'BEGIN { exit !(e <= t) }' || fail "$2: the guest clock of $1 is $clock_err s off L1's"
}

# 2. fork --count 3: four different uuids and random bytes, no shell typing.
rand() { "$forkvm" exec "$1" -- sh -c 'cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo'; }
"$forkvm" fork "$vm" --count 3 || fail "fork --count 3"
keep_logs "$vm" "$vm-c1" "$vm-c2" "$vm-c3"
: >/tmp/l2-agent.rand
for v in "$vm" "$vm-c1" "$vm-c2" "$vm-c3"; do
    if [ "$v" != "$vm" ]; then
        # Not `grep -q`: it would close the pipe under forkvm's output (a broken-pipe panic).
        "$forkvm" status "$v" >/tmp/l2-agent.status || fail "status $v"
        grep -q '"reseeded": true' /tmp/l2-agent.status || fail "$v was not reseeded: $(cat /tmp/l2-agent.status)"
    fi
    r=$(rand "$v") || fail "exec in $v"
    echo "l2-agent: $v: $(echo "$r" | tr '\n' ' ')"
    echo "$r" >>/tmp/l2-agent.rand
done
uu=$(awk 'NR % 2 == 1' /tmp/l2-agent.rand | sort -u | wc -l)
rb=$(awk 'NR % 2 == 0' /tmp/l2-agent.rand | sort -u | wc -l)
[ "$uu" -eq 4 ] && [ "$rb" -eq 4 ] || fail "fork: $uu different uuids and $rb different random byte strings of 4"
echo "l2-agent: fork --count 3: 4 different uuids, 4 different getrandom byte strings"
"$forkvm" status "$vm-c1" | grep -A12 clone_hook | sed 's/^/l2-agent: c1 status /'
for c in 1 2 3; do "$forkvm" stop "$vm-c$c" >/dev/null || fail "stop $vm-c$c"; done

# 4 (before hibernating). Bench rows on L2.
"$forkvm" bench agent --vm "$vm" --runs "${L2_AGENT_BENCH_RUNS:-3}" >/tmp/l2-agent.bench 2>&1; rc=$?
sed 's/^/l2-agent: bench: /' /tmp/l2-agent.bench
[ "$rc" -eq 0 ] || fail "bench agent"

# 3. Hibernate, move the clock on, wake: the clock hook steps the guest's wall clock.
"$forkvm" hibernate "$vm" || fail "hibernate"
before=$(date +%s)
date -s "@$((before + 3600))" >/dev/null || fail "date -s in L1"
"$forkvm" wake "$vm" || fail "wake"
clock_check "$vm" "after wake (L1 clock moved +3600 s)"
"$forkvm" status "$vm" >/tmp/l2-agent.status
grep -q '"reseeded": true' /tmp/l2-agent.status || fail "woken VM not reseeded: $(cat /tmp/l2-agent.status)"
echo "l2-agent: woken VM: $(grep -E 'clock_step_ms|generation' /tmp/l2-agent.status | tr -d ' \n')"
"$forkvm" stop "$vm" >/dev/null 2>&1
date -s "@$(( $(date +%s) - 3600 ))" >/dev/null

# 5. Restore the early snapshot: its guest clock stopped long ago; the clone hook steps it.
# The snapshot's age is made long by moving L1's clock on (never by waiting): elapsed + jump.
jump=${L2_CLOCK_JUMP:-600}
read -r now_up _ </proc/uptime
before=$(date +%s)
date -s "@$((before + jump))" >/dev/null || fail "date -s in L1"
interval=$(awk -v a="$snap_up" -v b="$now_up" -v j="$jump" 'BEGIN { printf "%.1f", b - a + j }')
"$forkvm" restore "$snap" --cow --name l2s --detach >/dev/null || fail "restore $snap"
keep_logs l2s
clock_check l2s "restored a snapshot $interval s old"
"$forkvm" status l2s >/tmp/l2-agent.status
grep -q '"reseeded": true' /tmp/l2-agent.status || fail "restored VM not reseeded: $(cat /tmp/l2-agent.status)"
step=$(sed -n 's/.*"clock_step_ms": \([-0-9.e+]*\).*/\1/p' /tmp/l2-agent.status)
echo "l2-agent: restored VM: clone hook stepped its clock by $step ms (snapshot taken $interval s before)"
# The step is what the guest was behind: about the interval (a guest that kept time by itself, or
# a hook that did not step, would be near 0).
awk -v s="$step" -v i="$interval" 'BEGIN { exit !(s / 1000 >= i / 2) }' \
    || fail "the clone hook stepped the restored clock by $step ms, not about $interval s"
"$forkvm" stop l2s >/dev/null 2>&1
date -s "@$(( $(date +%s) - jump ))" >/dev/null
rm -rf "$snap"
echo "l2-agent: PASS"
