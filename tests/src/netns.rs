//! Network namespaces and raw Ethernet sockets for end-to-end tests: a
//! guest NIC's tap lives in a namespace of its own, and the test talks to
//! it with an AF_PACKET socket opened inside that namespace.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `ip ARGS`; panics with its error output on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether network namespaces can be made here (root, iproute2).
pub fn available() -> bool {
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIP: ip netns: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("SKIP: iproute2 is not installed: {e}");
            false
        }
    }
}

/// A named network namespace, deleted on drop (with everything in it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("vmmt-{tag}-{}-{n}", std::process::id() % 100_000);
        // A namespace left by a crashed earlier run is replaced.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        // No IPv6 autoconfiguration chatter on the test links.
        for knob in ["all", "default"] {
            let _ = Command::new("ip")
                .args(["netns", "exec", &name, "sysctl", "-qw"])
                .arg(format!("net.ipv6.conf.{knob}.disable_ipv6=1"))
                .output();
        }
        Netns { name }
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Runs `f` on a thread that joined the namespace (the calling thread
    /// stays where it is) and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("the namespace thread")
    }

    /// Starts `f` on a thread that joined the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a namespace fd we hold.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Waits until interface `name` exists in the namespace and brings it up.
    pub fn link_up(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = Command::new("ip")
                .args(["-n", &self.name, "link", "set", name, "up"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never appeared in {}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The tap's transmit offloads as the host kernel has them: (checksum,
/// TCP segmentation), what `ethtool -k` shows as `tx-checksumming` and
/// `tcp-segmentation-offload` (the VMM sets them with TUNSETOFFLOAD from the
/// guest's GUEST_* features: the kernel may then hand the tap frames with
/// partial checksums and GSO frames). Read with the SIOCETHTOOL commands
/// ETHTOOL_GTXCSUM and ETHTOOL_GTSO (stable ABI; ETHTOOL_GFEATURES would
/// need the feature names from ETHTOOL_GSTRINGS), inside the namespace.
pub fn tap_offloads(net: &Netns, tap: &'static str) -> (bool, bool) {
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_GTSO: u32 = 0x1e;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    /// `struct ifreq` with `ifr_data`.
    #[repr(C)]
    struct IfreqData {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    net.run(move || {
        // SAFETY: a plain socket call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let get = |cmd: u32| {
            let mut value = EthtoolValue { cmd, data: 0 };
            let mut req = IfreqData {
                name: [0; libc::IFNAMSIZ],
                data: &mut value,
                _pad: [0; 16],
            };
            req.name[..tap.len()].copy_from_slice(tap.as_bytes());
            // SAFETY: SIOCETHTOOL with an ifreq whose ifr_data points at an
            // ethtool_value that outlives the call.
            let rc = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SIOCETHTOOL,
                    &mut req,
                )
            };
            assert_eq!(
                rc,
                0,
                "SIOCETHTOOL {cmd:#x} on {tap}: {}",
                std::io::Error::last_os_error()
            );
            value.data != 0
        };
        (get(ETHTOOL_GTXCSUM), get(ETHTOOL_GTSO))
    })
}

/// A raw Ethernet socket bound to one interface and ethertype.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens the socket in the calling thread's network namespace.
    pub fn bind(interface: &str, ethertype: u16) -> PacketSocket {
        let protocol = ethertype.to_be() as i32;
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(interface).unwrap();
        // SAFETY: name is a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {interface}");
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: addr is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            rc,
            0,
            "bind to {interface}: {}",
            std::io::Error::last_os_error()
        );
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setting a timeval option on our socket.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSocket { fd, ifindex }
    }

    /// Sends one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and addr are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame within `timeout`, or None.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 16384];
        while Instant::now() < deadline {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
        None
    }
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> [u8; 6] {
    config::parse_mac("mac", text).expect("a MAC address")
}
