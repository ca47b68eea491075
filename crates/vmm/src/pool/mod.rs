//! Warm pools: VMs created before any request, waiting for a clone ticket (see
//! [`crate::live_clone`]). [`WarmVm`] is one such VM; a pool member process creates one, listens
//! on its socket and serves the first parent that connects.

mod restore;
mod warm;

pub use restore::restore_into;
pub use warm::{CloneLink, Offer, WarmReport, WarmVm, TICKET_TIMEOUT};
