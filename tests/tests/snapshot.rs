//! Snapshots to a directory and restores, end to end: `vm.snapshot` writes
//! the paused guest (the migration stream in a file), `vmm --restore` and
//! `vm.restore` bring it back exactly (the page-record invariant, counters
//! that go on from where they were), as it was (running or paused); a
//! damaged snapshot or a disk held elsewhere is refused with nothing run,
//! and the snapshot never becomes readable by other users.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::request::VmState;
use vmm_tests::harness::{field, testguest, vmmctl_binary, TempDir, Vmm};
use vmm_tests::migration::{check_pages, pages_pass, BOOT, SHORT};
use vmm_tests::require_kvm;

const EXIT_ERROR: i32 = 1;
const EXIT_STOPPED: i32 = 5;

/// A test guest (2 vCPUs, `memory`) running `commands`, API on `NAME.sock` in `dir`.
fn guest(dir: &TempDir, name: &str, commands: &str, memory: &str, extra: &[&str]) -> Vmm {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        testguest().display().to_string(),
        "--cmdline".into(),
        format!("-- {commands}"),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        format!("size={memory}"),
        "--api-socket".into(),
        dir.join(&format!("{name}.sock")).display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let vmm = Vmm::spawn(&args);
    vmm.wait_api(SHORT);
    vmm
}

/// `vmm --restore SNAPSHOT` with its API on `NAME.sock` in `dir`.
fn restored(dir: &TempDir, name: &str, snapshot: &Path) -> Vmm {
    Vmm::spawn(&[
        "--restore",
        snapshot.to_str().unwrap(),
        "--api-socket",
        dir.join(&format!("{name}.sock")).to_str().unwrap(),
    ])
}

