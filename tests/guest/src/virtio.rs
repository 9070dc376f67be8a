//! The virtio-pci transport (virtio 1.2, 4.1.4: modern interface only) and
//! split virtqueues (2.7), shared by the drivers in `blk.rs`, `net.rs` and
//! `balloon.rs`.
//!
//! Everything is found as a real driver finds it: the vendor capabilities
//! give the common, notify, ISR and device configuration regions (BAR and
//! offset), the MSI-X capability gives the vector table. Rings, request
//! headers and data buffers come from the DMA arena (`mem::dma_alloc`),
//! identity mapped, so guest-virtual = guest-physical addresses.
//!
//! Interrupts: one MSI-X vector per queue plus one for configuration
//! changes, each sent to the BSP (LAPIC of CPU 0) with its own IDT vector
//! from `irq::alloc_vector`; the CPL0 stub only counts them. Drivers wait
//! for completions by sleeping in the WAIT_IRQ gate on the queue's vector
//! (`Wait::Irq`) or by polling the used ring (`Wait::Poll`, and always on
//! APs).
//!
//! Drivers initialise lazily: the first command that needs a device calls
//! [`init_all`], which enumerates bus 0, reserves the DMA arena and starts
//! every virtio-blk and virtio-net function (one `virtio:` line each). The
//! balloon driver starts only on the first `balloon-*` command (after
//! [`init_all`]), so that a configured balloon target never takes guest
//! memory behind a test's back.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};

use crate::percpu::{cpu_id, CPUS};
use crate::{balloon, blk, irq, lapic, mem, net, pci, time, workload};

pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_INDIRECT_DESC (ring feature 28): a chain as one descriptor
/// pointing at a table of its own.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_F_EVENT_IDX (ring feature 29): used_event / avail_event instead
/// of the ring flags.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Ring features every driver also negotiates if offered, as Linux's
/// drivers do both (boot options `indirect=1`, `event_idx=1`).
static RING_FEATURES: AtomicU64 = AtomicU64::new(0);

pub fn set_ring_feature(feature: u64, on: bool) {
    if on {
        RING_FEATURES.fetch_or(feature, Ordering::Relaxed);
    } else {
        RING_FEATURES.fetch_and(!feature, Ordering::Relaxed);
    }
}

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

/// Vendor capability configuration types.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Common configuration register offsets (4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// "No vector" in the MSI-X vector registers.
const NO_VECTOR: u16 = 0xffff;

fn rd8(a: u64) -> u8 {
    // SAFETY: `a` is inside a BAR region found through the capabilities
    // (mapped uncached) or inside the DMA arena.
    unsafe { read_volatile(a as *const u8) }
}
fn rd16(a: u64) -> u16 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u16) }
}
fn rd32(a: u64) -> u32 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u32) }
}
fn wr8(a: u64, v: u8) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u8, v) }
}
fn wr16(a: u64, v: u16) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u16, v) }
}
fn wr32(a: u64, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u32, v) }
}
fn wr64(a: u64, v: u64) {
    // SAFETY: as above (DMA arena only: 8-byte aligned descriptor fields).
    unsafe { write_volatile(a as *mut u64, v) }
}

/// Whether a BAR region can be accessed: below 4 GiB everything is mapped
/// by boot.S (0xc0000000.. uncached).
fn mmio_ok(addr: u64, len: u64) -> bool {
    addr.checked_add(len).is_some_and(|end| end <= 1 << 32)
}

/// A virtio-pci function with its regions found and features negotiated.
pub struct Device {
    pub dev: u8,
    pub func: u8,
    common: u64,
    notify: u64,
    notify_mult: u32,
    #[allow(dead_code)]
    isr: u64,
    cfg: u64,
    msix: pci::Msix,
    /// Features the device offers.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// IDT vector of the configuration-change interrupt (MSI-X entry 0).
    pub config_vector: u8,
    /// IDT vectors of MSI-X entries 1.. (queue i uses entry i + 1).
    queue_vectors: [u8; 4],
}

