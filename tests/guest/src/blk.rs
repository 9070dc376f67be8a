//! virtio-blk driver (virtio 1.2, 5.2) and the `blk-*` commands.
//!
//! One request queue per disk (256 entries). Every request is a chain
//! `header (16 bytes, device-readable) | data... | status (1 byte,
//! device-writable)`; the header, a discard/write-zeroes segment, the
//! status byte and a GET_ID buffer live in a 64-byte slot per head
//! descriptor. Data buffers come from the DMA arena: a 1 MiB chunk buffer
//! (reads and writes are split into requests of at most 1 MiB), a 2 MiB
//! benchmark area and a 1 MiB `blk-reader` buffer.
//!
//! Data pattern of `blk-write`/`blk-read pattern=P`: each little-endian
//! 8-byte word at disk byte address `a` (= sector * 512 + offset in the
//! sector, a multiple of 8) holds `P ^ a`. Checksum of `blk-read` without a
//! pattern: FNV-1a 64 (offset basis 0xcbf29ce484222325, prime
//! 0x100000001b3) over all bytes read, in disk order.

use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::console::LineBuf;
use crate::percpu::{PerCpu, CPUS, MAX_CPUS};
use crate::shell::{error, parse_hex, Args};
use crate::sync::SpinLock;
use crate::virtio::{self, wait_until, Device, Seg, Virtqueue, Wait};
use crate::{irq, mem, time, workload};

const MAX_DISKS: usize = 8;
const QUEUE_MAX: u16 = 256;

// Request types (5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

// Feature bits (5.2.3).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const WANTED: u64 =
    F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_DISCARD | F_WRITE_ZEROES;

/// Per-head request slot: header at 0, discard/write-zeroes segment at 16,
/// status at 32, GET_ID buffer at 40 (20 bytes).
const SLOT: u64 = 64;
const SLOT_SEG: u64 = 16;
const SLOT_STATUS: u64 = 32;
const SLOT_ID: u64 = 40;
/// Status byte before the device writes it.
const STATUS_UNSET: u8 = 0xff;

const SECTOR: u64 = 512;
/// Sectors per request of blk-read/blk-write (1 MiB).
const CHUNK_SECTORS: u64 = 2048;
const CHUNK: u64 = CHUNK_SECTORS * SECTOR;
const BENCH_AREA: u64 = 2 * mem::MIB;
/// Most sectors `blk-reader` reads per round.
const READER_MAX_SECTORS: u64 = 2048;
/// Timeout of ordinary requests.
const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Timeout of `blk-hostile` requests.
const HOSTILE_TIMEOUT_MS: u64 = 2_000;
/// Poison written into read buffers before each read.
const POISON: u64 = 0xdead_beef_dead_beef;

pub struct Disk {
    dev: Device,
    q: Virtqueue,
    slots: u64,
    capacity: u64,
    blk_size: u32,
    phys_exp: u8,
    ro: bool,
    /// Device resets by the driver (requests in flight before are lost).
    epoch: u32,
    config_seen: u64,
    /// A background reader uses this disk: queue interrupts off (avail
    /// flag and MSI-X vector masked); commands poll meanwhile.
    quiet: bool,
}

/// Addresses of the disks' `SpinLock<Disk>` (in the DMA arena).
static DISKS: [AtomicU64; MAX_DISKS] = [const { AtomicU64::new(0) }; MAX_DISKS];
static NDISKS: AtomicUsize = AtomicUsize::new(0);
static CHUNK_BUF: AtomicU64 = AtomicU64::new(0);
static BENCH_BUF: AtomicU64 = AtomicU64::new(0);
static READER_BUF: AtomicU64 = AtomicU64::new(0);

fn disk(n: usize) -> Option<&'static SpinLock<Disk>> {
    let a = DISKS.get(n)?.load(Ordering::Acquire);
    // SAFETY: set once by `attach` to a SpinLock<Disk> placed in the arena.
    (a != 0).then(|| unsafe { &*(a as *const SpinLock<Disk>) })
}

pub fn count() -> usize {
    NDISKS.load(Ordering::Acquire)
}

/// A lazily allocated arena buffer.
fn buffer(cell: &AtomicU64, bytes: u64) -> Option<u64> {
    let a = cell.load(Ordering::Acquire);
    if a != 0 {
        return Some(a);
    }
    let a = mem::dma_alloc(bytes, mem::PAGE)?;
    cell.store(a, Ordering::Release);
    Some(a)
}

/// Start the virtio-blk function at 00:dev.func as the next disk.
pub fn attach(dev: u8, func: u8) -> Result<(), &'static str> {
    let n = count();
    if n >= MAX_DISKS {
        return Err("too many disks");
    }
    let d = Device::probe(dev, func, 2, 1)?;
    let slots = mem::dma_alloc(SLOT * QUEUE_MAX as u64, mem::PAGE).ok_or("out of DMA memory")?;
    let mut disk = Disk {
        dev: d,
        q: Virtqueue::new(0, QUEUE_MAX),
        slots,
        capacity: 0,
        blk_size: 512,
        phys_exp: 0,
        ro: false,
        epoch: 0,
        config_seen: 0,
        quiet: false,
    };
    if let Err(e) = disk.start() {
        disk.dev.fail();
        return Err(e);
    }
    println!(
        "virtio: 00:{:02x}.{} blk{} ready features={:#x}",
        dev, func, n, disk.dev.features
    );
    let cell = virtio::place(SpinLock::new(disk)).ok_or("out of DMA memory")?;
    DISKS[n].store(cell as *const _ as u64, Ordering::Release);
    NDISKS.store(n + 1, Ordering::Release);
    Ok(())
}

