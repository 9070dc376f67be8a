//! The disk backend: a regular file or a block device (LV, DRBD device,
//! loop device), opened buffered or with O_DIRECT, read-only or read-write,
//! and locked (see [`super::lock`]).
//!
//! This module only knows about host file offsets and host buffers; moving
//! data to and from guest memory is in [`super::request`].

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use config::DiskConfig;

use super::lock::{self, LockError, LockKind};
use super::BlockError;

/// Sectors are always 512 bytes in virtio-blk, whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

// <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123),
// _IO(0x12, 119), _IO(0x12, 127).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// At most this many iovecs per preadv/pwritev (the kernel's UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// What the backend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    File,
    BlockDevice,
}

/// An open disk.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    readonly: bool,
    direct: bool,
    /// Size in bytes (what the guest may address, rounded down to a sector).
    size: u64,
    /// Block sizes reported to the guest (after the config's overrides).
    logical_block_size: u32,
    physical_block_size: u32,
    /// O_DIRECT constraints: guest buffers (address and length) and file
    /// offsets/lengths must be multiples of these, or the I/O is bounced.
    dio_mem_align: usize,
    dio_offset_align: u64,
    /// Whether the backend can discard (block devices may not).
    discard: bool,
    /// The backend's own logical block size (512 for files).
    device_block_size: u64,
    /// For a loop device, the file behind it: locked with the device.
    backing: Option<lock::LoopBacking>,
}

fn ioctl_u64(file: &File, request: libc::c_ulong) -> io::Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: the fd is valid; `request` is a read ioctl writing one u64
    // (BLKGETSIZE64 writes a size_t, 8 bytes on 64-bit Linux) into `value`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &mut value as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_u32(file: &File, request: libc::c_ulong) -> io::Result<u32> {
    let mut value: libc::c_uint = 0;
    // SAFETY: the fd is valid; BLKSSZGET and BLKPBSZGET write one
    // int/unsigned int (4 bytes) into `value`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &mut value as *mut _) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_range(file: &File, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: the fd is valid; BLKDISCARD and BLKZEROOUT read a u64[2]
    // {start, length} from the pointer, which lives across the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request as _, range.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: the fd is valid; fallocate takes plain integers.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The O_DIRECT alignments statx reports (Linux 6.1+), if it does.
