//! `vmmctl console`: attaches this terminal to a guest's serial console.
//!
//! The terminal goes to raw mode, so every key (Ctrl-C included) reaches the
//! guest as a byte and no signal is raised; Ctrl-] detaches. The console is
//! the VM's socket (or pty) from `vm.info`, or a socket named directly.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use api::http::ApiClient;
use config::SerialConfig;

use crate::{client_error, EXIT_REFUSED, EXIT_UNREACHABLE};

/// The detach key: Ctrl-] (as telnet and virsh console use).
pub(crate) const ESCAPE: u8 = 0x1d;

/// Which console to attach to.
#[derive(Debug, PartialEq)]
pub(crate) enum ConsoleTarget {
    /// The console of the VMM on the API socket, found with `vm.info`.
    Api,
    /// A console socket named directly.
    Socket(PathBuf),
}

/// The console's stream: a socket or a pty.
enum Peer {
    Socket(UnixStream),
    Pty(File),
}

impl Peer {
    fn fd(&self) -> RawFd {
        match self {
            Peer::Socket(s) => s.as_raw_fd(),
            Peer::Pty(f) => f.as_raw_fd(),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Peer::Socket(s) => s.write_all(bytes),
            Peer::Pty(f) => f.write_all(bytes),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Peer::Socket(s) => s.read(buf),
            Peer::Pty(f) => f.read(buf),
        }
    }

    /// No more input: a socket peer still sends output.
    fn end_input(&self) {
        if let Peer::Socket(s) = self {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Finds the console, attaches stdin/stdout to it until Ctrl-], the end of
/// the console (the VMM exited) or an error.
pub(crate) fn attach(client: &ApiClient, target: &ConsoleTarget) -> Result<String, (u8, String)> {
    let mut peer = match target {
        ConsoleTarget::Socket(path) => connect(path)?,
        ConsoleTarget::Api => {
            let info = client.info().map_err(|e| client_error(&e))?;
            match &info.config.serial {
                SerialConfig::Socket { path, .. } => connect(path)?,
                SerialConfig::Pty => {
                    let path = info
                        .serial_pty
                        .ok_or((EXIT_REFUSED, "the VMM names no pty".to_string()))?;
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| (EXIT_UNREACHABLE, format!("{}: {e}", path.display())))?;
                    Peer::Pty(file)
                }
                other => {
                    return Err((
                        EXIT_REFUSED,
                        format!(
                            "the VM's console is {}, not a socket or a pty",
                            serial_mode(other)
                        ),
                    ))
                }
            }
        }
    };
    let raw = RawTerminal::enter(0);
    if raw.is_some() {
        eprint!("vmmctl: attached to the console; detach with Ctrl-]\r\n");
    }
    let outcome = relay(&mut peer);
    drop(raw);
    match outcome {
        Ok(Ending::Detached) => {
            eprintln!("\nvmmctl: detached");
            Ok(String::new())
        }
        Ok(Ending::Closed) => {
            eprintln!("\nvmmctl: the console closed (the VMM exited?)");
            Ok(String::new())
        }
        Err(e) => Err((EXIT_UNREACHABLE, format!("console: {e}"))),
    }
}

fn serial_mode(serial: &SerialConfig) -> &'static str {
    match serial {
        SerialConfig::Stdout => "the VMM's stdout",
        SerialConfig::Off => "off",
        SerialConfig::File { .. } => "a file",
        SerialConfig::Pty => "a pty",
        SerialConfig::Socket { .. } => "a socket",
    }
}

fn connect(path: &Path) -> Result<Peer, (u8, String)> {
    UnixStream::connect(path)
        .map(Peer::Socket)
        .map_err(|e| (EXIT_UNREACHABLE, format!("{}: {e}", path.display())))
}

enum Ending {
    Detached,
    Closed,
}

/// Copies stdin to the console and the console to stdout.
fn relay(peer: &mut Peer) -> io::Result<Ending> {
    let mut stdin_open = true;
    let mut buf = [0u8; 16 << 10];
    let mut stdout = io::stdout().lock();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: peer.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: 0,
                events: if stdin_open { libc::POLLIN } else { 0 },
                revents: 0,
            },
        ];
        let count = if stdin_open { 2 } else { 1 };
        // SAFETY: fds is a valid array of at least `count` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), count, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            match peer.read(&mut buf) {
                Ok(0) => return Ok(Ending::Closed),
                Ok(n) => {
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A pty whose VMM is gone.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(Ending::Closed),
                Err(e) => return Err(e),
            }
        }
        if stdin_open && fds[1].revents != 0 {
            // SAFETY: buf is valid for writes of its length; fd 0 is open.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                continue;
            }
            if n == 0 {
                // Piped input ended: keep showing output until the console ends.
                stdin_open = false;
                peer.end_input();
                continue;
            }
            let typed = &buf[..n as usize];
            if let Some(at) = typed.iter().position(|&b| b == ESCAPE) {
                peer.write_all(&typed[..at])?;
                return Ok(Ending::Detached);
            }
            peer.write_all(typed)?;
        }
    }
}

/// A terminal in raw mode, restored when dropped.
struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal.
    fn enter(fd: RawFd) -> Option<RawTerminal> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: saved is a valid out-pointer; fd may or may not be a tty.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct in place. No ISIG: Ctrl-C, Ctrl-Z
        // and Ctrl-\ are bytes for the guest, not signals.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Output processing stays: a guest line that ends in a bare LF
        // (firmware, the test guest) starts at the left margin instead of
        // stair-stepping; Linux's CR LF shows the same as before.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: fd is a terminal and raw a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read from the same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSAFLUSH, &self.saved) };
    }
}
