//! `vmmctl`: drives a `vmm` over its REST API socket.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::http::{ApiClient, ClientError};
use api::request::{
    validate_migration_url, BalloonStatistics, Counters, MigrationParameters, MigrationPhase,
    MigrationStatus, PingInfo, ReceiveMigrationRequest, SendMigrationRequest, ShutdownMode,
    ShutdownRequest, TimeoutAction, VmInfo,
};
use config::{MemoryBacking, SerialConfig, VmConfig};

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
  shutdown [--force | --ctrl-alt-del] [--timeout-ms N]
                               ask the guest to shut down (ACPI power button);
                               --ctrl-alt-del sends Ctrl-Alt-Del instead (guests
                               without ACPI); --force stops it at once;
                               --timeout-ms forces it off if it has not stopped
                               after N milliseconds
  info                         the VM's state and configuration
  counters                     exit and device counters
  migrate DESTINATION (--token-file FILE | --token TOKEN) [--downtime-ms N]
          [--bandwidth SIZE] [--timeout-s N] [--timeout-action cancel|force]
          [--no-auto-converge] [--detach]
                               migrate the VM to the VMM listening on DESTINATION
                               (tcp:HOST:PORT or unix:PATH): shows the progress on
                               stderr, then the statistics (exit 0 if it completed,
                               1 if it failed or was cancelled); --detach returns
                               once it has started. Interrupting vmmctl does not
                               stop the migration: use migrate --cancel
  migrate --cancel             stop the outgoing migration; the guest keeps running here
  migrate-status               the phase and figures of the current (or last) migration
  migrate-set [--downtime-ms N] [--bandwidth SIZE] [--timeout-s N]
          [--timeout-action cancel|force] [--no-auto-converge]
                               change the parameters of the running migration; an
                               option left out takes its default, not its current value
  receive-migration LISTEN (--token-file FILE | --token TOKEN)
                               make a VMM without a VM listen on LISTEN
                               (tcp:HOST:PORT or unix:PATH) for an incoming migration
  balloon [--target-mib N]     set the balloon's target: the guest is asked to give
                               N MiB back (0 deflates it); without --target-mib,
                               print the balloon statistics
  balloon-stats                the balloon's target and actual size and the guest's
                               last memory statistics
  list [--socket-dir DIR]      every VMM whose API socket is a *.sock in DIR (default:
                               $VMM_SOCKET_DIR, else /run/vmm): name, pid, state,
                               guest memory, RSS, balloon target and actual, pages
                               KSM merged; sockets nobody answers on are listed as
                               stale. Needs no --api-socket

Migration options:
  --token-file FILE       the pre-shared token of sender and receiver, read from
                          FILE (trailing newlines are dropped; it must not be empty)
  --token TOKEN           the token on the command line (other users can see it)
  --downtime-ms N         largest acceptable pause of the guest at switch-over
                          (default: 300)
  --bandwidth SIZE        bandwidth cap in bytes/s, with an optional suffix K, M, G,
                          T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024):
                          100M is 100000000 (default and 0: unlimited)
  --timeout-s N           after N seconds, apply the --timeout-action (default: none)
  --timeout-action ACTION cancel: give up, the guest keeps running here (default);
                          force: switch over at once, whatever the downtime
  --no-auto-converge      do not slow the vCPUs down when the guest dirties memory
                          faster than it can be sent

Socket directory convention: start each VMM with
`vmm --api-socket /run/vmm/NAME.sock` (or under $VMM_SOCKET_DIR); NAME is what
`vmmctl list` shows, and `vmmctl --api-socket /run/vmm/NAME.sock` reaches it.

Options:
  --api-socket PATH   the VMM's API socket (default: $VMM_API_SOCKET)
  --json              print replies as JSON
  --timeout SECONDS   how long to wait for the VMM (default: 30)
  -h, --help          print this help
  -V, --version       print vmmctl's version

Exit status:
  0  success
  1  the VMM refused the request (its message is printed), or the migration
     failed or was cancelled
  2  usage error (bad arguments, unreadable FILE)
  3  cannot reach a VMM (no socket, connection refused, timeout, or a reply
     that is not from a VMM), or it went away during a migration before its
     outcome was seen
";

const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

