//! virtio-net tests. The unit tests run the device on a datagram socket
//! pair standing in for the tap; the `real_tap_*` tests use real taps in a
//! fresh network namespace (skipped, with the reason printed, only if
//! /dev/net/tun cannot be opened).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use config::{NetConfig, RateLimitConfig};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::handler::{bit, publish_used, tun_offload_flags};
use super::tap::{self, Tap};
use super::*;
use crate::virtio::{
    ActivateContext, ActivateError, DeviceState, VirtioDevice, VirtioInterrupt, COMMON_FEATURES,
    F_EVENT_IDX, F_VERSION_1,
};
use crate::GuestMemoryMmap;

// ---- helpers ----

#[derive(Default)]
struct TestInterrupt {
    queues: [AtomicU64; 3],
    config: AtomicU64,
}

impl VirtioInterrupt for TestInterrupt {
    fn notify_queue(&self, index: u16) -> std::io::Result<()> {
        self.queues[index as usize].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn notify_config(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl TestInterrupt {
    fn queue(&self, i: u16) -> u64 {
        self.queues[i as usize].load(Ordering::SeqCst)
    }
}

fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Guest memory that lives as long as the test process, so that the
/// driver-side mocks (which borrow it) can live in the test rig.
fn static_memory(mem: &Arc<GuestMemoryMmap>) -> &'static GuestMemoryMmap {
    Box::leak(Box::new(mem.clone()))
}

/// The driver side of one queue: descriptors are allocated in order.
/// `MockSplitQueue` writes the descriptor table and the available ring; the
/// used ring is moved 16 KiB past the queue base, because the mock places
/// its own used ring inside the available ring (it computes the ring end
/// from the entry count, not the byte size).
struct GuestQueue {
    mock: MockSplitQueue<'static, GuestMemoryMmap>,
    used: GuestAddress,
    size: u16,
    next_desc: u16,
    kick: EventFd,
}

impl GuestQueue {
    fn new(mem: &'static GuestMemoryMmap, base: u64, size: u16) -> GuestQueue {
        GuestQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(base), size),
            used: GuestAddress(base + 0x4000),
            size,
            next_desc: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    fn mock(&self, _mem: &GuestMemoryMmap) -> &MockSplitQueue<'static, GuestMemoryMmap> {
        &self.mock
    }

    /// Makes a chain of (address, length, device-writable) available; returns
    /// its head. Descriptors are taken in order, wrapping (a chain never
    /// straddles the end of the table). The mock writes the descriptors; the
    /// avail ring entry and index are written here, modulo the ring size,
    /// with the index stored last (Release), as a driver does.
    fn add(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let count = descs.len() as u16;
        if self.next_desc % self.size + count > self.size {
            self.next_desc = 0;
        }
        let start = self.next_desc % self.size;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let mut next = 0;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                next = start + i as u16 + 1;
            }
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.mock.desc_table().store(start + i as u16, raw).unwrap();
        }
        self.next_desc = (start + count) % self.size;
        let avail = self.mock.avail_addr().0;
        let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(start, GuestAddress(slot)).unwrap();
        mem.store(
            idx.wrapping_add(1),
            GuestAddress(avail + 2),
            Ordering::Release,
        )
        .unwrap();
        start
    }

    fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.mock.avail_addr().0 + 2))
            .unwrap()
    }

    /// Kicks as a driver with EVENT_IDX does: only if the device's
    /// `avail_event` lies in the entries added since `old` (a full fence first).
    fn kick_if_needed(&self, mem: &GuestMemoryMmap, old: u16) {
        std::sync::atomic::fence(Ordering::SeqCst);
        let new = self.avail_idx(mem);
        let event_addr = self.used.0 + 4 + 8 * u64::from(self.size);
        let event: u16 = mem.read_obj(GuestAddress(event_addr)).unwrap();
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.kick();
        }
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    fn used_addr(&self, _mem: &GuestMemoryMmap) -> GuestAddress {
        self.used
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used_addr(mem).0 + 2))
            .unwrap()
    }

    /// (head, len) of every used entry so far.
    fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let base = self.used_addr(mem).0 + 4;
        (0..self.used_idx(mem))
            .map(|i| {
                let at = base + 8 * u64::from(i % self.size);
                (
                    mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
                    mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// Used entry number `i` (counting from 0, wrapping around the ring).
    fn used_entry(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used.0 + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
            mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn queue(&self) -> Queue {
        let mut queue = self.mock.create_queue::<Queue>().unwrap();
        let used = self.used.0;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue
    }

    fn queue_and_fd(&self, _mem: &GuestMemoryMmap) -> (Queue, EventFd) {
        (self.queue(), self.kick.try_clone().unwrap())
    }
}

/// The host end of the socket pair that stands in for the tap.
struct HostEnd(OwnedFd);

impl HostEnd {
    fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer is valid for its length; the fd is ours.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        recv_timeout(self.0.as_raw_fd(), timeout)
    }
}

fn recv_timeout(fd: RawFd, timeout: Duration) -> Option<Vec<u8>> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if n <= 0 {
        return None;
    }
    let mut buf = vec![0u8; 70000];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn socket_tap() -> (Tap, HostEnd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0);
    // SAFETY: both fds were just created and are owned by nothing else.
    let (dev, host) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFL on our own fd.
    unsafe { libc::fcntl(dev.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    (Tap::from_socket(dev, "sock0"), HostEnd(host))
}

/// A socket tap whose send buffer holds only a few frames.
fn small_socket_tap() -> (Tap, HostEnd) {
    let (tap, host) = socket_tap();
    let size: libc::c_int = 4096;
    // SAFETY: SO_SNDBUF reads an int from the pointer, which points at `size`.
    let ret = unsafe {
        libc::setsockopt(
            tap.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(ret, 0);
    (tap, host)
}

fn config(mac: Option<&str>) -> NetConfig {
    NetConfig {
        tap: Some("sock0".into()),
        id: Some("net0".into()),
        mac: mac.map(str::to_string),
        ..Default::default()
    }
}

fn fake_net(config: &NetConfig) -> (Net, HostEnd) {
    let (tap, host) = socket_tap();
    (Net::with_tap(config, tap).unwrap(), host)
}

/// An Ethernet frame of `len` bytes with ethertype 0x88b5 and a pattern.
fn ether_frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    while f.len() < len {
        f.push(seed.wrapping_add(f.len() as u8));
    }
    f
}

fn with_hdr(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; NET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}

const RX_BASE: u64 = 0x10000;
const TX_BASE: u64 = 0x20000;
const CTRL_BASE: u64 = 0x30000;
const BUF: u64 = 0x100000;

struct Rig {
    mem: Arc<GuestMemoryMmap>,
    guest: &'static GuestMemoryMmap,
    irq: Arc<TestInterrupt>,
    rx: GuestQueue,
    tx: GuestQueue,
    ctrl: GuestQueue,
}

impl Rig {
    fn new() -> Rig {
        let mem = memory();
        let guest = static_memory(&mem);
        Rig {
            mem,
            guest,
            irq: Arc::new(TestInterrupt::default()),
            rx: GuestQueue::new(guest, RX_BASE, QUEUE_SIZE),
            tx: GuestQueue::new(guest, TX_BASE, QUEUE_SIZE),
            ctrl: GuestQueue::new(guest, CTRL_BASE, QUEUE_SIZE),
        }
    }

    fn context(&self, acked: u64) -> ActivateContext {
        ActivateContext {
            memory: self.mem.clone(),
            queues: vec![
                self.rx.queue_and_fd(&self.mem),
                self.tx.queue_and_fd(&self.mem),
                self.ctrl.queue_and_fd(&self.mem),
            ],
            interrupt: self.irq.clone(),
            acked_features: acked,
        }
    }

    fn activate(&self, net: &mut Net, acked: u64) {
        net.activate(self.context(acked)).unwrap();
    }

    /// Posts `count` rx buffers of `len` bytes at `BUF + 64 KiB * i`.
    fn post_rx(&mut self, first: u64, count: u64, len: u32) -> Vec<u16> {
        (first..first + count)
            .map(|i| self.rx.add(&self.mem, &[(BUF + 0x10000 * i, len, true)]))
            .collect()
    }

    /// A tx chain: header descriptor then the frame.
    fn post_tx(&mut self, at: u64, frame: &[u8]) -> u16 {
        self.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(at + 0x100))
            .unwrap();
        self.tx.add(
            &self.mem,
            &[
                (at, NET_HDR_LEN as u32, false),
                (at + 0x100, frame.len() as u32, false),
            ],
        )
    }

    /// A control command; returns (head, address of the ack byte).
    fn post_ctrl(&mut self, at: u64, command: &[u8]) -> (u16, u64) {
        self.mem.write_slice(command, GuestAddress(at)).unwrap();
        let ack = at + 0x800;
        self.mem.write_slice(&[0xee], GuestAddress(ack)).unwrap();
        let head = self.ctrl.add(
            &self.mem,
            &[(at, command.len() as u32, false), (ack, 1, true)],
        );
        (head, ack)
    }

    fn ctrl_command(&mut self, at: u64, command: &[u8]) -> u8 {
        let before = self.ctrl.used_idx(&self.mem);
        let (_, ack) = self.post_ctrl(at, command);
        self.ctrl.kick();
        wait_for("the control command", || {
            self.ctrl.used_idx(&self.mem) == before + 1
        });
        let (_, len) = *self.ctrl.used(&self.mem).last().unwrap();
        assert_eq!(len, 1);
        self.mem.read_obj::<u8>(GuestAddress(ack)).unwrap()
    }
}

const BASE_FEATURES: u64 = (1 << F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

fn counter(net: &Net, name: &str) -> u64 {
    net.counters()[name]
}

// ---- config space and features ----

#[test]
fn config_space_bytes() {
    let (net, _host) = fake_net(&config(Some("52:54:00:12:34:56")));
    assert_eq!(net.device_type(), crate::virtio::TYPE_NET);
    assert_eq!(net.queue_max_sizes(), vec![256, 256, 256]);
    let mut all = [0xffu8; 10];
    net.read_config(0, &mut all);
    assert_eq!(all, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 1, 0]);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    let mut mid = [0u8; 4];
    net.read_config(4, &mut mid);
    assert_eq!(mid, [0x34, 0x56, 1, 0]);
    // Past the end: zeros, never a panic.
    let mut tail = [0xffu8; 8];
    net.read_config(8, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
    let mut far = [0xffu8; 4];
    net.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    net.read_config(1 << 40, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn offered_features() {
    let (net, _host) = fake_net(&config(None));
    let f = net.features();
    assert_eq!(f & COMMON_FEATURES, COMMON_FEATURES);
    for feature in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    ] {
        assert_ne!(f & bit(feature), 0, "feature {feature}");
    }
    for feature in [VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_MTU] {
        assert_eq!(f & bit(feature), 0, "feature {feature}");
    }
}

#[test]
fn default_mac_is_stable_local_unicast() {
    let a = default_mac("net0");
    assert_eq!(a, default_mac("net0"));
    assert_ne!(a, default_mac("net1"));
    for id in ["net0", "net1", "x", "a-very-long-device-id"] {
        let m = default_mac(id);
        assert_eq!(m[0] & 0x03, 0x02, "{id}: locally administered unicast");
    }
    let (net, _host) = fake_net(&config(None));
    assert_eq!(net.mac(), default_mac("net0"));
    let (tap, _host) = socket_tap();
    let e = Net::with_tap(&config(Some("01:00:5e:00:00:01")), tap)
        .err()
        .unwrap();
    assert!(e.to_string().contains("multicast"), "{e}");
}

#[test]
fn offload_flags_follow_the_guest_features() {
    assert_eq!(tun_offload_flags(0), 0);
    // TSO without checksum offload is impossible for the tap: nothing.
    assert_eq!(tun_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(
        tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
        libc::TUN_F_CSUM
    );
    let all = bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_GUEST_UFO);
    assert_eq!(
        tun_offload_flags(all),
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO
    );
    // ECN only with TSO.
    assert_eq!(
        tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        libc::TUN_F_CSUM
    );
}

#[test]
fn activation_needs_rx_and_tx() {
    let rig = Rig::new();
    let (mut net, _host) = fake_net(&config(None));
    let mut ctx = rig.context(BASE_FEATURES);
    ctx.queues[1].0.set_ready(false);
    assert!(matches!(
        net.activate(ctx),
        Err(ActivateError::MissingQueue(1))
    ));
    // CTRL_VQ negotiated but no control queue.
    let mut ctx = rig.context(BASE_FEATURES | bit(VIRTIO_NET_F_CTRL_VQ));
    ctx.queues.truncate(2);
    assert!(matches!(
        net.activate(ctx),
        Err(ActivateError::MissingQueue(2))
    ));
    assert!(!net.is_active());
    rig.activate(&mut net, BASE_FEATURES);
    assert!(net.is_active());
    assert!(net.activate(rig.context(BASE_FEATURES)).is_err());
}

// ---- transmit ----

#[test]
fn tx_frame_reaches_the_tap() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    rig.activate(&mut net, BASE_FEATURES | (1 << F_EVENT_IDX));
    let frame = ether_frame([0xff; 6], net.mac(), 100, 1);
    let head = rig.post_tx(BUF, &frame);
    rig.tx.kick();
    let got = host
        .recv(Duration::from_secs(5))
        .expect("a frame on the tap");
    assert_eq!(got, with_hdr(&frame));
    wait_for("the tx completion", || rig.tx.used_idx(&rig.mem) == 1);
    assert_eq!(rig.tx.used(&rig.mem), vec![(u32::from(head), 0)]);
    assert!(rig.irq.queue(TX_QUEUE) >= 1);
    assert_eq!(counter(&net, "tx_frames"), 1);
    assert_eq!(counter(&net, "tx_bytes"), 100);
    assert_eq!(counter(&net, "tx_dropped"), 0);
}

#[test]
fn malformed_tx_chains_are_dropped_counted_and_completed() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    rig.activate(&mut net, BASE_FEATURES);
    let mem = rig.mem.clone();
    // Too short for the header.
    rig.tx.add(&mem, &[(BUF, 8, false)]);
    // Header and a frame too short to be Ethernet.
    rig.tx
        .add(&mem, &[(BUF, 12, false), (BUF + 0x100, 10, false)]);
    // A device-writable descriptor in a tx chain.
    rig.tx
        .add(&mem, &[(BUF, 12, false), (BUF + 0x100, 100, true)]);
    // Longer than any frame.
    rig.tx.add(
        &mem,
        &[
            (BUF, 12, false),
            (BUF + 0x1000, 40000, false),
            (BUF + 0x20000, 40000, false),
        ],
    );
    // Outside guest memory.
    rig.tx
        .add(&mem, &[(BUF, 12, false), (0x4000_0000, 100, false)]);
    // Descriptor length that wraps the address space.
    rig.tx.add(&mem, &[(u64::MAX - 10, 100, false)]);
    // And one good frame after them.
    let frame = ether_frame([0xff; 6], net.mac(), 60, 7);
    rig.post_tx(BUF + 0x40000, &frame);
    rig.tx.kick();
    let got = host.recv(Duration::from_secs(5)).expect("the good frame");
    assert_eq!(got, with_hdr(&frame));
    wait_for("all completions", || rig.tx.used_idx(&mem) == 7);
    assert!(rig.tx.used(&mem).iter().all(|&(_, len)| len == 0));
    assert!(
        host.recv(Duration::from_millis(50)).is_none(),
        "only one frame"
    );
    assert_eq!(counter(&net, "tx_dropped"), 6);
    assert_eq!(counter(&net, "tx_frames"), 1);
}

#[test]
fn tx_waits_for_a_full_tap_instead_of_dropping() {
    let mut rig = Rig::new();
    let (tap, host) = small_socket_tap();
    let mut net = Net::with_tap(&config(None), tap).unwrap();
    rig.activate(&mut net, BASE_FEATURES | (1 << F_EVENT_IDX));
    let frames: Vec<Vec<u8>> = (0..40)
        .map(|i| ether_frame([0xff; 6], net.mac(), 1000, i))
        .collect();
    for (i, frame) in frames.iter().enumerate() {
        rig.post_tx(BUF + 0x2000 * i as u64, frame);
    }
    rig.tx.kick();
    std::thread::sleep(Duration::from_millis(200));
    let done = rig.tx.used_idx(&rig.mem);
    assert!(done < 40, "the tap cannot hold 40 frames");
    net.pause();
    let wakeups = net.paused_handler().unwrap().wakeups;
    assert!(wakeups <= 3, "waiting for the tap must not spin: {wakeups}");
    net.resume();
    for (i, frame) in frames.iter().enumerate() {
        let got = host.recv(Duration::from_secs(5)).expect("every frame");
        assert_eq!(got, with_hdr(frame), "frame {i}");
    }
    wait_for("all completions", || rig.tx.used_idx(&rig.mem) == 40);
    assert_eq!(counter(&net, "errors"), 0);
    assert_eq!(counter(&net, "tx_frames"), 40);
}

#[test]
fn broken_avail_index_does_not_hang_or_spin() {
    let rig = Rig::new();
    let (mut net, _host) = fake_net(&config(None));
    rig.activate(&mut net, BASE_FEATURES);
    // An avail index more than a queue size ahead.
    let avail = rig.tx.mock(&rig.mem).avail_addr();
    rig.mem
        .write_obj::<u16>(1000, GuestAddress(avail.0 + 2))
        .unwrap();
    rig.tx.kick();
    let avail = rig.rx.mock(&rig.mem).avail_addr();
    rig.mem
        .write_obj::<u16>(2000, GuestAddress(avail.0 + 2))
        .unwrap();
    rig.rx.kick();
    std::thread::sleep(Duration::from_millis(200));
    net.pause();
    let wakeups = net.paused_handler().unwrap().wakeups;
    assert!(wakeups <= 4, "{wakeups} wakeups");
    net.resume();
    assert!(net.reset().is_some());
}

#[test]
fn tx_rate_limit_delays_frames() {
    let mut rig = Rig::new();
    let mut cfg = config(None);
    cfg.rate_limit = Some(RateLimitConfig {
        bytes_per_sec: None,
        ops_per_sec: Some(5),
    });
    let (mut net, host) = fake_net(&cfg);
    rig.activate(&mut net, BASE_FEATURES);
    let start = Instant::now();
    for i in 0..8u64 {
        let frame = ether_frame([0xff; 6], net.mac(), 60, i as u8);
        rig.post_tx(BUF + 0x1000 * i, &frame);
    }
    rig.tx.kick();
    let mut got = 0;
    while got < 8 {
        host.recv(Duration::from_secs(5))
            .expect("frames keep coming");
        got += 1;
    }
    // The bucket holds 5; 3 more at 5/s take about 0.6 s.
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    assert!(counter(&net, "throttled") >= 1);
    wait_for("completions", || rig.tx.used_idx(&rig.mem) == 8);
}

// ---- receive ----

#[test]
fn rx_frame_spans_mergeable_buffers() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    let heads = rig.post_rx(0, 3, 1024);
    rig.activate(&mut net, BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF));
    let frame = ether_frame(net.mac(), HOST_MAC, 2000, 3);
    let mut sent = with_hdr(&frame);
    sent[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    host.send(&sent);
    wait_for("the frame", || rig.rx.used_idx(&rig.mem) == 2);
    let used = rig.rx.used(&rig.mem);
    assert_eq!(
        used,
        vec![
            (u32::from(heads[0]), 1024),
            (u32::from(heads[1]), 2012 - 1024)
        ]
    );
    let mut got = vec![0u8; 2012];
    rig.mem
        .read_slice(&mut got[..1024], GuestAddress(BUF))
        .unwrap();
    rig.mem
        .read_slice(&mut got[1024..], GuestAddress(BUF + 0x10000))
        .unwrap();
    assert_eq!(
        got[0], VIRTIO_NET_HDR_F_DATA_VALID as u8,
        "header flags kept"
    );
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[NET_HDR_LEN..], &frame[..]);
    assert!(rig.irq.queue(RX_QUEUE) >= 1);
    assert_eq!(counter(&net, "rx_frames"), 1);
    assert_eq!(counter(&net, "rx_bytes"), 2000);
    // The dirty bitmap saw the writes.
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let region = rig.mem.iter().next().unwrap();
    assert!(region.bitmap().dirty_at(BUF as usize));
    assert!(region.bitmap().dirty_at(BUF as usize + 0x10000));
}

#[test]
fn rx_without_mergeable_buffers_drops_what_does_not_fit() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    let heads = rig.post_rx(0, 1, 1000);
    rig.activate(&mut net, BASE_FEATURES);
    host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 1500, 1)));
    wait_for("the drop", || counter(&net, "rx_dropped") == 1);
    assert_eq!(rig.rx.used_idx(&rig.mem), 0, "the buffer stays available");
    let small = ether_frame(net.mac(), HOST_MAC, 500, 2);
    host.send(&with_hdr(&small));
    wait_for("the small frame", || rig.rx.used_idx(&rig.mem) == 1);
    assert_eq!(rig.rx.used(&rig.mem), vec![(u32::from(heads[0]), 512)]);
    let mut got = vec![0u8; 512];
    rig.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[NET_HDR_LEN..], &small[..]);
}

