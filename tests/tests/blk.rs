//! virtio-blk end to end: the test guest's driver against files and loop
//! devices (stand-ins for LVM volumes and DRBD devices: same ioctls), with
//! the host checking the disk itself.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_tests::harness::{device_interrupts, field, LoopDevice, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(15);
const SECTOR: u64 = 512;

/// The guest's data pattern: the 8-byte word at disk byte address `a` is
/// `pattern ^ a` (little-endian); see tests/guest/src/blk.rs.
fn pattern_bytes(pattern: u64, sector: u64, sectors: u64) -> Vec<u8> {
    let base = sector * SECTOR;
    (0..sectors * SECTOR / 8)
        .flat_map(|i| (pattern ^ (base + 8 * i)).to_le_bytes())
        .collect()
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn image(dir: &TempDir, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    let f = File::create(&path).unwrap();
    f.set_len(mib << 20).unwrap();
    path
}

/// The write/read/flush/discard/write-zeroes cycle on one backend.
fn exercise(disk: &Path, backing_file: &Path) {
    exercise_with(disk, backing_file, "")
}

/// [`exercise`] with extra disk options (`,direct=on`).
fn exercise_with(disk: &Path, backing_file: &Path, options: &str) {
    // The host writes a pattern the guest must read back.
    let host_pattern = 0x5eed_0000_1111u64;
    write_at(
        backing_file,
        1000 * SECTOR,
        &pattern_bytes(host_pattern, 1000, 16),
    );
    let mut vmm = Vmm::boot_testguest(
        &format!(
            "-- blk-info; blk-write sector=8 count=64 pattern=a5a5; blk-flush; \
             blk-read sector=1000 count=16 pattern={host_pattern:x}"
        ),
        &[
            "--disk",
            &format!("path={},serial=e2e-disk{options}", disk.display()),
        ],
    );
    let info = vmm.wait_for("blk0: capacity=", BOOT);
    assert_eq!(
        field(&info, "capacity"),
        Some((64 << 20) / SECTOR),
        "{info}"
    );
    assert!(vmm
        .wait_for("blk: write status=", SHORT)
        .contains("status=ok"));
    assert!(vmm
        .wait_for("blk: flush status=", SHORT)
        .contains("status=ok"));
    vmm.wait_for("blk-read-ok", SHORT);

    // GET_ID carries the configured serial.
    vmm.send_line("blk-id");
    assert!(vmm.wait_for("blk0: id=", SHORT).contains("id=e2e-disk"));

    // Discard and write-zeroes take effect on the host.
    write_at(
        backing_file,
        4096 * SECTOR,
        &vec![0xffu8; (2 << 20) as usize],
    );
    vmm.send_line("blk-discard sector=4096 count=4096");
    let discard = vmm.wait_for("blk: discard status=", SHORT);
    vmm.send_line("blk-zeroes sector=100 count=8");
    assert!(vmm
        .wait_for("blk: zeroes status=", SHORT)
        .contains("status=ok"));
    vmm.send_line("poweroff");
    assert_eq!(vmm.exit_code(SHORT), 0, "{}", vmm.report());

    // After the VMM exits the data is on the disk.
    assert_eq!(
        read_at(backing_file, 8 * SECTOR, 64 * SECTOR),
        pattern_bytes(0xa5a5, 8, 64)
    );
    assert!(discard.contains("status=ok"), "{discard}");
    assert_eq!(
        read_at(backing_file, 100 * SECTOR, 8 * SECTOR),
        vec![0u8; 8 * SECTOR as usize]
    );
    let discarded = read_at(backing_file, 4096 * SECTOR, 4096 * SECTOR);
    assert!(
        discarded.iter().all(|&b| b == 0),
        "discarded range reads zero"
    );
}

#[test]
fn a_file_backed_disk_round_trips_and_discards() {
    require_kvm!();
    let dir = TempDir::new("blk-file");
    let disk = image(&dir, "disk.img", 64);
    exercise(&disk, &disk);
    // Discard punched a hole: the file uses fewer blocks than it did full.
    let blocks = std::fs::metadata(&disk).unwrap().blocks();
    assert!(
        blocks * 512 < 2 << 20,
        "the 2 MiB written then discarded is gone ({blocks} blocks)"
    );
}

#[test]
fn a_loop_device_backed_disk_round_trips_and_discards() {
    require_kvm!();
    let dir = TempDir::new("blk-loop");
    let file = image(&dir, "loop.img", 64);
    let Some(device) = LoopDevice::attach(&file) else {
        return;
    };
    exercise(&device.device, &file);
}

#[test]
fn a_read_only_disk_refuses_writes_with_the_virtio_status() {
    require_kvm!();
    let dir = TempDir::new("blk-ro");
    let disk = image(&dir, "ro.img", 16);
    write_at(&disk, 0, &pattern_bytes(0x77, 0, 8));
    let mut vmm = Vmm::boot_testguest(
        "-- blk-info; blk-write sector=0 count=8 pattern=99; blk-read sector=0 count=8 pattern=77; poweroff",
        &["--disk", &format!("path={},readonly=on", disk.display())],
    );
    assert!(vmm.wait_for("blk0: capacity=", BOOT).contains("ro=1"));
    let write = vmm.wait_for("blk: write status=", SHORT);
    assert!(write.contains("status=ioerr"), "{write}");
    vmm.wait_for("blk-read-ok", SHORT);
    assert_eq!(vmm.exit_code(SHORT), 0);
    assert_eq!(
        read_at(&disk, 0, 8 * SECTOR),
        pattern_bytes(0x77, 0, 8),
        "unchanged"
    );
}

#[test]
fn a_second_vmm_cannot_open_a_locked_disk_read_write() {
    require_kvm!();
    let dir = TempDir::new("blk-lock");
    let disk = image(&dir, "shared.img", 16);
    let disk_arg = format!("path={}", disk.display());
    let mut first = Vmm::boot_testguest("--", &["--disk", &disk_arg]);
    first.wait_for("testguest: ready", BOOT);
    let mut second = Vmm::boot_testguest("--", &["--disk", &disk_arg]);
    let code = second.exit_code(SHORT);
    assert_ne!(code, 0);
    let stderr = second.stderr().join("\n");
    assert!(
        stderr.contains("shared.img") && stderr.contains("locked"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&first.pid().to_string()),
        "names the holder: {stderr}"
    );
    // A read-only opener is refused too while a writer holds it.
    let mut reader = Vmm::boot_testguest("--", &["--disk", &format!("{disk_arg},readonly=on")]);
    assert_ne!(reader.exit_code(SHORT), 0, "{}", reader.report());
    first.send_line("poweroff");
    assert_eq!(first.exit_code(SHORT), 0);
    // Released with the VMM.
    let mut third = Vmm::boot_testguest("-- poweroff", &["--disk", &disk_arg]);
    assert_eq!(third.exit_code(BOOT), 0, "{}", third.report());
}

#[test]
fn hostile_requests_get_an_error_status_and_the_vmm_stays_up() {
    require_kvm!();
    let dir = TempDir::new("blk-hostile");
    let disk = image(&dir, "h.img", 16);
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest(
        "--",
        &[
            "--disk",
            &format!("path={}", disk.display()),
            "--api-socket",
            socket.to_str().unwrap(),
        ],
    );
    vmm.wait_for("testguest: ready", BOOT);
    for kind in [
        "loop",
        "oob",
        "short",
        "huge-sector",
        "no-status",
        "wrong-dir",
    ] {
        vmm.send_line(&format!("blk-hostile kind={kind}"));
        let line = vmm.wait_for(&format!("blk-hostile kind={kind}"), SHORT);
        assert!(
            !line.contains("timeout"),
            "the device never answered: {line}"
        );
        if kind != "no-status" {
            assert!(!line.contains("status=ok"), "{line}");
        }
        // The driver and the device still work.
        vmm.send_line(&format!(
            "blk-write sector=64 count=8 pattern={:x}",
            0x100 + kind.len()
        ));
        assert!(
            vmm.wait_for("blk: write status=", SHORT)
                .contains("status=ok"),
            "after {kind}"
        );
        assert!(vmm.api().ping().is_ok());
    }
    let counters = vmm.api().counters().unwrap();
    assert!(counters["disk0"]["errors"] >= 4, "{counters:?}");
}

#[test]
fn several_requests_in_flight_and_counters() {
    require_kvm!();
    let dir = TempDir::new("blk-inflight");
    let disk = image(&dir, "i.img", 64);
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::boot_testguest(
        "-- blk-inflight n=32 count=2000",
        &[
            "--disk",
            &format!("path={}", disk.display()),
            "--api-socket",
            socket.to_str().unwrap(),
        ],
    );
    let line = vmm.wait_for("blk: inflight done=", BOOT);
    assert_eq!(field(&line, "done"), Some(2000), "{line}");
    let counters = vmm.api().counters().unwrap();
    assert!(counters["disk0"]["read_ops"] >= 2000, "{counters:?}");
    assert!(
        counters["disk0"]["read_bytes"] >= 2000 * 4096,
        "{counters:?}"
    );
}

#[test]
fn a_request_added_while_the_device_looks_is_not_lost() {
    // A busy reader keeps the queue racing with the device's notification
    // handling: a request added between the device's last pass and its
    // re-enabling notifications must still be served.
    require_kvm!();
    let dir = TempDir::new("blk-race");
    let disk = image(&dir, "r.img", 16);
    let mut vmm = Vmm::boot_testguest(
        "-- blk-reader sector=1000 count=128 pattern=5a; sleep ms=3000; blk-check pattern=5a; poweroff",
        &["--cpus", "2", "--disk", &format!("path={}", disk.display())],
    );
    let line = vmm.wait_for("blk-check-", Duration::from_secs(30));
    assert!(line.starts_with("blk-check-ok"), "{line}\n{}", vmm.report());
    let rounds = field(&line, "rounds").unwrap();
    assert!(rounds > 100, "the reader kept going: {line}");
    assert_eq!(vmm.exit_code(SHORT), 0);
}

#[test]
fn requests_in_flight_and_a_racing_reader_with_linux_ring_features() {
    // Linux's virtio_blk acks VIRTIO_F_EVENT_IDX (notifications and
    // interrupts by avail_event / used_event, not the ring flags) and
    // VIRTIO_F_INDIRECT_DESC (each request one ring entry pointing at a
    // descriptor table of its own).
    require_kvm!();
    let dir = TempDir::new("blk-event-idx");
    let disk = image(&dir, "e.img", 64);
    write_at(&disk, 1000 * SECTOR, &pattern_bytes(0x77, 1000, 128));
    let mut vmm = Vmm::boot_testguest(
        "event_idx=1 indirect=1 -- blk-info; blk-inflight n=32 count=2000; \
         blk-reader sector=1000 count=128 pattern=77; sleep ms=2000; blk-check pattern=77; irqs; poweroff",
        &["--cpus", "2", "--disk", &format!("path={}", disk.display())],
    );
    let info = vmm.wait_for("blk0: capacity=", BOOT);
    let acked = field(&info, "acked").unwrap();
    assert_eq!(
        acked & (3 << 28),
        3 << 28,
        "INDIRECT_DESC and EVENT_IDX: {info}"
    );
    let line = vmm.wait_for("blk: inflight done=", SHORT);
    assert_eq!(field(&line, "done"), Some(2000), "{line}");
    let line = vmm.wait_for("blk-check-", Duration::from_secs(30));
    assert!(line.starts_with("blk-check-ok"), "{line}\n{}", vmm.report());
    assert!(field(&line, "rounds").unwrap() > 100, "{line}");
    // Completions came as interrupts (used_event re-armed), not only by
    // the guest's 10 ms timer fallback.
    let irqs = vmm.wait_for("irqs:", SHORT);
    assert!(device_interrupts(&irqs) >= 100, "{irqs}");
    assert_eq!(vmm.exit_code(SHORT), 0, "{}", vmm.report());
}

#[test]
fn o_direct_disks_on_a_file_and_a_loop_device() {
    // direct=on: no host page cache, requests in flight through io_uring.
    require_kvm!();
    let dir = TempDir::new("blk-direct");
    let disk = image(&dir, "direct.img", 64);
    exercise_with(&disk, &disk, ",direct=on");
    let file = image(&dir, "loop-direct.img", 64);
    let Some(device) = LoopDevice::attach(&file) else {
        return;
    };
    exercise_with(&device.device, &file, ",direct=on");
}
