//! The host side of a running guest: what signals do to it, where the
//! VMM's log goes, what a core dump holds, how a stopped migration target
//! and a refused disk end, that one disk has one writer on one host
//! (loop devices and the files behind them included), and that a guest
//! bigger than the host is refused unless overcommit is intended.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_tests::harness::{field, LoopDevice, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(15);

const EXIT_ERROR: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_STOPPED: i32 = 5;

/// cpu0's counter from the next `counters:` line.
fn next_count(vmm: &mut Vmm) -> u64 {
    let line = vmm.wait_for("counters:", SHORT);
    field(&line, "cpu0").unwrap_or_else(|| panic!("no cpu0 in {line:?}"))
}

fn wait_file_contains(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + SHORT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never contained {needle:?}; it has:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn stray_signals_are_logged_and_never_stop_the_guest() {
    require_kvm!();
    let mut vmm = Vmm::boot_testguest("-- counters period_ms=50", &[]);
    let before = next_count(&mut vmm);
    let stray = [
        (libc::SIGUSR1, "SIGUSR1 ignored"),
        (libc::SIGUSR2, "SIGUSR2 ignored"),
        (libc::SIGALRM, "SIGALRM ignored"),
        (libc::SIGVTALRM, "SIGVTALRM ignored"),
        (libc::SIGPROF, "SIGPROF ignored"),
        (libc::SIGIO, "SIGIO ignored"),
        (libc::SIGPWR, "SIGPWR ignored"),
        (libc::SIGRTMIN() + 3, "SIGRTMIN+3 ignored"),
        (libc::SIGRTMAX(), "ignored"),
        // Without --log-file there is nothing to reopen.
        (libc::SIGHUP, "SIGHUP ignored (no --log-file"),
        // Ignored silently: their default is to ignore, or the failing
        // write reports the error.
        (libc::SIGPIPE, ""),
        (libc::SIGWINCH, ""),
        (libc::SIGXFSZ, ""),
        (libc::SIGCHLD, ""),
        // The vCPU kick: only kicks.
        (libc::SIGRTMIN(), ""),
    ];
    for (signal, logged) in stray {
        vmm.signal(signal);
        if !logged.is_empty() {
            vmm.wait_for_stderr(logged, SHORT);
        }
    }
    // The guest kept running through all of them.
    let mut after = next_count(&mut vmm);
    for _ in 0..3 {
        after = next_count(&mut vmm);
    }
    assert!(after > before, "the guest stopped: {before} -> {after}");
    assert!(vmm.wait_exit(Duration::ZERO).is_none(), "{}", vmm.report());
    // SIGTERM keeps its meaning.
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), EXIT_STOPPED, "{}", vmm.report());
    vmm.wait_for_stderr("SIGTERM: stopping", SHORT);
}

#[test]
fn sighup_reopens_the_log_file_for_logrotate() {
    require_kvm!();
    let dir = TempDir::new("logfile");
    let log = dir.join("vmm.log");
    let rotated = dir.join("vmm.log.1");
    std::fs::write(&log, "an earlier run\n").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o640)).unwrap();
    let guest = vmm_tests::harness::testguest();
    // A strict umask must not take the group's read bit from a new log.
    let mut vmm = Vmm::spawn_with_prefix(
        &["sh", "-c", "umask 077; exec \"$0\" \"$@\""],
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            "-- counters period_ms=100",
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    vmm.wait_for("counters:", BOOT);
    vmm.signal(libc::SIGUSR1);
    let text = wait_file_contains(&log, "SIGUSR1 ignored");
    assert!(
        text.starts_with("an earlier run\n"),
        "appended, not truncated:\n{text}"
    );
    // The console stays on stdout; the VMM's messages left stderr.
    assert!(
        !vmm.stderr().iter().any(|l| l.contains("SIGUSR1")),
        "{}",
        vmm.report()
    );

    // logrotate: move the file away, then SIGHUP.
    std::fs::rename(&log, &rotated).unwrap();
    vmm.signal(libc::SIGHUP);
    wait_file_contains(&log, "SIGHUP: reopened the log file");
    assert_eq!(
        mode(&log),
        0o640,
        "a new log is created 0640 whatever the umask"
    );
    vmm.signal(libc::SIGUSR2);
    wait_file_contains(&log, "SIGUSR2 ignored");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        !old.contains("SIGUSR2") && !old.contains("reopened"),
        "{old}"
    );

    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), EXIT_STOPPED, "{}", vmm.report());
    wait_file_contains(&log, "SIGTERM: stopping");
}

