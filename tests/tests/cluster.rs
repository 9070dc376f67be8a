//! Pacemaker integration of the VMM (resources/ocf/, docs/cluster.md).
//!
//! * `ocf-tester` passes against the installed agent; the agent's answers
//!   to failures follow the OCF rules (a killed VMM, a hung one, a guest that
//!   powered off, validation errors, probes and stops without configuration);
//!   monitor tells a busy VMM from a dead one and is not fooled by a flood of
//!   API clients; exit reasons never come from what a guest prints; the VMM
//!   behaviours the migration sender used to work around are fixed.
//! * Live migration through the agent's `migrate_to` and `migrate_from` in
//!   Pacemaker's order, on one host with two socket directories, proven by
//!   the test guest's page records; and a failed migration that leaves the
//!   source running and makes `migrate_from` fail.
//! * A real two-node Pacemaker + Corosync cluster in network namespaces:
//!   the guest starts, `crm_resource --move` live-migrates it, a SIGKILLed
//!   VMM is recovered, target-role=Stopped stops it, and the teardown leaves
//!   no namespace and no process behind (also when a step fails).
//! * The DRBD and LVM recipes in resources/ocf/examples, checked offline with
//!   crm_verify and crm_simulate (a move migrates with promoted-max=2 and
//!   restarts with promoted-max=1), and the DRBD resource file with drbdadm.
//!
//! They need root, /dev/kvm and the Debian packages resources/test.sh
//! installs; a test prints SKIP and the reason where one is missing.

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use vmm_tests::harness::{testguest, vmm_binary, vmmctl_binary, TempDir};
use vmm_tests::require_kvm;

/// The OCF provider the tests install the agent as (`ocf:rustvmm:vmm`).
const PROVIDER: &str = "rustvmm";
const OCF_ROOT: &str = "/usr/lib/ocf";
const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_ERR_INSTALLED: i32 = 5;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;
const SHORT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Tools and commands

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An executable from PATH or the sbin directories (a user's PATH may lack them).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn tool_path(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| panic!("{name} disappeared"))
}

/// Prints SKIP and returns true unless we are root (if `root`) and every
/// tool is installed.
fn skip_without(root: bool, tools: &[&str]) -> bool {
    if root && !is_root() {
        eprintln!("SKIP: needs root (Pacemaker, namespaces, /usr/lib/ocf)");
        return true;
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| tool(t).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIP: {} not installed (resources/test.sh installs resource-agents, pacemaker, \
             corosync, pacemaker-cli-utils, libxml2-utils, drbd-utils)",
            missing.join(", ")
        );
        return true;
    }
    false
}

/// The result of a finished command.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        format!(
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run(command: &mut Command) -> Run {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn run_ok(command: &mut Command) -> Run {
    let description = format!("{command:?}");
    let result = run(command);
    assert_eq!(result.code, 0, "{description} failed:\n{}", result.text());
    result
}

/// Polls `check` until it returns Some, or panics with `what` and the last
/// diagnostic from `report`.
fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
    report: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {timeout:?}\n{}", report());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of `vmm` processes (argv[0] ends in /vmm) with an argument containing `needle`.
fn vmm_processes_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_vmm = args
            .first()
            .is_some_and(|a0| a0 == "vmm" || a0.ends_with("/vmm"));
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if is_vmm && !zombie && args.iter().any(|a| a.contains(needle)) {
            pids.push(pid);
        }
    }
    pids
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks the pid.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill on a pid this test started (directly or through the agent).
    unsafe { libc::kill(pid as i32, signal) };
}

// ---------------------------------------------------------------------------
// The agent

static INSTALL: Once = Once::new();

/// Installs resources/ocf/vmm as ocf:rustvmm:vmm (once per test binary) and
/// returns the installed path.
fn install_agent() -> PathBuf {
    INSTALL.call_once(|| {
        run_ok(
            Command::new("sh")
                .arg(repo().join("resources/ocf/install.sh"))
                .args(["--provider", PROVIDER]),
        );
    });
    Path::new(OCF_ROOT)
        .join("resource.d")
        .join(PROVIDER)
        .join("vmm")
}

/// Runs agent actions the way pacemaker-execd does: the action as the only
/// argument, parameters as OCF_RESKEY_*.
struct Agent {
    path: PathBuf,
    instance: String,
    params: Vec<(String, String)>,
}

impl Agent {
    fn new(path: &Path, instance: &str) -> Agent {
        Agent {
            path: path.to_path_buf(),
            instance: instance.to_string(),
            params: Vec::new(),
        }
    }

    fn param(mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> Agent {
        self.params.push((
            name.to_string(),
            value.as_ref().to_string_lossy().into_owned(),
        ));
        self
    }

    /// Runs `action` with the parameters, the meta attributes `meta`
    /// (`timeout` in ms, `interval`, `migrate_target`, ...), and parameter
    /// overrides `with` (an empty value unsets the parameter).
    fn action_with(&self, action: &str, meta: &[(&str, &str)], with: &[(&str, &str)]) -> Run {
        let mut command = Command::new(&self.path);
        command
            .arg(action)
            .env("OCF_ROOT", OCF_ROOT)
            .env("OCF_RESOURCE_INSTANCE", &self.instance)
            .env("OCF_RESOURCE_TYPE", "vmm")
            .env("OCF_RESOURCE_PROVIDER", PROVIDER)
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RA_VERSION_MINOR", "0")
            .env("OCF_RESKEY_CRM_meta_timeout", "20000")
            .env("OCF_RESKEY_CRM_meta_interval", "0");
        for (name, value) in &self.params {
            command.env(format!("OCF_RESKEY_{name}"), value);
        }
        for (name, value) in with {
            if value.is_empty() {
                command.env_remove(format!("OCF_RESKEY_{name}"));
            } else {
                command.env(format!("OCF_RESKEY_{name}"), value);
            }
        }
        for (name, value) in meta {
            command.env(format!("OCF_RESKEY_CRM_meta_{name}"), value);
        }
        run(&mut command)
    }

    fn action(&self, action: &str) -> Run {
        self.action_with(action, &[], &[])
    }

    /// A recurring monitor (interval 10 s), not a probe.
    fn monitor(&self) -> Run {
        self.action_with("monitor", &[("interval", "10000")], &[])
    }

    fn probe(&self) -> Run {
        self.action_with("monitor", &[("interval", "0")], &[])
    }

    fn expect(&self, action: &str, code: i32) -> Run {
        let result = self.action(action);
        assert_eq!(result.code, code, "{action}:\n{}", result.text());
        result
    }
}

/// The `ocf-exit-reason:` line an action printed.
fn exit_reason(result: &Run) -> String {
    result
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("ocf-exit-reason:"))
        .unwrap_or("")
        .to_string()
}

