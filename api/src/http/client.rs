//! A blocking API client on a std `UnixStream`: one connection per request.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::routes::{encode, route_named, Method, Route, API_PREFIX};
use super::wire::{clip, find_head, parse_content_length, reason, split_head};
use crate::request::{
    ActionReply, ApiError, ApiErrorKind, ApiRequest, ApiResponse, BalloonStatistics, BalloonUpdate,
    Counters, MigrationParameters, MigrationStatus, PingInfo, ReceiveMigrationRequest,
    ResumeRequest, SendMigrationRequest, ShutdownRequest, VmInfo,
};
use crate::request::{RestoreRequest, SnapshotRequest};
use config::VmConfig;

/// How long a request may take, connection to last byte of the reply.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest reply the client reads.
const MAX_REPLY_SIZE: usize = 16 << 20;

/// Why a request got no successful answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file, or nobody accepting on it.
    #[error("no VMM is listening on {}", path.display())]
    NotListening {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Connecting, writing or reading failed otherwise.
    #[error("cannot talk to the VMM on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The VMM did not answer in time.
    #[error("the VMM on {} did not answer within {} s", path.display(), after.as_secs_f64())]
    Timeout { path: PathBuf, after: Duration },
    /// Something answered, but not with a reply we understand.
    #[error("bad reply from the VMM on {}: {message}", path.display())]
    BadReply { path: PathBuf, message: String },
    /// The VMM refused the request: the error from its reply.
    #[error("{error}")]
    Api { status: u16, error: ApiError },
    /// The request could not be built (e.g. a path that is not UTF-8).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// Whether no VMM could be reached (as opposed to a VMM refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::NotListening { .. }
                | ClientError::Io { .. }
                | ClientError::Timeout { .. }
                | ClientError::BadReply { .. }
        )
    }
}

