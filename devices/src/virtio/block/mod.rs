//! virtio-blk (virtio 1.2, 5.2): a disk backed by a regular file or a
//! block device (LV, DRBD device, loop device).
//!
//! - [`device`]: the [`Block`] device model (features, config space,
//!   lifecycle) and its worker thread, which serves the single request
//!   queue off the vCPU threads, synchronously, with an optional token-bucket
//!   rate limit.
//! - [`request`]: parsing untrusted descriptor chains and executing
//!   requests (preadv/pwritev straight to guest memory; bounce buffer for
//!   unaligned O_DIRECT I/O).
//! - [`disk`]: the backend (open, size, block sizes, discard, zeroing).
//! - [`lock`]: OFD locks, so two VMMs never open one disk read-write.
//! - [`persist`]: snapshot and restore for live migration.

pub mod device;
pub mod disk;
pub mod lock;
pub mod persist;
pub mod request;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use device::{Block, BlockCounters, CONFIG_SPACE_SIZE, SEG_MAX};
pub use persist::{BlockState, BLOCK_STATE_VERSION};

/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;

/// Errors of the virtio-blk device; each names the disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        source: io::Error,
    },
    #[error("disk {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("disk {}: {reason}", path.display())]
    Locked { path: PathBuf, reason: String },
    #[error("disk {}: cannot restore: {reason}", path.display())]
    Restore { path: PathBuf, reason: String },
}
