//! The guests' serial consoles, as the page reads them: from an offset
//! (`since`), the bytes that came after it.
//!
//! Until the VMM keeps a console buffer of its own, the console is read from
//! where the guest's serial port goes:
//! - `socket=PATH`: a reader thread holds the VMM's console socket (it
//!   serves one client at a time and drops output while nobody is
//!   connected), keeps the last [`RING_BYTES`] in a ring, and typing goes
//!   back through the same connection;
//! - `file=PATH`: the file is read at the offset (read-only);
//! - stdout, pty, off: nothing this process can read without taking it from
//!   its owner; the page says so.
//!
//! [`Consoles::read`] is the one function the page's reads go through: when
//! the VMM offers `GET vm.console?since=N`, it becomes a call to that.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use config::SerialConfig;
use serde::Serialize;

use crate::error::{WebError, WebResult};

/// Console bytes kept per guest.
pub const RING_BYTES: usize = 256 * 1024;
/// The most one read returns.
pub const MAX_CHUNK: usize = 64 * 1024;
/// The most one typing request sends.
pub const MAX_INPUT: usize = 4096;

/// Where a guest's console output can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleSource {
    Socket(PathBuf),
    File(PathBuf),
    /// Why there is nothing to read.
    Unavailable(String),
}

impl ConsoleSource {
    pub fn of(serial: &SerialConfig) -> ConsoleSource {
        match serial {
            SerialConfig::Socket { path, .. } => ConsoleSource::Socket(path.clone()),
            SerialConfig::File { path } => ConsoleSource::File(path.clone()),
            SerialConfig::Stdout => ConsoleSource::Unavailable(
                "the serial console goes to the VMM's standard output; start the guest with \
                 --serial socket=PATH to see it here"
                    .into(),
            ),
            SerialConfig::Pty => ConsoleSource::Unavailable(
                "the serial console is a pseudo-terminal (see vm.info's serial_pty); start the \
                 guest with --serial socket=PATH to see it here"
                    .into(),
            ),
            SerialConfig::Off => {
                ConsoleSource::Unavailable("the guest has no serial console".into())
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            ConsoleSource::Socket(p) => format!("socket {}", p.display()),
            ConsoleSource::File(p) => format!("file {}", p.display()),
            ConsoleSource::Unavailable(_) => "none".into(),
        }
    }
}

/// The last bytes of a stream and the offset of its end.
#[derive(Debug, Default)]
pub struct Ring {
    buf: VecDeque<u8>,
    /// Bytes ever pushed: the offset just after the last byte.
    end: u64,
    capacity: usize,
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        Ring {
            buf: VecDeque::with_capacity(capacity.min(64 * 1024)),
            end: 0,
            capacity,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.end += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.capacity);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    /// The offset of the oldest byte kept.
    pub fn start(&self) -> u64 {
        self.end - self.buf.len() as u64
    }

