//! virtio-blk requests (virtio 1.2, 5.2.6): parsing an untrusted
//! descriptor chain into a [`Request`], and executing it against the disk.
//!
//! Parsing makes no assumption about framing (VIRTIO_F_VERSION_1 implies
//! ANY_LAYOUT): the 16-byte header is the first 16 device-readable bytes,
//! the status is the last device-writable byte, and the data is what lies
//! in between, in the direction the request type needs. Everything is
//! checked before any I/O: chain shape (loops, over-long chains, readable
//! after writable), lengths, sectors (with overflow), discard segments and
//! that every buffer lies in guest memory.
//!
//! Data moves with one preadv/pwritev per request straight between the disk
//! and guest memory. Those write guest memory through pointers obtained
//! from vm-memory's `VolatileSlice::ptr_guard_mut`, so the slices' dirty
//! bitmap is marked explicitly afterwards, exactly as vm-memory's own
//! `read_volatile` does. With O_DIRECT, requests whose buffers, offset or
//! length are not aligned as the backend needs are bounced through an
//! aligned buffer (read-modify-write at unaligned edges); every copy to or
//! from guest memory in that path goes through `Bytes::{read,write}_slice`.

use std::io;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{Bitmap, MS};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::disk::{AlignedBuf, DiskFile, SECTOR_SIZE};
use crate::GuestMemoryMmap;

pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// GET_ID answers 20 bytes.
pub const ID_BYTES: usize = 20;
/// The header: le32 type, le32 reserved, le64 sector.
const HEADER_SIZE: u64 = 16;
/// A discard/write-zeroes segment: le64 sector, le32 num_sectors, le32 flags.
const DWZ_SEGMENT_SIZE: u64 = 16;

/// The limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Disk size in bytes.
    pub size: u64,
    pub readonly: bool,
    /// Longest chain accepted (header, data segments, status).
    pub max_descriptors: usize,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A well-formed request; its data buffers are in the parser's scratch.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub kind: RequestType,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Data bytes (IN/OUT/GET_ID buffers) or bytes to discard/zero.
    pub len: u64,
    /// WRITE_ZEROES may unmap.
    pub unmap: bool,
    /// The status byte.
    pub status: GuestAddress,
}

impl Request {
    /// Bytes charged to the rate limiter.
    pub fn cost(&self) -> u64 {
        match self.kind {
            RequestType::In | RequestType::Out => self.len,
            _ => 0,
        }
    }
}

/// What parsing a chain gave.
#[derive(Clone, Copy, Debug)]
pub enum Parsed {
    Valid(Request),
    /// Answered without I/O: `code` goes to `status` when there is one.
    Invalid {
        status: Option<GuestAddress>,
        code: u8,
        why: &'static str,
    },
}

/// Buffers reused from request to request.
#[derive(Default)]
pub struct Scratch {
    descs: Vec<Descriptor>,
    /// The request's data buffers, in order.
    pub data: Vec<Segment>,
}

fn invalid(status: Option<GuestAddress>, code: u8, why: &'static str) -> Parsed {
    Parsed::Invalid { status, code, why }
}

/// Whether `[offset, offset + len)` fits in `size` bytes, without overflow.
fn in_range(offset: Option<u64>, len: u64, size: u64) -> bool {
    offset
        .and_then(|o| o.checked_add(len))
        .is_some_and(|end| end <= size)
}

impl From<&Descriptor> for Segment {
    fn from(d: &Descriptor) -> Segment {
        Segment {
            addr: d.addr(),
            len: d.len(),
        }
    }
}