impl Device {
    /// Find the regions of a virtio function and allocate its interrupt
    /// vectors (`queues` queues, one config vector).
    pub fn probe(
        dev: u8,
        func: u8,
        device_type: u16,
        queues: usize,
    ) -> Result<Device, &'static str> {
        pci::enable_memory_and_master(dev, func);
        let mut regions = [None::<(u64, u64, u16)>; 5];
        pci::for_each_capability(dev, func, |off, id| {
            if id != pci::CAP_VENDOR {
                return;
            }
            let cfg_type = pci::read8(dev, func, off + 3);
            let bar = pci::read8(dev, func, off + 4);
            let offset = pci::read32(0, dev, func, off + 8) as u64;
            let length = pci::read32(0, dev, func, off + 12) as u64;
            let t = cfg_type as usize;
            // The first capability of each type is the preferred one.
            if (1..=4).contains(&t) && regions[t].is_none() {
                if let Some(base) = pci::bar_address(dev, func, bar) {
                    regions[t] = Some((base + offset, length, off));
                }
            }
        });
        let get = |t: u8, min: u64| -> Result<(u64, u64, u16), &'static str> {
            match regions[t as usize] {
                Some((a, l, off)) if l >= min && mmio_ok(a, l) => Ok((a, l, off)),
                Some((a, _, _)) if !mmio_ok(a, 1) => Err("BAR above 4 GiB (not mapped)"),
                Some(_) => Err("virtio capability region too small"),
                None => Err("missing virtio capability (modern interface required)"),
            }
        };
        let (common, _, _) = get(CFG_COMMON, 0x38)?;
        let (notify, _, notify_cap) = get(CFG_NOTIFY, 2)?;
        let (isr, _, _) = get(CFG_ISR, 1)?;
        let cfg = match device_type {
            // Net, block and balloon have device configuration; others may not.
            1 | 2 | 5 => get(CFG_DEVICE, 8)?.0,
            _ => regions[CFG_DEVICE as usize].map_or(0, |r| r.0),
        };
        let notify_mult = pci::read32(0, dev, func, notify_cap + 16);
        let msix = pci::Msix::find(dev, func).ok_or("no MSI-X capability")?;
        if !mmio_ok(msix.table(), 16 * msix.count as u64) {
            return Err("MSI-X table above 4 GiB (not mapped)");
        }
        if (msix.count as usize) < queues + 1 {
            return Err("too few MSI-X vectors");
        }
        let mut d = Device {
            dev,
            func,
            common,
            notify,
            notify_mult,
            isr,
            cfg,
            msix,
            offered: 0,
            features: 0,
            config_vector: 0,
            queue_vectors: [0; 4],
        };
        d.config_vector = irq::alloc_vector().ok_or("out of interrupt vectors")?;
        for v in d.queue_vectors.iter_mut().take(queues) {
            *v = irq::alloc_vector().ok_or("out of interrupt vectors")?;
        }
        Ok(d)
    }

    fn c(&self, off: u64) -> u64 {
        self.common + off
    }

    pub fn status(&self) -> u8 {
        rd8(self.c(common::DEVICE_STATUS))
    }

    fn set_status(&self, s: u8) {
        wr8(self.c(common::DEVICE_STATUS), s)
    }

    /// Reset the device and wait (up to 100 ms) until it reads back 0.
    pub fn reset(&self) -> bool {
        self.msix.enable(false);
        self.set_status(0);
        let deadline = time::deadline_after_ms(100);
        while self.status() != 0 {
            if time::passed(deadline) {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (`wanted` & offered,
    /// VERSION_1 required), FEATURES_OK (checked), MSI-X table setup and
    /// the config vector.
    pub fn begin(&mut self, wanted: u64) -> Result<(), &'static str> {
        self.begin_with(|_| wanted)
    }

    /// [`Device::begin`] with the wanted features computed from the offered
    /// ones (features that only make sense together with others).
    pub fn begin_with(&mut self, wanted: impl FnOnce(u64) -> u64) -> Result<(), &'static str> {
        if !self.reset() {
            return Err("device reset did not complete");
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr32(self.c(common::DEVICE_FEATURE_SELECT), 0);
        let lo = rd32(self.c(common::DEVICE_FEATURE)) as u64;
        wr32(self.c(common::DEVICE_FEATURE_SELECT), 1);
        let hi = rd32(self.c(common::DEVICE_FEATURE)) as u64;
        self.offered = lo | hi << 32;
        if self.offered & F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device does not offer VERSION_1");
        }
        let ring = RING_FEATURES.load(Ordering::Relaxed);
        self.features = self.offered & (wanted(self.offered) | F_VERSION_1 | ring);
        wr32(self.c(common::DRIVER_FEATURE_SELECT), 0);
        wr32(self.c(common::DRIVER_FEATURE), self.features as u32);
        wr32(self.c(common::DRIVER_FEATURE_SELECT), 1);
        wr32(self.c(common::DRIVER_FEATURE), (self.features >> 32) as u32);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device refused FEATURES_OK");
        }
        // MSI-X: entry 0 = config, entry i + 1 = queue i; all to the BSP.
        let bsp = CPUS[0].apic_id.load(Ordering::Relaxed);
        self.msix.set_entry(0, self.config_vector, bsp);
        for (i, &v) in self.queue_vectors.iter().enumerate() {
            if v != 0 {
                self.msix.set_entry(i as u16 + 1, v, bsp);
            }
        }
        self.msix.enable(true);
        wr16(self.c(common::CONFIG_MSIX_VECTOR), 0);
        if rd16(self.c(common::CONFIG_MSIX_VECTOR)) == NO_VECTOR {
            self.set_status(STATUS_FAILED);
            return Err("device refused the config MSI-X vector");
        }
        Ok(())
    }

    /// Mask or unmask the MSI-X vector of queue `q` (entry q + 1).
    pub fn mask_queue_vector(&self, q: u16, masked: bool) {
        self.msix.mask(q + 1, masked);
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        rd16(self.c(common::NUM_QUEUES))
    }

    /// Set up queue `q.index` with at most `max` entries (a power of two),
    /// rings allocated on first use, its MSI-X vector, and enable it.
    pub fn setup_queue(&self, q: &mut Virtqueue) -> Result<(), &'static str> {
        wr16(self.c(common::QUEUE_SELECT), q.index);
        let dev_max = rd16(self.c(common::QUEUE_SIZE));
        if dev_max == 0 {
            return Err("queue not available");
        }
        if q.size == 0 {
            let mut size = dev_max.min(q.max);
            // Split queues: a power of two.
            size = 1 << (15 - size.leading_zeros());
            q.alloc(size).ok_or("out of DMA memory for the rings")?;
        } else if q.size > dev_max {
            return Err("queue shrank");
        }
        q.reinit();
        q.event_idx = self.features & F_EVENT_IDX != 0;
        if self.features & F_INDIRECT_DESC != 0 && q.indirect_tables == 0 {
            let bytes = q.size as u64 * INDIRECT_MAX as u64 * 16;
            q.indirect_tables =
                mem::dma_alloc(bytes, mem::PAGE).ok_or("out of DMA memory for indirect tables")?;
        }
        q.indirect = self.features & F_INDIRECT_DESC != 0;
        wr16(self.c(common::QUEUE_SIZE), q.size);
        let entry = q.index + 1;
        q.vector = self.queue_vectors[q.index as usize];
        wr16(self.c(common::QUEUE_MSIX_VECTOR), entry);
        if rd16(self.c(common::QUEUE_MSIX_VECTOR)) != entry {
            return Err("device refused the queue MSI-X vector");
        }
        for (reg, a) in [
            (common::QUEUE_DESC, q.desc),
            (common::QUEUE_DRIVER, q.avail),
            (common::QUEUE_DEVICE, q.used),
        ] {
            wr32(self.c(reg), a as u32);
            wr32(self.c(reg + 4), (a >> 32) as u32);
        }
        let off = rd16(self.c(common::QUEUE_NOTIFY_OFF)) as u64;
        q.notify = self.notify + off * self.notify_mult as u64;
        wr16(self.c(common::QUEUE_ENABLE), 1);
        Ok(())
    }

    /// DRIVER_OK: the device is live. Fails if the device set NEEDS_RESET
    /// (it could not start with our setup).
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        self.set_status(self.status() | STATUS_DRIVER_OK);
        if self.needs_reset() {
            return Err("device set NEEDS_RESET at DRIVER_OK");
        }
        Ok(())
    }

    /// The device asks for a reset (an error it cannot recover from).
    pub fn needs_reset(&self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    /// Mark the device FAILED (after a setup error).
    pub fn fail(&self) {
        self.set_status(self.status() | STATUS_FAILED);
    }

    /// Read the device configuration consistently: `f` runs until the
    /// config generation is the same before and after.
    pub fn read_config<T>(&self, f: impl Fn(&Cfg) -> T) -> T {
        let cfg = Cfg(self.cfg);
        loop {
            let g = rd8(self.c(common::CONFIG_GENERATION));
            let v = f(&cfg);
            if rd8(self.c(common::CONFIG_GENERATION)) == g {
                return v;
            }
        }
    }

    /// Write a 32-bit field of the device configuration (the balloon's
    /// `actual`). Only for devices whose configuration region was required
    /// by [`Device::probe`].
    pub fn write_config_u32(&self, off: u64, value: u32) {
        wr32(self.cfg + off, value)
    }
}

