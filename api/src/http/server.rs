//! The API server: HTTP/1.1 on a Unix socket, served by a current-thread
//! tokio runtime on one dedicated thread.
//!
//! Each request becomes an [`ApiCall`] handed to the VMM's `dispatch`
//! callback; the VMM's control loop answers through the call's oneshot sender
//! and the server writes that answer back. The server never panics on input:
//! a malformed request gets a 4xx and its connection is closed; other
//! connections carry on.
//!
//! No client can starve the others: a request must arrive whole within
//! [`REQUEST_TIMEOUT`] (a new connection's first request too), keep-alive
//! connections are closed after [`IDLE_TIMEOUT`], and when
//! [`MAX_CONNECTIONS`] are open, the one that has waited longest for a
//! request (idle or half-sent) is closed to make room; only when every
//! connection has a request with the VMM is a new one refused (503).

use std::collections::BTreeMap;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};

use super::routes::{find_route, BodyKind, Route, RouteError};
use super::wire::{clip, find_head, has_token, parse_content_length, reason, split_head};
use crate::request::{ApiError, ApiErrorKind, ApiRequest, ApiResponse, ApiResult};
use crate::socket::{self, SocketFile};

/// The largest request body accepted; a larger one is refused with 413
/// before it is read.
pub const MAX_BODY_SIZE: usize = 64 * 1024;
/// The largest request head (request line and headers) accepted; a larger
/// one is refused with 431.
pub const MAX_HEAD_SIZE: usize = 8 * 1024;
/// How long a client has to send a whole request, from its first byte, or
/// from connecting for a connection's first request (against slowloris
/// clients): then 408 (or, if it sent nothing, a quiet close).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a keep-alive connection may sit idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many connections are served at once. At the limit, the connection
/// that has waited longest for a request is closed to make room; if all have
/// a request with the VMM, the new one is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// How long writing a response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writing the error that ends a connection (408, 4xx) may take.
const FATAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// On shutdown, how long requests already handed to the VMM get to be answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// One request waiting for its answer.
#[derive(Debug)]
pub struct ApiCall {
    pub request: ApiRequest,
    pub reply: oneshot::Sender<ApiResult>,
}

/// Tunables of the server; [`Default`] gives the documented constants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// A group whose members may use the API: the socket is 0660 and owned
    /// by it instead of 0600.
    pub socket_group: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            request_timeout: REQUEST_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            socket_group: None,
        }
    }
}

type Dispatch = Arc<dyn Fn(ApiCall) + Send + Sync>;

/// A running API server. Dropping it (or [`ApiServer::shutdown`]) removes the
/// socket file, stops accepting, lets requests already handed to the VMM be
/// answered (for up to 2 s), and joins the server thread.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// The socket file, removed when the server stops (if still ours).
    socket: Option<SocketFile>,
    stop: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The socket path the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Whether the server thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops serving and removes the socket file (as dropping does).
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        drop(self.socket.take());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            // Dropped from the dispatch callback (on the server thread itself):
            // the serve loop ends on its own; joining would deadlock.
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Binds the socket synchronously (so it exists and accepts when this
/// returns), then serves on a new thread.
///
/// The socket is bound by [`socket::bind`]: 0600 (0660 for
/// [`ServerOptions::socket_group`]); a stale socket file at `socket_path`
/// (nobody answers on it) is replaced; a live one is an error ("... is in use
/// by another process"), and so is a file that is not a socket.
///
/// `dispatch` is called on the server thread for each valid request: it must
/// not block (hand the call to the VMM's control loop, which answers through
/// [`ApiCall::reply`]). If the reply sender is dropped unanswered, the client
/// gets a 500.
pub fn start_server(
    socket_path: &Path,
    dispatch: impl Fn(ApiCall) + Send + Sync + 'static,
) -> io::Result<ApiServer> {
    start_server_with(socket_path, ServerOptions::default(), dispatch)
}

/// [`start_server`] with other timeouts or connection limit.
pub fn start_server_with(
    socket_path: &Path,
    options: ServerOptions,
    dispatch: impl Fn(ApiCall) + Send + Sync + 'static,
) -> io::Result<ApiServer> {
    let (listener, file) = socket::bind(socket_path, options.socket_group.as_deref())?;
    let mut server = ApiServer {
        path: socket_path.to_path_buf(),
        socket: Some(file),
        stop: None,
        thread: None,
    };
    // From here on, an error drops `server`, which removes the socket file.
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let listener = {
        let _guard = runtime.enter();
        UnixListener::from_std(listener)?
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let dispatch: Dispatch = Arc::new(dispatch);
    let thread = thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            confine::apply(confine::ThreadKind::Api);
            runtime.block_on(serve(listener, dispatch, stop_rx, options))
        })?;
    server.stop = Some(stop_tx);
    server.thread = Some(thread);
    Ok(server)
}