/// Outcome of a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done {
        status: u8,
        len: u32,
    },
    Timeout,
    /// Not enough free descriptors.
    NoRoom,
}

/// A status byte as printed: ok, ioerr, unsupp, none (never written), or
/// the number.
struct StatusName(u8);

impl fmt::Display for StatusName {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            0 => f.write_str("ok"),
            1 => f.write_str("ioerr"),
            2 => f.write_str("unsupp"),
            STATUS_UNSET => f.write_str("none"),
            n => write!(f, "{}", n),
        }
    }
}

fn rd8(a: u64) -> u8 {
    // SAFETY: arena memory.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}

fn wr8(a: u64, v: u8) {
    // SAFETY: arena memory.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}

fn wr32(a: u64, v: u32) {
    // SAFETY: arena memory, aligned.
    unsafe { core::ptr::write_volatile(a as *mut u32, v) }
}

fn wr64(a: u64, v: u64) {
    // SAFETY: arena memory, aligned.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}

impl Disk {
    /// Device initialisation (also after a reset by the driver).
    fn start(&mut self) -> Result<(), &'static str> {
        self.dev.begin(WANTED)?;
        if self.dev.num_queues() == 0 {
            return Err("no queues");
        }
        self.dev.setup_queue(&mut self.q)?;
        self.read_config();
        self.q.set_interrupts(!self.quiet);
        self.dev.mask_queue_vector(0, self.quiet);
        self.config_seen = irq::count(self.dev.config_vector);
        self.dev.driver_ok()
    }

    fn read_config(&mut self) {
        let f = self.dev.features;
        let (cap, bs, pe) = self.dev.read_config(|c| {
            (
                c.u64(0),
                if f & F_BLK_SIZE != 0 { c.u32(20) } else { 512 },
                if f & F_TOPOLOGY != 0 { c.u8(24) } else { 0 },
            )
        });
        self.capacity = cap;
        self.blk_size = bs;
        self.phys_exp = pe;
        self.ro = f & F_RO != 0;
    }

    /// Reset and restart the device after a request timed out (what a
    /// driver does when the device stops answering).
    fn recover(&mut self, n: usize) {
        println!(
            "testguest: warning: blk{}: request timed out, resetting the device",
            n
        );
        self.dev.reset();
        self.q.abandon_all();
        self.epoch = self.epoch.wrapping_add(1);
        if let Err(e) = self.start() {
            println!("testguest: error: blk{}: restart failed: {}", n, e);
        }
    }

    fn slot(&self, head: u16) -> u64 {
        self.slots + SLOT * head as u64
    }

    fn status_of(&self, head: u16) -> u8 {
        rd8(self.slot(head) + SLOT_STATUS)
    }

    /// Queue a request `typ` at `sector` with `data` between header and
    /// status (not kicked).
    fn submit(&mut self, typ: u32, sector: u64, data: &[Seg]) -> Option<u16> {
        if data.len() + 2 > self.q.num_free as usize || data.len() > 4 {
            return None;
        }
        let head = self.q.peek_head()?;
        let s = self.slot(head);
        wr32(s, typ);
        wr32(s + 4, 0);
        wr64(s + 8, sector);
        wr8(s + SLOT_STATUS, STATUS_UNSET);
        let mut segs = [Seg::r(0, 0); 6];
        segs[0] = Seg::r(s, 16);
        segs[1..1 + data.len()].copy_from_slice(data);
        segs[1 + data.len()] = Seg::w(s + SLOT_STATUS, 1);
        let mut ids = [0u16; 6];
        let h = self.q.add_chain(&segs[..data.len() + 2], &mut ids)?;
        self.q.publish(h);
        Some(h)
    }

    /// Interrupts on or off (quiet mode).
    fn set_quiet(&mut self, quiet: bool) {
        if quiet != self.quiet {
            self.quiet = quiet;
            self.q.set_interrupts(!quiet);
            self.dev.mask_queue_vector(0, quiet);
        }
    }

    /// How to wait: polling while quiet.
    fn mode(&self, mode: Wait) -> Wait {
        if self.quiet {
            Wait::Poll
        } else {
            mode
        }
    }

    /// Wait for `head`.
    fn finish(&mut self, n: usize, head: u16, timeout_ms: u64, mode: Wait) -> Outcome {
        let vector = self.q.vector;
        let mode = self.mode(mode);
        let q = &mut self.q;
        let ok = wait_until(vector, time::deadline_after_ms(timeout_ms), mode, || {
            q.poll();
            q.is_done(head)
        });
        if !ok {
            self.recover(n);
            return Outcome::Timeout;
        }
        let status = self.status_of(head);
        let len = self.q.take(head).unwrap_or(0);
        Outcome::Done { status, len }
    }

    fn request(&mut self, n: usize, typ: u32, sector: u64, data: &[Seg]) -> Outcome {
        let Some(head) = self.submit(typ, sector, data) else {
            return Outcome::NoRoom;
        };
        self.q.kick();
        self.finish(n, head, REQUEST_TIMEOUT_MS, Wait::Irq)
    }
}

/// Fill `sectors` sectors at `buf` with the pattern of disk sector `sector`.
fn fill_pattern(buf: u64, sector: u64, sectors: u64, p: u64) {
    let words = (sectors * SECTOR / 8) as usize;
    // SAFETY: arena buffer of at least that size.
    let s = unsafe { core::slice::from_raw_parts_mut(buf as *mut u64, words) };
    let base = sector.wrapping_mul(SECTOR);
    for (i, w) in s.iter_mut().enumerate() {
        *w = p ^ base.wrapping_add(8 * i as u64);
    }
}

/// First word of `buf` (holding disk sectors from `sector`) not matching
/// the pattern: (byte offset in buf, expected, found).
fn check_pattern(buf: u64, sector: u64, sectors: u64, p: u64) -> Option<(u64, u64, u64)> {
    let words = (sectors * SECTOR / 8) as usize;
    // SAFETY: arena buffer of at least that size.
    let s = unsafe { core::slice::from_raw_parts(buf as *const u64, words) };
    let base = sector.wrapping_mul(SECTOR);
    s.iter().enumerate().find_map(|(i, &w)| {
        let e = p ^ base.wrapping_add(8 * i as u64);
        (w != e).then_some((8 * i as u64, e, w))
    })
}

const FNV64_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0100_0000_01b3;

fn fnv64(mut h: u64, buf: u64, len: u64) -> u64 {
    // SAFETY: arena buffer.
    let s = unsafe { core::slice::from_raw_parts(buf as *const u8, len as usize) };
    for &b in s {
        h ^= b as u64;
        h = h.wrapping_mul(FNV64_PRIME);
    }
    h
}

/// xorshift64* (benchmark offsets).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(time::rdtsc() | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

// ------------------------------------------------------------ commands ----

/// Commands `blk-*`. Initialises the drivers on first use.
pub fn command(cmd: &str, rest: &str) {
    let f: fn(&str, &Args) = match cmd {
        "blk-info" => cmd_info,
        "blk-id" => cmd_id,
        "blk-write" => cmd_write,
        "blk-read" => cmd_read,
        "blk-flush" | "blk-discard" | "blk-zeroes" => cmd_simple,
        "blk-inflight" => cmd_inflight,
        "blk-bench" => cmd_bench,
        "blk-hostile" => cmd_hostile,
        "blk-reader" => cmd_reader,
        "blk-check" => cmd_check,
        _ => return println!("testguest: error: unknown command {}", cmd),
    };
    let keys: &[&str] = match cmd {
        "blk-info" => &[],
        "blk-id" | "blk-flush" => &["disk"],
        "blk-write" => &["sector", "count", "pattern", "disk"],
        "blk-read" => &["sector", "count", "pattern", "disk"],
        "blk-discard" => &["sector", "count", "disk"],
        "blk-zeroes" => &["sector", "count", "unmap", "disk"],
        "blk-inflight" => &["n", "count", "disk", "wait"],
        "blk-bench" => &["kind", "bs", "n", "depth", "disk", "wait"],
        "blk-hostile" => &["kind", "disk"],
        "blk-reader" => &["sector", "count", "pattern", "disk", "cpu"],
        _ => &["pattern"],
    };
    let Some(a) = Args::parse(cmd, rest, keys) else {
        return;
    };
    if !virtio::init_all() {
        return;
    }
    f(cmd, &a);
}

/// The disk of `disk=N` (default 0), or an error printed.
fn pick(cmd: &str, a: &Args) -> Option<(usize, &'static SpinLock<Disk>)> {
    let n = a.num("disk", 0..=MAX_DISKS as u64 - 1).ok()?.unwrap_or(0) as usize;
    match disk(n) {
        Some(d) => Some((n, d)),
        None => {
            error(cmd, format_args!("no disk {} (disks={})", n, count()));
            None
        }
    }
}

fn hex_arg(cmd: &str, a: &Args, key: &str) -> Result<Option<u64>, ()> {
    match a.raw(key) {
        None => Ok(None),
        Some(v) => match parse_hex(v) {
            Some(p) => Ok(Some(p)),
            None => {
                error(
                    cmd,
                    format_args!("bad value for {}: {} (expected hex)", key, v),
                );
                Err(())
            }
        },
    }
}

/// `sector=S count=C` (both required; count in 1..=max).
fn range_args(cmd: &str, a: &Args, max: u64) -> Option<(u64, u64)> {
    let s = a.num("sector", 0..=u64::MAX / SECTOR).ok()?;
    let c = a.num("count", 1..=max).ok()?;
    match (s, c) {
        (Some(s), Some(c)) if s.checked_add(c).is_some_and(|e| e <= u64::MAX / SECTOR) => {
            Some((s, c))
        }
        (Some(_), Some(_)) => {
            error(cmd, format_args!("sector + count overflows"));
            None
        }
        _ => {
            error(cmd, format_args!("sector=S and count=C are required"));
            None
        }
    }
}

fn cmd_info(_cmd: &str, _a: &Args) {
    println!("blk: disks={}", count());
    for n in 0..count() {
        let Some(d) = disk(n) else { continue };
        let mut d = d.lock();
        d.read_config();
        println!(
            "blk{}: capacity={} blk_size={} phys_exp={} ro={} features={:#x} acked={:#x} pci=00:{:02x}.{}",
            n,
            d.capacity,
            d.blk_size,
            d.phys_exp,
            d.ro as u8,
            d.dev.offered,
            d.dev.features,
            d.dev.dev,
            d.dev.func
        );
    }
}

fn cmd_id(cmd: &str, a: &Args) {
    let Some((n, d)) = pick(cmd, a) else { return };
    let mut d = d.lock();
    let Some(head) = d.q.peek_head() else {
        return println!("blk: id status=noroom");
    };
    let id = d.slot(head) + SLOT_ID;
    mem::fill(id, 24, 0);
    match d.request(n, T_GET_ID, 0, &[Seg::w(id, 20)]) {
        Outcome::Done { status: 0, .. } => {
            let mut line = LineBuf::new();
            use core::fmt::Write;
            let _ = write!(line, "blk{}: id=", n);
            for i in 0..20 {
                let c = rd8(id + i);
                if c == 0 {
                    break;
                }
                let c = if c.is_ascii_graphic() { c as char } else { '?' };
                let _ = write!(line, "{}", c);
            }
            let _ = writeln!(line);
            line.flush();
        }
        o => print_outcome("id", o),
    }
}

fn print_outcome(op: &str, o: Outcome) {
    match o {
        Outcome::Done { status, .. } => println!("blk: {} status={}", op, StatusName(status)),
        Outcome::Timeout => println!("blk: {} status=timeout", op),
        Outcome::NoRoom => println!("blk: {} status=noroom", op),
    }
}

fn cmd_write(cmd: &str, a: &Args) {
    let Some((sector, count)) = range_args(cmd, a, u32::MAX as u64) else {
        return;
    };
    let Ok(Some(p)) = hex_arg(cmd, a, "pattern") else {
        if a.raw("pattern").is_none() {
            error(cmd, format_args!("pattern=P is required"));
        }
        return;
    };
    let Some((n, d)) = pick(cmd, a) else { return };
    let Some(buf) = buffer(&CHUNK_BUF, CHUNK) else {
        return error(cmd, format_args!("out of DMA memory"));
    };
    let mut d = d.lock();
    if let Err(s) = write_pattern(&mut d, n, buf, sector, count, p) {
        return println!("blk: write status={} sector={}", s, s.1);
    }
    println!("blk: write status=ok sectors={}", count);
}

/// Why a multi-request transfer stopped: (outcome, first sector of the
/// failed request).
struct Failed(Outcome, u64);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            Outcome::Done { status, .. } => write!(f, "{}", StatusName(status)),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::NoRoom => f.write_str("noroom"),
        }
    }
}

