//! The HTTP side: routes, and the checks every request passes first.
//!
//! Every request: the `Host` must be one this server answers to (an IP
//! address, `localhost` or an `--allow-host` name: a DNS-rebinding page on
//! another name cannot reach it); when authentication is required, a
//! session or bearer token. Every state change is a POST that must carry
//! the session's CSRF token (or a bearer token) and must not come from
//! another origin. GETs change nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use api::http::{ApiClient, ClientError, Method as ApiMethod};
use api::request::{
    validate_migration_url, MigrationParameters, SendMigrationRequest, ShutdownMode,
    ShutdownRequest,
};
use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, Form, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use crate::assets;
use crate::auth::{self, Auth, CSRF_HEADER, SESSION_COOKIE};
use crate::cluster;
use crate::console::Consoles;
use crate::error::{WebError, WebResult};
use crate::monitor::Monitor;

/// How long an action may wait for a VMM.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// The largest migration token file read.
pub const MAX_TOKEN_FILE: u64 = 4096;

pub struct AppState {
    pub monitor: Arc<Monitor>,
    pub consoles: Arc<Consoles>,
    pub auth: Auth,
    /// Host names answered besides IP addresses and `localhost`.
    pub allow_hosts: Vec<String>,
    pub socket_dir: PathBuf,
}

/// Who is asking, as the guard found out.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// The session id and its CSRF token, from the cookie.
    pub session: Option<(String, String)>,
    /// Authenticated by `Authorization: Bearer`.
    pub bearer: bool,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{file}", get(asset))
        .route("/api/session", get(session_info))
        .route("/api/guests", get(guests))
        .route("/api/events", get(events))
        .route("/api/guests/{name}", get(guest_detail))
        .route(
            "/api/guests/{name}/console",
            get(console_read).post(console_write),
        )
        .route("/api/guests/{name}/{action}", post(guest_action))
        .route("/api/cluster", get(cluster_view))
        .route("/api/cluster/move", post(cluster_move))
        .route("/api/cluster/clear", post(cluster_clear))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::map_response(security_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> WebError {
    WebError::NotFound(uri.path().to_string())
}

/// Headers on every response: the page loads only its own scripts and
/// styles, is never framed, and API answers are never cached.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        // Not no-referrer: with it, browsers send `Origin: null` on form posts.
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The host part of a `Host` header (`[::1]:8010` -> `::1`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn host_allowed(host: &str, allow: &[String]) -> bool {
    let name = host_name(host).to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || allow.contains(&name)
}

/// Refuses a state change that a browser says comes from another site.
fn same_origin(headers: &HeaderMap) -> WebResult<()> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return Err(WebError::Csrf("the request comes from another site"));
        }
    }
    if let Some(origin) = text("origin") {
        let authority = origin.split_once("://").map(|(_, a)| a);
        if authority.is_none() || authority != text("host") {
            return Err(WebError::Csrf("the request comes from another origin"));
        }
    }
    Ok(())
}

/// The checks every request passes (see the module's documentation).
async fn guard(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    match check(&state, &request) {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(e) => {
            let page =
                request.method() == Method::GET && !request.uri().path().starts_with("/api/");
            if page && matches!(e, WebError::Unauthenticated) {
                Redirect::to("/login").into_response()
            } else {
                e.into_response()
            }
        }
    }
}

