//! `vmmctl` against a canned VMM: output, JSON, exit codes.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use api::request::{ApiRequest, ShutdownMode, ShutdownRequest};
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
        "memory: 512 MiB (anonymous)",
        "kernel: /boot/vmlinux",
        "cmdline: console=ttyS0",
        "serial: stdout",
        "disk disk0: /var/disk.img readonly",
        "net net0: tap tap0 mac 52:54:00:00:00:01",
        "host memory: guest 512 MiB, rss 100 MiB",
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

    for args in [
        &["create", file.to_str().unwrap()][..],
        &["boot"],
        &["resume"],
        &["shutdown"],
        &["shutdown", "--timeout-ms", "250"],
        &["shutdown", "--force"],
        &["shutdown-vmm"],
    ] {
        let out = vmmctl(&socket, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "{args:?}");
    }
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
            ApiRequest::VmResume,
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
    assert!(matches!(&seen[7], ApiRequest::VmCreate(c) if c.payload.kernel == Path::new("/k")));
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