fn write_pattern(
    d: &mut Disk,
    n: usize,
    buf: u64,
    sector: u64,
    count: u64,
    p: u64,
) -> Result<(), Failed> {
    let mut done = 0;
    while done < count {
        let c = (count - done).min(CHUNK_SECTORS);
        let s = sector + done;
        fill_pattern(buf, s, c, p);
        match d.request(n, T_OUT, s, &[Seg::r(buf, (c * SECTOR) as u32)]) {
            Outcome::Done { status: 0, .. } => {}
            o => return Err(Failed(o, s)),
        }
        done += c;
    }
    Ok(())
}

fn cmd_read(cmd: &str, a: &Args) {
    let Some((sector, count)) = range_args(cmd, a, u32::MAX as u64) else {
        return;
    };
    let Ok(pattern) = hex_arg(cmd, a, "pattern") else {
        return;
    };
    let Some((n, d)) = pick(cmd, a) else { return };
    let Some(buf) = buffer(&CHUNK_BUF, CHUNK) else {
        return error(cmd, format_args!("out of DMA memory"));
    };
    let mut d = d.lock();
    let mut sum = FNV64_BASIS;
    let mut done = 0;
    while done < count {
        let c = (count - done).min(CHUNK_SECTORS);
        let s = sector + done;
        mem::fill(buf, c * SECTOR, POISON);
        match d.request(n, T_IN, s, &[Seg::w(buf, (c * SECTOR) as u32)]) {
            Outcome::Done { status: 0, .. } => {}
            o => return println!("blk: read status={} sector={}", Failed(o, s), s),
        }
        match pattern {
            Some(p) => {
                if let Some((off, e, f)) = check_pattern(buf, s, c, p) {
                    return println!(
                        "blk-read-bad sector={} offset={} expected={:#x} found={:#x}",
                        s + off / SECTOR,
                        off % SECTOR,
                        e,
                        f
                    );
                }
            }
            None => sum = fnv64(sum, buf, c * SECTOR),
        }
        done += c;
    }
    match pattern {
        Some(_) => println!("blk-read-ok sectors={}", count),
        None => println!("blk-read sum={:#018x} sectors={}", sum, count),
    }
}