async fn serve(
    listener: UnixListener,
    dispatch: Dispatch,
    mut stop: watch::Receiver<bool>,
    options: ServerOptions,
) {
    let options = Arc::new(options);
    let waiting = Waiting::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // A change, or the sender gone: either way, stop.
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Finished connections must not count against the limit.
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= options.max_connections && !waiting.evict_oldest() {
                        // Every connection has a request with the VMM.
                        // Answered apart, so the limit holds against a flood.
                        tokio::spawn(refuse(stream));
                    } else {
                        let context = Context {
                            dispatch: dispatch.clone(),
                            options: options.clone(),
                            waiting: waiting.clone(),
                        };
                        // Waiting from now on, so a burst of newcomers can
                        // close it before its task first runs.
                        let first = waiting.enter();
                        connections.spawn(connection(stream, context, stop.clone(), first));
                    }
                }
                // Out of fds or similar: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
    }
    drop(listener);
    // Connections close when idle or after their current request; give
    // requests already handed to the VMM a moment to be answered.
    let _ = timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// The connections waiting for (the rest of) a request, in the order they
/// started waiting: the ones closed to make room at the connection limit.
#[derive(Clone, Default)]
struct Waiting(Arc<Mutex<WaitingInner>>);

#[derive(Default)]
struct WaitingInner {
    next: u64,
    closers: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Waiting {
    fn new() -> Waiting {
        Waiting::default()
    }

    /// Enters a connection; it closes when the receiver fires.
    fn enter(&self) -> (u64, oneshot::Receiver<()>) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (closer, closed) = oneshot::channel();
        let ticket = inner.next;
        inner.next += 1;
        inner.closers.insert(ticket, closer);
        (ticket, closed)
    }

    fn leave(&self, ticket: u64) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.closers.remove(&ticket);
    }

    /// Closes the connection that has waited longest; false if none waits.
    fn evict_oldest(&self) -> bool {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((_, closer)) = inner.closers.pop_first() {
            if closer.send(()).is_ok() {
                return true;
            }
        }
        false
    }
}

/// What every connection task shares.
struct Context {
    dispatch: Dispatch,
    options: Arc<ServerOptions>,
    waiting: Waiting,
}

async fn refuse(mut stream: UnixStream) {
    let response = Response::error(
        503,
        ApiError::internal("too many API connections; try again later"),
    );
    let _ = timeout(
        Duration::from_secs(1),
        write_response(&mut stream, &response),
    )
    .await;
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the client sent a Content-Length header.
    pub has_length: bool,
    /// Close the connection after answering.
    pub close: bool,
}

/// A response to write.
struct Response {
    status: u16,
    body: Option<String>,
    allow: Option<String>,
    close: bool,
}

impl Response {
    fn error(status: u16, error: ApiError) -> Response {
        let body = serde_json::to_string(&error).unwrap_or_else(|_| {
            r#"{"kind":"internal","message":"cannot serialize the error"}"#.to_string()
        });
        Response {
            status,
            body: Some(body),
            allow: None,
            close: false,
        }
    }

