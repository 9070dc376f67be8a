//! What a VMM can be asked, and what it answers.
//!
//! [`ApiRequest`] is the whole API surface of the VMM core (as Firecracker's
//! `VmmAction`): the HTTP server turns each route into one of these, the VMM's
//! control loop answers it, and requests that make no sense in the current
//! state are refused there, in one place, with [`ApiError::wrong_state`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use config::VmConfig;

/// One request to the VMM.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `GET vmm.ping`: is the VMM alive.
    VmmPing,
    /// `PUT vmm.shutdown`: stop the guest (forced) and end the VMM process.
    VmmShutdown,
    /// `PUT vm.create`: define the VM.
    VmCreate(Box<VmConfig>),
    /// `PUT vm.boot`: build and start the defined VM.
    VmBoot,
    /// `PUT vm.pause`: stop the vCPUs.
    VmPause,
    /// `PUT vm.resume`: restart paused vCPUs (with force: after an
    /// undecided migration, taking the disks back first).
    VmResume(ResumeRequest),
    /// `PUT vm.shutdown`: ask the guest to shut down, or force it off.
    VmShutdown(ShutdownRequest),
    /// `PUT vm.reboot`: reset the guest in place: the VM is rebuilt from
    /// its config and boots again (a cold reset, as `on_reset` `reboot`).
    VmReboot,
    /// `PUT vm.power-button`: press the ACPI power button (the guest decides
    /// what to do; the VM does not enter `shutting-down`).
    VmPowerButton,
    /// `PUT vm.delete`: forget a created VM that is not running, so that
    /// `vm.create` can define it again.
    VmDelete,
    /// `GET vm.info`: config and state.
    VmInfo,
    /// `GET vm.counters`: exits and per-device counters.
    VmCounters,
    /// `PUT vm.send-migration`: start migrating to a receiving VMM (returns at once).
    VmSendMigration(SendMigrationRequest),
    /// `PUT vm.receive-migration`: listen for an incoming migration.
    VmReceiveMigration(ReceiveMigrationRequest),
    /// `GET vm.migration-status`.
    VmMigrationStatus,
    /// `PUT vm.migration-cancel`: stop an outgoing migration; the guest keeps running here.
    VmMigrationCancel,
    /// `PUT vm.migration-parameters`: change downtime, bandwidth, timeout of a running migration.
    VmMigrationParameters(MigrationParameters),
    /// `PUT vm.balloon`: set the balloon's target size.
    VmBalloon(BalloonUpdate),
    /// `GET vm.balloon-statistics`: the balloon's size and the guest's memory statistics.
    VmBalloonStatistics,
    /// `PUT vm.snapshot`: write the VM (paused by it, and left paused) to a
    /// directory; answers when the snapshot is complete.
    VmSnapshot(SnapshotRequest),
    /// `PUT vm.restore`: build the VM of a snapshot and resume it as it
    /// was; answers when it runs (or is paused, if it was).
    VmRestore(RestoreRequest),
}

/// The body of `vm.snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot directory (absolute): created mode 0700, or an existing
    /// one private to the VMM's user; a snapshot in it is replaced.
    pub destination: PathBuf,
}

/// The body of `vm.restore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// A directory written by `vm.snapshot` (absolute).
    pub source: PathBuf,
}