/// Appends to `out` the parts of the buffers `bufs` (descriptors or
/// segments) left after skipping `skip` bytes and keeping at most `take`
/// bytes.
fn collect_segments<B: Into<Segment>>(
    bufs: impl IntoIterator<Item = B>,
    mut skip: u64,
    mut take: u64,
    out: &mut Vec<Segment>,
) {
    for b in bufs {
        let b: Segment = b.into();
        let len = u64::from(b.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        if n > 0 {
            // `skip < len <= u32::MAX` and `n <= len`: no overflow.
            out.push(Segment {
                addr: b.addr.unchecked_add(skip),
                len: n as u32,
            });
        }
        take -= n;
        skip = 0;
        if take == 0 {
            break;
        }
    }
}

/// Reads `buf.len()` bytes starting `skip` bytes into `descs`.
fn gather(mem: &GuestMemoryMmap, descs: &[Descriptor], skip: u64, buf: &mut [u8]) -> bool {
    let mut segs = Vec::with_capacity(2);
    collect_segments(descs, skip, buf.len() as u64, &mut segs);
    let mut done = 0;
    for s in segs {
        let n = s.len as usize;
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Why a request is answered without I/O: the status code and a reason.
type Refusal = (u8, &'static str);

/// What a request asks for, once checked.
struct Body {
    kind: RequestType,
    offset: u64,
    len: u64,
    unmap: bool,
}

/// A chain split in its device-readable and device-writable parts.
struct Buffers<'a> {
    readable: &'a [Descriptor],
    writable: &'a [Descriptor],
    /// Data bytes after the header (device-readable).
    data_out: u64,
    /// Data bytes before the status byte (device-writable).
    data_in: u64,
}

/// Parses the chain `chain` (popped from the queue). Never panics or
/// loops on guest input: the chain iterator yields at most a queue's (or
/// an indirect table's) worth of descriptors, and at most
/// `limits.max_descriptors` are looked at.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
    scratch: &mut Scratch,
) -> Parsed {
    scratch.descs.clear();
    scratch.data.clear();
    let (last, too_long) = collect_chain(chain, limits, &mut scratch.descs);
    // The status byte: the last byte of the last descriptor, which must be
    // device-writable. Without one there is nowhere to report an error.
    let status = last
        .as_ref()
        .filter(|d| d.is_write_only() && d.len() >= 1)
        .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
        .filter(|&a| mem.check_range(a, 1));
    let Some(status_addr) = status else {
        return invalid(None, STATUS_IOERR, "no device-writable status byte");
    };
    let body = if too_long {
        Err((STATUS_IOERR, "descriptor chain too long"))
    } else if last.is_some_and(|d| d.has_next()) {
        // The iterator stopped early: a loop, a `next` out of the table, an
        // unreadable descriptor, or more than 4 GiB in the chain.
        Err((STATUS_IOERR, "descriptor chain loops or is broken"))
    } else {
        parse_body(&scratch.descs, mem, limits, &mut scratch.data)
    };
    match body {
        Ok(body) => Parsed::Valid(Request {
            kind: body.kind,
            offset: body.offset,
            len: body.len,
            unmap: body.unmap,
            status: status_addr,
        }),
        Err((code, why)) => invalid(status, code, why),
    }
}

/// Walks the chain into `descs` (at most `limits.max_descriptors` of
/// them); returns the last descriptor and whether there were more.
fn collect_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    limits: &Limits,
    descs: &mut Vec<Descriptor>,
) -> (Option<Descriptor>, bool) {
    let mut too_long = false;
    let mut last = None;
    for desc in chain {
        if descs.len() == limits.max_descriptors {
            // Keep walking (bounded by the iterator: at most a queue or an
            // indirect table) only to find the status byte.
            too_long = true;
        } else {
            descs.push(desc);
        }
        last = Some(desc);
    }
    (last, too_long)
}

/// Checks a well-shaped chain's header, lengths, sectors and buffers;
/// the data buffers go to `data`.
fn parse_body(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    limits: &Limits,
    data: &mut Vec<Segment>,
) -> Result<Body, Refusal> {
    let buffers = split_buffers(descs)?;
    let mut header = [0u8; HEADER_SIZE as usize];
    if !gather(mem, buffers.readable, 0, &mut header) {
        return Err((STATUS_IOERR, "request header too short or unreadable"));
    }
    let request_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let body = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => {
            parse_read(request_type, sector, &buffers, limits, data)?
        }
        VIRTIO_BLK_T_OUT => parse_write(sector, &buffers, limits, data)?,
        VIRTIO_BLK_T_FLUSH => Body {
            kind: RequestType::Flush,
            offset: 0,
            len: 0,
            unmap: false,
        },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            parse_discard_or_write_zeroes(request_type, &buffers, mem, limits)?
        }
        _ => return Err((STATUS_UNSUPP, "unsupported request type")),
    };
    if data
        .iter()
        .any(|s| !mem.check_range(s.addr, s.len as usize))
    {
        return Err((STATUS_IOERR, "data buffer outside guest memory"));
    }
    Ok(body)
}

/// Device-readable buffers first, then device-writable ones, with room
/// for the header and the status byte.
fn split_buffers(descs: &[Descriptor]) -> Result<Buffers<'_>, Refusal> {
    let split = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    if descs[split..].iter().any(|d| !d.is_write_only()) {
        return Err((STATUS_IOERR, "device-readable buffer after a writable one"));
    }
    let (readable, writable) = descs.split_at(split);
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len())).sum();
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len())).sum();
    if readable_len < HEADER_SIZE {
        return Err((STATUS_IOERR, "request header too short or unreadable"));
    }
    Ok(Buffers {
        readable,
        writable,
        data_out: readable_len - HEADER_SIZE,
        // The status byte is writable: at least one byte (checked by `parse`).
        data_in: writable_len - 1,
    })
}

