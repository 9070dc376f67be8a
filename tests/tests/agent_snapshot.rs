//! The OCF agent's `snapshot` parameter (VirtualDomain's): stop saves the
//! guest to SNAPSHOT/NAME instead of shutting it down, start resumes it
//! from there (its counters go on) and removes the saved state so it is
//! never restored twice; a saved state that cannot be restored is kept
//! aside and the guest boots. The agent runs from the source tree, as
//! pacemaker-execd would run it (the action as argument, OCF_RESKEY_*).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::harness::{field, testguest, vmm_binary, vmmctl_binary, TempDir};
use vmm_tests::require_kvm;

const OCF_ROOT: &str = "/usr/lib/ocf";
const OCF_SUCCESS: i32 = 0;
const OCF_NOT_RUNNING: i32 = 7;

fn agent_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/ocf/vmm")
}

/// Whether the OCF shell functions (resource-agents) and jq are here.
fn tools_present() -> bool {
    let shellfuncs = Path::new(OCF_ROOT).join("lib/heartbeat/ocf-shellfuncs");
    let jq = Command::new("jq").arg("--version").output().is_ok();
    if !shellfuncs.exists() || !jq {
        eprintln!("SKIP: resource-agents or jq is not installed (resources/test.sh installs them)");
        return false;
    }
    true
}

/// The agent for guest `g1` with its files in `dir`.
struct Agent {
    dir: PathBuf,
    config: PathBuf,
    snapshot: PathBuf,
}

impl Agent {
    fn run(&self, action: &str) -> (i32, String) {
        let out = Command::new("sh")
            .arg(agent_path())
            .arg(action)
            .env("OCF_ROOT", OCF_ROOT)
            .env("OCF_RESOURCE_INSTANCE", "g1")
            .env("OCF_RESOURCE_TYPE", "vmm")
            .env("OCF_RESOURCE_PROVIDER", "rustvmm")
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RA_VERSION_MINOR", "0")
            .env("OCF_RESKEY_CRM_meta_timeout", "60000")
            .env("OCF_RESKEY_CRM_meta_interval", "0")
            .env("OCF_RESKEY_config", &self.config)
            .env("OCF_RESKEY_socket_dir", self.dir.join("run"))
            .env("OCF_RESKEY_log_file", self.dir.join("g1.log"))
            .env("OCF_RESKEY_vmm_binary", vmm_binary())
            .env("OCF_RESKEY_vmmctl_binary", vmmctl_binary())
            .env("OCF_RESKEY_snapshot", &self.snapshot)
            .output()
            .expect("the agent runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    fn expect(&self, action: &str, code: i32) {
        let (got, text) = self.run(action);
        assert_eq!(got, code, "{action}:\n{text}\n--- log ---\n{}", self.log());
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("g1.log")).unwrap_or_default()
    }

    /// The guest console (serial on stdout goes to NAME.console.log).
    fn console(&self) -> String {
        fs::read_to_string(self.dir.join("g1.console.log")).unwrap_or_default()
    }

    /// The largest cpu0 count of the console lines after byte `from`,
    /// waiting until one exceeds `above` (or the time is up).
    fn cpu0_after(&self, from: usize, above: Option<u64>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let console = self.console();
            let last = console
                .get(from..)
                .unwrap_or("")
                .lines()
                .filter(|l| l.starts_with("counters:"))
                .filter_map(|l| field(l, "cpu0"))
                .max();
            if let Some(n) = last {
                if above.is_none_or(|a| n > a) {
                    return n;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no counters line after byte {from} (above {above:?})\n{}\n--- log ---\n{}",
                console.get(from..).unwrap_or(""),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `t_ms` (guest uptime) of the first counters line after byte `from`.
    fn first_t_ms_after(&self, from: usize) -> u64 {
        self.cpu0_after(from, None);
        let console = self.console();
        let line = console[from..]
            .lines()
            .find(|l| l.starts_with("counters:"))
            .unwrap()
            .to_string();
        field(&line, "t_ms").unwrap_or_else(|| panic!("{line}"))
    }

    fn saved(&self) -> PathBuf {
        self.snapshot.join("g1").join("snapshot")
    }
}

/// Stops whatever VMM of this test is left (the agent's stop, then kill).
struct Cleanup<'a>(&'a Agent);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.run("stop");
    }
}

#[test]
fn the_agent_saves_on_stop_resumes_on_start_and_never_restores_twice() {
    require_kvm!();
    if !tools_present() {
        return;
    }
    let dir = TempDir::new("agent-snap");
    let config = dir.join("g1.json");
    let json = serde_json::json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size_mib": 64},
        "payload": {
            "kernel": testguest().display().to_string(),
            "cmdline": "-- counters period_ms=100",
        },
    });
    fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let agent = Agent {
        dir: dir.path().to_path_buf(),
        config,
        snapshot: dir.join("saved"),
    };
    let _cleanup = Cleanup(&agent);
    agent.expect("validate-all", OCF_SUCCESS);

    // Nothing saved: a fresh boot.
    agent.expect("start", OCF_SUCCESS);
    let before = agent.cpu0_after(0, Some(0));
    // Stop saves (the guest's memory, private) instead of shutting down.
    agent.expect("stop", OCF_SUCCESS);
    agent.expect("monitor", OCF_NOT_RUNNING);
    let saved = agent.saved();
    assert!(saved.is_file(), "no saved state\n{}", agent.log());
    assert_eq!(fs::metadata(&saved).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        fs::metadata(saved.parent().unwrap()).unwrap().mode() & 0o777,
        0o700
    );
    let log = agent.log();
    assert!(log.contains("saving the guest to"), "{log}");
    assert!(log.contains("exited with code 5"), "{log}");

    // Start resumes it: the counters go on, and the state is gone.
    let mark = agent.console().len();
    agent.expect("start", OCF_SUCCESS);
    let after = agent.cpu0_after(mark, Some(before));
    assert!(after > before, "{before} then {after}");
    let uptime = agent.first_t_ms_after(mark);
    assert!(!saved.exists(), "a saved state restored once must go");
    assert!(agent.log().contains("restored: vmm pid"), "{}", agent.log());
    agent.expect("monitor", OCF_SUCCESS);

    // A saved state that cannot be restored is kept aside; the guest boots.
    agent.expect("stop", OCF_SUCCESS);
    let bytes = fs::read(&saved).unwrap();
    fs::write(&saved, &bytes[..bytes.len() / 2]).unwrap();
    let mark = agent.console().len();
    agent.expect("start", OCF_SUCCESS);
    agent.expect("monitor", OCF_SUCCESS);
    let log = agent.log();
    assert!(
        log.contains("restoring") && log.contains("booting instead"),
        "{log}"
    );
    assert!(
        log.contains("truncated"),
        "the VMM's reason is logged: {log}"
    );
    assert!(!saved.exists());
    assert!(saved.with_file_name("snapshot.failed").exists());
    // Booted afresh: its uptime starts again below the restored guest's.
    let fresh = agent.first_t_ms_after(mark);
    assert!(
        fresh < uptime,
        "uptime {fresh} ms after the boot, {uptime} ms when restored"
    );
}
