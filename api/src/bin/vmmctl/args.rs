//! The `vmmctl` command line (clap): the commands and their options, and
//! what they become ([`Args`]). Man pages and shell completions come from
//! the same definition (`--generate-docs DIR`, hidden).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::SOCKET_ENV;
use api::request::{
    validate_migration_url, MigrationParameters, ShutdownMode, ShutdownRequest, TimeoutAction,
};
use config::DurationUnit;

const AFTER_HELP: &str = "\
A guest is named by its API socket: NAME is $VMM_SOCKET_DIR/NAME.sock (default
directory /run/vmm), so `vmmctl info web1` asks the VMM started with
`vmm --api-socket /run/vmm/web1.sock`. --api-socket PATH (or $VMM_API_SOCKET)
names a socket directly.

Sizes are binary: 512M, 2G, 1Gi, 64KiB (K, M, G, T and Ki, Mi, Gi, Ti are powers
of 1024); a plain number is bytes, or MiB for memory sizes (balloon, setmem).
Durations: 500ms, 30s, 2m, 1h; a plain number keeps the old unit of the flag.

Actions say what they did (web1: paused). Repeating one that is already done
succeeds (web1: already paused); one that is impossible in the VM's state is
refused (exit 1). With --json, replies and errors are JSON on stdout (an error
is one line: {\"error\": MESSAGE, \"exit_code\": N, ...}).

Exit status:
  0  success
  1  the VMM refused the request (its message is printed), or the migration
     failed or was cancelled
  2  usage error (bad arguments, unreadable FILE)
  3  cannot reach a VMM (no socket, connection refused, timeout, or a reply
     that is not from a VMM), or it went away during a migration before its
     outcome was seen";

/// Drive a vmm over its REST API socket.
#[derive(Parser, Debug)]
#[command(
    name = "vmmctl",
    version,
    about = "Drive a vmm over its REST API socket",
    after_help = AFTER_HELP,
    max_term_width = 100,
    disable_help_subcommand = false
)]
pub(crate) struct Cli {
    /// The VMM's API socket, instead of a guest NAME (default: $VMM_API_SOCKET)
    #[arg(long, global = true, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Print replies, and errors, as JSON
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the VMM [default: 30s; a plain number is seconds]
    #[arg(long, global = true, value_name = "DURATION", value_parser = seconds,
          allow_hyphen_values = true)]
    api_timeout: Option<Duration>,
    /// The older name of --api-timeout (before the command)
    #[arg(long = "timeout", hide = true, value_name = "DURATION", value_parser = seconds,
          allow_hyphen_values = true)]
    legacy_timeout: Option<Duration>,
    /// Write man pages and shell completions into DIR (for packaging)
    #[arg(long, hide = true, value_name = "DIR")]
    generate_docs: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// How long `snapshot` and `restore` wait unless --api-timeout says otherwise.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);

