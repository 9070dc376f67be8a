//! `vmmctl` against a canned VMM: output, JSON, exit codes.

mod common;

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use api::request::{
    ApiError, ApiErrorKind, ApiRequest, ApiResponse, MigrationParameters, MigrationPhase,
    MigrationStatus, ReceiveMigrationRequest, ResumeRequest, SendMigrationRequest, ShutdownMode,
    ShutdownRequest, TimeoutAction,
};
use common::*;

fn vmmctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .env_remove("VMM_API_SOCKET")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[test]
fn queries_print_readably_and_as_json() {
    let canned = Canned::start();
    let socket = canned.socket();

    let out = vmmctl(&socket, &["ping"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "vmm 0.1.0 pid 4242 state running\n");

    let out = vmmctl(&socket, &["info"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "state: running",
        "vcpus: 2",
        "memory: 512 MiB (anonymous, transparent huge pages)",
        "kernel: /boot/vmlinux",
        "cmdline: console=ttyS0",
        "serial: stdout",
        "disk disk0: /var/disk.img readonly",
        "net net0: tap tap0 mac 52:54:00:00:00:01",
        "host memory: guest 512 MiB, rss 100 MiB, pss 90 MiB",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    let out = vmmctl(&socket, &["counters"]);
    assert_eq!(
        stdout(&out),
        "COMPONENT  COUNTER     VALUE\n\
         disk0      read_bytes   4096\n\
         vcpu0      exits        1234\n\
         vcpu0      io_exits       56\n"
    );

    let out = vmmctl(&socket, &["--json", "info"]);
    let info: api::request::VmInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info, sample_info());
    let out = vmmctl(&socket, &["ping", "--json"]);
    let ping: api::request::PingInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ping.pid, 4242);
    let out = vmmctl(&socket, &["counters", "--json"]);
    let counters: api::request::Counters = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(counters, sample_counters());
}

#[test]
fn actions_reach_the_vmm() {
    let canned = Canned::start();
    let socket = canned.socket();
    let dir = TempDir::new();
    let file = dir.path().join("vm.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&sample_config()).unwrap()).unwrap();

    // Each action says what it did, naming the guest (here the socket's
    // name, api.sock).
    for (args, said) in [
        (&["create", file.to_str().unwrap()][..], "api: created\n"),
        (&["boot"], "api: booted\n"),
        (&["resume"], "api: resumed\n"),
        (
            &["shutdown"],
            "api: shutting down: the ACPI power button was pressed\n",
        ),
        (
            &["shutdown", "--timeout-ms", "250"],
            "api: shutting down: the ACPI power button was pressed\n",
        ),
        (
            &["shutdown", "--force"],
            "api: shutting down: the ACPI power button was pressed\n",
        ),
        (&["shutdown-vmm"], "api: the VMM is stopping\n"),
        (&["reboot"], "api: rebooted\n"),
        (
            &["power-button"],
            "api: the ACPI power button was pressed\n",
        ),
        (&["delete"], "api: deleted\n"),
        (
            &["shutdown", "--timeout", "2.5s"],
            "api: shutting down: the ACPI power button was pressed\n",
        ),
    ] {
        let out = vmmctl(&socket, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), said, "{args:?}");
    }
    // As JSON: the VMM's reply with the name.
    let out = vmmctl(&socket, &["--json", "boot"]);
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["name"], "api");
    assert_eq!(said["state"], "running");
    assert_eq!(said["changed"], true);
    assert_eq!(said["message"], "booted");
    // From stdin.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .args(["create", "-"])
        .env("VMM_API_SOCKET", &socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"payload": {"kernel": "/k"}}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let seen = canned.seen();
    assert_eq!(seen[0], ApiRequest::VmCreate(Box::new(sample_config())));
    assert_eq!(
        seen[1..7],
        [
            ApiRequest::VmBoot,
            ApiRequest::VmResume(ResumeRequest::default()),
            ApiRequest::VmShutdown(ShutdownRequest::default()),
            ApiRequest::VmShutdown(ShutdownRequest {
                mode: ShutdownMode::Graceful,
                timeout_ms: Some(250)
            }),
            ApiRequest::VmShutdown(ShutdownRequest {
                mode: ShutdownMode::Force,
                timeout_ms: None
            }),
            ApiRequest::VmmShutdown,
        ]
    );
    assert_eq!(
        seen[7..11],
        [
            ApiRequest::VmReboot,
            ApiRequest::VmPowerButton,
            ApiRequest::VmDelete,
            ApiRequest::VmShutdown(ShutdownRequest {
                mode: ShutdownMode::Graceful,
                timeout_ms: Some(2500)
            }),
        ]
    );
    assert!(matches!(&seen[12], ApiRequest::VmCreate(c) if c.payload.kernel == Path::new("/k")));
}