/// The device-specific configuration region.
pub struct Cfg(u64);

impl Cfg {
    pub fn u8(&self, off: u64) -> u8 {
        rd8(self.0 + off)
    }
    pub fn u16(&self, off: u64) -> u16 {
        rd16(self.0 + off)
    }
    pub fn u32(&self, off: u64) -> u32 {
        rd32(self.0 + off)
    }
    /// 64-bit fields are read as two 32-bit halves (4.1.3.1).
    pub fn u64(&self, off: u64) -> u64 {
        self.u32(off) as u64 | (self.u32(off + 4) as u64) << 32
    }
}

// ------------------------------------------------------------- queues ----

/// Largest queue the drivers use.
pub const MAX_QUEUE: usize = 256;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// Longest chain put in an indirect table (longer ones use the ring).
const INDIRECT_MAX: usize = 8;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Writes descriptor `i` of the table at `table` (the ring's or an
/// indirect one).
fn write_desc(table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = table + 16 * i as u64;
    wr64(d, addr);
    wr32(d + 8, len);
    wr16(d + 12, flags);
    wr16(d + 14, next);
}

/// A buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Seg {
    pub const fn r(addr: u64, len: u32) -> Seg {
        Seg {
            addr,
            len,
            write: false,
        }
    }
    pub const fn w(addr: u64, len: u32) -> Seg {
        Seg {
            addr,
            len,
            write: true,
        }
    }
}

