//! The host side of a tap on a Linux bridge: the tap takes the bridge's
//! MTU, joins it as a port and goes up. Plain interface ioctls on a
//! datagram socket (SIOCGIFMTU, SIOCSIFMTU, SIOCGIFINDEX, SIOCBRADDIF,
//! SIOCGIFFLAGS, SIOCSIFFLAGS), all needing CAP_NET_ADMIN in the VMM's
//! network namespace; no `ip` subprocess.
//!
//! The MTU is set before the tap joins: a bridge whose MTU was not set by
//! hand follows its smallest port, so a 1500-byte tap joining a 9000-byte
//! bridge would shrink the bridge for everyone else.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `struct ifreq` with an int in the union (ifr_mtu, ifr_ifindex) or the
/// flags (ifr_flags, a short at the same offset).
#[repr(C)]
struct IfReqInt {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

impl IfReqInt {
    fn new(name: &str) -> IfReqInt {
        let mut req = IfReqInt {
            name: [0; libc::IFNAMSIZ],
            value: 0,
            _pad: [0; 20],
        };
        let len = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        req
    }
}

/// linux/sockios.h (not in the libc crate).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const SIOCDEVPRIVATE: libc::c_ulong = 0x89f0;

/// The bridge port list request of the old bridge ioctl
/// (SIOCDEVPRIVATE with BRCTL_GET_PORT_LIST, linux/if_bridge.h): the
/// ifindex of every port. Read-only, unlike its neighbours in that table.
const BRCTL_GET_PORT_LIST: libc::c_ulong = 7;
/// Bridges have at most this many ports (BR_MAX_PORTS).
const BR_MAX_PORTS: usize = 1024;

/// Why a tap could not join its bridge: names the tap, the bridge and what
/// failed.
#[derive(Debug)]
pub struct BridgeError {
    pub tap: String,
    pub bridge: String,
    pub op: &'static str,
    pub error: io::Error,
}

impl BridgeError {
    fn new(tap: &str, bridge: &str, op: &'static str, error: io::Error) -> BridgeError {
        BridgeError {
            tap: tap.to_string(),
            bridge: bridge.to_string(),
            op,
            error,
        }
    }

    /// What the error means for this operation, in words.
    fn meaning(&self) -> String {
        let bridge = &self.bridge;
        let tap = &self.tap;
        match (self.op, self.error.raw_os_error()) {
            ("SIOCGIFMTU", Some(libc::ENODEV)) => {
                format!("bridge {bridge}: no such interface (create it first: ip link add {bridge} type bridge)")
            }
            ("SIOCBRADDIF", Some(libc::EOPNOTSUPP)) => {
                format!("{bridge} is not a bridge (tap {tap} cannot join it)")
            }
            ("SIOCBRADDIF", Some(libc::EBUSY)) => {
                format!("tap {tap} is already a port of another bridge (or bond) than {bridge}")
            }
            ("SIOCBRADDIF", Some(libc::ELOOP)) => {
                format!("tap {tap} cannot join bridge {bridge}: it is a bridge itself")
            }
            (_, Some(libc::EPERM)) | (_, Some(libc::EACCES)) => format!(
                "tap {tap} on bridge {bridge}: {}: {} (needs CAP_NET_ADMIN)",
                self.op, self.error
            ),
            _ => format!("tap {tap} on bridge {bridge}: {}: {}", self.op, self.error),
        }
    }
}

impl fmt::Display for BridgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.meaning())
    }
}

impl std::error::Error for BridgeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A socket for interface ioctls, in the calling thread's network namespace.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One interface ioctl with an int-sized ifreq; returns the int.
fn ifreq_int(
    socket: &OwnedFd,
    request: libc::c_ulong,
    name: &str,
    value: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut req = IfReqInt::new(name);
    req.value = value;
    // SAFETY: the request reads and writes a `struct ifreq` (40 bytes,
    // repr(C), name then the union), which `req` is; it outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req.value)
}

/// The ifindex of every port of `bridge`.
fn bridge_ports(socket: &OwnedFd, bridge: &str) -> io::Result<Vec<libc::c_int>> {
    let mut ports = vec![0 as libc::c_int; BR_MAX_PORTS];
    let mut args: [libc::c_ulong; 4] = [
        BRCTL_GET_PORT_LIST,
        ports.as_mut_ptr() as libc::c_ulong,
        BR_MAX_PORTS as libc::c_ulong,
        0,
    ];
    /// `struct ifreq` with ifr_data.
    #[repr(C)]
    struct IfReqData {
        name: [u8; libc::IFNAMSIZ],
        data: *mut libc::c_ulong,
        _pad: [u8; 16],
    }
    let mut req = IfReqData {
        name: IfReqInt::new(bridge).name,
        data: args.as_mut_ptr(),
        _pad: [0; 16],
    };
    // SAFETY: SIOCDEVPRIVATE on a bridge with BRCTL_GET_PORT_LIST reads the
    // four longs at ifr_data and writes at most BR_MAX_PORTS ints to the
    // buffer they point at; `req`, `args` and `ports` outlive the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCDEVPRIVATE, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ports.into_iter().filter(|&i| i != 0).collect())
}

/// Sets `tap` to the MTU of `bridge`, adds it to the bridge (a tap already
/// on this bridge stays) and brings it up. Returns the MTU. Each step is
/// skipped when already done, so a tap set up before needs no privilege.
pub fn attach(tap: &str, bridge: &str) -> Result<u16, BridgeError> {
    let err = |op, e| BridgeError::new(tap, bridge, op, e);
    let socket = control_socket().map_err(|e| err("socket", e))?;
    let mtu = ifreq_int(&socket, libc::SIOCGIFMTU, bridge, 0).map_err(|e| err("SIOCGIFMTU", e))?;
    let tap_index =
        ifreq_int(&socket, libc::SIOCGIFINDEX, tap, 0).map_err(|e| err("SIOCGIFINDEX", e))?;
    let current = ifreq_int(&socket, libc::SIOCGIFMTU, tap, 0).map_err(|e| err("SIOCGIFMTU", e))?;
    if current != mtu {
        ifreq_int(&socket, libc::SIOCSIFMTU, tap, mtu).map_err(|e| err("SIOCSIFMTU", e))?;
    }
    // Already a port of this bridge (a tap kept from an earlier run or a
    // reboot, or attached by hand): nothing to add. Reading the port list
    // needs no privilege, so a VMM that dropped root (--user) rebuilding
    // its devices at a guest reboot gets here too.
    let on_this_bridge = bridge_ports(&socket, bridge).is_ok_and(|p| p.contains(&tap_index));
    if !on_this_bridge {
        ifreq_int(&socket, SIOCBRADDIF, bridge, tap_index).map_err(|e| err("SIOCBRADDIF", e))?;
    }
    let flags =
        ifreq_int(&socket, libc::SIOCGIFFLAGS, tap, 0).map_err(|e| err("SIOCGIFFLAGS", e))?;
    // ifr_flags is a short at the start of the union (little-endian: the
    // low half of the int).
    let flags = flags & 0xffff;
    if flags & libc::IFF_UP == 0 {
        ifreq_int(&socket, libc::SIOCSIFFLAGS, tap, flags | libc::IFF_UP)
            .map_err(|e| err("SIOCSIFFLAGS", e))?;
    }
    u16::try_from(mtu).map_err(|_| {
        err(
            "SIOCGIFMTU",
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("MTU {mtu} is out of range"),
            ),
        )
    })
}
