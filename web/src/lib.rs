//! `vmm-web`: a web console for every VMM on a host.
//!
//! - [`args`]: the command line (`--listen`, `--auth-token-file`, ...).
//! - [`monitor`]: finds the VMMs in the socket directory and samples each
//!   one every interval (ping, info, counters, migration status, CPU time
//!   from `/proc`), keeps a few minutes of history and publishes a snapshot
//!   that the page receives by server-sent events.
//! - [`console`]: the guests' serial consoles, kept in a ring buffer each.
//! - [`cluster`]: Pacemaker's view (`crm_mon --output-as=xml`) and "move to
//!   node" (`crm_resource --move`).
//! - [`auth`]: sessions, the login token and CSRF tokens.
//! - [`server`]: the HTTP routes (axum) and the safety checks on every request.
//! - [`assets`]: the page (HTML, JS, CSS) compiled into the binary.
//!
//! Every VMM is reached through [`api::http::ApiClient`], the client `vmmctl`
//! uses; it is blocking, so calls run on tokio's blocking pool.

pub mod args;
pub mod assets;
pub mod auth;
pub mod cluster;
pub mod console;
pub mod error;
pub mod monitor;
pub mod procfs;
pub mod server;

pub use error::WebError;
