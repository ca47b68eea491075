#!/usr/bin/env bash
# Build the L2 guest initramfs (gzip'ed newc cpio): static busybox and an
# /init that mounts proc/sys/dev, prints
#     FORKVM-READY uptime=<first field of /proc/uptime>
# on the console and then runs an interactive shell on the serial console
# (ttyS0), for test scripts to type commands into. With --agent, the static
# guest agent is installed as /bin/forkvm-agent and /init starts
# `forkvm-agent serve` (vsock port 52) after the ready line.
#
# Usage: mk-l2-initramfs.sh [--agent BIN] [OUT]   (default OUT: $FORKVM_CACHE/l2-initrd.img)
# Env: FORKVM_AGENT_BIN (same as --agent)
set -euo pipefail
export E2E_TAG=mk-l2-initramfs
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

agent="${FORKVM_AGENT_BIN:-}"
if [[ "${1:-}" == --agent ]]; then agent="${2:?--agent needs a file}"; shift 2; fi
out="${1:-$CACHE/l2-initrd.img}"
root="$(mktemp -d "${TMPDIR:-/tmp}/forkvm-l2root.XXXXXX")"
trap 'rm -rf "$root"' EXIT

e2e_install_busybox "$root"
if [[ -n "$agent" ]]; then
    [[ -f "$agent" ]] || e2e_die "guest agent $agent does not exist"
    if command -v file >/dev/null 2>&1; then
        case "$(file -L "$agent")" in
            *"statically linked"*|*"static-pie linked"*) ;;
            *) e2e_die "$agent is not statically linked. Build with RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu" ;;
        esac
    fi
    install -m 0755 "$agent" "$root/bin/forkvm-agent"
    if command -v strip >/dev/null 2>&1; then strip --strip-debug "$root/bin/forkvm-agent" || true; fi
fi

# virtio-mmio + vsock drivers (modules in the Debian cloud kernel), in dependency order; /init
# loads them so the VMM's vsock device (described in ACPI) gives the guest /dev/vsock.
modules="${FORKVM_L2_MODULES:-$CACHE/modules/extra}"
mkdir -p "$root/lib/modules/forkvm"
: >"$root/lib/modules/forkvm/load-order"
# The order comes from each module's depends= (Debian 6.1.0-57's virtio.ko needs virtio_ring; -48's
# did not, and a fixed list broke every virtio driver in L2).
order="$("$(dirname "${BASH_SOURCE[0]}")/module-order.sh" "$modules" virtio virtio_mmio \
    vmw_vsock_virtio_transport virtio_blk virtio_net)" \
    || e2e_die "could not order the L2 modules in $modules (run tools/e2e/fetch-guest.sh)"
for ko in $order; do
    install -m 0644 "$modules/$ko" "$root/lib/modules/forkvm/"
    echo "$ko" >>"$root/lib/modules/forkvm/load-order"
done
"$(dirname "${BASH_SOURCE[0]}")/module-order.sh" --check "$modules" "$root/lib/modules/forkvm/load-order" \
    || e2e_die "the L2 module load order is wrong"

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
while read -r m; do
    insmod "/lib/modules/forkvm/$m" || echo "forkvm-init: insmod $m failed"
done </lib/modules/forkvm/load-order
read -r up _ </proc/uptime
echo "FORKVM-READY uptime=$up"
# The guest agent (vsock port 52): exec, files, and the clone hook forkvm sends on every fork,
# restore and wake. It prints "forkvm-agent: serving on ..." once it listens.
if [ -x /bin/forkvm-agent ]; then setsid forkvm-agent serve </dev/null & fi
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
e2e_log "wrote $out ($(du -h "$out" | cut -f1))${agent:+ with /bin/forkvm-agent}"
printf '%s\n' "$out"