/// A guest named by its socket, or none (then --api-socket names it).
#[derive(clap::Args, Debug, Default)]
struct Target {
    /// The guest: the VMM on $VMM_SOCKET_DIR/NAME.sock (default dir /run/vmm)
    #[arg(value_name = "NAME")]
    name: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the VMM is alive: its version, pid, guest name and VM state
    Ping(Target),
    /// The VM's name, state, pid, uptime, CPU time and configuration
    Info(Target),
    /// Exit and device counters
    Counters(Target),
    /// Define the VM from a JSON VmConfig FILE (- reads stdin)
    Create {
        /// The guest (see info), or the FILE when only one word is given
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// The VmConfig JSON file; - reads stdin
        #[arg(value_name = "FILE")]
        file: Option<String>,
    },
    /// Build and start the defined VM
    Boot(Target),
    /// Stop the vCPUs (already paused: nothing to do)
    Pause(Target),
    /// Restart paused vCPUs (already running: nothing to do)
    Resume {
        #[command(flatten)]
        target: Target,
        /// Resume a guest whose migration is undecided (it may run on the
        /// target: check first), after taking its disks back
        #[arg(long)]
        force: bool,
    },
    /// Ask the guest to shut down (ACPI power button), or force it off
    Shutdown {
        #[command(flatten)]
        target: Target,
        /// Stop the guest at once (the VMM exits)
        #[arg(long, conflicts_with_all = ["ctrl_alt_del", "timeout", "timeout_ms"])]
        force: bool,
        /// Send Ctrl-Alt-Del instead of pressing the power button (guests without ACPI)
        #[arg(long)]
        ctrl_alt_del: bool,
        /// Force the guest off if it has not stopped after this long (a plain
        /// number is seconds)
        #[arg(long, value_name = "DURATION", value_parser = seconds)]
        timeout: Option<Duration>,
        /// The older --timeout in milliseconds
        #[arg(long, hide = true, value_name = "MS", value_parser = millis, conflicts_with = "timeout")]
        timeout_ms: Option<Duration>,
    },
    /// Reset the guest in place: the VM is rebuilt from its config and boots
    /// again (a cold reset)
    Reboot(Target),
    /// Press the ACPI power button (the guest decides what to do)
    PowerButton(Target),
    /// Forget a VM that is defined but not running, so that create can
    /// define it again (a running VM is refused: shut it down)
    Delete(Target),
    /// Stop the guest and end the VMM process
    ShutdownVmm(Target),
    /// Migrate the VM to the VMM listening on DESTINATION (tcp:HOST:PORT or
    /// unix:PATH)
    #[command(long_about = "Migrate the VM to the VMM listening on DESTINATION \
        (tcp:HOST:PORT or unix:PATH): shows the progress on stderr, then the statistics \
        (exit 0 if it completed, 1 if it failed or was cancelled); --detach returns once it \
        has started. Interrupting vmmctl does not stop the migration: use migrate --cancel.")]
    Migrate {
        /// [NAME] DESTINATION: the guest (optional) and where it goes
        #[arg(value_name = "NAME|DESTINATION")]
        first: Option<String>,
        /// DESTINATION, when NAME comes first
        #[arg(value_name = "DESTINATION")]
        second: Option<String>,
        #[command(flatten)]
        token: TokenArgs,
        /// Encrypt the stream with TLS 1.3; DIR holds ca-cert.pem and this
        /// host's client-cert.pem and client-key.pem
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        #[command(flatten)]
        tuning: Tuning,
        /// Return once the migration has started
        #[arg(long)]
        detach: bool,
        /// Stop the outgoing migration; the guest keeps running here
        #[arg(long, conflicts_with_all = ["detach", "tls_dir", "token", "token_file", "force"])]
        cancel: bool,
        /// Migrate even a guest a cluster manager runs (vmm --managed-by),
        /// which otherwise refuses: move such a guest with the manager
        /// (crm resource move) instead
        #[arg(long)]
        force: bool,
    },
    /// The phase and figures of the current (or last) migration
    MigrateStatus(Target),
    /// Change the parameters of the running migration (an option left out
    /// takes its default, not its current value)
    MigrateSet {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Make a VMM without a VM listen on LISTEN (tcp:HOST:PORT or unix:PATH)
    /// for an incoming migration
    ReceiveMigration {
        /// [NAME] LISTEN: the VMM (optional) and where it listens
        #[arg(value_name = "NAME|LISTEN")]
        first: Option<String>,
        /// LISTEN, when NAME comes first
        #[arg(value_name = "LISTEN")]
        second: Option<String>,
        #[command(flatten)]
        token: TokenArgs,
        /// Require TLS 1.3; DIR holds ca-cert.pem, server-cert.pem and server-key.pem
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// Give up (the VMM exits 1) if no source authenticated within this
        /// long [default: 1h; a plain number is seconds]
        #[arg(long, value_name = "DURATION", value_parser = seconds)]
        timeout: Option<Duration>,
        /// The older --timeout in seconds
        #[arg(long, hide = true, value_name = "S", value_parser = seconds, conflicts_with = "timeout")]
        timeout_s: Option<Duration>,
    },
    /// Set the balloon's target (memory the guest gives back), or show the
    /// balloon statistics
    Balloon {
        #[command(flatten)]
        target: Target,
        /// How much memory the guest is asked to give back (0 deflates the
        /// balloon; a plain number is MiB)
        #[arg(long = "target", value_name = "SIZE")]
        size: Option<String>,
        /// The older --target in MiB
        #[arg(long, hide = true, value_name = "MIB", conflicts_with = "size")]
        target_mib: Option<String>,
    },
    /// The balloon's target and actual size and the guest's last memory statistics
    BalloonStats(Target),
    /// Set the memory the guest has, as virsh setmem: the balloon takes the
    /// rest of its configured memory
    Setmem {
        /// The guest, or the SIZE when only one word is given
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// The memory the guest keeps (a plain number is MiB)
        #[arg(value_name = "SIZE")]
        size: Option<String>,
    },
    /// Pause the VM (it stays paused) and write it to DIR (mode 0700): memory,
    /// device and vCPU state, config; disks are not copied
    Snapshot {
        /// The guest, or the DIR when only one word is given
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// The directory to write (created if missing)
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// On a VMM without a VM: resume the snapshot in DIR as it was (running,
    /// or paused)
    Restore {
        /// The VMM, or the DIR when only one word is given
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// The snapshot directory
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Attach this terminal to the guest's serial console (Ctrl-] detaches)
    #[command(
        long_about = "Attach this terminal to the guest's serial console: the VM's \
        console socket (or pty) from vm.info, of the VMM NAME or --api-socket, or the console \
        socket PATH. The terminal is raw: every key, Ctrl-C included, goes to the guest; \
        Ctrl-] detaches and leaves the guest running. With piped input, output is shown \
        until the console closes."
    )]
    Console {
        #[command(flatten)]
        target: Target,
        /// A console socket, named directly
        #[arg(long, value_name = "PATH", conflicts_with = "name")]
        socket: Option<PathBuf>,
    },
    /// Every VMM whose API socket is a *.sock in the socket directory: name,
    /// pid, state, memory, balloon, KSM; sockets nobody answers on are stale
    List {
        /// The directory [default: $VMM_SOCKET_DIR, else /run/vmm]
        #[arg(long, value_name = "DIR")]
        socket_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The pre-shared token of sender and receiver, read from FILE (trailing
    /// newlines are dropped; it must not be empty)
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The token on the command line (other users can see it)
    #[arg(long, value_name = "TOKEN", allow_hyphen_values = true)]
    token: Option<String>,
}

/// The tunables of `migrate` and `migrate-set`.
#[derive(clap::Args, Debug)]
struct Tuning {
    /// Largest acceptable pause of the guest at switch-over [default: 300ms;
    /// a plain number is milliseconds]
    #[arg(long, value_name = "DURATION", value_parser = millis)]
    downtime: Option<Duration>,
    /// The older --downtime in milliseconds
    #[arg(long, hide = true, value_name = "MS", value_parser = millis, conflicts_with = "downtime")]
    downtime_ms: Option<Duration>,
    /// Bandwidth cap in bytes per second (100M is 100 MiB/s; 0: unlimited)
    #[arg(long, value_name = "SIZE")]
    bandwidth: Option<String>,
    /// After this long, apply the --timeout-action [a plain number is seconds]
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    timeout: Option<Duration>,
    /// The older --timeout in seconds
    #[arg(long, hide = true, value_name = "S", value_parser = seconds, conflicts_with = "timeout")]
    timeout_s: Option<Duration>,
    /// cancel: give up, the guest keeps running here (default); force:
    /// switch over at once, whatever the downtime
    #[arg(long, value_name = "ACTION", value_parser = ["cancel", "force"])]
    timeout_action: Option<String>,
    /// Do not slow the vCPUs down when the guest dirties memory faster than
    /// it can be sent
    #[arg(long)]
    no_auto_converge: bool,
}

fn seconds(text: &str) -> Result<Duration, String> {
    duration(text, DurationUnit::Seconds)
}

fn millis(text: &str) -> Result<Duration, String> {
    duration(text, DurationUnit::Millis)
}

fn duration(text: &str, plain: DurationUnit) -> Result<Duration, String> {
    config::parse_duration("", text, plain).map_err(|e| e.message)
}

/// What the command line asks for.
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
    Reboot,
    PowerButton,
    Delete,
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
    /// `balloon --target SIZE` sets the target (MiB), `balloon` alone shows it.
    Balloon(Option<u64>),
    BalloonStats,
    /// `setmem SIZE`: the memory the guest keeps, in MiB.
    Setmem(u64),
    /// `snapshot DIR` (made absolute here).
    Snapshot(PathBuf),
    /// `restore DIR` (made absolute here).
    Restore(PathBuf),
    /// `list`: the directory given, else the environment's or the default.
    List(Option<PathBuf>),
    /// `console`: the VMM's console (the API socket), or a console socket
    /// named directly.
    Console(Option<PathBuf>),
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
            Command::Reboot => "reboot",
            Command::PowerButton => "power-button",
            Command::Delete => "delete",
            Command::Info => "info",
            Command::Counters => "counters",
            Command::Migrate(_) | Command::MigrateCancel => "migrate",
            Command::MigrateStatus => "migrate-status",
            Command::MigrateSet(_) => "migrate-set",
            Command::ReceiveMigration { .. } => "receive-migration",
            Command::Balloon(_) => "balloon",
            Command::BalloonStats => "balloon-stats",
            Command::Setmem(_) => "setmem",
            Command::Snapshot(_) => "snapshot",
            Command::Restore(_) => "restore",
            Command::List(_) => "list",
            Command::Console(_) => "console",
        }
    }
}

