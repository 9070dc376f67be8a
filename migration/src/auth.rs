//! Mutual authentication of migration peers by a pre-shared token that
//! never crosses the wire.
//!
//! Each side sends a fresh random nonce; each proves it knows the token
//! with HMAC-SHA256(token, label, role, source nonce, target nonce, channel
//! binding). The source proves first, so a peer that merely accepts
//! connections (a stray listener on the target's port) learns only the
//! source's nonce and proof, and a peer that merely connects learns only the
//! target's nonce. The roles are in the MAC, so a proof cannot be reflected
//! back; the nonces make every proof single-use. The channel binding is the
//! TLS exporter secret when the stream is TLS (a proof cannot be relayed into
//! another TLS session) and empty on plain streams.
//!
//! ```text
//! S: Hello{vmm_version, nonce_s}
//! T: Challenge{nonce_t}
//! S: Proof{HMAC(token, "source", nonce_s, nonce_t, binding)}
//! T: Proof{HMAC(token, "target", nonce_s, nonce_t, binding)} | Error
//! ```
//!
//! A proof is 32 bytes, compared in constant time.

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::protocol::{self, ErrorMessage, Kind, ProtocolError, Result};

pub const NONCE_SIZE: usize = 32;
pub const PROOF_SIZE: usize = 32;
/// Domain separation: a MAC made for anything else never verifies here.
const LABEL: &[u8] = b"vmm live migration auth v2\0";

/// Which side proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Source => b"source\0",
            Role::Target => b"target\0",
        }
    }
}

/// The source's first message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub vmm_version: String,
    /// Hex, [`NONCE_SIZE`] bytes.
    pub nonce: String,
}

/// The target's answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// Hex, [`NONCE_SIZE`] bytes.
    pub nonce: String,
}

/// A proof of the token (both directions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    /// Hex, [`PROOF_SIZE`] bytes.
    pub proof: String,
}

/// A fresh nonce from the kernel's random source (getrandom(2)).
pub fn nonce() -> io::Result<[u8; NONCE_SIZE]> {
    let mut nonce = [0u8; NONCE_SIZE];
    getrandom::getrandom(&mut nonce)
        .map_err(|e| io::Error::other(format!("no random numbers: {e}")))?;
    Ok(nonce)
}

fn mac(
    token: &[u8],
    role: Role,
    source_nonce: &[u8; NONCE_SIZE],
    target_nonce: &[u8; NONCE_SIZE],
    binding: &[u8],
) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token).expect("any key length");
    mac.update(LABEL);
    mac.update(role.label());
    mac.update(source_nonce);
    mac.update(target_nonce);
    mac.update(&(binding.len() as u32).to_le_bytes());
    mac.update(binding);
    mac
}

/// The proof `role` gives of `token` for this pair of nonces.
pub fn prove(
    token: &[u8],
    role: Role,
    source_nonce: &[u8; NONCE_SIZE],
    target_nonce: &[u8; NONCE_SIZE],
    binding: &[u8],
) -> [u8; PROOF_SIZE] {
    mac(token, role, source_nonce, target_nonce, binding)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `given` is `role`'s proof of `token`, compared in constant time.
/// An empty token never verifies.
pub fn verify(
    token: &[u8],
    role: Role,
    source_nonce: &[u8; NONCE_SIZE],
    target_nonce: &[u8; NONCE_SIZE],
    binding: &[u8],
    given: &[u8],
) -> bool {
    !token.is_empty()
        && mac(token, role, source_nonce, target_nonce, binding)
            .verify_slice(given)
            .is_ok()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes exactly `N` bytes of hex.
pub fn from_hex<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N]> {
    let bad = |message: String| ProtocolError::Malformed { what, message };
    if text.len() != 2 * N {
        return Err(bad(format!(
            "{} hex digits, expected {}",
            text.len(),
            2 * N
        )));
    }
    // Byte-wise: the peer's text may hold multi-byte characters, where
    // slicing the string by byte offsets would panic (found by fuzzing).
    let digit = |b: u8| char::from(b).to_digit(16);
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let (Some(high), Some(low)) = (digit(pair[0]), digit(pair[1])) else {
            return Err(bad("not hex".to_string()));
        };
        *byte = (high << 4 | low) as u8;
    }
    Ok(out)
}

