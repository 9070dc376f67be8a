//! `vmm`: one process per guest.
//!
//! `vmm --api-socket PATH` waits for API calls; with `--config FILE` or
//! `--kernel PATH` (and other VM flags) it creates and boots at once. The
//! exit code says how the guest ended (see `vmm --help`).

use std::path::PathBuf;
use std::process::ExitCode;

use api::request::{validate_migration_url, ReceiveMigrationRequest, RestoreRequest};
use config::{
    parse_duration, BalloonConfig, ConfigError, CpusConfig, DiskConfig, DurationUnit, MemoryConfig,
    NetConfig, PayloadConfig, ResetAction, SerialConfig, VmConfig,
};
use vmm::control::{ControlEvent, Controller};
use vmm::exit::ExitStatus;

/// What `vmm --help` says after the flags.
const AFTER_HELP: &str = "\
Sizes are binary: 512M, 2G, 1Gi, 64KiB (K, M, G, T and Ki, Mi, Gi, Ti are powers
of 1024; a plain number is bytes, or MiB for memory sizes). Durations: 500ms, 30s,
2m, 1h (a plain number keeps the flag's old unit).

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
logged and ignored.";

const VM_FLAGS: &str = "VM flags (the fields of the JSON config file and the vm.create body)";

/// Runs one VM on /dev/kvm. With --api-socket only, waits for vm.create and
/// vm.boot on the REST API. With --config, --kernel or --boot, creates and
/// boots the VM at once (and also serves the API if --api-socket is given).
#[derive(clap::Parser, Debug, Default)]
#[command(
    name = "vmm",
    version,
    about = "One VM on /dev/kvm, driven over a REST API on a Unix socket",
    after_help = AFTER_HELP,
    max_term_width = 100
)]
struct Cli {
    /// Linux bzImage or ELF (vmlinux, PVH entry if present)
    #[arg(long, value_name = "PATH", help_heading = VM_FLAGS)]
    kernel: Option<PathBuf>,
    /// The kernel command line (appended to the guest's own with --boot disk)
    #[arg(long, value_name = "STRING", allow_hyphen_values = true, help_heading = VM_FLAGS)]
    cmdline: Option<String>,
    /// Initial ramdisk
    #[arg(long, value_name = "PATH", help_heading = VM_FLAGS)]
    initrd: Option<PathBuf>,
    /// Boot what the guest's disk boots (default the first --disk): GRUB's
    /// default entry, /vmlinuz and /initrd.img, or the newest
    /// /boot/vmlinuz-*, with root=UUID=... and the guest's GRUB_CMDLINE_LINUX*
    #[arg(long, value_name = "disk[=ID]", help_heading = VM_FLAGS)]
    boot: Option<String>,
    /// The guest's name in vm.info and vmmctl (default: the API socket's
    /// name, web1 for /run/vmm/web1.sock)
    #[arg(long, value_name = "NAME", help_heading = VM_FLAGS)]
    name: Option<String>,
    /// N, or boot=N[,weight=W][,max_percent=P][,affinity=LIST]: W is the
    /// guest's CPU weight (1-10000, 100 the usual share), P caps it at P% of
    /// one host CPU, LIST pins the vCPU threads to host CPUs (0-1,3)
    /// [default: 1]
    #[arg(long, value_name = "N|SPEC", help_heading = VM_FLAGS)]
    cpus: Option<String>,
    /// size=SIZE[,backing=anonymous|memfd|hugetlbfs][,mergeable=on][,thp=on|off][,overcommit=on].
    /// A plain size is MiB. thp defaults to on for anonymous memory without a
    /// balloon or mergeable; overcommit allows more than the host's RAM + swap
    #[arg(long, value_name = "SPEC", help_heading = VM_FLAGS)]
    memory: Option<String>,
    /// path=P[,id=ID][,readonly=on][,direct=on][,serial=S][,logical_block_size=N]
    /// [,physical_block_size=N][,rate_bytes=SIZE][,rate_ops=N] (repeatable)
    #[arg(long, value_name = "SPEC", help_heading = VM_FLAGS)]
    disk: Vec<String>,
    /// tap=NAME|fd=N[,bridge=BR][,id=ID][,mac=MAC][,rate_bytes=SIZE][,rate_ops=N]
    /// (repeatable; bridge: the tap joins BR with its MTU and is brought up)
    #[arg(long, value_name = "SPEC", help_heading = VM_FLAGS)]
    net: Vec<String>,
    /// [target=SIZE][,deflate_on_oom=on][,free_page_reporting=on][,stats_interval=DURATION]
    #[arg(long, value_name = "SPEC", help_heading = VM_FLAGS)]
    balloon: Option<String>,
    /// stdout (default) | off | pty | file=PATH | socket=PATH[,buffer=SIZE][,group=GROUP].
    /// A socket is mode 0600 (0660 for GROUP); its output is kept in a ring
    /// buffer, 1M by default, for every client
    #[arg(long, value_name = "MODE", help_heading = VM_FLAGS)]
    serial: Option<String>,
    /// What a guest reset does [default: exit]
    #[arg(long, value_name = "ACTION", value_parser = ["exit", "reboot"], help_heading = VM_FLAGS)]
    on_reset: Option<String>,

