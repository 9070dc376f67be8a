//! virtio-net driver (virtio 1.2, 5.1) and the `net-*` commands.
//!
//! Queues: rx (0), tx (1) and, when offered, the control queue (2).
//! Features asked for: MAC, STATUS, MRG_RXBUF, CTRL_VQ, GUEST_ANNOUNCE (no
//! offloads: frames are plain Ethernet both ways). The 12-byte
//! `virtio_net_hdr_v1` precedes every frame; on tx it is all zero.
//!
//! With the boot option `net_offload=1` the driver also acks the offloads
//! the device offers: CSUM, GUEST_CSUM, CTRL_GUEST_OFFLOADS, GUEST_TSO4/6,
//! GUEST_ECN, HOST_TSO4/6, HOST_ECN (the GUEST_TSO/ECN ones only with
//! MRG_RXBUF, since large frames need it). Nothing else changes: the guest
//! never sends partial checksums or GSO frames (its tx header stays zero),
//! and received frames are taken as they are (header flags ignored; a GSO
//! frame from the host is reassembled from its mergeable buffers like any
//! other). It is for tests of the host side (the tap's offloads).
//!
//! rx: one device-writable buffer per descriptor (2 KiB with MRG_RXBUF,
//! 12 KiB without), all posted at start and re-posted once consumed; a
//! frame spanning several buffers (`num_buffers`) is reassembled. Frames
//! wait in the ring until a command (`net-recv`) or the `net-echo`
//! workload takes them. tx: 64 slots of 12 KiB, tx interrupts off (used
//! entries are reclaimed when sending).
//!
//! Test frames (`net-send`, `net-bench`), payload after the 14-byte
//! Ethernet header, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `TGNF` |
//! | 4..8 | sequence number (u32) |
//! | 8..12 | payload length (u32, = frame length - 14) |
//! | 12..16 | FNV-1a 32 of payload bytes 16..length |
//! | 16.. | byte i (from 0) = (seq + i) & 0xff |

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::console::LineBuf;
use crate::shell::{error, parse_hex, Args};
use crate::sync::SpinLock;
use crate::virtio::{self, wait_until, Device, Seg, Virtqueue, Wait};
use crate::{irq, mem, time};

const MAX_NICS: usize = 4;

// Feature bits (5.1.3).
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_GUEST_ANNOUNCE: u64 = 1 << 21;
const WANTED: u64 = F_MAC | F_MRG_RXBUF | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE;
// Offloads, acked only with the `net_offload=1` option.
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const OFFLOADS: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_CTRL_GUEST_OFFLOADS
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN;
/// Guest offloads that bring frames of up to 64 KiB: only with mergeable
/// rx buffers (our buffers without them are 12 KiB).
const GUEST_GSO: u64 = F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN;

/// `net_offload=1`: also ack the offloads (set at boot from the options).
static OFFLOAD: AtomicBool = AtomicBool::new(false);

pub fn set_offload(on: bool) {
    OFFLOAD.store(on, Ordering::Relaxed);
}

/// The features asked for, given those offered.
fn wanted(offered: u64) -> u64 {
    if !OFFLOAD.load(Ordering::Relaxed) {
        return WANTED;
    }
    if offered & F_MRG_RXBUF == 0 {
        WANTED | (OFFLOADS & !GUEST_GSO)
    } else {
        WANTED | OFFLOADS
    }
}

const S_LINK_UP: u16 = 1;
const S_ANNOUNCE: u16 = 2;

const CTRL_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;

const HDR: u64 = 12;
const ETH_HLEN: usize = 14;
/// rx buffers: with MRG_RXBUF (256 of them) / without (64).
const RX_BUF_MRG: u64 = 2048;
const RX_BUF_BIG: u64 = 12 * 1024;
const TX_SLOTS: u16 = 64;
const TX_SLOT: u64 = 12 * 1024;
/// Largest frame we send (Ethernet header included, no FCS).
pub const MAX_FRAME: usize = 9014;
/// Reassembly buffer for received frames.
const FRAME_BUF: u64 = 64 * 1024 + 4096;
/// Smallest test frame: Ethernet header + 16 bytes of test header.
const MIN_TEST_FRAME: usize = ETH_HLEN + 16;
pub const TEST_ETHERTYPE: u16 = 0x88b5;
const MAGIC: [u8; 4] = *b"TGNF";

