//! Live migration between two real `vmm` processes on this machine, proven
//! with the test guest's page-record workload (see shared notes): after the
//! move every page is in place and current, the guest runs on, the source
//! exited "migrated"; and every failure leaves the source running intact.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::http::ApiClient;
use api::request::{
    MigrationParameters, MigrationPhase, MigrationStatus, SendMigrationRequest, TimeoutAction,
};
use vmm_tests::harness::{device_interrupts, field, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);
const MIGRATE: Duration = Duration::from_secs(60);
const EXIT_MIGRATED: i32 = 6;
const EXIT_ERROR: i32 = 1;
const TOKEN: &str = "s3cret-migration-token";

struct Pair {
    dir: TempDir,
    source: Vmm,
    target: Vmm,
}

impl Pair {
    /// A source running `workload` (guest commands, or boot options, `--`
    /// and commands) and a target waiting on `listen` (`unix:` in the temp
    /// dir when None).
    fn start(workload: &str, memory: &str, listen: Option<&str>) -> Pair {
        Self::start_in(workload, memory, listen, &[], &[], &[])
    }

    /// As [`Pair::start`], each VMM run through a command prefix (`ip netns exec NS`).
    fn start_in(
        workload: &str,
        memory: &str,
        listen: Option<&str>,
        source_prefix: &[&str],
        target_prefix: &[&str],
        source_extra: &[String],
    ) -> Pair {
        let dir = TempDir::new("migrate");
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let listen = listen
            .map(str::to_string)
            .unwrap_or_else(|| format!("unix:{}", dir.join("migration.sock").display()));
        let target_args = vec![
            "--incoming".to_string(),
            listen,
            "--migration-token-file".into(),
            dir.join("token").display().to_string(),
            "--api-socket".into(),
            dir.join("target.sock").display().to_string(),
        ];
        let target = Vmm::spawn_with_prefix(target_prefix, &target_args);
        target.wait_api(SHORT);
        let source_args = vec![
            "--kernel".to_string(),
            vmm_tests::harness::testguest().display().to_string(),
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
        let source_args: Vec<String> = source_args
            .into_iter()
            .chain(source_extra.iter().cloned())
            .collect();
        let source = Vmm::spawn_with_prefix(source_prefix, &source_args);
        Pair {
            dir,
            source,
            target,
        }
    }

    fn destination(&self) -> String {
        format!("unix:{}", self.dir.join("migration.sock").display())
    }

    fn source_api(&self) -> ApiClient {
        self.source.api()
    }
}

/// Parameters under which pre-copy cannot converge: a slow link and a 1 ms
/// downtime budget; the walker keeps re-dirtying pages already sent.
fn never_converging(bandwidth_bytes_per_s: u64) -> MigrationParameters {
    MigrationParameters {
        downtime_ms: 1,
        bandwidth_bytes_per_s: Some(bandwidth_bytes_per_s),
        ..Default::default()
    }
}

/// A pair whose source runs the page-record walker over 64 MiB.
fn walking_pair() -> Pair {
    let mut pair = Pair::start("pages mib=64", "256M", None);
    pair.source.wait_for("pages: start", BOOT);
    pair
}

fn send(destination: &str, token: &str, parameters: MigrationParameters) -> SendMigrationRequest {
    SendMigrationRequest {
        destination: destination.into(),
        token: token.into(),
        force: false,
        parameters,
    }
}

/// Polls the status until `done` says so; panics with the last status on timeout.
fn wait_status(
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

fn pages_pass(vmm: &mut Vmm) -> u64 {
    let line = vmm.wait_for("pages: pass=", SHORT);
    field(&line, "pass").unwrap()
}

/// Stops the walker and checks the page-record invariant.
fn check_pages(vmm: &mut Vmm) -> String {
    vmm.send_line("check-pages");
    let line = vmm.wait_for("pages-", SHORT);
    assert!(
        line.starts_with("pages-ok"),
        "invariant broken: {line}\n{}",
        vmm.report()
    );
    line
}

#[test]
fn page_records_survive_forced_dirty_rounds_and_the_guest_runs_on() {
    require_kvm!();
    let mut pair = Pair::start("pages mib=64", "256M", None);
    pair.source.wait_for("pages: start", BOOT);
    let before = pages_pass(&mut pair.source);
    let api = pair.source_api();
    // Start so that pre-copy cannot converge: a slow link and a 1 ms budget.
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        MigrationParameters {
            auto_converge: false,
            ..never_converging(64 << 20)
        },
    ))
    .expect("send-migration");
    // Forced iterations: pages already sent are re-dirtied by the walker.
    let status = wait_status(&api, MIGRATE, "two dirty rounds", |s| s.iterations >= 2);
    assert_eq!(status.phase, MigrationPhase::Active);
    assert!(
        status.data_pages > 64 * 256,
        "pages were sent more than once: {status:#?}"
    );
    // The API answers while the migration runs.
    assert!(api.ping().is_ok());
    // Lift the limits and let it converge.
    api.migration_parameters(&MigrationParameters::default())
        .unwrap();
    let final_status = wait_status(&api, MIGRATE, "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(
        final_status.phase,
        MigrationPhase::Completed,
        "{final_status:#?}"
    );
    assert_eq!(
        pair.source.exit_code(SHORT),
        EXIT_MIGRATED,
        "{}",
        pair.source.report()
    );
    // The walker continues on the target, past where it was on the source.
    let after = pages_pass(&mut pair.target);
    assert!(
        after > before,
        "pass {before} on the source, {after} on the target"
    );
    let line = check_pages(&mut pair.target);
    assert!(field(&line, "passes").unwrap() >= after, "{line}");
    let target_status = pair.target.api().migration_status().unwrap();
    assert_eq!(target_status.phase, MigrationPhase::Completed);
    assert!(final_status.iterations >= 3, "{final_status:#?}");
    assert!(final_status.downtime_ms > 0 && final_status.total_time_ms > 0);
}