fn check(state: &AppState, request: &Request) -> WebResult<Identity> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !host_allowed(host, &state.allow_hosts) {
        return Err(WebError::BadHost(host.to_string()));
    }
    let mut identity = Identity::default();
    let cookie = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| auth::cookie(c, SESSION_COOKIE));
    if let Some(id) = cookie {
        if let Some(session) = state.auth.session(id) {
            identity.session = Some((id.to_string(), session.csrf));
        }
    }
    // Only a checked token counts (other schemes, e.g. a proxy's Basic
    // credentials, are not ours); without a login token there is nothing to
    // check, and a bearer header proves nothing.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if let (Some(token), true) = (bearer, state.auth.required()) {
        state.auth.check_token(token)?;
        identity.bearer = true;
    }
    let path = request.uri().path();
    let public = path == "/login" || path.starts_with("/assets/");
    if state.auth.required() && identity.session.is_none() && !identity.bearer && !public {
        return Err(WebError::Unauthenticated);
    }
    let reads = [Method::GET, Method::HEAD];
    if !reads.contains(request.method()) {
        same_origin(headers)?;
        if path != "/login" && !identity.bearer {
            let Some((_, csrf)) = &identity.session else {
                return Err(WebError::Csrf(
                    "no session: load the page first (or send Authorization: Bearer)",
                ));
            };
            let sent = headers
                .get(CSRF_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !auth::constant_time_eq(sent, csrf.as_bytes()) {
                return Err(WebError::Csrf(
                    "missing or wrong X-CSRF-Token header (reload the page)",
                ));
            }
        }
    }
    Ok(identity)
}

/// The session of this request, made now if it has none (only where no
/// login is required: otherwise sessions come from logging in).
fn ensure_session(
    state: &AppState,
    identity: &Identity,
) -> WebResult<(Option<HeaderValue>, Option<String>)> {
    if let Some((_, csrf)) = &identity.session {
        return Ok((None, Some(csrf.clone())));
    }
    if state.auth.required() {
        return Ok((None, None));
    }
    let (id, session) = state.auth.new_session()?;
    let cookie = HeaderValue::from_str(&auth::session_cookie(&id))
        .map_err(|e| WebError::Internal(e.to_string()))?;
    Ok((Some(cookie), Some(session.csrf)))
}