/// Options of commands that take a value: the value goes with the option
/// even if it looks like a global option.
const COMMAND_VALUE_OPTIONS: &[&str] = &[
    "--timeout-ms",
    "--token",
    "--token-file",
    "--downtime-ms",
    "--bandwidth",
    "--timeout-s",
    "--timeout-action",
    "--target-mib",
    "--socket-dir",
];

/// How often `migrate` asks for the status.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long `migrate` waits for a migration it started to show in the status.
const START_GRACE: Duration = Duration::from_secs(5);
/// How often `migrate` prints a progress line when stderr is not a terminal
/// (and whenever the phase or round changes).
const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The environment variable naming the default API socket.
const SOCKET_ENV: &str = "VMM_API_SOCKET";
/// The environment variable naming the directory `list` scans.
const SOCKET_DIR_ENV: &str = "VMM_SOCKET_DIR";
/// Where VMM API sockets live by convention.
const DEFAULT_SOCKET_DIR: &str = "/run/vmm";
/// The longest `list` waits for one VMM.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

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
    Migrate(MigrateArgs),
    MigrateCancel,
    MigrateStatus,
    MigrateSet(MigrationParameters),
    ReceiveMigration {
        listen: String,
        token: Token,
    },
    /// `balloon --target-mib N` sets the target, `balloon` alone shows it.
    Balloon(Option<u64>),
    BalloonStats,
    /// `list`: the directory given, else the environment's or the default.
    List(Option<PathBuf>),
}

/// `migrate DESTINATION ...`.
#[derive(Debug)]
struct MigrateArgs {
    destination: String,
    token: Token,
    parameters: MigrationParameters,
    detach: bool,
}

/// Where the migration token comes from.
#[derive(Debug, PartialEq)]
enum Token {
    Literal(String),
    File(PathBuf),
}