#[test]
fn counters_continue_on_the_target() {
    require_kvm!();
    let mut pair = Pair::start("counters period_ms=100", "128M", None);
    let line = pair.source.wait_for("counters:", BOOT);
    let before = field(&line, "cpu1").unwrap();
    let api = pair.source_api();
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        MigrationParameters::default(),
    ))
    .unwrap();
    wait_status(&api, MIGRATE, "completion", |s| {
        s.phase == MigrationPhase::Completed
    });
    // The guest runs on the target now: the source must not run it again,
    // nor start another migration of it.
    let resume = api.resume().unwrap_err().to_string();
    assert!(resume.contains("migrated"), "{resume}");
    let again = api
        .send_migration(&send(
            &pair.destination(),
            TOKEN,
            MigrationParameters::default(),
        ))
        .unwrap_err()
        .to_string();
    assert!(again.contains("migrated"), "{again}");
    assert_eq!(api.info().unwrap().state, api::request::VmState::Migrated);
    // Stopping it now (a cluster agent's stop) still says "migrated".
    pair.source.signal(libc::SIGTERM);
    assert_eq!(
        pair.source.exit_code(MIGRATE),
        EXIT_MIGRATED,
        "{}",
        pair.source.report()
    );
    let first = field(&pair.target.wait_for("counters:", SHORT), "cpu1").unwrap();
    let later = field(&pair.target.wait_for("counters:", SHORT), "cpu1").unwrap();
    assert!(
        first >= before && later > first,
        "{before} -> {first} -> {later}"
    );
    // The console works on the target too.
    pair.target.send_line("echo alive after migration");
    pair.target.wait_for("alive after migration", SHORT);
}

#[test]
fn a_wrong_token_is_refused_and_the_source_runs_on() {
    require_kvm!();
    let mut pair = Pair::start("pages mib=16", "128M", None);
    pair.source.wait_for("pages: start", BOOT);
    let api = pair.source_api();
    api.send_migration(&send(
        &pair.destination(),
        "not-the-token",
        MigrationParameters::default(),
    ))
    .unwrap();
    let status = wait_status(&api, MIGRATE, "failure", |s| {
        s.phase == MigrationPhase::Failed
    });
    let error = status.error.unwrap_or_default();
    assert!(error.contains("token"), "{error}");
    assert_eq!(
        pair.target.exit_code(SHORT),
        EXIT_ERROR,
        "{}",
        pair.target.report()
    );
    assert!(
        pair.target.console().is_empty(),
        "the target never ran a guest"
    );
    // The source still runs, memory intact.
    pages_pass(&mut pair.source);
    check_pages(&mut pair.source);
}

