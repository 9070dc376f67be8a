//! Live migration test helpers: a source and target pair of real VMMs, the
//! page-record checks, fake peers that speak the wire protocol (with or
//! without the token, misbehaving at a chosen phase), and TLS certificates
//! made with the `openssl` command.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::http::ApiClient;
use api::request::{MigrationParameters, MigrationPhase, MigrationStatus, SendMigrationRequest};
use migration::auth;
use migration::protocol::{self, Empty, ErrorMessage, Kind};

use crate::harness::{field, TempDir, Vmm};

pub const BOOT: Duration = Duration::from_secs(20);
pub const SHORT: Duration = Duration::from_secs(10);
pub const MIGRATE: Duration = Duration::from_secs(60);
pub const EXIT_MIGRATED: i32 = 6;
pub const EXIT_ERROR: i32 = 1;
pub const TOKEN: &str = "s3cret-migration-token";

pub struct Pair {
    pub dir: TempDir,
    pub source: Vmm,
    pub target: Vmm,
}

impl Pair {
    /// A source running `workload` (guest commands, or boot options, `--`
    /// and commands) and a target waiting on `listen` (`unix:` in the temp
    /// dir when None).
    pub fn start(workload: &str, memory: &str, listen: Option<&str>) -> Pair {
        Self::start_in(workload, memory, listen, &[], &[], &[])
    }

    /// As [`Pair::start`], each VMM run through a command prefix (`ip netns exec NS`).
    pub fn start_in(
        workload: &str,
        memory: &str,
        listen: Option<&str>,
        source_prefix: &[&str],
        target_prefix: &[&str],
        source_extra: &[String],
    ) -> Pair {
        Self::start_with(
            workload,
            memory,
            listen,
            source_prefix,
            target_prefix,
            source_extra,
            &[],
        )
    }

    /// As [`Pair::start_in`], with extra flags for the target.
    pub fn start_with(
        workload: &str,
        memory: &str,
        listen: Option<&str>,
        source_prefix: &[&str],
        target_prefix: &[&str],
        source_extra: &[String],
        target_extra: &[String],
    ) -> Pair {
        let dir = TempDir::new("migrate");
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let listen = listen
            .map(str::to_string)
            .unwrap_or_else(|| format!("unix:{}", dir.join("migration.sock").display()));
        let mut target_args = vec![
            "--incoming".to_string(),
            listen,
            "--migration-token-file".into(),
            dir.join("token").display().to_string(),
            "--api-socket".into(),
            dir.join("target.sock").display().to_string(),
        ];
        target_args.extend(target_extra.iter().cloned());
        let target = Vmm::spawn_with_prefix(target_prefix, &target_args);
        target.wait_api(SHORT);
        let source = spawn_source(&dir, workload, memory, source_prefix, source_extra);
        Pair {
            dir,
            source,
            target,
        }
    }

    pub fn destination(&self) -> String {
        format!("unix:{}", self.dir.join("migration.sock").display())
    }

    pub fn source_api(&self) -> ApiClient {
        self.source.api()
    }
}