impl Token {
    /// The token; a file is read when the command runs (as `create` reads its FILE).
    fn read(&self) -> Result<String, String> {
        let token = match self {
            Token::Literal(token) => token.clone(),
            Token::File(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read the token from {}: {e}", file.display()))?;
                let token = text.trim_end_matches(['\n', '\r']).to_string();
                if token.is_empty() {
                    return Err(format!("the token file {} is empty", file.display()));
                }
                token
            }
        };
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        Ok(token)
    }
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
            Command::Migrate(_) | Command::MigrateCancel => "migrate",
            Command::MigrateStatus => "migrate-status",
            Command::MigrateSet(_) => "migrate-set",
            Command::ReceiveMigration { .. } => "receive-migration",
            Command::Balloon(_) => "balloon",
            Command::BalloonStats => "balloon-stats",
            Command::List(_) => "list",
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
                if inline.is_none() && COMMAND_VALUE_OPTIONS.contains(&flag.as_str()) {
                    if let Some(next) = args.next() {
                        words.push(next);
                    }
                }
            }
        }
    }
    let socket = socket.or(env_socket).filter(|s| !s.is_empty());
    let no_socket = || format!("no API socket: give --api-socket PATH or set {SOCKET_ENV}");
    let mut words = words.into_iter();
    let name = match words.next() {
        Some(name) => name,
        None if socket.is_none() => return Err(no_socket()),
        None => return Err("no command given".into()),
    };
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
        "migrate" => parse_migrate(&rest)?,
        "migrate-status" => no_args(Command::MigrateStatus)?,
        "migrate-set" => parse_migrate_set(&rest)?,
        "receive-migration" => parse_receive_migration(&rest)?,
        "balloon" => parse_balloon(&rest)?,
        "balloon-stats" => no_args(Command::BalloonStats)?,
        "list" => parse_list(&rest)?,
        _ => return Err(format!("unknown command {name:?}")),
    };
    // `list` finds its VMMs itself.
    let socket = match (&command, socket) {
        (Command::List(_), socket) => socket.unwrap_or_default(),
        (_, Some(socket)) => socket,
        (_, None) => return Err(no_socket()),
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
            "--force" | "--ctrl-alt-del" if inline.is_none() => {
                let mode = if flag == "--force" {
                    ShutdownMode::Force
                } else {
                    ShutdownMode::CtrlAltDel
                };
                if request.mode != ShutdownMode::Graceful && request.mode != mode {
                    return Err("shutdown: --force and --ctrl-alt-del exclude each other".into());
                }
                request.mode = mode;
            }
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

/// The options of `migrate`, `migrate-set` and `receive-migration`.
#[derive(Debug, Default)]
struct MigrationOptions {
    words: Vec<String>,
    /// How many options were given.
    options: usize,
    token: Option<Token>,
    parameters: MigrationParameters,
    detach: bool,
    cancel: bool,
}

const TUNING_OPTIONS: &[&str] = &[
    "--downtime-ms",
    "--bandwidth",
    "--timeout-s",
    "--timeout-action",
    "--no-auto-converge",
];

/// Parses the options of `command` that are in `allowed`; other words are
/// left in [`MigrationOptions::words`].
fn parse_migration_options(
    command: &str,
    args: &[String],
    allowed: &[&str],
) -> Result<MigrationOptions, String> {
    let mut options = MigrationOptions::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if !arg.starts_with('-') || arg == "-" {
            options.words.push(arg.clone());
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (arg.as_str(), None),
        };
        if !allowed.contains(&flag) {
            return Err(format!("{command}: unknown option {arg:?}"));
        }
        options.options += 1;
        let takes_value = COMMAND_VALUE_OPTIONS.contains(&flag);
        if !takes_value && inline.is_some() {
            return Err(format!("{command}: {flag} takes no value"));
        }
        let mut value = || {
            inline
                .or_else(|| args.next().map(String::as_str))
                .ok_or_else(|| format!("{command}: {flag} needs a value"))
        };
        let number = |text: &str, unit: &str| {
            text.parse::<u64>()
                .map_err(|_| format!("{command}: {flag}: {text:?} is not a number of {unit}"))
        };
        let parameters = &mut options.parameters;
        match flag {
            "--token" | "--token-file" => {
                if options.token.is_some() {
                    return Err(format!(
                        "{command}: give the token once, with --token-file or --token"
                    ));
                }
                let text = value()?;
                options.token = Some(if flag == "--token" {
                    Token::Literal(text.to_string())
                } else {
                    Token::File(text.into())
                });
            }
            "--downtime-ms" => parameters.downtime_ms = number(value()?, "milliseconds")?,
            "--timeout-s" => parameters.timeout_s = Some(number(value()?, "seconds")?),
            "--bandwidth" => {
                let text = value()?;
                let rate = parse_rate(text).ok_or_else(|| {
                    format!("{command}: --bandwidth: {text:?} is not a rate in bytes/s (e.g. 100M)")
                })?;
                parameters.bandwidth_bytes_per_s = Some(rate).filter(|&r| r > 0);
            }
            "--timeout-action" => {
                parameters.timeout_action = match value()? {
                    "cancel" => TimeoutAction::Cancel,
                    "force" => TimeoutAction::Force,
                    other => {
                        return Err(format!(
                            "{command}: --timeout-action: {other:?} is not cancel or force"
                        ))
                    }
                }
            }
            "--no-auto-converge" => parameters.auto_converge = false,
            "--detach" => options.detach = true,
            "--cancel" => options.cancel = true,
            _ => return Err(format!("{command}: unknown option {arg:?}")),
        }
    }
    options
        .parameters
        .validate()
        .map_err(|e| format!("{command}: --{}: {}", e.field.replace('_', "-"), e.message))?;
    Ok(options)
}

