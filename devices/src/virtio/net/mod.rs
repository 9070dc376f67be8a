//! virtio-net (virtio 1.2, 5.1) on a tap device.
//!
//! - [`Net`] is the device model ([`crate::virtio::VirtioDevice`]); build it
//!   with [`Net::new`] from an [`config::NetConfig`], or with
//!   [`Net::restore`] from a [`NetState`] on a migration target.
//! - [`tap::Tap`] is the backend: `/dev/net/tun` with IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR and a 12-byte header (`virtio_net_hdr_v1`, i.e. with
//!   `num_buffers`), the same header the guest uses, so frames pass through
//!   without rewriting except for `num_buffers`.
//!
//! Queues: rx = 0, tx = 1, ctrl = 2 (one queue pair, no multiqueue), each
//! at most [`QUEUE_SIZE`] entries. Processing runs on the device's worker
//! thread ([`crate::virtio::worker`]): the three queue eventfds, the tap and
//! the two rate-limiter timerfds are in its epoll set.
//!
//! Rate limiting: the configured `rate_limit` applies to each direction
//! separately (one token bucket for tx, one for rx, each with the configured
//! bytes/s and frames/s); bytes are Ethernet frame bytes, without the virtio
//! header.
//!
//! What the transport and the VMM do:
//! - Offer [`VirtioDevice::features`](crate::virtio::VirtioDevice::features)
//!   and pass the driver's choice as `acked_features` on activation. The
//!   device sets each queue's event-index mode from it and sets the tap's
//!   offloads (TUNSETOFFLOAD) from the negotiated GUEST_* features.
//! - `activate` with the queues in index order (rx, tx, ctrl); rx and tx must
//!   be ready and valid, ctrl too if CTRL_VQ was negotiated. The worker
//!   starts immediately and processes whatever is already queued.
//! - The config space (12 bytes: mac, status, max_virtqueue_pairs = 1,
//!   mtu: the bridge's with VIRTIO_NET_F_MTU when the tap is on one) can
//!   change under the driver: [`Net::announce`] sets VIRTIO_NET_S_ANNOUNCE
//!   and raises the config interrupt itself; the transport should bump
//!   `config_generation` when it delivers one.
//! - Driver reset: `reset()`; snapshot and restore: see [`persist`].
//! - The host side of the tap is left alone unless the config names a
//!   bridge: then the tap takes the bridge's MTU, joins it and goes up
//!   ([`bridge::attach`]).
//!
//! Frames pass through unchanged except `num_buffers`; the header is
//! little-endian, i.e. native on the x86 hosts we support (a big-endian host
//! would need TUNSETVNETLE).

pub mod bridge;
mod device;
mod handler;
pub mod persist;
pub mod tap;

#[cfg(test)]
mod tests;

pub use bridge::BridgeError;
pub use device::{default_mac, AnnounceMode, Net, NetError};
pub use persist::NetState;
pub use tap::{Tap, TapError, TapOffloads};

/// Queue indices.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const CTRL_QUEUE: u16 = 2;
/// Number of queues (one rx/tx pair and the control queue).
pub const NUM_QUEUES: usize = 3;
/// The maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Ethernet header length; shorter frames are malformed.
const ETH_HLEN: usize = 14;
/// The largest frame (header included) in either direction: a 64 KiB GSO
/// frame with its Ethernet header, as Firecracker allows.
pub const MAX_FRAME_LEN: usize = NET_HDR_LEN + 65550;