/// IN (read sectors) and GET_ID (read the serial).
fn parse_read(
    request_type: u32,
    sector: u64,
    buffers: &Buffers,
    limits: &Limits,
    data: &mut Vec<Segment>,
) -> Result<Body, Refusal> {
    if buffers.data_out != 0 {
        return Err((STATUS_IOERR, "device-readable data in a read request"));
    }
    let len = buffers.data_in;
    collect_segments(buffers.writable, 0, len, data);
    if request_type == VIRTIO_BLK_T_GET_ID {
        return Ok(Body {
            kind: RequestType::GetId,
            offset: 0,
            len,
            unmap: false,
        });
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err((STATUS_IOERR, "read length not a multiple of 512"));
    }
    if !in_range(sector.checked_mul(SECTOR_SIZE), len, limits.size) {
        return Err((STATUS_IOERR, "read past the end of the disk"));
    }
    Ok(Body {
        kind: RequestType::In,
        offset: sector * SECTOR_SIZE,
        len,
        unmap: false,
    })
}

/// OUT (write sectors).
fn parse_write(
    sector: u64,
    buffers: &Buffers,
    limits: &Limits,
    data: &mut Vec<Segment>,
) -> Result<Body, Refusal> {
    if limits.readonly {
        return Err((STATUS_IOERR, "write to a read-only disk"));
    }
    if buffers.data_in != 0 {
        return Err((STATUS_IOERR, "device-writable data in a write request"));
    }
    let len = buffers.data_out;
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err((STATUS_IOERR, "write length not a multiple of 512"));
    }
    if !in_range(sector.checked_mul(SECTOR_SIZE), len, limits.size) {
        return Err((STATUS_IOERR, "write past the end of the disk"));
    }
    collect_segments(buffers.readable, HEADER_SIZE, len, data);
    Ok(Body {
        kind: RequestType::Out,
        offset: sector * SECTOR_SIZE,
        len,
        unmap: false,
    })
}

/// DISCARD and WRITE_ZEROES: one segment (sector, count, flags) after the header.
fn parse_discard_or_write_zeroes(
    request_type: u32,
    buffers: &Buffers,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Body, Refusal> {
    let discard = request_type == VIRTIO_BLK_T_DISCARD;
    if limits.readonly {
        return Err((STATUS_IOERR, "discard or write-zeroes on a read-only disk"));
    }
    if buffers.data_in != 0 {
        return Err((
            STATUS_IOERR,
            "device-writable data in a discard/write-zeroes request",
        ));
    }
    let data_out = buffers.data_out;
    if data_out == 0 || !data_out.is_multiple_of(DWZ_SEGMENT_SIZE) {
        return Err((STATUS_IOERR, "bad discard/write-zeroes segment length"));
    }
    if data_out / DWZ_SEGMENT_SIZE > 1 {
        // max_discard_seg = max_write_zeroes_seg = 1.
        return Err((STATUS_UNSUPP, "more than one discard/write-zeroes segment"));
    }
    let mut seg = [0u8; DWZ_SEGMENT_SIZE as usize];
    if !gather(mem, buffers.readable, HEADER_SIZE, &mut seg) {
        return Err((STATUS_IOERR, "unreadable discard/write-zeroes segment"));
    }
    let seg_sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
    let num_sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
    // Discard has no flags; write-zeroes only UNMAP (5.2.6.2).
    let known = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if flags & !known != 0 {
        return Err((STATUS_UNSUPP, "unknown discard/write-zeroes flags"));
    }
    let max = if discard {
        limits.max_discard_sectors
    } else {
        limits.max_write_zeroes_sectors
    };
    if num_sectors > max {
        return Err((STATUS_IOERR, "discard/write-zeroes larger than the maximum"));
    }
    let len = u64::from(num_sectors) * SECTOR_SIZE;
    if !in_range(seg_sector.checked_mul(SECTOR_SIZE), len, limits.size) {
        return Err((
            STATUS_IOERR,
            "discard/write-zeroes past the end of the disk",
        ));
    }
    Ok(Body {
        kind: if discard {
            RequestType::Discard
        } else {
            RequestType::WriteZeroes
        },
        offset: seg_sector * SECTOR_SIZE,
        len,
        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
    })
}

/// Size of the bounce buffer (O_DIRECT fallback, zero writing).
pub const BOUNCE_SIZE: usize = 512 << 10;

/// Copies `data` into the guest buffers `segs`, starting `skip` bytes in.
pub(super) fn copy_to_guest(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    skip: u64,
    data: &[u8],
) -> io::Result<()> {
    let mut parts = Vec::new();
    collect_segments(segs.iter().copied(), skip, data.len() as u64, &mut parts);
    let mut done = 0;
    for s in parts {
        let n = s.len as usize;
        mem.write_slice(&data[done..done + n], s.addr)
            .map_err(guest_error)?;
        done += n;
    }
    Ok(())
}

/// Copies guest data from `segs`, starting `skip` bytes in, into `data`.
pub(super) fn copy_from_guest(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    skip: u64,
    data: &mut [u8],
) -> io::Result<()> {
    let mut parts = Vec::new();
    collect_segments(segs.iter().copied(), skip, data.len() as u64, &mut parts);
    let mut done = 0;
    for s in parts {
        let n = s.len as usize;
        mem.read_slice(&mut data[done..done + n], s.addr)
            .map_err(guest_error)?;
        done += n;
    }
    Ok(())
}

fn guest_error(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// The host memory behind the guest buffers `segs`.
pub(super) fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &[Segment],
) -> io::Result<Vec<VolatileSlice<'m, MS<'m, GuestMemoryMmap>>>> {
    let mut slices = Vec::with_capacity(segs.len());
    for seg in segs {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            slices.push(slice.map_err(guest_error)?);
        }
    }
    Ok(slices)
}