/// Checks that a snapshot directory `path` given in `field` is absolute
/// (the VMM's working directory is nobody's business).
pub fn validate_snapshot_dir(
    field: &str,
    path: &std::path::Path,
) -> Result<(), config::ConfigError> {
    if !path.is_absolute() {
        return Err(config::ConfigError::new(
            field,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    Ok(())
}

impl ApiRequest {
    /// The endpoint's name (`vm.pause`), for log lines.
    pub fn endpoint(&self) -> &'static str {
        match self {
            ApiRequest::VmmPing => "vmm.ping",
            ApiRequest::VmmShutdown => "vmm.shutdown",
            ApiRequest::VmCreate(_) => "vm.create",
            ApiRequest::VmBoot => "vm.boot",
            ApiRequest::VmPause => "vm.pause",
            ApiRequest::VmResume(_) => "vm.resume",
            ApiRequest::VmShutdown(_) => "vm.shutdown",
            ApiRequest::VmReboot => "vm.reboot",
            ApiRequest::VmPowerButton => "vm.power-button",
            ApiRequest::VmDelete => "vm.delete",
            ApiRequest::VmInfo => "vm.info",
            ApiRequest::VmCounters => "vm.counters",
            ApiRequest::VmSendMigration(_) => "vm.send-migration",
            ApiRequest::VmReceiveMigration(_) => "vm.receive-migration",
            ApiRequest::VmMigrationStatus => "vm.migration-status",
            ApiRequest::VmMigrationCancel => "vm.migration-cancel",
            ApiRequest::VmMigrationParameters(_) => "vm.migration-parameters",
            ApiRequest::VmBalloon(_) => "vm.balloon",
            ApiRequest::VmBalloonStatistics => "vm.balloon-statistics",
            ApiRequest::VmSnapshot(_) => "vm.snapshot",
            ApiRequest::VmRestore(_) => "vm.restore",
        }
    }
}

/// The body of `vm.resume` (optional; an empty body means no force).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// Resume a guest whose migration outcome is undecided (it may run on
    /// the target): only after checking the target does not run it. Every
    /// disk lock is taken back first; if one cannot be, nothing resumes.
    #[serde(default)]
    pub force: bool,
}

/// The body of `vm.shutdown` (optional; an empty body means graceful, no timeout).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// `graceful` (the ACPI power button), `ctrl-alt-del` (the keys, on the
    /// i8042, for guests without ACPI) or `force` (stop the vCPUs now).
    #[serde(default)]
    pub mode: ShutdownMode,
    /// For a graceful or ctrl-alt-del shutdown: force it off if the guest has not stopped
    /// after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Press the ACPI power button.
    #[default]
    Graceful,
    /// Stop the vCPUs now.
    Force,
    /// Send Ctrl-Alt-Del through the i8042 (guests without ACPI).
    #[serde(rename = "ctrl-alt-del")]
    CtrlAltDel,
}

/// The reply of an action (`vm.boot`, `vm.pause`, `vm.resume`,
/// `vm.shutdown`, `vm.reboot`, `vm.power-button`, `vm.delete`): what it did.
/// An action whose result is already there (pausing a paused VM) succeeds
/// with `changed` false.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReply {
    /// The VM's state after the request.
    pub state: VmState,
    /// False when the VM already was as asked and nothing was done.
    pub changed: bool,
    /// What happened, in a few words: `paused`, `already paused`,
    /// `shutting down: the ACPI power button was pressed`.
    pub message: String,
}

impl ActionReply {
    pub fn done(state: VmState, message: impl Into<String>) -> Self {
        ActionReply {
            state,
            changed: true,
            message: message.into(),
        }
    }

    /// Nothing to do: the VM already is `state`.
    pub fn already(state: VmState, message: impl Into<String>) -> Self {
        ActionReply {
            state,
            changed: false,
            message: message.into(),
        }
    }
}

/// What a successful request returns.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    /// Nothing to say (HTTP 204).
    Empty,
    Action(ActionReply),
    Ping(PingInfo),
    Info(Box<VmInfo>),
    Counters(Counters),
    MigrationStatus(Box<MigrationStatus>),
    BalloonStatistics(Box<BalloonStatistics>),
}

