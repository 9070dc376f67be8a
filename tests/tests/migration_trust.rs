//! Live migration under attack and faults: peers prove the token to each
//! other without sending it, TLS when asked, a switch-over never runs two
//! copies, the target runs a guest only from a complete state, stray
//! connections do not end a waiting target, deadlines hold, and no peer
//! behaviour makes the source lose its guest.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api::request::{MigrationParameters, MigrationPhase, ShutdownRequest, TimeoutAction, VmState};
use migration::protocol::{Kind, ProtocolError};
use vmm_tests::harness::{vmmctl_binary, TempDir, Vmm};
use vmm_tests::migration::*;
use vmm_tests::require_kvm;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The source's guest still runs (the walker advances) and its pages are intact.
fn source_runs_intact(vmm: &mut Vmm) {
    let api = vmm.api();
    assert_eq!(api.info().unwrap().state, VmState::Running);
    let before = pages_pass(vmm);
    let after = pages_pass(vmm);
    assert!(after > before, "the walker stopped: {before} -> {after}");
}

#[test]
fn a_target_without_the_token_gets_only_a_nonce_and_a_proof_and_the_source_runs_on() {
    require_kvm!();
    let dir = TempDir::new("impostor");
    let mut source = spawn_source(&dir, "pages mib=16", "128M", &[], &[]);
    source.wait_for("pages: start", BOOT);
    let api = source.api();
    for impostor in [Impostor::WrongProof, Impostor::Ack] {
        let fake = FakeTarget::impostor(impostor);
        api.send_migration(&send(
            &fake.destination,
            TOKEN,
            MigrationParameters::default(),
        ))
        .unwrap();
        let status = wait_failed(&api, MIGRATE, "failure");
        let error = status.error.unwrap_or_default();
        assert!(
            error.contains("target failed authentication"),
            "{impostor:?}: {error}"
        );
        assert_eq!(status.data_pages, 0, "{impostor:?}: pages went out");
        let report = fake.report();
        // The Hello (nonce) and the proof, nothing else: no config, no memory.
        assert_eq!(report.kinds, vec![Kind::Hello, Kind::Proof], "{impostor:?}");
        assert_eq!(report.stray_bytes, 0, "{impostor:?}");
        assert!(
            source
                .stderr()
                .iter()
                .any(|l| l.contains("target failed authentication")),
            "{}",
            source.report()
        );
        source_runs_intact(&mut source);
    }
    check_pages(&mut source);
}

#[test]
fn a_source_without_the_token_gets_only_a_nonce_from_a_real_target() {
    require_kvm!();
    let dir = TempDir::new("fake-source");
    let (mut target, listen) = Vmm::incoming(&dir, TOKEN);
    let path = listen.trim_start_matches("unix:");
    let mut stream = connect_unix(std::path::Path::new(path));
    match authenticate(&mut stream, "a-guess") {
        // The target refused with a reason, and without proving itself.
        Err(ProtocolError::Peer(m)) => {
            assert!(m.contains("source failed authentication"), "{m}")
        }
        other => panic!("the target did not refuse: {other:?}"),
    }
    drop(stream);
    assert!(target.wait_exit(Duration::from_millis(500)).is_none());
    assert!(
        target
            .stderr()
            .iter()
            .any(|l| l.contains("dropped a connection")
                && l.contains("source failed authentication")),
        "{}",
        target.report()
    );
    // The right token still gets in.
    let mut stream = connect_unix(std::path::Path::new(path));
    authenticate(&mut stream, TOKEN).expect("the real token is accepted");
}