const IDLE: u8 = 0;
const IN_FLIGHT: u8 = 1;
const DONE: u8 = 2;

/// A split virtqueue, driver side. Chains are freed along a driver-private
/// copy of their `next` links (`next`, `chain_len`), never along the ring
/// memory the device can see, so hostile chains (loops) free cleanly.
pub struct Virtqueue {
    pub index: u16,
    /// Largest size the driver wants.
    max: u16,
    /// Size in use (0: rings not allocated yet).
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    /// IDT vector of the queue's interrupt.
    pub vector: u8,
    free_head: u16,
    pub num_free: u16,
    next: [u16; MAX_QUEUE],
    chain_len: [u16; MAX_QUEUE],
    state: [u8; MAX_QUEUE],
    done_len: [u32; MAX_QUEUE],
    avail_idx: u16,
    last_used: u16,
    /// Used entries naming a descriptor that was not in flight.
    pub bogus: u32,
    /// EVENT_IDX negotiated: suppression through used_event / avail_event.
    event_idx: bool,
    /// INDIRECT_DESC negotiated: chains of 2..=INDIRECT_MAX buffers go in
    /// the head's own table at `indirect_tables + head * INDIRECT_MAX * 16`.
    indirect: bool,
    indirect_tables: u64,
    /// The avail index at the last notification decision (EVENT_IDX).
    kicked_idx: u16,
    /// Whether the driver wants interrupts (EVENT_IDX: re-armed on pop).
    interrupts: bool,
}

impl Virtqueue {
    pub const fn new(index: u16, max: u16) -> Virtqueue {
        Virtqueue {
            index,
            max,
            size: 0,
            desc: 0,
            avail: 0,
            used: 0,
            notify: 0,
            vector: 0,
            free_head: 0,
            num_free: 0,
            next: [0; MAX_QUEUE],
            chain_len: [0; MAX_QUEUE],
            state: [IDLE; MAX_QUEUE],
            done_len: [0; MAX_QUEUE],
            avail_idx: 0,
            last_used: 0,
            bogus: 0,
            event_idx: false,
            indirect: false,
            indirect_tables: 0,
            kicked_idx: 0,
            interrupts: true,
        }
    }

