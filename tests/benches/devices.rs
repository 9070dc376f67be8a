//! Device benchmark: virtio-blk and virtio-net, our VMM beside QEMU 7.2's
//! virtio-blk-pci / virtio-net-pci running the same test guest driver on
//! the same disk file and the same kind of tap.
//!
//! `cargo bench -p vmm-tests --bench devices` prints a table and writes
//! docs/benchmarks/devices.md. Block figures come from the guest's
//! `blk-bench` (requests timed by the guest); network throughput is what
//! the host receives on the tap from the guest's `net-bench`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::bench::{
    have_qemu, median, qemu_test_guest, write_report, ConsoleGuest, Table, QEMU,
};
use vmm_tests::harness::{field, testguest, vmm_binary, TempDir};
use vmm_tests::netns::{Netns, PacketSocket};

const RUNS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(300);
const DISK_MIB: u64 = 256;
const TAP: &str = "benchtap0";

/// One of the two peers.
#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Ours,
    Qemu,
}

/// Boots `peer` with the disk (`direct`: O_DIRECT / cache=none) and/or NIC.
fn boot(peer: Peer, disk: Option<(&Path, bool)>, tap: bool, prefix: &[&str]) -> ConsoleGuest {
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest);
            c
        }
        None => Command::new(match peer {
            Peer::Ours => vmm_binary().display().to_string(),
            Peer::Qemu => QEMU.into(),
        }),
    };
    if !prefix.is_empty() {
        cmd.arg(match peer {
            Peer::Ours => vmm_binary().display().to_string(),
            Peer::Qemu => QEMU.into(),
        });
    }
    match peer {
        Peer::Ours => {
            cmd.arg("--kernel").arg(testguest()).args([
                "--cmdline",
                GUEST_OPTIONS,
                "--cpus",
                "2",
                "--memory",
            ]);
            // DEVICES_BENCH_MEMORY: another --memory spec for ours (e.g. to
            // compare size=512M,thp=off).
            cmd.arg(std::env::var("DEVICES_BENCH_MEMORY").unwrap_or_else(|_| "size=512M".into()));
            if let Some((path, direct)) = disk {
                cmd.args([
                    "--disk",
                    &format!(
                        "path={},direct={}",
                        path.display(),
                        if direct { "on" } else { "off" }
                    ),
                ]);
            }
            if tap {
                cmd.args(["--net", &format!("tap={TAP}")]);
            }
        }
        Peer::Qemu => {
            // q35 has ECAM (at 0xb0000000) and firmware that assigns BARs.
            qemu_test_guest(
                &mut cmd,
                "q35",
                512,
                2,
                &format!("cpus=2 ecam=0xb0000000 {GUEST_OPTIONS}"),
            );
            if let Some((path, direct)) = disk {
                let cache = if direct {
                    "cache=none,aio=native"
                } else {
                    "cache=writeback"
                };
                cmd.args([
                    "-drive",
                    &format!("file={},if=none,id=d0,format=raw,{cache}", path.display()),
                ])
                .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]);
            }
            if tap {
                cmd.args([
                    "-netdev",
                    &format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
                ])
                .args(["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"]);
            }
        }
    }
    let mut guest = ConsoleGuest::spawn(cmd, TIMEOUT);
    guest.wait("testguest: ready");
    guest
}

/// The test guest's boot options on both peers: its drivers negotiate
/// EVENT_IDX and INDIRECT_DESC, as Linux's do.
const GUEST_OPTIONS: &str = "event_idx=1 indirect=1 --";

struct BlkCase {
    name: &'static str,
    command: &'static str,
    direct: bool,
    /// Which figure of `blk-bench` the table shows.
    figure: &'static str,
}

const BLK_CASES: &[BlkCase] = &[
    BlkCase {
        name: "4 KiB random read, depth 16 (IOPS)",
        command: "blk-bench kind=randread bs=4096 n=20000 depth=16",
        direct: false,
        figure: "iops",
    },
    BlkCase {
        name: "4 KiB random write, depth 16 (IOPS)",
        command: "blk-bench kind=randwrite bs=4096 n=20000 depth=16",
        direct: false,
        figure: "iops",
    },
    BlkCase {
        name: "4 KiB random read, depth 16, O_DIRECT (IOPS)",
        command: "blk-bench kind=randread bs=4096 n=5000 depth=16",
        direct: true,
        figure: "iops",
    },
    BlkCase {
        name: "1 MiB sequential read, depth 4 (MB/s)",
        command: "blk-bench kind=seqread bs=1048576 n=512 depth=4",
        direct: false,
        figure: "mbps",
    },
    BlkCase {
        name: "1 MiB sequential write, depth 4 (MB/s)",
        command: "blk-bench kind=seqwrite bs=1048576 n=512 depth=4",
        direct: false,
        figure: "mbps",
    },
];