/// One iovec per (host address, length).
pub(super) fn iovecs(ptrs: &[(usize, usize)]) -> Vec<libc::iovec> {
    ptrs.iter()
        .map(|&(ptr, n)| libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: n,
        })
        .collect()
}

/// Executes requests against one disk.
#[derive(Default)]
pub struct Executor {
    bounce: Option<AlignedBuf>,
}

impl Executor {
    pub fn new() -> Executor {
        Executor { bounce: None }
    }

    fn bounce(&mut self, disk: &DiskFile) -> &mut AlignedBuf {
        self.bounce.get_or_insert_with(|| {
            let align = disk.dio_offset_align() as usize;
            let size = BOUNCE_SIZE.max(align);
            AlignedBuf::new(size, align.max(disk.dio_mem_align()).max(4096))
        })
    }

    /// Whether the guest buffers can go to an O_DIRECT preadv/pwritev as is.
    pub(super) fn direct_ok(
        disk: &DiskFile,
        ptrs: &[(usize, usize)],
        offset: u64,
        len: u64,
    ) -> bool {
        let off_align = disk.dio_offset_align();
        let mem_align = disk.dio_mem_align();
        offset.is_multiple_of(off_align)
            && len.is_multiple_of(off_align)
            && ptrs.iter().all(|&(ptr, n)| {
                ptr.is_multiple_of(mem_align)
                    && n.is_multiple_of(mem_align)
                    && (n as u64).is_multiple_of(off_align)
            })
    }

