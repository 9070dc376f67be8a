//! `vmm`: one process per guest.
//!
//! `vmm --api-socket PATH` waits for API calls; with `--config FILE` or
//! `--kernel PATH` (and other VM flags) it creates and boots at once. The
//! exit code says how the guest ended (see `vmm --help`).

use std::path::PathBuf;
use std::process::ExitCode;

use api::request::{validate_migration_url, ReceiveMigrationRequest};
use config::{
    parse_number, BalloonConfig, ConfigError, CpusConfig, DiskConfig, MemoryConfig, NetConfig,
    PayloadConfig, ResetAction, SerialConfig, VmConfig,
};
use vmm::control::{ControlEvent, Controller};
use vmm::exit::ExitStatus;

const USAGE: &str = "\
usage: vmm [--api-socket PATH] [--config FILE | VM FLAGS]

Runs one VM on /dev/kvm. With --api-socket only, waits for vm.create/vm.boot
on the REST API. With --config or --kernel, creates and boots the VM at once
(and also serves the API if --api-socket is given).

VM flags (the same fields as the JSON config file and the vm.create body):
  --kernel PATH          Linux bzImage or ELF (vmlinux, PVH entry if present)
  --cmdline STRING       kernel command line
  --initrd PATH          initial ramdisk
  --cpus N               number of vCPUs (default 1)
  --memory SPEC          size=128M[,backing=anonymous|memfd|hugetlbfs][,mergeable=on]
                         [,thp=on|off]  (default: on for anonymous memory
                         unless a balloon or mergeable is configured)
  --disk SPEC            path=P[,id=ID][,readonly=on][,direct=on][,serial=S]
                         [,logical_block_size=N][,physical_block_size=N]
                         [,rate_bytes=N][,rate_ops=N]   (repeatable)
  --net SPEC             tap=NAME|fd=N[,id=ID][,mac=MAC][,rate_bytes=N][,rate_ops=N]
                         (repeatable)
  --balloon SPEC         [target_mib=N][,deflate_on_oom=on][,free_page_reporting=on]
                         [,stats_interval_s=N]
  --serial MODE          stdout (default) | off | pty | file=PATH
                         | socket=PATH[,buffer=SIZE][,group=GROUP]
                         (socket: mode 0600, or 0660 for GROUP; output kept in
                         a ring buffer, 1M by default, for every client)
  --on-reset ACTION      exit (default) | reboot

