//! `vmm`: one process per guest.
//!
//! `vmm --api-socket PATH` waits for API calls; with `--config FILE` or
//! `--kernel PATH` (and other VM flags) it creates and boots at once. The
//! exit code says how the guest ended (see `vmm --help`).

use std::path::PathBuf;
use std::process::ExitCode;

use api::request::{validate_migration_url, ReceiveMigrationRequest, RestoreRequest};
use config::{
    parse_number, BalloonConfig, ConfigError, CpusConfig, DiskConfig, MemoryConfig, NetConfig,
    PayloadConfig, ResetAction, SerialConfig, VmConfig,
};
use vmm::control::{ControlEvent, Controller};
use vmm::exit::ExitStatus;

const USAGE: &str = "\
usage: vmm [--api-socket PATH] [--config FILE | VM FLAGS]

Runs one VM on /dev/kvm. With --api-socket only, waits for vm.create/vm.boot
on the REST API. With --config, --kernel or --boot, creates and boots the VM at once
(and also serves the API if --api-socket is given).

VM flags (the same fields as the JSON config file and the vm.create body):
  --kernel PATH          Linux bzImage or ELF (vmlinux, PVH entry if present)
  --cmdline STRING       kernel command line
  --initrd PATH          initial ramdisk
  --boot disk[=ID]       boot what the guest's disk boots (default the first
                         --disk): GRUB's default entry, /vmlinuz and
                         /initrd.img, or the newest /boot/vmlinuz-*, with
                         root=UUID=... and the guest's GRUB_CMDLINE_LINUX*;
                         --cmdline is appended
  --cpus N               number of vCPUs (default 1)
  --memory SPEC          size=128M[,backing=anonymous|memfd|hugetlbfs][,mergeable=on]
                         [,thp=on|off]  (default: on for anonymous memory
                         unless a balloon or mergeable is configured)
                         [,overcommit=on]  (allow more than the host's RAM + swap)
  --disk SPEC            path=P[,id=ID][,readonly=on][,direct=on][,serial=S]
                         [,logical_block_size=N][,physical_block_size=N]
                         [,rate_bytes=N][,rate_ops=N]   (repeatable)
  --net SPEC             tap=NAME|fd=N[,bridge=BR][,id=ID][,mac=MAC][,rate_bytes=N]
                         [,rate_ops=N]  (repeatable; bridge: the tap joins BR with
                         its MTU and is brought up)
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
                         the pre-shared token a migration source must prove it
                         knows (or the VMM_MIGRATION_TOKEN environment variable)
  --migration-tls-dir DIR
                         require TLS 1.3 on the incoming migration; DIR holds
                         ca-cert.pem, server-cert.pem and server-key.pem (the
                         source needs a client certificate from the same CA)
  --restore DIR          resume the VM of a snapshot written by vm.snapshot (running,
                         or paused if it was paused); VM flags or --config here give
                         this host's disk paths and taps (checked against the
                         snapshot's); exit 1 without running anything if the
                         snapshot is truncated or corrupt or a disk is locked
  --incoming-timeout SECONDS
                         exit 1 if no source authenticated within this time
                         (default 3600); connections that do not authenticate
                         within 5 s are logged and dropped meanwhile
  --log-file PATH        write the VMM's messages here instead of stderr (appended,
                         created 0640); SIGHUP reopens it (for logrotate)
  --seccomp MODE         on (default) | log | off: system call filters per thread;
                         log lets forbidden calls through and the kernel logs them
                         (default from VMM_SECCOMP if set)
  --user NAME            after opening /dev/kvm, the disks, taps and sockets, run as
                         this user, its group and supplementary groups, with no
                         capabilities (see the README for what the host prepares)
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

Signals: SIGTERM/SIGINT stop the guest (a second one exits at once); SIGHUP
reopens --log-file; SIGUSR1, SIGUSR2, SIGALRM and other stray signals are
logged and ignored.
";

