//! virtio-blk tests: a mock driver (virtio-queue's mock rings) on
//! real guest memory, a temp file (or a loop device) as the disk, and the
//! real worker thread. The tests of the request path run with each I/O
//! engine (`sync_engine::*` and `uring_engine::*`).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use config::{DiskConfig, RateLimitConfig};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::{
    ActivateContext, DeviceState, VirtioDevice, VirtioInterrupt, COMMON_FEATURES, F_VERSION_1,
};
use crate::GuestMemoryMmap;

const MEM_SIZE: usize = 64 << 20;
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;
const DISK_SIZE: u64 = 8 << 20;

const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;

// ---------------------------------------------------------------- helpers

/// A temp file removed on drop.
struct TempDisk {
    path: PathBuf,
}

impl TempDisk {
    fn new(size: u64) -> TempDisk {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // /var/tmp: a real file system (O_DIRECT, holes), not a tmpfs.
        let dir = if Path::new("/var/tmp").is_dir() {
            PathBuf::from("/var/tmp")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "vmm-blk-test-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        TempDisk { path }
    }

    fn config(&self) -> DiskConfig {
        DiskConfig {
            path: self.path.clone(),
            id: Some("disk0".to_string()),
            ..Default::default()
        }
    }

    fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    fn write_at(&self, offset: u64, data: &[u8]) {
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(data, offset).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Default)]
struct TestInterrupt {
    queue: AtomicU64,
}

impl VirtioInterrupt for TestInterrupt {
    fn notify_queue(&self, _index: u16) -> std::io::Result<()> {
        self.queue.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A split queue laid out in guest memory, driver side. This is
/// virtio-queue's `MockSplitQueue` with the ring layout fixed: in 0.18
/// `MockSplitQueue::create` places the used ring at avail + 4 + len bytes
/// (`SplitQueueRing::end` counts elements, not bytes), so with 256 entries
/// avail slots 128.. and the used ring overlap, and a test with more than
/// 128 requests on one queue reads garbage heads.
struct Rings<'a> {
    desc_table: DescriptorTable<'a, GuestMemoryMmap>,
    avail: AvailRing<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
}

const DESC_TABLE_ADDR: u64 = 0;
const AVAIL_ADDR: u64 = 0x1000;
const USED_ADDR: u64 = 0x2000;

impl<'a> Rings<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Rings<'a> {
        Rings {
            desc_table: DescriptorTable::new(mem, GuestAddress(DESC_TABLE_ADDR), QUEUE_SIZE),
            avail: AvailRing::new(mem, GuestAddress(AVAIL_ADDR), QUEUE_SIZE),
            used: UsedRing::new(mem, GuestAddress(USED_ADDR), QUEUE_SIZE),
        }
    }

    fn desc_table(&self) -> &DescriptorTable<'a, GuestMemoryMmap> {
        &self.desc_table
    }

    fn avail(&self) -> &AvailRing<'a, GuestMemoryMmap> {
        &self.avail
    }

    fn used(&self) -> &UsedRing<'a, GuestMemoryMmap> {
        &self.used
    }

    fn create_queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(DESC_TABLE_ADDR as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_ADDR as u32), Some(0));
        q.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
        q.set_ready(true);
        q
    }
}

/// The driver side: a split queue in guest memory and its notification.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: Rings<'a>,
    kick: EventFd,
    next_desc: u16,
    submitted: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Driver<'a> {
        Driver {
            mem,
            vq: Rings::new(mem),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            submitted: 0,
        }
    }

    /// Activates `block` on this queue with `acked` features.
    fn activate_with(
        &self,
        block: &mut Block,
        memory: &Arc<GuestMemoryMmap>,
        irq: Arc<TestInterrupt>,
        acked: u64,
    ) {
        let queue = self.vq.create_queue();
        block
            .activate(ActivateContext {
                memory: memory.clone(),
                queues: vec![(queue, self.kick.try_clone().unwrap())],
                interrupt: irq,
                acked_features: acked,
            })
            .unwrap();
    }

    fn activate(&self, block: &mut Block, memory: &Arc<GuestMemoryMmap>) -> Arc<TestInterrupt> {
        let irq = Arc::new(TestInterrupt::default());
        let acked = block.features();
        self.activate_with(block, memory, irq.clone(), acked);
        irq
    }

    /// Writes `raw` at the next free descriptor indices (the caller's
    /// `next` fields are relative to the first one) and makes the first
    /// one available.
    fn add_raw(&mut self, raw: &[(u64, u32, u16, u16)]) -> u16 {
        let n = raw.len() as u16;
        if self.next_desc + n > QUEUE_SIZE {
            self.next_desc = 0;
        }
        let base = self.next_desc;
        for (i, &(addr, len, flags, next)) in raw.iter().enumerate() {
            let desc = SplitDescriptor::new(addr, len, flags, base + next);
            self.vq
                .desc_table()
                .store(base + i as u16, RawDescriptor::from(desc))
                .unwrap();
        }
        self.next_desc += n;
        let avail_idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at((avail_idx % QUEUE_SIZE) as usize)
            .unwrap()
            .store(base);
        self.vq.avail().idx().store(avail_idx.wrapping_add(1));
        self.submitted = self.submitted.wrapping_add(1);
        base
    }

    /// Adds a chain of (addr, len, flags) buffers, linked in order.
    fn add(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let last = bufs.len() - 1;
        let raw: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                if i == last {
                    (addr, len, flags, 0)
                } else {
                    (addr, len, flags | VRING_DESC_F_NEXT as u16, i as u16 + 1)
                }
            })
            .collect();
        self.add_raw(&raw)
    }

    fn notify(&self) {
        self.kick.write(1).unwrap();
    }

    /// Waits until every submitted chain is used; returns the last used element.
    fn wait(&self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.vq.used().idx().load() != self.submitted {
            assert!(
                Instant::now() < deadline,
                "the device did not complete the request: used {} of {}",
                self.vq.used().idx().load(),
                self.submitted
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let i = self.submitted.wrapping_sub(1) % QUEUE_SIZE;
        let elem = self.vq.used().ring().ref_at(i as usize).unwrap().load();
        (elem.id(), elem.len())
    }

    fn header(&self, addr: u64, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Submits `bufs` (a header at HDR is written first), waits, and
    /// returns (status byte at STATUS, used length).
    fn request(&mut self, request_type: u32, sector: u64, bufs: &[(u64, u32, u16)]) -> (u8, u32) {
        self.header(HDR, request_type, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.add(bufs);
        self.notify();
        let (id, len) = self.wait();
        assert_eq!(id, u32::from(head));
        (self.status(), len)
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, u32) {
        self.request(
            VIRTIO_BLK_T_IN,
            sector,
            &[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)],
        )
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        self.request(
            VIRTIO_BLK_T_OUT,
            sector,
            &[(HDR, 16, R), (DATA, data.len() as u32, R), (STATUS, 1, W)],
        )
    }

    /// A discard / write-zeroes request with one segment.
    fn dwz(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) -> (u8, u32) {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        self.request(
            request_type,
            0,
            &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)],
        )
    }

    fn data(&self, len: usize) -> Vec<u8> {
        self.data_at(DATA, len)
    }

    fn data_at(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Adds (without kicking) a read of `len` bytes at `sector` into
    /// `addr`, with its header and status byte in slot `i`.
    fn add_read(&mut self, i: u64, sector: u64, addr: u64, len: u32) -> u16 {
        self.header(HDR + i * 16, VIRTIO_BLK_T_IN, sector);
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + i))
            .unwrap();
        self.add(&[(HDR + i * 16, 16, R), (addr, len, W), (STATUS + i, 1, W)])
    }

    /// The status byte of slot `i`.
    fn status_at(&self, i: u64) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + i)).unwrap()
    }

    /// The used ring's elements from position `from` to its index.
    fn used_since(&self, from: u16) -> Vec<(u32, u32)> {
        let to = self.vq.used().idx().load();
        (0..to.wrapping_sub(from))
            .map(|k| {
                let i = from.wrapping_add(k) % QUEUE_SIZE;
                let e = self.vq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// The avail_event the device last wrote (EVENT_IDX): the device has
    /// taken every request before it from the queue.
    fn avail_event(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED_ADDR + 4 + 8 * u64::from(QUEUE_SIZE)))
            .unwrap()
    }

    /// Waits until the device took every submitted request from the queue.
    fn wait_taken(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.avail_event() != self.submitted {
            assert!(Instant::now() < deadline, "the device took no request");
            std::thread::yield_now();
        }
    }
}

