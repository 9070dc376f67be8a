//! The `vmmctl` command line: the commands and their options.

use std::path::PathBuf;
use std::time::Duration;

use crate::SOCKET_ENV;
use api::request::{
    validate_migration_url, MigrationParameters, ShutdownMode, ShutdownRequest, TimeoutAction,
};

pub(crate) const USAGE: &str = "\
vmmctl: drive a vmm over its REST API socket

Usage: vmmctl [--api-socket PATH] [--json] [--timeout SECONDS] COMMAND [ARGS]

Commands:
  ping                         check the VMM is alive: its version, pid and VM state
  shutdown-vmm                 stop the guest and end the VMM process
  create FILE                  define the VM from a JSON VmConfig file (- reads stdin)
  boot                         build and start the defined VM
  pause                        stop the vCPUs
  resume [--force]             restart paused vCPUs; --force resumes a guest whose
                               migration is undecided (it may run on the target:
                               check first), after taking its disks back
  shutdown [--force | --ctrl-alt-del] [--timeout-ms N]
                               ask the guest to shut down (ACPI power button);
                               --ctrl-alt-del sends Ctrl-Alt-Del instead (guests
                               without ACPI); --force stops it at once;
                               --timeout-ms forces it off if it has not stopped
                               after N milliseconds
  info                         the VM's state and configuration
  counters                     exit and device counters
  migrate DESTINATION (--token-file FILE | --token TOKEN) [--tls-dir DIR]
          [--downtime-ms N] [--bandwidth SIZE] [--timeout-s N]
          [--timeout-action cancel|force] [--no-auto-converge] [--detach] [--force]
                               migrate the VM to the VMM listening on DESTINATION
                               (tcp:HOST:PORT or unix:PATH): shows the progress on
                               stderr, then the statistics (exit 0 if it completed,
                               1 if it failed or was cancelled); --detach returns
                               once it has started. Interrupting vmmctl does not
                               stop the migration: use migrate --cancel. A VMM
                               started by a cluster manager (vmm --managed-by)
                               refuses unless --force: move the guest with the
                               cluster manager (crm resource move) instead
  migrate --cancel             stop the outgoing migration; the guest keeps running here
  migrate-status               the phase and figures of the current (or last) migration
  migrate-set [--downtime-ms N] [--bandwidth SIZE] [--timeout-s N]
          [--timeout-action cancel|force] [--no-auto-converge]
                               change the parameters of the running migration; an
                               option left out takes its default, not its current value
  receive-migration LISTEN (--token-file FILE | --token TOKEN) [--tls-dir DIR]
          [--timeout-s N]
                               make a VMM without a VM listen on LISTEN
                               (tcp:HOST:PORT or unix:PATH) for an incoming
                               migration, for at most N seconds (default 3600)
  balloon [--target-mib N]     set the balloon's target: the guest is asked to give
                               N MiB back (0 deflates it); without --target-mib,
                               print the balloon statistics
  balloon-stats                the balloon's target and actual size and the guest's
                               last memory statistics
  snapshot DIR                 pause the VM (it stays paused) and write it to DIR
                               (created mode 0700; or an existing private one)
  restore DIR                  on a VMM without a VM: resume the snapshot in DIR, as
                               it was (running, or paused); snapshot and restore
                               wait up to an hour unless --timeout says otherwise
  console [NAME | --socket PATH]
                               attach this terminal to the guest's serial console:
                               the VM's console socket (or pty) from vm.info, of the
                               VMM on --api-socket or on $VMM_SOCKET_DIR/NAME.sock
                               (default dir /run/vmm), or the console socket PATH.
                               The terminal is raw: every key, Ctrl-C included,
                               goes to the guest; Ctrl-] detaches. With piped
                               input, output is shown until the console closes
  list [--socket-dir DIR]      every VMM whose API socket is a *.sock in DIR (default:
                               $VMM_SOCKET_DIR, else /run/vmm): name, pid, state,
                               guest memory, RSS, balloon target and actual, pages
                               KSM merged; sockets nobody answers on are listed as
                               stale. Needs no --api-socket

Migration options:
  --token-file FILE       the pre-shared token of sender and receiver, read from
                          FILE (trailing newlines are dropped; it must not be empty)
  --token TOKEN           the token on the command line (other users can see it)
  --tls-dir DIR           encrypt the stream with TLS 1.3; DIR holds ca-cert.pem
                          and this host's client-cert.pem and client-key.pem
                          (source) or server-cert.pem and server-key.pem (target)
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