/// A source VMM (2 vCPUs) running `workload`, its API socket `source.sock` in `dir`.
pub fn spawn_source(
    dir: &TempDir,
    workload: &str,
    memory: &str,
    prefix: &[&str],
    extra: &[String],
) -> Vmm {
    let mut args = vec![
        "--kernel".to_string(),
        crate::harness::testguest().display().to_string(),
        "--cmdline".into(),
        if workload.contains("-- ") {
            workload.to_string()
        } else {
            format!("-- {workload}")
        },
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        format!("size={memory}"),
        "--api-socket".into(),
        dir.join("source.sock").display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    Vmm::spawn_with_prefix(prefix, &args)
}

/// Parameters under which pre-copy cannot converge: a slow link and a 1 ms
/// downtime budget; the walker keeps re-dirtying pages already sent.
pub fn never_converging(bandwidth_bytes_per_s: u64) -> MigrationParameters {
    MigrationParameters {
        downtime_ms: 1,
        bandwidth_bytes_per_s: Some(bandwidth_bytes_per_s),
        ..Default::default()
    }
}

/// A pair whose source runs the page-record walker over 64 MiB.
pub fn walking_pair() -> Pair {
    let mut pair = Pair::start("pages mib=64", "256M", None);
    pair.source.wait_for("pages: start", BOOT);
    pair
}

pub fn send(
    destination: &str,
    token: &str,
    parameters: MigrationParameters,
) -> SendMigrationRequest {
    SendMigrationRequest {
        destination: destination.into(),
        token: token.into(),
        tls_dir: None,
        force: false,
        parameters,
    }
}

/// Polls the status until `done` says so; panics with the last status on timeout.
pub fn wait_status(
    api: &ApiClient,
    timeout: Duration,
    what: &str,
    done: impl Fn(&MigrationStatus) -> bool,
) -> MigrationStatus {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(status) = api.migration_status() {
            if done(&status) {
                return status;
            }
            last = Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("migration never reached {what}; last status: {last:#?}");
}

/// [`wait_status`] until the migration failed.
pub fn wait_failed(api: &ApiClient, timeout: Duration, what: &str) -> MigrationStatus {
    wait_status(api, timeout, what, |s| s.phase == MigrationPhase::Failed)
}

pub fn pages_pass(vmm: &mut Vmm) -> u64 {
    let line = vmm.wait_for("pages: pass=", SHORT);
    field(&line, "pass").unwrap()
}

/// Stops the walker and checks the page-record invariant.
pub fn check_pages(vmm: &mut Vmm) -> String {
    vmm.send_line("check-pages");
    let line = vmm.wait_for("pages-", SHORT);
    assert!(
        line.starts_with("pages-ok"),
        "invariant broken: {line}\n{}",
        vmm.report()
    );
    line
}

/// A raw message of the current protocol version.
pub fn message(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut m = protocol::Header {
        kind,
        length: payload.len() as u64,
    }
    .encode()
    .to_vec();
    m.extend(payload);
    m
}

/// Connects to a Unix socket, retrying until it listens.
pub fn connect_unix(path: &Path) -> UnixStream {
    let deadline = Instant::now() + SHORT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("nothing listens on {}: {e}", path.display()),
        }
    }
}

/// A source's side of the handshake on `stream` with `token`.
pub fn authenticate(stream: &mut UnixStream, token: &str) -> protocol::Result<()> {
    auth::authenticate_source(stream, token.as_bytes(), b"")
}

/// What a fake target without the token answers to the source's proof.
#[derive(Clone, Copy, Debug)]
pub enum Impostor {
    /// A proof made up of random bytes.
    WrongProof,
    /// An `Ack`, as if there were nothing to prove.
    Ack,
}

/// How a fake target that knows the token misbehaves at switch-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    StallAfterState,
    CloseAfterState,
    GarbageAfterState,
    StallAfterComplete,
    CloseAfterComplete,
    GarbageAfterComplete,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::StallAfterState,
        Fault::CloseAfterState,
        Fault::GarbageAfterState,
        Fault::StallAfterComplete,
        Fault::CloseAfterComplete,
        Fault::GarbageAfterComplete,
    ];

    /// Whether the source sent `Complete` before the fault.
    pub fn after_complete(self) -> bool {
        matches!(
            self,
            Fault::StallAfterComplete | Fault::CloseAfterComplete | Fault::GarbageAfterComplete
        )
    }
}

/// A fake target on a Unix socket: one connection, in a thread.
pub struct FakeTarget {
    pub destination: String,
    /// The kind of each message the fake received, as it arrives.
    pub received: Receiver<Kind>,
    thread: Option<JoinHandle<FakeReport>>,
    _dir: TempDir,
}