/// Source side: proves the token and checks the target's proof. Nothing
/// but the nonce and the source's proof goes out before the target proved.
/// A target that does not follow the exchange or proves wrong is
/// [`ProtocolError::TargetAuthentication`]; a target that refuses the
/// source's proof answers [`ProtocolError::Peer`].
pub fn authenticate_source(
    stream: &mut (impl Read + Write),
    token: &[u8],
    binding: &[u8],
) -> Result<()> {
    let source_nonce = nonce()?;
    protocol::send_json(
        stream,
        Kind::Hello,
        &Hello {
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            nonce: to_hex(&source_nonce),
        },
    )?;
    let unauthenticated = |e: ProtocolError| match e {
        // The connection itself failed, or the target explained a refusal.
        ProtocolError::Io(_) | ProtocolError::Eof | ProtocolError::Peer(_) => e,
        other => ProtocolError::TargetAuthentication(other.to_string()),
    };
    let challenge: Challenge =
        protocol::expect_json(stream, Kind::Challenge).map_err(unauthenticated)?;
    let target_nonce =
        from_hex::<NONCE_SIZE>(&challenge.nonce, "challenge nonce").map_err(unauthenticated)?;
    let proof = prove(token, Role::Source, &source_nonce, &target_nonce, binding);
    protocol::send_json(
        stream,
        Kind::Proof,
        &Proof {
            proof: to_hex(&proof),
        },
    )?;
    let answer: Proof = protocol::expect_json(stream, Kind::Proof).map_err(unauthenticated)?;
    let given = from_hex::<PROOF_SIZE>(&answer.proof, "target proof").map_err(unauthenticated)?;
    if !verify(
        token,
        Role::Target,
        &source_nonce,
        &target_nonce,
        binding,
        &given,
    ) {
        return Err(ProtocolError::TargetAuthentication(
            "its proof of the migration token is wrong".into(),
        ));
    }
    Ok(())
}