    /// Up to `max` bytes from offset `since` (clamped to what is kept) and
    /// that offset.
    pub fn read(&self, since: u64, max: usize) -> (u64, Vec<u8>) {
        let from = since.clamp(self.start(), self.end);
        let skip = usize::try_from(from - self.start()).unwrap_or(usize::MAX);
        (
            from,
            self.buf.iter().skip(skip).take(max).copied().collect(),
        )
    }
}

/// What a read returns to the page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConsoleChunk {
    /// The text (invalid UTF-8 replaced; a character cut at the end is left
    /// for the next read).
    pub text: String,
    /// The offset to read from next.
    pub next: u64,
    /// Bytes between `since` and the text that are no longer kept.
    pub dropped: u64,
    /// Whether output arrives now (the socket is connected).
    pub connected: bool,
    /// Whether typing can reach the guest.
    pub writable: bool,
    /// Where the console is read from (`socket PATH`, `file PATH`, `none`).
    pub source: String,
    /// Why there is no console, or what is wrong with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Splits raw console bytes starting at `offset` into text: leading UTF-8
/// continuation bytes (the tail of a character that was dropped) are
/// skipped, and a character cut at the end is left for the next read.
/// Returns the text, the bytes skipped at the start, and the bytes used.
fn decode(bytes: &[u8]) -> (String, usize, usize) {
    let skipped = bytes
        .iter()
        .take(3)
        .take_while(|&&b| b & 0xC0 == 0x80)
        .count();
    let body = &bytes[skipped..];
    let mut used = body.len();
    // The last lead byte within the final 4 bytes: is its character whole?
    for back in 1..=body.len().min(4) {
        let b = body[body.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        if need > back {
            used = body.len() - back;
        }
        break;
    }
    (
        String::from_utf8_lossy(&body[..used]).into_owned(),
        skipped,
        skipped + used,
    )
}

/// One guest's console.
struct GuestConsole {
    source: ConsoleSource,
    ring: Mutex<Ring>,
    /// The connection typing goes to (a clone of the reader's).
    writer: Mutex<Option<UnixStream>>,
    connected: AtomicBool,
    /// A reader thread runs.
    reading: AtomicBool,
    /// Set when the guest went away: the reader stops.
    stop: AtomicBool,
    /// The last connection error.
    error: Mutex<Option<String>>,
}

/// Every guest's console, by guest name.
#[derive(Default)]
pub struct Consoles {
    map: Mutex<HashMap<String, Arc<GuestConsole>>>,
}

impl Consoles {
    pub fn new() -> Consoles {
        Consoles::default()
    }

    /// Brings the consoles in line with the guests seen now: starts readers
    /// for new socket consoles (and restarts ended ones), forgets guests
    /// that are gone.
    pub fn track(&self, guests: &[(String, ConsoleSource)]) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|name, console| {
            let keep = guests
                .iter()
                .any(|(n, source)| n == name && *source == console.source);
            if !keep {
                console.stop.store(true, Ordering::Relaxed);
            }
            keep
        });
        for (name, source) in guests {
            let console = map
                .entry(name.clone())
                .or_insert_with(|| {
                    Arc::new(GuestConsole {
                        source: source.clone(),
                        ring: Mutex::new(Ring::new(RING_BYTES)),
                        writer: Mutex::new(None),
                        connected: AtomicBool::new(false),
                        reading: AtomicBool::new(false),
                        stop: AtomicBool::new(false),
                        error: Mutex::new(None),
                    })
                })
                .clone();
            if let ConsoleSource::Socket(path) = source {
                if !console.reading.swap(true, Ordering::AcqRel) {
                    let path = path.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("console-{name}"))
                        .spawn({
                            let console = console.clone();
                            move || read_socket(&console, &path)
                        });
                    if let Err(e) = spawned {
                        console.reading.store(false, Ordering::Release);
                        *console.error.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(format!("cannot start a reader thread: {e}"));
                    }
                }
            }
        }
    }

    fn get(&self, guest: &str) -> Option<Arc<GuestConsole>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(guest)
            .cloned()
    }

    /// The console output of `guest` after offset `since`.
    pub fn read(&self, guest: &str, since: u64) -> WebResult<ConsoleChunk> {
        let console = self.get(guest).ok_or_else(|| WebError::Console {
            guest: guest.into(),
            message: "not known yet (the guest was not sampled yet, or has gone)".into(),
        })?;
        let source = console.source.describe();
        match &console.source {
            ConsoleSource::Unavailable(why) => Ok(ConsoleChunk {
                source,
                note: Some(why.clone()),
                ..ConsoleChunk::default()
            }),
            ConsoleSource::Socket(_) => {
                let (from, bytes) = console
                    .ring
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(since, MAX_CHUNK);
                let (text, skipped, used) = decode(&bytes);
                let connected = console.connected.load(Ordering::Acquire);
                Ok(ConsoleChunk {
                    text,
                    next: from + used as u64,
                    dropped: from.saturating_sub(since) + skipped as u64,
                    connected,
                    writable: connected,
                    source,
                    note: console
                        .error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone()
                        .filter(|_| !connected),
                })
            }
            ConsoleSource::File(path) => read_file(path, since, source),
        }
    }

    /// Types `bytes` on the console of `guest`.
    pub fn write(&self, guest: &str, bytes: &[u8]) -> WebResult<()> {
        let error = |message: &str| WebError::Console {
            guest: guest.into(),
            message: message.into(),
        };
        if bytes.len() > MAX_INPUT {
            return Err(WebError::bad(
                "data",
                format!("at most {MAX_INPUT} bytes at a time"),
            ));
        }
        let console = self.get(guest).ok_or_else(|| error("not known yet"))?;
        if !matches!(console.source, ConsoleSource::Socket(_)) {
            return Err(error(
                "typing needs a socket console (--serial socket=PATH)",
            ));
        }
        let mut writer = console.writer.lock().unwrap_or_else(|e| e.into_inner());
        let stream = writer
            .as_mut()
            .ok_or_else(|| error("the console socket is not connected"))?;
        stream.write_all(bytes).map_err(|e| WebError::Console {
            guest: guest.into(),
            message: format!("cannot type: {e}"),
        })
    }
}

/// The reader thread of a socket console: connects, fills the ring until
/// the connection ends or the guest is forgotten. The monitor's next
/// sample starts a new one if the guest is still there.
fn read_socket(console: &GuestConsole, path: &std::path::Path) {
    let set_error = |message: Option<String>| {
        *console.error.lock().unwrap_or_else(|e| e.into_inner()) = message;
    };
    match UnixStream::connect(path) {
        Ok(stream) => {
            // A read timeout lets the thread notice that it should stop.
            let ready = stream
                .set_read_timeout(Some(Duration::from_millis(500)))
                .and_then(|()| stream.try_clone());
            match ready {
                Ok(writer) => {
                    *console.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
                    console.connected.store(true, Ordering::Release);
                    set_error(None);
                    pump(console, stream);
                }
                Err(e) => set_error(Some(format!("console socket {}: {e}", path.display()))),
            }
        }
        Err(e) => set_error(Some(format!(
            "cannot connect to the console socket {}: {e}",
            path.display()
        ))),
    }
    console.connected.store(false, Ordering::Release);
    *console.writer.lock().unwrap_or_else(|e| e.into_inner()) = None;
    console.reading.store(false, Ordering::Release);
}

