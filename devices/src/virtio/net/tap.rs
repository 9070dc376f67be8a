//! The tap backend: a `/dev/net/tun` queue in TAP mode with virtio net
//! headers (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte header), non-blocking.
//!
//! The VMM only opens the queue. The host side configures the interface:
//! brings the link up, adds it to a bridge, sets its MTU and addresses. A tap
//! that did not exist is created by TUNSETIFF and disappears when the VMM
//! closes it (no TUNSETPERSIST), so an orchestrator that wants a tap to
//! outlive the VMM creates it beforehand (`ip tuntap add NAME mode tap
//! vnet_hdr`).

use std::ffi::CStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::NET_HDR_LEN;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name, then `ifr_flags`.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> IfReq {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// A tap error, naming the tap, the operation and the cause.
#[derive(Debug)]
pub struct TapError {
    /// `tap NAME` or `tap fd N`.
    pub tap: String,
    /// The operation that failed (`open /dev/net/tun`, `TUNSETIFF`...).
    pub op: &'static str,
    pub error: io::Error,
}

impl TapError {
    fn new(tap: impl Into<String>, op: &'static str, error: io::Error) -> TapError {
        TapError {
            tap: tap.into(),
            op,
            error,
        }
    }

    fn hint(&self) -> &'static str {
        match (self.op, self.error.raw_os_error()) {
            (_, Some(libc::EPERM)) | (_, Some(libc::EACCES)) => " (needs CAP_NET_ADMIN)",
            ("TUNSETIFF", Some(libc::EBUSY)) => " (the tap is in use by another process)",
            ("TUNSETIFF", Some(libc::EINVAL)) => {
                " (an interface of another type has this name, or the tap is multi-queue)"
            }
            ("TUNGETIFF", Some(libc::ENOTTY)) | ("TUNGETIFF", Some(libc::EINVAL)) => {
                " (not a tun/tap fd)"
            }
            ("TUNGETIFF", Some(libc::EBADFD)) => " (the fd is not attached to an interface)",
            ("open /dev/net/tun", Some(libc::ENOENT))
            | ("open /dev/net/tun", Some(libc::ENODEV)) => " (no tun driver: modprobe tun)",
            _ => "",
        }
    }
}

impl fmt::Display for TapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}{}",
            self.tap,
            self.op,
            self.error,
            self.hint()
        )
    }
}

impl std::error::Error for TapError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Which TUNSETOFFLOAD flags the tap accepts (probed when opened).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// TUN_F_CSUM with TUN_F_TSO4, TUN_F_TSO6 and TUN_F_TSO_ECN.
    pub csum_tso: bool,
    /// TUN_F_UFO (removed in Linux 4.14, accepted again since 4.14.x/4.15).
    pub ufo: bool,
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// False only for the socket stand-ins of unit tests: no tap ioctls.
    is_tap: bool,
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

impl Tap {
    /// Opens (creating it if missing) the tap `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let label = format!("tap {name}");
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::new(
                label,
                "TUNSETIFF",
                io::Error::new(io::ErrorKind::InvalidInput, "invalid interface name"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| TapError::new(label.clone(), "open /dev/net/tun", e))?;
        let mut req = IfReq::new();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one
        // (40 bytes, repr(C)) and lives across the call; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            return Err(TapError::new(label, "TUNSETIFF", last_error()));
        }
        let tap = Tap {
            file,
            name: req.name(),
            is_tap: true,
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Uses an already open tap fd (passed to the VMM). The fd is duplicated:
    /// the caller keeps (and may close) its own. It must be a tap opened with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; it is made non-blocking (a flag of
    /// the open file, so shared with the caller's copy).
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let label = format!("tap fd {fd}");
        // SAFETY: F_DUPFD_CLOEXEC only reads the fd number; an invalid fd fails with EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(TapError::new(label, "dup", last_error()));
        }
        // SAFETY: `dup` is a new fd that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which is one.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(TapError::new(label, "TUNGETIFF", last_error()));
        }
        let name = req.name();
        let label = format!("tap {name} (fd {fd})");
        let flags = req.flags as libc::c_int;
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & wanted != wanted || flags & libc::IFF_TUN != 0 {
            return Err(TapError::new(
                label,
                "TUNGETIFF",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "flags {flags:#x}: must be a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
                    ),
                ),
            ));
        }
        // SAFETY: F_GETFL/F_SETFL on our own valid fd.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if fl < 0
            // SAFETY: F_SETFL on our own valid fd.
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0
        {
            return Err(TapError::new(label, "O_NONBLOCK", last_error()));
        }
        let tap = Tap {
            file,
            name,
            is_tap: true,
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// A non-tap stand-in for unit tests and the fuzzer: one end of a
    /// datagram socket pair, which keeps frame boundaries like a tap does.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_socket(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.to_string(),
            is_tap: false,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn label(&self) -> String {
        format!("tap {}", self.name)
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size: libc::c_int = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which points at `size`.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(TapError::new(self.label(), "TUNSETVNETHDRSZ", last_error()));
        }
        Ok(())
    }

    /// Sets the offloads (TUN_F_* flags) the tap may use on frames it gives us.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        if !self.is_tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes the flags as the integer argument itself.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if ret < 0 {
            return Err(TapError::new(self.label(), "TUNSETOFFLOAD", last_error()));
        }
        Ok(())
    }

    /// Finds which offloads the tap accepts, then turns them all off again
    /// (they are set from the negotiated features on activation).
    pub fn probe_offloads(&self) -> TapOffloads {
        if !self.is_tap {
            return TapOffloads {
                csum_tso: true,
                ufo: true,
            };
        }
        let base = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        let csum_tso = self.set_offload(base).is_ok();
        let ufo = csum_tso && self.set_offload(base | libc::TUN_F_UFO).is_ok();
        // Offloads off until a driver negotiates them; a failure leaves
        // them on, which only matters to a device that is not reading.
        let _ = self.set_offload(0);
        TapOffloads { csum_tso, ufo }
    }

    /// Reads one frame (virtio net header + Ethernet frame).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (virtio net header + Ethernet frame) from a contiguous buffer.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    /// Writes one frame gathered from guest memory slices.
    pub fn writev<B: BitmapSlice>(&self, slices: &[VolatileSlice<'_, B>]) -> io::Result<usize> {
        // The guards keep the pointers valid until the write is done.
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr() as *mut libc::c_void,
                iov_len: g.len(),
            })
            .collect();
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec describes `len` readable bytes of guest memory
        // that stays mapped while `guards` lives; writev only reads them.
        let ret = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
        if ret < 0 {
            Err(last_error())
        } else {
            Ok(ret as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether `/dev/net/tun` can be opened (tests skip otherwise).
pub fn tun_available() -> Result<(), TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(|_| ())
        .map_err(|e| TapError::new("/dev/net/tun", "open", e))
}

/// The interface index of `name` in the calling thread's network namespace.
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let c: &CStr = &c;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}