impl ApiResponse {
    /// The JSON body, or None for [`ApiResponse::Empty`].
    pub fn to_json(&self) -> Option<String> {
        let text = match self {
            ApiResponse::Empty => return None,
            ApiResponse::Action(a) => serde_json::to_string_pretty(a),
            ApiResponse::Ping(p) => serde_json::to_string_pretty(p),
            ApiResponse::Info(i) => serde_json::to_string_pretty(i),
            ApiResponse::Counters(c) => serde_json::to_string_pretty(c),
            ApiResponse::MigrationStatus(m) => serde_json::to_string_pretty(m),
            ApiResponse::BalloonStatistics(b) => serde_json::to_string_pretty(b),
        };
        // Serializing these plain structs cannot fail: no maps with non-string keys.
        Some(text.unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")))
    }
}

/// `vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingInfo {
    pub version: String,
    pub pid: u32,
    /// The guest's name (`vm.info`'s), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The VM's state, as in [`VmInfo::state`].
    pub state: VmState,
}

/// The VM's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// No VM defined yet (API-only start).
    NotCreated,
    /// Defined by `vm.create`, not booted.
    Created,
    Running,
    Paused,
    /// A graceful shutdown was requested; the guest has not stopped yet.
    ShuttingDown,
    /// The guest has stopped; the VMM is about to exit.
    Shutdown,
    /// The guest was live-migrated away and runs elsewhere; the VMM is about
    /// to exit. Nothing can resume it here.
    Migrated,
    /// A migration sent `Complete` but never heard whether the target runs
    /// the guest: it may run there. Paused, disks released; only a forced
    /// resume (after checking the target) runs it here again.
    MigrationUndecided,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            VmState::NotCreated => "not-created",
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::Shutdown => "shutdown",
            VmState::Migrated => "migrated",
            VmState::MigrationUndecided => "migration-undecided",
        };
        f.write_str(text)
    }
}

/// `vm.info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The guest's name: `config.name`, else the API socket's (`web1` for
    /// `/run/vmm/web1.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub state: VmState,
    /// The VMM process.
    #[serde(default)]
    pub pid: u32,
    /// Milliseconds since the guest last booted here (or arrived by a
    /// migration); absent before it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// CPU time of the VMM process (vCPUs, devices, everything), user plus
    /// system, in milliseconds.
    #[serde(default)]
    pub cpu_time_ms: u64,
    pub config: VmConfig,
    /// The pseudo-terminal of a `pty` serial port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_pty: Option<PathBuf>,
    /// Host memory of the VMM process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryInfo>,
    /// The VMM's own cgroup directory, when `cpus.weight` or
    /// `cpus.max_percent` gave it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// Host-side memory figures of a VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Guest RAM size in bytes.
    pub guest_bytes: u64,
    /// Resident set size of the VMM process in bytes. Pages KSM merged still
    /// count in full in every process that maps them.
    pub rss_bytes: u64,
    /// Proportional set size: shared pages (KSM-merged ones) split among the
    /// processes that map them; the fair figure for an overcommit policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pss_bytes: Option<u64>,
    /// Pages of this process that KSM currently merges
    /// (`/proc/self/ksm_merging_pages`); absent if the kernel does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm_merging_pages: Option<u64>,
    /// `ksm_rmap_items` of `/proc/self/ksm_stat`: pages KSM tracks (scans) in
    /// this process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm_rmap_items: Option<u64>,
    /// `ksm_process_profit` of `/proc/self/ksm_stat`: bytes KSM saves on this
    /// process, minus its metadata (may be negative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm_process_profit: Option<i64>,
    /// The balloon's target (memory the host asked back), if there is a balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_target_bytes: Option<u64>,
    /// What the guest says the balloon holds, if there is a balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_actual_bytes: Option<u64>,
}

/// The body of `vm.balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// How much memory the guest should give back, in MiB (0 deflates the
    /// balloon completely); at most the guest's memory size.
    pub target_mib: u64,
}

