#!/usr/bin/env bash
# Browser tests of the web console: builds forkvm, installs playwright-core (npm, pinned in
# package-lock.json) and Debian's chromium if missing, runs console.test.mjs with node's test
# runner against a real daemon. Screenshots: .cache/console-shots/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
if [[ ! -x /usr/bin/chromium ]]; then
    if [[ $(id -u) -eq 0 ]]; then
        echo "console: installing Debian's chromium"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "console: /usr/bin/chromium is missing: sudo apt-get install chromium" >&2
        exit 1
    fi
fi
command -v node >/dev/null || { echo "console: node is missing: apt-get install nodejs npm" >&2; exit 1; }
command -v python3 >/dev/null || { echo "console: python3 is missing: apt-get install python3" >&2; exit 1; }
if [[ ! -d "$here/node_modules/playwright-core" ]]; then
    (cd "$here" && npm ci --no-audit --no-fund --silent)
fi
cargo build -q -p forkvm
export FORKVM_BIN="$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")/debug/forkvm"
export SHOTS="$root/.cache/console-shots"
cd "$here"
exec node --test --test-concurrency=1 console.test.mjs