fn with_cookie(cookie: Option<HeaderValue>, response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    if let Some(cookie) = cookie {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn index(
    State(state): State<Arc<AppState>>,
    Extension(identity): Extension<Identity>,
) -> WebResult<Response> {
    let (cookie, _) = ensure_session(&state, &identity)?;
    Ok(with_cookie(cookie, Html(assets::INDEX_HTML)))
}

fn login_html(message: &str) -> Html<String> {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    Html(assets::LOGIN_HTML.replace("{{message}}", &escaped))
}

async fn login_page(State(state): State<Arc<AppState>>) -> Response {
    if !state.auth.required() {
        return Redirect::to("/").into_response();
    }
    login_html("").into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<Arc<AppState>>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    // A malformed form is a wrong token (and counts as a failure).
    let token = form.map(|Form(f)| f.token).unwrap_or_default();
    match state.auth.check_token(token.as_bytes()) {
        Ok(()) => match state.auth.new_session() {
            Ok((id, _)) => {
                let mut response = Redirect::to("/").into_response();
                if let Ok(cookie) = HeaderValue::from_str(&auth::session_cookie(&id)) {
                    response.headers_mut().insert(header::SET_COOKIE, cookie);
                }
                response
            }
            Err(e) => e.into_response(),
        },
        Err(e) => (e.status(), login_html(&e.to_string())).into_response(),
    }
}

async fn logout(
    State(state): State<Arc<AppState>>,
    Extension(identity): Extension<Identity>,
) -> Response {
    if let Some((id, _)) = &identity.session {
        state.auth.end_session(id);
    }
    let mut response =
        Redirect::to(if state.auth.required() { "/login" } else { "/" }).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&auth::expired_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn asset(UrlPath(file): UrlPath<String>) -> WebResult<Response> {
    let (kind, bytes) =
        assets::asset(&file).ok_or_else(|| WebError::bad("path", "no such file"))?;
    Ok(([(header::CONTENT_TYPE, kind)], bytes).into_response())
}

#[derive(Serialize)]
struct SessionInfo {
    csrf_token: Option<String>,
    auth_required: bool,
    /// Whether the VMM API has `vm.reboot` (the page hides the button if not).
    reboot_supported: bool,
    socket_dir: String,
    version: &'static str,
}

/// Whether this build's API has `PUT vm.reboot`.
pub fn reboot_supported() -> bool {
    api::http::routes::route_named(ApiMethod::Put, "vm.reboot").is_some()
}

async fn session_info(
    State(state): State<Arc<AppState>>,
    Extension(identity): Extension<Identity>,
) -> WebResult<Response> {
    let (cookie, csrf) = ensure_session(&state, &identity)?;
    Ok(with_cookie(
        cookie,
        Json(SessionInfo {
            csrf_token: csrf,
            auth_required: state.auth.required(),
            reboot_supported: reboot_supported(),
            socket_dir: state.socket_dir.display().to_string(),
            version: env!("CARGO_PKG_VERSION"),
        }),
    ))
}

async fn guests(State(state): State<Arc<AppState>>) -> Response {
    Json(state.monitor.snapshot()).into_response()
}

/// Server-sent events: a `snapshot` event with the whole guest list every
/// interval (the first one at once).
async fn events(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut rx = state.monitor.subscribe();
    rx.mark_changed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let json = rx.borrow_and_update().clone();
        let event = Event::default().event("snapshot").data(json.as_str());
        Some((Ok::<_, std::convert::Infallible>(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The socket of guest `name`, which must be `NAME.sock` in the socket
/// directory (names with path parts are refused before the file system sees them).
fn guest_socket(state: &AppState, name: &str) -> WebResult<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(WebError::NoSuchGuest(name.into()));
    }
    let path = state.socket_dir.join(format!("{name}.sock"));
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => Ok(path),
        _ => Err(WebError::NoSuchGuest(name.into())),
    }
}

/// Runs `call` with a client for `socket` on the blocking pool.
async fn with_vmm<T: Send + 'static>(
    guest: &str,
    socket: PathBuf,
    call: impl FnOnce(&ApiClient) -> Result<T, ClientError> + Send + 'static,
) -> WebResult<T> {
    tokio::task::spawn_blocking(move || call(&ApiClient::new(socket).with_timeout(ACTION_TIMEOUT)))
        .await
        .map_err(|e| WebError::Internal(format!("the VMM call failed: {e}")))?
        .map_err(|e| WebError::vmm(guest, e))
}

#[derive(Serialize)]
struct GuestDetail {
    name: String,
    socket: String,
    ping: api::request::PingInfo,
    info: Option<api::request::VmInfo>,
    counters: Option<api::request::Counters>,
    balloon: Option<api::request::BalloonStatistics>,
    migration: Option<api::request::MigrationStatus>,
    /// Errors of the parts that could not be read, in words.
    errors: Vec<String>,
}

async fn guest_detail(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> WebResult<Json<GuestDetail>> {
    let socket = guest_socket(&state, &name)?;
    let ping = with_vmm(&name, socket.clone(), |c| c.ping()).await?;
    let path = socket.clone();
    let detail = tokio::task::spawn_blocking(move || {
        let client = ApiClient::new(path).with_timeout(ACTION_TIMEOUT);
        let mut errors = Vec::new();
        let info = keep(&mut errors, "vm.info", client.info());
        let counters = keep(&mut errors, "vm.counters", client.counters());
        let balloon = match info.as_ref().map(|i| i.config.balloon.is_some()) {
            Some(true) => keep(
                &mut errors,
                "vm.balloon-statistics",
                client.balloon_statistics(),
            ),
            _ => None,
        };
        let migration = keep(
            &mut errors,
            "vm.migration-status",
            client.migration_status(),
        );
        (info, counters, balloon, migration, errors)
    })
    .await
    .map_err(|e| WebError::Internal(e.to_string()))?;
    let (info, counters, balloon, migration, errors) = detail;
    Ok(Json(GuestDetail {
        name,
        socket: socket.display().to_string(),
        ping,
        info,
        counters,
        balloon,
        migration,
        errors,
    }))
}

/// The value of a successful call; the error, in words, into `errors`.
fn keep<T>(errors: &mut Vec<String>, what: &str, result: Result<T, ClientError>) -> Option<T> {
    result.map_err(|e| errors.push(format!("{what}: {e}"))).ok()
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn console_read(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    Query(since): Query<Since>,
) -> WebResult<Response> {
    guest_socket(&state, &name)?;
    let consoles = state.consoles.clone();
    let chunk = tokio::task::spawn_blocking(move || consoles.read(&name, since.since))
        .await
        .map_err(|e| WebError::Internal(e.to_string()))??;
    Ok(Json(chunk).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleInput {
    data: String,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> WebResult<T> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| WebError::bad("body", e.to_string()))
}

async fn console_write(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> WebResult<Response> {
    guest_socket(&state, &name)?;
    let input: ConsoleInput = parse_json(&body)?;
    let consoles = state.consoles.clone();
    tokio::task::spawn_blocking(move || consoles.write(&name, input.data.as_bytes()))
        .await
        .map_err(|e| WebError::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize)]
pub struct Done {
    pub message: String,
}

fn done(message: String) -> Response {
    Json(Done { message }).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    /// Force the guest off if it has not stopped after this long.
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonBody {
    target_mib: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    destination: String,
    token_file: String,
    #[serde(default)]
    downtime_ms: Option<u64>,
    #[serde(default)]
    bandwidth_mib_per_s: Option<u64>,
}

/// The token in a token file on this host: a regular file of at most
/// [`MAX_TOKEN_FILE`] bytes; its first line.
fn read_token_file(path: &str) -> WebResult<String> {
    let file_error = |message: String| WebError::File {
        field: "token_file",
        path: path.to_string(),
        message,
    };
    if !path.starts_with('/') {
        return Err(file_error("must be an absolute path on this host".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| file_error(e.to_string()))?;
    if !meta.is_file() {
        return Err(file_error("is not a regular file".into()));
    }
    if meta.len() > MAX_TOKEN_FILE {
        return Err(file_error(format!(
            "is {} bytes; a token file has at most {MAX_TOKEN_FILE}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let token = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r');
    if token.is_empty() {
        return Err(file_error("is empty (its first line is the token)".into()));
    }
    Ok(token.to_string())
}

async fn guest_action(
    State(state): State<Arc<AppState>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    body: Bytes,
) -> WebResult<Response> {
    let socket = guest_socket(&state, &name)?;
    let guest = name.as_str();
    match action.as_str() {
        "pause" => {
            with_vmm(guest, socket, |c| c.pause()).await?;
            Ok(done(format!("{name} is paused")))
        }
        "resume" => {
            with_vmm(guest, socket, |c| c.resume()).await?;
            Ok(done(format!("{name} runs again")))
        }
        "shutdown" => {
            let body: ShutdownBody = parse_json(&body)?;
            let request = ShutdownRequest {
                mode: ShutdownMode::Graceful,
                timeout_ms: body.timeout_ms,
            };
            with_vmm(guest, socket, move |c| c.shutdown(&request)).await?;
            Ok(done(format!(
                "{name} was asked to shut down (ACPI power button){}",
                body.timeout_ms
                    .map(|ms| format!("; forced off after {} s", ms / 1000))
                    .unwrap_or_default()
            )))
        }
        "stop" => {
            let request = ShutdownRequest {
                mode: ShutdownMode::Force,
                timeout_ms: None,
            };
            with_vmm(guest, socket, move |c| c.shutdown(&request)).await?;
            Ok(done(format!("{name} was forced off")))
        }
        "reboot" => {
            if !reboot_supported() {
                return Err(WebError::Unsupported {
                    guest: name,
                    endpoint: "vm.reboot",
                });
            }
            with_vmm(guest, socket, |c| {
                let route = api::http::routes::route_named(ApiMethod::Put, "vm.reboot")
                    .ok_or_else(|| ClientError::InvalidRequest("no vm.reboot route".into()))?;
                c.call_route(route, None).map(drop)
            })
            .await?;
            Ok(done(format!("{name} reboots")))
        }
        "balloon" => {
            let body: BalloonBody = parse_json(&body)?;
            let target = body.target_mib;
            with_vmm(guest, socket, move |c| c.balloon(target)).await?;
            Ok(done(format!(
                "{name} was asked to give back {target} MiB (balloon target)"
            )))
        }
        "migrate" => {
            let body: MigrateBody = parse_json(&body)?;
            validate_migration_url("destination", &body.destination)?;
            let parameters = MigrationParameters {
                downtime_ms: body
                    .downtime_ms
                    .unwrap_or(MigrationParameters::default().downtime_ms),
                bandwidth_bytes_per_s: body.bandwidth_mib_per_s.map(|m| m.saturating_mul(1 << 20)),
                ..MigrationParameters::default()
            };
            parameters.validate()?;
            let token_file = body.token_file.clone();
            let token = tokio::task::spawn_blocking(move || read_token_file(&token_file))
                .await
                .map_err(|e| WebError::Internal(e.to_string()))??;
            let request = SendMigrationRequest {
                destination: body.destination.clone(),
                token,
                parameters,
                tls_dir: None,
                force: false,
            };
            with_vmm(guest, socket.clone(), move |c| c.send_migration(&request)).await?;
            state
                .monitor
                .migration_started(&name, socket, body.destination.clone());
            Ok(done(format!("{name} is migrating to {}", body.destination)))
        }
        "migrate-cancel" => {
            with_vmm(guest, socket, |c| c.migration_cancel()).await?;
            Ok(done(format!(
                "the migration of {name} was cancelled; it keeps running here"
            )))
        }
        other => Err(WebError::bad(
            "action",
            format!(
                "{other:?} is not one of pause, resume, shutdown, stop, reboot, balloon, \
                 migrate, migrate-cancel"
            ),
        )),
    }
}

async fn cluster_view() -> Response {
    Json(cluster::cluster_view().await).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    resource: String,
    node: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    resource: String,
}

async fn cluster_move(body: Bytes) -> WebResult<Response> {
    let body: MoveBody = parse_json(&body)?;
    Ok(done(
        cluster::move_resource(&body.resource, &body.node).await?,
    ))
}

async fn cluster_clear(body: Bytes) -> WebResult<Response> {
    let body: ClearBody = parse_json(&body)?;
    Ok(done(cluster::clear_resource(&body.resource).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_localhost_and_allowed_names_are_answered() {
        let allow = vec!["console.example".to_string()];
        for (host, ok) in [
            ("127.0.0.1:8010", true),
            ("[::1]:8010", true),
            ("10.1.2.3", true),
            ("localhost:8010", true),
            ("LOCALHOST", true),
            ("console.example:443", true),
            ("evil.example:8010", false),
            ("", false),
        ] {
            assert_eq!(host_allowed(host, &allow), ok, "{host}");
        }
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:8010"));
        assert!(same_origin(&headers).is_ok());
        headers.insert("origin", HeaderValue::from_static("http://127.0.0.1:8010"));
        assert!(same_origin(&headers).is_ok());
        headers.insert("origin", HeaderValue::from_static("http://evil.example"));
        assert!(same_origin(&headers).is_err());
        headers.insert("origin", HeaderValue::from_static("null"));
        assert!(same_origin(&headers).is_err());
        headers.remove("origin");
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&headers).is_err());
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&headers).is_ok());
    }

    #[test]
    fn token_files_are_checked_before_use() {
        let dir = std::env::temp_dir().join(format!("web-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "tok\n").unwrap();
        assert_eq!(read_token_file(file.to_str().unwrap()).unwrap(), "tok");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 5000]).unwrap();
        for (path, needle) in [
            ("relative", "absolute path"),
            (dir.to_str().unwrap(), "not a regular file"),
            (big.to_str().unwrap(), "at most 4096"),
            ("/nonexistent/token", "No such file"),
        ] {
            let e = read_token_file(path).unwrap_err().to_string();
            assert!(e.contains(needle), "{path}: {e}");
            assert!(e.starts_with("token_file: "), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
