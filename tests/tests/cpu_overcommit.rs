//! CPU overcommit end to end: `cpus.weight` shares a busy host CPU between
//! guests by weight, `cpus.max_percent` caps a guest, `cpus.affinity` pins
//! the vCPU threads (and only them), each through a real `vmm` in its own
//! cgroup, which it removes at exit; bad values are refused naming the
//! field, from the command line and from vm.create.
//!
//! The guests run the test guest's `counters` workload: a ring-3 integer
//! loop on every vCPU that never halts, so each vCPU wants a whole host
//! CPU. CPU time is read from `/proc/PID/stat`, as a user would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::http::Method;
use api::request::{ApiError, SendMigrationRequest, VmState};
use vmm_tests::harness::{status_field, vmm_thread_statuses, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);
/// A guest whose every vCPU burns CPU in ring 3 (one console line a second).
const BUSY: &str = "-- counters period_ms=1000";

/// Whether the host offers the cgroup cpu controller (v2 or v1); the tests
/// that need one print SKIP without it.
fn cpu_controller() -> bool {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
    let has = v2 || Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists();
    if !has {
        eprintln!("SKIP: no cgroup cpu controller on this host");
    }
    has
}

/// The uid and gid of `nobody`, the user of the `--user` tests.
fn nobody_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("a nobody user")
        .split(':')
        .collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

/// The host CPUs this test may run on (and the VMMs it starts, unpinned).
fn own_cpus() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status_field(&status, "Cpus_allowed_list").to_string()
}

/// The host CPU the pinned guests share: the last one this test may use.
fn shared_cpu() -> usize {
    *config::parse_cpu_list(&own_cpus()).unwrap().last().unwrap()
}

/// A guest name no other test run uses at the same time (the cgroup is
/// named after it).
fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// User plus system CPU time of a process (all its threads, guest time
/// included), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised name start at field 3; utime is 14.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((fields[0] + fields[1]) * 1000 / ticks)
}

fn boot_busy(dir: &TempDir, name: &str, cpus: &str, extra: &[&str]) -> Vmm {
    let socket = dir.join(&format!("{name}.sock"));
    let mut args = vec![
        "--cpus",
        cpus,
        "--serial",
        "stdout",
        "--api-socket",
        socket.to_str().unwrap(),
    ];
    args.extend(extra);
    let mut vmm = Vmm::boot_testguest(BUSY, &args);
    vmm.wait_for("testguest: ready", BOOT);
    // The workload runs: its first report is out.
    vmm.wait_for("counters", BOOT);
    vmm.wait_api(SHORT);
    vmm
}

/// The VMM's cgroup directory, as vm.info reports it, and that it is the
/// one /proc says the process is in.
fn cgroup_dir(vmm: &Vmm, name: &str) -> PathBuf {
    let dir = vmm
        .api()
        .info()
        .unwrap()
        .cgroup
        .unwrap_or_else(|| panic!("vm.info has no cgroup\n{}", vmm.report()));
    assert!(
        dir.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&format!("vm-{name}")),
        "{}",
        dir.display()
    );
    let relative = dir
        .strip_prefix("/sys/fs/cgroup/cpu")
        .or_else(|_| dir.strip_prefix("/sys/fs/cgroup"))
        .unwrap();
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", vmm.pid())).unwrap();
    let wanted = format!("/{}", relative.display());
    assert!(
        proc_cgroup.lines().any(|l| l.ends_with(&wanted)
            && (l.starts_with("0::")
                || l.split(':').nth(1).unwrap().split(',').any(|c| c == "cpu"))),
        "the VMM is not in {wanted}: {proc_cgroup}"
    );
    dir
}

