//! The migration connection: a TCP or Unix socket whose every blocking
//! call ends by a deadline, carried plain or inside TLS.
//!
//! Deadlines: each read or write waits at most [`IO_TIMEOUT`] without
//! progress, and never past the socket's deadline (the whole migration's,
//! or the handshake's on a target). The socket timeouts are set again only
//! when the ones set would run past the deadline, so the page path makes
//! no extra system call per write.
//!
//! Guest pages go out with `writev` straight from guest RAM and come in
//! with `read` straight into it on plain streams; through rustls on TLS
//! streams, which encrypts from and decrypts into the same memory.
//!
//! A snapshot is the same stream in a file ([`SocketKind::File`]): no
//! deadlines, nobody answering, and a SHA-256 of every byte written or
//! read so far ([`Stream::digest`]) that the file ends with.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConnection, ServerConnection, StreamOwned};
use sha2::{Digest, Sha256};

use super::tls::EXPORTER_LABEL;

/// A read or write that makes no progress this long fails the migration.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the target gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How far past the deadline a call may wait before the timeouts are set again.
const SLACK: Duration = Duration::from_millis(50);
/// Most iovecs one writev takes (IOV_MAX).
const IOV_MAX: usize = 1024;
/// Under TLS, reads from the socket go through a buffer this big: rustls
/// asks for 4 KiB at a time, a system call each.
const TLS_READ_BUFFER: usize = 256 << 10;
/// Encrypted bytes rustls may queue before writing them out (in writevs of
/// up to 64 records).
const TLS_WRITE_BUFFER: usize = 1 << 20;

/// The raw socket, for the cancelling thread to shut down.
pub enum SocketKind {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A snapshot file: written or read from start to end.
    File(File),
}

impl SocketKind {
    /// Ends both directions: a blocked read or write returns at once.
    pub fn shutdown(&self) {
        let _ = match self {
            SocketKind::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            SocketKind::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            SocketKind::File(_) => Ok(()),
        };
    }

    fn try_clone(&self) -> io::Result<SocketKind> {
        Ok(match self {
            SocketKind::Tcp(s) => SocketKind::Tcp(s.try_clone()?),
            SocketKind::Unix(s) => SocketKind::Unix(s.try_clone()?),
            SocketKind::File(f) => SocketKind::File(f.try_clone()?),
        })
    }
}

/// A connected socket with a deadline.
pub struct Socket {
    kind: SocketKind,
    deadline: Option<Instant>,
    /// The receive and send timeouts last set on the socket.
    armed: [Option<Duration>; 2],
    /// Read buffer (TLS only): bytes `read_start..read_end` are unread.
    read_buffer: Vec<u8>,
    read_start: usize,
    read_end: usize,
    /// SHA-256 of every byte through this socket (snapshot files only).
    digest: Option<Box<Sha256>>,
}

const READ: usize = 0;
const WRITE: usize = 1;

impl Socket {
    pub fn new(kind: SocketKind) -> io::Result<Socket> {
        if let SocketKind::Tcp(s) = &kind {
            // Small control messages must not wait for Nagle.
            s.set_nodelay(true)?;
        }
        Ok(Socket {
            kind,
            deadline: None,
            armed: [None; 2],
            read_buffer: Vec::new(),
            read_start: 0,
            read_end: 0,
            digest: None,
        })
    }

    /// A snapshot file, written or read once from its start, hashed on the way.
    pub fn file(file: File) -> Socket {
        Socket {
            kind: SocketKind::File(file),
            deadline: None,
            armed: [None; 2],
            read_buffer: Vec::new(),
            read_start: 0,
            read_end: 0,
            digest: Some(Box::default()),
        }
    }

    fn hash(&mut self, bytes: &[u8]) {
        if let Some(digest) = &mut self.digest {
            digest.update(bytes);
        }
    }