/// Writes the file's dirty pages back and drops its page cache, so reads
/// of it go to the disk (and take a while).
fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid fd; fadvise takes plain integers.
    let ret = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(ret, 0);
}

/// Pages of `path` in `[offset, offset + len)` in the page cache.
fn resident_pages(path: &Path, offset: u64, len: usize) -> usize {
    let f = File::open(path).unwrap();
    // SAFETY: a read-only shared mapping of a file we opened, unmapped
    // below; mincore only reads page table state into `vec`.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            offset as libc::off_t,
        );
        assert_ne!(ptr, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(4096)];
        let ret = libc::mincore(ptr, len, vec.as_mut_ptr());
        libc::munmap(ptr, len);
        assert_eq!(ret, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }
}

/// Compares byte buffers, reporting the first difference (not the buffers).
#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let zeros = got.iter().filter(|&&b| b == 0).count();
        panic!(
            "{what}: first difference at byte {i}: got {} want {} ({zeros} zero bytes in {})",
            got[i],
            want[i],
            got.len()
        );
    }
}

/// A device on `disk` opened with O_DIRECT, or None (saying `what` is
/// skipped) where the file system refuses O_DIRECT.
fn direct_block(disk: &TempDisk, what: &str) -> Option<Block> {
    let mut config = disk.config();
    config.direct = true;
    Block::new(&config)
        .map_err(|e| eprintln!("skipping {what}: {e}"))
        .ok()
}

fn counter(block: &Block, name: &str) -> u64 {
    block.counters()[name]
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

// ---------------------------------------------------------------- engines

/// Whether this kernel lets us set up an io_uring.
fn uring_available() -> bool {
    match ::io_uring::IoUring::new(4) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping an io_uring test: io_uring is not available: {e}");
            false
        }
    }
}

/// Runs `test` with devices created on this thread using `engine`.
fn with_engine(engine: IoEngine, test: fn()) {
    if engine == IoEngine::Uring && !uring_available() {
        return;
    }
    device::TEST_ENGINE.set(engine);
    test();
}

/// Each test of the request path, once per engine. The io_uring runs
/// force the engine on cached disks too, so every path of it is covered.
macro_rules! with_each_engine {
    ($($name:ident),* $(,)?) => {
        mod sync_engine {
            $(
                #[test]
                fn $name() {
                    super::with_engine(super::IoEngine::Sync, super::$name);
                }
            )*
        }
        mod uring_engine {
            $(
                #[test]
                fn $name() {
                    super::with_engine(super::IoEngine::Uring, super::$name);
                }
            )*
        }
    };
}

with_each_engine!(
    read_write_round_trip,
    reads_mark_guest_pages_dirty,
    direct_reads_mark_guest_pages_dirty,
    flush_and_get_id,
    discard_punches_a_hole,
    write_zeroes,
    read_only_rejects_writes,
    malformed_requests_get_an_error_and_the_device_keeps_working,
    chains_without_a_writable_status_are_returned_empty,
    looping_and_broken_chains_end_with_an_error,
    a_bogus_avail_index_does_not_hang_the_worker,
    direct_io_aligned_and_unaligned_buffers,
    rate_limiter_throttles,
    rate_limiter_bytes,
    pause_resume_snapshot_restore,
    pause_with_requests_in_flight,
    more_requests_than_the_ring_holds,
    flush_completes_after_earlier_writes,
    loop_device_backend,
);

// ---------------------------------------------------------------- tests

#[test]
fn features_and_config_space() {
    let disk = TempDisk::new(DISK_SIZE);
    let block = Block::new(&disk.config()).unwrap();
    let f = block.features();
    assert_eq!(f & COMMON_FEATURES, COMMON_FEATURES);
    assert_ne!(f & (1 << F_VERSION_1), 0);
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(block.device_type(), crate::virtio::TYPE_BLOCK);
    assert_eq!(block.queue_max_sizes(), vec![256]);

    let mut cfg = [0u8; CONFIG_SPACE_SIZE];
    block.read_config(0, &mut cfg);
    let le32 = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK_SIZE / 512
    );
    assert_eq!(le32(12), SEG_MAX);
    assert_eq!(le32(20), 512, "blk_size");
    assert_eq!(cfg[24], 3, "physical_block_exp: 4096 / 512");
    assert_eq!(le32(40), 1, "max_discard_seg");
    assert_eq!(le32(44), 8, "discard_sector_alignment");
    assert!(le32(36) > 0 && le32(48) > 0);
    assert_eq!(le32(52), 1, "max_write_zeroes_seg");
    assert_eq!(cfg[56], 1, "write_zeroes_may_unmap");

    // Any offset and length: partial fields, and zeros beyond the end.
    let mut two = [0xaau8; 2];
    block.read_config(20, &mut two);
    assert_eq!(two, [0x00, 0x02]);
    let mut tail = [0xaau8; 8];
    block.read_config(CONFIG_SPACE_SIZE as u64 - 4, &mut tail);
    assert_eq!(tail, [0; 8]);
    let mut beyond = [0xaau8; 4];
    block.read_config(4096, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    block.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn block_size_overrides() {
    let disk = TempDisk::new(DISK_SIZE);
    let mut config = disk.config();
    config.logical_block_size = Some(4096);
    config.physical_block_size = Some(4096);
    let block = Block::new(&config).unwrap();
    let mut cfg = [0u8; CONFIG_SPACE_SIZE];
    block.read_config(0, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);
    assert_eq!(cfg[24], 0);
}

fn read_write_round_trip() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    let irq = d.activate(&mut block, &mem);

    let data = pattern(8192, 7);
    // Data split over two descriptors.
    d.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (status, len) = d.request(
        VIRTIO_BLK_T_OUT,
        8,
        &[
            (HDR, 16, R),
            (DATA, 3072, R),
            (DATA + 3072, 5120, R),
            (STATUS, 1, W),
        ],
    );
    assert_eq!((status, len), (OK, 1));
    assert_bytes(&disk.read_at(4096, 8192), &data, "on disk");

    d.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
    let (status, len) = d.read(8, 8192);
    assert_eq!((status, len), (OK, 8193));
    assert_bytes(&d.data(8192), &data, "in guest memory");

    // Scattered read: two writable buffers.
    let (status, len) = d.request(
        VIRTIO_BLK_T_IN,
        8,
        &[
            (HDR, 16, R),
            (DATA + 0x10000, 512, W),
            (DATA + 0x20000, 7680, W),
            (STATUS, 1, W),
        ],
    );
    assert_eq!((status, len), (OK, 8193));
    let mut a = vec![0u8; 512];
    d.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert_eq!(a, data[..512]);

    // The header split over two descriptors (no framing assumption).
    d.header(HDR, VIRTIO_BLK_T_IN, 9);
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.add(&[
        (HDR, 5, R),
        (HDR + 5, 11, R),
        (DATA, 512, W),
        (STATUS, 1, W),
    ]);
    d.notify();
    assert_eq!(d.wait().1, 513);
    assert_eq!(d.status(), OK);
    assert_bytes(&d.data(512), &data[512..1024], "in guest memory");

    // The last sector of the disk.
    let last = DISK_SIZE / 512 - 1;
    assert_eq!(d.write(last, &data[..512]).0, OK);
    assert_eq!(d.read(last, 512), (OK, 513));

    let c = block.counters();
    assert_eq!(c["write_ops"], 2);
    assert_eq!(c["write_bytes"], 8192 + 512);
    assert_eq!(c["read_ops"], 4);
    assert_eq!(c["read_bytes"], 8192 * 2 + 512 + 512);
    assert_eq!(c["errors"], 0);
    assert!(irq.queue.load(Ordering::SeqCst) > 0);
    assert!(block.reset().is_some());
}

