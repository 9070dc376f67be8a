//! Live migration between two real `vmm` processes on this machine, proven
//! with the test guest's page-record workload (see shared notes): after the
//! move every page is in place and current, the guest runs on, the source
//! exited "migrated"; and every failure leaves the source running intact.

use std::path::PathBuf;
use std::time::Duration;

use api::request::{MigrationParameters, MigrationPhase, TimeoutAction};
use migration::protocol::Kind;
use vmm_tests::harness::{device_interrupts, field, TempDir, Vmm};
use vmm_tests::migration::*;
use vmm_tests::require_kvm;

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
    // The target says so in its log.
    pair.target
        .wait_for_stderr("migration: completed: the guest arrived from", SHORT);
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
fn a_wrong_token_is_refused_and_both_sides_run_on() {
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
    let status = wait_failed(&api, MIGRATE, "failure");
    let error = status.error.unwrap_or_default();
    assert!(error.contains("token"), "{error}");
    // The source still runs, memory intact.
    pages_pass(&mut pair.source);
    // The target refused that source and waits on, never having run a guest.
    assert!(pair.target.wait_exit(Duration::from_millis(500)).is_none());
    assert!(pair.target.console().is_empty());
    assert_eq!(
        pair.target.api().ping().unwrap().state,
        api::request::VmState::NotCreated
    );
    // The right token then gets through to the same target.
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        MigrationParameters::default(),
    ))
    .unwrap();
    let status = wait_status(&api, MIGRATE, "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(status.phase, MigrationPhase::Completed, "{status:#?}");
    assert_eq!(pair.source.exit_code(SHORT), EXIT_MIGRATED);
    check_pages(&mut pair.target);
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
    let status = wait_failed(&api, MIGRATE, "failure");
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
    let status = wait_failed(&api, MIGRATE, "timeout");
    assert!(status.error.unwrap_or_default().contains("timed out"));
    assert_eq!(target2.exit_code(SHORT), EXIT_ERROR);
    pages_pass(&mut pair.source);
    check_pages(&mut pair.source);
}

/// Connects to a listening target, authenticates with the token and sends
/// `bytes`: the target must fail cleanly (exit 1) without running anything.
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
    let mut stream = connect_unix(&socket);
    authenticate(&mut stream, TOKEN).expect("the target accepts the token");
    let _ = stream.write_all(bytes);
    drop(stream);
    let code = target.exit_code(SHORT);
    (code, target.console())
}

#[test]
fn malformed_and_truncated_streams_never_run_a_guest() {
    require_kvm!();
    let config = message(
        Kind::Config,
        format!(
            r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size_mib":64}}}}"#,
            vmm_tests::harness::testguest().display()
        )
        .as_bytes(),
    );
    let mut huge = message(Kind::Memory, &[]);
    huge[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut outside = config.clone();
    let mut range = Vec::new();
    range.extend((1u64 << 40).to_le_bytes()); // far outside 64 MiB of RAM
    range.extend(4096u32.to_le_bytes());
    range.extend(0u32.to_le_bytes());
    range.extend([0xabu8; 4096]);
    outside.extend(message(Kind::Memory, &range));
    let mut truncated = config.clone();
    truncated.extend(&message(Kind::Memory, &[0u8; 8])[..20]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("nothing", Vec::new()),
        ("oversized message", huge),
        ("half a header", config[..7].to_vec()),
        ("range outside RAM", outside),
        ("truncated memory message", truncated),
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
