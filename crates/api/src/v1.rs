//! The daemon's HTTP API, version 1 (`forkvm serve`, paths under `/v1`).
//!
//! Requests refuse unknown fields. Times are seconds since the Unix epoch (floating point);
//! durations in responses are milliseconds.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Its VMM is being started.
    Creating,
    Running,
    /// vCPUs parked; memory resident.
    Paused,
    /// Memory in the chunk store, no VMM process.
    Hibernated,
    /// Its VMM died unexpectedly (an event says when).
    Crashed,
}

impl SandboxState {
    pub const ALL: [SandboxState; 5] = [Self::Creating, Self::Running, Self::Paused, Self::Hibernated, Self::Crashed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Hibernated => "hibernated",
            Self::Crashed => "crashed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Who may see and fork a sandbox or template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Privacy {
    /// Only its workspace sees it (others get 404).
    #[default]
    Private,
    /// Readable by id from any workspace, never listed there, never live-forked into it.
    Unlisted,
    /// Any token may read and fork it.
    Public,
}

impl Privacy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Unlisted => "unlisted",
            Self::Public => "public",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Private, Self::Unlisted, Self::Public].into_iter().find(|v| v.as_str() == s)
    }
}

/// How the sandbox that answered came up for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CameUp {
    /// It was already running.
    Running,
    /// It was paused and was resumed.
    Resumed,
    /// It was hibernated and was woken (a new VMM restoring it lazily).
    Woken,
    /// It is a new fork child.
    Forked,
    /// It was just created.
    Created,
}

impl CameUp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Resumed => "resumed",
            Self::Woken => "woken",
            Self::Forked => "forked",
            Self::Created => "created",
        }
    }
}

/// Idle policy: pause after `pause_after` seconds without activity, hibernate `hibernate_after`
/// seconds after the pause. 0 means never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default = "default_pause_after")]
    pub pause_after: u64,
    #[serde(default = "default_hibernate_after")]
    pub hibernate_after: u64,
}

pub const DEFAULT_PAUSE_AFTER: u64 = 300;
pub const DEFAULT_HIBERNATE_AFTER: u64 = 3600;

fn default_pause_after() -> u64 {
    DEFAULT_PAUSE_AFTER
}

fn default_hibernate_after() -> u64 {
    DEFAULT_HIBERNATE_AFTER
}

impl Default for Policy {
    fn default() -> Self {
        Policy { pause_after: DEFAULT_PAUSE_AFTER, hibernate_after: DEFAULT_HIBERNATE_AFTER }
    }
}

/// `POST /v1/sandboxes`: boot the test guest, or restore a template copy-on-write (fast).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// A label (not unique); default: the id.
    #[serde(default)]
    pub name: Option<String>,
    /// Template id to restore from; without it (and without `image`) the embedded test guest boots.
    #[serde(default)]
    pub template: Option<String>,
    /// A kernel image the host registered (`forkvm serve --image NAME=KERNEL[,INITRD]`) to boot
    /// instead of the test guest. Not with `template`. An image the host gave a disk
    /// (`--image-disk`) boots with its own copy-on-write view of it (`/dev/vda` in the guest).
    #[serde(default)]
    pub image: Option<String>,
    /// Guest memory in MiB for a boot (a template fixes its own). Default 64.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// vCPUs for a boot. Default 1.
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub privacy: Option<Privacy>,
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Boot with a virtio-net device in a private network namespace (for previews). A template
    /// carries its source's network device; leave this out with `template`.
    #[serde(default)]
    pub net: Option<bool>,
}

/// A sandbox: one VMM process (or its hibernation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub workspace: String,
    pub privacy: Privacy,
    pub template: Option<String>,
    pub parent: Option<String>,
    pub state: SandboxState,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub created_at: f64,
    pub last_active_at: f64,
    pub policy: Policy,
    /// The VMM process while it runs.
    pub pid: Option<u32>,
}

/// `GET /v1/sandboxes`: one page, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The answer to a request that needed the sandbox up (exec, resume, open, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxUp {
    pub sandbox: Sandbox,
    pub came_up: CameUp,
    /// Time spent resuming or waking it (0 when it was running).
    pub wake_ms: f64,
}

/// `POST /v1/sandboxes/{id}/exec`: a line to the guest console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub line: String,
    /// Collect lines until one contains this (default: the next line).
    #[serde(default)]
    pub wait_for: Option<String>,
    /// Default 10000, at most 600000.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub lines: Vec<String>,
    pub came_up: CameUp,
    pub wake_ms: f64,
}

/// `POST /v1/sandboxes/{id}/fork`: live fork-clone into `count` running children in the
/// caller's workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    #[serde(default = "one")]
    pub count: usize,
    /// The children's privacy (default: the parent's when in its workspace, else private).
    #[serde(default)]
    pub privacy: Option<Privacy>,
    #[serde(default)]
    pub policy: Option<Policy>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ForkResponse {
    /// The children (`came_up` = forked), named `<parent name>-fork<n>` with `n` counting on
    /// across the parent's forks (its second fork of 2 gives `-fork3` and `-fork4`).
    pub sandboxes: Vec<Sandbox>,
    /// How the parent came up for the fork.
    pub parent_came_up: CameUp,
    pub wake_ms: f64,
    pub fork_ms: f64,
}

/// `GET /v1/sandboxes/{id}/tree`: the sandbox and its descendants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TreeNode {
    pub id: String,
    pub name: String,
    pub state: SandboxState,
    #[schema(no_recursion)]
    pub children: Vec<TreeNode>,
}

