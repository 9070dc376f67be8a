//! The API surface of a `vmm` process.
//!
//! - [`config`]: the VM configuration, one set of serde types shared by the
//!   config file, the `vmm` command line, the `vm.create` body and the
//!   migration payload.
//! - [`request`]: the requests a VMM answers ([`ApiRequest`]) and their
//!   replies. The HTTP layer only translates between HTTP and these types.
//! - [`http`]: HTTP/1.1 over a Unix socket: the server that the `vmm` binary
//!   runs and the client that `vmmctl` uses.

pub mod config;
pub mod http;
pub mod request;

pub use config::VmConfig;
pub use request::{ApiError, ApiRequest, ApiResponse};
