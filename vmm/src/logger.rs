//! The VMM's logger: every message of the VMM, its devices, its API server,
//! its migration code and the rust-vmm crates (all through the `log` crate)
//! goes to stderr, one line per message, one `write` per line.
//!
//! Formats:
//! - plain (a terminal, a file, `--log-file`):
//!   `vmm: MESSAGE [2025-05-01T10:00:00.123Z info]`. Lines start with
//!   `vmm: ` and the message, so scripts that look for `vmm: exiting:` or
//!   `vmm: migration: ...` at the start of a line (the OCF agent) keep
//!   working; the UTC timestamp and the level close the line.
//! - journald (stderr is the journal's stream, as `JOURNAL_STREAM` says):
//!   `<6>MESSAGE`: the syslog priority for the journal, no timestamp (the
//!   journal has its own) and no `vmm: ` (the journal names the program).
//!
//! Messages from other crates (vm-memory, virtio-queue, ...) carry their
//! crate's name: `vmm: vm_memory: MESSAGE`. Control characters in a
//! message are escaped (`\n`, `\x1b`): one record is one line, and text a
//! peer or guest sent cannot forge lines or drive a terminal.
//!
//! Writing is a `write(2)` on fd 2 and reading the clock `clock_gettime`,
//! which every thread's seccomp filter allows; the time is UTC so that no
//! time zone file is read from a confined thread.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Crates whose messages are the VMM's own (no crate name in the line).
const OWN_CRATES: &[&str] = &["vmm", "devices", "api", "migration", "config", "confine"];

/// How lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `vmm: MESSAGE [TIMESTAMP LEVEL]`.
    Plain,
    /// `<PRIORITY>MESSAGE` for journald.
    Journal,
}

struct Logger {
    format: Format,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(self.format, record, SystemTime::now());
        // One write per line (stderr is unbuffered): lines of concurrent
        // threads never interleave, and an O_APPEND log file gets whole
        // lines. Nothing to do if stderr is gone.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger with `level`; the format follows where stderr goes.
/// Call after stderr was redirected to `--log-file`, and only once.
pub fn init(level: LevelFilter) {
    let format = if stderr_is_journal() {
        Format::Journal
    } else {
        Format::Plain
    };
    if log::set_boxed_logger(Box::new(Logger { format })).is_ok() {
        log::set_max_level(level);
    }
}

/// Parses a `--log-level` value.
pub fn parse_level(text: &str) -> Option<LevelFilter> {
    match text {
        "error" => Some(LevelFilter::Error),
        "warn" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// Whether fd 2 is the journal stream systemd connected (its device and
/// inode are in `JOURNAL_STREAM`); false once stderr goes to a file.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes a stat into `stat`, which is plain data.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd 2 and the out-pointer are valid for the call.
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut stat) } != 0 {
        return false;
    }
    stat.st_dev == dev && stat.st_ino == ino
}

/// The syslog priority of a level (`<3>` error ... `<7>` debug).
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

fn format_line(format: Format, record: &Record<'_>, now: SystemTime) -> String {
    let message = record.args().to_string();
    let message = config::escape_control(&message);
    let krate = record.target().split("::").next().unwrap_or_default();
    let origin = if OWN_CRATES.contains(&krate) || krate.is_empty() {
        String::new()
    } else {
        format!("{krate}: ")
    };
    match format {
        Format::Journal => format!("<{}>{origin}{message}\n", priority(record.level())),
        Format::Plain => format!(
            "vmm: {origin}{message} [{} {}]\n",
            utc_timestamp(now),
            record.level().as_str().to_ascii_lowercase()
        ),
    }
}

/// RFC 3339 UTC with milliseconds: `2025-05-01T10:00:00.123Z`.
fn utc_timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(format: Format, level: Level, target: &str, message: &str) -> String {
        let at = UNIX_EPOCH + Duration::from_millis(1_714_557_600_123);
        format_line(
            format,
            &Record::builder()
                .args(format_args!("{message}"))
                .level(level)
                .target(target)
                .build(),
            at,
        )
    }

    #[test]
    fn plain_lines_start_with_the_prefix_and_end_with_time_and_level() {
        assert_eq!(
            line(
                Format::Plain,
                Level::Warn,
                "vmm::control",
                "exiting: the guest reset itself"
            ),
            "vmm: exiting: the guest reset itself [2024-05-01T10:00:00.123Z warn]\n"
        );
        assert_eq!(
            line(
                Format::Plain,
                Level::Info,
                "virtio_queue::queue",
                "queue ready"
            ),
            "vmm: virtio_queue: queue ready [2024-05-01T10:00:00.123Z info]\n"
        );
    }

    #[test]
    fn journal_lines_carry_the_priority_and_no_timestamp() {
        assert_eq!(
            line(
                Format::Journal,
                Level::Error,
                "vmm::control",
                "guest crashed"
            ),
            "<3>guest crashed\n"
        );
        assert_eq!(
            line(Format::Journal, Level::Debug, "vm_memory", "x"),
            "<7>vm_memory: x\n"
        );
    }

    #[test]
    fn a_message_cannot_forge_a_line_or_an_escape_sequence() {
        let text = line(
            Format::Plain,
            Level::Info,
            "vmm",
            "peer said: ok\nvmm: exiting: guest powered off\x1b[2J",
        );
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("ok\\nvmm: exiting"), "{text}");
    }

    #[test]
    fn dates_are_right_across_leap_years_and_centuries() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
    }

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("INFO"), None);
        assert_eq!(parse_level("verbose"), None);
    }
}
