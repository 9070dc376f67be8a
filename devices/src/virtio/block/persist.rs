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
//! 2. `state()` — a [`BlockState`]: the disk's geometry, for a sanity check
//!    on the target (the transport saves the queue and the features).
//! 3. At switch-over (`migration_release`): `flush()` (fdatasync), then
//!    `release_lock()`.
//!
//! Target:
//! 1. `Block::new_unlocked(&config)` — the source still holds the lock.
//! 2. `restore(state, context)` — checks the disk matches (capacity, block
//!    sizes, read-only) and, if the driver had started the device, starts
//!    the worker on the transport's queue (rebuilt from the source's ring
//!    positions). The worker serves any request already available at once
//!    (kicks made while the source was pausing are not lost).
//! 3. At switch-over, once the source released it (`migration_acquire`):
//!    `acquire_lock()`.
//!
//! A failed migration: the source calls `acquire_lock()` again and
//! `resume()`.

use serde::{Deserialize, Serialize};

use super::device::Block;
use crate::error::StateError;
use crate::virtio::{ActivateContext, VirtioDevice};

/// The disk as the guest saw it, checked on the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub readonly: bool,
}

impl Block {
    pub(crate) fn block_state(&self) -> BlockState {
        BlockState {
            capacity: self.disk.capacity_sectors(),
            logical_block_size: self.disk.logical_block_size(),
            physical_block_size: self.disk.physical_block_size(),
            readonly: self.disk.readonly(),
        }
    }

    /// Takes over a state saved on the source: see the module documentation.
    pub(crate) fn restore_block(
        &mut self,
        state: &BlockState,
        context: Option<ActivateContext>,
    ) -> Result<(), StateError> {
        let bad = |reason: String| {
            StateError::Mismatch(format!("disk {}: {reason}", self.disk.path().display()))
        };
        let here = self.block_state();
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
        if self.is_activated() {
            return Err(bad("the device is already active".to_string()));
        }
        match context {
            Some(context) => Ok(self.activate(context)?),
            None => Ok(()),
        }
    }
}
