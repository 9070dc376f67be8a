//! What the fuzz targets share: a reader of structured input, guest memory
//! with a hole, split virtqueues laid out from the input, and a byte stream
//! standing in for a migration peer. Every decoder here has its encoder
//! beside it, which the seed generator (`src/bin/seeds.rs`) uses, so seeds
//! and targets cannot drift apart.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::virtio::{ActivateContext, VirtioInterrupt};
use devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Reads numbers and byte strings off the fuzz input; past its end every
/// read gives zeros (or an empty slice), so any input decodes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A byte string of at most `max` bytes, prefixed by its u16 length.
    pub fn chunk(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max);
        self.bytes(n)
    }
}

/// Writes what [`Input`] reads (for the seeds).
#[derive(Default)]
pub struct Output(pub Vec<u8>);

impl Output {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn chunk(&mut self, b: &[u8]) -> &mut Self {
        self.u16(b.len() as u16).bytes(b)
    }
}

/// Guest RAM of the device targets: 1 MiB at 0 and 64 KiB at 2 MiB, so
/// buffers can straddle the end of RAM or fall in the hole.
pub const RAM: [(u64, u64); 2] = [(0, 1 << 20), (2 << 20, 64 << 10)];
/// The rings of queue `i` lie at `i * QUEUE_STRIDE`: descriptor table,
/// then the avail ring 4 KiB later, the used ring 8 KiB later.
pub const QUEUE_STRIDE: u64 = 0x4000;
/// Where the rest of the input (the driver's buffers) is copied.
pub const DATA: u64 = 0x2_0000;
/// Longest data blob copied to [`DATA`] (up to the end of low RAM).
const DATA_MAX: usize = (1 << 20) - DATA as usize;

pub fn memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = RAM
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// A descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One split queue as the input gives it: log2 of its size, its
/// descriptors, the heads made available, and the avail ring's flags and
/// index (the index is the number of heads unless `bogus_idx`).
#[derive(Clone, Debug, Default)]
pub struct QueueSpec {
    pub size_log2: u8,
    pub descs: Vec<Desc>,
    pub heads: Vec<u16>,
    pub avail_flags: u16,
    pub bogus_idx: Option<u16>,
}

impl QueueSpec {
    pub fn size(&self) -> u16 {
        1 << (self.size_log2 % 9)
    }

    pub fn decode(input: &mut Input) -> QueueSpec {
        let size_log2 = input.u8() % 9;
        let size = 1usize << size_log2;
        let n = usize::from(input.u8()).min(size);
        let descs = (0..n)
            .map(|_| Desc {
                addr: input.u64(),
                len: input.u32(),
                flags: input.u16(),
                next: input.u16(),
            })
            .collect();
        let m = usize::from(input.u8()).min(size);
        let heads = (0..m).map(|_| input.u16()).collect();
        let avail_flags = input.u16();
        let bogus_idx = (input.u8() & 1 != 0).then(|| input.u16());
        QueueSpec {
            size_log2,
            descs,
            heads,
            avail_flags,
            bogus_idx,
        }
    }

    pub fn encode(&self, out: &mut Output) {
        out.u8(self.size_log2).u8(self.descs.len() as u8);
        for d in &self.descs {
            out.u64(d.addr).u32(d.len).u16(d.flags).u16(d.next);
        }
        out.u8(self.heads.len() as u8);
        for &h in &self.heads {
            out.u16(h);
        }
        out.u16(self.avail_flags);
        match self.bogus_idx {
            Some(idx) => out.u8(1).u16(idx),
            None => out.u8(0),
        };
    }

    /// Writes the rings of queue `index` into `mem` and returns the
    /// device's view of the queue, ready.
    pub fn install(&self, mem: &GuestMemoryMmap, index: u64) -> Queue {
        let base = index * QUEUE_STRIDE;
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        for (i, d) in self.descs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(desc + 16 * i as u64))
                .expect("descriptor table in RAM");
        }
        let idx = self.bogus_idx.unwrap_or(self.heads.len() as u16);
        mem.write_obj(self.avail_flags, GuestAddress(avail))
            .expect("avail ring in RAM");
        mem.write_obj(idx, GuestAddress(avail + 2))
            .expect("avail ring in RAM");
        for (i, &h) in self.heads.iter().enumerate() {
            mem.write_obj(h, GuestAddress(avail + 4 + 2 * i as u64))
                .expect("avail ring in RAM");
        }
        let size = self.size();
        let mut queue = Queue::new(256).expect("queue");
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        queue
    }
}

/// Copies the driver's buffers to [`DATA`].
pub fn install_data(mem: &GuestMemoryMmap, data: &[u8]) {
    let data = &data[..data.len().min(DATA_MAX)];
    mem.write_slice(data, GuestAddress(DATA))
        .expect("data area in RAM");
}

/// The used ring index of queue `index`.
pub fn used_idx(mem: &GuestMemoryMmap, index: u64) -> u16 {
    mem.read_obj(GuestAddress(index * QUEUE_STRIDE + 0x2002))
        .expect("used ring in RAM")
}

/// An interrupt that only counts.
#[derive(Default)]
pub struct CountingInterrupt {
    pub queue: AtomicU64,
    pub config: AtomicU64,
}

impl VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, _index: u16) -> io::Result<()> {
        self.queue.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn notify_config(&self) -> io::Result<()> {
        self.config.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A peer that sends the fuzz input and swallows whatever it is sent.
pub struct FuzzStream<'a> {
    pub input: &'a [u8],
    pub sent: Vec<u8>,
}

impl<'a> FuzzStream<'a> {
    pub fn new(input: &'a [u8]) -> FuzzStream<'a> {
        FuzzStream {
            input,
            sent: Vec::new(),
        }
    }
}

impl Read for FuzzStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for FuzzStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A peer that reads nothing stalls the writer eventually; here it
        // just must not grow without bound.
        if self.sent.len() < 1 << 20 {
            self.sent.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl vmm::migrate::ReceiveStream for FuzzStream<'_> {
    unsafe fn read_exact_raw(&mut self, ptr: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller guarantees ptr..ptr+len is writable guest RAM
        // that nothing else accesses meanwhile.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        self.read_exact(buf)
    }
}

/// What activates a device in a target: `count` queues laid out from the
/// input (each with its notification eventfd), then the rest of the input
/// as data in guest memory, and an interrupt that counts.
pub fn activate_context(input: &mut Input, count: u64, acked_features: u64) -> ActivateContext {
    let memory = Arc::new(memory());
    let queues = (0..count)
        .map(|i| {
            let spec = QueueSpec::decode(input);
            (
                spec.install(&memory, i),
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )
        })
        .collect();
    install_data(&memory, input.rest());
    ActivateContext {
        memory,
        queues,
        interrupt: Arc::new(CountingInterrupt::default()),
        acked_features,
    }
}