/// What a fake target saw.
#[derive(Debug, Default)]
pub struct FakeReport {
    /// Kinds of the messages received, in order.
    pub kinds: Vec<Kind>,
    /// Bytes received that were not whole messages (after a refusal).
    pub stray_bytes: usize,
}

impl FakeTarget {
    /// Without the token: answers Hello with a challenge, then the
    /// source's proof as `impostor` says, then only listens.
    pub fn impostor(impostor: Impostor) -> FakeTarget {
        Self::spawn(move |stream, seen| {
            let mut report = FakeReport::default();
            let hello: auth::Hello = expect(stream, Kind::Hello, seen, &mut report)?;
            let _ = hello;
            let challenge = auth::Challenge {
                nonce: auth::to_hex(&auth::nonce().unwrap()),
            };
            protocol::send_json(stream, Kind::Challenge, &challenge).ok()?;
            let _: auth::Proof = expect(stream, Kind::Proof, seen, &mut report)?;
            match impostor {
                Impostor::WrongProof => {
                    let proof = auth::Proof {
                        proof: auth::to_hex(&auth::nonce().unwrap()),
                    };
                    protocol::send_json(stream, Kind::Proof, &proof).ok()?;
                }
                Impostor::Ack => protocol::send_json(stream, Kind::Ack, &Empty {}).ok()?,
            }
            // Whatever comes now is what the source gave away.
            drain(stream, seen, &mut report);
            Some(report)
        })
    }

    /// With the token: follows the protocol up to `fault`.
    pub fn faulty(fault: Fault) -> FakeTarget {
        Self::spawn(move |stream, seen| {
            let mut report = FakeReport::default();
            auth::authenticate_target(stream, TOKEN.as_bytes(), b"").ok()?;
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                let header = protocol::read_header(stream).ok()?;
                let mut left = header.length;
                while left > 0 {
                    let n = left.min(buffer.len() as u64) as usize;
                    stream.read_exact(&mut buffer[..n]).ok()?;
                    left -= n as u64;
                }
                report.kinds.push(header.kind);
                let _ = seen.send(header.kind);
                let garbage = b"\x00GARBAGE\xffnot a migration message at all".repeat(4);
                match (header.kind, fault) {
                    (Kind::Config | Kind::Sync, _) => {
                        protocol::send_json(stream, Kind::Ack, &Empty {}).ok()?
                    }
                    (Kind::State, Fault::StallAfterState)
                    | (Kind::Complete, Fault::StallAfterComplete) => {
                        stall(stream);
                        return Some(report);
                    }
                    (Kind::State, Fault::CloseAfterState)
                    | (Kind::Complete, Fault::CloseAfterComplete) => return Some(report),
                    (Kind::State, Fault::GarbageAfterState)
                    | (Kind::Complete, Fault::GarbageAfterComplete) => {
                        let _ = stream.write_all(&garbage);
                        stall(stream);
                        return Some(report);
                    }
                    (Kind::State, _) => protocol::send_json(stream, Kind::Ack, &Empty {}).ok()?,
                    (Kind::Complete, _) => {
                        protocol::send_json(stream, Kind::Running, &Empty {}).ok()?
                    }
                    (Kind::Abandon | Kind::Error, _) => return Some(report),
                    _ => {}
                }
            }
        })
    }

    /// With the token: answers the source's Config with an `Error` saying
    /// `why` (a hostile target's words: anything).
    pub fn refusing(why: &'static str) -> FakeTarget {
        Self::spawn(move |stream, seen| {
            let mut report = FakeReport::default();
            auth::authenticate_target(stream, TOKEN.as_bytes(), b"").ok()?;
            let header = protocol::read_header(stream).ok()?;
            let _ = protocol::read_payload(stream, &header).ok()?;
            report.kinds.push(header.kind);
            let _ = seen.send(header.kind);
            refuse(stream, why);
            drain(stream, seen, &mut report);
            Some(report)
        })
    }

    fn spawn(
        behave: impl FnOnce(&mut UnixStream, &std::sync::mpsc::Sender<Kind>) -> Option<FakeReport>
            + Send
            + 'static,
    ) -> FakeTarget {
        let dir = TempDir::new("fake-target");
        let path = dir.join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (seen, received) = channel();
        let thread = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            behave(&mut stream, &seen).unwrap_or_default()
        });
        FakeTarget {
            destination: format!("unix:{}", path.display()),
            received,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Waits for the fake to end (the source closed) and returns what it saw.
    pub fn report(mut self) -> FakeReport {
        self.thread.take().unwrap().join().unwrap()
    }
}

