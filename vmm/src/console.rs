//! Where the serial console goes: stdout/stdin, a file, a pty or a Unix
//! socket. The console outlives a VM (a reboot in place keeps it) and pumps
//! input into whichever serial device is current.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use config::SerialConfig;
use devices::legacy::SerialDevice;

/// The serial device input goes to, swapped on reboot.
pub type InputTarget = Arc<Mutex<Option<Arc<Mutex<SerialDevice>>>>>;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("serial file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serial socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open a pseudo-terminal: {0}")]
    Pty(std::io::Error),
    #[error("cannot start the console input thread: {0}")]
    Thread(std::io::Error),
}

impl ConsoleError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            ConsoleError::File { source, .. } | ConsoleError::Socket { source, .. } => {
                config::ErrorClass::of_io(source)
            }
            ConsoleError::Pty(_) | ConsoleError::Thread(_) => config::ErrorClass::Host,
        }
    }
}

/// The guest's console.
pub struct Console {
    output: SharedOutput,
    input: InputTarget,
    pty_path: Option<PathBuf>,
    socket_path: Option<PathBuf>,
}

/// The output side, cloneable so every serial device of the VM's life
/// writes to the same place.
#[derive(Clone)]
pub struct SharedOutput(Arc<Mutex<Output>>);

enum Output {
    Fd(File),
    /// A socket console: output goes to the connected client, if any.
    Client(Option<UnixStream>),
    Discard,
}

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *out {
            Output::Fd(f) => f.write_all(buf)?,
            Output::Client(client) => {
                // A client that went away loses its output; the guest never blocks on it.
                if let Some(stream) = client {
                    if stream.write_all(buf).is_err() {
                        *client = None;
                    }
                }
            }
            Output::Discard => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn open(config: &SerialConfig) -> Result<Console, ConsoleError> {
        let input: InputTarget = Arc::new(Mutex::new(None));
        let mut console = Console {
            output: SharedOutput(Arc::new(Mutex::new(Output::Discard))),
            input: input.clone(),
            pty_path: None,
            socket_path: None,
        };
        match config {
            SerialConfig::Off => {}
            SerialConfig::Stdout => {
                // SAFETY: fd 1 stays open for the life of the process; dup gives
                // us our own descriptor to own.
                let fd = unsafe { libc::dup(1) };
                if fd >= 0 {
                    // SAFETY: fd is a fresh descriptor we own.
                    let out = unsafe { File::from_raw_fd(fd) };
                    console.set_output(Output::Fd(out));
                }
                // SAFETY: as above, for stdin.
                let fd = unsafe { libc::dup(0) };
                if fd >= 0 {
                    // SAFETY: fd is a fresh descriptor we own.
                    let stdin = unsafe { File::from_raw_fd(fd) };
                    spawn_pump(stdin, input)?;
                }
            }
            SerialConfig::File { path } => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::File {
                        path: path.clone(),
                        source,
                    })?;
                console.set_output(Output::Fd(file));
            }
            SerialConfig::Pty => {
                let (master, path) = open_pty().map_err(ConsoleError::Pty)?;
                let reader = master.try_clone().map_err(ConsoleError::Pty)?;
                console.set_output(Output::Fd(master));
                spawn_pump(reader, input)?;
                console.pty_path = Some(path);
            }
            SerialConfig::Socket { path } => {
                let err = |source| ConsoleError::Socket {
                    path: path.clone(),
                    source,
                };
                if path.exists() {
                    // A socket someone still answers on belongs to a live VMM.
                    if UnixStream::connect(path).is_ok() {
                        return Err(err(std::io::Error::other(
                            "is in use by another process (a running VMM's console?)",
                        )));
                    }
                    std::fs::remove_file(path).map_err(err)?;
                }
                let listener = UnixListener::bind(path).map_err(err)?;
                console.set_output(Output::Client(None));
                spawn_socket_acceptor(listener, console.output.clone(), input)?;
                console.socket_path = Some(path.clone());
            }
        }
        Ok(console)
    }

    fn set_output(&mut self, output: Output) {
        *self.output.0.lock().unwrap_or_else(|e| e.into_inner()) = output;
    }

    pub fn output(&self) -> Box<dyn Write + Send> {
        Box::new(self.output.clone())
    }

    /// Directs console input to `serial` (the current VM's).
    pub fn attach(&self, serial: Option<Arc<Mutex<SerialDevice>>>) {
        *self.input.lock().unwrap_or_else(|e| e.into_inner()) = serial;
    }

    pub fn pty_path(&self) -> Option<&Path> {
        self.pty_path.as_deref()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Feeds bytes read from `source` into the attached serial device until EOF.
fn spawn_pump(source: impl Read + Send + 'static, target: InputTarget) -> Result<(), ConsoleError> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            confine::apply(confine::ThreadKind::Console);
            pump(source, &target)
        })
        .map(|_| ())
        .map_err(ConsoleError::Thread)
}

fn pump(mut source: impl Read, target: &InputTarget) {
    let mut buf = [0u8; 256];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let serial = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let taken = match serial {
                Some(serial) => serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_input(pending),
                None => 0,
            };
            pending = &pending[taken..];
            if !pending.is_empty() {
                // The guest has not drained its FIFO yet (or no VM runs).
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn spawn_socket_acceptor(
    listener: UnixListener,
    output: SharedOutput,
    input: InputTarget,
) -> Result<(), ConsoleError> {
    std::thread::Builder::new()
        .name("console-socket".into())
        .spawn(move || {
            confine::apply(confine::ThreadKind::Console);
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                *output.0.lock().unwrap_or_else(|e| e.into_inner()) = Output::Client(Some(stream));
                // One client at a time: serve its input until it disconnects.
                pump(reader, &input);
                *output.0.lock().unwrap_or_else(|e| e.into_inner()) = Output::Client(None);
            }
        })
        .map(|_| ())
        .map_err(ConsoleError::Thread)
}

/// Opens a pty master in raw mode; returns it and the slave's path.
fn open_pty() -> std::io::Result<(File, PathBuf)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt on our own master fd.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
        // SAFETY: unlockpt on our own master fd.
        || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: name is a writable buffer of the given length.
    if unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // Raw mode on the slave side so the guest sees bytes as typed.
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: master is a valid tty fd; termios is a valid out-pointer.
    if unsafe { libc::tcgetattr(master.as_raw_fd(), &mut termios) } == 0 {
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut termios) };
        // SAFETY: valid fd and termios.
        unsafe { libc::tcsetattr(master.as_raw_fd(), libc::TCSANOW, &termios) };
    }
    Ok((File::from(master), PathBuf::from(path)))
}
