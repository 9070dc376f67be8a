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

use crate::config::VmConfig;

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
    /// `PUT vm.resume`: restart paused vCPUs.
    VmResume,
    /// `PUT vm.shutdown`: ask the guest to shut down, or force it off.
    VmShutdown(ShutdownRequest),
    /// `GET vm.info`: config and state.
    VmInfo,
    /// `GET vm.counters`: exits and per-device counters.
    VmCounters,
}

/// The body of `vm.shutdown` (optional; an empty body means graceful, no timeout).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// `graceful` (Ctrl-Alt-Del to the guest) or `force` (stop the vCPUs now).
    #[serde(default)]
    pub mode: ShutdownMode,
    /// For a graceful shutdown: force it off if the guest has not stopped
    /// after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    #[default]
    Graceful,
    Force,
}

/// What a successful request returns.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    /// Nothing to say (HTTP 204).
    Empty,
    Ping(PingInfo),
    Info(Box<VmInfo>),
    Counters(Counters),
}

impl ApiResponse {
    /// The JSON body, or None for [`ApiResponse::Empty`].
    pub fn to_json(&self) -> Option<String> {
        let text = match self {
            ApiResponse::Empty => return None,
            ApiResponse::Ping(p) => serde_json::to_string_pretty(p),
            ApiResponse::Info(i) => serde_json::to_string_pretty(i),
            ApiResponse::Counters(c) => serde_json::to_string_pretty(c),
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
        };
        f.write_str(text)
    }
}

/// `vm.info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfig,
    /// The pseudo-terminal of a `pty` serial port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_pty: Option<PathBuf>,
    /// Host memory of the VMM process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryInfo>,
}

/// Host-side memory figures of a VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Guest RAM size in bytes.
    pub guest_bytes: u64,
    /// Resident set size of the VMM process in bytes.
    pub rss_bytes: u64,
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
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<crate::config::ConfigError> for ApiError {
    fn from(e: crate::config::ConfigError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

pub type ApiResult = Result<ApiResponse, ApiError>;
