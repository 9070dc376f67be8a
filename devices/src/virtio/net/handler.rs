//! The worker side of virtio-net: moves frames between the tap and the
//! guest's rx/tx queues and answers control-queue commands.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT, Reader};
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use super::{
    CTRL_QUEUE, ETH_HLEN, MAX_FRAME_LEN, NET_HDR_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE, TX_QUEUE,
};
use crate::rate_limiter::RateLimiter;
use crate::virtio::worker::{EventLoop, WorkerHandler};
use crate::virtio::{complete, VirtioInterrupt, F_EVENT_IDX};
use crate::GuestMemoryMmap;

/// Epoll tokens.
const RX_TOKEN: u64 = RX_QUEUE as u64;
const TX_TOKEN: u64 = TX_QUEUE as u64;
const CTRL_TOKEN: u64 = CTRL_QUEUE as u64;
const TAP_TOKEN: u64 = 3;
const RX_TIMER_TOKEN: u64 = 4;
const TX_TIMER_TOKEN: u64 = 5;

/// Frames received per wakeup before giving tx a turn (the tap is watched
/// level-triggered, so the rest are read on the next loop).
const RX_BUDGET: usize = 64;
/// Retries per wakeup when rx buffers arrive while we are deciding to wait.
const MAX_RECHECKS: usize = 8;
/// Passes over the tx ring per wakeup before yielding to other events.
const TX_ROUNDS: usize = 8;
/// More segments than this make a tx chain malformed (UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;

pub(super) const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// The guest offloads (feature bits that CTRL_GUEST_OFFLOADS may toggle).
pub(super) const GUEST_OFFLOAD_MASK: u64 = bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO);

/// TUNSETOFFLOAD flags for a set of guest offloads. Each TSO/UFO flag
/// needs checksum offload (the kernel refuses them without TUN_F_CSUM),
/// ECN needs TSO.
pub(super) fn tun_offload_flags(guest_offloads: u64) -> libc::c_uint {
    let has = |f: u32| guest_offloads & bit(f) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN)
            && (has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6))
        {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

/// Device counters, shared between the worker and the device.
#[derive(Default)]
pub(super) struct Counters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames from the tap that fit in no guest buffer.
    pub rx_dropped: AtomicU64,
    /// Malformed tx chains.
    pub tx_dropped: AtomicU64,
    /// Tap read/write failures, unusable guest buffers, bad control requests.
    pub errors: AtomicU64,
    pub rx_throttled: AtomicU64,
    pub tx_throttled: AtomicU64,
}