#[test]
fn a_target_killed_mid_stream_leaves_the_source_running_intact() {
    require_kvm!();
    let mut pair = walking_pair();
    let api = pair.source_api();
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        never_converging(16 << 20),
    ))
    .unwrap();
    wait_status(&api, MIGRATE, "active", |s| {
        s.phase == MigrationPhase::Active && s.transferred_bytes > 1 << 20
    });
    pair.target.signal(libc::SIGKILL);
    let status = wait_status(&api, MIGRATE, "failure", |s| {
        s.phase == MigrationPhase::Failed
    });
    assert!(status.error.is_some(), "{status:#?}");
    assert_eq!(api.info().unwrap().state, api::request::VmState::Running);
    let before = pages_pass(&mut pair.source);
    let after = pages_pass(&mut pair.source);
    assert!(after > before);
    check_pages(&mut pair.source);
}

#[test]
fn cancel_and_timeout_leave_the_source_running() {
    require_kvm!();
    let mut pair = walking_pair();
    let api = pair.source_api();
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        never_converging(16 << 20),
    ))
    .unwrap();
    wait_status(&api, MIGRATE, "active", |s| {
        s.phase == MigrationPhase::Active
    });
    api.migration_cancel().unwrap();
    let status = wait_status(&api, MIGRATE, "cancelled", |s| {
        s.phase == MigrationPhase::Cancelled
    });
    assert!(status.error.is_some());
    // The target saw the source give up, and never ran the guest.
    assert_eq!(
        pair.target.exit_code(SHORT),
        EXIT_ERROR,
        "{}",
        pair.target.report()
    );
    assert!(pair.target.console().is_empty());
    pages_pass(&mut pair.source);
    check_pages(&mut pair.source);

    // A timeout with action cancel against a fresh target.
    pair.source.send_line("pages mib=64");
    pair.source.wait_for("pages: start", SHORT);
    let dir2 = TempDir::new("migrate-timeout");
    std::fs::write(dir2.join("token"), TOKEN).unwrap();
    let listen = format!("unix:{}", dir2.join("m.sock").display());
    let mut target2 = Vmm::spawn(&[
        "--incoming",
        &listen,
        "--migration-token-file",
        dir2.join("token").to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    api.send_migration(&send(
        &listen,
        TOKEN,
        MigrationParameters {
            timeout_s: Some(2),
            timeout_action: TimeoutAction::Cancel,
            auto_converge: false,
            ..never_converging(16 << 20)
        },
    ))
    .unwrap();
    let status = wait_status(&api, MIGRATE, "timeout", |s| {
        s.phase == MigrationPhase::Failed
    });
    assert!(status.error.unwrap_or_default().contains("timed out"));
    assert_eq!(target2.exit_code(SHORT), EXIT_ERROR);
    pages_pass(&mut pair.source);
    check_pages(&mut pair.source);
}

/// Connects to a listening target and sends `bytes`; the target must fail
/// cleanly without running anything.
fn hostile_stream(bytes: &[u8]) -> (i32, Vec<String>) {
    use std::io::Write;
    let dir = TempDir::new("migrate-hostile");
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let socket: PathBuf = dir.join("m.sock");
    let mut target = Vmm::spawn(&[
        "--incoming",
        &format!("unix:{}", socket.display()),
        "--migration-token-file",
        dir.join("token").to_str().unwrap(),
    ]);
    let deadline = Instant::now() + SHORT;
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("target never listened: {e}"),
        }
    };
    let _ = stream.write_all(bytes);
    drop(stream);
    let code = target.exit_code(SHORT);
    (code, target.console())
}

fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(b"VMMM");
    m.extend(1u16.to_le_bytes());
    m.extend(kind.to_le_bytes());
    m.extend((payload.len() as u64).to_le_bytes());
    m.extend(payload);
    m
}

