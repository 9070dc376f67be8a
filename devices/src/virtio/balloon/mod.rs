//! virtio-balloon (virtio 1.2, 5.5): the host asks the guest to give memory
//! back (inflate) or lets it take memory again (deflate); the guest reports
//! memory statistics and, optionally, free pages the host may reclaim.
//!
//! - [`device`]: the [`Balloon`] device model (features, config space,
//!   lifecycle), its worker thread, and the [`BalloonHandle`] the VMM keeps
//!   to set the target and read the state from other threads.
//! - [`persist`]: snapshot and restore for live migration.
//!
//! # What the device does
//!
//! | queue | the driver gives | the device |
//! |---|---|---|
//! | inflate | le32 page frame numbers (4 KiB) | checks each is guest RAM, gives contiguous runs back to the host through [`BalloonBackend::discard`], marks them in the balloon's page map |
//! | deflate | le32 page frame numbers | clears them in the page map (the host has nothing to do: a discarded page reads as zero and is backed again on first touch) |
//! | stats | one buffer of 10-byte entries (le16 tag, le64 value) | records them with a timestamp and keeps the buffer; every `stats_interval_s` it returns the buffer, which asks the driver for fresh statistics (it re-queues the same buffer with new values) |
//! | reporting | buffers whose descriptors are free page ranges | discards each range and returns the buffer |
//!
//! Every page number and range comes from an untrusted guest: anything
//! outside guest RAM is counted (`invalid_pfns`) and ignored.
//!
//! # Queue numbering
//!
//! Queues are numbered by the negotiated features (Linux skips the queues of
//! features it did not negotiate): inflate 0, deflate 1, then stats if
//! STATS_VQ, free page hinting if FREE_PAGE_HINT (never offered here), and
//! reporting if PAGE_REPORTING. See [`queue_indices`]. The transport offers
//! every queue the device might need ([`VirtioDevice::queue_max_sizes`]) and
//! passes all of them in index order; the device picks its queues from the
//! acked features.
//!
//! # The page map and live migration
//!
//! The device keeps one bit per 4 KiB page of guest RAM for the pages in the
//! balloon. With MUST_TELL_HOST negotiated the guest does not touch a page
//! from the moment it gives it to the inflate queue until the device has
//! taken it back through the deflate queue, so a migration need not send
//! ballooned pages ([`BalloonHandle::ballooned_pages`],
//! [`BalloonHandle::must_tell_host`]); a deflated page leaves the map before
//! the guest writes it, and the write dirties it. A driver reset empties the
//! map: a new driver knows nothing of the old one's balloon.
//!
//! [`VirtioDevice::queue_max_sizes`]: crate::virtio::VirtioDevice::queue_max_sizes

pub mod device;
pub mod persist;

#[cfg(test)]
mod tests;

pub use device::{
    queue_indices, Balloon, BalloonBackend, BalloonCounters, BalloonHandle, BalloonReport,
    GuestStats, PageMap, QueueIndices, RegionBitmap,
};
pub use persist::BalloonState;

/// Every queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Balloon page frame numbers are in 4 KiB units, whatever the guest's page size.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Feature bits (virtio 1.2, 5.5.3).
pub const F_MUST_TELL_HOST: u32 = 0;
pub const F_STATS_VQ: u32 = 1;
pub const F_DEFLATE_ON_OOM: u32 = 2;
pub const F_FREE_PAGE_HINT: u32 = 3;
pub const F_PAGE_POISON: u32 = 4;
pub const F_PAGE_REPORTING: u32 = 5;

/// Guest statistics tags (virtio 1.2, 5.5.6.3; Linux's `VIRTIO_BALLOON_S_*`).
pub const STAT_SWAP_IN: u16 = 0;
pub const STAT_SWAP_OUT: u16 = 1;
pub const STAT_MAJOR_FAULTS: u16 = 2;
pub const STAT_MINOR_FAULTS: u16 = 3;
pub const STAT_FREE_MEMORY: u16 = 4;
pub const STAT_TOTAL_MEMORY: u16 = 5;
pub const STAT_AVAILABLE_MEMORY: u16 = 6;
pub const STAT_DISK_CACHES: u16 = 7;
pub const STAT_HUGETLB_ALLOCATIONS: u16 = 8;
pub const STAT_HUGETLB_FAILURES: u16 = 9;
pub const STAT_OOM_KILLS: u16 = 10;
pub const STAT_ALLOC_STALLS: u16 = 11;
pub const STAT_ASYNC_SCANS: u16 = 12;
pub const STAT_DIRECT_SCANS: u16 = 13;
pub const STAT_ASYNC_RECLAIMS: u16 = 14;
pub const STAT_DIRECT_RECLAIMS: u16 = 15;

/// `struct virtio_balloon_config`: num_pages, actual, free_page_hint_cmd_id,
/// poison_val (le32 each).
pub const CONFIG_SPACE_SIZE: usize = 16;
/// A stats entry: le16 tag, le64 value, packed.
pub const STATS_ENTRY_SIZE: usize = 10;

/// Errors of the balloon device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon target {target} bytes is more than the guest's {ram} bytes of memory")]
    TargetTooLarge { target: u64, ram: u64 },
}

impl BalloonError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            BalloonError::TargetTooLarge { .. } => config::ErrorClass::Caller,
        }
    }
}
