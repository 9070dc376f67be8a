//! The migration wire protocol as a peer can abuse it: message and page
//! range headers, every JSON message either side reads, and both sides of
//! the token handshake against a peer that sends the fuzz input (the target
//! reads a hostile source's Hello and Proof; the source reads a hostile
//! target's Challenge and Proof). Nothing may panic, and a peer without
//! the token never authenticates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::auth::{self, Challenge, Hello, Proof};
use migration::protocol::{self, Empty, ErrorMessage, Header, Kind, PageRange, HEADER_SIZE};
use vmm_fuzz::FuzzStream;

const TOKEN: &[u8] = b"fuzz-token";

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            // A stream of messages, each read as the receiver reads them.
            let mut stream = rest;
            while let Ok(header) = protocol::read_header(&mut stream) {
                assert_eq!(
                    Header::decode(&header.encode()).expect("re-decodes"),
                    header
                );
                let Ok(payload) = protocol::read_payload(&mut stream, &header) else {
                    break;
                };
                if header.kind == Kind::Memory {
                    for raw in payload.chunks_exact(16) {
                        if let Ok(range) = PageRange::decode(raw.try_into().expect("16 bytes")) {
                            assert_eq!(range.gpa % protocol::PAGE_SIZE, 0);
                            assert!(range.gpa.checked_add(u64::from(range.len)).is_some());
                            assert_eq!(PageRange::decode(&range.encode()).unwrap(), range);
                        }
                    }
                }
                let _ = protocol::peer_error(&payload);
                let _ = protocol::parse_json::<Hello>(&payload, "Hello");
                let _ = protocol::parse_json::<Challenge>(&payload, "Challenge");
                let _ = protocol::parse_json::<Proof>(&payload, "Proof");
                let _ = protocol::parse_json::<ErrorMessage>(&payload, "Error");
                let _ = protocol::parse_json::<Empty>(&payload, "Ack");
                let _ = protocol::parse_json::<config::VmConfig>(&payload, "Config");
            }
            if rest.len() >= HEADER_SIZE {
                let _ = Header::decode(rest[..HEADER_SIZE].try_into().unwrap());
            }
        }
        1 => {
            let mut stream = FuzzStream::new(rest);
            let result = auth::authenticate_target(&mut stream, TOKEN, b"");
            assert!(result.is_err(), "a peer without the token authenticated");
        }
        2 => {
            let mut stream = FuzzStream::new(rest);
            let result = auth::authenticate_source(&mut stream, TOKEN, b"");
            assert!(result.is_err(), "a peer without the token authenticated");
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let _ = auth::from_hex::<{ auth::NONCE_SIZE }>(&text, "nonce");
            let _ = auth::from_hex::<1>(&text, "byte");
        }
    }
});
