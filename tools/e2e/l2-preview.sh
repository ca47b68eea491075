#!/bin/sh
# /e2e/l2-preview.sh, runs inside L1 (busybox sh): the daemon's preview proxy wakes a hibernated
# Linux L2 sandbox that has a disk and a network:
#   1. `forkvm serve --preview-listen 127.0.0.1:0` with the L2 kernel as image `l2`
#      (`--image`, `--image-cmdline`, `--image-ready-line "forkvm-agent: serving"`) and the
#      harness's ext4 image as its disk (`--image-disk`); `forkvm sandbox create --image l2 --net`
#   2. in the guest (agent, `forkvm exec <id> --`): mount /dev/vda, write a page on the disk,
#      eth0 at 192.168.241.2 (the daemon's --preview-guest-ip), busybox httpd on the disk's /www;
#      the page through the preview proxy (Host `<id>-80.localhost`) while it runs
#   3. `forkvm sandbox hibernate`, then GET the page through the preview (path form
#      /preview/<id>/80/...): the request wakes the sandbox and is answered with the page the
#      guest wrote on its disk; then the same from paused (`forkvm sandbox pause`)
# Prints PREVIEW-BENCH rows (L1 wall clock of one HTTP request through busybox nc).
# Tunables: L2_MEM_MIB (256), L2_VCPUS (2), L2_CMDLINE, PREVIEW_T_OP (120), FORKVM, L2_DIR,
# NETDISK_IMG. On failure: the daemon's log and the kept vmm.log/console.log of the sandbox.
set -u
. /e2e/l1-lib.sh
forkvm="${FORKVM:-/forkvm}"
l2dir="${L2_DIR:-/l2}"
img_src="${NETDISK_IMG:-/e2e/netdisk.ext4}"
export FORKVM_RUN_DIR="${FORKVM_RUN_DIR:-/tmp/forkvm-preview-run}"
export FORKVM_STATE_DIR="${FORKVM_STATE_DIR:-/tmp/forkvm-preview-state}"
export FORKVM_STORE="${FORKVM_STORE:-/tmp/forkvm-preview-store}"
cmdline="${L2_CMDLINE:-console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1}"
t_op="${PREVIEW_T_OP:-120}"
work=/tmp/preview
keep=/tmp/l2-preview-logs
dlog="$work/serve.log"
dpid=""
id=""
fv() { fv_t="$1"; shift; timeout "$fv_t" "$forkvm" "$@"; } # not $t: callers time with it
keep_logs() { for f in vmm.log console.log; do
    [ -f "$FORKVM_RUN_DIR/$id/$f" ] && ln -f "$FORKVM_RUN_DIR/$id/$f" "$keep/$1.$f" 2>/dev/null; done; }
cleanup() {
    [ -n "$id" ] && fv "$t_op" sandbox rm "$id" >/dev/null 2>&1
    if [ -n "$dpid" ]; then
        kill "$dpid" 2>/dev/null
        i=0; while kill -0 "$dpid" 2>/dev/null && [ "$i" -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
        kill -KILL "$dpid" 2>/dev/null
    fi
}
fail() {
    echo "l2-preview: FAIL: $*"
    [ -n "$id" ] && keep_logs failed
    cleanup
    [ -f "$dlog" ] && { echo "l2-preview: daemon log (last 40 lines):"; tail -n 40 "$dlog" | sed 's/^/  | /'; }
    show_kept l2-preview
    exit 1
}
ex() { fv 45 exec --timeout 30 "$id" -- sh -c "$1"; }
# get HOSTHEADER PATH: the raw HTTP/1.0 answer of the preview proxy (busybox nc).
get() {
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" | timeout 120 nc "${paddr%:*}" "${paddr##*:}"
}
# fetch HOSTHEADER PATH: the body of a 200 answer.
fetch() {
    r=$(get "$1" "$2" 2>"$work/get.err") || { echo "l2-preview: GET $2 (Host $1) failed: $(cat "$work/get.err")" >&2; return 1; }
    case "$r" in
        "HTTP/1."?" 200"*) printf '%s\n' "$r" | tr -d '\r' | sed '1,/^$/d' ;;
        *) echo "l2-preview: GET $2 (Host $1) answered: $(printf '%s' "$r" | tr -d '\r' | head -n 12)" >&2; return 1 ;;
    esac
}
state() { fv 30 sandbox get "$id" | sed -n 's/^ *"state": "\([a-z]*\)".*/\1/p'; }

[ -f "$img_src" ] || fail "no disk image $img_src (built by tools/e2e/run.sh)"
load_tun || fail "cannot load tun.ko (needed for --net)"
ip link set lo up || fail "ip link set lo up"
rm -rf "$FORKVM_RUN_DIR" "$FORKVM_STATE_DIR" "$FORKVM_STORE" "$work" "$keep"
mkdir -p "$work" "$keep"
cp "$img_src" "$work/disk.ext4" || fail "copy the disk image to tmpfs"

# 1. The daemon, with the L2 kernel and the disk as an image; its preview address from its line.
"$forkvm" serve --listen 127.0.0.1:0 --preview-listen 127.0.0.1:0 --image "l2=$l2dir/vmlinuz,$l2dir/initrd.img" \
    --image-cmdline "l2=$cmdline" --image-ready-line "l2=forkvm-agent: serving" \
    --image-disk "l2=$work/disk.ext4" >"$dlog" 2>&1 &
