//! `vmmctl`: drives a `vmm` over its REST API socket.

mod args;
mod console;
mod list;
mod migrate;
mod show;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::http::{ApiClient, ClientError};
use api::request::{ActionReply, ApiError, ReceiveMigrationRequest, SendMigrationRequest};

use args::{parse_args, Args, Command, Parsed};
use list::{list_vmms, show_list};
use migrate::{follow_migration, show_migration};
use show::{show_balloon, show_counters, show_info, show_ping};

pub(crate) const EXIT_REFUSED: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_UNREACHABLE: u8 = 3;

pub(crate) const SOCKET_ENV: &str = "VMM_API_SOCKET";
/// The longest `list` waits for one VMM.
pub(crate) const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a command failed: the exit code, the message and, for a refusal,
/// the VMM's error.
pub(crate) struct Failure {
    code: u8,
    message: String,
    api: Option<(u16, ApiError)>,
}

impl From<(u8, String)> for Failure {
    fn from((code, message): (u8, String)) -> Self {
        Failure {
            code,
            message,
            api: None,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let (code, message) = client_error(&e);
        let api = match e {
            ClientError::Api { status, error } => Some((status, error)),
            _ => None,
        };
        Failure { code, message, api }
    }
}

/// An error as `--json` prints it: one line on stderr.
#[derive(serde::Serialize)]
struct JsonError<'a> {
    error: &'a str,
    exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'a str>,
    /// The VMM's HTTP status and error kind, for a refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<api::request::ApiErrorKind>,
}

fn report_error(json: bool, command: Option<&str>, failure: &Failure) {
    // Text from the VMM may come from a migration peer or a guest: keep it
    // on one line and away from the terminal's escape sequences.
    let message = config::escape_control(&failure.message);
    if json {
        let error = JsonError {
            error: &message,
            exit_code: failure.code,
            command,
            status: failure.api.as_ref().map(|(status, _)| *status),
            kind: failure.api.as_ref().map(|(_, e)| e.kind),
        };
        let line =
            serde_json::to_string(&error).unwrap_or_else(|_| format!("{{\"error\": {message:?}}}"));
        eprintln!("{line}");
    } else {
        match command {
            Some(command) => eprintln!("vmmctl: {command}: {message}"),
            None => eprintln!("vmmctl: {message}"),
        }
    }
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // Before the arguments are understood: --json anywhere asks for JSON errors.
    let json_errors = raw.iter().any(|a| a == "--json");
    let env_socket = std::env::var(SOCKET_ENV).ok();
    let args = match parse_args(raw, env_socket) {
        Ok(Ok(Parsed::Run(args))) => args,
        Ok(Ok(Parsed::Generated)) => return ExitCode::SUCCESS,
        Ok(Err(usage)) => {
            let failure = Failure::from((EXIT_USAGE, usage.message));
            report_error(json_errors, usage.command, &failure);
            if !json_errors {
                eprintln!("Try 'vmmctl --help'.");
            }
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = e.print();
                return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
            }
            // clap's "error: ..." as vmmctl's own message, with its hints.
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text).trim_end();
            let failure = Failure::from((EXIT_USAGE, text.to_string()));
            if json_errors {
                let first = text.lines().next().unwrap_or_default().to_string();
                report_error(true, None, &Failure::from((EXIT_USAGE, first)));
            } else {
                eprintln!("vmmctl: {}", failure.message);
            }
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
        Err(failure) => {
            report_error(args.json, Some(args.command.name()), &failure);
            ExitCode::from(failure.code)
        }
    }
}

/// What an action did, as printed: `web1: paused`, or its JSON.
fn said(args: &Args, reply: ActionReply) -> String {
    if args.json {
        #[derive(serde::Serialize)]
        struct Said<'a> {
            name: &'a str,
            #[serde(flatten)]
            reply: ActionReply,
        }
        json(&Said {
            name: &args.name,
            reply,
        })
    } else {
        format!("{}: {}\n", args.name, reply.message)
    }
}

/// What an action without a reply of its own did.
fn did(args: &Args, message: &str) -> String {
    if args.json {
        json(&serde_json::json!({"name": args.name, "message": message}))
    } else {
        format!("{}: {message}\n", args.name)
    }
}

