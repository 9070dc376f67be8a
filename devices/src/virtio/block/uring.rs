//! The io_uring engine: reads and writes of one queue go to the kernel
//! together (up to [`MAX_IN_FLIGHT`]) and complete in any order.
//!
//! Each request in flight owns a slot: its descriptor head, the parsed
//! request, its guest segments, the iovecs the kernel reads (pointing into
//! guest memory, or into the slot's aligned bounce buffer when O_DIRECT
//! cannot use the guest's buffers as they are), and the user_data of its
//! submission is the slot's index. The ring signals an eventfd that the
//! worker watches; [`UringEngine::reap`] turns completions into
//! [`Finished`] requests, which the device completes (status byte, used
//! ring, interrupt).
//!
//! What the engine does not submit, the caller runs with the synchronous
//! [`Executor`]: FLUSH, DISCARD, WRITE_ZEROES (after waiting for every
//! request in flight, so a FLUSH covers every earlier write), GET_ID,
//! O_DIRECT writes that need a read-modify-write of unaligned edges (also
//! after waiting), and bounced requests larger than [`BOUNCE_SIZE`].
//!
//! The worker thread exits at every pause (and reset, snapshot, drop) with
//! requests in flight; the device then waits for them from the thread that
//! paused it. The kernel fails the requests of an exited thread that still
//! needed it: queued work is cancelled (ECANCELED), and a buffered read
//! waiting for the page cache fails with EFAULT when it retries. Such
//! completions (and EINTR, EAGAIN) are re-executed synchronously, and a
//! short transfer is finished synchronously, so every request taken from
//! the queue ends with the result the synchronous engine would have given.
//!
//! # Safety of the buffers
//!
//! The iovecs and bounce buffers live in heap allocations owned by the
//! slots, which never move or get freed while their request is in flight;
//! guest memory stays mapped as long as the handler holds its
//! `Arc<GuestMemoryMmap>`, and the handler waits for every request in flight
//! before it lets go of the engine or the memory (pause, reset, snapshot,
//! drop). Dropping the engine itself also waits for the kernel.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring, Probe};
use vm_memory::bitmap::Bitmap;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{AlignedBuf, DiskFile, IOV_MAX};
use super::request::{
    copy_from_guest, copy_to_guest, guest_slices, iovecs, Executor, Request, RequestType, Segment,
    BOUNCE_SIZE,
};
use crate::GuestMemoryMmap;

/// Requests of one queue in flight at most (and the ring's size).
pub const MAX_IN_FLIGHT: usize = 64;

/// Transient `io_uring_enter` failures retried before giving up for now.
const SUBMIT_RETRIES: u32 = 100;

/// One request in flight.
struct Slot {
    head: u16,
    /// Some while the slot is in use.
    request: Option<Request>,
    segs: Vec<Segment>,
    iov: Vec<libc::iovec>,
    /// Kept from use to use; allocated on the first unaligned request.
    bounce: Option<AlignedBuf>,
    /// Whether `iov` is the bounce buffer rather than guest memory.
    bounced: bool,
    /// The transfer as submitted: the request's range, or its aligned
    /// span when bounced.
    io_offset: u64,
    io_len: u64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            head: 0,
            request: None,
            segs: Vec::new(),
            iov: Vec::new(),
            bounce: None,
            bounced: false,
            io_offset: 0,
            io_len: 0,
        }
    }
}

/// What [`UringEngine::prepare`] did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Queued for submission; it comes back from [`UringEngine::reap`].
    Queued,
    /// Run it synchronously, after waiting for the requests in flight if
    /// `wait` (a read-modify-write must not race other writes).
    Sync { wait: bool },
}

/// A request the kernel finished (and the engine post-processed).
pub struct Finished {
    pub head: u16,
    pub request: Request,
    /// The bytes written to guest buffers, or the error.
    pub result: io::Result<u64>,
}

/// The io_uring engine of one queue.
pub struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    fd: RawFd,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Completions read off the ring (user_data, result), reused.
    cqes: Vec<(u64, i32)>,
}