    /// The VM as a JSON file (not combined with VM flags)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve the REST API on this Unix socket (mode 0600); by convention
    /// /run/vmm/NAME.sock, where vmmctl finds the guest by NAME
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Let GROUP use the API: the socket is 0660 and owned by it
    #[arg(long, value_name = "GROUP")]
    api_socket_group: Option<String>,
    /// Wait for a live migration on tcp:HOST:PORT or unix:PATH; the VM's
    /// config comes from the source, or from VM flags or --config here
    /// (checked against the source's; this host's disk paths and taps are used)
    #[arg(long, value_name = "URL")]
    incoming: Option<String>,
    /// The pre-shared token a migration source must prove it knows (or the
    /// VMM_MIGRATION_TOKEN environment variable)
    #[arg(long, value_name = "FILE")]
    migration_token_file: Option<PathBuf>,
    /// Require TLS 1.3 on the incoming migration; DIR holds ca-cert.pem,
    /// server-cert.pem and server-key.pem (the source needs a client
    /// certificate from the same CA)
    #[arg(long, value_name = "DIR")]
    migration_tls_dir: Option<PathBuf>,
    /// Resume the VM of a snapshot written by vm.snapshot (running, or paused
    /// if it was paused); VM flags or --config here give this host's disk
    /// paths and taps (checked against the snapshot's); exit 1 without
    /// running anything if the snapshot is truncated or corrupt or a disk is
    /// locked
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Exit 1 if no source authenticated within this time (default 1h; a
    /// plain number is seconds); connections that do not authenticate within
    /// 5 s are logged and dropped meanwhile
    #[arg(long, value_name = "DURATION")]
    incoming_timeout: Option<String>,
    /// Write the VMM's messages here instead of stderr (appended, created
    /// 0640); SIGHUP reopens it (for logrotate)
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// The least important messages logged
    #[arg(long, value_name = "LEVEL", default_value = "info",
          value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// System call filters per thread: on (default), log (forbidden calls go
    /// through and the kernel logs them) or off (default from VMM_SECCOMP if set)
    #[arg(long, value_name = "MODE")]
    seccomp: Option<String>,
    /// After opening /dev/kvm, the disks, taps and sockets, run as this user,
    /// its group and supplementary groups, with no capabilities (see the
    /// README for what the host prepares)
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Where the cgroups of guests with cpus.weight or cpus.max_percent go:
    /// PATH/vm-NAME, PATH relative to the cpu hierarchy's root
    #[arg(long, value_name = "PATH", default_value = vmm::cgroup::DEFAULT_PARENT)]
    cgroup_parent: String,
    /// A cluster manager (e.g. pacemaker) runs this guest: vm.send-migration
    /// is refused unless forced, so that a hand-run migration cannot leave
    /// the manager believing the guest stopped here (it would start a second
    /// copy)
    #[arg(long, value_name = "MANAGER")]
    managed_by: Option<String>,
    /// Write man pages and shell completions into DIR (for packaging)
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
}

impl Cli {
    /// Whether any flag describing the VM itself was given.
    fn has_vm_flags(&self) -> bool {
        self.kernel.is_some()
            || self.cmdline.is_some()
            || self.initrd.is_some()
            || self.boot.is_some()
            || self.name.is_some()
            || self.cpus.is_some()
            || self.memory.is_some()
            || !self.disk.is_empty()
            || !self.net.is_empty()
            || self.balloon.is_some()
            || self.serial.is_some()
            || self.on_reset.is_some()
    }
}

/// What the command line asks for.
struct Args {
    api_socket: Option<PathBuf>,
    api_socket_group: Option<String>,
    vm: Option<VmConfig>,
    incoming: Option<ReceiveMigrationRequest>,
    restore: Option<RestoreRequest>,
    managed_by: Option<String>,
    cgroup_parent: String,
    log_file: Option<PathBuf>,
    log_level: log::LevelFilter,
    seccomp: confine::Mode,
    user: Option<confine::user::User>,
}

fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: {e}");
    eprintln!("Try 'vmm --help'.");
    ExitCode::from(ExitStatus::Usage.code() as u8)
}

