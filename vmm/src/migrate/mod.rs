//! Live migration between two `vmm` processes: the sending side
//! ([`send`]) runs pre-copy rounds over KVM's dirty log and switches over;
//! the receiving side ([`receive`]) builds the VM from the source's config,
//! takes memory and state, and starts the guest only once everything
//! arrived. Both run on threads of their own; what needs the VM itself
//! (pausing, snapshots, starting) goes through the control loop as a
//! [`MigrationCall`], so the API keeps answering throughout.

pub mod file;
pub mod receive;
pub mod send;
pub mod stream;
pub mod tls;

use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::request::{MigrationParameters, MigrationStatus, VmState};
use config::{ConfigError, VmConfig};
use devices::DeviceError;
use migration::protocol::ProtocolError;

use crate::console::ConsoleError;
use crate::dirty_log::DirtyLogError;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::SnapshotError;
use crate::vm::VmError;

pub use stream::{connect, IoVecs, ReceiveStream, Socket, SocketKind, Stream};
pub use tls::TlsError;

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
    #[error("timed out after {0} s")]
    TimedOut(u64),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("no authenticated source connected within {0} s")]
    NoSource(u64),
    #[error("cancelled")]
    Cancelled,
    #[error("the snapshot is corrupt: {0}")]
    CorruptSnapshot(String),
    #[error(transparent)]
    SnapshotFile(#[from] file::SnapshotFileError),
    /// The control loop is gone or answered out of turn.
    #[error("the VMM is shutting down")]
    ShuttingDown,
}

impl MigrationError {
    /// Whose fault it is, for a restore refused over the API.
    pub fn class(&self) -> config::ErrorClass {
        use config::ErrorClass;
        match self {
            MigrationError::Protocol(_)
            | MigrationError::CorruptSnapshot(_)
            | MigrationError::InvalidConfig(_)
            | MigrationError::Incompatible(_)
            | MigrationError::Snapshot(_) => ErrorClass::Caller,
            MigrationError::SnapshotFile(e) => e.class(),
            MigrationError::Device(e) => e.class(),
            MigrationError::Build(e) => e.class(),
            MigrationError::Busy(_) => ErrorClass::Conflict,
            _ => ErrorClass::Host,
        }
    }
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
    cancel: AtomicBool,
    /// The outgoing connection, while a cancel may still cut it (until
    /// `Complete` goes out).
    connection: Mutex<Option<SocketKind>>,
}

impl MigrationShared {
    /// Stops the outgoing migration: sets the flag the sender checks and
    /// shuts its connection down, so a send blocked on a stalled peer
    /// returns at once. After `Complete` went out ([`Self::commit`]) only
    /// the flag is set: the outcome must be read, not cut off.
    pub fn cancel(&self) {
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(socket) = connection.as_ref() {
            socket.shutdown();
        }
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// A new outgoing migration: not cancelled, connection `socket`.
    pub fn start(&self, socket: Option<SocketKind>) {
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = socket;
    }

    pub fn reset_cancel(&self) {
        self.cancel.store(false, Ordering::SeqCst);
    }

    /// Before `Complete`: fails if a cancel came first; after it, a cancel
    /// no longer cuts the connection.
    pub fn commit(&self) -> Result<(), MigrationError> {
        let mut connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        if self.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        *connection = None;
        Ok(())
    }

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
    /// Target: run the guest (`run`), or keep it paused (a snapshot of a
    /// paused guest).
    Start { run: bool },
    /// Target: the migration (or restore) failed; nothing runs.
    Failed(String, config::ErrorClass),
    /// Restore: take the disk locks now (no source holds them).
    AcquireDisks,
    /// Snapshot: the file is written and synced (its size), or not.
    SnapshotDone(Result<u64, MigrationError>),
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

    /// The next connection, or None once `deadline` passed without one.
    pub fn accept_until(&self, deadline: Instant) -> io::Result<Option<Socket>> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 60_000) as libc::c_int;
            // SAFETY: pfd is one valid pollfd for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                continue;
            }
            let kind = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| SocketKind::Tcp(s)),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| SocketKind::Unix(s)),
            };
            match kind {
                // Accepted sockets are blocking whatever the listener is.
                Ok(kind) => return Socket::new(kind).map(Some),
                // The peer gave up between poll and accept.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Logs switch-over timings at debug level (info with VMM_MIGRATION_TRACE set).
pub fn trace(what: &str, since: std::time::Instant) {
    let level = if std::env::var_os("VMM_MIGRATION_TRACE").is_some() {
        log::Level::Info
    } else {
        log::Level::Debug
    };
    log::log!(
        level,
        "migration: {:>8.3} ms: {what}",
        since.elapsed().as_secs_f64() * 1e3
    );
}
