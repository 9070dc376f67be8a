//! The route table: every endpoint of the API, in one place.
//!
//! The server routes with [`find_route`] and builds the [`ApiRequest`] with
//! [`Route::parse`]; the client turns an [`ApiRequest`] back into a route and
//! body with [`encode`] and decodes the reply with [`ReplyKind::decode`]; the
//! OpenAPI test checks that `api/openapi.yaml` describes exactly [`ROUTES`].
//!
//! To add an endpoint: add its [`ApiRequest`] variant, one row to [`ROUTES`],
//! one arm to [`encode`] (the compiler asks for it), and the path to
//! `openapi.yaml` (the OpenAPI test asks for it).

use std::fmt;

use serde::de::DeserializeOwned;

use crate::request::{
    validate_migration_url, ActionReply, ApiError, ApiRequest, ApiResponse, BalloonStatistics,
    BalloonUpdate, Counters, MigrationParameters, MigrationStatus, PingInfo,
    ReceiveMigrationRequest, ResumeRequest, SendMigrationRequest, ShutdownRequest, VmInfo,
};
use crate::request::{validate_snapshot_dir, RestoreRequest, SnapshotRequest};
use config::VmConfig;

/// Every path starts with this.
pub const API_PREFIX: &str = "/api/v1/";

/// The HTTP methods the API (and the client) know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Put,
    Post,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// Parses an upper-case method name (HTTP methods are case-sensitive).
    pub fn parse(text: &str) -> Option<Method> {
        Some(match text {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "POST" => Method::Post,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What request body an endpoint takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// None: a non-empty body is refused (400).
    None,
    /// A JSON document of the named schema (`components/schemas` in
    /// openapi.yaml), or nothing for its default.
    Optional(&'static str),
    /// A JSON document of the named schema; an empty body is refused.
    Required(&'static str),
}

/// What a successful reply carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// Nothing: 204.
    Empty,
    /// 200 with an [`ActionReply`]: what the action did.
    Action,
    /// 200 with a [`PingInfo`].
    Ping,
    /// 200 with a [`VmInfo`].
    Info,
    /// 200 with [`Counters`].
    Counters,
    /// 200 with a [`MigrationStatus`].
    MigrationStatus,
    /// 200 with [`BalloonStatistics`].
    BalloonStatistics,
}

impl ReplyKind {
    /// The schema name of the 200 body in openapi.yaml (None for 204).
    pub fn schema(self) -> Option<&'static str> {
        match self {
            ReplyKind::Empty => None,
            ReplyKind::Action => Some("ActionReply"),
            ReplyKind::Ping => Some("PingInfo"),
            ReplyKind::Info => Some("VmInfo"),
            ReplyKind::Counters => Some("Counters"),
            ReplyKind::MigrationStatus => Some("MigrationStatus"),
            ReplyKind::BalloonStatistics => Some("BalloonStatistics"),
        }
    }

    /// The success status: 204 for empty replies, 200 otherwise.
    pub fn status(self) -> u16 {
        match self {
            ReplyKind::Empty => 204,
            _ => 200,
        }
    }

    /// Decodes the body of a 2xx reply.
    pub fn decode(self, body: &[u8]) -> Result<ApiResponse, serde_json::Error> {
        fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
            serde_json::from_slice(body)
        }
        Ok(match self {
            ReplyKind::Empty => ApiResponse::Empty,
            ReplyKind::Action => ApiResponse::Action(json::<ActionReply>(body)?),
            ReplyKind::Ping => ApiResponse::Ping(json::<PingInfo>(body)?),
            ReplyKind::Info => ApiResponse::Info(Box::new(json::<VmInfo>(body)?)),
            ReplyKind::Counters => ApiResponse::Counters(json::<Counters>(body)?),
            ReplyKind::MigrationStatus => {
                ApiResponse::MigrationStatus(Box::new(json::<MigrationStatus>(body)?))
            }
            ReplyKind::BalloonStatistics => {
                ApiResponse::BalloonStatistics(Box::new(json::<BalloonStatistics>(body)?))
            }
        })
    }
}

/// One endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: Method,
    /// The full path, e.g. `/api/v1/vm.boot`.
    pub path: &'static str,
    pub body: BodyKind,
    pub reply: ReplyKind,
    /// Builds the request from the body (None for an empty body). Only called
    /// after the body was checked against [`Route::body`].
    pub parse: fn(Option<&[u8]>) -> Result<ApiRequest, ApiError>,
}

