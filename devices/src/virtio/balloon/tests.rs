//! virtio-balloon tests: a mock driver (virtio-queue's mock rings, laid out
//! by hand: see `Vq`) on real guest memory with two RAM regions and a hole,
//! a recording backend, and the real worker thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use config::BalloonConfig;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::MAX_PFNS_PER_BUFFER;
use super::*;
use crate::virtio::{
    ActivateContext, DeviceState, VirtioDevice, VirtioInterrupt, F_EVENT_IDX, F_VERSION_1,
};
use crate::GuestMemoryMmap;

/// RAM: 0-64 MiB and 128-160 MiB (page frames 0..0x4000 and 0x8000..0xa000).
const LOW: (u64, u64) = (0, 64 << 20);
const HIGH: (u64, u64) = (128 << 20, 32 << 20);
const RAM: [(u64, u64); 2] = [LOW, HIGH];
/// Driver buffers (page frame arrays, stats) live here.
const BUF: u64 = 0x10_0000;
const BUF2: u64 = 0x11_0000;
const STATS_BUF: u64 = 0x12_0000;

const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;

// ---------------------------------------------------------------- helpers

/// Records every discard; fails those that start at `fail_at`.
#[derive(Default)]
struct TestBackend {
    discards: Mutex<Vec<(u64, u64)>>,
    fail_at: Option<u64>,
}

impl BalloonBackend for TestBackend {
    fn discard(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        if self.fail_at == Some(gpa) {
            return Err(std::io::Error::other("no"));
        }
        self.discards.lock().unwrap().push((gpa, len));
        Ok(())
    }
}

impl TestBackend {
    fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.discards.lock().unwrap())
    }
}

#[derive(Default)]
struct TestInterrupt {
    queue: AtomicU64,
    config: AtomicU64,
}

impl VirtioInterrupt for TestInterrupt {
    fn notify_queue(&self, _index: u16) -> std::io::Result<()> {
        self.queue.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn notify_config(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(LOW.0), LOW.1 as usize),
            (GuestAddress(HIGH.0), HIGH.1 as usize),
        ])
        .unwrap(),
    )
}

fn config() -> BalloonConfig {
    BalloonConfig {
        target_mib: 0,
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_interval_s: 0,
    }
}

fn balloon(config: &BalloonConfig) -> (Balloon, Arc<TestBackend>) {
    let backend = Arc::new(TestBackend::default());
    let balloon = Balloon::new(config, &RAM, backend.clone()).unwrap();
    (balloon, backend)
}

fn counter(balloon: &Balloon, name: &str) -> u64 {
    balloon.counters()[name]
}

/// One split queue, driver side, at `index * 64 KiB`. virtio-queue's
/// `MockSplitQueue::create` overlaps the used ring with the avail ring for
/// queues this big (see the block tests), so the rings are placed by hand.
struct Vq<'a> {
    mem: &'a GuestMemoryMmap,
    desc_table: DescriptorTable<'a, GuestMemoryMmap>,
    avail: AvailRing<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
    base: u64,
    kick: EventFd,
    next_desc: u16,
    submitted: u16,
}

