//! The virtio-blk device model: features, config space, lifecycle
//! (activate, pause, resume, reset), and the worker that serves the queue,
//! synchronously or through io_uring ([`IoEngine`]).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use config::DiskConfig;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{DiskFile, SECTOR_SIZE};
use super::request::{
    self, Executor, Limits, Parsed, Request, RequestType, Scratch, ID_BYTES, STATUS_OK,
};
use super::uring::{Finished, Prepared, UringEngine};
use super::{BlockError, QUEUE_SIZE};
use crate::error::{DeviceError, StateError};
use crate::rate_limiter::RateLimiter;
use crate::virtio::worker::{DeviceWorker, EventLoop, WorkerHandler};
use crate::virtio::{
    avail_index_is_bogus, complete, counter_map, read_config_space, ActivateContext, ActivateError,
    DeviceState, VirtioDevice, VirtioInterrupt, COMMON_FEATURES, F_EVENT_IDX, TYPE_BLOCK,
};
use crate::GuestMemoryMmap;

/// Data segments per request (seg_max): a queue's worth minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest discard / write-zeroes, in sectors (a bit under 2 GiB: any
/// larger request is split by the guest).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (1 << 22) - 1;
/// Size of `struct virtio_blk_config` (virtio 1.2, 5.2.4).
pub const CONFIG_SPACE_SIZE: usize = 96;

/// Worker tokens.
const QUEUE_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const RING_TOKEN: u64 = 2;
/// Requests served per wakeup before going back to epoll.
const REQUESTS_PER_WAKEUP: u32 = QUEUE_SIZE as u32;
/// Host I/O errors logged per device before going quiet.
const MAX_LOGGED_ERRORS: u64 = 16;

/// How requests are executed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring for O_DIRECT disks, synchronous for cached ones (see the
    /// measurements in the module docs of [`super`]).
    #[default]
    Auto,
    /// One preadv/pwritev at a time on the worker thread.
    Sync,
    /// Up to [`super::uring::MAX_IN_FLIGHT`] requests in flight through
    /// io_uring, completed out of order; falls back to `Sync` when the
    /// kernel has no usable io_uring.
    Uring,
}

impl IoEngine {
    /// The engine to try for a disk opened with or without O_DIRECT.
    fn wanted(self, direct: bool) -> IoEngine {
        match self {
            IoEngine::Auto if direct => IoEngine::Uring,
            IoEngine::Auto => IoEngine::Sync,
            other => other,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests run the device with each engine: the engine new devices get
    /// on this thread.
    pub(crate) static TEST_ENGINE: std::cell::Cell<IoEngine> =
        const { std::cell::Cell::new(IoEngine::Auto) };
}

fn default_engine() -> IoEngine {
    #[cfg(test)]
    return TEST_ENGINE.get();
    #[cfg(not(test))]
    IoEngine::Auto
}

/// Request counters, readable while the worker runs.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub write_zeroes_ops: AtomicU64,
    /// Requests answered with a non-OK status (or no status at all).
    pub errors: AtomicU64,
    /// Times a request had to wait for the rate limiter.
    pub throttled: AtomicU64,
}

impl BlockCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn to_map(&self) -> BTreeMap<String, u64> {
        counter_map([
            ("read_ops", &self.read_ops),
            ("write_ops", &self.write_ops),
            ("read_bytes", &self.read_bytes),
            ("write_bytes", &self.write_bytes),
            ("flush_ops", &self.flush_ops),
            ("discard_ops", &self.discard_ops),
            ("write_zeroes_ops", &self.write_zeroes_ops),
            ("errors", &self.errors),
            ("throttled", &self.throttled),
        ])
    }
}