fn inc(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// State the worker and the device (vCPU and VMM threads) both touch.
pub(super) struct Shared {
    /// The config-space `status` (VIRTIO_NET_S_*).
    pub status: AtomicU16,
    /// The config-space `mac` (the driver may change it with MAC_ADDR_SET).
    pub mac: Mutex<[u8; 6]>,
    /// The guest offloads in effect (feature bits of [`GUEST_OFFLOAD_MASK`]).
    pub guest_offloads: AtomicU64,
    pub counters: Counters,
}

impl Shared {
    pub fn new(mac: [u8; 6]) -> Shared {
        Shared {
            status: AtomicU16::new(VIRTIO_NET_S_LINK_UP as u16),
            mac: Mutex::new(mac),
            guest_offloads: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        *self.mac.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_mac(&self, mac: [u8; 6]) {
        *self.mac.lock().unwrap_or_else(|e| e.into_inner()) = mac;
    }
}

/// How many entries the driver has made available past `next_avail`; None
/// if the ring is unreadable or its index impossible (more than the queue
/// size ahead: a broken driver, whose ring is then left alone until its
/// next notification).
fn avail_pending(queue: &Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    let idx = queue.avail_idx(mem, Ordering::Acquire).ok()?;
    let pending = idx.0.wrapping_sub(queue.next_avail());
    (pending <= queue.size()).then_some(pending)
}

/// Adds `used` (head, length) entries to the used ring and publishes them
/// with a single index update, then interrupts the driver if it asked to be
/// told. A mergeable frame spans several chains; the driver must never see
/// some of them without the others (Linux drops the frame: "rx error: N
/// buffers out of M missing"), so they go out together. A single entry goes
/// through [`complete`]; for a batch the notification decision is the one
/// `Queue::needs_notification` makes with EVENT_IDX (`used_event` within
/// the batch), otherwise the avail ring's NO_INTERRUPT flag.
pub(super) fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    use virtio_queue::Error;
    match used {
        [] => Ok(()),
        [(head, len)] => complete(queue, mem, interrupt, index, *head, *len),
        _ => {
            let size = queue.size();
            if size == 0 || used.len() > usize::from(size) {
                return Err(Error::InvalidSize);
            }
            if used.iter().any(|&(head, _)| head >= size) {
                return Err(Error::InvalidDescriptorIndex);
            }
            let ring = GuestAddress(queue.used_ring());
            let old = queue.next_used();
            for (i, &(head, len)) in used.iter().enumerate() {
                let slot = old.wrapping_add(i as u16) % size;
                let addr = ring
                    .checked_add(4 + u64::from(slot) * 8)
                    .ok_or(Error::AddressOverflow)?;
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
                elem[4..].copy_from_slice(&len.to_le_bytes());
                mem.write_slice(&elem, addr).map_err(Error::GuestMemory)?;
            }
            let new = old.wrapping_add(used.len() as u16);
            let idx_addr = ring.checked_add(2).ok_or(Error::AddressOverflow)?;
            // Release: the elements are visible before the index that covers them.
            mem.store(new.to_le(), idx_addr, Ordering::Release)
                .map_err(Error::GuestMemory)?;
            queue.set_next_used(new);
            fence(Ordering::SeqCst);
            let notify = if queue.event_idx_enabled() {
                let used_event_addr = GuestAddress(queue.avail_ring())
                    .checked_add(4 + 2 * u64::from(size))
                    .ok_or(Error::AddressOverflow)?;
                let used_event = u16::from_le(
                    mem.load::<u16>(used_event_addr, Ordering::Relaxed)
                        .map_err(Error::GuestMemory)?,
                );
                new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                super::super::driver_wants_interrupt(queue, mem)?
            };
            if notify {
                // A lost interrupt is recovered by the driver's next kick.
                let _ = interrupt.notify_queue(index);
            }
            Ok(())
        }
    }
}

/// Why a tx chain was dropped.
#[derive(Debug, PartialEq, Eq)]
enum TxDrop {
    WriteOnly,
    TooShort,
    TooLong,
    BadAddress,
    TooManySegments,
}

/// The readable slices of a tx chain and their total length, checked.
#[allow(clippy::type_complexity)]
fn gather_tx<'a, M: GuestMemory>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
) -> Result<(Vec<VolatileSlice<'a, BS<'a, M::Bitmap>>>, usize), TxDrop> {
    let mut total = 0usize;
    let mut slices = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            return Err(TxDrop::WriteOnly);
        }
        total = total
            .checked_add(desc.len() as usize)
            .filter(|&t| t <= MAX_FRAME_LEN)
            .ok_or(TxDrop::TooLong)?;
        if desc.len() == 0 {
            continue;
        }
        let iter = mem
            .get_slices(desc.addr(), desc.len() as usize, Permissions::Read)
            .map_err(|_| TxDrop::BadAddress)?;
        for slice in iter {
            slices.push(slice.map_err(|_| TxDrop::BadAddress)?);
            if slices.len() > MAX_IOVECS {
                return Err(TxDrop::TooManySegments);
            }
        }
    }
    if total < NET_HDR_LEN + ETH_HLEN {
        return Err(TxDrop::TooShort);
    }
    Ok((slices, total))
}

/// What became of a frame offered to the rx queue.
enum RxOutcome {
    Delivered,
    /// It fits in no buffer the guest can give; the buffers stay available.
    Dropped,
    /// Not enough buffers now; try again when the driver makes more
    /// available than the avail index seen (carried here).
    NoBuffers(u16),
}

