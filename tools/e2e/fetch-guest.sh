#!/usr/bin/env bash
# Fetch (and cache) everything the Linux end-to-end test needs from Debian:
#   - the Debian cloud kernel (bzImage + kvm/kvm-amd/irqbypass + virtio modules)
#   - busybox-static
#   - e2fsck-static (e2fsck for L2: l2-snapdisk.sh checks a restored VM's disk)
# and make sure the host tools (qemu-system-x86_64, cpio, ...) are installed.
#
# Idempotent: re-running with everything cached does no network access.
# Cache dir: $FORKVM_CACHE (default: <repo>/.cache/guest).
#
# Result layout ($CACHE):
#   kernel-version            resolved kernel ABI name, e.g. 6.1.0-56-cloud-amd64
#   kernel-package            the .deb package name that was used
#   vmlinuz                   the bzImage
#   config                    the kernel's /boot/config-*
#   modules/                  selected modules, decompressed to plain .ko
#   modules/load-order        kvm-amd + deps in insmod order ("file args")
#   busybox                   static busybox binary
#   e2fsck                    static e2fsck (from e2fsck-static's /sbin/e2fsck.static)
#   debs/                     downloaded .deb files
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
CACHE="${FORKVM_CACHE:-$repo/.cache/guest}"

log() { printf '[fetch-guest] %s\n' "$*" >&2; }
die() { printf '[fetch-guest] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- host tools
# command -> Debian package providing it
need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need qemu-system-x86_64 qemu-system-x86
need cpio cpio
need xz xz-utils
need zstd zstd
need gzip gzip
need dpkg-deb dpkg
need apt-get apt

if ((${#need_pkgs[@]})); then
    log "missing host packages: ${need_pkgs[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        die "not root; install them with: sudo apt-get install -y ${need_pkgs[*]}"
    fi
    command -v apt-get >/dev/null || die "apt-get not found; install manually: ${need_pkgs[*]}"
    log "installing: apt-get install -y --no-install-recommends ${need_pkgs[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; then
        log "install failed, running apt-get update and retrying"
        apt-get update >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 \
            || die "could not install ${need_pkgs[*]}; install them by hand: apt-get install ${need_pkgs[*]}"
    fi
fi

mkdir -p "$CACHE/debs"

# apt-cache needs package lists; run update once if they are empty.
apt_lists_ok() { apt-cache show busybox-static >/dev/null 2>&1; }
if ! apt_lists_ok; then
    log "apt package lists empty; running apt-get update"
    apt-get update >&2 || die "apt-get update failed (no network to the Debian mirror?)"
fi

# -------------------------------------------------------- resolve the kernel
# linux-image-cloud-amd64 is a metapackage depending on
# linux-image-<abi>-cloud-amd64 (signed) ; the -unsigned variant has the same
# bits without the signature. Either is fine for us.
resolve_kernel_pkg() {
    local dep
    dep="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    [[ -n "$dep" ]] || return 1
    printf '%s\n' "$dep"
}

# Resolve through apt every time (apt-cache reads local lists, no network), so a cache made
# when an older kernel was current does not test a different kernel than a fresh machine (CI).
# Without apt lists the cached kernel is used.
if kpkg="$(resolve_kernel_pkg)"; then
    log "linux-image-cloud-amd64 -> $kpkg"
elif [[ -s "$CACHE/kernel-package" && -s "$CACHE/vmlinuz" && -s "$CACHE/modules/load-order" ]]; then
    kpkg="$(cat "$CACHE/kernel-package")"
    log "apt-cache cannot resolve linux-image-cloud-amd64; using the cached $kpkg"
else
    die "could not resolve linux-image-cloud-amd64 via apt-cache depends (try: apt-get update)"
fi

download() { # pkg -> prints path of .deb in $CACHE/debs
    local pkg="$1" f
    f="$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n1)"
    if [[ -z "$f" ]]; then
        log "apt-get download $pkg"
        (cd "$CACHE/debs" && apt-get download "$pkg" >&2) \
            || die "apt-get download $pkg failed"
        f="$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n1)"
        [[ -n "$f" ]] || die "downloaded $pkg but no .deb found in $CACHE/debs"
    fi
    printf '%s\n' "$f"
}

kdeb="$(download "$kpkg")"
bdeb="$(download busybox-static)"
edeb="$(download e2fsck-static)"

# ----------------------------------------------------------- extract kernel
kx="$CACHE/kernel-extract"
if [[ ! -d "$kx/lib/modules" || "$kx/.from" -ot "$kdeb" || "$(cat "$kx/.from" 2>/dev/null)" != "$kdeb" ]]; then
    log "extracting $(basename "$kdeb")"
    rm -rf "$kx"
    mkdir -p "$kx"
    dpkg-deb -x "$kdeb" "$kx"
    printf '%s\n' "$kdeb" >"$kx/.from"
fi

kver="$(find "$kx/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | head -n1)"
[[ -n "$kver" ]] || die "no /boot/vmlinuz-* in $kdeb"
mdir="$kx/lib/modules/$kver"
[[ -d "$mdir" ]] || die "no lib/modules/$kver in $kdeb"

cp -f "$kx/boot/vmlinuz-$kver" "$CACHE/vmlinuz"
cp -f "$kx/boot/config-$kver" "$CACHE/config"
printf '%s\n' "$kver" >"$CACHE/kernel-version"
printf '%s\n' "$kpkg" >"$CACHE/kernel-package"

# ---------------------------------------------------------- select modules
# Decompress a module (.ko/.ko.xz/.ko.zst/.ko.gz) into $CACHE/modules/<name>.ko
out="$CACHE/modules"
rm -rf "$out"
mkdir -p "$out"
decomp() { # relpath-in-mdir -> prints basename .ko
    local rel="$1" src="$mdir/$1" base
    base="$(basename "$rel")"
    case "$rel" in
        *.ko)     cp -f "$src" "$out/$base" ;;
        *.ko.xz)  base="${base%.xz}";  xz -dc "$src" >"$out/$base" ;;
        *.ko.zst) base="${base%.zst}"; zstd -qdc "$src" >"$out/$base" ;;
        *.ko.gz)  base="${base%.gz}";  gzip -dc "$src" >"$out/$base" ;;
        *) die "unknown module format: $rel" ;;
    esac
    printf '%s\n' "$base"
}