pub struct Nic {
    dev: Device,
    rx: Virtqueue,
    tx: Virtqueue,
    ctrl: Virtqueue,
    has_ctrl: bool,
    pub mac: [u8; 6],
    mrg: bool,
    rx_base: u64,
    rx_buf: u64,
    tx_base: u64,
    ctrl_buf: u64,
    frame: u64,
    config_seen: u64,
    status: u16,
    next_status_poll: u64,
    echo: bool,
    echoed: u64,
    /// Frames dropped by the echo workload (not ethertype 0x88b5).
    echo_other: u64,
}

static NICS: [AtomicU64; MAX_NICS] = [const { AtomicU64::new(0) }; MAX_NICS];
static NNICS: AtomicUsize = AtomicUsize::new(0);

fn nic(n: usize) -> Option<&'static SpinLock<Nic>> {
    let a = NICS.get(n)?.load(Ordering::Acquire);
    // SAFETY: set once by `attach` to a SpinLock<Nic> placed in the arena.
    (a != 0).then(|| unsafe { &*(a as *const SpinLock<Nic>) })
}

pub fn count() -> usize {
    NNICS.load(Ordering::Acquire)
}

fn rd8(a: u64) -> u8 {
    // SAFETY: arena memory.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}

fn rd16(a: u64) -> u16 {
    // SAFETY: arena memory.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}

fn bytes(a: u64, len: usize) -> &'static [u8] {
    // SAFETY: arena memory of at least `len` bytes.
    unsafe { core::slice::from_raw_parts(a as *const u8, len) }
}

fn bytes_mut(a: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: arena memory of at least `len` bytes, used by one CPU at a
    // time (under the NIC's lock).
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) }
}

/// Start the virtio-net function at 00:dev.func as the next NIC.
pub fn attach(dev: u8, func: u8) -> Result<(), &'static str> {
    let n = count();
    if n >= MAX_NICS {
        return Err("too many NICs");
    }
    let mut d = Device::probe(dev, func, 1, 3)?;
    d.begin_with(wanted)?;
    let mrg = d.features & F_MRG_RXBUF != 0;
    let has_ctrl = d.features & F_CTRL_VQ != 0;
    let (rx_max, rx_buf) = if mrg {
        (256, RX_BUF_MRG)
    } else {
        (64, RX_BUF_BIG)
    };
    let mut nic = Nic {
        dev: d,
        rx: Virtqueue::new(0, rx_max),
        tx: Virtqueue::new(1, TX_SLOTS),
        ctrl: Virtqueue::new(2, 16),
        has_ctrl,
        mac: [0; 6],
        mrg,
        rx_base: 0,
        rx_buf,
        tx_base: 0,
        ctrl_buf: 0,
        frame: 0,
        config_seen: 0,
        status: S_LINK_UP,
        next_status_poll: 0,
        echo: false,
        echoed: 0,
        echo_other: 0,
    };
    if let Err(e) = nic.start() {
        nic.dev.fail();
        return Err(e);
    }
    println!(
        "virtio: 00:{:02x}.{} net{} ready features={:#x} mac={}",
        dev,
        func,
        n,
        nic.dev.features,
        Mac(nic.mac)
    );
    let cell = virtio::place(SpinLock::new(nic)).ok_or("out of DMA memory")?;
    NICS[n].store(cell as *const _ as u64, Ordering::Release);
    NNICS.store(n + 1, Ordering::Release);
    Ok(())
}

/// A MAC address as aa:bb:cc:dd:ee:ff.
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in m.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

const FNV32_BASIS: u32 = 0x811c_9dc5;
const FNV32_PRIME: u32 = 0x0100_0193;

fn fnv32(data: &[u8]) -> u32 {
    data.iter().fold(FNV32_BASIS, |h, &b| {
        (h ^ b as u32).wrapping_mul(FNV32_PRIME)
    })
}

