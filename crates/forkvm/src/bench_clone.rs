//! `forkvm bench clone`: snapshot, restore and fork-clone costs.

use crate::cli::BenchArgs;

pub fn bench_clone(_args: &BenchArgs) -> Result<i32, String> {
    Err("bench clone: not implemented yet".into())
}