#[test]
fn tls_migration_works_and_peers_from_another_ca_are_refused() {
    require_kvm!();
    let certs = TempDir::new("tls");
    let ca = TestCa::new(&certs.join("ca"), "cluster-ca");
    let rogue = TestCa::new(&certs.join("rogue"), "rogue-ca");
    ca.issue(&certs.join("good"));
    rogue.issue(&certs.join("bad"));
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let good = certs.join("good").display().to_string();
    let bad = certs.join("bad").display().to_string();
    let mut pair = Pair::start_with(
        "pages mib=32",
        "128M",
        Some(&listen),
        &[],
        &[],
        &[],
        &["--migration-tls-dir".to_string(), good.clone()],
    );
    pair.source.wait_for("pages: start", BOOT);
    let api = pair.source_api();
    let mut request = send(&listen, TOKEN, MigrationParameters::default());

    // A source whose client certificate comes from another CA, and one
    // without TLS: refused, both run on; the target waits on.
    for tls_dir in [Some(bad.clone()), None] {
        request.tls_dir = tls_dir.clone().map(Into::into);
        api.send_migration(&request).unwrap();
        let status = wait_failed(&api, MIGRATE, "failure");
        assert!(status.error.is_some(), "{tls_dir:?}: {status:#?}");
        source_runs_intact(&mut pair.source);
        assert!(pair.target.wait_exit(Duration::from_millis(200)).is_none());
    }
    // The source refuses a target whose certificate is from another CA.
    let rogue_port = free_port();
    let rogue_listen = format!("tcp:127.0.0.1:{rogue_port}");
    let rogue_dir = TempDir::new("tls-rogue-target");
    std::fs::write(rogue_dir.join("token"), TOKEN).unwrap();
    let rogue_target = Vmm::spawn(&[
        "--incoming",
        &rogue_listen,
        "--migration-token-file",
        rogue_dir.join("token").to_str().unwrap(),
        "--migration-tls-dir",
        &bad,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let mut to_rogue = send(&rogue_listen, TOKEN, MigrationParameters::default());
    to_rogue.tls_dir = Some(good.clone().into());
    api.send_migration(&to_rogue).unwrap();
    let status = wait_failed(&api, MIGRATE, "failure");
    let error = status.error.unwrap_or_default();
    assert!(error.contains("target failed authentication"), "{error}");
    source_runs_intact(&mut pair.source);
    drop(rogue_target);

    // With certificates from the cluster's CA it goes through.
    request.tls_dir = Some(good.into());
    api.send_migration(&request).unwrap();
    let status = wait_status(&api, MIGRATE, "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(status.phase, MigrationPhase::Completed, "{status:#?}");
    assert_eq!(pair.source.exit_code(SHORT), EXIT_MIGRATED);
    pages_pass(&mut pair.target);
    check_pages(&mut pair.target);
    assert!(
        pair.target
            .stderr()
            .iter()
            .filter(|l| l.contains("dropped a connection"))
            .count()
            >= 2,
        "{}",
        pair.target.report()
    );
}

/// Every request that would change the VM answers 409 with `reason` in it.
fn refused_while(api: &api::http::ApiClient, reason: &str) {
    let attempts: Vec<(&str, Result<(), api::http::ClientError>)> = vec![
        ("resume", api.resume().map(drop)),
        ("pause", api.pause().map(drop)),
        (
            "shutdown",
            api.shutdown(&ShutdownRequest::default()).map(drop),
        ),
        ("boot", api.boot().map(drop)),
        ("reboot", api.reboot().map(drop)),
        ("power-button", api.power_button().map(drop)),
        ("delete", api.delete().map(drop)),
        ("balloon", api.balloon(16).map(drop)),
    ];
    for (what, result) in attempts {
        let e = result.expect_err(what).to_string();
        assert!(e.contains(reason), "{what}: {e}");
    }
}

#[test]
fn a_switch_over_cannot_run_two_copies() {
    require_kvm!();
    let dir = TempDir::new("undecided");
    let disk = dir.join("shared.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut source = spawn_source(
        &dir,
        "pages mib=16",
        "128M",
        &[],
        &[
            "--disk".to_string(),
            format!("path={}", disk.display()),
            "--balloon".to_string(),
            "target_mib=0".to_string(),
        ],
    );
    source.wait_for("pages: start", BOOT);
    let api = source.api();
    // The target gets everything, then never answers Complete.
    let fake = FakeTarget::faulty(Fault::StallAfterComplete);
    api.send_migration(&send(
        &fake.destination,
        TOKEN,
        MigrationParameters {
            timeout_s: Some(8),
            ..Default::default()
        },
    ))
    .unwrap();
    let deadline = Instant::now() + MIGRATE;
    while fake.received.recv_timeout(SHORT).expect("messages") != Kind::Complete {
        assert!(Instant::now() < deadline);
    }
    // Waiting for the answer to Complete: nothing may resume or change it.
    assert_eq!(
        api.migration_status().unwrap().phase,
        MigrationPhase::SwitchOver
    );
    refused_while(&api, "switch-over");
    let status = wait_failed(&api, MIGRATE, "an undecided end");
    assert!(
        status.error.unwrap_or_default().contains("may already run"),
        "undecided must say so"
    );
    assert_eq!(api.info().unwrap().state, VmState::MigrationUndecided);
    refused_while(&api, "undecided");
    assert!(
        source
            .stderr()
            .iter()
            .any(|l| l.contains("migration undecided")),
        "{}",
        source.report()
    );
    // The guest stays paused: no walker progress (after what it printed
    // before the pause has reached the console).
    std::thread::sleep(Duration::from_millis(500));
    source.skip_console();
    assert!(source
        .try_wait_for("pages: pass=", Duration::from_secs(2))
        .is_none());

    // Another VMM runs the guest's disk (as a target would): force fails,
    // naming the disk and its holder.
    let holder = Vmm::boot_testguest("--", &["--disk", &format!("path={}", disk.display())]);
    let mut holder = holder;
    holder.wait_for("testguest: ready", BOOT);
    let vmmctl = |args: &[&str]| {
        std::process::Command::new(vmmctl_binary())
            .arg("--api-socket")
            .arg(dir.join("source.sock"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = vmmctl(&["resume", "--force"]);
    let message = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{message}");
    assert!(
        message.contains(disk.to_str().unwrap()) && message.contains(&holder.pid().to_string()),
        "{message}"
    );
    assert_eq!(api.info().unwrap().state, VmState::MigrationUndecided);
    holder.signal(libc::SIGKILL);
    holder.wait_exit(SHORT);
    // Checked, and the disk is free: force resumes it, memory intact.
    let out = vmmctl(&["resume", "--force"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    source_runs_intact(&mut source);
    check_pages(&mut source);
    drop(fake);
}

#[test]
fn the_target_runs_a_guest_only_from_a_complete_state() {
    require_kvm!();
    let config = message(
        Kind::Config,
        format!(
            r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size_mib":64}}}}"#,
            vmm_tests::harness::testguest().display()
        )
        .as_bytes(),
    );
    let mut after_config = config.clone();
    after_config.extend(message(Kind::Complete, b"{}"));
    let mut after_sync = config.clone();
    after_sync.extend(message(Kind::Sync, b"{}"));
    after_sync.extend(message(Kind::Complete, b"{}"));
    for (what, bytes) in [
        ("Complete right after Config", after_config),
        ("Complete after Sync", after_sync),
    ] {
        let dir = TempDir::new("no-state");
        let (mut target, listen) = Vmm::incoming(&dir, TOKEN);
        let mut stream = connect_unix(std::path::Path::new(listen.trim_start_matches("unix:")));
        authenticate(&mut stream, TOKEN).unwrap();
        stream.write_all(&bytes).unwrap();
        assert_eq!(target.exit_code(SHORT), EXIT_ERROR, "{what}");
        assert!(target.console().is_empty(), "{what}: a guest ran");
        assert!(
            target
                .stderr()
                .iter()
                .any(|l| l.contains("expected a State before Complete")),
            "{what}: {}",
            target.report()
        );
    }
}

#[test]
fn stray_connections_do_not_end_a_waiting_target() {
    require_kvm!();
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut pair = Pair::start("pages mib=16", "128M", Some(&listen));
    pair.source.wait_for("pages: start", BOOT);
    let address = format!("127.0.0.1:{port}");
    // A port scan, a health check that sends garbage, a wrong token.
    drop(TcpStream::connect(&address).unwrap());
    let mut garbage = TcpStream::connect(&address).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(garbage);
    // A client that connects and says nothing, left open while the real
    // source comes: it holds the target at most the handshake timeout.
    let silent = TcpStream::connect(&address).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let target_api = pair.target.api();
    assert_eq!(target_api.ping().unwrap().state, VmState::NotCreated);
    let api = pair.source_api();
    let started = Instant::now();
    api.send_migration(&send(&listen, TOKEN, MigrationParameters::default()))
        .unwrap();
    let status = wait_status(&api, MIGRATE, "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(status.phase, MigrationPhase::Completed, "{status:#?}");
    // Handshake timeout (5 s) plus the migration itself, with margin.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
    assert_eq!(pair.source.exit_code(SHORT), EXIT_MIGRATED);
    check_pages(&mut pair.target);
    let dropped: Vec<String> = pair
        .target
        .stderr()
        .into_iter()
        .filter(|l| l.contains("dropped a connection from 127.0.0.1:"))
        .collect();
    assert!(dropped.len() >= 3, "{}", pair.target.report());

    // Without any authenticated source, the incoming timeout ends it.
    let dir = TempDir::new("incoming-timeout");
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let mut lonely = Vmm::spawn(&[
        "--incoming",
        &format!("unix:{}", dir.join("m.sock").display()),
        "--migration-token-file",
        dir.join("token").to_str().unwrap(),
        "--incoming-timeout",
        "2",
    ]);
    assert_eq!(lonely.exit_code(SHORT), EXIT_ERROR);
    assert!(
        lonely
            .stderr()
            .iter()
            .any(|l| l.contains("no authenticated source connected within 2 s")),
        "{}",
        lonely.report()
    );
}

#[test]
fn a_stopped_target_cannot_hold_the_source_past_the_timeout() {
    require_kvm!();
    let mut pair = walking_pair();
    let api = pair.source_api();
    let timeout_s = 5;
    let started = Instant::now();
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        MigrationParameters {
            timeout_s: Some(timeout_s),
            timeout_action: TimeoutAction::Cancel,
            auto_converge: false,
            ..never_converging(16 << 20)
        },
    ))
    .unwrap();
    wait_status(&api, MIGRATE, "active", |s| {
        s.phase == MigrationPhase::Active && s.transferred_bytes > 1 << 20
    });
    pair.target.signal(libc::SIGSTOP);
    // While the source waits on the stopped target, its guest runs.
    let before = pages_pass(&mut pair.source);
    let status = wait_status(&api, Duration::from_secs(60), "failure", |s| {
        matches!(s.phase, MigrationPhase::Failed | MigrationPhase::Completed)
    });
    let elapsed = started.elapsed();
    assert_eq!(status.phase, MigrationPhase::Failed, "{status:#?}");
    assert!(
        status
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out"),
        "{status:#?}"
    );
    assert!(
        elapsed <= Duration::from_secs(timeout_s + 3),
        "gave up after {elapsed:?} against a {timeout_s} s timeout"
    );
    assert_eq!(api.info().unwrap().state, VmState::Running);
    let after = pages_pass(&mut pair.source);
    assert!(after > before);
    check_pages(&mut pair.source);
    pair.target.signal(libc::SIGKILL);
}

#[test]
fn a_cancel_takes_effect_within_a_second_while_a_send_is_blocked() {
    require_kvm!();
    let mut pair = walking_pair();
    let api = pair.source_api();
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        // A capped link: round 0 alone takes seconds, so the migration is
        // still under way whatever the guest dirties (on a loaded host the
        // walker may dirty little, and an uncapped one completes at once).
        MigrationParameters {
            auto_converge: false,
            ..never_converging(64 << 20)
        },
    ))
    .unwrap();
    wait_status(&api, MIGRATE, "active", |s| {
        s.phase == MigrationPhase::Active && s.transferred_bytes > 1 << 20
    });
    pair.target.signal(libc::SIGSTOP);
    // Let the socket buffers fill: the sender is now blocked in a write.
    let mut last = api.migration_status().unwrap().transferred_bytes;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = api.migration_status().unwrap().transferred_bytes;
        if now == last {
            break;
        }
        last = now;
    }
    let cancelled = Instant::now();
    api.migration_cancel().unwrap();
    let status = wait_status(&api, SHORT, "cancelled", |s| {
        s.phase != MigrationPhase::Active && s.phase != MigrationPhase::SwitchOver
    });
    let took = cancelled.elapsed();
    assert_eq!(status.phase, MigrationPhase::Cancelled, "{status:#?}");
    assert!(
        took <= Duration::from_millis(1500),
        "the cancel took {took:?}"
    );
    source_runs_intact(&mut pair.source);
    check_pages(&mut pair.source);
    pair.target.signal(libc::SIGKILL);
}

#[test]
fn the_bandwidth_limit_is_smooth() {
    require_kvm!();
    let pair = walking_pair();
    let api = pair.source_api();
    let cap: u64 = 24 << 20;
    api.send_migration(&send(
        &pair.destination(),
        TOKEN,
        MigrationParameters {
            auto_converge: false,
            ..never_converging(cap)
        },
    ))
    .unwrap();
    wait_status(&api, MIGRATE, "active", |s| {
        s.phase == MigrationPhase::Active && s.transferred_bytes > 0
    });
    // Samples of the bytes sent, with when they were read.
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let status = api.migration_status().unwrap();
        assert_eq!(status.phase, MigrationPhase::Active, "{status:#?}");
        samples.push((Instant::now(), status.transferred_bytes));
        std::thread::sleep(Duration::from_millis(10));
    }
    api.migration_cancel().unwrap();
    // The rate over every window of at least 100 ms.
    let mut rates = Vec::new();
    for (i, &(t0, b0)) in samples.iter().enumerate() {
        if let Some(&(t1, b1)) = samples[i..]
            .iter()
            .find(|(t, _)| t.duration_since(t0) >= Duration::from_millis(100))
        {
            rates.push((b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64());
        }
    }
    let max = rates.iter().cloned().fold(0.0, f64::max);
    let (first, last) = (samples[0], samples[samples.len() - 1]);
    let mean = (last.1 - first.1) as f64 / last.0.duration_since(first.0).as_secs_f64();
    let cap = cap as f64;
    eprintln!(
        "cap {:.1} MB/s: mean {:.1} MB/s, highest 100 ms window {:.1} MB/s over {} windows",
        cap / 1e6,
        mean / 1e6,
        max / 1e6,
        rates.len()
    );
    assert!(
        mean <= cap * 1.1 && mean >= cap * 0.6,
        "mean {mean} vs cap {cap}"
    );
    // No burst: sending a batch at full speed and then sleeping (8 MiB at
    // a time before) shows as 3.5x the cap in a window; paced in 20 ms
    // chunks it stays under 1.5x (2x leaves room for a late status sample).
    assert!(
        max <= cap * 2.0,
        "a 100 ms window ran at {max} against {cap}"
    );
}

#[test]
fn a_bad_peer_at_switch_over_never_loses_the_guest() {
    require_kvm!();
    let dir = TempDir::new("bad-peer");
    let mut source = spawn_source(&dir, "pages mib=16", "128M", &[], &[]);
    source.wait_for("pages: start", BOOT);
    let api = source.api();
    for fault in Fault::ALL {
        let fake = FakeTarget::faulty(fault);
        api.send_migration(&send(
            &fake.destination,
            TOKEN,
            MigrationParameters {
                timeout_s: Some(5),
                ..Default::default()
            },
        ))
        .unwrap();
        let status = wait_status(&api, MIGRATE, "the end", |s| {
            matches!(s.phase, MigrationPhase::Failed | MigrationPhase::Completed)
        });
        assert_eq!(
            status.phase,
            MigrationPhase::Failed,
            "{fault:?}: {status:#?}"
        );
        let report = fake.report();
        let complete_sent = report.kinds.contains(&Kind::Complete);
        assert_eq!(
            complete_sent,
            fault.after_complete(),
            "{fault:?}: {report:?}"
        );
        if fault.after_complete() {
            // The guest may run there: paused here until someone checks.
            assert_eq!(
                api.info().unwrap().state,
                VmState::MigrationUndecided,
                "{fault:?}"
            );
            assert!(api.resume().is_err(), "{fault:?}");
            api.resume_force().unwrap();
        }
        source_runs_intact(&mut source);
        assert_eq!(
            api.migration_status().unwrap().phase,
            MigrationPhase::Failed
        );
    }
    check_pages(&mut source);
}

/// What a hostile peer may say: a forged log line, a terminal escape
/// sequence that clears the screen, an OSC title and a bell.
const FORGED: &str = "no room\nvmm: exiting: guest powered off\x1b[2J\x1b]0;owned\x07";

/// No line of `lines` carries a control character, and none starts with
/// the line the peer tried to forge.
fn no_forged_lines(lines: &[String], report: &str) {
    for line in lines {
        assert!(
            !line.chars().any(char::is_control),
            "a control character reached the log: {line:?}\n{report}"
        );
        assert!(
            !line.starts_with("vmm: exiting: guest powered off"),
            "a forged line: {line:?}\n{report}"
        );
    }
}

#[test]
fn a_peers_words_reach_logs_and_terminals_escaped() {
    require_kvm!();
    // A fake source tells a real target its forged error.
    let dir = TempDir::new("forged-source");
    let (mut target, listen) = Vmm::incoming(&dir, TOKEN);
    let mut stream = connect_unix(std::path::Path::new(listen.trim_start_matches("unix:")));
    authenticate(&mut stream, TOKEN).expect("the target accepts the token");
    refuse(&mut stream, FORGED);
    drop(stream);
    assert_eq!(target.exit_code(SHORT), 1, "{}", target.report());
    let stderr = target.stderr();
    let said = stderr
        .iter()
        .find(|l| l.contains("the peer reported: no room"))
        .unwrap_or_else(|| panic!("the peer's error is not logged\n{}", target.report()));
    assert!(
        said.contains("no room\\nvmm: exiting: guest powered off\\x1b[2J\\x1b]0;owned\\x07"),
        "{said}"
    );
    no_forged_lines(&stderr, &target.report());

    // A fake target answers a real source with it: the log, the status
    // and vmmctl all show it escaped.
    let dir = TempDir::new("forged-target");
    let mut source = spawn_source(&dir, "pages mib=16", "128M", &[], &[]);
    source.wait_for("pages: start", BOOT);
    let fake = FakeTarget::refusing(FORGED);
    let api = source.api();
    api.send_migration(&send(
        &fake.destination,
        TOKEN,
        MigrationParameters::default(),
    ))
    .unwrap();
    let status = wait_failed(&api, MIGRATE, "failure");
    let error = status.error.unwrap_or_default();
    assert!(error.contains("the peer reported: no room\\n"), "{error}");
    assert!(!error.chars().any(char::is_control), "{error:?}");
    source.wait_for_stderr("the peer reported: no room", SHORT);
    no_forged_lines(&source.stderr(), &source.report());
    let out = std::process::Command::new(vmmctl_binary())
        .args(["--api-socket", dir.join("source.sock").to_str().unwrap()])
        .arg("migrate-status")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("no room"), "{shown}");
    assert!(!shown.contains('\x1b'), "{shown:?}");
    source_runs_intact(&mut source);
    drop(fake);
}
