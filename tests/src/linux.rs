//! Real Linux guests in tests: the project's test kernel and busybox
//! initramfs (resources/linux/build-test-kernel.sh, built once and cached),
//! and a driver for the console protocol of its /init
//! (resources/linux/test-init.sh): wait for init, run shell commands, read
//! their output and exit status.
//!
//! Where this host's KVM emulates guest ring 0 (platform notes) every kernel
//! instruction costs about 0.5 us: a boot takes 1-2.5 minutes and each
//! command seconds (each system call runs emulated). Deadlines are therefore
//! scaled by the measured ring-0 speed ([`deadline`]): generous bounds that
//! catch a hang, not a slow machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::Vmm;
use crate::probe;

/// The command line of every test boot (plus per-test words): the serial
/// console, reset through the i8042 (so a reboot ends in the VMM's reset
/// handling) and reboot on panic (a panic then ends the VMM at once).
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// The test kernel and initramfs.
#[derive(Debug)]
pub struct TestKernel {
    pub dir: PathBuf,
    /// Stripped ELF with the PVH entry note.
    pub vmlinux: PathBuf,
    /// The same kernel as a bzImage (LZ4).
    pub bzimage: PathBuf,
    /// Uncompressed newc cpio (inflating a gzip one costs over a minute of
    /// emulated ring 0 here).
    pub initramfs: PathBuf,
    /// `uname -r` in the guest.
    pub release: String,
}

/// The test kernel, built (or found in the cache) once per test binary.
/// Err: why this host cannot build it (not Debian); a failing build panics.
pub fn test_kernel() -> Result<&'static TestKernel, String> {
    static KERNEL: OnceLock<Result<TestKernel, String>> = OnceLock::new();
    KERNEL
        .get_or_init(build_test_kernel)
        .as_ref()
        .map_err(Clone::clone)
}

fn build_test_kernel() -> Result<TestKernel, String> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux/build-test-kernel.sh");
    if !Path::new("/usr/bin/apt-get").exists() {
        return Err(format!(
            "{} builds the test kernel from Debian packages; this host has no apt-get",
            script.display()
        ));
    }
    let started = Instant::now();
    // Progress (and a whole kernel build's output on failure) goes straight to
    // the test's stderr: a first build takes minutes.
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed ({}): {stdout}",
        script.display(),
        out.status
    );
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    let kernel = TestKernel {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio"),
        release: std::fs::read_to_string(dir.join("kernel-version"))
            .unwrap_or_default()
            .trim()
            .to_string(),
        dir,
    };
    for file in [&kernel.vmlinux, &kernel.bzimage, &kernel.initramfs] {
        assert!(file.exists(), "the build made no {}", file.display());
    }
    eprintln!(
        "test kernel {} in {} ({:.1} s)",
        kernel.release,
        kernel.dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(kernel)
}

/// The ring-0 speed probe, measured once per test binary (and printed).
pub fn ring0() -> &'static probe::Ring0Speed {
    static SPEED: OnceLock<probe::Ring0Speed> = OnceLock::new();
    SPEED.get_or_init(|| {
        let speed =
            probe::ring0_speed().unwrap_or_else(|e| panic!("the ring-0 speed probe failed: {e}"));
        eprintln!("probe: {}", speed.describe());
        speed
    })
}

/// Emulated ring 0 on an idle machine of this kind runs about 2e6
/// instructions/s; the base deadlines below were measured at that speed and
/// then multiplied by three or more.
const REFERENCE_IPS: f64 = 2e6;

/// `base` scaled to this host: longer where ring 0 is emulated more slowly
/// than on an idle development machine (a loaded host), never shorter.
pub fn deadline(base: Duration) -> Duration {
    let speed = ring0();
    let factor = if speed.is_native() {
        1.0
    } else {
        (REFERENCE_IPS / speed.instructions_per_second()).clamp(1.0, 8.0)
    };
    base.mul_f64(factor)
}

