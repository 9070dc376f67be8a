//! `vmm-overcommit`: the host's memory overcommit policy, in the spirit of
//! oVirt's MoM. Every round it finds the host's VMMs in the socket
//! directory (as `vmmctl list`), reads each guest's balloon and memory
//! statistics, measures the host's available memory (MemAvailable and PSI
//! memory pressure, or a configured budget), and moves balloon targets:
//! inflating guests that report free memory while the host is short,
//! deflating them when it has room again, never below a guest's floor
//! (what it uses plus a margin). Every change is logged with its reason.
//! `policy.rs` holds the rules; this file the I/O around them.
//!
//! With `--ksm` it also runs ksmd while guests with mergeable memory run
//! and paces it (`ksm.rs`).
//!
//! Runs as a service: resources/systemd/vmm-overcommit.service.

mod ksm;
mod policy;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::http::ApiClient;
use policy::{decide, Guest, Host, Mib, Settings};

const USAGE: &str = "\
usage: vmm-overcommit [OPTIONS]

Keeps the host's available memory above a target by moving the balloons of
the VMMs in the socket directory; logs every change on stderr.

  --socket-dir DIR         VMM API sockets (default: $VMM_SOCKET_DIR, else /run/vmm)
  --interval-ms N          time between rounds (default 2000)
  --host-target-mib N      keep at least N MiB available on the host (default 1024)
  --hysteresis-mib N       give memory back only above target + N MiB (default 256)
  --guest-margin-mib N     leave each guest N MiB free above what it uses:
                           its floor (default 256)
  --step-mib N             most one balloon moves per round for the host (default 128)
  --psi-limit PERCENT      memory pressure (PSI some avg10 of /proc/pressure/memory)
                           above PERCENT counts as short of memory (default 10;
                           0 turns it off)
  --host-memory-mib N      a host of N MiB that runs only these VMMs: available
                           is N minus the VMMs' resident memory, instead of
                           /proc/meminfo's MemAvailable (tests, or a memory budget
                           for the guests)
  --stats-max-age-ms N     ignore guest statistics older than N ms (default 10000;
                           give guests a balloon stats_interval_s below it)
  --ksm                    run ksmd (/sys/kernel/mm/ksm) while guests with mergeable
                           memory run, paced by how much there is to merge and how
                           short of memory the host is; stop it (run 0) when none runs
  --ksm-fast-scan-s N      a full scan of the mergeable memory every N s when the
                           host is at or below its target (default 10)
  --ksm-slow-scan-s N      every N s when it has twice its target (default 300)
  --ksm-max-pages N        at most N pages per ksmd batch (default 5000)
  -h, --help               this text

Exit status: 0 stopped by SIGTERM or SIGINT, 1 the socket directory cannot
be read, 2 usage error.
";

struct Options {
    socket_dir: PathBuf,
    interval: Duration,
    settings: Settings,
    psi_limit: f64,
    host_memory: Option<Mib>,
    stats_max_age_ms: u64,
    /// Manage ksmd, at this pace (`--ksm`).
    ksm: Option<ksm::Pacing>,
}

fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut options = Options {
        socket_dir: api::http::socket_dir(),
        interval: Duration::from_millis(2000),
        settings: Settings {
            host_target: 1024,
            hysteresis: 256,
            guest_margin: 256,
            step: 128,
        },
        psi_limit: 10.0,
        host_memory: None,
        stats_max_age_ms: 10_000,
        ksm: None,
    };
    let mut ksm_on = false;
    let mut pacing = ksm::Pacing::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        if arg == "--ksm" {
            ksm_on = true;
            continue;
        }
        let value = inline
            .or_else(|| args.next().cloned())
            .ok_or_else(|| format!("{flag}: needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: {value:?} is not a whole number"))
        };
        match flag {
            "--socket-dir" => options.socket_dir = PathBuf::from(&value),
            "--interval-ms" => {
                let ms = number()?;
                if ms == 0 {
                    return Err(format!("{flag}: must be at least 1"));
                }
                options.interval = Duration::from_millis(ms);
            }
            "--host-target-mib" => options.settings.host_target = number()?,
            "--hysteresis-mib" => options.settings.hysteresis = number()?,
            "--guest-margin-mib" => options.settings.guest_margin = number()?,
            "--step-mib" => {
                options.settings.step = number()?;
                if options.settings.step == 0 {
                    return Err(format!("{flag}: must be at least 1"));
                }
            }
            "--psi-limit" => {
                options.psi_limit = value
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| format!("{flag}: {value:?} is not a percentage"))?;
            }
            "--host-memory-mib" => options.host_memory = Some(number()?),
            "--stats-max-age-ms" => options.stats_max_age_ms = number()?,
            "--ksm-fast-scan-s" | "--ksm-slow-scan-s" | "--ksm-max-pages" => {
                let n = u32::try_from(number()?)
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("{flag}: must be between 1 and {}", u32::MAX))?;
                match flag {
                    "--ksm-fast-scan-s" => pacing.fast_scan_s = n,
                    "--ksm-slow-scan-s" => pacing.slow_scan_s = n,
                    _ => pacing.max_pages = n,
                }
            }
            _ => return Err(format!("unknown option {arg:?}")),
        }
    }
    if pacing.fast_scan_s > pacing.slow_scan_s {
        return Err(format!(
            "--ksm-fast-scan-s: {} s is slower than --ksm-slow-scan-s {} s",
            pacing.fast_scan_s, pacing.slow_scan_s
        ));
    }
    if ksm_on {
        options.ksm = Some(pacing);
    }
    Ok(Some(options))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A `/proc/meminfo` field in MiB.