/// The worker: queues, tap, limiters and the frame in flight from the tap.
pub(super) struct NetHandler {
    pub memory: Arc<GuestMemoryMmap>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// In index order: rx, tx, and ctrl if the driver was given one.
    pub queues: Vec<(Queue, EventFd)>,
    pub tap: Arc<Tap>,
    pub shared: Arc<Shared>,
    pub acked_features: u64,
    pub rx_limiter: RateLimiter,
    pub tx_limiter: RateLimiter,
    /// Interrupt every queue once the worker starts (after a restore: an
    /// interrupt may have been lost in flight).
    pub notify_on_start: bool,
    /// A frame read from the tap not yet given to the guest.
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// Whether `rx_frame` was charged to the rx limiter.
    rx_charged: bool,
    /// Used rx entries not yet published.
    rx_used: Vec<(u16, u32)>,
    /// Whether we want the tap's readability (rx can make progress).
    tap_rx: bool,
    /// Whether we wait for the tap to be writable (a tx frame got EAGAIN).
    tap_tx: bool,
    /// The tap's current registration in the epoll set.
    tap_registered: Option<EventSet>,
    /// The chain at the tx `next_avail` was already charged to the limiter
    /// (it got EAGAIN and goes out again when the tap is writable).
    tx_precharged: bool,
    /// Set after a tap read error until the next rx notification.
    tap_failed: bool,
    logged_tx_error: bool,
    /// Calls of `handle` (tests check the worker does not spin).
    pub wakeups: u64,
}