#[test]
fn rx_frame_larger_than_the_whole_ring_is_dropped() {
    let mut rig = Rig::new();
    rig.rx = GuestQueue::new(rig.guest, 0x50000, 4);
    let (mut net, host) = fake_net(&config(None));
    rig.post_rx(0, 4, 256);
    rig.activate(&mut net, BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF));
    host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 2000, 1)));
    wait_for("the drop", || counter(&net, "rx_dropped") == 1);
    host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 600, 1)));
    wait_for("the next frame", || rig.rx.used_idx(&rig.mem) == 3);
    assert_eq!(counter(&net, "rx_frames"), 1);
}

#[test]
fn rx_without_buffers_does_not_spin() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    rig.activate(&mut net, BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF));
    for i in 0..3 {
        host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 100, i)));
    }
    std::thread::sleep(Duration::from_millis(300));
    net.pause();
    {
        let handler = net.paused_handler().unwrap();
        assert!(handler.wakeups <= 2, "{} wakeups", handler.wakeups);
        assert!(
            !handler.tap_polled(),
            "the tap is not watched without buffers"
        );
    }
    assert_eq!(counter(&net, "rx_frames"), 0);
    net.resume();
    rig.post_rx(0, 4, 2048);
    rig.rx.kick();
    wait_for("the queued frames", || counter(&net, "rx_frames") == 3);
    assert_eq!(rig.rx.used_idx(&rig.mem), 3);
    assert_eq!(counter(&net, "rx_dropped"), 0);
}