/// Writes a guest config: the test guest with `commands`, 2 vCPUs, 128 MiB,
/// its serial port on the Unix socket `console`, and optionally a disk.
fn write_config(path: &Path, commands: &str, console: &Path, disk: Option<&Path>) {
    let mut config = serde_json::json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size_mib": 128},
        "payload": {
            "kernel": testguest().display().to_string(),
            "cmdline": format!("-- {commands}"),
        },
        "serial": {"mode": "socket", "path": console.display().to_string()},
    });
    if let Some(disk) = disk {
        config["disks"] = serde_json::json!([{"path": disk.display().to_string()}]);
    }
    fs::write(path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

fn write_token(path: &Path, token: &str) {
    fs::write(path, format!("{token}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn make_disk(path: &Path) {
    let file = fs::File::create(path).unwrap();
    file.set_len(16 << 20).unwrap();
}

/// A client on a guest's serial console socket.
struct Console {
    stream: UnixStream,
    pending: Vec<u8>,
    lines: VecDeque<String>,
    path: PathBuf,
}

impl Console {
    /// Connects, waiting for the socket to appear.
    fn connect(path: &Path) -> Console {
        let stream = wait_until(
            SHORT,
            &format!("console socket {}", path.display()),
            || UnixStream::connect(path).ok(),
            String::new,
        );
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Console {
            stream,
            pending: Vec::new(),
            lines: VecDeque::new(),
            path: path.to_path_buf(),
        }
    }

    fn send(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// The next line containing `needle`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            while let Some(line) = self.lines.pop_front() {
                if line.contains(needle) {
                    return line;
                }
                seen.push(line);
                if seen.len() > 20 {
                    seen.remove(0);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no console line with {needle:?} on {} within {timeout:?}; last lines:\n{}",
                self.path.display(),
                seen.join("\n")
            );
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!(
                    "console {} closed while waiting for {needle:?}; last lines:\n{}",
                    self.path.display(),
                    seen.join("\n")
                ),
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = self.pending.drain(..=end).collect();
                        self.lines.push_back(
                            String::from_utf8_lossy(&line)
                                .trim_end_matches(['\r', '\n'])
                                .to_string(),
                        );
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("console {}: {e}", self.path.display()),
            }
        }
    }

    /// Waits until the page walker is going, then stops it and checks the
    /// invariant; returns the `pages-ok` line.
    fn check_pages(&mut self) -> String {
        self.wait_for("pages: pass=", SHORT);
        self.send("check-pages");
        let line = self.wait_for("pages-", SHORT);
        assert!(line.starts_with("pages-ok"), "page records broken: {line}");
        line
    }
}

/// Kills, when dropped (also when a test fails), every VMM the agent started
/// for files under `dir`: the agent's VMMs run detached, not as our children.
struct ReapVmms(String);

impl Drop for ReapVmms {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = vmm_processes_with(&self.0);
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                signal(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The agent alone

#[test]
fn ocf_tester_passes_against_the_installed_agent() {
    require_kvm!();
    if skip_without(true, &["ocf-tester", "xmllint"]) {
        return;
    }
    let agent = install_agent();
    let dir = TempDir::new("ocf-tester");
    let _reap = ReapVmms(dir.path().display().to_string());
    let config = dir.join("vm.json");
    write_config(
        &config,
        "counters period_ms=1000",
        &dir.join("console.sock"),
        None,
    );
    write_token(&dir.join("token"), "ocf-tester-token");
    let name = format!("ocft{}", std::process::id());
    let option = |k: &str, v: &Path| format!("{k}={}", v.display());
    let started = Instant::now();
    let result = run(Command::new(tool_path("ocf-tester"))
        .args(["-n", &name])
        .args(["-o", &option("config", &config)])
        .args(["-o", &option("socket_dir", &dir.join("run"))])
        .args(["-o", &option("log_file", &dir.join("vm.log"))])
        .args(["-o", &option("vmm_binary", &vmm_binary())])
        .args(["-o", &option("vmmctl_binary", &vmmctl_binary())])
        .args(["-o", &option("migration_token_file", &dir.join("token"))])
        .arg(&agent)
        .env("OCF_ROOT", OCF_ROOT));
    eprintln!(
        "ocf-tester: exit {} in {:?}",
        result.code,
        started.elapsed()
    );
    assert!(
        result.code == 0 && result.stdout.contains("passed all tests"),
        "ocf-tester failed:\n{}\n--- agent log ---\n{}",
        result.text(),
        read_log(&dir.join("vm.log"))
    );
    assert!(vmm_processes_with(&config.display().to_string()).is_empty());
}

#[test]
fn agent_follows_the_ocf_rules_on_failures() {
    require_kvm!();
    if skip_without(true, &["xmllint"]) {
        return;
    }
    let path = install_agent();
    let dir = TempDir::new("ocf-agent");
    let _reap = ReapVmms(dir.path().display().to_string());
    let config = dir.join("vm.json");
    let console = dir.join("console.sock");
    write_config(&config, "counters period_ms=1000", &console, None);
    write_token(&dir.join("token"), "agent-token");
    let log = dir.join("vm.log");
    let agent = Agent::new(&path, "guest1:0")
        .param("config", &config)
        .param("socket_dir", dir.join("run"))
        .param("log_file", &log)
        .param("vmm_binary", vmm_binary())
        .param("vmmctl_binary", vmmctl_binary())
        .param("api_timeout", "2")
        .param("shutdown_timeout", "5");
    let socket = dir.join("run").join("guest1.sock");

    // meta-data: valid against the OCF 1.0 DTD (as pacemaker and ocf-tester
    // check it), with the migration actions and the default timeouts.
    let meta = agent.expect("meta-data", OCF_SUCCESS).stdout;
    let meta_file = dir.join("meta.xml");
    fs::write(&meta_file, &meta).unwrap();
    run_ok(
        Command::new(tool_path("xmllint"))
            .args([
                "--noout",
                "--dtdvalid",
                "/usr/share/resource-agents/ra-api-1.dtd",
            ])
            .arg(&meta_file),
    );
    for action in [
        r#"<action name="start"        timeout="90s" />"#,
        r#"<action name="stop"         timeout="90s" />"#,
        r#"<action name="monitor"      timeout="30s" interval="10s" depth="0" />"#,
        r#"<action name="migrate_to"   timeout="120s" />"#,
        r#"<action name="migrate_from" timeout="120s" />"#,
    ] {
        assert!(meta.contains(action), "meta-data lacks {action}");
    }
    assert!(!meta.contains("reload-agent"));
    assert_eq!(
        agent.action("reload").code,
        3,
        "unimplemented actions answer 3"
    );

    // Unconfigured or broken: the right codes, a probe says "not running",
    // a stop succeeds.
    assert_eq!(
        agent
            .action_with("validate-all", &[], &[("config", "")])
            .code,
        OCF_ERR_CONFIGURED
    );
    assert_eq!(
        agent.action_with("stop", &[], &[("config", "")]).code,
        OCF_SUCCESS
    );
    assert_eq!(
        agent
            .action_with("monitor", &[("interval", "0")], &[("config", "")])
            .code,
        OCF_NOT_RUNNING
    );
    let missing = agent.action_with("validate-all", &[], &[("config", "/nonexistent/vm.json")]);
    assert_eq!(missing.code, OCF_ERR_INSTALLED, "{}", missing.text());
    assert!(exit_reason(&missing).contains("/nonexistent/vm.json"));
    assert_eq!(
        agent
            .action_with(
                "monitor",
                &[("interval", "0")],
                &[("config", "/nonexistent/vm.json")]
            )
            .code,
        OCF_NOT_RUNNING
    );
    let bad_json = dir.join("bad.json");
    fs::write(&bad_json, "{\"payload\": ").unwrap();
    let bad = agent.action_with(
        "validate-all",
        &[],
        &[("config", bad_json.to_str().unwrap())],
    );
    assert_eq!(bad.code, OCF_ERR_CONFIGURED, "{}", bad.text());
    assert!(
        exit_reason(&bad).contains("not a valid VM config"),
        "{}",
        bad.text()
    );
    assert_eq!(
        agent
            .action_with("validate-all", &[], &[("migration_port", "http")])
            .code,
        OCF_ERR_CONFIGURED
    );
    assert_eq!(
        agent
            .action_with("validate-all", &[], &[("migration_bandwidth", "fast")])
            .code,
        OCF_ERR_CONFIGURED
    );
    assert_eq!(
        agent
            .action_with("validate-all", &[("allow_migrate", "true")], &[])
            .code,
        OCF_ERR_CONFIGURED,
        "allow-migrate needs a token"
    );
    assert_eq!(
        agent
            .action_with("validate-all", &[], &[("vmm_binary", "/nonexistent/vmm")])
            .code,
        OCF_ERR_INSTALLED
    );
    assert_eq!(
        agent
            .action_with("validate-all", &[], &[("name", "bad/name")])
            .code,
        OCF_ERR_CONFIGURED
    );
    agent.expect("validate-all", OCF_SUCCESS);
    assert_eq!(agent.probe().code, OCF_NOT_RUNNING);

    // A start the VMM refuses: the VMM's own message is the exit reason.
    let broken = dir.join("broken.json");
    write_config(
        &broken,
        "counters",
        &console,
        Some(&dir.join("no-such-disk.img")),
    );
    let refused = agent.action_with("start", &[], &[("config", broken.to_str().unwrap())]);
    assert_eq!(refused.code, OCF_ERR_GENERIC, "{}", refused.text());
    assert!(
        exit_reason(&refused).contains("no-such-disk.img"),
        "{}",
        refused.text()
    );
    assert_eq!(agent.probe().code, OCF_NOT_RUNNING);

    // Start, double start, monitor; the guest runs.
    agent.expect("start", OCF_SUCCESS);
    agent.expect("start", OCF_SUCCESS);
    assert_eq!(agent.monitor().code, OCF_SUCCESS);
    Console::connect(&console).wait_for("counters:", SHORT);
    let pid: u32 = fs::read_to_string(dir.join("run/guest1.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(vmm_processes_with(&socket.display().to_string()), vec![pid]);

    // A hung VMM (stopped with SIGSTOP): monitor fails with a reason; once
    // it runs again, monitor is happy again.
    signal(pid, libc::SIGSTOP);
    let hung = agent.monitor();
    assert_eq!(hung.code, OCF_ERR_GENERIC, "{}", hung.text());
    assert!(
        exit_reason(&hung).contains("busy") && exit_reason(&hung).contains("does not answer"),
        "{}",
        hung.text()
    );
    signal(pid, libc::SIGCONT);
    assert_eq!(agent.monitor().code, OCF_SUCCESS);

    // Killed: monitor says "not running", with how it ended, after cleaning up.
    signal(pid, libc::SIGKILL);
    wait_until(
        SHORT,
        "the VMM dies",
        || (!process_alive(pid)).then_some(()),
        String::new,
    );
    let dead = agent.monitor();
    assert_eq!(dead.code, OCF_NOT_RUNNING, "{}", dead.text());
    assert!(
        exit_reason(&dead).contains("killed by signal 9"),
        "{}",
        dead.text()
    );
    assert!(!socket.exists(), "the stale socket is cleaned up");
    assert_eq!(agent.probe().code, OCF_NOT_RUNNING);
    agent.expect("stop", OCF_SUCCESS);

    // A stop of a hung VMM ends with SIGKILL, and only then succeeds.
    agent.expect("start", OCF_SUCCESS);
    let pid = vmm_processes_with(&socket.display().to_string())[0];
    signal(pid, libc::SIGSTOP);
    let started = Instant::now();
    agent.expect("stop", OCF_SUCCESS);
    assert!(!process_alive(pid), "stop returned while the VMM lives");
    assert!(read_log(&log).contains("exited with code 137"));
    eprintln!("stop of a hung VMM: {:?}", started.elapsed());
    assert_eq!(agent.monitor().code, OCF_NOT_RUNNING);

    // The guest powers itself off: not running, and monitor says why.
    agent.expect("start", OCF_SUCCESS);
    Console::connect(&console).send("poweroff");
    let off = wait_until(
        SHORT,
        "monitor notices the power-off",
        || Some(agent.monitor()).filter(|r| r.code != OCF_SUCCESS),
        || read_log(&log),
    );
    assert_eq!(off.code, OCF_NOT_RUNNING, "{}", off.text());
    assert!(exit_reason(&off).contains("powered off"), "{}", off.text());

    // A graceful stop: the guest shuts down on the ACPI power button.
    agent.expect("start", OCF_SUCCESS);
    agent.expect("stop", OCF_SUCCESS);
    assert!(read_log(&log)
        .trim_end()
        .ends_with("stopped (vmm exited with code 0 (the guest powered off))"));
    agent.expect("stop", OCF_SUCCESS);
    assert!(vmm_processes_with(&socket.display().to_string()).is_empty());
}

/// An agent for the test guest running `commands`, with its files in `dir`.
fn agent_for(path: &Path, dir: &TempDir, config: &Path) -> Agent {
    Agent::new(path, "guest1:0")
        .param("config", config)
        .param("socket_dir", dir.join("run"))
        .param("log_file", dir.join("vm.log"))
        .param("vmm_binary", vmm_binary())
        .param("vmmctl_binary", vmmctl_binary())
        .param("api_timeout", "3")
        .param("shutdown_timeout", "5")
}

#[test]
fn agent_monitor_tells_a_busy_vmm_from_a_dead_one() {
    require_kvm!();
    if skip_without(true, &["jq"]) {
        return;
    }
    let path = install_agent();
    let dir = TempDir::new("ocf-busy");
    let _reap = ReapVmms(dir.path().display().to_string());
    let config = dir.join("vm.json");
    write_config(
        &config,
        "counters period_ms=1000",
        &dir.join("console.sock"),
        None,
    );
    let agent = agent_for(&path, &dir, &config);
    let socket = dir.join("run").join("guest1.sock");
    agent.expect("start", OCF_SUCCESS);
    let pid = vmm_processes_with(&socket.display().to_string())[0];

    // Hundreds of idle and half-sent API connections do not make a healthy
    // guest look failed.
    let held: Vec<UnixStream> = (0..300)
        .map(|i| {
            let mut stream = UnixStream::connect(&socket).unwrap();
            if i % 2 == 0 {
                stream
                    .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")
                    .unwrap();
            }
            stream
        })
        .collect();
    let crowded = agent.monitor();
    assert_eq!(crowded.code, OCF_SUCCESS, "{}", crowded.text());
    drop(held);

    // A VMM that accepts but does not answer (stopped): busy, after retries.
    signal(pid, libc::SIGSTOP);
    let started = Instant::now();
    let busy = agent.monitor();
    let took = started.elapsed();
    signal(pid, libc::SIGCONT);
    assert_eq!(busy.code, OCF_ERR_GENERIC, "{}", busy.text());
    assert!(exit_reason(&busy).contains("busy"), "{}", busy.text());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "three tries within api_timeout (3 s), not one and not forever: {took:?}"
    );
    assert_eq!(agent.monitor().code, OCF_SUCCESS);

    // A VMM that is gone: dead, not busy, with how it ended.
    signal(pid, libc::SIGKILL);
    wait_until(
        SHORT,
        "the VMM dies",
        || (!process_alive(pid)).then_some(()),
        String::new,
    );
    let dead = agent.monitor();
    assert_eq!(dead.code, OCF_NOT_RUNNING, "{}", dead.text());
    assert!(
        exit_reason(&dead).contains("killed by signal 9"),
        "{}",
        dead.text()
    );
    assert!(!exit_reason(&dead).contains("busy"), "{}", dead.text());
    agent.expect("stop", OCF_SUCCESS);
}

#[test]
fn a_guest_the_agent_started_refuses_a_migration_the_agent_did_not_start() {
    require_kvm!();
    if skip_without(true, &["jq"]) {
        return;
    }
    let path = install_agent();
    let dir = TempDir::new("ocf-managed");
    let _reap = ReapVmms(dir.path().display().to_string());
    let config = dir.join("vm.json");
    write_config(
        &config,
        "counters period_ms=1000",
        &dir.join("console.sock"),
        None,
    );
    let agent = agent_for(&path, &dir, &config);
    let socket = dir.join("run").join("guest1.sock");
    agent.expect("start", OCF_SUCCESS);
    let migrate = |extra: &[&str]| {
        run(Command::new(vmmctl_binary())
            .args(["--api-socket", socket.to_str().unwrap()])
            .args([
                "migrate",
                &format!("unix:{}", dir.join("nobody.sock").display()),
            ])
            .args(["--token", "t"])
            .args(extra))
    };
    // By hand: refused, with what to do instead; the guest runs on.
    let refused = migrate(&[]);
    assert_eq!(refused.code, 1, "{}", refused.text());
    assert!(
        refused.stderr.contains("managed by pacemaker")
            && refused.stderr.contains("crm resource move"),
        "{}",
        refused.text()
    );
    assert_eq!(agent.monitor().code, OCF_SUCCESS);
    // Forced (what the agent's sender does): past the check, on to the
    // destination (here nobody listens).
    let forced = migrate(&["--force"]);
    assert_eq!(forced.code, 1, "{}", forced.text());
    assert!(
        forced.stdout.contains("cannot connect") || forced.stderr.contains("cannot connect"),
        "{}",
        forced.text()
    );
    assert!(!forced.stderr.contains("managed by"), "{}", forced.text());
    assert_eq!(agent.monitor().code, OCF_SUCCESS);
    agent.expect("stop", OCF_SUCCESS);
}

/// The VirtualDomain parameters that apply to this VMM: shutdown_mode, a
/// shutdown_timeout that must fit in the stop timeout, monitor_scripts,
/// and their validation.
#[test]
fn agent_takes_the_virtualdomain_parameters_that_apply() {
    require_kvm!();
    if skip_without(true, &["jq"]) {
        return;
    }
    let path = install_agent();
    let dir = TempDir::new("ocf-vd");
    let _reap = ReapVmms(dir.path().display().to_string());
    // A guest that ignores the power button and Ctrl-Alt-Del, and one that
    // powers off on them (the test guest's default).
    let console = dir.join("console.sock");
    let guest = |file: &str, options: &str| {
        let config = dir.join(file);
        let json = serde_json::json!({
            "cpus": {"boot_vcpus": 2},
            "memory": {"size_mib": 64},
            "payload": {
                "kernel": testguest().display().to_string(),
                "cmdline": format!("{options} -- counters period_ms=1000"),
            },
            "serial": {"mode": "socket", "path": console.display().to_string()},
        });
        fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
        config
    };
    let stubborn = guest("stubborn.json", "on_cad=ignore");
    let willing = guest("willing.json", "");
    let log = dir.join("vm.log");

    // Validation of the new parameters.
    let agent = agent_for(&path, &dir, &willing);
    for (name, value, code, reason) in [
        (
            "shutdown_mode",
            "signal",
            OCF_ERR_CONFIGURED,
            "shutdown_mode",
        ),
        (
            "migration_speed",
            "fast",
            OCF_ERR_CONFIGURED,
            "migration_speed",
        ),
        // VirtualDomain's name for migration_port.
        ("migrateport", "http", OCF_ERR_CONFIGURED, "migration_port"),
        (
            "autoset_utilization_cpu",
            "maybe",
            OCF_ERR_CONFIGURED,
            "autoset_utilization_cpu",
        ),
        (
            "monitor_scripts",
            "/nonexistent/check",
            OCF_ERR_INSTALLED,
            "/nonexistent/check",
        ),
    ] {
        let result = agent.action_with("validate-all", &[], &[(name, value)]);
        assert_eq!(result.code, code, "{name}={value}: {}", result.text());
        assert!(
            exit_reason(&result).contains(reason),
            "{name}: {}",
            result.text()
        );
    }

    // shutdown_mode=ctrl-alt-del: the guest gets Ctrl-Alt-Del, not the
    // power button, and powers off.
    agent.expect("start", OCF_SUCCESS);
    let mut guest_console = Console::connect(&console);
    guest_console.wait_for("counters:", SHORT);
    let stop = agent.action_with("stop", &[], &[("shutdown_mode", "ctrl-alt-del")]);
    assert_eq!(stop.code, OCF_SUCCESS, "{}", stop.text());
    guest_console.wait_for("testguest: ctrl-alt-del", SHORT);
    drop(guest_console);
    assert!(
        read_log(&log).contains("ctrl-alt-del; forced after")
            && read_log(&log).contains("stopped (vmm exited with code 0 (the guest powered off))"),
        "{}",
        read_log(&log)
    );

    // A shutdown_timeout longer than the stop timeout allows is cut to the
    // timeout minus 15 s: a guest that ignores the button is forced off in
    // time, and the log says why.
    let agent = agent_for(&path, &dir, &stubborn).param("shutdown_timeout", "600");
    agent.expect("start", OCF_SUCCESS);
    let started = Instant::now();
    let stop = agent.action_with("stop", &[("timeout", "20000")], &[]);
    let took = started.elapsed();
    assert_eq!(stop.code, OCF_SUCCESS, "{}", stop.text());
    assert!(
        took < Duration::from_secs(20),
        "the stop outlived its timeout: {took:?}"
    );
    assert!(
        read_log(&log).contains("shutdown_timeout 600 s does not fit in the stop timeout of 20 s"),
        "{}",
        read_log(&log)
    );
    eprintln!("stop of a guest that ignores the power button, stop timeout 20 s: {took:?}");

    // monitor_scripts: run by a recurring monitor (not by a probe) with the
    // guest's name; a failing one fails the monitor with its last line.
    let script = dir.join("check.sh");
    let flag = dir.join("unhealthy");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"checked $1\" >> {seen}\nif [ -e {flag} ]; then echo 'service down'; exit 1; fi\n",
            seen = dir.join("seen").display(),
            flag = flag.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let agent = agent_for(&path, &dir, &willing).param("monitor_scripts", &script);
    agent.expect("start", OCF_SUCCESS);
    assert_eq!(agent.monitor().code, OCF_SUCCESS);
    assert_eq!(read_log(&dir.join("seen")), "checked guest1\n");
    assert_eq!(agent.probe().code, OCF_SUCCESS);
    assert_eq!(
        read_log(&dir.join("seen")),
        "checked guest1\n",
        "a probe ran the script"
    );
    fs::write(&flag, "").unwrap();
    let failed = agent.monitor();
    assert_eq!(failed.code, OCF_ERR_GENERIC, "{}", failed.text());
    assert!(
        exit_reason(&failed).contains("check.sh failed (exit 1): service down"),
        "{}",
        failed.text()
    );
    agent.expect("stop", OCF_SUCCESS);
}

#[test]
fn agent_exit_reasons_never_come_from_the_guest_console() {
    require_kvm!();
    if skip_without(true, &["jq"]) {
        return;
    }
    let path = install_agent();
    let dir = TempDir::new("ocf-forged");
    let _reap = ReapVmms(dir.path().display().to_string());
    // The console on the VMM's stdout (the default): a guest prints what
    // looks like the VMM's own exit message.
    let config = dir.join("vm.json");
    let forged = "vmm: exiting: guest powered off";
    let json = serde_json::json!({
        "payload": {
            "kernel": testguest().display().to_string(),
            "cmdline": format!("-- echo {forged}"),
        },
    });
    fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let agent = agent_for(&path, &dir, &config);
    let log = dir.join("vm.log");
    let console_log = dir.join("vm.console.log");
    agent.expect("start", OCF_SUCCESS);
    wait_until(
        SHORT,
        "the guest prints its line",
        || read_log(&console_log).contains(forged).then_some(()),
        || read_log(&console_log),
    );
    assert!(
        !read_log(&log).contains(forged),
        "the console went into the VMM's log"
    );
    for file in [&log, &console_log] {
        let mode = fs::metadata(file).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}", file.display());
    }

    // The VMM is killed (no message of its own): the reason says so, and
    // nothing of what the guest printed.
    let pid = vmm_processes_with(&config.display().to_string())[0];
    signal(pid, libc::SIGKILL);
    let dead = wait_until(
        SHORT,
        "monitor notices the kill",
        || Some(agent.monitor()).filter(|r| r.code != OCF_SUCCESS),
        || read_log(&log),
    );
    assert_eq!(dead.code, OCF_NOT_RUNNING, "{}", dead.text());
    let reason = exit_reason(&dead);
    assert!(reason.contains("killed by signal 9"), "{}", dead.text());
    assert!(
        !reason.contains("powered off"),
        "fooled by the guest: {reason}"
    );

    // A guest that resets: the VMM's own message is in the reason.
    let json = serde_json::json!({
        "payload": {
            "kernel": testguest().display().to_string(),
            "cmdline": format!("-- echo {forged}; sleep ms=500; reset"),
        },
    });
    fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    agent.expect("start", OCF_SUCCESS);
    let reset = wait_until(
        SHORT,
        "monitor notices the reset",
        || Some(agent.monitor()).filter(|r| r.code != OCF_SUCCESS),
        || read_log(&log),
    );
    assert_eq!(reset.code, OCF_NOT_RUNNING, "{}", reset.text());
    let reason = exit_reason(&reset);
    assert!(
        reason.contains("code 3 (the guest reset itself); vmm: exiting:"),
        "{reason}"
    );
    assert!(
        !reason.contains("powered off"),
        "fooled by the guest: {reason}"
    );
    agent.expect("stop", OCF_SUCCESS);
}

/// What the migration sender relies on (it used to work around both):
/// `vmmctl migrate` reports this attempt's outcome, never the last one's, and
/// a source whose migration completed refuses another.
#[test]
fn the_vmm_behaviours_the_agent_used_to_work_around_are_fixed() {
    require_kvm!();
    let dir = TempDir::new("ocf-vmm-fixed");
    let (_target, listen) = vmm_tests::harness::Vmm::incoming(&dir, "fixed-token");
    let source_socket = dir.join("source.sock");
    let source = vmm_tests::harness::Vmm::boot_testguest(
        "-- counters period_ms=1000",
        &["--api-socket", source_socket.to_str().unwrap()],
    );
    source.wait_api(SHORT);
    let migrate = |destination: &str| {
        run(Command::new(vmmctl_binary())
            .args(["--json", "--api-socket", source_socket.to_str().unwrap()])
            .args(["migrate", destination, "--token", "fixed-token"]))
    };
    let failed = migrate(&format!("unix:{}", dir.join("nobody.sock").display()));
    assert_eq!(failed.code, 1, "{}", failed.text());
    assert!(
        failed.stdout.contains("cannot connect"),
        "{}",
        failed.text()
    );
    // The next attempt reports its own outcome.
    let done = migrate(&listen);
    assert_eq!(done.code, 0, "{}", done.text());
    let status: serde_json::Value = serde_json::from_str(&done.stdout).unwrap();
    assert_eq!(status["phase"], "completed", "{}", done.text());
    // The migrated source (it answers for a moment before exiting) refuses
    // another migration: it cannot resume a guest that runs elsewhere.
    let again = migrate(&listen);
    assert_eq!(again.code, 1, "{}", again.text());
    assert!(again.stderr.contains("migrated"), "{}", again.text());
}

#[test]
fn agent_migrates_in_pacemaker_order_and_a_failed_migration_keeps_the_source() {
    require_kvm!();
    if !is_root() {
        eprintln!("SKIP: needs root (/usr/lib/ocf)");
        return;
    }
    let path = install_agent();
    let dir = TempDir::new("ocf-migrate");
    let _reap = ReapVmms(dir.path().display().to_string());
    let disk = dir.join("disk.img");
    make_disk(&disk);
    write_token(&dir.join("token"), "the-right-token");
    write_token(&dir.join("wrong-token"), "not-the-token");
    let port = (46000 + std::process::id() % 1000).to_string();
    // Two "nodes" on one host: their own socket directory, console and log;
    // the same disk (a shared file) and token.
    let node = |n: &str| {
        let config = dir.join(&format!("{n}.json"));
        let console = dir.join(&format!("{n}.console"));
        write_config(&config, "pages mib=32", &console, Some(&disk));
        let agent = Agent::new(&path, "vm")
            .param("config", &config)
            .param("socket_dir", dir.join(&format!("run-{n}")))
            .param("log_file", dir.join(&format!("{n}.log")))
            .param("vmm_binary", vmm_binary())
            .param("vmmctl_binary", vmmctl_binary())
            .param("migration_token_file", dir.join("token"))
            .param("migration_port", &port)
            .param("migration_listen_address", "127.0.0.1")
            // VirtualDomain's cap in MiB/s, as vmmctl migrate --bandwidth.
            .param("migration_speed", "1000");
        (agent, console, dir.join(&format!("{n}.log")))
    };
    let (a, a_console, a_log) = node("a");
    let (b, b_console, b_log) = node("b");
    let logs = || {
        format!(
            "--- a ---\n{}\n--- b ---\n{}",
            read_log(&a_log),
            read_log(&b_log)
        )
    };
    let migrate_meta = |from: &'static str, to: &'static str| {
        [
            ("migrate_source", from),
            ("migrate_target", to),
            ("timeout", "120000"),
        ]
    };

    a.expect("start", OCF_SUCCESS);
    let mut console = Console::connect(&a_console);
    console.wait_for("pages: pass=", SHORT);
    drop(console);

    // Pacemaker's order: migrate_to on the source returns at once ...
    let started = Instant::now();
    let to = a.action_with("migrate_to", &migrate_meta("a", "localhost"), &[]);
    assert_eq!(to.code, OCF_SUCCESS, "{}\n{}", to.text(), logs());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "migrate_to blocked"
    );
    // ... the target is not listening yet (the sender retries) ...
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.monitor().code, OCF_SUCCESS, "the source runs on");
    // ... migrate_from on the target returns when the guest runs there ...
    let from = b.action_with("migrate_from", &migrate_meta("a", "localhost"), &[]);
    assert_eq!(from.code, OCF_SUCCESS, "{}\n{}", from.text(), logs());
    eprintln!("agent migration a -> b: {:?}", started.elapsed());
    assert!(
        read_log(&a_log).contains("(at most 1000Mi bytes/s)"),
        "{}",
        logs()
    );
    // ... and the stop on the source finds it gone: migrated, exit code 6.
    a.expect("stop", OCF_SUCCESS);
    assert!(
        read_log(&a_log).contains("exited with code 6"),
        "{}",
        logs()
    );
    assert_eq!(a.probe().code, OCF_NOT_RUNNING);
    assert_eq!(b.monitor().code, OCF_SUCCESS);
    let mut console = Console::connect(&b_console);
    let line = console.check_pages();
    eprintln!("after the move: {line}");

    // Back to a, whose incoming VMM has the wrong token: the migration fails,
    // migrate_from says so, and the guest runs on in b, memory intact.
    console.send("pages mib=32");
    console.wait_for("pages: start", SHORT);
    let to = b.action_with("migrate_to", &migrate_meta("b", "localhost"), &[]);
    assert_eq!(to.code, OCF_SUCCESS, "{}", to.text());
    std::thread::sleep(Duration::from_millis(300));
    let wrong = dir.join("wrong-token").display().to_string();
    let from = a.action_with(
        "migrate_from",
        &migrate_meta("b", "localhost"),
        &[("migration_token_file", &wrong)],
    );
    assert_eq!(from.code, OCF_ERR_GENERIC, "{}\n{}", from.text(), logs());
    assert!(
        exit_reason(&from).contains("migration from b failed"),
        "{}",
        from.text()
    );
    assert_eq!(
        a.probe().code,
        OCF_NOT_RUNNING,
        "nothing left on the target"
    );
    let state_file = dir.join("run-b").join("vm.migrate.state");
    let state = wait_until(
        SHORT,
        "the sender gives up",
        || {
            fs::read_to_string(&state_file)
                .ok()
                .filter(|s| s.starts_with("failed"))
        },
        logs,
    );
    assert!(state.contains("token"), "{state}");
    assert_eq!(b.monitor().code, OCF_SUCCESS, "{}", logs());
    let line = console.check_pages();
    eprintln!("after the failed move: {line}");
    drop(console);

    // What Pacemaker does next: stop everywhere.
    a.expect("stop", OCF_SUCCESS);
    b.expect("stop", OCF_SUCCESS);
    assert!(vmm_processes_with(&dir.path().display().to_string()).is_empty());
}

// ---------------------------------------------------------------------------
// A real three-node cluster in network namespaces, with fencing

/// One lab node: a network namespace and a holder process whose mount and
/// UTS namespaces give the node its own /run, /var/lib/pacemaker,
/// /var/log/pacemaker, /etc/hosts and host name.
struct LabNode {
    name: String,
    netns: String,
    dir: PathBuf,
    holder: Option<Child>,
    corosync: Option<Child>,
    pacemakerd: Option<Child>,
}

/// Two guest hosts (node1, node2) and a tie-breaker (node3) on one switch
/// (a bridge in a namespace of its own, so a node's link can be cut).
struct Lab {
    dir: TempDir,
    nodes: Vec<LabNode>,
    /// The namespace of the switch.
    switch: String,
    /// The node whose view `crm_mon` and `crm_resource` show (one that is
    /// up and connected).
    observer: usize,
    torn_down: bool,
    /// One lab at a time: two would share the machine's two cores with
    /// corosync's token timeout.
    _serial: std::sync::MutexGuard<'static, ()>,
}

const LAB_SUBNET: &str = "10.231.29";
/// How many nodes the lab has; the last one is the tie-breaker.
const LAB_NODES: usize = 3;
/// corosync's token timeout: a node that stays silent this long (plus
/// consensus, 1.2 times as long) is lost.
const LAB_TOKEN_MS: u64 = 3000;
static LAB_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
static FENCE_INSTALL: Once = Once::new();

/// Installs resources/lab/fence_netns where Pacemaker looks for fence agents.
fn install_fence_agent() {
    FENCE_INSTALL.call_once(|| {
        let target = Path::new("/usr/sbin/fence_netns");
        let staging = Path::new("/usr/sbin/.fence_netns.new");
        fs::copy(repo().join("resources/lab/fence_netns"), staging).unwrap();
        fs::set_permissions(staging, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(staging, target).unwrap();
    });
}

/// The tools a lab needs; prints SKIP and returns true if one is missing.
fn skip_without_lab() -> bool {
    if skip_without(
        true,
        &[
            "ip",
            "nsenter",
            "unshare",
            "corosync",
            "pacemakerd",
            "crm_mon",
            "crm_resource",
            "crm_attribute",
            "cibadmin",
            "stonith_admin",
            "jq",
        ],
    ) {
        return true;
    }
    if !Path::new(OCF_ROOT)
        .join("lib/heartbeat/ocf-shellfuncs")
        .exists()
    {
        eprintln!("SKIP: resource-agents is not installed (ocf-shellfuncs)");
        return true;
    }
    false
}

impl Lab {
    /// Builds the namespaces and the switch and starts corosync and
    /// pacemakerd on every node. On failure the guard (Drop) tears down
    /// whatever was built.
    fn up() -> Lab {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let dir = TempDir::new("cluster");
        let mut lab = Lab {
            nodes: (1..=LAB_NODES)
                .map(|i| LabNode {
                    name: format!("node{i}"),
                    netns: format!("vmmcl{i}-{tag}"),
                    dir: dir.join(&format!("node{i}")),
                    holder: None,
                    corosync: None,
                    pacemakerd: None,
                })
                .collect(),
            switch: format!("vmmclsw-{tag}"),
            dir,
            observer: 0,
            torn_down: false,
            _serial: serial,
        };
        // TempDir is 0700; the cluster daemons run as hacluster.
        fs::set_permissions(lab.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // corosync's shared key (what corosync-keygen writes: 256 random bytes).
        let mut key = vec![0u8; 256];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .expect("random bytes for the corosync key");
        let authkey = lab.dir.join("authkey");
        fs::write(&authkey, &key).unwrap();
        fs::set_permissions(&authkey, fs::Permissions::from_mode(0o400)).unwrap();
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for i in 1..=LAB_NODES {
            hosts += &format!("{LAB_SUBNET}.{i} node{i} node{i}-mig\n");
        }
        fs::write(lab.dir.join("hosts"), hosts).unwrap();

        // The network: a bridge in the switch's namespace, a veth from it
        // into each node (p<i> on the switch, eth0 in the node).
        let ip = tool_path("ip");
        run_ok(Command::new(&ip).args(["netns", "add", &lab.switch]));
        for node in &lab.nodes {
            run_ok(Command::new(&ip).args(["netns", "add", &node.netns]));
        }
        let sw = lab.switch.clone();
        run_ok(Command::new(&ip).args(["-n", &sw, "link", "add", "br0", "type", "bridge"]));
        run_ok(Command::new(&ip).args(["-n", &sw, "link", "set", "br0", "up"]));
        for (i, node) in lab.nodes.iter().enumerate() {
            let port = format!("p{}", i + 1);
            run_ok(Command::new(&ip).args([
                "-n",
                &sw,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &node.netns,
            ]));
            run_ok(Command::new(&ip).args(["-n", &sw, "link", "set", &port, "master", "br0"]));
            run_ok(Command::new(&ip).args(["-n", &sw, "link", "set", &port, "up"]));
            let address = format!("{LAB_SUBNET}.{}/24", i + 1);
            let ns = &node.netns;
            run_ok(Command::new(&ip).args(["-n", ns, "addr", "add", &address, "dev", "eth0"]));
            run_ok(Command::new(&ip).args(["-n", ns, "link", "set", "eth0", "up"]));
            run_ok(Command::new(&ip).args(["-n", ns, "link", "set", "lo", "up"]));
        }

        for i in 0..LAB_NODES {
            lab.write_node_files(i, &authkey);
        }
        for i in 0..LAB_NODES {
            lab.start_node(i);
        }
        lab
    }

    /// The node's private directories and its corosync.conf.
    fn write_node_files(&self, i: usize, authkey: &Path) {
        let dir = &self.nodes[i].dir;
        for sub in [
            "lib/cib",
            "lib/pengine",
            "lib/blackbox",
            "lib/cores",
            "log",
            "run/crm",
            "run/resource-agents",
            "run/lock",
            "corosync",
        ] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink("/dev/shm", dir.join("run/shm")).unwrap();
        run_ok(
            Command::new("chown")
                .args(["-R", "hacluster:haclient"])
                .arg(dir.join("lib"))
                .arg(dir.join("log"))
                .arg(dir.join("run/crm")),
        );
        for (sub, mode) in [
            ("lib/cib", 0o750),
            ("lib/pengine", 0o750),
            ("lib/blackbox", 0o750),
            ("lib/cores", 0o750),
            ("log", 0o770),
            ("run/crm", 0o750),
            ("run/resource-agents", 0o1755),
            ("run/lock", 0o1777),
        ] {
            fs::set_permissions(dir.join(sub), fs::Permissions::from_mode(mode)).unwrap();
        }
        let nodelist: String = (1..=LAB_NODES)
            .map(|n| {
                format!(
                    "  node {{\n    ring0_addr: {LAB_SUBNET}.{n}\n    name: node{n}\n    nodeid: {n}\n  }}\n"
                )
            })
            .collect();
        // Three votes, quorum two: the side with two nodes keeps quorum and
        // fences; a node alone loses it and stops its guests.
        let conf = format!(
            "totem {{\n  version: 2\n  cluster_name: vmmlab\n  transport: knet\n  \
             crypto_cipher: aes256\n  crypto_hash: sha256\n  keyfile: {key}\n  \
             token: {LAB_TOKEN_MS}\n}}\n\
             nodelist {{\n{nodelist}}}\n\
             quorum {{\n  provider: corosync_votequorum\n}}\n\
             logging {{\n  to_logfile: yes\n  logfile: {dir}/corosync.log\n  to_syslog: no\n  \
             to_stderr: no\n  timestamp: on\n}}\n\
             system {{\n  state_dir: {dir}/corosync\n}}\n",
            key = authkey.display(),
            dir = dir.display(),
        );
        fs::write(dir.join("corosync.conf"), conf).unwrap();
    }

    /// Starts node `i`: its holder, then corosync and pacemakerd. Also
    /// brings a node back after fencing ended all its processes.
    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        for child in [&mut node.holder, &mut node.corosync, &mut node.pacemakerd] {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let dir = self.nodes[i].dir.clone();
        let script = format!(
            "set -e; hostname {name}; \
             mount --bind {d}/lib /var/lib/pacemaker; \
             mount --bind {d}/log /var/log/pacemaker; \
             mount --bind {d}/run /run; \
             mount --bind {hosts} /etc/hosts; \
             exec sleep infinity",
            name = self.nodes[i].name,
            d = dir.display(),
            hosts = self.dir.join("hosts").display(),
        );
        let log = fs::File::create(dir.join("holder.log")).unwrap();
        let holder = Command::new(tool_path("ip"))
            .args(["netns", "exec", &self.nodes[i].netns])
            .arg(tool_path("unshare"))
            .args([
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "bash",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("the namespace holder starts");
        let pid = holder.id();
        self.nodes[i].holder = Some(holder);
        wait_until(
            SHORT,
            "the namespace holder is ready",
            || {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .ok()
                    .filter(|c| c.trim() == "sleep")
            },
            || read_log(&dir.join("holder.log")),
        );
        let conf = dir.join("corosync.conf");
        let corosync = self.spawn_on(
            i,
            "corosync.out",
            &[],
            &[
                tool_path("corosync").as_os_str(),
                "-f".as_ref(),
                "-c".as_ref(),
                conf.as_os_str(),
            ],
        );
        self.nodes[i].corosync = Some(corosync);
        std::thread::sleep(Duration::from_millis(500));
        let logfile = dir.join("pacemaker.log");
        let pacemakerd = self.spawn_on(
            i,
            "pacemakerd.out",
            &[("PCMK_logfile", logfile.as_os_str())],
            &[tool_path("pacemakerd").as_os_str()],
        );
        self.nodes[i].pacemakerd = Some(pacemakerd);
    }

    fn holder_pid(&self, i: usize) -> u32 {
        self.nodes[i].holder.as_ref().expect("holder").id()
    }

    /// Whether node `i`'s holder still lives (fencing kills it).
    fn node_alive(&mut self, i: usize) -> bool {
        matches!(
            self.nodes[i].holder.as_mut().map(|c| c.try_wait()),
            Some(Ok(None))
        )
    }

    fn nsenter(&self, i: usize) -> Command {
        let mut command = Command::new(tool_path("nsenter"));
        command
            .arg("-t")
            .arg(self.holder_pid(i).to_string())
            .args(["--net", "--mount", "--uts", "--"]);
        command
    }

    /// Starts a daemon on node `i`, detached (own process group), output to a file.
    fn spawn_on(
        &self,
        i: usize,
        out: &str,
        env: &[(&str, &std::ffi::OsStr)],
        argv: &[&std::ffi::OsStr],
    ) -> Child {
        let log = fs::File::create(self.nodes[i].dir.join(out)).unwrap();
        let mut command = self.nsenter(i);
        command
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        for (k, v) in env {
            command.env(k, v);
        }
        command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?}: {e}"))
    }

    /// Runs a command on node `i`.
    fn on(&self, i: usize, argv: &[&str]) -> Run {
        let mut command = self.nsenter(i);
        command.arg(tool_path(argv[0])).args(&argv[1..]);
        run(&mut command)
    }

    fn on_ok(&self, i: usize, argv: &[&str]) -> Run {
        let result = self.on(i, argv);
        assert_eq!(
            result.code,
            0,
            "{argv:?} on node{}:\n{}\n{}",
            i + 1,
            result.text(),
            self.report()
        );
        result
    }

    /// Runs a command on the observer node.
    fn cluster(&self, argv: &[&str]) -> Run {
        self.on_ok(self.observer, argv)
    }

    fn crm_mon(&self) -> String {
        self.on(self.observer, &["crm_mon", "-1"]).stdout
    }

    /// Waits until crm_mon shows exactly `nodes` online.
    fn wait_online(&self, nodes: &[&str], timeout: Duration) -> Duration {
        let started = Instant::now();
        let want = format!("Online: [ {} ]", nodes.join(" "));
        wait_until(
            timeout,
            &format!("{want} in crm_mon"),
            || self.crm_mon().contains(&want).then_some(()),
            || self.report(),
        );
        started.elapsed()
    }

    /// Whether crm_mon shows the guest settled as started on `node`
    /// (not starting, not migrating), and crm_resource agrees.
    fn started_on(&self, node: &str) -> bool {
        let mon = self.crm_mon();
        let line = mon
            .lines()
            .find(|l| l.contains(&format!("(ocf:{PROVIDER}:vmm)")));
        line.is_some_and(|l| l.trim_end().ends_with(&format!("Started {node}")))
            && self.locate().ends_with(&format!("running on: {node}"))
    }

    fn locate(&self) -> String {
        let r = self.on(
            self.observer,
            &["crm_resource", "--locate", "--resource", "vm"],
        );
        format!("{}{}", r.stdout, r.stderr).trim().to_string()
    }

    /// Sets a cluster property.
    fn property(&self, name: &str, value: &str) {
        self.cluster(&[
            "crm_attribute",
            "--type",
            "crm_config",
            "--name",
            name,
            "--update",
            value,
        ]);
    }

    /// Sets the guest's target-role.
    fn target_role(&self, role: &str) {
        self.cluster(&[
            "crm_resource",
            "--resource",
            "vm",
            "--meta",
            "--set-parameter",
            "target-role",
            "--parameter-value",
            role,
        ]);
    }

    /// Cuts node `i`'s only link to the others (its switch port goes down:
    /// the node sees its carrier drop, as with a pulled cable).
    fn cut(&self, i: usize) {
        let port = format!("p{}", i + 1);
        run_ok(Command::new(tool_path("ip")).args([
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "down",
        ]));
    }

    fn reconnect(&self, i: usize) {
        let port = format!("p{}", i + 1);
        run_ok(Command::new(tool_path("ip")).args([
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "up",
        ]));
    }

    /// A node's file under its private /run (e.g. `vmm/vm.log`).
    fn run_file(&self, i: usize, path: &str) -> PathBuf {
        self.nodes[i].dir.join("run").join(path)
    }

    fn vm_log(&self, i: usize) -> String {
        read_log(&self.run_file(i, "vmm/vm.log"))
    }

    fn vm_pid(&self, i: usize) -> Option<u32> {
        fs::read_to_string(self.run_file(i, "vmm/vm.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// What to look at when a step fails.
    fn report(&self) -> String {
        let tail = |p: PathBuf, n: usize| {
            let text = read_log(&p);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let mut s = format!(
            "--- crm_mon (node{}) ---\n{}",
            self.observer + 1,
            self.crm_mon()
        );
        for i in 0..self.nodes.len() {
            s += &format!(
                "\n--- node{n} vm.log ---\n{}\n--- node{n} pacemaker.log (agent, fencing, errors) ---\n{}",
                tail(self.run_file(i, "vmm/vm.log"), 30),
                tail(
                    self.nodes[i].dir.join("pacemaker.log"),
                    100_000
                )
                .lines()
                .filter(|l| l.contains("vmm(")
                    || l.contains("ocf-exit-reason")
                    || l.contains("fence")
                    || l.contains("error"))
                .collect::<Vec<_>>()
                .join("\n"),
                n = i + 1,
            );
        }
        s
    }

    /// The inode of a namespace's nsfs file, as /proc/PID/ns/net shows it.
    fn netns_inode(netns: &str) -> Option<u64> {
        fs::metadata(Path::new("/run/netns").join(netns))
            .ok()
            .map(|m| m.ino())
    }

    /// Pids of every process inside the lab's network namespaces.
    fn processes_inside(&self) -> Vec<u32> {
        let links: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.netns.as_str())
            .chain([self.switch.as_str()])
            .filter_map(Self::netns_inode)
            .map(|ino| format!("net:[{ino}]"))
            .collect();
        if links.is_empty() {
            return Vec::new();
        }
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(link) = fs::read_link(format!("/proc/{pid}/ns/net")) {
                if links.iter().any(|l| Path::new(l) == link) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    fn wait_children(children: &mut [&mut Option<Child>], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut running = false;
            for child in children.iter_mut() {
                if let Some(c) = child.as_mut() {
                    match c.try_wait() {
                        Ok(Some(_)) | Err(_) => **child = None,
                        Ok(None) => running = true,
                    }
                }
            }
            if !running {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops pacemakerd, then corosync (TERM, then KILL), kills everything
    /// left in the namespaces (holders, agents' VMMs), deletes the
    /// namespaces. Idempotent; runs from Drop when a step panics.
    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // Nodes whose link a failed test left cut would wait for quorum.
        for i in 0..self.nodes.len() {
            let _ = Command::new(tool_path("ip"))
                .args([
                    "-n",
                    &self.switch,
                    "link",
                    "set",
                    &format!("p{}", i + 1),
                    "up",
                ])
                .stderr(Stdio::null())
                .status();
        }
        for (daemon, grace) in [("pacemakerd", 30), ("corosync", 20)] {
            let mut children: Vec<&mut Option<Child>> = self
                .nodes
                .iter_mut()
                .map(|n| {
                    if daemon == "pacemakerd" {
                        &mut n.pacemakerd
                    } else {
                        &mut n.corosync
                    }
                })
                .collect();
            for child in children.iter_mut() {
                if let Some(c) = child.as_mut() {
                    if let Ok(None) = c.try_wait() {
                        signal(c.id(), libc::SIGTERM);
                    }
                }
            }
            if !Self::wait_children(&mut children, Duration::from_secs(grace)) {
                eprintln!("lab teardown: {daemon} ignored SIGTERM; killing it");
                for child in children.iter_mut() {
                    if let Some(c) = child.as_mut() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    **child = None;
                }
            }
        }
        // Whatever still lives in the namespaces: pacemaker's children if
        // pacemakerd had to be killed, VMMs, the holders.
        for _ in 0..50 {
            let pids = self.processes_inside();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                signal(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for node in &mut self.nodes {
            if let Some(mut holder) = node.holder.take() {
                let _ = holder.kill();
                let _ = holder.wait();
            }
        }
        let leftover = self.processes_inside();
        if !leftover.is_empty() {
            eprintln!("lab teardown: processes survive in the namespaces: {leftover:?}");
        }
        for netns in self
            .nodes
            .iter()
            .map(|n| n.netns.as_str())
            .chain([self.switch.as_str()])
        {
            let _ = Command::new("ip")
                .args(["netns", "del", netns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The guest of the lab: the test guest with a disk, its config, token and
/// disk in a directory every node sees; console, API socket and log under
/// each node's private /run/vmm.
struct LabGuest {
    config: PathBuf,
    disk: PathBuf,
    token: PathBuf,
    /// While this file exists, the fence device fails.
    fence_fails: PathBuf,
}

impl LabGuest {
    fn new(lab: &Lab, commands: &str) -> LabGuest {
        let shared = lab.dir.join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        let disk = shared.join("disk.img");
        make_disk(&disk);
        let config = shared.join("vm.json");
        write_config(
            &config,
            commands,
            Path::new("/run/vmm/vm.console"),
            Some(&disk),
        );
        let token = shared.join("token");
        write_token(&token, "lab-migration-token");
        LabGuest {
            config,
            disk,
            token,
            fence_fails: shared.join("fence-fails"),
        }
    }
}

/// Configures the lab cluster as the architecture asks: fencing on (a
/// fence_netns device for every node), no-quorum-policy=stop, guests never
/// on the tie-breaker (node3), preferring node1, staying where they run;
/// then waits for every node online. The guest is created stopped.
fn configure_lab(lab: &Lab, guest: &LabGuest) {
    install_fence_agent();
    let online = lab.wait_online(&["node1", "node2", "node3"], Duration::from_secs(120));
    eprintln!("cluster: all three nodes online {online:?} after the start");
    for (name, value) in [
        ("stonith-enabled", "true"),
        ("stonith-action", "off"),
        ("no-quorum-policy", "stop"),
        // A failing fence device is retried until it works (the default,
        // 10, would give up on the target during a test of failures).
        ("stonith-max-attempts", "1000"),
    ] {
        lab.property(name, value);
    }
    let host_map: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| format!("{}:{}", n.name, Lab::netns_inode(&n.netns).unwrap()))
        .collect();
    let fence = format!(
        "<primitive id='fence-lab' class='stonith' type='fence_netns'>\
           <instance_attributes id='fence-lab-params'>\
             <nvpair id='fence-lab-map' name='pcmk_host_map' value='{map}'/>\
             <nvpair id='fence-lab-fail' name='fail_if_exists' value='{fail}'/>\
           </instance_attributes>\
           <operations>\
             <op id='fence-lab-monitor' name='monitor' interval='60s'/>\
           </operations>\
         </primitive>",
        map = host_map.join(";"),
        fail = guest.fence_fails.display(),
    );
    let primitive = format!(
        "<primitive id='vm' class='ocf' provider='{PROVIDER}' type='vmm'>\
           <instance_attributes id='vm-params'>\
             <nvpair id='vm-config' name='config' value='{config}'/>\
             <nvpair id='vm-vmm' name='vmm_binary' value='{vmm}'/>\
             <nvpair id='vm-vmmctl' name='vmmctl_binary' value='{vmmctl}'/>\
             <nvpair id='vm-log' name='log_file' value='/run/vmm/vm.log'/>\
             <nvpair id='vm-token' name='migration_token_file' value='{token}'/>\
             <nvpair id='vm-suffix' name='migration_network_suffix' value='-mig'/>\
             <nvpair id='vm-util-cpu' name='autoset_utilization_cpu' value='true'/>\
             <nvpair id='vm-util-mem' name='autoset_utilization_hv_memory' value='true'/>\
           </instance_attributes>\
           <meta_attributes id='vm-meta'>\
             <nvpair id='vm-allow-migrate' name='allow-migrate' value='true'/>\
             <nvpair id='vm-target-role' name='target-role' value='Stopped'/>\
             <nvpair id='vm-stickiness' name='resource-stickiness' value='100'/>\
           </meta_attributes>\
           <operations>\
             <op id='vm-monitor' name='monitor' interval='2s' timeout='30s'/>\
             <op id='vm-start' name='start' interval='0s' timeout='90s'/>\
             <op id='vm-stop' name='stop' interval='0s' timeout='90s'/>\
             <op id='vm-migrate_to' name='migrate_to' interval='0s' timeout='120s'/>\
             <op id='vm-migrate_from' name='migrate_from' interval='0s' timeout='120s'/>\
           </operations>\
         </primitive>",
        config = guest.config.display(),
        vmm = vmm_binary().display(),
        vmmctl = vmmctl_binary().display(),
        token = guest.token.display(),
    );
    for xml in [fence, primitive] {
        lab.cluster(&[
            "cibadmin",
            "--create",
            "-o",
            "resources",
            "--xml-text",
            &xml,
        ]);
    }
    for xml in [
        "<rsc_location id='vm-prefers-node1' rsc='vm' node='node1' score='50'/>",
        // The tie-breaker only votes.
        "<rsc_location id='vm-never-on-node3' rsc='vm' node='node3' score='-INFINITY'/>",
    ] {
        lab.cluster(&[
            "cibadmin",
            "--create",
            "-o",
            "constraints",
            "--xml-text",
            xml,
        ]);
    }
}

#[test]
fn three_node_cluster_live_migrates_recovers_and_keeps_guests_off_the_tie_breaker() {
    require_kvm!();
    if skip_without_lab() {
        return;
    }
    let agent = install_agent();
    assert!(agent.exists());
    let test_start = Instant::now();
    let mut lab = Lab::up();
    let lab_dir = lab.dir.path().display().to_string();
    let guest = LabGuest::new(&lab, "pages mib=32");
    configure_lab(&lab, &guest);

    // (1) The guest starts on node1; the agent sets its utilization from
    // the config (2 vCPUs, 128 MiB).
    let step = Instant::now();
    lab.target_role("Started");
    wait_until(
        Duration::from_secs(60),
        "vm started on node1",
        || lab.started_on("node1").then_some(()),
        || lab.report(),
    );
    let mut console = Console::connect(&lab.run_file(0, "vmm/vm.console"));
    console.send("echo hello from node1");
    console.wait_for("hello from node1", SHORT);
    let before = console.wait_for("pages: pass=", SHORT);
    drop(console);
    assert!(
        lab.vm_log(0).contains("started: vmm pid"),
        "{}",
        lab.report()
    );
    for (name, value) in [("cpu", "2"), ("hv_memory", "128")] {
        let got = wait_until(
            SHORT,
            &format!("utilization {name}"),
            || {
                let r = lab.on(
                    lab.observer,
                    &[
                        "crm_resource",
                        "--quiet",
                        "--resource",
                        "vm",
                        "--utilization",
                        "--get-parameter",
                        name,
                    ],
                );
                (r.code == 0).then(|| r.stdout.trim().to_string())
            },
            || lab.report(),
        );
        assert_eq!(got, value, "utilization {name}");
    }
    eprintln!(
        "cluster: (1) started on node1 in {:?}; {before}",
        step.elapsed()
    );

    // (2) crm_resource --move live-migrates it to node2: migrate_to on node1,
    // migrate_from on node2, the source exits "migrated", no restart.
    let step = Instant::now();
    lab.cluster(&[
        "crm_resource",
        "--move",
        "--resource",
        "vm",
        "--node",
        "node2",
    ]);
    wait_until(
        Duration::from_secs(90),
        "vm migrated to node2",
        || lab.started_on("node2").then_some(()),
        || lab.report(),
    );
    let moved = step.elapsed();
    wait_until(
        SHORT,
        "the source VMM exits with code 6",
        || lab.vm_log(0).contains("exited with code 6").then_some(()),
        || lab.report(),
    );
    let (log1, log2) = (lab.vm_log(0), lab.vm_log(1));
    assert!(
        log1.contains("vmm-ocf[migrate_to]: migrating to node2 at tcp:node2-mig:"),
        "{}",
        lab.report()
    );
    assert!(
        log1.contains(
            "vmm-ocf[stop]: stopped (vmm exited with code 6 (the guest was migrated away))"
        ),
        "{}",
        lab.report()
    );
    assert!(
        log2.contains("vmm-ocf[migrate_from]: migration from node1 completed"),
        "{}",
        lab.report()
    );
    assert!(
        !log2.contains("vmm-ocf[start]"),
        "node2 restarted the guest instead of receiving it:\n{}",
        lab.report()
    );
    assert!(
        vmm_processes_with(&lab_dir).len() == 1,
        "one VMM after the move: {}",
        lab.report()
    );
    let mut console = Console::connect(&lab.run_file(1, "vmm/vm.console"));
    let after = console.wait_for("pages: pass=", SHORT);
    let verdict = console.check_pages();
    drop(console);
    lab.cluster(&["crm_resource", "--clear", "--resource", "vm"]);
    eprintln!("cluster: (2) live-migrated node1 -> node2 in {moved:?}; {after}; {verdict}");

    // (3) A VMM killed with SIGKILL: monitor notices, Pacemaker restarts it
    // in place (a failed resource, not a lost node: no fencing).
    let step = Instant::now();
    let old = lab.vm_pid(1).expect("node2 has a pid file");
    assert!(process_alive(old));
    signal(old, libc::SIGKILL);
    let new = wait_until(
        Duration::from_secs(60),
        "vm recovered on node2",
        || {
            let pid = lab.vm_pid(1).filter(|p| *p != old && process_alive(*p))?;
            lab.started_on("node2").then_some(pid)
        },
        || lab.report(),
    );
    let mon = lab.crm_mon();
    assert!(
        mon.contains("killed by signal 9"),
        "the failure and its reason show in crm_mon:\n{mon}"
    );
    assert!(!process_alive(old));
    let mut console = Console::connect(&lab.run_file(1, "vmm/vm.console"));
    console.send("echo hello again");
    console.wait_for("hello again", SHORT);
    drop(console);
    lab.cluster(&["crm_resource", "--cleanup", "--resource", "vm"]);
    eprintln!(
        "cluster: (3) SIGKILLed pid {old} replaced by pid {new} in {:?}",
        step.elapsed()
    );

    // (4) Both guest hosts in standby: the guest stops rather than go to
    // the tie-breaker; back from standby, it runs on a guest host again.
    let step = Instant::now();
    for node in ["node1", "node2"] {
        lab.cluster(&[
            "crm_attribute",
            "--node",
            node,
            "--name",
            "standby",
            "--update",
            "on",
        ]);
    }
    wait_until(
        Duration::from_secs(60),
        "vm stopped with both hosts in standby",
        || {
            (lab.locate().contains("NOT running") && vmm_processes_with(&lab_dir).is_empty())
                .then_some(())
        },
        || lab.report(),
    );
    // The scheduler has settled (nothing pending) and still leaves it off node3.
    std::thread::sleep(Duration::from_secs(3));
    assert!(lab.locate().contains("NOT running"), "{}", lab.report());
    assert!(vmm_processes_with(&lab_dir).is_empty(), "{}", lab.report());
    assert!(
        !lab.vm_log(2).contains("vmm-ocf[start]"),
        "the tie-breaker started the guest:\n{}",
        lab.report()
    );
    lab.cluster(&[
        "crm_attribute",
        "--node",
        "node2",
        "--name",
        "standby",
        "--update",
        "off",
    ]);
    wait_until(
        Duration::from_secs(60),
        "vm back on node2",
        || lab.started_on("node2").then_some(()),
        || lab.report(),
    );
    lab.cluster(&[
        "crm_attribute",
        "--node",
        "node1",
        "--name",
        "standby",
        "--update",
        "off",
    ]);
    eprintln!(
        "cluster: (4) both hosts in standby: stopped, not moved to the tie-breaker; back in {:?}",
        step.elapsed()
    );

    // (5) target-role=Stopped stops it; no VMM remains.
    let step = Instant::now();
    lab.target_role("Stopped");
    wait_until(
        Duration::from_secs(60),
        "vm stopped",
        || {
            (lab.locate().contains("NOT running") && vmm_processes_with(&lab_dir).is_empty())
                .then_some(())
        },
        || lab.report(),
    );
    assert!(
        lab.vm_log(1)
            .contains("stopped (vmm exited with code 0 (the guest powered off))"),
        "{}",
        lab.report()
    );
    eprintln!("cluster: (5) stopped in {:?}", step.elapsed());

    // (6) Teardown leaves no namespace and no process.
    let step = Instant::now();
    let netns: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| n.netns.clone())
        .chain([lab.switch.clone()])
        .collect();
    let daemons: Vec<u32> = lab
        .nodes
        .iter()
        .flat_map(|n| {
            [
                n.holder.as_ref(),
                n.corosync.as_ref(),
                n.pacemakerd.as_ref(),
            ]
        })
        .flatten()
        .map(Child::id)
        .collect();
    lab.teardown();
    let listed = run_ok(Command::new(tool_path("ip")).args(["netns", "list"])).stdout;
    for ns in &netns {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "namespace {ns} survives"
        );
    }
    for pid in daemons {
        assert!(!process_alive(pid), "pid {pid} survives the teardown");
    }
    assert!(vmm_processes_with(&lab_dir).is_empty());
    eprintln!(
        "cluster: (6) torn down in {:?}; whole test {:?}",
        step.elapsed(),
        test_start.elapsed()
    );
}

/// What a watcher saw while it ran.
#[derive(Debug, Default)]
struct WatchReport {
    samples: u64,
    /// The most VMM processes of the guest seen at once.
    most_vmms: usize,
    /// The most locks on the guest's disk seen at once (/proc/locks).
    most_locks: usize,
    /// Moments something was wrong, with what was seen.
    violations: Vec<String>,
}

/// Checks, every 50 ms until stopped, that at most one VMM process of the
/// guest exists (by processes: argv mentions the lab directory) and that the
/// disk's lock is held by at most one process, and only by that VMM
/// (/proc/locks for the inode, /proc/PID/fdinfo for the holder).
fn watch_single_copy(
    lab_dir: String,
    disk: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<WatchReport> {
    let inode = fs::metadata(disk).unwrap().ino();
    std::thread::spawn(move || {
        let mut report = WatchReport::default();
        let needle = format!(":{inode} ");
        // Consecutive samples with a lock no VMM holds.
        let mut unexplained = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let vmms = vmm_processes_with(&lab_dir);
            let locks = fs::read_to_string("/proc/locks")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&needle))
                .count();
            let holders: Vec<u32> = vmms
                .iter()
                .copied()
                .filter(|pid| {
                    fs::read_dir(format!("/proc/{pid}/fdinfo"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|fd| read_log(&fd.path()).contains(&needle))
                })
                .collect();
            report.samples += 1;
            report.most_vmms = report.most_vmms.max(vmms.len());
            report.most_locks = report.most_locks.max(locks);
            let line = format!(
                "vmm pids {vmms:?}, {locks} lock(s) on the disk, held by vmm pids {holders:?}"
            );
            if vmms.len() > 1 || locks > 1 {
                report.violations.push(line);
            } else if holders.len() < locks {
                // A lock whose holder is not (or no longer) a running VMM:
                // a killed VMM's lock outlives its /proc/PID/cmdline for the
                // moment its exit takes (its memory is unmapped first). Only a
                // lock that stays so for half a second counts.
                unexplained.push(line);
                if unexplained.len() >= 10 {
                    report.violations.append(&mut unexplained);
                }
            } else {
                unexplained.clear();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        report
    })
}

#[test]
fn a_node_that_loses_its_link_is_fenced_and_its_guest_restarts_on_the_other_host() {
    require_kvm!();
    if skip_without_lab() {
        return;
    }
    install_agent();
    let test_start = Instant::now();
    let mut lab = Lab::up();
    let lab_dir = lab.dir.path().display().to_string();
    let guest = LabGuest::new(&lab, "counters period_ms=1000");
    configure_lab(&lab, &guest);
    lab.target_role("Started");
    wait_until(
        Duration::from_secs(60),
        "vm started on node1",
        || lab.started_on("node1").then_some(()),
        || lab.report(),
    );
    // The guest writes its disk and flushes: that must survive the node.
    let write = |lab: &Lab, i: usize, pattern: &str| {
        let mut console = Console::connect(&lab.run_file(i, "vmm/vm.console"));
        console.send(&format!("blk-write sector=0 count=256 pattern={pattern}"));
        let line = console.wait_for("blk: write", SHORT);
        assert!(line.contains("status=ok"), "{line}");
        console.send("blk-flush");
        let line = console.wait_for("blk: flush", SHORT);
        assert!(line.contains("status=ok"), "{line}");
    };
    let check = |lab: &Lab, i: usize, pattern: &str| {
        let mut console = Console::connect(&lab.run_file(i, "vmm/vm.console"));
        console.send(&format!("blk-read sector=0 count=256 pattern={pattern}"));
        let line = console.wait_for("blk-read", SHORT);
        assert!(line.starts_with("blk-read-ok"), "{line}");
        line
    };
    write(&lab, 0, "5a17");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_single_copy(lab_dir.clone(), &guest.disk, stop.clone());

    // (1) node1 (running the guest) loses its link. node2 and node3 keep
    // quorum, fence node1 (every process of its namespace ends) and start
    // the guest on node2 from the shared disk.
    lab.observer = 1;
    let lost = Instant::now();
    lab.cut(0);
    wait_until(
        Duration::from_secs(120),
        "the guest runs on node2",
        || lab.started_on("node2").then_some(()),
        || lab.report(),
    );
    let failover = lost.elapsed();
    assert!(
        !lab.node_alive(0),
        "node1 was not fenced:\n{}",
        lab.report()
    );
    let history = lab.cluster(&["stonith_admin", "--history", "node1"]).stdout;
    assert!(
        history.contains("off of node1 successful"),
        "fencing history:\n{history}"
    );
    let verdict = check(&lab, 1, "5a17");
    eprintln!(
        "cluster: (1) node1 lost its link; fenced; the guest runs on node2 {failover:?} after the loss \
         (token {LAB_TOKEN_MS} ms); disk: {verdict}"
    );

    // node1 comes back (powered on, link restored) and rejoins; the guest
    // stays where it runs.
    let step = Instant::now();
    lab.reconnect(0);
    lab.start_node(0);
    lab.wait_online(&["node1", "node2", "node3"], Duration::from_secs(120));
    assert!(lab.started_on("node2"), "{}", lab.report());
    eprintln!("cluster: node1 rejoined in {:?}", step.elapsed());
    write(&lab, 1, "be11");

    // (2) node2 loses its link while the fence device fails. Alone, node2
    // has no quorum and stops its guest itself (no-quorum-policy=stop); the
    // others cannot fence it and so do not start the guest; once fencing
    // works, they do.
    fs::write(&guest.fence_fails, "").unwrap();
    lab.observer = 0;
    let logged = lab.vm_log(1).len();
    let lost = Instant::now();
    lab.cut(1);
    wait_until(
        Duration::from_secs(90),
        "node2 stops its guest without quorum",
        || vmm_processes_with(&lab_dir).is_empty().then_some(()),
        || lab.report(),
    );
    let stopped = lost.elapsed();
    assert!(lab.node_alive(1), "node2 was fenced although fencing fails");
    // node2's own agent stopped it (its last note follows the VMM's exit).
    wait_until(
        SHORT,
        "node2's agent reports the stop",
        || {
            lab.vm_log(1)[logged..]
                .contains("vmm-ocf[stop]: stopped")
                .then_some(())
        },
        || lab.vm_log(1),
    );
    // The survivors try to fence node2 and keep failing: no guest anywhere.
    wait_until(
        Duration::from_secs(60),
        "a failed fencing attempt",
        || {
            let mon = lab.crm_mon();
            let failed = mon.split("Failed Fencing Actions:").nth(1).unwrap_or("");
            failed
                .lines()
                .any(|l| l.contains("off of node2") && l.contains("failed"))
                .then_some(())
        },
        || lab.report(),
    );
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(8) {
        assert!(
            vmm_processes_with(&lab_dir).is_empty(),
            "a guest started while node2 is not fenced:\n{}",
            lab.report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lab.node_alive(1));
    eprintln!(
        "cluster: (2) node2 alone without quorum stopped its guest {stopped:?} after the loss; \
         unfenced, no node started it"
    );
    fs::remove_file(&guest.fence_fails).unwrap();
    let fencing_works = Instant::now();
    wait_until(
        Duration::from_secs(120),
        "the guest runs on node1 once node2 is fenced",
        || lab.started_on("node1").then_some(()),
        || lab.report(),
    );
    assert!(
        !lab.node_alive(1),
        "node2 was not fenced:\n{}",
        lab.report()
    );
    let verdict = check(&lab, 0, "be11");
    eprintln!(
        "cluster: (2) fencing restored: node2 fenced, the guest runs on node1 {:?} later; disk: {verdict}",
        fencing_works.elapsed()
    );

    // (3) Never two copies: the watcher saw at most one VMM and one lock.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let report = watcher.join().unwrap();
    assert!(
        report.violations.is_empty(),
        "two copies of the guest: {:?}",
        report.violations
    );
    assert!(
        report.samples > 100 && report.most_vmms == 1 && report.most_locks == 1,
        "the watcher saw nothing: {report:?}"
    );
    assert!(
        !lab.vm_log(2).contains("vmm-ocf[start]"),
        "the tie-breaker started the guest:\n{}",
        lab.report()
    );
    eprintln!(
        "cluster: (3) {} samples, at most {} VMM and {} lock at a time; whole test {:?}",
        report.samples,
        report.most_vmms,
        report.most_locks,
        test_start.elapsed()
    );
    lab.teardown();
}

// ---------------------------------------------------------------------------
// The DRBD and LVM recipes, offline

fn example(name: &str) -> PathBuf {
    repo().join("resources/ocf/examples").join(name)
}

/// `crm_verify -x FILE` with nothing to say.
fn verify_clean(file: &Path) {
    run_ok(Command::new(tool_path("xmllint")).arg("--noout").arg(file));
    let result = run(Command::new(tool_path("crm_verify")).arg("-x").arg(file));
    assert!(
        result.code == 0 && result.stdout.trim().is_empty() && result.stderr.trim().is_empty(),
        "crm_verify -x {} is not clean:\n{}",
        file.display(),
        result.text()
    );
}

/// A simulated transition: the summary lines and the executed actions.
struct Transition {
    summary: Vec<String>,
    actions: Vec<String>,
    text: String,
}

impl Transition {
    /// Lines of the summary / the executed actions that mention `resource`.
    fn summary_of(&self, resource: &str) -> Vec<&str> {
        self.summary
            .iter()
            .map(String::as_str)
            .filter(|l| l.split_whitespace().nth(2) == Some(resource))
            .collect()
    }

    /// `(action, node)` of the resource actions of `resource`, e.g. `("migrate_to", "node1")`.
    fn actions_of(&self, resource: &str) -> Vec<(String, String)> {
        self.actions
            .iter()
            .filter_map(|l| {
                let rest = l.trim().strip_prefix("* Resource action:")?;
                let mut words = rest.split_whitespace();
                if words.next()? != resource {
                    return None;
                }
                let action = words.next()?.to_string();
                let node = words.nth(1)?.to_string(); // "<action> on <node>"
                Some((action, node))
            })
            .collect()
    }
}

/// `crm_simulate -S -x FILE -O OUT`, parsed.
fn simulate(file: &Path, out: &Path) -> Transition {
    let result = run_ok(
        Command::new(tool_path("crm_simulate"))
            .arg("-S")
            .arg("-x")
            .arg(file)
            .arg("-O")
            .arg(out),
    );
    let mut summary = Vec::new();
    let mut actions = Vec::new();
    let mut section = "";
    for line in result.stdout.lines() {
        if line.starts_with("Transition Summary:") {
            section = "summary";
        } else if line.starts_with("Executing Cluster Transition:") {
            section = "actions";
        } else if line.starts_with("Revised Cluster Status:") {
            section = "";
        } else if line.trim_start().starts_with('*') {
            match section {
                "summary" => summary.push(line.trim().to_string()),
                "actions" => actions.push(line.trim().to_string()),
                _ => {}
            }
        }
    }
    Transition {
        summary,
        actions,
        text: result.stdout,
    }
}

/// The node an initial transition started `resource` on.
fn started_on(t: &Transition, resource: &str) -> String {
    t.actions_of(resource)
        .into_iter()
        .find(|(action, _)| action == "start")
        .map(|(_, node)| node)
        .unwrap_or_else(|| panic!("{resource} was not started:\n{}", t.text))
}

/// Starts the recipe's resources, then moves `vm` to the other node:
/// returns the move's transition and the two nodes.
fn simulate_move(
    file: &Path,
    dir: &TempDir,
    promotion_scores: Option<&str>,
) -> (Transition, String, String) {
    let state0 = dir.join("state0.xml");
    fs::copy(file, &state0).unwrap();
    if let Some(resource) = promotion_scores {
        // What the drbd agent reports when both disks are UpToDate.
        for node in ["node1", "node2"] {
            run_ok(
                Command::new(tool_path("crm_attribute"))
                    .args([
                        "--node",
                        node,
                        "--name",
                        &format!("master-{resource}"),
                        "--update",
                        "10000",
                        "--lifetime",
                        "reboot",
                    ])
                    .env("CIB_file", &state0),
            );
        }
    }
    let state1 = dir.join("state1.xml");
    let start = simulate(&state0, &state1);
    let from = started_on(&start, "vm1");
    let to = if from == "node1" { "node2" } else { "node1" }.to_string();
    run_ok(
        Command::new(tool_path("crm_resource"))
            .args(["--move", "--resource", "vm1", "--node", &to])
            .env("CIB_file", &state1),
    );
    let moved = simulate(&state1, &dir.join("state2.xml"));
    (moved, from, to)
}

#[test]
fn drbd_recipe_live_migrates_with_two_primaries_and_restarts_with_one() {
    if skip_without(
        false,
        &[
            "crm_verify",
            "crm_simulate",
            "crm_resource",
            "crm_attribute",
            "xmllint",
        ],
    ) {
        return;
    }
    let recipe = example("drbd-cib.xml");
    verify_clean(&recipe);
    let text = fs::read_to_string(&recipe).unwrap();
    for needle in [
        r#"name="promoted-max" value="2""#,
        r#"name="allow-migrate" value="true""#,
        r#"with-rsc-role="Promoted""#,
        r#"first-action="promote" then="vm1" then-action="start""#,
        r#"name="stonith-enabled" value="true""#,
    ] {
        assert!(text.contains(needle), "the recipe lacks {needle}");
    }

    // promoted-max=2: both Primary, the move is a live migration.
    let dir = TempDir::new("drbd-recipe");
    let (moved, from, to) = simulate_move(&recipe, &dir, Some("drbd-vm1"));
    assert_eq!(
        moved.summary_of("vm1"),
        vec![format!("* Migrate    vm1     ( {from} -> {to} )")],
        "{}",
        moved.text
    );
    let actions = moved.actions_of("vm1");
    assert!(
        actions.contains(&("migrate_to".into(), from.clone())),
        "{}",
        moved.text
    );
    assert!(
        actions.contains(&("migrate_from".into(), to.clone())),
        "{}",
        moved.text
    );
    assert!(
        !actions.contains(&("start".into(), to.clone())),
        "restarted:\n{}",
        moved.text
    );
    assert!(
        moved
            .actions_of("drbd-vm1")
            .iter()
            .all(|(a, _)| a != "demote" && a != "promote"),
        "{}",
        moved.text
    );
    // Order within the transition: migrate_to, migrate_from, then the stop on the source.
    let position = |action: &str, node: &str| {
        moved
            .actions
            .iter()
            .position(|l| l.contains("vm1") && l.contains(&format!(" {action} on {node}")))
            .unwrap_or_else(|| panic!("no {action} on {node}:\n{}", moved.text))
    };
    assert!(position("migrate_to", &from) < position("migrate_from", &to));
    assert!(position("migrate_from", &to) < position("stop", &from));
    eprintln!(
        "drbd promoted-max=2: {}",
        moved.summary_of("vm1").join("; ")
    );

    // promoted-max=1: the disk can be Primary on one node only, so the guest
    // must stop before the demotion and start after the promotion.
    let single = dir.join("single.xml");
    fs::write(
        &single,
        text.replace(
            r#"name="promoted-max" value="2""#,
            r#"name="promoted-max" value="1""#,
        ),
    )
    .unwrap();
    let dir1 = TempDir::new("drbd-recipe-1");
    let (moved, from, to) = simulate_move(&single, &dir1, Some("drbd-vm1"));
    let summary = moved.summary_of("vm1");
    assert!(
        summary.len() == 1 && summary[0].starts_with("* Move       vm1"),
        "{}",
        moved.text
    );
    let actions = moved.actions_of("vm1");
    assert!(
        actions.contains(&("stop".into(), from.clone())),
        "{}",
        moved.text
    );
    assert!(
        actions.contains(&("start".into(), to.clone())),
        "{}",
        moved.text
    );
    assert!(
        actions.iter().all(|(a, _)| !a.starts_with("migrate")),
        "{}",
        moved.text
    );
    let drbd = moved.actions_of("drbd-vm1");
    assert!(
        drbd.contains(&("demote".into(), from)) && drbd.contains(&("promote".into(), to)),
        "{}",
        moved.text
    );
    eprintln!("drbd promoted-max=1: {}", summary.join("; "));
}

#[test]
fn lvm_recipe_live_migrates_on_a_shared_lv() {
    if skip_without(
        false,
        &["crm_verify", "crm_simulate", "crm_resource", "xmllint"],
    ) {
        return;
    }
    let recipe = example("lvm-cib.xml");
    verify_clean(&recipe);
    let text = fs::read_to_string(&recipe).unwrap();
    for needle in [
        r#"name="vg_access_mode" value="lvmlockd""#,
        r#"name="activation_mode" value="shared""#,
        r#"name="allow-migrate" value="true""#,
        r#"name="stonith-enabled" value="true""#,
    ] {
        assert!(text.contains(needle), "the recipe lacks {needle}");
    }
    let dir = TempDir::new("lvm-recipe");
    let (moved, from, to) = simulate_move(&recipe, &dir, None);
    assert_eq!(
        moved.summary_of("vm1"),
        vec![format!("* Migrate    vm1     ( {from} -> {to} )")],
        "{}",
        moved.text
    );
    let actions = moved.actions_of("vm1");
    assert!(
        actions.contains(&("migrate_to".into(), from)),
        "{}",
        moved.text
    );
    assert!(
        actions.contains(&("migrate_from".into(), to)),
        "{}",
        moved.text
    );
    assert!(
        moved.actions_of("vm1-lv").is_empty(),
        "the LV stays active on both nodes:\n{}",
        moved.text
    );
}

/// drbd-utils' DRBD 8.4 parser (drbdadm runs it itself when the loaded
/// module is 8.4, as in Debian 12's kernel).
fn drbdadm_84() -> Option<PathBuf> {
    ["/usr/lib/drbd/drbdadm-84", "/lib/drbd/drbdadm-84"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `drbdadm -c FILE dump vm1` and dry runs of up, primary and verify, as
/// node1 (drbdadm picks the resource's "on HOST" section by host name: a
/// UTS namespace of its own).
fn drbdadm_as_node1(drbdadm: &Path, file: &Path) -> Run {
    let script = format!(
        "hostname node1 && {a} -c {f} dump vm1 && echo ---dry-run--- && {a} -c {f} -d up vm1 \
         && {a} -c {f} -d primary vm1 && {a} -c {f} -d verify vm1",
        a = drbdadm.display(),
        f = file.display()
    );
    run(Command::new(tool_path("unshare")).args(["--uts", "sh", "-c", &script]))
}

#[test]
fn drbd_resource_files_parse_with_two_primaries_and_fencing_in_84_and_9_syntax() {
    if skip_without(true, &["drbdadm", "unshare"]) {
        return;
    }
    let Some(drbdadm_84) = drbdadm_84() else {
        eprintln!("SKIP: drbd-utils has no DRBD 8.4 parser (drbdadm-84)");
        return;
    };
    // DRBD 8.4 (Debian 12's kernel): fencing in the disk section, the
    // crm-fence-peer.sh handlers.
    let res84 = example("drbd-vm1.res");
    let result = drbdadm_as_node1(&drbdadm_84, &res84);
    assert_eq!(result.code, 0, "{}", result.text());
    for needle in [
        "allow-two-primaries yes;",
        "fencing          resource-and-stonith;",
        "fence-peer       /usr/lib/drbd/crm-fence-peer.sh;",
        "after-resync-target /usr/lib/drbd/crm-unfence-peer.sh;",
        "verify-alg       sha256;",
        "--allow-two-primaries=yes",
        "--fencing=resource-and-stonith",
        "drbdsetup-84 primary 1",
        "drbdsetup-84 verify 1",
    ] {
        assert!(
            result.stdout.contains(needle),
            "drbdadm-84 output lacks {needle:?}:\n{}",
            result.stdout
        );
    }
    // DRBD 9: the same resource in its syntax, which the 8.4 parser refuses
    // (the reason for two files).
    let res9 = example("drbd-vm1.drbd9.res");
    let result = drbdadm_as_node1(&tool_path("drbdadm"), &res9);
    assert_eq!(result.code, 0, "{}", result.text());
    for needle in [
        "allow-two-primaries yes;",
        "fencing          resource-and-stonith;",
        "fence-peer       /usr/lib/drbd/crm-fence-peer.9.sh;",
        "unfence-peer     /usr/lib/drbd/crm-unfence-peer.9.sh;",
        "--allow-two-primaries=yes",
        "--fencing=resource-and-stonith",
        "drbdsetup primary vm1",
        "drbdsetup verify vm1",
    ] {
        assert!(
            result.stdout.contains(needle),
            "drbdadm output lacks {needle:?}:\n{}",
            result.stdout
        );
    }
    let refused = drbdadm_as_node1(&drbdadm_84, &res9);
    assert_ne!(refused.code, 0, "{}", refused.text());
    assert!(refused.stderr.contains("Parse error"), "{}", refused.text());
}

/// A stand-in for DRBD: `drbdadm` (sh-minor, sh-resources, verify) and
/// `drbdsetup status` over a /proc/drbd file; a verification runs for a
/// second and then leaves `found` KiB out of sync.
fn fake_drbd(dir: &TempDir, version: &str, found: u64, connection: &str) {
    let proc_drbd = dir.join("proc-drbd");
    let state = |cs: &str, oos: u64| {
        format!(
            "version: {version} (api:1/proto:86-101)\n 1: cs:{cs} ro:Primary/Secondary ds:UpToDate/UpToDate C r-----\n    ns:0 nr:0 dw:0 dr:0 al:0 bm:0 lo:0 pe:0 ua:0 ap:0 ep:1 wo:f oos:{oos}\n"
        )
    };
    fs::write(&proc_drbd, state(connection, 0)).unwrap();
    fs::write(dir.join("verifying"), state("VerifyS", 0)).unwrap();
    fs::write(dir.join("verified"), state(connection, found)).unwrap();
    let drbdadm = format!(
        "#!/bin/sh\ncase \"$1\" in\n\
         sh-minor) echo 1 ;;\n\
         sh-resources) echo vm1 ;;\n\
         verify) cp {d}/verifying {d}/proc-drbd; (sleep 1; cp {d}/verified {d}/proc-drbd) & ;;\n\
         *) exit 1 ;;\nesac\n",
        d = dir.path().display()
    );
    // DRBD 9's status, from the same state file.
    let drbdsetup = format!(
        "#!/bin/sh\ncs=$(sed -n 's/.*cs:\\([A-Za-z]*\\).*/\\1/p' {d}/proc-drbd)\n\
         oos=$(sed -n 's/.*oos:\\([0-9]*\\).*/\\1/p' {d}/proc-drbd)\n\
         case $cs in Connected) c=Connected r=Established ;; VerifyS) c=Connected r=VerifyS ;; *) c=$cs r=Off ;; esac\n\
         echo \"vm1 role:Primary\"\necho \"  volume:0 disk:UpToDate\"\necho \"  node2 connection:$c role:Secondary\"\n\
         echo \"    volume:0 replication:$r peer-disk:UpToDate\"\n\
         echo \"        received:0 sent:0 out-of-sync:$oos pending:0 unacked:0\"\n",
        d = dir.path().display()
    );
    for (name, text) in [("drbdadm", drbdadm), ("drbdsetup", drbdsetup)] {
        fs::write(dir.join(name), text).unwrap();
        fs::set_permissions(dir.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn drbd_verify(dir: &TempDir, resource: &str) -> Run {
    run(Command::new(repo().join("resources/drbd/drbd-verify"))
        .arg(resource)
        .env("DRBDADM", dir.join("drbdadm"))
        .env("DRBDSETUP", dir.join("drbdsetup"))
        .env("PROC_DRBD", dir.join("proc-drbd"))
        .env("DRBD_VERIFY_POLL_S", "0.2"))
}

#[test]
fn drbd_verify_reports_out_of_sync_blocks_and_its_timer_units_are_valid() {
    for (version, connected) in [("8.4.11", "Connected"), ("9.2.4", "Connected")] {
        // Clean copies: exit 0, an info line in the journal.
        let dir = TempDir::new("drbd-verify");
        fake_drbd(&dir, version, 0, connected);
        let clean = drbd_verify(&dir, "all");
        assert_eq!(clean.code, 0, "{version}: {}", clean.text());
        assert!(
            clean.stdout.contains("<6>drbd-verify: vm1: verifying")
                && clean.stdout.contains("<6>drbd-verify: vm1: no differences"),
            "{version}: {}",
            clean.text()
        );
        // Differences: exit 1, an error line with the amount and what to do.
        let dir = TempDir::new("drbd-verify");
        fake_drbd(&dir, version, 48, connected);
        let found = drbd_verify(&dir, "vm1");
        assert_eq!(found.code, 1, "{version}: {}", found.text());
        assert!(
            found
                .stdout
                .contains("<3>drbd-verify: vm1: 48 KiB out of sync after verification")
                && found
                    .stdout
                    .contains("drbdadm disconnect vm1; drbdadm connect vm1"),
            "{version}: {}",
            found.text()
        );
        // Not connected: nothing to compare with, exit 2.
        let dir = TempDir::new("drbd-verify");
        fake_drbd(&dir, version, 0, "WFConnection");
        let lone = drbd_verify(&dir, "vm1");
        assert_eq!(lone.code, 2, "{version}: {}", lone.text());
        assert!(lone.stdout.contains("<3>"), "{version}: {}", lone.text());
    }

    // The units pass systemd-analyze verify (the service's ExecStart
    // pointed at this checkout's script, which must exist for it).
    if skip_without(false, &["systemd-analyze"]) {
        return;
    }
    let dir = TempDir::new("drbd-units");
    let units = repo().join("resources/systemd");
    let service = fs::read_to_string(units.join("drbd-verify@.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/sbin/drbd-verify %i"));
    fs::write(
        dir.join("drbd-verify@.service"),
        service.replace(
            "/usr/local/sbin/drbd-verify",
            repo().join("resources/drbd/drbd-verify").to_str().unwrap(),
        ),
    )
    .unwrap();
    fs::copy(
        units.join("drbd-verify@.timer"),
        dir.join("drbd-verify@.timer"),
    )
    .unwrap();
    let verified = run(Command::new(tool_path("systemd-analyze"))
        .arg("verify")
        .arg(dir.join("drbd-verify@vm1.service"))
        .arg(dir.join("drbd-verify@vm1.timer"))
        .current_dir(dir.path()));
    assert!(
        verified.code == 0 && verified.stderr.trim().is_empty(),
        "{}",
        verified.text()
    );
}
