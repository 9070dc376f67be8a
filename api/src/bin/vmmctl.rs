//! `vmmctl`: drives a `vmm` over its REST API socket.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::config::{MemoryBacking, SerialConfig, VmConfig};
use api::http::{ApiClient, ClientError};
use api::request::{Counters, PingInfo, ShutdownMode, ShutdownRequest, VmInfo};

const USAGE: &str = "\
vmmctl: drive a vmm over its REST API socket

Usage: vmmctl [--api-socket PATH] [--json] [--timeout SECONDS] COMMAND [ARGS]

Commands:
  ping                         check the VMM is alive: its version, pid and VM state
  shutdown-vmm                 stop the guest and end the VMM process
  create FILE                  define the VM from a JSON VmConfig file (- reads stdin)
  boot                         build and start the defined VM
  pause                        stop the vCPUs
  resume                       restart paused vCPUs
  shutdown [--force] [--timeout-ms N]
                               ask the guest to shut down; --force stops it at once;
                               --timeout-ms forces it off if it has not stopped
                               after N milliseconds
  info                         the VM's state and configuration
  counters                     exit and device counters

Options:
  --api-socket PATH   the VMM's API socket (default: $VMM_API_SOCKET)
  --json              print replies as JSON
  --timeout SECONDS   how long to wait for the VMM (default: 30)
  -h, --help          print this help
  -V, --version       print vmmctl's version

Exit status:
  0  success
  1  the VMM refused the request (its message is printed)
  2  usage error (bad arguments, unreadable FILE)
  3  cannot reach a VMM (no socket, connection refused, timeout, or a reply
     that is not from a VMM)
";

const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

/// The environment variable naming the default API socket.
const SOCKET_ENV: &str = "VMM_API_SOCKET";

#[derive(Debug)]
enum Command {
    Ping,
    ShutdownVmm,
    Create(PathBuf),
    Boot,
    Pause,
    Resume,
    Shutdown(ShutdownRequest),
    Info,
    Counters,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::ShutdownVmm => "shutdown-vmm",
            Command::Create(_) => "create",
            Command::Boot => "boot",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Shutdown(_) => "shutdown",
            Command::Info => "info",
            Command::Counters => "counters",
        }
    }
}

#[derive(Debug)]
struct Args {
    socket: PathBuf,
    json: bool,
    timeout: Duration,
    command: Command,
}

enum Parsed {
    Run(Args),
    Help,
    Version,
}

/// Parses the command line (without the program name).
fn parse_args(args: Vec<String>, env_socket: Option<String>) -> Result<Parsed, String> {
    let mut socket: Option<String> = None;
    let mut json = false;
    let mut timeout = api::http::DEFAULT_CLIENT_TIMEOUT;
    let mut words: Vec<String> = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--json" if inline.is_none() => json = true,
            "--api-socket" => socket = Some(value("--api-socket")?),
            "--timeout" => {
                let text = value("--timeout")?;
                let seconds: f64 = text
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 1e9)
                    .ok_or_else(|| format!("--timeout: {text:?} is not a number of seconds"))?;
                timeout = Duration::from_secs_f64(seconds);
            }
            // Options of a command (--force, --timeout-ms) go with its words.
            _ => {
                words.push(arg);
                if inline.is_none() && flag == "--timeout-ms" {
                    if let Some(next) = args.next() {
                        words.push(next);
                    }
                }
            }
        }
    }
    let socket = socket
        .or(env_socket)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("no API socket: give --api-socket PATH or set {SOCKET_ENV}"))?;
    let mut words = words.into_iter();
    let name = words.next().ok_or("no command given")?;
    let rest: Vec<String> = words.collect();
    let no_args = |command: Command| {
        if let Some(extra) = rest.first() {
            Err(format!("{}: unexpected argument {extra:?}", command.name()))
        } else {
            Ok(command)
        }
    };
    let command = match name.as_str() {
        "ping" => no_args(Command::Ping)?,
        "shutdown-vmm" => no_args(Command::ShutdownVmm)?,
        "boot" => no_args(Command::Boot)?,
        "pause" => no_args(Command::Pause)?,
        "resume" => no_args(Command::Resume)?,
        "info" => no_args(Command::Info)?,
        "counters" => no_args(Command::Counters)?,
        "create" => match rest.as_slice() {
            [file] if file == "-" || !file.starts_with('-') => Command::Create(file.into()),
            [] => return Err("create: give a VmConfig JSON FILE (or - for stdin)".into()),
            [file] => return Err(format!("create: unknown option {file:?}")),
            [_, extra, ..] => return Err(format!("create: unexpected argument {extra:?}")),
        },
        "shutdown" => Command::Shutdown(parse_shutdown(&rest)?),
        _ => return Err(format!("unknown command {name:?}")),
    };
    Ok(Parsed::Run(Args {
        socket: socket.into(),
        json,
        timeout,
        command,
    }))
}

