//! The virtio-net device model: features, config space, activation,
//! reset/pause/resume, announce after migration.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use config::{parse_mac, NetConfig, RateLimitConfig};
use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueState, QueueT};

use super::bridge::{self, BridgeError};
use super::handler::{
    apply_event_idx, bit, rarp_frame, tun_offload_flags, NetHandler, Shared, GUEST_OFFLOAD_MASK,
};
use super::tap::{Tap, TapError};
use super::{CTRL_QUEUE, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::error::StateError;
use crate::rate_limiter::RateLimiter;
use crate::virtio::worker::DeviceWorker;
use crate::virtio::{
    read_config_space, ActivateContext, ActivateError, DeviceState, VirtioDevice, VirtioInterrupt,
    COMMON_FEATURES, TYPE_NET,
};

/// Bytes of config space we expose: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Tap(#[from] TapError),
    #[error("{0}")]
    Bridge(#[from] BridgeError),
    #[error("net {id}: {message}")]
    Config { id: String, message: String },
    #[error("net {id}: {message}")]
    Io { id: String, message: String },
}

impl NetError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            NetError::Tap(e) => config::ErrorClass::of_io(&e.error),
            // A bridge missing on this host, or not a bridge, is the
            // config's mistake; a tap held by another bridge a conflict.
            NetError::Bridge(e) => match e.error.raw_os_error() {
                Some(libc::ENODEV) | Some(libc::EOPNOTSUPP) | Some(libc::ELOOP) => {
                    config::ErrorClass::Caller
                }
                Some(libc::EBUSY) => config::ErrorClass::Conflict,
                _ => config::ErrorClass::of_io(&e.error),
            },
            NetError::Config { .. } => config::ErrorClass::Caller,
            NetError::Io { .. } => config::ErrorClass::Host,
        }
    }
}

/// How [`Net::announce`] announced the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnounceMode {
    /// VIRTIO_NET_S_ANNOUNCE set and a config interrupt raised: the guest
    /// sends its own gratuitous ARPs / neighbour advertisements (for every
    /// address and VLAN it has) and acks on the control queue.
    Guest,
    /// The driver cannot announce (not active, or GUEST_ANNOUNCE not
    /// negotiated): the host sent a RARP from the guest MAC on the tap.
    Host,
}

/// A locally administered unicast MAC derived from the device id (FNV-1a),
/// so the same id gets the same MAC on every start and on both sides of a
/// migration.
pub fn default_mac(id: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let h = hash.to_be_bytes();
    [(h[0] & 0xfc) | 0x02, h[1], h[2], h[3], h[4], h[5]]
}

/// What the driver set up, from `activate` to `reset`. The device stays
/// active when its worker does not (a thread that panicked or could not
/// restart after a pause).
pub(super) struct Active {
    interrupt: Arc<dyn VirtioInterrupt>,
    acked_features: u64,
}

/// A virtio-net device on a tap.
pub struct Net {
    pub(super) id: String,
    tap: Arc<Tap>,
    /// The MAC from the configuration (or derived from the id).
    config_mac: [u8; 6],
    avail_features: u64,
    pub(super) shared: Arc<Shared>,
    rate_limit: Option<RateLimitConfig>,
    pub(super) active: Option<Active>,
    worker: DeviceWorker<NetHandler>,
    /// The guest offloads of a restored state, for the `activate` that
    /// follows the restore.
    pub(super) restored_offloads: Option<u64>,
    /// The MTU offered to the guest (VIRTIO_NET_F_MTU): the bridge's, when
    /// the tap is on one.
    mtu: Option<u16>,
}

impl Net {
    /// Opens the tap of `config` (by name, creating it if missing, or the
    /// given fd, duplicated) and builds the device. `config.id` should be
    /// set (`VmConfig::assign_device_ids`); it names the worker thread and
    /// seeds the default MAC.
    pub fn new(config: &NetConfig) -> Result<Net, NetError> {
        let tap = match (&config.tap, config.fd) {
            (Some(name), _) => Tap::open(name)?,
            (None, Some(fd)) => Tap::from_fd(fd)?,
            (None, None) => {
                return Err(NetError::Config {
                    id: config.id.clone().unwrap_or_default(),
                    message: "a tap name or an fd is required".into(),
                })
            }
        };
        let mtu = match &config.bridge {
            Some(bridge) => Some(bridge::attach(tap.name(), bridge)?),
            None => None,
        };
        let mut net = Net::with_tap(config, tap)?;
        if let Some(mtu) = mtu {
            net.mtu = Some(mtu);
            net.avail_features |= bit(VIRTIO_NET_F_MTU);
        }
        Ok(net)
    }