impl Route {
    /// The endpoint name: the path without [`API_PREFIX`] (`vm.boot`).
    pub fn name(&self) -> &'static str {
        self.path.strip_prefix(API_PREFIX).unwrap_or(self.path)
    }
}

/// Parses a JSON body into `T`, naming the field or position of any error.
fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    config::from_json(body).map_err(ApiError::from)
}

/// The API. Paths are unique per method; see the module doc to add one.
pub static ROUTES: &[Route] = &[
    Route {
        method: Method::Get,
        path: "/api/v1/vmm.ping",
        body: BodyKind::None,
        reply: ReplyKind::Ping,
        parse: |_| Ok(ApiRequest::VmmPing),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vmm.shutdown",
        body: BodyKind::None,
        reply: ReplyKind::Empty,
        parse: |_| Ok(ApiRequest::VmmShutdown),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.create",
        body: BodyKind::Required("VmConfig"),
        reply: ReplyKind::Empty,
        parse: |body| match body {
            Some(body) => Ok(ApiRequest::VmCreate(Box::new(VmConfig::from_json(body)?))),
            None => Err(ApiError::bad_request(
                "vm.create needs a VmConfig JSON body",
            )),
        },
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.boot",
        body: BodyKind::None,
        reply: ReplyKind::Action,
        parse: |_| Ok(ApiRequest::VmBoot),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.pause",
        body: BodyKind::None,
        reply: ReplyKind::Action,
        parse: |_| Ok(ApiRequest::VmPause),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.resume",
        body: BodyKind::Optional("ResumeRequest"),
        reply: ReplyKind::Action,
        parse: |body| {
            let request = match body {
                Some(body) => json_body::<ResumeRequest>(body)?,
                None => ResumeRequest::default(),
            };
            Ok(ApiRequest::VmResume(request))
        },
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.shutdown",
        body: BodyKind::Optional("ShutdownRequest"),
        reply: ReplyKind::Action,
        parse: |body| {
            let request = match body {
                Some(body) => json_body::<ShutdownRequest>(body)?,
                None => ShutdownRequest::default(),
            };
            Ok(ApiRequest::VmShutdown(request))
        },
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.reboot",
        body: BodyKind::None,
        reply: ReplyKind::Action,
        parse: |_| Ok(ApiRequest::VmReboot),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.power-button",
        body: BodyKind::None,
        reply: ReplyKind::Action,
        parse: |_| Ok(ApiRequest::VmPowerButton),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.delete",
        body: BodyKind::None,
        reply: ReplyKind::Action,
        parse: |_| Ok(ApiRequest::VmDelete),
    },
    Route {
        method: Method::Get,
        path: "/api/v1/vm.info",
        body: BodyKind::None,
        reply: ReplyKind::Info,
        parse: |_| Ok(ApiRequest::VmInfo),
    },
    Route {
        method: Method::Get,
        path: "/api/v1/vm.counters",
        body: BodyKind::None,
        reply: ReplyKind::Counters,
        parse: |_| Ok(ApiRequest::VmCounters),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.send-migration",
        body: BodyKind::Required("SendMigrationRequest"),
        reply: ReplyKind::Empty,
        parse: |body| {
            let body =
                body.ok_or_else(|| ApiError::bad_request("vm.send-migration needs a body"))?;
            let request = json_body::<SendMigrationRequest>(body)?;
            validate_migration_url("destination", &request.destination)?;
            request.parameters.validate()?;
            Ok(ApiRequest::VmSendMigration(request))
        },
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.receive-migration",
        body: BodyKind::Required("ReceiveMigrationRequest"),
        reply: ReplyKind::Empty,
        parse: |body| {
            let body =
                body.ok_or_else(|| ApiError::bad_request("vm.receive-migration needs a body"))?;
            let request = json_body::<ReceiveMigrationRequest>(body)?;
            validate_migration_url("listen", &request.listen)?;
            if request.timeout_s == Some(0) {
                return Err(ApiError::bad_request(
                    "timeout_s: must be at least 1 second",
                ));
            }
            Ok(ApiRequest::VmReceiveMigration(request))
        },
    },
    Route {
        method: Method::Get,
        path: "/api/v1/vm.migration-status",
        body: BodyKind::None,
        reply: ReplyKind::MigrationStatus,
        parse: |_| Ok(ApiRequest::VmMigrationStatus),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.migration-cancel",
        body: BodyKind::None,
        reply: ReplyKind::Empty,
        parse: |_| Ok(ApiRequest::VmMigrationCancel),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.migration-parameters",
        body: BodyKind::Required("MigrationParameters"),
        reply: ReplyKind::Empty,
        parse: |body| {
            let body =
                body.ok_or_else(|| ApiError::bad_request("vm.migration-parameters needs a body"))?;
            let parameters = json_body::<MigrationParameters>(body)?;
            parameters.validate()?;
            Ok(ApiRequest::VmMigrationParameters(parameters))
        },
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.balloon",
        body: BodyKind::Required("BalloonUpdate"),
        reply: ReplyKind::Empty,
        parse: |body| {
            let body = body.ok_or_else(|| ApiError::bad_request("vm.balloon needs a body"))?;
            Ok(ApiRequest::VmBalloon(json_body::<BalloonUpdate>(body)?))
        },
    },
    Route {
        method: Method::Get,
        path: "/api/v1/vm.balloon-statistics",
        body: BodyKind::None,
        reply: ReplyKind::BalloonStatistics,
        parse: |_| Ok(ApiRequest::VmBalloonStatistics),
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.snapshot",
        body: BodyKind::Required("SnapshotRequest"),
        reply: ReplyKind::Empty,
        parse: |body| {
            let body = body.ok_or_else(|| ApiError::bad_request("vm.snapshot needs a body"))?;
            let request = json_body::<SnapshotRequest>(body)?;
            validate_snapshot_dir("destination", &request.destination)?;
            Ok(ApiRequest::VmSnapshot(request))
        },
    },
    Route {
        method: Method::Put,
        path: "/api/v1/vm.restore",
        body: BodyKind::Required("RestoreRequest"),
        reply: ReplyKind::Empty,
        parse: |body| {
            let body = body.ok_or_else(|| ApiError::bad_request("vm.restore needs a body"))?;
            let request = json_body::<RestoreRequest>(body)?;
            validate_snapshot_dir("source", &request.source)?;
            Ok(ApiRequest::VmRestore(request))
        },
    },
];