/// The guest RAM mappings of `pid` (those of exactly `size_kib`) with
/// their VmFlags, from /proc/PID/smaps.
fn mappings_of_size(pid: u32, size_kib: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut found = Vec::new();
    let mut size = 0;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Size:") {
            size = kib
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if size == size_kib {
                found.push(flags.trim().to_string());
            }
        }
    }
    found
}

#[test]
fn guest_ram_is_left_out_of_core_dumps() {
    require_kvm!();
    for backing in ["anonymous", "memfd"] {
        let mut vmm =
            Vmm::boot_testguest("--", &["--memory", &format!("size=96M,backing={backing}")]);
        vmm.wait_for("testguest: ready", BOOT);
        let ram = mappings_of_size(vmm.pid(), 96 * 1024);
        assert!(
            !ram.is_empty(),
            "{backing}: no 96 MiB mapping in smaps\n{}",
            vmm.report()
        );
        for flags in &ram {
            assert!(
                flags.split_whitespace().any(|f| f == "dd"),
                "{backing}: guest RAM without the dd (do not dump) flag: {flags}"
            );
        }
        vmm.send_line("poweroff");
        assert_eq!(vmm.exit_code(SHORT), 0, "{}", vmm.report());
    }
}

#[test]
fn a_migration_target_stopped_before_any_guest_ran_exits_1() {
    require_kvm!();
    let dir = TempDir::new("target-stop");
    let (mut target, _) = Vmm::incoming(&dir, "token");
    target.signal(libc::SIGTERM);
    assert_eq!(target.exit_code(SHORT), EXIT_ERROR, "{}", target.report());
    target.wait_for_stderr("no guest ran", SHORT);

    let dir = TempDir::new("target-shutdown");
    let (mut target, _) = Vmm::incoming(&dir, "token");
    target.api().shutdown_vmm().expect("vmm.shutdown");
    assert_eq!(target.exit_code(SHORT), EXIT_ERROR, "{}", target.report());
}

fn image(dir: &TempDir, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    path
}

#[test]
fn a_disk_locked_by_another_vmm_exits_1_not_2() {
    require_kvm!();
    let dir = TempDir::new("lock-exit");
    let disk = image(&dir, "held.img", 16);
    let disk_arg = format!("path={}", disk.display());
    let mut holder = Vmm::boot_testguest("--", &["--disk", &disk_arg]);
    holder.wait_for("testguest: ready", BOOT);
    let mut second = Vmm::boot_testguest("--", &["--disk", &disk_arg]);
    assert_eq!(second.exit_code(SHORT), EXIT_ERROR, "{}", second.report());
    second.wait_for_stderr("locked", SHORT);
    // A disk that is not there is the caller's mistake: 2.
    let mut bad = Vmm::boot_testguest("--", &["--disk", "path=/nonexistent/disk.img"]);
    assert_eq!(bad.exit_code(SHORT), EXIT_USAGE, "{}", bad.report());
    holder.send_line("poweroff");
    assert_eq!(holder.exit_code(SHORT), 0, "{}", holder.report());
}

/// MemTotal + SwapTotal in MiB.
fn host_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/meminfo"))
    };
    (kib("MemTotal:") + kib("SwapTotal:")) >> 10
}

