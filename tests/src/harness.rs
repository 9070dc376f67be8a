//! Running `vmm` processes from tests: spawn one, watch its console line by
//! line, type into it, call its API, and wait for it to exit.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use api::http::ApiClient;

/// The directory cargo put this test's binaries in (`target/<profile>`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf()
}

/// A binary of this workspace (`vmm`, `vmmctl`), built by `cargo test --workspace`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = target_profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds it)",
        path.display()
    );
    path
}

pub fn vmm_binary() -> PathBuf {
    workspace_binary("vmm")
}

pub fn vmmctl_binary() -> PathBuf {
    workspace_binary("vmmctl")
}

pub fn overcommit_binary() -> PathBuf {
    workspace_binary("vmm-overcommit")
}

/// The test guest image.
pub fn testguest() -> PathBuf {
    PathBuf::from(crate::TESTGUEST_IMAGE)
}

/// Whether this host can run VMs at all; tests print why and skip if not.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm cannot be opened ({e}); these tests need KVM");
            false
        }
    }
}

/// Skips the calling test (with a printed reason) when KVM is missing.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::harness::kvm_available() {
            return;
        }
    };
}

/// Lines a child wrote, with a condvar to wait for more.
#[derive(Default)]
struct Lines {
    lines: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

impl Lines {
    fn collect(self: &Arc<Self>, source: impl Read + Send + 'static, echo: &'static str) {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(source);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        if std::env::var_os("VMM_TEST_ECHO").is_some() {
                            eprintln!("{echo}{line}");
                        }
                        me.lines.lock().unwrap().0.push(line);
                        me.changed.notify_all();
                    }
                }
            }
            me.lines.lock().unwrap().1 = true;
            me.changed.notify_all();
        });
    }
}

/// A running `vmm` process.
pub struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    /// Index of the first stdout line not yet consumed by `wait_for`.
    cursor: usize,
    pub api_socket: Option<PathBuf>,
    status: Option<ExitStatus>,
}

impl Vmm {
    /// Starts `vmm` with `args` (console on its stdio).
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vmm {
        Vmm::spawn_with_prefix::<S>(&[], args)
    }