    /// Allocate the rings: descriptor table, available and used ring, one
    /// page each (size <= 256).
    fn alloc(&mut self, size: u16) -> Option<()> {
        let base = mem::dma_alloc(3 * mem::PAGE, mem::PAGE)?;
        self.size = size;
        self.desc = base;
        self.avail = base + mem::PAGE;
        self.used = base + 2 * mem::PAGE;
        Some(())
    }

    /// Empty rings, every descriptor free (after a device reset).
    fn reinit(&mut self) {
        mem::fill(self.desc, 3 * mem::PAGE, 0);
        let n = self.size as usize;
        for i in 0..n {
            self.next[i] = (i as u16 + 1) % self.size;
            self.state[i] = IDLE;
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.avail_idx = 0;
        self.last_used = 0;
        self.bogus = 0;
        self.kicked_idx = 0;
        self.interrupts = true;
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(self.desc, i, addr, len, flags, next);
    }

    /// Overwrite the `next` field the device sees (hostile chains only; the
    /// driver's own copy is unchanged).
    pub fn poke_next(&self, i: u16, flags: u16, next: u16) {
        let d = self.desc + 16 * i as u64;
        wr16(d + 12, flags);
        wr16(d + 14, next);
    }

    /// Head the next chain will get (None if no descriptor is free).
    pub fn peek_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Build a chain of `segs` in the descriptor table. Returns its head and
    /// the indices used (in order); None if not enough descriptors. With
    /// INDIRECT_DESC a chain of 2..=INDIRECT_MAX buffers takes one ring
    /// descriptor pointing at the head's table (every id is then the head).
    pub fn add_chain(&mut self, segs: &[Seg], ids: &mut [u16]) -> Option<u16> {
        let n = segs.len();
        if self.indirect && (2..=INDIRECT_MAX).contains(&n) && self.num_free > 0 && n <= ids.len() {
            return Some(self.add_indirect(segs, ids));
        }
        if n == 0 || n > self.num_free as usize || n > ids.len() {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, s) in segs.iter().enumerate() {
            ids[k] = i;
            let nxt = self.next[i as usize];
            let last = k + 1 == n;
            let flags = if s.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            self.write_desc(i, s.addr, s.len, flags, if last { 0 } else { nxt });
            if !last {
                i = nxt;
            } else {
                self.free_head = nxt;
            }
        }
        self.num_free -= n as u16;
        self.chain_len[head as usize] = n as u16;
        self.state[head as usize] = IN_FLIGHT;
        Some(head)
    }

    fn add_indirect(&mut self, segs: &[Seg], ids: &mut [u16]) -> u16 {
        let head = self.free_head;
        let table = self.indirect_tables + (head as usize * INDIRECT_MAX * 16) as u64;
        for (k, s) in segs.iter().enumerate() {
            let last = k + 1 == segs.len();
            let flags = if s.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            let next = if last { 0 } else { k as u16 + 1 };
            write_desc(table, k as u16, s.addr, s.len, flags, next);
            ids[k] = head;
        }
        self.write_desc(head, table, (segs.len() * 16) as u32, DESC_F_INDIRECT, 0);
        self.free_head = self.next[head as usize];
        self.num_free -= 1;
        self.chain_len[head as usize] = 1;
        self.state[head as usize] = IN_FLIGHT;
        head
    }

    /// A one-descriptor chain whose buffer depends on the descriptor index:
    /// `f(index)` gives (addr, len, device-writable).
    pub fn add_single_with(&mut self, f: impl FnOnce(u16) -> (u64, u32, bool)) -> Option<u16> {
        let head = self.peek_head()?;
        let (addr, len, write) = f(head);
        let mut ids = [0u16; 1];
        self.add_chain(&[Seg { addr, len, write }], &mut ids)
    }

    /// Make `head` available to the device (no notification yet).
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        wr16(self.avail + 4 + 2 * slot as u64, head);
        // The ring entry (and the descriptors) before the index.
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr16(self.avail + 2, self.avail_idx);
    }