    /// The device on a stand-in tap from [`Tap::from_socket`] (the fuzzer).
    #[cfg(feature = "fuzzing")]
    pub fn on_tap(config: &NetConfig, tap: Tap) -> Result<Net, NetError> {
        Net::with_tap(config, tap)
    }

    pub(super) fn with_tap(config: &NetConfig, tap: Tap) -> Result<Net, NetError> {
        let id = config.id.clone().unwrap_or_else(|| tap.name().to_string());
        let config_mac = match &config.mac {
            Some(text) => {
                let mac = parse_mac("mac", text).map_err(|e| NetError::Config {
                    id: id.clone(),
                    message: e.to_string(),
                })?;
                if mac[0] & 1 != 0 {
                    return Err(NetError::Config {
                        id,
                        message: format!("mac {text} is a multicast address"),
                    });
                }
                mac
            }
            None => default_mac(&id),
        };
        let offloads = tap.probe_offloads();
        let mut features = COMMON_FEATURES
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_GUEST_ANNOUNCE);
        if offloads.csum_tso {
            features |= bit(VIRTIO_NET_F_CSUM)
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
                | bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_ECN)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN);
            if offloads.ufo {
                features |= bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
            }
        }
        let worker = DeviceWorker::new(thread_name(&id), format!("net {id}"));
        Ok(Net {
            id,
            tap: Arc::new(tap),
            config_mac,
            avail_features: features,
            shared: Arc::new(Shared::new(config_mac)),
            rate_limit: config.rate_limit.clone(),
            active: None,
            worker,
            restored_offloads: None,
            mtu: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tap interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The MAC the guest sees in config space.
    pub fn mac(&self) -> [u8; 6] {
        self.shared.mac()
    }

    /// The config-space status (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE).
    pub fn status(&self) -> u16 {
        self.shared.status.load(Ordering::SeqCst)
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The features the driver accepted (0 when not active).
    pub fn acked_features(&self) -> u64 {
        self.active.as_ref().map_or(0, |a| a.acked_features)
    }

    /// Makes the network learn where the guest is now (after a migration
    /// switch-over, on the target, once the vCPUs run). With GUEST_ANNOUNCE
    /// negotiated: sets VIRTIO_NET_S_ANNOUNCE and raises a config interrupt;
    /// the guest announces itself and acks with VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    /// which clears the bit. Otherwise the host sends one RARP from the guest
    /// MAC on the tap (call again to repeat; QEMU sends a few, spaced out).
    pub fn announce(&self) -> Result<AnnounceMode, NetError> {
        if let Some(active) = &self.active {
            let wanted = bit(VIRTIO_NET_F_GUEST_ANNOUNCE) | bit(VIRTIO_NET_F_CTRL_VQ);
            if active.acked_features & wanted == wanted {
                self.shared
                    .status
                    .fetch_or(VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
                active.interrupt.notify_config().map_err(|e| NetError::Io {
                    id: self.id.clone(),
                    message: format!("config interrupt: {e}"),
                })?;
                return Ok(AnnounceMode::Guest);
            }
        }
        let frame = rarp_frame(self.shared.mac());
        self.tap.write(&frame).map_err(|e| NetError::Io {
            id: self.id.clone(),
            message: format!("tap {}: sending RARP: {e}", self.tap.name()),
        })?;
        Ok(AnnounceMode::Host)
    }

    /// The handler when paused (tests look inside).
    #[cfg(test)]
    pub(super) fn paused_handler(&self) -> Option<&NetHandler> {
        self.worker.handler()
    }

    fn stop_worker(&mut self) -> Option<NetHandler> {
        let was_running = self.worker.is_running();
        let handler = self.worker.stop();
        if was_running && handler.is_none() {
            self.log_panicked();
        }
        handler
    }

    fn log_panicked(&self) {
        log::error!("net {}: the worker thread panicked", self.id);
    }

    fn limiter(&self) -> std::io::Result<RateLimiter> {
        let rate = self.rate_limit.clone().unwrap_or_default();
        RateLimiter::new(rate.bytes_per_sec, rate.ops_per_sec)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&self.shared.mac());
        config[6..8].copy_from_slice(&self.shared.status.load(Ordering::SeqCst).to_le_bytes());
        // max_virtqueue_pairs
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        // mtu: only meaningful with VIRTIO_NET_F_MTU; zero otherwise.
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        read_config_space(&config, offset, data);
    }

    // The config space is read-only in virtio 1.x (the MAC changes through
    // VIRTIO_NET_CTRL_MAC_ADDR_SET); writes are ignored.

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Other(format!(
                "net {}: already active",
                self.id
            )));
        }
        let acked = context.acked_features & self.avail_features;
        let mut queues = context.queues;
        let memory = context.memory;
        for index in [RX_QUEUE, TX_QUEUE] {
            let Some((queue, _)) = queues.get(index as usize) else {
                return Err(ActivateError::MissingQueue(index as usize));
            };
            if !queue.ready() || !queue.is_valid(&*memory) {
                return Err(ActivateError::MissingQueue(index as usize));
            }
        }
        if acked & bit(VIRTIO_NET_F_CTRL_VQ) != 0 {
            match queues.get(CTRL_QUEUE as usize) {
                Some((q, _)) if q.ready() && q.is_valid(&*memory) => {}
                _ => return Err(ActivateError::MissingQueue(CTRL_QUEUE as usize)),
            }
        }
        queues.truncate(NUM_QUEUES);
        for (queue, _) in queues.iter_mut() {
            apply_event_idx(queue, acked);
        }
        let restored = self.restored_offloads.take();
        let guest_offloads = match restored {
            Some(offloads) => offloads & acked,
            None => acked & GUEST_OFFLOAD_MASK,
        };
        self.tap
            .set_offload(tun_offload_flags(guest_offloads))
            .map_err(|e| ActivateError::Other(format!("net {}: {e}", self.id)))?;
        self.shared
            .guest_offloads
            .store(guest_offloads, Ordering::SeqCst);
        let rx_limiter = self.limiter().map_err(ActivateError::Worker)?;
        let tx_limiter = self.limiter().map_err(ActivateError::Worker)?;
        let mut handler = NetHandler::new(
            memory,
            context.interrupt.clone(),
            queues,
            self.tap.clone(),
            self.shared.clone(),
            acked,
            rx_limiter,
            tx_limiter,
        );
        handler.notify_on_start = restored.is_some();
        self.worker.start(handler).map_err(ActivateError::Worker)?;
        self.active = Some(Active {
            interrupt: context.interrupt,
            acked_features: acked,
        });
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<QueueState>> {
        self.restored_offloads = None;
        let handler = self.stop_worker();
        let was_active = self.active.take().is_some();
        self.shared.set_mac(self.config_mac);
        self.shared
            .status
            .store(VIRTIO_NET_S_LINK_UP as u16, Ordering::SeqCst);
        self.shared.guest_offloads.store(0, Ordering::SeqCst);
        if was_active {
            // Offloads off until the next negotiation.
            let _ = self.tap.set_offload(0);
        }
        handler.map(|h| h.queue_states())
    }

    fn pause(&mut self) {
        if self.worker.is_running() {
            self.worker.pause();
            if !self.worker.is_active() {
                self.log_panicked();
            }
        }
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let c = &self.shared.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        [
            ("rx_frames", get(&c.rx_frames)),
            ("rx_bytes", get(&c.rx_bytes)),
            ("tx_frames", get(&c.tx_frames)),
            ("tx_bytes", get(&c.tx_bytes)),
            ("rx_dropped", get(&c.rx_dropped)),
            ("tx_dropped", get(&c.tx_dropped)),
            ("errors", get(&c.errors)),
            ("throttled", get(&c.rx_throttled) + get(&c.tx_throttled)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn state(&mut self) -> DeviceState {
        DeviceState::Net(self.net_state())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.worker
            .handler()
            .map(|h| h.queue_states())
            .unwrap_or_default()
    }

    fn restore(
        &mut self,
        state: DeviceState,
        context: Option<ActivateContext>,
    ) -> Result<(), StateError> {
        match state {
            DeviceState::Net(state) => self.restore_net(&state, context),
            other => Err(StateError::WrongKind {
                expected: "net",
                found: other.kind(),
            }),
        }
    }

    fn migration_completed(&mut self) {
        // Switches learn where the guest went; a failure only delays that.
        if let Err(e) = self.announce() {
            log::warn!("{}: cannot announce the guest: {e}", self.id);
        }
    }
}

/// The worker thread's name.
fn thread_name(id: &str) -> String {
    let mut name = format!("net-{id}");
    // Linux thread names are at most 15 bytes.
    while name.len() > 15 {
        name.pop();
    }
    name
}

impl Drop for Net {
    fn drop(&mut self) {
        // Stop the worker before the tap closes.
        self.stop_worker();
    }
}
