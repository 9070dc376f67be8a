//! What can go wrong in a request, in words for the page, with the HTTP
//! status its class calls for.

use api::http::ClientError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use config::ErrorClass;

use crate::cluster::ClusterError;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// No such page or file.
    #[error("there is no page {0}")]
    NotFound(String),
    /// No `NAME.sock` in the socket directory.
    #[error("there is no guest named {0:?} (no {0}.sock in the socket directory)")]
    NoSuchGuest(String),
    /// The page sent something unusable; the message names the field.
    #[error("{field}: {message}")]
    BadField {
        field: &'static str,
        message: String,
    },
    /// A field the page sent, checked with the VMM's own rules.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The VMM refused, or could not be reached.
    #[error("guest {guest}: {source}")]
    Vmm {
        guest: String,
        #[source]
        source: ClientError,
    },
    /// The VMM took the request but did not answer in time (hung or stopped).
    #[error("guest {guest}: {source}; the request may still take effect once it answers")]
    VmmTimeout {
        guest: String,
        #[source]
        source: ClientError,
    },
    /// A file the request named (a migration token file) cannot be used.
    #[error("{field}: {path}: {message}")]
    File {
        field: &'static str,
        path: String,
        message: String,
    },
    /// The socket directory cannot be read.
    #[error("cannot read the socket directory {dir}: {source}")]
    SocketDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The guest's console cannot be reached or typed into.
    #[error("console of {guest}: {message}")]
    Console { guest: String, message: String },
    /// This build of the VMM has no such endpoint (e.g. `vm.reboot`).
    #[error("guest {guest}: the VMM has no {endpoint} endpoint")]
    Unsupported {
        guest: String,
        endpoint: &'static str,
    },
    #[error("authentication required: log in, or send Authorization: Bearer TOKEN")]
    Unauthenticated,
    #[error("wrong token")]
    WrongToken,
    #[error("too many failed logins; wait a minute")]
    TooManyFailures,
    /// A state-changing request without the session's CSRF token (or from another site).
    #[error("refused: {0}")]
    Csrf(&'static str),
    /// A Host header this server does not answer to (DNS rebinding).
    #[error("refused: this server does not answer to host {0:?} (see --allow-host)")]
    BadHost(String),
    /// A blocking task died (a bug); the page says so rather than hanging.
    #[error("internal error: {0}")]
    Internal(String),
}

impl WebError {
    pub fn bad(field: &'static str, message: impl Into<String>) -> WebError {
        WebError::BadField {
            field,
            message: message.into(),
        }
    }

    pub fn vmm(guest: &str, source: ClientError) -> WebError {
        let guest = guest.to_string();
        match source {
            ClientError::Timeout { .. } => WebError::VmmTimeout { guest, source },
            source => WebError::Vmm { guest, source },
        }
    }

    /// Whose fault it is.
    pub fn class(&self) -> ErrorClass {
        match self {
            WebError::NoSuchGuest(_)
            | WebError::NotFound(_)
            | WebError::BadField { .. }
            | WebError::Config(_)
            | WebError::File { .. }
            | WebError::Unauthenticated
            | WebError::WrongToken
            | WebError::TooManyFailures
            | WebError::Csrf(_)
            | WebError::BadHost(_)
            | WebError::Unsupported { .. } => ErrorClass::Caller,
            WebError::Vmm { source, .. } => match source {
                ClientError::Api { status, .. } if (400..500).contains(status) => {
                    if *status == 409 {
                        ErrorClass::Conflict
                    } else {
                        ErrorClass::Caller
                    }
                }
                _ => ErrorClass::Host,
            },
            WebError::VmmTimeout { .. } => ErrorClass::Host,
            WebError::Cluster(e) => e.class(),
            WebError::Console { .. } => ErrorClass::Conflict,
            WebError::SocketDir { .. } | WebError::Internal(_) => ErrorClass::Host,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            WebError::NoSuchGuest(_) | WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::Unauthenticated | WebError::WrongToken => StatusCode::UNAUTHORIZED,
            WebError::TooManyFailures => StatusCode::TOO_MANY_REQUESTS,
            WebError::Csrf(_) => StatusCode::FORBIDDEN,
            WebError::BadHost(_) => StatusCode::MISDIRECTED_REQUEST,
            WebError::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
            WebError::VmmTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            // The VMM's own status when it answered; 502/504 when it did not.
            WebError::Vmm { source, .. } => match source {
                ClientError::Api { status, .. } => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                ClientError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                ClientError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            },
            other => match other.class() {
                ErrorClass::Caller => StatusCode::BAD_REQUEST,
                ErrorClass::Conflict => StatusCode::CONFLICT,
                ErrorClass::Host => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

/// The JSON error body: `{"error": "words"}`.
#[derive(serde::Serialize)]
pub struct ErrorBody {
    pub error: String,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let body = axum::Json(ErrorBody {
            error: self.to_string(),
        });
        (self.status(), body).into_response()
    }
}

pub type WebResult<T> = Result<T, WebError>;