/// A rate in bytes/s: a number with an optional K, M, G, T (powers of 1000)
/// or Ki, Mi, Gi, Ti (powers of 1024) suffix.
fn parse_rate(text: &str) -> Option<u64> {
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// The one URL word of `migrate` or `receive-migration`.
fn migration_url(command: &str, what: &str, words: &[String]) -> Result<String, String> {
    match words {
        [url] => {
            validate_migration_url(what, url).map_err(|e| format!("{command}: {e}"))?;
            Ok(url.clone())
        }
        [] => Err(format!(
            "{command}: give the {what} (tcp:HOST:PORT or unix:PATH)"
        )),
        [_, extra, ..] => Err(format!("{command}: unexpected argument {extra:?}")),
    }
}

fn missing_token(command: &str) -> String {
    format!("{command}: give the token with --token-file FILE or --token TOKEN")
}

fn parse_migrate(args: &[String]) -> Result<Command, String> {
    let mut allowed = vec!["--token", "--token-file", "--detach", "--cancel"];
    allowed.extend_from_slice(TUNING_OPTIONS);
    let options = parse_migration_options("migrate", args, &allowed)?;
    if options.cancel {
        if options.options > 1 || !options.words.is_empty() {
            return Err("migrate: --cancel takes no other argument".into());
        }
        return Ok(Command::MigrateCancel);
    }
    let destination = migration_url("migrate", "DESTINATION", &options.words)?;
    let token = options.token.ok_or_else(|| missing_token("migrate"))?;
    Ok(Command::Migrate(MigrateArgs {
        destination,
        token,
        parameters: options.parameters,
        detach: options.detach,
    }))
}

fn parse_migrate_set(args: &[String]) -> Result<Command, String> {
    let options = parse_migration_options("migrate-set", args, TUNING_OPTIONS)?;
    if let Some(extra) = options.words.first() {
        return Err(format!("migrate-set: unexpected argument {extra:?}"));
    }
    Ok(Command::MigrateSet(options.parameters))
}

fn parse_receive_migration(args: &[String]) -> Result<Command, String> {
    let options = parse_migration_options("receive-migration", args, &["--token", "--token-file"])?;
    let listen = migration_url("receive-migration", "LISTEN", &options.words)?;
    let token = options
        .token
        .ok_or_else(|| missing_token("receive-migration"))?;
    Ok(Command::ReceiveMigration { listen, token })
}

/// The value of `--NAME VALUE` or `--NAME=VALUE` options of `command`.
fn option_value<'a>(
    command: &str,
    args: &'a [String],
    name: &str,
) -> Result<Option<&'a str>, String> {
    let mut value = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, v)) => (flag, Some(v)),
            None => (arg.as_str(), None),
        };
        if flag != name {
            return Err(if arg.starts_with('-') {
                format!("{command}: unknown option {arg:?}")
            } else {
                format!("{command}: unexpected argument {arg:?}")
            });
        }
        if value.is_some() {
            return Err(format!("{command}: {name} given twice"));
        }
        value = Some(
            inline
                .or_else(|| args.next().map(String::as_str))
                .ok_or_else(|| format!("{command}: {name} needs a value"))?,
        );
    }
    Ok(value)
}

fn parse_balloon(args: &[String]) -> Result<Command, String> {
    let target = option_value("balloon", args, "--target-mib")?
        .map(|text| {
            text.parse::<u64>()
                .map_err(|_| format!("balloon: --target-mib: {text:?} is not a number of MiB"))
        })
        .transpose()?;
    Ok(Command::Balloon(target))
}

fn parse_list(args: &[String]) -> Result<Command, String> {
    let dir = option_value("list", args, "--socket-dir")?;
    if dir == Some("") {
        return Err("list: --socket-dir needs a directory".into());
    }
    Ok(Command::List(dir.map(PathBuf::from)))
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
        Command::Migrate(migrate) => {
            let request = SendMigrationRequest {
                destination: migrate.destination.clone(),
                token: migrate.token.read().map_err(|m| (EXIT_USAGE, m))?,
                parameters: migrate.parameters.clone(),
            };
            client.send_migration(&request).map_err(client_error)?;
            if migrate.detach {
                return Ok(String::new());
            }
            follow_migration(&client, args.json)
        }
        Command::MigrateCancel => text(client.migration_cancel().map(|()| String::new())),
        Command::MigrateStatus => {
            let status = client.migration_status().map_err(client_error)?;
            Ok(if args.json {
                json(&status)
            } else {
                show_migration(&status)
            })
        }
        Command::MigrateSet(parameters) => text(
            client
                .migration_parameters(parameters)
                .map(|()| String::new()),
        ),
        Command::ReceiveMigration { listen, token } => {
            let request = ReceiveMigrationRequest {
                listen: listen.clone(),
                token: token.read().map_err(|m| (EXIT_USAGE, m))?,
            };
            text(client.receive_migration(&request).map(|()| String::new()))
        }
        Command::Balloon(Some(target)) => text(client.balloon(*target).map(|()| String::new())),
        Command::Balloon(None) | Command::BalloonStats => {
            let stats = client.balloon_statistics().map_err(client_error)?;
            Ok(if args.json {
                json(&stats)
            } else {
                show_balloon(&stats)
            })
        }
        Command::List(dir) => {
            let dir = dir.clone().unwrap_or_else(|| {
                std::env::var_os(SOCKET_DIR_ENV)
                    .filter(|d| !d.is_empty())
                    .map_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR), PathBuf::from)
            });
            let entries = list_vmms(&dir, args.timeout.min(LIST_TIMEOUT))?;
            Ok(if args.json {
                json(&entries)
            } else {
                show_list(&dir, &entries)
            })
        }
    }
}

