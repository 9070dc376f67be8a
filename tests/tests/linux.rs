//! Linux's own drivers on our devices, on every host: the project's test
//! kernel (Debian's linux-source-6.12 with three workarounds for hosts whose
//! KVM emulates guest ring 0, resources/linux/build-test-kernel.sh) and a
//! busybox initramfs whose /init runs the commands the test types on the
//! console (resources/linux/test-init.sh).
//!
//! Every boot costs one to two minutes of emulated kernel here, so two
//! guests carry all the checks, each driven through many of them, and run
//! side by side (two guests on this two-core machine at most):
//! - `linux_drives_every_device_of_ours_and_powers_off_on_the_button`: 2 vCPUs,
//!   the vmlinux through PVH; PCI, MSI-X, ACPI, virtio-blk (file, read-only,
//!   loop device), virtio-net, virtio-balloon, pause/resume, vm.info and
//!   counters, then vm.shutdown.
//! - `linux_migrates_during_boot_and_while_running_with_memory_tcp_clock_and_disk_intact`:
//!   1 vCPU, the bzImage; migrated during its boot and again while a memory
//!   pattern loop and a TCP connection run, then reset through reboot=k.
//!
//! Each check prints `ok: ...` with what it saw; a failure names the property.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use api::http::ApiClient;
use api::request::{MigrationParameters, MigrationPhase, ShutdownRequest, VmState};
use vmm_tests::harness::{LoopDevice, TempDir};
use vmm_tests::linux::{
    self, deadline, is_hole, read_range, sha256_hex, LinuxVm, Output, TestKernel, CMDLINE,
};
use vmm_tests::migration as mig;
use vmm_tests::netns::{self, Netns};
use vmm_tests::require_kvm;

const EXIT_POWERED_OFF: i32 = 0;
const EXIT_RESET: i32 = 3;
const MIB: u64 = 1 << 20;

/// The test kernel, or None (SKIP printed) where it cannot be built.
fn kernel_or_skip() -> Option<&'static TestKernel> {
    // The ring-0 speed sets every deadline: measured before any guest runs.
    linux::ring0();
    match linux::test_kernel() {
        Ok(kernel) => Some(kernel),
        Err(why) => {
            eprintln!("SKIP: {why}");
            None
        }
    }
}

fn ok(what: &str) {
    eprintln!("ok: {what}");
}

/// `n` random bytes from the host's /dev/urandom.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

fn counter(api: &ApiClient, component: &str, name: &str) -> u64 {
    api.counters()
        .expect("vm.counters")
        .get(component)
        .and_then(|c| c.get(name))
        .copied()
        .unwrap_or_else(|| panic!("no counter {component}.{name}"))
}

/// The SHA-256 sums a command printed (`sha256sum` lines), in order.
fn sums(output: &Output) -> Vec<String> {
    output
        .lines
        .iter()
        .filter_map(|l| {
            let (sum, _) = l.split_once("  ")?;
            (sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit())).then(|| sum.to_string())
        })
        .collect()
}

/// `MemTotal` in kB from a command's output.
fn mem_total_kb(output: &Output) -> u64 {
    output
        .value("MemTotal:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {output:?}"))
}

/// A TCP listener inside `net` (bound there, usable from any thread).
fn listen_in(net: &Netns, address: &'static str) -> TcpListener {
    net.run(move || TcpListener::bind(address).unwrap_or_else(|e| panic!("bind {address}: {e}")))
}

/// Accepts one connection within `timeout`.
fn accept_within(listener: &TcpListener, timeout: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let end = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(timeout)).unwrap();
                stream.set_write_timeout(Some(timeout)).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "no connection within {timeout:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn ip_in(net: &Netns, args: &[&str]) {
    let mut all = vec!["-n", &net.name];
    all.extend_from_slice(args);
    netns::ip(&all);
}

/// `ping` from the host side (inside `net`) to `address`: (sent, received).
fn host_ping(net: &Netns, address: &str, count: u32) -> (u32, u32, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &net.name, "ping", "-c", &count.to_string()])
        .args(["-i", "0.5", "-W", "20", address])
        .output()
        .expect("ping (iputils-ping) runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (sent, received) = ping_counts(&text);
    (sent, received, text)
}

/// `N packets transmitted, M (packets) received` of ping's summary.
fn ping_counts(text: &str) -> (u32, u32) {
    let line = text
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or_default();
    let numbers: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (
        numbers.first().copied().unwrap_or(0),
        numbers.get(1).copied().unwrap_or(0),
    )
}

fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Every virtio feature bit set in a `/sys/bus/virtio/devices/*/features`
/// string (character i is bit i).
fn feature_bits(text: &str) -> u64 {
    text.bytes()
        .take(64)
        .enumerate()
        .filter(|(_, b)| *b == b'1')
        .fold(0, |acc, (i, _)| acc | 1 << i)
}

// virtio feature bits Linux's drivers negotiate (virtio spec 1.2).
const NET_F_CSUM: u32 = 0;
const NET_F_GUEST_CSUM: u32 = 1;
const NET_F_GUEST_TSO4: u32 = 7;
const NET_F_HOST_TSO4: u32 = 11;
const NET_F_MRG_RXBUF: u32 = 15;
const F_RING_INDIRECT_DESC: u32 = 28;
const F_RING_EVENT_IDX: u32 = 29;
const F_VERSION_1: u32 = 32;
const BLK_F_FLUSH: u32 = 9;
const BLK_F_DISCARD: u32 = 13;
const BLK_F_WRITE_ZEROES: u32 = 14;
const BLK_F_RO: u32 = 5;
const BALLOON_F_STATS_VQ: u32 = 1;