#[test]
fn refusals_exit_1_with_the_vmm_message() {
    let canned = Canned::start();
    let out = vmmctl(&canned.socket(), &["pause"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "vmmctl: pause: cannot pause: the VM is created\n"
    );

    let dir = TempDir::new();
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 99}}"#,
    )
    .unwrap();
    let out = vmmctl(&canned.socket(), &["create", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("vmmctl: create: cpus.boot_vcpus: must be between"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_exit_2() {
    let canned = Canned::start();
    for args in [
        &["bogus"][..],
        &["ping", "extra"],
        &["shutdown", "--now"],
        &["shutdown", "--force", "--timeout-ms", "3"],
        &["create"],
        &["create", "/no/such/file.json"],
    ] {
        let out = vmmctl(&canned.socket(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).starts_with("vmmctl: "),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // No socket at all.
    let out = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("ping")
        .env_remove("VMM_API_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("VMM_API_SOCKET"));
    // Help documents the exit codes.
    let out = vmmctl(&canned.socket(), &["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Exit status:"));
    assert!(stdout(&out).contains("3  cannot reach a VMM"));
    assert!(canned.seen().is_empty());
}

#[test]
fn unreachable_vmms_exit_3() {
    let dir = TempDir::new();
    let socket = dir.socket();
    let out = vmmctl(&socket, &["ping"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        stderr(&out),
        format!(
            "vmmctl: ping: no VMM is listening on {}\n",
            socket.display()
        )
    );
    // A stale socket: connection refused.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let out = vmmctl(&socket, &["boot"]);
    assert_eq!(out.status.code(), Some(3));
    // A socket that never answers.
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("mute.sock")).unwrap();
    let out = vmmctl(&dir.path().join("mute.sock"), &["--timeout", "0.2", "info"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
}

/// A canned VMM whose migration goes through `phases`, one per status
/// request (the last one repeats); `on_status` sees each phase served.
fn migrating_with(
    phases: &[MigrationPhase],
    on_status: impl Fn(MigrationPhase) + Send + Sync + 'static,
) -> Canned {
    let script = Mutex::new(phases.iter().copied().collect::<VecDeque<_>>());
    Canned::start_with(move |request| match request {
        ApiRequest::VmMigrationStatus => {
            let mut script = script.lock().unwrap();
            let phase = if script.len() > 1 {
                script.pop_front().unwrap()
            } else {
                script[0]
            };
            on_status(phase);
            Ok(ApiResponse::MigrationStatus(Box::new(
                sample_migration_status(phase),
            )))
        }
        other => canned_answer(other),
    })
}

fn migrating(phases: &[MigrationPhase]) -> Canned {
    migrating_with(phases, |_| {})
}

fn token_file(dir: &TempDir, text: &str) -> PathBuf {
    let file = dir.path().join("token");
    std::fs::write(&file, text).unwrap();
    file
}

fn status_polls(seen: &[ApiRequest]) -> usize {
    seen.iter()
        .filter(|r| **r == ApiRequest::VmMigrationStatus)
        .count()
}

#[test]
fn migrate_shows_progress_then_statistics() {
    use MigrationPhase::*;
    let canned = migrating(&[Setup, Active, SwitchOver, Completed]);
    let dir = TempDir::new();
    let token = token_file(&dir, "s3cret\n");
    let out = vmmctl(
        &canned.socket(),
        &[
            "migrate",
            "tcp:10.0.0.2:6000",
            "--token-file",
            token.to_str().unwrap(),
            "--downtime-ms",
            "150",
            "--bandwidth",
            "100M",
            "--timeout-s=60",
            "--timeout-action",
            "force",
            "--no-auto-converge",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "phase: completed",
        "role: send",
        "total time: 4200 ms",
        "setup time: 15 ms",
        "downtime: 55 ms",
        "expected downtime: 40 ms",
        "transferred: 1100 MiB of 1024 MiB RAM",
        "remaining: 0 MiB",
        "zero pages: 200000",
        "data pages: 70000",
        "dirty page rate: 1500 pages/s",
        "throughput: 250.0 MB/s",
        "iterations: 3",
        "throttle: 10%",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // stderr is not a terminal: plain lines, one per phase, no bar.
    let progress = stderr(&out);
    let phases: Vec<&str> = progress
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        phases,
        ["setup", "active", "switch-over", "completed"],
        "{progress}"
    );
    let active = progress.lines().nth(1).unwrap();
    for part in [" 50% of RAM", "250.0 MB/s", "round 0", "downtime ~40 ms"] {
        assert!(active.contains(part), "no {part:?} in {active:?}");
    }
    let switch_over = progress.lines().nth(2).unwrap();
    assert!(switch_over.contains("0 MiB left"), "{switch_over:?}");
    assert!(switch_over.contains("throttle 10%"), "{switch_over:?}");
    assert!(!progress.contains('\x1b') && !progress.contains('\r'));

    let seen = canned.seen();
    assert_eq!(
        seen[0],
        ApiRequest::VmSendMigration(SendMigrationRequest {
            destination: "tcp:10.0.0.2:6000".into(),
            token: "s3cret".into(),
            tls_dir: Option::None,
            force: false,
            parameters: MigrationParameters {
                downtime_ms: 150,
                // Sizes are binary: 100M is 100 MiB/s.
                bandwidth_bytes_per_s: Some(100 << 20),
                timeout_s: Some(60),
                timeout_action: TimeoutAction::Force,
                auto_converge: false,
            },
        })
    );
    // One poll per phase, and none after completion.
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(status_polls(&seen), 4);
}

#[test]
fn migrate_json_prints_the_final_status() {
    use MigrationPhase::*;
    let canned = migrating(&[Setup, Active, SwitchOver, Completed]);
    let out = vmmctl(
        &canned.socket(),
        &["--json", "migrate", "unix:/run/m.sock", "--token", "t"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status: MigrationStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status, sample_migration_status(Completed));
    assert_eq!(
        canned.seen()[0],
        ApiRequest::VmSendMigration(SendMigrationRequest {
            destination: "unix:/run/m.sock".into(),
            token: "t".into(),
            tls_dir: Option::None,
            force: false,
            parameters: MigrationParameters::default(),
        })
    );
}

#[test]
fn failed_and_cancelled_migrations_exit_1() {
    use MigrationPhase::*;
    let canned = migrating(&[Setup, Active, Failed]);
    let out = vmmctl(&canned.socket(), &["migrate", "unix:/m", "--token", "t"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.lines().any(|l| l == "phase: failed"), "{text}");
    assert!(
        text.lines()
            .any(|l| l == "error: connection reset by the destination"),
        "{text}"
    );
    assert!(
        stderr(&out).ends_with(
            "\nvmmctl: migrate: migration failed: connection reset by the destination\n"
        ),
        "{}",
        stderr(&out)
    );

    let canned = migrating(&[Setup, Failed]);
    let out = vmmctl(
        &canned.socket(),
        &["migrate", "unix:/m", "--token", "t", "--json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let status: MigrationStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.phase, Failed);
    assert!(stderr(&out).contains("migration failed: connection reset"));

    let canned = migrating(&[Active, Cancelled]);
    let out = vmmctl(&canned.socket(), &["migrate", "unix:/m", "--token", "t"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with("phase: cancelled\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).ends_with("\nvmmctl: migrate: migration cancelled\n"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn losing_the_vmm_at_switch_over_is_not_a_success() {
    use MigrationPhase::*;
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let canned = migrating_with(&[Setup, Active, SwitchOver], move |phase| {
        if phase == SwitchOver {
            let _ = tx.lock().unwrap().send(());
        }
    });
    let child = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--api-socket")
        .arg(canned.socket())
        .args(["migrate", "unix:/m", "--token", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // The source VMM exits without the client having seen completion.
    drop(canned);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert!(
        stderr(&out).contains("vmmctl: migrate: lost the VMM during switch-over"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn migrate_detach_cancel_set_status_and_receive() {
    let canned = Canned::start();
    let socket = canned.socket();
    let dir = TempDir::new();
    let token = token_file(&dir, "from-file\r\n\n");
    for (args, said) in [
        (
            &["migrate", "unix:/m", "--token", "t", "--detach"][..],
            "api: migration to unix:/m started\n",
        ),
        (
            &["migrate", "unix:/m", "--token", "t", "--detach", "--force"],
            "api: migration to unix:/m started\n",
        ),
        (&["migrate", "--cancel"], "api: migration cancelled\n"),
        (&["migrate-set"], "api: migration parameters changed\n"),
        (
            &[
                "migrate-set",
                "--downtime-ms=500",
                "--bandwidth",
                "2Gi",
                "--timeout-s",
                "30",
                "--timeout-action",
                "cancel",
            ],
            "api: migration parameters changed\n",
        ),
        (
            &["migrate-set", "--bandwidth", "0", "--no-auto-converge"],
            "api: migration parameters changed\n",
        ),
        (
            &[
                "receive-migration",
                "tcp:0.0.0.0:6000",
                "--token-file",
                token.to_str().unwrap(),
            ],
            "api: waiting for a migration on tcp:0.0.0.0:6000\n",
        ),
    ] {
        let out = vmmctl(&socket, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), said, "{args:?}");
        assert_eq!(stderr(&out), "", "{args:?}");
    }
    assert_eq!(
        canned.seen(),
        [
            ApiRequest::VmSendMigration(SendMigrationRequest {
                destination: "unix:/m".into(),
                token: "t".into(),
                tls_dir: None,
                force: false,
                parameters: MigrationParameters::default(),
            }),
            ApiRequest::VmSendMigration(SendMigrationRequest {
                destination: "unix:/m".into(),
                token: "t".into(),
                tls_dir: None,
                force: true,
                parameters: MigrationParameters::default(),
            }),
            ApiRequest::VmMigrationCancel,
            ApiRequest::VmMigrationParameters(MigrationParameters::default()),
            ApiRequest::VmMigrationParameters(MigrationParameters {
                downtime_ms: 500,
                bandwidth_bytes_per_s: Some(2 << 30),
                timeout_s: Some(30),
                timeout_action: TimeoutAction::Cancel,
                auto_converge: true,
            }),
            ApiRequest::VmMigrationParameters(MigrationParameters {
                auto_converge: false,
                ..MigrationParameters::default()
            }),
            ApiRequest::VmReceiveMigration(ReceiveMigrationRequest {
                listen: "tcp:0.0.0.0:6000".into(),
                token: "from-file".into(),
                tls_dir: None,
                timeout_s: None,
            }),
        ]
    );

    let out = vmmctl(&socket, &["migrate-status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("phase: completed\nrole: send\n"), "{text}");
    assert!(text.contains("\ndowntime: 55 ms\n"), "{text}");
    let out = vmmctl(&socket, &["migrate-status", "--json"]);
    let status: MigrationStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status, sample_migration_status(MigrationPhase::Completed));

    // No migration has run.
    let idle = migrating(&[MigrationPhase::None]);
    let out = vmmctl(&idle.socket(), &["migrate-status"]);
    assert_eq!(stdout(&out), "phase: none\n");
}

#[test]
fn migration_usage_errors_exit_2() {
    let canned = Canned::start();
    let dir = TempDir::new();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.to_str().unwrap();
    for (args, expected) in [
        (&["migrate"][..], "DESTINATION"),
        (
            &["migrate", "unix:/m"],
            "--token-file FILE or --token TOKEN",
        ),
        (
            &["migrate", "unix:/m", "--token", "a", "--token-file", empty],
            "cannot be used with",
        ),
        (
            &["migrate", "ftp:x", "--token", "t"],
            "\"ftp:x\" is not tcp:HOST:PORT",
        ),
        (&["migrate", "tcp:host", "--token", "t"], "\"tcp:host\""),
        (&["migrate", "unix:", "--token", "t"], "\"unix:\""),
        (
            &["migrate", "unix:/a", "unix:/b", "--token", "t"],
            "unix:/b",
        ),
        (&["migrate", "unix:/m", "--token-file", empty], "is empty"),
        (
            &["migrate", "unix:/m", "--token-file", "/no/such/token"],
            "/no/such/token",
        ),
        (&["migrate", "unix:/m", "--token", ""], "empty"),
        (
            &["migrate", "unix:/m", "--token"],
            "a value is required for '--token",
        ),
        (
            &["migrate", "unix:/m", "--token", "t", "--downtime-ms", "0"],
            "--downtime-ms: must be",
        ),
        (
            &[
                "migrate",
                "unix:/m",
                "--token",
                "t",
                "--downtime-ms",
                "soon",
            ],
            "soon",
        ),
        (
            &["migrate", "unix:/m", "--token", "t", "--timeout-s", "0"],
            "--timeout-s",
        ),
        (
            &[
                "migrate",
                "unix:/m",
                "--token",
                "t",
                "--timeout-action",
                "wait",
            ],
            "wait",
        ),
        (
            &["migrate", "unix:/m", "--token", "t", "--bandwidth", "10X"],
            "10X",
        ),
        (
            &["migrate", "unix:/m", "--token", "t", "--detach=yes"],
            "unexpected value 'yes' for '--detach'",
        ),
        (
            &["migrate", "unix:/m", "--token", "t", "--force=yes"],
            "unexpected value 'yes' for '--force'",
        ),
        (&["migrate-set", "--force"], "--force"),
        (&["migrate", "--cancel", "unix:/m"], "--cancel"),
        (&["migrate", "--cancel", "--detach"], "--cancel"),
        (&["migrate-set", "--detach"], "--detach"),
        (&["migrate-set", "--token", "t"], "--token"),
        (&["migrate-set", "unix:/m"], "unix:/m"),
        (&["migrate-set", "--downtime-ms", "0"], "--downtime-ms"),
        (&["migrate-status", "now"], "now"),
        (&["receive-migration", "--token", "t"], "LISTEN"),
        (&["receive-migration", "unix:/m"], "--token"),
        (
            &["receive-migration", "unix:/m", "--token", "t", "--detach"],
            "--detach",
        ),
    ] {
        let out = vmmctl(&canned.socket(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let text = stderr(&out);
        assert!(text.starts_with("vmmctl: "), "{args:?}: {text}");
        assert!(
            text.contains(expected),
            "{args:?}: no {expected:?} in {text}"
        );
    }
    assert!(canned.seen().is_empty(), "{:?}", canned.seen());
    let out = vmmctl(&canned.socket(), &["--help"]);
    for word in [
        "migrate",
        "migrate-status",
        "migrate-set",
        "receive-migration",
    ] {
        assert!(stdout(&out).contains(word), "no {word:?} in the help");
    }
}

#[test]
fn each_command_has_its_own_help() {
    let canned = Canned::start();
    let help = vmmctl(&canned.socket(), &["help", "migrate"]);
    assert_eq!(help.status.code(), Some(0), "{}", stderr(&help));
    let text = stdout(&help);
    for word in [
        "DESTINATION",
        "--token-file <FILE>",
        "--downtime <DURATION>",
        "--bandwidth <SIZE>",
        "--timeout <DURATION>",
        "--cancel",
        "migrate --cancel",
    ] {
        assert!(text.contains(word), "no {word:?} in\n{text}");
    }
    // The old flag names still work, but are not advertised.
    assert!(!text.contains("--downtime-ms"), "{text}");
    let flag = vmmctl(&canned.socket(), &["migrate", "--help"]);
    assert_eq!(flag.status.code(), Some(0));
    assert_eq!(stdout(&flag), text);
    for command in [
        "setmem",
        "reboot",
        "power-button",
        "delete",
        "console",
        "list",
    ] {
        let out = vmmctl(&canned.socket(), &["help", command]);
        assert_eq!(out.status.code(), Some(0), "{command}");
        assert!(stdout(&out).contains("Usage: vmmctl"), "{command}");
    }
    assert!(canned.seen().is_empty());
}

#[test]
fn refused_and_unreachable_migrations() {
    let canned = Canned::start_with(|request| match request {
        ApiRequest::VmSendMigration(_) | ApiRequest::VmReceiveMigration(_) => Err(ApiError::new(
            ApiErrorKind::WrongState,
            "a migration is already under way",
        )),
        ApiRequest::VmMigrationCancel => Err(ApiError::new(
            ApiErrorKind::WrongState,
            "no migration is under way",
        )),
        other => canned_answer(other),
    });
    for (args, expected) in [
        (
            &["migrate", "unix:/m", "--token", "t"][..],
            "vmmctl: migrate: a migration is already under way\n",
        ),
        (
            &["receive-migration", "unix:/m", "--token", "t"],
            "vmmctl: receive-migration: a migration is already under way\n",
        ),
        (
            &["migrate", "--cancel"],
            "vmmctl: migrate: no migration is under way\n",
        ),
    ] {
        let out = vmmctl(&canned.socket(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&out), expected, "{args:?}");
    }
    // Only the sends: no status was polled after a refused send.
    assert_eq!(status_polls(&canned.seen()), 0);

    let dir = TempDir::new();
    for args in [
        &["migrate", "unix:/m", "--token", "t"][..],
        &["migrate-status"],
    ] {
        let out = vmmctl(&dir.socket(), args);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(
            stderr(&out).contains("no VMM is listening"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn balloon_sets_the_target_and_shows_statistics() {
    let canned = Canned::start();
    let socket = canned.socket();
    let out = vmmctl(&socket, &["balloon", "--target-mib", "128"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "api: balloon target set to 128 MiB\n");
    assert_eq!(
        canned.seen(),
        vec![ApiRequest::VmBalloon(api::request::BalloonUpdate {
            target_mib: 128
        })]
    );
    for args in [&["balloon"][..], &["balloon-stats"]] {
        let out = vmmctl(&socket, args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = stdout(&out);
        for line in [
            "target: 128 MiB (32768 pages)",
            "actual: 64 MiB (16384 pages)",
            "guest statistics: 2.5 s old",
            "  free memory: 200 MiB",
            "  major faults: 7",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
    let out = vmmctl(&socket, &["--json", "balloon-stats"]);
    let stats: api::request::BalloonStatistics = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats, sample_balloon_statistics());
    // The info lines.
    let text = stdout(&vmmctl(&socket, &["info"]));
    assert!(
        text.contains("\nballoon now: target 128 MiB, actual 64 MiB\n"),
        "{text}"
    );
    assert!(text.contains("\nksm: 300 pages merged\n"), "{text}");

    // A refusal (no balloon) exits 1 with the VMM's message.
    let refusing = Canned::start_with(|request| match request {
        ApiRequest::VmBalloon(_) | ApiRequest::VmBalloonStatistics => Err(ApiError::new(
            ApiErrorKind::WrongState,
            "the VM has no balloon device",
        )),
        _ => Ok(ApiResponse::Empty),
    });
    let out = vmmctl(&refusing.socket(), &["balloon", "--target-mib=1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "vmmctl: balloon: the VM has no balloon device\n"
    );
    let out = vmmctl(&refusing.socket(), &["balloon-stats"]);
    assert_eq!(out.status.code(), Some(1));
    // Usage errors reach no VMM.
    let out = vmmctl(&refusing.socket(), &["balloon", "--target-mib", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(refusing.seen().len(), 2);
}

#[test]
fn list_shows_every_vmm_of_the_socket_directory() {
    use api::http::{start_server, ApiCall};
    let dir = TempDir::new();
    let serve = |name: &str, answer: fn(&ApiRequest) -> Result<ApiResponse, ApiError>| {
        start_server(&dir.path().join(name), move |call: ApiCall| {
            let _ = call.reply.send(answer(&call.request));
        })
        .unwrap()
    };
    let _web = serve("web.sock", canned_answer);
    let _idle = serve("idle.sock", |request| match request {
        ApiRequest::VmmPing => Ok(ApiResponse::Ping(api::request::PingInfo {
            version: "0.1.0".into(),
            pid: 77,
            name: None,
            state: api::request::VmState::NotCreated,
        })),
        _ => Err(ApiError::wrong_state(
            "report VM info",
            api::request::VmState::NotCreated,
        )),
    });
    // A socket left behind by a VMM that is gone, and files that are not
    // VMM sockets.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("gone.sock")).unwrap());
    std::fs::write(dir.path().join("notes.sock"), "not a socket").unwrap();
    let _other = std::os::unix::net::UnixListener::bind(dir.path().join("other.socket")).unwrap();

    let list = |args: &[&str], env: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmmctl"));
        command.args(args).env_remove("VMM_API_SOCKET");
        match env {
            Some(dir) => command.env("VMM_SOCKET_DIR", dir),
            None => command.env_remove("VMM_SOCKET_DIR"),
        };
        command.output().unwrap()
    };
    let dir_arg = dir.path().to_str().unwrap();
    let out = list(&["list", "--socket-dir", dir_arg], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[0].starts_with("NAME "), "{text}");
    let words = |line: &str| {
        line.split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        words(lines[1]),
        ["gone", "-", "stale", "-", "-", "-", "-", "-", "-"]
    );
    assert_eq!(
        words(lines[2]),
        ["idle", "77", "not-created", "-", "-", "-", "-", "-", "-"]
    );
    assert_eq!(
        words(lines[3]),
        [
            "web", "4242", "running", "512", "MiB", "100", "MiB", "90", "MiB", "128", "MiB", "64",
            "MiB", "300"
        ]
    );
    assert!(
        lines[4].starts_with("total: 3 VMMs (1 stale), guest 512 MiB"),
        "{text}"
    );

    // The directory from the environment, as JSON.
    let out = list(&["--json", "list"], Some(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["name"], "gone");
    assert_eq!(entries[0]["state"], "stale");
    assert!(entries[0]["error"].as_str().unwrap().contains("gone.sock"));
    assert_eq!(entries[2]["ksm_merging_pages"], 300);
    assert_eq!(entries[2]["balloon_target_bytes"], 128 << 20);
    assert_eq!(entries[2]["pid"], 4242);

    // No such directory: nothing to list, not an error.
    let missing = dir.path().join("missing");
    let out = list(&["list", "--socket-dir", missing.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        format!("no VMM sockets in {}\n", missing.display())
    );
    let out = list(
        &["--json", "list", "--socket-dir", missing.to_str().unwrap()],
        None,
    );
    assert_eq!(stdout(&out), "[]\n");
}

/// `vmmctl` with no --api-socket, the socket directory set to `dir`.
fn vmmctl_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .args(args)
        .env("VMM_SOCKET_DIR", dir)
        .env_remove("VMM_API_SOCKET")
        .output()
        .unwrap()
}

#[test]
fn guests_are_addressed_by_name_in_the_socket_directory() {
    let canned = Canned::start();
    let dir = canned.dir.path();
    let out = vmmctl_in(dir, &["info", "api"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "name: web1",
        "state: running",
        "pid: 4242",
        "uptime: 1h 2m 3s",
        "cpu time: 1.5 s",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    let out = vmmctl_in(dir, &["resume", "api"]);
    assert_eq!(stdout(&out), "api: resumed\n");
    // A name that is not there: unreachable, naming the socket it tried.
    let out = vmmctl_in(dir, &["ping", "web9"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("web9.sock"), "{}", stderr(&out));
    // A name is not a path.
    let out = vmmctl_in(dir, &["ping", "../api"]);
    assert_eq!(out.status.code(), Some(2));
    // A name and a socket: which one?
    let out = vmmctl(&canned.socket(), &["ping", "api"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not both"), "{}", stderr(&out));
}

#[test]
fn repeated_actions_succeed_and_say_so() {
    let canned = Canned::start_with(|request| match request {
        ApiRequest::VmPause => Ok(ApiResponse::Action(api::request::ActionReply::already(
            api::request::VmState::Paused,
            "already paused",
        ))),
        other => canned_answer(other),
    });
    let out = vmmctl(&canned.socket(), &["pause"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "api: already paused\n");
    let out = vmmctl(&canned.socket(), &["pause", "--json"]);
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["changed"], false);
    assert_eq!(said["state"], "paused");
}

#[test]
fn json_errors_are_one_line_of_json_with_the_same_exit_codes() {
    let canned = Canned::start_with(|request| match request {
        ApiRequest::VmPause => Err(ApiError::new(
            ApiErrorKind::WrongState,
            "cannot pause: peer said \u{1b}[2Jhi\nvmm: forged",
        )),
        other => canned_answer(other),
    });
    let dir = TempDir::new();
    for (socket, args, code) in [
        (canned.socket(), &["--json", "pause"][..], 1),
        (dir.socket(), &["--json", "ping"][..], 3),
        (canned.socket(), &["--json", "shutdown", "--now"][..], 2),
        (canned.socket(), &["--json", "setmem", "x/y"][..], 2),
    ] {
        let out = vmmctl(&socket, args);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        let text = stderr(&out);
        assert_eq!(text.lines().count(), 1, "{args:?}: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["exit_code"], code, "{args:?}");
        assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let out = vmmctl(&canned.socket(), &["pause", "--json"]);
    let error: serde_json::Value = serde_json::from_str(&stderr(&out)).unwrap();
    assert_eq!(error["status"], 409);
    assert_eq!(error["kind"], "wrong-state");
    assert_eq!(error["command"], "pause");
    // What the VMM relays (a peer's words) reaches the terminal escaped.
    let out = vmmctl(&canned.socket(), &["pause"]);
    let text = stderr(&out);
    assert!(!text.contains('\x1b'), "{text:?}");
    assert_eq!(text.lines().count(), 1, "{text:?}");
}

#[test]
fn setmem_sets_what_the_guest_keeps_through_the_balloon() {
    let canned = Canned::start();
    let dir = canned.dir.path();
    // The canned guest has 512 MiB: keeping 384 MiB asks 128 MiB back.
    let out = vmmctl_in(dir, &["setmem", "api", "384M"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "api: memory set to 384 MiB of 512 MiB (balloon target 128 MiB)\n"
    );
    // A plain number is MiB; all of it deflates the balloon.
    let out = vmmctl_in(dir, &["setmem", "api", "512"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let balloons: Vec<u64> = canned
        .seen()
        .iter()
        .filter_map(|r| match r {
            ApiRequest::VmBalloon(b) => Some(b.target_mib),
            _ => None,
        })
        .collect();
    assert_eq!(balloons, [128, 0]);
    // More than the guest has is refused, and nothing is sent.
    let out = vmmctl_in(dir, &["setmem", "api", "1G"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("more than the guest's memory"),
        "{}",
        stderr(&out)
    );
    let out = vmmctl_in(dir, &["setmem", "api", "1000K"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(canned.seen().len(), 5);
}
