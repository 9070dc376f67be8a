//! `vmmctl migrate`: following a migration with a progress line.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use api::http::ApiClient;
use api::request::{MigrationPhase, MigrationStatus};

use crate::show::mib;
use crate::{client_error, json, EXIT_REFUSED, EXIT_UNREACHABLE};

/// How often `migrate` asks for the status.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long `migrate` waits for a migration it started to show in the status.
pub(crate) const START_GRACE: Duration = Duration::from_secs(5);
/// How often `migrate` prints a progress line when stderr is not a terminal
/// (and whenever the phase or round changes).
pub(crate) const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The environment variable naming the default API socket.
/// Polls the status of the migration just started until it ends, showing
/// the progress on stderr; the final statistics, or an error if it did not
/// complete (after printing the statistics).
pub(crate) fn follow_migration(client: &ApiClient, as_json: bool) -> Result<String, (u8, String)> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last: Option<MigrationStatus> = None;
    let mut last_line = started;
    let status = loop {
        let status = match client.migration_status() {
            Ok(status) => status,
            Err(e) if e.is_unreachable() => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                let phase = last.as_ref().map(|s| s.phase);
                return Err(if phase == Some(MigrationPhase::SwitchOver) {
                    (
                        EXIT_UNREACHABLE,
                        format!(
                            "lost the VMM during switch-over, before the outcome was seen \
                             (a source VMM exits once its guest runs on the destination): \
                             check the destination. {e}"
                        ),
                    )
                } else {
                    client_error(&e)
                });
            }
            Err(e) => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return Err(client_error(&e));
            }
        };
        let done = matches!(
            status.phase,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        );
        if status.phase == MigrationPhase::None && started.elapsed() > START_GRACE {
            return Err((
                EXIT_REFUSED,
                "the VMM reports no migration under way".into(),
            ));
        }
        if tty {
            if !done {
                eprint!("\r\x1b[K{}", progress_line(&status, true));
            }
        } else {
            let changed = last
                .as_ref()
                .is_none_or(|l| l.phase != status.phase || l.iterations != status.iterations);
            if changed || last_line.elapsed() >= PLAIN_PROGRESS_INTERVAL {
                eprintln!("{}", progress_line(&status, false));
                last_line = Instant::now();
            }
        }
        if done {
            break status;
        }
        last = Some(status);
        std::thread::sleep(POLL_INTERVAL);
    };
    if tty {
        eprint!("\r\x1b[K");
    }
    let report = if as_json {
        json(&status)
    } else {
        show_migration(&status)
    };
    if status.phase == MigrationPhase::Completed {
        return Ok(report);
    }
    write_stdout(&report);
    let mut message = format!("migration {}", phase_name(status.phase));
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        message.push_str(&format!(": {error}"));
    }
    Err((EXIT_REFUSED, message))
}

pub(crate) fn write_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout is not an error (as in main).
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

pub(crate) fn phase_name(phase: MigrationPhase) -> &'static str {
    match phase {
        MigrationPhase::None => "none",
        MigrationPhase::Setup => "setup",
        MigrationPhase::Active => "active",
        MigrationPhase::SwitchOver => "switch-over",
        MigrationPhase::Completed => "completed",
        MigrationPhase::Failed => "failed",
        MigrationPhase::Cancelled => "cancelled",
    }
}

/// Throughput in MB/s (10^6 bytes, as --bandwidth's M).
pub(crate) fn mb_per_s(bytes_per_s: u64) -> String {
    format!("{:.1} MB/s", bytes_per_s as f64 / 1e6)
}

/// How far the migration is, 0 to 1: the share of RAM sent in the first
/// pass, then the share not dirty.
pub(crate) fn progress(status: &MigrationStatus) -> f64 {
    if status.total_bytes == 0 {
        return 0.0;
    }
    let done = if status.iterations == 0 && status.phase != MigrationPhase::SwitchOver {
        status.transferred_bytes
    } else {
        status.total_bytes.saturating_sub(status.remaining_bytes)
    };
    (done as f64 / status.total_bytes as f64).clamp(0.0, 1.0)
}