/// What the command line asks for.
struct Args {
    api_socket: Option<PathBuf>,
    api_socket_group: Option<String>,
    vm: Option<VmConfig>,
    incoming: Option<ReceiveMigrationRequest>,
    restore: Option<RestoreRequest>,
    log_file: Option<PathBuf>,
    seccomp: confine::Mode,
    user: Option<confine::user::User>,
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
    let mut restore: Option<PathBuf> = None;
    let mut token_file: Option<PathBuf> = None;
    let mut tls_dir: Option<PathBuf> = None;
    let mut incoming_timeout: Option<u64> = None;
    let mut config_file: Option<PathBuf> = None;
    let mut payload = PayloadConfig::default();
    let mut vm = VmConfig::default();
    let mut vm_flags = false;
    // --boot disk[=ID]: Some(None) for the first disk.
    let mut boot_disk: Option<Option<String>> = None;
    let mut log_file = None;
    let mut seccomp = None;
    let mut user = None;
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
            "--restore" => restore = Some(PathBuf::from(value()?)),
            "--migration-token-file" => token_file = Some(PathBuf::from(value()?)),
            "--migration-tls-dir" => tls_dir = Some(PathBuf::from(value()?)),
            "--incoming-timeout" => {
                let seconds: u64 = parse_number("--incoming-timeout", &value()?)?;
                if seconds == 0 {
                    return Err(ConfigError::new(
                        "--incoming-timeout",
                        "must be at least 1 second",
                    ));
                }
                incoming_timeout = Some(seconds);
            }
            "--config" => config_file = Some(PathBuf::from(value()?)),
            "--log-file" => log_file = Some(PathBuf::from(value()?)),
            "--seccomp" => seccomp = Some(parse_seccomp("--seccomp", &value()?)?),
            "--user" => {
                let name = value()?;
                user = Some(
                    confine::user::User::lookup(&name)
                        .map_err(|e| ConfigError::new("--user", e.to_string()))?,
                )
            }
            "--kernel" => payload.kernel = PathBuf::from(value()?),
            "--cmdline" => payload.cmdline = value()?,
            "--initrd" => payload.initrd = Some(PathBuf::from(value()?)),
            "--boot" => {
                let v = value()?;
                boot_disk = match v.split_once('=') {
                    None if v == "disk" => Some(None),
                    Some(("disk", id)) if !id.is_empty() => Some(Some(id.to_string())),
                    _ => {
                        return Err(ConfigError::new(
                            "--boot",
                            format!("{v:?} is not disk or disk=ID"),
                        ))
                    }
                };
            }
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
                | "--restore"
                | "--migration-token-file"
                | "--migration-tls-dir"
                | "--incoming-timeout"
                | "--log-file"
                | "--seccomp"
                | "--user"
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
            if let Some(id) = boot_disk {
                if vm.disks.is_empty() {
                    return Err(ConfigError::new("--boot", "disk boot needs a --disk"));
                }
                vm.payload.boot_disk = Some(id.unwrap_or_else(|| vm.disk_id(0)));
            } else if vm.payload.kernel.as_os_str().is_empty() {
                return Err(ConfigError::new(
                    "--kernel",
                    "VM flags need a kernel (or --boot disk)",
                ));
            }
            vm.validate()?;
            Some(vm)
        }
        (None, false) => None,
    };
    if incoming.is_none() && (tls_dir.is_some() || incoming_timeout.is_some()) {
        return Err(ConfigError::new(
            if tls_dir.is_some() {
                "--migration-tls-dir"
            } else {
                "--incoming-timeout"
            },
            "only applies with --incoming",
        ));
    }
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
            Some(ReceiveMigrationRequest {
                listen,
                token,
                tls_dir,
                timeout_s: incoming_timeout,
            })
        }
    };
    if restore.is_some() && incoming.is_some() {
        return Err(ConfigError::new(
            "--restore",
            "cannot be combined with --incoming",
        ));
    }
    let restore = restore.map(|source| RestoreRequest { source });
    if vm.is_none() && api_socket.is_none() && incoming.is_none() && restore.is_none() {
        return Err(ConfigError::new(
            "arguments",
            "give --api-socket, --config, --kernel, --boot, --incoming or --restore",
        ));
    }
    if api_socket_group.is_some() && api_socket.is_none() {
        return Err(ConfigError::new("--api-socket-group", "needs --api-socket"));
    }
    let seccomp = match seccomp {
        Some(mode) => mode,
        None => match std::env::var("VMM_SECCOMP") {
            Ok(text) => parse_seccomp("VMM_SECCOMP", &text)?,
            Err(_) => confine::Mode::Kill,
        },
    };
    Ok(Some(Args {
        api_socket,
        api_socket_group,
        vm,
        incoming,
        restore,
        log_file,
        seccomp,
        user,
        managed_by,
    }))
}

