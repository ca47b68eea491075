//! `fork` through the warm pool: a VM with shared memory is live-cloned into pool members of its
//! size (see `vmm::live_clone` and [`crate::pool_cmd`]); without enough members, or for other
//! VMs, the caller falls back to fork().

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use forkvm_api::vm::{ForkChild, ForkResponse};
use vmm::live_clone::{LiveCloneOptions, LiveParent, Target};
use vmm::Backing;

use crate::server::{lock, ms, Host};

/// This VMM process's live-clone tracking (one VM per process), made at its first pool clone.
static LIVE: OnceLock<Mutex<Option<LiveParent>>> = OnceLock::new();

fn live() -> &'static Mutex<Option<LiveParent>> {
    LIVE.get_or_init(|| Mutex::new(None))
}

/// Before a fork(): drops live-clone tracking (its thread would not survive fork, and freezing
/// the memory ends it anyway). Fails while live clones still depend on this VM's pages.
pub(crate) fn release_for_fork() -> Result<(), String> {
    crate::clone_serve::refuse_fork()?;
    let mut l = lock(live());
    if let Some(p) = l.as_ref() {
        let st = p.stats();
        if st.active_generations > 0 {
            return Err(format!(
                "{} generation(s) of live clones still read this VM's memory: fork() once they are filled or gone",
                st.active_generations
            ));
        }
    }
    *l = None;
    Ok(())
}

/// Runs `f` with this process's live-clone tracking of `vm`, made (and armed) first if needed.
/// Holds its lock meanwhile: one clone instant at a time.
pub(crate) fn with_live_parent<T>(
    vm: &vmm::MicroVm,
    f: impl FnOnce(&LiveParent) -> Result<T, String>,
) -> Result<T, String> {
    let mut l = lock(live());
    if l.is_none() {
        let p = LiveParent::attach(vm).map_err(|e| e.to_string())?;
        // Protect now, before any pause; later clones re-protect only what changed.
        if let Err(e) = p.arm() {
            tracing::warn!("no pre-armed write protection ({e}); each clone protects all memory");
        }
        *l = Some(p);
    }
    match l.as_ref() {
        Some(p) => f(p),
        None => Err("no live-clone tracking".into()),
    }
}

impl Host {
    /// Live-clones into pool members when this VM can be and the pool has enough members of its
    /// size; None: use fork().
    pub(crate) fn fork_from_pool(&self, names: &[String]) -> Option<Result<ForkResponse, String>> {
        let mem = self.vm.memory();
        if mem.backing() != Backing::SharedFile || mem.is_frozen() || self.vm.block().is_some() {
            return None;
        }
        let t0 = Instant::now();
        let conns = crate::pool_cmd::connect_members(names.len(), mem.size(), self.vm.vcpu_count())?;
        let targets = conns.into_iter().zip(names).map(|(conn, n)| Target { conn, name: Some(n.clone()) }).collect();
        let opts = LiveCloneOptions { parent: Some(self.name.clone()), ..Default::default() };
        let cloned = match with_live_parent(&self.vm, |p| Ok(p.clone_into(&self.vm, targets, &opts))) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("no live clones for this VM ({e}); using fork()");
                return None;
            }
        };
        Some(match cloned {
            Ok((kids, rep)) => Ok(ForkResponse {
                children: kids
                    .into_iter()
                    .zip(names)
                    .map(|(k, n)| ForkChild { name: n.clone(), pid: k.pid.unwrap_or(0) })
                    .collect(),
                pause_ms: ms(rep.pause),
                save_ms: ms(rep.save),
                fork_ms: ms(rep.protect),
                fork_total_ms: ms(rep.paused),
                ready_ms: ms(t0.elapsed()),
                via: "pool".into(),
            }),
            Err(e) => Err(format!("pool clone: {e}")),
        })
    }
}