    /// Notify the device unless it asked not to be: the used ring's flags,
    /// or with EVENT_IDX unless avail_event lies outside the entries
    /// published since the last kick (the spec's vring_need_event).
    pub fn kick(&mut self) {
        // The index store must be visible before we read the flags.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let event = rd16(self.used + 4 + 8 * self.size as u64);
            let (new, old) = (self.avail_idx, self.kicked_idx);
            self.kicked_idx = new;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            rd16(self.used) & USED_F_NO_NOTIFY == 0
        };
        if notify {
            wr16(self.notify, self.index);
        }
    }

    /// Ask the device for interrupts (true) or not. With EVENT_IDX:
    /// used_event at the next entry, re-armed as entries are popped; off
    /// parks it half the ring space behind (as far from firing as it gets).
    pub fn set_interrupts(&mut self, on: bool) {
        self.interrupts = on;
        if self.event_idx {
            self.arm_used_event();
        } else {
            wr16(self.avail, if on { 0 } else { AVAIL_F_NO_INTERRUPT });
        }
        fence(Ordering::SeqCst);
    }

    /// EVENT_IDX: tell the device which used entry to interrupt for.
    fn arm_used_event(&self) {
        let event = if self.interrupts {
            self.last_used
        } else {
            self.last_used.wrapping_sub(0x8000)
        };
        wr16(self.avail + 4 + 2 * self.size as u64, event);
    }

    /// The device's used index.
    fn used_idx(&self) -> u16 {
        let i = rd16(self.used + 2);
        fence(Ordering::Acquire);
        i
    }

    /// Whether the used ring has entries we have not looked at.
    pub fn has_used(&self) -> bool {
        self.size != 0 && self.used_idx() != self.last_used
    }

    /// Next used entry in ring order: (id, len). For queues whose chains
    /// complete in a meaningful order (net rx).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        let slot = self.last_used % self.size;
        let e = self.used + 4 + 8 * slot as u64;
        let id = rd32(e);
        let len = rd32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // Interrupt again for the next entry (the spec's re-arm; the
            // caller checks the ring again before it sleeps), or keep the
            // parked event out of reach.
            self.arm_used_event();
            fence(Ordering::SeqCst);
        }
        if id >= self.size as u32 || self.state[id as usize] != IN_FLIGHT {
            self.bogus += 1;
            return None;
        }
        self.state[id as usize] = DONE;
        self.done_len[id as usize] = len;
        Some((id as u16, len))
    }

    /// Move every used entry into the completion table (out-of-order
    /// completion: callers then ask [`Self::take`] for their heads).
    /// Returns how many completed.
    pub fn poll(&mut self) -> usize {
        let mut n = 0;
        while self.has_used() {
            if self.pop_used().is_some() {
                n += 1;
            }
        }
        n
    }

    /// Free every completed chain (queues whose completions need no
    /// answer: tx). Returns how many.
    pub fn reclaim(&mut self) -> usize {
        let mut n = 0;
        while self.has_used() {
            if let Some((id, _)) = self.pop_used() {
                self.free(id);
                n += 1;
            }
        }
        n
    }

    pub fn is_done(&self, head: u16) -> bool {
        self.state.get(head as usize) == Some(&DONE)
    }

    /// If `head` completed: free its chain, return the used length.
    pub fn take(&mut self, head: u16) -> Option<u32> {
        if !self.is_done(head) {
            return None;
        }
        let len = self.done_len[head as usize];
        self.free(head);
        Some(len)
    }

    /// Give a completed chain back to the free list (following the
    /// driver's copy of the links).
    fn free(&mut self, head: u16) {
        let n = self.chain_len[head as usize];
        let mut last = head;
        for _ in 1..n {
            last = self.next[last as usize];
        }
        self.next[last as usize] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.state[head as usize] = IDLE;
    }

    /// Re-publish a completed single-descriptor chain as is (rx buffers).
    pub fn repost(&mut self, head: u16) {
        if self.is_done(head) {
            self.state[head as usize] = IN_FLIGHT;
            self.publish(head);
        }
    }

    /// Forget a chain the device never completed (after a device reset).
    pub fn abandon_all(&mut self) {
        for s in self.state.iter_mut() {
            *s = IDLE;
        }
    }
}

