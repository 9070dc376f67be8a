//! Live migration between two `vmm` processes: the sending side
//! ([`send`]) runs pre-copy rounds over KVM's dirty log and switches over;
//! the receiving side ([`receive`]) builds the VM from the source's config,
//! takes memory and state, and starts the guest only once everything
//! arrived. Both run on threads of their own; what needs the VM itself
//! (pausing, snapshots, starting) goes through the control loop as a
//! [`MigrationCall`], so the API keeps answering throughout.

pub mod receive;
pub mod send;

use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::request::{MigrationParameters, MigrationStatus, VmState};
use config::{ConfigError, VmConfig};
use devices::DeviceError;
use migration::protocol::ProtocolError;

use crate::console::ConsoleError;
use crate::dirty_log::DirtyLogError;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::SnapshotError;
use crate::vm::VmError;

/// A connection read or write that stalls this long fails the migration.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the target gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a migration failed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cannot connect to {destination}: {source}")]
    Connect {
        destination: String,
        #[source]
        source: io::Error,
    },
    #[error("accepting the migration connection: {0}")]
    Accept(#[source] io::Error),
    #[error("dirty log: {0}")]
    DirtyLog(#[from] DirtyLogError),
    #[error("guest memory: {what}: {source}")]
    Memory {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot build the VM: {0}")]
    Build(#[from] VmError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("the source's config is invalid: {0}")]
    InvalidConfig(#[source] ConfigError),
    #[error("the local VM config does not fit the source's: {0}")]
    Incompatible(#[source] ConfigError),
    #[error("a VM already runs here (state {0})")]
    Busy(VmState),
    #[error("timed out after {0} s without converging")]
    TimedOut(u64),
    #[error("cancelled")]
    Cancelled,
    /// The control loop is gone or answered out of turn.
    #[error("the VMM is shutting down")]
    ShuttingDown,
}

impl From<io::Error> for MigrationError {
    fn from(e: io::Error) -> Self {
        MigrationError::Protocol(ProtocolError::Io(e))
    }
}

/// State shared between a migration thread, the control loop and the API.
#[derive(Default)]
pub struct MigrationShared {
    pub status: Mutex<MigrationStatus>,
    pub parameters: Mutex<MigrationParameters>,
    pub cancel: AtomicBool,
}

impl MigrationShared {
    pub fn status(&self) -> MigrationStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn parameters(&self) -> MigrationParameters {
        self.parameters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a migration thread asks of the control loop.
pub enum MigrationCall {
    /// Source: pause vCPUs and devices, snapshot the VM state (JSON), then
    /// flush disks and release their locks.
    SwitchOver,
    /// Source: the migration failed before the target got `Complete`:
    /// take the disks back and let the guest run again.
    Abort,
    /// Source: the target got `Complete` but never confirmed it runs the
    /// guest: stay paused (the guest may run there), end the migration.
    Undecided,
    /// Source: the guest runs on the target; this VMM exits "migrated".
    Finished,
    /// Target: build the VM (not started) from the source's config.
    Build(Box<VmConfig>),
    /// Target: take the disks, then restore the state (JSON).
    Restore(Vec<u8>),
    /// Target: run the guest.
    Start,
    /// Target: the migration failed; exit without running anything.
    Failed(String),
}

pub enum MigrationReply {
    Done,
    Snapshot(Vec<u8>),
    Memory(Arc<GuestMemoryMmap>),
}

/// Where the control loop's answer to a [`MigrationCall`] goes.
pub type MigrationReplySender = SyncSender<Result<MigrationReply, MigrationError>>;

/// How a migration thread reaches the control loop (as `VmEventSink` does
/// for the VM): the loop passes each call with its reply channel on. False
/// when the loop is gone.
pub type ControlHandle = Arc<dyn Fn(MigrationCall, MigrationReplySender) -> bool + Send + Sync>;

/// Asks the control loop and waits for its answer.
pub fn call(
    control: &ControlHandle,
    call: MigrationCall,
) -> Result<MigrationReply, MigrationError> {
    let (reply, answer) = sync_channel(1);
    if !control(call, reply) {
        return Err(MigrationError::ShuttingDown);
    }
    answer.recv().map_err(|_| MigrationError::ShuttingDown)?
}

/// A connected migration stream (TCP or Unix).
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn configure(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                // Small control messages must not wait for Nagle.
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to `tcp:HOST:PORT` or `unix:PATH`.
pub fn connect(url: &str) -> io::Result<Stream> {
    let stream = match url.split_once(':') {
        Some(("tcp", address)) => {
            let mut last = io::Error::other(format!("{address} resolves to nothing"));
            let mut connected = None;
            for addr in address.to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        connected = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            Stream::Tcp(connected.ok_or(last)?)
        }
        Some(("unix", path)) => Stream::Unix(UnixStream::connect(path)?),
        _ => {
            return Err(io::Error::other(format!(
                "{url:?} is not tcp:HOST:PORT or unix:PATH"
            )))
        }
    };
    stream.configure()?;
    Ok(stream)
}

/// A listening socket for an incoming migration.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    pub fn bind(url: &str) -> io::Result<Listener> {
        match url.split_once(':') {
            Some(("tcp", address)) => Ok(Listener::Tcp(TcpListener::bind(address)?)),
            Some(("unix", path)) => {
                // Never deletes anything but a stale socket; dropping the
                // Listener removes the socket.
                let (listener, file) = api::socket::bind(std::path::Path::new(path), None)?;
                Ok(Listener::Unix(listener, file.into_path()))
            }
            _ => Err(io::Error::other(format!(
                "{url:?} is not tcp:HOST:PORT or unix:PATH"
            ))),
        }
    }

    pub fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
        };
        stream.configure()?;
        Ok(stream)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes all of `iov` with writev, resuming after partial writes.
pub fn write_all_vectored(fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<u64> {
    let mut total = 0u64;
    let mut start = 0;
    while start < iov.len() {
        let count = (iov.len() - start).min(1024);
        // SAFETY: every iovec points at memory that stays mapped for the
        // call (guest RAM or buffers owned by the caller).
        let n = unsafe { libc::writev(fd, iov[start..].as_ptr(), count as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the peer stopped reading",
            ));
        }
        let mut n = n as usize;
        total += n as u64;
        while n > 0 && start < iov.len() {
            let len = iov[start].iov_len;
            if n >= len {
                n -= len;
                start += 1;
            } else {
                // SAFETY: advancing within the same buffer by n < len bytes.
                iov[start].iov_base = unsafe { iov[start].iov_base.cast::<u8>().add(n) }.cast();
                iov[start].iov_len = len - n;
                n = 0;
            }
        }
        while start < iov.len() && iov[start].iov_len == 0 {
            start += 1;
        }
    }
    Ok(total)
}

/// Reads exactly `len` bytes from `fd` into host memory at `ptr`.
///
/// # Safety
/// `ptr..ptr+len` must be writable memory (guest RAM) that stays mapped.
pub unsafe fn read_exact_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller guarantees the destination is writable for len bytes.
        let n = unsafe { libc::read(fd, ptr.add(done).cast(), len - done) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// With VMM_MIGRATION_TRACE set, prints switch-over timings to stderr.
pub fn trace(what: &str, since: std::time::Instant) {
    if std::env::var_os("VMM_MIGRATION_TRACE").is_some() {
        eprintln!(
            "vmm: migration: {:>8.3} ms: {what}",
            since.elapsed().as_secs_f64() * 1e3
        );
    }
}