/// One PCI function as sysfs shows it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PciFunction {
    vendor: String,
    device: String,
    class: String,
}

/// The first command: what Linux enumerated and bound.
const ENUMERATE: &str = "cd /sys/bus/pci/devices && for d in *; do read v < $d/vendor; \
    read p < $d/device; read c < $d/class; echo pci $d $v $p $c; done; \
    cd /sys/bus/virtio/devices && for d in *; do read i < $d/device; read f < $d/features; \
    echo virtio $d $i $f; done; \
    for d in /sys/bus/virtio/drivers/*/virtio*; do echo bound $d; done; \
    for d in /sys/bus/pci/drivers/*/0000:*; do echo pcidrv $d; done; \
    for b in vda vdb vdc; do read s < /sys/block/$b/serial; read r < /sys/block/$b/ro; \
    read n < /sys/block/$b/size; echo disk $b serial=$s ro=$r sectors=$n; done; \
    grep -E 'MSI|IO-APIC' /proc/interrupts";

/// Linux on our VMM with 2 vCPUs and every kind of device: what its own
/// drivers make of them, then a graceful shutdown through the power button.
#[test]
fn linux_drives_every_device_of_ours_and_powers_off_on_the_button() {
    require_kvm!();
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    if !netns::available() {
        return;
    }
    let dir = TempDir::new("linux-dev");
    let net = Netns::create("lnxd");
    const TAP: &str = "lnxdtap0";
    let disk = dir.join("disk.img");
    sparse_file(&disk, 64 * MIB);
    let ro_disk = dir.join("ro.img");
    let ro_content = random_bytes(4 << 20);
    std::fs::write(&ro_disk, &ro_content).unwrap();
    let loop_file = dir.join("loop.img");
    sparse_file(&loop_file, 32 * MIB);
    let Some(loop_dev) = LoopDevice::attach(&loop_file) else {
        return;
    };
    let api_socket = dir.join("api.sock");
    let cmdline = format!("{CMDLINE} ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off");
    let args: Vec<String> = [
        "--kernel",
        kernel.vmlinux.to_str().unwrap(),
        "--initrd",
        kernel.initramfs.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--cpus",
        "2",
        "--memory",
        "size=256M",
        "--disk",
        &format!("path={},serial=lnx-serial-0", disk.display()),
        "--disk",
        &format!("path={},readonly=on", ro_disk.display()),
        "--disk",
        &format!("path={},direct=on", loop_dev.device.display()),
        "--net",
        &format!("tap={TAP},mac=52:54:00:12:34:56"),
        "--balloon",
        "stats_interval_s=1",
        "--api-socket",
        api_socket.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = LinuxVm::spawn(&net.exec_prefix(), &args);
    net.link_up(TAP, Duration::from_secs(20));
    ip_in(&net, &["addr", "add", "10.0.2.1/24", "dev", TAP]);
    let api = vm.vmm.api();

    // --- 1. boot: init with both vCPUs, PCI, MSI-X, ACPI --------------------------------------
    let init = vm.wait_init();
    assert_eq!(init.release, kernel.release, "{}", init.line);
    assert_eq!(init.cpus, 2, "both vCPUs online: {}", init.line);
    ok(&format!(
        "Linux {} reached /init with 2 CPUs after {:.1} s (guest uptime {} s)",
        init.release,
        vm.secs(),
        init.uptime_s
    ));
    vm.wait_ready();
    let found = vm.run(ENUMERATE);
    check_pci(&found);
    let features = check_virtio_binding(&found);
    check_msix(&found, &features);
    check_disks_seen(&found);
    check_kernel_log(&vm);

    // --- 2. virtio-blk ------------------------------------------------------------------------
    check_blk_data(&mut vm, &api, &disk);
    check_blk_discard_and_zeroes(&mut vm, &api, &disk);
    check_blk_read_only(&mut vm, &ro_disk, &ro_content);
    check_blk_loop(&mut vm, &loop_file);

    // --- 3. virtio-net ------------------------------------------------------------------------
    check_net(&mut vm, &net, TAP, features.net);

    // --- 4. virtio-balloon --------------------------------------------------------------------
    check_balloon(&mut vm, &api);

    // --- 5. lifecycle -------------------------------------------------------------------------
    check_pause_resume(&mut vm, &api);
    check_info_and_counters(&api, &disk);
    // A second look at the interrupts: the queues' MSI-X vectors counted the I/O.
    let after = vm.run_ok("grep -E 'virtio' /proc/interrupts");
    check_queue_interrupts(&after);
    check_kernel_log(&vm);

    api.shutdown(&ShutdownRequest::default())
        .expect("vm.shutdown");
    vm.wait("linux-test: power-button", deadline(linux::COMMAND));
    vm.wait("linux-test: shutdown poweroff", deadline(linux::COMMAND));
    let code = vm.vmm.exit_code(deadline(linux::COMMAND));
    assert_eq!(
        code,
        EXIT_POWERED_OFF,
        "vm.shutdown: Linux powered off (ACPI S5)\n{}",
        vm.vmm.report()
    );
    ok(&format!(
        "vm.shutdown: acpid saw the power button, Linux powered off, vmm exited 0 ({:.1} s in all)",
        vm.secs()
    ));
    // Nothing reached the read-only disk's file, even through the whole run.
    assert_eq!(std::fs::read(&ro_disk).unwrap(), ro_content);
}

fn check_pci(found: &Output) {
    let mut functions: Vec<PciFunction> = found
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("pci "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(w.len(), 4, "pci line {l:?}");
            PciFunction {
                vendor: w[1].into(),
                device: w[2].into(),
                class: w[3].into(),
            }
        })
        .collect();
    functions.sort();
    let f = |vendor: &str, device: &str, class: &str| PciFunction {
        vendor: vendor.into(),
        device: device.into(),
        class: class.into(),
    };
    let mut expected = vec![
        // The host bridge.
        f("0x8086", "0x0d57", "0x060000"),
        // Three virtio-blk (modern: 0x1040 + type 2), mass storage.
        f("0x1af4", "0x1042", "0x018000"),
        f("0x1af4", "0x1042", "0x018000"),
        f("0x1af4", "0x1042", "0x018000"),
        // virtio-net, network controller.
        f("0x1af4", "0x1041", "0x020000"),
        // virtio-balloon.
        f("0x1af4", "0x1045", "0x050000"),
    ];
    expected.sort();
    assert_eq!(
        functions,
        expected,
        "PCI enumeration by Linux:\n{}",
        found.text()
    );
    ok("PCI: Linux enumerated the host bridge, 3 virtio-blk, virtio-net, virtio-balloon with the expected vendor, device and class IDs");
}

