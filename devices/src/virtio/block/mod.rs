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
//!
//! # I/O engine
//!
//! Synchronous: the worker serves requests one at a time, one
//! preadv/pwritev each. Measured on the 2-core development machine (4 KiB
//! random reads, 32 requests in flight, `bench_4k_random_reads`, release
//! build): 99k IOPS from the host page cache, 7.4k IOPS with O_DIRECT (one
//! request at a time on the disk). fio on the same disk with O_DIRECT: psync
//! QD1 6.1k IOPS, 4 psync threads 21.5k, io_uring QD32 36.9k, libaio QD32
//! 45.0k. An asynchronous engine would be about 5x faster for direct random
//! reads with several requests in flight, and no faster for cached I/O; it
//! is not written yet. It would replace the direct preadv/pwritev in
//! [`request::Executor`], complete requests out of order, and `pause` would
//! have to wait for the requests in flight.

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
