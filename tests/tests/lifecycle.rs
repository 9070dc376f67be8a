//! The test guest boots, runs on every vCPU, pauses and resumes, and ends in
//! each of the ways a guest can end; the VMM's exit code says which.

use std::time::{Duration, Instant};

use api::request::{ShutdownMode, ShutdownRequest, VmState};
use vmm_tests::harness::{field, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);

/// Exit codes of `vmm` (see `vmm --help`).
const EXIT_POWERED_OFF: i32 = 0;
const EXIT_RESET: i32 = 3;
const EXIT_CRASHED: i32 = 4;
const EXIT_STOPPED: i32 = 5;

fn counter_values(line: &str, cpus: usize) -> Vec<u64> {
    (0..cpus)
        .map(|i| field(line, &format!("cpu{i}")).unwrap_or_else(|| panic!("no cpu{i} in {line:?}")))
        .collect()
}

#[test]
fn guest_boots_prints_and_powers_off() {
    require_kvm!();
    let mut vmm = Vmm::boot_testguest("-- echo first words; info", &["--memory", "size=64M"]);
    vmm.wait_for("testguest: hello", BOOT);
    vmm.wait_for("first words", SHORT);
    let info = vmm.wait_for("testguest: info", SHORT);
    assert_eq!(field(&info, "cpus"), Some(1), "{info}");
    let mem = field(&info, "mem_mib").expect("mem_mib");
    assert!(
        (60..=64).contains(&mem),
        "guest sees {mem} MiB of 64: {info}"
    );
    // Commands also come from the console.
    vmm.send_line("echo typed on the console");
    vmm.wait_for("typed on the console", SHORT);
    vmm.send_line("poweroff");
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
}

#[test]
fn two_vcpus_both_make_progress() {
    require_kvm!();
    let mut vmm = Vmm::boot_testguest("-- counters period_ms=100", &["--cpus", "2"]);
    // The guest prefers the ACPI MADT (PVH rsdp_paddr) to the MP table.
    let found = vmm.wait_for("testguest: cpus found=", BOOT);
    assert!(found.contains("found=2 source=madt"), "{found}");
    let ready = vmm.wait_for("testguest: ready", BOOT);
    assert_eq!(field(&ready, "cpus"), Some(2), "{ready}");
    let first = counter_values(&vmm.wait_for("counters:", SHORT), 2);
    // A few periods later both counters have moved.
    let mut last = first.clone();
    for _ in 0..5 {
        last = counter_values(&vmm.wait_for("counters:", SHORT), 2);
    }
    for cpu in 0..2 {
        assert!(
            last[cpu] > first[cpu],
            "cpu{cpu} made no progress: {first:?} -> {last:?}"
        );
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    require_kvm!();
    let dir = TempDir::new("pause");
    let socket = dir.join("api.sock");
    let socket = socket.to_str().unwrap();
    let mut vmm = Vmm::boot_testguest(
        "-- counters period_ms=50",
        &["--cpus", "2", "--api-socket", socket],
    );
    vmm.wait_for("counters:", BOOT);
    let api = vmm.api();
    let before = counter_values(&vmm.wait_for("counters:", SHORT), 2);
    api.pause().expect("pause");
    assert_eq!(api.info().unwrap().state, VmState::Paused);
    // Lines already in flight may still arrive; after that, silence.
    std::thread::sleep(Duration::from_millis(200));
    let lines_at_pause = vmm.console().len();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        vmm.console().len(),
        lines_at_pause,
        "the guest printed while paused:\n{}",
        vmm.report()
    );
    // Pausing twice is not an error: it is already done, and says so.
    let again = api.pause().expect("pause again");
    assert!(!again.changed, "{again:?}");
    assert_eq!(again.message, "already paused");
    api.resume().expect("resume");
    assert_eq!(api.info().unwrap().state, VmState::Running);
    let after = counter_values(&vmm.wait_for("counters:", SHORT), 2);
    let later = counter_values(&vmm.wait_for("counters:", SHORT), 2);
    for cpu in 0..2 {
        assert!(
            after[cpu] >= before[cpu] && later[cpu] > after[cpu],
            "cpu{cpu}: {before:?} {after:?} {later:?}"
        );
    }
}

