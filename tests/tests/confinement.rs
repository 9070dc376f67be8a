//! The VMM runs confined: every kind of thread has its own seccomp filter
//! (on by default), a system call outside its list ends the VMM with a
//! message naming the thread kind and the call (log mode lets it through
//! and the kernel logs it), and `--user` leaves a VMM without root or
//! capabilities that still runs a guest with a disk, a NIC and a live
//! migration.
//!
//! The self-test hook `VMM_SECCOMP_SELFTEST=KIND` makes the first thread
//! of that kind issue `personality(0xffffffff)` (system call 135), which
//! no list allows, right after installing its filter.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use api::request::{MigrationParameters, MigrationPhase, SendMigrationRequest, VmState};
use vmm_tests::harness::{field, status_field, testguest, vmm_thread_statuses, TempDir, Vmm};
use vmm_tests::netns::{self, Netns, PacketSocket};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(15);
const MIGRATE: Duration = Duration::from_secs(60);

/// A command prefix that runs `vmm` with the self-test for `kind` (and no
/// core file: SIGSYS dumps core by default).
fn selftest_prefix(kind: &str) -> [String; 3] {
    [
        "sh".into(),
        "-c".into(),
        format!("ulimit -c 0; exec env VMM_SECCOMP_SELFTEST={kind} \"$0\" \"$@\""),
    ]
}

fn spawn_selftest(kind: &str, args: &[String]) -> Vmm {
    spawn_selftest_in(kind, &[], args)
}

/// As [`spawn_selftest`], inside a command prefix (`ip netns exec NS`).
fn spawn_selftest_in(kind: &str, outer: &[&str], args: &[String]) -> Vmm {
    let prefix = selftest_prefix(kind);
    let mut full: Vec<&str> = outer.to_vec();
    full.extend(prefix.iter().map(String::as_str));
    Vmm::spawn_with_prefix(&full, args)
}

/// The VMM died of SIGSYS after saying which thread made which call.
fn assert_killed_by_the_filter_of(vmm: &mut Vmm, kind: &str, timeout: Duration) {
    let status = vmm
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("the VMM survived the {kind} self-test\n{}", vmm.report()));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{kind}: {status:?}\n{}",
        vmm.report()
    );
    let line = vmm.wait_for_stderr(&format!("vmm: seccomp: the {kind} thread"), SHORT);
    assert!(
        line.contains("made system call 135 (personality)") && line.contains("forbids"),
        "{line}"
    );
}

