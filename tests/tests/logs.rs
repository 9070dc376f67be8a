//! The VMM's log: one line per message starting `vmm: ` with a UTC
//! timestamp and the level at its end; `--log-level` filters; under
//! journald (stderr is the journal stream `JOURNAL_STREAM` names) a syslog
//! priority instead of a timestamp. These VMMs serve only their API: no
//! KVM is needed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmm_tests::harness::{vmm_binary, TempDir, Vmm};

const SHORT: Duration = Duration::from_secs(15);

fn api_only(dir: &TempDir, extra: &[&str]) -> Vmm {
    let socket = dir.join("web1.sock");
    let mut args = vec!["--api-socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    let vmm = Vmm::spawn(&args);
    vmm.wait_api(SHORT);
    vmm
}

/// The lines of `path` once one contains `needle`.
fn wait_file(path: &Path, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + SHORT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text.lines().map(str::to_string).collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} never had {needle:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Splits `vmm: MESSAGE [2025-05-01T10:00:00.123Z level]`.
fn plain_line(line: &str) -> (&str, u64, &str) {
    let message = line
        .strip_prefix("vmm: ")
        .unwrap_or_else(|| panic!("no vmm: prefix: {line:?}"));
    let (message, meta) = message
        .rsplit_once(" [")
        .unwrap_or_else(|| panic!("no [timestamp level]: {line:?}"));
    let (stamp, level) = meta
        .strip_suffix(']')
        .and_then(|m| m.split_once(' '))
        .unwrap_or_else(|| panic!("bad [timestamp level]: {line:?}"));
    (message, unix_seconds(stamp), level)
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS.mmmZ` (days from the
/// civil date by the usual formula, independent of the VMM's).
fn unix_seconds(stamp: &str) -> u64 {
    assert_eq!(stamp.len(), 24, "{stamp}");
    assert!(stamp.ends_with('Z') && &stamp[10..11] == "T", "{stamp}");
    let n = |range: std::ops::Range<usize>| -> i64 { stamp[range].parse().unwrap() };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (y, m) = if m <= 2 { (y - 1, m + 12) } else { (y, m) };
    let days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * (m - 3) + 2) / 5 + d - 719_469;
    (days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)) as u64
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn log_lines_start_with_the_prefix_and_end_with_utc_time_and_level() {
    let dir = TempDir::new("log-format");
    let vmm = api_only(&dir, &[]);
    vmm.signal(libc::SIGUSR1);
    let line = vmm.wait_for_stderr("SIGUSR1 ignored", SHORT);
    let line = line.trim_start_matches("vmm| ");
    let (message, at, level) = plain_line(line);
    assert_eq!(message, "SIGUSR1 ignored");
    assert_eq!(level, "info");
    assert!(at.abs_diff(now()) < 120, "{line}: not now");
    // Actions are logged with the endpoint that made them.
    let api = vmm.api();
    api.delete().unwrap();
    assert!(
        !vmm.stderr().iter().any(|l| l.contains("vm.delete")),
        "nothing was done, nothing logged: {:?}",
        vmm.stderr()
    );
}

#[test]
fn the_log_level_filters_what_is_logged() {
    let dir = TempDir::new("log-level");
    // debug: every API request is logged by its endpoint.
    let mut vmm = api_only(&dir, &["--log-level", "debug"]);
    vmm.api().ping().unwrap();
    let line = vmm.wait_for_stderr("api: vmm.ping", SHORT);
    assert!(line.ends_with("debug]"), "{line}");
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), 0);

    // warn: neither the info lines nor the debug ones.
    let dir = TempDir::new("log-level-warn");
    let mut vmm = api_only(&dir, &["--log-level", "warn"]);
    vmm.api().ping().unwrap();
    vmm.signal(libc::SIGUSR1);
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), 0);
    let stderr = vmm.stderr();
    assert!(
        !stderr
            .iter()
            .any(|l| l.contains("SIGUSR1") || l.contains("SIGTERM") || l.contains("api:")),
        "{stderr:?}"
    );

    // The default (info) logs what warn left out, and not the debug lines.
    let dir = TempDir::new("log-level-info");
    let mut vmm = api_only(&dir, &[]);
    vmm.api().ping().unwrap();
    vmm.signal(libc::SIGUSR1);
    vmm.wait_for_stderr("SIGUSR1 ignored", SHORT);
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.exit_code(SHORT), 0);
    assert!(vmm.stderr().iter().any(|l| l.contains("SIGTERM: stopping")));
    assert!(!vmm.stderr().iter().any(|l| l.contains("api: vmm.ping")));

    let mut bad = Vmm::spawn(&["--api-socket", "/nonexistent/x.sock", "--log-level", "loud"]);
    assert_eq!(bad.exit_code(SHORT), 2);
    assert!(bad.stderr().join("\n").contains("--log-level"));
}

/// Starts an API-only VMM whose stderr is `log`, with `JOURNAL_STREAM` set
/// to `journal_stream`; returns it once `needle` is in the log after a SIGUSR1.
fn run_with_stderr_file(
    dir: &TempDir,
    log: &Path,
    journal_stream: &str,
    extra: &[&str],
    watch: &Path,
) -> Vec<String> {
    let stderr = std::fs::File::create(log).unwrap();
    let socket = dir.join("j.sock");
    let mut child = Command::new(vmm_binary())
        .arg("--api-socket")
        .arg(&socket)
        .args(extra)
        .env("JOURNAL_STREAM", journal_stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SHORT;
    while api::http::ApiClient::new(&socket).ping().is_err() {
        assert!(Instant::now() < deadline, "the VMM never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let lines = wait_file(watch, "SIGUSR1 ignored");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
    lines
}

#[test]
fn under_journald_lines_carry_a_priority_and_no_timestamp() {
    let dir = TempDir::new("journal");
    let log = dir.join("stderr");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let lines = run_with_stderr_file(&dir, &log, &stream, &[], &log);
    assert!(lines.iter().any(|l| l == "<6>SIGUSR1 ignored"), "{lines:?}");
    assert!(lines.iter().all(|l| l.starts_with('<')), "{lines:?}");

    // JOURNAL_STREAM inherited, but stderr is not that stream (a service
    // that redirected it, or --log-file): plain lines.
    let elsewhere = dir.join("elsewhere");
    let lines = run_with_stderr_file(&dir, &elsewhere, &stream, &[], &elsewhere);
    let line = lines.iter().find(|l| l.contains("SIGUSR1")).unwrap();
    assert_eq!(plain_line(line).0, "SIGUSR1 ignored");
    let file = dir.join("vmm.log");
    let lines = run_with_stderr_file(
        &dir,
        &log,
        &stream,
        &["--log-file", file.to_str().unwrap()],
        &file,
    );
    let line = lines.iter().find(|l| l.contains("SIGUSR1")).unwrap();
    assert_eq!(plain_line(line).2, "info");
}