fn statx_dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: all-zero bytes are a valid `statx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is valid, the path is an empty C string used with
    // AT_EMPTY_PATH, and `stx` is a valid out-pointer for the call.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Whether the block device `rdev` can discard, from sysfs.
fn bdev_can_discard(rdev: u64) -> bool {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    std::fs::read_to_string(format!(
        "/sys/dev/block/{major}:{minor}/queue/discard_max_bytes"
    ))
    .ok()
    .and_then(|s| s.trim().parse::<u64>().ok())
    // No sysfs: assume it can; a failing discard is answered OK anyway.
    .is_none_or(|max| max > 0)
}

fn valid_block_size(size: u32) -> bool {
    (512..=65536).contains(&size) && size.is_power_of_two()
}

/// What the disk itself says about its size and blocks.
struct Geometry {
    kind: DiskKind,
    /// Bytes.
    size: u64,
    /// The device's logical block size (512 for files and odd answers).
    logical: u32,
    physical: u32,
    discard: bool,
}

impl Geometry {
    fn probe(file: &File, path: &Path) -> Result<Geometry, BlockError> {
        let err = |what: &str, source: io::Error| BlockError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        };
        let meta = file.metadata().map_err(|e| err("cannot stat", e))?;
        let file_type = meta.file_type();
        let (kind, size, logical, physical) = if file_type.is_block_device() {
            let size = ioctl_u64(file, BLKGETSIZE64).map_err(|e| err("BLKGETSIZE64 failed", e))?;
            let logical = ioctl_u32(file, BLKSSZGET).map_err(|e| err("BLKSSZGET failed", e))?;
            let physical = ioctl_u32(file, BLKPBSZGET).map_err(|e| err("BLKPBSZGET failed", e))?;
            (DiskKind::BlockDevice, size, logical, physical)
        } else if file_type.is_file() {
            let blksize = u32::try_from(meta.blksize()).unwrap_or(4096);
            let physical = if valid_block_size(blksize) {
                blksize
            } else {
                4096
            };
            (DiskKind::File, meta.len(), 512, physical)
        } else {
            return Err(BlockError::Invalid {
                path: path.to_path_buf(),
                reason: "is neither a regular file nor a block device".to_string(),
            });
        };
        Ok(Geometry {
            kind,
            size,
            logical: if valid_block_size(logical) {
                logical
            } else {
                512
            },
            physical,
            discard: match kind {
                DiskKind::BlockDevice => bdev_can_discard(meta.rdev()),
                DiskKind::File => true,
            },
        })
    }
}

/// Opens the disk read-write (or read-only), with O_DIRECT if asked.
fn open_file(config: &DiskConfig) -> Result<File, BlockError> {
    let mut flags = libc::O_CLOEXEC;
    if config.direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(!config.readonly)
        .custom_flags(flags)
        .open(&config.path)
        .map_err(|source| {
            let what = if config.direct && source.raw_os_error() == Some(libc::EINVAL) {
                "cannot open with O_DIRECT (direct=on): the file system does not support it"
            } else {
                "cannot open"
            };
            BlockError::Io {
                path: config.path.clone(),
                what: what.to_string(),
                source,
            }
        })
}

/// The logical and physical block sizes the guest sees: configured, or the
/// device's own.
fn block_sizes(config: &DiskConfig, found: &Geometry) -> Result<(u32, u32), BlockError> {
    let invalid = |reason: String| BlockError::Invalid {
        path: config.path.clone(),
        reason,
    };
    let logical = config.logical_block_size.unwrap_or(found.logical);
    let physical = config
        .physical_block_size
        .unwrap_or(found.physical)
        .max(logical);
    if !valid_block_size(logical) || !valid_block_size(physical) {
        return Err(invalid(format!(
            "block sizes {logical}/{physical} are not powers of two from 512 to 65536"
        )));
    }
    if config.logical_block_size.is_some() && logical < found.logical {
        return Err(invalid(format!(
            "logical_block_size {logical} is smaller than the device's {}",
            found.logical
        )));
    }
    Ok((logical, physical))
}

/// The memory and offset alignment O_DIRECT needs on this disk (statx, or
/// the device's block size).
fn direct_io_alignment(
    file: &File,
    path: &Path,
    found: &Geometry,
    size: u64,
) -> Result<(usize, u64), BlockError> {
    let invalid = |reason: String| BlockError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let fallback_offset = match found.kind {
        DiskKind::BlockDevice => u64::from(found.logical),
        DiskKind::File => 4096,
    };
    let (mem_align, offset_align) = match statx_dio_align(file) {
        Some((0, _)) | Some((_, 0)) => {
            return Err(invalid("does not support O_DIRECT (direct=on)".to_string()))
        }
        Some((mem, offset)) => (mem as usize, u64::from(offset)),
        None => (512, fallback_offset),
    };
    // Keep the bounce logic simple: sector granularity at least.
    let offset_align = offset_align.max(SECTOR_SIZE);
    if !offset_align.is_power_of_two() || !mem_align.is_power_of_two() {
        return Err(invalid(format!(
            "odd O_DIRECT alignment {mem_align}/{offset_align}"
        )));
    }
    if !size.is_multiple_of(offset_align) {
        return Err(invalid(format!(
            "size {size} is not a multiple of the O_DIRECT alignment {offset_align}: resize it or use direct=off"
        )));
    }
    Ok((mem_align, offset_align))
}

impl AsRawFd for DiskFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl DiskFile {
    /// Opens (and, if `take_lock`, locks) the disk `config` describes.
    pub fn open(config: &DiskConfig, take_lock: bool) -> Result<DiskFile, BlockError> {
        let path = config.path.clone();
        let file = open_file(config)?;
        let found = Geometry::probe(&file, &path)?;
        let (logical_block_size, physical_block_size) = block_sizes(config, &found)?;
        let size = found.size & !(SECTOR_SIZE - 1);
        let backing =
            lock::loop_backing(&file, config.readonly).map_err(|source| BlockError::Io {
                path: path.clone(),
                what: "cannot lock the file behind the loop device".to_string(),
                source,
            })?;
        let (dio_mem_align, dio_offset_align) = if config.direct {
            direct_io_alignment(&file, &path, &found, size)?
        } else {
            (1, 1)
        };
        let disk = DiskFile {
            file,
            path,
            kind: found.kind,
            readonly: config.readonly,
            direct: config.direct,
            size,
            logical_block_size,
            physical_block_size,
            dio_mem_align,
            dio_offset_align,
            discard: found.discard,
            device_block_size: u64::from(found.logical),
            backing,
        };
        if take_lock {
            disk.lock()?;
        }
        Ok(disk)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Size in bytes, a multiple of the sector size.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.size >> SECTOR_SHIFT
    }

    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    pub fn can_discard(&self) -> bool {
        self.discard
    }

    pub fn dio_mem_align(&self) -> usize {
        self.dio_mem_align
    }

    pub fn dio_offset_align(&self) -> u64 {
        self.dio_offset_align
    }

    /// The lock this disk needs: exclusive when writable.
    pub fn lock_kind(&self) -> LockKind {
        if self.readonly {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        }
    }

    /// Takes the disk's OFD lock; for a loop device also the lock of the
    /// file behind it, and for a file it checks the loop devices over it.
    pub fn lock(&self) -> Result<(), BlockError> {
        let kind = self.lock_kind();
        let error = |e: LockError| match e {
            LockError::Conflict { .. } => BlockError::Locked {
                path: self.path.clone(),
                reason: e.to_string(),
            },
            LockError::Io(source) => BlockError::Io {
                path: self.path.clone(),
                what: "cannot lock".to_string(),
                source,
            },
        };
        lock::lock(&self.file, kind).map_err(error)?;
        let also = match &self.backing {
            Some(backing) => lock::lock(&backing.file, kind).map_err(|e| match e {
                LockError::Conflict { other, holder, .. } => LockError::Conflict {
                    other,
                    holder,
                    via: Some(format!(
                        "is a loop device over {}, which",
                        backing.path.display()
                    )),
                },
                e => e,
            }),
            None => lock::check_loops_over(&self.file, kind),
        };
        if let Err(e) = also {
            // All or nothing. The unlock cannot fail on an fd we locked.
            let _ = lock::unlock(&self.file);
            return Err(error(e));
        }
        Ok(())
    }

    /// Drops the disk's OFD locks.
    pub fn unlock(&self) -> Result<(), BlockError> {
        let error = |source| BlockError::Io {
            path: self.path.clone(),
            what: "cannot unlock".to_string(),
            source,
        };
        if let Some(backing) = &self.backing {
            lock::unlock(&backing.file).map_err(error)?;
        }
        lock::unlock(&self.file).map_err(error)
    }

    /// Writes the disk's (and the host's) volatile caches to stable storage.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Reads `iov.len()` buffers at `offset`, completely. The caller
    /// guarantees the iovecs point to writable memory that stays valid.
    pub fn preadv_all(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.rw_vectored(iov, offset, false)
    }

    /// Writes `iov` at `offset`, completely. The caller guarantees the
    /// iovecs point to readable memory that stays valid.
    pub fn pwritev_all(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        self.rw_vectored(iov, offset, true)
    }

    fn rw_vectored(
        &self,
        mut iov: &mut [libc::iovec],
        mut offset: u64,
        write: bool,
    ) -> io::Result<()> {
        while !iov.is_empty() {
            let count = iov.len().min(IOV_MAX);
            let file_offset =
                i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the fd is valid; the caller guarantees the first
            // `count` iovecs describe memory valid for the transfer's
            // direction for the duration of the call.
            let ret = unsafe {
                if write {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        iov.as_ptr(),
                        count as libc::c_int,
                        file_offset,
                    )
                } else {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        iov.as_ptr(),
                        count as libc::c_int,
                        file_offset,
                    )
                }
            };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ret == 0 {
                return Err(if write {
                    io::Error::from(io::ErrorKind::WriteZero)
                } else {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the disk ended before the guest's request (was it shrunk?)",
                    )
                });
            }
            let mut done = ret as usize;
            offset += done as u64;
            // Skip the iovecs fully transferred, trim a partial one.
            while let Some(first) = iov.first_mut() {
                if done >= first.iov_len {
                    done -= first.iov_len;
                    iov = &mut iov[1..];
                } else {
                    // SAFETY: `done < iov_len`: the new base stays inside the buffer.
                    first.iov_base = unsafe { (first.iov_base as *mut u8).add(done) } as *mut _;
                    first.iov_len -= done;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset` (buffer and offset
    /// aligned for O_DIRECT by the caller when the disk is direct).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// BLKDISCARD and BLKZEROOUT want ranges aligned to the device's
    /// logical block size. Checked here because the kernel (6.x) drops the
    /// page cache of a range aligned only to 512 bytes before it fails the
    /// ioctl with EINVAL, zeroing part of a cached page on the way.
    fn check_block_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.kind == DiskKind::BlockDevice
            && !(offset | len).is_multiple_of(self.device_block_size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range not aligned to the device's {}-byte blocks",
                    self.device_block_size
                ),
            ));
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset`. A backend that cannot discard
    /// ignores the hint.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_block_range(offset, len)?;
        let result = match self.kind {
            DiskKind::BlockDevice => ioctl_range(&self.file, BLKDISCARD, offset, len),
            DiskKind::File => fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
        };
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    /// Zeroes `len` bytes at `offset` without moving data, if the backend
    /// can: a hole (when `unmap` allows it) or an allocated zero range.
    /// `ErrorKind::Unsupported` means the caller has to write zeros.
    pub fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_block_range(offset, len)?;
        match self.kind {
            DiskKind::BlockDevice => ioctl_range(&self.file, BLKZEROOUT, offset, len),
            DiskKind::File => {
                if unmap
                    && fallocate(
                        &self.file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                    .is_ok()
                {
                    return Ok(());
                }
                match fallocate(
                    &self.file,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                ) {
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
                        ) =>
                    {
                        Err(io::Error::from(io::ErrorKind::Unsupported))
                    }
                    other => other,
                }
            }
        }
    }
}

/// A heap buffer aligned for O_DIRECT, for bouncing guest data.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is exclusively owned heap memory, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout =
            Layout::from_size_align(len.max(1), align.max(1)).expect("valid bounce buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `layout.size()` initialized (zeroed at
        // allocation) bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
