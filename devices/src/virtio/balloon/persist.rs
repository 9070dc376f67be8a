//! virtio-balloon state for snapshots and live migration.
//!
//! # Order of operations
//!
//! Source (the VM is paused; the device manager pauses every device first):
//! 1. `pause()` — the worker stops after the buffer it is serving; every
//!    inflate, deflate and reporting buffer taken from a queue has been
//!    returned. The stats buffer may be held (that is its protocol): its
//!    head index goes into the state.
//! 2. `snapshot()` — a JSON [`BalloonState`]: features, target and actual,
//!    the ballooned pages as runs of page numbers, the guest's last
//!    statistics, the held stats buffer, and the queue states.
//!
//! The migration sender skips ballooned pages (the target's memory starts
//! zeroed and the target learns from this state which pages are in the
//! balloon); see `vmm/src/migrate/send.rs`.
//!
//! Target:
//! 1. `Balloon::new(&config, ram, backend)` — the same config as the source
//!    (features must match: a driver's acked feature the target does not
//!    offer fails the restore).
//! 2. `restore(state, context)` ([`crate::virtio::VirtioDevice::restore`]):
//!    checks the RAM layout and the features, sets target, actual, page map
//!    and statistics, and if the driver was active starts the worker on the
//!    transport's queues (rebuilt from the source's ring positions) with the
//!    held stats buffer, which the stats timer returns as usual.
//!
//! Nothing needs releasing or acquiring at switch-over (the device holds no
//! host resource but guest memory).

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::device::{Balloon, GuestStats};
use super::{BalloonError, QUEUE_SIZE};
use crate::virtio::QueueSnapshot;

/// The version of [`BalloonState`] written by this code.
pub const BALLOON_STATE_VERSION: u32 = 1;

/// What `Balloon::snapshot` returns (as JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    pub version: u32,
    pub avail_features: u64,
    pub acked_features: u64,
    /// The target in 4 KiB pages.
    pub num_pages: u32,
    /// What the guest wrote to `actual`.
    pub actual: u32,
    /// Guest RAM regions (start, length in bytes): must be the same on the target.
    pub ram: Vec<(u64, u64)>,
    /// Pages in the balloon, as (first 4 KiB page number, count) runs.
    pub ballooned: Vec<(u64, u64)>,
    /// The guest's last statistics.
    pub stats: Option<GuestStats>,
    /// The stats buffer the device holds (to return when it wants fresh stats).
    pub stats_head: Option<u16>,
    /// Whether the driver had activated the device.
    pub activated: bool,
    /// Every queue's state, in index order (empty when not activated).
    pub queues: Vec<QueueSnapshot>,
}

/// What [`Balloon::restore_state`] found, for an active device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredBalloon {
    pub acked_features: u64,
    pub stats_head: Option<u16>,
    pub queues: Vec<QueueState>,
}

impl Balloon {
    pub(crate) fn state_for_snapshot(
        &self,
        queues: Vec<QueueState>,
        stats_head: Option<u16>,
    ) -> BalloonState {
        let inner = self.shared.lock();
        BalloonState {
            version: BALLOON_STATE_VERSION,
            avail_features: self.avail_features,
            acked_features: inner.acked_features,
            num_pages: inner.num_pages,
            actual: inner.actual,
            ram: inner.pages.ram(),
            ballooned: inner.pages.runs(),
            stats: inner.stats.clone(),
            stats_head,
            activated: self.is_activated(),
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
        }
    }

    /// Applies a snapshot taken on the source to this (inactive) device.
    /// Returns what activation needs if the device was active on the
    /// source. See the module documentation for the order.
    pub fn restore_state(
        &mut self,
        state: &serde_json::Value,
    ) -> Result<Option<RestoredBalloon>, BalloonError> {
        let bad = |reason: String| BalloonError::Restore(reason);
        let state: BalloonState = serde_json::from_value(state.clone())
            .map_err(|e| bad(format!("invalid balloon state: {e}")))?;
        if state.version != BALLOON_STATE_VERSION {
            return Err(bad(format!(
                "balloon state version {} (this VMM reads {BALLOON_STATE_VERSION})",
                state.version
            )));
        }
        if self.is_activated() {
            return Err(bad("the device is already active".into()));
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(bad(format!(
                "the driver acked features {:#x} this device does not offer \
                 (deflate_on_oom and free_page_reporting must match the source)",
                state.acked_features & !self.avail_features
            )));
        }
        let mut inner = self.shared.lock();
        let here = inner.pages.ram();
        if state.ram != here {
            return Err(bad(format!(
                "guest RAM {:x?} here, {:x?} on the source",
                here, state.ram
            )));
        }
        if u64::from(state.num_pages) > inner.pages.ram_pages() {
            return Err(bad(format!(
                "target of {} pages is more than guest RAM",
                state.num_pages
            )));
        }
        if state.stats_head.is_some_and(|h| h >= QUEUE_SIZE) {
            return Err(bad("the held stats buffer is not a queue entry".into()));
        }
        if state.activated && state.queues.len() != self_queue_count(self.avail_features) {
            return Err(bad(format!(
                "{} queues in the state, expected {}",
                state.queues.len(),
                self_queue_count(self.avail_features)
            )));
        }
        let mut pages = inner.pages.clone();
        pages.clear_all();
        pages.set_runs(&state.ballooned).map_err(bad)?;
        inner.pages = pages;
        inner.num_pages = state.num_pages;
        inner.actual = state.actual;
        inner.acked_features = state.acked_features;
        inner.stats = state.stats.clone();
        drop(inner);
        self.shared.removed_pages();
        Ok(state.activated.then(|| RestoredBalloon {
            acked_features: state.acked_features,
            stats_head: state.stats_head,
            queues: state.queues.iter().map(|&q| QueueState::from(q)).collect(),
        }))
    }
}

fn self_queue_count(avail_features: u64) -> usize {
    if avail_features & (1 << super::F_PAGE_REPORTING) != 0 {
        4
    } else {
        3
    }
}
