//! The systemd units in resources/systemd: `systemd-analyze verify` finds
//! nothing wrong with them (an instance of the guest template, with the
//! binaries it names at this build's paths), and the guest unit's stop and
//! restart settings agree with each other and with the VMM's exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmm_tests::harness::{vmm_binary, vmmctl_binary, TempDir};

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/systemd")
}

fn read_unit(name: &str) -> String {
    std::fs::read_to_string(unit_dir().join(name)).unwrap()
}

/// The values of `key=` lines in a unit.
fn values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .collect()
}

/// `systemd-analyze verify` of `unit` (its text) saved as `file_name` in
/// a temporary directory, with /usr/local/bin/ pointing at this build.
fn verify(unit: &str, file_name: &str) -> Option<String> {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIP: systemd-analyze is not installed (package systemd)");
        return None;
    };
    assert!(out.status.success());
    let dir = TempDir::new("units");
    let web = vmm_binary().with_file_name("vmm-web");
    // vmm-web is built by `cargo test --workspace`; any executable serves
    // for checking the unit when it is not.
    let web = if web.exists() {
        web
    } else {
        PathBuf::from("/bin/true")
    };
    let text = unit
        .replace("/usr/local/bin/vmmctl", vmmctl_binary().to_str().unwrap())
        .replace("/usr/local/bin/vmm-web", web.to_str().unwrap())
        .replace("/usr/local/bin/vmm", vmm_binary().to_str().unwrap());
    let path = dir.join(file_name);
    std::fs::write(&path, text).unwrap();
    // Man pages are checked where they are installed (the package test).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{file_name}: {text}");
    Some(text)
}

#[test]
fn systemd_analyze_verify_accepts_the_guest_template_and_the_web_unit() {
    let guest = read_unit("vmm@.service");
    let Some(said) = verify(&guest, "vmm@web1.service") else {
        return;
    };
    assert!(said.trim().is_empty(), "vmm@web1.service: {said}");
    let said = verify(&read_unit("vmm-web.service"), "vmm-web.service").unwrap();
    assert!(said.trim().is_empty(), "vmm-web.service: {said}");
}

#[test]
fn the_guest_unit_stops_gracefully_in_time_and_restarts_only_after_failures() {
    let unit = read_unit("vmm@.service");
    // The config and the socket follow the instance name.
    let start = values(&unit, "ExecStart").join(" ");
    assert!(
        start.contains("--config /etc/vmm/%i.json")
            && start.contains("--api-socket /run/vmm/%i.sock"),
        "{start}"
    );
    // The guest gets the shutdown timeout, then the VMM forces it off; the
    // stop timeout leaves room for that plus SIGTERM and SIGKILL.
    let stop = values(&unit, "ExecStop").join(" ");
    let grace_ms: u64 = stop
        .split("--timeout-ms ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no shutdown --timeout-ms in {stop}"));
    assert!(stop.contains("shutdown --timeout-ms"), "{stop}");
    assert!(
        stop.contains("MAINPID"),
        "ExecStop waits for the VMM: {stop}"
    );
    let stop_s: u64 = values(&unit, "TimeoutStopSec")[0]
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(
        stop_s * 1000 >= grace_ms + 15_000,
        "TimeoutStopSec={stop_s}s leaves no room after a {grace_ms} ms shutdown"
    );
    // No restart after a power-off from inside (0) or a migration away (6);
    // a crash (4) or a reset with on_reset "exit" (3) does restart.
    assert_eq!(values(&unit, "Restart"), ["on-failure"]);
    let prevent: Vec<String> = values(&unit, "RestartPreventExitStatus")
        .join(" ")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    for code in ["0", "6"] {
        assert!(prevent.iter().any(|c| c == code), "{prevent:?}");
    }
    for code in ["3", "4"] {
        assert!(!prevent.iter().any(|c| c == code), "{prevent:?}");
    }
}