impl NetHandler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        memory: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
        tap: Arc<Tap>,
        shared: Arc<Shared>,
        acked_features: u64,
        rx_limiter: RateLimiter,
        tx_limiter: RateLimiter,
    ) -> NetHandler {
        NetHandler {
            memory,
            interrupt,
            queues,
            tap,
            shared,
            acked_features,
            rx_limiter,
            tx_limiter,
            notify_on_start: false,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            rx_charged: false,
            rx_used: Vec::new(),
            tap_rx: false,
            tap_tx: false,
            tap_registered: None,
            tx_precharged: false,
            tap_failed: false,
            logged_tx_error: false,
            wakeups: 0,
        }
    }

    fn has(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    fn ctrl_enabled(&self) -> bool {
        self.has(VIRTIO_NET_F_CTRL_VQ)
            && self
                .queues
                .get(CTRL_QUEUE as usize)
                .is_some_and(|(q, _)| q.ready())
    }

    pub fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(|(q, _)| q.state()).collect()
    }

    /// Whether the tap is being watched for rx (tests).
    #[cfg(test)]
    pub fn tap_polled(&self) -> bool {
        self.tap_registered
            .is_some_and(|set| set.contains(EventSet::IN))
    }

    /// Brings the tap's epoll registration in line with what rx and tx wait for.
    fn sync_tap(&mut self, events: &EventLoop) {
        let mut want = EventSet::empty();
        if self.tap_rx && !self.tap_failed {
            want |= EventSet::IN;
        }
        if self.tap_tx {
            want |= EventSet::OUT;
        }
        let fd = self.tap.as_raw_fd();
        let result = match self.tap_registered {
            None if want.is_empty() => Ok(()),
            None => events.add(fd, TAP_TOKEN, want),
            Some(_) if want.is_empty() => events.remove(fd),
            Some(current) if current != want => events.modify(fd, TAP_TOKEN, want),
            Some(_) => Ok(()),
        };
        match result {
            Ok(()) => self.tap_registered = (!want.is_empty()).then_some(want),
            Err(e) => log::error!("tap {}: cannot watch: {e}", self.tap.name()),
        }
    }

    fn start_polling_tap(&mut self, events: &EventLoop) {
        self.tap_rx = true;
        self.sync_tap(events);
    }

    fn stop_polling_tap(&mut self, events: &EventLoop) {
        self.tap_rx = false;
        self.sync_tap(events);
    }

    fn sync_throttled(&self) {
        let c = &self.shared.counters;
        c.rx_throttled
            .store(self.rx_limiter.throttled, Ordering::Relaxed);
        c.tx_throttled
            .store(self.tx_limiter.throttled, Ordering::Relaxed);
    }

    // ---- receive: tap -> guest ----

    /// Moves frames from the tap to the guest until the tap is empty, the
    /// guest has no buffers, the limiter says wait, or the budget is spent.
    /// The tap is watched only while reading it can make progress.
    fn process_rx(&mut self, events: &EventLoop) {
        if self.rx_limiter.is_blocked() {
            // The limiter's timer resumes us.
            self.stop_polling_tap(events);
            return;
        }
        let mut budget = RX_BUDGET;
        let mut rechecks = 0;
        loop {
            if self.rx_len == 0 {
                if budget == 0 {
                    self.start_polling_tap(events);
                    break;
                }
                let mem = self.memory.clone();
                let queue = &self.queues[RX_QUEUE as usize].0;
                let Ok(avail) = queue.avail_idx(&*mem, Ordering::Acquire) else {
                    // An unreadable ring: wait for the driver's next notification.
                    inc(&self.shared.counters.errors, 1);
                    self.stop_polling_tap(events);
                    break;
                };
                if avail_pending(queue, &mem).unwrap_or(0) == 0 {
                    // Leave frames in the tap (its queue applies back
                    // pressure) until the driver adds buffers.
                    if self.wait_for_rx_buffers(events, avail.0) && rechecks < MAX_RECHECKS {
                        rechecks += 1;
                        continue;
                    }
                    break;
                }
                match self.tap.read(&mut self.rx_frame) {
                    Ok(n) if n > self.rx_frame.len() => {
                        // tun reports the full length of a frame it had to
                        // truncate; none should be this large.
                        inc(&self.shared.counters.rx_dropped, 1);
                        budget -= 1;
                        continue;
                    }
                    Ok(n) if n >= NET_HDR_LEN + ETH_HLEN => {
                        self.rx_len = n;
                        self.rx_charged = false;
                        budget -= 1;
                    }
                    Ok(0) => {
                        self.tap_error(events, io::Error::from(io::ErrorKind::UnexpectedEof));
                        break;
                    }
                    Ok(_) => {
                        // A runt from the tap: not a frame.
                        inc(&self.shared.counters.errors, 1);
                        budget -= 1;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.start_polling_tap(events);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.tap_error(events, e);
                        break;
                    }
                }
            }
            if !self.rx_charged {
                let bytes = (self.rx_len - NET_HDR_LEN) as u64;
                if !self.rx_limiter.consume(bytes) {
                    self.sync_throttled();
                    self.stop_polling_tap(events);
                    break;
                }
                self.rx_charged = true;
            }
            match self.deliver_rx_frame() {
                RxOutcome::Delivered => {
                    let c = &self.shared.counters;
                    inc(&c.rx_frames, 1);
                    inc(&c.rx_bytes, (self.rx_len - NET_HDR_LEN) as u64);
                    self.rx_len = 0;
                }
                RxOutcome::Dropped => {
                    inc(&self.shared.counters.rx_dropped, 1);
                    self.rx_len = 0;
                }
                RxOutcome::NoBuffers(seen) => {
                    if self.wait_for_rx_buffers(events, seen) {
                        if rechecks < MAX_RECHECKS {
                            rechecks += 1;
                            continue;
                        }
                        // The driver keeps adding buffers: come back after
                        // the other events, through our own notification.
                        let _ = self.queues[RX_QUEUE as usize].1.write(1);
                    }
                    break;
                }
            }
        }
        self.flush_rx_used();
    }

    fn tap_error(&mut self, events: &EventLoop, e: io::Error) {
        inc(&self.shared.counters.errors, 1);
        log::warn!(
            "tap {}: read failed: {e}; receiving stops until the guest adds rx buffers",
            self.tap.name()
        );
        self.tap_failed = true;
        self.stop_polling_tap(events);
    }

    /// Asks the driver to notify us when it makes rx buffers available past
    /// avail index `seen`, and stops watching the tap. Returns true if it
    /// did so meanwhile (then the caller tries again).
    fn wait_for_rx_buffers(&mut self, events: &EventLoop, seen: u16) -> bool {
        // Publish first: the driver refills from what we return.
        self.flush_rx_used();
        let mem = self.memory.clone();
        let queue = &mut self.queues[RX_QUEUE as usize].0;
        let _ = queue.enable_notification(&*mem);
        if queue.event_idx_enabled() {
            // enable_notification asked for a kick past `next_avail`; the
            // buffers from there to `seen` are already there (too few for
            // the frame), so ask for one past `seen`.
            let size = u64::from(queue.size());
            if let Some(addr) = GuestAddress(queue.used_ring()).checked_add(4 + 8 * size) {
                let _ = mem.store(seen.to_le(), addr, Ordering::Relaxed);
            }
        }
        fence(Ordering::SeqCst);
        let more = match queue.avail_idx(&*mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != seen && avail_pending(queue, &mem).is_some(),
            Err(_) => false,
        };
        if !more {
            self.stop_polling_tap(events);
        }
        more
    }

    fn flush_rx_used(&mut self) {
        if self.rx_used.is_empty() {
            return;
        }
        let used = std::mem::take(&mut self.rx_used);
        let queue = &mut self.queues[RX_QUEUE as usize].0;
        if publish_used(queue, &self.memory, &*self.interrupt, RX_QUEUE, &used).is_err() {
            inc(&self.shared.counters.errors, 1);
        }
    }

    /// Copies the pending frame into rx chains (several with MRG_RXBUF),
    /// setting `num_buffers`. Writes go through vm-memory, which marks the
    /// dirty bitmap.
    fn deliver_rx_frame(&mut self) -> RxOutcome {
        let mem = self.memory.clone();
        let mem: &GuestMemoryMmap = &mem;
        let len = self.rx_len;
        let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let queue = &mut self.queues[RX_QUEUE as usize].0;
        let max_chains = usize::from(queue.size());
        let seen = match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx.0,
            Err(_) => return RxOutcome::NoBuffers(queue.next_avail()),
        };
        let mut start = queue.next_avail();
        let mut chains = Vec::new();
        let mut capacity = 0usize;
        while capacity < len && (mergeable || chains.is_empty()) && chains.len() < max_chains {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            // The first buffer must hold at least the header (5.1.6.3.1).
            let min = if chains.is_empty() { NET_HDR_LEN } else { 1 };
            match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= min => {
                    capacity += w.available_bytes();
                    chains.push((head, w));
                }
                _ => {
                    // Unusable (read-only, too small, outside memory):
                    // give it back empty (if its head is a valid index).
                    inc(&self.shared.counters.errors, 1);
                    if head < queue.size() {
                        self.rx_used.push((head, 0));
                    }
                    if chains.is_empty() {
                        start = queue.next_avail();
                        continue;
                    }
                    // In the middle of a frame: return what we took, drop the frame.
                    self.rx_used.extend(chains.iter().map(|(h, _)| (*h, 0)));
                    return RxOutcome::Dropped;
                }
            }
        }
        if capacity < len {
            let whole_ring = chains.len() >= max_chains;
            let single_too_small = !mergeable && !chains.is_empty();
            // Give the chains back untouched.
            queue.set_next_avail(start);
            return if whole_ring || single_too_small {
                RxOutcome::Dropped
            } else {
                RxOutcome::NoBuffers(seen)
            };
        }
        let count = chains.len() as u16;
        self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        for (head, mut writer) in chains {
            let take = writer.available_bytes().min(len - offset);
            let written = match writer.write_all(&self.rx_frame[offset..offset + take]) {
                Ok(()) => take,
                Err(_) => {
                    inc(&self.shared.counters.errors, 1);
                    writer.bytes_written()
                }
            };
            self.rx_used.push((head, written as u32));
            offset += take;
        }
        RxOutcome::Delivered
    }

    // ---- transmit: guest -> tap ----

    fn process_tx(&mut self, events: &EventLoop) {
        if self.tx_limiter.is_blocked() || self.tap_tx {
            // The limiter's timer or the tap's writability resumes us.
            return;
        }
        let mem = self.memory.clone();
        let mem: &GuestMemoryMmap = &mem;
        for round in 0.. {
            let queue = &mut self.queues[TX_QUEUE as usize].0;
            let _ = queue.disable_notification(mem);
            loop {
                let queue = &mut self.queues[TX_QUEUE as usize].0;
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                match gather_tx(mem, chain) {
                    Err(_) => inc(&self.shared.counters.tx_dropped, 1),
                    Ok((slices, len)) => {
                        let bytes = (len - NET_HDR_LEN) as u64;
                        if !std::mem::take(&mut self.tx_precharged)
                            && !self.tx_limiter.consume(bytes)
                        {
                            // Back on the ring; the limiter's timer resumes us.
                            let queue = &mut self.queues[TX_QUEUE as usize].0;
                            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                            self.sync_throttled();
                            return;
                        }
                        match self.tap.writev(&slices) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                // The tap's send buffer is full (TUNSETSNDBUF):
                                // back on the ring until the tap is writable.
                                let queue = &mut self.queues[TX_QUEUE as usize].0;
                                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                                self.tx_precharged = true;
                                self.tap_tx = true;
                                self.sync_tap(events);
                                return;
                            }
                            Ok(_) => {
                                let c = &self.shared.counters;
                                inc(&c.tx_frames, 1);
                                inc(&c.tx_bytes, bytes);
                            }
                            Err(e) => {
                                inc(&self.shared.counters.errors, 1);
                                if !std::mem::replace(&mut self.logged_tx_error, true) {
                                    log::warn!(
                                        "tap {}: write failed: {e} (frames dropped; logged once)",
                                        self.tap.name()
                                    );
                                }
                            }
                        }
                    }
                }
                let queue = &mut self.queues[TX_QUEUE as usize].0;
                if complete(queue, mem, &*self.interrupt, TX_QUEUE, head, 0).is_err() {
                    inc(&self.shared.counters.errors, 1);
                }
            }
            let queue = &mut self.queues[TX_QUEUE as usize].0;
            let more = queue.enable_notification(mem).unwrap_or(false);
            match avail_pending(queue, mem) {
                Some(n) if more && n > 0 => {
                    if round + 1 >= TX_ROUNDS {
                        // Yield to the other events; our own kick brings us back.
                        let _ = self.queues[TX_QUEUE as usize].1.write(1);
                        return;
                    }
                }
                // Done, or a broken ring that only the driver's next kick retries.
                _ => return,
            }
        }
    }

    // ---- control queue ----

    fn process_ctrl(&mut self) {
        if !self.ctrl_enabled() {
            return;
        }
        let mem = self.memory.clone();
        let mem: &GuestMemoryMmap = &mem;
        for _ in 0..TX_ROUNDS {
            loop {
                let queue = &mut self.queues[CTRL_QUEUE as usize].0;
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let reader = chain.clone().reader(mem);
                let writer = chain.writer(mem);
                let used = match (reader, writer) {
                    (Ok(mut reader), Ok(mut writer)) if writer.available_bytes() >= 1 => {
                        let ack = self.handle_ctrl(&mut reader);
                        if ack != VIRTIO_NET_OK as u8 {
                            inc(&self.shared.counters.errors, 1);
                        }
                        match writer.write_obj(ack) {
                            Ok(()) => 1,
                            Err(_) => 0,
                        }
                    }
                    _ => {
                        inc(&self.shared.counters.errors, 1);
                        0
                    }
                };
                let queue = &mut self.queues[CTRL_QUEUE as usize].0;
                if complete(queue, mem, &*self.interrupt, CTRL_QUEUE, head, used).is_err() {
                    inc(&self.shared.counters.errors, 1);
                }
            }
            let queue = &mut self.queues[CTRL_QUEUE as usize].0;
            let more = queue.enable_notification(mem).unwrap_or(false);
            if !(more && avail_pending(queue, mem).is_some_and(|n| n > 0)) {
                return;
            }
        }
    }

    /// Executes one control command; returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
    fn handle_ctrl<B: BitmapSlice>(&mut self, r: &mut Reader<'_, B>) -> u8 {
        const OK: u8 = VIRTIO_NET_OK as u8;
        const ERR: u8 = VIRTIO_NET_ERR as u8;
        let Ok([class, command]) = r.read_obj::<[u8; 2]>() else {
            return ERR;
        };
        match (u32::from(class), u32::from(command)) {
            // Receive filters: we deliver everything the tap gives us, which
            // is a superset of any mode; accept them.
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC..=VIRTIO_NET_CTRL_RX_NOBCAST) => {
                if r.read_obj::<u8>().is_ok() {
                    OK
                } else {
                    ERR
                }
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
                // Two tables (unicast, multicast): le32 entries, then 6 bytes each.
                for _ in 0..2 {
                    let Ok(entries) = r.read_obj::<u32>().map(u32::from_le) else {
                        return ERR;
                    };
                    let bytes = entries as usize * 6;
                    if bytes > r.available_bytes() {
                        return ERR;
                    }
                    let mut skip = vec![0u8; bytes];
                    if std::io::Read::read_exact(r, &mut skip).is_err() {
                        return ERR;
                    }
                }
                OK
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => match r.read_obj::<[u8; 6]>() {
                Ok(mac) if mac[0] & 1 == 0 => {
                    self.shared.set_mac(mac);
                    OK
                }
                _ => ERR,
            },
            (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD | VIRTIO_NET_CTRL_VLAN_DEL) => {
                if r.read_obj::<u16>().is_ok() {
                    OK
                } else {
                    ERR
                }
            }
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
                self.shared
                    .status
                    .fetch_and(!(VIRTIO_NET_S_ANNOUNCE as u16), Ordering::SeqCst);
                OK
            }
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                match r.read_obj::<u16>().map(u16::from_le) {
                    Ok(1) => OK,
                    _ => ERR,
                }
            }
            (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET) => {
                if !self.has(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) {
                    return ERR;
                }
                let Ok(offloads) = r.read_obj::<u64>().map(u64::from_le) else {
                    return ERR;
                };
                // Only offloads that were negotiated may be turned on.
                if offloads & !(self.acked_features & GUEST_OFFLOAD_MASK) != 0 {
                    return ERR;
                }
                match self.tap.set_offload(tun_offload_flags(offloads)) {
                    Ok(()) => {
                        self.shared.guest_offloads.store(offloads, Ordering::SeqCst);
                        OK
                    }
                    Err(e) => {
                        log::warn!("{e}");
                        ERR
                    }
                }
            }
            _ => ERR,
        }
    }
}