/// Runs the command: the text to print, or why it failed.
fn run(args: &Args) -> Result<String, Failure> {
    let mut client = ApiClient::new(&args.socket).with_timeout(args.timeout);
    let shown = |text: String, value: &dyn erased::Json| {
        if args.json {
            value.json()
        } else {
            text
        }
    };
    match &args.command {
        Command::Ping => {
            let ping = client.ping()?;
            Ok(shown(show_ping(&ping), &ping))
        }
        Command::Info => {
            let info = client.info()?;
            Ok(shown(show_info(&info), &info))
        }
        Command::Counters => {
            let counters = client.counters()?;
            Ok(shown(show_counters(&counters), &counters))
        }
        Command::ShutdownVmm => {
            client.shutdown_vmm()?;
            Ok(did(args, "the VMM is stopping"))
        }
        Command::Boot => Ok(said(args, client.boot()?)),
        Command::Pause => Ok(said(args, client.pause()?)),
        Command::Resume(false) => Ok(said(args, client.resume()?)),
        Command::Resume(true) => Ok(said(args, client.resume_force()?)),
        Command::Reboot => Ok(said(args, client.reboot()?)),
        Command::PowerButton => Ok(said(args, client.power_button()?)),
        Command::Delete => Ok(said(args, client.delete()?)),
        Command::Shutdown(request) => {
            // The VMM may answer only once the guest is down: wait past its timeout.
            if let Some(ms) = request.timeout_ms {
                let wait = Duration::from_millis(ms).saturating_add(args.timeout);
                client = client.with_timeout(wait);
            }
            Ok(said(args, client.shutdown(request)?))
        }
        Command::Create(file) => {
            let body = read_config(file).map_err(|m| (EXIT_USAGE, m))?;
            client.create_json(&body)?;
            Ok(did(args, "created"))
        }
        Command::Migrate(migrate) => {
            let request = SendMigrationRequest {
                destination: migrate.destination.clone(),
                token: migrate.token.read().map_err(|m| (EXIT_USAGE, m))?,
                tls_dir: migrate.tls_dir.clone(),
                parameters: migrate.parameters.clone(),
                force: migrate.force,
            };
            client.send_migration(&request)?;
            if migrate.detach {
                return Ok(did(
                    args,
                    &format!("migration to {} started", migrate.destination),
                ));
            }
            Ok(follow_migration(&client, args.json)?)
        }
        Command::MigrateCancel => {
            client.migration_cancel()?;
            Ok(did(args, "migration cancelled"))
        }
        Command::MigrateStatus => {
            let status = client.migration_status()?;
            Ok(shown(show_migration(&status), &status))
        }
        Command::MigrateSet(parameters) => {
            client.migration_parameters(parameters)?;
            Ok(did(args, "migration parameters changed"))
        }
        Command::ReceiveMigration {
            listen,
            token,
            tls_dir,
            timeout_s,
        } => {
            let request = ReceiveMigrationRequest {
                listen: listen.clone(),
                token: token.read().map_err(|m| (EXIT_USAGE, m))?,
                tls_dir: tls_dir.clone(),
                timeout_s: *timeout_s,
            };
            client.receive_migration(&request)?;
            Ok(did(args, &format!("waiting for a migration on {listen}")))
        }
        Command::Snapshot(dir) => {
            client.snapshot(dir)?;
            Ok(did(args, &format!("snapshot written to {}", dir.display())))
        }
        Command::Restore(dir) => {
            client.restore(dir)?;
            Ok(did(args, &format!("restored from {}", dir.display())))
        }
        Command::Balloon(Some(target)) => {
            client.balloon(*target)?;
            Ok(did(args, &format!("balloon target set to {target} MiB")))
        }
        Command::Balloon(None) | Command::BalloonStats => {
            let stats = client.balloon_statistics()?;
            Ok(shown(show_balloon(&stats), &stats))
        }
        Command::Setmem(keep_mib) => {
            let info = client.info()?;
            let size_mib = info.config.memory.size_mib;
            if *keep_mib > size_mib {
                return Err(Failure::from((
                    EXIT_REFUSED,
                    format!(
                        "{keep_mib} MiB is more than the guest's memory ({size_mib} MiB): \
                         setmem gives memory back up to the configured size, no more"
                    ),
                )));
            }
            let target = size_mib - keep_mib;
            client.balloon(target)?;
            Ok(did(
                args,
                &format!(
                    "memory set to {keep_mib} MiB of {size_mib} MiB (balloon target {target} MiB)"
                ),
            ))
        }
        Command::Console(socket) => {
            let target = match socket {
                Some(path) => console::ConsoleTarget::Socket(path.clone()),
                None => console::ConsoleTarget::Api,
            };
            Ok(console::attach(&client, &target)?)
        }
        Command::List(dir) => {
            let dir = dir.clone().unwrap_or_else(api::http::socket_dir);
            let entries = list_vmms(&dir, args.timeout.min(LIST_TIMEOUT))?;
            Ok(shown(show_list(&dir, &entries), &entries))
        }
    }
}

/// Printing any reply as JSON, behind one `dyn`.
mod erased {
    pub(crate) trait Json {
        fn json(&self) -> String;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            crate::json(self)
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

pub(crate) fn client_error(e: &ClientError) -> (u8, String) {
    let code = match e {
        ClientError::Api { .. } => EXIT_REFUSED,
        ClientError::InvalidRequest(_) => EXIT_USAGE,
        _ => EXIT_UNREACHABLE,
    };
    (code, e.to_string())
}

pub(crate) fn json<T: serde::Serialize>(value: &T) -> String {
    let mut text =
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}