fn reads_mark_guest_pages_dirty() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let region = mem.find_region(GuestAddress(DATA)).unwrap();
    let page = (DATA + 0x40000) as usize;
    assert!(!region.bitmap().dirty_at(page));
    assert!(!region.bitmap().dirty_at(page + 4096));
    d.request(
        VIRTIO_BLK_T_IN,
        0,
        &[(HDR, 16, R), (DATA + 0x40000, 8192, W), (STATUS, 1, W)],
    );
    assert!(region.bitmap().dirty_at(page));
    assert!(region.bitmap().dirty_at(page + 4096));
    assert!(!region.bitmap().dirty_at(page + 8192));
}

fn flush_and_get_id() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut config = disk.config();
    config.serial = Some("serial-123".to_string());
    let mut block = Block::new(&config).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);

    assert_eq!(
        d.request(VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16, R), (STATUS, 1, W)]),
        (OK, 1)
    );
    assert_eq!(counter(&block, "flush_ops"), 1);

    d.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(
        d.request(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]
        ),
        (OK, 21)
    );
    let mut expected = [0u8; 20];
    expected[..10].copy_from_slice(b"serial-123");
    assert_eq!(d.data(20), expected);
    block.reset();

    // Without a serial: the disk id.
    let block2_disk = TempDisk::new(DISK_SIZE);
    let mut block = Block::new(&block2_disk.config()).unwrap();
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    assert_eq!(
        d.request(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]
        ),
        (OK, 21)
    );
    let mut expected = [0u8; 20];
    expected[..5].copy_from_slice(b"disk0");
    assert_eq!(d.data(20), expected);
    assert!(block.flush().is_ok());
}

fn discard_punches_a_hole() {
    let disk = TempDisk::new(DISK_SIZE);
    disk.write_at(0, &pattern(2 << 20, 3));
    let blocks_before = std::fs::metadata(&disk.path).unwrap().blocks();
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);

    // Discard 1 MiB at 512 KiB.
    assert_eq!(d.dwz(VIRTIO_BLK_T_DISCARD, 1024, 2048, 0), (OK, 1));
    let blocks_after = std::fs::metadata(&disk.path).unwrap().blocks();
    assert!(
        blocks_after + 2048 <= blocks_before,
        "st_blocks {blocks_before} -> {blocks_after}"
    );
    assert_eq!(std::fs::metadata(&disk.path).unwrap().len(), DISK_SIZE);
    assert_bytes(
        &disk.read_at(512 << 10, 1 << 20),
        &vec![0u8; 1 << 20],
        "on disk",
    );
    assert_bytes(
        &disk.read_at(0, 512 << 10),
        &pattern(2 << 20, 3)[..512 << 10],
        "on disk",
    );
    assert_eq!(counter(&block, "discard_ops"), 1);

    // Bad discards.
    assert_eq!(
        d.dwz(
            VIRTIO_BLK_T_DISCARD,
            0,
            8,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        )
        .0,
        UNSUPP
    );
    assert_eq!(d.dwz(VIRTIO_BLK_T_DISCARD, 0, 8, 0x80).0, UNSUPP);
    assert_eq!(
        d.dwz(VIRTIO_BLK_T_DISCARD, DISK_SIZE / 512 - 4, 8, 0).0,
        IOERR
    );
    assert_eq!(d.dwz(VIRTIO_BLK_T_DISCARD, u64::MAX / 256, 8, 0).0, IOERR);
    assert_eq!(d.dwz(VIRTIO_BLK_T_DISCARD, 0, u32::MAX, 0).0, IOERR);
    // Two segments (max_discard_seg is 1).
    d.mem.write_slice(&[0u8; 32], GuestAddress(DATA)).unwrap();
    let (status, _) = d.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)],
    );
    assert_eq!(status, UNSUPP);
    // A segment that is not 16 bytes.
    let (status, _) = d.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, R), (DATA, 12, R), (STATUS, 1, W)],
    );
    assert_eq!(status, IOERR);
    assert_eq!(counter(&block, "errors"), 7);
}

fn write_zeroes() {
    let disk = TempDisk::new(DISK_SIZE);
    disk.write_at(0, &pattern(1 << 20, 9));
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);

    assert_eq!(d.dwz(VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, 0), (OK, 1));
    assert_bytes(&disk.read_at(4096, 4096), &vec![0u8; 4096], "on disk");
    assert_bytes(
        &disk.read_at(0, 4096),
        &pattern(1 << 20, 9)[..4096],
        "on disk",
    );
    assert_bytes(
        &disk.read_at(8192, 512),
        &pattern(1 << 20, 9)[8192..8704],
        "on disk",
    );
    // With UNMAP: a hole is fine.
    assert_eq!(
        d.dwz(
            VIRTIO_BLK_T_WRITE_ZEROES,
            64,
            1000,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        ),
        (OK, 1)
    );
    assert_bytes(
        &disk.read_at(64 * 512, 1000 * 512),
        &vec![0u8; 1000 * 512],
        "on disk",
    );
    assert_eq!(
        disk.read_at(1064 * 512, 512),
        pattern(1 << 20, 9)[1064 * 512..1065 * 512]
    );
    // The guest sees zeros too.
    assert_eq!(d.read(64, 4096).0, OK);
    assert_bytes(&d.data(4096), &vec![0u8; 4096], "in guest memory");
    assert_eq!(counter(&block, "write_zeroes_ops"), 2);
    // Unknown flag.
    assert_eq!(d.dwz(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 2).0, UNSUPP);
}