fn parse_shutdown(args: &[String]) -> Result<ShutdownRequest, String> {
    let mut request = ShutdownRequest::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (arg.as_str(), None),
        };
        match flag {
            "--force" if inline.is_none() => request.mode = ShutdownMode::Force,
            "--timeout-ms" => {
                let text = inline
                    .or_else(|| args.next().map(String::as_str))
                    .ok_or("shutdown: --timeout-ms needs a value")?;
                let ms = text.parse().map_err(|_| {
                    format!("shutdown: --timeout-ms: {text:?} is not a number of milliseconds")
                })?;
                request.timeout_ms = Some(ms);
            }
            _ if arg.starts_with('-') => return Err(format!("shutdown: unknown option {arg:?}")),
            _ => return Err(format!("shutdown: unexpected argument {arg:?}")),
        }
    }
    if request.mode == ShutdownMode::Force && request.timeout_ms.is_some() {
        return Err(
            "shutdown: --timeout-ms applies to a graceful shutdown, not with --force".into(),
        );
    }
    Ok(request)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env_socket = std::env::var(SOCKET_ENV).ok();
    let args = match parse_args(args, env_socket) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("vmmctl {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("vmmctl: {message}\nTry 'vmmctl --help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&args) {
        Ok(output) => {
            if !output.is_empty() {
                let mut stdout = std::io::stdout().lock();
                // A closed stdout (`vmmctl info | head -1`) is not an error.
                let _ = stdout.write_all(output.as_bytes());
            }
            ExitCode::SUCCESS
        }
        Err((code, message)) => {
            eprintln!("vmmctl: {}: {message}", args.command.name());
            ExitCode::from(code)
        }
    }
}

/// Runs the command: the text to print, or an exit code and message.
fn run(args: &Args) -> Result<String, (u8, String)> {
    let mut client = ApiClient::new(&args.socket).with_timeout(args.timeout);
    let text = |value: Result<String, ClientError>| value.map_err(client_error);
    match &args.command {
        Command::Ping => {
            let ping = client.ping().map_err(client_error)?;
            Ok(if args.json {
                json(&ping)
            } else {
                show_ping(&ping)
            })
        }
        Command::Info => {
            let info = client.info().map_err(client_error)?;
            Ok(if args.json {
                json(&info)
            } else {
                show_info(&info)
            })
        }
        Command::Counters => {
            let counters = client.counters().map_err(client_error)?;
            Ok(if args.json {
                json(&counters)
            } else {
                show_counters(&counters)
            })
        }
        Command::ShutdownVmm => text(client.shutdown_vmm().map(|()| String::new())),
        Command::Boot => text(client.boot().map(|()| String::new())),
        Command::Pause => text(client.pause().map(|()| String::new())),
        Command::Resume => text(client.resume().map(|()| String::new())),
        Command::Shutdown(request) => {
            // The VMM may answer only once the guest is down: wait past its timeout.
            if let Some(ms) = request.timeout_ms {
                let wait = Duration::from_millis(ms).saturating_add(args.timeout);
                client = client.with_timeout(wait);
            }
            text(client.shutdown(request).map(|()| String::new()))
        }
        Command::Create(file) => {
            let body = read_config(file).map_err(|m| (EXIT_USAGE, m))?;
            text(client.create_json(&body).map(|()| String::new()))
        }
    }
}

fn read_config(file: &PathBuf) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut body)
            .map_err(|e| format!("cannot read the config from stdin: {e}"))?;
    } else {
        body = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    }
    Ok(body)
}

fn client_error(e: ClientError) -> (u8, String) {
    let code = match &e {
        ClientError::Api { .. } => EXIT_REFUSED,
        ClientError::InvalidRequest(_) => EXIT_USAGE,
        _ => EXIT_UNREACHABLE,
    };
    (code, e.to_string())
}

fn json<T: serde::Serialize>(value: &T) -> String {
    let mut text =
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

fn show_ping(ping: &PingInfo) -> String {
    format!(
        "vmm {} pid {} state {}\n",
        ping.version, ping.pid, ping.state
    )
}

fn mib(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{mib:.1} MiB")
    }
}

