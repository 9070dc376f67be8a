//! Where the serial console goes: stdout/stdin, a file, a pty or a Unix
//! socket. The console outlives a VM (a reboot in place keeps it) and pumps
//! input into whichever serial device is current.
//!
//! Console output never blocks a vCPU: the serial device writes into a
//! bounded ring buffer ([`ConsoleBuffer`]) and returns; a console thread
//! serves the sinks from it. A slow file or terminal only makes that thread
//! fall behind (it skips what the ring lost); socket clients are written
//! without blocking, each from its own position in the ring, starting with
//! the recent output (the newer half of the ring), and one that falls a
//! whole buffer behind is dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use api::socket::{SocketError, SocketFile};
use config::SerialConfig;
use devices::legacy::SerialDevice;
use vmm_sys_util::eventfd::EventFd;

/// The serial device input goes to, swapped on reboot.
pub type InputTarget = Arc<Mutex<Option<Arc<Mutex<SerialDevice>>>>>;

/// How many socket clients may watch at once; more are turned away.
const MAX_CLIENTS: usize = 16;
/// How long the VMM's exit waits for the console to write what is left.
const EXIT_FLUSH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("serial file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("serial socket {0}")]
    Socket(#[from] SocketError),
    #[error("cannot open a pseudo-terminal: {0}")]
    Pty(io::Error),
    #[error("cannot start the console thread: {0}")]
    Thread(io::Error),
}

impl ConsoleError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            ConsoleError::File { source, .. } => config::ErrorClass::of_io(source),
            ConsoleError::Socket(e) => e.class(),
            ConsoleError::Pty(_) | ConsoleError::Thread(_) => config::ErrorClass::Host,
        }
    }
}

/// The console's output: a ring of the last `capacity` bytes, addressed by
/// offsets that count every byte the guest ever wrote.
pub struct ConsoleBuffer {
    ring: Mutex<Ring>,
    /// Wakes the console thread.
    wake: EventFd,
    /// Whether a wake-up is pending: one eventfd write per burst of output,
    /// not per byte.
    woken: AtomicBool,
}

struct Ring {
    data: Box<[u8]>,
    /// Offset just past the newest byte.
    end: u64,
}

impl Ring {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }

    /// Offset of the oldest byte still held.
    fn start(&self) -> u64 {
        self.end.saturating_sub(self.capacity())
    }

    fn push(&mut self, mut bytes: &[u8]) {
        let capacity = self.data.len();
        if bytes.len() > capacity {
            self.end += (bytes.len() - capacity) as u64;
            bytes = &bytes[bytes.len() - capacity..];
        }
        let at = (self.end % capacity as u64) as usize;
        let first = bytes.len().min(capacity - at);
        self.data[at..at + first].copy_from_slice(&bytes[..first]);
        self.data[..bytes.len() - first].copy_from_slice(&bytes[first..]);
        self.end += bytes.len() as u64;
    }

    /// Copies bytes from offset `pos` (at least [`Ring::start`]) into `out`.
    fn copy_from(&self, pos: u64, out: &mut [u8]) -> usize {
        let capacity = self.data.len();
        let n = ((self.end - pos) as usize).min(out.len());
        let at = (pos % capacity as u64) as usize;
        let first = n.min(capacity - at);
        out[..first].copy_from_slice(&self.data[at..at + first]);
        out[first..n].copy_from_slice(&self.data[..n - first]);
        n
    }
}