/// Base deadline from exec to `linux-test: ready` (measured 77-150 s with the
/// vmlinux on a loaded machine; bzImage adds its decompression).
pub const BOOT: Duration = Duration::from_secs(480);
/// Base deadline of one console command (measured 3-35 s).
pub const COMMAND: Duration = Duration::from_secs(180);

/// A Linux guest on our VMM, driven through its console.
pub struct LinuxVm {
    pub vmm: Vmm,
    next_id: u32,
    started: Instant,
}

/// What `linux-test: init ...` said.
#[derive(Clone, Debug)]
pub struct InitLine {
    pub release: String,
    pub cpus: u32,
    pub uptime_s: f64,
    pub line: String,
}

/// A command's output lines (without the markers) and exit status.
#[derive(Clone, Debug)]
pub struct Output {
    pub rc: i32,
    pub lines: Vec<String>,
}

impl Output {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The first output line starting with `prefix`, without it.
    pub fn value(&self, prefix: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| l.strip_prefix(prefix))
    }
}

impl LinuxVm {
    /// A VMM started with `args` (kernel, initrd, command line, devices),
    /// run through `prefix` (`ip netns exec NS`) if given.
    pub fn spawn(prefix: &[&str], args: &[String]) -> LinuxVm {
        eprintln!("vmm {}", args.join(" "));
        LinuxVm {
            vmm: Vmm::spawn_with_prefix(prefix, args),
            next_id: 0,
            started: Instant::now(),
        }
    }

    /// A guest that is already running in `vmm` (a migration target).
    pub fn adopt(vmm: Vmm) -> LinuxVm {
        LinuxVm {
            vmm,
            next_id: 0,
            started: Instant::now(),
        }
    }