fn expect<T: serde::de::DeserializeOwned>(
    stream: &mut UnixStream,
    kind: Kind,
    seen: &std::sync::mpsc::Sender<Kind>,
    report: &mut FakeReport,
) -> Option<T> {
    let value = protocol::expect_json(stream, kind).ok()?;
    report.kinds.push(kind);
    let _ = seen.send(kind);
    Some(value)
}

/// Reads whole messages until the peer closes, then counts stray bytes.
fn drain(stream: &mut UnixStream, seen: &std::sync::mpsc::Sender<Kind>, report: &mut FakeReport) {
    loop {
        let mut raw = [0u8; protocol::HEADER_SIZE];
        match stream.read_exact(&mut raw) {
            Ok(()) => match protocol::Header::decode(&raw) {
                Ok(header) => {
                    let mut payload = vec![0u8; header.length as usize];
                    if stream.read_exact(&mut payload).is_err() {
                        report.stray_bytes += payload.len();
                        return;
                    }
                    report.kinds.push(header.kind);
                    let _ = seen.send(header.kind);
                }
                Err(_) => report.stray_bytes += raw.len(),
            },
            Err(_) => {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
                report.stray_bytes += rest.len();
                return;
            }
        }
    }
}

/// Holds the connection open without answering until the peer closes it.
fn stall(stream: &mut UnixStream) {
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

/// Tells a source's peer why it stopped, as a real target would.
pub fn refuse(stream: &mut UnixStream, why: &str) {
    let _ = protocol::send_json(
        stream,
        Kind::Error,
        &ErrorMessage {
            message: why.into(),
        },
    );
}

/// A certificate authority made with `openssl`, able to issue the per-host
/// files of a migration TLS directory.
pub struct TestCa {
    dir: std::path::PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (package openssl) runs");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// A new CA (P-256) in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let subject = format!("/CN={name}");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                &subject,
            ],
            dir,
        );
        TestCa { dir: dir.into() }
    }

    /// Writes a migration TLS directory for host `localhost`/127.0.0.1:
    /// this CA's certificate, a server and a client certificate and keys.
    pub fn issue(&self, out: &Path) {
        std::fs::create_dir_all(out).unwrap();
        std::fs::copy(self.dir.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
        for (role, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let ext = out.join(format!("{role}.ext"));
            std::fs::write(
                &ext,
                format!(
                    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n\
                     basicConstraints=CA:FALSE\n"
                ),
            )
            .unwrap();
            let key = out.join(format!("{role}-key.pem"));
            let csr = out.join(format!("{role}.csr"));
            let cert = out.join(format!("{role}-cert.pem"));
            openssl(
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    key.to_str().unwrap(),
                    "-out",
                    csr.to_str().unwrap(),
                    "-subj",
                    "/CN=localhost",
                ],
                &self.dir,
            );
            openssl(
                &[
                    "x509",
                    "-req",
                    "-in",
                    csr.to_str().unwrap(),
                    "-CA",
                    "ca-cert.pem",
                    "-CAkey",
                    "ca-key.pem",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    cert.to_str().unwrap(),
                    "-extfile",
                    ext.to_str().unwrap(),
                ],
                &self.dir,
            );
        }
    }
}