#[test]
fn graceful_shutdown_is_honoured_by_the_guest() {
    require_kvm!();
    let dir = TempDir::new("graceful");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest("--", &["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_for("testguest: ready", BOOT);
    // Graceful = the ACPI power button.
    vmm.api()
        .shutdown(&ShutdownRequest::default())
        .expect("shutdown");
    vmm.wait_for("testguest: power-button", SHORT);
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
    assert!(!socket.exists(), "the API socket is removed on exit");
}

#[test]
fn ctrl_alt_del_shutdown_is_honoured_by_the_guest() {
    require_kvm!();
    let dir = TempDir::new("cad");
    let socket = dir.join("api.sock");
    // on_cad=reset: a guest that reboots on Ctrl-Alt-Del (Linux's default)
    // has shut down as asked too.
    let mut vmm = Vmm::boot_testguest(
        "on_cad=reset --",
        &["--api-socket", socket.to_str().unwrap()],
    );
    vmm.wait_for("testguest: ready", BOOT);
    vmm.api()
        .shutdown(&ShutdownRequest {
            mode: ShutdownMode::CtrlAltDel,
            timeout_ms: Some(10_000),
        })
        .expect("shutdown");
    vmm.wait_for("testguest: ctrl-alt-del", SHORT);
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
    assert!(
        !vmm.console().iter().any(|l| l.contains("power-button")),
        "{}",
        vmm.report()
    );
}

#[test]
fn graceful_shutdown_ignored_by_the_guest_is_forced_after_the_timeout() {
    require_kvm!();
    let dir = TempDir::new("timeout");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest(
        "on_cad=ignore --",
        &["--api-socket", socket.to_str().unwrap()],
    );
    vmm.wait_for("testguest: ready", BOOT);
    let asked = Instant::now();
    vmm.api()
        .shutdown(&ShutdownRequest {
            mode: ShutdownMode::Graceful,
            timeout_ms: Some(800),
        })
        .expect("shutdown");
    vmm.wait_for("testguest: power-button", SHORT);
    assert_eq!(vmm.exit_code(SHORT), EXIT_STOPPED, "{}", vmm.report());
    assert!(
        asked.elapsed() >= Duration::from_millis(800),
        "forced before the timeout"
    );
}

#[test]
fn forced_shutdown_stops_at_once() {
    require_kvm!();
    let dir = TempDir::new("force");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest(
        "on_cad=ignore -- counters",
        &["--api-socket", socket.to_str().unwrap()],
    );
    vmm.wait_for("counters:", BOOT);
    vmm.api()
        .shutdown(&ShutdownRequest {
            mode: ShutdownMode::Force,
            timeout_ms: None,
        })
        .expect("shutdown");
    assert_eq!(vmm.exit_code(SHORT), EXIT_STOPPED, "{}", vmm.report());
}

#[test]
fn sigterm_stops_the_guest() {
    require_kvm!();
    let mut vmm = Vmm::boot_testguest("-- counters", &[]);
    vmm.wait_for("counters:", BOOT);
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), EXIT_STOPPED, "{}", vmm.report());
}

#[test]
fn guest_reset_ends_the_vmm_by_default() {
    require_kvm!();
    for command in ["reset", "triple-fault"] {
        let mut vmm = Vmm::boot_testguest("--", &[]);
        vmm.wait_for("testguest: ready", BOOT);
        vmm.send_line(command);
        assert_eq!(
            vmm.exit_code(SHORT),
            EXIT_RESET,
            "{command}: {}",
            vmm.report()
        );
    }
}

#[test]
fn guest_reset_reboots_in_place_when_asked() {
    require_kvm!();
    let mut vmm = Vmm::boot_testguest("--", &["--on-reset", "reboot"]);
    vmm.wait_for("testguest: ready", BOOT);
    vmm.send_line("reset");
    // The same guest boots again from its kernel.
    vmm.wait_for("testguest: hello", BOOT);
    vmm.wait_for("testguest: ready", BOOT);
    vmm.send_line("poweroff");
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
}