    /// Seconds since this guest's VMM started (for progress lines).
    pub fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Waits for /init's first line.
    pub fn wait_init(&mut self) -> InitLine {
        let line = self.wait("linux-test: init ", deadline(BOOT));
        let word = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_default()
                .to_string()
        };
        let init = InitLine {
            release: word("kernel"),
            cpus: word("cpus").parse().unwrap_or(0),
            uptime_s: word("uptime").parse().unwrap_or(0.0),
            line: line.clone(),
        };
        eprintln!("{:7.1} s  {}", self.secs(), line.trim());
        init
    }

    /// Waits until /init waits for a command.
    pub fn wait_ready(&mut self) {
        self.wait("linux-test: ready", deadline(BOOT));
    }

    /// Waits for a console line containing `needle`; panics with the console.
    pub fn wait(&mut self, needle: &str, timeout: Duration) -> String {
        self.vmm.wait_for(needle, timeout)
    }

    /// Runs `command` (one line of shell, at most 4095 bytes) and returns its
    /// output and status; panics with the console if it does not end within
    /// [`COMMAND`] (scaled). /init must be at its ready prompt.
    pub fn run(&mut self, command: &str) -> Output {
        self.run_within(command, COMMAND)
    }

    /// [`LinuxVm::run`] with another base deadline.
    pub fn run_within(&mut self, command: &str, base: Duration) -> Output {
        assert!(
            !command.contains('\n') && command.len() < 4000,
            "a console command is one line of under 4000 bytes"
        );
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        let started = Instant::now();
        self.vmm.send_line(&format!("run {id} {command}"));
        let timeout = deadline(base);
        let begin = format!("linux-test: begin {id}");
        self.wait(&begin, timeout);
        let end = format!("linux-test: end {id} rc=");
        let Some(lines) = self.vmm.try_wait_for_lines(&end, timeout) else {
            panic!(
                "command {id} ({command}) did not end within {timeout:?}\n{}",
                self.vmm.report()
            );
        };
        let (last, output) = lines.split_last().expect("the end marker");
        let at = last.find(&end).expect("the end marker");
        let rc = last[at + end.len()..]
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        let mut lines: Vec<String> = output.to_vec();
        if at > 0 {
            lines.push(last[..at].to_string());
        }
        let output = Output { rc, lines };
        eprintln!(
            "{:7.1} s  [{:.1} s] {command}\n{}",
            self.secs(),
            started.elapsed().as_secs_f64(),
            output
                .lines
                .iter()
                .map(|l| format!("           | {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        // Back at the prompt before the next command is typed.
        self.wait_ready_after_command();
        output
    }

    /// [`LinuxVm::run`], asserting exit status 0.
    pub fn run_ok(&mut self, command: &str) -> Output {
        let output = self.run(command);
        assert_eq!(
            output.rc,
            0,
            "{command}: exit status {}:\n{}",
            output.rc,
            output.text()
        );
        output
    }

    fn wait_ready_after_command(&mut self) {
        self.wait("linux-test: ready", deadline(COMMAND));
    }

    /// Every console line so far that looks like a kernel complaint: ACPI
    /// errors and warnings, firmware bugs, call traces, failed probes.
    pub fn kernel_complaints(&self) -> Vec<String> {
        kernel_complaints(&self.vmm.console())
    }
}

/// Whether a console line is the kernel's (`[   12.345678] ...`), not the
/// output of a command the test ran (which may say "error" on purpose).
fn is_kernel_line(line: &str) -> bool {
    line.trim_start()
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

/// The kernel log lines (as printed on the console) that report a problem
/// (matched without regard to case).
pub fn kernel_complaints(console: &[String]) -> Vec<String> {
    const PATTERNS: &[&str] = &[
        // ACPI Error, ACPI Warning, ACPI BIOS Error/Warning, AE_* exceptions.
        "acpi error",
        "acpi warning",
        "acpi bios",
        "ae_",
        "[firmware bug]",
        "[firmware warn]",
        "call trace",
        "warning:",
        "bug:",
        "probe of",
        "fail",
        "error",
        "timed out",
        // RCU stall reports ("rcu: INFO: rcu_sched self-detected stall on CPU").
        "detected stall",
        // atkbd's complaints about the i8042's keyboard.
        "spurious",
    ];
    console
        .iter()
        .filter(|l| is_kernel_line(l))
        .filter(|l| {
            let l = l.to_lowercase();
            PATTERNS.iter().any(|p| l.contains(p))
        })
        .cloned()
        .collect()
}

/// The hex SHA-256 of `bytes` (with the host's `sha256sum`, as the guest's).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils) runs");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `len` bytes of `path` from `offset`.
pub fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("{} at {offset}: {e}", path.display()));
    buf
}

/// Whether `[offset, offset + len)` of `path` is a hole (SEEK_DATA finds no
/// data before its end).
pub fn is_hole(path: &Path, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: lseek on a descriptor we own.
    let data = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
    // ENXIO: no data after offset at all.
    data < 0 || data as u64 >= offset + len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines Linux printed on our VMM before the fixes count; the benign
    /// lines of a clean boot (seen in every run) do not.
    #[test]
    fn complaints_are_told_from_a_clean_boot() {
        let lines: Vec<String> = [
            "[    0.01] [Firmware Bug]: TSC doesn't count with P0 frequency!",
            "[   19.70] acpi PNP0A08:00: _OSC: platform retains control of PCIe features (AE_NOT_FOUND)",
            "[  262.10] atkbd serio0: Failed to enable keyboard on isa0060/serio0",
            "[  262.16] atkbd serio0: Spurious ACK on isa0060/serio0. Some program might be trying to access hardware directly.",
            "[   64.83] Kernel command line: noxsave rcupdate.rcu_cpu_stall_timeout=300 console=ttyS0",
            "[   88.47] \tRCU CPU stall warnings timeout set to 300 (rcu_cpu_stall_timeout).",
            "[   34.70] PCI: Using host bridge windows from ACPI; if necessary, use \"pci=nocrs\" and report a bug",
            "linux-test: end c3 rc=1 failed",
            // A command's own output, however alarming, is not the kernel's.
            "dd: error writing '/dev/vdb': Operation not permitted",
            "memloop gen=155 errors=0 clock_errors=0 first_error=-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let found = kernel_complaints(&lines);
        assert_eq!(found, lines[..4].to_vec());
    }
}