/// `blk-flush`, `blk-discard`, `blk-zeroes`.
fn cmd_simple(cmd: &str, a: &Args) {
    let op = &cmd[4..];
    let (typ, range) = match op {
        "flush" => (T_FLUSH, None),
        "discard" => (T_DISCARD, Some(())),
        _ => (T_WRITE_ZEROES, Some(())),
    };
    let range = match range {
        Some(()) => match range_args(cmd, a, u32::MAX as u64) {
            Some(r) => Some(r),
            None => return,
        },
        None => None,
    };
    let Ok(unmap) = a.num("unmap", 0..=1) else {
        return;
    };
    let Some((n, d)) = pick(cmd, a) else { return };
    let mut d = d.lock();
    let outcome = match range {
        None => d.request(n, typ, 0, &[]),
        Some((sector, count)) => {
            let Some(head) = d.q.peek_head() else {
                return print_outcome(op, Outcome::NoRoom);
            };
            let seg = d.slot(head) + SLOT_SEG;
            wr64(seg, sector);
            wr32(seg + 8, count as u32);
            wr32(seg + 12, unmap.unwrap_or(0) as u32);
            d.request(n, typ, 0, &[Seg::r(seg, 16)])
        }
    };
    print_outcome(op, outcome);
}

/// Run `total` requests of `bs` bytes, `depth` in flight. Returns
/// (elapsed us, errors) or the failure.
#[allow(clippy::too_many_arguments)]
fn run_batch(
    d: &mut Disk,
    n: usize,
    write: bool,
    random: bool,
    bs: u64,
    total: u64,
    depth: usize,
    mode: Wait,
) -> Result<(u64, u64), &'static str> {
    let area = buffer(&BENCH_BUF, BENCH_AREA).ok_or("out of DMA memory")?;
    let blocks = d.capacity * SECTOR / bs;
    if blocks == 0 {
        return Err("disk smaller than one block");
    }
    let per_area = (BENCH_AREA / bs).max(1);
    let typ = if write { T_OUT } else { T_IN };
    let mut rng = Rng::new();
    let mut inflight = [None::<u16>; 64];
    let (mut submitted, mut completed, mut errors) = (0u64, 0u64, 0u64);
    let mode = d.mode(mode);
    if mode == Wait::Poll {
        d.q.set_interrupts(false);
    }
    let t0 = time::rdtsc();
    while completed < total {
        let mut kicked = false;
        for (slot, h) in inflight.iter_mut().enumerate().take(depth) {
            if h.is_some() || submitted >= total {
                continue;
            }
            let block = if random {
                rng.next() % blocks
            } else {
                submitted % blocks
            };
            let buf = area + (slot as u64 % per_area) * bs;
            let data = if write {
                Seg::r(buf, bs as u32)
            } else {
                Seg::w(buf, bs as u32)
            };
            match d.submit(typ, block * bs / SECTOR, &[data]) {
                Some(head) => {
                    *h = Some(head);
                    submitted += 1;
                    kicked = true;
                }
                None => break,
            }
        }
        if kicked {
            d.q.kick();
        }
        let vector = d.q.vector;
        let q = &mut d.q;
        let ok = wait_until(
            vector,
            time::deadline_after_ms(REQUEST_TIMEOUT_MS),
            mode,
            || {
                q.poll();
                inflight.iter().flatten().any(|&h| q.is_done(h))
            },
        );
        if !ok {
            d.q.set_interrupts(!d.quiet);
            d.recover(n);
            return Err("timeout");
        }
        for h in inflight.iter_mut() {
            if let Some(head) = *h {
                if d.q.is_done(head) {
                    if d.status_of(head) != 0 {
                        errors += 1;
                    }
                    d.q.take(head);
                    *h = None;
                    completed += 1;
                }
            }
        }
    }
    let us = (time::rdtsc() - t0) * 1000 / time::tsc_khz().max(1);
    d.q.set_interrupts(!d.quiet);
    Ok((us.max(1), errors))
}