/// `vm.balloon-statistics`: the balloon's size as host and guest see it, and
/// the memory statistics the guest last reported (absent until it did).
/// Sizes from the guest are in bytes, events are counts (Linux's
/// `virtio_balloon` stats tags).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatistics {
    /// The target: 4 KiB pages the guest is asked to put in the balloon.
    pub target_pages: u64,
    /// The pages the guest says it has put in the balloon (`actual`).
    pub actual_pages: u64,
    /// The target in MiB (rounded down).
    pub target_mib: u64,
    /// `actual` in MiB (rounded down).
    pub actual_mib: u64,
    /// Pages currently in the balloon as the device counts them (inflated
    /// and not deflated since); their host memory was given back.
    pub inflated_pages: u64,
    /// Unix time in milliseconds of the guest's last statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<u64>,
    /// Milliseconds since the guest's last statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stalls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scans: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scans: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaims: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaims: Option<u64>,
}

impl BalloonStatistics {
    /// Records the value of a guest stats entry (`VIRTIO_BALLOON_S_*` tag);
    /// false for a tag this type has no field for.
    pub fn set_guest_stat(&mut self, tag: u16, value: u64) -> bool {
        let field = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kills,
            11 => &mut self.alloc_stalls,
            12 => &mut self.async_scans,
            13 => &mut self.direct_scans,
            14 => &mut self.async_reclaims,
            15 => &mut self.direct_reclaims,
            _ => return false,
        };
        *field = Some(value);
        true
    }
}

/// `vm.counters`: component name (`vcpu0`, `serial`, `disk0`, ...) to counter
/// name to value.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// Why a request failed; the HTTP status follows from the kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiErrorKind {
    /// Malformed or invalid request (400).
    BadRequest,
    /// No such endpoint (404).
    NotFound,
    /// Wrong HTTP method for the endpoint (405).
    MethodNotAllowed,
    /// The request makes no sense in the VM's current state (409).
    WrongState,
    /// The request body is over the size limit (413).
    TooLarge,
    /// The VMM failed to do what was asked (500).
    Internal,
}

impl ApiErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ApiErrorKind::BadRequest => 400,
            ApiErrorKind::NotFound => 404,
            ApiErrorKind::MethodNotAllowed => 405,
            ApiErrorKind::WrongState => 409,
            ApiErrorKind::TooLarge => 413,
            ApiErrorKind::Internal => 500,
        }
    }
}

/// An error reply: `{"kind": "...", "message": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadRequest, message)
    }

    /// `what` cannot be done while the VM is `state`.
    pub fn wrong_state(what: &str, state: VmState) -> Self {
        Self::new(
            ApiErrorKind::WrongState,
            format!("cannot {what}: the VM is {state}"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Internal, message)
    }

    /// An error whose class (whose fault it is) decides the status: 400
    /// for the caller's, 409 for a conflict, 500 for the host's.
    pub fn of_class(class: config::ErrorClass, message: impl Into<String>) -> Self {
        let kind = match class {
            config::ErrorClass::Caller => ApiErrorKind::BadRequest,
            config::ErrorClass::Conflict => ApiErrorKind::WrongState,
            config::ErrorClass::Host => ApiErrorKind::Internal,
        };
        Self::new(kind, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<config::ConfigError> for ApiError {
    fn from(e: config::ConfigError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

pub type ApiResult = Result<ApiResponse, ApiError>;

/// Where a migration goes or comes from: `tcp:HOST:PORT` or `unix:PATH`.
pub type MigrationUrl = String;

/// What to do when a migration hits its timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Give up; the source keeps running.
    #[default]
    Cancel,
    /// Switch over now, whatever the downtime.
    Force,
}

/// The body of `vm.send-migration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationRequest {
    /// `tcp:HOST:PORT` or `unix:PATH` of the receiving VMM.
    pub destination: MigrationUrl,
    /// The pre-shared token the receiver expects.
    pub token: String,
    /// Encrypt the stream with TLS, with the certificates in this directory
    /// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Migrate even a guest whose VMM is managed by a cluster manager
    /// (`vmm --managed-by`), which refuses a migration it did not start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    #[serde(flatten)]
    pub parameters: MigrationParameters,
}

/// Tunables of a running or starting migration (`vm.migration-parameters`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationParameters {
    /// Largest acceptable pause of the guest at switch-over, in ms.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Bandwidth cap in bytes/s (absent or 0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Give up or force switch-over after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub timeout_action: TimeoutAction,
    /// Throttle the vCPUs when the guest dirties memory faster than the link drains it.
    #[serde(default = "default_true")]
    pub auto_converge: bool,
}

fn default_downtime_ms() -> u64 {
    300
}

fn default_true() -> bool {
    true
}

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            downtime_ms: default_downtime_ms(),
            bandwidth_bytes_per_s: None,
            timeout_s: None,
            timeout_action: TimeoutAction::Cancel,
            auto_converge: true,
        }
    }
}