fn parse_seccomp(field: &str, text: &str) -> Result<confine::Mode, ConfigError> {
    confine::Mode::parse(text)
        .ok_or_else(|| ConfigError::new(field, format!("{text:?} is not on, log or off")))
}

/// The thread kind `VMM_SECCOMP_SELFTEST` names, if any (a test hook: that
/// thread makes one forbidden system call).
fn seccomp_selftest() -> Result<Option<confine::ThreadKind>, ConfigError> {
    match std::env::var(confine::seccomp::SELFTEST_ENV) {
        Err(_) => Ok(None),
        Ok(name) => confine::ThreadKind::from_name(&name)
            .map(Some)
            .ok_or_else(|| {
                ConfigError::new(
                    confine::seccomp::SELFTEST_ENV,
                    format!("{name:?} is not a thread kind"),
                )
            }),
    }
}

/// The exit status of a VMM whose VM could not start: by whose fault.
fn start_failure(e: &api::request::ApiError) -> ExitStatus {
    match e.kind {
        api::request::ApiErrorKind::BadRequest => ExitStatus::Usage,
        _ => ExitStatus::Error,
    }
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
    let selftest = match seccomp_selftest() {
        Ok(kind) => kind,
        Err(e) => return usage_error(e),
    };
    // First, before any thread starts: every thread inherits the mask.
    if let Err(e) = vmm::signals::block() {
        eprintln!("vmm: cannot set up signal handling: {e}");
        return exit(ExitStatus::Error);
    }
    if let Some(path) = &args.log_file {
        if let Err(e) = vmm::signals::redirect_stderr(path) {
            eprintln!("vmm: --log-file {}: {e}", path.display());
            return exit(ExitStatus::Error);
        }
    }
    if args.user.is_some() {
        // Before any thread starts, so that every thread inherits it.
        if let Err(e) = confine::user::no_new_privileges() {
            eprintln!("vmm: cannot set no-new-privileges: {e}");
            return exit(ExitStatus::Error);
        }
        // VMs created later (vm.create, an incoming migration) need it
        // after the user has changed.
        if let Err(e) = vmm::vm::keep_kvm_open() {
            eprintln!("vmm: {e}");
            return exit(ExitStatus::Error);
        }
        vmm::memory::keep_proc_self_open();
    }
    // glibc loads the name service modules of nsswitch.conf (dlopen,
    // executable mappings) at the first lookup: do it now, before the
    // filters forbid executable mappings, for the migration threads that
    // resolve host names later.
    let _ = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 0));
    if let Err(e) = confine::seccomp::configure(args.seccomp, selftest, args.user.is_some()) {
        eprintln!("vmm: {e}");
        return exit(ExitStatus::Error);
    }

    let mut controller = Controller::new();
    controller.set_managed_by(args.managed_by.clone());
    let sender = controller.sender();
    let stop = move |signal| sender.send(ControlEvent::Signal(signal)).is_ok();
    if let Err(e) = vmm::signals::forward(stop, args.log_file.clone()) {
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
            return exit(start_failure(&e));
        }
    } else if let Some(request) = args.restore {
        // VM flags with --restore describe this host's side of the guest.
        let local = match args.vm {
            Some(config) => controller.create_only(config),
            None => Ok(()),
        };
        if let Err(e) = local.and_then(|_| controller.start_restore(request, None)) {
            eprintln!("vmm: --restore: {e}");
            return exit(start_failure(&e));
        }
    } else if let Some(config) = args.vm {
        if let Err(e) = controller.create_and_boot(config) {
            eprintln!("vmm: {e}");
            return exit(start_failure(&e));
        }
    }
    if let Some(user) = &args.user {
        if let Err(e) = user.become_it() {
            eprintln!("vmm: --user {}: {e}", user.name());
            return exit(ExitStatus::Error);
        }
    }
    confine::apply(confine::ThreadKind::Control);

    let status = controller.run();
    if status != ExitStatus::PoweredOff {
        eprintln!("vmm: exiting: {}", status.describe());
    }
    exit(status)
}
