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
//!
//! A loop device and the file behind it are one disk: a loop device disk
//! also locks its backing file ([`LoopBacking`]), and a file disk is
//! refused while a loop device over it is locked by someone else
//! ([`check_loops_over`]), so neither order of opening lets two writers in.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

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
        holder: Option<Holder>,
        /// Where the conflicting lock is, when not on the disk itself (the
        /// backing file of a loop device, or a loop device over the file).
        via: Option<String>,
    },
    /// fcntl failed for another reason (e.g. the file system has no locks).
    Io(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Conflict { other, holder, via } => {
                if let Some(via) = via {
                    write!(f, "{via} ")?;
                }
                let how = match other {
                    LockKind::Exclusive => "read-write",
                    LockKind::Shared => "read-only",
                };
                match holder {
                    Some(h) if h.pid == std::process::id() => {
                        write!(f, "is already open {how} in this VMM (pid {})", h.pid)
                    }
                    Some(h) if h.is_vmm() => write!(
                        f,
                        "is locked by another VM: its VMM (pid {}{}) has it open {how}; command line: {}",
                        h.pid,
                        h.api_socket()
                            .map(|s| format!(", API socket {s}"))
                            .unwrap_or_default(),
                        h.command_line()
                    ),
                    Some(h) => write!(
                        f,
                        "is locked by another process (pid {}: {}), which has it open {how}",
                        h.pid,
                        h.command_line()
                    ),
                    None => write!(
                        f,
                        "is locked by another process (not found in /proc), which has it open {how}"
                    ),
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
        Some(Holder::of(fl.l_pid as u32))
    } else {
        find_holder(file)
    };
    LockError::Conflict {
        other,
        holder,
        via: None,
    }
}

/// A process that holds a lock, as /proc shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, arguments split.
    pub args: Vec<String>,
    /// Its command name (/proc/PID/comm).
    pub comm: String,
}

impl Holder {
    fn of(pid: u32) -> Holder {
        let args = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Holder { pid, args, comm }
    }

    /// Whether it is this VMM's program (another instance of it).
    pub fn is_vmm(&self) -> bool {
        let program = self.args.first().map(|a| a.rsplit('/').next().unwrap_or(a));
        program == Some("vmm") || self.comm == "vmm"
    }

    /// The API socket a VMM holder serves, from its command line.
    pub fn api_socket(&self) -> Option<&str> {
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            if arg == "--api-socket" {
                return args.next().map(String::as_str);
            }
            if let Some(path) = arg.strip_prefix("--api-socket=") {
                return Some(path);
            }
        }
        None
    }

    /// The command line, shortened for a message.
    pub fn command_line(&self) -> String {
        let mut line = if self.args.is_empty() {
            format!("[{}]", self.comm)
        } else {
            self.args.join(" ")
        };
        if line.len() > 300 {
            let mut end = 300;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push_str(" ...");
        }
        line
    }
}

/// Finds another process with an fd on the same inode whose fdinfo lists an
/// OFD lock (`lock: ... OFDLCK ...`). Only used to word an error.
fn find_holder(file: &File) -> Option<Holder> {
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
                return Some(Holder::of(pid));
            }
        }
    }
    None
}

/// Whether a conflicting lock of `kind` is held on `file` by another open
/// file description, without taking one: works on a read-only fd, so the
/// loop devices over a file can be checked without opening them for writing.
pub fn check(file: &File, kind: LockKind) -> Result<(), LockError> {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    } as libc::c_short;
    let mut fl = flock(l_type);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl).map_err(LockError::Io)?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(());
    }
    Err(conflict(file, l_type))
}

/// The major number of loop devices.
const LOOP_MAJOR: u32 = 7;
/// `LOOP_GET_STATUS64` (linux/loop.h).
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// The device and inode of the file behind the loop device `file` (an
/// open block device), or None if it is not a bound loop device.
fn loop_backing_id(file: &File) -> Option<(u64, u64)> {
    let meta = file.metadata().ok()?;
    if !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type())
        || libc::major(meta.rdev()) != LOOP_MAJOR
    {
        return None;
    }
    // SAFETY: LoopInfo64 is plain data; all-zero bytes are valid.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 fills a loop_info64 we own, on a valid fd.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) };
    (rc == 0).then_some((info.lo_device, info.lo_inode))
}

/// The file behind a loop device disk, open for its lock.
#[derive(Debug)]
pub struct LoopBacking {
    pub path: std::path::PathBuf,
    pub file: File,
}