fn cmd_inflight(cmd: &str, a: &Args) {
    let Ok(Some(k)) = a.num("n", 1..=64) else {
        if a.raw("n").is_none() {
            error(cmd, format_args!("n=K (1..=64) is required"));
        }
        return;
    };
    let Ok(total) = a.num("count", 1..=100_000_000) else {
        return;
    };
    let Some(mode) = Wait::parse(a.raw("wait")) else {
        return error(cmd, format_args!("bad value for wait (irq|poll)"));
    };
    let Some((n, d)) = pick(cmd, a) else { return };
    let mut d = d.lock();
    let total = total.unwrap_or(1000);
    let k = k.min(d.q.size as u64 / 3) as usize;
    match run_batch(&mut d, n, false, true, 4096, total, k, mode) {
        Ok((us, errors)) => println!(
            "blk: inflight done={} us={} iops={} errors={}",
            total,
            us,
            total * 1_000_000 / us,
            errors
        ),
        Err(e) => println!("blk: inflight status={}", e),
    }
}

fn cmd_bench(cmd: &str, a: &Args) {
    let kind = a.raw("kind").unwrap_or("");
    let (write, random) = match kind {
        "randread" => (false, true),
        "randwrite" => (true, true),
        "seqread" => (false, false),
        "seqwrite" => (true, false),
        _ => {
            return error(
                cmd,
                format_args!("kind=randread|randwrite|seqread|seqwrite is required"),
            )
        }
    };
    let Ok(bs) = a.num("bs", 512..=mem::MIB) else {
        return;
    };
    let bs = bs.unwrap_or(4096);
    if !bs.is_multiple_of(SECTOR) {
        return error(cmd, format_args!("bs must be a multiple of 512"));
    }
    let Ok(total) = a.num("n", 1..=100_000_000) else {
        return;
    };
    let Ok(depth) = a.num("depth", 1..=64) else {
        return;
    };
    let Some(mode) = Wait::parse(a.raw("wait")) else {
        return error(cmd, format_args!("bad value for wait (irq|poll)"));
    };
    let Some((n, d)) = pick(cmd, a) else { return };
    let mut d = d.lock();
    if write && d.ro {
        return error(cmd, format_args!("disk {} is read-only", n));
    }
    let total = total.unwrap_or(1000);
    let depth = (depth.unwrap_or(1)).min(d.q.size as u64 / 3) as usize;
    match run_batch(&mut d, n, write, random, bs, total, depth, mode) {
        Ok((us, errors)) => println!(
            "blk-bench: kind={} bs={} n={} depth={} iops={} mbps={} us={} errors={}",
            kind,
            bs,
            total,
            depth,
            total * 1_000_000 / us,
            total * bs / us,
            us,
            errors
        ),
        Err(e) => println!("blk-bench: kind={} status={}", kind, e),
    }
}

