//! The live migration wire protocol.
//!
//! Every message is a 16-byte header — magic `VMMM`, protocol version
//! (u16), kind (u16), payload length (u64), all little-endian — followed by
//! the payload. Control messages carry JSON; memory messages carry a list
//! of page ranges, each a 16-byte entry header (guest physical address u64,
//! length u32, flags u32) followed by the bytes unless the range is zero.
//!
//! The receiver trusts nothing: the magic, version and kind are checked,
//! each kind has a payload size limit, page ranges must be page aligned and
//! inside guest RAM, and a short read or EOF is an error, never a hang
//! (the sockets carry read timeouts).
//!
//! Exchange, source (S) and target (T):
//! ```text
//! S: Hello{nonce_s}            T: Challenge{nonce_t}
//! S: Proof{source proof}        T: Proof{target proof} | Error   (see [`crate::auth`])
//! S: Config{VmConfig}           T: Ack | Error      (compatibility checked, VM built)
//! S: Memory*  (rounds of dirty pages; no replies)
//! S: Sync                       T: Ack              (all memory so far is in place)
//! S: State{snapshot}            T: Ack | Error      (restored, not running)
//! S: Complete                   T: Running | Error  (the guest runs on T; only after State)
//! S: Abandon  (any time: T drops everything and exits without running)
//! ```
//!
//! A snapshot is the source's half of this exchange written to a file, with
//! nobody to answer or authenticate: `Config`, `Memory*` (every non-zero
//! page once), `State`, then `Complete` with a [`SnapshotComplete`] payload
//! (the SHA-256 of every byte before it, and whether the guest ran), and
//! nothing after it. A reader restores from it as a target does and runs
//! the guest only after the checksum matched.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"VMMM";
/// Bumped on any incompatible change of messages or state.
pub const PROTOCOL_VERSION: u16 = 2;
pub const HEADER_SIZE: usize = 16;
pub const PAGE_SIZE: u64 = 4096;
/// Page-range entry header size.
pub const RANGE_HEADER_SIZE: usize = 16;
/// Range flag: the pages are all zero; no bytes follow.
pub const RANGE_ZERO: u32 = 1;

/// Payload limits per kind.
pub const MAX_CONTROL_PAYLOAD: u64 = 1 << 20;
pub const MAX_STATE_PAYLOAD: u64 = 64 << 20;
pub const MAX_MEMORY_PAYLOAD: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    Ack = 2,
    Config = 3,
    Memory = 4,
    State = 5,
    Complete = 6,
    Running = 7,
    Error = 8,
    Abandon = 9,
    Sync = 10,
    Challenge = 11,
    Proof = 12,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Ack,
            3 => Kind::Config,
            4 => Kind::Memory,
            5 => Kind::State,
            6 => Kind::Complete,
            7 => Kind::Running,
            8 => Kind::Error,
            9 => Kind::Abandon,
            10 => Kind::Sync,
            11 => Kind::Challenge,
            12 => Kind::Proof,
            _ => return None,
        })
    }

    fn limit(self) -> u64 {
        match self {
            Kind::Memory => MAX_MEMORY_PAYLOAD,
            Kind::State => MAX_STATE_PAYLOAD,
            _ => MAX_CONTROL_PAYLOAD,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Eof,
    #[error("not a migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this VMM speaks {PROTOCOL_VERSION})")]
    Version(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("{kind:?} message of {length} bytes is over the {limit}-byte limit")]
    TooLarge { kind: Kind, length: u64, limit: u64 },
    #[error("expected a {expected} message, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error("the peer reported: {0}")]
    Peer(String),
    #[error("target failed authentication: {0}")]
    TargetAuthentication(String),
    #[error("source failed authentication: {0}")]
    SourceAuthentication(String),
}

pub type Result<T> = std::result::Result<T, ProtocolError>;

/// A message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub length: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Header> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(version));
        }
        let raw_kind = u16::from_le_bytes([b[6], b[7]]);
        let kind = Kind::from_u16(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
        let length = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        if length > kind.limit() {
            return Err(ProtocolError::TooLarge {
                kind,
                length,
                limit: kind.limit(),
            });
        }
        Ok(Header { kind, length })
    }
}

