//! virtio-balloon state for snapshots and live migration.
//!
//! # Order of operations
//!
//! Source (the VM is paused; the transport pauses every device first):
//! 1. `pause()` — the worker stops after the buffer it is serving; every
//!    inflate, deflate and reporting buffer taken from a queue has been
//!    returned. The stats buffer may be held (that is its protocol): its
//!    head index goes into the state.
//! 2. `state()` — a [`BalloonState`]: target and actual, the ballooned
//!    pages as runs of page numbers, the guest's last statistics and the
//!    held stats buffer (the transport saves the queues and features).
//!
//! The migration sender skips ballooned pages (the target's memory starts
//! zeroed and the target learns from this state which pages are in the
//! balloon); see `vmm/src/migrate/send.rs`.
//!
//! Target:
//! 1. `Balloon::new(&config, ram, backend)` — the same config as the source
//!    (the transport refuses a driver's feature this device does not offer).
//! 2. `restore(state, context)`: checks the RAM layout, sets target,
//!    actual, page map and statistics, and if the driver was active starts
//!    the worker on the transport's queues (rebuilt from the source's ring
//!    positions) with the held stats buffer, which the stats timer returns
//!    as usual.
//!
//! Nothing needs releasing or acquiring at switch-over (the device holds no
//! host resource but guest memory).

use serde::{Deserialize, Serialize};

use super::device::{Balloon, GuestStats};
use super::QUEUE_SIZE;
use crate::error::StateError;
use crate::virtio::ActivateContext;

/// The balloon's size, its pages and the guest's statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
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
}

impl Balloon {
    pub(crate) fn balloon_state(&self) -> BalloonState {
        let stats_head = self.worker.handler().and_then(|h| h.stats_head);
        let inner = self.shared.lock();
        BalloonState {
            num_pages: inner.num_pages,
            actual: inner.actual,
            ram: inner.pages.ram(),
            ballooned: inner.pages.runs(),
            stats: inner.stats.clone(),
            stats_head,
        }
    }

    /// Takes over a state saved on the source: see the module documentation.
    pub(crate) fn restore_balloon(
        &mut self,
        state: &BalloonState,
        context: Option<ActivateContext>,
    ) -> Result<(), StateError> {
        let bad = |reason: String| StateError::Mismatch(format!("balloon: {reason}"));
        if self.is_activated() {
            return Err(bad("the device is already active".into()));
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
        let mut pages = inner.pages.clone();
        pages.clear_all();
        pages
            .set_runs(&state.ballooned)
            .map_err(|e| bad(e.to_string()))?;
        inner.pages = pages;
        inner.num_pages = state.num_pages;
        inner.actual = state.actual;
        inner.stats = state.stats.clone();
        drop(inner);
        self.shared.removed_pages();
        match context {
            Some(context) => Ok(self.start(
                context.memory,
                context.interrupt,
                context.queues,
                context.acked_features & self.avail_features,
                state.stats_head,
            )?),
            None => Ok(()),
        }
    }
}