fn pump(console: &GuestConsole, mut stream: UnixStream) {
    let mut buf = [0u8; 4096];
    while !console.stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => {
                *console.error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some("the VMM closed the console socket".into());
                return;
            }
            Ok(n) => console
                .ring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                *console.error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("console socket: {e}"));
                return;
            }
        }
    }
}

/// A `file=PATH` console: the bytes after `since`, at most the last
/// [`RING_BYTES`] of the file on a first read.
fn read_file(path: &std::path::Path, since: u64, source: String) -> WebResult<ConsoleChunk> {
    let unreadable = |e: std::io::Error| ConsoleChunk {
        source: source.clone(),
        note: Some(format!("cannot read {}: {e}", path.display())),
        next: since,
        ..ConsoleChunk::default()
    };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => return Ok(unreadable(e)),
    };
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return Ok(unreadable(e)),
    };
    // A file shorter than the offset was truncated: start over.
    let since = if since > len { 0 } else { since };
    let from = since.max(len.saturating_sub(RING_BYTES as u64));
    let mut bytes = Vec::new();
    let read = file
        .seek(SeekFrom::Start(from))
        .and_then(|_| file.take(MAX_CHUNK as u64).read_to_end(&mut bytes));
    if let Err(e) = read {
        return Ok(unreadable(e));
    }
    let (text, skipped, used) = decode(&bytes);
    Ok(ConsoleChunk {
        text,
        next: from + used as u64,
        dropped: from - since + skipped as u64,
        connected: true,
        writable: false,
        source,
        note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_bytes_and_their_offsets() {
        let mut ring = Ring::new(8);
        ring.push(b"hello ");
        assert_eq!(ring.read(0, 100), (0, b"hello ".to_vec()));
        ring.push(b"world");
        assert_eq!(ring.start(), 3);
        assert_eq!(ring.read(0, 100), (3, b"lo world".to_vec()));
        assert_eq!(ring.read(9, 100), (9, b"ld".to_vec()));
        assert_eq!(ring.read(9, 1), (9, b"l".to_vec()));
        // A reader ahead of the end (a restarted VMM) gets nothing, at the end.
        assert_eq!(ring.read(500, 100), (11, Vec::new()));
        ring.push(&[b'x'; 20]);
        assert_eq!(ring.read(0, 100), (23, vec![b'x'; 8]));
    }

    #[test]
    fn characters_cut_by_the_ring_or_the_read_are_not_mangled() {
        let text = "aé€😀".as_bytes();
        assert_eq!(decode(text), ("aé€😀".into(), 0, text.len()));
        // The end cuts the emoji: it waits for the next read.
        let cut = &text[..text.len() - 1];
        assert_eq!(decode(cut), ("aé€".into(), 0, cut.len() - 3));
        // The start is inside the euro sign (dropped): its tail is skipped.
        let tail = &text[4..];
        assert_eq!(decode(tail), ("😀".into(), 2, tail.len()));
        // Garbage stays visible as replacement characters.
        assert_eq!(decode(b"a\xffb"), ("a\u{fffd}b".into(), 0, 3));
    }

    #[test]
    fn socket_consoles_are_read_from_an_offset_and_typed_into() {
        let dir = std::env::temp_dir().join(format!("web-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("g.console");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let consoles = Consoles::new();
        consoles.track(&[("g".into(), ConsoleSource::Socket(path.clone()))]);
        let (mut vmm_side, _) = listener.accept().unwrap();
        vmm_side.write_all("boot ok\n".as_bytes()).unwrap();
        let chunk = wait_for(&consoles, 0, "boot ok");
        assert!(chunk.connected && chunk.writable, "{chunk:?}");
        consoles.write("g", b"help\r").unwrap();
        let mut typed = [0u8; 5];
        vmm_side.read_exact(&mut typed).unwrap();
        assert_eq!(&typed, b"help\r");
        vmm_side.write_all(b"more").unwrap();
        let chunk = wait_for(&consoles, chunk.next, "more");
        assert_eq!(chunk.text, "more");
        // The guest goes away: its console is forgotten.
        consoles.track(&[]);
        assert!(consoles.read("g", 0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn wait_for(consoles: &Consoles, since: u64, needle: &str) -> ConsoleChunk {
        for _ in 0..500 {
            if let Ok(chunk) = consoles.read("g", since) {
                if chunk.text.contains(needle) {
                    return chunk;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{needle:?} never showed");
    }

    #[test]
    fn file_consoles_are_read_only_from_an_offset() {
        let path = std::env::temp_dir().join(format!("web-console-{}.log", std::process::id()));
        std::fs::write(&path, "line one\nline two\n").unwrap();
        let consoles = Consoles::new();
        consoles.track(&[("f".into(), ConsoleSource::File(path.clone()))]);
        let chunk = consoles.read("f", 0).unwrap();
        assert_eq!(chunk.text, "line one\nline two\n");
        assert!(!chunk.writable);
        let chunk = consoles.read("f", 9).unwrap();
        assert_eq!((chunk.text.as_str(), chunk.next), ("line two\n", 18));
        assert!(consoles.write("f", b"x").is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
