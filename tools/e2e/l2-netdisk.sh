#!/bin/sh
# /e2e/l2-netdisk.sh, runs inside L1 (busybox sh): Linux L2 with a copy-on-write ext4 disk
# (virtio-blk, `--disk`, image built by the harness: /e2e/netdisk.ext4 with /www/index.html) and a
# network device in a private namespace (virtio-net, `--net`), all through the ordinary CLI:
#   1. the guest mounts /dev/vda, writes a file, brings eth0 up at 192.168.241.2 and runs busybox
#      httpd on the disk's /www; L1 fetches the page through `forkvm port-forward`
#   2. `forkvm fork`: the child sees the parent's file; its own writes (a new page, a new file)
#      stay its own (checked after dropping the page cache on both sides, so from the disks); the
#      child serves its own page at its own forwarded port while the parent serves the old one
#   3. NET-BENCH rows: request latency and throughput host (L1) <-> guest through port-forward
#   4. hibernate + wake: the page still comes back (disk layers and network restored)
# Tunables: L2_MEM (256M), L2_VCPUS (2), L2_CMDLINE, NETDISK_BOOT_TIMEOUT (120), NETDISK_T_EXEC (45),
# NETDISK_T_OP (120), NETDISK_T_DIAG (15), FORKVM, L2_DIR, NETDISK_IMG. On failure: the kept
# vmm.log/console.log of every VM of the test (hard links, and <run dir>/.exited/).
set -u
. /e2e/l1-lib.sh
forkvm="${FORKVM:-/forkvm}"
l2dir="${L2_DIR:-/l2}"
img_src="${NETDISK_IMG:-/e2e/netdisk.ext4}"
export FORKVM_RUN_DIR="${FORKVM_RUN_DIR:-/tmp/forkvm-netdisk-run}"
export FORKVM_STORE="${FORKVM_STORE:-/tmp/forkvm-netdisk-store}"
cmdline="${L2_CMDLINE:-console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1}"
vm=nd
log="$FORKVM_RUN_DIR/$vm/console.log"
pfs=""
# Every step is bounded (a wedged VM must fail this test with its logs, well inside QEMU's own
# timeout): T_EXEC for one exec through the agent (the VMM also waits up to 60 s for a pending
# clone hook), T_OP for run/fork/hibernate/wake/stop, T_DIAG for each diagnostic command.
t_exec="${NETDISK_T_EXEC:-45}"
t_op="${NETDISK_T_OP:-120}"
t_diag="${NETDISK_T_DIAG:-15}"
keep=/tmp/l2-netdisk-logs
# A VMM removes its directory when it is stopped: hard links keep a VM's logs for the failure
# report (a VM that ends unasked moves them to $FORKVM_RUN_DIR/.exited/<name>.<pid>/ itself).
keep_logs() { for v in "$@"; do for f in vmm.log console.log; do
    [ -f "$FORKVM_RUN_DIR/$v/$f" ] && ln -f "$FORKVM_RUN_DIR/$v/$f" "$keep/$v.$f" 2>/dev/null; done; done; }
fv() { # SECONDS ARGS...: forkvm ARGS, killed after SECONDS
    t="$1"; shift
    timeout "$t" "$forkvm" "$@"
}