/// The part of the device that runs on the worker thread.
pub(crate) struct BlockHandler {
    pub(crate) queue: Queue,
    queue_evt: EventFd,
    memory: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    disk: Arc<DiskFile>,
    limiter: Option<RateLimiter>,
    counters: Arc<BlockCounters>,
    serial: [u8; ID_BYTES],
    limits: Limits,
    scratch: Scratch,
    executor: Executor,
    /// The io_uring engine; None: synchronous.
    uring: Option<UringEngine>,
    /// Requests reaped from the ring, reused.
    finished: Vec<Finished>,
    /// Requests the worker left in flight that were completed after it
    /// stopped (by [`BlockHandler::drain`]).
    drained: u64,
    logged_errors: u64,
}

impl BlockHandler {
    /// Serves every available request, stopping early only when the rate
    /// limiter says wait (the request stays in the queue) or the ring is
    /// full (completions call this again); then submits what it queued.
    pub(crate) fn process_queue(&mut self) {
        self.pop_requests();
        self.submit();
    }

    fn pop_requests(&mut self) {
        let memory = self.memory.clone();
        let mem: &GuestMemoryMmap = &memory;
        let mut budget = REQUESTS_PER_WAKEUP;
        loop {
            // Without EVENT_IDX this asks the driver not to kick while we work.
            let _ = self.queue.disable_notification(mem);
            let mut popped = false;
            loop {
                if self.uring.as_ref().is_some_and(|u| !u.has_room()) {
                    // Completions free slots and come back here; the
                    // driver need not kick meanwhile.
                    return;
                }
                let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                if budget == 0 {
                    // A driver that keeps the queue full must not keep the
                    // worker from seeing a stop request (pause must return):
                    // put the request back, kick ourselves, go back to epoll.
                    self.queue.go_to_previous_position();
                    let _ = self.queue_evt.write(1);
                    return;
                }
                budget -= 1;
                let head = chain.head_index();
                let parsed = request::parse(chain, mem, &self.limits, &mut self.scratch);
                if let Some(limiter) = &mut self.limiter {
                    let cost = match &parsed {
                        Parsed::Valid(r) => r.cost(),
                        Parsed::Invalid { .. } => 0,
                    };
                    if !limiter.consume(cost) {
                        // Leave the request in the queue; the timer wakes us.
                        self.queue.go_to_previous_position();
                        BlockCounters::add(&self.counters.throttled, 1);
                        return;
                    }
                }
                self.dispatch(mem, head, parsed);
            }
            match self.queue.enable_notification(mem) {
                // More available but nothing could be popped: the avail
                // index is bogus (more than a queue ahead) or unreadable.
                // Stop rather than spin; the driver is broken until reset.
                Ok(true) if !popped && avail_index_is_bogus(&self.queue, mem) => {
                    self.log(format_args!("invalid available ring index; queue stalled"));
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.log(format_args!("queue error: {e}"));
                    break;
                }
            }
        }
    }

    /// Serves a popped request: completes it now, or queues it on the ring.
    fn dispatch(&mut self, mem: &GuestMemoryMmap, head: u16, parsed: Parsed) {
        let request = match parsed {
            Parsed::Valid(r) => r,
            Parsed::Invalid { status, code, .. } => {
                BlockCounters::add(&self.counters.errors, 1);
                let used_len = match status {
                    Some(addr) if request::write_status(mem, addr, code) => 1,
                    // Nowhere to write a status: give the buffers back empty.
                    _ => 0,
                };
                self.complete_one(mem, head, used_len);
                return;
            }
        };
        if let Some(uring) = &mut self.uring {
            let wait = match request.kind {
                RequestType::In | RequestType::Out => {
                    match uring.prepare(&self.disk, mem, head, &request, &self.scratch.data) {
                        Prepared::Queued => return,
                        Prepared::Sync { wait } => wait,
                    }
                }
                // A FLUSH covers every write completed before it: wait
                // for those in flight. Discard and write-zeroes too, so
                // they are ordered with the writes around them as with
                // the synchronous engine.
                RequestType::Flush | RequestType::Discard | RequestType::WriteZeroes => true,
                RequestType::GetId => false,
            };
            if wait {
                self.wait_in_flight(mem);
            }
        }
        let outcome =
            self.executor
                .execute(&self.disk, mem, &request, &self.scratch.data, &self.serial);
        let used_len = self.finish(mem, &request, outcome);
        self.complete_one(mem, head, used_len);
    }