fn meminfo_mib(field: &str) -> Option<Mib> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

/// PSI `some avg10` of memory: the share of the last 10 s in which some
/// task stalled on memory (percent). None without PSI.
fn memory_pressure() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// One VMM as a round sees it.
struct Seen {
    client: ApiClient,
    guest: Guest,
}

/// What the loop remembers between rounds.
#[derive(Default)]
struct State {
    /// When this policy last changed each guest's target (Unix ms).
    changed_at: HashMap<String, u64>,
    /// Guests reported once as not manageable (no balloon, errors).
    noted: HashMap<String, String>,
}

impl State {
    /// Logs `what` about `name` once, until it changes.
    fn note(&mut self, name: &str, what: String) {
        if self.noted.get(name) != Some(&what) {
            eprintln!("vmm-overcommit: {name}: {what}");
            self.noted.insert(name.to_string(), what);
        }
    }
}

/// What stops a round of the policy, or keeps it from managing ksmd.
#[derive(Debug, thiserror::Error)]
enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {text:?} is not a number")]
    NotANumber { path: String, text: String },
}

fn round(options: &Options, state: &mut State) -> Result<(), PolicyError> {
    let sockets =
        api::http::find_vmm_sockets(&options.socket_dir).map_err(|source| PolicyError::Read {
            path: options.socket_dir.display().to_string(),
            source,
        })?;
    let mut seen = Vec::new();
    let mut resident: Mib = 0;
    let (mut mergeable_guests, mut mergeable): (usize, Mib) = (0, 0);
    for (name, path) in sockets {
        let client = ApiClient::new(&path).with_timeout(Duration::from_secs(2));
        let info = match client.info() {
            Ok(info) => info,
            Err(e) => {
                state.note(&name, format!("skipped: {e}"));
                continue;
            }
        };
        if let Some(memory) = &info.memory {
            resident += memory.rss_bytes >> 20;
            // A built VM (running, paused, migrating) has its memory.
            if info.config.memory.mergeable {
                mergeable_guests += 1;
                mergeable += memory.guest_bytes >> 20;
            }
        }
        if info.config.balloon.is_none() {
            state.note(&name, "skipped: no balloon device".into());
            continue;
        }
        let stats = match client.balloon_statistics() {
            Ok(stats) => stats,
            Err(e) => {
                state.note(&name, format!("skipped: {e}"));
                continue;
            }
        };
        state.noted.remove(&name);
        // Figures the guest sent after this policy's last change, and
        // recent enough.
        let since = state.changed_at.get(&name).copied().unwrap_or(0);
        let fresh = stats.age_ms.is_some_and(|a| a <= options.stats_max_age_ms)
            && stats.timestamp_ms.is_some_and(|t| t > since);
        let guest = Guest {
            memory: info.config.memory.size_mib,
            target: stats.target_mib,
            actual: stats.actual_mib,
            free: stats.free_memory.filter(|_| fresh).map(|b| b >> 20),
            name,
        };
        seen.push(Seen { client, guest });
    }
    let available = match options.host_memory {
        Some(budget) => budget.saturating_sub(resident),
        None => meminfo_mib("MemAvailable").unwrap_or(0),
    };
    let pressure = options.psi_limit > 0.0
        && options.host_memory.is_none()
        && memory_pressure().is_some_and(|p| p > options.psi_limit);
    let host = Host {
        available,
        pressure,
    };
    if let Some(pacing) = &options.ksm {
        let seen = ksm::Seen {
            mergeable_guests,
            mergeable,
            urgency: ksm::urgency(available, options.settings.host_target, pressure),
        };
        ksm_round(seen, pacing, state);
    }
    let guests: Vec<Guest> = seen.iter().map(|s| s.guest.clone()).collect();
    for action in decide(host, &guests, &options.settings) {
        let Some(vmm) = seen.iter().find(|s| s.guest.name == action.guest) else {
            continue;
        };
        match vmm.client.balloon(action.to) {
            Ok(()) => {
                state.changed_at.insert(action.guest.clone(), now_ms());
                eprintln!(
                    "vmm-overcommit: {} {}: balloon {} -> {} MiB ({})",
                    action.verb(),
                    action.guest,
                    action.from,
                    action.to,
                    action.why
                );
            }
            Err(e) => eprintln!(
                "vmm-overcommit: {} {}: balloon {} -> {} MiB failed: {e}",
                action.verb(),
                action.guest,
                action.from,
                action.to
            ),
        }
    }
    Ok(())
}