/// The features Linux's drivers negotiated, per device kind.
#[derive(Default)]
struct Negotiated {
    blk: Vec<u64>,
    net: u64,
    balloon: u64,
}

fn check_virtio_binding(found: &Output) -> Negotiated {
    let bound: Vec<&str> = found
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("bound /sys/bus/virtio/drivers/"))
        .collect();
    let pci_bound: Vec<&str> = found
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("pcidrv /sys/bus/pci/drivers/"))
        .collect();
    assert_eq!(
        pci_bound
            .iter()
            .filter(|l| l.starts_with("virtio-pci/"))
            .count(),
        5,
        "virtio_pci bound every virtio function:\n{}",
        found.text()
    );
    let mut negotiated = Negotiated::default();
    for line in found.lines.iter().filter_map(|l| l.strip_prefix("virtio ")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w.len(), 3, "virtio line {line:?}");
        let (name, id, bits) = (w[0], w[1], feature_bits(w[2]));
        let driver = match id {
            "0x0001" => "virtio_net",
            "0x0002" => "virtio_blk",
            "0x0005" => "virtio_balloon",
            other => panic!("unexpected virtio device id {other} ({line})"),
        };
        assert!(
            bound.contains(&format!("{driver}/{name}").as_str()),
            "{driver} bound {name}:\n{}",
            found.text()
        );
        assert_ne!(bits & 1 << F_VERSION_1, 0, "{name}: VERSION_1 (modern)");
        match driver {
            "virtio_net" => negotiated.net = bits,
            "virtio_blk" => negotiated.blk.push(bits),
            _ => negotiated.balloon = bits,
        }
        eprintln!("          {driver} on {name}: features {bits:#x}");
    }
    assert_eq!(negotiated.blk.len(), 3, "{}", found.text());
    assert_ne!(negotiated.net, 0, "{}", found.text());
    assert_ne!(negotiated.balloon, 0, "{}", found.text());
    // The read-only disk offers neither DISCARD nor WRITE_ZEROES.
    for blk in negotiated.blk.iter().filter(|f| *f & 1 << BLK_F_RO == 0) {
        for (bit, what) in [
            (BLK_F_FLUSH, "FLUSH"),
            (BLK_F_DISCARD, "DISCARD"),
            (BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        ] {
            assert_ne!(blk & 1 << bit, 0, "virtio_blk negotiated {what}: {blk:#x}");
        }
    }
    assert!(
        negotiated.blk.iter().any(|f| f & 1 << BLK_F_RO != 0),
        "the read-only disk offers RO"
    );
    for (bit, what) in [
        (NET_F_CSUM, "CSUM"),
        (NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (NET_F_HOST_TSO4, "HOST_TSO4"),
        (NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (F_RING_EVENT_IDX, "RING_EVENT_IDX"),
        (F_RING_INDIRECT_DESC, "RING_INDIRECT_DESC"),
    ] {
        assert_ne!(
            negotiated.net & 1 << bit,
            0,
            "virtio_net negotiated {what}: {:#x}",
            negotiated.net
        );
    }
    assert_ne!(
        negotiated.balloon & 1 << BALLOON_F_STATS_VQ,
        0,
        "virtio_balloon negotiated STATS_VQ"
    );
    ok("virtio_pci, virtio_blk (x3), virtio_net and virtio_balloon bound; modern devices with FLUSH, DISCARD, WRITE_ZEROES, RO, checksum and TSO offloads, mergeable buffers, event index, indirect descriptors, balloon statistics");
    negotiated
}

fn check_msix(found: &Output, _features: &Negotiated) {
    let msix: Vec<&String> = found
        .lines
        .iter()
        .filter(|l| l.contains("PCI-MSIX"))
        .collect();
    for n in 0..5 {
        let config = format!("virtio{n}-config");
        assert!(
            msix.iter().any(|l| l.trim_end().ends_with(&config)),
            "virtio{n}'s config interrupt is an MSI-X vector:\n{}",
            found.text()
        );
    }
    // Per-queue vectors for the request queues (vp_find_vqs_msix with one
    // vector per queue: the first thing virtio_pci tries).
    for name in ["-req.0", "-input.0", "-output.0"] {
        assert!(
            msix.iter().any(|l| l.contains(name)),
            "a per-queue MSI-X vector {name}:\n{}",
            found.text()
        );
    }
    ok(&format!(
        "MSI-X: {} vectors (a config vector per device and one per queue)",
        msix.len()
    ));
}

/// After the I/O: the queues' vectors counted interrupts.
fn check_queue_interrupts(found: &Output) {
    for name in ["-req.0", "-input.0", "-output.0"] {
        let total: u64 = found
            .lines
            .iter()
            .filter(|l| l.contains("PCI-MSIX") && l.contains(name))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .take_while(|w| w.bytes().all(|b| b.is_ascii_digit()))
                    .filter_map(|w| w.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum();
        assert!(
            total > 0,
            "interrupts on the {name} queues' MSI-X vectors:\n{}",
            found.text()
        );
    }
    ok("the request, receive and transmit queues' MSI-X vectors took interrupts");
}

fn check_disks_seen(found: &Output) {
    let disk = |name: &str| {
        found
            .value(&format!("disk {name} "))
            .unwrap_or_else(|| panic!("no line for {name}:\n{}", found.text()))
            .to_string()
    };
    let vda = disk("vda");
    assert!(
        vda.contains("serial=lnx-serial-0 ")
            && vda.contains("ro=0")
            && vda.contains("sectors=131072"),
        "vda: serial, writable, 64 MiB: {vda}"
    );
    let vdb = disk("vdb");
    assert!(
        vdb.contains("ro=1") && vdb.contains("sectors=8192"),
        "vdb: read-only, 4 MiB: {vdb}"
    );
    let vdc = disk("vdc");
    assert!(
        vdc.contains("ro=0") && vdc.contains("sectors=65536"),
        "vdc (loop device): 32 MiB: {vdc}"
    );
    ok("/sys/block: vda has the configured serial, vdb is read-only, sizes as configured (file and loop device)");
}

/// Lines of the kernel log that would mean our devices or tables are wrong.
fn check_kernel_log(vm: &LinuxVm) {
    let complaints = vm.kernel_complaints();
    assert!(
        complaints.is_empty(),
        "the kernel complained about our machine:\n{}\n{}",
        complaints.join("\n"),
        vm.vmm.report()
    );
    ok("kernel log: no ACPI errors or warnings, no firmware bugs, no failed probes, no traces");
}

fn check_blk_data(vm: &mut LinuxVm, api: &ApiClient, disk: &Path) {
    let flushes = counter(api, "disk0", "flush_ops");
    // A 1 MiB random pattern: through the page cache with fsync at 0, with
    // O_DIRECT at 2 MiB, and at 4, 6 and 8 MiB for the discard and
    // write-zeroes checks; then read back past the page cache.
    let out = vm.run_ok(
        "linux-test-helper pattern 1 1 > /tmp/p && sha256sum /tmp/p && \
         dd if=/tmp/p of=/dev/vda bs=64k conv=fsync 2>/dev/null && \
         dd if=/tmp/p of=/dev/vda bs=64k seek=32 oflag=direct conv=fsync 2>/dev/null && \
         for at in 64 96 128; do dd if=/tmp/p of=/dev/vda bs=64k seek=$at conv=fsync 2>/dev/null; done && \
         echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vda bs=64k count=16 2>/dev/null | sha256sum && \
         dd if=/dev/vda bs=64k skip=32 count=16 iflag=direct 2>/dev/null | sha256sum",
    );
    let s = sums(&out);
    assert_eq!(s.len(), 3, "three sums:\n{}", out.text());
    assert_eq!(s[1], s[0], "read back through the page cache");
    assert_eq!(s[2], s[0], "read back with O_DIRECT");
    for at in [0, 2, 4, 6, 8] {
        assert_eq!(
            sha256_hex(&read_range(disk, at * MIB, MIB as usize)),
            s[0],
            "the host file at {at} MiB holds what the guest wrote"
        );
    }
    let flushes_after = counter(api, "disk0", "flush_ops");
    assert!(
        flushes_after > flushes,
        "fsync sent FLUSH to the device: flush_ops {flushes} -> {flushes_after}"
    );
    ok(&format!(
        "virtio-blk: 1 MiB written with fsync through the page cache and with O_DIRECT, read back in the guest, byte for byte in the host file; FLUSH reached the host (flush_ops {flushes} -> {flushes_after})"
    ));
}

fn check_blk_discard_and_zeroes(vm: &mut LinuxVm, api: &ApiClient, disk: &Path) {
    let discards = counter(api, "disk0", "discard_ops");
    let zeroes = counter(api, "disk0", "write_zeroes_ops");
    // blkdiscard (DISCARD) at 4 MiB; BLKZEROOUT (WRITE_ZEROES, no unmap) at
    // 6 MiB; fallocate(PUNCH_HOLE) on the device (WRITE_ZEROES with unmap)
    // at 8 MiB. The guest then reads 4-9 MiB: all zeroes.
    let out = vm.run_ok(
        "blkdiscard -o 4194304 -l 1048576 /dev/vda && \
         linux-test-helper zeroout /dev/vda 6291456 1048576 && \
         linux-test-helper punch /dev/vda 8388608 1048576 && \
         dd if=/dev/vda bs=64k skip=64 count=80 iflag=direct 2>/dev/null | sha256sum",
    );
    let zero_sum = sha256_hex(&vec![0u8; 5 * MIB as usize]);
    assert_eq!(sums(&out), [zero_sum], "the guest reads zeroes back");
    assert!(
        is_hole(disk, 4 * MIB, MIB),
        "DISCARD punched a hole in the host file"
    );
    assert!(
        read_range(disk, 6 * MIB, MIB as usize)
            .iter()
            .all(|&b| b == 0),
        "WRITE_ZEROES zeroed the host file"
    );
    assert!(
        is_hole(disk, 8 * MIB, MIB),
        "WRITE_ZEROES with unmap punched a hole in the host file"
    );
    let discards_after = counter(api, "disk0", "discard_ops");
    let zeroes_after = counter(api, "disk0", "write_zeroes_ops");
    assert!(discards_after > discards, "discard_ops counted");
    assert!(zeroes_after >= zeroes + 2, "write_zeroes_ops counted");
    ok(&format!(
        "virtio-blk: blkdiscard and write-zeroes (with and without unmap) became holes and zeroes in the host file (discard_ops +{}, write_zeroes_ops +{})",
        discards_after - discards,
        zeroes_after - zeroes
    ));
}

fn check_blk_read_only(vm: &mut LinuxVm, ro_disk: &Path, content: &[u8]) {
    let out = vm.run(
        "dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct; echo write-rc=$?; \
         dd if=/dev/vdb bs=64k count=64 2>/dev/null | sha256sum",
    );
    assert!(
        out.value("write-rc=").is_some_and(|rc| rc != "0"),
        "the write to the read-only disk failed in the guest:\n{}",
        out.text()
    );
    assert_eq!(sums(&out), [sha256_hex(content)], "vdb reads the host file");
    assert_eq!(std::fs::read(ro_disk).unwrap(), content);
    let why = out
        .lines
        .iter()
        .find(|l| l.contains("dd:"))
        .cloned()
        .unwrap_or_default();
    ok(&format!(
        "virtio-blk read-only: the guest's write failed ({}), the guest reads the host file, which is unchanged",
        why.trim()
    ));
}

fn check_blk_loop(vm: &mut LinuxVm, loop_file: &Path) {
    let out = vm.run_ok(
        "linux-test-helper pattern 1 2 > /tmp/l && sha256sum /tmp/l && \
         dd if=/tmp/l of=/dev/vdc bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null && \
         dd if=/dev/vdc bs=64k skip=16 count=16 iflag=direct 2>/dev/null | sha256sum",
    );
    let s = sums(&out);
    assert_eq!(s.len(), 2, "{}", out.text());
    assert_eq!(s[1], s[0], "read back from the loop-device disk");
    assert_eq!(
        sha256_hex(&read_range(loop_file, MIB, MIB as usize)),
        s[0],
        "the loop device's backing file holds the data"
    );
    ok("virtio-blk on a loop device (direct=on): written, read back, in the backing file");
}

fn check_net(vm: &mut LinuxVm, net: &Netns, tap: &'static str, features: u64) {
    // Guest to host, then host to guest while the guest waits at its prompt.
    let out = vm.run("ping -c 3 -i 0.5 -W 20 10.0.2.1");
    let (sent, received) = ping_counts(&out.text());
    assert_eq!(
        (sent, received),
        (3, 3),
        "the guest pings the host:\n{}",
        out.text()
    );
    let (host_sent, host_received, text) = host_ping(net, "10.0.2.15", 3);
    assert_eq!(
        (host_sent, host_received),
        (3, 3),
        "the host pings the guest:\n{text}"
    );
    ok("virtio-net: the guest pings the host 3/3, the host pings the guest 3/3");

    // TCP, 4 MiB each way, checked on both ends (by the helper: busybox nc
    // moves 1 KiB per system call, which takes minutes here).
    let to_host = listen_in(net, "10.0.2.1:5001");
    let to_guest = listen_in(net, "10.0.2.1:5002");
    let payload = random_bytes(4 << 20);
    let payload_sum = sha256_hex(&payload);
    let timeout = deadline(linux::COMMAND);
    let receiver = std::thread::spawn(move || {
        let mut stream = accept_within(&to_host, timeout);
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("the guest's stream");
        got
    });
    let sender = std::thread::spawn(move || {
        let mut stream = accept_within(&to_guest, timeout);
        stream.write_all(&payload).expect("the stream to the guest");
    });
    let out = vm.run_ok(
        "linux-test-helper pattern 4 3 > /tmp/t && sha256sum /tmp/t && \
         linux-test-helper tcp-send 10.0.2.1 5001 /tmp/t && \
         linux-test-helper tcp-recv 10.0.2.1 5002 /tmp/r && sha256sum /tmp/r",
    );
    let got = receiver.join().unwrap();
    sender.join().unwrap();
    let s = sums(&out);
    assert_eq!(s.len(), 2, "{}", out.text());
    assert_eq!(got.len(), 4 << 20, "bytes from the guest");
    assert_eq!(sha256_hex(&got), s[0], "guest to host: checksums match");
    assert_eq!(s[1], payload_sum, "host to guest: checksums match");
    ok("virtio-net: 4 MiB over TCP each way, SHA-256 equal on both ends");

    // The offloads the guest took are on the tap: the host hands it
    // partially checksummed and segmentation-offloaded frames.
    let (csum, tso) = netns::tap_offloads(net, tap);
    assert_eq!(
        (csum, tso),
        (
            features & 1 << NET_F_GUEST_CSUM != 0,
            features & 1 << NET_F_GUEST_TSO4 != 0
        ),
        "the tap's tx-checksumming and TSO follow the guest's GUEST_CSUM and GUEST_TSO4 ({features:#x})"
    );
    ok(&format!(
        "virtio-net offloads: Linux negotiated GUEST_CSUM and GUEST_TSO4, the tap has tx-checksumming={csum} tcp-segmentation-offload={tso}"
    ));
}

fn check_balloon(vm: &mut LinuxVm, api: &ApiClient) {
    // Touch 96 MiB so that the free pages the balloon takes are resident in
    // the host: only then can inflating give host memory back.
    let before = vm.run_ok("linux-test-helper fill 96 && grep MemTotal /proc/meminfo");
    let total = mem_total_kb(&before);
    let rss_before = vm.vmm.rss_bytes();
    let stats = wait_balloon(api, "statistics from the guest", |s| {
        s.total_memory.is_some() && s.free_memory.is_some()
    });
    let reported_total = stats.total_memory.unwrap();
    assert!(
        reported_total.abs_diff(total * 1024) <= 4 * MIB,
        "vm.balloon-statistics total_memory {reported_total} is the guest's MemTotal {total} kB"
    );
    ok(&format!(
        "virtio-balloon statistics: total {} MiB, free {} MiB, available {:?}, major faults {:?}",
        reported_total / MIB,
        stats.free_memory.unwrap() / MIB,
        stats.available_memory.map(|b| b / MIB),
        stats.major_faults
    ));

    const TARGET_MIB: u64 = 64;
    api.balloon(TARGET_MIB).expect("vm.balloon");
    wait_balloon(api, "the balloon inflated", |s| s.actual_mib == TARGET_MIB);
    let inflated = vm.run_ok("grep MemTotal /proc/meminfo");
    let total_inflated = mem_total_kb(&inflated);
    let rss_inflated = vm.vmm.rss_bytes();
    assert_eq!(
        total - total_inflated,
        TARGET_MIB * 1024,
        "MemTotal fell by the balloon ({total} -> {total_inflated} kB)"
    );
    assert!(
        rss_inflated + 32 * MIB <= rss_before,
        "host RSS fell by a good part of the balloon: {} -> {} MiB",
        rss_before / MIB,
        rss_inflated / MIB
    );
    api.balloon(0).expect("vm.balloon 0");
    wait_balloon(api, "the balloon deflated", |s| s.actual_mib == 0);
    let deflated = vm.run_ok("grep MemTotal /proc/meminfo");
    assert_eq!(
        mem_total_kb(&deflated),
        total,
        "deflating gave the memory back"
    );
    ok(&format!(
        "virtio-balloon: inflated to {TARGET_MIB} MiB, MemTotal {total} -> {total_inflated} kB, host RSS {} -> {} MiB; deflated, MemTotal back to {total} kB",
        rss_before / MIB,
        rss_inflated / MIB
    ));
}

fn wait_balloon(
    api: &ApiClient,
    what: &str,
    done: impl Fn(&api::request::BalloonStatistics) -> bool,
) -> api::request::BalloonStatistics {
    let timeout = deadline(linux::COMMAND);
    let end = Instant::now() + timeout;
    loop {
        let stats = api.balloon_statistics().expect("vm.balloon-statistics");
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < end,
            "{what}: not within {timeout:?}: {stats:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `gen=` and `mono_ms=` of the memloop status line.
fn memloop_status(output: &Output) -> (u64, u64, String) {
    let line = output
        .lines
        .iter()
        .find(|l| l.starts_with("memloop "))
        .unwrap_or_else(|| panic!("no memloop status in {output:?}"))
        .clone();
    let field = |key: &str| vmm_tests::harness::field(&line, key).unwrap_or(u64::MAX);
    assert_eq!(field("errors"), 0, "the memory pattern checks out: {line}");
    assert_eq!(
        field("clock_errors"),
        0,
        "CLOCK_MONOTONIC never went back: {line}"
    );
    (field("gen"), field("mono_ms"), line)
}

/// Waits (up to 5 min) for the memory loop's first status, then 2 s more, and
/// prints it with the uptime: its first pass faults in every page, which
/// takes the emulated kernel seconds, more on a loaded host.
const MEMLOOP_STATUS: &str =
    "i=0; while [ ! -s /tmp/mem ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done; \
     sleep 2; cat /tmp/mem /proc/uptime";

fn check_pause_resume(vm: &mut LinuxVm, api: &ApiClient) {
    // A userspace counter (the memory pattern loop) and the guest's clock.
    vm.run_ok("linux-test-helper memloop 8 /tmp/mem > /dev/null 2>&1 &");
    let look = MEMLOOP_STATUS;
    let (gen_before, mono_before, _) = memloop_status(&vm.run_ok(look));
    api.pause().expect("vm.pause");
    assert_eq!(api.info().unwrap().state, VmState::Paused);
    let exits = counter(api, "vcpu0", "exits");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        counter(api, "vcpu0", "exits"),
        exits,
        "a paused vCPU does not run"
    );
    api.resume().expect("vm.resume");
    assert_eq!(api.info().unwrap().state, VmState::Running);
    let (gen_after, mono_after, line) = memloop_status(&vm.run_ok(look));
    assert!(
        gen_after > gen_before && mono_after > mono_before,
        "the counter and the clock went on after resume: gen {gen_before} -> {gen_after}, \
         mono {mono_before} -> {mono_after} ms"
    );
    ok(&format!(
        "pause/resume: the vCPUs stopped while paused; after resume the userspace counter went on ({gen_before} -> {gen_after} passes) and so did CLOCK_MONOTONIC ({line})"
    ));
}

fn check_info_and_counters(api: &ApiClient, disk: &Path) {
    let info = api.info().expect("vm.info");
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.cpus.boot_vcpus, 2);
    assert_eq!(info.config.memory.size_mib, 256);
    assert_eq!(info.config.disks.len(), 3);
    assert_eq!(info.config.disks[0].path, disk);
    assert_eq!(info.config.nets.len(), 1);
    let memory = info.memory.expect("vm.info memory");
    assert_eq!(memory.guest_bytes, 256 * MIB);
    assert!(memory.rss_bytes > 16 * MIB && memory.rss_bytes < 512 * MIB);
    let counters = api.counters().unwrap();
    let get = |c: &str, n: &str| counters.get(c).and_then(|m| m.get(n)).copied().unwrap_or(0);
    for vcpu in ["vcpu0", "vcpu1"] {
        assert!(get(vcpu, "exits") > 0, "{vcpu} ran: {counters:?}");
    }
    assert!(get("disk0", "write_bytes") >= 5 * MIB, "{counters:?}");
    assert!(get("disk0", "read_bytes") >= 2 * MIB, "{counters:?}");
    assert_eq!(get("disk0", "errors"), 0, "{counters:?}");
    assert!(get("disk2", "write_bytes") >= MIB, "{counters:?}");
    assert!(get("net0", "tx_bytes") >= 4 * MIB, "{counters:?}");
    assert!(get("net0", "rx_bytes") >= 4 * MIB, "{counters:?}");
    assert_eq!(get("net0", "errors"), 0, "{counters:?}");
    ok(&format!(
        "vm.info: running, 2 vCPUs, 256 MiB, 3 disks, 1 NIC, RSS {} MiB; vm.counters: disk0 wrote {} MiB, net0 sent {} MiB and received {} MiB, no errors",
        memory.rss_bytes / MIB,
        get("disk0", "write_bytes") / MIB,
        get("net0", "tx_bytes") / MIB,
        get("net0", "rx_bytes") / MIB
    ));
}

// --- migration ---------------------------------------------------------------------------------

/// A VMM for the migration test: the source (booting) or a target (waiting
/// on `listen`), each on its own tap of the bridge.
fn migration_vmm(
    kernel: &TestKernel,
    net: &Netns,
    dir: &TempDir,
    disk: &Path,
    tap: &str,
    name: &str,
    listen: Option<&str>,
) -> LinuxVm {
    let cmdline = format!("{CMDLINE} ip=10.0.3.15::10.0.3.1:255.255.255.0::eth0:off");
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        // The bzImage here (the other test boots the vmlinux): both boot
        // paths carry a Linux to its init.
        kernel.bzimage.display().to_string(),
        "--initrd".into(),
        kernel.initramfs.display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--memory".into(),
        "size=256M".into(),
        "--disk".into(),
        format!("path={},id=disk0", disk.display()),
        "--net".into(),
        format!("tap={tap},id=net0,mac=52:54:00:00:03:15"),
        "--api-socket".into(),
        dir.join(&format!("{name}.sock")).display().to_string(),
    ];
    if let Some(listen) = listen {
        args.extend([
            "--incoming".into(),
            listen.into(),
            "--migration-token-file".into(),
            dir.join("token").display().to_string(),
        ]);
    }
    let vm = LinuxVm::spawn(&net.exec_prefix(), &args);
    vm.vmm.wait_api(Duration::from_secs(20));
    vm
}

/// Migrates `from` to the target listening on `destination`; returns the
/// final status once the source exited 6.
fn migrate(from: &mut LinuxVm, destination: &str) -> api::request::MigrationStatus {
    let api = from.vmm.api();
    api.send_migration(&mig::send(
        destination,
        mig::TOKEN,
        MigrationParameters::default(),
    ))
    .expect("vm.send-migration");
    let timeout = deadline(Duration::from_secs(120));
    let status = mig::wait_status(&api, timeout, "completion", |s| {
        matches!(s.phase, MigrationPhase::Completed | MigrationPhase::Failed)
    });
    assert_eq!(
        status.phase,
        MigrationPhase::Completed,
        "{status:#?}\n{}",
        from.vmm.report()
    );
    assert_eq!(
        from.vmm.exit_code(timeout),
        mig::EXIT_MIGRATED,
        "the source exits 6 after the switch-over\n{}",
        from.vmm.report()
    );
    status
}

/// One Linux guest, 1 vCPU, booted from the bzImage: migrated while its
/// kernel boots (it must reach init on the target), then again while a
/// memory pattern loop runs, a TCP connection is open and its disk is
/// written before and after; finally reset through reboot=k.
#[test]
fn linux_migrates_during_boot_and_while_running_with_memory_tcp_clock_and_disk_intact() {
    require_kvm!();
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    if !netns::available() {
        return;
    }
    let dir = TempDir::new("linux-mig");
    std::fs::write(dir.join("token"), format!("{}\n", mig::TOKEN)).unwrap();
    let disk = dir.join("disk.img");
    sparse_file(&disk, 32 * MIB);
    // One bridge with the host's address; every VMM gets its own tap on it
    // (made beforehand, so it is on the bridge before the guest arrives).
    let net = Netns::create("lnxm");
    ip_in(&net, &["link", "add", "br0", "type", "bridge"]);
    ip_in(&net, &["addr", "add", "10.0.3.1/24", "dev", "br0"]);
    ip_in(&net, &["link", "set", "br0", "up"]);
    for tap in ["lnxm0", "lnxm1", "lnxm2"] {
        ip_in(&net, &["tuntap", "add", "dev", tap, "mode", "tap"]);
        ip_in(&net, &["link", "set", tap, "master", "br0", "up"]);
    }

    // --- during the boot ------------------------------------------------------------------------
    let mut source = migration_vmm(kernel, &net, &dir, &disk, "lnxm0", "source", None);
    let listen1 = format!("unix:{}", dir.join("m1.sock").display());
    let mut first = migration_vmm(kernel, &net, &dir, &disk, "lnxm1", "first", Some(&listen1));
    // Well inside the kernel's boot: after its ACPI tables, before PCI.
    let line = source.wait("ACPI: ", deadline(linux::BOOT));
    let status = migrate(&mut source, &listen1);
    ok(&format!(
        "migrated during the kernel's boot ({:.1} s in, after {line:?}): {} ms in all, {} ms downtime",
        source.secs(),
        status.total_time_ms,
        status.downtime_ms
    ));
    let init = first.wait_init();
    assert_eq!(init.release, kernel.release);
    assert_eq!(init.cpus, 1);
    first.wait_ready();
    ok("the kernel migrated mid-boot reached /init on the target");

    // --- while running ---------------------------------------------------------------------------
    let listener = listen_in(&net, "10.0.3.1:5003");
    let before = first.run_ok(&format!(
        "linux-test-helper memloop 64 /tmp/mem > /dev/null 2>&1 & \
         linux-test-helper tcp-echo 10.0.3.1 5003 > /dev/null 2>&1 & \
         linux-test-helper pattern 1 4 > /tmp/a && sha256sum /tmp/a && \
         dd if=/tmp/a of=/dev/vda bs=64k conv=fsync 2>/dev/null && {{ {MEMLOOP_STATUS}; }} && date +%s"
    ));
    let sum_a = sums(&before)[0].clone();
    let (gen_before, mono_before, _) = memloop_status(&before);
    let mut echo = accept_within(&listener, deadline(linux::COMMAND));
    let round_trip = |stream: &mut TcpStream, text: &str| {
        stream
            .write_all(text.as_bytes())
            .expect("send to the guest");
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).expect("the guest's echo");
        assert_eq!(back, text.as_bytes(), "echoed");
    };
    round_trip(&mut echo, "before the migration\n");
    let realtime_before: u64 = before
        .lines
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("date +%s: {before:?}"));

    let listen2 = format!("unix:{}", dir.join("m2.sock").display());
    let mut second = migration_vmm(kernel, &net, &dir, &disk, "lnxm2", "second", Some(&listen2));
    let status = migrate(&mut first, &listen2);
    ok(&format!(
        "migrated the running guest: {} ms in all, {} ms downtime, {} dirty rounds, {} MiB sent",
        status.total_time_ms,
        status.downtime_ms,
        status.iterations,
        status.transferred_bytes / MIB
    ));
    second.vmm.skip_console();
    round_trip(&mut echo, "after the migration\n");
    ok("the TCP connection opened before the migration carries data after it");
    let after = second.run_ok(
        "linux-test-helper pattern 1 5 > /tmp/b && sha256sum /tmp/b && \
         dd if=/tmp/b of=/dev/vda bs=64k seek=32 conv=fsync 2>/dev/null && \
         echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vda bs=64k count=16 2>/dev/null | sha256sum && \
         dd if=/dev/vda bs=64k skip=32 count=16 2>/dev/null | sha256sum && \
         sleep 2 && cat /tmp/mem /proc/uptime && date +%s",
    );
    let s = sums(&after);
    assert_eq!(s.len(), 3, "{}", after.text());
    assert_eq!(
        s[1], sum_a,
        "what was written before the migration reads back"
    );
    assert_eq!(
        s[2], s[0],
        "what was written after the migration reads back"
    );
    assert_eq!(sha256_hex(&read_range(&disk, 0, MIB as usize)), sum_a);
    assert_eq!(sha256_hex(&read_range(&disk, 2 * MIB, MIB as usize)), s[0]);
    let (gen_after, mono_after, line) = memloop_status(&after);
    let realtime_after: u64 = after
        .lines
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("date +%s: {after:?}"));
    assert!(
        gen_after > gen_before,
        "the memory loop went on: {gen_before} -> {gen_after}"
    );
    assert!(
        mono_after > mono_before && realtime_after >= realtime_before,
        "the guest's clocks went on: monotonic {mono_before} -> {mono_after} ms, \
         realtime {realtime_before} -> {realtime_after} s"
    );
    ok(&format!(
        "after the migration: the 64 MiB memory pattern checks out and went on ({gen_before} -> {gen_after} passes, {line}); the clocks went on; the disk written before and after the switch-over reads back in the guest and in the host file"
    ));
    drop(echo);

    // --- reset ------------------------------------------------------------------------------------
    second.vmm.send_line("run reboot reboot");
    second.wait("linux-test: shutdown reboot", deadline(linux::COMMAND));
    let code = second.vmm.exit_code(deadline(linux::COMMAND));
    assert_eq!(
        code,
        EXIT_RESET,
        "reboot=k resets through the i8042: vmm exits 3\n{}",
        second.vmm.report()
    );
    ok("`reboot` with reboot=k reset the machine through the i8042: vmm exited 3");
}
