#!/bin/sh
# /e2e/l2-snapdisk.sh, runs inside L1 (busybox sh): snapshot and restore of a Linux L2 guest that
# is writing files on its ext4 disk (virtio-blk, `--disk`; image built by run.sh with
# `mkfs.ext4 -d`, carrying a static /sbin/e2fsck from Debian's e2fsck-static):
#   1. the guest mounts /dev/vda and runs a writer: file /mnt/w/f<i> (4 KiB of "payload-<i>"),
#      `sync`, then appends <i> to /tmp/synced.log (guest memory) — every number in that log names
#      a file that was on the disk before the log said so
#   2. while it writes: `forkvm snapshot`, stop the VM, `forkvm restore` the snapshot
#   3. in the restored guest: the writer was still running at the snapshot (no /tmp/writer.done);
#      stop it, unmount, `e2fsck -fn /dev/vda` must find the filesystem clean (exit 0), then mount
#      it read-only (so every read comes from the restored disk, not a page cache) and check that
#      every file the restored memory's log calls synced is there with its content
# Prints SNAPDISK-BENCH rows (snapshot, restore, first exec answer; L1 wall clock).
# Tunables: L2_MEM (256M), L2_VCPUS (2), L2_CMDLINE, SNAPDISK_BOOT_TIMEOUT (120), SNAPDISK_T_EXEC
# (45), SNAPDISK_T_OP (120), SNAPDISK_MIN_FILES (5: files synced before the snapshot), FORKVM,
# L2_DIR, NETDISK_IMG. On failure: the kept vmm.log/console.log of both VMs.
set -u
. /e2e/l1-lib.sh
forkvm="${FORKVM:-/forkvm}"
l2dir="${L2_DIR:-/l2}"
img_src="${NETDISK_IMG:-/e2e/netdisk.ext4}"
export FORKVM_RUN_DIR="${FORKVM_RUN_DIR:-/tmp/forkvm-snapdisk-run}"
cmdline="${L2_CMDLINE:-console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1}"
vm=sd
rvm=sd-r
t_exec="${SNAPDISK_T_EXEC:-45}"
t_op="${SNAPDISK_T_OP:-120}"
min_files="${SNAPDISK_MIN_FILES:-5}"
work=/tmp/snapdisk
snap="$work/snap"
keep=/tmp/l2-snapdisk-logs
keep_logs() { for v in "$@"; do for f in vmm.log console.log; do
    [ -f "$FORKVM_RUN_DIR/$v/$f" ] && ln -f "$FORKVM_RUN_DIR/$v/$f" "$keep/$v.$f" 2>/dev/null; done; done; }
fv() { fv_t="$1"; shift; timeout "$fv_t" "$forkvm" "$@"; } # not $t: callers time with it
cleanup() { for v in "$rvm" "$vm"; do fv "$t_op" stop "$v" >/dev/null 2>&1; done; }
fail() {
    echo "l2-snapdisk: FAIL: $*"
    cleanup
    show_kept l2-snapdisk
    exit 1
}
ex() { # VM CMD [SECONDS]: run CMD in the guest (sh -c), stdout to ours; bounded
    fv "$((${3:-30} + 15))" exec --timeout "${3:-30}" "$1" -- sh -c "$2"
}
wait_agent() { # VM: until its console says the agent serves (bounded)
    i=0
    until grep -q "forkvm-agent: serving" "$FORKVM_RUN_DIR/$1/console.log" 2>/dev/null; do
        i=$((i + 1)); [ "$i" -le "$((${SNAPDISK_BOOT_TIMEOUT:-120} * 10))" ] || return 1
        [ -d "$FORKVM_RUN_DIR/$1" ] || return 1
        sleep 0.1
    done
}

[ -f "$img_src" ] || fail "no disk image $img_src (built by tools/e2e/run.sh)"
rm -rf "$FORKVM_RUN_DIR" "$work" "$keep"
mkdir -p "$work" "$keep"
img="$work/disk.ext4"
cp "$img_src" "$img" || fail "copy the disk image to tmpfs"
fv "$t_op" run --kernel "$l2dir/vmlinuz" --initrd "$l2dir/initrd.img" --mem "${L2_MEM:-256M}" \
    --vcpus "${L2_VCPUS:-2}" --cmdline "$cmdline" --disk "$img" --name "$vm" --detach || fail "forkvm run --disk"
keep_logs "$vm"
wait_agent "$vm" || fail "no 'forkvm-agent: serving' line from $vm"

# 1. The writer: a file, sync, then its number in the (memory-only) log. e2fsck goes to /tmp first
# (the restored guest unmounts the disk before checking it).
ex "$vm" 'mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cp /mnt/sbin/e2fsck /tmp/e2fsck && mkdir -p /mnt/w' \
    || fail "mount /dev/vda, copy e2fsck"