#[test]
fn malformed_and_truncated_streams_never_run_a_guest() {
    require_kvm!();
    let hello = message(
        1,
        format!(r#"{{"vmm_version":"x","token":"{TOKEN}"}}"#).as_bytes(),
    );
    let config = message(
        3,
        format!(
            r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size_mib":64}}}}"#,
            vmm_tests::harness::testguest().display()
        )
        .as_bytes(),
    );
    let mut huge = message(4, &[]);
    huge[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut outside = hello.clone();
    outside.extend(&config);
    let mut range = Vec::new();
    range.extend((1u64 << 40).to_le_bytes()); // far outside 64 MiB of RAM
    range.extend(4096u32.to_le_bytes());
    range.extend(0u32.to_le_bytes());
    range.extend([0xabu8; 4096]);
    outside.extend(message(4, &range));
    let mut truncated = hello.clone();
    truncated.extend(&config);
    truncated.extend(&message(4, &[0u8; 8])[..20]);
    let mut early_complete = hello.clone();
    early_complete.extend(&config);
    early_complete.extend(message(6, b"{}"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("nothing", Vec::new()),
        ("oversized message", huge),
        ("half a header", hello[..7].to_vec()),
        ("range outside RAM", outside),
        ("truncated memory message", truncated),
        ("complete before state", early_complete),
    ];
    for (what, bytes) in cases {
        let (code, console) = hostile_stream(&bytes);
        assert_eq!(code, EXIT_ERROR, "{what}");
        assert!(console.is_empty(), "{what}: a guest ran: {console:?}");
    }
}

#[test]
fn migration_over_tcp_between_network_namespaces() {
    require_kvm!();
    let Some(net) = Netns::create() else { return };
    let listen = format!("tcp:{}:47001", Netns::TARGET_ADDR);
    let mut pair = Pair::start_in(
        "pages mib=32",
        "128M",
        Some(&listen),
        &["ip", "netns", "exec", &net.source],
        &["ip", "netns", "exec", &net.target],
        &[],
    );
    pair.source.wait_for("pages: start", BOOT);
    let api = pair.source_api();
    api.send_migration(&send(&listen, TOKEN, MigrationParameters::default()))
        .unwrap();
    let status = wait_status(&api, MIGRATE, "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(status.phase, MigrationPhase::Completed, "{status:#?}");
    assert_eq!(pair.source.exit_code(SHORT), EXIT_MIGRATED);
    pages_pass(&mut pair.target);
    check_pages(&mut pair.target);
    drop(net);
}

/// Two network namespaces joined by a veth pair: the source VMM in one, the
/// target in the other, so the migration crosses a real TCP path.
struct Netns {
    source: String,
    target: String,
}

impl Netns {
    const SOURCE_ADDR: &'static str = "10.231.7.1";
    const TARGET_ADDR: &'static str = "10.231.7.2";

    fn create() -> Option<Netns> {
        let tag = std::process::id() % 100_000;
        let net = Netns {
            source: format!("vmms{tag}"),
            target: format!("vmmt{tag}"),
        };
        let (a, b) = (format!("vma{tag}"), format!("vmb{tag}"));
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), net.source.clone()],
            vec!["netns".into(), "add".into(), net.target.clone()],
            vec![
                "-n".into(),
                net.source.clone(),
                "link".into(),
                "add".into(),
                a.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                b.clone(),
                "netns".into(),
                net.target.clone(),
            ],
            vec![
                "-n".into(),
                net.source.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/24", Self::SOURCE_ADDR),
                "dev".into(),
                a.clone(),
            ],
            vec![
                "-n".into(),
                net.target.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/24", Self::TARGET_ADDR),
                "dev".into(),
                b.clone(),
            ],
            vec![
                "-n".into(),
                net.source.clone(),
                "link".into(),
                "set".into(),
                a,
                "up".into(),
            ],
            vec![
                "-n".into(),
                net.target.clone(),
                "link".into(),
                "set".into(),
                b,
                "up".into(),
            ],
            vec![
                "-n".into(),
                net.source.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                net.target.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in steps {
            match std::process::Command::new("ip").args(&step).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    drop(net);
                    panic!(
                        "ip {}: {}",
                        step.join(" "),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                Err(e) => {
                    eprintln!("SKIP: cannot run ip (iproute2 is not installed): {e}");
                    return None;
                }
            }
        }
        Some(net)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and its peer.
        for ns in [&self.source, &self.target] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

#[test]
fn device_writes_to_guest_memory_are_carried_over() {
    require_kvm!();
    device_writes_carried_over("");
}

#[test]
fn device_writes_and_ring_state_carry_over_with_linux_ring_features() {
    // EVENT_IDX moves the notification state into the rings (avail_event,
    // used_event) and the device's last signalled index: the target must
    // go on notifying exactly as the source would have.
    require_kvm!();
    device_writes_carried_over("event_idx=1 indirect=1");
}

/// A virtio-blk reader (guest boot `options`) keeps rewriting a buffer
/// while forced dirty rounds run; its buffer and the page records are
/// intact on the target, where it keeps reading.
fn device_writes_carried_over(options: &str) {
    // The disk is on storage both sides see (here: the same file).
    let disk_dir = TempDir::new("migrate-disk");
    let disk = disk_dir.join("shared.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut pair = Pair::start_in(
        &format!(
            "{options} -- blk-reader sector=0 count=512 pattern=abcdef cpu=1; pages mib=32 cpu=0"
        ),
        "256M",
        None,
        &[],
        &[],
        &["--disk".to_string(), format!("path={}", disk.display())],
    );
    pair.source.wait_for("blk-reader: start", BOOT);
    pair.source.wait_for("pages: start", SHORT);
    pair.source.wait_for("blk-reader: rounds=", SHORT);
    let api = pair.source_api();
    // A few forced rounds while the device keeps rewriting the buffer.
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        MigrationParameters {
            auto_converge: false,
            ..never_converging(64 << 20)
        },
    ))
    .unwrap();
    wait_status(&api, MIGRATE, "two dirty rounds", |s| s.iterations >= 2);
    api.migration_parameters(&MigrationParameters::default())
        .unwrap();
    let status = wait_status(&api, MIGRATE, "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(status.phase, MigrationPhase::Completed, "{status:#?}");
    assert_eq!(
        pair.source.exit_code(SHORT),
        EXIT_MIGRATED,
        "{}",
        pair.source.report()
    );
    // The reader runs on the target with the disk it took over.
    pair.target.wait_for("blk-reader: rounds=", SHORT);
    pair.target.send_line("blk-check pattern=abcdef");
    let line = pair.target.wait_for("blk-check-", SHORT);
    assert!(
        line.starts_with("blk-check-ok"),
        "{line}\n{}",
        pair.target.report()
    );
    check_pages(&mut pair.target);
    let counters = pair.target.api().counters().unwrap();
    assert!(counters["disk0"]["read_ops"] > 0, "{counters:?}");
    // Requests from the boot CPU complete with interrupts on the target
    // (the guest's 10 ms timer would otherwise hide a lost one).
    pair.target.send_line("irqs");
    let before = device_interrupts(&pair.target.wait_for("irqs:", SHORT));
    pair.target.send_line("blk-inflight n=4 count=200; irqs");
    let line = pair.target.wait_for("blk: inflight done=", SHORT);
    assert_eq!(field(&line, "done"), Some(200), "{line}");
    let after = device_interrupts(&pair.target.wait_for("irqs:", SHORT));
    assert!(
        after >= before + 20,
        "{before} -> {after} device interrupts"
    );
}

#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    require_kvm!();
    let mut pair = walking_pair();
    let api = pair.source_api();
    // The walker rewrites 64 MiB far faster than 32 MiB/s drains it: without
    // throttling this never fits a 50 ms budget.
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        MigrationParameters {
            downtime_ms: 50,
            bandwidth_bytes_per_s: Some(32 << 20),
            auto_converge: true,
            ..Default::default()
        },
    ))
    .unwrap();
    let throttled = wait_status(&api, MIGRATE, "throttling", |s| {
        s.throttle_percent >= 20 || s.phase == MigrationPhase::Completed
    });
    assert!(throttled.throttle_percent >= 20, "{throttled:#?}");
    let done = wait_status(&api, Duration::from_secs(120), "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(done.phase, MigrationPhase::Completed, "{done:#?}");
    assert_eq!(pair.source.exit_code(SHORT), EXIT_MIGRATED);
    // Throttling is gone on the target: the walker runs at full speed again.
    let before = pages_pass(&mut pair.target);
    let after = pages_pass(&mut pair.target);
    assert!(after > before);
    check_pages(&mut pair.target);
}