    /// Accounts for an executed request and writes its status; returns the
    /// used length.
    fn finish(
        &mut self,
        mem: &GuestMemoryMmap,
        request: &Request,
        (status, used_len, error): (u8, u32, Option<io::Error>),
    ) -> u32 {
        if let Some(e) = error {
            self.log(format_args!(
                "{:?} of {} bytes at {} failed: {e}",
                request.kind, request.len, request.offset
            ));
        }
        let c = &self.counters;
        if status == STATUS_OK {
            match request.kind {
                RequestType::In => {
                    BlockCounters::add(&c.read_ops, 1);
                    BlockCounters::add(&c.read_bytes, request.len);
                }
                RequestType::Out => {
                    BlockCounters::add(&c.write_ops, 1);
                    BlockCounters::add(&c.write_bytes, request.len);
                }
                RequestType::Flush => BlockCounters::add(&c.flush_ops, 1),
                RequestType::Discard => BlockCounters::add(&c.discard_ops, 1),
                RequestType::WriteZeroes => BlockCounters::add(&c.write_zeroes_ops, 1),
                RequestType::GetId => {}
            }
        } else {
            BlockCounters::add(&c.errors, 1);
        }
        if !request::write_status(mem, request.status, status) {
            return 0;
        }
        used_len
    }

    /// Puts `head` in the used ring and interrupts the driver if it wants.
    fn complete_one(&mut self, mem: &GuestMemoryMmap, head: u16, used_len: u32) {
        if let Err(e) = complete(&mut self.queue, mem, &*self.interrupt, 0, head, used_len) {
            self.log(format_args!("cannot complete request {head}: {e}"));
        }
    }

    /// Hands the requests queued on the ring to the kernel.
    fn submit(&mut self) {
        if let Some(uring) = &mut self.uring {
            if let Err(e) = uring.submit() {
                self.log(format_args!("io_uring submission failed: {e}"));
            }
        }
    }

    /// Completes the requests the ring finished, with one interrupt for
    /// the lot.
    fn reap(&mut self, mem: &GuestMemoryMmap) {
        let Some(uring) = &mut self.uring else {
            return;
        };
        let mut finished = std::mem::take(&mut self.finished);
        uring.reap(&self.disk, mem, &mut self.executor, &mut finished);
        let n = finished.len();
        for (i, f) in finished.drain(..).enumerate() {
            let used_len = self.finish(mem, &f.request, request::outcome(f.result));
            if i + 1 == n {
                self.complete_one(mem, f.head, used_len);
            } else if let Err(e) = self.queue.add_used(mem, f.head, used_len) {
                self.log(format_args!("cannot complete request {}: {e}", f.head));
            }
        }
        self.finished = finished;
    }

