#!/usr/bin/env bash
# Build the L2 guest initramfs (gzip'ed newc cpio): static busybox and an
# /init that mounts proc/sys/dev, prints
#     FORKVM-READY uptime=<first field of /proc/uptime>
# on the console and then runs an interactive shell on the serial console
# (ttyS0), for test scripts to type commands into.
#
# Usage: mk-l2-initramfs.sh [OUT]   (default: $FORKVM_CACHE/l2-initrd.img)
set -euo pipefail
export E2E_TAG=mk-l2-initramfs
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out="${1:-$CACHE/l2-initrd.img}"
root="$(mktemp -d "${TMPDIR:-/tmp}/forkvm-l2root.XXXXXX")"
trap 'rm -rf "$root"' EXIT

e2e_install_busybox "$root"

cat >"$root/init" <<'INIT'
#!/bin/sh
# forkvm L2 test guest init.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=vt100
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
read -r up _ </proc/uptime
echo "FORKVM-READY uptime=$up"
# Interactive shell on the console (ttyS0); cttyhack makes it the
# controlling tty so ^C etc. work. Respawn if it exits... but only when the
# test asked for it; otherwise leave the VM.
setsid cttyhack sh -l
echo "FORKVM-SHELL-EXIT"
sync
reboot -f
INIT
chmod 0755 "$root/init"
printf 'PS1="# "\nexport PS1\n' >"$root/etc/profile"

mkdir -p "$(dirname "$out")"
e2e_pack_cpio "$root" "$out"
e2e_log "wrote $out ($(du -h "$out" | cut -f1))"
printf '%s\n' "$out"