impl ConsoleBuffer {
    pub fn new(capacity: usize) -> io::Result<ConsoleBuffer> {
        Ok(ConsoleBuffer {
            ring: Mutex::new(Ring {
                data: vec![0; capacity.max(1)].into_boxed_slice(),
                end: 0,
            }),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            woken: AtomicBool::new(false),
        })
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends guest output; never blocks on any reader.
    pub fn write(&self, bytes: &[u8]) {
        self.ring().push(bytes);
        self.wake();
    }

    fn wake(&self) {
        if !self.woken.swap(true, Ordering::SeqCst) {
            // A full eventfd counter (never, at one write per burst) only
            // means the thread is awake already.
            let _ = self.wake.write(1);
        }
    }

    /// Bytes from offset `pos` into `out`: Ok(count), or Err(oldest offset
    /// held) when the bytes at `pos` were overwritten.
    pub fn read(&self, pos: u64, out: &mut [u8]) -> Result<usize, u64> {
        let ring = self.ring();
        if pos < ring.start() {
            return Err(ring.start());
        }
        Ok(ring.copy_from(pos.min(ring.end), out))
    }

    /// The oldest offset held and the offset just past the newest byte.
    pub fn range(&self) -> (u64, u64) {
        let ring = self.ring();
        (ring.start(), ring.end)
    }

    pub fn capacity(&self) -> u64 {
        self.ring().capacity()
    }
}

/// What the serial device writes to.
struct ConsoleOutput(Arc<ConsoleBuffer>);

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's console.
pub struct Console {
    buffer: Option<Arc<ConsoleBuffer>>,
    input: InputTarget,
    pty_path: Option<PathBuf>,
    worker: Option<Worker>,
    /// The socket file, removed when the console goes (if still ours).
    _socket: Option<SocketFile>,
}

/// The console thread and how to stop it.
struct Worker {
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Where the console thread sends output (and takes input from).
enum Sink {
    /// A file or stdout: blocking writes on the console thread.
    Fd(File),
    /// A pty master (non-blocking); the VMM holds the slave open too, so
    /// the pty stays usable when no one has it open.
    Pty { master: File, _slave: File },
    /// A socket's clients.
    Socket(UnixListener),
}

impl Console {
    pub fn open(config: &SerialConfig) -> Result<Console, ConsoleError> {
        let input: InputTarget = Arc::new(Mutex::new(None));
        let mut console = Console {
            buffer: None,
            input: input.clone(),
            pty_path: None,
            worker: None,
            _socket: None,
        };
        let sink = match config {
            SerialConfig::Off => return Ok(console),
            SerialConfig::Stdout => {
                // SAFETY: fd 0 stays open for the life of the process; dup
                // gives us our own descriptor to own.
                let fd = unsafe { libc::dup(0) };
                if fd >= 0 {
                    // SAFETY: fd is a fresh descriptor we own.
                    let stdin = unsafe { File::from_raw_fd(fd) };
                    spawn_pump(stdin, input.clone())?;
                }
                // SAFETY: as above, for stdout.
                let fd = unsafe { libc::dup(1) };
                if fd < 0 {
                    return Ok(console);
                }
                // SAFETY: fd is a fresh descriptor we own.
                Sink::Fd(unsafe { File::from_raw_fd(fd) })
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
                Sink::Fd(file)
            }
            SerialConfig::Pty => {
                let (master, slave, path) = open_pty().map_err(ConsoleError::Pty)?;
                console.pty_path = Some(path);
                Sink::Pty {
                    master,
                    _slave: slave,
                }
            }
            SerialConfig::Socket { path, group, .. } => {
                let (listener, file) = api::socket::bind(path, group.as_deref())?;
                listener
                    .set_nonblocking(true)
                    .map_err(ConsoleError::Thread)?;
                console._socket = Some(file);
                Sink::Socket(listener)
            }
        };
        let capacity = usize::try_from(config.buffer_bytes()).unwrap_or(usize::MAX);
        let buffer = Arc::new(ConsoleBuffer::new(capacity).map_err(ConsoleError::Thread)?);
        console.worker = Some(spawn_worker(sink, buffer.clone(), input)?);
        console.buffer = Some(buffer);
        Ok(console)
    }

    /// Checks that the console of `config` can be opened without taking
    /// anything that is not ours (a file, a live socket at its path).
    pub fn check(config: &SerialConfig) -> Result<(), ConsoleError> {
        match config {
            SerialConfig::Socket { path, .. } => Ok(api::socket::check_free(path)?),
            _ => Ok(()),
        }
    }

    pub fn output(&self) -> Box<dyn Write + Send> {
        match &self.buffer {
            Some(buffer) => Box::new(ConsoleOutput(buffer.clone())),
            None => Box::new(io::sink()),
        }
    }