/// The VM the flags describe (None without VM flags).
fn vm_from_flags(cli: &Cli) -> Result<Option<VmConfig>, ConfigError> {
    if !cli.has_vm_flags() {
        return Ok(None);
    }
    let mut vm = VmConfig {
        name: cli.name.clone(),
        ..VmConfig::default()
    };
    vm.payload = PayloadConfig {
        kernel: cli.kernel.clone().unwrap_or_default(),
        cmdline: cli.cmdline.clone().unwrap_or_default(),
        initrd: cli.initrd.clone(),
        ..PayloadConfig::default()
    };
    if let Some(cpus) = &cli.cpus {
        vm.cpus = CpusConfig::parse(cpus)?;
    }
    if let Some(memory) = &cli.memory {
        vm.memory = MemoryConfig::parse(memory)?;
    }
    for disk in &cli.disk {
        vm.disks.push(DiskConfig::parse(disk)?);
    }
    for net in &cli.net {
        vm.nets.push(NetConfig::parse(net)?);
    }
    if let Some(balloon) = &cli.balloon {
        vm.balloon = Some(BalloonConfig::parse(balloon)?);
    }
    if let Some(serial) = &cli.serial {
        vm.serial = SerialConfig::parse(serial)?;
    }
    if let Some(action) = &cli.on_reset {
        vm.on_reset = match action.as_str() {
            "reboot" => ResetAction::Reboot,
            _ => ResetAction::Exit,
        };
    }
    // --boot disk[=ID]: the first disk without an id.
    let boot_disk = match cli.boot.as_deref() {
        None => None,
        Some("disk") => Some(None),
        Some(v) => match v.split_once('=') {
            Some(("disk", id)) if !id.is_empty() => Some(Some(id.to_string())),
            _ => {
                return Err(ConfigError::new(
                    "--boot",
                    format!("{v:?} is not disk or disk=ID"),
                ))
            }
        },
    };
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
    Ok(Some(vm))
}