/// Reads exactly `buf.len()` bytes; EOF before the first byte or in the
/// middle is an error.
pub fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ProtocolError::Eof),
        Err(e) => Err(ProtocolError::Io(e)),
    }
}

pub fn read_header(reader: &mut impl Read) -> Result<Header> {
    let mut b = [0u8; HEADER_SIZE];
    read_full(reader, &mut b)?;
    Header::decode(&b)
}

/// Reads a whole payload of a checked header into memory (bounded by the kind's limit).
pub fn read_payload(reader: &mut impl Read, header: &Header) -> Result<Vec<u8>> {
    let mut payload = vec![0u8; header.length as usize];
    read_full(reader, &mut payload)?;
    Ok(payload)
}

/// Writes a message with a JSON payload.
pub fn send_json<T: Serialize>(writer: &mut impl Write, kind: Kind, value: &T) -> Result<()> {
    let payload = serde_json::to_vec(value).map_err(|e| ProtocolError::Malformed {
        what: "outgoing message",
        message: e.to_string(),
    })?;
    send_raw(writer, kind, &payload)
}

/// Writes a message with the given payload bytes.
pub fn send_raw(writer: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<()> {
    let header = Header {
        kind,
        length: payload.len() as u64,
    };
    writer.write_all(&header.encode())?;
    writer.write_all(payload)?;
    writer.flush()?;
    Ok(())
}

/// Reads the next message, which must be of kind `expected`, and parses
/// its JSON payload. An `Error` message from the peer becomes [`ProtocolError::Peer`].
pub fn expect_json<T: DeserializeOwned>(reader: &mut impl Read, expected: Kind) -> Result<T> {
    let header = read_header(reader)?;
    let payload = read_payload(reader, &header)?;
    if header.kind == Kind::Error {
        return Err(peer_error(&payload));
    }
    if header.kind != expected {
        return Err(ProtocolError::Unexpected {
            expected: kind_name(expected),
            got: header.kind,
        });
    }
    parse_json(&payload, kind_name(expected))
}

pub fn parse_json<T: DeserializeOwned>(payload: &[u8], what: &'static str) -> Result<T> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed {
        what,
        message: e.to_string(),
    })
}

/// The longest text of a peer's `Error` kept (in characters).
pub const MAX_PEER_ERROR_CHARS: usize = 500;

/// The message text of an `Error` payload: clipped, and with control
/// characters escaped, since it goes into logs and onto terminals
/// (`vm.migration-status`) and the peer may be hostile.
pub fn peer_error(payload: &[u8]) -> ProtocolError {
    let text = match serde_json::from_slice::<ErrorMessage>(payload) {
        Ok(e) => e.message,
        Err(_) => String::from_utf8_lossy(payload).into_owned(),
    };
    let clipped: String = text.chars().take(MAX_PEER_ERROR_CHARS).collect();
    ProtocolError::Peer(config::escape_control(&clipped).into_owned())
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Hello => "Hello",
        Kind::Ack => "Ack",
        Kind::Config => "Config",
        Kind::Memory => "Memory",
        Kind::State => "State",
        Kind::Complete => "Complete",
        Kind::Running => "Running",
        Kind::Error => "Error",
        Kind::Abandon => "Abandon",
        Kind::Sync => "Sync",
        Kind::Challenge => "Challenge",
        Kind::Proof => "Proof",
    }
}

/// Payload of `Ack` and `Running`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Payload of `Complete` in a snapshot file (a live migration's is empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotComplete {
    /// SHA-256 (hex) of the file's bytes before this message.
    pub sha256: String,
    /// Whether the guest ran when the snapshot was taken (it then runs
    /// again when restored; a paused one stays paused).
    pub running: bool,
}

/// Payload of `Error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub message: String,
}

/// One page range in a memory message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    pub gpa: u64,
    pub len: u32,
    pub zero: bool,
}

