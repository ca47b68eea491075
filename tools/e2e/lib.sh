# shellcheck shell=bash
# Shared helpers for tools/e2e/*.sh. Source it; do not execute.

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$E2E_DIR/../.." && pwd)"
CACHE="${FORKVM_CACHE:-$REPO_ROOT/.cache/guest}"
export FORKVM_CACHE="$CACHE"

e2e_log() { printf '[%s] %s\n' "${E2E_TAG:-e2e}" "$*" >&2; }
e2e_die() { printf '[%s] ERROR: %s\n' "${E2E_TAG:-e2e}" "$*" >&2; exit 1; }

# Fail with an install hint if a command is missing.
e2e_require() { # cmd debian-package
    command -v "$1" >/dev/null 2>&1 \
        || e2e_die "'$1' not found. Install it with: apt-get install -y $2 (or run tools/e2e/fetch-guest.sh, which installs everything)"
}

# Fail with a hint if fetch-guest.sh has not been run.
e2e_require_cache() {
    local f
    for f in "$@"; do
        [[ -e "$CACHE/$f" ]] || e2e_die "$CACHE/$f missing; run tools/e2e/fetch-guest.sh first"
    done
}

# Populate <root> with a static busybox and applet symlinks in /bin.
e2e_install_busybox() { # root
    local root="$1" bb="$CACHE/busybox" a
    e2e_require_cache busybox
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" \
             "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run" "$root/root" "$root/etc"
    install -m 0755 "$bb" "$root/bin/busybox"
    # busybox --list prints applet names (one per line); link them all in /bin.
    while IFS= read -r a; do
        [[ "$a" == busybox ]] && continue
        ln -sf busybox "$root/bin/$a"
    done < <("$bb" --list)
    # Device nodes for the console, if we can create them (root). /init also
    # mounts devtmpfs, so this is only for the very first kernel messages.
    if [[ $(id -u) -eq 0 ]]; then
        mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
        mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true
    fi
}

# Pack <root> into a gzip'ed newc cpio at <out>.
e2e_pack_cpio() { # root out
    local root="$1" out="$2" tmp
    e2e_require cpio cpio
    e2e_require gzip gzip
    tmp="$out.tmp.$$"
    (cd "$root" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --owner=0:0 --quiet) \
        | gzip -n -6 >"$tmp"
    mv -f "$tmp" "$out"
}