    fn api_error(error: ApiError) -> Response {
        Response::error(error.kind.http_status(), error)
    }

    /// A framing error: the request could not be read, so the connection
    /// cannot go on.
    fn fatal(status: u16, message: impl Into<String>) -> Response {
        let kind = if status == 413 {
            ApiErrorKind::TooLarge
        } else {
            ApiErrorKind::BadRequest
        };
        let mut response = Response::error(status, ApiError::new(kind, message));
        response.close = true;
        response
    }
}

enum ReadOutcome {
    Request(Request),
    /// The client went away (or stayed idle too long, or the server stops):
    /// nothing to answer.
    Closed,
    /// Answer this and close.
    Fatal(Response),
}

async fn connection(
    mut stream: UnixStream,
    context: Context,
    mut stop: watch::Receiver<bool>,
    first: (u64, oneshot::Receiver<()>),
) {
    let mut buf = Vec::new();
    // A new connection gets no more time for its first request than for the
    // rest of one; kept-alive ones may idle longer between requests.
    let mut idle_timeout = context.options.request_timeout;
    let mut wait = Some(first);
    loop {
        let (ticket, mut evicted) = wait.take().unwrap_or_else(|| context.waiting.enter());
        let outcome = tokio::select! {
            outcome = read_request(&mut stream, &mut buf, &mut stop, &context.options, idle_timeout) => outcome,
            _ = &mut evicted => ReadOutcome::Closed,
        };
        context.waiting.leave(ticket);
        idle_timeout = context.options.idle_timeout;
        let request = match outcome {
            ReadOutcome::Request(request) => request,
            ReadOutcome::Closed => return,
            ReadOutcome::Fatal(response) => {
                let _ = timeout(FATAL_WRITE_TIMEOUT, write_response(&mut stream, &response)).await;
                return;
            }
        };
        let close = request.close;
        let mut response = answer(request, &context.dispatch).await;
        response.close |= close || *stop.borrow();
        if write_response(&mut stream, &response).await.is_err() || response.close {
            return;
        }
    }
}