    /// The console's output buffer (none for `off`).
    pub fn buffer(&self) -> Option<&Arc<ConsoleBuffer>> {
        self.buffer.as_ref()
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
        // Let the thread write what is left (bounded: a sink nobody reads
        // must not hold the VMM's exit up).
        if let Some(worker) = self.worker.take() {
            worker.stop.store(true, Ordering::SeqCst);
            if let Some(buffer) = &self.buffer {
                let _ = buffer.wake.write(1);
            }
            if worker.done.recv_timeout(EXIT_FLUSH).is_ok() {
                let _ = worker.thread.join();
            }
        }
    }
}

/// Feeds bytes read from `source` into the attached serial device until EOF.
fn spawn_pump(
    mut source: impl Read + Send + 'static,
    target: InputTarget,
) -> Result<(), ConsoleError> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            confine::apply(confine::ThreadKind::Console);
            let mut buf = [0u8; 256];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    pending = &pending[feed(&target, pending)..];
                    if !pending.is_empty() {
                        // The guest has not drained its FIFO yet (or no VM runs).
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(ConsoleError::Thread)
}

/// Puts what the serial FIFO takes of `bytes`; returns how many it took.
fn feed(target: &InputTarget, bytes: &[u8]) -> usize {
    let serial = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match serial {
        Some(serial) => serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(bytes),
        None => 0,
    }
}

fn spawn_worker(
    sink: Sink,
    buffer: Arc<ConsoleBuffer>,
    input: InputTarget,
) -> Result<Worker, ConsoleError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done) = mpsc::channel();
    let mut worker = ConsoleThread {
        buffer,
        input,
        stop: stop.clone(),
        pending_input: Vec::new(),
        sink_pos: 0,
        clients: Vec::new(),
        writer: None,
        next_id: 1,
    };
    let thread = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            confine::apply(confine::ThreadKind::Console);
            worker.run(sink);
            let _ = done_tx.send(());
        })
        .map_err(ConsoleError::Thread)?;
    Ok(Worker { stop, done, thread })
}

/// A socket client: a non-blocking stream and where it is in the ring.
struct Client {
    id: u64,
    stream: UnixStream,
    pos: u64,
    /// False once the client shut its sending side: it may still watch.
    reading: bool,
}

struct ConsoleThread {
    buffer: Arc<ConsoleBuffer>,
    input: InputTarget,
    stop: Arc<AtomicBool>,
    /// Input the serial FIFO has not taken yet (from the writer or the pty).
    pending_input: Vec<u8>,
    /// Where the file, stdout or pty sink is in the ring.
    sink_pos: u64,
    clients: Vec<Client>,
    /// The client whose input goes to the guest.
    writer: Option<u64>,
    next_id: u64,
}

/// What a read of a client's (or the pty's) input found.
#[derive(PartialEq)]
enum Input {
    Data,
    /// Nothing for now.
    Nothing,
    /// End of its input (or an error).
    End,
}

/// What happened to a non-blocking write of the ring from `pos`.
enum Sent {
    /// Everything up to the ring's end went out.
    All,
    /// The peer takes no more for now.
    Blocked,
    /// The bytes at `pos` were overwritten before they went out.
    Behind,
    /// The peer is gone.
    Gone,
}

