//! virtio-net on a tap (userspace, no vhost), one private network namespace per VM and clone.

pub mod attach;
pub mod device;
pub mod forward;
pub mod netns;
pub mod persist;
pub mod tap;

pub use device::{Net, NetStats};
pub use persist::NetState;
