//! The VMM's control loop: the one place where API requests, guest power
//! events, vCPU stops and signals change the VM's state. Requests that make
//! no sense in the current state are refused here.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::config::{ResetAction, VmConfig};
use api::http::ApiCall;
use api::request::{
    ApiError, ApiRequest, ApiResponse, ApiResult, MemoryInfo, PingInfo, ShutdownMode,
    ShutdownRequest, VmInfo, VmState,
};
use devices::legacy::PowerEvent;

use crate::console::Console;
use crate::exit::ExitStatus;
use crate::memory;
use crate::vcpu::VcpuStop;
use crate::vm::{Vm, VmEvent, VmEventSink};

/// Everything the control loop reacts to.
pub enum ControlEvent {
    Api(ApiCall),
    Vm(VmEvent),
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
}

pub struct Controller {
    state: VmState,
    config: Option<VmConfig>,
    console: Option<Console>,
    vm: Option<Vm>,
    events: Receiver<ControlEvent>,
    sender: Sender<ControlEvent>,
    /// When a graceful shutdown turns into a forced one.
    shutdown_deadline: Option<Instant>,
    /// Set when the loop should end with this status.
    exit: Option<ExitStatus>,
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
            shutdown_deadline: None,
            exit: None,
        }
    }

    /// Where other threads send events.
    pub fn sender(&self) -> Sender<ControlEvent> {
        self.sender.clone()
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
            let event = match self.shutdown_deadline {
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match self.events.recv_timeout(wait) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => {
                            eprintln!("vmm: the guest did not shut down in time; forcing it off");
                            self.shutdown_deadline = None;
                            self.exit = Some(ExitStatus::Stopped);
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
                    let result = self.handle(call.request);
                    // The client may have gone; nothing to do then.
                    let _ = call.reply.send(result);
                }
                ControlEvent::Vm(event) => self.handle_vm_event(event),
                ControlEvent::Signal(signal) => {
                    eprintln!("vmm: signal {signal}: stopping");
                    self.exit = Some(if self.vm.is_some() {
                        ExitStatus::Stopped
                    } else {
                        ExitStatus::PoweredOff
                    });
                }
            }
        }
    }

    fn handle(&mut self, request: ApiRequest) -> ApiResult {
        match request {
            ApiRequest::VmmPing => Ok(ApiResponse::Ping(PingInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                state: self.state,
            })),
            ApiRequest::VmmShutdown => {
                self.exit = Some(if self.vm.is_some() {
                    ExitStatus::Stopped
                } else {
                    ExitStatus::PoweredOff
                });
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmCreate(config) => self.create(*config).map(|_| ApiResponse::Empty),
            ApiRequest::VmBoot => self.boot().map(|_| ApiResponse::Empty),
            ApiRequest::VmPause => {
                self.expect_state("pause", &[VmState::Running])?;
                self.vm()?.pause();
                self.state = VmState::Paused;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmResume => {
                self.expect_state("resume", &[VmState::Paused])?;
                self.vm()?.resume();
                self.state = VmState::Running;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmShutdown(request) => self.shutdown(request),
            ApiRequest::VmInfo => {
                let config = self
                    .config
                    .clone()
                    .ok_or_else(|| ApiError::wrong_state("report VM info", self.state))?;
                let memory = self.vm.as_ref().map(|vm| MemoryInfo {
                    guest_bytes: memory::total_size(vm.memory()),
                    rss_bytes: process_rss_bytes(),
                });
                Ok(ApiResponse::Info(Box::new(VmInfo {
                    state: self.state,
                    config,
                    serial_pty: self
                        .console
                        .as_ref()
                        .and_then(|c| c.pty_path().map(|p| p.to_path_buf())),
                    memory,
                })))
            }
            ApiRequest::VmCounters => {
                let vm = self
                    .vm
                    .as_ref()
                    .ok_or_else(|| ApiError::wrong_state("report counters", self.state))?;
                Ok(ApiResponse::Counters(vm.counters()))
            }
        }
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
                .map_err(|e| ApiError::bad_request(format!("serial: {e}")))?;
            self.console = Some(console);
        }
        let vm = self.build_vm(&config)?;
        vm.resume();
        self.vm = Some(vm);
        self.state = VmState::Running;
        Ok(())
    }

    fn build_vm(&self, config: &VmConfig) -> Result<Vm, ApiError> {
        let console = self
            .console
            .as_ref()
            .ok_or_else(|| ApiError::internal("no console"))?;
        let sender = self.sender.clone();
        let sink: VmEventSink = Arc::new(move |event| {
            // The loop ends only when the process exits.
            let _ = sender.send(ControlEvent::Vm(event));
        });
        let vm = Vm::create(config, console, sink).map_err(|e| {
            // A missing file is the caller's mistake; anything else is ours.
            match &e {
                crate::vm::VmError::Boot(_) => ApiError::bad_request(e.to_string()),
                _ => ApiError::internal(e.to_string()),
            }
        })?;
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
            }
            ShutdownMode::Graceful => {
                if self.state == VmState::Paused {
                    return Err(ApiError::new(
                        api::request::ApiErrorKind::WrongState,
                        "cannot shut down gracefully: the VM is paused (resume it, or use mode force)",
                    ));
                }
                self.expect_state("shut down", &[VmState::Running, VmState::ShuttingDown])?;
                if !self.vm()?.request_shutdown() {
                    return Err(ApiError::internal(
                        "the guest has not read earlier keyboard input; Ctrl-Alt-Del not sent",
                    ));
                }
                self.state = VmState::ShuttingDown;
                if let Some(ms) = request.timeout_ms {
                    self.shutdown_deadline = Some(Instant::now() + Duration::from_millis(ms));
                }
            }
        }
        Ok(ApiResponse::Empty)
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
                eprintln!("vmm: guest crashed: vcpu{id}: {why}");
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

    /// Rebuilds the VM from its config: a cold reset in place.
    fn reboot(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
        // Events of the old VM still queued refer to it, not to the new one.
        self.drain_vm_events();
        let Some(config) = self.config.clone() else {
            self.exit = Some(ExitStatus::Error);
            return;
        };
        match self.build_vm(&config) {
            Ok(vm) => {
                vm.resume();
                self.vm = Some(vm);
                self.state = VmState::Running;
            }
            Err(e) => {
                eprintln!("vmm: reboot failed: {e}");
                self.exit = Some(ExitStatus::Error);
            }
        }
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

    fn teardown(&mut self) {
        if let Some(console) = &self.console {
            console.attach(None);
        }
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
        self.state = VmState::Shutdown;
    }
}

/// The VMM process's resident set size, from /proc/self/statm.
pub fn process_rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * memory::PAGE_SIZE
}