    /// Hashes the first `n` bytes of `iov` (what a writev wrote).
    fn hash_iov(&mut self, iov: &[libc::iovec], mut n: usize) {
        if self.digest.is_none() {
            return;
        }
        for v in iov {
            if n == 0 {
                break;
            }
            let len = v.iov_len.min(n);
            // SAFETY: the iovec was just written from: it points at `iov_len`
            // readable bytes that stay mapped for the call's duration.
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), len) };
            self.hash(bytes);
            n -= len;
        }
    }

    /// A second handle on the same socket, to shut it down from another thread.
    pub fn handle(&self) -> io::Result<SocketKind> {
        self.kind.try_clone()
    }

    /// Who is at the other end, for logs.
    pub fn peer(&self) -> String {
        match &self.kind {
            SocketKind::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("unknown TCP peer ({e})")),
            SocketKind::File(_) => "snapshot file".into(),
            SocketKind::Unix(s) => {
                let mut cred = libc::ucred {
                    pid: 0,
                    uid: 0,
                    gid: 0,
                };
                let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
                // SAFETY: cred and len are valid for the call and sized for SO_PEERCRED.
                let rc = unsafe {
                    libc::getsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_PEERCRED,
                        (&mut cred as *mut libc::ucred).cast(),
                        &mut len,
                    )
                };
                if rc == 0 {
                    format!("unix socket peer pid {} uid {}", cred.pid, cred.uid)
                } else {
                    "unix socket peer".into()
                }
            }
        }
    }

    /// No blocking call returns later than `deadline` (None: only the
    /// [`IO_TIMEOUT`] without progress bounds it).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets the timeout of `direction` so the next call ends by the deadline.
    fn arm(&mut self, direction: usize) -> io::Result<()> {
        if matches!(self.kind, SocketKind::File(_)) {
            // Files do not stall.
            return Ok(());
        }
        let timeout = match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the migration deadline passed",
                    ));
                }
                left.clamp(Duration::from_millis(1), IO_TIMEOUT)
            }
            None => IO_TIMEOUT,
        };
        let stale = match self.armed[direction] {
            None => true,
            // Would run past the deadline, or stops well before it.
            Some(armed) => armed > timeout + SLACK || armed + Duration::from_secs(1) < timeout,
        };
        if stale {
            match (&self.kind, direction) {
                (SocketKind::Tcp(s), READ) => s.set_read_timeout(Some(timeout))?,
                (SocketKind::Tcp(s), _) => s.set_write_timeout(Some(timeout))?,
                (SocketKind::Unix(s), READ) => s.set_read_timeout(Some(timeout))?,
                (SocketKind::Unix(s), _) => s.set_write_timeout(Some(timeout))?,
                (SocketKind::File(_), _) => {}
            }
            self.armed[direction] = Some(timeout);
        }
        Ok(())
    }

    /// The error of a call that hit its timeout.
    fn timed_out(&self, e: io::Error) -> io::Error {
        if e.kind() != io::ErrorKind::WouldBlock {
            return e;
        }
        if self.deadline.is_some_and(|d| Instant::now() + SLACK >= d) {
            io::Error::new(io::ErrorKind::TimedOut, "the migration deadline passed")
        } else {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer made no progress for {} s", IO_TIMEOUT.as_secs()),
            )
        }
    }

    /// One writev of `iov` (at most [`IOV_MAX`] entries).
    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.arm(WRITE)?;
        loop {
            // SAFETY: every iovec points at memory that stays mapped for the
            // call (guest RAM or buffers owned by the caller).
            let n = unsafe {
                libc::writev(
                    self.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len().min(IOV_MAX) as libc::c_int,
                )
            };
            if n >= 0 {
                self.hash_iov(iov, n as usize);
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(self.timed_out(e));
            }
        }
    }

    /// One read into raw memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be writable memory that stays mapped.
    unsafe fn read_raw(&mut self, ptr: *mut u8, len: usize) -> io::Result<usize> {
        self.arm(READ)?;
        loop {
            // SAFETY: the caller guarantees the destination is writable for len bytes.
            let n = unsafe { libc::read(self.as_raw_fd(), ptr.cast(), len) };
            if n >= 0 {
                if self.digest.is_some() {
                    // SAFETY: the read just filled n bytes at ptr, which the
                    // caller keeps mapped.
                    let bytes = unsafe { std::slice::from_raw_parts(ptr, n as usize) };
                    self.hash(bytes);
                }
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(self.timed_out(e));
            }
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match &self.kind {
            SocketKind::Tcp(s) => s.as_raw_fd(),
            SocketKind::Unix(s) => s.as_raw_fd(),
            SocketKind::File(f) => f.as_raw_fd(),
        }
    }
}