#[test]
fn rx_partial_buffers_wait_for_more() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    rig.post_rx(0, 1, 1024);
    rig.activate(
        &mut net,
        BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF) | (1 << F_EVENT_IDX),
    );
    host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 3000, 1)));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rig.rx.used_idx(&rig.mem), 0, "one buffer is not enough");
    // With EVENT_IDX the device asked for a kick past the buffer it has.
    let avail_event = rig.rx.used_addr(&rig.mem).0 + 4 + 8 * u64::from(QUEUE_SIZE);
    assert_eq!(
        rig.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(),
        1
    );
    rig.post_rx(1, 2, 1024);
    rig.rx.kick();
    wait_for("the frame", || rig.rx.used_idx(&rig.mem) == 3);
    assert_eq!(counter(&net, "rx_frames"), 1);
}

#[test]
fn bad_rx_buffers_are_returned_empty() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    let mem = rig.mem.clone();
    // Read-only, too small for the header, outside memory; then a good one.
    let bad = [
        rig.rx.add(&mem, &[(BUF, 1024, false)]),
        rig.rx.add(&mem, &[(BUF, 8, true)]),
        rig.rx.add(&mem, &[(0x4000_0000, 1024, true)]),
    ];
    let good = rig.rx.add(&mem, &[(BUF + 0x10000, 1024, true)]);
    rig.activate(&mut net, BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF));
    host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 100, 1)));
    wait_for("the frame", || counter(&net, "rx_frames") == 1);
    let used = rig.rx.used(&mem);
    assert_eq!(
        used,
        vec![
            (u32::from(bad[0]), 0),
            (u32::from(bad[1]), 0),
            (u32::from(bad[2]), 0),
            (u32::from(good), 112)
        ]
    );
    assert_eq!(counter(&net, "errors"), 3);
}

