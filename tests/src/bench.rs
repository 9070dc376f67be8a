//! Helpers for the benchmark programs under tests/benches: medians, ratio
//! tables and the report files kept in docs/benchmarks/.

use std::path::PathBuf;
use std::process::Command;

/// The comparison peer's binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Whether QEMU is installed; says so when not (its columns stay empty).
pub fn have_qemu() -> bool {
    let have = Command::new(QEMU).arg("--version").output().is_ok();
    if !have {
        eprintln!("SKIP QEMU columns: {QEMU} is not installed (apt-get install qemu-system-x86)");
    }
    have
}

/// Adds to a QEMU command line what every benchmark runs the test guest
/// with: KVM, the host CPU (less arch-capabilities, an MSR QEMU cannot set
/// on this nested host), `machine`, `memory_mib` and `cpus`, no default
/// devices, COM1 on stdio, and the test guest booted with `append`.
pub fn qemu_test_guest<'a>(
    cmd: &'a mut Command,
    machine: &str,
    memory_mib: u64,
    cpus: u32,
    append: &str,
) -> &'a mut Command {
    cmd.args([
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-machine",
        machine,
    ])
    .args(["-m", &format!("{memory_mib}M"), "-smp", &cpus.to_string()])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(crate::harness::testguest())
    .args(["-append", append])
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `ours / peer`, formatted; "-" when there is no peer figure.
pub fn ratio(ours: f64, peer: Option<f64>) -> String {
    match peer {
        Some(p) if p > 0.0 => format!("{:.2}", ours / p),
        _ => "-".into(),
    }
}

/// A Markdown table of figures.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn row_with(&mut self, name: &str, ours: f64, peer: Option<f64>, scale: f64, digits: usize) {
        let fmt = |v: f64| format!("{:.*}", digits, v / scale);
        self.rows.push(vec![
            name.to_string(),
            fmt(ours),
            peer.map(fmt).unwrap_or_else(|| "-".into()),
            ratio(ours, peer),
        ]);
    }

    /// A row of milliseconds.
    pub fn row_ms(&mut self, name: &str, ours: f64, peer: Option<f64>) {
        self.row_with(name, ours, peer, 1.0, 2);
    }

    /// A row of bytes shown in MiB.
    pub fn row_mib(&mut self, name: &str, ours: f64, peer: Option<f64>) {
        self.row_with(name, ours, peer, (1u64 << 20) as f64, 2);
    }

    pub fn render(&self) -> String {
        let mut out = format!("| {} |\n", self.header.join(" | "));
        out += &format!("|{}\n", "---|".repeat(self.header.len()));
        for row in &self.rows {
            out += &format!("| {} |\n", row.join(" | "));
        }
        out
    }
}

/// Writes docs/benchmarks/NAME.md with the table, a note and the date.
pub fn write_report(name: &str, note: &str, table: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    let _ = std::fs::create_dir_all(&dir);
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let text = format!(
        "# Benchmark: {name}\n\nMeasured {date} on {host} (`cargo bench -p vmm-tests --bench {name}`).\n{note}\n\n{table}"
    );
    let path = dir.join(format!("{name}.md"));
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("cannot write {}: {e}", path.display());
    } else {
        eprintln!("wrote {}", path.display());
    }
}

/// A VMM (ours or QEMU) whose guest console a benchmark drives line by line:
/// stdin and stdout piped, killed on drop. (The tests use
/// [`crate::harness::Vmm`]; benchmarks read the console without a thread.)
pub struct ConsoleGuest {
    pub child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    timeout: std::time::Duration,
}

impl ConsoleGuest {
    /// Starts `cmd`; waits for lines at most `timeout` each.
    pub fn spawn(mut cmd: std::process::Command, timeout: std::time::Duration) -> ConsoleGuest {
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the VMM starts");
        ConsoleGuest {
            stdin: child.stdin.take().expect("piped"),
            stdout: std::io::BufReader::new(child.stdout.take().expect("piped")),
            child,
            timeout,
        }
    }

    /// Reads console lines until one contains `needle`; a guest error line
    /// or the end of the output fails the benchmark.
    pub fn wait(&mut self, needle: &str) -> String {
        use std::io::BufRead;
        let deadline = std::time::Instant::now() + self.timeout;
        let mut line = String::new();
        while std::time::Instant::now() < deadline {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).unwrap_or(0) > 0,
                "the guest stopped before {needle:?}"
            );
            if line.contains(needle) {
                return line;
            }
            assert!(!line.contains("testguest: error"), "guest error: {line}");
        }
        panic!("no {needle:?} within {:?}", self.timeout);
    }

    /// Types `line` on the console.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").expect("the console takes input");
        self.stdin.flush().expect("the console takes input");
    }

    /// Types `command` and waits for the line containing `needle`.
    pub fn run(&mut self, command: &str, needle: &str) -> String {
        self.send(command);
        self.wait(needle)
    }
}

impl Drop for ConsoleGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_ratio() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(ratio(1.0, Some(4.0)), "0.25");
        assert_eq!(ratio(1.0, None), "-");
    }
}