/// `POST /v1/templates`: snapshot a sandbox into an immutable template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub sandbox: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub privacy: Option<Privacy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub workspace: String,
    pub privacy: Privacy,
    /// The sandbox it was taken from.
    pub source: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub created_at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<Template>,
}

/// A persisted state transition (also streamed at `GET /v1/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: i64,
    pub ts: f64,
    pub workspace: String,
    pub sandbox: String,
    /// created, resumed, paused, hibernated, woken, forked, deleted, crashed, readopted, ...
    pub kind: String,
    pub from_state: Option<SandboxState>,
    pub to_state: Option<SandboxState>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub events: Vec<Event>,
}

/// `POST /v1/repos`: preload a sandbox for every pull request of `repo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRepo {
    /// `owner/name` as GitHub spells it.
    pub repo: String,
    pub template: String,
    /// A console line run in each new PR sandbox before it is paused.
    #[serde(default)]
    pub setup: Option<String>,
    /// The webhook secret (X-Hub-Signature-256 HMAC key).
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Repo {
    pub repo: String,
    pub workspace: String,
    pub template: String,
    pub setup: Option<String>,
}

/// A pull request's preloaded sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PullSandbox {
    pub repo: String,
    pub number: u64,
    pub head_sha: String,
    pub sandbox: Sandbox,
    pub came_up: CameUp,
    pub wake_ms: f64,
}

/// What the webhook did with a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HookOutcome {
    /// created, refreshed, deleted, ignored, replayed
    pub outcome: String,
    pub sandbox: Option<String>,
}

/// `forkvm token create`: shown once, stored hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub workspace: String,
    pub token: String,
}

/// Every error: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// bad_request, unauthorized, forbidden, not_found, conflict, too_large, unavailable, internal
    pub code: String,
    pub message: String,
}

/// `GET /v1/memory`: how much host memory the caller's live sandboxes really use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemoryReport {
    pub host_total_bytes: u64,
    /// MemTotal - MemAvailable.
    pub host_used_bytes: u64,
    /// Sum over the caller's running and paused sandboxes of memory only their VMM maps.
    pub private_bytes: u64,
    /// Sum of memory their VMMs share with other processes (copy-on-write between clones).
    pub shared_bytes: u64,
    pub sandboxes: Vec<SandboxMemory>,
    /// The host's chunk store (hibernated memory, deduplicated across all sandboxes).
    pub store: Option<StoreUsage>,
}

/// One VMM's resident memory (from /proc/PID/smaps_rollup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxMemory {
    pub id: String,
    pub rss_bytes: u64,
    /// Private_Clean + Private_Dirty.
    pub private_bytes: u64,
    /// Shared_Clean + Shared_Dirty.
    pub shared_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoreUsage {
    /// Bytes allocated on disk by the store's files.
    pub disk_bytes: u64,
    /// Memory images (hibernations and templates) it holds.
    pub images: u64,
}

/// Response headers naming how the sandbox came up and how long that took.
pub const HEADER_CAME_UP: &str = "x-forkvm-came-up";
/// Header (or cookie / `?forkvm_preview_token=` query parameter) carrying a sandbox's preview token.
pub const PREVIEW_TOKEN: &str = "forkvm_preview_token";
pub const HEADER_WAKE_MS: &str = "x-forkvm-wake-ms";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields_and_fill_defaults() {
        let c: CreateSandbox = serde_json::from_str(r#"{"policy":{"pause_after":1}}"#).unwrap();
        assert_eq!(c.policy, Some(Policy { pause_after: 1, hibernate_after: DEFAULT_HIBERNATE_AFTER }));
        for junk in [r#"{"nme":"x"}"#, r#"{"memory_mib":"big"}"#, r#"{"policy":{"x":1}}"#, "7"] {
            assert!(serde_json::from_str::<CreateSandbox>(junk).is_err(), "{junk}");
        }
        let f: ForkRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(f.count, 1);
        assert!(serde_json::from_str::<ExecRequest>(r#"{"line":"x","extra":1}"#).is_err());
        assert_eq!(SandboxState::parse("paused"), Some(SandboxState::Paused));
        assert_eq!(Privacy::parse("public"), Some(Privacy::Public));
    }
}

/// `GET /v1/preview`: whether the daemon serves previews (`forkvm serve --preview-listen`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PreviewInfo {
    /// The preview listener's address, if any.
    pub listen: Option<String>,
    /// Previews are at `http://<sandbox id>-<port>.<domain>:<listen port>/`, and at
    /// `http://<domain>:<listen port>/preview/<sandbox id>/<port>/` (path form).
    pub domain: String,
}

/// `POST /v1/sandboxes/{id}/ports/{port}/preview`: a link to a sandbox's port through the
/// preview proxy. For a private sandbox it carries a preview token (valid for that sandbox only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PreviewLink {
    /// Open this in a browser (the token, if any, becomes a cookie for that host).
    pub url: String,
    /// The same preview in path form, `http://<domain>:<port>/preview/<id>/<port>/`, for hosts
    /// without wildcard DNS (all sandboxes then share one origin; the token cookie is scoped to
    /// `/preview/<id>/`).
    #[serde(default)]
    pub path_url: String,
    /// The preview token (private sandboxes), also accepted as the `forkvm_preview_token` header.
    pub token: Option<String>,
}

/// The kernel images a sandbox may boot (`CreateSandbox::image`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<String>,
}
