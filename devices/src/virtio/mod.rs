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
pub mod persist;
pub mod worker;

pub use persist::{DeviceState, QueueSnapshot, VirtioDeviceSnapshot};

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{DeviceError, StateError};
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
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
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
    /// The device's own state, for a snapshot (its queues and whether the
    /// driver started it are the transport's to save); the device is paused.
    fn state(&mut self) -> DeviceState;
    /// The queues' state, for a snapshot; the device is paused. Empty when
    /// the device is not active.
    fn queue_states(&self) -> Vec<QueueState>;
    /// Takes over `state`, saved by [`VirtioDevice::state`] on a migration
    /// source, into this new, inactive device. `context` is given when the
    /// driver had started the device there: its queues carry the source's
    /// ring positions and its features the driver's (already checked
    /// against [`VirtioDevice::features`]); the device then resumes
    /// processing as [`VirtioDevice::activate`] would.
    fn restore(
        &mut self,
        state: DeviceState,
        context: Option<ActivateContext>,
    ) -> Result<(), StateError>;
    /// Makes what the guest wrote durable (flush disks), keeping every host
    /// resource: a snapshot to a file, devices paused.
    fn sync(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Source side of a migration switch-over, guest paused: make the host
    /// resources safe to hand over (flush disks, release disk locks).
    fn migration_release(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Takes host resources back: on the target before the guest runs, on
    /// the source when a migration failed after [`VirtioDevice::migration_release`].
    fn migration_acquire(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Called on the target once the guest runs (virtio-net announces the
    /// guest's new location).
    fn migration_completed(&mut self) {}
}

/// Named counters as `vm.counters` reports them.
pub fn counter_map<'a>(
    counters: impl IntoIterator<Item = (&'a str, &'a AtomicU64)>,
) -> BTreeMap<String, u64> {
    counters
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
        .collect()
}

/// Reads `data.len()` bytes of the config space `config` from `offset`;
/// bytes past its end read as zero. The one place devices answer config
/// reads.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - offset);
    data[..n].copy_from_slice(&config[offset..offset + n]);
}

/// Whether the driver's available index is bogus: more than a queue ahead
/// of what the device consumed, or unreadable. Asked when a pass popped
/// nothing although `enable_notification` says more is available; if the
/// index is sane, a buffer merely arrived in between and must be served
/// (the driver saw notifications off and will not kick for it).
pub fn avail_index_is_bogus(queue: &Queue, memory: &GuestMemoryMmap) -> bool {
    match queue.avail_idx(memory, std::sync::atomic::Ordering::Acquire) {
        Ok(avail) => avail.0.wrapping_sub(queue.next_avail()) > queue.size(),
        Err(_) => true,
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
    if driver_wants_interrupt(queue, memory)? {
        // A lost interrupt is recovered by the driver's next kick; nothing to do.
        let _ = interrupt.notify_queue(index);
    }
    Ok(())
}

/// Avail ring flag: the driver does not want interrupts (virtio 1.2, 2.7.7).
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for what was just used: the event
/// index when negotiated, else the avail ring's NO_INTERRUPT flag (which
/// virtio-queue's `needs_notification` does not look at).
pub fn driver_wants_interrupt(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    if queue.event_idx_enabled() {
        return queue.needs_notification(memory);
    }
    use vm_memory::Bytes;
    let flags: u16 = memory
        .read_obj(vm_memory::GuestAddress(queue.avail_ring()))
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
}

#[cfg(test)]
mod tests {
    use super::read_config_space;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 3];
        read_config_space(&config, 0, &mut data);
        assert_eq!(data, [1, 2, 3]);
        let mut data = [0xffu8; 4];
        read_config_space(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        for offset in [4, 5, u64::MAX] {
            let mut data = [0xffu8; 2];
            read_config_space(&config, offset, &mut data);
            assert_eq!(data, [0, 0], "offset {offset}");
        }
        read_config_space(&config, 1, &mut []);
    }
}