#[test]
fn rx_rate_limit_delays_frames() {
    let mut rig = Rig::new();
    let mut cfg = config(None);
    cfg.rate_limit = Some(RateLimitConfig {
        bytes_per_sec: None,
        ops_per_sec: Some(4),
    });
    let (mut net, host) = fake_net(&cfg);
    rig.post_rx(0, 8, 2048);
    rig.activate(&mut net, BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF));
    let start = Instant::now();
    for i in 0..6 {
        host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 100, i)));
    }
    wait_for("all frames", || counter(&net, "rx_frames") == 6);
    // 4 at once, 2 more at 4/s.
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "{:?}",
        start.elapsed()
    );
    assert!(counter(&net, "throttled") >= 1);
}

#[test]
fn batched_used_entries_respect_event_idx() {
    let mem = memory();
    let gq = GuestQueue::new(static_memory(&mem), RX_BASE, 16);
    let mut queue = gq.queue();
    queue.set_event_idx(true);
    let irq = TestInterrupt::default();
    let used_event = GuestAddress(gq.mock(&mem).avail_addr().0 + 4 + 2 * 16);
    // The driver wants an interrupt after entry 5: a batch of 0..2 does not cross it.
    mem.write_obj::<u16>(5, used_event).unwrap();
    publish_used(&mut queue, &mem, &irq, 0, &[(0, 10), (1, 20)]).unwrap();
    assert_eq!(irq.queue(0), 0);
    assert_eq!(gq.used(&mem), vec![(0, 10), (1, 20)]);
    // 2..6 crosses it.
    publish_used(&mut queue, &mem, &irq, 0, &[(2, 1), (3, 1), (4, 1), (5, 1)]).unwrap();
    assert_eq!(irq.queue(0), 1);
    assert_eq!(queue.next_used(), 6);
    // A single entry goes through `complete`, with the same accounting.
    mem.write_obj::<u16>(6, used_event).unwrap();
    publish_used(&mut queue, &mem, &irq, 0, &[(6, 1)]).unwrap();
    assert_eq!(irq.queue(0), 2);
    // Invalid heads are refused without publishing anything.
    assert!(publish_used(&mut queue, &mem, &irq, 0, &[(7, 1), (99, 1)]).is_err());
    assert_eq!(gq.used_idx(&mem), 7);
}