impl PageRange {
    pub fn encode(&self) -> [u8; RANGE_HEADER_SIZE] {
        let mut b = [0u8; RANGE_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        let flags = if self.zero { RANGE_ZERO } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b
    }

    /// Decodes and checks alignment and flags; the caller checks the range
    /// against guest RAM.
    pub fn decode(b: &[u8; RANGE_HEADER_SIZE]) -> Result<PageRange> {
        let gpa = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        let bad = |message: String| ProtocolError::Malformed {
            what: "page range",
            message,
        };
        if flags & !RANGE_ZERO != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        if gpa % PAGE_SIZE != 0 || u64::from(len) % PAGE_SIZE != 0 || len == 0 {
            return Err(bad(format!("range {gpa:#x}+{len:#x} is not whole pages")));
        }
        if gpa.checked_add(u64::from(len)).is_none() {
            return Err(bad(format!("range {gpa:#x}+{len:#x} wraps")));
        }
        Ok(PageRange {
            gpa,
            len,
            zero: flags & RANGE_ZERO != 0,
        })
    }

    /// Bytes this range occupies in a memory message.
    pub fn wire_size(&self) -> u64 {
        RANGE_HEADER_SIZE as u64 + if self.zero { 0 } else { u64::from(self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_error_is_escaped_and_clipped() {
        let payload = serde_json::to_vec(&ErrorMessage {
            message: format!("no\nvmm: exiting: forged\x1b[31m{}", "x".repeat(2000)),
        })
        .unwrap();
        let ProtocolError::Peer(text) = peer_error(&payload) else {
            panic!("not a peer error");
        };
        assert!(!text.chars().any(char::is_control), "{text}");
        assert!(
            text.starts_with("no\\nvmm: exiting: forged\\x1b[31m"),
            "{text}"
        );
        assert!(text.len() < MAX_PEER_ERROR_CHARS + 20, "{}", text.len());
        // Not JSON: the raw bytes, escaped the same way.
        let ProtocolError::Peer(text) = peer_error(b"\x1b]0;title\x07") else {
            panic!("not a peer error");
        };
        assert_eq!(text, "\\x1b]0;title\\x07");
    }

    #[test]
    fn header_roundtrip_and_rejections() {
        let h = Header {
            kind: Kind::State,
            length: 1234,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[0] = b'X';
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut b = h.encode();
        b[4] = 99;
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::Version(99))
        ));
        let mut b = h.encode();
        b[6] = 77;
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::UnknownKind(77))
        ));
        let big = Header {
            kind: Kind::Hello,
            length: MAX_CONTROL_PAYLOAD + 1,
        };
        assert!(matches!(
            Header::decode(&big.encode()),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_streams_are_errors_not_hangs() {
        let mut buf = Vec::new();
        send_json(
            &mut buf,
            Kind::Error,
            &ErrorMessage {
                message: "t".into(),
            },
        )
        .unwrap();
        for cut in [0, 5, HEADER_SIZE, buf.len() - 1] {
            let mut r = &buf[..cut];
            let e = expect_json::<ErrorMessage>(&mut r, Kind::Ack).unwrap_err();
            assert!(matches!(e, ProtocolError::Eof), "cut at {cut}: {e}");
        }
        let mut r = &buf[..];
        assert!(matches!(
            expect_json::<Empty>(&mut r, Kind::Ack),
            Err(ProtocolError::Peer(m)) if m == "t"
        ));
    }

    #[test]
    fn peer_errors_surface() {
        let mut buf = Vec::new();
        send_json(
            &mut buf,
            Kind::Error,
            &ErrorMessage {
                message: "no room".into(),
            },
        )
        .unwrap();
        let mut r = &buf[..];
        match expect_json::<Empty>(&mut r, Kind::Ack) {
            Err(ProtocolError::Peer(m)) => assert_eq!(m, "no room"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn page_ranges_are_checked() {
        let r = PageRange {
            gpa: 0x2000,
            len: 0x3000,
            zero: true,
        };
        assert_eq!(PageRange::decode(&r.encode()).unwrap(), r);
        assert_eq!(r.wire_size(), 16);
        for bad in [
            PageRange {
                gpa: 0x2001,
                len: 0x1000,
                zero: false,
            },
            PageRange {
                gpa: 0x2000,
                len: 0x1001,
                zero: false,
            },
            PageRange {
                gpa: 0x2000,
                len: 0,
                zero: false,
            },
            PageRange {
                gpa: u64::MAX - 0xfff,
                len: 0x2000,
                zero: false,
            },
        ] {
            assert!(PageRange::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        let mut b = r.encode();
        b[12] = 0x80;
        assert!(PageRange::decode(&b).is_err());
    }
}