#[test]
fn zeros_are_written_when_the_backend_cannot_zero_in_place() {
    // The fallback path of write-zeroes: through the bounce buffer.
    let disk = TempDisk::new(DISK_SIZE);
    disk.write_at(0, &pattern(1 << 20, 1));
    let d = disk::DiskFile::open(&disk.config(), false).unwrap();
    let mut exec = request::Executor::new();
    // Bigger than the bounce buffer, unaligned to it.
    let len = request::BOUNCE_SIZE as u64 + 3 * 512;
    exec.write_zeroes(&d, 512, len, false).unwrap();
    assert_bytes(
        &disk.read_at(512, len as usize),
        &vec![0u8; len as usize],
        "on disk",
    );
    assert_bytes(
        &disk.read_at(0, 512),
        &pattern(1 << 20, 1)[..512],
        "on disk",
    );
}

fn read_only_rejects_writes() {
    let disk = TempDisk::new(DISK_SIZE);
    disk.write_at(0, &pattern(65536, 5));
    let mem = memory();
    let mut config = disk.config();
    config.readonly = true;
    let mut block = Block::new(&config).unwrap();
    let f = block.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);

    assert_eq!(d.write(0, &[0u8; 4096]), (IOERR, 1));
    assert_eq!(d.dwz(VIRTIO_BLK_T_DISCARD, 0, 8, 0).0, IOERR);
    assert_eq!(d.dwz(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0).0, IOERR);
    assert_bytes(&disk.read_at(0, 65536), &pattern(65536, 5), "on disk");
    // Reads still work.
    assert_eq!(d.read(0, 4096), (OK, 4097));
    assert_bytes(&d.data(4096), &pattern(65536, 5)[..4096], "in guest memory");
    assert_eq!(counter(&block, "errors"), 3);
    assert_eq!(counter(&block, "write_ops"), 0);
}

fn malformed_requests_get_an_error_and_the_device_keeps_working() {
    let disk = TempDisk::new(DISK_SIZE);
    disk.write_at(0, &pattern(4096, 11));
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let capacity = DISK_SIZE / 512;
    let mut errors = 0;
    let mut check = |d: &mut Driver, got: (u8, u32), want: u8, what: &str| {
        assert_eq!(got, (want, 1), "{what}");
        errors += 1;
        // The next good request works.
        assert_eq!(d.read(0, 512), (OK, 513), "after {what}");
        assert_bytes(&d.data(512), &pattern(4096, 11)[..512], "in guest memory");
    };

    let r = d.read(capacity, 512);
    check(&mut d, r, IOERR, "read at the capacity");
    let r = d.read(capacity - 1, 1024);
    check(&mut d, r, IOERR, "read across the end");
    let r = d.write(capacity - 1, &[0u8; 1024]);
    check(&mut d, r, IOERR, "write across the end");
    let r = d.read(u64::MAX / 512 + 1, 512);
    check(&mut d, r, IOERR, "sector * 512 overflows");
    let r = d.read(u64::MAX / 512, 512);
    check(&mut d, r, IOERR, "sector * 512 + len overflows");
    let r = d.read(0, 100);
    check(&mut d, r, IOERR, "length not a multiple of 512");
    let r = d.write(0, &[0u8; 700]);
    check(&mut d, r, IOERR, "write length not a multiple of 512");
    let r = d.request(
        VIRTIO_BLK_T_IN,
        0,
        &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)],
    );
    check(&mut d, r, IOERR, "header too short");
    let r = d.request(VIRTIO_BLK_T_IN, 0, &[(STATUS, 1, W)]);
    check(&mut d, r, IOERR, "no header at all");
    let r = d.request(
        VIRTIO_BLK_T_IN,
        0,
        &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
    );
    check(&mut d, r, IOERR, "IN with a device-readable data buffer");
    let r = d.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
    );
    check(&mut d, r, IOERR, "OUT with a device-writable data buffer");
    let r = d.request(
        VIRTIO_BLK_T_IN,
        0,
        &[
            (HDR, 16, R),
            (DATA, 512, W),
            (DATA + 512, 512, R),
            (STATUS, 1, W),
        ],
    );
    check(&mut d, r, IOERR, "readable buffer after a writable one");
    let r = d.request(
        VIRTIO_BLK_T_IN,
        0,
        &[
            (HDR, 16, R),
            (MEM_SIZE as u64 - 256, 512, W),
            (STATUS, 1, W),
        ],
    );
    check(&mut d, r, IOERR, "data buffer past the end of guest memory");
    let r = d.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[(HDR, 16, R), (1 << 40, 512, R), (STATUS, 1, W)],
    );
    check(&mut d, r, IOERR, "data buffer far outside guest memory");
    let r = d.request(77, 0, &[(HDR, 16, R), (STATUS, 1, W)]);
    check(&mut d, r, UNSUPP, "unknown request type");
    let r = d.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)],
    );
    check(&mut d, r, IOERR, "GET_ID into a readable buffer");
    assert_eq!(counter(&block, "errors"), errors);
    // Nothing was written by the bad writes.
    assert_bytes(&disk.read_at(0, 4096), &pattern(4096, 11), "on disk");
    assert_bytes(
        &disk.read_at(DISK_SIZE - 512, 512),
        &vec![0u8; 512],
        "on disk",
    );
}

fn chains_without_a_writable_status_are_returned_empty() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);

    // Status descriptor not writable: nowhere to put a status (the device
    // must not write device-readable buffers); the chain comes back with
    // used length 0 and the byte untouched.
    let (status, len) = d.request(
        VIRTIO_BLK_T_IN,
        0,
        &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)],
    );
    assert_eq!((status, len), (0xff, 0));
    // Status past the end of guest memory.
    d.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[(HDR, 16, R), (MEM_SIZE as u64, 1, W)]);
    d.notify();
    assert_eq!(d.wait().1, 0);
    // A zero-length status descriptor.
    let (status, len) = d.request(VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16, R), (STATUS, 0, W)]);
    assert_eq!((status, len), (0xff, 0));
    assert_eq!(counter(&block, "errors"), 3);
    assert_eq!(d.read(0, 512), (OK, 513));
}

fn looping_and_broken_chains_end_with_an_error() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let next = VRING_DESC_F_NEXT as u16;

    // header -> data -> status -> data -> status ... (1 <-> 2 forever).
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(DATA + 511)).unwrap();
    let start = Instant::now();
    d.add_raw(&[
        (HDR, 16, R | next, 1),
        (DATA, 512, W | next, 2),
        (STATUS, 1, W | next, 1),
    ]);
    d.notify();
    let (_, len) = d.wait();
    assert_eq!(len, 1);
    let s1: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    let s2: u8 = mem.read_obj(GuestAddress(DATA + 511)).unwrap();
    assert!(s1 == IOERR || s2 == IOERR, "status {s1} / {s2}");
    assert!(start.elapsed() < Duration::from_secs(2));

    // A chain whose `next` points outside the descriptor table.
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.add_raw(&[(HDR, 16, R | next, 1), (STATUS, 1, W | next, 1000)]);
    d.notify();
    assert_eq!(d.wait().1, 1);
    assert_eq!(d.status(), IOERR);

    // A header that loops on itself: nothing writable, used length 0.
    d.add_raw(&[(HDR, 16, R | next, 0)]);
    d.notify();
    assert_eq!(d.wait().1, 0);

    // An over-long chain through an indirect table (300 descriptors).
    let table = 0x80_0000u64;
    let n = 300u16;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, next),
            _ if i == n - 1 => (STATUS, 1, W),
            _ => (DATA + u64::from(i) * 512, 512, W | next),
        };
        let desc = SplitDescriptor::new(addr, len, flags, i + 1);
        mem.write_obj(
            RawDescriptor::from(desc),
            GuestAddress(table + u64::from(i) * 16),
        )
        .unwrap();
    }
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.add(&[(table, u32::from(n) * 16, VRING_DESC_F_INDIRECT as u16)]);
    d.notify();
    assert_eq!(d.wait().1, 1);
    assert_eq!(d.status(), IOERR);

    // A normal request through an indirect table works.
    let descs = [
        (HDR, 16, next, 1u16),
        (DATA, 4096, W | next, 2),
        (STATUS, 1, W, 0),
    ];
    for (i, &(addr, len, flags, nx)) in descs.iter().enumerate() {
        let desc = SplitDescriptor::new(addr, len, flags, nx);
        mem.write_obj(
            RawDescriptor::from(desc),
            GuestAddress(table + i as u64 * 16),
        )
        .unwrap();
    }
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    d.add(&[(table, 48, VRING_DESC_F_INDIRECT as u16)]);
    d.notify();
    assert_eq!(d.wait().1, 4097);
    assert_eq!(d.status(), OK);
    assert_eq!(d.read(0, 512), (OK, 513));
}

