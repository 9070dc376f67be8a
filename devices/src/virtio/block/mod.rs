//! virtio-blk (virtio 1.2, 5.2): a disk backed by a regular file or a
//! block device (LV, DRBD device, loop device).
//!
//! - [`device`]: the [`Block`] device model (features, config space,
//!   lifecycle) and its worker thread, which serves the single request
//!   queue off the vCPU threads, with an optional token-bucket rate limit.
//! - [`request`]: parsing untrusted descriptor chains and executing
//!   requests synchronously (preadv/pwritev straight to guest memory;
//!   bounce buffer for unaligned O_DIRECT I/O).
//! - [`uring`]: the io_uring engine: many requests in flight, completed out
//!   of order.
//! - [`disk`]: the backend (open, size, block sizes, discard, zeroing).
//! - [`lock`]: OFD locks, so two VMMs never open one disk read-write.
//! - [`persist`]: snapshot and restore for live migration.
//!
//! # I/O engines
//!
//! [`IoEngine::Auto`], the default, picks by how the disk is opened:
//!
//! - `direct=on` (O_DIRECT): io_uring. Up to [`uring::MAX_IN_FLIGHT`] (64)
//!   reads and writes of the queue are in flight at once, straight to guest
//!   memory (or each through its own aligned bounce buffer when the guest's
//!   buffers are not aligned), and complete out of order, with one
//!   interrupt per batch of completions; reads mark the dirty bitmap as the
//!   synchronous path does. FLUSH, DISCARD and WRITE_ZEROES first wait for
//!   every request in flight and then run synchronously (so a FLUSH covers
//!   every write before it), as do O_DIRECT writes that need a
//!   read-modify-write of unaligned edges. `pause()`, `reset()` and
//!   snapshots complete the requests in flight before they return (see
//!   [`persist`]). At device start the kernel must let us set up a ring
//!   with READV and WRITEV; if it does not (`kernel.io_uring_disabled`,
//!   seccomp, kernels before 5.6) the device logs it and runs the
//!   synchronous engine.
//! - `direct=off` (host page cache): synchronous, one preadv/pwritev at a
//!   time on the worker thread. io_uring is no faster there: cached reads
//!   complete inline either way, and io_uring hands buffered writes to its
//!   worker threads (`iou-wrk`), which costs about a quarter.
//!
//! [`Block::set_io_engine`] forces one engine (the tests run every request
//! path with both).
//!
//! Measured on the 2-core nested development machine, release build.
//! In-process, `bench_4k_random_io` (mock driver, 4 KiB random I/O on a
//! 256 MiB file on ext4, 32 requests in flight), IOPS:
//!
//! | | sync | io_uring |
//! |---|---|---|
//! | cached read | 68k-83k | 67k-81k |
//! | cached write | 26k-31k | 16k-24k |
//! | O_DIRECT read | 7.3k-8.2k | 29k-33k |
//! | O_DIRECT write | 6.1k | 27k |
//!
//! fio on the same disk with O_DIRECT: psync QD1 6.1k IOPS, 4 psync threads
//! 21.5k, io_uring QD32 36.9k, libaio QD32 45.0k.
//!
//! With the test guest (`cargo bench -p vmm-tests --bench devices`, 4 KiB
//! random reads at depth 16, QEMU 7.2 on the same file; two runs, on a
//! host with other load, so figures move by a third from run to run):
//! O_DIRECT 25.6k and 22.3k IOPS with io_uring, against 17.9k and 19.1k
//! for QEMU `cache=none,aio=native` (the synchronous engine had 4.4k
//! against QEMU's 11.6k); cached 67k and 48k, against QEMU's 19k and 15k.

pub mod device;
pub mod disk;
pub mod lock;
pub mod persist;
pub mod request;
pub mod uring;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use device::{Block, BlockCounters, IoEngine, CONFIG_SPACE_SIZE, SEG_MAX};
pub use persist::BlockState;

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
}

impl BlockError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            BlockError::Io { source, .. } => config::ErrorClass::of_io(source),
            BlockError::Invalid { .. } => config::ErrorClass::Caller,
            BlockError::Locked { .. } => config::ErrorClass::Conflict,
        }
    }
}