/// The VMM stops on SIGTERM (exit 5), and its cgroup is gone with it.
fn stop_and_check_cgroup_removed(mut vmm: Vmm, dir: &Path) {
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), 5, "{}", vmm.report());
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[test]
fn two_busy_guests_on_one_host_cpu_share_it_by_their_weights() {
    require_kvm!();
    if !cpu_controller() {
        return;
    }
    let dir = TempDir::new("cpu-weight");
    let cpu = shared_cpu();
    let (heavy_name, light_name) = (unique("heavy"), unique("light"));
    let heavy = boot_busy(
        &dir,
        &heavy_name,
        &format!("boot=1,weight=300,affinity={cpu}"),
        &[],
    );
    let light = boot_busy(
        &dir,
        &light_name,
        &format!("boot=1,weight=100,affinity={cpu}"),
        &[],
    );
    let heavy_cgroup = cgroup_dir(&heavy, &heavy_name);
    let light_cgroup = cgroup_dir(&light, &light_name);

    // Both want the whole CPU; they get it 3:1 whatever else runs there
    // (the cgroups' parent competes with the rest as one). Measured until
    // they had 4 s of CPU between them, so that a loaded host only makes
    // the test longer, not its figures coarser.
    let start = Instant::now();
    let (heavy0, light0) = (cpu_time(heavy.pid()), cpu_time(light.pid()));
    let (heavy_used, light_used) = loop {
        std::thread::sleep(Duration::from_millis(500));
        let used = (
            cpu_time(heavy.pid()) - heavy0,
            cpu_time(light.pid()) - light0,
        );
        if used.0 + used.1 >= Duration::from_secs(4) || start.elapsed() > Duration::from_secs(60) {
            break used;
        }
    };
    let total = heavy_used + light_used;
    let share = heavy_used.as_secs_f64() / total.as_secs_f64();
    println!(
        "on host CPU {cpu} for {:.1} s: weight 300 got {:.2} s, weight 100 got {:.2} s: share {:.0}%",
        start.elapsed().as_secs_f64(),
        heavy_used.as_secs_f64(),
        light_used.as_secs_f64(),
        share * 100.0
    );
    assert!(
        total >= Duration::from_secs(1),
        "the guests hardly ran ({total:?} in {:?})",
        start.elapsed()
    );
    assert!(
        (0.6..=0.9).contains(&share),
        "weight 300 against 100 got {:.0}% of the CPU, not about 75%",
        share * 100.0
    );
    stop_and_check_cgroup_removed(heavy, &heavy_cgroup);
    stop_and_check_cgroup_removed(light, &light_cgroup);
}

#[test]
fn a_busy_guest_capped_at_30_percent_gets_no_more_than_about_that() {
    require_kvm!();
    if !cpu_controller() {
        return;
    }
    let dir = TempDir::new("cpu-cap");
    let name = unique("capped");
    let vmm = boot_busy(&dir, &name, "boot=1,max_percent=30", &[]);
    let cgroup = cgroup_dir(&vmm, &name);
    // The cap as the kernel has it: 30 ms per 100 ms period.
    let v1 = cgroup.join("cpu.cfs_quota_us");
    if v1.exists() {
        assert_eq!(std::fs::read_to_string(&v1).unwrap().trim(), "30000");
    } else {
        let max = std::fs::read_to_string(cgroup.join("cpu.max")).unwrap();
        assert_eq!(max.trim(), "30000 100000");
    }

    let start = Instant::now();
    let before = cpu_time(vmm.pid());
    std::thread::sleep(Duration::from_secs(6));
    let used = cpu_time(vmm.pid()) - before;
    let share = used.as_secs_f64() / start.elapsed().as_secs_f64();
    println!(
        "capped at 30%: {:.2} s of CPU in {:.1} s: {:.0}%",
        used.as_secs_f64(),
        start.elapsed().as_secs_f64(),
        share * 100.0
    );
    assert!(share < 0.45, "the guest got {:.0}% of a CPU", share * 100.0);
    assert!(share > 0.05, "the guest hardly ran ({:.0}%)", share * 100.0);
    stop_and_check_cgroup_removed(vmm, &cgroup);
}

