//! HTTP/1.1 over a Unix socket: the REST API of a `vmm` process.
//!
//! - [`routes`]: the one static route table ([`ROUTES`]): method, path, body
//!   kind, reply kind and how a body becomes an [`ApiRequest`](crate::ApiRequest).
//!   Routing, the client, `vmmctl` and the OpenAPI test all derive from it, so a
//!   new endpoint is one new row (plus its `ApiRequest` variant).
//! - [`server`]: [`start_server`], the tokio server (one dedicated thread, a
//!   current-thread runtime) that turns requests into [`ApiCall`]s for the
//!   VMM's control loop.
//! - [`client`]: [`ApiClient`], a blocking client on a std `UnixStream`
//!   (what `vmmctl` and `vmm-web` use; no tokio on that side).
//! - [`discovery`]: the socket-directory convention (`/run/vmm/NAME.sock`)
//!   and the list of VMM sockets in it.
//!
//! Routes are Cloud Hypervisor-style: `PUT /api/v1/vm.boot`, `GET /api/v1/vm.info`.
//! A query answers 200 with a JSON body; an action on the VM's state 200
//! with an [`ActionReply`](crate::request::ActionReply) (what it did), other
//! actions 204; an error answers
//! `{"kind": "...", "message": "..."}` with the status of its
//! [`ApiErrorKind`](crate::request::ApiErrorKind).

pub mod client;
pub mod discovery;
pub mod routes;
pub mod server;
mod wire;

pub use client::{ApiClient, ClientError, DEFAULT_CLIENT_TIMEOUT};
pub use discovery::{find_vmm_sockets, socket_dir, DEFAULT_SOCKET_DIR, SOCKET_DIR_ENV};
pub use routes::{find_route, BodyKind, Method, ReplyKind, Route, RouteError, API_PREFIX, ROUTES};
pub use server::{
    start_server, start_server_with, ApiCall, ApiServer, ServerOptions, IDLE_TIMEOUT,
    MAX_BODY_SIZE, MAX_CONNECTIONS, MAX_HEAD_SIZE, REQUEST_TIMEOUT,
};
