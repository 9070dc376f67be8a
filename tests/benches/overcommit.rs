//! Memory overcommit benchmark: how fast balloon inflation gives memory
//! back to the host, and the host memory N identical guests use with and
//! without KSM — ours beside QEMU 7.2 (whose guest RAM is mergeable by
//! default, `mem-merge=on`).
//!
//! `cargo bench -p vmm-tests --bench overcommit` prints a table and writes
//! docs/benchmarks/overcommit.md. KSM is switched on for the run and its
//! knobs restored afterwards.

use std::process::Command;
use std::time::{Duration, Instant};

use api::http::ApiClient;
use vmm_tests::bench::{
    have_qemu, median, qemu_test_guest, ratio, write_report, ConsoleGuest, Table, QEMU,
};
use vmm_tests::harness::{overcommit_binary, pss_bytes, testguest, vmm_binary, KsmGuard, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);
const GUESTS: usize = 4;
const GUEST_MIB: u64 = 512;
const FILL_MIB: u64 = 384;
const INFLATE_MIB: u64 = 768;
const MIB: f64 = (1u64 << 20) as f64;

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Inflation speed: MiB/s from the target request until the VMM's RSS has
/// dropped by the inflated amount.
fn inflation_speed(dir: &TempDir) -> f64 {
    let socket = dir.join("balloon.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--kernel")
        .arg(testguest())
        .args([
            "--cmdline",
            &format!(
                "-- memfill pattern=77 mib={}; balloon-follow",
                INFLATE_MIB + 64
            ),
        ])
        .args([
            "--memory",
            "size=1G",
            "--balloon",
            "target_mib=0",
            "--api-socket",
        ])
        .arg(&socket);
    let mut guest = ConsoleGuest::spawn(cmd, TIMEOUT);
    guest.wait("balloon: ready");
    let pid = guest.child.id();
    let before = rss_bytes(pid);
    let start = Instant::now();
    ApiClient::new(&socket).balloon(INFLATE_MIB).unwrap();
    guest.wait("balloon: actual=");
    let goal = before.saturating_sub((INFLATE_MIB << 20) * 9 / 10);
    while rss_bytes(pid) > goal {
        assert!(start.elapsed() < TIMEOUT, "RSS never fell");
        std::thread::sleep(Duration::from_millis(2));
    }
    INFLATE_MIB as f64 / start.elapsed().as_secs_f64()
}

/// Summed PSS of `GUESTS` guests that filled `FILL_MIB` with the same
/// pattern, once KSM has had time to merge them.
fn identical_guests_pss(peer: &str, mergeable: bool) -> f64 {
    let mut guests: Vec<ConsoleGuest> = (0..GUESTS)
        .map(|_| {
            let commands = format!("memfill pattern=5eedf00d mib={FILL_MIB}");
            let cmd = if peer == "ours" {
                let mut c = Command::new(vmm_binary());
                c.arg("--kernel")
                    .arg(testguest())
                    .args(["--cmdline", &format!("-- {commands}")])
                    .args([
                        "--memory",
                        &format!(
                            "size={GUEST_MIB}M,mergeable={}",
                            if mergeable { "on" } else { "off" }
                        ),
                    ]);
                c
            } else {
                let mut c = Command::new(QEMU);
                qemu_test_guest(
                    &mut c,
                    &format!(
                        "microvm,x-option-roms=off,rtc=off,isa-serial=on,mem-merge={}",
                        if mergeable { "on" } else { "off" }
                    ),
                    GUEST_MIB,
                    1,
                    &format!("-- {commands}"),
                );
                c
            };
            ConsoleGuest::spawn(cmd, TIMEOUT)
        })
        .collect();
    for g in &mut guests {
        g.wait("memfill: done");
    }
    // Let KSM scan everything (it has been told to go fast), then a bit more.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = u64::MAX;
    let total = loop {
        std::thread::sleep(Duration::from_secs(2));
        let total: u64 = guests.iter().map(|g| pss_bytes(g.child.id())).sum();
        if !mergeable || total.abs_diff(last) < 2 << 20 || Instant::now() > deadline {
            break total;
        }
        last = total;
    };
    for g in &mut guests {
        g.send("poweroff");
    }
    total as f64
}

