//! The VMM's control loop: the one place where API requests, guest power
//! events, vCPU stops and signals change the VM's state. Requests that make
//! no sense in the current state are refused here.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::http::ApiCall;
use api::request::{
    ActionReply, ApiError, ApiErrorKind, ApiRequest, ApiResponse, ApiResult, BalloonStatistics,
    BalloonUpdate, MemoryInfo, MigrationPhase, MigrationRole, MigrationStatus, PingInfo,
    ReceiveMigrationRequest, RestoreRequest, SendMigrationRequest, ShutdownMode, ShutdownRequest,
    SnapshotRequest, VmInfo, VmState,
};
use config::{ResetAction, VmConfig};
use devices::legacy::PowerEvent;
use devices::virtio::balloon::BalloonReport;

use crate::cgroup::{CgroupError, CpuCgroup};
use crate::console::Console;
use crate::exit::ExitStatus;
use crate::memory;
use crate::migrate::{
    ControlHandle, MigrationCall, MigrationError, MigrationReply, MigrationReplySender,
    MigrationShared,
};
use crate::snapshot::VmSnapshot;
use crate::vcpu::VcpuStop;
use crate::vm::{Vm, VmError, VmEvent, VmEventSink, VmStart};

/// Everything the control loop reacts to.
pub enum ControlEvent {
    Api(ApiCall),
    Vm(VmEvent),
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// A migration thread needs the VM.
    Migration(MigrationCall, MigrationReplySender),
}

/// Where a migration stands, as the control loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MigrationState {
    /// No migration thread runs.
    Idle,
    /// A migration thread runs.
    Running(MigrationRole),
    /// The source paused the VM and its devices for the switch-over;
    /// `resume` says whether the guest ran before and runs again if the
    /// migration fails. Nothing may change the VM until the outcome is known.
    SwitchingOver { resume: bool },
    /// The source sent `Complete` and never heard back: the guest may run
    /// on the target. Paused with its disks released until a forced resume
    /// (or the VMM's end).
    Undecided,
    /// A snapshot is being written: the VM and its devices stay paused.
    Snapshotting,
}

/// Answers an API call later (a snapshot or restore answers when done).
type Reply = Box<dyn FnOnce(ApiResult) + Send>;

/// An API call the control loop answers when a thread has finished.
enum PendingJob {
    /// `vm.snapshot`: the files being written.
    Snapshot {
        files: crate::migrate::file::SnapshotFiles,
        reply: Reply,
        started: Instant,
    },
    /// `vm.restore` (reply) or `--restore` (none: a failure ends the VMM).
    Restore {
        source: std::path::PathBuf,
        reply: Option<Reply>,
    },
}

/// How long a migrated source keeps answering the API, so clients can read
/// the final migration status.
const MIGRATED_GRACE: Duration = Duration::from_millis(1500);