cleanup() {
    for p in $pfs; do kill "$p" 2>/dev/null; done
    for v in "$vm-c1" "$vm"; do fv "$t_op" stop "$v" >/dev/null 2>&1; done
}
# What the network looks like from both sides (on failure).
netdiag() {
    for v in "$vm" "$vm-c1"; do
        [ -d "$FORKVM_RUN_DIR/$v" ] || continue
        fv "$t_diag" exec --timeout 10 "$v" -- sh -c 'ip addr show eth0; ip route; netstat -ltn; ps | grep -v "\[" ; arp -an' 2>&1 \
            | sed "s/^/l2-netdisk: diag $v guest| /"
        # Through the serial shell with builtins only (no fork in the guest: a guest whose forks
        # hang still answers): per-CPU interrupt counts (IPIs: CAL, TLB, RES) and the load.
        # shellcheck disable=SC2016  # expanded by the guest's shell
        fv "$t_diag" exec --timeout 10 --wait-for IRQ-42-END "$v" \
            'while read -r l; do echo "IRQ $l"; done </proc/interrupts; read -r a </proc/loadavg; echo "IRQ load $a"; echo IRQ-$((40+2))-END' 2>&1 \
            | grep -E '^IRQ |CPU|CAL|TLB|RES|LOC|load|error' | sed "s/^/l2-netdisk: diag $v serial| /"
        ns=$(cat "$FORKVM_RUN_DIR/$v/netns" 2>/dev/null)
        [ -n "$ns" ] && timeout "$t_diag" nsenter --net="$ns" sh -c 'ip addr; arp -an; ping -c 1 -W 2 192.168.241.2' 2>&1 \
            | sed "s/^/l2-netdisk: diag $v netns| /"
        [ -n "$ns" ] && printf 'GET /index.html HTTP/1.0\r\n\r\n' | nsenter --net="$ns" timeout "$t_diag" nc 192.168.241.2 80 2>&1 \
            | head -n 3 | sed "s/^/l2-netdisk: diag $v netns GET| /"
        grep -i -E "net|tap|virtio" "$FORKVM_RUN_DIR/$v/vmm.log" 2>/dev/null | tail -n 10 | sed "s/^/l2-netdisk: diag $v vmm.log| /"
    done
    for f in /tmp/l2-netdisk.pf.*; do [ -f "$f" ] && sed "s|^|l2-netdisk: diag $f: |" "$f"; done
}
fail() {
    echo "l2-netdisk: FAIL: $*"
    netdiag
    if [ -f "$log" ]; then echo "l2-netdisk: last L2 console lines:"; tail -n 30 "$log" | sed 's/^/  L2| /'; fi
    cleanup
    show_kept l2-netdisk
    exit 1
}
ex() { # VM CMD: run CMD in the guest (sh -c), stdout to ours; bounded
    fv "$t_exec" exec --timeout 30 "$1" -- sh -c "$2"
}
# forward VM TAG: starts `forkvm port-forward VM 80` in this shell (its pid kept for cleanup, its
# output in /tmp/l2-netdisk.pf.TAG: one file per forward, never shared with an earlier one) and
# sets $fwd to the host address once its complete 'forwarding ADDR -> ...' line is there.
forward() {
    out="/tmp/l2-netdisk.pf.$2"
    FORKVM_LOG=info "$forkvm" port-forward "$1" 80 127.0.0.1:0 >"$out" 2>&1 &
    pfs="$pfs $!"
    fwd=""
    i=0
    while [ -z "$fwd" ]; do
        i=$((i + 1)); [ "$i" -le 300 ] || { cat "$out" >&2; return 1; }
        sleep 0.1
        fwd=$(sed -n 's/^forwarding \([^ ]*\) -> .*/\1/p' "$out")
    done
}
# get ADDR PATH: the raw HTTP/1.0 answer (busybox nc).
get() {
    printf 'GET /%s HTTP/1.0\r\nHost: l2\r\n\r\n' "$2" | timeout 60 nc "${1%:*}" "${1##*:}"
}
# fetch ADDR PATH: the body of a 200 answer.
fetch() {
    r=$(get "$1" "$2" 2>/tmp/l2-netdisk.get.err) || { echo "l2-netdisk: GET http://$1/$2 failed ($?): $(cat /tmp/l2-netdisk.get.err)" >&2; return 1; }
    case "$r" in
        "HTTP/1."?" 200"*) printf '%s\n' "$r" | tr -d '\r' | sed '1,/^$/d' ;;
        *) echo "l2-netdisk: GET http://$1/$2 answered: $(printf '%s' "$r" | head -n 1)" >&2; return 1 ;;
    esac
}

[ -f "$img_src" ] || fail "no disk image $img_src (built by tools/e2e/run.sh)"
load_tun || fail "cannot load tun.ko (needed for --net)"
# L1's init leaves loopback down; port-forward listens on 127.0.0.1.
ip link set lo up || fail "ip link set lo up"
rm -rf "$FORKVM_RUN_DIR" "$FORKVM_STORE" "$keep"
mkdir -p /tmp/netdisk "$keep"
img=/tmp/netdisk/disk.ext4
cp "$img_src" "$img" || fail "copy the disk image to tmpfs"
t0=$(now_ms)
fv "$t_op" run --kernel "$l2dir/vmlinuz" --initrd "$l2dir/initrd.img" --mem "${L2_MEM:-256M}" \
    --vcpus "${L2_VCPUS:-2}" --cmdline "$cmdline" --disk "$img" --net --name "$vm" --detach || fail "forkvm run --disk --net"
i=0
until grep -q "forkvm-agent: serving" "$log" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -le "$((${NETDISK_BOOT_TIMEOUT:-120} * 10))" ] || fail "no 'forkvm-agent: serving' line"
    grep -q "forkvm-agent: error" "$log" 2>/dev/null && fail "the agent did not start"
    [ -d "$FORKVM_RUN_DIR/$vm" ] || fail "the VM exited before its agent listened"
    sleep 0.1
done
echo "l2-netdisk: agent up $(( $(now_ms) - t0 )) ms after forkvm run"
keep_logs "$vm"

# 1. Disk + network + httpd in the parent.
ex "$vm" 'ls /sys/block; ip -o link' | sed 's/^/l2-netdisk: guest: /'
ex "$vm" 'mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo from-parent >/mnt/parent.txt && sync' || fail "mount /dev/vda and write"
ex "$vm" 'ip addr add 192.168.241.2/24 dev eth0 && ip link set eth0 up && httpd -p 80 -h /mnt/www' \
    || fail "eth0 up + httpd"