/// How long `snapshot` and `restore` wait by default.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Options of commands that take a value: the value goes with the option
/// even if it looks like a global option.
pub(crate) const COMMAND_VALUE_OPTIONS: &[&str] = &[
    "--timeout-ms",
    "--token",
    "--token-file",
    "--tls-dir",
    "--downtime-ms",
    "--bandwidth",
    "--timeout-s",
    "--timeout-action",
    "--target-mib",
    "--socket-dir",
    "--socket",
];
#[derive(Debug)]
pub(crate) enum Command {
    Ping,
    ShutdownVmm,
    Create(PathBuf),
    Boot,
    Pause,
    /// `resume [--force]`.
    Resume(bool),
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
        tls_dir: Option<PathBuf>,
        timeout_s: Option<u64>,
    },
    /// `balloon --target-mib N` sets the target, `balloon` alone shows it.
    Balloon(Option<u64>),
    BalloonStats,
    /// `snapshot DIR` (made absolute here).
    Snapshot(PathBuf),
    /// `restore DIR` (made absolute here).
    Restore(PathBuf),
    /// `list`: the directory given, else the environment's or the default.
    List(Option<PathBuf>),
    /// `console`: the VMM's console (NAME gives its API socket), or a
    /// console socket named directly.
    Console {
        name: Option<String>,
        socket: Option<PathBuf>,
    },
}

/// `migrate DESTINATION ...`.
#[derive(Debug)]
pub(crate) struct MigrateArgs {
    pub(crate) destination: String,
    pub(crate) token: Token,
    pub(crate) tls_dir: Option<PathBuf>,
    pub(crate) parameters: MigrationParameters,
    pub(crate) detach: bool,
    /// Migrate a guest a cluster manager manages (`vmm --managed-by`).
    pub(crate) force: bool,
}

/// Where the migration token comes from.
#[derive(Debug, PartialEq)]
pub(crate) enum Token {
    Literal(String),
    File(PathBuf),
}