/// A client for one VMM's API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ApiClient {
            path: path.into(),
            timeout: DEFAULT_CLIENT_TIMEOUT,
        }
    }

    /// The same client with another timeout per request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one request and returns the status and body of the reply,
    /// whatever the status. `endpoint` is a name (`vm.info`) or a full path
    /// (`/api/v1/vm.info`).
    pub fn request(
        &self,
        method: Method,
        endpoint: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let target = if endpoint.starts_with('/') {
            endpoint.to_string()
        } else {
            format!("{API_PREFIX}{endpoint}")
        };
        if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ClientError::InvalidRequest(format!(
                "bad endpoint {:?}",
                clip(endpoint)
            )));
        }
        let deadline = Instant::now() + self.timeout;
        let mut stream = UnixStream::connect(&self.path).map_err(|e| self.connect_error(e))?;

        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        match body {
            Some(body) => head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )),
            None if method != Method::Get => head.push_str("Content-Length: 0\r\n"),
            None => {}
        }
        head.push_str("\r\n");
        let sent = stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| stream.write_all(head.as_bytes()))
            .and_then(|()| stream.write_all(body.unwrap_or_default()));
        // Read the reply even if sending failed: the server may have answered
        // early and closed (a 413 for a body over its limit).
        match self.read_reply(&mut stream, deadline) {
            Ok(reply) => Ok(reply),
            Err(read_error) => match sent {
                Err(e) => Err(self.io_error(e)),
                Ok(()) => Err(read_error),
            },
        }
    }

    /// Sends `request` on its route and decodes the reply.
    pub fn call(&self, request: &ApiRequest) -> Result<ApiResponse, ClientError> {
        let (route, body) =
            encode(request).map_err(|e| ClientError::InvalidRequest(e.to_string()))?;
        self.call_route(route, body.as_deref())
    }

    /// Sends `body` (verbatim) on `route` and decodes the reply.
    pub fn call_route(
        &self,
        route: &Route,
        body: Option<&[u8]>,
    ) -> Result<ApiResponse, ClientError> {
        let (status, reply) = self.request(route.method, route.path, body)?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &reply));
        }
        route
            .reply
            .decode(&reply)
            .map_err(|e| ClientError::BadReply {
                path: self.path.clone(),
                message: format!("cannot decode the reply: {e}"),
            })
    }

    /// `GET vmm.ping`.
    pub fn ping(&self) -> Result<PingInfo, ClientError> {
        match self.call(&ApiRequest::VmmPing)? {
            ApiResponse::Ping(ping) => Ok(ping),
            other => Err(self.unexpected(other)),
        }
    }

    /// `PUT vmm.shutdown`.
    pub fn shutdown_vmm(&self) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmmShutdown).map(drop)
    }

    /// `PUT vm.create`.
    pub fn create(&self, config: &VmConfig) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmCreate(Box::new(config.clone())))
            .map(drop)
    }

    /// `PUT vm.create` with a JSON document sent as it is (the VMM validates it).
    pub fn create_json(&self, json: &[u8]) -> Result<(), ClientError> {
        let route = route_named(Method::Put, "vm.create")
            .ok_or_else(|| ClientError::InvalidRequest("no vm.create route".into()))?;
        self.call_route(route, Some(json)).map(drop)
    }

    /// `PUT vm.boot`.
    pub fn boot(&self) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmBoot)
    }

    /// `PUT vm.pause`.
    pub fn pause(&self) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmPause)
    }

    /// `PUT vm.resume`.
    pub fn resume(&self) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmResume(ResumeRequest::default()))
    }

    /// `PUT vm.resume` with force: after an undecided migration.
    pub fn resume_force(&self) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmResume(ResumeRequest { force: true }))
    }

    /// `PUT vm.shutdown`.
    pub fn shutdown(&self, request: &ShutdownRequest) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmShutdown(request.clone()))
    }

    /// `PUT vm.reboot`.
    pub fn reboot(&self) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmReboot)
    }

    /// `PUT vm.power-button`.
    pub fn power_button(&self) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmPowerButton)
    }

    /// `PUT vm.delete`.
    pub fn delete(&self) -> Result<ActionReply, ClientError> {
        self.action(&ApiRequest::VmDelete)
    }

    /// An action and what it did.
    pub fn action(&self, request: &ApiRequest) -> Result<ActionReply, ClientError> {
        match self.call(request)? {
            ApiResponse::Action(reply) => Ok(reply),
            other => Err(self.unexpected(other)),
        }
    }

    /// `GET vm.info`.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        match self.call(&ApiRequest::VmInfo)? {
            ApiResponse::Info(info) => Ok(*info),
            other => Err(self.unexpected(other)),
        }
    }

    /// `GET vm.counters`.
    pub fn counters(&self) -> Result<Counters, ClientError> {
        match self.call(&ApiRequest::VmCounters)? {
            ApiResponse::Counters(counters) => Ok(counters),
            other => Err(self.unexpected(other)),
        }
    }

    /// `PUT vm.send-migration`: starts the migration and returns at once.
    pub fn send_migration(&self, request: &SendMigrationRequest) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmSendMigration(request.clone()))
            .map(drop)
    }

    /// `PUT vm.receive-migration`: returns once the VMM listens.
    pub fn receive_migration(&self, request: &ReceiveMigrationRequest) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmReceiveMigration(request.clone()))
            .map(drop)
    }

    /// `GET vm.migration-status`.
    pub fn migration_status(&self) -> Result<MigrationStatus, ClientError> {
        match self.call(&ApiRequest::VmMigrationStatus)? {
            ApiResponse::MigrationStatus(status) => Ok(*status),
            other => Err(self.unexpected(other)),
        }
    }

    /// `PUT vm.migration-cancel`.
    pub fn migration_cancel(&self) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmMigrationCancel).map(drop)
    }

    /// `PUT vm.migration-parameters`: the whole set (absent fields take their defaults).
    pub fn migration_parameters(
        &self,
        parameters: &MigrationParameters,
    ) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmMigrationParameters(parameters.clone()))
            .map(drop)
    }

    /// `PUT vm.balloon`: asks the guest to give back `target_mib` MiB.
    pub fn balloon(&self, target_mib: u64) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmBalloon(BalloonUpdate { target_mib }))
            .map(drop)
    }

    /// `PUT vm.snapshot`: returns once the snapshot is written (give the
    /// client a timeout that fits the guest's memory and the disk).
    pub fn snapshot(&self, destination: &Path) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmSnapshot(SnapshotRequest {
            destination: destination.to_path_buf(),
        }))
        .map(drop)
    }

    /// `PUT vm.restore`: returns once the restored guest runs (or is paused).
    pub fn restore(&self, source: &Path) -> Result<(), ClientError> {
        self.call(&ApiRequest::VmRestore(RestoreRequest {
            source: source.to_path_buf(),
        }))
        .map(drop)
    }

    /// `GET vm.balloon-statistics`.
    pub fn balloon_statistics(&self) -> Result<BalloonStatistics, ClientError> {
        match self.call(&ApiRequest::VmBalloonStatistics)? {
            ApiResponse::BalloonStatistics(stats) => Ok(*stats),
            other => Err(self.unexpected(other)),
        }
    }

    fn unexpected(&self, response: ApiResponse) -> ClientError {
        ClientError::BadReply {
            path: self.path.clone(),
            message: format!("unexpected reply {response:?}"),
        }
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotListening {
                    path: self.path.clone(),
                    source: e,
                }
            }
            _ => self.io_error(e),
        }
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                path: self.path.clone(),
                after: self.timeout,
            },
            _ => ClientError::Io {
                path: self.path.clone(),
                source: e,
            },
        }
    }

    fn bad_reply(&self, message: impl Into<String>) -> ClientError {
        ClientError::BadReply {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// Reads into `buf` until the deadline; Ok(0) at end of stream.
    fn read_more(
        &self,
        stream: &mut UnixStream,
        buf: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<usize, ClientError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.io_error(io::ErrorKind::TimedOut.into()));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| self.io_error(e))?;
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The server closed after answering with unread request
                // bytes left (e.g. a 413): what was sent is already read.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(0),
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    fn read_reply(
        &self,
        stream: &mut UnixStream,
        deadline: Instant,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut buf = Vec::new();
        loop {
            let (start, end) = loop {
                if let Some(found) = find_head(&buf) {
                    break found;
                }
                if buf.len() > 64 * 1024 {
                    return Err(self.bad_reply("the reply head is over 64 KiB"));
                }
                if self.read_more(stream, &mut buf, deadline)? == 0 {
                    return Err(if buf.is_empty() {
                        self.bad_reply("the connection was closed without a reply")
                    } else {
                        self.bad_reply("the connection was closed in the middle of the reply")
                    });
                }
            };
            let (status, length) = self.parse_reply_head(&buf[start..end])?;
            buf.drain(..end);
            if (100..200).contains(&status) {
                // 100 Continue and the like: the real reply follows.
                continue;
            }
            if status == 204 || status == 304 {
                return Ok((status, Vec::new()));
            }
            match length {
                Some(length) => {
                    if length > MAX_REPLY_SIZE {
                        return Err(self.bad_reply(format!("a {length}-byte reply is too large")));
                    }
                    while buf.len() < length {
                        if self.read_more(stream, &mut buf, deadline)? == 0 {
                            return Err(self.bad_reply("the reply body was cut short"));
                        }
                    }
                    buf.truncate(length);
                }
                None => {
                    // No length: the body runs to the end of the connection.
                    while self.read_more(stream, &mut buf, deadline)? > 0 {
                        if buf.len() > MAX_REPLY_SIZE {
                            return Err(self.bad_reply("the reply is too large"));
                        }
                    }
                }
            }
            return Ok((status, buf));
        }
    }

    fn parse_reply_head(&self, head: &[u8]) -> Result<(u16, Option<usize>), ClientError> {
        let (first, headers) = split_head(head).map_err(|e| self.bad_reply(e.to_string()))?;
        let mut parts = first.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") || status.len() != 3 {
            return Err(self.bad_reply(format!("not an HTTP reply: {:?}", clip(first))));
        }
        let status: u16 = status
            .parse()
            .map_err(|_| self.bad_reply(format!("bad status in {:?}", clip(first))))?;
        let mut length = None;
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("content-length") {
                let value = parse_content_length(value)
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| {
                        self.bad_reply(format!("bad Content-Length {:?}", clip(value)))
                    })?;
                length = Some(value);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(self.bad_reply("encoded replies are not supported"));
            }
        }
        Ok((status, length))
    }
}

/// The error of a non-2xx reply: the ApiError of its body, or one made up
/// from the status if the body is not one.
fn api_error(status: u16, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| {
        let kind = match status {
            404 => ApiErrorKind::NotFound,
            405 => ApiErrorKind::MethodNotAllowed,
            409 => ApiErrorKind::WrongState,
            413 => ApiErrorKind::TooLarge,
            400..=499 => ApiErrorKind::BadRequest,
            _ => ApiErrorKind::Internal,
        };
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let message = if text.is_empty() {
            format!("HTTP {status} {}", reason(status))
        } else {
            format!("HTTP {status} {}: {}", reason(status), clip(text))
        };
        ApiError::new(kind, message)
    });
    ClientError::Api { status, error }
}
