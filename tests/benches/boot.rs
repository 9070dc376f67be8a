//! Boot benchmark: our VMM beside QEMU 7.2 running the same test guest.
//!
//! `cargo bench -p vmm-tests --bench boot` prints a table (medians of
//! several runs, ratios ours/QEMU) and writes it to docs/benchmarks/boot.md.
//! Figures: exec to API ready, boot request to first guest output, exec to
//! first output, a whole exec-boot-print-reset lifecycle (wall, CPU, peak
//! RSS), and VMM memory overhead (RSS minus resident guest RAM) at 1 vCPU
//! and 128 MiB.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::bench::{have_qemu, median, qemu_test_guest, write_report, Table, QEMU};
use vmm_tests::harness::{testguest, vmm_binary, TempDir};

const RUNS: usize = 10;
const MEMORY_MIB: u64 = 128;
const TIMEOUT: Duration = Duration::from_secs(30);

/// QEMU's fastest configuration that runs the test guest: microvm, no
/// firmware option ROMs, no RTC, PVH entry straight into the guest.
fn qemu_command(cmdline: &str) -> Command {
    let mut cmd = Command::new(QEMU);
    qemu_test_guest(
        &mut cmd,
        "microvm,x-option-roms=off,rtc=off,isa-serial=on",
        MEMORY_MIB,
        1,
        cmdline,
    )
    .arg("-no-reboot");
    cmd
}

fn ours_command(guest: &Path, cmdline: &str) -> Command {
    ours_command_with_memory(guest, cmdline, &format!("size={MEMORY_MIB}M"))
}

fn ours_command_with_memory(guest: &Path, cmdline: &str, memory: &str) -> Command {
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--kernel")
        .arg(guest)
        .args(["--cmdline", cmdline, "--memory", memory]);
    cmd
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the program starts")
}

/// Waits until `socket` accepts a connection; returns the time it took from `start`.
fn wait_connect(socket: &Path, start: Instant) -> (UnixStream, Duration) {
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            return (stream, start.elapsed());
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "{} never accepted",
            socket.display()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Time until the first byte on the child's stdout.
fn first_output(child: &mut Child, start: Instant) -> Duration {
    let mut byte = [0u8];
    let out = child.stdout.as_mut().expect("stdout is piped");
    out.read_exact(&mut byte).expect("the guest prints");
    start.elapsed()
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Our VMM: exec to API answering a ping.
fn ours_api_ready(dir: &TempDir) -> Duration {
    let socket = dir.join("api.sock");
    let start = Instant::now();
    let child = spawn({
        let mut c = Command::new(vmm_binary());
        c.arg("--api-socket").arg(&socket);
        c
    });
    let (mut stream, _) = wait_connect(&socket, start);
    stream
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let took = start.elapsed();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    kill(child);
    let _ = std::fs::remove_file(&socket);
    took
}

/// QEMU: exec to the QMP greeting on its socket.
fn qemu_api_ready(dir: &TempDir) -> Duration {
    let socket = dir.join("qmp.sock");
    let start = Instant::now();
    let mut cmd = qemu_command("--");
    cmd.arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()));
    let child = spawn(cmd);
    let (stream, _) = wait_connect(&socket, start);
    let mut greeting = String::new();
    BufReader::new(stream).read_line(&mut greeting).unwrap();
    let took = start.elapsed();
    assert!(greeting.contains("QMP"), "{greeting}");
    kill(child);
    let _ = std::fs::remove_file(&socket);
    took
}

/// Ours: a VM created over the API, then `vm.boot` to the first guest byte.
fn ours_boot_request(dir: &TempDir, guest: &Path) -> Duration {
    let socket = dir.join("api.sock");
    let mut child = spawn({
        let mut c = Command::new(vmm_binary());
        c.arg("--api-socket").arg(&socket);
        c
    });
    let client = api::http::ApiClient::new(&socket);
    let start = Instant::now();
    while client.ping().is_err() {
        assert!(start.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    let config = config::VmConfig {
        payload: config::PayloadConfig {
            kernel: guest.to_path_buf(),
            cmdline: "--".into(),
            initrd: None,
            boot_disk: None,
        },
        memory: config::MemoryConfig {
            size_mib: MEMORY_MIB,
            ..Default::default()
        },
        ..Default::default()
    };
    client.create(&config).unwrap();
    let start = Instant::now();
    client.boot().unwrap();
    let took = first_output(&mut child, start);
    kill(child);
    let _ = std::fs::remove_file(&socket);
    took
}

/// QEMU: started with -S, then QMP `cont` to the first guest byte.
fn qemu_boot_request(dir: &TempDir) -> Duration {
    let socket = dir.join("qmp.sock");
    let mut cmd = qemu_command("--");
    cmd.arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()));
    let mut child = spawn(cmd);
    let (stream, _) = wait_connect(&socket, Instant::now());
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    let start = Instant::now();
    writer.write_all(b"{\"execute\":\"cont\"}\n").unwrap();
    let took = first_output(&mut child, start);
    kill(child);
    let _ = std::fs::remove_file(&socket);
    took
}

/// Exec to the first guest byte.
fn exec_to_output(cmd: Command) -> Duration {
    let start = Instant::now();
    let mut child = spawn(cmd);
    let took = first_output(&mut child, start);
    kill(child);
    took
}