fn a_bogus_avail_index_does_not_hang_the_worker() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    // avail.idx claims 1000 new entries in a 256-entry queue.
    d.vq.avail().idx().store(1000);
    d.notify();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.vq.used().idx().load(), 0);
    // The worker is still alive and stops cleanly.
    assert!(block.reset().is_some());
}

#[test]
fn disk_lock() {
    let disk = TempDisk::new(DISK_SIZE);
    let mut first = Block::new(&disk.config()).unwrap();
    assert!(first.is_locked());

    let err = Block::new(&disk.config())
        .err()
        .expect("second read-write open must fail");
    let message = err.to_string();
    assert!(
        message.contains(&disk.path.display().to_string()),
        "{message}"
    );
    // Both opens are in this process: it says so rather than "another VM".
    assert!(message.contains("already open"), "{message}");
    assert!(message.contains("in this VMM"), "{message}");
    assert!(message.contains("read-write"), "{message}");
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert!(matches!(err, BlockError::Locked { .. }));

    // A read-only opener conflicts with the writer too.
    let mut ro = disk.config();
    ro.readonly = true;
    assert!(Block::new(&ro).is_err());

    // Released: another opener may take it; the first cannot take it back.
    first.release_lock().unwrap();
    assert!(!first.is_locked());
    let mut second = Block::new(&disk.config()).unwrap();
    assert!(first.acquire_lock().is_err());
    second.release_lock().unwrap();
    first.acquire_lock().unwrap();
    drop(second);
    drop(first);

    // Shared locks: several read-only openers, but no writer.
    let r1 = Block::new(&ro).unwrap();
    let r2 = Block::new(&ro).unwrap();
    let err = Block::new(&disk.config()).err().unwrap().to_string();
    assert!(err.contains("read-only"), "{err}");
    drop((r1, r2));
    // Closing releases the lock.
    Block::new(&disk.config()).unwrap();

    // Opening without the lock (migration target), then taking it.
    let holder = Block::new(&disk.config()).unwrap();
    let mut target = Block::new_unlocked(&disk.config()).unwrap();
    assert!(!target.is_locked());
    assert!(target.acquire_lock().is_err());
    drop(holder);
    target.acquire_lock().unwrap();
}

#[test]
fn open_errors_name_the_path_and_cause() {
    let config = DiskConfig {
        path: PathBuf::from("/nonexistent/disk.img"),
        ..Default::default()
    };
    let err = Block::new(&config).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
    assert!(err.contains("No such file"), "{err}");
    let config = DiskConfig {
        path: PathBuf::from("/dev/null"),
        readonly: true,
        ..Default::default()
    };
    let err = Block::new(&config).err().unwrap().to_string();
    assert!(
        err.contains("neither a regular file nor a block device"),
        "{err}"
    );
}

fn direct_io_aligned_and_unaligned_buffers() {
    let disk = TempDisk::new(DISK_SIZE);
    let Some(mut block) = direct_block(&disk, "the O_DIRECT test") else {
        return;
    };
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let data = pattern(16384, 21);

    // Aligned: straight to guest memory.
    assert_eq!(d.write(16, &data), (OK, 1));
    assert_bytes(&disk.read_at(16 * 512, 16384), &data, "on disk");
    assert_eq!(d.read(16, 16384), (OK, 16385));
    assert_bytes(&d.data(16384), &data, "in guest memory");

    // Unaligned guest buffers (odd addresses, odd lengths per segment).
    let odd = DATA + 0x100001;
    mem.write_slice(&data[..4096], GuestAddress(odd)).unwrap();
    let (status, _) = d.request(
        VIRTIO_BLK_T_OUT,
        1,
        &[
            (HDR, 16, R),
            (odd, 1000, R),
            (odd + 1000, 3096, R),
            (STATUS, 1, W),
        ],
    );
    assert_eq!(status, OK);
    assert_bytes(&disk.read_at(512, 4096), &data[..4096], "on disk");
    // Its neighbours were kept (read-modify-write of the edges).
    assert_bytes(&disk.read_at(0, 512), &vec![0u8; 512], "on disk");
    assert_bytes(&disk.read_at(4608, 512), &vec![0u8; 512], "on disk");
    let (status, len) = d.request(
        VIRTIO_BLK_T_IN,
        1,
        &[
            (HDR, 16, R),
            (odd + 8192, 333, W),
            (odd + 8192 + 333, 3763, W),
            (STATUS, 1, W),
        ],
    );
    assert_eq!((status, len), (OK, 4097));
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(odd + 8192)).unwrap();
    assert_bytes(&back, &data[..4096], "in guest memory");

    // A single unaligned sector.
    assert_eq!(d.write(3, &data[..512]), (OK, 1));
    assert_bytes(&disk.read_at(1536, 512), &data[..512], "on disk");
    assert_eq!(d.read(3, 512), (OK, 513));
    assert_bytes(&d.data(512), &data[..512], "in guest memory");

    assert_eq!(d.dwz(VIRTIO_BLK_T_WRITE_ZEROES, 1, 1, 0), (OK, 1));
    assert_bytes(&disk.read_at(512, 512), &vec![0u8; 512], "on disk");
    assert_bytes(&disk.read_at(1024, 512), &data[512..1024], "on disk");
}

fn rate_limiter_throttles() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut config = disk.config();
    // 50 requests per second, with a one-second (50-request) burst.
    config.rate_limit = Some(RateLimitConfig {
        bytes_per_sec: None,
        ops_per_sec: Some(50),
    });
    let mut block = Block::new(&config).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let start = Instant::now();
    for i in 0..100u64 {
        d.header(HDR + i * 16, VIRTIO_BLK_T_FLUSH, 0);
        d.add(&[(HDR + i * 16, 16, R), (STATUS + i, 1, W)]);
    }
    d.notify();
    d.wait();
    let elapsed = start.elapsed();
    // 50 from the full bucket, 50 more at 50/s: about 1 s.
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(counter(&block, "throttled") > 0);
    assert_eq!(counter(&block, "flush_ops"), 100);
    for i in 0..100u64 {
        let s: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(s, OK);
    }
}