impl ConsoleThread {
    fn run(&mut self, mut sink: Sink) {
        if let Sink::Pty { master, .. } = &sink {
            let _ = set_nonblocking(master.as_raw_fd());
        }
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            // Drained, then cleared, before reading the ring: output
            // written after the clear wakes the thread again, output
            // written before it is seen below.
            let _ = self.buffer.wake.read();
            self.buffer.woken.store(false, Ordering::SeqCst);
            let mut sink_blocked = false;
            match &mut sink {
                Sink::Fd(file) => self.write_blocking(file),
                Sink::Pty { master, .. } => {
                    sink_blocked = self.write_pty(master);
                }
                Sink::Socket(_) => self.write_clients(),
            }
            self.feed_input();
            if stopping {
                return;
            }
            self.wait(&mut sink, sink_blocked);
        }
    }

    /// Writes the ring to a file or stdout, blocking; a sink that lost
    /// output (it was slower than the guest) goes on from the oldest byte.
    fn write_blocking(&mut self, file: &mut File) {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = match self.buffer.read(self.sink_pos, &mut chunk) {
                Ok(0) => return,
                Ok(n) => n,
                Err(start) => {
                    self.sink_pos = start;
                    continue;
                }
            };
            if file.write_all(&chunk[..n]).is_err() {
                // Nowhere to write (closed stdout): drop the output.
                self.sink_pos = self.buffer.range().1;
                return;
            }
            self.sink_pos += n as u64;
        }
    }

    /// Writes the ring to the pty without blocking; true if the pty is full.
    fn write_pty(&mut self, master: &mut File) -> bool {
        loop {
            match send(&self.buffer, master, &mut self.sink_pos) {
                Sent::All => return false,
                Sent::Blocked => return true,
                // Whoever reads the pty missed some output: go on.
                Sent::Behind => self.sink_pos = self.buffer.range().0,
                Sent::Gone => {
                    self.sink_pos = self.buffer.range().1;
                    return false;
                }
            }
        }
    }

    fn write_clients(&mut self) {
        let capacity = self.buffer.capacity();
        let mut i = 0;
        while i < self.clients.len() {
            let client = &mut self.clients[i];
            match send(&self.buffer, &mut client.stream, &mut client.pos) {
                Sent::All | Sent::Blocked => i += 1,
                Sent::Behind => {
                    log::warn!(
                        "console: dropped client {}: it fell {capacity} bytes behind",
                        client.id
                    );
                    self.remove_client(i);
                }
                Sent::Gone => {
                    // What it typed before it hung up still counts.
                    let (id, fd) = (client.id, client.stream.as_raw_fd());
                    while self.read_input(fd, Some(id)) == Input::Data {}
                    self.remove_client(i);
                }
            }
        }
    }

    fn remove_client(&mut self, i: usize) {
        let client = self.clients.swap_remove(i);
        if self.writer == Some(client.id) {
            self.writer = None;
        }
    }

    /// Puts pending input into the serial FIFO, as far as it takes it.
    fn feed_input(&mut self) {
        if !self.pending_input.is_empty() {
            let taken = feed(&self.input, &self.pending_input);
            self.pending_input.drain(..taken);
        }
    }

    /// Waits for output, input, a client or room to write.
    fn wait(&mut self, sink: &mut Sink, sink_blocked: bool) {
        let end = self.buffer.range().1;
        let want_input = self.pending_input.len() < 4096;
        let mut fds = vec![poll_fd(self.buffer.wake.as_raw_fd(), libc::POLLIN)];
        match sink {
            Sink::Fd(_) => {}
            Sink::Pty { master, .. } => {
                let mut events = 0;
                if want_input {
                    events |= libc::POLLIN;
                }
                if sink_blocked {
                    events |= libc::POLLOUT;
                }
                fds.push(poll_fd(master.as_raw_fd(), events));
            }
            Sink::Socket(listener) => {
                fds.push(poll_fd(listener.as_raw_fd(), libc::POLLIN));
                for client in &self.clients {
                    let mut events = 0;
                    if client.reading && (want_input || self.writer != Some(client.id)) {
                        events |= libc::POLLIN;
                    }
                    if client.pos < end {
                        events |= libc::POLLOUT;
                    }
                    fds.push(poll_fd(client.stream.as_raw_fd(), events));
                }
            }
        }
        // Input the FIFO did not take is retried soon.
        let timeout = if self.pending_input.is_empty() { -1 } else { 2 };
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            return;
        }
        match sink {
            Sink::Fd(_) => {}
            Sink::Pty { master, .. } => {
                if fds[1].revents & libc::POLLIN != 0 {
                    let _ = self.read_input(master.as_raw_fd(), None);
                }
            }
            Sink::Socket(listener) => {
                // Clients first, by position, before the list changes.
                let ready: Vec<(u64, i16)> = self
                    .clients
                    .iter()
                    .zip(&fds[2..])
                    .map(|(c, fd)| (c.id, fd.revents))
                    .collect();
                for (id, revents) in ready {
                    let Some(i) = self.clients.iter().position(|c| c.id == id) else {
                        continue;
                    };
                    if revents & libc::POLLIN != 0 {
                        let fd = self.clients[i].stream.as_raw_fd();
                        if self.read_input(fd, Some(id)) == Input::End {
                            // End of its input: it may still watch.
                            self.clients[i].reading = false;
                            if self.writer == Some(id) {
                                self.writer = None;
                            }
                        }
                    } else if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                        self.remove_client(i);
                    }
                }
                if fds[1].revents & libc::POLLIN != 0 {
                    self.accept(listener);
                }
            }
        }
    }

    /// Reads input from `fd`: the pty (`from` None) or a client. Only the
    /// writer's input reaches the guest; if there is no writer, the first
    /// client that types becomes it.
    fn read_input(&mut self, fd: RawFd, from: Option<u64>) -> Input {
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for writes of its length; fd is open.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Input::Nothing,
                _ => Input::End,
            };
        }
        if n == 0 {
            return Input::End;
        }
        if let Some(id) = from {
            if self.writer.is_none() {
                self.writer = Some(id);
            }
            if self.writer != Some(id) {
                return Input::Data;
            }
        }
        self.pending_input.extend_from_slice(&buf[..n as usize]);
        self.feed_input();
        Input::Data
    }

    fn accept(&mut self, listener: &UnixListener) {
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("console: refused a client: {MAX_CLIENTS} are attached");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            if self.writer.is_none() {
                self.writer = Some(id);
            }
            // The recent output first: the newer half of the ring, so that
            // the client has half a ring of slack before it counts as stuck.
            let (start, end) = self.buffer.range();
            let pos = start.max(end.saturating_sub(self.buffer.capacity() / 2));
            self.clients.push(Client {
                id,
                stream,
                pos,
                reading: true,
            });
        }
    }
}