fn blk_figure(peer: Peer, disk: &Path, case: &BlkCase) -> f64 {
    let mut guest = boot(peer, Some((disk, case.direct)), false, &[]);
    // Warm-up: the first run also brings the driver up.
    guest.run(case.command, "blk-bench:");
    let line = guest.run(case.command, "blk-bench:");
    field(&line, "errors")
        .filter(|&e| e == 0)
        .unwrap_or_else(|| panic!("errors: {line}"));
    field(&line, case.figure).unwrap_or_else(|| panic!("no {} in {line}", case.figure)) as f64
}

/// Guest-to-host throughput in Mbit/s, counted by the host on the tap.
fn net_throughput(peer: Peer, net: &Netns) -> f64 {
    const FRAMES: u64 = 100_000;
    const FRAME: u64 = 1514;
    let mut guest = boot(peer, None, true, &net.exec_prefix());
    guest.run("net-info", "net0: mac=");
    net.link_up(TAP, Duration::from_secs(10));
    let (ready, is_ready) = std::sync::mpsc::channel();
    let counter = net.spawn(move || {
        let socket = PacketSocket::bind(TAP, 0x88b5);
        ready.send(()).unwrap();
        let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
        while let Some(frame) = socket.recv(Duration::from_secs(2)) {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            bytes += frame.len() as u64;
        }
        let secs = first.map_or(1.0, |f| (last - f).as_secs_f64().max(1e-6));
        bytes as f64 * 8.0 / secs / 1e6
    });
    is_ready.recv().unwrap();
    guest.run(
        &format!("net-bench count={FRAMES} size={FRAME}"),
        "net-bench:",
    );
    counter.join().unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let have_qemu = have_qemu();
    let dir = TempDir::new("bench-devices");
    let disk = dir.join("disk.img");
    // A disk full of data, so reads read something.
    std::fs::write(&disk, vec![0x5au8; (DISK_MIB << 20) as usize]).unwrap();

    let mut table = Table::new(&["figure", "ours", "QEMU 7.2", "ours/QEMU"]);
    // DEVICES_BENCH_CASES=net (or a part of a virtio-blk case's name) runs
    // only the matching cases.
    let only = std::env::var("DEVICES_BENCH_CASES").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    for case in BLK_CASES.iter().filter(|c| wanted(c.name)) {
        let ours = median(
            (0..RUNS)
                .map(|_| blk_figure(Peer::Ours, &disk, case))
                .collect(),
        );
        let qemu = have_qemu.then(|| {
            median(
                (0..RUNS)
                    .map(|_| blk_figure(Peer::Qemu, &disk, case))
                    .collect(),
            )
        });
        table.row(vec![
            format!("virtio-blk {}", case.name),
            format!("{ours:.0}"),
            qemu.map_or("-".into(), |q| format!("{q:.0}")),
            vmm_tests::bench::ratio(ours, qemu),
        ]);
    }
    if vmm_tests::netns::available() && wanted("net") {
        let net = Netns::create("bench");
        let ours = median(
            (0..RUNS)
                .map(|_| net_throughput(Peer::Ours, &net))
                .collect(),
        );
        let qemu = have_qemu.then(|| {
            median(
                (0..RUNS)
                    .map(|_| net_throughput(Peer::Qemu, &net))
                    .collect(),
            )
        });
        table.row(vec![
            "virtio-net guest to host, 1514-byte frames (Mbit/s)".into(),
            format!("{ours:.0}"),
            qemu.map_or("-".into(), |q| format!("{q:.0}")),
            vmm_tests::bench::ratio(ours, qemu),
        ]);
    }
    let text = table.render();
    println!("{text}");
    let note = format!(
        "The test guest's own drivers on both sides, negotiating EVENT_IDX and INDIRECT_DESC as Linux's do (2 vCPUs, 512 MiB), the same {DISK_MIB} MiB disk file \
         (host page cache, or O_DIRECT / QEMU `cache=none,aio=native`), medians of {RUNS} runs after a warm-up run. \
         QEMU: `-machine q35`, `virtio-blk-pci`/`virtio-net-pci` with `disable-legacy=on`, tap without vhost \
         (no vhost-net on this host). Network: frames the host receives on the tap while the guest sends."
    );
    write_report("devices", &note, &text);
}
