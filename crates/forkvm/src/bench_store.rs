//! `forkvm bench store` (owned by the chunk store / page server work).

use crate::cli::BenchArgs;

pub fn bench_store(_args: &BenchArgs) -> Result<i32, String> {
    Err("bench store: not implemented yet".into())
}