/// Where the kernel has its KSM knobs.
const KSM_DIR: &str = "/sys/kernel/mm/ksm";

fn ksm_read(knob: &str) -> Result<String, PolicyError> {
    let path = format!("{KSM_DIR}/{knob}");
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|source| PolicyError::Read { path, source })
}

fn ksm_number(knob: &str) -> Result<u32, PolicyError> {
    let text = ksm_read(knob)?;
    text.parse().map_err(|_| PolicyError::NotANumber {
        path: format!("{KSM_DIR}/{knob}"),
        text,
    })
}

/// Starts, stops or paces ksmd as `ksm::decide` says; logs every change.
fn ksm_round(seen: ksm::Seen, pacing: &ksm::Pacing, state: &mut State) {
    let now = (|| {
        Ok::<_, PolicyError>(ksm::Knobs {
            run: ksm_number("run")?,
            pages_to_scan: ksm_number("pages_to_scan")?,
            sleep_millisecs: ksm_number("sleep_millisecs")?,
        })
    })();
    let now = match now {
        Ok(now) => now,
        Err(e) => {
            state.note("ksm", format!("not managed: {e}"));
            return;
        }
    };
    // Linux 6.7+: with advisor_mode scan-time the kernel sets
    // pages_to_scan itself.
    let advisor = ksm_read("advisor_mode").is_ok_and(|m| m.contains("[scan-time]"));
    let Some(change) = ksm::decide(now, seen, pacing, !advisor) else {
        return;
    };
    let verb = change.verb(&now);
    let mut writes = Vec::new();
    let mut what = Vec::new();
    // The pace before run, so that ksmd starts at it.
    for (knob, old, new) in [
        ("pages_to_scan", now.pages_to_scan, change.to.pages_to_scan),
        (
            "sleep_millisecs",
            now.sleep_millisecs,
            change.to.sleep_millisecs,
        ),
        ("run", now.run, change.to.run),
    ] {
        if old != new {
            writes.push((knob, new));
            what.push(format!("{knob} {old} -> {new}"));
        }
    }
    for (knob, value) in writes {
        if let Err(e) = std::fs::write(format!("{KSM_DIR}/{knob}"), value.to_string()) {
            eprintln!(
                "vmm-overcommit: ksm: {verb} failed: cannot write {value} to {KSM_DIR}/{knob}: {e}"
            );
            return;
        }
    }
    let merged = match (ksm_read("pages_shared"), ksm_read("pages_sharing")) {
        (Ok(shared), Ok(sharing)) => format!("; pages_shared {shared}, pages_sharing {sharing}"),
        _ => String::new(),
    };
    eprintln!(
        "vmm-overcommit: ksm: {verb}: {} ({}){merged}",
        what.join(", "),
        change.why
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vmm-overcommit: {e}\nTry 'vmm-overcommit --help'.");
            return ExitCode::from(2);
        }
    };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the signal numbers are valid.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    let s = &options.settings;
    eprintln!(
        "vmm-overcommit: watching {} every {} ms: host target {} MiB available ({}), \
         hysteresis {} MiB, guest margin {} MiB, step {} MiB",
        options.socket_dir.display(),
        options.interval.as_millis(),
        s.host_target,
        match options.host_memory {
            Some(m) => format!("a budget of {m} MiB minus the VMMs' resident memory"),
            None => format!("MemAvailable, PSI limit {}%", options.psi_limit),
        },
        s.hysteresis,
        s.guest_margin,
        s.step
    );
    if let Some(p) = &options.ksm {
        eprintln!(
            "vmm-overcommit: managing ksmd ({KSM_DIR}): a full scan every {} s when short of \
             memory to every {} s with room, at most {} pages a batch",
            p.fast_scan_s, p.slow_scan_s, p.max_pages
        );
    }
    let mut state = State::default();
    while !STOP.load(Ordering::SeqCst) {
        if let Err(e) = round(&options, &mut state) {
            eprintln!("vmm-overcommit: {e}");
            return ExitCode::from(1);
        }
        let deadline = std::time::Instant::now() + options.interval;
        while !STOP.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("vmm-overcommit: stopped");
    ExitCode::SUCCESS
}
