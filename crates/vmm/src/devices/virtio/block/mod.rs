//! virtio-blk over a copy-on-write disk (raw base image + overlay layers).

pub mod attach;
pub mod device;
pub mod disk;
pub mod layer;
pub mod persist;
pub mod request;

pub use device::Block;
pub use disk::{CowDisk, DiskConfig};
pub use persist::{BlockState, DiskState};