/// Target side: checks the source's proof before giving its own. A source
/// that proves wrong is told so (without the target's proof) and gets
/// [`ProtocolError::SourceAuthentication`].
pub fn authenticate_target(
    stream: &mut (impl Read + Write),
    token: &[u8],
    binding: &[u8],
) -> Result<()> {
    let hello: Hello = protocol::expect_json(stream, Kind::Hello)?;
    let source_nonce = from_hex::<NONCE_SIZE>(&hello.nonce, "hello nonce")?;
    let target_nonce = nonce()?;
    protocol::send_json(
        stream,
        Kind::Challenge,
        &Challenge {
            nonce: to_hex(&target_nonce),
        },
    )?;
    let proof: Proof = protocol::expect_json(stream, Kind::Proof)?;
    let given = from_hex::<PROOF_SIZE>(&proof.proof, "source proof")?;
    if !verify(
        token,
        Role::Source,
        &source_nonce,
        &target_nonce,
        binding,
        &given,
    ) {
        let error = ProtocolError::SourceAuthentication(
            "its proof of the migration token is wrong (not the same token here)".into(),
        );
        let _ = protocol::send_json(
            stream,
            Kind::Error,
            &ErrorMessage {
                message: error.to_string(),
            },
        );
        return Err(error);
    }
    let proof = prove(token, Role::Target, &source_nonce, &target_nonce, binding);
    protocol::send_json(
        stream,
        Kind::Proof,
        &Proof {
            proof: to_hex(&proof),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn proofs_depend_on_token_role_nonces_and_binding() {
        let (s, t) = ([1u8; NONCE_SIZE], [2u8; NONCE_SIZE]);
        let p = prove(b"tok", Role::Source, &s, &t, b"");
        assert!(verify(b"tok", Role::Source, &s, &t, b"", &p));
        assert!(!verify(b"tok2", Role::Source, &s, &t, b"", &p));
        assert!(!verify(b"tok", Role::Target, &s, &t, b"", &p), "reflected");
        assert!(!verify(b"tok", Role::Source, &t, &s, b"", &p));
        assert!(!verify(b"tok", Role::Source, &s, &t, b"x", &p));
        assert!(!verify(b"tok", Role::Source, &s, &t, b"", &p[..31]));
        assert!(!verify(
            b"",
            Role::Source,
            &s,
            &t,
            b"",
            &prove(b"", Role::Source, &s, &t, b"")
        ));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
        assert_eq!(
            from_hex::<2>(&to_hex(&[0xab, 0x01]), "x").unwrap(),
            [0xab, 0x01]
        );
        assert!(from_hex::<2>("abc", "x").is_err());
        assert!(from_hex::<1>("zz", "x").is_err());
    }

    /// Fuzzing found `from_hex` slicing a peer's nonce by byte offsets,
    /// which panics inside a multi-byte character: any local user could
    /// crash a waiting target (and a fake target the source) before
    /// proving anything.
    #[test]
    fn a_nonce_of_non_ascii_text_is_refused_not_a_panic() {
        // 64 bytes, the length of a hex nonce, none of them hex.
        let nonce = "\u{fffd}".repeat(21) + "x";
        assert_eq!(nonce.len(), 2 * NONCE_SIZE);
        assert!(from_hex::<NONCE_SIZE>(&nonce, "nonce").is_err());
        assert!(
            from_hex::<1>("+f", "x").is_err(),
            "a sign is not a hex digit"
        );

        let mut source = Vec::new();
        protocol::send_json(
            &mut source,
            Kind::Hello,
            &Hello {
                vmm_version: "0".into(),
                nonce: nonce.clone(),
            },
        )
        .unwrap();
        let mut stream = std::io::Cursor::new(source);
        let result = authenticate_target(&mut stream, b"secret", b"");
        assert!(
            matches!(result, Err(ProtocolError::Malformed { .. })),
            "{result:?}"
        );

        let mut target = Vec::new();
        protocol::send_json(&mut target, Kind::Challenge, &Challenge { nonce }).unwrap();
        let mut stream = FakePeer {
            input: &target[..],
            output: Vec::new(),
        };
        let result = authenticate_source(&mut stream, b"secret", b"");
        assert!(
            matches!(result, Err(ProtocolError::TargetAuthentication(_))),
            "{result:?}"
        );
    }

    /// A peer that sends `input` and keeps what it is sent.
    struct FakePeer<'a> {
        input: &'a [u8],
        output: Vec<u8>,
    }

    impl Read for FakePeer<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for FakePeer<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn handshake(
        source_token: &'static [u8],
        target_token: &'static [u8],
    ) -> (Result<()>, Result<()>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let target = std::thread::spawn(move || authenticate_target(&mut b, target_token, b"cb"));
        let source = authenticate_source(&mut a, source_token, b"cb");
        drop(a);
        (source, target.join().unwrap())
    }

    #[test]
    fn both_ends_prove_the_token() {
        let (s, t) = handshake(b"same", b"same");
        assert!(s.is_ok() && t.is_ok(), "{s:?} {t:?}");
        let (s, t) = handshake(b"one", b"other");
        assert!(
            matches!(t, Err(ProtocolError::SourceAuthentication(_))),
            "{t:?}"
        );
        match s {
            Err(ProtocolError::Peer(m)) => assert!(m.contains("token"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_target_without_the_token_learns_only_the_nonce_and_proof() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let hello: Hello = protocol::expect_json(&mut b, Kind::Hello).unwrap();
            protocol::send_json(
                &mut b,
                Kind::Challenge,
                &Challenge {
                    nonce: to_hex(&[7; 32]),
                },
            )
            .unwrap();
            let proof: Proof = protocol::expect_json(&mut b, Kind::Proof).unwrap();
            // It claims success without a proof.
            protocol::send_json(&mut b, Kind::Ack, &protocol::Empty {}).unwrap();
            let mut rest = Vec::new();
            let _ = b.read_to_end(&mut rest);
            (hello, proof, rest)
        });
        let result = authenticate_source(&mut a, b"secret", b"");
        drop(a);
        assert!(
            matches!(result, Err(ProtocolError::TargetAuthentication(_))),
            "{result:?}"
        );
        let (hello, proof, rest) = fake.join().unwrap();
        assert!(!hello.nonce.contains("secret") && !proof.proof.contains("secret"));
        assert!(rest.is_empty(), "{} more bytes went out", rest.len());
    }
}