// ------------------------------------------------------------- waiting ----

/// How to wait for a completion.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Sleep in the WAIT_IRQ gate until the queue's interrupt (BSP only;
    /// APs poll).
    Irq,
    /// Spin on the used ring, interrupts suppressed.
    Poll,
}

impl Wait {
    pub fn parse(s: Option<&str>) -> Option<Wait> {
        match s {
            None | Some("irq") => Some(Wait::Irq),
            Some("poll") => Some(Wait::Poll),
            _ => None,
        }
    }
}

/// Wait until `check()` is true or `deadline` (TSC) passes; false on
/// timeout. With `Wait::Irq` on the BSP, sleeps between checks until
/// `vector` fires (a LAPIC one-shot every 10 ms bounds each sleep).
pub fn wait_until(vector: u8, deadline: u64, mode: Wait, mut check: impl FnMut() -> bool) -> bool {
    let mut sleep = mode == Wait::Irq && cpu_id() == 0;
    let mut timer_until = 0u64;
    loop {
        let seen = irq::count(vector);
        if check() {
            return true;
        }
        if time::passed(deadline) {
            return false;
        }
        if sleep && time::passed(timer_until) {
            if lapic::oneshot_us(10_000) {
                timer_until = time::deadline_after_us(9_000);
            } else {
                // No usable LAPIC timer: a lost interrupt could make us
                // sleep forever; poll instead.
                sleep = false;
            }
        }
        if sleep {
            irq::wait_for(vector, seen);
        } else {
            core::hint::spin_loop();
        }
    }
}

/// Move `value` into the DMA arena and return a `'static` reference (the
/// drivers' state lives there rather than in `.bss`, which the boot path
/// zeroes and first-touches before the first output).
pub fn place<T>(value: T) -> Option<&'static T> {
    let size = core::mem::size_of::<T>() as u64;
    let align = core::mem::align_of::<T>().max(64) as u64;
    let a = mem::dma_alloc(size.max(8), align)?;
    let p = a as *mut T;
    // SAFETY: fresh, aligned, exclusively owned arena memory, never freed.
    unsafe {
        p.write(value);
        Some(&*p)
    }
}

// ------------------------------------------------------------ lifecycle ----

const UNINIT: u8 = 0;
const READY: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNINIT);

/// Whether the drivers were started.
pub fn initialized() -> bool {
    STATE.load(Ordering::Acquire) == READY
}

/// Enumerate bus 0 and start every virtio-blk and virtio-net function
/// (once; later calls return at once). Prints `virtio: 00:DD.F <name>
/// ready features=0x...` or `testguest: error: virtio: 00:DD.F: <why>` per
/// device. False if the DMA arena cannot be had.
pub fn init_all() -> bool {
    if initialized() {
        return true;
    }
    let Some((base, end)) = mem::dma_candidate() else {
        println!("testguest: error: virtio: no free RAM for driver buffers");
        return false;
    };
    if let Some((pb, pages)) = workload::pages_region() {
        let pe = pb + pages * mem::PAGE;
        let busy = (0..crate::percpu::MAX_CPUS).any(|c| workload::job_of(c) == workload::JOB_PAGES);
        if busy && pb < end && base < pe {
            println!("testguest: error: virtio: the pages workload uses the RAM the drivers need (stop it first)");
            return false;
        }
    }
    mem::dma_reserve();
    STATE.store(READY, Ordering::Release);
    pci::for_each_function(|dev, func, id| {
        let Some(t) = pci::virtio_type(dev, func, id) else {
            return;
        };
        let r = match t {
            2 => blk::attach(dev, func),
            1 => net::attach(dev, func),
            _ => return,
        };
        if let Err(e) = r {
            println!("testguest: error: virtio: 00:{:02x}.{}: {}", dev, func, e);
        }
    });
    true
}

/// Called by the BSP main loop: configuration interrupts (net announce,
/// link, disk capacity), the net echo workload, blk-reader progress.
pub fn poll_background() {
    if !initialized() {
        return;
    }
    net::poll_background();
    blk::poll_background();
    balloon::poll_background();
}

/// Stop the background workloads (`stop`).
pub fn stop_background() {
    if !initialized() {
        return;
    }
    net::echo_stop();
    blk::reader_drain();
}