/// One VMM found by `list`.
#[derive(Debug, Default, PartialEq, serde::Serialize)]
struct ListEntry {
    /// The socket's file name without `.sock`.
    name: String,
    socket: PathBuf,
    /// The VM's state, or `stale` when nothing answers on the socket.
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    balloon_target_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    balloon_actual_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ksm_merging_pages: Option<u64>,
    /// Why a socket is stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Pings every `*.sock` socket in `dir` (in parallel) and reads its VM's
/// memory figures. A missing directory is an empty list.
fn list_vmms(dir: &Path, timeout: Duration) -> Result<Vec<ListEntry>, (u8, String)> {
    use std::os::unix::fs::FileTypeExt;
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err((
                EXIT_UNREACHABLE,
                format!("cannot read {}: {e}", dir.display()),
            ))
        }
    };
    let mut sockets: Vec<(String, PathBuf)> = read
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter_map(|e| {
            let path = e.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".sock")?
                .to_string();
            (!name.is_empty()).then_some((name, path))
        })
        .collect();
    sockets.sort();
    let entries = std::thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .into_iter()
            .map(|(name, path)| scope.spawn(move || probe_vmm(name, path, timeout)))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    Ok(entries)
}

fn probe_vmm(name: String, socket: PathBuf, timeout: Duration) -> ListEntry {
    let client = ApiClient::new(&socket).with_timeout(timeout);
    let mut entry = ListEntry {
        name,
        socket,
        ..ListEntry::default()
    };
    match client.ping() {
        Ok(ping) => {
            entry.state = ping.state.to_string();
            entry.pid = Some(ping.pid);
        }
        Err(e) => {
            entry.state = if e.is_unreachable() { "stale" } else { "error" }.to_string();
            entry.error = Some(e.to_string());
            return entry;
        }
    }
    // A VMM without a VM answers 409: its memory columns stay empty.
    if let Ok(VmInfo {
        memory: Some(memory),
        ..
    }) = client.info()
    {
        entry.guest_bytes = Some(memory.guest_bytes);
        entry.rss_bytes = Some(memory.rss_bytes);
        entry.pss_bytes = memory.pss_bytes;
        entry.balloon_target_bytes = memory.balloon_target_bytes;
        entry.balloon_actual_bytes = memory.balloon_actual_bytes;
        entry.ksm_merging_pages = memory.ksm_merging_pages;
    }
    entry
}

fn show_list(dir: &Path, entries: &[ListEntry]) -> String {
    if entries.is_empty() {
        return format!("no VMM sockets in {}\n", dir.display());
    }
    let dash = || "-".to_string();
    let size = |v: Option<u64>| v.map_or_else(dash, mib);
    let headers = [
        "NAME",
        "PID",
        "STATE",
        "GUEST",
        "RSS",
        "PSS",
        "BALLOON",
        "ACTUAL",
        "KSM-MERGED",
    ];
    let rows: Vec<[String; 9]> = entries
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                e.pid.map_or_else(dash, |p| p.to_string()),
                e.state.clone(),
                size(e.guest_bytes),
                size(e.rss_bytes),
                size(e.pss_bytes),
                size(e.balloon_target_bytes),
                size(e.balloon_actual_bytes),
                e.ksm_merging_pages.map_or_else(dash, |p| p.to_string()),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            // Names and states left-aligned, figures right-aligned.
            if i == 0 || i == 2 {
                line.push_str(&format!("{cell:<w$}", w = widths[i]));
            } else {
                line.push_str(&format!("{cell:>w$}", w = widths[i]));
            }
            line.push_str("  ");
        }
        line.trim_end().to_string() + "\n"
    };
    let mut text = line(headers.to_vec());
    for row in &rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    let live: Vec<&ListEntry> = entries.iter().filter(|e| e.pid.is_some()).collect();
    let sum = |f: fn(&ListEntry) -> Option<u64>| live.iter().filter_map(|e| f(e)).sum::<u64>();
    text.push_str(&format!(
        "total: {} VMMs ({} stale), guest {}, rss {}, balloon targets {}, ksm merged {} pages\n",
        entries.len(),
        entries.len() - live.len(),
        mib(sum(|e| e.guest_bytes)),
        mib(sum(|e| e.rss_bytes)),
        mib(sum(|e| e.balloon_target_bytes)),
        sum(|e| e.ksm_merging_pages),
    ));
    text
}