fn rate_limiter_bytes() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut config = disk.config();
    config.rate_limit = Some(RateLimitConfig {
        bytes_per_sec: Some(4 << 20),
        ops_per_sec: None,
    });
    let mut block = Block::new(&config).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let start = Instant::now();
    // Four 1 MiB reads empty the bucket, the fifth goes into debt, the
    // sixth waits for the debt to be paid: 1 MiB at 4 MiB/s.
    for _ in 0..6 {
        assert_eq!(d.read(0, 1 << 20).0, OK);
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(counter(&block, "throttled") > 0);
}

fn pause_resume_snapshot_restore() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    let irq = d.activate(&mut block, &mem);
    let data = pattern(4096, 42);
    assert_eq!(d.write(0, &data).0, OK);

    // Paused: a kicked request stays in the queue.
    block.pause();
    assert!(!block.is_running());
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.add(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
    d.notify();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(d.vq.used().idx().load(), 1);
    let states = block.queue_states();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].next_avail, 1);

    let DeviceState::Block(state) = block.state() else {
        panic!("not a block state")
    };
    assert_eq!(state.capacity, DISK_SIZE / 512);
    let states = block.queue_states();
    assert_eq!(states.len(), 1);
    assert_eq!((states[0].next_avail, states[0].next_used), (1, 1));

    // Resume serves the pending request.
    block.resume();
    assert!(block.is_running());
    d.wait();
    assert_eq!(d.status(), OK);
    assert_bytes(&d.data(4096), &data, "in guest memory");

    // Migrate: pause, snapshot, flush, release; restore elsewhere.
    block.pause();
    let (state, queues) = (block.state(), block.queue_states());
    block.migration_release().unwrap();
    // The driver submits a request the source never sees.
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    d.add(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
    d.notify();

    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut target = restored_block(&disk, state, &queues, &mem, &irq, &kick);
    assert!(target.is_running());
    target.migration_acquire().unwrap();
    drop(block);
    // The target serves the request made available before it started.
    d.wait();
    assert_eq!(d.status(), OK);
    assert_bytes(&d.data(4096), &data, "in guest memory");
    // And new ones, kicked on its eventfd.
    d.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[(HDR, 16, R), (STATUS, 1, W)]);
    kick.write(1).unwrap();
    d.wait();
    assert_eq!(d.status(), OK);
    assert_eq!(counter(&target, "flush_ops"), 1);

    // Reset returns the queue state and stops.
    let states = target.reset().unwrap();
    assert_eq!(states[0].next_avail, 4);
    assert!(!target.is_activated());
    assert!(target.reset().is_none());
}

#[test]
fn restore_checks_the_disk() {
    let disk = TempDisk::new(DISK_SIZE);
    let mut block = Block::new_unlocked(&disk.config()).unwrap();
    let state = block.state();
    let other = TempDisk::new(DISK_SIZE * 2);
    let mut target = Block::new_unlocked(&other.config()).unwrap();
    let err = target.restore(state.clone(), None).unwrap_err().to_string();
    assert!(err.contains("capacity"), "{err}");

    let mut readonly = disk.config();
    readonly.readonly = true;
    let mut target = Block::new_unlocked(&readonly).unwrap();
    let err = target.restore(state.clone(), None).unwrap_err().to_string();
    assert!(err.contains("read-only"), "{err}");

    let mut target = Block::new_unlocked(&disk.config()).unwrap();
    target.restore(state, None).unwrap();
    assert!(!target.is_activated());
}

/// A device on `disk` restored from a source's `state` and `queues` (its
/// request queue kicked through `kick`), as the transport restores it.
fn restored_block(
    disk: &TempDisk,
    state: DeviceState,
    queues: &[virtio_queue::QueueState],
    memory: &Arc<GuestMemoryMmap>,
    irq: &Arc<TestInterrupt>,
    kick: &EventFd,
) -> Block {
    let mut target = Block::new_unlocked(&disk.config()).unwrap();
    let queue = Queue::try_from(queues[0]).unwrap();
    let context = ActivateContext {
        memory: memory.clone(),
        queues: vec![(queue, kick.try_clone().unwrap())],
        interrupt: irq.clone(),
        acked_features: target.features(),
    };
    target.restore(state, Some(context)).unwrap();
    target
}

fn direct_reads_mark_guest_pages_dirty() {
    let disk = TempDisk::new(DISK_SIZE);
    disk.write_at(0, &pattern(1 << 20, 4));
    let Some(mut block) = direct_block(&disk, "the O_DIRECT dirty bitmap test") else {
        return;
    };
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let region = mem.find_region(GuestAddress(DATA)).unwrap();
    let dirty = |addr: u64| region.bitmap().dirty_at(addr as usize);

    // Aligned: the kernel writes guest memory directly.
    let aligned = DATA + 0x40000;
    assert_eq!(
        d.request(
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (aligned, 8192, W), (STATUS, 1, W)]
        ),
        (OK, 8193)
    );
    assert!(dirty(aligned) && dirty(aligned + 4096));
    assert!(!dirty(aligned + 8192));
    // Unaligned: bounced, then copied into the guest.
    let odd = DATA + 0x80000 + 1;
    assert_eq!(
        d.request(
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (odd, 4096, W), (STATUS, 1, W)]
        ),
        (OK, 4097)
    );
    assert!(dirty(odd - 1) && dirty(odd + 4095));
    assert!(!dirty(odd + 8192));
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(odd)).unwrap();
    assert_bytes(&back, &pattern(1 << 20, 4)[..4096], "bounced read");

    // Several in flight at once: every other page.
    let base = DATA + 0x10_0000;
    for i in 0..8u64 {
        d.add_read(i, i * 8, base + i * 8192, 4096);
    }
    d.notify();
    d.wait();
    for i in 0..8u64 {
        assert_eq!(d.status_at(i), OK);
        assert!(dirty(base + i * 8192), "page {i}");
        assert!(!dirty(base + i * 8192 + 4096), "gap {i}");
    }
}

/// Reads `n` requests of `len` bytes (request `i` reads sector `i * len /
/// 512` into `DATA + i * len`); returns their heads.
fn add_reads(d: &mut Driver, n: u64, len: u32) -> Vec<u16> {
    (0..n)
        .map(|i| d.add_read(i, i * u64::from(len) / 512, DATA + i * u64::from(len), len))
        .collect()
}

/// Checks that the used ring from `from` holds each of `heads` exactly once,
/// with the length of a `len`-byte read, and that the reads are right.
#[track_caller]
fn check_reads(d: &Driver, from: u16, heads: &[u16], len: u32, content: &[u8]) {
    let used = d.used_since(from);
    let mut ids: Vec<u32> = used.iter().map(|&(id, _)| id).collect();
    ids.sort_unstable();
    let mut want: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "each request completed exactly once");
    assert!(used.iter().all(|&(_, l)| l == len + 1));
    for i in 0..heads.len() as u64 {
        assert_eq!(d.status_at(i), OK, "request {i}");
        let at = (i * u64::from(len)) as usize;
        assert_bytes(
            &d.data_at(DATA + i * u64::from(len), len as usize),
            &content[at..at + len as usize],
            "read data",
        );
    }
}