/// Reads into `buf`; Ok(0) at end of stream.
async fn read_more(stream: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

async fn read_request(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    stop: &mut watch::Receiver<bool>,
    options: &ServerOptions,
    idle_timeout: Duration,
) -> ReadOutcome {
    // Idle: wait for the first byte of the next request.
    if buf.is_empty() {
        if *stop.borrow() {
            return ReadOutcome::Closed;
        }
        tokio::select! {
            read = timeout(idle_timeout, read_more(stream, buf)) => match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return ReadOutcome::Closed,
            },
            _ = stop.changed() => return ReadOutcome::Closed,
        }
    }
    let deadline = Instant::now() + options.request_timeout;
    let timed_out = || ReadOutcome::Fatal(Response::fatal(408, "timed out reading the request"));

    // The head.
    let (head, end) = loop {
        match take_head(buf) {
            Ok(Some(found)) => break found,
            Ok(None) => {}
            Err(response) => return ReadOutcome::Fatal(response),
        }
        match timeout_at(deadline, read_more(stream, buf)).await {
            Err(_) => return timed_out(),
            Ok(Ok(0)) | Ok(Err(_)) => return ReadOutcome::Closed,
            Ok(Ok(_)) => {}
        }
    };
    buf.drain(..end);

    // The body.
    let length = head.content_length.unwrap_or(0) as usize;
    if head.expect_continue && buf.len() < length {
        let sent = timeout_at(deadline, stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")).await;
        if !matches!(sent, Ok(Ok(()))) {
            return ReadOutcome::Closed;
        }
    }
    while buf.len() < length {
        match timeout_at(deadline, read_more(stream, buf)).await {
            Err(_) => return timed_out(),
            Ok(Ok(0)) | Ok(Err(_)) => return ReadOutcome::Closed,
            Ok(Ok(_)) => {}
        }
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    ReadOutcome::Request(Request {
        method: head.method,
        path: head.path,
        body,
        has_length: head.content_length.is_some(),
        close: head.close,
    })
}

/// The head of the request at the start of `buf` and where it ends, once
/// it is all there (None before); or the answer that refuses it: a head over
/// [`MAX_HEAD_SIZE`], a malformed head, a body over [`MAX_BODY_SIZE`].
fn take_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Response> {
    let too_large = || {
        Response::fatal(
            431,
            format!("the request head is over {MAX_HEAD_SIZE} bytes"),
        )
    };
    let Some((start, end)) = find_head(buf) else {
        return if buf.len() >= MAX_HEAD_SIZE {
            Err(too_large())
        } else {
            Ok(None)
        };
    };
    if end - start > MAX_HEAD_SIZE {
        return Err(too_large());
    }
    let head = parse_head(&buf[start..end])?;
    let length = head.content_length.unwrap_or(0);
    if length > MAX_BODY_SIZE as u64 {
        return Err(Response::fatal(
            413,
            format!("the request body ({length} bytes) is over the {MAX_BODY_SIZE}-byte limit"),
        ));
    }
    Ok(Some((head, end)))
}

/// The server's request parser on bytes in memory, for fuzzing: the first
/// request in `buf` and the bytes it took (None while incomplete), or the
/// status and JSON error body the server answers before closing the
/// connection.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, (u16, String)> {
    let refused = |r: Response| (r.status, r.body.unwrap_or_default());
    let Some((head, end)) = take_head(buf).map_err(refused)? else {
        return Ok(None);
    };
    // At most MAX_BODY_SIZE (checked by take_head).
    let length = head.content_length.unwrap_or(0) as usize;
    let Some(body) = buf[end..].get(..length) else {
        return Ok(None);
    };
    let request = Request {
        method: head.method,
        path: head.path,
        body: body.to_vec(),
        has_length: head.content_length.is_some(),
        close: head.close,
    };
    Ok(Some((request, end + length)))
}

struct Head {
    method: String,
    path: String,
    content_length: Option<u64>,
    close: bool,
    expect_continue: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, Response> {
    let bad = |message: String| Response::fatal(400, message);
    let (first, headers) = split_head(head).map_err(|e| bad(e.to_string()))?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("malformed request line {:?}", clip(first))));
    };
    if method.is_empty() || !method.bytes().all(super::wire::is_token_byte) {
        return Err(bad(format!("malformed method {:?}", clip(method))));
    }
    if !target.starts_with('/') {
        return Err(bad(format!(
            "the request target {:?} is not a path",
            clip(target)
        )));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ if version.starts_with("HTTP/") => {
            return Err(Response::fatal(
                505,
                format!("{} is not supported; use HTTP/1.1", clip(version)),
            ))
        }
        _ => return Err(bad(format!("malformed request line {:?}", clip(first)))),
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);

    let mut content_length = None;
    let mut close = http10;
    let mut expect_continue = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(value)
                .ok_or_else(|| bad(format!("bad Content-Length {:?}", clip(value))))?;
            if content_length.is_some_and(|l| l != length) {
                return Err(bad("conflicting Content-Length headers".to_string()));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::fatal(
                411,
                "chunked or encoded request bodies are not supported: send a Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(value, "close") {
                close = true;
            } else if has_token(value, "keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        content_length,
        close,
        expect_continue,
    })
}

