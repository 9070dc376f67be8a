//! Migration benchmark: our VMM beside QEMU 7.2 migrating the same test
//! guest over loopback TCP, with loopback TCP itself measured in the same
//! run as the physical limit.
//!
//! `cargo bench -p vmm-tests --bench migration` prints a table and writes
//! docs/benchmarks/migration.md. Cases: an idle 1 GiB guest (memory never
//! touched), a quiet 1 GiB guest whose memory is all non-zero, and guests
//! rewriting a 64 MiB and a 512 MiB hot set at full speed; the non-zero
//! case again with our stream in TLS (QEMU plain beside it).
//! `MIGRATION_BENCH_CASES=hot` runs only the cases whose name contains
//! "hot"; `VMM_MIGRATION_TRACE=1` shows our VMMs' round-by-round trace.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use api::http::ApiClient;
use api::request::{MigrationParameters, MigrationPhase, SendMigrationRequest};
use vmm_tests::bench::{have_qemu, median, qemu_test_guest, write_report, Table, QEMU};
use vmm_tests::harness::{testguest, vmm_binary, TempDir};

const RUNS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(120);

/// A table row: its name, the figure it shows, how to print it.
type Row = (&'static str, fn(&Figures) -> f64, fn(f64) -> String);

/// One migration's figures.
#[derive(Clone, Copy, Default)]
struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    bytes: f64,
}

impl Figures {
    fn throughput(&self) -> f64 {
        self.bytes / (self.total_ms / 1e3)
    }
}

struct Case {
    name: &'static str,
    memory_mib: u64,
    /// Guest commands, and the console line that says the workload runs.
    commands: &'static str,
    ready: &'static str,
    /// Our stream in TLS (certificates from a CA made for the run).
    tls: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "idle 1 GiB guest",
        memory_mib: 1024,
        commands: "",
        ready: "testguest: ready",
        tls: false,
    },
    Case {
        name: "quiet 1 GiB guest, memory non-zero",
        memory_mib: 1024,
        commands: "memfill pattern=5aa5c33c0ff0e11e mib=960",
        ready: "memfill",
        tls: false,
    },
    Case {
        name: "quiet 1 GiB guest, memory non-zero, ours in TLS",
        memory_mib: 1024,
        commands: "memfill pattern=5aa5c33c0ff0e11e mib=960",
        ready: "memfill",
        tls: true,
    },
    Case {
        name: "guest rewriting a 64 MiB hot set",
        memory_mib: 1024,
        commands: "pages mib=64",
        ready: "pages: pass=",
        tls: false,
    },
    Case {
        name: "guest rewriting a 512 MiB hot set",
        memory_mib: 1024,
        commands: "pages mib=512",
        ready: "pages: pass=",
        tls: false,
    },
];

/// Reads console lines until one contains `needle`.
fn wait_line(out: &mut BufReader<ChildStdout>, needle: &str) {
    let deadline = Instant::now() + TIMEOUT;
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("the guest stopped printing before {needle:?}");
        }
        if line.contains(needle) {
            return;
        }
    }
    panic!("no {needle:?} within {TIMEOUT:?}");
}

/// Keeps draining a console so the guest never blocks on a full pipe.
fn drain(mut out: BufReader<ChildStdout>) {
    std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while out.read(&mut sink).unwrap_or(0) > 0 {}
    });
}