    /// Starts `vmm` through a command prefix (e.g. `ip netns exec NS`).
    pub fn spawn_with_prefix<S: AsRef<std::ffi::OsStr>>(prefix: &[&str], args: &[S]) -> Vmm {
        let mut api_socket = None;
        let mut iter = args.iter();
        while let Some(a) = iter.next() {
            if a.as_ref() == "--api-socket" {
                api_socket = iter.next().map(|p| PathBuf::from(p.as_ref()));
            }
        }
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(vmm_binary());
                c
            }
            None => Command::new(vmm_binary()),
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vmm starts");
        let stdout = Arc::new(Lines::default());
        let stderr = Arc::new(Lines::default());
        stdout.collect(child.stdout.take().unwrap(), "console| ");
        stderr.collect(child.stderr.take().unwrap(), "vmm| ");
        Vmm {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            cursor: 0,
            api_socket,
            status: None,
        }
    }

    /// Starts `vmm` booting the test guest with `cmdline` and extra flags.
    pub fn boot_testguest(cmdline: &str, extra: &[&str]) -> Vmm {
        let guest = testguest();
        let mut args: Vec<String> = vec![
            "--kernel".into(),
            guest.display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Vmm::spawn(&args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API client for this VMM's socket.
    pub fn api(&self) -> ApiClient {
        ApiClient::new(self.api_socket.clone().expect("started with --api-socket"))
    }

    /// Waits until the API socket answers a ping.
    pub fn wait_api(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.api().ping().is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the API did not come up within {timeout:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A VMM waiting for an incoming migration on a Unix socket in `dir`,
    /// with `token` in a token file; returns it with the destination to
    /// send to.
    pub fn incoming(dir: &TempDir, token: &str) -> (Vmm, String) {
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let listen = format!("unix:{}", dir.join("migration.sock").display());
        let target = Vmm::spawn(&[
            "--incoming",
            &listen,
            "--migration-token-file",
            token_file.to_str().unwrap(),
            "--api-socket",
            dir.join("target.sock").to_str().unwrap(),
        ]);
        target.wait_api(Duration::from_secs(10));
        (target, listen)
    }

    /// Waits until `vmm.ping` reports `state`.
    pub fn wait_state(&self, state: api::request::VmState, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.api().ping().map(|p| p.state).ok() != Some(state) {
            assert!(
                Instant::now() < deadline,
                "not {state:?} within {timeout:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a console line containing `needle`, after those already
    /// consumed; returns it. Panics with the console so far on timeout.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        match self.try_wait_for(needle, timeout) {
            Some(line) => line,
            None => panic!(
                "no console line containing {needle:?} within {timeout:?}\n{}",
                self.report()
            ),
        }
    }

    /// Like [`Vmm::wait_for`] but returns None on timeout or exit.
    pub fn try_wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.stdout.lines.lock().unwrap();
        loop {
            while self.cursor < guard.0.len() {
                let line = &guard.0[self.cursor];
                self.cursor += 1;
                if line.contains(needle) {
                    return Some(line.clone());
                }
            }
            if guard.1 {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            guard = self
                .stdout
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Like [`Vmm::try_wait_for`], but returns every line consumed on the
    /// way, the matching one last.
    pub fn try_wait_for_lines(&mut self, needle: &str, timeout: Duration) -> Option<Vec<String>> {
        let start = self.cursor;
        let found = self.try_wait_for(needle, timeout);
        let guard = self.stdout.lines.lock().unwrap();
        found.map(|_| guard.0[start..self.cursor].to_vec())
    }

    /// Skips the console lines printed so far: the next waits see only
    /// newer ones (output still in the VMM's console buffer may follow).
    pub fn skip_console(&mut self) {
        self.cursor = self.stdout.lines.lock().unwrap().0.len();
    }

    /// All console lines so far.
    pub fn console(&self) -> Vec<String> {
        self.stdout.lines.lock().unwrap().0.clone()
    }

    /// All stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lines.lock().unwrap().0.clone()
    }

    /// Waits for a stderr line (the VMM's own messages) containing
    /// `needle`, among all lines so far; panics with the output on timeout.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut guard = self.stderr.lines.lock().unwrap();
        loop {
            if let Some(line) = guard.0.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            if guard.1 || now >= deadline {
                drop(guard);
                panic!(
                    "no stderr line containing {needle:?} within {timeout:?}\n{}",
                    self.report()
                );
            }
            guard = self
                .stderr
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Types a line on the guest's console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the process to end; None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                // Let the readers drain what is left in the pipes (they end
                // at EOF; a grandchild holding a pipe could keep it open).
                let drained = Instant::now() + Duration::from_secs(2);
                for lines in [&self.stdout, &self.stderr] {
                    let mut guard = lines.lines.lock().unwrap();
                    while !guard.1 && Instant::now() < drained {
                        guard = lines
                            .changed
                            .wait_timeout(guard, Duration::from_millis(50))
                            .unwrap()
                            .0;
                    }
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the exit code; panics with the output if it does not come.
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        match self.wait_exit(timeout) {
            Some(status) => status.code().unwrap_or(-1),
            None => panic!("vmm did not exit within {timeout:?}\n{}", self.report()),
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Console and stderr, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "--- console ---\n{}\n--- stderr ---\n{}",
            self.console().join("\n"),
            self.stderr().join("\n")
        )
    }

    /// Resident memory of the VMM process in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    /// Attaches a loop device to `file`; None (with SKIP: printed) if
    /// losetup is missing or fails.
    pub fn attach(file: &Path) -> Option<LoopDevice> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(LoopDevice {
                device: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
            }),
            Ok(o) => {
                eprintln!(
                    "SKIP: losetup: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: losetup is not available: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.device)
            .output();
    }
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir();
        for attempt in 0..1000u32 {
            let path = base.join(format!("vmm-test-{tag}-{}-{attempt}", std::process::id()));
            if std::fs::create_dir(&path).is_ok() {
                return TempDir(path);
            }
        }
        panic!("cannot create a temporary directory in {}", base.display());
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses `key=value` fields out of a console line such as
/// `counters: t_ms=120 cpu0=5 cpu1=7`.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| {
            v.strip_prefix("0x")
                .map(|hex| u64::from_str_radix(hex, 16).ok())
                .unwrap_or_else(|| v.parse().ok())
        })
}

/// Interrupts the test guest took on device vectors (its dynamic range
/// 0x30..=0xef), from its `irqs: vecN=COUNT ...` line.
pub fn device_interrupts(irqs_line: &str) -> u64 {
    irqs_line
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("vec")?.split_once('='))
        .filter(|(vector, _)| {
            vector
                .parse::<u32>()
                .is_ok_and(|v| (0x30..=0xef).contains(&v))
        })
        .filter_map(|(_, n)| n.parse::<u64>().ok())
        .sum()
}

pub const KSM: &str = "/sys/kernel/mm/ksm";

/// Switches KSM on (fast scanning) and puts the previous `run`,
/// `pages_to_scan` and `sleep_millisecs` back when dropped, also when the
/// test fails.
pub struct KsmGuard {
    saved: Vec<(&'static str, String)>,
}

impl KsmGuard {
    /// Remembers the host's `run`, `pages_to_scan` and `sleep_millisecs`
    /// without changing them.
    pub fn save() -> Result<KsmGuard, String> {
        let read = |knob: &str| {
            std::fs::read_to_string(format!("{KSM}/{knob}"))
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("{KSM}/{knob}: {e}"))
        };
        // `run` first: it is restored first.
        Ok(KsmGuard {
            saved: vec![
                ("run", read("run")?),
                ("pages_to_scan", read("pages_to_scan")?),
                ("sleep_millisecs", read("sleep_millisecs")?),
            ],
        })
    }

    pub fn start(pages_to_scan: u32, sleep_millisecs: u32) -> Result<KsmGuard, String> {
        let guard = KsmGuard::save()?;
        for (knob, value) in [
            ("pages_to_scan", pages_to_scan.to_string()),
            ("sleep_millisecs", sleep_millisecs.to_string()),
            ("run", "1".to_string()),
        ] {
            std::fs::write(format!("{KSM}/{knob}"), &value)
                .map_err(|e| format!("cannot write {value} to {KSM}/{knob}: {e}"))?;
        }
        Ok(guard)
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        for (knob, value) in &self.saved {
            if let Err(e) = std::fs::write(format!("{KSM}/{knob}"), value) {
                eprintln!("WARNING: cannot restore {KSM}/{knob} to {value}: {e}");
            }
        }
    }
}

/// Proportional set size of a process: what it costs the host, with pages
/// shared with other processes (KSM pages among them) divided among them.
/// VmRSS counts a KSM page in full in every process that maps it, so it
/// does not fall when KSM merges.
pub fn pss_bytes(pid: u32) -> u64 {
    smaps_rollup_bytes(pid, "Pss")
}

/// One figure of `/proc/PID/smaps_rollup` (`Pss`, `AnonHugePages`, ...) in
/// bytes; 0 if the process or the field is gone.
pub fn smaps_rollup_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The status files of the threads of `pid` that run VMM code: not the
/// kernel's workers KVM adds to the process (`kvm-nx-lpage-recovery`),
/// which run in the kernel only.
pub fn vmm_thread_statuses(pid: u32) -> Vec<(std::path::PathBuf, String)> {
    const PF_USER_WORKER: u64 = 0x4000;
    const PF_KTHREAD: u64 = 0x0020_0000;
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let task = task.unwrap().path();
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            // Fields after the parenthesised name; flags is field 9.
            let flags: u64 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(6)?
                .parse()
                .ok()?;
            if flags & (PF_USER_WORKER | PF_KTHREAD) != 0 {
                return None;
            }
            let status = std::fs::read_to_string(task.join("status")).ok()?;
            Some((task, status))
        })
        .collect()
}

/// A field of a `/proc/.../status` text (`Uid`, `Cpus_allowed_list`).
pub fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}