/// Deliberately malformed requests: the device must answer each one.
fn cmd_hostile(cmd: &str, a: &Args) {
    const KINDS: &str =
        "loop|oob|short|short-hdr|huge-sector|past-end|no-status|wrong-dir|bad-type|zero-len";
    let kind = a.raw("kind").unwrap_or("");
    if !KINDS.split('|').any(|k| k == kind) {
        return error(cmd, format_args!("kind={} is required", KINDS));
    }
    let Some((n, d)) = pick(cmd, a) else { return };
    let Some(buf) = buffer(&CHUNK_BUF, CHUNK) else {
        return error(cmd, format_args!("out of DMA memory"));
    };
    let mut d = d.lock();
    let Some(head) = d.q.peek_head() else {
        return println!("blk-hostile kind={} status=noroom", kind);
    };
    if d.q.num_free < 4 {
        return println!("blk-hostile kind={} status=noroom", kind);
    }
    let s = d.slot(head);
    let (typ, sector) = match kind {
        "huge-sector" => (T_IN, 0xffff_ffff_ffff_fff0),
        "past-end" => (T_IN, d.capacity),
        "bad-type" => (0x7ead_0000, 0),
        _ => (T_IN, 0),
    };
    wr32(s, typ);
    wr32(s + 4, 0);
    wr64(s + 8, sector);
    wr8(s + SLOT_STATUS, STATUS_UNSET);
    let hdr = Seg::r(s, 16);
    let status = Seg::w(s + SLOT_STATUS, 1);
    let data = Seg::w(buf, 512);
    let mut segs = [hdr; 3];
    let chain: &[Seg] = match kind {
        "loop" => {
            segs[1] = status;
            &segs[..2]
        }
        "oob" => {
            segs[1] = Seg::w(1 << 40, 512);
            segs[2] = status;
            &segs[..3]
        }
        "short" => {
            segs[1] = Seg::w(buf, 100);
            segs[2] = status;
            &segs[..3]
        }
        "short-hdr" => {
            segs[0] = Seg::r(s, 8);
            segs[1] = data;
            segs[2] = status;
            &segs[..3]
        }
        "no-status" => &segs[..1],
        "wrong-dir" => {
            segs[1] = Seg::r(buf, 512);
            segs[2] = status;
            &segs[..3]
        }
        "bad-type" => {
            segs[1] = status;
            &segs[..2]
        }
        "zero-len" => {
            segs[1] = Seg::w(buf, 0);
            segs[2] = status;
            &segs[..3]
        }
        _ => {
            segs[1] = data;
            segs[2] = status;
            &segs[..3]
        }
    };
    let mut ids = [0u16; 3];
    let Some(h) = d.q.add_chain(chain, &mut ids) else {
        return println!("blk-hostile kind={} status=noroom", kind);
    };
    if kind == "loop" {
        // The status descriptor links back to the header: an endless chain.
        d.q.poke_next(ids[1], 2 | 1, ids[0]);
    }
    d.q.publish(h);
    d.q.kick();
    match d.finish(n, h, HOSTILE_TIMEOUT_MS, Wait::Irq) {
        Outcome::Done { status, len } => println!(
            "blk-hostile kind={} status={} used_len={}",
            kind,
            StatusName(status),
            len
        ),
        _ => println!("blk-hostile kind={} status=timeout", kind),
    }
}

// ---------------------------------------------------------- blk-reader ----

/// The background reader (README: `blk-reader`). Round k reads range
/// `(k / 2) % 2` (A = sectors S..S+C, B = S+C..S+2C) into buffer `k % 2`,
/// so that each buffer alternates between A and B every other use. When
/// round k completes, its buffer is checked and so is the other buffer,
/// which still holds round k-1's data: the last read the device completed
/// before a migration switch-over is re-checked after it.
struct Reader {
    /// Started and not stopped.
    running: bool,
    /// Was ever started (blk-check needs one).
    started: bool,
    cpu: usize,
    disk: usize,
    sector: u64,
    count: u64,
    /// Two buffers of `count` sectors, at `buf` and `buf + count * 512`.
    buf: u64,
    pattern: Option<u64>,
    /// (head, round, disk epoch) of the request in flight.
    inflight: Option<(u16, u64, u32)>,
    /// Next round to issue.
    next: u64,
    /// Range each buffer holds (None: never read, or the read failed).
    valid: [Option<u8>; 2],
    /// Rounds completed OK.
    rounds: u64,
    errors: u64,
    /// First check that failed: (round, buffer, offset, expected, found).
    bad: Option<(u64, usize, u64, u64, u64)>,
    bad_rounds: u64,
}

