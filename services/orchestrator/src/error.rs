//! The orchestrator's error type, classified once for HTTP and once for gRPC.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("run {0} not found")]
    RunNotFound(String),
    #[error("task {0} not found")]
    TaskNotFound(String),
    /// The request is valid but the resource's state does not allow it; the message says why.
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("bus: {0}")]
    Bus(#[from] colony_bus::Error),
    /// Flow control refused the request (`rate_limited`, `queue_full`); try again later.
    #[error("{message}")]
    Overloaded {
        reason: &'static str,
        message: String,
        retry_after: std::time::Duration,
    },
}

impl Error {
    /// A short stable code for clients and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::TooLarge { .. } => "too_large",
            Error::RunNotFound(_) | Error::TaskNotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Overloaded { reason, .. } => reason,
            Error::Database(_) | Error::Bus(_) => "internal",
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Database(_) | Error::Bus(_) | Error::Overloaded { .. }
        )
    }

    /// What a client may see: internal details stay in the log.
    fn public_message(&self) -> String {
        match self {
            Error::Database(_) | Error::Bus(_) => "internal error; try again".into(),
            other => other.to_string(),
        }
    }
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RunNotFound(_) | Error::TaskNotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Database(_) | Error::Bus(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        // Whole seconds, at least one.
        let retry_after = match &self {
            Error::Overloaded { retry_after, .. } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            _ => None,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.public_message() }
        });
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::InvalidRequest(_) | Error::TooLarge { .. } => {
                tonic::Status::invalid_argument(error.to_string())
            }
            Error::RunNotFound(_) | Error::TaskNotFound(_) => {
                tonic::Status::not_found(error.to_string())
            }
            Error::Conflict(_) => tonic::Status::failed_precondition(error.to_string()),
            Error::Overloaded { .. } => tonic::Status::resource_exhausted(error.to_string()),
            Error::Database(_) | Error::Bus(_) => {
                tracing::error!(%error, "rpc failed");
                tonic::Status::unavailable(error.public_message())
            }
        }
    }
}