#[test]
fn affinity_pins_only_the_vcpu_threads_and_survives_user_and_seccomp() {
    require_kvm!();
    if !cpu_controller() {
        return;
    }
    let dir = TempDir::new("cpu-affinity");
    // The user's own directory for its socket.
    let ids = nobody_ids();
    std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1)).unwrap();
    let name = unique("pinned");
    let cpu = shared_cpu();
    let vmm = boot_busy(
        &dir,
        &name,
        &format!("boot=2,weight=200,affinity={cpu}"),
        &["--user", "nobody"],
    );
    let cgroup = cgroup_dir(&vmm, &name);

    let unpinned = own_cpus();
    let threads = vmm_thread_statuses(vmm.pid());
    let mut vcpus = Vec::new();
    for (task, status) in &threads {
        let thread = status_field(status, "Name");
        let allowed = status_field(status, "Cpus_allowed_list");
        assert_eq!(
            status_field(status, "Uid").split_whitespace().next(),
            Some(&*ids.0.to_string())
        );
        if thread.starts_with("vcpu") {
            vcpus.push(thread.to_string());
            assert_eq!(allowed, cpu.to_string(), "{thread} ({})", task.display());
        } else {
            assert_eq!(allowed, unpinned, "{thread} ({})", task.display());
        }
    }
    vcpus.sort();
    assert_eq!(vcpus, ["vcpu0", "vcpu1"], "{threads:?}");
    // Both vCPUs are busy on the one CPU: the guest keeps running.
    let before = cpu_time(vmm.pid());
    std::thread::sleep(Duration::from_secs(1));
    assert!(cpu_time(vmm.pid()) > before);

    // As nobody the VMM cannot remove its root-owned cgroup: it stays for
    // the next VMM of this name (see the README); the test cleans up.
    let mut vmm = vmm;
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), 5, "{}", vmm.report());
    let log = vmm.stderr().join("\n");
    assert!(log.contains("stays"), "{log}");
    std::fs::remove_dir(&cgroup).unwrap();
}

#[test]
fn a_migration_target_on_the_same_host_with_the_same_name_gets_its_own_cgroup() {
    require_kvm!();
    if !cpu_controller() {
        return;
    }
    let (source_dir, target_dir) = (TempDir::new("cpu-mig-src"), TempDir::new("cpu-mig-dst"));
    let name = unique("twin");
    let cpu = shared_cpu();
    let mut source = boot_busy(
        &source_dir,
        &name,
        &format!("boot=1,weight=300,affinity={cpu}"),
        &[],
    );
    let source_cgroup = cgroup_dir(&source, &name);

    // The target is named after its socket, like the source.
    let token = target_dir.join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let listen = format!("unix:{}", target_dir.join("migration.sock").display());
    let target_socket = target_dir.join(&format!("{name}.sock"));
    let mut target = Vmm::spawn(&[
        "--incoming",
        &listen,
        "--migration-token-file",
        token.to_str().unwrap(),
        "--api-socket",
        target_socket.to_str().unwrap(),
    ]);
    target.wait_api(SHORT);
    source
        .api()
        .send_migration(&SendMigrationRequest {
            destination: listen,
            token: "t0ken".into(),
            tls_dir: None,
            force: false,
            parameters: Default::default(),
        })
        .unwrap();
    assert_eq!(
        source.exit_code(Duration::from_secs(60)),
        6,
        "{}",
        source.report()
    );
    target.wait_state(VmState::Running, SHORT);
    // The source had vm-NAME when the target built its VM: the target
    // took vm-NAME@PID, and the source removed its own at exit.
    let target_cgroup = cgroup_dir(&target, &name);
    assert_eq!(
        target_cgroup.file_name().unwrap().to_str().unwrap(),
        format!("vm-{name}@{}", target.pid())
    );
    assert!(!source_cgroup.exists(), "{}", source_cgroup.display());
    // The weight came with the guest; the pinning stayed with the source's
    // host (a target's CPUs are its own business).
    let cpus = target.api().info().unwrap().config.cpus;
    assert_eq!((cpus.weight, cpus.affinity), (Some(300), None));
    let shares = target_cgroup.join("cpu.shares");
    if shares.exists() {
        assert_eq!(std::fs::read_to_string(shares).unwrap().trim(), "3072");
    } else {
        let weight = std::fs::read_to_string(target_cgroup.join("cpu.weight")).unwrap();
        assert_eq!(weight.trim(), "300");
    }
    // The guest goes on counting there.
    target.wait_for("counters", SHORT);
    stop_and_check_cgroup_removed(target, &target_cgroup);
}