fn guest_args(cmdline: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        testguest().display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_forbidden_call_on_the_control_loop_ends_the_vmm() {
    require_kvm!();
    let mut vmm = spawn_selftest("control", &guest_args("-- counters", &[]));
    assert_killed_by_the_filter_of(&mut vmm, "control", SHORT);
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_the_vmm() {
    require_kvm!();
    let mut vmm = spawn_selftest("vcpu", &guest_args("-- counters", &[]));
    assert_killed_by_the_filter_of(&mut vmm, "vcpu", SHORT);
}

#[test]
fn a_forbidden_call_on_the_signal_thread_ends_the_vmm() {
    require_kvm!();
    let mut vmm = spawn_selftest("signals", &guest_args("-- counters", &[]));
    assert_killed_by_the_filter_of(&mut vmm, "signals", SHORT);
}

#[test]
fn a_forbidden_call_on_the_thread_spawner_ends_the_vmm() {
    require_kvm!();
    let mut vmm = spawn_selftest("spawner", &guest_args("-- counters", &[]));
    assert_killed_by_the_filter_of(&mut vmm, "spawner", SHORT);
}

#[test]
fn a_forbidden_call_on_the_console_thread_ends_the_vmm() {
    require_kvm!();
    let mut vmm = spawn_selftest("console", &guest_args("-- counters", &[]));
    assert_killed_by_the_filter_of(&mut vmm, "console", SHORT);
}

#[test]
fn a_forbidden_call_on_the_api_thread_ends_the_vmm() {
    require_kvm!();
    let dir = TempDir::new("seccomp-api");
    let socket = dir.join("api.sock").display().to_string();
    let mut vmm = spawn_selftest("api", &["--api-socket".to_string(), socket]);
    assert_killed_by_the_filter_of(&mut vmm, "api", SHORT);
}

#[test]
fn a_forbidden_call_on_a_blk_worker_ends_the_vmm() {
    require_kvm!();
    let dir = TempDir::new("seccomp-blk");
    let disk = dir.join("d.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = format!("path={}", disk.display());
    let mut vmm = spawn_selftest("blk", &guest_args("-- blk-info", &["--disk", &disk]));
    assert_killed_by_the_filter_of(&mut vmm, "blk", BOOT);
}

#[test]
fn a_forbidden_call_on_a_net_worker_ends_the_vmm() {
    require_kvm!();
    if !netns::available() {
        return;
    }
    let net = Netns::create("seccomp");
    let mut vmm = spawn_selftest_in(
        "net",
        &net.exec_prefix(),
        &guest_args("-- net-info", &["--net", "tap=sctap0"]),
    );
    assert_killed_by_the_filter_of(&mut vmm, "net", BOOT);
}

#[test]
fn a_forbidden_call_on_the_balloon_worker_ends_the_vmm() {
    require_kvm!();
    let mut vmm = spawn_selftest(
        "balloon",
        &guest_args("-- balloon-info", &["--balloon", "target_mib=0"]),
    );
    assert_killed_by_the_filter_of(&mut vmm, "balloon", BOOT);
}

#[test]
fn a_forbidden_call_on_the_migration_receiver_ends_the_vmm() {
    require_kvm!();
    let dir = TempDir::new("seccomp-receive");
    let token = dir.join("token");
    std::fs::write(&token, "t\n").unwrap();
    let mut vmm = spawn_selftest(
        "migration-receive",
        &[
            "--incoming".to_string(),
            format!("unix:{}", dir.join("m.sock").display()),
            "--migration-token-file".into(),
            token.display().to_string(),
        ],
    );
    assert_killed_by_the_filter_of(&mut vmm, "migration-receive", SHORT);
}

fn send(destination: String, parameters: MigrationParameters) -> SendMigrationRequest {
    SendMigrationRequest {
        destination,
        token: "token".into(),
        parameters,
        tls_dir: None,
        force: false,
    }
}

#[test]
fn a_forbidden_call_on_the_migration_sender_ends_the_vmm() {
    require_kvm!();
    let dir = TempDir::new("seccomp-send");
    let socket = dir.join("api.sock");
    let mut vmm = spawn_selftest(
        "migration-send",
        &guest_args("-- counters", &["--api-socket", socket.to_str().unwrap()]),
    );
    vmm.wait_for("counters:", BOOT);
    // Nobody needs to listen: the thread's first call after its filter is
    // the forbidden one.
    let destination = format!("unix:{}", dir.join("nobody.sock").display());
    // The VMM may die before it answers.
    let _ = vmm
        .api()
        .send_migration(&send(destination, MigrationParameters::default()));
    assert_killed_by_the_filter_of(&mut vmm, "migration-send", SHORT);
}

#[test]
fn a_forbidden_call_on_the_vcpu_throttle_ends_the_vmm() {
    require_kvm!();
    // Auto-converge starts the throttle thread when the guest dirties
    // memory faster than the link drains it.
    let dir = TempDir::new("seccomp-throttle");
    let token = dir.join("token");
    std::fs::write(&token, "token\n").unwrap();
    let listen = format!("unix:{}", dir.join("m.sock").display());
    let target = Vmm::spawn(&[
        "--incoming",
        &listen,
        "--migration-token-file",
        token.to_str().unwrap(),
        "--api-socket",
        dir.join("target.sock").to_str().unwrap(),
    ]);
    target.wait_api(SHORT);
    let socket = dir.join("source.sock");
    let mut source = spawn_selftest(
        "throttle",
        &guest_args(
            "-- pages mib=64",
            &[
                "--cpus",
                "2",
                "--memory",
                "size=256M",
                "--api-socket",
                socket.to_str().unwrap(),
            ],
        ),
    );
    source.wait_for("pages: start", BOOT);
    source
        .api()
        .send_migration(&send(
            listen,
            MigrationParameters {
                downtime_ms: 1,
                bandwidth_bytes_per_s: Some(16 << 20),
                auto_converge: true,
                ..Default::default()
            },
        ))
        .expect("vm.send-migration");
    assert_killed_by_the_filter_of(&mut source, "throttle", MIGRATE);
}

/// The kernel's audit records of seccomp for process `pid`.
fn seccomp_records(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("dmesg")
        .output()
        .expect("dmesg runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("type=1326") && l.contains(&format!(" pid={pid} ")))
        .map(str::to_string)
        .collect()
}

#[test]
fn log_mode_lets_a_forbidden_call_through_and_the_kernel_logs_it() {
    require_kvm!();
    let mut args = guest_args("-- counters period_ms=50", &[]);
    args.extend(["--seccomp".to_string(), "log".to_string()]);
    let mut vmm = spawn_selftest("vcpu", &args);
    vmm.wait_for_stderr("seccomp self-test: the vcpu thread", BOOT);
    // The guest goes on running.
    for _ in 0..3 {
        vmm.wait_for("counters:", SHORT);
    }
    assert!(vmm.wait_exit(Duration::ZERO).is_none(), "{}", vmm.report());
    let deadline = Instant::now() + SHORT;
    let record = loop {
        let records = seccomp_records(vmm.pid());
        if let Some(r) = records.into_iter().find(|r| r.contains("syscall=135 ")) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record of the call in the kernel log"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(record.contains("comm=\"vcpu0\""), "{record}");
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), 5, "{}", vmm.report());
}

#[test]
fn filters_are_on_by_default_and_off_on_request() {
    require_kvm!();
    let mut on = spawn_selftest("vcpu", &guest_args("-- counters", &[]));
    assert_killed_by_the_filter_of(&mut on, "vcpu", SHORT);
    let mut args = guest_args("-- counters", &[]);
    args.extend(["--seccomp".to_string(), "off".to_string()]);
    let mut off = spawn_selftest("vcpu", &args);
    for _ in 0..3 {
        off.wait_for("counters:", BOOT);
    }
    assert!(off.wait_exit(Duration::ZERO).is_none(), "{}", off.report());
    // Every thread of a VMM with filters has one (mode 2 = filter).
    let mut filtered = Vmm::boot_testguest("-- counters", &[]);
    filtered.wait_for("counters:", BOOT);
    let threads = vmm_thread_statuses(filtered.pid());
    assert!(threads.len() > 2, "{threads:?}");
    for (task, status) in threads {
        assert_eq!(
            status_field(&status, "Seccomp"),
            "2",
            "{}: {status}",
            task.display()
        );
    }
}

/// The user the `--user` tests run as: `nobody`, on every Debian system.
const USER: &str = "nobody";

fn nobody_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("a nobody user");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

/// Every thread of `pid` runs as `uid`/`gid` with no groups, no
/// capabilities and no-new-privileges.
fn assert_unprivileged(pid: u32, uid: u32, gid: u32) {
    let threads = vmm_thread_statuses(pid);
    assert!(threads.len() > 2, "{threads:?}");
    for (task, status) in threads {
        let ids = |name| -> Vec<u32> {
            status_field(&status, name)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        assert_eq!(ids("Uid"), vec![uid; 4], "{}: {status}", task.display());
        assert_eq!(ids("Gid"), vec![gid; 4], "{}: {status}", task.display());
        for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(
                u64::from_str_radix(status_field(&status, caps), 16).unwrap(),
                0,
                "{caps} of {}",
                task.display()
            );
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
        let groups = status_field(&status, "Groups");
        assert!(
            groups.split_whitespace().all(|g| g == gid.to_string()),
            "supplementary groups {groups:?}"
        );
    }
}

/// A directory the user owns, for its sockets (it removes them at exit).
fn user_dir(tag: &str, uid: u32, gid: u32) -> TempDir {
    let dir = TempDir::new(tag);
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    dir
}

#[test]
fn a_vmm_run_as_a_user_keeps_no_privileges_and_runs_a_disk_and_a_nic() {
    require_kvm!();
    if !netns::available() {
        return;
    }
    let (uid, gid) = nobody_ids();
    let dir = user_dir("user", uid, gid);
    // A root-owned disk the user could not open itself: the VMM opens it
    // before it drops root.
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), 0);
    let socket = dir.join("api.sock");
    let net = Netns::create("user");
    const TAP: &str = "usertap0";
    let mut vmm = Vmm::spawn_with_prefix(
        &net.exec_prefix(),
        &guest_args(
            "-- blk-info; blk-write sector=8 count=8 pattern=77; blk-read sector=8 count=8 pattern=77; net-info",
            &[
                "--user",
                USER,
                "--disk",
                &format!("path={}", disk.display()),
                "--net",
                &format!("tap={TAP}"),
                "--api-socket",
                socket.to_str().unwrap(),
            ],
        ),
    );
    vmm.wait_for("blk-read-ok", BOOT);
    vmm.wait_for("net0: mac=", SHORT);
    assert_unprivileged(vmm.pid(), uid, gid);
    // The disk was written through the fd opened as root.
    let data = std::fs::read(&disk).unwrap();
    assert!(data[8 * 512..16 * 512].iter().any(|&b| b != 0));

    // The NIC: frames from the guest reach the tap.
    net.link_up(TAP, SHORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let collector = net.spawn(move || {
        let socket = PacketSocket::bind(TAP, 0x88b5);
        ready_tx.send(()).unwrap();
        (0..3).filter_map(|_| socket.recv(SHORT)).count()
    });
    ready_rx.recv().unwrap();
    vmm.send_line("net-send count=3 size=200");
    vmm.wait_for("net: sent=3", SHORT);
    assert_eq!(collector.join().unwrap(), 3, "{}", vmm.report());

    // The lifecycle through the API, then a clean exit that removes the
    // socket (the user owns its directory).
    let api = vmm.api();
    api.pause().unwrap();
    api.resume().unwrap();
    let info = api.info().unwrap();
    assert_eq!(info.state, VmState::Running);
    // The VMM's own /proc figures still read after the change of user.
    let memory = info.memory.expect("memory figures");
    assert!(
        memory.rss_bytes > 0 && memory.pss_bytes.is_some(),
        "{memory:?}"
    );
    api.shutdown(&api::request::ShutdownRequest::default())
        .unwrap();
    assert_eq!(vmm.exit_code(SHORT), 0, "{}", vmm.report());
    assert!(!socket.exists(), "the API socket is removed at exit");
}

/// A free TCP port on the loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_vmms_run_as_a_user_migrate_a_guest_over_tcp() {
    require_kvm!();
    let (uid, gid) = nobody_ids();
    let dir = user_dir("user-migrate", uid, gid);
    let token = dir.join("token");
    std::fs::write(&token, "user-token\n").unwrap();
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    let target_socket = dir.join("target.sock");
    let mut target = Vmm::spawn(&[
        "--user",
        USER,
        "--incoming",
        &listen,
        "--migration-token-file",
        token.to_str().unwrap(),
        "--api-socket",
        target_socket.to_str().unwrap(),
    ]);
    target.wait_api(SHORT);
    let source_socket = dir.join("source.sock");
    let mut source = Vmm::spawn(&guest_args(
        "-- counters period_ms=50",
        &[
            "--user",
            USER,
            "--memory",
            "size=128M",
            "--api-socket",
            source_socket.to_str().unwrap(),
        ],
    ));
    source.wait_for("counters:", BOOT);
    assert_unprivileged(source.pid(), uid, gid);
    assert_unprivileged(target.pid(), uid, gid);
    source
        .api()
        .send_migration(&SendMigrationRequest {
            destination: listen,
            token: "user-token".into(),
            parameters: MigrationParameters::default(),
            tls_dir: None,
            force: false,
        })
        .unwrap();
    let deadline = Instant::now() + MIGRATE;
    loop {
        let status = source.api().migration_status();
        match status {
            Ok(s) if s.phase == MigrationPhase::Completed => break,
            Ok(s) if s.phase == MigrationPhase::Failed => panic!("{s:#?}\n{}", source.report()),
            // The source exits soon after completing.
            Err(_) if source.wait_exit(Duration::ZERO).is_some() => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "{}", source.report());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(source.exit_code(SHORT), 6, "{}", source.report());
    // The guest counts on, in the target, which still has no privileges.
    let first = field(&target.wait_for("counters:", SHORT), "cpu0").unwrap();
    let mut later = first;
    for _ in 0..3 {
        later = field(&target.wait_for("counters:", SHORT), "cpu0").unwrap();
    }
    assert!(later > first, "{first} -> {later}");
    assert_unprivileged(target.pid(), uid, gid);
    target.signal(libc::SIGTERM);
    assert_eq!(target.exit_code(SHORT), 5, "{}", target.report());
}