impl<'a> Vq<'a> {
    fn new(mem: &'a GuestMemoryMmap, index: u64) -> Vq<'a> {
        let base = index * 0x1_0000;
        Vq {
            mem,
            desc_table: DescriptorTable::new(mem, GuestAddress(base), QUEUE_SIZE),
            avail: AvailRing::new(mem, GuestAddress(base + 0x1000), QUEUE_SIZE),
            used: UsedRing::new(mem, GuestAddress(base + 0x2000), QUEUE_SIZE),
            base,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            submitted: 0,
        }
    }

    fn create_queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some((self.base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((self.base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Makes a chain of (addr, len, flags) buffers available; returns its head.
    fn add(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let n = bufs.len() as u16;
        if self.next_desc + n > QUEUE_SIZE {
            self.next_desc = 0;
        }
        let base = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = i as u16;
            let (flags, next) = if i + 1 < n {
                (flags | VRING_DESC_F_NEXT as u16, base + i + 1)
            } else {
                (flags, 0)
            };
            let desc = SplitDescriptor::new(addr, len, flags, next);
            self.desc_table
                .store(base + i, RawDescriptor::from(desc))
                .unwrap();
        }
        self.next_desc += n;
        let idx = self.avail.idx().load();
        self.avail
            .ring()
            .ref_at((idx % QUEUE_SIZE) as usize)
            .unwrap()
            .store(base);
        self.avail.idx().store(idx.wrapping_add(1));
        self.submitted = self.submitted.wrapping_add(1);
        base
    }

    fn notify(&self) {
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.used.idx().load()
    }

    /// Waits until the used index reaches `n`; returns the last used element.
    fn wait_used(&self, n: u16) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() != n {
            assert!(
                Instant::now() < deadline,
                "queue at {:#x}: used {} of {n}",
                self.base,
                self.used_idx()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let elem = self
            .used
            .ring()
            .ref_at((n.wrapping_sub(1) % QUEUE_SIZE) as usize)
            .unwrap()
            .load();
        (elem.id(), elem.len())
    }

    /// Submits a buffer, kicks, and waits for it to come back; checks the
    /// device wrote nothing.
    fn submit(&mut self, bufs: &[(u64, u32, u16)]) {
        let head = self.add(bufs);
        self.notify();
        let (id, len) = self.wait_used(self.submitted);
        assert_eq!(id, u32::from(head));
        assert_eq!(len, 0);
    }

    /// Writes le32 page numbers at `addr` and submits them.
    fn pfns(&mut self, addr: u64, pfns: &[u32]) {
        write_pfns(self.mem, addr, pfns);
        self.submit(&[(addr, (pfns.len() * 4) as u32, R)]);
    }
}

fn write_pfns(mem: &GuestMemoryMmap, addr: u64, pfns: &[u32]) {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
}

fn write_stats(mem: &GuestMemoryMmap, entries: &[(u16, u64)]) -> u32 {
    let bytes: Vec<u8> = entries
        .iter()
        .flat_map(|(tag, value)| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend(value.to_le_bytes());
            e
        })
        .collect();
    mem.write_slice(&bytes, GuestAddress(STATS_BUF)).unwrap();
    bytes.len() as u32
}

const ALL: u64 = (1 << F_VERSION_1)
    | (1 << F_EVENT_IDX)
    | (1 << F_MUST_TELL_HOST)
    | (1 << F_STATS_VQ)
    | (1 << F_DEFLATE_ON_OOM)
    | (1 << F_PAGE_REPORTING);

/// The driver side: one `Vq` per queue the device offers.
struct Driver<'a> {
    vqs: Vec<Vq<'a>>,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, balloon: &Balloon) -> Driver<'a> {
        let count = balloon.queue_max_sizes().len() as u64;
        Driver {
            vqs: (0..count).map(|i| Vq::new(mem, i)).collect(),
        }
    }

    /// The queues as the transport hands them over: the first `ready`
    /// enabled, the others not.
    fn context(
        &self,
        memory: &Arc<GuestMemoryMmap>,
        irq: &Arc<TestInterrupt>,
        acked: u64,
        ready: usize,
    ) -> ActivateContext {
        ActivateContext {
            memory: memory.clone(),
            queues: self
                .vqs
                .iter()
                .enumerate()
                .map(|(i, vq)| {
                    let queue = if i < ready {
                        vq.create_queue()
                    } else {
                        Queue::new(QUEUE_SIZE).unwrap()
                    };
                    (queue, vq.kick.try_clone().unwrap())
                })
                .collect(),
            interrupt: irq.clone(),
            acked_features: acked,
        }
    }

    fn activate(
        &self,
        balloon: &mut Balloon,
        memory: &Arc<GuestMemoryMmap>,
        acked: u64,
    ) -> Arc<TestInterrupt> {
        let irq = Arc::new(TestInterrupt::default());
        let ready = 2
            + (acked & (1 << F_STATS_VQ) != 0) as usize
            + (acked & (1 << F_PAGE_REPORTING) != 0) as usize;
        balloon
            .activate(self.context(memory, &irq, acked, ready))
            .unwrap();
        irq
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn config_u32(balloon: &Balloon, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    balloon.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

// ---------------------------------------------------------------- tests

#[test]
fn features_and_queues_follow_the_config() {
    let (b, _) = balloon(&config());
    assert_eq!(b.device_type(), crate::virtio::TYPE_BALLOON);
    let f = b.features();
    for bit in [
        F_MUST_TELL_HOST,
        F_STATS_VQ,
        F_DEFLATE_ON_OOM,
        F_PAGE_REPORTING,
    ] {
        assert!(f & (1 << bit) != 0, "bit {bit}");
    }
    assert!(f & (1 << F_VERSION_1) != 0);
    assert_eq!(f & (1 << F_FREE_PAGE_HINT), 0);
    assert_eq!(f & (1 << F_PAGE_POISON), 0);
    assert_eq!(b.queue_max_sizes(), vec![QUEUE_SIZE; 4]);

    let plain = BalloonConfig {
        deflate_on_oom: false,
        free_page_reporting: false,
        ..config()
    };
    let (b, _) = balloon(&plain);
    assert_eq!(b.features() & (1 << F_DEFLATE_ON_OOM), 0);
    assert_eq!(b.features() & (1 << F_PAGE_REPORTING), 0);
    assert!(b.features() & (1 << F_STATS_VQ) != 0);
    assert_eq!(b.queue_max_sizes(), vec![QUEUE_SIZE; 3]);

    // A target over guest RAM (96 MiB) is refused.
    let too_big = BalloonConfig {
        target_mib: 97,
        ..config()
    };
    assert!(matches!(
        Balloon::new(&too_big, &RAM, Arc::new(TestBackend::default())),
        Err(BalloonError::TargetTooLarge { .. })
    ));
}

#[test]
fn queue_indices_follow_the_acked_features() {
    let q = queue_indices(0);
    assert_eq!((q.inflate, q.deflate), (0, 1));
    assert_eq!((q.stats, q.free_page_hint, q.reporting), (None, None, None));
    let q = queue_indices(1 << F_STATS_VQ);
    assert_eq!((q.stats, q.reporting), (Some(2), None));
    let q = queue_indices(1 << F_PAGE_REPORTING);
    assert_eq!((q.stats, q.reporting), (None, Some(2)));
    let q = queue_indices((1 << F_STATS_VQ) | (1 << F_PAGE_REPORTING));
    assert_eq!((q.stats, q.reporting), (Some(2), Some(3)));
    let q = queue_indices((1 << F_STATS_VQ) | (1 << F_FREE_PAGE_HINT) | (1 << F_PAGE_REPORTING));
    assert_eq!(
        (q.stats, q.free_page_hint, q.reporting),
        (Some(2), Some(3), Some(4))
    );
    // Features that bring no queue change nothing.
    let q =
        queue_indices((1 << F_MUST_TELL_HOST) | (1 << F_DEFLATE_ON_OOM) | (1 << F_PAGE_REPORTING));
    assert_eq!(q.reporting, Some(2));
}

#[test]
fn config_space_target_and_actual() {
    let mem = memory();
    let (mut b, _) = balloon(&BalloonConfig {
        target_mib: 8,
        ..config()
    });
    let handle = b.handle();
    assert_eq!(config_u32(&b, 0), 8 << 8);
    assert_eq!(config_u32(&b, 4), 0);
    assert_eq!(config_u32(&b, 8), 0);
    assert_eq!(config_u32(&b, 12), 0);
    let mut beyond = [0xffu8; 4];
    b.read_config(14, &mut beyond);
    assert_eq!(beyond, [0; 4]);

    // num_pages is read-only; actual takes whole and partial writes.
    b.write_config(0, &7u32.to_le_bytes());
    assert_eq!(config_u32(&b, 0), 8 << 8);
    b.write_config(4, &0x1234_5678u32.to_le_bytes());
    assert_eq!(handle.actual_bytes(), 0x1234_5678 * PAGE_SIZE);
    b.write_config(6, &[0xaa, 0xbb]);
    assert_eq!(config_u32(&b, 4), 0xbbaa_5678);
    b.write_config(3, &[1, 2]);
    assert_eq!(config_u32(&b, 4), 0xbbaa_5602);
    assert_eq!(config_u32(&b, 0), 8 << 8);

    // Before the driver runs a new target raises no interrupt.
    handle.set_target_bytes(16 << 20).unwrap();
    assert_eq!(config_u32(&b, 0), 16 << 8);
    assert_eq!(handle.target_bytes(), 16 << 20);
    let d = Driver::new(&mem, &b);
    let irq = d.activate(&mut b, &mem, ALL);
    assert_eq!(irq.config.load(Ordering::SeqCst), 0);
    handle.set_target_bytes(32 << 20).unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    assert_eq!(config_u32(&b, 0), 32 << 8);
    assert!(matches!(
        handle.set_target_bytes(97 << 20),
        Err(BalloonError::TargetTooLarge { .. })
    ));
    handle.set_target_bytes(96 << 20).unwrap();
    assert_eq!(counter(&b, "target_changes"), 3);
    let stats = handle.report();
    assert_eq!(stats.target_pages, 96 << 8);
    assert_eq!(stats.actual_pages, 0xbbaa_5602);
}

#[test]
fn inflate_discards_runs_of_valid_pages_and_skips_the_rest() {
    let mem = memory();
    let (mut b, backend) = balloon(&config());
    let handle = b.handle();
    let mut d = Driver::new(&mem, &b);
    let irq = d.activate(&mut b, &mem, ALL);
    assert!(handle.must_tell_host());

    // Unsorted, duplicates, the last page of the low region, the hole after
    // it, the first pages of the high region, a frame far beyond RAM.
    d.vqs[0].pfns(
        BUF,
        &[
            0x302,
            0x300,
            0x301,
            0x500,
            0x301,
            0x3fff,
            0x4000,
            0x8000,
            0x8001,
            u32::MAX,
        ],
    );
    assert_eq!(
        backend.take(),
        vec![
            (0x30_0000, 0x3000),
            (0x50_0000, 0x1000),
            (0x3ff_f000, 0x1000),
            (0x800_0000, 0x2000)
        ]
    );
    assert_eq!(counter(&b, "inflated_pages"), 7);
    assert_eq!(counter(&b, "invalid_pfns"), 2);
    assert_eq!(handle.inflated_pages(), 7);
    assert!(irq.queue.load(Ordering::SeqCst) >= 1);
    let maps = handle.ballooned_pages();
    assert_eq!(maps.len(), 2);
    assert_eq!((maps[0].start, maps[0].pages), (0, 0x4000));
    // 0x300 starts a bitmap word.
    assert_eq!(maps[0].words[0x300 / 64], 0b111);
    assert_eq!(maps[0].words[0x3fff / 64], 1 << 63);
    assert_eq!((maps[1].start, maps[1].pages), (128 << 20, 0x2000));
    assert_eq!(maps[1].words[0], 0b11);

    // Page numbers in two descriptors of one buffer; an odd trailing byte
    // count is ignored.
    write_pfns(&mem, BUF, &[0x600]);
    write_pfns(&mem, BUF2, &[0x601, 0x700]);
    d.vqs[0].submit(&[(BUF, 4, R), (BUF2, 9, R)]);
    assert_eq!(
        backend.take(),
        vec![(0x60_0000, 0x2000), (0x70_0000, 0x1000)]
    );
    assert_eq!(handle.inflated_pages(), 10);

    // Deflate: bits cleared, nothing for the host; invalid ones counted.
    let generation = handle.removal_generation();
    d.vqs[1].pfns(BUF, &[0x301, 0x8001, 0x4000, 0x999]);
    assert_ne!(handle.removal_generation(), generation);
    assert_eq!(counter(&b, "deflated_pages"), 3);
    assert_eq!(counter(&b, "invalid_pfns"), 3);
    assert_eq!(handle.inflated_pages(), 8);
    assert!(backend.take().is_empty());
    let maps = handle.ballooned_pages();
    assert_eq!(maps[0].words[0x300 / 64], 0b101);
    assert_eq!(maps[1].words[0], 0b01);
    // Re-inflating a page counts once in the map; inflating changes no generation.
    let generation = handle.removal_generation();
    d.vqs[0].pfns(BUF, &[0x300]);
    assert_eq!(handle.inflated_pages(), 8);
    assert_eq!(handle.removal_generation(), generation);
}

#[test]
fn malformed_buffers_are_returned_and_change_nothing() {
    let mem = memory();
    let backend = Arc::new(TestBackend {
        fail_at: Some(0x90_0000),
        ..Default::default()
    });
    let mut b = Balloon::new(&config(), &RAM, backend.clone()).unwrap();
    let handle = b.handle();
    let mut d = Driver::new(&mem, &b);
    d.activate(&mut b, &mem, ALL);

    write_pfns(&mem, BUF, &[0x300]);
    // Device-writable page numbers.
    d.vqs[0].submit(&[(BUF, 4, W)]);
    // Outside guest memory (the hole at 64 MiB).
    d.vqs[0].submit(&[(BUF, 4, R), (0x500_0000, 4, R)]);
    // Absurdly long.
    d.vqs[0].submit(&[(BUF, (MAX_PFNS_PER_BUFFER as u32 + 1) * 4, R)]);
    assert_eq!(counter(&b, "invalid_buffers"), 3);
    assert_eq!(handle.inflated_pages(), 0);
    assert!(backend.take().is_empty());
    // Empty buffers are fine.
    d.vqs[0].submit(&[(BUF, 0, R)]);

    // A failed discard is counted; the page is in the balloon all the same.
    d.vqs[0].pfns(BUF, &[0x900, 0x901]);
    assert_eq!(counter(&b, "discard_errors"), 1);
    assert_eq!(handle.inflated_pages(), 2);

    // The device still works.
    d.vqs[0].pfns(BUF, &[0x302]);
    assert_eq!(backend.take(), vec![(0x30_2000, 0x1000)]);

    // A bogus available index stalls the queue without hanging the worker.
    d.vqs[0]
        .avail
        .idx()
        .store(d.vqs[0].submitted.wrapping_add(1000));
    d.vqs[0].notify();
    std::thread::sleep(Duration::from_millis(20));
    b.pause();
    b.resume();
    assert!(b.is_running());
}

#[test]
fn stats_are_parsed_held_and_requested_again() {
    let mem = memory();
    let (mut b, _) = balloon(&BalloonConfig {
        stats_interval_s: 1,
        ..config()
    });
    let handle = b.handle();
    let mut d = Driver::new(&mem, &b);
    // Linux primes the stats queue before DRIVER_OK: the buffer is
    // available when the device starts.
    let len = write_stats(&mem, &[(4, 1000), (5, 5000), (99, 7), (4, 1500)]);
    let head = d.vqs[2].add(&[(STATS_BUF, len + 5, R)]);
    d.vqs[2].notify();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    d.activate(&mut b, &mem, ALL);
    wait_until("the first stats", || {
        stat(&handle, STAT_TOTAL_MEMORY).is_some()
    });
    let stats = handle.report();
    // The last entry of a tag wins; unknown tags and the partial entry are ignored.
    assert_eq!(
        stats.guest.as_ref().and_then(|g| g.get(STAT_FREE_MEMORY)),
        Some(1500)
    );
    assert_eq!(
        stats.guest.as_ref().and_then(|g| g.get(STAT_TOTAL_MEMORY)),
        Some(5000)
    );
    assert_eq!(stats.guest.as_ref().and_then(|g| g.get(STAT_SWAP_IN)), None);
    assert!(stats.guest.as_ref().unwrap().unix_ms >= before);
    assert!(stats.guest.as_ref().unwrap().age_ms() < 5000);
    // The device keeps the buffer until it wants new stats.
    assert_eq!(d.vqs[2].used_idx(), 0);
    assert_eq!(b.held_stats_buffer(), Some(head));
    assert_eq!(counter(&b, "stats_updates"), 1);

    // The timer returns it within the interval.
    let (id, used_len) = d.vqs[2].wait_used(1);
    assert_eq!((id, used_len), (u32::from(head), 0));
    assert_eq!(counter(&b, "stats_requests"), 1);
    assert_eq!(b.held_stats_buffer(), None);

    // The driver answers with fresh stats in the same buffer.
    let len = write_stats(
        &mem,
        &[
            (0, 11),
            (1, 22),
            (2, 33),
            (3, 44),
            (4, 2000),
            (6, 3000),
            (7, 55),
            (8, 1),
            (9, 2),
            (10, 3),
            (15, 9),
        ],
    );
    d.vqs[2].add(&[(STATS_BUF, len, R)]);
    d.vqs[2].notify();
    wait_until("fresh stats", || {
        stat(&handle, STAT_FREE_MEMORY) == Some(2000)
    });
    let stats = handle.report();
    assert_eq!(
        (
            stats.guest.as_ref().and_then(|g| g.get(STAT_SWAP_IN)),
            stats.guest.as_ref().and_then(|g| g.get(STAT_SWAP_OUT)),
            stats.guest.as_ref().and_then(|g| g.get(STAT_MAJOR_FAULTS)),
            stats.guest.as_ref().and_then(|g| g.get(STAT_MINOR_FAULTS))
        ),
        (Some(11), Some(22), Some(33), Some(44))
    );
    assert_eq!(
        (
            stats
                .guest
                .as_ref()
                .and_then(|g| g.get(STAT_AVAILABLE_MEMORY)),
            stats.guest.as_ref().and_then(|g| g.get(STAT_DISK_CACHES))
        ),
        (Some(3000), Some(55))
    );
    assert_eq!(
        (
            stats
                .guest
                .as_ref()
                .and_then(|g| g.get(STAT_HUGETLB_ALLOCATIONS)),
            stats
                .guest
                .as_ref()
                .and_then(|g| g.get(STAT_HUGETLB_FAILURES)),
            stats.guest.as_ref().and_then(|g| g.get(STAT_OOM_KILLS)),
            stats
                .guest
                .as_ref()
                .and_then(|g| g.get(STAT_DIRECT_RECLAIMS))
        ),
        (Some(1), Some(2), Some(3), Some(9))
    );
    // Stats of the old buffer do not linger.
    assert_eq!(
        stats.guest.as_ref().and_then(|g| g.get(STAT_TOTAL_MEMORY)),
        None
    );
    assert_eq!(counter(&b, "stats_updates"), 2);

    // A stats buffer the device cannot read is held (and returned) all the same.
    b.request_stats();
    d.vqs[2].wait_used(2);
    d.vqs[2].add(&[(STATS_BUF, 20, W)]);
    d.vqs[2].notify();
    wait_until("the bad buffer", || counter(&b, "invalid_buffers") == 1);
    assert_eq!(stat(&handle, STAT_FREE_MEMORY), Some(2000));
    b.request_stats();
    d.vqs[2].wait_used(3);
}

#[test]
fn without_an_interval_stats_are_only_read_once() {
    let mem = memory();
    let (mut b, _) = balloon(&config());
    let handle = b.handle();
    let mut d = Driver::new(&mem, &b);
    d.activate(&mut b, &mem, ALL);
    assert_eq!(handle.report().guest.map(|g| g.unix_ms), None);
    let len = write_stats(&mem, &[(4, 1)]);
    let head = d.vqs[2].add(&[(STATS_BUF, len, R)]);
    d.vqs[2].notify();
    wait_until("stats", || stat(&handle, STAT_FREE_MEMORY) == Some(1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.vqs[2].used_idx(), 0);
    // A second buffer makes the device give the first one back.
    let second = d.vqs[2].add(&[(STATS_BUF, len, R)]);
    d.vqs[2].notify();
    assert_eq!(d.vqs[2].wait_used(1).0, u32::from(head));
    assert_eq!(b.held_stats_buffer(), Some(second));
}

#[test]
fn free_page_reporting_discards_the_ranges() {
    let mem = memory();
    let (mut b, backend) = balloon(&config());
    let mut d = Driver::new(&mem, &b);
    d.activate(&mut b, &mem, ALL);
    // Linux reports free blocks as device-writable buffers.
    d.vqs[3].submit(&[
        (0x40_0000, 0x20_0000, W),
        // Crosses the end of the low region into the hole: ignored.
        (0x3f0_0000, 0x20_0000, W),
        // Unaligned edges: only the whole pages inside are discarded.
        (0x800_0800, 0x3800, W),
        // Less than a page.
        (0x900_0100, 0x100, W),
    ]);
    assert_eq!(
        backend.take(),
        vec![(0x40_0000, 0x20_0000), (0x800_1000, 0x3000)]
    );
    assert_eq!(counter(&b, "reported_pages"), 512 + 3);
    assert_eq!(counter(&b, "invalid_pfns"), 1);
    // Reported pages are free guest pages, not ballooned ones.
    assert_eq!(b.handle().inflated_pages(), 0);
}

#[test]
fn reporting_moves_down_when_stats_are_not_negotiated() {
    let mem = memory();
    let (mut b, backend) = balloon(&config());
    let handle = b.handle();
    let mut d = Driver::new(&mem, &b);
    let acked = ALL & !(1 << F_STATS_VQ) & !(1 << F_MUST_TELL_HOST);
    d.activate(&mut b, &mem, acked);
    assert!(!handle.must_tell_host());
    d.vqs[2].submit(&[(0x40_0000, 0x1000, W)]);
    assert_eq!(backend.take(), vec![(0x40_0000, 0x1000)]);
    assert_eq!(counter(&b, "reported_pages"), 1);
    assert_eq!(handle.report().guest.map(|g| g.unix_ms), None);

    // Without the optional queues the device still runs inflate/deflate.
    let (mut b, _) = balloon(&config());
    let d = Driver::new(&mem, &b);
    let irq = Arc::new(TestInterrupt::default());
    b.activate(d.context(&mem, &irq, 1 << F_VERSION_1, 2))
        .unwrap();
    assert!(b.is_running());
    // But not without the deflate queue.
    let (mut b, _) = balloon(&config());
    let d = Driver::new(&mem, &b);
    assert!(b.activate(d.context(&mem, &irq, ALL, 1)).is_err());
}

#[test]
fn snapshot_restore_and_reset() {
    let mem = memory();
    let (mut source, _) = balloon(&config());
    let mut d = Driver::new(&mem, &source);
    let irq = d.activate(&mut source, &mem, ALL);
    let handle = source.handle();
    handle.set_target_bytes(4 << 20).unwrap();
    source.write_config(4, &3u32.to_le_bytes());
    d.vqs[0].pfns(BUF, &[0x300, 0x301, 0x8000, 0x302]);
    let len = write_stats(&mem, &[(4, 777)]);
    let stats_head = d.vqs[2].add(&[(STATS_BUF, len, R)]);
    d.vqs[2].notify();
    wait_until("stats", || stat(&handle, STAT_FREE_MEMORY) == Some(777));

    // Paused: a kicked inflate buffer stays in the queue.
    source.pause();
    assert!(!source.is_running());
    write_pfns(&mem, BUF2, &[0x400]);
    d.vqs[0].add(&[(BUF2, 4, R)]);
    d.vqs[0].notify();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.vqs[0].used_idx(), 1);
    assert_eq!(handle.inflated_pages(), 4);

    let states = source.queue_states();
    assert_eq!(states.len(), 4);
    assert_eq!(states[0].next_avail, 1);
    let snapshot = source.state();
    let DeviceState::Balloon(state) = snapshot.clone() else {
        panic!("not a balloon state")
    };
    assert_eq!(state.num_pages, 4 << 8);
    assert_eq!(state.actual, 3);
    assert_eq!(state.ram, RAM.to_vec());
    assert_eq!(state.ballooned, vec![(0x300, 3), (0x8000, 1)]);
    assert_eq!(state.stats.as_ref().unwrap().values[&4], 777);
    assert_eq!(state.stats_head, Some(stats_head));
    assert_eq!(states[2].next_avail, 1);

    // The target: a fresh device, the transport's queues at the source's
    // positions, new eventfds.
    let (mut target, target_backend) = balloon(&config());
    let target_handle = target.handle();
    let irq2 = Arc::new(TestInterrupt::default());
    let kicks: Vec<EventFd> = (0..4)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let context = ActivateContext {
        memory: mem.clone(),
        queues: states
            .iter()
            .zip(&kicks)
            .map(|(s, k)| (Queue::try_from(*s).unwrap(), k.try_clone().unwrap()))
            .collect(),
        interrupt: irq2.clone(),
        acked_features: ALL,
    };
    target.restore(snapshot.clone(), Some(context)).unwrap();
    assert!(target.is_running());
    drop(source);
    // The buffer made available while the source was pausing is served.
    d.vqs[0].wait_used(2);
    assert_eq!(target_backend.take(), vec![(0x40_0000, 0x1000)]);
    assert_eq!(target_handle.inflated_pages(), 5);
    assert_eq!(target_handle.target_bytes(), 4 << 20);
    assert_eq!(target_handle.actual_bytes(), 3 * PAGE_SIZE);
    assert!(target_handle.must_tell_host());
    let stats = target_handle.report();
    assert_eq!(
        stats.guest.as_ref().and_then(|g| g.get(STAT_FREE_MEMORY)),
        Some(777)
    );
    assert_eq!(
        stats.guest.map(|g| g.unix_ms),
        handle.report().guest.map(|g| g.unix_ms)
    );
    // The target holds the source's stats buffer and returns it on request.
    assert_eq!(target.held_stats_buffer(), Some(stats_head));
    target.request_stats();
    assert_eq!(d.vqs[2].wait_used(1).0, u32::from(stats_head));
    // New buffers arrive on the target's eventfds; config changes reach the
    // target's interrupt.
    d.vqs[1].add(&[(BUF, 4, R)]);
    write_pfns(&mem, BUF, &[0x300]);
    kicks[1].write(1).unwrap();
    d.vqs[1].wait_used(1);
    assert_eq!(target_handle.inflated_pages(), 4);
    target_handle.set_target_bytes(0).unwrap();
    assert_eq!(irq2.config.load(Ordering::SeqCst), 1);
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);

    // A driver reset empties the balloon and forgets actual.
    let generation = target_handle.removal_generation();
    let states = target.reset().unwrap();
    assert_ne!(target_handle.removal_generation(), generation);
    assert_eq!(states.len(), 4);
    assert!(!target.is_activated());
    assert_eq!(target_handle.inflated_pages(), 0);
    assert_eq!(target_handle.actual_bytes(), 0);
    assert!(!target_handle.must_tell_host());
    assert!(target.reset().is_none());
    // Config changes after a reset raise no interrupt.
    target_handle.set_target_bytes(1 << 20).unwrap();
    assert_eq!(irq2.config.load(Ordering::SeqCst), 1);
}

#[test]
fn an_inactive_device_restores_without_queues() {
    let (mut source, _) = balloon(&config());
    source.handle().set_target_bytes(2 << 20).unwrap();
    let snapshot = source.state();
    assert!(source.queue_states().is_empty());
    let (mut target, _) = balloon(&config());
    target.restore(snapshot, None).unwrap();
    assert_eq!(target.handle().target_bytes(), 2 << 20);
    assert!(!target.is_activated());
}

#[test]
fn restore_checks_the_state() {
    let mem = memory();
    let (mut source, _) = balloon(&config());
    let d = Driver::new(&mem, &source);
    d.activate(&mut source, &mem, ALL);
    source.pause();
    let DeviceState::Balloon(good) = source.state() else {
        panic!("not a balloon state")
    };
    let restore = |target: &mut Balloon, state: &BalloonState| {
        target
            .restore(DeviceState::Balloon(state.clone()), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };

    // Another RAM layout.
    let backend = Arc::new(TestBackend::default());
    let mut other = Balloon::new(&config(), &[LOW], backend).unwrap();
    assert!(restore(&mut other, &good).contains("guest RAM"));
    // Pages outside RAM, a target larger than RAM, a stats buffer outside the queue.
    let (mut target, _) = balloon(&config());
    let mut state = good.clone();
    state.ballooned = vec![(0x3fff, 2)];
    assert!(restore(&mut target, &state).contains("0x4000"));
    let mut state = good.clone();
    state.num_pages = 0x6001;
    assert!(restore(&mut target, &state).contains("more than guest RAM"));
    let mut state = good.clone();
    state.stats_head = Some(QUEUE_SIZE);
    assert!(restore(&mut target, &state).contains("stats buffer"));
    // The good one works.
    assert_eq!(restore(&mut target, &good), "");
}

#[test]
fn page_map_runs_and_ranges() {
    let mut map = PageMap::new(&RAM);
    assert_eq!(map.ram_pages(), 0x6000);
    assert_eq!(map.locate(0), Some((0, 0)));
    assert_eq!(map.locate(0x3fff), Some((0, 0x3fff)));
    assert_eq!(map.locate(0x4000), None);
    assert_eq!(map.locate(0x8005), Some((1, 5)));
    assert_eq!(map.locate(0xa000), None);
    assert_eq!(map.locate(u64::MAX), None);
    map.set_runs(&[(0x3f, 3), (0x3fff, 1), (0x8000, 2)])
        .unwrap();
    assert_eq!(map.count(), 6);
    assert_eq!(map.runs(), vec![(0x3f, 3), (0x3fff, 1), (0x8000, 2)]);
    assert!(map.is_set(0x40) && !map.is_set(0x42));
    assert!(map.clear(0, 0x40));
    assert!(!map.clear(0, 0x40));
    assert_eq!(
        map.runs(),
        vec![(0x3f, 1), (0x41, 1), (0x3fff, 1), (0x8000, 2)]
    );
    assert!(map.set_runs(&[(0x9fff, 2)]).is_err());
    map.clear_all();
    assert_eq!((map.count(), map.runs()), (0, vec![]));

    assert_eq!(map.ram_ranges(0x1000, 0x2000), Some(vec![(0x1000, 0x2000)]));
    assert_eq!(map.ram_ranges(0x3fff000, 0x2000), None);
    assert_eq!(map.ram_ranges(u64::MAX - 5, 10), None);
    // Adjacent regions are crossed.
    let map = PageMap::new(&[(0, 0x2000), (0x2000, 0x2000)]);
    assert_eq!(
        map.ram_ranges(0x1000, 0x2000),
        Some(vec![(0x1000, 0x1000), (0x2000, 0x1000)])
    );
}

/// The guest's last value of statistics tag `tag`.
fn stat(handle: &BalloonHandle, tag: u16) -> Option<u64> {
    handle.report().guest.and_then(|g| g.get(tag))
}