    /// Waits for (and completes) every request in flight on the ring.
    fn wait_in_flight(&mut self, mem: &GuestMemoryMmap) {
        while let Some(uring) = &mut self.uring {
            if uring.in_flight() == 0 {
                break;
            }
            if let Err(e) = uring.wait() {
                self.log(format_args!("io_uring wait failed: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.reap(mem);
        }
    }

    /// Completes every request still in flight, once the worker thread has
    /// stopped (pause, reset, snapshot, drop): after this the kernel
    /// writes no guest memory for this device and every request taken from
    /// the queue is in the used ring.
    pub(crate) fn drain(&mut self) {
        let before = self.uring.as_ref().map_or(0, |u| u.in_flight());
        if before == 0 {
            return;
        }
        let memory = self.memory.clone();
        self.wait_in_flight(&memory);
        self.drained += before as u64;
    }

    fn log(&mut self, message: std::fmt::Arguments) {
        if self.logged_errors < MAX_LOGGED_ERRORS {
            self.logged_errors += 1;
            log::warn!("disk {}: {message}", self.disk.path().display());
        }
    }
}

impl WorkerHandler for BlockHandler {
    const THREAD_KIND: confine::ThreadKind = confine::ThreadKind::Blk;

    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.add(self.queue_evt.as_raw_fd(), QUEUE_TOKEN, EventSet::IN)?;
        if let Some(uring) = &self.uring {
            events.add(uring.eventfd().as_raw_fd(), RING_TOKEN, EventSet::IN)?;
        }
        if let Some(limiter) = &self.limiter {
            events.add(limiter.timer_fd(), TIMER_TOKEN, EventSet::IN)?;
        }
        // Requests made available while no worker ran (a restore, a
        // resume, a kick lost during pause) are served now.
        if !self.limiter.as_ref().is_some_and(|l| l.is_blocked()) {
            self.process_queue();
        }
        Ok(())
    }

    fn handle(&mut self, token: u64, _set: EventSet, _events: &EventLoop) {
        match token {
            QUEUE_TOKEN => {
                // Only clears the counter; failure means nothing was pending.
                let _ = self.queue_evt.read();
                if self.limiter.as_ref().is_some_and(|l| l.is_blocked()) {
                    return;
                }
                self.process_queue();
            }
            TIMER_TOKEN => {
                if let Some(limiter) = &mut self.limiter {
                    limiter.on_timer();
                }
                self.process_queue();
            }
            RING_TOKEN => {
                if let Some(uring) = &self.uring {
                    uring.clear_event();
                }
                let memory = self.memory.clone();
                self.reap(&memory);
                // Slots were freed: serve what waited for one.
                if !self.limiter.as_ref().is_some_and(|l| l.is_blocked()) {
                    self.process_queue();
                }
            }
            _ => {}
        }
    }
}

impl Drop for BlockHandler {
    fn drop(&mut self) {
        // Nothing may stay in flight once the guest memory and the buffers
        // can go away.
        self.drain();
    }
}

/// A virtio-blk device.
pub struct Block {
    pub(crate) config: DiskConfig,
    pub(crate) disk: Arc<DiskFile>,
    locked: bool,
    pub(crate) avail_features: u64,
    pub(crate) acked_features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    serial: [u8; ID_BYTES],
    counters: Arc<BlockCounters>,
    /// The engine asked for, and the one the worker uses (None: inactive).
    engine: IoEngine,
    engine_in_use: Option<IoEngine>,
    worker: DeviceWorker<BlockHandler>,
}

impl Block {
    /// Opens the disk `config` names and locks it (exclusive when
    /// read-write, shared when read-only).
    pub fn new(config: &DiskConfig) -> Result<Block, BlockError> {
        Self::open(config, true)
    }

    /// Opens the disk without locking it: for the target of a live
    /// migration, whose source holds the lock until switch-over. Call
    /// [`Block::acquire_lock`] once the source released it.
    pub fn new_unlocked(config: &DiskConfig) -> Result<Block, BlockError> {
        Self::open(config, false)
    }

    fn open(config: &DiskConfig, take_lock: bool) -> Result<Block, BlockError> {
        if let Some(serial) = &config.serial {
            if serial.len() > ID_BYTES {
                return Err(BlockError::Invalid {
                    path: config.path.clone(),
                    reason: format!("serial {serial:?} is longer than {ID_BYTES} bytes"),
                });
            }
        }
        let disk = Arc::new(DiskFile::open(config, take_lock)?);
        let mut avail_features = COMMON_FEATURES
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if disk.readonly() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if disk.can_discard() {
                avail_features |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            avail_features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut serial = [0u8; ID_BYTES];
        let id = config
            .serial
            .as_deref()
            .or(config.id.as_deref())
            .unwrap_or("");
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        let worker = DeviceWorker::new(
            worker_name(config),
            format!("disk {}", disk.path().display()),
        );
        Ok(Block {
            config: config.clone(),
            config_space: build_config_space(&disk),
            disk,
            locked: take_lock,
            avail_features,
            acked_features: 0,
            serial,
            counters: Arc::new(BlockCounters::default()),
            engine: default_engine(),
            engine_in_use: None,
            worker,
        })
    }

    /// The disk's configuration.
    pub fn config(&self) -> &DiskConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// Whether this device holds its disk lock.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Releases the disk lock (the migration source, at switch-over, after
    /// [`Block::flush`]). The disk stays open; I/O still works.
    pub fn release_lock(&mut self) -> Result<(), BlockError> {
        if self.locked {
            self.disk.unlock()?;
            self.locked = false;
        }
        Ok(())
    }

    /// Takes the disk lock (the migration target, at switch-over; or the
    /// source again when a migration fails after it released it).
    pub fn acquire_lock(&mut self) -> Result<(), BlockError> {
        if !self.locked {
            self.disk.lock()?;
            self.locked = true;
        }
        Ok(())
    }

    /// Writes everything the guest wrote to stable storage (fdatasync).
    pub fn flush(&self) -> Result<(), BlockError> {
        self.disk.flush().map_err(|source| BlockError::Io {
            path: self.disk.path().to_path_buf(),
            what: "cannot flush".to_string(),
            source,
        })
    }

    /// Chooses the I/O engine; it takes effect at the next activation.
    pub fn set_io_engine(&mut self, engine: IoEngine) {
        self.engine = engine;
    }

    /// The engine the worker uses (`Sync` or `Uring`), None while the
    /// device is not active.
    pub fn io_engine(&self) -> Option<IoEngine> {
        self.engine_in_use.filter(|_| self.is_activated())
    }

    /// Whether the worker is running.
    pub fn is_running(&self) -> bool {
        self.worker.is_running()
    }

    /// Whether the device was activated (running or paused).
    pub fn is_activated(&self) -> bool {
        self.worker.is_active()
    }

    fn limiter(&self) -> io::Result<Option<RateLimiter>> {
        match &self.config.rate_limit {
            Some(rl) if !rl.is_unlimited() => {
                Ok(Some(RateLimiter::new(rl.bytes_per_sec, rl.ops_per_sec)?))
            }
            _ => Ok(None),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            size: self.disk.size(),
            readonly: self.disk.readonly(),
            max_descriptors: SEG_MAX as usize + 2,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
        }
    }

    /// Starts the worker on `queue` (shared by `activate` and restore).
    pub(crate) fn start(
        &mut self,
        memory: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queue: Queue,
        queue_evt: EventFd,
    ) -> Result<(), ActivateError> {
        if !queue.ready() {
            return Err(ActivateError::MissingQueue(0));
        }
        if !queue.is_valid(&*memory) {
            return Err(ActivateError::Other(format!(
                "disk {}: the request queue does not fit in guest memory",
                self.disk.path().display()
            )));
        }
        queue.set_event_idx(self.acked_features & (1 << F_EVENT_IDX) != 0);
        // Stop a previous worker, if the transport activates twice
        // (dropping its handler completes what it had in flight).
        self.worker.stop();
        let limiter = self.limiter().map_err(ActivateError::Worker)?;
        let uring = match self.engine.wanted(self.disk.direct()) {
            IoEngine::Uring => match UringEngine::new(&self.disk) {
                Ok(uring) => Some(uring),
                Err(e) => {
                    log::warn!(
                        "disk {}: io_uring is not available ({e}); using synchronous I/O",
                        self.disk.path().display()
                    );
                    None
                }
            },
            _ => None,
        };
        self.engine_in_use = Some(if uring.is_some() {
            IoEngine::Uring
        } else {
            IoEngine::Sync
        });
        let handler = BlockHandler {
            queue,
            queue_evt,
            memory,
            interrupt,
            disk: self.disk.clone(),
            limiter,
            counters: self.counters.clone(),
            serial: self.serial,
            limits: self.limits(),
            scratch: Scratch::default(),
            executor: Executor::new(),
            uring,
            finished: Vec::new(),
            drained: 0,
            logged_errors: 0,
        };
        self.worker.start(handler).map_err(ActivateError::Worker)
    }

    /// Requests the worker had in flight when it was stopped, completed
    /// since by the device (for tests).
    #[cfg(test)]
    pub(crate) fn drained_requests(&mut self) -> u64 {
        self.worker.with_handler(|h| h.drained).unwrap_or(0)
    }
}

/// The worker thread's name.
fn worker_name(config: &DiskConfig) -> String {
    let id = config.id.as_deref().unwrap_or("disk");
    // Thread names are at most 15 bytes.
    format!("blk-{}", id.chars().take(11).collect::<String>())
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), little-endian.
fn build_config_space(disk: &DiskFile) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    let logical = disk.logical_block_size();
    let physical = disk.physical_block_size();
    let physical_block_exp = (physical / logical).trailing_zeros() as u8;
    c[0..8].copy_from_slice(&disk.capacity_sectors().to_le_bytes());
    // size_max (8..12): VIRTIO_BLK_F_SIZE_MAX is not offered; segments may
    // be as large as the guest likes.
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    // geometry (16..20): not offered.
    c[20..24].copy_from_slice(&logical.to_le_bytes());
    // topology: physical_block_exp, alignment_offset, min_io_size (in
    // logical blocks), opt_io_size.
    c[24] = physical_block_exp;
    c[25] = 0;
    c[26..28].copy_from_slice(&(1u16 << physical_block_exp).to_le_bytes());
    c[28..32].copy_from_slice(&0u32.to_le_bytes());
    // writeback (32): VIRTIO_BLK_F_CONFIG_WCE is not offered; with FLUSH the
    // driver assumes a write-back cache.
    // num_queues (34..36): VIRTIO_BLK_F_MQ is not offered.
    c[34..36].copy_from_slice(&1u16.to_le_bytes());
    if !disk.readonly() {
        let alignment = (physical as u64 / SECTOR_SIZE) as u32;
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&alignment.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
    }
    // Secure erase (60..72) and zoned (72..96): not offered.
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only (`writeback` needs CONFIG_WCE, not offered).
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        self.acked_features = context.acked_features & self.avail_features;
        let Some((queue, queue_evt)) = context.queues.into_iter().next() else {
            return Err(ActivateError::MissingQueue(0));
        };
        self.start(context.memory, context.interrupt, queue, queue_evt)
    }

    fn reset(&mut self) -> Option<Vec<QueueState>> {
        let states = self.worker.stop().map(|mut h| {
            h.drain();
            vec![h.queue.state()]
        });
        self.acked_features = 0;
        states
    }

    fn pause(&mut self) {
        self.worker.pause();
        // The thread is gone; what it left in flight completes here, so
        // no guest memory is written after this returns and the queue
        // state accounts for every request taken from the ring.
        self.worker.with_handler(|h| h.drain());
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.counters.to_map()
    }

    fn state(&mut self) -> DeviceState {
        DeviceState::Block(self.block_state())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.worker
            .handler()
            .map(|h| vec![h.queue.state()])
            .unwrap_or_default()
    }

    fn restore(
        &mut self,
        state: DeviceState,
        context: Option<ActivateContext>,
    ) -> Result<(), StateError> {
        match state {
            DeviceState::Block(state) => self.restore_block(&state, context),
            other => Err(StateError::WrongKind {
                expected: "block",
                found: other.kind(),
            }),
        }
    }

    fn sync(&mut self) -> Result<(), DeviceError> {
        Ok(self.flush()?)
    }

    fn migration_release(&mut self) -> Result<(), DeviceError> {
        self.flush()?;
        Ok(self.release_lock()?)
    }

    fn migration_acquire(&mut self) -> Result<(), DeviceError> {
        if self.is_locked() {
            return Ok(());
        }
        Ok(self.acquire_lock()?)
    }
}