/// The cpu0 count of the next `counters:` line.
fn cpu0(vmm: &mut Vmm) -> u64 {
    let line = vmm.wait_for("counters:", SHORT);
    field(&line, "cpu0").unwrap_or_else(|| panic!("{line}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

/// Stops a VMM whose guest was snapshot (it stays paused): exit 5.
fn stop(vmm: &mut Vmm) {
    vmm.api().shutdown_vmm().unwrap();
    assert_eq!(vmm.exit_code(SHORT), EXIT_STOPPED, "{}", vmm.report());
}

#[test]
fn a_restored_guest_keeps_every_page_and_its_counters_go_on() {
    require_kvm!();
    let dir = TempDir::new("snap");
    let mut source = guest(
        &dir,
        "source",
        "pages mib=64; counters period_ms=100",
        "256M",
        &[],
    );
    source.wait_for("pages: start", BOOT);
    let pass = pages_pass(&mut source);
    let before = cpu0(&mut source);
    let snapshot = dir.join("web1");
    source.api().snapshot(&snapshot).expect("vm.snapshot");
    // The snapshot leaves the guest paused: its disks must not move on.
    assert_eq!(source.api().ping().unwrap().state, VmState::Paused);
    source.skip_console();
    assert_eq!(
        source.try_wait_for("counters:", Duration::from_millis(500)),
        None,
        "the guest ran on after the snapshot"
    );
    stop(&mut source);

    // Private to its user, complete, and only the pages that hold data:
    // the 256 MiB guest wrote 64 MiB of page records and little else.
    let file = snapshot.join("snapshot");
    assert_eq!(mode(&snapshot), 0o700, "the snapshot directory");
    assert_eq!(mode(&file), 0o600, "the snapshot file");
    assert!(!snapshot.join("snapshot.partial").exists());
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        (64 << 20..96 << 20).contains(&size),
        "{size} bytes for 64 MiB of data in a 256 MiB guest"
    );

    let mut target = restored(&dir, "target", &snapshot);
    // It was running: it runs again, from where it was.
    let after = cpu0(&mut target);
    assert!(
        after > before,
        "cpu0 counted {before} before the snapshot and {after} after the restore \
         (a restart would count from 0)\n{}",
        target.report()
    );
    assert!(pages_pass(&mut target) >= pass);
    let line = check_pages(&mut target);
    assert!(field(&line, "passes").unwrap() >= pass, "{line}");
    assert!(target
        .stderr()
        .iter()
        .any(|l| l.contains("restored from") && l.contains("the guest runs")));
    assert_eq!(target.api().ping().unwrap().state, VmState::Running);
    target.send_line("poweroff");
    assert_eq!(target.exit_code(SHORT), 0, "{}", target.report());
}

#[test]
fn a_paused_guest_comes_back_paused_through_vmmctl_and_the_api() {
    require_kvm!();
    let dir = TempDir::new("snap-paused");
    let mut source = guest(&dir, "source", "counters period_ms=100", "128M", &[]);
    let before = cpu0(&mut source);
    source.api().pause().unwrap();
    let snapshot = dir.join("paused");
    let out = std::process::Command::new(vmmctl_binary())
        .arg("--api-socket")
        .arg(dir.join("source.sock"))
        .args(["snapshot", snapshot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    stop(&mut source);

    // vm.restore on an empty VMM.
    let target = Vmm::spawn(&["--api-socket", dir.join("target.sock").to_str().unwrap()]);
    target.wait_api(SHORT);
    target.api().restore(&snapshot).expect("vm.restore");
    assert_eq!(target.api().ping().unwrap().state, VmState::Paused);
    let mut target = target;
    target.api().resume().unwrap();
    let after = cpu0(&mut target);
    assert!(after > before, "{before} then {after}\n{}", target.report());
    // A second restore into a VMM that has a VM is refused.
    let e = target.api().restore(&snapshot).unwrap_err();
    assert!(e.to_string().contains("cannot restore a snapshot"), "{e}");
}

#[test]
fn a_snapshot_directory_others_could_read_is_refused_and_left_as_it_was() {
    require_kvm!();
    let dir = TempDir::new("snap-mode");
    let mut source = guest(&dir, "source", "counters period_ms=100", "128M", &[]);
    cpu0(&mut source);
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = source.api().snapshot(&shared).unwrap_err();
    assert!(
        e.to_string().contains("mode 0755") && e.to_string().contains("private"),
        "{e}"
    );
    assert_eq!(mode(&shared), 0o755, "never chmod-ed");
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    // Refused before anything happened: the guest still runs.
    assert_eq!(source.api().ping().unwrap().state, VmState::Running);
    // A relative path is refused too (whose working directory?).
    let (status, body) = source
        .api()
        .request(
            api::http::Method::Put,
            "vm.snapshot",
            Some(br#"{"destination": "snap"}"#),
        )
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // Even under a umask that opens everything, a new one is private.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0) };
    let fresh = dir.join("fresh");
    let result = source.api().snapshot(&fresh);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    result.unwrap();
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("snapshot")), 0o600);
}

/// A snapshot of a small running guest (counters), the source stopped.
fn small_snapshot(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    let mut source = guest(dir, "source", "counters period_ms=100", "64M", &[]);
    cpu0(&mut source);
    let snapshot = dir.join("good");
    source.api().snapshot(&snapshot).unwrap();
    stop(&mut source);
    let bytes = std::fs::read(snapshot.join("snapshot")).unwrap();
    (snapshot, bytes)
}

/// A copy of the snapshot with its file replaced by `bytes`.
fn damaged(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir(&copy).unwrap();
    std::fs::write(copy.join("snapshot"), bytes).unwrap();
    copy
}

#[test]
fn a_truncated_or_corrupt_snapshot_is_refused_and_nothing_runs() {
    require_kvm!();
    let dir = TempDir::new("snap-bad");
    let (good, bytes) = small_snapshot(&dir);
    // The first page of data: after the Config message, the Memory header
    // and the first range's header.
    let config_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let first_page = 16 + config_len + 16 + 16;
    let mut flipped = bytes.clone();
    flipped[first_page + 100] ^= 0x40;
    let mut trailing = bytes.clone();
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "truncated"),
        ("half", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        ("last-byte", bytes[..bytes.len() - 1].to_vec(), "truncated"),
        ("flipped", flipped, "checksum does not match"),
        ("trailing", trailing, "bytes after its last message"),
        (
            "foreign",
            b"#!/bin/sh\necho not a snapshot, but long enough\n".to_vec(),
            "not a snapshot",
        ),
    ];
    for (name, content, words) in &cases {
        let copy = damaged(&dir, name, content);
        let mut vmm = restored(&dir, name, &copy);
        assert_eq!(vmm.exit_code(SHORT), EXIT_ERROR, "{name}\n{}", vmm.report());
        let stderr = vmm.stderr().join("\n");
        assert!(stderr.contains(words), "{name}: {stderr}");
        assert!(
            !vmm.console().iter().any(|l| l.contains("counters:")),
            "{name}: the guest ran\n{}",
            vmm.report()
        );
    }
    // Over the API: refused with the reason, the VMM empty again, and the
    // good snapshot then restores into it.
    let target = Vmm::spawn(&["--api-socket", dir.join("target.sock").to_str().unwrap()]);
    target.wait_api(SHORT);
    let flipped = dir.join("flipped");
    let e = target.api().restore(&flipped).unwrap_err();
    assert!(e.to_string().contains("checksum does not match"), "{e}");
    assert_eq!(target.api().ping().unwrap().state, VmState::NotCreated);
    let e = target.api().restore(&dir.join("nothing-here")).unwrap_err();
    assert!(e.to_string().contains("holds no snapshot"), "{e}");
    target.api().restore(&good).expect("the good snapshot");
    let mut target = target;
    cpu0(&mut target);
}

#[test]
fn a_restore_whose_disk_another_vmm_holds_fails_naming_it_and_runs_nothing() {
    require_kvm!();
    let dir = TempDir::new("snap-lock");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let disk_spec = format!("path={}", disk.display());
    let mut source = guest(
        &dir,
        "source",
        "counters period_ms=100",
        "64M",
        &["--disk", &disk_spec],
    );
    cpu0(&mut source);
    let snapshot = dir.join("with-disk");
    source.api().snapshot(&snapshot).unwrap();
    stop(&mut source);

    let mut holder = guest(
        &dir,
        "holder",
        "counters period_ms=1000",
        "64M",
        &["--disk", &disk_spec],
    );
    cpu0(&mut holder);
    let mut vmm = restored(&dir, "target", &snapshot);
    assert_eq!(vmm.exit_code(SHORT), EXIT_ERROR, "{}", vmm.report());
    let stderr = vmm.stderr().join("\n");
    assert!(
        stderr.contains("locked") && stderr.contains(&format!("pid {}", holder.pid())),
        "{stderr}"
    );
    assert!(!vmm.console().iter().any(|l| l.contains("counters:")));
    // Once the disk is free, the same snapshot restores.
    holder.api().shutdown_vmm().unwrap();
    holder.exit_code(SHORT);
    let mut vmm = restored(&dir, "target2", &snapshot);
    cpu0(&mut vmm);
}

#[test]
fn a_snapshot_that_does_not_fit_leaves_no_file_and_the_guest_resumes() {
    require_kvm!();
    let dir = TempDir::new("snap-full");
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32k,mode=0700", "tmpfs"])
        .arg(&full)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP: cannot mount a tmpfs (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(full.clone());
    let mut source = guest(&dir, "source", "counters period_ms=100", "64M", &[]);
    let before = cpu0(&mut source);
    let snapshot = full.join("web1");
    let e = source.api().snapshot(&snapshot).unwrap_err();
    assert!(e.to_string().contains("No space left on device"), "{e}");
    // Neither a snapshot nor the partial file is left.
    let left: Vec<_> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The guest was paused for it and stays so; resumed, it goes on.
    assert_eq!(source.api().ping().unwrap().state, VmState::Paused);
    source.api().resume().unwrap();
    source.skip_console();
    let after = cpu0(&mut source);
    assert!(after > before, "{before} then {after}");
}