/// Checks and completes what clap parsed: None for --generate-docs.
fn parse_args(cli: Cli) -> Result<Option<Args>, ConfigError> {
    if let Some(dir) = &cli.generate_docs {
        let command = <Cli as clap::CommandFactory>::command();
        api::cli_docs::generate(command, dir)
            .map_err(|e| ConfigError::new("--generate-docs", format!("{}: {e}", dir.display())))?;
        return Ok(None);
    }
    let vm = match (&cli.config, cli.has_vm_flags()) {
        (Some(_), true) => {
            return Err(ConfigError::new(
                "--config",
                "cannot be combined with VM flags; put everything in the file",
            ))
        }
        (Some(path), false) => {
            let text = std::fs::read(path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            let config = VmConfig::from_json(&text).map_err(|e| {
                ConfigError::new(format!("{}: {}", path.display(), e.field), e.message)
            })?;
            Some(config)
        }
        (None, _) => vm_from_flags(&cli)?,
    };
    let incoming_timeout = match &cli.incoming_timeout {
        None => None,
        Some(text) => {
            let timeout = parse_duration("--incoming-timeout", text, DurationUnit::Seconds)?;
            if timeout.as_secs() == 0 || timeout.subsec_millis() != 0 {
                return Err(ConfigError::new(
                    "--incoming-timeout",
                    "must be whole seconds, at least 1",
                ));
            }
            Some(timeout.as_secs())
        }
    };
    let tls_dir = cli.migration_tls_dir;
    if cli.incoming.is_none() && (tls_dir.is_some() || incoming_timeout.is_some()) {
        return Err(ConfigError::new(
            if tls_dir.is_some() {
                "--migration-tls-dir"
            } else {
                "--incoming-timeout"
            },
            "only applies with --incoming",
        ));
    }
    let incoming = match cli.incoming {
        None => None,
        Some(listen) => {
            validate_migration_url("--incoming", &listen)?;
            let token = match &cli.migration_token_file {
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
    if cli.restore.is_some() && incoming.is_some() {
        return Err(ConfigError::new(
            "--restore",
            "cannot be combined with --incoming",
        ));
    }
    let restore = cli.restore.map(|source| RestoreRequest { source });
    if vm.is_none() && cli.api_socket.is_none() && incoming.is_none() && restore.is_none() {
        return Err(ConfigError::new(
            "arguments",
            "give --api-socket, --config, --kernel, --boot, --incoming or --restore",
        ));
    }
    if let Some(manager) = &cli.managed_by {
        if manager.is_empty() || manager.chars().any(|c| c.is_control()) {
            return Err(ConfigError::new(
                "--managed-by",
                "needs the manager's name (e.g. pacemaker)",
            ));
        }
    }
    vmm::cgroup::validate_parent(&cli.cgroup_parent)
        .map_err(|e| ConfigError::new("--cgroup-parent", e.to_string()))?;
    if cli.api_socket_group.is_some() && cli.api_socket.is_none() {
        return Err(ConfigError::new("--api-socket-group", "needs --api-socket"));
    }
    let seccomp = match &cli.seccomp {
        Some(mode) => parse_seccomp("--seccomp", mode)?,
        None => match std::env::var("VMM_SECCOMP") {
            Ok(text) => parse_seccomp("VMM_SECCOMP", &text)?,
            Err(_) => confine::Mode::Kill,
        },
    };
    let user = match &cli.user {
        None => None,
        Some(name) => Some(
            confine::user::User::lookup(name)
                .map_err(|e| ConfigError::new("--user", e.to_string()))?,
        ),
    };
    let log_level = vmm::logger::parse_level(&cli.log_level)
        .ok_or_else(|| ConfigError::new("--log-level", "is not a level"))?;
    Ok(Some(Args {
        api_socket: cli.api_socket,
        api_socket_group: cli.api_socket_group,
        vm,
        incoming,
        restore,
        managed_by: cli.managed_by,
        cgroup_parent: cli.cgroup_parent,
        log_file: cli.log_file,
        log_level,
        seccomp,
        user,
    }))
}

/// The name a guest has by default: its API socket's (`web1` for
/// `/run/vmm/web1.sock`), if that is a valid name.
fn name_from_socket(path: &std::path::Path) -> Option<String> {
    let stem = path.file_name()?.to_str()?;
    let name = stem.strip_suffix(".sock").unwrap_or(stem);
    config::validate_name(name).ok()?;
    Some(name.to_string())
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
    // clap exits 2 for a usage error it finds (unknown flag, missing
    // value), naming the flag, and 0 for --help and --version.
    let cli = <Cli as clap::Parser>::parse();
    let args = match parse_args(cli) {
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
    // After the redirection: the format follows where stderr goes.
    vmm::logger::init(args.log_level);
    if args.user.is_some() {
        // Before any thread starts, so that every thread inherits it.
        if let Err(e) = confine::user::no_new_privileges() {
            log::error!("cannot set no-new-privileges: {e}");
            return exit(ExitStatus::Error);
        }
        // VMs created later (vm.create, an incoming migration) need it
        // after the user has changed.
        if let Err(e) = vmm::vm::keep_kvm_open() {
            log::error!("{e}");
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
        log::error!("{e}");
        return exit(ExitStatus::Error);
    }

    let mut controller = Controller::new();
    controller.set_default_name(args.api_socket.as_deref().and_then(name_from_socket));
    controller.set_managed_by(args.managed_by.clone());
    controller.set_cgroup_parent(args.cgroup_parent.clone());
    let sender = controller.sender();
    let stop = move |signal| sender.send(ControlEvent::Signal(signal)).is_ok();
    if let Err(e) = vmm::signals::forward(stop, args.log_file.clone()) {
        log::error!("cannot set up signal handling: {e}");
        return exit(ExitStatus::Error);
    }
    raise_fd_limit();
    if let Err(e) = vmm::vcpu::register_kick_handler() {
        log::error!("cannot install the vCPU kick handler: {e}");
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
                    log::error!("API socket {}: {e}", path.display());
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
            log::error!("{e}");
            return exit(start_failure(&e));
        }
    } else if let Some(request) = args.restore {
        // VM flags with --restore describe this host's side of the guest.
        let local = match args.vm {
            Some(config) => controller.create_only(config),
            None => Ok(()),
        };
        if let Err(e) = local.and_then(|_| controller.start_restore(request, None)) {
            log::error!("--restore: {e}");
            return exit(start_failure(&e));
        }
    } else if let Some(config) = args.vm {
        if let Err(e) = controller.create_and_boot(config) {
            log::error!("{e}");
            return exit(start_failure(&e));
        }
    }
    if let Some(user) = &args.user {
        if let Err(e) = user.become_it() {
            log::error!("--user {}: {e}", user.name());
            return exit(ExitStatus::Error);
        }
    }
    confine::apply(confine::ThreadKind::Control);

    let status = controller.run();
    if status != ExitStatus::PoweredOff {
        let level = match status {
            ExitStatus::Crashed | ExitStatus::Error => log::Level::Error,
            _ => log::Level::Info,
        };
        log::log!(level, "exiting: {}", status.describe());
    }
    exit(status)
}
