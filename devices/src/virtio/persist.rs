//! The saved state of a virtio device and its transport, for live
//! migration and snapshots: one serde type per device ([`DeviceState`]),
//! the queues once ([`QueueSnapshot`]), the transport's registers once
//! (with the driver's status, which says whether the device was active).
//!
//! One path saves ([`crate::virtio::pci::VirtioPciDevice::snapshot`]: pause
//! the device, take the transport's registers, the queues' ring positions
//! and [`crate::virtio::VirtioDevice::state`]) and one restores
//! ([`crate::virtio::pci::VirtioPciDevice::restore`]: put the registers
//! back, check the driver's features against what this device offers,
//! rebuild the queues, and hand [`crate::virtio::VirtioDevice::restore`]
//! the device state with the queues if the driver had started the device).

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::balloon::BalloonState;
use super::block::BlockState;
use super::net::NetState;
use super::pci::VirtioPciState;

/// A device's own state, tagged with its kind so that a state can never
/// be restored into a device of another kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "state", rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
    Balloon(BalloonState),
}

impl DeviceState {
    /// The kind, as errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Balloon(_) => "balloon",
        }
    }
}

/// Everything saved of one virtio device behind its PCI transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioDeviceSnapshot {
    pub transport: VirtioPciState,
    /// Every queue's ring positions, in index order, as the device left
    /// them; empty when the driver had not started the device.
    pub queues: Vec<QueueSnapshot>,
    pub device: DeviceState,
}

/// `QueueState` with serde.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
