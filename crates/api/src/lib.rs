//! forkvm's typed API, shared by every server and client: no JSON is picked apart by field name
//! anywhere; each side (de)serializes these structs.
//!
//! - [`vm`]: the per-VM control socket every named VMM process serves
//!   (`<run dir>/<name>/api.sock`), with its client and the run-dir layout.
//! - [`v1`]: the daemon's HTTP API (`forkvm serve`, `/v1/...`).

pub mod v1;
pub mod vm;