/// Frame `i` of the stress tests: 60 to 2959 bytes.
fn stress_frame(i: usize, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    ether_frame(dst, src, 60 + (i * 997) % 2900, i as u8)
}

#[test]
fn rx_stress_with_event_idx_and_recycled_buffers() {
    const FRAMES: usize = 3000;
    const BUFFERS: u64 = 32;
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    let mem = rig.mem.clone();
    // Buffer of descriptor head h: one per descriptor slot.
    let buf = |head: u32| BUF + 0x1000 * u64::from(head);
    let mut heads = Vec::new();
    for _ in 0..BUFFERS {
        let head = rig.rx.next_desc % QUEUE_SIZE;
        heads.push(rig.rx.add(&mem, &[(buf(u32::from(head)), 1024, true)]));
    }
    rig.activate(
        &mut net,
        BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF) | (1 << F_EVENT_IDX),
    );
    let mac = net.mac();
    let sender = std::thread::spawn(move || {
        for i in 0..FRAMES {
            // Blocking sends: the socket applies back pressure.
            host.send(&with_hdr(&stress_frame(i, mac, HOST_MAC)));
        }
        host
    });
    let mut seen: u16 = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..FRAMES {
        // Wait for the first buffer of frame i.
        while rig.rx.used_idx(&mem) == seen {
            assert!(Instant::now() < deadline, "stalled at frame {i}");
            std::thread::yield_now();
        }
        let (head, len) = rig.rx.used_entry(&mem, seen);
        let mut first = vec![0u8; len as usize];
        mem.read_slice(&mut first, GuestAddress(buf(head))).unwrap();
        let count = u16::from_le_bytes([first[10], first[11]]);
        // All buffers of a frame are published together.
        let available = rig.rx.used_idx(&mem).wrapping_sub(seen);
        assert!(
            available >= count,
            "frame {i}: {available} of {count} buffers visible"
        );
        let mut frame = first[NET_HDR_LEN..].to_vec();
        let mut returned = vec![head];
        for k in 1..count {
            let (head, len) = rig.rx.used_entry(&mem, seen.wrapping_add(k));
            let mut part = vec![0u8; len as usize];
            mem.read_slice(&mut part, GuestAddress(buf(head))).unwrap();
            frame.extend_from_slice(&part);
            returned.push(head);
        }
        assert_eq!(frame, stress_frame(i, mac, HOST_MAC), "frame {i}");
        seen = seen.wrapping_add(count);
        // Give the buffers back, kicking only when the device asks.
        let old = rig.rx.avail_idx(&mem);
        for _ in returned {
            let head = rig.rx.next_desc % QUEUE_SIZE;
            rig.rx.add(&mem, &[(buf(u32::from(head)), 1024, true)]);
        }
        rig.rx.kick_if_needed(&mem, old);
    }
    sender.join().unwrap();
    assert_eq!(counter(&net, "rx_frames"), FRAMES as u64);
    assert_eq!(counter(&net, "rx_dropped"), 0);
    assert_eq!(counter(&net, "errors"), 0);
}