/// Writes the ring from `*pos` to `out` without blocking.
fn send(buffer: &ConsoleBuffer, out: &mut impl Write, pos: &mut u64) -> Sent {
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = match buffer.read(*pos, &mut chunk) {
            Ok(0) => return Sent::All,
            Ok(n) => n,
            Err(_) => return Sent::Behind,
        };
        match out.write(&chunk[..n]) {
            Ok(0) => return Sent::Gone,
            Ok(written) => *pos += written as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Sent::Gone,
        }
    }
}

fn poll_fd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pty in raw mode; returns its master, its slave (held open so the
/// master never sees a hang-up) and the slave's path.
fn open_pty() -> io::Result<(File, File, PathBuf)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt on our own master fd.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
        // SAFETY: unlockpt on our own master fd.
        || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: name is a writable buffer of the given length.
    if unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // Raw mode so the guest sees bytes as typed.
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: master is a valid tty fd; termios is a valid out-pointer.
    if unsafe { libc::tcgetattr(master.as_raw_fd(), &mut termios) } == 0 {
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut termios) };
        // SAFETY: valid fd and termios.
        unsafe { libc::tcsetattr(master.as_raw_fd(), libc::TCSANOW, &termios) };
    }
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&path)?;
    Ok((File::from(master), slave, PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes_at_their_offsets() {
        let buffer = ConsoleBuffer::new(8).unwrap();
        buffer.write(b"abcdef");
        let mut out = [0u8; 16];
        assert_eq!(buffer.read(0, &mut out), Ok(6));
        assert_eq!(&out[..6], b"abcdef");
        buffer.write(b"ghijk");
        // 11 bytes written, 8 held: offsets 3..11.
        assert_eq!(buffer.range(), (3, 11));
        assert_eq!(buffer.read(2, &mut out), Err(3));
        assert_eq!(buffer.read(3, &mut out), Ok(8));
        assert_eq!(&out[..8], b"defghijk");
        assert_eq!(buffer.read(9, &mut out[..1]), Ok(1));
        assert_eq!(out[0], b'j');
        // A write larger than the ring keeps its tail.
        buffer.write(b"0123456789");
        assert_eq!(buffer.range(), (13, 21));
        assert_eq!(buffer.read(13, &mut out), Ok(8));
        assert_eq!(&out[..8], b"23456789");
        assert_eq!(buffer.read(21, &mut out), Ok(0));
    }
}
