//! Virtio devices (virtio 1.x), independent of the transport.
//!
//! A device model implements [`VirtioDevice`]: it offers features and a
//! config space, and once the driver sets DRIVER_OK the transport hands it
//! its queues, each with the eventfd that KVM signals when the driver
//! notifies the queue ([`ActivateContext`]). The device then processes
//! requests on a worker thread of its own (never on a vCPU thread) and
//! raises interrupts through [`VirtioInterrupt`].
//!
//! Every descriptor chain comes from an untrusted guest: devices check
//! every length, address and sector and answer bad requests with an error
//! status; they never panic or spin on guest input.

pub mod balloon;
pub mod block;
pub mod net;
pub mod pci;
pub mod worker;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Device types (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_BALLOON: u32 = 5;

/// Device-independent feature bits (virtio 1.2, 6).
pub const F_INDIRECT_DESC: u32 = 28;
pub const F_EVENT_IDX: u32 = 29;
pub const F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 64;
pub const STATUS_FAILED: u8 = 128;

/// Features every device offers: modern interface, indirect descriptors,
/// event index suppression.
pub const COMMON_FEATURES: u64 = (1 << F_VERSION_1) | (1 << F_INDIRECT_DESC) | (1 << F_EVENT_IDX);

/// How a device interrupts the driver. The transport maps these onto the
/// MSI-X vectors the driver chose.
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `index`.
    fn notify_queue(&self, index: u16) -> io::Result<()>;
    /// The device configuration changed.
    fn notify_config(&self) -> io::Result<()>;
}

/// What a device gets when the driver has set it up.
pub struct ActivateContext {
    pub memory: Arc<GuestMemoryMmap>,
    /// The queues the driver enabled, in index order, each with the eventfd
    /// KVM signals on a notification of that queue. Disabled queues are
    /// given too (with `ready() == false`) so indices stay stable.
    pub queues: Vec<(Queue, EventFd)>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The features the driver accepted (a subset of the offered ones).
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled no usable queue {0}")]
    MissingQueue(usize),
    #[error("cannot start the device worker: {0}")]
    Worker(io::Error),
    #[error("{0}")]
    Other(String),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// One of the `TYPE_*` constants.
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features offered to the driver (including [`COMMON_FEATURES`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most fields are read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing: called once DRIVER_OK is set.
    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing and forgets the queues (driver reset). Returns the
    /// queues' state as they were, if the device was active.
    fn reset(&mut self) -> Option<Vec<QueueState>>;
    /// Stops processing without forgetting anything (for a snapshot); no
    /// guest memory is written after this returns.
    fn pause(&mut self) {}
    /// Undoes [`VirtioDevice::pause`].
    fn resume(&mut self) {}
    /// Counters for `vm.counters` (requests, bytes, errors...).
    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
    /// The device-specific state, for migration; the device is paused.
    fn snapshot(&mut self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The queues' state, for migration; the device is paused.
    fn queue_states(&self) -> Vec<QueueState> {
        Vec::new()
    }
    /// Source side of a migration switch-over, guest paused: make the host
    /// resources safe to hand over (flush disks, release disk locks).
    fn migration_release(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Takes host resources back: on the target before the guest runs, on
    /// the source when a migration failed after [`VirtioDevice::migration_release`].
    fn migration_acquire(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Called on the target once the guest runs (virtio-net announces the
    /// guest's new location).
    fn migration_completed(&mut self) {}
    /// Restores a device from [`VirtioDevice::snapshot`] on a migration
    /// target. `context` is given when the driver had started the device on
    /// the source: its queues carry the source's ring positions, and the
    /// device resumes processing as [`VirtioDevice::activate`] would.
    fn restore(
        &mut self,
        state: serde_json::Value,
        context: Option<ActivateContext>,
    ) -> Result<(), ActivateError> {
        let _ = state;
        match context {
            Some(context) => self.activate(context),
            None => Ok(()),
        }
    }
}

/// `QueueState` with serde, for device snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Adds `head` with `len` bytes written to the used ring and interrupts the
/// driver if it wants to be told. The one place devices complete requests.
pub fn complete(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    queue.add_used(memory, head, len)?;
    if queue.needs_notification(memory)? {
        // A lost interrupt is recovered by the driver's next kick; nothing to do.
        let _ = interrupt.notify_queue(index);
    }
    Ok(())
}
