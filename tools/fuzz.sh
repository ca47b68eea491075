#!/usr/bin/env bash
# Runs forkvm's cargo-fuzz targets (fuzz/) for a bounded time each, one at a time:
#   tools/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]     (default 20 s, every target)
# Corpora: the committed seeds (fuzz/seeds/<target>) plus a local, git-ignored working corpus
# (fuzz/corpus/<target>). A crash leaves its input in fuzz/artifacts/<target>/ and fails the run;
# turn it into a regression unit test in the owning crate, then fix it.
# Needs the nightly toolchain (rustup toolchain install nightly) and cargo-fuzz, which this script
# installs when it is missing (cargo install cargo-fuzz --locked; cached in ~/.cargo/bin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="${1:-20}"
shift || true

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "tools/fuzz.sh: the nightly toolchain is missing: install it with 'rustup toolchain install nightly'" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "tools/fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked || {
        echo "tools/fuzz.sh: could not install cargo-fuzz; run 'cargo install cargo-fuzz --locked' by hand" >&2
        exit 1
    }
fi

cd fuzz
if [[ $# -gt 0 ]]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list | grep -v "^gen_seeds$"); fi
mkdir -p logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    log="logs/$t.log"
    dict=(); [[ -f "dicts/$t.dict" ]] && dict=(-dict="dicts/$t.dict")
    if cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -print_final_stats=1 "${dict[@]}" \
        >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
        echo "fuzz $t: ${secs}s, $runs runs, corpus $(ls "corpus/$t" | wc -l) inputs, no crash"
    else
        echo "fuzz $t: FAILED (log fuzz/$log):" >&2
        grep -v -E '^#[0-9]+' "$log" | tail -40 >&2
        failed+=("$t")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: ${#failed[@]} target(s) crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${secs}s each without a crash"
