//! The command line of `vmm-web`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::DurationUnit;

pub const USAGE: &str = "\
vmm-web: a web console for every VMM on this host

usage: vmm-web [OPTIONS]

  --listen ADDR:PORT        where to serve (default 127.0.0.1:8010); an IP
                            address, not a name: [::1]:8010, 0.0.0.0:8010
  --listen unix:PATH        serve on a Unix socket (mode 0660), e.g. behind a
                            reverse proxy that authenticates (client certificates)
  --auth-token-file FILE    require this token (or password; its first line) to
                            log in; required when ADDR is not a loopback address.
                            The file must not be readable by every user
  --allow-host NAME         also answer to Host: NAME (repeatable); by default
                            only IP addresses and localhost are answered, which
                            stops DNS-rebinding pages from reaching the console
  --socket-dir DIR          where the VMMs' API sockets are (default
                            $VMM_SOCKET_DIR, else /run/vmm); each NAME.sock is a guest
  --interval DURATION       sampling period (default 1s; 100ms to 1m; a plain
                            number is ms, as for the older --interval-ms)
  --history DURATION        how long the charts reach back (default 5m; 10s to
                            1 day; a plain number is s, as for --history-s)
  -h, --help                this text
  -V, --version             the version
";

/// Where the console is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    /// Whether only this host can connect: a loopback address. A Unix socket
    /// counts too: its file mode decides who connects (a proxy in front of it
    /// is expected to authenticate).
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Tcp(addr) => addr.ip().to_canonical().is_loopback(),
            Listen::Unix(_) => true,
        }
    }

    pub fn parse(text: &str) -> Result<Listen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("--listen unix: needs a path".into());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        text.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!("--listen {text:?} is not ADDR:PORT (an IP address and a port) or unix:PATH")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "http://{addr}/"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    pub listen: Listen,
    pub auth_token_file: Option<PathBuf>,
    pub allow_hosts: Vec<String>,
    pub socket_dir: PathBuf,
    pub interval: Duration,
    pub history: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Args),
    Help,
    Version,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8010";

/// Parses the arguments (without the program name). `socket_dir` is the
/// default directory (from the environment).
pub fn parse_args(args: Vec<String>, socket_dir: PathBuf) -> Result<Parsed, String> {
    let mut parsed = Args {
        listen: Listen::parse(DEFAULT_LISTEN)?,
        auth_token_file: None,
        allow_hosts: Vec::new(),
        socket_dir,
        interval: Duration::from_secs(1),
        history: Duration::from_secs(300),
    };
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value.into())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| iter.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--listen" => parsed.listen = Listen::parse(&value("--listen")?)?,
            "--auth-token-file" => {
                parsed.auth_token_file = Some(PathBuf::from(value("--auth-token-file")?))
            }
            "--allow-host" => {
                let host = value("--allow-host")?.to_ascii_lowercase();
                if host.is_empty() || host.contains(['/', ' ', '@']) {
                    return Err(format!("--allow-host {host:?} is not a host name"));
                }
                parsed.allow_hosts.push(host);
            }
            "--socket-dir" => parsed.socket_dir = PathBuf::from(value("--socket-dir")?),
            // The older names (plain numbers keep their units) stay.
            "--interval" | "--interval-ms" => {
                let text = value(&flag)?;
                parsed.interval = duration(&flag, &text, DurationUnit::Millis, 100, 60_000)?;
            }
            "--history" | "--history-s" => {
                let text = value(&flag)?;
                parsed.history = duration(&flag, &text, DurationUnit::Seconds, 10_000, 86_400_000)?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Parsed::Run(parsed))
}

/// A duration between `min_ms` and `max_ms` (the grammar of every VMM
/// flag: `500ms`, `30s`, `2m`; a plain number in `plain`).
fn duration(
    flag: &str,
    text: &str,
    plain: DurationUnit,
    min_ms: u64,
    max_ms: u64,
) -> Result<Duration, String> {
    let d =
        config::parse_duration(flag, text, plain).map_err(|e| format!("{flag} {}", e.message))?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if !(min_ms..=max_ms).contains(&ms) {
        return Err(format!(
            "{flag} {text:?} is not from {} to {}",
            show(min_ms),
            show(max_ms)
        ));
    }
    Ok(d)
}

fn show(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(
            args.iter().map(|s| s.to_string()).collect(),
            "/run/vmm".into(),
        )
    }

    fn run(args: &[&str]) -> Args {
        match parse(args) {
            Ok(Parsed::Run(args)) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_serve_on_localhost_8010_from_run_vmm() {
        let args = run(&[]);
        assert_eq!(args.listen, Listen::Tcp("127.0.0.1:8010".parse().unwrap()));
        assert!(args.listen.is_local());
        assert_eq!(args.socket_dir, PathBuf::from("/run/vmm"));
        assert_eq!(args.auth_token_file, None);
    }

    #[test]
    fn only_loopback_addresses_and_unix_sockets_count_as_local() {
        for (text, local) in [
            ("127.0.0.1:1", true),
            ("127.0.0.2:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("0.0.0.0:1", false),
            ("[::]:1", false),
            ("10.1.2.3:1", false),
            ("unix:/run/vmm-web.sock", true),
        ] {
            assert_eq!(Listen::parse(text).unwrap().is_local(), local, "{text}");
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        for (args, needle) in [
            (&["--listen", "localhost:80"][..], "not ADDR:PORT"),
            (&["--listen", "unix:"], "needs a path"),
            (&["--listen"], "needs a value"),
            (&["--interval-ms", "5"], "is not from 100ms to 60s"),
            (&["--interval", "5s5"], "is not a duration"),
            (&["--history", "2d"], "is not a duration"),
            (&["--bogus"], "unknown argument \"--bogus\""),
            (&["--allow-host", "a/b"], "not a host name"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let args = run(&[
            "--listen=unix:/tmp/w.sock",
            "--auth-token-file",
            "/etc/t",
            "--allow-host",
            "Console.Example",
        ]);
        assert_eq!(args.listen, Listen::Unix("/tmp/w.sock".into()));
        assert_eq!(args.auth_token_file, Some("/etc/t".into()));
        assert_eq!(args.allow_hosts, vec!["console.example".to_string()]);
    }

    #[test]
    fn periods_take_durations_and_the_old_plain_numbers() {
        let args = run(&["--interval", "250ms", "--history", "10m"]);
        assert_eq!(args.interval, Duration::from_millis(250));
        assert_eq!(args.history, Duration::from_secs(600));
        let args = run(&["--interval-ms", "500", "--history-s", "60"]);
        assert_eq!(args.interval, Duration::from_millis(500));
        assert_eq!(args.history, Duration::from_secs(60));
    }
}