pub struct Controller {
    state: VmState,
    config: Option<VmConfig>,
    console: Option<Console>,
    vm: Option<Vm>,
    events: Receiver<ControlEvent>,
    sender: Sender<ControlEvent>,
    /// When the VMM exits on its own, with which status and why: a graceful
    /// shutdown that timed out, or the grace period after a migration.
    deadline: Option<(Instant, ExitStatus, &'static str)>,
    migration: Arc<MigrationShared>,
    migration_state: MigrationState,
    /// Set when the loop should end with this status.
    exit: Option<ExitStatus>,
    /// The cluster manager that runs this guest (`--managed-by`), if any.
    managed_by: Option<String>,
    /// A snapshot or restore under way, and whom to tell.
    pending: Option<PendingJob>,
    /// The guest's name when its config has none (the API socket's).
    default_name: Option<String>,
    /// When the guest last booted here, or arrived by a migration.
    booted_at: Option<Instant>,
    /// The VMM's cgroup (`cpus.weight`, `cpus.max_percent`), from the first
    /// VM that asked for one until the VMM exits.
    cgroup: Option<CpuCgroup>,
    /// Where that cgroup goes (`--cgroup-parent`).
    cgroup_parent: String,
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller {
    pub fn new() -> Controller {
        let (sender, events) = mpsc::channel();
        Controller {
            state: VmState::NotCreated,
            config: None,
            console: None,
            vm: None,
            events,
            sender,
            deadline: None,
            migration: Arc::new(MigrationShared::default()),
            migration_state: MigrationState::Idle,
            exit: None,
            managed_by: None,
            pending: None,
            default_name: None,
            booted_at: None,
            cgroup: None,
            cgroup_parent: crate::cgroup::DEFAULT_PARENT.to_string(),
        }
    }

    /// Where the VMM's cgroup goes, relative to the cpu hierarchy's root.
    pub fn set_cgroup_parent(&mut self, parent: String) {
        self.cgroup_parent = parent;
    }

    /// Gives the VMM the CPU share `config` asks for: enters its cgroup the
    /// first time, or gives the one it is in the new settings (a default
    /// weight and no cap for a VM that sets neither). Called when a VM is
    /// defined, before it runs: with `--user`, that is while the VMM is
    /// still root for a VM given on the command line.
    fn join_cgroup(&mut self, config: &VmConfig) -> Result<(), CgroupError> {
        match &self.cgroup {
            Some(cgroup) => cgroup.apply(&config.cpus),
            None if config.cpus.wants_cgroup() => {
                let name = config
                    .name
                    .clone()
                    .or_else(|| self.default_name.clone())
                    .unwrap_or_else(|| format!("pid-{}", std::process::id()));
                self.cgroup = Some(CpuCgroup::enter_own(
                    &self.cgroup_parent,
                    &name,
                    &config.cpus,
                )?);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Marks the guest as run by a cluster manager: it then refuses a
    /// migration that is not forced (the manager's agent forces its own).
    pub fn set_managed_by(&mut self, manager: Option<String>) {
        self.managed_by = manager;
    }

    /// The name `vm.info` reports for a VM whose config has none.
    pub fn set_default_name(&mut self, name: Option<String>) {
        self.default_name = name;
    }

    /// The guest's name: its config's, else the default.
    fn name(&self) -> Option<String> {
        self.config
            .as_ref()
            .and_then(|c| c.name.clone())
            .or_else(|| self.default_name.clone())
    }

    /// Where other threads send events.
    pub fn sender(&self) -> Sender<ControlEvent> {
        self.sender.clone()
    }

    /// How a migration thread reaches this loop.
    fn control_handle(&self) -> ControlHandle {
        let sender = self.sender.clone();
        Arc::new(move |call, reply| sender.send(ControlEvent::Migration(call, reply)).is_ok())
    }

    /// `vm.create` without booting (the local config of a migration target).
    pub fn create_only(&mut self, config: VmConfig) -> Result<(), ApiError> {
        self.create(config)
    }

    /// `vm.create` and `vm.boot` in one step, for a VM given on the command line.
    pub fn create_and_boot(&mut self, config: VmConfig) -> Result<(), ApiError> {
        self.create(config)?;
        self.boot()
    }

    /// Runs until the VMM should exit; returns how.
    pub fn run(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = self.exit {
                self.teardown();
                return status;
            }
            let event = match self.deadline {
                Some((deadline, status, why)) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match self.events.recv_timeout(wait) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => {
                            if !why.is_empty() {
                                log::warn!("{why}");
                            }
                            self.deadline = None;
                            self.exit = Some(status);
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return ExitStatus::Error,
                    }
                }
                None => match self.events.recv() {
                    Ok(event) => event,
                    Err(_) => return ExitStatus::Error,
                },
            };
            match event {
                ControlEvent::Api(call) => {
                    let reply = call.reply;
                    // The client may have gone; nothing to do then.
                    let reply: Reply = Box::new(move |result| {
                        let _ = reply.send(result);
                    });
                    match call.request {
                        // Answered when their thread is done.
                        ApiRequest::VmSnapshot(request) => self.start_snapshot(request, reply),
                        ApiRequest::VmRestore(request) => {
                            // A refusal is answered already.
                            let _ = self.start_restore(request, Some(reply));
                        }
                        request => {
                            let endpoint = request.endpoint();
                            log::debug!("api: {endpoint}");
                            let result = self.handle(request);
                            match &result {
                                // What an action changed is worth a line at info.
                                Ok(ApiResponse::Action(done)) if done.changed => {
                                    log::info!("{endpoint}: {}", done.message)
                                }
                                Err(e) => log::debug!("api: {endpoint}: refused: {e}"),
                                _ => {}
                            }
                            reply(result)
                        }
                    }
                }
                ControlEvent::Vm(event) => self.handle_vm_event(event),
                ControlEvent::Migration(call, reply) => {
                    let result = self.handle_migration(call);
                    let _ = reply.send(result);
                }
                ControlEvent::Signal(signal) => {
                    log::info!("{}: stopping", crate::signals::name(signal));
                    self.exit = Some(self.exit_by_request());
                }
            }
        }
    }

    /// How the VMM ends when asked to (vmm.shutdown, a signal): a guest that
    /// ran is stopped, one that moved away stays "migrated".
    fn exit_by_request(&self) -> ExitStatus {
        if self.migration_state == MigrationState::Running(MigrationRole::Receive) {
            // A target stopped before the guest ran here: no guest ended,
            // the migration failed.
            if matches!(self.pending, Some(PendingJob::Restore { .. })) {
                log::warn!("stopped during a restore: no guest ran");
            } else {
                log::warn!("stopped while waiting for an incoming migration: no guest ran");
            }
            return ExitStatus::Error;
        }
        match (self.state, &self.vm) {
            (VmState::Migrated, _) => ExitStatus::Migrated,
            (VmState::MigrationUndecided, _) => {
                log::warn!(
                    "stopping with the migration undecided: the guest may run on the target"
                );
                ExitStatus::Stopped
            }
            (_, Some(_)) => ExitStatus::Stopped,
            (_, None) => ExitStatus::PoweredOff,
        }
    }

    /// Refuses a request that would change the VM while a switch-over
    /// decides where it runs (409 with the reason).
    fn refuse_during_switch_over(&self, request: &ApiRequest) -> Result<(), ApiError> {
        let changes_vm = match request {
            ApiRequest::VmCreate(_)
            | ApiRequest::VmBoot
            | ApiRequest::VmPause
            | ApiRequest::VmShutdown(_)
            | ApiRequest::VmSendMigration(_)
            | ApiRequest::VmReceiveMigration(_)
            | ApiRequest::VmBalloon(_)
            | ApiRequest::VmSnapshot(_)
            | ApiRequest::VmRestore(_)
            | ApiRequest::VmReboot
            | ApiRequest::VmPowerButton
            | ApiRequest::VmDelete => true,
            // The one way out of an undecided outcome.
            ApiRequest::VmResume(r) => {
                !(r.force && self.migration_state == MigrationState::Undecided)
            }
            _ => false,
        };
        if !changes_vm {
            return Ok(());
        }
        match self.migration_state {
            MigrationState::SwitchingOver { .. } => Err(ApiError::new(
                ApiErrorKind::WrongState,
                "refused: a migration switch-over is under way; the VM stays paused until \
                 the target answers",
            )),
            MigrationState::Undecided => Err(ApiError::new(
                ApiErrorKind::WrongState,
                "refused: the migration outcome is undecided (the target got Complete but \
                 never confirmed it runs the guest); check the target, then resume with \
                 force only if the guest does not run there",
            )),
            MigrationState::Snapshotting => Err(ApiError::new(
                ApiErrorKind::WrongState,
                "refused: a snapshot is being written; the VM stays paused until it is done",
            )),
            _ => Ok(()),
        }
    }

    fn handle(&mut self, request: ApiRequest) -> ApiResult {
        self.refuse_during_switch_over(&request)?;
        match request {
            ApiRequest::VmmPing => Ok(ApiResponse::Ping(PingInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                name: self.name(),
                state: self.state,
            })),
            ApiRequest::VmmShutdown => {
                self.exit = Some(self.exit_by_request());
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmCreate(config) => self.create(*config).map(|_| ApiResponse::Empty),
            ApiRequest::VmBoot => {
                if matches!(self.state, VmState::Running | VmState::Paused) {
                    return self.already(format!("already booted ({})", self.state));
                }
                self.boot()?;
                self.action("booted")
            }
            ApiRequest::VmPause => {
                if self.state == VmState::Paused {
                    return self.already("already paused");
                }
                self.expect_state("pause", &[VmState::Running])?;
                self.vm()?.pause();
                self.state = VmState::Paused;
                self.action("paused")
            }
            ApiRequest::VmResume(_) if self.state == VmState::MigrationUndecided => {
                self.resume_undecided()
            }
            ApiRequest::VmResume(_) => {
                if self.state == VmState::Running {
                    return self.already("already running");
                }
                self.expect_state("resume", &[VmState::Paused])?;
                self.vm()?.resume();
                self.state = VmState::Running;
                self.action("resumed")
            }
            ApiRequest::VmShutdown(request) => self.shutdown(request),
            ApiRequest::VmReboot => self.api_reboot(),
            ApiRequest::VmPowerButton => {
                if self.state == VmState::Paused {
                    return Err(ApiError::new(
                        ApiErrorKind::WrongState,
                        "cannot press the power button: the VM is paused (resume it first)",
                    ));
                }
                self.expect_state(
                    "press the power button",
                    &[VmState::Running, VmState::ShuttingDown],
                )?;
                self.vm()?.press_power_button().map_err(|e| {
                    ApiError::internal(format!("cannot press the ACPI power button: {e}"))
                })?;
                self.action("the ACPI power button was pressed")
            }
            ApiRequest::VmDelete => self.delete(),
            ApiRequest::VmInfo => {
                let config = self
                    .config
                    .clone()
                    .ok_or_else(|| ApiError::wrong_state("report VM info", self.state))?;
                let memory = self.vm.as_ref().map(|vm| {
                    let ksm = memory::KsmProcessStats::read();
                    let balloon = vm.device_manager().balloon();
                    MemoryInfo {
                        guest_bytes: memory::total_size(vm.memory()),
                        rss_bytes: process_rss_bytes(),
                        pss_bytes: process_pss_bytes(),
                        ksm_merging_pages: ksm.merging_pages,
                        ksm_rmap_items: ksm.rmap_items,
                        ksm_process_profit: ksm.process_profit,
                        balloon_target_bytes: balloon.map(|b| b.target_bytes()),
                        balloon_actual_bytes: balloon.map(|b| b.actual_bytes()),
                    }
                });
                Ok(ApiResponse::Info(Box::new(VmInfo {
                    name: self.name(),
                    state: self.state,
                    pid: std::process::id(),
                    uptime_ms: self
                        .booted_at
                        .filter(|_| self.vm.is_some())
                        .map(|at| at.elapsed().as_millis() as u64),
                    cpu_time_ms: process_cpu_time_ms(),
                    config,
                    serial_pty: self
                        .console
                        .as_ref()
                        .and_then(|c| c.pty_path().map(|p| p.to_path_buf())),
                    memory,
                    cgroup: self.cgroup.as_ref().map(|c| c.dir().to_path_buf()),
                })))
            }
            ApiRequest::VmCounters => {
                let vm = self
                    .vm
                    .as_ref()
                    .ok_or_else(|| ApiError::wrong_state("report counters", self.state))?;
                Ok(ApiResponse::Counters(vm.counters()))
            }
            ApiRequest::VmSendMigration(request) => self.send_migration(request),
            ApiRequest::VmReceiveMigration(request) => {
                self.receive_migration(request).map(|_| ApiResponse::Empty)
            }
            ApiRequest::VmMigrationStatus => Ok(ApiResponse::MigrationStatus(Box::new(
                self.migration.status(),
            ))),
            ApiRequest::VmMigrationCancel => {
                let sending = matches!(
                    self.migration_state,
                    MigrationState::Running(MigrationRole::Send)
                        | MigrationState::SwitchingOver { .. }
                );
                if !sending || self.migration.status().phase == MigrationPhase::Completed {
                    return Err(ApiError::new(
                        ApiErrorKind::WrongState,
                        "cannot cancel: no outgoing migration is running",
                    ));
                }
                // Cuts the connection too, unless Complete already went out.
                self.migration.cancel();
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmMigrationParameters(parameters) => {
                if self.migration_state == MigrationState::Idle {
                    return Err(ApiError::new(
                        ApiErrorKind::WrongState,
                        "cannot change migration parameters: no migration is running",
                    ));
                }
                *self
                    .migration
                    .parameters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = parameters;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmBalloon(update) => self.set_balloon(update),
            ApiRequest::VmBalloonStatistics => self.balloon_statistics(),
            // `run` starts these and answers when they are done.
            ApiRequest::VmSnapshot(_) | ApiRequest::VmRestore(_) => Err(ApiError::internal(
                "snapshots and restores are answered when done",
            )),
        }
    }

    /// `vm.snapshot`: pauses the VM (it stays paused), takes its state,
    /// flushes the disks and writes everything on a thread; the reply goes
    /// out when the file is complete.
    fn start_snapshot(&mut self, request: SnapshotRequest, reply: Reply) {
        match self.begin_snapshot(request) {
            Ok((files, started)) => {
                self.pending = Some(PendingJob::Snapshot {
                    files,
                    reply,
                    started,
                })
            }
            Err(e) => reply(Err(e)),
        }
    }

    fn begin_snapshot(
        &mut self,
        request: SnapshotRequest,
    ) -> Result<(crate::migrate::file::SnapshotFiles, Instant), ApiError> {
        self.refuse_during_switch_over(&ApiRequest::VmSnapshot(request.clone()))?;
        self.expect_state("snapshot", &[VmState::Running, VmState::Paused])?;
        if self.migration_state != MigrationState::Idle {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                "cannot snapshot: a migration is running",
            ));
        }
        let started = Instant::now();
        let (files, file) = crate::migrate::file::prepare(&request.destination)
            .map_err(|e| ApiError::of_class(e.class(), format!("destination: {e}")))?;
        let running = self.state == VmState::Running;
        let vm = self
            .vm
            .as_mut()
            .ok_or_else(|| ApiError::internal("no VM is built"))?;
        vm.pause();
        self.state = VmState::Paused;
        // Devices pause with the state taken: nothing writes guest memory
        // from here until they resume.
        let state = vm
            .snapshot()
            .and_then(|s| s.encode())
            .map_err(|e| e.to_string())
            .and_then(|state| {
                vm.device_manager()
                    .sync()
                    .map(|_| state)
                    .map_err(|e| e.to_string())
            });
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                vm.device_manager().resume();
                files.discard();
                return Err(ApiError::internal(format!("cannot snapshot: {e}")));
            }
        };
        let job = crate::migrate::send::SnapshotJob {
            config: self
                .config
                .clone()
                .ok_or_else(|| ApiError::internal("no VM config"))?,
            memory: vm.memory().clone(),
            shared: self.migration.clone(),
            balloon: vm.device_manager().balloon().cloned(),
            state,
            running,
        };
        self.migration.update(|s| {
            *s = MigrationStatus {
                phase: MigrationPhase::Active,
                role: Some(MigrationRole::Send),
                total_bytes: memory::total_size(&job.memory),
                ..Default::default()
            }
        });
        let control = self.control_handle();
        let spawned = crate::seccomp::spawn(
            crate::seccomp::ThreadKind::MigrationSend,
            std::thread::Builder::new().name("snapshot".into()),
            move || {
                let mut stream = crate::migrate::Stream::file(file);
                let result = crate::migrate::send::write_snapshot(&mut stream, job).and_then(|n| {
                    if let Some(file) = stream.file_ref() {
                        file.sync_data()?;
                    }
                    Ok(n)
                });
                let _ = crate::migrate::call(&control, MigrationCall::SnapshotDone(result));
            },
        );
        if let Err(e) = spawned {
            if let Some(vm) = &self.vm {
                vm.device_manager().resume();
            }
            files.discard();
            return Err(ApiError::internal(format!(
                "cannot start the snapshot thread: {e}"
            )));
        }
        self.migration_state = MigrationState::Snapshotting;
        Ok((files, started))
    }

    /// `vm.restore` or `--restore`: reads the snapshot on a thread, as an
    /// incoming migration; the reply (if any) goes out when the guest runs
    /// or the restore failed. Without a reply a failure ends the VMM (1).
    pub fn start_restore(
        &mut self,
        request: RestoreRequest,
        reply: Option<Reply>,
    ) -> Result<(), ApiError> {
        match self.begin_restore(&request) {
            Ok(()) => {
                // The thread's first call waits in the queue until this returns.
                self.pending = Some(PendingJob::Restore {
                    source: request.source,
                    reply,
                });
                Ok(())
            }
            Err(e) => {
                if let Some(reply) = reply {
                    reply(Err(e.clone()));
                }
                Err(e)
            }
        }
    }

    fn begin_restore(&mut self, request: &RestoreRequest) -> Result<(), ApiError> {
        self.refuse_during_switch_over(&ApiRequest::VmRestore(request.clone()))?;
        self.expect_state(
            "restore a snapshot",
            &[VmState::NotCreated, VmState::Created],
        )?;
        if self.migration_state != MigrationState::Idle {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                "cannot restore: a migration is under way",
            ));
        }
        let file = crate::migrate::file::open(&request.source)
            .map_err(|e| ApiError::of_class(e.class(), format!("source: {e}")))?;
        let shared = self.migration.clone();
        shared.update(|s| *s = MigrationStatus::default());
        let control = self.control_handle();
        crate::seccomp::spawn(
            crate::seccomp::ThreadKind::MigrationReceive,
            std::thread::Builder::new().name("restore".into()),
            move || {
                crate::migrate::receive::restore(
                    crate::migrate::Stream::file(file),
                    shared,
                    control,
                )
            },
        )
        .map_err(|e| ApiError::internal(format!("cannot start the restore thread: {e}")))?;
        self.migration_state = MigrationState::Running(MigrationRole::Receive);
        Ok(())
    }

    /// `vm.resume` with force after an undecided migration: takes every
    /// disk lock back first (409 naming the disk and its holder if one is
    /// taken, e.g. by the target running the guest), then runs the guest.
    fn resume_undecided(&mut self) -> ApiResult {
        let vm = self.vm()?;
        if let Err(e) = vm.device_manager().migration_acquire() {
            // Put back what was taken: the guest stays undecided.
            let _ = vm.device_manager().migration_release();
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                format!("cannot resume: a disk of the guest cannot be taken back: {e}"),
            ));
        }
        vm.device_manager().resume();
        vm.resume();
        log::warn!("the guest was resumed by force after an undecided migration");
        self.migration_state = MigrationState::Idle;
        self.state = VmState::Running;
        self.action("resumed by force after an undecided migration")
    }

    /// `vm.balloon`: a new target for the running balloon, or for the one
    /// a created VM will boot with. It also goes into the VM config, so a
    /// reboot keeps it.
    fn set_balloon(&mut self, update: BalloonUpdate) -> ApiResult {
        self.expect_state(
            "set the balloon target",
            &[
                VmState::Created,
                VmState::Running,
                VmState::Paused,
                VmState::ShuttingDown,
            ],
        )?;
        let config = self
            .config
            .as_mut()
            .ok_or_else(|| ApiError::internal("no VM config"))?;
        let size_mib = config.memory.size_mib;
        let balloon = config.balloon.as_mut().ok_or_else(no_balloon)?;
        if update.target_mib > size_mib {
            return Err(ApiError::bad_request(format!(
                "target_mib: must be at most the guest's memory, {size_mib} MiB (got {})",
                update.target_mib
            )));
        }
        if let Some(vm) = &self.vm {
            let handle = vm.device_manager().balloon().ok_or_else(no_balloon)?;
            handle
                .set_target_bytes(update.target_mib << 20)
                .map_err(|e| ApiError::bad_request(format!("target_mib: {e}")))?;
        }
        balloon.target_mib = update.target_mib;
        Ok(ApiResponse::Empty)
    }

    /// `vm.balloon-statistics`.
    fn balloon_statistics(&self) -> ApiResult {
        let vm = self
            .vm
            .as_ref()
            .ok_or_else(|| ApiError::wrong_state("report balloon statistics", self.state))?;
        let handle = vm.device_manager().balloon().ok_or_else(no_balloon)?;
        Ok(ApiResponse::BalloonStatistics(Box::new(
            balloon_statistics_reply(&handle.report()),
        )))
    }

    fn expect_state(&self, what: &str, allowed: &[VmState]) -> Result<(), ApiError> {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(ApiError::wrong_state(what, self.state))
        }
    }

    fn vm(&self) -> Result<&Vm, ApiError> {
        self.vm
            .as_ref()
            .ok_or_else(|| ApiError::internal("no VM is built"))
    }

    fn create(&mut self, mut config: VmConfig) -> Result<(), ApiError> {
        self.expect_state("create a VM", &[VmState::NotCreated])?;
        config.validate()?;
        Console::check(&config.serial)
            .map_err(|e| ApiError::of_class(e.class(), format!("serial: {e}")))?;
        memory::check_fits_host(&config.memory)
            .map_err(|e| ApiError::of_class(e.class(), e.to_string()))?;
        crate::vcpu::check_affinity(&config.cpus)?;
        self.join_cgroup(&config)
            .map_err(|e| ApiError::of_class(e.class(), e.to_string()))?;
        config.assign_device_ids();
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(())
    }

    fn boot(&mut self) -> Result<(), ApiError> {
        self.expect_state("boot", &[VmState::Created])?;
        let config = self
            .config
            .clone()
            .ok_or_else(|| ApiError::internal("no VM config"))?;
        if self.console.is_none() {
            let console = Console::open(&config.serial)
                .map_err(|e| ApiError::of_class(e.class(), format!("serial: {e}")))?;
            self.console = Some(console);
        }
        let vm = self
            .build_vm(&config, VmStart::Boot)
            .map_err(|e| ApiError::of_class(e.class(), e.to_string()))?;
        vm.resume();
        self.vm = Some(vm);
        self.state = VmState::Running;
        self.booted_at = Some(Instant::now());
        Ok(())
    }

    /// Builds the VM of `config` on the console opened for it.
    fn build_vm(&self, config: &VmConfig, start: VmStart) -> Result<Vm, VmError> {
        let Some(console) = self.console.as_ref() else {
            unreachable!("the console opens before any VM is built");
        };
        let sender = self.sender.clone();
        let sink: VmEventSink = Arc::new(move |event| {
            // The loop ends only when the process exits.
            let _ = sender.send(ControlEvent::Vm(event));
        });
        let vm = Vm::create(config, console, sink, start)?;
        console.attach(Some(vm.serial()));
        Ok(vm)
    }

    fn shutdown(&mut self, request: ShutdownRequest) -> ApiResult {
        match request.mode {
            ShutdownMode::Force => {
                self.expect_state(
                    "shut down",
                    &[VmState::Running, VmState::Paused, VmState::ShuttingDown],
                )?;
                self.exit = Some(ExitStatus::Stopped);
                Ok(ApiResponse::Action(ActionReply::done(
                    VmState::Shutdown,
                    "forced off: the VMM exits",
                )))
            }
            // Both ask the guest (ACPI power button, or Ctrl-Alt-Del for
            // guests without ACPI) and are handled alike from then on.
            ShutdownMode::Graceful | ShutdownMode::CtrlAltDel => {
                if self.state == VmState::Paused {
                    return Err(ApiError::new(
                        ApiErrorKind::WrongState,
                        "cannot shut down gracefully: the VM is paused (resume it, or use mode force)",
                    ));
                }
                self.expect_state("shut down", &[VmState::Running, VmState::ShuttingDown])?;
                let vm = self.vm()?;
                if request.mode == ShutdownMode::CtrlAltDel {
                    if !vm.send_ctrl_alt_del() {
                        return Err(ApiError::internal(
                            "the guest has not read earlier keyboard input; Ctrl-Alt-Del not sent",
                        ));
                    }
                } else if let Err(e) = vm.press_power_button() {
                    return Err(ApiError::internal(format!(
                        "cannot press the ACPI power button: {e}"
                    )));
                }
                let again = self.state == VmState::ShuttingDown;
                self.state = VmState::ShuttingDown;
                if let Some(ms) = request.timeout_ms {
                    self.deadline = Some((
                        Instant::now() + Duration::from_millis(ms),
                        ExitStatus::Stopped,
                        "the guest did not shut down in time; forcing it off",
                    ));
                }
                let how = match request.mode {
                    ShutdownMode::CtrlAltDel => "Ctrl-Alt-Del was sent",
                    _ => "the ACPI power button was pressed",
                };
                let timeout = request
                    .timeout_ms
                    .map(|ms| format!("; forced off after {}", show_ms(ms)))
                    .unwrap_or_default();
                let again = if again { " again" } else { "" };
                self.action(format!("shutting down: {how}{again}{timeout}"))
            }
        }
    }

    /// The reply of an action that was done: the state it left.
    fn action(&self, message: impl Into<String>) -> ApiResult {
        Ok(ApiResponse::Action(ActionReply::done(self.state, message)))
    }

    /// The reply of an action whose result was already there.
    fn already(&self, message: impl Into<String>) -> ApiResult {
        Ok(ApiResponse::Action(ActionReply::already(
            self.state, message,
        )))
    }

    /// `vm.reboot`: the guest is reset in place, as a guest reset with
    /// `on_reset` `reboot` does. If the VM cannot be rebuilt, it stays
    /// created (not running), for `vm.boot` to retry or `vm.delete`.
    fn api_reboot(&mut self) -> ApiResult {
        self.expect_state("reboot", &[VmState::Running, VmState::Paused])?;
        if self.migration_state != MigrationState::Idle {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                "cannot reboot: a migration is under way",
            ));
        }
        let config = self
            .config
            .clone()
            .ok_or_else(|| ApiError::internal("no VM config"))?;
        if let Err(e) = self.rebuild(&config) {
            self.state = VmState::Created;
            return Err(ApiError::of_class(
                e.class(),
                format!("reboot failed: {e}; the VM is created, not running (vm.boot retries)"),
            ));
        }
        self.action("rebooted")
    }

    /// `vm.delete`: back to no VM, so that `vm.create` can define it again
    /// (after a failed boot, or to change the config). A running or paused
    /// VM is not deleted: stopping it ends this VMM, with its exit code.
    fn delete(&mut self) -> ApiResult {
        if self.state == VmState::NotCreated {
            return self.already("already deleted: no VM is defined");
        }
        if self.migration_state != MigrationState::Idle {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                "cannot delete the VM: a migration is under way",
            ));
        }
        if self.state != VmState::Created {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                format!(
                    "cannot delete the VM: it is {} (shut it down or stop it first; the VMM \
                     exits with it)",
                    self.state
                ),
            ));
        }
        self.config = None;
        // A console opened by a boot that failed afterwards.
        self.console = None;
        self.state = VmState::NotCreated;
        self.action("deleted")
    }

    fn handle_vm_event(&mut self, event: VmEvent) {
        if self.exit.is_some() || self.vm.is_none() {
            return;
        }
        let reset = match event {
            VmEvent::Power(PowerEvent::PowerOff) | VmEvent::Vcpu(_, VcpuStop::PowerOff) => {
                self.exit = Some(ExitStatus::PoweredOff);
                return;
            }
            VmEvent::Vcpu(id, VcpuStop::Crash(why)) => {
                log::error!("guest crashed: vcpu{id}: {why}");
                self.exit = Some(ExitStatus::Crashed);
                return;
            }
            VmEvent::Power(PowerEvent::Reset) | VmEvent::Vcpu(_, VcpuStop::Reset) => true,
        };
        debug_assert!(reset);
        // A guest asked to shut down that resets (Linux reboots on
        // Ctrl-Alt-Del by default) has done what was asked.
        if self.state == VmState::ShuttingDown {
            self.exit = Some(ExitStatus::PoweredOff);
            return;
        }
        let on_reset = self.config.as_ref().map(|c| c.on_reset).unwrap_or_default();
        match on_reset {
            ResetAction::Exit => self.exit = Some(ExitStatus::Reset),
            ResetAction::Reboot => self.reboot(),
        }
    }

    /// A guest reset with `on_reset` `reboot`: rebuilt in place, or the
    /// VMM exits with an error.
    fn reboot(&mut self) {
        let Some(config) = self.config.clone() else {
            self.exit = Some(ExitStatus::Error);
            return;
        };
        match self.rebuild(&config) {
            Ok(()) => log::info!("the guest reset itself: rebooted"),
            Err(e) => {
                log::error!("reboot failed: {e}");
                self.exit = Some(ExitStatus::Error);
            }
        }
    }

    /// Rebuilds the VM from its config and runs it: a cold reset in place.
    fn rebuild(&mut self, config: &VmConfig) -> Result<(), VmError> {
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
        // Events of the old VM still queued refer to it, not to the new one.
        self.drain_vm_events();
        let vm = self.build_vm(config, VmStart::Boot)?;
        vm.resume();
        self.vm = Some(vm);
        self.state = VmState::Running;
        self.booted_at = Some(Instant::now());
        Ok(())
    }

    fn drain_vm_events(&mut self) {
        let mut keep = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            if !matches!(event, ControlEvent::Vm(_)) {
                keep.push(event);
            }
        }
        for event in keep {
            let _ = self.sender.send(event);
        }
    }

    fn send_migration(&mut self, request: SendMigrationRequest) -> ApiResult {
        self.expect_state("migrate", &[VmState::Running, VmState::Paused])?;
        // A migration the manager did not start would leave it believing the
        // guest stopped here: it would start a second copy on the same disk.
        if let (Some(manager), false) = (&self.managed_by, request.force) {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                format!(
                    "cannot migrate: this guest is managed by {manager}, which would not \
                     know it moved and could start a second copy; move it with \
                     `crm resource move RESOURCE NODE` (or set \"force\": true, \
                     vmmctl migrate --force, if {manager} no longer runs it)"
                ),
            ));
        }
        if self.migration_state != MigrationState::Idle {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                "cannot migrate: a migration is already running",
            ));
        }
        let vm = self.vm()?;
        let mut config = self
            .config
            .clone()
            .ok_or_else(|| ApiError::internal("no VM config"))?;
        let tls = match &request.tls_dir {
            Some(dir) => Some(
                crate::migrate::tls::client_config(dir)
                    .map_err(|e| ApiError::of_class(e.class(), format!("tls_dir: {e}")))?,
            ),
            None => None,
        };
        // Whether a guest may outgrow the host, and on which of its CPUs
        // the guest runs, are the target host's call.
        config.memory.overcommit = false;
        config.cpus.affinity = None;
        let context = crate::migrate::send::SendContext {
            destination: request.destination,
            token: request.token,
            tls,
            config,
            memory: vm.memory().clone(),
            vm_fd: vm.vm_fd().clone(),
            throttle: vm
                .throttle()
                .ok_or_else(|| ApiError::internal("no vCPUs"))?,
            shared: self.migration.clone(),
            control: self.control_handle(),
            balloon: vm.device_manager().balloon().cloned(),
        };
        self.migration.reset_cancel();
        // A client polling right after this reply sees this migration, not
        // the end of an earlier one.
        self.migration.update(|s| {
            *s = MigrationStatus {
                phase: MigrationPhase::Setup,
                role: Some(MigrationRole::Send),
                ..Default::default()
            }
        });
        *self
            .migration
            .parameters
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = request.parameters;
        self.migration_state = MigrationState::Running(MigrationRole::Send);
        crate::seccomp::spawn(
            crate::seccomp::ThreadKind::MigrationSend,
            std::thread::Builder::new().name("migration-send".into()),
            move || crate::migrate::send::run(context),
        )
        .map_err(|e| ApiError::internal(format!("cannot start the migration thread: {e}")))?;
        Ok(ApiResponse::Empty)
    }

    /// Listens for an incoming migration (API call or `vmm --incoming`).
    pub fn receive_migration(&mut self, request: ReceiveMigrationRequest) -> Result<(), ApiError> {
        // Created: the local config gives host resources and is checked
        // against the source's when it arrives.
        self.expect_state(
            "receive a migration",
            &[VmState::NotCreated, VmState::Created],
        )?;
        if self.migration_state != MigrationState::Idle {
            return Err(ApiError::new(
                ApiErrorKind::WrongState,
                "cannot receive a migration: one is already under way",
            ));
        }
        if request.token.is_empty() {
            return Err(ApiError::bad_request("token: must not be empty"));
        }
        let tls = match &request.tls_dir {
            Some(dir) => Some(
                crate::migrate::tls::server_config(dir)
                    .map_err(|e| ApiError::of_class(e.class(), format!("tls_dir: {e}")))?,
            ),
            None => None,
        };
        let timeout = Duration::from_secs(
            request
                .timeout_s
                .unwrap_or(api::request::DEFAULT_INCOMING_TIMEOUT_S),
        );
        let listener = crate::migrate::Listener::bind(&request.listen).map_err(|e| {
            ApiError::bad_request(format!("listen: cannot listen on {}: {e}", request.listen))
        })?;
        let context = crate::migrate::receive::ReceiveContext {
            listener,
            token: request.token,
            tls,
            timeout,
            shared: self.migration.clone(),
            control: self.control_handle(),
        };
        self.migration_state = MigrationState::Running(MigrationRole::Receive);
        crate::seccomp::spawn(
            crate::seccomp::ThreadKind::MigrationReceive,
            std::thread::Builder::new().name("migration-receive".into()),
            move || crate::migrate::receive::run(context),
        )
        .map_err(|e| ApiError::internal(format!("cannot start the migration thread: {e}")))?;
        Ok(())
    }

    fn handle_migration(&mut self, call: MigrationCall) -> Result<MigrationReply, MigrationError> {
        match call {
            MigrationCall::SwitchOver => {
                let resume = self.state == VmState::Running;
                let vm = self.vm.as_mut().ok_or(MigrationError::ShuttingDown)?;
                vm.pause();
                let bytes = vm.snapshot()?.encode()?;
                self.migration_state = MigrationState::SwitchingOver { resume };
                self.state = VmState::Paused;
                // Devices are paused: no disk I/O until the target runs.
                vm.device_manager().migration_release()?;
                Ok(MigrationReply::Snapshot(bytes))
            }
            MigrationCall::Abort => {
                let state = std::mem::replace(&mut self.migration_state, MigrationState::Idle);
                let MigrationState::SwitchingOver { resume } = state else {
                    return Ok(MigrationReply::Done);
                };
                let vm = self.vm.as_ref().ok_or(MigrationError::ShuttingDown)?;
                vm.device_manager().migration_acquire()?;
                vm.device_manager().resume();
                if resume {
                    vm.resume();
                    self.state = VmState::Running;
                }
                Ok(MigrationReply::Done)
            }
            MigrationCall::Undecided => {
                self.migration_state = MigrationState::Undecided;
                self.state = VmState::MigrationUndecided;
                log::error!(
                    "migration undecided: the target got Complete but never confirmed \
                     that it runs the guest, which may run there; this VMM keeps it paused \
                     with its disks released (check the target; resume here only with force)"
                );
                Ok(MigrationReply::Done)
            }
            MigrationCall::Finished => {
                self.migration_state = MigrationState::Idle;
                // The guest runs on the target: nothing may resume it here.
                self.state = VmState::Migrated;
                log::info!("the guest was migrated; exiting");
                self.deadline = Some((Instant::now() + MIGRATED_GRACE, ExitStatus::Migrated, ""));
                Ok(MigrationReply::Done)
            }
            MigrationCall::Build(source) => self.build_incoming(*source),
            MigrationCall::Restore(bytes) => {
                let snapshot = VmSnapshot::decode(&bytes)?;
                let vm = self.vm.as_mut().ok_or(MigrationError::ShuttingDown)?;
                vm.device_manager().migration_acquire()?;
                vm.restore(snapshot)?;
                Ok(MigrationReply::Done)
            }
            MigrationCall::Start { run } => {
                let vm = self.vm.as_ref().ok_or(MigrationError::ShuttingDown)?;
                if run {
                    vm.resume();
                }
                self.booted_at = Some(Instant::now());
                vm.device_manager().migration_completed();
                self.state = if run {
                    VmState::Running
                } else {
                    VmState::Paused
                };
                self.migration_state = MigrationState::Idle;
                if let Some(PendingJob::Restore { source, reply }) = self.pending.take() {
                    log::info!(
                        "restored from {}: the guest {}",
                        source.display(),
                        if run { "runs" } else { "is paused, as it was" }
                    );
                    if let Some(reply) = reply {
                        reply(Ok(ApiResponse::Empty));
                    }
                }
                Ok(MigrationReply::Done)
            }
            MigrationCall::Failed(message, class) => {
                self.migration_state = MigrationState::Idle;
                if let Some(PendingJob::Restore {
                    source,
                    reply: Some(reply),
                }) = self.pending.take()
                {
                    // vm.restore: back to an empty VMM, which may try again.
                    if let Some(mut vm) = self.vm.take() {
                        vm.stop();
                    }
                    self.drain_vm_events();
                    self.config = None;
                    self.state = VmState::NotCreated;
                    reply(Err(ApiError::of_class(
                        class,
                        format!("cannot restore {}: {message}", source.display()),
                    )));
                    return Ok(MigrationReply::Done);
                }
                let what = if matches!(self.pending.take(), Some(PendingJob::Restore { .. })) {
                    "the restore"
                } else {
                    "the incoming migration"
                };
                log::error!("exiting: {what} failed: {message}");
                self.exit = Some(ExitStatus::Error);
                Ok(MigrationReply::Done)
            }
            MigrationCall::AcquireDisks => {
                let vm = self.vm.as_ref().ok_or(MigrationError::ShuttingDown)?;
                vm.device_manager().migration_acquire()?;
                Ok(MigrationReply::Done)
            }
            MigrationCall::SnapshotDone(result) => {
                self.migration_state = MigrationState::Idle;
                if let Some(vm) = &self.vm {
                    // The vCPUs stay paused: see `begin_snapshot`.
                    vm.device_manager().resume();
                }
                let Some(PendingJob::Snapshot {
                    files,
                    reply,
                    started,
                }) = self.pending.take()
                else {
                    return Ok(MigrationReply::Done);
                };
                let result = result.and_then(|bytes| {
                    files.commit()?;
                    Ok(bytes)
                });
                match result {
                    Ok(bytes) => {
                        log::info!(
                            "snapshot written to {} ({} MiB in {} ms); the guest stays paused",
                            files.dir.display(),
                            bytes >> 20,
                            started.elapsed().as_millis()
                        );
                        self.migration.update(|s| {
                            s.phase = MigrationPhase::Completed;
                            s.total_time_ms = started.elapsed().as_millis() as u64;
                        });
                        reply(Ok(ApiResponse::Empty));
                    }
                    Err(e) => {
                        files.discard();
                        let message = format!("cannot write the snapshot: {e}");
                        log::error!("{message}");
                        self.migration.update(|s| {
                            s.phase = MigrationPhase::Failed;
                            s.error = Some(message.clone());
                        });
                        reply(Err(ApiError::internal(message)));
                    }
                }
                Ok(MigrationReply::Done)
            }
        }
    }

    /// Target: builds the VM (not started) from the source's config, or
    /// from the local one created here first, which gives the host
    /// resources (disk paths, taps) and must fit the source's.
    fn build_incoming(&mut self, mut source: VmConfig) -> Result<MigrationReply, MigrationError> {
        source.assign_device_ids();
        let config = match (self.state, self.config.take()) {
            (VmState::NotCreated, _) => source,
            (VmState::Created, Some(mut local)) => {
                if let Err(e) = local.check_migration_compatible(&source) {
                    self.config = Some(local);
                    return Err(MigrationError::Incompatible(e));
                }
                for (net, from) in local.nets.iter_mut().zip(&source.nets) {
                    net.mac = net.mac.clone().or_else(|| from.mac.clone());
                }
                local
            }
            (state, config) => {
                self.config = config;
                return Err(MigrationError::Busy(state));
            }
        };
        if let Err(e) = crate::vcpu::check_affinity(&config.cpus) {
            return Err(MigrationError::InvalidConfig(e));
        }
        self.join_cgroup(&config).map_err(VmError::from)?;
        if self.console.is_none() {
            self.console = Some(Console::open(&config.serial)?);
        }
        let vm = self.build_vm(&config, VmStart::Incoming)?;
        let memory = vm.memory().clone();
        self.vm = Some(vm);
        self.config = Some(config);
        self.state = VmState::Paused;
        Ok(MigrationReply::Memory(memory))
    }

    fn teardown(&mut self) {
        if let Some(console) = &self.console {
            console.attach(None);
        }
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
        // Leaves and removes it (drop).
        self.cgroup = None;
        self.state = VmState::Shutdown;
    }
}