/// A whole life: exec, boot, print, reset (the VMM exits). Returns wall
/// time, CPU time and peak RSS of the process.
fn lifecycle(cmd: Command) -> (Duration, Duration, u64) {
    let start = Instant::now();
    let mut child = spawn(cmd);
    let pid = child.id() as libc::pid_t;
    // Drain output so the guest never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    let mut status = 0;
    // SAFETY: rusage is plain data filled by wait4 for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and usage are valid out-pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert_eq!(rc, pid, "wait4");
    let _ = drain.join();
    // Already reaped by wait4; this only tells std the child is gone.
    let _ = child.wait();
    let cpu = Duration::from_micros(
        (usage.ru_utime.tv_sec * 1_000_000
            + usage.ru_utime.tv_usec
            + usage.ru_stime.tv_sec * 1_000_000
            + usage.ru_stime.tv_usec) as u64,
    );
    (wall, cpu, usage.ru_maxrss as u64 * 1024)
}

/// RSS of `pid` minus the resident part of its guest RAM mapping (the
/// anonymous mapping of about `MEMORY_MIB`), from /proc/PID/smaps.
fn overhead_bytes(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut total_rss = 0u64;
    let mut guest_rss = 0u64;
    let mut size_kb = 0u64;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("Size:") => size_kb = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Rss:") => {
                let rss: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                total_rss += rss;
                let guest_kb = MEMORY_MIB * 1024;
                if size_kb >= guest_kb && size_kb <= guest_kb + 4096 {
                    guest_rss += rss;
                }
            }
            _ => {}
        }
    }
    (total_rss - guest_rss) * 1024
}

/// Boots, waits for `testguest: ready`, and measures the overhead.
fn steady_overhead(cmd: Command) -> u64 {
    let mut child = spawn(cmd);
    let out = child.stdout.take().unwrap();
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the guest stopped printing"
        );
        if line.contains("testguest: ready") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let overhead = overhead_bytes(child.id());
    kill(child);
    overhead
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let guest: PathBuf = testguest();
    let dir = TempDir::new("bench-boot");
    let have_qemu = have_qemu();
    let mut table = Table::new(&["figure", "ours", "QEMU 7.2 microvm", "ours/QEMU"]);

    let runs = |f: &mut dyn FnMut() -> f64| -> f64 { median((0..RUNS).map(|_| f()).collect()) };

    let ours = runs(&mut || ms(ours_api_ready(&dir)));
    let qemu = have_qemu.then(|| runs(&mut || ms(qemu_api_ready(&dir))));
    table.row_ms("exec to API ready (ms)", ours, qemu);

    let ours = runs(&mut || ms(ours_boot_request(&dir, &guest)));
    let qemu = have_qemu.then(|| runs(&mut || ms(qemu_boot_request(&dir))));
    table.row_ms("boot request to first guest output (ms)", ours, qemu);

    let ours = runs(&mut || ms(exec_to_output(ours_command(&guest, "--"))));
    let qemu = have_qemu.then(|| runs(&mut || ms(exec_to_output(qemu_command("--")))));
    table.row_ms("exec to first guest output (ms)", ours, qemu);

    let mut ours_life = Vec::new();
    let mut qemu_life = Vec::new();
    for _ in 0..RUNS {
        ours_life.push(lifecycle(ours_command(&guest, "-- reset")));
        if have_qemu {
            qemu_life.push(lifecycle(qemu_command("-- reset")));
        }
    }
    let pick = |v: &[(Duration, Duration, u64)], f: fn(&(Duration, Duration, u64)) -> f64| {
        (!v.is_empty()).then(|| median(v.iter().map(f).collect()))
    };
    table.row_ms(
        "lifecycle exec-boot-print-reset, wall (ms)",
        pick(&ours_life, |l| ms(l.0)).unwrap(),
        pick(&qemu_life, |l| ms(l.0)),
    );
    table.row_ms(
        "lifecycle, CPU time (ms)",
        pick(&ours_life, |l| ms(l.1)).unwrap(),
        pick(&qemu_life, |l| ms(l.1)),
    );
    table.row_mib(
        "lifecycle, peak RSS (MiB)",
        pick(&ours_life, |l| l.2 as f64).unwrap(),
        pick(&qemu_life, |l| l.2 as f64),
    );

    // Huge pages round the tiny guest's few touched pages up to 2 MiB: the
    // same lifecycle with them off shows what that costs.
    let small_pages: Vec<_> = (0..RUNS)
        .map(|_| {
            lifecycle(ours_command_with_memory(
                &guest,
                "-- reset",
                &format!("size={MEMORY_MIB}M,thp=off"),
            ))
        })
        .collect();
    table.row_mib(
        "lifecycle, peak RSS, ours with thp=off (MiB)",
        pick(&small_pages, |l| l.2 as f64).unwrap(),
        None,
    );

    let ours = median(
        (0..3)
            .map(|_| steady_overhead(ours_command(&guest, "--")) as f64)
            .collect(),
    );
    let qemu = have_qemu.then(|| {
        median(
            (0..3)
                .map(|_| steady_overhead(qemu_command("--")) as f64)
                .collect(),
        )
    });
    table.row_mib("VMM memory overhead: RSS minus guest RAM (MiB)", ours, qemu);

    let text = table.render();
    println!("{text}");
    let note = format!(
        "Test guest, 1 vCPU, {MEMORY_MIB} MiB, medians of {RUNS} runs (overhead: 3 runs). \
         QEMU: `-machine microvm,x-option-roms=off,rtc=off -cpu host -accel kvm`, PVH boot of the same image."
    );
    write_report("boot", &note, &text);
}