static READER: SpinLock<Reader> = SpinLock::new(Reader {
    running: false,
    started: false,
    cpu: 0,
    disk: 0,
    sector: 0,
    count: 0,
    buf: 0,
    pattern: None,
    inflight: None,
    next: 0,
    valid: [None; 2],
    rounds: 0,
    errors: 0,
    bad: None,
    bad_rounds: 0,
});
static READER_ROUNDS: AtomicU64 = AtomicU64::new(0);
static READER_BAD: AtomicU64 = AtomicU64::new(0);
static REPORTED: AtomicU64 = AtomicU64::new(0);
static NEXT_REPORT: AtomicU64 = AtomicU64::new(0);

impl Reader {
    fn buffer(&self, b: usize) -> u64 {
        self.buf + b as u64 * self.count * SECTOR
    }

    fn range_start(&self, range: u8) -> u64 {
        self.sector + range as u64 * self.count
    }

    /// Check buffer `b` (holding `range`) against pattern `p`.
    fn check(&self, b: usize, range: u8, p: u64) -> Option<(u64, u64, u64)> {
        check_pattern(self.buffer(b), self.range_start(range), self.count, p)
    }

    /// After round `k` completed OK: check both buffers.
    fn verify_round(&mut self, k: u64) {
        let Some(p) = self.pattern else { return };
        for b in [(k % 2) as usize, ((k + 1) % 2) as usize] {
            let Some(range) = self.valid[b] else { continue };
            if let Some((off, e, f)) = self.check(b, range, p) {
                self.bad_rounds += 1;
                READER_BAD.store(self.bad_rounds, Ordering::Relaxed);
                if self.bad.is_none() {
                    self.bad = Some((k, b, off, e, f));
                }
                return;
            }
        }
    }
}

/// One non-blocking step: collect the read in flight, start the next one.
/// `issue`: start a new read (false while draining).
fn reader_step_inner(issue: bool) {
    let mut r = READER.lock();
    if r.buf == 0 {
        return;
    }
    let Some(dl) = disk(r.disk) else { return };
    let mut d = dl.lock();
    if let Some((head, k, epoch)) = r.inflight {
        let b = (k % 2) as usize;
        if d.epoch != epoch {
            // The device was reset under us: the read is lost.
            r.inflight = None;
            r.errors += 1;
            r.valid[b] = None;
        } else {
            d.q.poll();
            if d.q.is_done(head) {
                let status = d.status_of(head);
                d.q.take(head);
                r.inflight = None;
                if status == 0 {
                    r.rounds += 1;
                    r.valid[b] = Some(((k / 2) % 2) as u8);
                    r.verify_round(k);
                    READER_ROUNDS.store(r.rounds, Ordering::Relaxed);
                } else {
                    r.errors += 1;
                    r.valid[b] = None;
                }
            }
        }
    }
    if issue && r.running && r.inflight.is_none() {
        let k = r.next;
        let b = (k % 2) as usize;
        let sector = r.range_start(((k / 2) % 2) as u8);
        let len = (r.count * SECTOR) as u32;
        let buf = r.buffer(b);
        // The buffer is being overwritten.
        r.valid[b] = None;
        if let Some(head) = d.submit(T_IN, sector, &[Seg::w(buf, len)]) {
            d.q.kick();
            r.inflight = Some((head, k, d.epoch));
            r.next += 1;
        }
    }
}

/// BSP slice of the reader (when it runs on CPU 0).
pub fn reader_step() {
    reader_step_inner(true);
}

/// The reader on an AP: until its job changes, then drain.
pub fn reader_ap(me: &PerCpu) {
    while me.job.load(Ordering::Acquire) == workload::JOB_BLK_READER {
        reader_step_inner(true);
        for _ in 0..64 {
            core::hint::spin_loop();
        }
    }
    drain();
}

/// Stop issuing and wait (up to 1.5 s) for the read in flight.
fn drain() {
    {
        let mut r = READER.lock();
        if !r.running && r.inflight.is_none() {
            return;
        }
        r.running = false;
    }
    let deadline = time::deadline_after_ms(1500);
    loop {
        reader_step_inner(false);
        if READER.lock().inflight.is_none() || time::passed(deadline) {
            break;
        }
        core::hint::spin_loop();
    }
    let r = READER.lock();
    if let Some(d) = disk(r.disk) {
        d.lock().set_quiet(false);
    }
}

/// Stop a reader running on the BSP (APs drain themselves when their job
/// changes). Called by `stop`.
pub fn reader_drain() {
    drain();
}