fn show_balloon(stats: &BalloonStatistics) -> String {
    const PAGE: u64 = 4096;
    let mut lines = vec![
        format!(
            "target: {} ({} pages)",
            mib(stats.target_pages * PAGE),
            stats.target_pages
        ),
        format!(
            "actual: {} ({} pages)",
            mib(stats.actual_pages * PAGE),
            stats.actual_pages
        ),
        format!(
            "inflated: {} ({} pages given back to the host)",
            mib(stats.inflated_pages * PAGE),
            stats.inflated_pages
        ),
    ];
    match stats.age_ms {
        None => lines.push("guest statistics: none yet".to_string()),
        Some(age) => lines.push(format!(
            "guest statistics: {:.1} s old",
            age as f64 / 1000.0
        )),
    }
    let sizes = [
        ("free memory", stats.free_memory),
        ("total memory", stats.total_memory),
        ("available memory", stats.available_memory),
        ("disk caches", stats.disk_caches),
        ("swapped in", stats.swap_in),
        ("swapped out", stats.swap_out),
        ("scanned by kswapd", stats.async_scans),
        ("scanned directly", stats.direct_scans),
        ("reclaimed by kswapd", stats.async_reclaims),
        ("reclaimed directly", stats.direct_reclaims),
    ];
    for (name, value) in sizes {
        if let Some(value) = value {
            lines.push(format!("  {name}: {}", mib(value)));
        }
    }
    let counts = [
        ("major faults", stats.major_faults),
        ("minor faults", stats.minor_faults),
        ("hugetlb allocations", stats.hugetlb_allocations),
        ("hugetlb failures", stats.hugetlb_failures),
        ("oom kills", stats.oom_kills),
        ("allocation stalls", stats.alloc_stalls),
    ];
    for (name, value) in counts {
        if let Some(value) = value {
            lines.push(format!("  {name}: {value}"));
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// Polls the status of the migration just started until it ends, showing
/// the progress on stderr; the final statistics, or an error if it did not
/// complete (after printing the statistics).
fn follow_migration(client: &ApiClient, as_json: bool) -> Result<String, (u8, String)> {
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
                    client_error(e)
                });
            }
            Err(e) => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return Err(client_error(e));
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

fn write_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout is not an error (as in main).
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn phase_name(phase: MigrationPhase) -> &'static str {
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
fn mb_per_s(bytes_per_s: u64) -> String {
    format!("{:.1} MB/s", bytes_per_s as f64 / 1e6)
}

/// How far the migration is, 0 to 1: the share of RAM sent in the first
/// pass, then the share not dirty.
fn progress(status: &MigrationStatus) -> f64 {
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
fn progress_line(status: &MigrationStatus, bar: bool) -> String {
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
fn show_migration(status: &MigrationStatus) -> String {
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

fn rate(limit: &Option<config::RateLimitConfig>) -> Option<String> {
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
    let thp = if config.transparent_huge_pages() {
        ", transparent huge pages"
    } else {
        ""
    };
    lines.push(format!(
        "memory: {} MiB ({backing}{mergeable}{thp})",
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
            config::ResetAction::Exit => "exit",
            config::ResetAction::Reboot => "reboot",
        }
    ));
    if let Some(memory) = &info.memory {
        lines.push(format!(
            "host memory: guest {}, rss {}, pss {}",
            mib(memory.guest_bytes),
            mib(memory.rss_bytes),
            memory.pss_bytes.map_or_else(|| "-".to_string(), mib)
        ));
        if let (Some(target), Some(actual)) =
            (memory.balloon_target_bytes, memory.balloon_actual_bytes)
        {
            lines.push(format!(
                "balloon now: target {}, actual {}",
                mib(target),
                mib(actual)
            ));
        }
        if let Some(pages) = memory.ksm_merging_pages {
            lines.push(format!("ksm: {pages} pages merged"));
        }
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
        match command(&[
            "--api-socket",
            "/s",
            "shutdown",
            "--ctrl-alt-del",
            "--timeout-ms=9",
        ]) {
            Command::Shutdown(r) => {
                assert_eq!(r.mode, ShutdownMode::CtrlAltDel);
                assert_eq!(r.timeout_ms, Some(9));
            }
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
        assert!(error(&[
            "--api-socket",
            "/s",
            "shutdown",
            "--force",
            "--ctrl-alt-del"
        ])
        .contains("exclude each other"));
        assert!(error(&["--api-socket"]).contains("needs a value"));
        assert!(error(&["--api-socket", "/s", "--timeout", "-1", "ping"]).contains("--timeout"));
    }

    #[test]
    fn migration_commands_parse() {
        match command(&[
            "--api-socket",
            "/s",
            "migrate",
            "tcp:h:1",
            "--token",
            "-h",
            "--bandwidth=1Ki",
            "--timeout-s",
            "9",
            "--json",
        ]) {
            Command::Migrate(m) => {
                assert_eq!(m.destination, "tcp:h:1");
                assert_eq!(m.token, Token::Literal("-h".into()));
                assert_eq!(m.parameters.bandwidth_bytes_per_s, Some(1024));
                assert_eq!(m.parameters.timeout_s, Some(9));
                assert!(!m.detach);
            }
            other => panic!("{other:?}"),
        }
        match command(&[
            "--api-socket",
            "/s",
            "migrate",
            "unix:/m",
            "--token-file",
            "/t",
            "--detach",
        ]) {
            Command::Migrate(m) => {
                assert_eq!(m.token, Token::File("/t".into()));
                assert!(m.detach);
                assert_eq!(m.parameters, MigrationParameters::default());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            command(&["--api-socket", "/s", "migrate", "--cancel"]),
            Command::MigrateCancel
        ));
        match command(&[
            "--api-socket",
            "/s",
            "migrate-set",
            "--timeout-action=force",
        ]) {
            Command::MigrateSet(p) => assert_eq!(p.timeout_action, TimeoutAction::Force),
            other => panic!("{other:?}"),
        }
        match command(&[
            "--api-socket",
            "/s",
            "receive-migration",
            "unix:/m",
            "--token=x",
        ]) {
            Command::ReceiveMigration { listen, token } => {
                assert_eq!(listen, "unix:/m");
                assert_eq!(token, Token::Literal("x".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn balloon_and_list_parse() {
        assert!(matches!(
            command(&["--api-socket", "/s", "balloon"]),
            Command::Balloon(None)
        ));
        assert!(matches!(
            command(&["--api-socket", "/s", "balloon", "--target-mib", "512"]),
            Command::Balloon(Some(512))
        ));
        assert!(matches!(
            command(&["--api-socket", "/s", "balloon", "--target-mib=0", "--json"]),
            Command::Balloon(Some(0))
        ));
        assert!(matches!(
            command(&["--api-socket", "/s", "balloon-stats"]),
            Command::BalloonStats
        ));
        // `list` needs no socket.
        match command(&["list"]) {
            Command::List(None) => {}
            other => panic!("{other:?}"),
        }
        match command(&["list", "--socket-dir", "/tmp/v", "--json"]) {
            Command::List(Some(dir)) => assert_eq!(dir, PathBuf::from("/tmp/v")),
            other => panic!("{other:?}"),
        }
        let error = |args: &[&str]| parse(args).err().unwrap_or_default();
        assert!(error(&["balloon"]).contains("VMM_API_SOCKET"));
        assert!(error(&["--api-socket", "/s", "balloon", "--target-mib", "-1"]).contains("-1"));
        assert!(error(&["--api-socket", "/s", "balloon", "--target-mib", "1G"]).contains("1G"));
        assert!(error(&["--api-socket", "/s", "balloon", "--target-mib"]).contains("needs a value"));
        assert!(error(&["--api-socket", "/s", "balloon", "64"]).contains("unexpected argument"));
        assert!(error(&[
            "--api-socket",
            "/s",
            "balloon",
            "--target-mib=1",
            "--target-mib=2"
        ])
        .contains("twice"));
        assert!(error(&["--api-socket", "/s", "balloon-stats", "--all"]).contains("--all"));
        assert!(error(&["list", "--socket-dir="]).contains("directory"));
        assert!(error(&["list", "--dir", "x"]).contains("--dir"));
        assert!(error(&[]).contains("VMM_API_SOCKET"));
    }

    #[test]
    fn list_and_balloon_print_tables() {
        let entries = vec![
            ListEntry {
                name: "web".into(),
                socket: "/run/vmm/web.sock".into(),
                state: "running".into(),
                pid: Some(4242),
                guest_bytes: Some(1 << 30),
                rss_bytes: Some(300 << 20),
                pss_bytes: Some(200 << 20),
                balloon_target_bytes: Some(256 << 20),
                balloon_actual_bytes: Some(128 << 20),
                ksm_merging_pages: Some(1234),
                error: None,
            },
            ListEntry {
                name: "old".into(),
                socket: "/run/vmm/old.sock".into(),
                state: "stale".into(),
                error: Some("no VMM is listening".into()),
                ..ListEntry::default()
            },
        ];
        assert_eq!(
            show_list(Path::new("/run/vmm"), &entries),
            "NAME   PID  STATE       GUEST      RSS      PSS  BALLOON   ACTUAL  KSM-MERGED\n\
             web   4242  running  1024 MiB  300 MiB  200 MiB  256 MiB  128 MiB        1234\n\
             old      -  stale           -        -        -        -        -           -\n\
             total: 2 VMMs (1 stale), guest 1024 MiB, rss 300 MiB, balloon targets 256 MiB, ksm merged 1234 pages\n"
        );
        assert_eq!(show_list(Path::new("/x"), &[]), "no VMM sockets in /x\n");
        let json = json(&entries);
        assert!(json.contains(r#""state": "stale""#), "{json}");
        assert!(!json.contains(r#""pid": null"#), "{json}");

        let mut stats = BalloonStatistics {
            target_pages: 65536,
            actual_pages: 256,
            target_mib: 256,
            actual_mib: 1,
            inflated_pages: 256,
            ..BalloonStatistics::default()
        };
        let text = show_balloon(&stats);
        assert_eq!(
            text,
            "target: 256 MiB (65536 pages)\nactual: 1 MiB (256 pages)\n\
             inflated: 1 MiB (256 pages given back to the host)\nguest statistics: none yet\n"
        );
        stats.age_ms = Some(1500);
        stats.free_memory = Some(3 << 19);
        stats.major_faults = Some(9);
        let text = show_balloon(&stats);
        assert!(
            text.contains(
                "guest statistics: 1.5 s old\n  free memory: 1.5 MiB\n  major faults: 9\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("0"), Some(0));
        assert_eq!(parse_rate("1500"), Some(1500));
        assert_eq!(parse_rate("100M"), Some(100_000_000));
        assert_eq!(parse_rate("2k"), Some(2000));
        assert_eq!(parse_rate("3Gi"), Some(3 << 30));
        assert_eq!(parse_rate("1Ti"), Some(1 << 40));
        for bad in ["", "M", "1.5M", "-1", "10X", "10 M", "10MB", "99999999999T"] {
            assert_eq!(parse_rate(bad), None, "{bad}");
        }
    }

    #[test]
    fn token_files_are_trimmed_and_not_empty() {
        let dir = std::env::temp_dir().join(format!("vmmctl-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "abc \r\n\n").unwrap();
        assert_eq!(Token::File(file.clone()).read().unwrap(), "abc ");
        std::fs::write(&file, "\n").unwrap();
        assert!(Token::File(file.clone())
            .read()
            .unwrap_err()
            .contains("empty"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Token::Literal(String::new()).read().is_err());
    }

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
