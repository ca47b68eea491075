//! The clone-hook gate: while a clone's hook runs, guest requests wait; afterwards everyone can
//! see whether the clone was reseeded.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use agent_proto::HookDone;

/// Where a VM stands with its clone hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookState {
    /// A freshly booted VM: nothing to refresh.
    NotAClone,
    /// A clone whose hook was not started (yet).
    NotRun,
    /// The hook is running: guest requests wait.
    Pending,
    /// The agent took the seed (and the clock, and ran the user hooks).
    Done(HookDone),
    /// No agent answers in this guest (no vsock driver or nothing on the port): the clone keeps
    /// its parent's CRNG state.
    NoAgent(String),
    /// An agent answered but the hook failed or timed out.
    Failed(String),
}

impl HookState {
    /// `reseeded` as the per-VM status shows it: true, false, "no agent", or null for a VM that
    /// is not a clone.
    pub fn reseeded(&self) -> serde_json::Value {
        match self {
            HookState::NotAClone => serde_json::Value::Null,
            HookState::Done(d) => d.reseeded.into(),
            HookState::NoAgent(_) => "no agent".into(),
            HookState::Pending => "pending".into(),
            HookState::NotRun | HookState::Failed(_) => false.into(),
        }
    }

    /// Details for the status: what the hook did or why it did not.
    pub fn detail(&self) -> serde_json::Value {
        match self {
            HookState::NotAClone => serde_json::json!({ "state": "not a clone" }),
            HookState::NotRun => serde_json::json!({ "state": "not run" }),
            HookState::Pending => serde_json::json!({ "state": "pending" }),
            HookState::Done(d) => serde_json::json!({
                "state": "done",
                "generation": d.generation,
                "clock_step_ms": d.clock_step_ns as f64 / 1e6,
                "clock_set": d.clock_set,
                "entropy_before": d.entropy_before,
                "entropy_after": d.entropy_after,
                "hooks": d.hooks.iter().map(|h| serde_json::json!({"name": h.name, "ok": h.ok, "detail": h.detail})).collect::<Vec<_>>(),
                "errors": d.errors,
            }),
            HookState::NoAgent(why) => serde_json::json!({ "state": "no agent", "detail": why }),
            HookState::Failed(why) => serde_json::json!({ "state": "failed", "detail": why }),
        }
    }
}

#[derive(Debug)]
pub struct AgentGate {
    state: Mutex<HookState>,
    changed: Condvar,
}

impl AgentGate {
    pub fn new(state: HookState) -> Self {
        AgentGate { state: Mutex::new(state), changed: Condvar::new() }
    }

    pub fn state(&self) -> HookState {
        self.state.lock().map(|s| s.clone()).unwrap_or(HookState::Failed("gate poisoned".into()))
    }

    pub fn set(&self, s: HookState) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
        self.changed.notify_all();
    }

    /// Moves NotRun to Pending; false if the hook already ran or runs (it runs once).
    pub fn begin(&self) -> bool {
        let Ok(mut g) = self.state.lock() else { return false };
        if *g != HookState::NotRun {
            return false;
        }
        *g = HookState::Pending;
        true
    }

    /// Waits while the hook is pending, at most `timeout`; returns the state then.
    pub fn wait(&self, timeout: Duration) -> HookState {
        let deadline = Instant::now() + timeout;
        let Ok(mut g) = self.state.lock() else { return HookState::Failed("gate poisoned".into()) };
        while *g == HookState::Pending {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.changed.wait_timeout(g, left) {
                Ok((ng, _)) => g = ng,
                Err(_) => return HookState::Failed("gate poisoned".into()),
            }
        }
        g.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_runs_once_and_waiters_see_its_outcome() {
        let g = std::sync::Arc::new(AgentGate::new(HookState::NotRun));
        assert!(g.begin());
        assert!(!g.begin(), "a second begin must not run the hook again");
        assert_eq!(g.wait(Duration::from_millis(10)), HookState::Pending);
        assert_eq!(g.state().reseeded(), "pending");
        let g2 = std::sync::Arc::clone(&g);
        let waiter = std::thread::spawn(move || g2.wait(Duration::from_secs(60)));
        g.set(HookState::NoAgent("none".into()));
        assert_eq!(waiter.join().ok(), Some(HookState::NoAgent("none".into())));
        assert_eq!(g.state().reseeded(), "no agent");
        let booted = AgentGate::new(HookState::NotAClone);
        assert!(!booted.begin());
        assert_eq!(booted.state().reseeded(), serde_json::Value::Null);
        assert_eq!(HookState::Failed("x".into()).reseeded(), false);
    }
}