fn cmd_reader(cmd: &str, a: &Args) {
    let Some((sector, count)) = range_args(cmd, a, READER_MAX_SECTORS) else {
        return;
    };
    let Ok(pattern) = hex_arg(cmd, a, "pattern") else {
        return;
    };
    let Ok(cpu) = a.num("cpu", 0..=MAX_CPUS as u64 - 1) else {
        return;
    };
    let Some((n, d)) = pick(cmd, a) else { return };
    let cpu = cpu.map_or(workload::cpu_slots().saturating_sub(1), |c| c as usize);
    if !CPUS[cpu].is_alive() {
        return error(cmd, format_args!("cpu {} is not online", cpu));
    }
    let Some(buf) = buffer(&READER_BUF, 2 * READER_MAX_SECTORS * SECTOR) else {
        return error(cmd, format_args!("out of DMA memory"));
    };
    // One reader at a time; the chosen CPU leaves whatever it ran.
    let old = READER.lock().cpu;
    if workload::job_of(old) == workload::JOB_BLK_READER && !workload::stop_cpu(old) {
        return error(cmd, format_args!("cpu {} did not stop", old));
    }
    drain();
    if workload::job_of(cpu) == workload::JOB_PAGES {
        return error(
            cmd,
            format_args!("cpu {} runs the pages workload (stop it first)", cpu),
        );
    }
    if !workload::stop_cpu(cpu) {
        return error(cmd, format_args!("cpu {} did not stop", cpu));
    }
    if let Some(p) = pattern {
        let Some(chunk) = buffer(&CHUNK_BUF, CHUNK) else {
            return error(cmd, format_args!("out of DMA memory"));
        };
        let mut dl = d.lock();
        if let Err(f) = write_pattern(&mut dl, n, chunk, sector, 2 * count, p) {
            return println!("blk: write status={} sector={}", f, f.1);
        }
    }
    d.lock().set_quiet(true);
    {
        let mut r = READER.lock();
        *r = Reader {
            running: true,
            started: true,
            cpu,
            disk: n,
            sector,
            count,
            buf,
            pattern,
            inflight: None,
            next: 0,
            valid: [None; 2],
            rounds: 0,
            errors: 0,
            bad: None,
            bad_rounds: 0,
        };
    }
    READER_ROUNDS.store(0, Ordering::Relaxed);
    READER_BAD.store(0, Ordering::Relaxed);
    REPORTED.store(0, Ordering::Relaxed);
    println!(
        "blk-reader: start base={:#x} sector={} count={} cpu={} disk={}",
        buf, sector, count, cpu, n
    );
    workload::assign(cpu, workload::JOB_BLK_READER);
}

fn cmd_check(cmd: &str, a: &Args) {
    let Ok(pattern) = hex_arg(cmd, a, "pattern") else {
        return;
    };
    let Some(p) = pattern else {
        return error(cmd, format_args!("pattern=P is required"));
    };
    let (started, cpu) = {
        let r = READER.lock();
        (r.started, r.cpu)
    };
    if !started {
        return error(cmd, format_args!("no blk-reader was started"));
    }
    if workload::job_of(cpu) == workload::JOB_BLK_READER && !workload::stop_cpu(cpu) {
        return error(cmd, format_args!("cpu {} did not stop", cpu));
    }
    drain();
    let r = READER.lock();
    if r.inflight.is_some() {
        return println!(
            "blk-check-bad reason=inflight rounds={} errors={}",
            r.rounds, r.errors
        );
    }
    if r.rounds == 0 {
        return println!("blk-check-bad reason=noround rounds=0 errors={}", r.errors);
    }
    for b in 0..2 {
        let Some(range) = r.valid[b] else { continue };
        if let Some((off, e, f)) = r.check(b, range, p) {
            return println!(
                "blk-check-bad reason=final buffer={} offset={:#x} expected={:#x} found={:#x} rounds={}",
                b, off, e, f, r.rounds
            );
        }
    }
    if let Some((round, b, off, e, f)) = r.bad {
        return println!(
            "blk-check-bad reason=round round={} buffer={} offset={:#x} expected={:#x} found={:#x} rounds={} bad_rounds={}",
            round, b, off, e, f, r.rounds, r.bad_rounds
        );
    }
    if r.errors > 0 {
        return println!(
            "blk-check-bad reason=ioerr rounds={} errors={}",
            r.rounds, r.errors
        );
    }
    println!("blk-check-ok rounds={}", r.rounds);
}

/// BSP main loop: reader progress, disk configuration changes.
pub fn poll_background() {
    let rounds = READER_ROUNDS.load(Ordering::Relaxed);
    let reported = REPORTED.load(Ordering::Relaxed);
    if rounds >= reported + 100 && time::passed(NEXT_REPORT.load(Ordering::Relaxed)) {
        REPORTED.store(rounds, Ordering::Relaxed);
        NEXT_REPORT.store(time::deadline_after_ms(500), Ordering::Relaxed);
        let bad = READER_BAD.load(Ordering::Relaxed);
        if bad > 0 {
            println!("blk-reader: rounds={} bad_rounds={}", rounds, bad);
        } else {
            println!("blk-reader: rounds={}", rounds);
        }
    }
    for n in 0..count() {
        let Some(d) = disk(n) else { continue };
        let c = {
            let d = d.lock();
            irq::count(d.dev.config_vector) != d.config_seen
        };
        if c {
            let mut d = d.lock();
            d.config_seen = irq::count(d.dev.config_vector);
            if d.dev.needs_reset() {
                println!(
                    "testguest: warning: blk{}: device needs reset (status={:#x})",
                    n,
                    d.dev.status()
                );
                continue;
            }
            let old = d.capacity;
            d.read_config();
            if d.capacity != old {
                println!("blk{}: config capacity={} old={}", n, d.capacity, old);
            }
        }
    }
}