# shellcheck disable=SC2016  # expanded by the guest's shell
writer='i=0; while [ $i -lt 1000 ]; do i=$((i + 1)); yes payload-$i | head -c 4096 >/mnt/w/f$i && sync && echo $i >>/tmp/synced.log || exit 1; done; echo done >/tmp/writer.done'
ex "$vm" "setsid sh -c '$writer' </dev/null >/tmp/writer.out 2>&1 & echo \$! >/tmp/writer.pid" || fail "start the writer"
i=0
n0=0
while [ "$n0" -lt "$min_files" ]; do
    i=$((i + 1)); [ "$i" -le 60 ] || fail "the writer synced only $n0 files (wanted $min_files)"
    n0=$(ex "$vm" 'n=$(tail -n 1 /tmp/synced.log 2>/dev/null); echo ${n:-0}') \
        || fail "read the writer's log"
    case "$n0" in ''|*[!0-9]*) fail "the writer's log says '$n0'" ;; esac
done
echo "l2-snapdisk: the writer has synced $n0 files; snapshot while it writes"

# 2. Snapshot while writing; stop the VM; restore the snapshot.
t=$(now_ms)
fv "$t_op" snapshot "$vm" "$snap" >"$work/snapshot.out" 2>&1 || { cat "$work/snapshot.out"; fail "snapshot"; }
snap_ms=$(( $(now_ms) - t ))
vmm_said=$(head -n 1 "$work/snapshot.out")
echo "l2-snapdisk: $vmm_said"
n_after=$(ex "$vm" 'tail -n 1 /tmp/synced.log') || fail "read the writer's log after the snapshot"
fv "$t_op" stop "$vm" >/dev/null 2>&1 || fail "stop $vm"
t=$(now_ms)
fv "$t_op" restore "$snap" --name "$rvm" --detach >"$work/restore.out" 2>&1 || { cat "$work/restore.out"; fail "restore"; }
restore_ms=$(( $(now_ms) - t ))
keep_logs "$rvm"
n1=$(ex "$rvm" 'tail -n 1 /tmp/synced.log; [ ! -e /tmp/writer.done ] || echo WRITER-HAD-FINISHED') \
    || fail "exec in the restored guest"
answer_ms=$(( $(now_ms) - t ))
case "$n1" in *WRITER-HAD-FINISHED*) fail "the writer had finished before the snapshot: nothing was in flight" ;; esac
[ "$n1" -ge "$n0" ] 2>/dev/null || fail "the restored guest's log says '$n1', before the snapshot it said $n0"
echo "l2-snapdisk: restored; its log said $n1 synced files at first look (the original said $n0 before and $n_after after the snapshot)"

# 3. Stop the writer, unmount, fsck, mount read-only, check every synced file.
# shellcheck disable=SC2016  # expanded by the guest's shell
ex "$rvm" 'p=$(cat /tmp/writer.pid); kill -TERM -$p; i=0; while kill -0 $p 2>/dev/null; do i=$((i + 1)); [ $i -le 300 ] || exit 9; sleep 0.1; done' 60 \
    || fail "stop the writer in the restored guest"
fsck=$(ex "$rvm" 'umount /mnt || exit 7; /tmp/e2fsck -fn /dev/vda 2>&1; echo "E2FSCK-EXIT $?"' 120) || fail "umount + e2fsck"
printf '%s\n' "$fsck" | sed 's/^/l2-snapdisk: e2fsck| /'
case "$fsck" in *"E2FSCK-EXIT 0"*) ;; *) fail "e2fsck -fn of the restored disk is not clean" ;; esac
# shellcheck disable=SC2016  # expanded by the guest's shell
chk=$(ex "$rvm" 'mount -t ext4 -o ro /dev/vda /mnt || exit 7; n=$(tail -n 1 /tmp/synced.log); k=1; bad=0
    while [ $k -le $n ]; do yes payload-$k | head -c 4096 | cmp -s - /mnt/w/f$k || { echo "BAD f$k"; bad=$((bad + 1)); }; k=$((k + 1)); done
    echo "CHECKED $n BAD $bad"; umount /mnt' 300) || fail "check the files in the restored guest: $chk"
printf '%s\n' "$chk" | sed 's/^/l2-snapdisk: check| /' | tail -n 20
case "$chk" in *"CHECKED "*" BAD 0"*) ;; *) fail "files the restored guest had synced are missing or wrong" ;; esac
fv "$t_op" stop "$rvm" >/dev/null 2>&1 || fail "stop $rvm"
echo "SNAPDISK-BENCH | what | value"
echo "SNAPDISK-BENCH | forkvm snapshot of a 256 MiB L2 writing files (CLI wall clock) | $snap_ms ms"
echo "SNAPDISK-BENCH | the VMM's own account | ${vmm_said#*: }"
echo "SNAPDISK-BENCH | forkvm restore --detach (eager, CLI wall clock) | $restore_ms ms"
echo "SNAPDISK-BENCH | restore start to the restored guest's first agent answer | $answer_ms ms"
echo "l2-snapdisk: PASS"
