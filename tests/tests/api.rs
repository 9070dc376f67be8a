//! The REST API of a real `vmm` process: every endpoint, wrong-state calls,
//! and hostile requests that must get a clear 4xx while the VMM keeps serving.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use api::http::ClientError;
use api::request::{ApiErrorKind, VmState};
use config::{DiskConfig, MemoryBacking, PayloadConfig, VmConfig};
use vmm_tests::harness::{testguest, vmmctl_binary, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);

fn guest_config(cmdline: &str) -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: testguest(),
            cmdline: cmdline.into(),
            initrd: None,
            boot_disk: None,
        },
        ..Default::default()
    }
}

fn api_only(dir: &TempDir) -> Vmm {
    let socket = dir.join("api.sock");
    let vmm = Vmm::spawn(&["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_api(SHORT);
    vmm
}

/// Sends raw bytes and returns the status code and body of the reply.
fn raw(socket: &Path, request: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(SHORT)).unwrap();
    // The server may answer (and close) before taking all of an oversized body.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in reply {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn put(path: &str, body: &str) -> Vec<u8> {
    format!(
        "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn api_error(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, ApiErrorKind, String) {
    match result {
        Err(ClientError::Api { status, error }) => (status, error.kind, error.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn every_endpoint_through_a_whole_lifecycle() {
    require_kvm!();
    let dir = TempDir::new("endpoints");
    let mut vmm = api_only(&dir);
    let api = vmm.api();

    let ping = api.ping().unwrap();
    assert_eq!(ping.pid, vmm.pid());
    assert_eq!(ping.state, VmState::NotCreated);

    // Wrong state before anything exists.
    let (status, kind, message) = api_error(api.boot());
    assert_eq!((status, kind), (409, ApiErrorKind::WrongState));
    assert!(message.contains("not-created"), "{message}");
    assert_eq!(api_error(api.pause()).0, 409);
    assert_eq!(api_error(api.info()).0, 409);
    assert_eq!(api_error(api.counters()).0, 409);

    // Nothing to delete yet: not an error.
    let deleted = api.delete().unwrap();
    assert!(!deleted.changed, "{deleted:?}");
    assert_eq!(deleted.state, VmState::NotCreated);

    // A boot that fails leaves the VM created: delete, fix, create again.
    let mut broken = guest_config("");
    broken.payload.kernel = dir.join("no-such-kernel");
    api.create(&broken).unwrap();
    assert_eq!(api_error(api.boot()).0, 400);
    let (status, _, message) = api_error(api.create(&guest_config("")));
    assert_eq!(status, 409, "create twice");
    assert!(message.contains("created"), "{message}");
    let deleted = api.delete().unwrap();
    assert!(deleted.changed);
    assert_eq!(api.ping().unwrap().state, VmState::NotCreated);

    api.create(&guest_config("on_cad=ignore -- counters period_ms=100"))
        .unwrap();
    let (status, _, message) = api_error(api.pause());
    assert_eq!(status, 409, "pause before boot");
    assert!(
        message.contains("pause") && message.contains("created"),
        "{message}"
    );
    let info = api.info().unwrap();
    assert_eq!(info.state, VmState::Created);
    assert_eq!(info.config.payload.kernel, testguest());
    // Named after its socket (api.sock), no uptime before it ran.
    assert_eq!(info.name.as_deref(), Some("api"));
    assert_eq!(info.pid, vmm.pid());
    assert_eq!(info.uptime_ms, None);

    let booted = api.boot().unwrap();
    assert_eq!((booted.state, booted.changed), (VmState::Running, true));
    // Booting again is not an error: it is already done.
    let again = api.boot().unwrap();
    assert!(!again.changed, "{again:?}");
    assert!(again.message.contains("already"), "{again:?}");
    vmm.wait_for("counters:", BOOT);
    let info = api.info().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert!(info.uptime_ms.is_some(), "{info:?}");
    assert!(info.cpu_time_ms > 0, "{info:?}");
    let memory = info.memory.expect("memory figures");
    assert_eq!(memory.guest_bytes, 128 << 20);
    assert!(memory.rss_bytes > 0);
    // A running VM is not deleted: stopping it ends the VMM.
    let (status, _, message) = api_error(api.delete());
    assert_eq!(status, 409);
    assert!(message.contains("running"), "{message}");

    let counters = api.counters().unwrap();
    assert!(counters["vcpu0"]["exits"] > 0, "{counters:?}");
    assert!(counters["serial"]["out_bytes"] > 0, "{counters:?}");

    // The power button reaches the guest, which (on_cad=ignore) runs on;
    // the VM does not enter shutting-down.
    let pressed = api.power_button().unwrap();
    assert_eq!(pressed.state, VmState::Running);
    vmm.wait_for("testguest: power-button", BOOT);
    assert_eq!(api.ping().unwrap().state, VmState::Running);

    // Reboot: the guest starts again from its kernel, in the same VMM.
    vmm.skip_console();
    let rebooted = api.reboot().unwrap();
    assert_eq!(rebooted.state, VmState::Running);
    vmm.wait_for("testguest: ready", BOOT);
    vmm.wait_for("counters:", BOOT);
    assert_eq!(api.ping().unwrap().pid, vmm.pid());
    vmm.wait_for_stderr("vm.reboot: rebooted", SHORT);

    let paused = api.pause().unwrap();
    assert_eq!((paused.state, paused.changed), (VmState::Paused, true));
    let again = api.pause().unwrap();
    assert_eq!((again.state, again.changed), (VmState::Paused, false));
    assert_eq!(again.message, "already paused");
    // The power button of a paused guest would wait: refused.
    assert_eq!(api_error(api.power_button()).0, 409);
    assert!(api.resume().unwrap().changed);
    let again = api.resume().unwrap();
    assert_eq!((again.state, again.changed), (VmState::Running, false));
    // Each change is logged, with the endpoint that made it.
    vmm.wait_for_stderr("vm.pause: paused", SHORT);
    api.shutdown_vmm().unwrap();
    assert_eq!(
        vmm.exit_code(SHORT),
        5,
        "a running guest was stopped by request"
    );
}

#[test]
fn bad_requests_get_clear_errors_and_the_vmm_keeps_serving() {
    require_kvm!();
    let dir = TempDir::new("badreq");
    let vmm = api_only(&dir);
    let socket = dir.join("api.sock");

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            put("vm.create", "{\"payload\": {"),
            400,
            "line",
        ),
        (
            "unknown field",
            put(
                "vm.create",
                r#"{"payload": {"kernel": "/k"}, "memroy": {}}"#,
            ),
            400,
            "memroy",
        ),
        (
            "invalid value",
            put(
                "vm.create",
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0}}"#,
            ),
            400,
            "boot_vcpus",
        ),
        (
            "wrong type",
            put("vm.create", r#"{"payload": {"kernel": 7}}"#),
            400,
            "kernel",
        ),
        ("unknown endpoint", put("vm.explode", ""), 404, "vm.explode"),
        (
            "wrong method",
            b"DELETE /api/v1/vm.info HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
            405,
            "",
        ),
        (
            "oversized body",
            {
                let body = format!(
                    r#"{{"payload": {{"kernel": "/k", "cmdline": "{}"}}}}"#,
                    "x".repeat(1 << 20)
                );
                put("vm.create", &body)
            },
            413,
            "",
        ),
        (
            "garbage",
            b"\x00\x01\x02 not http at all\r\n\r\n".to_vec(),
            400,
            "",
        ),
    ];
    for (what, request, status, needle) in cases {
        let (got, body) = raw(&socket, &request);
        assert_eq!(got, status, "{what}: {body}");
        if !needle.is_empty() {
            assert!(
                body.contains(needle),
                "{what}: the error names {needle:?}: {body}"
            );
        }
        // Every error body is the JSON error type.
        if !body.is_empty() {
            let error: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
            assert!(error["message"].is_string(), "{what}: {body}");
        }
        assert!(vmm.api().ping().is_ok(), "the VMM answers after {what}");
    }
    // A client that connects and leaves mid-request does not disturb it.
    {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            .unwrap();
    }
    assert!(vmm.api().ping().is_ok());
    // The VM config was never accepted.
    assert_eq!(vmm.api().ping().unwrap().state, VmState::NotCreated);
}

#[test]
fn a_bad_kernel_is_refused_with_its_path() {
    require_kvm!();
    let dir = TempDir::new("badkernel");
    let vmm = api_only(&dir);
    let api = vmm.api();
    let mut config = guest_config("");
    config.payload.kernel = dir.join("no-such-kernel");
    api.create(&config).unwrap();
    let (status, _, message) = api_error(api.boot());
    assert_eq!(status, 400);
    assert!(message.contains("no-such-kernel"), "{message}");
    // Not a kernel at all.
    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let vmm2 = Vmm::spawn(&["--kernel", junk.to_str().unwrap()]);
    let mut vmm2 = vmm2;
    assert_eq!(vmm2.exit_code(SHORT), 2, "{}", vmm2.report());
    assert!(
        vmm2.stderr().join("\n").contains("junk"),
        "{}",
        vmm2.report()
    );
}

#[test]
fn command_line_errors_name_the_flag() {
    // No KVM needed: these fail before any VM exists.
    for (args, needle) in [
        (vec!["--cpus", "0", "--kernel", "/k"], "boot_vcpus"),
        (
            vec!["--memory", "size=lots", "--kernel", "/k"],
            "--memory size",
        ),
        (vec!["--disk", "path=/d,bogus=1", "--kernel", "/k"], "bogus"),
        (vec!["--frobnicate"], "--frobnicate"),
        (vec![], "--api-socket"),
        (vec!["--config", "/nonexistent.json"], "/nonexistent.json"),
    ] {
        let mut vmm = Vmm::spawn(&args);
        assert_eq!(vmm.exit_code(SHORT), 2, "{args:?}: {}", vmm.report());
        let stderr = vmm.stderr().join("\n");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr names {needle:?}: {stderr}"
        );
    }
}

#[test]
fn a_config_file_boots_the_same_vm() {
    require_kvm!();
    let dir = TempDir::new("configfile");
    let file = dir.join("vm.json");
    let mut config = guest_config("-- echo from the config file; poweroff");
    config.cpus.boot_vcpus = 2;
    std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let mut vmm = Vmm::spawn(&["--config", file.to_str().unwrap()]);
    vmm.wait_for("from the config file", BOOT);
    assert_eq!(vmm.exit_code(SHORT), 0, "{}", vmm.report());
}

#[test]
fn vmmctl_drives_a_real_vmm_and_its_exit_codes_say_what_happened() {
    require_kvm!();
    use std::process::Command;
    let dir = TempDir::new("vmmctl");
    let mut vmm = api_only(&dir);
    let socket = dir.join("api.sock");
    let vmmctl = |args: &[&str]| {
        let out = Command::new(vmm_tests::harness::vmmctl_binary())
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, _) = vmmctl(&["ping"]);
    assert_eq!(code, 0);
    assert!(out.contains("not-created"), "{out}");
    // Wrong state: refused by the VMM, exit 1, its message shown.
    let (code, _, err) = vmmctl(&["pause"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot pause: the VM is not-created"), "{err}");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&guest_config("-- counters")).unwrap(),
    )
    .unwrap();
    assert_eq!(vmmctl(&["create", config.to_str().unwrap()]).0, 0);
    assert_eq!(vmmctl(&["boot"]).0, 0);
    vmm.wait_for("counters:", BOOT);
    let (code, out, _) = vmmctl(&["--json", "info"]);
    assert_eq!(code, 0);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["state"], "running");
    let (code, out, _) = vmmctl(&["counters"]);
    assert_eq!(code, 0);
    assert!(out.contains("vcpu0") && out.contains("exits"), "{out}");
    assert_eq!(vmmctl(&["shutdown", "--force"]).0, 0);
    assert_eq!(vmm.exit_code(SHORT), 5);
    // No VMM any more: exit 3 and a message naming the socket.
    let (code, _, err) = vmmctl(&["ping"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(socket.to_str().unwrap()), "{err}");
    // Usage error: exit 2.
    assert_eq!(vmmctl(&["frobnicate"]).0, 2);
}

/// Errors say whose fault they are: the caller's (400), a conflict with
/// something else on the host (409), or the host's (500); the status comes
/// from the error's class, and so does the exit code of a VMM that cannot
/// start.
#[test]
fn errors_say_whose_fault_they_are() {
    require_kvm!();
    let dir = TempDir::new("error-classes");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    // The caller's: a kernel that does not exist.
    let vmm = api_only(&dir);
    let api = vmm.api();
    let mut config = guest_config("-- halt");
    config.payload.kernel = dir.join("no-such-kernel");
    api.create(&config).unwrap();
    let (status, kind, message) = api_error(api.boot());
    assert_eq!((status, kind), (400, ApiErrorKind::BadRequest), "{message}");
    assert!(message.contains("no-such-kernel"), "{message}");
    drop(vmm);

    // A conflict: the disk is in use by another VMM.
    let mut owner =
        Vmm::boot_testguest("-- halt", &["--disk", &format!("path={}", disk.display())]);
    owner.wait_for("testguest: hello", BOOT);
    let other_dir = TempDir::new("error-classes-2");
    let vmm = api_only(&other_dir);
    let api = vmm.api();
    let mut config = guest_config("-- halt");
    config.disks = vec![DiskConfig::parse(&format!("path={}", disk.display())).unwrap()];
    api.create(&config).unwrap();
    let (status, kind, message) = api_error(api.boot());
    assert_eq!((status, kind), (409, ApiErrorKind::WrongState), "{message}");
    assert!(message.contains("locked"), "{message}");
    drop(vmm);
    // The same from the command line: a VMM error (1), not a usage error (2).
    let mut second =
        Vmm::boot_testguest("-- halt", &["--disk", &format!("path={}", disk.display())]);
    assert_eq!(second.exit_code(SHORT), 1, "{}", second.report());
    drop(owner);

    // The host's: more hugetlbfs memory than the host has huge pages for.
    let free_huge_mib = 2 * std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("HugePages_Free:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let vmm = api_only(&dir);
    let api = vmm.api();
    let mut config = guest_config("-- halt");
    config.memory.size_mib = free_huge_mib + 64;
    config.memory.backing = MemoryBacking::Hugetlbfs;
    api.create(&config).unwrap();
    let (status, kind, message) = api_error(api.boot());
    assert_eq!((status, kind), (500, ApiErrorKind::Internal), "{message}");
    assert!(message.contains("huge pages"), "{message}");
}

/// Raises this process's open-file limit to at least `want` (up to the hard limit).
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid out-pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0);
    if limit.rlim_cur < want {
        limit.rlim_cur = want.min(limit.rlim_max);
        // SAFETY: limit is a valid rlimit within the hard limit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    }
}

#[test]
fn the_api_cannot_be_starved_by_idle_or_half_sent_connections() {
    require_kvm!();
    raise_fd_limit(4096);
    let dir = TempDir::new("starve");
    let socket = dir.join("api.sock");
    let vmm = Vmm::boot_testguest("--", &["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_api(BOOT);
    // 500 connections: half idle, half stopped in the middle of a request.
    let held: Vec<UnixStream> = (0..500)
        .map(|i| {
            let mut stream = UnixStream::connect(&socket).unwrap();
            if i % 2 == 1 {
                stream
                    .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: loc")
                    .unwrap();
            }
            stream
        })
        .collect();
    let started = Instant::now();
    // The health check still answers within 100 ms.
    let api = vmm.api().with_timeout(SHORT);
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let asked = Instant::now();
            assert_eq!(api.ping().unwrap().state, VmState::Running);
            asked.elapsed()
        })
        .collect();
    times.sort();
    eprintln!("pings with 500 idle or half-sent connections open: {times:?}");
    assert!(
        times[2] < Duration::from_millis(100),
        "pings took {times:?}"
    );
    assert!(times[4] < Duration::from_secs(2), "pings took {times:?}");
    // So does the cluster agent's check, through vmmctl.
    let out = std::process::Command::new(vmmctl_binary())
        .args([
            "--api-socket",
            socket.to_str().unwrap(),
            "--timeout",
            "2",
            "ping",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // No connection is held for long: the server closes those that never
    // complete a request within its request timeout (or earlier, to make room).
    for mut stream in held {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reply = Vec::new();
        match stream.read_to_end(&mut reply) {
            // Closed (reset if the server had unread bytes of it).
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a connection that never completes its request stays open: {e}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "held connections were closed only after {:?}",
        started.elapsed()
    );
}

/// Runs `vmmctl ARGS` as user nobody, in `groups` (none: no supplementary group).
fn vmmctl_as_nobody(groups: Option<u32>, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534"]);
    match groups {
        Some(gid) => command.arg(format!("--groups={gid}")),
        None => command.arg("--clear-groups"),
    };
    command
        .arg(vmmctl_binary())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs")
}

fn mode_and_group(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o777, meta.gid())
}

/// A group id no one on the test host is in.
const OPS_GID: u32 = 64123;

#[test]
fn api_and_console_sockets_are_private_unless_a_group_is_let_in() {
    require_kvm!();
    let dir = TempDir::new("private");
    let api_socket = dir.join("api.sock");
    let console = dir.join("console.sock");
    let boot = |extra: &[&str], serial: &str| {
        let mut args = vec![
            "--kernel".to_string(),
            testguest().display().to_string(),
            "--cmdline".to_string(),
            "--".to_string(),
            "--serial".to_string(),
            serial.to_string(),
            "--api-socket".to_string(),
            api_socket.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // With the widest umask: the sockets must be private all the same.
        let vmm = Vmm::spawn_with_prefix(&["sh", "-c", "umask 0; exec \"$0\" \"$@\""], &args);
        vmm.wait_api(BOOT);
        vmm
    };
    let api = |args: &[&str]| {
        let mut all = vec![
            "--api-socket",
            api_socket.to_str().unwrap(),
            "--timeout",
            "5",
        ];
        all.extend(args);
        all.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let as_nobody = |groups: Option<u32>, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        vmmctl_as_nobody(groups, &args)
    };
    let console_args = vec![
        "console".to_string(),
        "--socket".to_string(),
        console.display().to_string(),
    ];

    // Private by default: another user can neither use the API nor attach.
    let mut vmm = boot(&[], &format!("socket={}", console.display()));
    assert_eq!(mode_and_group(&api_socket).0, 0o600);
    assert_eq!(mode_and_group(&console).0, 0o600);
    for command in [
        api(&["ping"]),
        api(&["pause"]),
        api(&["info"]),
        console_args.clone(),
    ] {
        let out = as_nobody(None, command.clone());
        assert!(!out.status.success(), "nobody ran {command:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Permission denied"),
            "{command:?}: {stderr}"
        );
    }
    assert_eq!(vmm.api().ping().unwrap().state, VmState::Running);
    vmm.signal(libc::SIGTERM);
    vmm.exit_code(SHORT);

    // --api-socket-group (and the console's group): its members may manage
    // the guest and attach; others still may not.
    let gid = OPS_GID.to_string();
    let vmm = boot(
        &["--api-socket-group", &gid],
        &format!("socket={},group={gid}", console.display()),
    );
    assert_eq!(mode_and_group(&api_socket), (0o660, OPS_GID));
    assert_eq!(mode_and_group(&console), (0o660, OPS_GID));
    let out = as_nobody(Some(OPS_GID), api(&["pause"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(vmm.api().ping().unwrap().state, VmState::Paused);
    let out = as_nobody(Some(OPS_GID), api(&["resume"]));
    assert!(out.status.success(), "{out:?}");
    // A member attaches (input piped: it shows the output until killed).
    let mut attach = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", &format!("--groups={gid}")])
        .arg(vmmctl_binary())
        .args(&console_args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = attach.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("testguest: ready") {
        let n = stdout.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "the console closed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&chunk[..n]);
    }
    let _ = attach.kill();
    let _ = attach.wait();
    let out = as_nobody(None, api(&["pause"]));
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(vmm.api().ping().unwrap().state, VmState::Running);
}

#[test]
fn man_pages_and_completions_come_from_the_command_line_definitions() {
    // No KVM needed: the binaries only describe themselves.
    let dir = TempDir::new("docs");
    for binary in [
        vmm_tests::harness::vmm_binary(),
        vmm_tests::harness::vmmctl_binary(),
    ] {
        let out = std::process::Command::new(&binary)
            .arg("--generate-docs")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {out:?}", binary.display());
    }
    let read = |path: &str| {
        std::fs::read_to_string(dir.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let vmm = read("man/vmm.1");
    assert!(vmm.contains(".TH vmm"), "{vmm}");
    // Every flag `vmm --help` lists is in the manual; the hidden one is not.
    let help = std::process::Command::new(vmm_tests::harness::vmm_binary())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.']))
        .collect();
    assert!(flags.len() > 20, "{help}");
    for flag in flags {
        let roff = flag.replace('-', "\\-");
        assert!(vmm.contains(&roff), "{flag} is not in vmm.1");
    }
    assert!(!vmm.contains("generate"), "the hidden flag is documented");
    // vmmctl: a page per command, and completions that know the commands.
    for page in [
        "vmmctl.1",
        "vmmctl-migrate.1",
        "vmmctl-setmem.1",
        "vmmctl-reboot.1",
    ] {
        assert!(read(&format!("man/{page}")).contains(".TH"), "{page}");
    }
    for file in [
        "vmmctl.bash",
        "_vmmctl",
        "vmmctl.fish",
        "vmm.bash",
        "_vmm",
        "vmm.fish",
    ] {
        let text = read(&format!("completions/{file}"));
        assert!(!text.is_empty(), "{file}");
    }
    let bash = read("completions/vmmctl.bash");
    for word in ["setmem", "power-button", "--downtime", "--api-socket"] {
        assert!(bash.contains(word), "{word} not completed");
    }
}