/// Routes a request and builds what it asks of the VMM, or the answer that
/// refuses it.
fn route_request(request: &Request) -> Result<(&'static Route, ApiRequest), Response> {
    let route = match find_route(&request.method, &request.path) {
        Ok(route) => route,
        Err(RouteError::NotFound) => {
            return Err(Response::api_error(ApiError::new(
                ApiErrorKind::NotFound,
                format!("no endpoint {}", clip(&request.path)),
            )))
        }
        Err(RouteError::MethodNotAllowed { allow }) => {
            let mut response = Response::api_error(ApiError::new(
                ApiErrorKind::MethodNotAllowed,
                format!(
                    "{} takes {allow}, not {}",
                    clip(&request.path),
                    clip(&request.method)
                ),
            ));
            response.allow = Some(allow);
            return Err(response);
        }
    };
    let body = (!request.body.is_empty()).then_some(&request.body[..]);
    match (route.body, body) {
        (BodyKind::None, Some(_)) => {
            return Err(Response::api_error(ApiError::bad_request(format!(
                "{} takes no request body",
                route.name()
            ))))
        }
        (BodyKind::Required(schema), None) if !request.has_length => {
            return Err(Response::error(
                411,
                ApiError::bad_request(format!(
                    "{} needs a {schema} JSON body with a Content-Length",
                    route.name()
                )),
            ))
        }
        (BodyKind::Required(schema), None) => {
            return Err(Response::api_error(ApiError::bad_request(format!(
                "{} needs a {schema} JSON body",
                route.name()
            ))))
        }
        _ => {}
    }
    let api_request = (route.parse)(body).map_err(Response::api_error)?;
    Ok((route, api_request))
}

/// [`route_request`] for fuzzing: the request for the VMM, or the status
/// and JSON error body the server answers.
pub fn api_request(request: &Request) -> Result<ApiRequest, (u16, String)> {
    route_request(request)
        .map(|(_, api_request)| api_request)
        .map_err(|r| (r.status, r.body.unwrap_or_default()))
}

/// Routes a request, hands it to the VMM and waits for the answer.
async fn answer(request: Request, dispatch: &Dispatch) -> Response {
    let (route, api_request) = match route_request(&request) {
        Ok(routed) => routed,
        Err(response) => return response,
    };

    let (reply, answer) = oneshot::channel();
    let call = ApiCall {
        request: api_request,
        reply,
    };
    if catch_unwind(AssertUnwindSafe(|| dispatch(call))).is_err() {
        return Response::api_error(ApiError::internal(format!(
            "the VMM failed on {}",
            route.name()
        )));
    }
    match answer.await {
        Ok(Ok(ApiResponse::Empty)) => Response {
            status: 204,
            body: None,
            allow: None,
            close: false,
        },
        Ok(Ok(response)) => Response {
            status: 200,
            body: response.to_json(),
            allow: None,
            close: false,
        },
        Ok(Err(error)) => Response::api_error(error),
        Err(_) => Response::api_error(ApiError::internal(format!(
            "the VMM dropped the {} request without answering",
            route.name()
        ))),
    }
}

async fn write_response(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    if let Some(allow) = &response.allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    if let Some(body) = &response.body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    } else if response.status != 204 {
        out.push_str("Content-Length: 0\r\n");
    }
    if response.close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if let Some(body) = &response.body {
        out.push_str(body);
    }
    let write = async {
        stream.write_all(out.as_bytes()).await?;
        if response.close {
            stream.shutdown().await?;
        }
        Ok(())
    };
    match timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse() {
        let head = parse_head(b"PUT /api/v1/vm.create?x=1 HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .ok()
            .unwrap();
        assert_eq!(head.method, "PUT");
        assert_eq!(head.path, "/api/v1/vm.create");
        assert_eq!(head.content_length, Some(5));
        assert!(head.expect_continue);
        assert!(!head.close);
        let head = parse_head(b"GET / HTTP/1.0\r\n\r\n").ok().unwrap();
        assert!(head.close);
        let head = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .ok()
            .unwrap();
        assert!(!head.close);
    }

    #[test]
    fn bad_heads_are_refused() {
        let status = |head: &[u8]| parse_head(head).err().map(|r| r.status);
        assert_eq!(status(b"GET /\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET  / HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), Some(505));
        assert_eq!(status(b"GET / FTP/1.0\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET x HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status(b"G(T / HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(411)
        );
        assert!(
            parse_head(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n").is_ok()
        );
    }
}