/// Our VMMs' stderr: shown with VMM_MIGRATION_TRACE (their round-by-round
/// trace), else dropped.
fn vmm_stderr() -> Stdio {
    if std::env::var_os("VMM_MIGRATION_TRACE").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn cmdline(case: &Case) -> String {
    format!("-- {}", case.commands)
}

/// A migration TLS directory for this host, made once per run.
fn tls_dir(dir: &TempDir) -> std::path::PathBuf {
    let tls = dir.join("tls");
    if !tls.join("client-key.pem").exists() {
        let ca = vmm_tests::migration::TestCa::new(&dir.join("ca"), "bench-ca");
        ca.issue(&tls);
    }
    tls
}

fn ours(case: &Case, dir: &TempDir) -> Figures {
    let port = free_port();
    let token = dir.join("token");
    std::fs::write(&token, "bench-token").unwrap();
    let tls = case.tls.then(|| tls_dir(dir));
    let tls_args: Vec<std::ffi::OsString> = match &tls {
        Some(d) => vec!["--migration-tls-dir".into(), d.into()],
        None => Vec::new(),
    };
    let api_socket = dir.join("src.sock");
    let _ = std::fs::remove_file(&api_socket);
    let target = Command::new(vmm_binary())
        .args([
            "--incoming",
            &format!("tcp:127.0.0.1:{port}"),
            "--migration-token-file",
        ])
        .arg(&token)
        .args(&tls_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(vmm_stderr())
        .spawn()
        .unwrap();
    let mut source = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(testguest())
        .args([
            "--cmdline",
            &cmdline(case),
            "--memory",
            &format!("size={}M", case.memory_mib),
        ])
        .args(["--cpus", "2", "--api-socket"])
        .arg(&api_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(vmm_stderr())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(source.stdout.take().unwrap());
    wait_line(&mut out, case.ready);
    drain(out);
    let api = ApiClient::new(&api_socket);
    api.send_migration(&SendMigrationRequest {
        destination: format!("tcp:127.0.0.1:{port}"),
        token: "bench-token".into(),
        tls_dir: tls,
        force: false,
        parameters: MigrationParameters::default(),
    })
    .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status = api.migration_status().expect("status");
        match status.phase {
            MigrationPhase::Completed => break status,
            MigrationPhase::Failed | MigrationPhase::Cancelled => {
                panic!("our migration failed: {:?}", status.error)
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "our migration did not finish");
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = source.wait();
    kill(target);
    Figures {
        total_ms: status.total_time_ms as f64,
        downtime_ms: status.downtime_ms as f64,
        bytes: status.transferred_bytes as f64,
    }
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        qmp.read_reply(); // greeting
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#);
        qmp
    }

    fn read_reply(&mut self) -> serde_json::Value {
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            // Asynchronous events are not replies.
            if value.get("event").is_none() {
                return value;
            }
        }
    }

    fn execute(&mut self, command: &str) -> serde_json::Value {
        self.writer.write_all(command.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let reply = self.read_reply();
        assert!(reply.get("error").is_none(), "QMP {command}: {reply}");
        reply["return"].clone()
    }
}

fn qemu_command(case: &Case, qmp: &Path) -> Command {
    let mut cmd = Command::new(QEMU);
    qemu_test_guest(
        &mut cmd,
        "microvm,x-option-roms=off,rtc=off,isa-serial=on",
        case.memory_mib,
        2,
        &format!("cpus=2 {}", cmdline(case)),
    )
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

fn qemu(case: &Case, dir: &TempDir) -> Figures {
    let port = free_port();
    let (src_qmp, dst_qmp) = (dir.join("qsrc.qmp"), dir.join("qdst.qmp"));
    let _ = std::fs::remove_file(&src_qmp);
    let _ = std::fs::remove_file(&dst_qmp);
    let target = qemu_command(case, &dst_qmp)
        .args(["-incoming", &format!("tcp:127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut source = qemu_command(case, &src_qmp)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(source.stdout.take().unwrap());
    wait_line(&mut out, case.ready);
    drain(out);
    let mut qmp = Qmp::connect(&src_qmp);
    let _ = Qmp::connect(&dst_qmp);
    // Same budget as ours (300 ms), no bandwidth cap (QEMU's default is 128 MiB/s).
    qmp.execute(
        r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300,"max-bandwidth":107374182400}}"#,
    );
    qmp.execute(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
    ));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status = qmp.execute(r#"{"execute":"query-migrate"}"#);
        match status["status"].as_str() {
            Some("completed") => break status,
            Some("failed") | Some("cancelled") => panic!("QEMU migration failed: {status}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "QEMU migration did not finish");
        std::thread::sleep(Duration::from_millis(5));
    };
    kill(source);
    kill(target);
    Figures {
        total_ms: status["total-time"].as_f64().unwrap_or(0.0),
        downtime_ms: status["downtime"].as_f64().unwrap_or(0.0),
        bytes: status["ram"]["transferred"].as_f64().unwrap_or(0.0),
    }
}

/// One TCP stream over loopback: bytes per second.
fn loopback_tcp() -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const TOTAL: usize = 2 << 30;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < TOTAL {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n;
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let buf = vec![0x5au8; 4 << 20];
    let start = Instant::now();
    let mut sent = 0;
    while sent < TOTAL {
        s.write_all(&buf).unwrap();
        sent += buf.len();
    }
    reader.join().unwrap();
    TOTAL as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = TempDir::new("bench-migration");
    let have_qemu = have_qemu();
    let tcp = median((0..3).map(|_| loopback_tcp()).collect());
    let mut table = Table::new(&["case", "figure", "ours", "QEMU 7.2", "ours/QEMU"]);
    // Our median total time per case, for the TLS cost.
    let mut totals: Vec<(bool, f64)> = Vec::new();
    // MIGRATION_BENCH_CASES=hot picks the cases whose name contains "hot".
    let only = std::env::var("MIGRATION_BENCH_CASES").ok();
    for case in CASES
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.name.contains(o)))
    {
        // Unmeasured first run: on these nested machines memory the host
        // has not touched yet is several times slower to fault in, and the
        // first VMM to fill 1 GiB would pay for both peers.
        let _ = ours(case, &dir);
        let ours_runs: Vec<Figures> = (0..RUNS).map(|_| ours(case, &dir)).collect();
        let qemu_runs: Vec<Figures> = if have_qemu {
            (0..RUNS).map(|_| qemu(case, &dir)).collect()
        } else {
            Vec::new()
        };
        let m = |runs: &[Figures], f: fn(&Figures) -> f64| {
            (!runs.is_empty()).then(|| median(runs.iter().map(f).collect()))
        };
        if case.commands.starts_with("memfill") {
            totals.push((case.tls, m(&ours_runs, |f| f.total_ms).unwrap()));
        }
        let rows: [Row; 4] = [
            ("total time (ms)", |f| f.total_ms, |v| format!("{v:.1}")),
            ("downtime (ms)", |f| f.downtime_ms, |v| format!("{v:.1}")),
            (
                "bytes sent (MiB)",
                |f| f.bytes / (1u64 << 20) as f64,
                |v| format!("{v:.1}"),
            ),
            (
                "throughput / loopback TCP",
                move |f| f.throughput(),
                |v| format!("{v:.3}"),
            ),
        ];
        for (name, pick, fmt) in rows {
            let ours = m(&ours_runs, pick).unwrap();
            let peer = m(&qemu_runs, pick);
            let (ours_v, peer_v) = if name.starts_with("throughput") {
                (ours / tcp, peer.map(|p| p / tcp))
            } else {
                (ours, peer)
            };
            table.row(vec![
                case.name.to_string(),
                name.to_string(),
                fmt(ours_v),
                peer_v.map(fmt).unwrap_or_else(|| "-".into()),
                vmm_tests::bench::ratio(ours_v, peer_v),
            ]);
        }
    }
    let text = table.render();
    println!("{text}");
    let plain = totals.iter().find(|(tls, _)| !tls).map(|t| t.1);
    let encrypted = totals.iter().find(|(tls, _)| *tls).map(|t| t.1);
    let tls_note = match (plain, encrypted) {
        (Some(p), Some(e)) => {
            let line = format!(
                " Our TLS cost on the non-zero 1 GiB guest: {e:.0} ms against {p:.0} ms plain ({:.2}x).",
                e / p
            );
            println!("{}", line.trim());
            line
        }
        _ => String::new(),
    };
    let note = format!(
        "Loopback TCP, one stream, measured in the same run: {:.2} GB/s. Medians of {RUNS} runs after a warm-up run. \
         Both sides: 2 vCPUs, 300 ms downtime limit, no bandwidth cap; QEMU `-machine microvm`, \
         `migrate-set-parameters max-bandwidth` raised from its 128 MiB/s default.",
        tcp / 1e9
    ) + &tls_note
        + " TLS: 1.3, AES-128-GCM (rustls with ring), P-256 certificates, the token proof inside.";
    write_report("migration", &note, &text);
}
