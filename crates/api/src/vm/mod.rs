//! The per-VM control socket: every named VMM process serves one Unix stream socket,
//! `<run dir>/<name>/api.sock`. A client writes one JSON [`Request`] and a newline; the VMM
//! answers one JSON [`Reply`] line and closes the connection. See docs/api.md.
//!
//! Each operation is its own struct (e.g. [`Exec`]) implementing [`Op`], which names its own
//! response struct (e.g. [`ExecResponse`]): `Client::for_name("a")?.call(Exec::new("ping"))?`
//! returns an `ExecResponse`. Servers parse with [`parse_request`], which also enforces the
//! [`limits`].

mod client;
pub mod limits;
mod paths;
mod request;
mod response;

pub use client::{Client, ClientError};
pub use paths::{check_name, run_dir, vm_dir, VmPaths};
pub use request::{
    parse_request, AgentExec, CloneServe, Exec, Fork, Hibernate, Op, Pause, Request, RequestError, Resume, Snapshot,
    Status, Stop,
};
pub use response::{
    AgentExecResponse, CloneServeResponse, ExecResponse, ForkChild, ForkResponse, HibernateResponse, PageServerStats,
    PauseResponse, Reply, ResumeResponse, RunState, SnapshotKind, SnapshotResponse, StatusResponse, StopResponse,
};
