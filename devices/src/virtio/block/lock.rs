//! Disk locking with open file description (OFD) locks.
//!
//! A read-write disk takes an exclusive (write) lock on the whole file, a
//! read-only disk a shared (read) lock, so two VMMs on one host never have
//! the same disk open read-write (nor one read-write and one read-only).
//! OFD locks belong to the open file description, not the process: they
//! are not lost when another fd of the same file is closed, and they are
//! released when the description is closed (the VMM exits or dies).
//!
//! They only protect against other processes on the same host that lock
//! the same way (other instances of this VMM, QEMU and Cloud Hypervisor use
//! OFD locks too). Across hosts, DRBD's own roles do the job.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// The lock a disk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// A shared (read) lock: other read-only openers may share it.
    Shared,
    /// An exclusive (write) lock: nobody else may lock the disk.
    Exclusive,
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another open file description holds a conflicting lock.
    Conflict {
        /// The kind of lock the other holder has.
        other: LockKind,
        /// The process holding it, when /proc tells.
        holder: Option<(u32, String)>,
    },
    /// fcntl failed for another reason (e.g. the file system has no locks).
    Io(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Conflict { other, holder } => {
                write!(f, "is locked by another process")?;
                match holder {
                    Some((pid, comm)) => write!(f, " (pid {pid}, {comm})")?,
                    None => write!(f, " (pid unknown)")?,
                }
                match other {
                    LockKind::Exclusive => write!(f, " — another VMM has it open read-write"),
                    LockKind::Shared => write!(f, " — another VMM has it open read-only"),
                }
            }
            LockError::Io(e) => write!(f, "cannot lock: {e}"),
        }
    }
}

fn flock(l_type: libc::c_short) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    // 0: up to the end of the file, whatever its size becomes.
    fl.l_len = 0;
    // OFD locks require l_pid == 0.
    fl.l_pid = 0;
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: the fd is valid for the lifetime of `file`, and `fl` is a valid
    // `flock` that the kernel reads (and for F_OFD_GETLK writes) in place.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes (or converts to) a `kind` lock on the whole file, without waiting.
pub fn lock(file: &File, kind: LockKind) -> Result<(), LockError> {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    let mut fl = flock(l_type as libc::c_short);
    match fcntl_lock(file, libc::F_OFD_SETLK, &mut fl) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            Err(conflict(file, l_type as libc::c_short))
        }
        Err(e) => Err(LockError::Io(e)),
    }
}

/// Releases whatever lock this open file description holds.
pub fn unlock(file: &File) -> io::Result<()> {
    let mut fl = flock(libc::F_UNLCK as libc::c_short);
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl)
}

/// Describes the lock that blocks a `l_type` lock on `file`.
fn conflict(file: &File, l_type: libc::c_short) -> LockError {
    let mut fl = flock(l_type);
    let other = match fcntl_lock(file, libc::F_OFD_GETLK, &mut fl) {
        Ok(()) if fl.l_type == libc::F_RDLCK as libc::c_short => LockKind::Shared,
        _ => LockKind::Exclusive,
    };
    // F_OFD_GETLK reports l_pid == -1 for OFD locks: they belong to no
    // process. Look for the holder in /proc (best effort).
    let holder = if fl.l_pid > 0 {
        let pid = fl.l_pid as u32;
        Some((pid, comm(pid)))
    } else {
        find_holder(file)
    };
    LockError::Conflict { other, holder }
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// Finds another process with an fd on the same inode whose fdinfo lists an
/// OFD lock (`lock: ... OFDLCK ...`). Only used to word an error.
fn find_holder(file: &File) -> Option<(u32, String)> {
    let meta = file.metadata().ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if target.dev() != dev || target.ino() != ino {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if info
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains("OFDLCK"))
            {
                return Some((pid, comm(pid)));
            }
        }
    }
    None
}