/// The guest's `crash` executes at CPL0 an instruction (POPCNT) that this
/// host's KVM cannot emulate: KVM_RUN ends with KVM_EXIT_INTERNAL_ERROR,
/// suberror 1, which the VMM reports as a guest crash. Where CPL0 runs on
/// hardware the instruction just runs and the guest says so: skipped.
#[test]
fn a_guest_crash_ends_the_vmm_with_the_kvm_internal_error() {
    require_kvm!();
    let mut vmm = Vmm::boot_testguest("--", &["--memory", "size=64M"]);
    vmm.wait_for("testguest: ready", BOOT);
    vmm.send_line("crash");
    vmm.wait_for("testguest: crash", SHORT);
    // Returns at once when the VMM exits (end of its output).
    if vmm.try_wait_for("crash status=survived", SHORT).is_some() {
        eprintln!("SKIP: CPL0 runs natively on this host: the crash instruction is harmless");
        vmm.send_line("poweroff");
        assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
        return;
    }
    assert_eq!(vmm.exit_code(SHORT), EXIT_CRASHED, "{}", vmm.report());
    // The stderr reader may still be draining the pipe.
    let deadline = Instant::now() + SHORT;
    while !vmm
        .stderr()
        .iter()
        .any(|l| l.contains("vmm: guest crashed: vcpu0: KVM internal error, suberror 1"))
    {
        assert!(Instant::now() < deadline, "{}", vmm.report());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_exceptions_are_reported_and_the_vmm_stays_up() {
    require_kvm!();
    let dir = TempDir::new("ud");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest("-- ud", &["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_for("testguest: EXCEPTION", BOOT);
    assert!(vmm.api().ping().is_ok());
}

#[test]
fn serial_output_goes_to_a_file() {
    require_kvm!();
    let dir = TempDir::new("serialfile");
    let log = dir.join("console.log");
    let mut vmm = Vmm::boot_testguest(
        "-- echo into the file; poweroff",
        &["--serial", &format!("file={}", log.display())],
    );
    assert_eq!(vmm.exit_code(BOOT), EXIT_POWERED_OFF, "{}", vmm.report());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("testguest: hello") && text.contains("into the file"),
        "{text}"
    );
    assert!(
        vmm.console().is_empty(),
        "nothing on stdout: {:?}",
        vmm.console()
    );
}

#[test]
fn serial_console_on_a_unix_socket_works_both_ways() {
    use std::io::{BufRead, BufReader, Write};
    require_kvm!();
    let dir = TempDir::new("serialsock");
    let console = dir.join("console.sock");
    let api = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest(
        "--",
        &[
            "--serial",
            &format!("socket={}", console.display()),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    vmm.wait_api(BOOT);
    let stream = std::os::unix::net::UnixStream::connect(&console).expect("console socket");
    stream.set_read_timeout(Some(SHORT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer.write_all(b"echo over the socket\n").unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "console socket closed"
        );
        if line.contains("over the socket") && !line.contains("echo") {
            break;
        }
    }
    writer.write_all(b"poweroff\n").unwrap();
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
    assert!(!console.exists(), "the console socket is removed on exit");
}

#[test]
fn serial_console_on_a_pty() {
    use std::io::{BufRead, BufReader, Write};
    require_kvm!();
    let dir = TempDir::new("pty");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest(
        "--",
        &["--serial", "pty", "--api-socket", socket.to_str().unwrap()],
    );
    vmm.wait_api(BOOT);
    let pty = vmm
        .api()
        .info()
        .unwrap()
        .serial_pty
        .expect("vm.info names the pty");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty)
        .unwrap_or_else(|e| panic!("{}: {e}", pty.display()));
    // Raw mode on our side too, so lines come back as the guest wrote them.
    let mut writer = file.try_clone().unwrap();
    let mut reader = BufReader::new(file);
    writer.write_all(b"echo through the pty\n").unwrap();
    let deadline = Instant::now() + SHORT;
    let mut line = String::new();
    loop {
        assert!(Instant::now() < deadline, "no reply on {}", pty.display());
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.contains("through the pty") && !line.contains("echo") {
            break;
        }
    }
    writer.write_all(b"poweroff\n").unwrap();
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
}

#[test]
fn guest_memory_backings() {
    require_kvm!();
    let mut vmm = Vmm::boot_testguest("-- memfill pattern=1122334455667788 mib=32; memcheck pattern=1122334455667788 mib=32; poweroff", &["--memory", "size=96M,backing=memfd"]);
    vmm.wait_for("memcheck-ok", BOOT);
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());

    // Without enough reserved huge pages the VMM refuses cleanly (no SIGBUS later).
    let free_huge = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("HugePages_Free:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    if free_huge < 48 {
        let mut vmm =
            Vmm::boot_testguest("-- poweroff", &["--memory", "size=96M,backing=hugetlbfs"]);
        assert_eq!(vmm.exit_code(SHORT), 1, "{}", vmm.report());
        let stderr = vmm.stderr().join("\n");
        assert!(stderr.contains("huge pages"), "{stderr}");
    }

    // hugetlbfs needs reserved 2 MiB pages: reserve them for the test.
    let Some(_pages) = HugePages::reserve(64) else {
        return;
    };
    let mut vmm = Vmm::boot_testguest(
        "-- memfill pattern=99 mib=32; memcheck pattern=99 mib=32; poweroff",
        &["--memory", "size=96M,backing=hugetlbfs"],
    );
    vmm.wait_for("memcheck-ok", BOOT);
    assert_eq!(vmm.exit_code(SHORT), EXIT_POWERED_OFF, "{}", vmm.report());
}

/// Reserves 2 MiB huge pages for a test and gives them back after.
struct HugePages {
    previous: String,
}

impl HugePages {
    const KNOB: &'static str = "/proc/sys/vm/nr_hugepages";

    fn reserve(count: u32) -> Option<HugePages> {
        let previous = std::fs::read_to_string(Self::KNOB).ok()?.trim().to_string();
        let have: u32 = previous.parse().unwrap_or(0);
        if std::fs::write(Self::KNOB, (have + count).to_string()).is_err() {
            eprintln!(
                "SKIP: cannot reserve huge pages in {} (not root?)",
                Self::KNOB
            );
            return None;
        }
        let got: u32 = std::fs::read_to_string(Self::KNOB)
            .ok()?
            .trim()
            .parse()
            .unwrap_or(0);
        if got < have + count {
            let _ = std::fs::write(Self::KNOB, &previous);
            eprintln!("SKIP: the host could only reserve {got} huge pages");
            return None;
        }
        Some(HugePages { previous })
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::KNOB, &self.previous);
    }
}