/// One line of progress; for a terminal, with a bar and cut to 79 columns
/// (a wrapped line could not be overwritten).
pub(crate) fn progress_line(status: &MigrationStatus, bar: bool) -> String {
    const BAR: usize = 10;
    const COLUMNS: usize = 79;
    let mut line = format!("{:<11}", phase_name(status.phase));
    if !matches!(
        status.phase,
        MigrationPhase::Active | MigrationPhase::SwitchOver
    ) {
        return line.trim_end().to_string();
    }
    let fraction = progress(status);
    if bar {
        let filled = ((fraction * BAR as f64).round() as usize).min(BAR);
        line.push_str(&format!(
            " [{}{}]",
            "#".repeat(filled),
            " ".repeat(BAR - filled)
        ));
    }
    if status.iterations == 0 && status.phase == MigrationPhase::Active {
        line.push_str(&format!(" {:3.0}% of RAM", fraction * 100.0));
    } else {
        line.push_str(&format!(" {} left", mib(status.remaining_bytes)));
    }
    let mut parts = vec![
        mb_per_s(status.throughput_bytes_per_s),
        format!("round {}", status.iterations),
        format!("downtime ~{} ms", status.expected_downtime_ms),
    ];
    if status.throttle_percent > 0 {
        parts.push(format!("throttle {}%", status.throttle_percent));
    }
    for part in parts {
        if bar && line.len() + 2 + part.len() > COLUMNS {
            break;
        }
        line.push_str("  ");
        line.push_str(&part);
    }
    line
}

/// The statistics of a migration, one `name: value` per line.
pub(crate) fn show_migration(status: &MigrationStatus) -> String {
    let mut lines = vec![format!("phase: {}", phase_name(status.phase))];
    if status.phase != MigrationPhase::None {
        if let Some(role) = status.role {
            lines.push(format!("role: {role}"));
        }
        lines.extend([
            format!("total time: {} ms", status.total_time_ms),
            format!("setup time: {} ms", status.setup_time_ms),
            format!("downtime: {} ms", status.downtime_ms),
            format!("expected downtime: {} ms", status.expected_downtime_ms),
            format!(
                "transferred: {} of {} RAM",
                mib(status.transferred_bytes),
                mib(status.total_bytes)
            ),
            format!("remaining: {}", mib(status.remaining_bytes)),
            format!("zero pages: {}", status.zero_pages),
            format!("data pages: {}", status.data_pages),
            format!("dirty page rate: {} pages/s", status.dirty_pages_rate),
            format!("throughput: {}", mb_per_s(status.throughput_bytes_per_s)),
            format!("iterations: {}", status.iterations),
            format!("throttle: {}%", status.throttle_percent),
        ]);
    }
    if let Some(error) = &status.error {
        lines.push(format!("error: {error}"));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_fits_a_terminal_line() {
        let mut status = MigrationStatus {
            phase: MigrationPhase::Active,
            total_bytes: 1 << 30,
            transferred_bytes: 256 << 20,
            remaining_bytes: 768 << 20,
            throughput_bytes_per_s: 1_234_500_000,
            expected_downtime_ms: 40,
            ..MigrationStatus::default()
        };
        assert_eq!(
            progress_line(&status, true),
            "active      [###       ]  25% of RAM  1234.5 MB/s  round 0  downtime ~40 ms"
        );
        status.iterations = 12;
        status.remaining_bytes = 3 << 19;
        status.throttle_percent = 30;
        status.expected_downtime_ms = 12345;
        let line = progress_line(&status, true);
        assert!(line.len() <= 79, "{line}");
        assert!(
            line.starts_with("active      [##########] 1.5 MiB left  1234.5 MB/s  round 12"),
            "{line}"
        );
        // Plain lines are not cut.
        assert!(progress_line(&status, false).ends_with("  throttle 30%"));
        status.phase = MigrationPhase::Setup;
        assert_eq!(progress_line(&status, true), "setup");
        assert_eq!(show_migration(&MigrationStatus::default()), "phase: none\n");
    }
}
