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
use api::request::{ReceiveMigrationRequest, SendMigrationRequest};

use args::{parse_args, Args, Command, Parsed, USAGE};
use list::{list_vmms, show_list};
use migrate::{follow_migration, show_migration};
use show::{show_balloon, show_counters, show_info, show_ping};

pub(crate) const EXIT_REFUSED: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_UNREACHABLE: u8 = 3;

pub(crate) const SOCKET_ENV: &str = "VMM_API_SOCKET";
/// The longest `list` waits for one VMM.
pub(crate) const LIST_TIMEOUT: Duration = Duration::from_secs(3);

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
        Command::Resume(false) => text(client.resume().map(|()| String::new())),
        Command::Resume(true) => text(client.resume_force().map(|()| String::new())),
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
                tls_dir: migrate.tls_dir.clone(),
                force: migrate.force,
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
            text(client.receive_migration(&request).map(|()| String::new()))
        }
        Command::Balloon(Some(target)) => text(client.balloon(*target).map(|()| String::new())),
        Command::Snapshot(dir) => text(client.snapshot(dir).map(|()| String::new())),
        Command::Restore(dir) => text(client.restore(dir).map(|()| String::new())),
        Command::Balloon(None) | Command::BalloonStats => {
            let stats = client.balloon_statistics().map_err(client_error)?;
            Ok(if args.json {
                json(&stats)
            } else {
                show_balloon(&stats)
            })
        }
        Command::Console { name, socket } => {
            let target = match (name, socket) {
                (_, Some(path)) => console::ConsoleTarget::Socket(path.clone()),
                (Some(name), None) => {
                    client = ApiClient::new(api::http::socket_dir().join(format!("{name}.sock")))
                        .with_timeout(args.timeout);
                    console::ConsoleTarget::Api
                }
                (None, None) => console::ConsoleTarget::Api,
            };
            console::attach(&client, &target)
        }
        Command::List(dir) => {
            let dir = dir.clone().unwrap_or_else(api::http::socket_dir);
            let entries = list_vmms(&dir, args.timeout.min(LIST_TIMEOUT))?;
            Ok(if args.json {
                json(&entries)
            } else {
                show_list(&dir, &entries)
            })
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

pub(crate) fn client_error(e: ClientError) -> (u8, String) {
    let code = match &e {
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