    /// Reads `len` bytes at `offset` into the guest buffers `segs`.
    pub fn read(
        &mut self,
        disk: &DiskFile,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let slices = guest_slices(mem, segs)?;
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let ptrs: Vec<(usize, usize)> = guards
            .iter()
            .zip(&slices)
            .map(|(g, s)| (g.as_ptr() as usize, s.len()))
            .collect();
        if !disk.direct() || Self::direct_ok(disk, &ptrs, offset, len) {
            let mut iov = iovecs(&ptrs);
            // The iovecs point into guest memory mapped for as long as
            // `mem` is borrowed, and the guards keep them valid.
            let result = disk.preadv_all(&mut iov, offset);
            // The kernel wrote guest memory behind vm-memory's back: mark it
            // dirty for migration (all of it, even on error: a partial read
            // may have happened), as vm-memory's read_volatile does.
            for s in &slices {
                s.bitmap().mark_dirty(0, s.len());
            }
            match result {
                Err(e) if disk.direct() && e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        drop(guards);
        self.bounce_read(disk, mem, segs, offset, len)
    }

    fn bounce_read(
        &mut self,
        disk: &DiskFile,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let align = disk.dio_offset_align();
        let start = offset & !(align - 1);
        let end = (offset + len).next_multiple_of(align);
        let buf = self.bounce(disk);
        let chunk = buf.len() as u64;
        let mut pos = start;
        while pos < end {
            let n = chunk.min(end - pos);
            let data = &mut buf.as_mut_slice()[..n as usize];
            disk.read_exact_at(data, pos)?;
            let lo = pos.max(offset);
            let hi = (pos + n).min(offset + len);
            if lo < hi {
                copy_to_guest(
                    mem,
                    segs,
                    lo - offset,
                    &data[(lo - pos) as usize..(hi - pos) as usize],
                )?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes the guest buffers `segs` (`len` bytes) at `offset`.
    pub fn write(
        &mut self,
        disk: &DiskFile,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let slices = guest_slices(mem, segs)?;
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
        let ptrs: Vec<(usize, usize)> = guards
            .iter()
            .zip(&slices)
            .map(|(g, s)| (g.as_ptr() as usize, s.len()))
            .collect();
        if !disk.direct() || Self::direct_ok(disk, &ptrs, offset, len) {
            let mut iov = iovecs(&ptrs);
            match disk.pwritev_all(&mut iov, offset) {
                Err(e) if disk.direct() && e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        drop(guards);
        self.bounce_write(disk, offset, len, |dst, skip| {
            copy_from_guest(mem, segs, skip, dst)
        })
    }

    /// Writes `len` bytes at `offset`, each chunk filled by `fill(dst,
    /// bytes_from_offset)`, through the aligned buffer; unaligned edges are
    /// read first (read-modify-write).
    fn bounce_write(
        &mut self,
        disk: &DiskFile,
        offset: u64,
        len: u64,
        mut fill: impl FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let align = disk.dio_offset_align();
        let start = offset & !(align - 1);
        let end = (offset + len).next_multiple_of(align);
        let buf = self.bounce(disk);
        let chunk = buf.len() as u64;
        let mut pos = start;
        while pos < end {
            let n = chunk.min(end - pos);
            let data = &mut buf.as_mut_slice()[..n as usize];
            let lo = pos.max(offset);
            let hi = (pos + n).min(offset + len);
            if lo > pos || hi < pos + n {
                disk.read_exact_at(data, pos)?;
            }
            fill(
                &mut data[(lo - pos) as usize..(hi - pos) as usize],
                lo - offset,
            )?;
            disk.write_all_at(data, pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`: in place if the backend can, else by
    /// writing zeros.
    pub fn write_zeroes(
        &mut self,
        disk: &DiskFile,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match disk.zero_range(offset, len, unmap) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            other => return other,
        }
        self.bounce_write(disk, offset, len, |dst, _| {
            dst.fill(0);
            Ok(())
        })
    }

    /// Executes `request` (its data buffers in `segs`); returns the status
    /// and the number of bytes written to guest buffers (status included).
    pub fn execute(
        &mut self,
        disk: &DiskFile,
        mem: &GuestMemoryMmap,
        request: &Request,
        segs: &[Segment],
        serial: &[u8; ID_BYTES],
    ) -> (u8, u32, Option<io::Error>) {
        let result = match request.kind {
            RequestType::In => self
                .read(disk, mem, segs, request.offset, request.len)
                .map(|()| request.len),
            RequestType::Out => self
                .write(disk, mem, segs, request.offset, request.len)
                .map(|()| 0),
            RequestType::Flush => disk.flush().map(|()| 0),
            RequestType::GetId => {
                let n = (request.len as usize).min(ID_BYTES);
                copy_to_guest(mem, segs, 0, &serial[..n]).map(|()| n as u64)
            }
            RequestType::Discard => {
                if request.len == 0 {
                    Ok(0)
                } else {
                    disk.discard(request.offset, request.len).map(|()| 0)
                }
            }
            RequestType::WriteZeroes => self
                .write_zeroes(disk, request.offset, request.len, request.unmap)
                .map(|()| 0),
        };
        outcome(result)
    }
}

/// A request's status, used length (status byte included) and error, from
/// the bytes it wrote to guest buffers or its error.
pub fn outcome(result: io::Result<u64>) -> (u8, u32, Option<io::Error>) {
    match result {
        // `written` is at most the chain's writable length, which the
        // chain iterator keeps under 4 GiB.
        Ok(written) => (STATUS_OK, (written as u32).saturating_add(1), None),
        Err(e) => (STATUS_IOERR, 1, Some(e)),
    }
}

/// Writes the status byte; false if it cannot be written.
pub fn write_status(mem: &GuestMemoryMmap, status: GuestAddress, code: u8) -> bool {
    mem.write_obj(code, status).is_ok()
}
