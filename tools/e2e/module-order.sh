#!/usr/bin/env bash
# Print kernel modules in an order insmod accepts: every module after the modules its
# .modinfo "depends=" names (Debian ships no modules.dep in the package; depmod runs at install).
# Dependencies not asked for are added; a dependency missing from DIR is an error.
#
# Usage: module-order.sh DIR NAME...      (NAME without .ko; prints NAME.ko lines)
#        module-order.sh --check DIR FILE (FILE: a load order, one NAME.ko per line; fails on a
#                                          module listed before one of its dependencies)
#        module-order.sh --self-test      (synthetic modules; run by tools/e2e/run.sh)
set -euo pipefail

mo_die() { printf '[module-order] ERROR: %s\n' "$*" >&2; exit 1; }

mo_depends() { # FILE.ko -> dependency names, one per line, '-' spelled '_'
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' '\n' | sed '/^$/d; s/-/_/g'
}

mo_order() { # DIR NAME...
    local dir="$1"; shift
    declare -A state=()   # name -> visiting | done
    local -a order=()
    visit() {
        local n="${1//-/_}" d
        [[ "${state[$n]:-}" == done ]] && return 0
        [[ "${state[$n]:-}" == visiting ]] && mo_die "dependency cycle through $n"
        [[ -f "$dir/$n.ko" ]] || mo_die "module $n.ko not in $dir${2:+ (needed by $2)}"
        state[$n]=visiting
        for d in $(mo_depends "$dir/$n.ko"); do visit "$d" "$n"; done
        state[$n]=done
        order+=("$n.ko")
    }
    local m
    for m in "$@"; do visit "$m"; done
    printf '%s\n' "${order[@]}"
}

mo_check() { # DIR FILE
    local dir="$1" file="$2" ko d
    declare -A loaded=()
    while read -r ko _; do
        [[ -n "$ko" ]] || continue
        for d in $(mo_depends "$dir/$ko"); do
            [[ -n "${loaded[$d]:-}" ]] || mo_die "$file loads $ko before its dependency $d.ko"
        done
        loaded[${ko%.ko}]=1
    done <"$file"
}

mo_self_test() {
    local t; t="$(mktemp -d "${TMPDIR:-/tmp}/forkvm-modorder.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$t'" RETURN
    # The shape of Debian 6.1.0-57: virtio.ko depends on virtio_ring (it did not in -48).
    printf 'license=GPL\0depends=virtio_ring\0' >"$t/virtio.ko"
    printf 'depends=\0' >"$t/virtio_ring.ko"
    printf 'depends=virtio,virtio_ring\0' >"$t/virtio_mmio.ko"
    printf 'depends=vsock\0' >"$t/vmw_vsock_virtio_transport_common.ko"
    printf 'depends=\0' >"$t/vsock.ko"
    printf 'depends=virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock\0' >"$t/vmw_vsock_virtio_transport.ko"
    printf 'virtio.ko\nvirtio_ring.ko\n' >"$t/bad"
    if (mo_check "$t" "$t/bad") 2>/dev/null; then mo_die "self-test: --check accepted virtio before virtio_ring"; fi
    mo_order "$t" virtio virtio_mmio vmw_vsock_virtio_transport >"$t/order"
    mo_check "$t" "$t/order" || mo_die "self-test: computed order fails its own check: $(tr '\n' ' ' <"$t/order")"
    [[ "$(tr '\n' ' ' <"$t/order")" == "virtio_ring.ko virtio.ko virtio_mmio.ko vsock.ko vmw_vsock_virtio_transport_common.ko vmw_vsock_virtio_transport.ko " ]] \
        || mo_die "self-test: unexpected order: $(tr '\n' ' ' <"$t/order")"
    printf 'depends=nosuch\0' >"$t/orphan.ko"
    if (mo_order "$t" orphan) 2>/dev/null; then mo_die "self-test: a missing dependency was not refused"; fi
    echo "module-order: self-test ok"
}

case "${1:-}" in
    --check) [[ $# -eq 3 ]] || mo_die "usage: $0 --check DIR FILE"; mo_check "$2" "$3" ;;
    --self-test) mo_self_test ;;
    ""|-*) mo_die "usage: $0 DIR NAME... | --check DIR FILE | --self-test" ;;
    *) mo_order "$@" ;;
esac