impl Socket {
    fn read_direct(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(READ)?;
        let result = match &mut self.kind {
            SocketKind::Tcp(s) => s.read(buf),
            SocketKind::Unix(s) => s.read(buf),
            SocketKind::File(f) => f.read(buf),
        };
        let n = result.map_err(|e| self.timed_out(e))?;
        self.hash(&buf[..n]);
        Ok(n)
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_buffer.is_empty() || buf.len() >= self.read_buffer.len() {
            if self.read_start < self.read_end {
                let n = buf.len().min(self.read_end - self.read_start);
                buf[..n].copy_from_slice(&self.read_buffer[self.read_start..self.read_start + n]);
                self.read_start += n;
                return Ok(n);
            }
            return self.read_direct(buf);
        }
        if self.read_start == self.read_end {
            let mut buffer = std::mem::take(&mut self.read_buffer);
            let filled = self.read_direct(&mut buffer);
            self.read_buffer = buffer;
            self.read_start = 0;
            self.read_end = filled?;
        }
        let n = buf.len().min(self.read_end - self.read_start);
        buf[..n].copy_from_slice(&self.read_buffer[self.read_start..self.read_start + n]);
        self.read_start += n;
        Ok(n)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(WRITE)?;
        let result = match &mut self.kind {
            SocketKind::Tcp(s) => s.write(buf),
            SocketKind::Unix(s) => s.write(buf),
            SocketKind::File(f) => f.write(buf),
        };
        let n = result.map_err(|e| self.timed_out(e))?;
        self.hash(&buf[..n]);
        Ok(n)
    }

    /// rustls hands its queued records here (up to 64 at a time): one
    /// writev for them all, not a write per 16 KiB record.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: IoSlice is guaranteed ABI-compatible with iovec on Unix,
        // and the slices stay borrowed for the call.
        let iov =
            unsafe { std::slice::from_raw_parts(bufs.as_ptr().cast::<libc::iovec>(), bufs.len()) };
        self.writev(iov)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to `tcp:HOST:PORT` or `unix:PATH`, by `deadline` at the latest.
pub fn connect(url: &str, deadline: Option<Instant>) -> io::Result<Socket> {
    let kind = match url.split_once(':') {
        Some(("tcp", address)) => {
            let mut last = io::Error::other(format!("{address} resolves to nothing"));
            let mut connected = None;
            for addr in address.to_socket_addrs()? {
                let timeout = match deadline {
                    Some(d) => CONNECT_TIMEOUT
                        .min(d.saturating_duration_since(Instant::now()))
                        .max(Duration::from_millis(1)),
                    None => CONNECT_TIMEOUT,
                };
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        connected = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            SocketKind::Tcp(connected.ok_or(last)?)
        }
        Some(("unix", path)) => SocketKind::Unix(UnixStream::connect(path)?),
        _ => {
            return Err(io::Error::other(format!(
                "{url:?} is not tcp:HOST:PORT or unix:PATH"
            )))
        }
    };
    let mut socket = Socket::new(kind)?;
    socket.set_deadline(deadline);
    Ok(socket)
}

/// The host name a TLS source expects in the target's certificate: the
/// host of `tcp:HOST:PORT`, `localhost` for `unix:PATH`.
pub fn tls_server_name(url: &str) -> io::Result<rustls::pki_types::ServerName<'static>> {
    let host = match url.split_once(':') {
        Some(("tcp", address)) => address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(address),
        _ => "localhost",
    };
    rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} cannot be checked against a certificate: {e}"),
        )
    })
}

/// Page ranges (or any buffers) waiting to be written, consumed from the front.
pub struct IoVecs {
    iov: Vec<libc::iovec>,
    start: usize,
}

impl IoVecs {
    pub fn new(iov: Vec<libc::iovec>) -> IoVecs {
        let mut v = IoVecs { iov, start: 0 };
        v.skip_empty();
        v
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.iov.len()
    }

    fn skip_empty(&mut self) {
        while self.start < self.iov.len() && self.iov[self.start].iov_len == 0 {
            self.start += 1;
        }
    }

    /// Drops the first `n` bytes.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.start < self.iov.len() {
            let first = &mut self.iov[self.start];
            if n >= first.iov_len {
                n -= first.iov_len;
                self.start += 1;
            } else {
                // SAFETY: advancing within the same buffer by n < len bytes.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                n = 0;
            }
        }
        self.skip_empty();
    }

    /// The next iovecs holding at most `max` bytes; the first is cut to
    /// `max` when it alone is longer.
    fn window(&self, max: usize) -> Window<'_> {
        let rest = &self.iov[self.start..];
        let mut sum = 0usize;
        let mut count = 0;
        while count < rest.len().min(IOV_MAX) && sum + rest[count].iov_len <= max {
            sum += rest[count].iov_len;
            count += 1;
        }
        if count == 0 {
            Window::Cut(libc::iovec {
                iov_base: rest[0].iov_base,
                iov_len: max,
            })
        } else {
            Window::Whole(&rest[..count])
        }
    }
}

