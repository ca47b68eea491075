#!/usr/bin/env bash
# Regenerates the committed fuzz seed corpora (fuzz/seeds/<target>/) from real files: a chunk
# store written by chunkstore, pagesrv's working-set and handshake encoders, and snapshot states
# of the test guest (needs /dev/kvm). Commit the result when a format changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
rm -rf seeds.new
cargo +nightly fuzz build gen_seeds
./target/x86_64-unknown-linux-gnu/release/gen_seeds seeds.new
for d in seeds.new/*/; do t=$(basename "$d"); rm -rf "seeds/$t"; mkdir -p seeds; mv "$d" "seeds/$t"; done
rm -rf seeds.new
du -sh seeds