/// `migrate DESTINATION ...`.
#[derive(Debug)]
pub(crate) struct MigrateArgs {
    pub(crate) destination: String,
    pub(crate) token: Token,
    pub(crate) tls_dir: Option<PathBuf>,
    pub(crate) parameters: MigrationParameters,
    pub(crate) detach: bool,
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

#[derive(Debug)]
pub(crate) struct Args {
    /// The API socket (empty for `list` and a console socket given directly).
    pub(crate) socket: PathBuf,
    /// The guest's name in messages (`web1: paused`): NAME, or the socket's.
    pub(crate) name: String,
    pub(crate) json: bool,
    pub(crate) timeout: Duration,
    pub(crate) command: Command,
}

pub(crate) enum Parsed {
    Run(Box<Args>),
    /// Man pages and completions were written.
    Generated,
}

/// A usage error: the command it is about (if any) and what is wrong.
#[derive(Debug)]
pub(crate) struct UsageError {
    pub(crate) command: Option<&'static str>,
    pub(crate) message: String,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.command {
            Some(command) => write!(f, "{command}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn usage(command: &'static str, message: impl Into<String>) -> UsageError {
    UsageError {
        command: Some(command),
        message: message.into(),
    }
}

/// Parses the command line (without the program name). `Err(clap error)`
/// for help, version and clap's own usage errors.
pub(crate) fn parse_args(
    args: Vec<String>,
    env_socket: Option<String>,
) -> Result<Result<Parsed, UsageError>, clap::Error> {
    let cli = Cli::try_parse_from(std::iter::once("vmmctl".to_string()).chain(args))?;
    Ok(convert(cli, env_socket))
}

/// A guest NAME: what names its socket.
fn check_name(command: &'static str, name: &str) -> Result<(), UsageError> {
    config::validate_name(name).map_err(|e| usage(command, e.message))
}

fn convert(cli: Cli, env_socket: Option<String>) -> Result<Parsed, UsageError> {
    if let Some(dir) = &cli.generate_docs {
        api::cli_docs::generate(Cli::command(), dir).map_err(|e| UsageError {
            command: None,
            message: format!("--generate-docs {}: {e}", dir.display()),
        })?;
        return Ok(Parsed::Generated);
    }
    let given_timeout = cli.api_timeout.or(cli.legacy_timeout);
    let timeout = given_timeout.unwrap_or(api::http::DEFAULT_CLIENT_TIMEOUT);
    if timeout.is_zero() {
        return Err(UsageError {
            command: None,
            message: "--api-timeout: must be more than 0".into(),
        });
    }
    let Some(cmd) = cli.command else {
        return Err(UsageError {
            command: None,
            message: "no command given (try 'vmmctl help')".into(),
        });
    };
    let (command, name) = command_of(cmd)?;
    let what = command.name();
    // Writing or reading a big guest takes longer than a request.
    let timeout = match (&command, given_timeout) {
        (Command::Snapshot(_) | Command::Restore(_), None) => SNAPSHOT_TIMEOUT,
        _ => timeout,
    };
    // `list` finds its VMMs itself; a console socket is named directly.
    let needs_socket = !matches!(command, Command::List(_) | Command::Console(Some(_)));
    let env_socket = env_socket.filter(|s| !s.is_empty()).map(PathBuf::from);
    let socket = match (name.as_deref(), cli.api_socket) {
        (Some(name), Some(_)) => {
            return Err(usage(
                what,
                format!("{name:?}: give a guest NAME or --api-socket, not both"),
            ))
        }
        (Some(name), None) => api::http::socket_dir().join(format!("{name}.sock")),
        (None, Some(path)) => path,
        (None, None) => match env_socket {
            Some(path) => path,
            None if needs_socket => {
                return Err(usage(
                    what,
                    format!(
                        "which guest? give its NAME, or --api-socket PATH, or set {SOCKET_ENV}"
                    ),
                ))
            }
            None => PathBuf::new(),
        },
    };
    let name = name.unwrap_or_else(|| name_of_socket(&socket));
    Ok(Parsed::Run(Box::new(Args {
        socket,
        name,
        json: cli.json,
        timeout,
        command,
    })))
}

/// A guest's name from its socket path: `web1` for `/run/vmm/web1.sock`.
pub(crate) fn name_of_socket(socket: &Path) -> String {
    let file = socket
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.strip_suffix(".sock").unwrap_or(&file).to_string()
}

/// The command and the guest NAME it was given.
fn command_of(cmd: Cmd) -> Result<(Command, Option<String>), UsageError> {
    let simple = |command: Command, target: Target| -> Result<_, UsageError> {
        if let Some(name) = &target.name {
            check_name(command.name(), name)?;
        }
        Ok((command, target.name))
    };
    match cmd {
        Cmd::Ping(t) => simple(Command::Ping, t),
        Cmd::Info(t) => simple(Command::Info, t),
        Cmd::Counters(t) => simple(Command::Counters, t),
        Cmd::Boot(t) => simple(Command::Boot, t),
        Cmd::Pause(t) => simple(Command::Pause, t),
        Cmd::Resume { target, force } => simple(Command::Resume(force), target),
        Cmd::Reboot(t) => simple(Command::Reboot, t),
        Cmd::PowerButton(t) => simple(Command::PowerButton, t),
        Cmd::Delete(t) => simple(Command::Delete, t),
        Cmd::ShutdownVmm(t) => simple(Command::ShutdownVmm, t),
        Cmd::MigrateStatus(t) => simple(Command::MigrateStatus, t),
        Cmd::BalloonStats(t) => simple(Command::BalloonStats, t),
        Cmd::Create { name, file } => {
            let (name, file) = match (name, file) {
                (Some(file), None) => (None, file),
                (name, Some(file)) => (name, file),
                (None, None) => {
                    return Err(usage(
                        "create",
                        "give a VmConfig JSON FILE (or - for stdin)",
                    ))
                }
            };
            if let Some(name) = &name {
                check_name("create", name)?;
            }
            Ok((Command::Create(file.into()), name))
        }
        Cmd::Shutdown {
            target,
            force,
            ctrl_alt_del,
            timeout,
            timeout_ms,
        } => {
            let mode = match (force, ctrl_alt_del) {
                (true, _) => ShutdownMode::Force,
                (false, true) => ShutdownMode::CtrlAltDel,
                (false, false) => ShutdownMode::Graceful,
            };
            let timeout_ms = timeout
                .or(timeout_ms)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            simple(
                Command::Shutdown(ShutdownRequest { mode, timeout_ms }),
                target,
            )
        }
        Cmd::Migrate {
            first,
            second,
            token,
            tls_dir,
            tuning,
            detach,
            cancel,
            force,
        } => {
            let parameters = tuning.parameters("migrate")?;
            if cancel {
                if second.is_some() || !tuning.is_empty() {
                    return Err(usage("migrate", "--cancel takes no other argument"));
                }
                if let Some(name) = &first {
                    check_name("migrate", name).map_err(|_| {
                        usage(
                            "migrate",
                            format!("--cancel takes no other argument than NAME, not {name:?}"),
                        )
                    })?;
                }
                return Ok((Command::MigrateCancel, first));
            }
            let (name, destination) = name_and_url("migrate", "DESTINATION", first, second)?;
            let token = token.token().ok_or_else(|| missing_token("migrate"))?;
            Ok((
                Command::Migrate(MigrateArgs {
                    destination,
                    token,
                    tls_dir,
                    parameters,
                    detach,
                    force,
                }),
                name,
            ))
        }
        Cmd::MigrateSet { target, tuning } => {
            let parameters = tuning.parameters("migrate-set")?;
            simple(Command::MigrateSet(parameters), target)
        }
        Cmd::ReceiveMigration {
            first,
            second,
            token,
            tls_dir,
            timeout,
            timeout_s,
        } => {
            let (name, listen) = name_and_url("receive-migration", "LISTEN", first, second)?;
            let token = token
                .token()
                .ok_or_else(|| missing_token("receive-migration"))?;
            let timeout_s = match timeout.or(timeout_s) {
                None => None,
                Some(t) if t.as_secs() == 0 || t.subsec_millis() != 0 => {
                    let flag = if timeout.is_some() {
                        "--timeout"
                    } else {
                        "--timeout-s"
                    };
                    return Err(usage(
                        "receive-migration",
                        format!("{flag}: must be whole seconds, at least 1"),
                    ));
                }
                Some(t) => Some(t.as_secs()),
            };
            Ok((
                Command::ReceiveMigration {
                    listen,
                    token,
                    tls_dir,
                    timeout_s,
                },
                name,
            ))
        }
        Cmd::Balloon {
            target,
            size,
            target_mib,
        } => {
            let mib = match (size, target_mib) {
                (Some(size), _) => Some(
                    config::parse_mib("--target", &size)
                        .map_err(|e| usage("balloon", e.to_string()))?,
                ),
                (None, Some(text)) => Some(text.parse::<u64>().map_err(|_| {
                    usage(
                        "balloon",
                        format!("--target-mib: {text:?} is not a number of MiB"),
                    )
                })?),
                (None, None) => None,
            };
            simple(Command::Balloon(mib), target)
        }
        Cmd::Setmem { name, size } => {
            let (name, size) = match (name, size) {
                (Some(size), None) => (None, size),
                (name, Some(size)) => (name, size),
                (None, None) => {
                    return Err(usage(
                        "setmem",
                        "give the SIZE of memory the guest keeps (e.g. 1G)",
                    ))
                }
            };
            if let Some(name) = &name {
                check_name("setmem", name)?;
            }
            let mib =
                config::parse_mib("SIZE", &size).map_err(|e| usage("setmem", e.to_string()))?;
            if mib == 0 {
                return Err(usage("setmem", "SIZE: must be more than 0"));
            }
            Ok((Command::Setmem(mib), name))
        }
        Cmd::Snapshot { name, dir } => {
            let (dir, name) = name_and_dir("snapshot", name, dir)?;
            Ok((Command::Snapshot(dir), name))
        }
        Cmd::Restore { name, dir } => {
            let (dir, name) = name_and_dir("restore", name, dir)?;
            Ok((Command::Restore(dir), name))
        }
        Cmd::Console { target, socket } => simple(Command::Console(socket), target),
        Cmd::List { socket_dir } => {
            if socket_dir
                .as_ref()
                .is_some_and(|d| d.as_os_str().is_empty())
            {
                return Err(usage("list", "--socket-dir needs a directory"));
            }
            Ok((Command::List(socket_dir), None))
        }
    }
}

/// `[NAME] DIR`: a single word is the DIR, made absolute (the VMM may run
/// elsewhere in the file system).
fn name_and_dir(
    command: &'static str,
    first: Option<String>,
    second: Option<PathBuf>,
) -> Result<(PathBuf, Option<String>), UsageError> {
    let (name, dir) = match (first, second) {
        (Some(dir), None) => (None, PathBuf::from(dir)),
        (name, Some(dir)) => (name, dir),
        (None, None) => return Err(usage(command, "give the snapshot DIR")),
    };
    if let Some(name) = &name {
        check_name(command, name)?;
    }
    let dir =
        std::path::absolute(&dir).map_err(|e| usage(command, format!("{}: {e}", dir.display())))?;
    Ok((dir, name))
}

/// `[NAME] URL`: a single word is the URL (names have no ':').
fn name_and_url(
    command: &'static str,
    what: &str,
    first: Option<String>,
    second: Option<String>,
) -> Result<(Option<String>, String), UsageError> {
    let (name, url) = match (first, second) {
        (None, _) => {
            return Err(usage(
                command,
                format!("give the {what} (tcp:HOST:PORT or unix:PATH)"),
            ))
        }
        (Some(url), None) => (None, url),
        (Some(first), Some(second)) if first.contains(':') => {
            return Err(usage(command, format!("unexpected argument {second:?}")))
        }
        (Some(name), Some(url)) => {
            check_name(command, &name)?;
            (Some(name), url)
        }
    };
    validate_migration_url(what, &url).map_err(|e| usage(command, e.to_string()))?;
    Ok((name, url))
}

fn missing_token(command: &'static str) -> UsageError {
    usage(
        command,
        "give the token with --token-file FILE or --token TOKEN",
    )
}

impl TokenArgs {
    fn token(self) -> Option<Token> {
        match (self.token, self.token_file) {
            (Some(token), _) => Some(Token::Literal(token)),
            (None, Some(file)) => Some(Token::File(file)),
            (None, None) => None,
        }
    }
}

impl Tuning {
    fn is_empty(&self) -> bool {
        self.downtime.is_none()
            && self.downtime_ms.is_none()
            && self.bandwidth.is_none()
            && self.timeout.is_none()
            && self.timeout_s.is_none()
            && self.timeout_action.is_none()
            && !self.no_auto_converge
    }

    /// The parameters; an option left out takes its default.
    fn parameters(&self, command: &'static str) -> Result<MigrationParameters, UsageError> {
        let mut parameters = MigrationParameters::default();
        let downtime_flag = if self.downtime.is_some() {
            "--downtime"
        } else {
            "--downtime-ms"
        };
        if let Some(downtime) = self.downtime.or(self.downtime_ms) {
            parameters.downtime_ms = u64::try_from(downtime.as_millis()).unwrap_or(u64::MAX);
        }
        if let Some(text) = &self.bandwidth {
            let rate = config::parse_size("--bandwidth", text)
                .map_err(|e| usage(command, format!("{e} in bytes per second (e.g. 100M)")))?;
            parameters.bandwidth_bytes_per_s = Some(rate).filter(|&r| r > 0);
        }
        let timeout_flag = if self.timeout.is_some() {
            "--timeout"
        } else {
            "--timeout-s"
        };
        if let Some(timeout) = self.timeout.or(self.timeout_s) {
            if timeout.subsec_millis() != 0 {
                return Err(usage(
                    command,
                    format!("{timeout_flag}: must be whole seconds"),
                ));
            }
            parameters.timeout_s = Some(timeout.as_secs());
        }
        if let Some(action) = &self.timeout_action {
            parameters.timeout_action = match action.as_str() {
                "force" => TimeoutAction::Force,
                _ => TimeoutAction::Cancel,
            };
        }
        parameters.auto_converge = !self.no_auto_converge;
        parameters.validate().map_err(|e| {
            let flag = match e.field.as_str() {
                "downtime_ms" => downtime_flag.to_string(),
                "timeout_s" => timeout_flag.to_string(),
                other => format!("--{}", other.replace('_', "-")),
            };
            usage(command, format!("{flag}: {}", e.message))
        })?;
        Ok(parameters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        match parse_args(args.iter().map(|s| s.to_string()).collect(), None) {
            Ok(Ok(parsed)) => Ok(parsed),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn args(args: &[&str]) -> Args {
        match parse(args) {
            Ok(Parsed::Run(args)) => *args,
            Ok(_) => panic!("not a command"),
            Err(e) => panic!("{e}"),
        }
    }

    fn command(a: &[&str]) -> Command {
        args(a).command
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
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
        match command(&["--api-socket", "/s", "shutdown", "--timeout", "30s"]) {
            Command::Shutdown(r) => assert_eq!(r.timeout_ms, Some(30_000)),
            other => panic!("{other:?}"),
        }
        match command(&["--api-socket", "/s", "shutdown", "--timeout", "2"]) {
            Command::Shutdown(r) => assert_eq!(r.timeout_ms, Some(2000)),
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
            Ok(Ok(Parsed::Run(args))) => assert_eq!(args.socket, PathBuf::from("/env")),
            _ => panic!(),
        }
        // The old global --timeout (seconds) before the command, and the new name anywhere.
        let a = args(&[
            "--api-socket",
            "/s",
            "--timeout",
            "0.5",
            "--json",
            "counters",
        ]);
        assert!(a.json);
        assert_eq!(a.timeout, Duration::from_millis(500));
        let a = args(&["--api-socket", "/s", "counters", "--api-timeout", "250ms"]);
        assert_eq!(a.timeout, Duration::from_millis(250));
        for (a, c) in [
            ("reboot", "reboot"),
            ("power-button", "power-button"),
            ("delete", "delete"),
        ] {
            assert_eq!(command(&["--api-socket", "/s", a]).name(), c);
        }
    }

    #[test]
    fn guests_are_named_by_their_socket() {
        let a = args(&["info", "web1"]);
        assert_eq!(a.socket, api::http::socket_dir().join("web1.sock"));
        assert_eq!(a.name, "web1");
        let a = args(&["--api-socket", "/run/vmm/db2.sock", "pause"]);
        assert_eq!(a.name, "db2");
        let a = args(&["create", "web1", "/etc/vmm/web1.json"]);
        assert!(matches!(&a.command, Command::Create(f) if f == Path::new("/etc/vmm/web1.json")));
        assert_eq!(a.name, "web1");
        let a = args(&["migrate", "web1", "tcp:node2:48000", "--token", "t"]);
        assert!(matches!(&a.command, Command::Migrate(m) if m.destination == "tcp:node2:48000"));
        assert_eq!(a.name, "web1");
        let a = args(&["migrate", "web1", "--cancel"]);
        assert!(matches!(a.command, Command::MigrateCancel));
        let a = args(&["setmem", "web1", "1G"]);
        assert!(matches!(a.command, Command::Setmem(1024)));
        let a = args(&["--api-socket", "/s", "setmem", "512"]);
        assert!(matches!(a.command, Command::Setmem(512)));
        let a = args(&["console", "--socket", "/run/vmm/web1.console"]);
        assert!(matches!(a.command, Command::Console(Some(_))));
        assert!(matches!(args(&["list"]).command, Command::List(None)));
    }

    #[test]
    fn usage_errors_are_explained() {
        let error = |args: &[&str]| parse(args).err().unwrap_or_default();
        assert!(error(&["ping"]).contains("VMM_API_SOCKET"));
        assert!(error(&["--api-socket", "/s"]).contains("no command"));
        assert!(error(&["--api-socket", "/s", "bogus"]).contains("bogus"));
        assert!(error(&["--api-socket", "/s", "ping", "extra"]).contains("extra"));
        assert!(error(&["ping", "../etc"]).contains("not a guest name"));
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
        assert!(error(&["--api-socket"]).contains("--api-socket"));
        assert!(error(&["--api-socket", "/s", "--timeout", "-1", "ping"]).contains("--timeout"));
        assert!(
            error(&["--api-socket", "/s", "--api-timeout", "0", "ping"]).contains("more than 0")
        );
        assert!(error(&["--api-socket", "/s", "setmem", "web1"]).contains("web1"));
        assert!(error(&["setmem", "web1", "1000K"]).contains("MiB"));
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
            "tcp:h:1",
            "--token",
            "t",
            "--bandwidth",
            "100M",
            "--downtime",
            "1.5s",
            "--timeout",
            "2m",
        ]) {
            Command::Migrate(m) => {
                assert_eq!(m.parameters.bandwidth_bytes_per_s, Some(100 << 20));
                assert_eq!(m.parameters.downtime_ms, 1500);
                assert_eq!(m.parameters.timeout_s, Some(120));
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
            command(&["--api-socket", "/s", "balloon", "--target", "1G"]),
            Command::Balloon(Some(1024))
        ));
        assert!(matches!(
            command(&["--api-socket", "/s", "balloon", "--target-mib=0", "--json"]),
            Command::Balloon(Some(0))
        ));
        assert!(matches!(
            command(&["--api-socket", "/s", "balloon-stats"]),
            Command::BalloonStats
        ));
        match command(&["list", "--socket-dir", "/tmp/v", "--json"]) {
            Command::List(Some(dir)) => assert_eq!(dir, PathBuf::from("/tmp/v")),
            other => panic!("{other:?}"),
        }
        let error = |args: &[&str]| parse(args).err().unwrap_or_default();
        assert!(error(&["balloon"]).contains("VMM_API_SOCKET"));
        assert!(error(&["--api-socket", "/s", "balloon", "--target-mib", "x1"]).contains("x1"));
        assert!(error(&["--api-socket", "/s", "balloon", "--target-mib", "1G"]).contains("1G"));
        assert!(error(&["--api-socket", "/s", "balloon", "--target-mib"]).contains("--target-mib"));
        assert!(error(&["--api-socket", "/s", "balloon", "64"]).contains("64"));
        assert!(error(&[
            "--api-socket",
            "/s",
            "balloon",
            "--target-mib=1",
            "--target-mib=2"
        ])
        .contains("--target-mib"));
        assert!(error(&["--api-socket", "/s", "balloon-stats", "--all"]).contains("--all"));
        assert!(error(&["list", "--socket-dir="]).contains("--socket-dir"));
        assert!(error(&["list", "--dir", "x"]).contains("--dir"));
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