enum Window<'a> {
    Whole(&'a [libc::iovec]),
    Cut(libc::iovec),
}

impl Window<'_> {
    fn slices(&self) -> &[libc::iovec] {
        match self {
            Window::Whole(s) => s,
            Window::Cut(one) => std::slice::from_ref(one),
        }
    }
}

/// A migration stream, plain or TLS.
pub enum Stream {
    Plain(Socket),
    TlsClient(Box<StreamOwned<ClientConnection, Socket>>),
    TlsServer(Box<StreamOwned<ServerConnection, Socket>>),
}

/// Runs a TLS handshake to its end (on the socket's deadline).
fn handshake<C, D>(conn: &mut C, socket: &mut Socket) -> io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    while conn.is_handshaking() {
        conn.complete_io(socket).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("TLS handshake with {}: {e}", socket.peer()),
            )
        })?;
    }
    Ok(())
}

impl Stream {
    /// TLS as the source (client) towards `server_name`.
    pub fn tls_client(
        mut socket: Socket,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<Stream> {
        let mut conn = ClientConnection::new(config, server_name).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_WRITE_BUFFER));
        socket.read_buffer = vec![0; TLS_READ_BUFFER];
        handshake(&mut conn, &mut socket)?;
        Ok(Stream::TlsClient(Box::new(StreamOwned::new(conn, socket))))
    }

    /// TLS as the target (server, client certificate required).
    pub fn tls_server(mut socket: Socket, config: Arc<rustls::ServerConfig>) -> io::Result<Stream> {
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_WRITE_BUFFER));
        socket.read_buffer = vec![0; TLS_READ_BUFFER];
        handshake(&mut conn, &mut socket)?;
        Ok(Stream::TlsServer(Box::new(StreamOwned::new(conn, socket))))
    }

    pub fn socket(&self) -> &Socket {
        match self {
            Stream::Plain(s) => s,
            Stream::TlsClient(t) => &t.sock,
            Stream::TlsServer(t) => &t.sock,
        }
    }

    fn socket_mut(&mut self) -> &mut Socket {
        match self {
            Stream::Plain(s) => s,
            Stream::TlsClient(t) => &mut t.sock,
            Stream::TlsServer(t) => &mut t.sock,
        }
    }

    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.socket_mut().set_deadline(deadline);
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// A snapshot file as a stream (written or read once, hashed).
    pub fn file(file: File) -> Stream {
        Stream::Plain(Socket::file(file))
    }

    /// SHA-256 of every byte through the stream so far, as hex; None for
    /// streams that are not files.
    pub fn digest(&self) -> Option<String> {
        let digest = Sha256::clone(self.socket().digest.as_ref()?).finalize();
        Some(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The snapshot file under the stream, to sync it.
    pub fn file_ref(&self) -> Option<&File> {
        match &self.socket().kind {
            SocketKind::File(f) => Some(f),
            _ => None,
        }
    }

    /// What the token proofs are bound to: the TLS session's exporter
    /// secret, or nothing on a plain stream.
    pub fn channel_binding(&self) -> io::Result<Vec<u8>> {
        let out = vec![0u8; 32];
        let exported = match self {
            Stream::Plain(_) => return Ok(Vec::new()),
            Stream::TlsClient(t) => t.conn.export_keying_material(out, EXPORTER_LABEL, None),
            Stream::TlsServer(t) => t.conn.export_keying_material(out, EXPORTER_LABEL, None),
        };
        exported.map_err(io::Error::other)
    }

    /// Writes up to `max` bytes from the front of `iov`, consuming them;
    /// returns how many were written (at least one unless `iov` is empty).
    pub fn write_iov(&mut self, iov: &mut IoVecs, max: u64) -> io::Result<u64> {
        if iov.is_empty() {
            return Ok(0);
        }
        let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        let window = iov.window(max);
        let written = match self {
            Stream::Plain(socket) => {
                let n = socket.writev(window.slices())?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the peer stopped reading",
                    ));
                }
                n
            }
            Stream::TlsClient(t) => tls_write(&mut t.conn, &mut t.sock, window.slices())?,
            Stream::TlsServer(t) => tls_write(&mut t.conn, &mut t.sock, window.slices())?,
        };
        iov.advance(written);
        Ok(written as u64)
    }

    /// Reads exactly `len` bytes into memory at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be writable memory (guest RAM) that stays mapped
    /// and that nothing else accesses meanwhile.
    pub unsafe fn read_exact_raw(&mut self, ptr: *mut u8, len: usize) -> io::Result<()> {
        if let Stream::Plain(socket) = self {
            let mut done = 0;
            while done < len {
                // SAFETY: within the caller's writable range.
                let n = unsafe { socket.read_raw(ptr.add(done), len - done) }?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    ));
                }
                done += n;
            }
            return Ok(());
        }
        // SAFETY: the caller guarantees the range is writable and unshared.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        self.read_exact(buf)
    }

    /// Ends the connection (best effort).
    pub fn shutdown(&mut self) {
        if let Stream::TlsClient(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        if let Stream::TlsServer(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        self.socket().kind.shutdown();
    }
}

/// What the receiver reads a migration from and answers on: a [`Stream`],
/// or bytes in memory (the fuzzer's stand-in for a source).
pub trait ReceiveStream: Read + Write {
    /// Reads exactly `len` bytes into memory at `ptr`.
    ///
    /// # Safety
    /// As [`Stream::read_exact_raw`].
    unsafe fn read_exact_raw(&mut self, ptr: *mut u8, len: usize) -> io::Result<()>;
}

impl ReceiveStream for Stream {
    unsafe fn read_exact_raw(&mut self, ptr: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller gives Stream::read_exact_raw's guarantees.
        unsafe { Stream::read_exact_raw(self, ptr, len) }
    }
}

/// Encrypts all of `iov` and writes it out: records queue in rustls up to
/// its buffer limit and leave in writevs of many records (through
/// `StreamOwned::write`, each call would be encrypted and sent on its own).
fn tls_write<C, D>(conn: &mut C, sock: &mut Socket, iov: &[libc::iovec]) -> io::Result<usize>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let mut written = 0;
    for v in iov {
        // SAFETY: the iovec points at mapped memory of iov_len bytes (guest
        // RAM or the caller's buffers); the guest may write it meanwhile,
        // and a page torn that way is dirty and goes again.
        let bytes = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
        let mut done = 0;
        while done < bytes.len() {
            let n = conn.writer().write(&bytes[done..])?;
            if n == 0 {
                // The buffer limit is reached: send what is queued.
                tls_flush(conn, sock)?;
            }
            done += n;
        }
        written += v.iov_len;
    }
    tls_flush(conn, sock)?;
    Ok(written)
}