page=$(ex "$vm" 'cat /mnt/www/index.html') || fail "read index.html"
[ "$page" = "netdisk page" ] || fail "the disk image's page says '$page'"
forward "$vm" parent || fail "port-forward $vm"
pa=$fwd
got=$(fetch "$pa" index.html) || fail "GET http://$pa/ (parent)"
[ "$got" = "netdisk page" ] || fail "parent page through port-forward: '$got'"
echo "l2-netdisk: parent page through port-forward $pa: '$got'"

# 2. Fork: the child sees the parent's file; its writes stay its own.
fv "$t_op" fork "$vm" || fail "fork"
c="$vm-c1"
keep_logs "$c"
seen=$(ex "$c" 'cat /mnt/parent.txt') || fail "read the parent's file in the child"
[ "$seen" = from-parent ] || fail "the child reads '$seen' from the parent's file"
ex "$c" 'echo child page >/mnt/www/index.html && echo mine >/mnt/child.txt && sync && echo 3 >/proc/sys/vm/drop_caches' \
    || fail "write in the child"
ex "$vm" 'sync; echo 3 >/proc/sys/vm/drop_caches' || fail "drop caches in the parent"
cp_=$(ex "$vm" 'cat /mnt/www/index.html; [ -e /mnt/child.txt ] && echo LEAK || echo no-child-file') || fail "read in the parent"
cc=$(ex "$c" 'cat /mnt/www/index.html /mnt/child.txt') || fail "read in the child"
[ "$cp_" = "netdisk page
no-child-file" ] || fail "the parent's disk after the child wrote: '$cp_'"
[ "$cc" = "child page
mine" ] || fail "the child's disk after its writes: '$cc'"
echo "l2-netdisk: fork: child sees the parent's file; child's writes absent from the parent's disk"
forward "$c" child || fail "port-forward $c"
ca=$fwd
[ "$ca" != "$pa" ] || fail "parent and child forwarded at the same address"
gc=$(fetch "$ca" index.html) || fail "GET http://$ca/ (child)"
gp=$(fetch "$pa" index.html) || fail "GET http://$pa/ (parent, after the fork)"
[ "$gc" = "child page" ] && [ "$gp" = "netdisk page" ] || fail "child serves '$gc', parent serves '$gp'"
echo "l2-netdisk: child serves '$gc' at $ca, parent '$gp' at $pa (same guest address 192.168.241.2, own namespaces)"
fv "$t_op" stop "$c" >/dev/null 2>&1

# 3. NET-BENCH: L1 <-> L2 through port-forward (tap in the VM's namespace, userspace virtio-net).
n=20
t=$(now_ms)
k=0
while [ "$k" -lt "$n" ]; do get "$pa" index.html >/dev/null || fail "bench GET"; k=$((k + 1)); done
lat=$(( ($(now_ms) - t) * 1000 / n ))
ex "$vm" 'dd if=/dev/zero of=/mnt/www/big bs=1M count=16 2>/dev/null && sync' || fail "make a 16 MiB file"
t=$(now_ms)
get "$pa" big >/tmp/netdisk/big || fail "bench GET big"
ms=$(( $(now_ms) - t ))
sz=$(wc -c </tmp/netdisk/big)
[ "$sz" -gt 16777216 ] || fail "got $sz bytes (headers included) for 16 MiB"
rm -f /tmp/netdisk/big
echo "NET-BENCH | what | value"
echo "NET-BENCH | HTTP GET small page, L1 nc -> port-forward -> tap -> L2 httpd (avg of $n, incl. nc spawn) | $((lat / 1000)).$(printf %03d $((lat % 1000))) ms"
echo "NET-BENCH | HTTP GET 16 MiB file (from the guest's page cache) | $ms ms = $(( 16 * 1024 * 1000 / (ms > 0 ? ms : 1) )) KiB/s"

# 4. Hibernate + wake with disk and network: the page comes back through a new forward.
fv "$t_op" hibernate "$vm" || fail "hibernate"
fv "$t_op" wake "$vm" || fail "wake"
for f in "$keep/$vm".*; do [ -f "$f" ] && mv -f "$f" "$f.before-hibernate"; done
keep_logs "$vm"
forward "$vm" woken || fail "port-forward after wake"
wa=$fwd
t=$(now_ms)
gw=$(fetch "$wa" index.html) || fail "GET after wake"
[ "$gw" = "netdisk page" ] || fail "after wake the page is '$gw'"
echo "l2-netdisk: after hibernate + wake: '$gw' ($(( $(now_ms) - t )) ms for the first request)"
seen=$(ex "$vm" 'cat /mnt/parent.txt') || fail "read after wake"
[ "$seen" = from-parent ] || fail "after wake the file says '$seen'"
cleanup
echo "l2-netdisk: PASS"