/// The ApiError of a vm.create with `cpus` as the body's cpus.
fn create_refusal(vmm: &Vmm, cpus: &str) -> (u16, ApiError) {
    let body = format!(r#"{{"payload": {{"kernel": "/k"}}, "cpus": {cpus}}}"#);
    let (status, reply) = vmm
        .api()
        .request(Method::Put, "vm.create", Some(body.as_bytes()))
        .unwrap();
    let error: ApiError = serde_json::from_slice(&reply)
        .unwrap_or_else(|_| panic!("{cpus}: {status} {}", String::from_utf8_lossy(&reply)));
    (status, error)
}

#[test]
fn bad_cpu_settings_are_refused_naming_the_field() {
    require_kvm!();
    // CPU 1000 parses as a CPU number but no test host has it.
    let absent = 1000;
    for (spec, field) in [
        ("boot=1,weight=0".to_string(), "--cpus.weight"),
        ("boot=1,weight=10001".to_string(), "--cpus.weight"),
        ("weight=heavy".to_string(), "--cpus weight"),
        ("max_percent=0".to_string(), "--cpus.max_percent"),
        ("affinity=1-0".to_string(), "--cpus.affinity"),
        ("affinity=zero".to_string(), "--cpus.affinity"),
        (format!("affinity={absent}"), "cpus.affinity: host CPU 1000"),
        ("boot=1,speed=2".to_string(), "--cpus"),
    ] {
        let mut vmm = Vmm::boot_testguest("", &["--cpus", &spec]);
        assert_eq!(vmm.exit_code(SHORT), 2, "{spec}\n{}", vmm.report());
        let log = vmm.stderr().join("\n");
        assert!(log.contains(field), "{spec}: {log}");
        assert!(!log.contains("panicked"), "{log}");
    }

    let dir = TempDir::new("cpu-bad");
    let vmm = Vmm::spawn(&["--api-socket", dir.join("bad.sock").to_str().unwrap()]);
    vmm.wait_api(SHORT);
    for (cpus, field) in [
        (r#"{"weight": 0}"#.to_string(), "cpus.weight"),
        (r#"{"weight": 10001}"#.to_string(), "cpus.weight"),
        (r#"{"weight": "heavy"}"#.to_string(), "cpus.weight"),
        (r#"{"max_percent": 0}"#.to_string(), "cpus.max_percent"),
        (r#"{"max_percent": -1}"#.to_string(), "cpus.max_percent"),
        (r#"{"affinity": "0,,1"}"#.to_string(), "cpus.affinity"),
        (r#"{"affinity": 3}"#.to_string(), "cpus.affinity"),
        (format!(r#"{{"affinity": "{absent}"}}"#), "cpus.affinity"),
    ] {
        let (status, error) = create_refusal(&vmm, &cpus);
        assert_eq!(status, 400, "{cpus}: {error:?}");
        assert!(
            error.message.starts_with(field),
            "{cpus}: {}",
            error.message
        );
    }
    let (_, error) = create_refusal(&vmm, &format!(r#"{{"affinity": "0,{absent}"}}"#));
    assert!(
        error.message.contains("host CPU 1000 is not available"),
        "{}",
        error.message
    );
    // Nothing was defined by the refusals.
    assert_eq!(vmm.api().ping().unwrap().state, VmState::NotCreated);
}

#[test]
fn a_vmm_run_as_a_user_refuses_a_cpu_weight_it_can_no_longer_set_up() {
    require_kvm!();
    if !cpu_controller() {
        return;
    }
    let dir = TempDir::new("cpu-user-api");
    let ids = nobody_ids();
    std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1)).unwrap();
    let vmm = Vmm::spawn(&[
        "--user",
        "nobody",
        "--api-socket",
        dir.join("late.sock").to_str().unwrap(),
    ]);
    vmm.wait_api(SHORT);
    let (status, error) = create_refusal(&vmm, r#"{"weight": 200}"#);
    assert_eq!(status, 500, "{error:?}");
    assert!(
        error.message.contains("no privileges after --user"),
        "{}",
        error.message
    );
    assert_eq!(vmm.api().ping().unwrap().state, VmState::NotCreated);
    // Pinning needs no privileges: that VM is defined.
    let (status, reply) = vmm
        .api()
        .request(
            Method::Put,
            "vm.create",
            Some(br#"{"payload": {"kernel": "/k"}, "cpus": {"affinity": "0"}}"#),
        )
        .unwrap();
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&reply));
}
