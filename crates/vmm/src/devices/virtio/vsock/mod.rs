//! virtio-vsock in userspace, with Firecracker's host-side Unix socket convention.

pub mod conn;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod persist;

pub use device::{Vsock, DEFAULT_CID};
pub use persist::VsockState;