impl Token {
    /// The token; a file is read when the command runs (as `create` reads its FILE).
    pub(crate) fn read(&self) -> Result<String, String> {
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
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::ShutdownVmm => "shutdown-vmm",
            Command::Create(_) => "create",
            Command::Boot => "boot",
            Command::Pause => "pause",
            Command::Resume(_) => "resume",
            Command::Shutdown(_) => "shutdown",
            Command::Info => "info",
            Command::Counters => "counters",
            Command::Migrate(_) | Command::MigrateCancel => "migrate",
            Command::MigrateStatus => "migrate-status",
            Command::MigrateSet(_) => "migrate-set",
            Command::ReceiveMigration { .. } => "receive-migration",
            Command::Balloon(_) => "balloon",
            Command::BalloonStats => "balloon-stats",
            Command::Snapshot(_) => "snapshot",
            Command::Restore(_) => "restore",
            Command::List(_) => "list",
            Command::Console { .. } => "console",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Args {
    pub(crate) socket: PathBuf,
    pub(crate) json: bool,
    pub(crate) timeout: Duration,
    pub(crate) command: Command,
}

pub(crate) enum Parsed {
    Run(Args),
    Help,
    Version,
}

/// Parses the command line (without the program name).
pub(crate) fn parse_args(args: Vec<String>, env_socket: Option<String>) -> Result<Parsed, String> {
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
        "resume" => match rest.as_slice() {
            [] => Command::Resume(false),
            [force] if force == "--force" => Command::Resume(true),
            [other, ..] if other.starts_with('-') => {
                return Err(format!("resume: unknown option {other:?}"))
            }
            [other, ..] => return Err(format!("resume: unexpected argument {other:?}")),
        },
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
        "snapshot" | "restore" => {
            let dir = match rest.as_slice() {
                [dir] if !dir.starts_with('-') => {
                    std::path::absolute(dir).map_err(|e| format!("{name}: {dir}: {e}"))?
                }
                [] => return Err(format!("{name}: give the snapshot DIR")),
                [dir] => return Err(format!("{name}: unknown option {dir:?}")),
                [_, extra, ..] => return Err(format!("{name}: unexpected argument {extra:?}")),
            };
            // Writing or reading a big guest takes longer than a request.
            if timeout == api::http::DEFAULT_CLIENT_TIMEOUT {
                timeout = SNAPSHOT_TIMEOUT;
            }
            if name == "snapshot" {
                Command::Snapshot(dir)
            } else {
                Command::Restore(dir)
            }
        }
        "list" => parse_list(&rest)?,
        "console" => parse_console(&rest)?,
        _ => return Err(format!("unknown command {name:?}")),
    };
    // `list` finds its VMMs itself, `console` may be given where to go.
    let socket = match (&command, socket) {
        (Command::List(_), socket) => socket.unwrap_or_default(),
        (Command::Console { name, socket: path }, socket) if name.is_some() || path.is_some() => {
            socket.unwrap_or_default()
        }
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

pub(crate) fn parse_console(args: &[String]) -> Result<Command, String> {
    let mut name = None;
    let mut socket = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if let Some(path) = arg.strip_prefix("--socket=") {
            socket = Some(PathBuf::from(path));
        } else if arg == "--socket" {
            let path = args.next().ok_or("console: --socket needs a value")?;
            socket = Some(PathBuf::from(path));
        } else if arg.starts_with('-') {
            return Err(format!("console: unknown option {arg:?}"));
        } else if name.is_none() {
            if arg.is_empty() || arg.contains('/') {
                return Err(format!(
                    "console: {arg:?} is not a VMM name (give --api-socket PATH for a socket path)"
                ));
            }
            name = Some(arg.clone());
        } else {
            return Err(format!("console: unexpected argument {arg:?}"));
        }
    }
    if name.is_some() && socket.is_some() {
        return Err("console: give a NAME or --socket PATH, not both".into());
    }
    Ok(Command::Console { name, socket })
}

pub(crate) fn parse_shutdown(args: &[String]) -> Result<ShutdownRequest, String> {
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
pub(crate) struct MigrationOptions {
    words: Vec<String>,
    /// How many options were given.
    options: usize,
    token: Option<Token>,
    tls_dir: Option<PathBuf>,
    parameters: MigrationParameters,
    detach: bool,
    cancel: bool,
    force: bool,
}

pub(crate) const TUNING_OPTIONS: &[&str] = &[
    "--downtime-ms",
    "--bandwidth",
    "--timeout-s",
    "--timeout-action",
    "--no-auto-converge",
];

/// Parses the options of `command` that are in `allowed`; other words are
/// left in [`MigrationOptions::words`].
pub(crate) fn parse_migration_options(
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
            "--tls-dir" => {
                let dir = value()?;
                if dir.is_empty() {
                    return Err(format!("{command}: --tls-dir needs a directory"));
                }
                options.tls_dir = Some(dir.into());
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
            "--force" => options.force = true,
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
pub(crate) fn parse_rate(text: &str) -> Option<u64> {
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
pub(crate) fn migration_url(command: &str, what: &str, words: &[String]) -> Result<String, String> {
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

pub(crate) fn missing_token(command: &str) -> String {
    format!("{command}: give the token with --token-file FILE or --token TOKEN")
}

pub(crate) fn parse_migrate(args: &[String]) -> Result<Command, String> {
    let mut allowed = vec![
        "--token",
        "--token-file",
        "--tls-dir",
        "--detach",
        "--cancel",
        "--force",
    ];
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
        tls_dir: options.tls_dir,
        parameters: options.parameters,
        detach: options.detach,
        force: options.force,
    }))
}

pub(crate) fn parse_migrate_set(args: &[String]) -> Result<Command, String> {
    let options = parse_migration_options("migrate-set", args, TUNING_OPTIONS)?;
    if let Some(extra) = options.words.first() {
        return Err(format!("migrate-set: unexpected argument {extra:?}"));
    }
    Ok(Command::MigrateSet(options.parameters))
}

pub(crate) fn parse_receive_migration(args: &[String]) -> Result<Command, String> {
    let options = parse_migration_options(
        "receive-migration",
        args,
        &["--token", "--token-file", "--tls-dir", "--timeout-s"],
    )?;
    let listen = migration_url("receive-migration", "LISTEN", &options.words)?;
    let token = options
        .token
        .ok_or_else(|| missing_token("receive-migration"))?;
    Ok(Command::ReceiveMigration {
        listen,
        token,
        tls_dir: options.tls_dir,
        timeout_s: options.parameters.timeout_s,
    })
}

/// The value of `--NAME VALUE` or `--NAME=VALUE` options of `command`.
pub(crate) fn option_value<'a>(
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

pub(crate) fn parse_balloon(args: &[String]) -> Result<Command, String> {
    let target = option_value("balloon", args, "--target-mib")?
        .map(|text| {
            text.parse::<u64>()
                .map_err(|_| format!("balloon: --target-mib: {text:?} is not a number of MiB"))
        })
        .transpose()?;
    Ok(Command::Balloon(target))
}

pub(crate) fn parse_list(args: &[String]) -> Result<Command, String> {
    let dir = option_value("list", args, "--socket-dir")?;
    if dir == Some("") {
        return Err("list: --socket-dir needs a directory".into());
    }
    Ok(Command::List(dir.map(PathBuf::from)))
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
                assert!(!m.detach && !m.force);
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
            "--force",
        ]) {
            Command::Migrate(m) => {
                assert_eq!(m.token, Token::File("/t".into()));
                assert!(m.detach && m.force);
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
            "--tls-dir",
            "/etc/vmm/tls",
            "--timeout-s",
            "90",
        ]) {
            Command::ReceiveMigration {
                listen,
                token,
                tls_dir,
                timeout_s,
            } => {
                assert_eq!(listen, "unix:/m");
                assert_eq!(token, Token::Literal("x".into()));
                assert_eq!(tls_dir, Some(PathBuf::from("/etc/vmm/tls")));
                assert_eq!(timeout_s, Some(90));
            }
            other => panic!("{other:?}"),
        }
        match command(&[
            "--api-socket",
            "/s",
            "migrate",
            "tcp:h:1",
            "--token=x",
            "--tls-dir=/t",
        ]) {
            Command::Migrate(m) => assert_eq!(m.tls_dir, Some(PathBuf::from("/t"))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            command(&["--api-socket", "/s", "resume", "--force"]),
            Command::Resume(true)
        ));
        assert!(matches!(
            command(&["--api-socket", "/s", "resume"]),
            Command::Resume(false)
        ));
        assert!(parse(&["--api-socket", "/s", "resume", "--now"]).is_err());
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
}
