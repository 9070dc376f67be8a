//! virtio-net state for snapshots and live migration.
//!
//! Order on the source: `pause()` (the worker stops; no guest memory is
//! written after it returns; a frame read from the tap but not yet given to
//! the guest is lost, as on a real link), then `state()` (a [`NetState`]);
//! the transport saves the queues and the negotiated features.
//!
//! Order on the target:
//! 1. `Net::new(&config)` opens the target's tap (from the target's own
//!    `NetConfig`).
//! 2. `restore(state, context)`: takes over the MAC, the link/announce
//!    status and the guest offloads and, if the driver had started the
//!    device, starts the worker on the transport's queues (rx, tx, ctrl).
//!    The queues continue exactly where the source stopped
//!    (`next_avail`/`next_used`); the worker first processes whatever the
//!    driver queued meanwhile, then interrupts every ready queue once (an
//!    interrupt may have been lost in the switch-over; drivers ignore
//!    spurious ones).
//! 3. After the vCPUs run (`migration_completed`): `announce()`.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP};

use super::handler::GUEST_OFFLOAD_MASK;
use super::Net;
use crate::error::StateError;
use crate::virtio::{ActivateContext, VirtioDevice};

/// The guest-visible state of a virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC in config space (the driver may have changed it).
    pub mac: [u8; 6],
    /// Config-space status (VIRTIO_NET_S_LINK_UP, VIRTIO_NET_S_ANNOUNCE: an
    /// announce the guest has not acked yet survives the migration).
    pub status: u16,
    /// The guest offloads in effect (CTRL_GUEST_OFFLOADS may have narrowed
    /// the negotiated ones).
    pub guest_offloads: u64,
}

impl Net {
    pub(super) fn net_state(&self) -> NetState {
        NetState {
            mac: self.shared.mac(),
            status: self.shared.status.load(Ordering::SeqCst),
            guest_offloads: self.shared.guest_offloads.load(Ordering::SeqCst),
        }
    }

    /// Takes over a state saved on the source: see the module documentation.
    pub(super) fn restore_net(
        &mut self,
        state: &NetState,
        context: Option<ActivateContext>,
    ) -> Result<(), StateError> {
        let bad = |reason: String| StateError::Mismatch(format!("net {}: {reason}", self.id));
        if self.active.is_some() {
            return Err(bad("the device is active".into()));
        }
        let acked = context.as_ref().map_or(0, |c| c.acked_features);
        if state.guest_offloads & !(acked & GUEST_OFFLOAD_MASK) != 0 {
            return Err(bad(format!(
                "guest offloads {:#x} were not negotiated",
                state.guest_offloads
            )));
        }
        if state.mac[0] & 1 != 0 {
            return Err(bad("multicast MAC".into()));
        }
        self.shared.set_mac(state.mac);
        let status = state.status & (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16;
        self.shared.status.store(status, Ordering::SeqCst);
        match context {
            Some(context) => {
                self.restored_offloads = Some(state.guest_offloads);
                Ok(self.activate(context)?)
            }
            None => Ok(()),
        }
    }
}