/// The backing file of `file` if it is a loop device, opened to be locked
/// like the loop device (read-write for a read-write disk). None for other
/// disks, and for a loop device whose file is no longer reachable by its
/// path (deleted or in another mount namespace): nobody can open that one
/// by name.
pub fn loop_backing(file: &File, readonly: bool) -> io::Result<Option<LoopBacking>> {
    let Some((dev, ino)) = loop_backing_id(file) else {
        return Ok(None);
    };
    let rdev = file.metadata()?.rdev();
    let sysfs = format!(
        "/sys/dev/block/{}:{}/loop/backing_file",
        libc::major(rdev),
        libc::minor(rdev)
    );
    let Ok(name) = std::fs::read_to_string(&sysfs) else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(name.trim_end_matches('\n'));
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path);
    let backing = match opened {
        Ok(backing) => backing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot open the loop device's backing file {} to lock it: {e}",
                    path.display()
                ),
            ))
        }
    };
    let meta = backing.metadata()?;
    if (meta.dev(), meta.ino()) != (dev, ino) {
        // Another file now has that name.
        return Ok(None);
    }
    Ok(Some(LoopBacking {
        path,
        file: backing,
    }))
}

/// Refuses `file` (a regular file) if a loop device over it is locked in
/// a way that conflicts with `kind`: the same disk, by another name.
pub fn check_loops_over(file: &File, kind: LockKind) -> Result<(), LockError> {
    let meta = file.metadata().map_err(LockError::Io)?;
    if !meta.is_file() {
        return Ok(());
    }
    let id = (meta.dev(), meta.ino());
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        // Only bound loop devices have a backing file.
        if !entry.path().join("loop/backing_file").exists() {
            continue;
        }
        let device = format!("/dev/{name}");
        let Ok(loop_file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&device)
        else {
            continue;
        };
        if loop_backing_id(&loop_file) != Some(id) {
            continue;
        }
        if let Err(LockError::Conflict { other, holder, .. }) = check(&loop_file, kind) {
            return Err(LockError::Conflict {
                other,
                holder,
                via: Some(format!("is the file behind loop device {device}, which")),
            });
        }
    }
    Ok(())
}

/// What identifies a disk on this host, to find one disk given twice under
/// two names (a path and a symlink, a loop device and its file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskIdentity {
    /// (device, inode) of the file, or of a loop device's backing file.
    files: Vec<(u64, u64)>,
    /// The device number of a block device.
    block: Option<u64>,
}

impl DiskIdentity {
    /// The identity of the disk at `path`; None if it cannot be read (the
    /// open that follows reports why).
    pub fn of(path: &std::path::Path) -> Option<DiskIdentity> {
        let meta = std::fs::metadata(path).ok()?;
        let mut identity = DiskIdentity::default();
        if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            identity.block = Some(meta.rdev());
            if let Ok(file) = File::open(path) {
                if let Some(id) = loop_backing_id(&file) {
                    identity.files.push(id);
                }
            }
        } else {
            identity.files.push((meta.dev(), meta.ino()));
        }
        Some(identity)
    }

    /// Whether both name the same disk.
    pub fn same_disk(&self, other: &DiskIdentity) -> bool {
        (self.block.is_some() && self.block == other.block)
            || self.files.iter().any(|f| other.files.contains(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(args: &[&str], comm: &str) -> Holder {
        Holder {
            pid: 42,
            args: args.iter().map(|a| a.to_string()).collect(),
            comm: comm.to_string(),
        }
    }

    #[test]
    fn a_holder_that_is_a_vmm_is_named_with_its_api_socket() {
        let vmm = holder(
            &[
                "/usr/local/bin/vmm",
                "--config",
                "a.json",
                "--api-socket",
                "/run/vmm/a.sock",
            ],
            "vmm",
        );
        assert!(vmm.is_vmm());
        assert_eq!(vmm.api_socket(), Some("/run/vmm/a.sock"));
        let inline = holder(&["vmm", "--api-socket=/run/vmm/b.sock"], "vmm");
        assert_eq!(inline.api_socket(), Some("/run/vmm/b.sock"));
        let qemu = holder(
            &["qemu-system-x86_64", "-drive", "file=/dev/loop0"],
            "qemu-system-x86",
        );
        assert!(!qemu.is_vmm());
        assert_eq!(qemu.api_socket(), None);
        let message = LockError::Conflict {
            other: LockKind::Exclusive,
            holder: Some(qemu),
            via: None,
        }
        .to_string();
        assert!(
            message.contains("another process (pid 42: qemu-system-x86_64 -drive file=/dev/loop0)"),
            "{message}"
        );
        let long = holder(&["vmm", &"x".repeat(1000)], "vmm");
        assert!(long.command_line().len() < 320);
    }
}