fn pause_with_requests_in_flight() {
    const N: u64 = 32;
    const LEN: u32 = 256 << 10;
    let size = 16u64 << 20;
    let disk = TempDisk::new(size);
    let content = pattern(size as usize, 99);
    disk.write_at(0, &content);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    let irq = d.activate(&mut block, &mem);
    let uring = block.io_engine() == Some(IoEngine::Uring);

    let mut evicted = true;
    for _ in 0..5 {
        // Reads that go to the disk, so some are in flight at the pause.
        evict(&disk.path);
        evicted &= resident_pages(&disk.path, 0, (N * u64::from(LEN)) as usize) == 0;
        d.next_desc = 0;
        let from = d.submitted;
        let heads = add_reads(&mut d, N, LEN);
        d.notify();
        d.wait_taken();
        block.pause();
        // Every request taken from the queue is complete...
        assert_eq!(d.vq.used().idx().load(), d.submitted);
        let states = block.queue_states();
        assert_eq!(states[0].next_avail, d.submitted);
        assert_eq!(states[0].next_used, d.submitted);
        check_reads(&d, from, &heads, LEN, &content);
        // ...and nothing writes guest memory any more.
        let clobber = vec![0xeeu8; (N * u64::from(LEN)) as usize];
        mem.write_slice(&clobber, GuestAddress(DATA)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_bytes(&d.data(clobber.len()), &clobber, "guest memory after pause");
        block.resume();
    }
    let drained = block.drained_requests();
    eprintln!("requests completed by pause() after the worker stopped: {drained}");
    if uring && evicted {
        assert!(drained > 0, "no pause caught a request in flight");
    } else if uring {
        eprintln!("the page cache of the test disk cannot be dropped: no slow reads");
    } else {
        assert_eq!(drained, 0);
    }

    // A snapshot with more requests than the ring holds: those in flight
    // complete before the pause returns, the others stay in the queue and
    // the restored device runs them; none is lost or completed twice.
    const M: u64 = 80;
    const SMALL: u32 = 64 << 10;
    evict(&disk.path);
    d.next_desc = 0;
    let from = d.submitted;
    let heads = add_reads(&mut d, M, SMALL);
    d.notify();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.vq.used().idx().load() == from {
        assert!(Instant::now() < deadline, "nothing completed");
        std::thread::yield_now();
    }
    block.pause();
    let (state, queues) = (block.state(), block.queue_states());
    assert_eq!(queues[0].next_used, d.vq.used().idx().load());
    assert_eq!(queues[0].next_avail, queues[0].next_used);
    block.migration_release().unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let target = restored_block(&disk, state, &queues, &mem, &irq, &kick);
    drop(block);
    d.wait();
    check_reads(&d, from, &heads, SMALL, &content);
    drop(target);
}

fn more_requests_than_the_ring_holds() {
    const N: u64 = 80;
    let disk = TempDisk::new(DISK_SIZE);
    let content = pattern(DISK_SIZE as usize, 5);
    disk.write_at(0, &content);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    for _ in 0..3 {
        d.next_desc = 0;
        let from = d.submitted;
        let heads = add_reads(&mut d, N, 4096);
        d.notify();
        d.wait();
        check_reads(&d, from, &heads, 4096, &content);
    }
    assert_eq!(counter(&block, "read_ops"), 3 * N);
    assert_eq!(counter(&block, "errors"), 0);
}

fn flush_completes_after_earlier_writes() {
    const N: u64 = 16;
    const LEN: u32 = 64 << 10;
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    for round in 0..3u8 {
        let from = d.submitted;
        d.next_desc = 0;
        let mut writes = Vec::new();
        for i in 0..N {
            let addr = DATA + i * u64::from(LEN);
            mem.write_slice(
                &pattern(LEN as usize, round * 16 + i as u8),
                GuestAddress(addr),
            )
            .unwrap();
            d.header(HDR + i * 16, VIRTIO_BLK_T_OUT, i * u64::from(LEN) / 512);
            mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            writes.push(d.add(&[(HDR + i * 16, 16, R), (addr, LEN, R), (STATUS + i, 1, W)]));
        }
        d.header(HDR + N * 16, VIRTIO_BLK_T_FLUSH, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS + N)).unwrap();
        let flush = d.add(&[(HDR + N * 16, 16, R), (STATUS + N, 1, W)]);
        d.notify();
        d.wait();
        let used = d.used_since(from);
        assert_eq!(used.len() as u64, N + 1);
        assert_eq!(
            used.last().unwrap().0,
            u32::from(flush),
            "the flush completes after every write before it"
        );
        for i in 0..=N {
            assert_eq!(d.status_at(i), OK);
        }
        for i in 0..N {
            assert_bytes(
                &disk.read_at(i * u64::from(LEN), LEN as usize),
                &pattern(LEN as usize, round * 16 + i as u8),
                "written data",
            );
        }
        assert!(writes
            .iter()
            .all(|w| used.iter().any(|&(id, _)| id == u32::from(*w))));
    }
    assert_eq!(counter(&block, "write_ops"), 3 * N);
    assert_eq!(counter(&block, "flush_ops"), 3);
}

#[test]
fn the_engine_follows_the_disk_mode() {
    let disk = TempDisk::new(DISK_SIZE);
    let mem = memory();
    // Cached: synchronous (pread from the page cache is the fastest).
    let mut block = Block::new(&disk.config()).unwrap();
    assert_eq!(block.io_engine(), None);
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    assert_eq!(block.io_engine(), Some(IoEngine::Sync));
    assert_eq!(d.read(0, 4096), (OK, 4097));
    block.reset();
    assert_eq!(block.io_engine(), None);
    drop(block);

    // O_DIRECT: io_uring, where the kernel has it.
    let Some(mut block) = direct_block(&disk, "the O_DIRECT part") else {
        return;
    };
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let want = if uring_available() {
        IoEngine::Uring
    } else {
        IoEngine::Sync
    };
    assert_eq!(block.io_engine(), Some(want));
    assert_eq!(d.read(0, 4096), (OK, 4097));
    block.reset();

    // Asked for explicitly.
    block.set_io_engine(IoEngine::Sync);
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    assert_eq!(block.io_engine(), Some(IoEngine::Sync));
    assert_eq!(d.read(0, 4096), (OK, 4097));
}

#[test]
fn uring_completes_requests_out_of_order() {
    if !uring_available() {
        return;
    }
    const A_LEN: u32 = 8 << 20;
    let size = 16u64 << 20;
    let disk = TempDisk::new(size);
    let content = pattern(size as usize, 17);
    disk.write_at(0, &content);
    let mem = memory();
    let mut block = Block::new(&disk.config()).unwrap();
    block.set_io_engine(IoEngine::Uring);
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    assert_eq!(block.io_engine(), Some(IoEngine::Uring));
    let mut reordered = 0;
    for _ in 0..5 {
        // A: 8 MiB that must come from the disk; B: 4 KiB in the page cache.
        evict(&disk.path);
        let (a_off, b_off) = (0u64, 12u64 << 20);
        disk.read_at(b_off, 4096);
        if resident_pages(&disk.path, a_off, A_LEN as usize) > 0 {
            eprintln!("skipping: the page cache of the test disk cannot be dropped");
            return;
        }
        // Both taken in one pass and submitted together, A first: the
        // worker serves what is available when it starts.
        block.pause();
        let from = d.submitted;
        let a = d.add_read(0, a_off / 512, DATA, A_LEN);
        let b = d.add_read(1, b_off / 512, DATA + (10 << 20), 4096);
        block.resume();
        d.wait();
        let used = d.used_since(from);
        let (a, b) = ((u32::from(a), A_LEN + 1), (u32::from(b), 4097));
        // B completes inline at submission while A waits for the disk,
        // unless the thread was preempted inside the submission long
        // enough for the disk to deliver all of A (a busy host).
        if used == vec![b, a] {
            reordered += 1;
        } else {
            assert_eq!(used, vec![a, b]);
        }
        assert_eq!((d.status_at(0), d.status_at(1)), (OK, OK));
        assert_bytes(&d.data(A_LEN as usize), &content[..A_LEN as usize], "A");
        assert_bytes(
            &d.data_at(DATA + (10 << 20), 4096),
            &content[b_off as usize..b_off as usize + 4096],
            "B",
        );
    }
    assert!(reordered > 0, "B never completed before A");
    assert_eq!(counter(&block, "read_ops"), 10);
}

