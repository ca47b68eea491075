//! The wire protocol between forkvm's host side and `forkvm-agent` inside a guest (over vsock
//! port [`AGENT_PORT`], or a Unix socket in host tests).
//!
//! Every message is one frame:
//!
//! ```text
//! u32 LE  len      length of everything after this field, at most MAX_FRAME
//! u32 LE  hlen     length of the JSON header, at most MAX_HEADER
//! [hlen]  header   one `Msg` as JSON ({"t":"exec","argv":[..],..})
//! [..]    data     len - 4 - hlen raw bytes (stdout chunk, file chunk, seed), at most MAX_DATA
//! ```
//!
//! A session opens with `hello` both ways (the agent refuses other major versions). Requests
//! are answered in order on one connection; concurrency is one connection per session. Frames
//! over the bounds, bad JSON, unknown message types and data where none belongs are errors, never
//! panics or unbounded allocations.

pub mod client;
mod frame;
mod msg;

pub use client::{Client, ClientError, ExitInfo, Stream};
pub use frame::{read_frame, write_frame, Frame, FrameError, MAX_DATA, MAX_FRAME, MAX_HEADER};
pub use msg::{ExecRequest, HookDone, HookResult, Msg, ReadFileRequest, WriteFileRequest};

/// Protocol version spoken by this build; peers must agree on it.
pub const VERSION: u32 = 1;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;
/// Length of the clone seed carried by [`Msg::CloneHook`].
pub const SEED_LEN: usize = 32;