// SAFETY: the raw pointers in the slots' iovecs point into guest memory or
// into the slots' own bounce buffers; they are plain addresses handed to
// the kernel, dereferenced by no thread of ours, and the engine is used by
// one thread at a time (it moves with the worker's handler).
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// A ring for `disk`, if the kernel has io_uring with vectored reads
    /// and writes (5.6+ for the probe) and lets this process use it.
    pub fn new(disk: &DiskFile) -> io::Result<UringEngine> {
        // Completions run as task work on the submitting thread; cooperative
        // task running spares an IPI per completion while the worker runs
        // (it still wakes when it sleeps in epoll). Kernels before 5.19 do
        // without.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(MAX_IN_FLIGHT as u32)
            .or_else(|_| IoUring::new(MAX_IN_FLIGHT as u32))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Readv::CODE) || !probe.is_supported(opcode::Writev::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's io_uring has no READV/WRITEV",
            ));
        }
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            eventfd,
            fd: disk.as_raw_fd(),
            slots: (0..MAX_IN_FLIGHT).map(|_| Slot::new()).collect(),
            // Popped from the end: slot 0 first.
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            cqes: Vec::with_capacity(MAX_IN_FLIGHT),
        })
    }

    /// The eventfd the ring signals when a completion arrives.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Requests taken by the engine and not yet reaped.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free.len()
    }

    /// Whether another request can be queued.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues the read or write `request` (its data in `segs`) for
    /// submission, or says to run it synchronously.
    pub fn prepare(
        &mut self,
        disk: &DiskFile,
        mem: &GuestMemoryMmap,
        head: u16,
        request: &Request,
        segs: &[Segment],
    ) -> Prepared {
        let write = match request.kind {
            RequestType::In => false,
            RequestType::Out => true,
            _ => return Prepared::Sync { wait: true },
        };
        let Some(&index) = self.free.last() else {
            return Prepared::Sync { wait: true };
        };
        let (offset, len) = (request.offset, request.len);
        let Ok(slices) = guest_slices(mem, segs) else {
            // The synchronous path reports the error.
            return Prepared::Sync { wait: false };
        };
        // Plain mmap regions: the pointer stays valid after the guard goes,
        // for as long as the memory is mapped (see the module docs).
        let ptrs: Vec<(usize, usize)> = slices
            .iter()
            .map(|s| (s.ptr_guard_mut().as_ptr() as usize, s.len()))
            .collect();
        if ptrs.len() > IOV_MAX {
            return Prepared::Sync { wait: false };
        }
        let slot = &mut self.slots[index];
        if !disk.direct() || Executor::direct_ok(disk, &ptrs, offset, len) {
            slot.iov.clear();
            slot.iov.extend(iovecs(&ptrs));
            slot.bounced = false;
            slot.io_offset = offset;
            slot.io_len = len;
        } else {
            let align = disk.dio_offset_align();
            let start = offset & !(align - 1);
            let end = (offset + len).next_multiple_of(align);
            let span = end - start;
            if write && (start != offset || end != offset + len) {
                // Unaligned edges: read-modify-write, synchronously, with
                // nothing else in flight.
                return Prepared::Sync { wait: true };
            }
            if span > BOUNCE_SIZE as u64 {
                return Prepared::Sync { wait: false };
            }
            let span = span as usize;
            if slot.bounce.as_ref().is_none_or(|b| b.len() < span) {
                slot.bounce = Some(AlignedBuf::new(
                    span.next_power_of_two().max(4096),
                    (align as usize).max(disk.dio_mem_align()).max(4096),
                ));
            }
            let buf = slot.bounce.as_mut().expect("allocated above");
            if write && copy_from_guest(mem, segs, 0, &mut buf.as_mut_slice()[..span]).is_err() {
                return Prepared::Sync { wait: false };
            }
            slot.iov.clear();
            slot.iov.push(libc::iovec {
                iov_base: buf.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
                iov_len: span,
            });
            slot.bounced = true;
            slot.io_offset = start;
            slot.io_len = span as u64;
        }
        let fd = types::Fd(self.fd);
        let iov = slot.iov.as_ptr();
        let count = slot.iov.len() as u32;
        let entry = if write {
            opcode::Writev::new(fd, iov, count)
                .offset(slot.io_offset)
                .build()
        } else {
            opcode::Readv::new(fd, iov, count)
                .offset(slot.io_offset)
                .build()
        }
        .user_data(index as u64);
        // SAFETY: the iovecs and the buffers they describe (guest memory,
        // or the slot's bounce buffer) stay valid and unmoved until the
        // completion is reaped: the slot is not reused before, and the
        // engine and guest memory outlive every request (module docs).
        // The SQ has room: it holds at most MAX_IN_FLIGHT entries, and only
        // requests holding a slot are ever pushed.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return Prepared::Sync { wait: true };
        }
        slot.head = head;
        slot.request = Some(*request);
        slot.segs.clear();
        slot.segs.extend_from_slice(segs);
        self.free.pop();
        Prepared::Queued
    }

    /// Hands the queued requests to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        let mut retries = 0;
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
                        && retries < SUBMIT_RETRIES =>
                {
                    // Out of kernel resources for now: let something finish.
                    retries += 1;
                    let queued = self.ring.submission().len();
                    if queued < self.in_flight() {
                        let _ = self.ring.submitter().submit_and_wait(1);
                    } else {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion.
    pub fn wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Clears the eventfd (before reaping, so no completion goes unseen).
    pub fn clear_event(&self) {
        // Fails only when nothing was signalled.
        let _ = self.eventfd.read();
    }

    /// Appends to `out` the requests the kernel finished, post-processed:
    /// short transfers finished, cancelled requests re-executed, bounced
    /// reads copied to the guest, guest pages marked dirty.
    pub fn reap(
        &mut self,
        disk: &DiskFile,
        mem: &GuestMemoryMmap,
        executor: &mut Executor,
        out: &mut Vec<Finished>,
    ) {
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for i in 0..self.cqes.len() {
            let (user_data, res) = self.cqes[i];
            let index = user_data as usize;
            if let Some(finished) = self.finish(index, res, disk, mem, executor) {
                out.push(finished);
            }
        }
    }

    fn finish(
        &mut self,
        index: usize,
        res: i32,
        disk: &DiskFile,
        mem: &GuestMemoryMmap,
        executor: &mut Executor,
    ) -> Option<Finished> {
        let slot = self.slots.get_mut(index)?;
        let request = slot.request.take()?;
        self.free.push(index);
        let read = request.kind == RequestType::In;
        let redo = |executor: &mut Executor, segs: &[Segment]| {
            if read {
                executor.read(disk, mem, segs, request.offset, request.len)
            } else {
                executor.write(disk, mem, segs, request.offset, request.len)
            }
        };
        let mut redone = false;
        let result = if res < 0 {
            match -res {
                // The request did not run, or not to the end: cancelled
                // with the thread that submitted it (ECANCELED), or its
                // retry found that thread gone (EFAULT: the kernel cannot
                // copy into a dead task's memory; this is what happens to
                // buffered reads waiting for the page cache when the
                // worker thread exits at a pause), or refused for now.
                // Guest buffers were checked at parse time: run it here;
                // a real fault fails again.
                libc::ECANCELED | libc::EINTR | libc::EAGAIN | libc::EFAULT => {
                    redone = true;
                    redo(executor, &slot.segs)
                }
                // O_DIRECT refused the guest's buffers after all: the
                // synchronous path bounces them.
                libc::EINVAL if disk.direct() && !slot.bounced => {
                    redone = true;
                    redo(executor, &slot.segs)
                }
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        } else {
            let done = res as u64;
            if done < slot.io_len {
                finish_short(disk, &mut slot.iov, slot.io_offset, done, !read)
            } else {
                Ok(())
            }
        };
        if read && !redone {
            if slot.bounced {
                if result.is_ok() {
                    let buf = slot
                        .bounce
                        .as_ref()
                        .expect("bounced requests have a buffer");
                    let skip = (request.offset - slot.io_offset) as usize;
                    let data = &buf.as_slice()[skip..skip + request.len as usize];
                    if let Err(e) = copy_to_guest(mem, &slot.segs, 0, data) {
                        return Some(Finished {
                            head: slot.head,
                            request,
                            result: Err(e),
                        });
                    }
                }
            } else if let Ok(slices) = guest_slices(mem, &slot.segs) {
                // The kernel wrote guest memory behind vm-memory's back:
                // mark it dirty for migration (all of it, even on error),
                // as the synchronous path does.
                for s in &slices {
                    s.bitmap().mark_dirty(0, s.len());
                }
            }
        }
        let written = if read { request.len } else { 0 };
        Some(Finished {
            head: slot.head,
            request,
            result: result.map(|()| written),
        })
    }
}

/// Transfers, synchronously, what is left of `iov` after its first `done`
/// bytes (a short read or write).
fn finish_short(
    disk: &DiskFile,
    iov: &mut [libc::iovec],
    offset: u64,
    mut done: u64,
    write: bool,
) -> io::Result<()> {
    let file_offset = offset + done;
    let mut rest: &mut [libc::iovec] = iov;
    while let Some(first) = rest.first_mut() {
        let n = first.iov_len as u64;
        if done >= n {
            done -= n;
            rest = &mut rest[1..];
        } else {
            // SAFETY: `done < iov_len`: the new base stays in the buffer.
            first.iov_base = unsafe { (first.iov_base as *mut u8).add(done as usize) } as *mut _;
            first.iov_len -= done as usize;
            break;
        }
    }
    if write {
        disk.pwritev_all(rest, file_offset)
    } else {
        disk.preadv_all(rest, file_offset)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still use the slots' buffers: wait for it. (The
        // device completes its requests before it drops the engine; this
        // is for an engine dropped on its own.)
        let mut pending = self.in_flight();
        while pending > 0 {
            if self.wait().is_err() {
                // Cannot tell when the kernel is done: leak the buffers
                // rather than free memory it may still write.
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
            for c in self.ring.completion() {
                if let Some(slot) = self.slots.get_mut(c.user_data() as usize) {
                    if slot.request.take().is_some() {
                        pending -= 1;
                    }
                }
            }
        }
    }
}