// ------------------------------------------------------------ loop device

/// A loop device over a temp file, detached on drop.
struct LoopDevice {
    path: String,
    _backing: TempDisk,
}

impl LoopDevice {
    fn new(size: u64, sector_size: u32) -> Result<LoopDevice, String> {
        let backing = TempDisk::new(size);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector_size.to_string()])
            .arg(&backing.path)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LoopDevice {
            path: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            _backing: backing,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.path])
            .status();
    }
}

fn loop_device_backend() {
    let dev = match LoopDevice::new(DISK_SIZE, 4096) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("skipping the loop device test: {e}");
            return;
        }
    };
    let config = DiskConfig {
        path: PathBuf::from(&dev.path),
        id: Some("lv0".to_string()),
        ..Default::default()
    };
    let mut block = Block::new(&config).unwrap();
    assert_eq!(block.capacity(), DISK_SIZE / 512, "BLKGETSIZE64");
    let mut cfg = [0u8; CONFIG_SPACE_SIZE];
    block.read_config(0, &mut cfg);
    assert_eq!(
        u32::from_le_bytes(cfg[20..24].try_into().unwrap()),
        4096,
        "BLKSSZGET"
    );
    assert_eq!(cfg[24], 0, "BLKPBSZGET == BLKSSZGET");
    assert_ne!(block.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);

    let mem = memory();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    let data = pattern(65536, 77);
    assert_eq!(d.write(0, &data), (OK, 1));
    assert_eq!(d.read(0, 65536), (OK, 65537));
    assert_bytes(&d.data(65536), &data, "in guest memory");

    // BLKDISCARD (4 KiB aligned, as the guest does with blk_size 4096).
    assert_eq!(d.dwz(VIRTIO_BLK_T_DISCARD, 8, 16, 0), (OK, 1));
    assert_eq!(d.read(8, 8192).0, OK);
    assert_bytes(
        &d.data(8192),
        &vec![0u8; 8192],
        "a loop device discard reads back zeros",
    );
    // BLKZEROOUT.
    assert_eq!(d.dwz(VIRTIO_BLK_T_WRITE_ZEROES, 64, 8, 0), (OK, 1));
    assert_eq!(d.read(56, 8192).0, OK);
    assert_bytes(
        &d.data(8192)[..4096],
        &data[56 * 512..64 * 512],
        "in guest memory",
    );
    assert_bytes(&d.data(8192)[4096..], &vec![0u8; 4096], "in guest memory");
    // A request not aligned to the 4 KiB logical block fails cleanly.
    assert_eq!(d.dwz(VIRTIO_BLK_T_WRITE_ZEROES, 1, 1, 0).0, IOERR);
    assert_eq!(d.dwz(VIRTIO_BLK_T_DISCARD, 1, 1, 0).0, IOERR);
    assert_eq!(d.read(0, 512).1, 513);
    block.reset();
    drop(block);

    // O_DIRECT on the block device.
    let mut config = config;
    config.direct = true;
    let mut block = Block::new(&config).unwrap();
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.activate(&mut block, &mem);
    assert_eq!(d.read(0, 4096), (OK, 4097));
    assert_bytes(&d.data(4096), &data[..4096], "in guest memory");
    // Unaligned to the 4 KiB block: bounced, read-modify-write.
    assert_eq!(d.write(1, &[0x5a; 512]), (OK, 1));
    assert_eq!(d.read(0, 4096).0, OK);
    let back = d.data(4096);
    assert_bytes(&back[..512], &data[..512], "in guest memory");
    assert_bytes(&back[512..1024], &[0x5a; 512], "in guest memory");
    assert_bytes(&back[1024..], &data[1024..4096], "in guest memory");
}

/// Not a test of the device: a quick throughput probe (numbers in mod.rs), run by hand with
/// `cargo test -p devices --release -- --ignored --nocapture bench_4k`.
#[test]
#[ignore]
fn bench_4k_random_io() {
    let size = 256u64 << 20;
    let disk = TempDisk::new(size);
    {
        let mut f = OpenOptions::new().write(true).open(&disk.path).unwrap();
        let chunk = pattern(1 << 20, 1);
        f.seek(SeekFrom::Start(0)).unwrap();
        for _ in 0..(size >> 20) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let (write, direct, engines) = match std::env::var("BLK_BENCH").as_deref() {
        Ok("cached-write") => (true, false, [IoEngine::Sync, IoEngine::Uring]),
        Ok("direct-write") => (true, true, [IoEngine::Sync, IoEngine::Uring]),
        Ok("direct-read") => (false, true, [IoEngine::Sync, IoEngine::Uring]),
        _ => (false, false, [IoEngine::Sync, IoEngine::Uring]),
    };
    let runs: Vec<(bool, bool, IoEngine)> = if std::env::var("BLK_BENCH").is_ok() {
        // One case, engines alternated three times.
        (0..3)
            .flat_map(|_| engines.map(|e| (write, direct, e)))
            .collect()
    } else {
        [false, true]
            .into_iter()
            .flat_map(|w| [false, true].map(|dr| (w, dr)))
            .flat_map(|(w, dr)| engines.map(|e| (w, dr, e)))
            .collect()
    };
    for (write, direct, engine) in runs {
        let mut config = disk.config();
        config.direct = direct;
        let mut block = Block::new(&config).unwrap();
        block.set_io_engine(engine);
        let mem = memory();
        let mut d = Driver::new(&mem);
        d.activate(&mut block, &mem);
        let in_flight = 32u64;
        let rounds = if direct && write { 300 } else { 2000u64 };
        let mut seed = 12345u64;
        let start = Instant::now();
        for _ in 0..rounds {
            for i in 0..in_flight {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let sector = (seed >> 20) % (size / 4096) * 8;
                let hdr = HDR + i * 16;
                let (kind, flags) = if write {
                    (VIRTIO_BLK_T_OUT, R)
                } else {
                    (VIRTIO_BLK_T_IN, W)
                };
                d.header(hdr, kind, sector);
                d.add(&[
                    (hdr, 16, R),
                    (DATA + i * 4096, 4096, flags),
                    (STATUS + i, 1, W),
                ]);
            }
            d.notify();
            d.wait();
        }
        let n = rounds * in_flight;
        let secs = start.elapsed().as_secs_f64();
        let what = if write { "writes" } else { "reads" };
        eprintln!(
            "direct={direct} {engine:?}: {n} 4 KiB random {what}, {in_flight} in flight: {:.0} IOPS",
            n as f64 / secs
        );
    }
}
