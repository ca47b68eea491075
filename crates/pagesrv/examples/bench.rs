//! `cargo run --release -p pagesrv --example bench -- [SIZE_MIB] [RUNS] [WS_PCT]`

fn main() {
    let mut a = std::env::args().skip(1).map(|s| s.parse::<usize>().ok());
    let d = pagesrv::BenchOpts::default();
    let opts = pagesrv::BenchOpts {
        size_mib: a.next().flatten().unwrap_or(d.size_mib),
        runs: a.next().flatten().unwrap_or(d.runs),
        working_set_pct: a.next().flatten().unwrap_or(d.working_set_pct),
        ..d
    };
    print!("{}", pagesrv::bench_store(&opts));
}
