//! # pagesrv
//!
//! A userfaultfd page server for lazily restored VM memory.
//!
//! A [`PageServer`] owns a userfaultfd whose registered regions are backed
//! by a [`PageSource`] (a [`chunkstore`] image, a raw memory file, another
//! VM's frozen memory, or zeroes). A fault thread serves each missing-page
//! fault with the aligned block around it (configurable batch) in one
//! `UFFDIO_COPY`, or `UFFDIO_ZEROPAGE` for zero blocks; handles
//! `UFFD_EVENT_REMOVE`; can record the working set and, on a later
//! restore, prefetch it in a second thread (REAP). See [`server`] for the
//! failure policy (poisoned pages raise SIGBUS instead of hanging) and
//! [`fc`] for the Firecracker-compatible socket handshake.

mod anon;
pub mod bench;
pub mod bench_fc;
mod bitmap;
mod error;
mod fault;
pub mod fc;
pub mod fc_client;
pub mod fc_wire;
pub mod listener;
pub mod live_source;
mod monitor;
pub mod net_auth;
pub mod net_client;
pub mod net_server;
pub mod net_wire;
mod prefetch;
pub mod server;
mod session;
pub mod source;
pub mod stats;
pub mod uffd;
pub mod uffd_wp;
pub mod wset;

pub use bench::{bench_store, BenchOpts};
pub use bench_fc::{bench_fc, FcBenchOpts};
pub use error::{Error, Result};
pub use listener::{Listener, ListenerConfig};
pub use live_source::{Generation, LiveMemory, LiveStats};
pub use net_client::{NetClientConfig, NetSource};
pub use net_server::{NetEvent, NetServer, NetServerConfig};
pub use server::{Ended, FailureHook, Monitor, PageServer, Region, RemovePolicy, ServerConfig};
pub use source::{ChunkSource, FileSource, MemSource, PageSource, ZeroSource};
pub use stats::{Histogram, Stats, StatsSnapshot};
pub use uffd::Uffd;
pub use wset::WorkingSet;

#[cfg(test)]
mod fc_tests;
#[cfg(test)]
mod live_tests;
#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod tests;