dpid=$!
paddr=""
i=0
while [ -z "$paddr" ]; do
    i=$((i + 1)); [ "$i" -le 300 ] || fail "the daemon printed no 'previews on' line"
    kill -0 "$dpid" 2>/dev/null || fail "the daemon exited"
    sleep 0.1
    paddr=$(sed -n 's/.*previews on \([^ ]*\) .*/\1/p' "$dlog")
done
aaddr=$(sed -n 's/.* and http:\/\/\([^ ]*\) .*/\1/p' "$dlog")
# The daemon's own wake time (sum of its wake_ms histogram for kind, from /metrics on --listen).
daemon_wake_ms() {
    # busybox wget: it speaks HTTP itself (nc also works since the API allows half-closed clients).
    timeout 30 wget -q -O - "http://$aaddr/metrics" 2>/dev/null | sed -n "s/^[a-z_]*wake_ms_sum{kind=\"$1\"} \([0-9.]*\).*/\1/p"
}
FORKVM_TOKEN=$(fv 30 token create --workspace e2e 2>/dev/null) || fail "forkvm token create"
export FORKVM_TOKEN
t=$(now_ms)
created=$(fv "$t_op" sandbox create --image l2 --net --memory-mib "${L2_MEM_MIB:-256}" --vcpus "${L2_VCPUS:-2}" \
    --privacy public --pause-after 0 --hibernate-after 0) || fail "forkvm sandbox create --image l2 --net: $created"
id=$(printf '%s\n' "$created" | sed -n 's/^ *"id": "\([^"]*\)".*/\1/p')
[ -n "$id" ] || fail "no sandbox id in: $created"
echo "l2-preview: sandbox $id created (booted to its agent) in $(( $(now_ms) - t )) ms; previews on $paddr"
keep_logs created

# 2. httpd on the disk; the page through the preview while it runs.
ex 'mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo "page of $(hostname) on its disk" >/mnt/www/sb.html && sync' \
    || fail "mount /dev/vda and write a page"
want=$(ex 'cat /mnt/www/sb.html') || fail "read the page back"
ex 'ip addr add 192.168.241.2/24 dev eth0 && ip link set eth0 up && httpd -p 80 -h /mnt/www' || fail "eth0 up + httpd"
host="$id-80.localhost"
got=$(fetch "$host" /index.html) || fail "GET through the preview (running)"
[ "$got" = "netdisk page" ] || fail "the image's page through the preview: '$got'"
t=$(now_ms)
got=$(fetch "$host" /sb.html) || fail "GET sb.html through the preview (running)"
run_ms=$(( $(now_ms) - t ))
[ "$got" = "$want" ] || fail "the sandbox's page through the preview: '$got', wanted '$want'"
echo "l2-preview: running sandbox serves '$got' through the preview (Host $host)"

# 3. Hibernate through the API; a request to the preview wakes it and gets the page.
fv "$t_op" sandbox hibernate "$id" >/dev/null || fail "forkvm sandbox hibernate"
s=$(state); [ "$s" = hibernated ] || fail "after hibernate the sandbox is '$s'"
t=$(now_ms)
got=$(fetch "$paddr" "/preview/$id/80/sb.html") || fail "GET through the preview (hibernated: must wake it)"
wake_ms=$(( $(now_ms) - t ))
[ "$got" = "$want" ] || fail "after wake-on-request the page is '$got', wanted '$want'"
s=$(state); [ "$s" = running ] || fail "after the request the sandbox is '$s'"
keep_logs woken
echo "l2-preview: the request to the hibernated sandbox woke it and got '$got' in $wake_ms ms"
t=$(now_ms)
got=$(fetch "$host" /sb.html) || fail "GET after the wake"
warm_ms=$(( $(now_ms) - t ))
fv "$t_op" sandbox pause "$id" >/dev/null || fail "forkvm sandbox pause"
s=$(state); [ "$s" = paused ] || fail "after pause the sandbox is '$s'"
t=$(now_ms)
got=$(fetch "$host" /sb.html) || fail "GET through the preview (paused: must resume it)"
paused_ms=$(( $(now_ms) - t ))
[ "$got" = "$want" ] || fail "after resume-on-request the page is '$got'"
echo "PREVIEW-BENCH | what (L1 wall clock, busybox nc -> daemon preview -> netns -> tap -> L2 httpd on its disk) | ms"
echo "PREVIEW-BENCH | GET, sandbox running | $run_ms"
echo "PREVIEW-BENCH | GET, sandbox hibernated (wake-on-request) | $wake_ms"
echo "PREVIEW-BENCH | GET right after that wake | $warm_ms"
echo "PREVIEW-BENCH | GET, sandbox paused (resume-on-request) | $paused_ms"
echo "PREVIEW-BENCH | of which the daemon's wake (forkvm wake until its VMM serves; /metrics) | $(daemon_wake_ms woken)"
echo "PREVIEW-BENCH | of which the daemon's resume (/metrics) | $(daemon_wake_ms resumed)"
cleanup
echo "l2-preview: PASS"