/// Write a test frame of `size` bytes into `out`; returns `size`.
fn build_test_frame(
    out: &mut [u8],
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
    seq: u32,
    size: usize,
) -> usize {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let p = &mut out[ETH_HLEN..size];
    let plen = p.len();
    p[0..4].copy_from_slice(&MAGIC);
    p[4..8].copy_from_slice(&seq.to_le_bytes());
    p[8..12].copy_from_slice(&(plen as u32).to_le_bytes());
    for (i, b) in p[16..].iter_mut().enumerate() {
        *b = seq.wrapping_add(i as u32) as u8;
    }
    let sum = fnv32(&p[16..]);
    p[12..16].copy_from_slice(&sum.to_le_bytes());
    size
}

/// A received frame's test header: (seq, ok) if it has the magic.
fn parse_test_frame(frame: &[u8]) -> Option<(u32, bool)> {
    let p = frame.get(ETH_HLEN..)?;
    if p.len() < 16 || p[0..4] != MAGIC {
        return None;
    }
    let seq = u32::from_le_bytes(p[4..8].try_into().ok()?);
    let len = u32::from_le_bytes(p[8..12].try_into().ok()?) as usize;
    let sum = u32::from_le_bytes(p[12..16].try_into().ok()?);
    let ok = (16..=p.len()).contains(&len)
        && fnv32(&p[16..len]) == sum
        && p[16..len]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == seq.wrapping_add(i as u32) as u8);
    Some((seq, ok))
}