/// Why [`find_route`] found no route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No endpoint has this path (404).
    NotFound,
    /// The path exists, with other methods (405): the `Allow` header value.
    MethodNotAllowed { allow: String },
}

/// The route for `method` (as sent) and `path` (without query string).
pub fn find_route(method: &str, path: &str) -> Result<&'static Route, RouteError> {
    let mut allowed: Vec<&'static str> = Vec::new();
    for route in ROUTES.iter().filter(|r| r.path == path) {
        if route.method.as_str() == method {
            return Ok(route);
        }
        allowed.push(route.method.as_str());
    }
    if allowed.is_empty() {
        Err(RouteError::NotFound)
    } else {
        allowed.sort_unstable();
        allowed.dedup();
        Err(RouteError::MethodNotAllowed {
            allow: allowed.join(", "),
        })
    }
}

/// The route of an endpoint name (`vm.boot`) and method.
pub fn route_named(method: Method, name: &str) -> Option<&'static Route> {
    ROUTES
        .iter()
        .find(|r| r.method == method && r.name() == name)
}

/// Why a request cannot be put on the wire.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode the request body: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no route for {method} {name}")]
    NoRoute { method: Method, name: &'static str },
}

/// The route and JSON body that carry `request` (the client side of
/// [`Route::parse`]). Fails only if the request cannot be serialized (a path
/// that is not UTF-8).
pub fn encode(request: &ApiRequest) -> Result<(&'static Route, Option<Vec<u8>>), EncodeError> {
    fn json<T: serde::Serialize>(value: &T) -> Result<Option<Vec<u8>>, EncodeError> {
        Ok(Some(serde_json::to_vec(value)?))
    }
    let (method, name, body) = match request {
        ApiRequest::VmmPing => (Method::Get, "vmm.ping", None),
        ApiRequest::VmmShutdown => (Method::Put, "vmm.shutdown", None),
        ApiRequest::VmCreate(config) => (Method::Put, "vm.create", json(config)?),
        ApiRequest::VmBoot => (Method::Put, "vm.boot", None),
        ApiRequest::VmPause => (Method::Put, "vm.pause", None),
        ApiRequest::VmResume(r) if !r.force => (Method::Put, "vm.resume", None),
        ApiRequest::VmResume(r) => (Method::Put, "vm.resume", json(r)?),
        ApiRequest::VmShutdown(shutdown) => (Method::Put, "vm.shutdown", json(shutdown)?),
        ApiRequest::VmReboot => (Method::Put, "vm.reboot", None),
        ApiRequest::VmPowerButton => (Method::Put, "vm.power-button", None),
        ApiRequest::VmDelete => (Method::Put, "vm.delete", None),
        ApiRequest::VmInfo => (Method::Get, "vm.info", None),
        ApiRequest::VmCounters => (Method::Get, "vm.counters", None),
        ApiRequest::VmSendMigration(r) => (Method::Put, "vm.send-migration", json(r)?),
        ApiRequest::VmReceiveMigration(r) => (Method::Put, "vm.receive-migration", json(r)?),
        ApiRequest::VmMigrationStatus => (Method::Get, "vm.migration-status", None),
        ApiRequest::VmMigrationCancel => (Method::Put, "vm.migration-cancel", None),
        ApiRequest::VmMigrationParameters(p) => (Method::Put, "vm.migration-parameters", json(p)?),
        ApiRequest::VmBalloon(b) => (Method::Put, "vm.balloon", json(b)?),
        ApiRequest::VmBalloonStatistics => (Method::Get, "vm.balloon-statistics", None),
        ApiRequest::VmSnapshot(r) => (Method::Put, "vm.snapshot", json(r)?),
        ApiRequest::VmRestore(r) => (Method::Put, "vm.restore", json(r)?),
    };
    let route = route_named(method, name).ok_or(EncodeError::NoRoute { method, name })?;
    Ok((route, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{MigrationPhase, ShutdownMode, TimeoutAction, VmState};

    /// One request per route: the round trip below must cover every route.
    fn samples() -> Vec<ApiRequest> {
        vec![
            ApiRequest::VmmPing,
            ApiRequest::VmmShutdown,
            ApiRequest::VmCreate(Box::new(
                VmConfig::from_json(br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2}}"#)
                    .unwrap(),
            )),
            ApiRequest::VmBoot,
            ApiRequest::VmPause,
            ApiRequest::VmResume(ResumeRequest { force: true }),
            ApiRequest::VmShutdown(ShutdownRequest {
                mode: ShutdownMode::Graceful,
                timeout_ms: Some(1500),
            }),
            ApiRequest::VmReboot,
            ApiRequest::VmPowerButton,
            ApiRequest::VmDelete,
            ApiRequest::VmInfo,
            ApiRequest::VmCounters,
            ApiRequest::VmSendMigration(SendMigrationRequest {
                destination: "tcp:10.0.0.2:6000".into(),
                token: "secret".into(),
                tls_dir: Some("/etc/vmm/tls".into()),
                force: false,
                parameters: MigrationParameters {
                    downtime_ms: 150,
                    bandwidth_bytes_per_s: Some(100 << 20),
                    timeout_s: Some(60),
                    timeout_action: TimeoutAction::Force,
                    auto_converge: false,
                },
            }),
            ApiRequest::VmReceiveMigration(ReceiveMigrationRequest {
                listen: "unix:/run/vmm/migrate.sock".into(),
                token: "secret".into(),
                tls_dir: Some("/etc/vmm/tls".into()),
                timeout_s: Some(120),
            }),
            ApiRequest::VmMigrationStatus,
            ApiRequest::VmMigrationCancel,
            ApiRequest::VmMigrationParameters(MigrationParameters::default()),
            ApiRequest::VmBalloon(BalloonUpdate { target_mib: 256 }),
            ApiRequest::VmBalloonStatistics,
            ApiRequest::VmSnapshot(SnapshotRequest {
                destination: "/var/lib/vmm/snapshots/web1".into(),
            }),
            ApiRequest::VmRestore(RestoreRequest {
                source: "/var/lib/vmm/snapshots/web1".into(),
            }),
        ]
    }

    #[test]
    fn every_route_round_trips() {
        let mut covered = std::collections::BTreeSet::new();
        for request in samples() {
            let (route, body) = encode(&request).unwrap();
            let parsed = (route.parse)(body.as_deref()).unwrap();
            assert_eq!(parsed, request, "{}", route.path);
            match route.body {
                BodyKind::None => assert!(body.is_none(), "{}", route.path),
                BodyKind::Required(_) => assert!(body.is_some(), "{}", route.path),
                BodyKind::Optional(_) => {}
            }
            covered.insert((route.method, route.path));
        }
        for route in ROUTES {
            assert!(
                covered.contains(&(route.method, route.path)),
                "no sample request for {} {}",
                route.method,
                route.path
            );
        }
    }

    #[test]
    fn the_table_is_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for route in ROUTES {
            assert!(route.path.starts_with(API_PREFIX), "{}", route.path);
            assert!(
                seen.insert((route.method, route.path)),
                "duplicate {}",
                route.path
            );
            // Queries are GETs with a reply; actions are PUTs, answering
            // what they did or nothing.
            assert_eq!(
                route.method == Method::Get,
                !matches!(route.reply, ReplyKind::Empty | ReplyKind::Action),
                "{}",
                route.path
            );
            if route.method == Method::Get {
                assert_eq!(route.body, BodyKind::None, "{}", route.path);
            }
        }
    }

    #[test]
    fn lookups_distinguish_404_and_405() {
        assert_eq!(
            find_route("GET", "/api/v1/vm.info").unwrap().name(),
            "vm.info"
        );
        assert_eq!(
            find_route("GET", "/api/v1/nope").err(),
            Some(RouteError::NotFound)
        );
        assert_eq!(
            find_route("GET", "/api/v1/vm.boot").err(),
            Some(RouteError::MethodNotAllowed {
                allow: "PUT".into()
            })
        );
        assert_eq!(
            find_route("get", "/api/v1/vm.info").err(),
            Some(RouteError::MethodNotAllowed {
                allow: "GET".into()
            })
        );
    }

    #[test]
    fn bodies_are_checked() {
        let shutdown = route_named(Method::Put, "vm.shutdown").unwrap();
        assert_eq!(
            (shutdown.parse)(None).unwrap(),
            ApiRequest::VmShutdown(ShutdownRequest::default())
        );
        assert_eq!(
            (shutdown.parse)(Some(br#"{"mode": "force"}"#)).unwrap(),
            ApiRequest::VmShutdown(ShutdownRequest {
                mode: ShutdownMode::Force,
                timeout_ms: None
            })
        );
        let e = (shutdown.parse)(Some(br#"{"mode": "force", "later": 1}"#)).unwrap_err();
        assert!(e.message.contains("later"), "{e}");
        let e = (shutdown.parse)(Some(br#"{"mode": "soon"}"#)).unwrap_err();
        assert!(e.message.contains("soon"), "{e}");
        let create = route_named(Method::Put, "vm.create").unwrap();
        let e = (create.parse)(Some(br#"{"payload": {"kernel": 5}}"#)).unwrap_err();
        assert!(e.message.contains("line 1 column"), "{e}");
        assert_eq!(e.kind.http_status(), 400);
    }

    fn parse_error(name: &str, body: &[u8]) -> ApiError {
        let route = route_named(Method::Put, name).unwrap();
        match (route.parse)(Some(body)) {
            Ok(request) => panic!(
                "{name}: {} was accepted as {request:?}",
                String::from_utf8_lossy(body)
            ),
            Err(e) => {
                assert_eq!(e.kind.http_status(), 400, "{name}: {e}");
                e
            }
        }
    }

    #[test]
    fn migration_bodies_are_checked() {
        let send = route_named(Method::Put, "vm.send-migration").unwrap();
        // The parameters are flattened into the body and default when absent.
        assert_eq!(
            (send.parse)(Some(br#"{"destination": "unix:/m.sock", "token": "t"}"#)).unwrap(),
            ApiRequest::VmSendMigration(SendMigrationRequest {
                destination: "unix:/m.sock".into(),
                token: "t".into(),
                tls_dir: None,
                force: false,
                parameters: MigrationParameters::default(),
            })
        );
        match (send.parse)(Some(
            br#"{"destination": "tcp:[::1]:6000", "token": "t", "downtime_ms": 50,
                 "bandwidth_bytes_per_s": 1000, "timeout_action": "force"}"#,
        ))
        .unwrap()
        {
            ApiRequest::VmSendMigration(r) => {
                assert_eq!(r.parameters.downtime_ms, 50);
                assert_eq!(r.parameters.bandwidth_bytes_per_s, Some(1000));
                assert_eq!(r.parameters.timeout_action, TimeoutAction::Force);
                assert!(r.parameters.auto_converge);
            }
            other => panic!("{other:?}"),
        }
        assert!((send.parse)(None).is_err());

        // Bad URLs name the field.
        for url in [
            "tcp:host",
            "tcp:host:",
            "tcp::6000",
            "tcp:host:99999",
            "ftp:x",
            "unix:",
            "",
            "/m.sock",
        ] {
            let body = format!(r#"{{"destination": "{url}", "token": "t"}}"#);
            let e = parse_error("vm.send-migration", body.as_bytes());
            assert!(e.message.starts_with("destination: "), "{url}: {e}");
            let body = format!(r#"{{"listen": "{url}", "token": "t"}}"#);
            let e = parse_error("vm.receive-migration", body.as_bytes());
            assert!(e.message.starts_with("listen: "), "{url}: {e}");
        }

        // Parameters are validated, in both routes that take them.
        let e = parse_error(
            "vm.send-migration",
            br#"{"destination": "tcp:h:1", "token": "t", "downtime_ms": 0}"#,
        );
        assert!(e.message.starts_with("downtime_ms: "), "{e}");
        let e = parse_error("vm.migration-parameters", br#"{"downtime_ms": 0}"#);
        assert!(e.message.starts_with("downtime_ms: "), "{e}");
        let e = parse_error("vm.migration-parameters", br#"{"timeout_s": 0}"#);
        assert!(e.message.starts_with("timeout_s: "), "{e}");
        let e = parse_error("vm.migration-parameters", br#"{"timeout_action": "wait"}"#);
        assert!(e.message.contains("wait"), "{e}");

        // Unknown fields are refused, also next to the flattened parameters.
        let e = parse_error(
            "vm.send-migration",
            br#"{"destination": "tcp:h:1", "token": "t", "downtime": 5}"#,
        );
        assert!(e.message.contains("downtime"), "{e}");
        let e = parse_error(
            "vm.receive-migration",
            br#"{"listen": "tcp:h:1", "token": "t", "port": 5}"#,
        );
        assert!(e.message.contains("port"), "{e}");
        let e = parse_error("vm.migration-parameters", br#"{"bandwidth": 5}"#);
        assert!(e.message.contains("bandwidth"), "{e}");
        // A wrong type in the flattened parameters (serde's flatten loses
        // the field's path; the message still says what is wrong and where).
        let e = parse_error(
            "vm.send-migration",
            br#"{"destination": "tcp:h:1", "token": "t", "downtime_ms": "x"}"#,
        );
        assert!(e.message.contains("expected u64"), "{e}");
        // Missing required fields.
        let e = parse_error("vm.send-migration", br#"{"destination": "tcp:h:1"}"#);
        assert!(e.message.contains("token"), "{e}");
        let e = parse_error("vm.receive-migration", br#"{"token": "t"}"#);
        assert!(e.message.contains("listen"), "{e}");
    }

    #[test]
    fn balloon_bodies_are_checked() {
        let balloon = route_named(Method::Put, "vm.balloon").unwrap();
        assert_eq!(
            (balloon.parse)(Some(br#"{"target_mib": 0}"#)).unwrap(),
            ApiRequest::VmBalloon(BalloonUpdate { target_mib: 0 })
        );
        assert!((balloon.parse)(None).is_err());
        for body in [
            &br#"{"target_mib": -1}"#[..],
            br#"{"target_mib": "64"}"#,
            br#"{"target_mib": 1.5}"#,
            br#"{"target_mib": null}"#,
        ] {
            let e = parse_error("vm.balloon", body);
            assert!(e.message.starts_with("target_mib: "), "{e}");
        }
        let e = parse_error("vm.balloon", b"{}");
        assert!(e.message.contains("target_mib"), "{e}");
        let e = parse_error("vm.balloon", br#"{"target_mib": 1, "mib": 2}"#);
        assert!(e.message.contains("mib"), "{e}");
    }

    #[test]
    fn replies_decode() {
        let ping = PingInfo {
            version: "1".into(),
            pid: 7,
            name: Some("web1".into()),
            state: VmState::Paused,
        };
        let action = ActionReply::already(VmState::Paused, "already paused");
        let json = ApiResponse::Action(action.clone()).to_json().unwrap();
        assert_eq!(
            ReplyKind::Action.decode(json.as_bytes()).unwrap(),
            ApiResponse::Action(action)
        );
        let json = ApiResponse::Ping(ping.clone()).to_json().unwrap();
        assert_eq!(
            ReplyKind::Ping.decode(json.as_bytes()).unwrap(),
            ApiResponse::Ping(ping)
        );
        let status = MigrationStatus {
            phase: MigrationPhase::SwitchOver,
            role: Some(crate::request::MigrationRole::Send),
            transferred_bytes: 1 << 20,
            ..MigrationStatus::default()
        };
        let json = ApiResponse::MigrationStatus(Box::new(status.clone()))
            .to_json()
            .unwrap();
        assert!(json.contains(r#""phase": "switch-over""#), "{json}");
        assert_eq!(
            ReplyKind::MigrationStatus.decode(json.as_bytes()).unwrap(),
            ApiResponse::MigrationStatus(Box::new(status))
        );
        let mut stats = BalloonStatistics {
            target_pages: 256,
            target_mib: 1,
            timestamp_ms: Some(1_700_000_000_000),
            age_ms: Some(5),
            ..BalloonStatistics::default()
        };
        assert!(stats.set_guest_stat(4, 1 << 20));
        assert!(!stats.set_guest_stat(16, 1));
        assert_eq!(stats.free_memory, Some(1 << 20));
        let json = ApiResponse::BalloonStatistics(Box::new(stats.clone()))
            .to_json()
            .unwrap();
        assert!(!json.contains("swap_in"), "{json}");
        assert_eq!(
            ReplyKind::BalloonStatistics
                .decode(json.as_bytes())
                .unwrap(),
            ApiResponse::BalloonStatistics(Box::new(stats))
        );
        assert!(ReplyKind::Info.decode(b"{}").is_err());
        assert_eq!(ReplyKind::Empty.decode(b"").unwrap(), ApiResponse::Empty);
    }
}
