//! Every size and duration a VMM accepts from a client, bounded.

use std::time::Duration;

/// Longest request line (JSON and newline).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Longest answer line a client reads.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// A client must deliver its whole request line within this time after connecting.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections a VMM serves at once; more get a "busy" error at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest console line an `exec` may send.
pub const MAX_EXEC_LINE: usize = 4096;
/// Longest `exec` wait.
pub const MAX_EXEC_TIMEOUT_MS: u64 = 600_000;
/// Default `exec` wait.
pub const DEFAULT_EXEC_TIMEOUT_MS: u64 = 10_000;
/// Most console output an `exec` answer carries (bytes of all lines).
pub const MAX_EXEC_OUTPUT: usize = 1 << 20;
/// Most children per `fork` request.
pub const MAX_FORK_COUNT: usize = 64;
/// Longest path in a request.
pub const MAX_PATH_BYTES: usize = 4096;
/// Most stdin an `agent_exec` request carries (it must fit in one request line).
pub const MAX_AGENT_STDIN: usize = 32 << 10;
/// Most arguments (and environment variables) of an `agent_exec`.
pub const MAX_AGENT_ARGS: usize = 256;
/// Most stdout + stderr an `agent_exec` answer carries; the agent drops the rest.
pub const MAX_AGENT_OUTPUT: u64 = 1 << 20;