Other:
  --config FILE          the VM as a JSON file (not combined with VM flags)
  --api-socket PATH      serve the REST API on this Unix socket (mode 0600)
  --api-socket-group GROUP
                         let GROUP use the API: the socket is 0660 and owned by it
  --incoming URL         wait for a live migration on tcp:HOST:PORT or unix:PATH;
                         the VM's config comes from the source, or from VM flags
                         or --config here (checked against the source's; this
                         host's disk paths and taps are used)
  --migration-token-file FILE
                         the pre-shared token a migration source must present
                         (or the VMM_MIGRATION_TOKEN environment variable)
  --managed-by MANAGER   a cluster manager (e.g. pacemaker) runs this guest:
                         vm.send-migration is refused unless forced, so
                         that a hand-run migration cannot leave the manager
                         believing the guest stopped here (it would start a
                         second copy)
  -h, --help             this text
  -V, --version          the version

Exit codes:
  0  the guest powered off (or shut down when asked), or no guest ran
  1  VMM error
  2  bad command line or config
  3  the guest reset itself (on_reset=exit)
  4  the guest crashed
  5  the guest was stopped by request (forced shutdown, vmm.shutdown, SIGTERM)
  6  the guest was migrated away
";

/// What the command line asks for.
struct Args {
    api_socket: Option<PathBuf>,
    api_socket_group: Option<String>,
    vm: Option<VmConfig>,
    incoming: Option<ReceiveMigrationRequest>,
    managed_by: Option<String>,
}

fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: {e}");
    eprintln!("Try 'vmm --help'.");
    ExitCode::from(ExitStatus::Usage.code() as u8)
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, ConfigError> {
    let mut api_socket = None;
    let mut api_socket_group = None;
    let mut managed_by: Option<String> = None;
    let mut incoming: Option<String> = None;
    let mut token_file: Option<PathBuf> = None;
    let mut config_file: Option<PathBuf> = None;
    let mut payload = PayloadConfig::default();
    let mut vm = VmConfig::default();
    let mut vm_flags = false;
    while let Some(flag) = argv.next() {
        if flag == "-h" || flag == "--help" {
            print!("{USAGE}");
            return Ok(None);
        }
        if flag == "-V" || flag == "--version" {
            println!("vmm {}", env!("CARGO_PKG_VERSION"));
            return Ok(None);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| ConfigError::new(name.clone(), "needs a value"))
        };
        match name.as_str() {
            "--api-socket" => api_socket = Some(PathBuf::from(value()?)),
            "--api-socket-group" => api_socket_group = Some(value()?),
            "--managed-by" => {
                let manager = value()?;
                if manager.is_empty() || manager.chars().any(|c| c.is_control()) {
                    return Err(ConfigError::new(
                        "--managed-by",
                        "needs the manager's name (e.g. pacemaker)",
                    ));
                }
                managed_by = Some(manager);
            }
            "--incoming" => incoming = Some(value()?),
            "--migration-token-file" => token_file = Some(PathBuf::from(value()?)),
            "--config" => config_file = Some(PathBuf::from(value()?)),
            "--kernel" => payload.kernel = PathBuf::from(value()?),
            "--cmdline" => payload.cmdline = value()?,
            "--initrd" => payload.initrd = Some(PathBuf::from(value()?)),
            "--cpus" => {
                vm.cpus = CpusConfig {
                    boot_vcpus: parse_number("--cpus", &value()?)?,
                }
            }
            "--memory" => vm.memory = MemoryConfig::parse(&value()?)?,
            "--disk" => vm.disks.push(DiskConfig::parse(&value()?)?),
            "--net" => vm.nets.push(NetConfig::parse(&value()?)?),
            "--balloon" => vm.balloon = Some(BalloonConfig::parse(&value()?)?),
            "--serial" => vm.serial = SerialConfig::parse(&value()?)?,
            "--on-reset" => {
                vm.on_reset = match value()?.as_str() {
                    "exit" => ResetAction::Exit,
                    "reboot" => ResetAction::Reboot,
                    other => {
                        return Err(ConfigError::new(
                            "--on-reset",
                            format!("{other:?} is not exit or reboot"),
                        ))
                    }
                }
            }
            other => {
                return Err(ConfigError::new(other, "unknown option"));
            }
        }
        if !matches!(
            name.as_str(),
            "--api-socket"
                | "--api-socket-group"
                | "--config"
                | "--incoming"
                | "--migration-token-file"
                | "--managed-by"
        ) {
            vm_flags = true;
        }
    }
    let vm = match (config_file, vm_flags) {
        (Some(_), true) => {
            return Err(ConfigError::new(
                "--config",
                "cannot be combined with VM flags; put everything in the file",
            ))
        }
        (Some(path), false) => {
            let text = std::fs::read(&path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            let config = VmConfig::from_json(&text).map_err(|e| {
                ConfigError::new(format!("{}: {}", path.display(), e.field), e.message)
            })?;
            Some(config)
        }
        (None, true) => {
            vm.payload = payload;
            if vm.payload.kernel.as_os_str().is_empty() {
                return Err(ConfigError::new("--kernel", "VM flags need a kernel"));
            }
            vm.validate()?;
            Some(vm)
        }
        (None, false) => None,
    };
    let incoming = match incoming {
        None => None,
        Some(listen) => {
            validate_migration_url("--incoming", &listen)?;
            let token = match &token_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| {
                        ConfigError::new(
                            "--migration-token-file",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .trim_end()
                    .to_string(),
                None => std::env::var("VMM_MIGRATION_TOKEN").unwrap_or_default(),
            };
            if token.is_empty() {
                return Err(ConfigError::new(
                    "--migration-token-file",
                    "--incoming needs a non-empty token (a file, or VMM_MIGRATION_TOKEN)",
                ));
            }
            Some(ReceiveMigrationRequest { listen, token })
        }
    };
    if vm.is_none() && api_socket.is_none() && incoming.is_none() {
        return Err(ConfigError::new(
            "arguments",
            "give --api-socket, --config, --kernel or --incoming",
        ));
    }
    if api_socket_group.is_some() && api_socket.is_none() {
        return Err(ConfigError::new("--api-socket-group", "needs --api-socket"));
    }
    Ok(Some(Args {
        api_socket,
        api_socket_group,
        vm,
        incoming,
        managed_by,
    }))
}

/// Blocks the termination signals in this thread (and so in every thread
/// started later) and turns them into control events on a thread of their own.
fn forward_signals(sender: std::sync::mpsc::Sender<ControlEvent>) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // SAFETY: set is valid; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut asked = false;
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: set and signal are valid for the call.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    continue;
                }
                if asked {
                    // A second signal while the first is being handled: the
                    // control loop is stuck or too slow; leave now.
                    eprintln!("vmm: signal {signal} again: exiting at once");
                    std::process::exit(ExitStatus::Stopped.code());
                }
                asked = true;
                if sender.send(ControlEvent::Signal(signal)).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

/// Raises the soft limit of open files to the hard one: every API client
/// holds a descriptor, and hundreds of idle ones must not starve the VMM.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
        && limit.rlim_cur < limit.rlim_max
    {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: limit is a valid rlimit; raising the soft limit up to the
        // hard one needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => return usage_error(e),
    };
    let exit = |status: ExitStatus| ExitCode::from(status.code() as u8);

    let mut controller = Controller::new();
    controller.set_managed_by(args.managed_by.clone());
    if let Err(e) = forward_signals(controller.sender()) {
        eprintln!("vmm: cannot set up signal handling: {e}");
        return exit(ExitStatus::Error);
    }
    raise_fd_limit();
    if let Err(e) = vmm::vcpu::register_kick_handler() {
        eprintln!("vmm: cannot install the vCPU kick handler: {e}");
        return exit(ExitStatus::Error);
    }

    let _server = match &args.api_socket {
        Some(path) => {
            let sender = controller.sender();
            let dispatch = move |call| {
                // The control loop outlives the server; a send cannot fail
                // before the process exits.
                let _ = sender.send(ControlEvent::Api(call));
            };
            let options = api::http::ServerOptions {
                socket_group: args.api_socket_group.clone(),
                ..Default::default()
            };
            match api::http::start_server_with(path, options, dispatch) {
                Ok(server) => Some(server),
                Err(e) => {
                    eprintln!("vmm: API socket {}: {e}", path.display());
                    return exit(ExitStatus::Error);
                }
            }
        }
        None => None,
    };

    if let Some(request) = args.incoming {
        // VM flags with --incoming describe this host's side of the guest.
        let local = match args.vm {
            Some(config) => controller.create_only(config),
            None => Ok(()),
        };
        if let Err(e) = local.and_then(|_| controller.receive_migration(request)) {
            eprintln!("vmm: {e}");
            return exit(ExitStatus::Usage);
        }
    } else if let Some(config) = args.vm {
        if let Err(e) = controller.create_and_boot(config) {
            eprintln!("vmm: {e}");
            let status = match e.kind {
                api::request::ApiErrorKind::BadRequest => ExitStatus::Usage,
                _ => ExitStatus::Error,
            };
            return exit(status);
        }
    }

    let status = controller.run();
    if status != ExitStatus::PoweredOff {
        eprintln!("vmm: exiting: {}", status.describe());
    }
    exit(status)
}