fn rate(limit: &Option<api::config::RateLimitConfig>) -> Option<String> {
    let limit = limit.as_ref().filter(|l| !l.is_unlimited())?;
    let mut parts = Vec::new();
    if let Some(bytes) = limit.bytes_per_sec.filter(|&b| b > 0) {
        parts.push(format!("{bytes} B/s"));
    }
    if let Some(ops) = limit.ops_per_sec.filter(|&o| o > 0) {
        parts.push(format!("{ops} ops/s"));
    }
    Some(format!("rate {}", parts.join(" ")))
}

fn show_info(info: &VmInfo) -> String {
    let config: &VmConfig = &info.config;
    let mut lines = vec![
        format!("state: {}", info.state),
        format!("vcpus: {}", config.cpus.boot_vcpus),
    ];
    let backing = match config.memory.backing {
        MemoryBacking::Anonymous => "anonymous",
        MemoryBacking::Memfd => "memfd",
        MemoryBacking::Hugetlbfs => "hugetlbfs",
    };
    let mergeable = if config.memory.mergeable {
        ", mergeable"
    } else {
        ""
    };
    lines.push(format!(
        "memory: {} MiB ({backing}{mergeable})",
        config.memory.size_mib
    ));
    lines.push(format!("kernel: {}", config.payload.kernel.display()));
    lines.push(format!("cmdline: {}", config.payload.cmdline));
    if let Some(initrd) = &config.payload.initrd {
        lines.push(format!("initrd: {}", initrd.display()));
    }
    lines.push(match &config.serial {
        SerialConfig::Stdout => "serial: stdout".to_string(),
        SerialConfig::Off => "serial: off".to_string(),
        SerialConfig::Pty => match &info.serial_pty {
            Some(pty) => format!("serial: pty {}", pty.display()),
            None => "serial: pty".to_string(),
        },
        SerialConfig::File { path } => format!("serial: file {}", path.display()),
        SerialConfig::Socket { path } => format!("serial: socket {}", path.display()),
    });
    if config.disks.is_empty() {
        lines.push("disks: none".to_string());
    }
    for (i, disk) in config.disks.iter().enumerate() {
        let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let mut line = format!("disk {id}: {}", disk.path.display());
        if disk.readonly {
            line.push_str(" readonly");
        }
        if disk.direct {
            line.push_str(" direct");
        }
        if let Some(serial) = &disk.serial {
            line.push_str(&format!(" serial={serial}"));
        }
        if let Some(size) = disk.logical_block_size {
            line.push_str(&format!(" logical_block_size={size}"));
        }
        if let Some(size) = disk.physical_block_size {
            line.push_str(&format!(" physical_block_size={size}"));
        }
        if let Some(rate) = rate(&disk.rate_limit) {
            line.push_str(&format!(" {rate}"));
        }
        lines.push(line);
    }
    if config.nets.is_empty() {
        lines.push("nets: none".to_string());
    }
    for (i, net) in config.nets.iter().enumerate() {
        let id = net.id.clone().unwrap_or_else(|| format!("net{i}"));
        let mut line = format!("net {id}:");
        if let Some(tap) = &net.tap {
            line.push_str(&format!(" tap {tap}"));
        }
        if let Some(fd) = net.fd {
            line.push_str(&format!(" fd {fd}"));
        }
        if let Some(mac) = &net.mac {
            line.push_str(&format!(" mac {mac}"));
        }
        if let Some(rate) = rate(&net.rate_limit) {
            line.push_str(&format!(" {rate}"));
        }
        lines.push(line);
    }
    if let Some(balloon) = &config.balloon {
        let mut line = format!("balloon: target {} MiB", balloon.target_mib);
        if balloon.deflate_on_oom {
            line.push_str(", deflate on oom");
        }
        if balloon.free_page_reporting {
            line.push_str(", free page reporting");
        }
        if balloon.stats_interval_s > 0 {
            line.push_str(&format!(", stats every {} s", balloon.stats_interval_s));
        }
        lines.push(line);
    }
    lines.push(format!(
        "on reset: {}",
        match config.on_reset {
            api::config::ResetAction::Exit => "exit",
            api::config::ResetAction::Reboot => "reboot",
        }
    ));
    if let Some(memory) = &info.memory {
        lines.push(format!(
            "host memory: guest {}, rss {}",
            mib(memory.guest_bytes),
            mib(memory.rss_bytes)
        ));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

fn show_counters(counters: &Counters) -> String {
    let rows: Vec<(&str, &str, String)> = counters
        .iter()
        .flat_map(|(component, values)| {
            values
                .iter()
                .map(move |(name, value)| (component.as_str(), name.as_str(), value.to_string()))
        })
        .collect();
    if rows.is_empty() {
        return "no counters\n".to_string();
    }
    let width = |header: &str, column: &dyn Fn(&(&str, &str, String)) -> usize| {
        rows.iter()
            .map(column)
            .chain([header.len()])
            .max()
            .unwrap_or(0)
    };
    let w0 = width("COMPONENT", &|r| r.0.len());
    let w1 = width("COUNTER", &|r| r.1.len());
    let w2 = width("VALUE", &|r| r.2.len());
    let mut text = format!(
        "{:<w0$}  {:<w1$}  {:>w2$}\n",
        "COMPONENT", "COUNTER", "VALUE"
    );
    for (component, name, value) in &rows {
        text.push_str(&format!("{component:<w0$}  {name:<w1$}  {value:>w2$}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(|s| s.to_string()).collect(), None)
    }

    fn command(args: &[&str]) -> Command {
        match parse(args) {
            Ok(Parsed::Run(args)) => args.command,
            Ok(_) => panic!("not a command"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn commands_parse() {
        assert!(matches!(
            command(&["--api-socket", "/s", "ping"]),
            Command::Ping
        ));
        assert!(matches!(
            command(&["--api-socket=/s", "info", "--json"]),
            Command::Info
        ));
        match command(&["--api-socket", "/s", "shutdown", "--timeout-ms", "500"]) {
            Command::Shutdown(r) => assert_eq!(r.timeout_ms, Some(500)),
            other => panic!("{other:?}"),
        }
        match command(&["--api-socket", "/s", "shutdown", "--force"]) {
            Command::Shutdown(r) => assert_eq!(r.mode, ShutdownMode::Force),
            other => panic!("{other:?}"),
        }
        match command(&["--api-socket", "/s", "create", "-"]) {
            Command::Create(f) => assert_eq!(f, PathBuf::from("-")),
            other => panic!("{other:?}"),
        }
        match parse_args(vec!["ping".into()], Some("/env".into())) {
            Ok(Parsed::Run(args)) => assert_eq!(args.socket, PathBuf::from("/env")),
            _ => panic!(),
        }
        match parse(&[
            "--api-socket",
            "/s",
            "--timeout",
            "0.5",
            "--json",
            "counters",
        ]) {
            Ok(Parsed::Run(args)) => {
                assert!(args.json);
                assert_eq!(args.timeout, Duration::from_millis(500));
            }
            _ => panic!(),
        }
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Help)));
        assert!(matches!(parse(&["ping", "-V"]), Ok(Parsed::Version)));
    }

    #[test]
    fn usage_errors_are_explained() {
        let error = |args: &[&str]| parse(args).err().unwrap_or_default();
        assert!(error(&["ping"]).contains("VMM_API_SOCKET"));
        assert!(error(&["--api-socket", "/s"]).contains("no command"));
        assert!(error(&["--api-socket", "/s", "bogus"]).contains("bogus"));
        assert!(error(&["--api-socket", "/s", "ping", "extra"]).contains("extra"));
        assert!(error(&["--api-socket", "/s", "create"]).contains("FILE"));
        assert!(error(&[
            "--api-socket",
            "/s",
            "shutdown",
            "--force",
            "--timeout-ms",
            "5"
        ])
        .contains("--force"));
        assert!(
            error(&["--api-socket", "/s", "shutdown", "--timeout-ms", "soon"]).contains("soon")
        );
        assert!(error(&["--api-socket", "/s", "shutdown", "--now"]).contains("--now"));
        assert!(error(&["--api-socket"]).contains("needs a value"));
        assert!(error(&["--api-socket", "/s", "--timeout", "-1", "ping"]).contains("--timeout"));
    }

    #[test]
    fn counters_make_a_table() {
        let mut counters = Counters::new();
        counters.insert(
            "vcpu0".into(),
            [("exits".to_string(), 12345u64), ("io".to_string(), 7)].into(),
        );
        let table = show_counters(&counters);
        assert_eq!(
            table,
            "COMPONENT  COUNTER  VALUE\nvcpu0      exits    12345\nvcpu0      io           7\n"
        );
        assert_eq!(show_counters(&Counters::new()), "no counters\n");
    }
}
