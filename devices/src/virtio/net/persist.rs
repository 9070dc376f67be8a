//! virtio-net snapshots (live migration).
//!
//! Order on the source: `pause()` (the worker stops; no guest memory is
//! written after it returns; a frame read from the tap but not yet given to
//! the guest is lost, as on a real link), then `snapshot()` (a [`NetState`]
//! as JSON) together with the transport's own state and guest memory.
//!
//! Order on the target:
//! 1. `NetState::from_value(&value)`, then [`super::Net::restore`]`(&config,
//!    &state)`: opens the target's tap (from the target's own `NetConfig`)
//!    and checks that it offers every feature the source negotiated.
//! 2. The transport restores its registers (status, features, queue
//!    addresses, MSI-X) and, once guest memory is in place and the
//!    interrupt routes are set, if `state.activated`, calls
//!    `activate(ActivateContext { queues: state.queues()? paired with the
//!    queue eventfds in index order (rx, tx, ctrl), acked_features:
//!    state.acked_features, .. })`. The queues continue exactly where the
//!    source stopped (`next_avail`/`next_used`); the worker first processes
//!    whatever the driver queued meanwhile, then interrupts every ready
//!    queue once (an interrupt may have been lost in the switch-over; drivers
//!    ignore spurious ones).
//! 3. After the vCPUs run: `announce()`.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::virtio::QueueSnapshot;

/// The guest-visible state of a virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC in config space (the driver may have changed it).
    pub mac: [u8; 6],
    /// Config-space status (VIRTIO_NET_S_LINK_UP, VIRTIO_NET_S_ANNOUNCE: an
    /// announce the guest has not acked yet survives the migration).
    pub status: u16,
    /// The features the driver accepted (0 if it never activated the device).
    pub acked_features: u64,
    /// The guest offloads in effect (CTRL_GUEST_OFFLOADS may have narrowed
    /// the negotiated ones).
    pub guest_offloads: u64,
    /// Whether the driver had activated the device (DRIVER_OK).
    pub activated: bool,
    /// rx, tx, ctrl (as many as the transport gave), empty if not activated.
    pub queues: Vec<QueueSnapshot>,
}

impl NetState {
    pub fn from_value(value: &serde_json::Value) -> Result<NetState, serde_json::Error> {
        NetState::deserialize(value)
    }

    pub fn to_value(&self) -> serde_json::Value {
        // A plain struct of numbers: serialization cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    pub fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(|&q| QueueState::from(q)).collect()
    }

    /// The queues, validated (sizes, alignment), for `activate`.
    pub fn queues(&self) -> Result<Vec<Queue>, virtio_queue::Error> {
        self.queue_states()
            .into_iter()
            .map(Queue::try_from)
            .collect()
    }
}
