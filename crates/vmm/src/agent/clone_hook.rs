//! Runs the clone hook of a restored, forked or woken VM: connect to its agent, hand it the new
//! generation, the clone's fresh seed and the host's wall clock, and record the outcome in the
//! VM's gate. Guest requests wait on the gate until then.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_proto::{ClientError, SEED_LEN};

use super::gate::{AgentGate, HookState};
use super::AgentAddr;

#[derive(Debug, Clone)]
pub struct CloneHookOptions {
    /// Bounds the connect and the agent's answer.
    pub timeout: Duration,
    /// Connection attempts: the guest may reset its vsock transport (as every clone's does)
    /// right as the first connection comes in.
    pub attempts: u32,
}

impl Default for CloneHookOptions {
    fn default() -> Self {
        CloneHookOptions { timeout: Duration::from_secs(30), attempts: 3 }
    }
}

fn host_time_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Runs the hook once (if the gate is `NotRun`) and records the outcome; returns it.
pub fn run_clone_hook(
    gate: &AgentGate,
    addr: &AgentAddr,
    generation: u64,
    seed: Option<[u8; SEED_LEN]>,
    opts: &CloneHookOptions,
) -> HookState {
    if !gate.begin() {
        return gate.state();
    }
    run_begun(gate, addr, generation, seed, opts)
}

/// The hook after [`AgentGate::begin`] moved the gate to `Pending`.
pub(crate) fn run_begun(
    gate: &AgentGate,
    addr: &AgentAddr,
    generation: u64,
    seed: Option<[u8; SEED_LEN]>,
    opts: &CloneHookOptions,
) -> HookState {
    let t0 = Instant::now();
    let state = hook(addr, generation, seed, opts);
    tracing::info!("clone hook (generation {generation}) in {:?}: {state:?}", t0.elapsed());
    gate.set(state.clone());
    state
}

fn hook(addr: &AgentAddr, generation: u64, seed: Option<[u8; SEED_LEN]>, opts: &CloneHookOptions) -> HookState {
    let Some(seed) = seed else { return HookState::Failed("no seed: cannot read the generation page".into()) };
    if !addr.socket().exists() {
        return HookState::NoAgent(format!("no vsock socket {}", addr.socket().display()));
    }
    let mut last = String::new();
    for _ in 0..opts.attempts.max(1) {
        let mut client = match addr.connect(opts.timeout) {
            Ok(c) => c,
            Err(e @ (ClientError::NoListener { .. } | ClientError::Connect { .. })) => {
                last = e.to_string();
                continue;
            }
            Err(ClientError::Closed) => {
                last = "the connection was reset during the hello".into();
                continue;
            }
            Err(e) => return HookState::Failed(e.to_string()),
        };
        return match client.clone_hook(generation, &seed, host_time_ns(), opts.timeout) {
            Ok(done) if done.reseeded => HookState::Done(done),
            Ok(done) => HookState::Failed(format!("the agent could not reseed: {}", done.errors.join("; "))),
            Err(ClientError::Closed) => {
                last = "the agent hung up before answering the hook".into();
                continue;
            }
            Err(e) => HookState::Failed(e.to_string()),
        };
    }
    HookState::NoAgent(last)
}