impl MigrationParameters {
    pub fn validate(&self) -> Result<(), config::ConfigError> {
        use config::ConfigError;
        if self.downtime_ms == 0 || self.downtime_ms > 600_000 {
            return Err(ConfigError::new(
                "downtime_ms",
                "must be between 1 and 600000",
            ));
        }
        if self.timeout_s == Some(0) {
            return Err(ConfigError::new("timeout_s", "must be at least 1 second"));
        }
        Ok(())
    }
}

/// The body of `vm.receive-migration`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationRequest {
    /// `tcp:HOST:PORT` or `unix:PATH` to listen on.
    pub listen: MigrationUrl,
    /// The pre-shared token the sender must present.
    pub token: String,
    /// Require TLS, with the certificates in this directory (`ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Give up (exit 1) when no source authenticated within this many
    /// seconds (default [`DEFAULT_INCOMING_TIMEOUT_S`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// How long a target waits for an authenticated source by default (1 hour).
pub const DEFAULT_INCOMING_TIMEOUT_S: u64 = 3600;

/// Checks the form of a migration URL; returns an error naming it.
pub fn validate_migration_url(field: &str, url: &str) -> Result<(), config::ConfigError> {
    use config::ConfigError;
    match url.split_once(':') {
        Some(("tcp", rest))
            if rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
        {
            Ok(())
        }
        Some(("unix", path)) if !path.is_empty() => Ok(()),
        _ => Err(ConfigError::new(
            field,
            format!("{url:?} is not tcp:HOST:PORT or unix:PATH"),
        )),
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// No migration has run.
    #[default]
    None,
    /// Connecting, authenticating, sending the config.
    Setup,
    /// Pre-copy rounds while the guest runs.
    Active,
    /// The guest is paused; last pages and state are going out.
    SwitchOver,
    /// Done: the guest runs on the target (source), or here (target).
    Completed,
    /// Failed; the source keeps running.
    Failed,
    /// Cancelled; the source keeps running.
    Cancelled,
}

/// Which side of a migration a VMM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationRole {
    Send,
    Receive,
}

impl fmt::Display for MigrationRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationRole::Send => "send",
            MigrationRole::Receive => "receive",
        })
    }
}

/// `vm.migration-status`: the figures users read from QEMU's `query-migrate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub phase: MigrationPhase,
    /// Which side this VMM is, once a migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<MigrationRole>,
    pub total_time_ms: u64,
    pub setup_time_ms: u64,
    /// Downtime estimated from the last round and the link bandwidth.
    pub expected_downtime_ms: u64,
    /// Measured pause of the guest (after switch-over).
    pub downtime_ms: u64,
    /// Guest RAM size.
    pub total_bytes: u64,
    /// Bytes put on the wire so far (headers included).
    pub transferred_bytes: u64,
    /// Bytes still dirty after the last round.
    pub remaining_bytes: u64,
    /// Pages sent as zero markers or skipped as never touched.
    pub zero_pages: u64,
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages the guest dirtied per second in the last round.
    pub dirty_pages_rate: u64,
    /// Bytes per second over the last round.
    pub throughput_bytes_per_s: u64,
    /// Dirty rounds after round 0.
    pub iterations: u64,
    /// vCPU throttle from auto-converge, in percent.
    pub throttle_percent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
