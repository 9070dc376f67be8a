//! `vmm-web`: serves the host web console (see the crate documentation).

use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;
use std::sync::Arc;

use web::args::{parse_args, Args, Listen, Parsed, USAGE};
use web::auth::{load_secret, Auth};
use web::console::Consoles;
use web::monitor::Monitor;
use web::server::{router, AppState};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(args, api::http::socket_dir()) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("vmm-web {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("vmm-web: {message}\nTry 'vmm-web --help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let secret = match &args.auth_token_file {
        Some(path) => match load_secret(path) {
            Ok(secret) => Some(secret),
            Err(e) => {
                eprintln!("vmm-web: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => None,
    };
    if secret.is_none() && !args.listen.is_local() {
        eprintln!(
            "vmm-web: refusing to serve on {} without authentication: anyone who can reach \
             it could stop or move every guest. Give --auth-token-file FILE, or listen on a \
             loopback address or a Unix socket.",
            args.listen
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vmm-web: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(serve(args, secret)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vmm-web: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Why serving ended with an error.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot listen on {listen}: {source}")]
    Listen {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the mode of {path}: {source}")]
    Mode {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {listen}: {source}")]
    Serve {
        listen: String,
        #[source]
        source: std::io::Error,
    },
}

async fn serve(args: Args, secret: Option<Vec<u8>>) -> Result<(), ServeError> {
    let consoles = Arc::new(Consoles::new());
    let monitor = Monitor::new(
        args.socket_dir.clone(),
        args.interval,
        args.history,
        consoles.clone(),
    );
    if secret.is_none() && matches!(args.listen, Listen::Tcp(_)) {
        eprintln!(
            "vmm-web: no authentication: every user of this host who can connect to {} can \
             drive the guests (give --auth-token-file on hosts with other users)",
            args.listen
        );
    }
    let state = Arc::new(AppState {
        monitor: monitor.clone(),
        consoles,
        auth: Auth::new(secret),
        allow_hosts: args.allow_hosts.clone(),
        socket_dir: args.socket_dir.clone(),
    });
    let app = router(state);
    tokio::spawn(monitor.clone().run());
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    match &args.listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    listen: addr.to_string(),
                    source,
                })?;
            // The bound address, so port 0 (any free port) can be found.
            let bound = listener.local_addr().map_or(*addr, |a| a);
            eprintln!(
                "vmm-web: serving {} (VMM sockets in {})",
                Listen::Tcp(bound),
                args.socket_dir.display()
            );
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(|source| ServeError::Serve {
                    listen: addr.to_string(),
                    source,
                })
        }
        Listen::Unix(path) => {
            // A socket file nobody answers on is left from an earlier run.
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let listener =
                tokio::net::UnixListener::bind(path).map_err(|source| ServeError::Listen {
                    listen: path.display().to_string(),
                    source,
                })?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(
                |source| ServeError::Mode {
                    path: path.display().to_string(),
                    source,
                },
            )?;
            eprintln!(
                "vmm-web: serving {} (VMM sockets in {})",
                args.listen,
                args.socket_dir.display()
            );
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(|source| ServeError::Serve {
                    listen: path.display().to_string(),
                    source,
                });
            let _ = std::fs::remove_file(path);
            served
        }
    }
}
