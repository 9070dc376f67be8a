//! The API surface of a `vmm` process.
//!
//! - [`request`]: the requests a VMM answers ([`ApiRequest`]) and their
//!   replies. The HTTP layer only translates between HTTP and these types.
//! - [`http`]: HTTP/1.1 over a Unix socket: the server that the `vmm` binary
//!   runs and the client that `vmmctl` uses.
//! - [`socket`]: binding the VMM's Unix sockets safely and privately.

pub mod cli_docs;
pub mod http;
pub mod request;
pub mod socket;

pub use request::{ApiError, ApiRequest, ApiResponse};