#[test]
fn a_guest_bigger_than_the_host_is_refused_unless_overcommit_is_intended() {
    require_kvm!();
    // A whole GiB over RAM + swap, rounded to GiB.
    let too_big_mib = (host_memory_mib() / 1024 + 1) * 1024 + 1024;
    let memory = format!("size={too_big_mib}M");
    let mut refused = Vmm::boot_testguest("-- poweroff", &["--memory", &memory]);
    assert_eq!(refused.exit_code(SHORT), EXIT_USAGE, "{}", refused.report());
    let message = refused.wait_for_stderr("overcommit", SHORT);
    assert!(
        message.contains(&format!("{too_big_mib} MiB")) && message.contains("RAM"),
        "names the sizes: {message}"
    );

    // Through the API: 400, and the VMM keeps serving.
    let dir = TempDir::new("overcommit-api");
    let socket = dir.join("api.sock");
    let vmm = Vmm::spawn(&["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_api(SHORT);
    let mut config = config::VmConfig::default();
    config.payload.kernel = vmm_tests::harness::testguest();
    config.memory.size_mib = too_big_mib;
    match vmm.api().create(&config) {
        Err(api::http::ClientError::Api { status, error }) => {
            assert_eq!(status, 400, "{error}");
            assert!(error.message.contains("overcommit"), "{}", error.message);
        }
        other => panic!("vm.create of a guest bigger than the host: {other:?}"),
    }
    vmm.api().ping().expect("still serving");

    // Said on purpose: the guest boots (memory is only backed when touched).
    let mut allowed = Vmm::boot_testguest(
        "-- info; poweroff",
        &["--memory", &format!("{memory},overcommit=on")],
    );
    let info = allowed.wait_for("testguest: info", BOOT);
    assert!(
        field(&info, "mem_mib").unwrap() > host_memory_mib(),
        "{info}"
    );
    assert_eq!(allowed.exit_code(SHORT), 0, "{}", allowed.report());
}

/// Takes an OFD write lock on `path` as QEMU or Cloud Hypervisor would;
/// held while the returned file is open.
fn ofd_write_lock(path: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: an all-zero flock is valid; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: a valid fd and flock for F_OFD_SETLK.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    assert_eq!(rc, 0, "lock {}", path.display());
    file
}

#[test]
fn a_loop_device_and_its_file_are_one_disk_with_one_writer() {
    require_kvm!();
    let dir = TempDir::new("loop-lock");
    let file = image(&dir, "vm1.img", 16);
    let Some(device) = LoopDevice::attach(&file) else {
        return;
    };
    let file_disk = format!("path={}", file.display());
    let loop_disk = format!("path={}", device.device.display());
    let api = dir.join("vm1.sock");

    // A VM on the file; another VMM on the loop device over it is refused,
    // read-write or read-only, and told who has it.
    let mut first = Vmm::boot_testguest(
        "--",
        &["--disk", &file_disk, "--api-socket", api.to_str().unwrap()],
    );
    first.wait_for("testguest: ready", BOOT);
    for options in ["", ",readonly=on"] {
        let mut second =
            Vmm::boot_testguest("-- poweroff", &["--disk", &format!("{loop_disk}{options}")]);
        assert_eq!(second.exit_code(SHORT), EXIT_ERROR, "{}", second.report());
        let message = second.wait_for_stderr("locked", SHORT);
        for needle in [
            file.to_str().unwrap(),
            "another VM",
            &format!("pid {}", first.pid()),
            api.to_str().unwrap(),
            "read-write",
        ] {
            assert!(
                message.contains(needle),
                "{needle:?} missing from: {message}"
            );
        }
    }
    first.send_line("poweroff");
    assert_eq!(first.exit_code(SHORT), 0, "{}", first.report());

    // The other way round: a VM on the loop device, then one on the file.
    let mut first = Vmm::boot_testguest("--", &["--disk", &loop_disk]);
    first.wait_for("testguest: ready", BOOT);
    let mut second = Vmm::boot_testguest("-- poweroff", &["--disk", &file_disk]);
    assert_eq!(second.exit_code(SHORT), EXIT_ERROR, "{}", second.report());
    let message = second.wait_for_stderr("locked", SHORT);
    assert!(
        message.contains(&format!("pid {}", first.pid())) && message.contains("another VM"),
        "{message}"
    );
    first.send_line("poweroff");
    assert_eq!(first.exit_code(SHORT), 0, "{}", first.report());

    // Another program (QEMU, say) holding the loop device: the file is
    // refused too, and the message says it is not a VMM of ours.
    let held = ofd_write_lock(&device.device);
    let mut refused = Vmm::boot_testguest("-- poweroff", &["--disk", &file_disk]);
    assert_eq!(refused.exit_code(SHORT), EXIT_ERROR, "{}", refused.report());
    let message = refused.wait_for_stderr("locked", SHORT);
    assert!(
        message.contains(&format!("loop device {}", device.device.display()))
            && message.contains("another process")
            && message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    drop(held);
    // Released: the file boots.
    let mut free = Vmm::boot_testguest("-- poweroff", &["--disk", &file_disk]);
    assert_eq!(free.exit_code(BOOT), 0, "{}", free.report());
}

#[test]
fn one_disk_given_twice_to_one_vm_is_a_config_error_naming_both() {
    require_kvm!();
    let dir = TempDir::new("disk-twice");
    let file = image(&dir, "twice.img", 16);
    let link = dir.join("alias.img");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let mut pairs = vec![(file.clone(), link.clone())];
    let device = LoopDevice::attach(&file);
    if let Some(device) = &device {
        pairs.push((file.clone(), device.device.clone()));
    }
    for (a, b) in pairs {
        let mut vmm = Vmm::boot_testguest(
            "-- poweroff",
            &[
                "--disk",
                &format!("path={}", a.display()),
                "--disk",
                &format!("path={},readonly=on", b.display()),
            ],
        );
        assert_eq!(vmm.exit_code(SHORT), EXIT_USAGE, "{}", vmm.report());
        let message = vmm.wait_for_stderr("same disk", SHORT);
        assert!(
            message.contains("disks[1]")
                && message.contains("disks[0]")
                && message.contains(a.to_str().unwrap())
                && message.contains(b.to_str().unwrap()),
            "{message}"
        );
    }
}
