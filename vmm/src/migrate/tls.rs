//! TLS for the migration stream (rustls, TLS 1.3 only), with QEMU's file
//! layout: one directory per host holding `ca-cert.pem` (the CA both peers'
//! certificates must chain to), `server-cert.pem` and `server-key.pem` (this
//! host as a target), `client-cert.pem` and `client-key.pem` (this host as a
//! source). Both sides verify the peer: the source checks the target's
//! certificate against the CA and the host name it connects to (`localhost`
//! for `unix:` destinations); the target requires a client certificate from
//! the same CA. The token handshake still runs inside TLS, bound to the
//! session (see `migration::auth`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Label of the TLS exporter secret the token proofs are bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-vmm-migration-auth";

/// Why the TLS files of a directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS setup: {0}")]
    Verifier(String),
}

impl TlsError {
    /// A file missing or unreadable, or not a certificate or key, is the
    /// caller's; a rustls refusal of files that parsed too.
    pub fn class(&self) -> config::ErrorClass {
        config::ErrorClass::Caller
    }
}

/// The crypto provider: ring, with AES-128-GCM first (the fastest here).
/// rustls deprecates ring's provider for lacking post-quantum key
/// exchange; aws-lc-rs has it but brings a large C build.
fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    let mut p = provider::default_provider();
    p.cipher_suites = vec![
        provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn read(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), TlsError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(source) => Err(TlsError::Read { path, source }),
    }
}

fn certificates(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let (path, bytes) = read(dir, name)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path,
            message: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let (path, bytes) = read(dir, name)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path,
        message: format!("no usable PEM private key: {e}"),
    })
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(dir, CA_CERT)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: dir.join(CA_CERT),
            message: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The source's side (TLS client) from `dir`.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(certificates(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)?;
    Ok(Arc::new(config))
}

/// The target's side (TLS server, client certificates required) from `dir`.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)?;
    // One connection, never resumed: no tickets to send or to read.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}
