//! `forkvm`: run, pause, snapshot and fork microVMs. See the README for the two commands that
//! matter most (`forkvm demo` and the test command).

mod agent_exec;
mod bench;
mod bench_agent;
mod bench_api;
mod bench_clone;
mod bench_disk;
mod bench_pool;
mod bench_preview;
mod bench_restore;
mod bench_store;
mod bench_xhost;
mod claim;
mod cli;
mod clone_serve;
mod conn;
mod daemon_client;
mod demo;
mod exit_logs;
mod fork_op;
mod hibernate_cmd;
mod hostmem;
mod net_cmd;
mod pagesrv_cmd;
mod pool_cmd;
mod pool_fork;
mod port_forward;
mod private_fs;
mod run;
mod sandbox_cmd;
mod scenario;
mod serve_cmd;
mod server;
mod signals;
mod size;
mod stats;
mod store_cmd;
mod store_import;
mod vmctl;

use clap::Parser;

fn main() {
    // Warnings, and the daemon's shutdown lines (`forkvm serve`).
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORKVM_LOG")
        .unwrap_or_else(|_| format!("warn,{}=info", daemon::LOG).into());
    // Colour only on a terminal; a background VMM (`--background`) writes its log to a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none()
        && !std::env::args_os().any(|a| a == "--background");
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::PortForward(a) => port_forward::port_forward(&a),
        cli::Command::Restore(args) => run::restore(args),
        cli::Command::Ls => vmctl::ls(),
        cli::Command::Status(a) => vmctl::status(&a.name),
        cli::Command::Exec(args) => vmctl::exec(&args),
        cli::Command::Pause(a) => vmctl::pause(&a.name),
        cli::Command::Resume(a) => vmctl::resume(&a.name),
        cli::Command::Snapshot(args) => vmctl::snapshot(&args),
        cli::Command::Fork(args) => vmctl::fork(&args),
        cli::Command::CloneServe(args) => clone_serve::clone_serve(&args),
        cli::Command::Stop(a) => vmctl::stop(&a.name),
        cli::Command::Demo(args) => demo::demo(args),
        cli::Command::Bench(args) => bench::bench(args),
        cli::Command::Scenario(args) => scenario::scenario(args),
        cli::Command::Hibernate(args) => hibernate_cmd::hibernate(args),
        cli::Command::Wake(args) => hibernate_cmd::wake(args),
        cli::Command::Serve(args) => serve_cmd::serve(args),
        cli::Command::Token(args) => serve_cmd::token(args),
        cli::Command::Sandbox(cmd) => sandbox_cmd::sandbox(cmd),
        cli::Command::Template(cmd) => sandbox_cmd::template(cmd),
        cli::Command::Repo(cmd) => sandbox_cmd::repo(cmd),
        cli::Command::Store(args) => store_cmd::store(args),
        cli::Command::Discard(args) => store_cmd::discard(args),
        cli::Command::Pagesrv(args) => pagesrv_cmd::pagesrv(args),
        cli::Command::Pool(cmd) => pool_cmd::pool(cmd),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("forkvm: error: {e}");
            std::process::exit(1);
        }
    }
}