impl Nic {
    fn start(&mut self) -> Result<(), &'static str> {
        if self.dev.num_queues() < 2 {
            return Err("fewer than 2 queues");
        }
        self.dev.setup_queue(&mut self.rx)?;
        self.dev.setup_queue(&mut self.tx)?;
        if self.has_ctrl {
            self.dev.setup_queue(&mut self.ctrl)?;
        }
        let alloc = |bytes: u64| mem::dma_alloc(bytes, mem::PAGE).ok_or("out of DMA memory");
        self.rx_base = alloc(self.rx_buf * self.rx.size as u64)?;
        self.tx_base = alloc(TX_SLOT * self.tx.size as u64)?;
        self.ctrl_buf = alloc(mem::PAGE)?;
        self.frame = alloc(FRAME_BUF)?;
        let f = self.dev.features;
        let (mac, status) = self.dev.read_config(|c| {
            let mut m = [0u8; 6];
            for (i, b) in m.iter_mut().enumerate() {
                *b = c.u8(i as u64);
            }
            (
                m,
                if f & F_STATUS != 0 {
                    c.u16(6)
                } else {
                    S_LINK_UP
                },
            )
        });
        self.mac = if f & F_MAC != 0 {
            mac
        } else {
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        };
        self.status = status;
        self.config_seen = irq::count(self.dev.config_vector);
        // tx completions are reclaimed by polling: no interrupts (the flag,
        // and the vector masked for devices that ignore the flag).
        self.tx.set_interrupts(false);
        self.dev.mask_queue_vector(1, true);
        self.rx.set_interrupts(true);
        // Post every rx buffer (before DRIVER_OK is allowed; no kick yet).
        let (base, size) = (self.rx_base, self.rx_buf);
        while self.rx.num_free > 0 {
            let Some(h) = self
                .rx
                .add_single_with(|d| (base + d as u64 * size, size as u32, true))
            else {
                break;
            };
            self.rx.publish(h);
        }
        self.dev.driver_ok()?;
        self.rx.kick();
        Ok(())
    }

    /// Queue `count` test frames (sequence numbers from `seq0`), kicking
    /// every 16 and at the end; Err(frames queued) if the tx queue stayed
    /// full.
    fn send_test_frames(
        &mut self,
        count: u64,
        size: usize,
        ethertype: u16,
        dst: [u8; 6],
        seq0: u32,
    ) -> Result<(), u64> {
        let mac = self.mac;
        for sent in 0..count {
            let seq = seq0.wrapping_add(sent as u32);
            if !self.queue_tx(|b| build_test_frame(b, dst, mac, ethertype, seq, size)) {
                self.tx.kick();
                return Err(sent);
            }
            if (sent + 1).is_multiple_of(16) {
                self.tx.kick();
            }
        }
        self.tx.kick();
        Ok(())
    }

    /// Queue one frame built by `f` into its tx slot (not kicked). Waits up
    /// to 2 s for a free slot. `f` gets the frame area and returns the frame
    /// length.
    fn queue_tx(&mut self, f: impl FnOnce(&mut [u8]) -> usize) -> bool {
        self.tx.reclaim();
        if self.tx.num_free == 0 {
            self.tx.kick();
            let tx = &mut self.tx;
            let ok = wait_until(tx.vector, time::deadline_after_ms(2000), Wait::Poll, || {
                tx.reclaim();
                tx.num_free > 0
            });
            if !ok {
                return false;
            }
        }
        let base = self.tx_base;
        let Some(h) = self.tx.add_single_with(|d| {
            let slot = base + d as u64 * TX_SLOT;
            let buf = bytes_mut(slot, TX_SLOT as usize);
            buf[..HDR as usize].fill(0);
            let n = f(&mut buf[HDR as usize..]);
            (slot, (HDR as usize + n) as u32, false)
        }) else {
            return false;
        };
        self.tx.publish(h);
        true
    }

    /// Take the next received frame into `self.frame`; its length (0 for a
    /// malformed one), None if nothing was received.
    fn recv(&mut self) -> Option<usize> {
        let (id, len) = self.rx.pop_used()?;
        let cap = (FRAME_BUF - 4096) as usize;
        let buf = self.rx_base + id as u64 * self.rx_buf;
        let len = (len as u64).min(self.rx_buf);
        let nbuf = if self.mrg && len >= HDR {
            rd16(buf + 10).max(1)
        } else {
            1
        };
        let out = bytes_mut(self.frame, cap);
        let mut total = 0usize;
        let mut copy = |src: u64, n: u64, total: &mut usize| {
            let n = (n as usize).min(cap - *total);
            out[*total..*total + n].copy_from_slice(bytes(src, n));
            *total += n;
        };
        if len >= HDR {
            copy(buf + HDR, len - HDR, &mut total);
        }
        self.rx.repost(id);
        let mut malformed = len < HDR;
        for _ in 1..nbuf {
            // The device publishes a frame's buffers together.
            let rx = &mut self.rx;
            let mut next = None;
            let got = wait_until(rx.vector, time::deadline_after_ms(100), Wait::Poll, || {
                next = rx.pop_used();
                next.is_some()
            });
            let Some((id2, len2)) = next.filter(|_| got) else {
                malformed = true;
                break;
            };
            let len2 = (len2 as u64).min(self.rx_buf);
            copy(self.rx_base + id2 as u64 * self.rx_buf, len2, &mut total);
            self.rx.repost(id2);
        }
        self.rx.kick();
        Some(if malformed { 0 } else { total })
    }

    fn frame(&self, len: usize) -> &'static [u8] {
        bytes(self.frame, len)
    }

    /// A control command with no data; returns the ack byte.
    fn ctrl_cmd(&mut self, class: u8, cmd: u8) -> Result<u8, &'static str> {
        if !self.has_ctrl {
            return Err("no control queue");
        }
        let b = bytes_mut(self.ctrl_buf, 1024);
        b[0] = class;
        b[1] = cmd;
        b[512] = 0xff;
        let mut ids = [0u16; 2];
        let h = self
            .ctrl
            .add_chain(
                &[Seg::r(self.ctrl_buf, 2), Seg::w(self.ctrl_buf + 512, 1)],
                &mut ids,
            )
            .ok_or("control queue full")?;
        self.ctrl.publish(h);
        self.ctrl.kick();
        let q = &mut self.ctrl;
        let ok = wait_until(q.vector, time::deadline_after_ms(1000), Wait::Irq, || {
            q.poll();
            q.is_done(h)
        });
        if !ok {
            return Err("control command timed out");
        }
        self.ctrl.take(h);
        Ok(rd8(self.ctrl_buf + 512))
    }

    /// A gratuitous-ARP-like frame (ARP request, sender/target IP 0.0.0.0)
    /// from our MAC to the broadcast address, so switches learn where we are.
    fn send_announce_frame(&mut self) -> bool {
        let mac = self.mac;
        let ok = self.queue_tx(|b| {
            b[..60].fill(0);
            b[0..6].fill(0xff);
            b[6..12].copy_from_slice(&mac);
            b[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            b[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            b[22..28].copy_from_slice(&mac);
            60
        });
        self.tx.kick();
        ok
    }

    fn read_status(&self) -> u16 {
        if self.dev.features & F_STATUS == 0 {
            return S_LINK_UP;
        }
        self.dev.read_config(|c| c.u16(6))
    }

    /// Configuration change: link state, announce requests.
    fn config_changed(&mut self, n: usize) {
        if self.dev.needs_reset() {
            println!(
                "testguest: warning: net{}: device needs reset (status={:#x})",
                n,
                self.dev.status()
            );
            return;
        }
        let status = self.read_status();
        if (status ^ self.status) & S_LINK_UP != 0 {
            println!(
                "net{}: link={}",
                n,
                if status & S_LINK_UP != 0 {
                    "up"
                } else {
                    "down"
                }
            );
        }
        self.status = status;
        if status & S_ANNOUNCE != 0 && self.dev.features & F_GUEST_ANNOUNCE != 0 {
            let sent = self.send_announce_frame();
            let ack = self.ctrl_cmd(CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK);
            self.status = self.read_status();
            match ack {
                Ok(0) => println!("net: announce nic={} frame={} ack=ok", n, sent as u8),
                Ok(a) => println!("net: announce nic={} frame={} ack={}", n, sent as u8, a),
                Err(e) => println!("net: announce nic={} frame={} ack={}", n, sent as u8, e),
            }
        }
    }

    /// One pass of the echo workload (at most 64 frames).
    fn echo_pass(&mut self) {
        let mut sent = false;
        for _ in 0..64 {
            let Some(len) = self.recv() else { break };
            let f = self.frame(len);
            if len < ETH_HLEN || u16::from_be_bytes([f[12], f[13]]) != TEST_ETHERTYPE {
                self.echo_other += 1;
                continue;
            }
            let mac = self.mac;
            let len = len.min((TX_SLOT - HDR) as usize);
            if self.queue_tx(|b| {
                b[..len].copy_from_slice(&f[..len]);
                b[0..6].copy_from_slice(&f[6..12]);
                b[6..12].copy_from_slice(&mac);
                len
            }) {
                self.echoed += 1;
                sent = true;
            }
        }
        if sent {
            self.tx.kick();
        }
    }
}

// ------------------------------------------------------------ commands ----

/// Commands `net-*`. Initialises the drivers on first use.
pub fn command(cmd: &str, rest: &str) {
    let f: fn(&str, &Args) = match cmd {
        "net-info" => cmd_info,
        "net-send" => cmd_send,
        "net-recv" => cmd_recv,
        "net-echo" => cmd_echo,
        "net-bench" => cmd_bench,
        "net-announce" => cmd_announce,
        _ => return println!("testguest: error: unknown command {}", cmd),
    };
    let keys: &[&str] = match cmd {
        "net-info" => &[],
        "net-send" => &["count", "size", "ethertype", "dst", "seq", "nic"],
        "net-recv" => &["count", "timeout_ms", "ethertype", "print", "nic"],
        "net-echo" => &["on", "nic"],
        "net-announce" => &["nic"],
        _ => &["count", "size", "ethertype", "dst", "nic"],
    };
    let Some(a) = Args::parse(cmd, rest, keys) else {
        return;
    };
    if !virtio::init_all() {
        return;
    }
    f(cmd, &a);
}

fn pick(cmd: &str, a: &Args) -> Option<(usize, &'static SpinLock<Nic>)> {
    let n = a.num("nic", 0..=MAX_NICS as u64 - 1).ok()?.unwrap_or(0) as usize;
    match nic(n) {
        Some(d) => Some((n, d)),
        None => {
            error(cmd, format_args!("no nic {} (nics={})", n, count()));
            None
        }
    }
}

fn ethertype_arg(cmd: &str, a: &Args) -> Result<Option<u16>, ()> {
    match a.raw("ethertype") {
        None => Ok(None),
        Some(v) => match parse_hex(v) {
            Some(e) if e <= 0xffff => Ok(Some(e as u16)),
            _ => {
                error(cmd, format_args!("bad value for ethertype: {}", v));
                Err(())
            }
        },
    }
}

fn dst_arg(cmd: &str, a: &Args) -> Result<[u8; 6], ()> {
    match a.raw("dst") {
        None => Ok([0xff; 6]),
        Some(v) => parse_mac(v).ok_or_else(|| {
            error(
                cmd,
                format_args!("bad value for dst: {} (aa:bb:cc:dd:ee:ff)", v),
            );
        }),
    }
}

fn cmd_info(_cmd: &str, _a: &Args) {
    println!("net: nics={}", count());
    for n in 0..count() {
        let Some(d) = nic(n) else { continue };
        let mut d = d.lock();
        d.status = d.read_status();
        println!(
            "net{}: mac={} status={} features={:#x} acked={:#x} mrg={} ctrl={} pci=00:{:02x}.{}",
            n,
            Mac(d.mac),
            d.status,
            d.dev.offered,
            d.dev.features,
            d.mrg as u8,
            d.has_ctrl as u8,
            d.dev.dev,
            d.dev.func
        );
    }
}

/// `count=` and `size=` of net-send/net-bench.
fn send_args(cmd: &str, a: &Args, max_count: u64) -> Option<(u64, usize, u16, [u8; 6])> {
    let count = a.num("count", 1..=max_count).ok()?.unwrap_or(1);
    let size = a
        .num("size", MIN_TEST_FRAME as u64..=MAX_FRAME as u64)
        .ok()?
        .unwrap_or(64) as usize;
    let et = ethertype_arg(cmd, a).ok()?.unwrap_or(TEST_ETHERTYPE);
    let dst = dst_arg(cmd, a).ok()?;
    Some((count, size, et, dst))
}

fn cmd_send(cmd: &str, a: &Args) {
    let Some((count, size, et, dst)) = send_args(cmd, a, 10_000_000) else {
        return;
    };
    let Ok(seq0) = a.num("seq", 0..=u32::MAX as u64) else {
        return;
    };
    let Some((_, d)) = pick(cmd, a) else { return };
    let mut d = d.lock();
    match d.send_test_frames(count, size, et, dst, seq0.unwrap_or(0) as u32) {
        Ok(()) => println!("net: sent={}", count),
        Err(sent) => println!("net: sent={} status=timeout", sent),
    }
}

fn cmd_bench(cmd: &str, a: &Args) {
    let Some((count, size, et, dst)) = send_args(cmd, a, 100_000_000) else {
        return;
    };
    let Some((_, d)) = pick(cmd, a) else { return };
    let mut d = d.lock();
    let t0 = time::rdtsc();
    if let Err(sent) = d.send_test_frames(count, size, et, dst, 0) {
        return println!("net-bench: status=timeout frames={}", sent);
    }
    // Until the device took every frame.
    let tx_size = d.tx.size;
    let tx = &mut d.tx;
    let done = wait_until(tx.vector, time::deadline_after_ms(5000), Wait::Poll, || {
        tx.reclaim();
        tx.num_free == tx_size
    });
    let us = ((time::rdtsc() - t0) * 1000 / time::tsc_khz().max(1)).max(1);
    let bytes = count * size as u64;
    println!(
        "net-bench: frames={} bytes={} us={} mbps={} pps={}{}",
        count,
        bytes,
        us,
        bytes * 8 / us,
        count * 1_000_000 / us,
        if done { "" } else { " status=timeout" }
    );
}

fn cmd_recv(cmd: &str, a: &Args) {
    let Ok(count) = a.num("count", 1..=100_000_000) else {
        return;
    };
    let Ok(timeout) = a.num("timeout_ms", 0..=3_600_000) else {
        return;
    };
    let Ok(print) = a.num("print", 0..=1_000_000) else {
        return;
    };
    let Ok(filter) = ethertype_arg(cmd, a) else {
        return;
    };
    let Some((_, d)) = pick(cmd, a) else { return };
    let mut d = d.lock();
    let count = count.unwrap_or(1);
    let print = print.unwrap_or(32);
    let deadline = time::deadline_after_ms(timeout.unwrap_or(5000));
    let (mut got, mut ok, mut other, mut printed) = (0u64, 0u64, 0u64, 0u64);
    while got < count {
        let rx = &d.rx;
        let vector = rx.vector;
        if !wait_until(vector, deadline, Wait::Irq, || rx.has_used()) {
            break;
        }
        while got < count {
            let Some(len) = d.recv() else { break };
            let f = d.frame(len);
            let et = if len >= ETH_HLEN {
                u16::from_be_bytes([f[12], f[13]])
            } else {
                0
            };
            if filter.is_some_and(|e| e != et) {
                other += 1;
                continue;
            }
            got += 1;
            let t = parse_test_frame(f);
            if t.is_some_and(|t| t.1) {
                ok += 1;
            }
            if printed < print {
                printed += 1;
                let mut line = LineBuf::new();
                let mac = |o: usize| {
                    let mut m = [0u8; 6];
                    if len >= ETH_HLEN {
                        m.copy_from_slice(&f[o..o + 6]);
                    }
                    Mac(m)
                };
                let (src, dst) = (mac(6), mac(0));
                let _ = write!(
                    line,
                    "net-rx: len={} src={} dst={} ethertype={:#06x}",
                    len, src, dst, et
                );
                let _ = match t {
                    Some((seq, good)) => writeln!(line, " seq={} ok={}", seq, good as u8),
                    None => writeln!(line, " seq=- ok=0"),
                };
                line.flush();
            }
        }
    }
    println!(
        "net: received={} ok={} bad={} other={} unprinted={}",
        got,
        ok,
        got - ok,
        other,
        got - printed
    );
}

/// Send the announce frame now (what a config interrupt with
/// VIRTIO_NET_S_ANNOUNCE triggers, without the ack).
fn cmd_announce(cmd: &str, a: &Args) {
    let Some((n, d)) = pick(cmd, a) else { return };
    let sent = d.lock().send_announce_frame();
    println!("net: announce-frame nic={} sent={}", n, sent as u8);
}

fn cmd_echo(cmd: &str, a: &Args) {
    let Ok(on) = a.num("on", 0..=1) else {
        return;
    };
    let Some((n, d)) = pick(cmd, a) else { return };
    if on == Some(0) {
        let mut d = d.lock();
        if d.echo {
            d.echo = false;
            println!(
                "net-echo: stopped nic={} echoed={} other={}",
                n, d.echoed, d.echo_other
            );
        }
        return;
    }
    let mut d = d.lock();
    d.echo = true;
    d.echoed = 0;
    d.echo_other = 0;
    println!("net-echo: start nic={} mac={}", n, Mac(d.mac));
}

/// `stop`: end the echo workload.
pub fn echo_stop() {
    for n in 0..count() {
        if let Some(d) = nic(n) {
            let mut d = d.lock();
            if d.echo {
                d.echo = false;
                println!(
                    "net-echo: stopped nic={} echoed={} other={}",
                    n, d.echoed, d.echo_other
                );
            }
        }
    }
}

/// BSP main loop: configuration interrupts (announce, link), echo.
pub fn poll_background() {
    for n in 0..count() {
        let Some(d) = nic(n) else { continue };
        let mut d = d.lock();
        let c = irq::count(d.dev.config_vector);
        // Also look at the status every 250 ms in case an interrupt was
        // missed (e.g. raised while the device was being set up).
        let interrupted = c != d.config_seen;
        let periodic = time::passed(d.next_status_poll);
        if interrupted || periodic {
            d.config_seen = c;
            d.next_status_poll = time::deadline_after_ms(250);
            if interrupted || d.read_status() != d.status {
                d.config_changed(n);
            }
        }
        if d.echo && d.rx.has_used() {
            d.echo_pass();
        }
    }
}