#[test]
fn tx_stress_with_event_idx() {
    const FRAMES: usize = 3000;
    const IN_FLIGHT: u16 = 64;
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    let mem = rig.mem.clone();
    rig.activate(&mut net, BASE_FEATURES | (1 << F_EVENT_IDX));
    let mac = net.mac();
    let receiver = std::thread::spawn(move || {
        for i in 0..FRAMES {
            let got = host
                .recv(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("frame {i} never came"));
            assert_eq!(got, with_hdr(&stress_frame(i, [0xff; 6], mac)), "frame {i}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut posted = 0usize;
    while posted < FRAMES {
        let done = rig.tx.used_idx(&mem);
        let in_flight = rig.tx.avail_idx(&mem).wrapping_sub(done);
        if in_flight >= IN_FLIGHT {
            assert!(Instant::now() < deadline, "stalled at {posted}");
            std::thread::yield_now();
            continue;
        }
        let old = rig.tx.avail_idx(&mem);
        // Two descriptors per frame; each slot pair has its own buffer.
        let slot = u64::from(rig.tx.next_desc % QUEUE_SIZE);
        rig.post_tx(BUF + 0x2000 * slot, &stress_frame(posted, [0xff; 6], mac));
        posted += 1;
        rig.tx.kick_if_needed(&mem, old);
    }
    receiver.join().unwrap();
    wait_for("all completions", || rig.tx.used_idx(&mem) == FRAMES as u16);
    assert_eq!(counter(&net, "tx_frames"), FRAMES as u64);
    assert_eq!(counter(&net, "tx_dropped"), 0);
}

// ---- control queue and announce ----

const CTRL_FEATURES: u64 = BASE_FEATURES
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
    | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4);

#[test]
fn announce_ack_clears_the_status_bit() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    rig.activate(&mut net, CTRL_FEATURES);
    assert_eq!(net.announce().unwrap(), AnnounceMode::Guest);
    assert_eq!(rig.irq.config.load(Ordering::SeqCst), 1);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(
        u16::from_le_bytes(status),
        (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16
    );
    assert!(
        host.recv(Duration::from_millis(50)).is_none(),
        "no host RARP"
    );
    let ack = rig.ctrl_command(
        BUF,
        &[
            VIRTIO_NET_CTRL_ANNOUNCE as u8,
            VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
        ],
    );
    assert_eq!(ack, VIRTIO_NET_OK as u8);
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    assert!(rig.irq.queue(CTRL_QUEUE) >= 1);
}

#[test]
fn control_commands() {
    let mut rig = Rig::new();
    let (mut net, _host) = fake_net(&config(None));
    rig.activate(&mut net, CTRL_FEATURES);
    const OK: u8 = VIRTIO_NET_OK as u8;
    const ERR: u8 = VIRTIO_NET_ERR as u8;
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("promisc on", vec![0, 0, 1], OK),
        ("allmulti off", vec![0, 1, 0], OK),
        ("rx mode without its argument", vec![0, 0], ERR),
        (
            "mac table: 0 unicast, 1 multicast",
            [
                vec![1, 0],
                0u32.to_le_bytes().to_vec(),
                1u32.to_le_bytes().to_vec(),
                vec![0x33, 0x33, 0, 0, 0, 1],
            ]
            .concat(),
            OK,
        ),
        (
            "mac table claiming 1000 entries",
            [vec![1, 0], 1000u32.to_le_bytes().to_vec()].concat(),
            ERR,
        ),
        ("vlan add", vec![2, 0, 5, 0], OK),
        ("one queue pair", vec![4, 0, 1, 0], OK),
        ("two queue pairs", vec![4, 0, 2, 0], ERR),
        (
            "guest offloads: checksum only",
            [
                vec![5, 0],
                bit(VIRTIO_NET_F_GUEST_CSUM).to_le_bytes().to_vec(),
            ]
            .concat(),
            OK,
        ),
        (
            "guest offloads: not negotiated",
            [
                vec![5, 0],
                bit(VIRTIO_NET_F_GUEST_UFO).to_le_bytes().to_vec(),
            ]
            .concat(),
            ERR,
        ),
        ("unknown class", vec![0x55, 0], ERR),
        ("unknown command", vec![3, 9], ERR),
        ("truncated header", vec![3], ERR),
        ("set mac", vec![1, 1, 0x52, 0x54, 0, 0xaa, 0xbb, 0xcc], OK),
        ("set multicast mac", vec![1, 1, 0x01, 0, 0, 0, 0, 1], ERR),
    ];
    for (i, (what, command, want)) in cases.into_iter().enumerate() {
        let got = rig.ctrl_command(BUF + 0x1000 * i as u64, &command);
        assert_eq!(got, want, "{what}");
    }
    assert_eq!(net.mac(), [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    // A command without room for the ack is completed with nothing written.
    let mem = rig.mem.clone();
    mem.write_slice(&[0u8, 0, 1], GuestAddress(BUF)).unwrap();
    let before = rig.ctrl.used_idx(&mem);
    rig.ctrl.add(&mem, &[(BUF, 3, false)]);
    rig.ctrl.kick();
    wait_for("completion", || rig.ctrl.used_idx(&mem) == before + 1);
    assert_eq!(rig.ctrl.used(&mem).last().unwrap().1, 0);
    // Reset restores the configured MAC.
    net.reset();
    assert_eq!(net.mac(), default_mac("net0"));
}

#[test]
fn announce_without_guest_support_sends_a_rarp() {
    let rig = Rig::new();
    let (mut net, host) = fake_net(&config(Some("52:54:00:12:34:56")));
    for activate in [false, true] {
        if activate {
            // Active, but GUEST_ANNOUNCE not negotiated.
            rig.activate(&mut net, BASE_FEATURES | bit(VIRTIO_NET_F_CTRL_VQ));
        }
        assert_eq!(net.announce().unwrap(), AnnounceMode::Host);
        let got = host.recv(Duration::from_secs(5)).expect("a RARP");
        assert_eq!(got.len(), NET_HDR_LEN + 60);
        assert_eq!(&got[..NET_HDR_LEN], &[0; NET_HDR_LEN]);
        let eth = &got[NET_HDR_LEN..];
        assert_eq!(&eth[0..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &GUEST_MAC);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0, 3], "reverse request");
        assert_eq!(&eth[22..28], &GUEST_MAC);
        assert_eq!(&eth[32..38], &GUEST_MAC);
        assert_eq!(net.status(), VIRTIO_NET_S_LINK_UP as u16);
    }
    assert_eq!(rig.irq.config.load(Ordering::SeqCst), 0);
}

// ---- lifecycle and snapshots ----

#[test]
fn reset_returns_the_queue_states() {
    let mut rig = Rig::new();
    let (mut net, _host) = fake_net(&config(None));
    assert!(net.reset().is_none());
    rig.activate(&mut net, CTRL_FEATURES);
    net.announce().unwrap();
    let frame = ether_frame([0xff; 6], net.mac(), 60, 0);
    rig.post_tx(BUF, &frame);
    rig.tx.kick();
    wait_for("tx", || rig.tx.used_idx(&rig.mem) == 1);
    let states = net.reset().expect("was active");
    assert_eq!(states.len(), 3);
    assert_eq!(states[1].next_avail, 1);
    assert_eq!(states[1].next_used, 1);
    assert!(!net.is_active());
    assert_eq!(
        net.status(),
        VIRTIO_NET_S_LINK_UP as u16,
        "announce cleared"
    );
    assert!(net.reset().is_none());
    // And it can be activated again.
    let rig = Rig::new();
    rig.activate(&mut net, BASE_FEATURES);
}

#[test]
fn pause_stops_guest_memory_writes() {
    let mut rig = Rig::new();
    let (mut net, host) = fake_net(&config(None));
    rig.post_rx(0, 8, 2048);
    rig.activate(&mut net, BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF));
    net.pause();
    host.send(&with_hdr(&ether_frame(net.mac(), HOST_MAC, 100, 1)));
    let frame = ether_frame([0xff; 6], net.mac(), 60, 0);
    rig.post_tx(BUF + 0x200000, &frame);
    rig.tx.kick();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rig.rx.used_idx(&rig.mem), 0);
    assert_eq!(rig.tx.used_idx(&rig.mem), 0);
    assert_eq!(net.queue_states().len(), 3);
    net.resume();
    wait_for("rx after resume", || rig.rx.used_idx(&rig.mem) == 1);
    wait_for("tx after resume", || rig.tx.used_idx(&rig.mem) == 1);
    assert!(host.recv(Duration::from_secs(5)).is_some());
}

#[test]
fn snapshot_and_restore_continue_the_queues() {
    let mut rig = Rig::new();
    let (mut net, _host) = fake_net(&config(None));
    rig.post_rx(0, 4, 2048);
    let acked = CTRL_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF) | (1 << F_EVENT_IDX);
    rig.activate(&mut net, acked);
    // Narrow the guest offloads, change the MAC, leave an announce unacked.
    assert_eq!(
        rig.ctrl_command(
            BUF,
            &[
                vec![5, 0],
                bit(VIRTIO_NET_F_GUEST_CSUM).to_le_bytes().to_vec()
            ]
            .concat()
        ),
        VIRTIO_NET_OK as u8
    );
    assert_eq!(
        rig.ctrl_command(BUF + 0x1000, &[1, 1, 0x52, 0x54, 0, 1, 2, 3]),
        VIRTIO_NET_OK as u8
    );
    net.announce().unwrap();
    rig.post_tx(BUF + 0x2000, &ether_frame([0xff; 6], net.mac(), 60, 0));
    rig.tx.kick();
    wait_for("tx", || rig.tx.used_idx(&rig.mem) == 1);

    net.pause();
    let value = net.state();
    let DeviceState::Net(state) = value.clone() else {
        panic!("not a net state")
    };
    assert_eq!(state.guest_offloads, bit(VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(state.mac, [0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(
        state.status,
        (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16
    );
    let queues = net.queue_states();
    assert_eq!(queues.len(), 3);
    assert_eq!(queues[1].next_avail, 1);
    assert_eq!(queues[2].next_used, 2);
    assert!(queues[0].event_idx_enabled);
    drop(net);

    // The target: a new device and tap, the same guest memory.
    let (tap, host2) = socket_tap();
    let mut target = Net::with_tap(&config(None), tap).unwrap();
    let irq2 = Arc::new(TestInterrupt::default());
    let fds = [&rig.rx, &rig.tx, &rig.ctrl].map(|q| q.kick.try_clone().unwrap());
    let context = ActivateContext {
        memory: rig.mem.clone(),
        queues: queues
            .iter()
            .map(|&q| Queue::try_from(q).unwrap())
            .zip(fds)
            .collect(),
        interrupt: irq2.clone(),
        acked_features: acked,
    };
    target.restore(value, Some(context)).unwrap();
    assert_eq!(target.mac(), [0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(
        target.status(),
        (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16
    );
    // Every ready queue is interrupted once after the restore.
    wait_for("restore interrupts", || (0..3).all(|i| irq2.queue(i) >= 1));
    // The queues continue where they stopped.
    let frame = ether_frame([0xff; 6], target.mac(), 60, 9);
    rig.post_tx(BUF + 0x3000, &frame);
    rig.tx.kick();
    assert_eq!(
        host2.recv(Duration::from_secs(5)).unwrap(),
        with_hdr(&frame)
    );
    wait_for("tx", || rig.tx.used_idx(&rig.mem) == 2);
    // The guest acks the pending announce on the target.
    assert_eq!(rig.ctrl_command(BUF + 0x4000, &[3, 0]), VIRTIO_NET_OK as u8);
    assert_eq!(target.status(), VIRTIO_NET_S_LINK_UP as u16);

    // Guest offloads that were not negotiated are refused.
    let mut bad = state.clone();
    bad.guest_offloads = bit(VIRTIO_NET_F_GUEST_TSO4);
    let (tap, _host3) = socket_tap();
    let mut other = Net::with_tap(&config(None), tap).unwrap();
    let e = other.restore(DeviceState::Net(bad), None).unwrap_err();
    assert!(e.to_string().contains("not negotiated"), "{e}");
}

#[test]
fn snapshot_of_an_inactive_device() {
    let (mut net, _host) = fake_net(&config(None));
    let state = net.state();
    assert!(net.queue_states().is_empty());
    let (tap, _host) = socket_tap();
    let mut target = Net::with_tap(&config(None), tap).unwrap();
    target.restore(state, None).unwrap();
    assert!(!target.is_active());
}

// ---- real taps ----

/// Runs `f` on a thread in a fresh network namespace (it goes away with
/// the thread and the fds in it). Returns false (and prints why) if there
/// is no /dev/net/tun.
fn in_netns(test: &str, f: impl FnOnce() + Send + 'static) -> bool {
    if let Err(e) = tap::tun_available() {
        eprintln!("skipping {test}: {e}");
        return false;
    }
    let result = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) only changes this thread's namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    true
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> IfReqFlags {
    let mut req = IfReqFlags {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

fn link_up(name: &str) {
    // SAFETY: a plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: fd was just created.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write a struct ifreq, which `req` is.
    unsafe {
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            0
        );
        req.flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
    // Less noise on the link: no IPv6 autoconfiguration (best effort).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
}

/// A raw packet socket on interface `name`, seeing every frame.
fn packet_socket(name: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: a plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fd was just created.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = tap::if_index(name).expect("the tap exists") as i32;
    // SAFETY: addr is a valid sockaddr_ll of the given size.
    let ret = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    sock
}

/// Receives frames until one with ethertype 0x88b5 that the host did not send.
fn recv_test_frame(sock: &OwnedFd) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no test frame on the tap");
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
            continue;
        }
        let mut buf = vec![0u8; 70000];
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buffer and address are valid for their lengths.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        assert!(n >= 0);
        buf.truncate(n as usize);
        if from.sll_pkttype != libc::PACKET_OUTGOING
            && buf.len() >= 14
            && buf[12..14] == [0x88, 0xb5]
        {
            return buf;
        }
    }
}

fn packet_send(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn real_tap_moves_frames_both_ways() {
    in_netns("real_tap_moves_frames_both_ways", || {
        let name = "vmmtest0";
        let cfg = NetConfig {
            tap: Some(name.into()),
            id: Some("net0".into()),
            mac: Some("52:54:00:12:34:56".into()),
            ..Default::default()
        };
        let mut net = Net::new(&cfg).unwrap();
        assert_eq!(net.tap_name(), name);
        assert!(tap::if_index(name).is_some(), "TUNSETIFF created the tap");
        link_up(name);
        let sock = packet_socket(name);

        let mut rig = Rig::new();
        rig.post_rx(0, 32, 2048);
        // Every offload offered, so activation sets them all on the tap;
        // no GUEST_ANNOUNCE, so the host announces.
        let acked = net.features() & !(1 << F_EVENT_IDX) & !bit(VIRTIO_NET_F_GUEST_ANNOUNCE);
        rig.activate(&mut net, acked);
        assert_eq!(
            net.acked_features() & bit(VIRTIO_NET_F_GUEST_TSO4),
            bit(VIRTIO_NET_F_GUEST_TSO4)
        );

        // Guest -> host.
        let out = ether_frame([0xff; 6], GUEST_MAC, 200, 5);
        rig.post_tx(BUF + 0x300000, &out);
        rig.tx.kick();
        assert_eq!(recv_test_frame(&sock), out);
        wait_for("tx completion", || rig.tx.used_idx(&rig.mem) == 1);

        // Host -> guest.
        let inbound = ether_frame(GUEST_MAC, HOST_MAC, 300, 9);
        packet_send(&sock, &inbound);
        let mem = rig.mem.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            assert!(
                Instant::now() < deadline,
                "the frame did not reach the guest"
            );
            let used = rig.rx.used(&mem);
            let hit = used.iter().enumerate().find_map(|(i, &(head, len))| {
                let mut buf = vec![0u8; len as usize];
                let at = BUF + 0x10000 * u64::from(head);
                mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
                (len as usize == NET_HDR_LEN + 300
                    && buf[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == [0x88, 0xb5])
                .then_some((i, buf))
            });
            if let Some(hit) = hit {
                break hit;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let buf = found.1;
        assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
        assert_eq!(buf[1], VIRTIO_NET_HDR_GSO_NONE as u8);
        assert_eq!(&buf[NET_HDR_LEN..], &inbound[..]);
        assert!(counter(&net, "rx_frames") >= 1);
        assert_eq!(counter(&net, "tx_frames"), 1);

        // Announce without GUEST_ANNOUNCE negotiated: a RARP on the tap.
        assert_eq!(net.announce().unwrap(), AnnounceMode::Host);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "no RARP seen");
            let Some(frame) = recv_timeout(sock.as_raw_fd(), Duration::from_millis(100)) else {
                continue;
            };
            if frame.len() >= 14 && frame[12..14] == [0x80, 0x35] {
                assert_eq!(&frame[6..12], &GUEST_MAC);
                break;
            }
        }

        drop(net);
        assert!(
            tap::if_index(name).is_none(),
            "the tap goes away with the VMM"
        );
    });
}

#[test]
fn real_tap_offloads() {
    in_netns("real_tap_offloads", || {
        let tap = Tap::open("vmmoff0").unwrap();
        let probed = tap.probe_offloads();
        assert!(
            probed.csum_tso,
            "every tap supports checksum and TSO offload"
        );
        let mut sets = vec![
            0,
            bit(VIRTIO_NET_F_GUEST_CSUM),
            bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
            bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN),
        ];
        if probed.ufo {
            sets.push(sets[3] | bit(VIRTIO_NET_F_GUEST_UFO));
        }
        for set in sets {
            tap.set_offload(tun_offload_flags(set))
                .unwrap_or_else(|e| panic!("offloads {set:#x}: {e}"));
        }
        // Offered features follow the probe.
        drop(tap);
        let net = Net::new(&NetConfig {
            tap: Some("vmmoff0".into()),
            id: Some("n".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            net.features() & bit(VIRTIO_NET_F_GUEST_UFO) != 0,
            probed.ufo
        );
        // Activation with the whole negotiated set succeeds (TUNSETOFFLOAD).
        let rig = Rig::new();
        let mut net = net;
        let all = net.features();
        rig.activate(&mut net, all);
    });
}

fn open_tap_fd(name: &str, flags: libc::c_int) -> OwnedFd {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = ifreq(name);
    req.flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads/writes a struct ifreq, which `req` is.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    OwnedFd::from(file)
}

#[test]
fn real_tap_from_fd() {
    in_netns("real_tap_from_fd", || {
        let fd = open_tap_fd(
            "vmmfd0",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        let cfg = NetConfig {
            fd: Some(fd.as_raw_fd()),
            id: Some("net0".into()),
            ..Default::default()
        };
        let mut net = Net::new(&cfg).unwrap();
        assert_eq!(net.tap_name(), "vmmfd0");
        // The device has its own copy of the fd.
        drop(fd);
        link_up("vmmfd0");
        let sock = packet_socket("vmmfd0");
        let mut rig = Rig::new();
        rig.activate(&mut net, BASE_FEATURES);
        let out = ether_frame([0xff; 6], net.mac(), 64, 1);
        rig.post_tx(BUF, &out);
        rig.tx.kick();
        assert_eq!(recv_test_frame(&sock), out);

        // Not a tap.
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = Tap::from_fd(null.as_raw_fd()).unwrap_err().to_string();
        assert!(
            e.contains("TUNGETIFF") && e.contains("not a tun/tap fd"),
            "{e}"
        );
        // A tap without virtio headers.
        let plain = open_tap_fd("vmmfd1", libc::IFF_TAP | libc::IFF_NO_PI);
        let e = Tap::from_fd(plain.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("vmmfd1") && e.contains("IFF_VNET_HDR"), "{e}");
        // Not an fd at all.
        let e = Tap::from_fd(9999).unwrap_err().to_string();
        assert!(e.contains("tap fd 9999"), "{e}");
    });
}

/// Clears CAP_NET_ADMIN from the calling thread's effective set.
fn drop_cap_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset read and write the header and two data structs,
    // which is what version 3 uses; pid 0 is the calling thread.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !(1 << CAP_NET_ADMIN);
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0
        );
    }
}

#[test]
fn real_tap_errors_name_the_tap() {
    in_netns("real_tap_errors_name_the_tap", || {
        // An existing interface that is not a tap.
        let e = Tap::open("lo").unwrap_err().to_string();
        assert!(e.starts_with("tap lo: TUNSETIFF: "), "{e}");
        eprintln!("{e}");
        let e = Tap::open("a/b").unwrap_err().to_string();
        assert!(e.starts_with("tap a/b: TUNSETIFF: "), "{e}");
        let e = Net::new(&NetConfig {
            tap: Some("x".repeat(16)),
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("TUNSETIFF") && e.contains("invalid interface name"),
            "{e}"
        );
        // A tap held by someone else without IFF_VNET_HDR... is reopened with
        // different flags: the kernel refuses.
        let _held = open_tap_fd(
            "vmmbusy0",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE,
        );
        let e = Tap::open("vmmbusy0").unwrap_err().to_string();
        assert!(e.starts_with("tap vmmbusy0: TUNSETIFF: "), "{e}");
        eprintln!("{e}");
        // In use by another fd (single queue).
        let _held = open_tap_fd(
            "vmmbusy1",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        let e = Tap::open("vmmbusy1").unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        eprintln!("{e}");
        // Without CAP_NET_ADMIN (capabilities are per thread; this one ends here).
        drop_cap_net_admin();
        let e = Tap::open("vmmnocap0").unwrap_err().to_string();
        assert!(
            e.starts_with("tap vmmnocap0: TUNSETIFF: ") && e.ends_with("(needs CAP_NET_ADMIN)"),
            "{e}"
        );
        eprintln!("{e}");
    });
}
