//! virtio-blk state for snapshots and live migration.
//!
//! # Order of operations
//!
//! Source (the VM is paused; the transport pauses every device first):
//! 1. `pause()` — the worker stops after the event it is handling; with
//!    the io_uring engine, `pause()` then waits for the requests the worker
//!    left in flight and completes them itself (re-executing any the kernel
//!    cancelled with the worker thread). Either way every request taken
//!    from the queue has been completed when it returns, so no guest memory
//!    is written after this and nothing is in flight; requests not yet
//!    taken stay in the available ring, for the target to serve.
//! 2. `snapshot()` — a JSON [`BlockState`]: acked features, the disk's
//!    geometry for a sanity check on the target, whether the device was
//!    active, and the queue state (next_avail/next_used, ring addresses).
//! 3. At switch-over: `flush()` (fdatasync), then `release_lock()`.
//!
//! Target:
//! 1. `Block::new_unlocked(&config)` — the source still holds the lock.
//! 2. `restore_state(&state)` — checks the disk matches (capacity, block
//!    sizes, read-only) and the features, sets the acked features, and
//!    returns the queue states if the device was active on the source.
//! 3. The transport rebuilds its queues from those states
//!    (`Queue::try_from(QueueState)`), restores its own registers, and
//!    calls `activate()` (device status DRIVER_OK) with the queues and their
//!    eventfds. The worker serves any request already available at once
//!    (kicks made while the source was pausing are not lost).
//!    [`Block::restore`] does steps 1-3 in one call when there is no
//!    transport in between (tests, tools).
//! 4. At switch-over, once the source released it: `acquire_lock()`.
//!
//! A failed migration: the source calls `acquire_lock()` again and
//! `resume()`.

use std::sync::Arc;

use config::DiskConfig;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::device::Block;
use super::BlockError;
use crate::virtio::{QueueSnapshot, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// The version of [`BlockState`] written by this code.
pub const BLOCK_STATE_VERSION: u32 = 1;

/// What `Block::snapshot` returns (as JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    pub version: u32,
    pub avail_features: u64,
    pub acked_features: u64,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub readonly: bool,
    /// Whether the driver had activated the device.
    pub activated: bool,
    /// The queue states (empty when not activated).
    pub queues: Vec<QueueSnapshot>,
}

impl Block {
    pub(crate) fn state_for_snapshot(&self, queues: Vec<QueueState>) -> BlockState {
        BlockState {
            version: BLOCK_STATE_VERSION,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            capacity: self.disk.capacity_sectors(),
            logical_block_size: self.disk.logical_block_size(),
            physical_block_size: self.disk.physical_block_size(),
            readonly: self.disk.readonly(),
            activated: self.is_activated(),
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
        }
    }

    /// Applies a snapshot taken on the source to this (inactive) device.
    /// Returns the queue states to activate with, `None` if the device was
    /// not active on the source. See the module documentation for the order.
    pub fn restore_state(
        &mut self,
        state: &serde_json::Value,
    ) -> Result<Option<Vec<QueueState>>, BlockError> {
        let bad = |reason: String| BlockError::Restore {
            path: self.disk.path().to_path_buf(),
            reason,
        };
        let state: BlockState = serde_json::from_value(state.clone())
            .map_err(|e| bad(format!("invalid block state: {e}")))?;
        if state.version != BLOCK_STATE_VERSION {
            return Err(bad(format!(
                "block state version {} (this VMM reads {BLOCK_STATE_VERSION})",
                state.version
            )));
        }
        let here = self.state_for_snapshot(Vec::new());
        if state.capacity != here.capacity {
            return Err(bad(format!(
                "capacity {} sectors here, {} on the source",
                here.capacity, state.capacity
            )));
        }
        if (state.logical_block_size, state.physical_block_size)
            != (here.logical_block_size, here.physical_block_size)
        {
            return Err(bad(format!(
                "block sizes {}/{} here, {}/{} on the source",
                here.logical_block_size,
                here.physical_block_size,
                state.logical_block_size,
                state.physical_block_size
            )));
        }
        if state.readonly != here.readonly {
            return Err(bad(format!(
                "read-only {} here, {} on the source",
                here.readonly, state.readonly
            )));
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(bad(format!(
                "the driver acked features {:#x} this device does not offer",
                state.acked_features & !self.avail_features
            )));
        }
        if state.activated && state.queues.len() != 1 {
            return Err(bad(format!(
                "{} queues in the state, expected 1",
                state.queues.len()
            )));
        }
        if self.is_activated() {
            return Err(bad("the device is already active".to_string()));
        }
        self.acked_features = state.acked_features;
        Ok(state
            .activated
            .then(|| state.queues.iter().map(|&q| QueueState::from(q)).collect()))
    }

    /// Creates a device from `config` (without its lock) and a snapshot,
    /// and re-activates it if it was active: `queue_evts` are the queues'
    /// notification eventfds. Call `acquire_lock` at switch-over.
    pub fn restore(
        config: &DiskConfig,
        state: &serde_json::Value,
        memory: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Block, BlockError> {
        let mut block = Block::new_unlocked(config)?;
        let path = config.path.clone();
        if let Some(states) = block.restore_state(state)? {
            let (Some(queue_state), Some(queue_evt)) =
                (states.into_iter().next(), queue_evts.into_iter().next())
            else {
                return Err(BlockError::Restore {
                    path,
                    reason: "no eventfd for the request queue".to_string(),
                });
            };
            let queue = Queue::try_from(queue_state).map_err(|e| BlockError::Restore {
                path: path.clone(),
                reason: format!("invalid queue state: {e}"),
            })?;
            block
                .start(memory, interrupt, queue, queue_evt)
                .map_err(|e| BlockError::Restore {
                    path,
                    reason: e.to_string(),
                })?;
        }
        Ok(block)
    }
}