impl WorkerHandler for NetHandler {
    const THREAD_KIND: confine::ThreadKind = confine::ThreadKind::Net;

    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        // A new epoll set (after a pause): nothing of ours is in it yet.
        self.tap_registered = None;
        for (i, (_, evt)) in self.queues.iter().enumerate() {
            events.add(evt.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        if self.rx_limiter.is_limited() {
            events.add(self.rx_limiter.timer_fd(), RX_TIMER_TOKEN, EventSet::IN)?;
        }
        if self.tx_limiter.is_limited() {
            events.add(self.tx_limiter.timer_fd(), TX_TIMER_TOKEN, EventSet::IN)?;
        }
        // Work the driver queued before we started (or before a pause or a
        // migration) without waiting for another notification.
        self.process_ctrl();
        self.process_tx(events);
        self.process_rx(events);
        self.sync_tap(events);
        if std::mem::take(&mut self.notify_on_start) {
            for i in 0..self.queues.len() {
                if self.queues[i].0.ready() {
                    let _ = self.interrupt.notify_queue(i as u16);
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, token: u64, set: EventSet, events: &EventLoop) {
        self.wakeups += 1;
        match token {
            RX_TOKEN | TX_TOKEN | CTRL_TOKEN => {
                if let Some((_, evt)) = self.queues.get(token as usize) {
                    // Non-blocking or not, it is readable: epoll said so.
                    let _ = evt.read();
                }
                match token {
                    RX_TOKEN => {
                        self.tap_failed = false;
                        self.process_rx(events);
                    }
                    TX_TOKEN => self.process_tx(events),
                    _ => self.process_ctrl(),
                }
            }
            TAP_TOKEN => {
                let error = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
                if self.tap_tx && (error || set.contains(EventSet::OUT)) {
                    self.tap_tx = false;
                    self.sync_tap(events);
                    self.process_tx(events);
                }
                if self.tap_rx && (error || set.contains(EventSet::IN)) {
                    self.process_rx(events);
                }
            }
            RX_TIMER_TOKEN if self.rx_limiter.on_timer() => self.process_rx(events),
            TX_TIMER_TOKEN if self.tx_limiter.on_timer() => self.process_tx(events),
            _ => {}
        }
    }
}

/// The gratuitous frame the host sends for the guest when the driver
/// cannot announce itself: a RARP request (what QEMU sends), from `mac` to
/// broadcast, with an empty virtio header in front, padded to 60 bytes.
pub(super) fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut frame = vec![0u8; NET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x8035u16.to_be_bytes()); // ETH_P_RARP
    frame.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame.push(6);
    frame.push(4);
    frame.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0; 4]);
    frame.resize(NET_HDR_LEN + 60, 0);
    frame
}

// Queue event-index handling must follow the negotiated feature.
pub(super) fn apply_event_idx(queue: &mut Queue, acked_features: u64) {
    queue.set_event_idx(acked_features & (1 << F_EVENT_IDX) != 0);
}