/// `vm.balloon-statistics` from what the balloon reports.
fn balloon_statistics_reply(report: &BalloonReport) -> BalloonStatistics {
    let page_size = devices::virtio::balloon::PAGE_SIZE;
    let mut reply = BalloonStatistics {
        target_pages: report.target_pages,
        actual_pages: report.actual_pages,
        target_mib: (report.target_pages * page_size) >> 20,
        actual_mib: (report.actual_pages * page_size) >> 20,
        inflated_pages: report.inflated_pages,
        ..BalloonStatistics::default()
    };
    if let Some(guest) = &report.guest {
        reply.timestamp_ms = Some(guest.unix_ms);
        reply.age_ms = Some(guest.age_ms());
        for (&tag, &value) in &guest.values {
            reply.set_guest_stat(tag, value);
        }
    }
    reply
}

/// The refusal of balloon requests for a VM without a balloon: 409, as the
/// VM's configuration (not the request) is what is missing.
fn no_balloon() -> ApiError {
    ApiError::new(
        ApiErrorKind::WrongState,
        "the VM has no balloon device (configure one with --balloon or \"balloon\" in the VM config)",
    )
}

/// `1500` ms as `1.5 s`, `300` as `300 ms`.
fn show_ms(ms: u64) -> String {
    if ms >= 1000 {
        format!("{} s", ms as f64 / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

/// CPU time of the whole VMM process (every thread), user plus system.
pub fn process_cpu_time_ms() -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid out-pointer; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) } != 0 {
        return 0;
    }
    (time.tv_sec as u64) * 1000 + (time.tv_nsec as u64) / 1_000_000
}

/// The VMM process's proportional set size, from /proc/self/smaps_rollup.
pub fn process_pss_bytes() -> Option<u64> {
    let rollup = memory::read_proc_self("smaps_rollup").ok()?;
    let kib: u64 = rollup
        .lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The VMM process's resident set size, from /proc/self/statm.
pub fn process_rss_bytes() -> u64 {
    let statm = memory::read_proc_self("statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * memory::PAGE_SIZE
}