/// How fast `vmm-overcommit` reacts (the scenario of the policy test in
/// tests/tests/overcommit.rs): three 192 MiB guests that touched their
/// memory, a simulated host of 520 MiB that must keep 100 MiB available,
/// rounds every 100 ms. Returns (ms until the host target first holds,
/// ms from a guest asking for 116 MiB more until the policy's first
/// deflation of it, ms until the guest has them).
fn policy_reaction(dir: &TempDir) -> (f64, f64, f64) {
    let sockets = dir.join("policy");
    let _ = std::fs::remove_dir_all(&sockets);
    std::fs::create_dir(&sockets).unwrap();
    let mut guests: Vec<ConsoleGuest> = (0..3)
        .map(|i| {
            let mut cmd = Command::new(vmm_binary());
            cmd.arg("--kernel")
                .arg(testguest())
                .args([
                    "--cmdline",
                    "-- memfill pattern=5a mib=176; balloon-follow; memuse mib=24",
                    "--memory",
                    "size=192M",
                    "--balloon",
                    "stats_interval_s=1",
                    "--api-socket",
                ])
                .arg(sockets.join(format!("g{i}.sock")));
            let mut guest = ConsoleGuest::spawn(cmd, TIMEOUT);
            guest.wait("memuse: used=24 target=24");
            guest
        })
        .collect();
    let resident = |guests: &[ConsoleGuest]| -> u64 {
        guests.iter().map(|g| rss_bytes(g.child.id())).sum::<u64>() >> 20
    };
    let log = dir.join("policy.log");
    let mut policy = Command::new(overcommit_binary())
        .arg("--socket-dir")
        .arg(&sockets)
        .args([
            "--interval-ms",
            "100",
            "--host-memory-mib",
            "520",
            "--host-target-mib",
            "100",
            "--hysteresis-mib",
            "32",
            "--guest-margin-mib",
            "24",
            "--step-mib",
            "32",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while resident(&guests) > 420 {
        assert!(start.elapsed() < TIMEOUT, "the policy never reclaimed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let reclaimed = start.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_secs(3));
    let logged = std::fs::read_to_string(&log).unwrap().len();
    let start = Instant::now();
    guests[0].send("memuse mib=140");
    let mut first = None;
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if first.is_none() && text[logged..].contains("deflate g0:") {
            first = Some(start.elapsed().as_secs_f64() * 1e3);
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "the policy never deflated g0");
        std::thread::sleep(Duration::from_millis(2));
    }
    guests[0].wait("memuse: used=140 target=140");
    let fed = start.elapsed().as_secs_f64() * 1e3;
    let _ = policy.kill();
    let _ = policy.wait();
    for g in &mut guests {
        g.send("poweroff");
    }
    (reclaimed, first.unwrap(), fed)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = TempDir::new("bench-overcommit");
    let have_qemu = have_qemu();
    let mut table = Table::new(&["figure", "ours", "QEMU 7.2", "ours/QEMU"]);

    let speed = median((0..3).map(|_| inflation_speed(&dir)).collect());
    table.row(vec![
        format!("balloon inflation of {INFLATE_MIB} MiB, memory back to the host (MiB/s)"),
        format!("{speed:.0}"),
        "-".into(),
        "-".into(),
    ]);

    let runs: Vec<(f64, f64, f64)> = (0..3).map(|_| policy_reaction(&dir)).collect();
    for (name, pick) in [
        (
            "vmm-overcommit: 3 guests overcommit a 520 MiB host by 130 MiB, until 100 MiB are available again (ms)",
            0,
        ),
        (
            "vmm-overcommit: a guest asks for 116 MiB more than it has outside its balloon, until the first deflation (ms)",
            1,
        ),
        (
            "vmm-overcommit: ... until the guest has the memory (ms)",
            2,
        ),
    ] {
        let values = runs
            .iter()
            .map(|r| [r.0, r.1, r.2][pick])
            .collect::<Vec<f64>>();
        table.row(vec![
            name.into(),
            format!("{:.0}", median(values)),
            "-".into(),
            "-".into(),
        ]);
    }

    let _ksm = match KsmGuard::start(20_000, 10) {
        Ok(guard) => Some(guard),
        Err(e) => {
            eprintln!("SKIP KSM rows: {e}");
            None
        }
    };
    if _ksm.is_some() {
        for mergeable in [false, true] {
            let ours = identical_guests_pss("ours", mergeable);
            let qemu = have_qemu.then(|| identical_guests_pss("qemu", mergeable));
            table.row(vec![
                format!(
                    "{GUESTS} guests x {FILL_MIB} MiB identical pages, KSM {}: summed PSS (MiB)",
                    if mergeable {
                        "merging"
                    } else {
                        "off for guest RAM"
                    }
                ),
                format!("{:.0}", ours / MIB),
                qemu.map_or("-".into(), |q| format!("{:.0}", q / MIB)),
                ratio(ours, qemu),
            ]);
        }
    }
    let text = table.render();
    println!("{text}");
    let note = format!(
        "Inflation: the test guest's balloon driver gives back {INFLATE_MIB} MiB of filled memory of a 1 GiB \
         guest; time from `vm.balloon` until the VMM's RSS fell by 90% of that (median of 3). KSM: \
         {GUESTS} guests of {GUEST_MIB} MiB each filling {FILL_MIB} MiB with the same pattern, KSM running \
         with pages_to_scan=20000 and sleep_millisecs=10 for the benchmark; ours `mergeable=on|off`, QEMU \
         `-machine microvm,mem-merge=on|off`. PSS counts a merged page once across the processes sharing it. \
         vmm-overcommit: rounds every 100 ms, guests' balloon statistics every second, steps of 32 MiB, \
         guest margin 24 MiB (median of 3); the guest's statistics interval dominates its reaction."
    );
    write_report("overcommit", &note, &text);
}