/// Writes every record rustls has queued.
fn tls_flush<C, D>(conn: &mut C, sock: &mut Socket) -> io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    while conn.wants_write() {
        if conn.write_tls(sock)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the peer stopped reading",
            ));
        }
    }
    Ok(())
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::TlsClient(t) => t.read(buf),
            Stream::TlsServer(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::TlsClient(t) => t.write(buf),
            Stream::TlsServer(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::TlsClient(t) => t.flush(),
            Stream::TlsServer(t) => t.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_bounds_a_blocked_write_and_read() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut socket = Socket::new(SocketKind::Unix(a)).unwrap();
        let started = Instant::now();
        socket.set_deadline(Some(started + Duration::from_millis(300)));
        let big = vec![0u8; 1 << 20];
        let mut error = None;
        for _ in 0..64 {
            if let Err(e) = socket.write(&big) {
                error = Some(e);
                break;
            }
        }
        let e = error.expect("the peer never reads: a write must time out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let mut buf = [0u8; 4];
        let e = socket.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }

    #[test]
    fn iovecs_are_written_in_bounded_windows() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut stream = Stream::Plain(Socket::new(SocketKind::Unix(a)).unwrap());
        let data: Vec<Vec<u8>> = vec![vec![1; 10], vec![2; 100], vec![], vec![3; 7]];
        let mut iov = IoVecs::new(
            data.iter()
                .map(|d| libc::iovec {
                    iov_base: d.as_ptr() as *mut libc::c_void,
                    iov_len: d.len(),
                })
                .collect(),
        );
        let mut sizes = Vec::new();
        while !iov.is_empty() {
            sizes.push(stream.write_iov(&mut iov, 40).unwrap());
        }
        assert!(sizes.iter().all(|&s| s <= 40), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<u64>(), 117);
        let mut got = vec![0u8; 117];
        b.read_exact(&mut got).unwrap();
        let want: Vec<u8> = data.concat();
        assert_eq!(got, want);
    }
}