# Debian's package ships no modules.dep (depmod runs at install time), so
# resolve dependencies from each module's own .modinfo "depends=" field.
declare -A modpath=()   # module name (underscores) -> path relative to $mdir
while IFS= read -r rel; do
    n="$(basename "$rel")"; n="${n%%.ko*}"; n="${n//-/_}"
    modpath[$n]="$rel"
done < <(cd "$mdir" && find kernel -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

modinfo_depends() { # decompressed .ko -> space separated dependency names
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

load_order=()
declare -A seen=()
add_with_deps() { # module name, optional insmod args
    local name="${1//-/_}" args="${2:-}" rel ko d
    rel="${modpath[$name]:-}"
    [[ -n "$rel" ]] || { log "warning: module $name not in this kernel (builtin?)"; return 0; }
    [[ -n "${seen[$name]:-}" ]] && return 0
    seen[$name]=1
    ko="$(decomp "$rel")"
    for d in $(modinfo_depends "$out/$ko"); do
        add_with_deps "$d"
    done
    load_order+=("$ko${args:+ $args}")
}

# KVM (load-order is what L1's /init insmods).
add_with_deps kvm-amd "nested=1"
printf '%s\n' "${load_order[@]}" >"$out/load-order"

# Extra virtio modules that may be useful later (not loaded by default).
# Those built in (=y) simply don't exist as files.
mkdir -p "$out/extra"
extra_names=(virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
             virtio_mmio virtio_blk virtio_net net_failover failover virtio_console
             virtio_rng virtio_balloon vmw_vsock_virtio_transport
             vmw_vsock_virtio_transport_common vsock vmgenid)
for n in "${extra_names[@]}"; do
    rel="${modpath[$n]:-}"
    [[ -n "$rel" ]] || continue
    ko="$(decomp "$rel")"
    mv -f "$out/$ko" "$out/extra/$ko"
done

# --------------------------------------------------------------- busybox
bx="$CACHE/busybox-extract"
if [[ ! -x "$bx/bin/busybox" || "$(cat "$bx/.from" 2>/dev/null)" != "$bdeb" ]]; then
    rm -rf "$bx"; mkdir -p "$bx"
    dpkg-deb -x "$bdeb" "$bx"
    printf '%s\n' "$bdeb" >"$bx/.from"
fi
cp -f "$bx/bin/busybox" "$CACHE/busybox"
chmod 0755 "$CACHE/busybox"

# --------------------------------------------------------------- e2fsck
ex="$CACHE/e2fsck-extract"
if [[ ! -x "$ex/sbin/e2fsck.static" || "$(cat "$ex/.from" 2>/dev/null)" != "$edeb" ]]; then
    rm -rf "$ex"; mkdir -p "$ex"
    dpkg-deb -x "$edeb" "$ex"
    printf '%s\n' "$edeb" >"$ex/.from"
fi
[[ -x "$ex/sbin/e2fsck.static" ]] || die "no sbin/e2fsck.static in $edeb"
cp -f "$ex/sbin/e2fsck.static" "$CACHE/e2fsck"
chmod 0755 "$CACHE/e2fsck"

# ----------------------------------------------------------------- report
cat <<REPORT
FORKVM_CACHE=$CACHE
kernel package : $kpkg ($(basename "$kdeb"))
kernel version : $kver
vmlinuz        : $CACHE/vmlinuz
config         : $CACHE/config
kvm modules    : $CACHE/modules  (load order: $(tr '\n' ';' <"$out/load-order"))
extra modules  : $CACHE/modules/extra ($(find "$out/extra" -name '*.ko' -printf '%f ' ))
busybox        : $CACHE/busybox
e2fsck         : $CACHE/e2fsck
qemu           : $(command -v qemu-system-x86_64)
REPORT
