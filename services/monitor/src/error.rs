//! The one error type of the monitor, with its mapping to a bus outcome and to HTTP.

use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use colony_bus::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The payload does not decode as the type its subject promises.
    #[error("malformed {expected} on {subject}: {message}")]
    Malformed {
        subject: String,
        expected: &'static str,
        message: String,
    },
    /// The payload decodes but breaks a rule (for example a heartbeat without a worker id).
    #[error("invalid {expected} on {subject}: {reason}")]
    Invalid {
        subject: String,
        expected: &'static str,
        reason: String,
    },
    /// A status API request is wrong; the message says how, for the client.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl Error {
    /// A short, stable name for logs and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Malformed { .. } => "malformed",
            Error::Invalid { .. } => "invalid",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Database(_) => "unavailable",
        }
    }

    /// Whether handling the same input again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Database(_))
    }

    /// What the consumer tells JetStream for a message that failed with this error on its
    /// `delivered`-th delivery: bad input is terminated (and dead-lettered), a database problem
    /// is retried with exponential backoff. `Terminate` reasons for undecodable payloads start
    /// with "malformed", which the bus counts as such.
    pub fn outcome(&self, delivered: i64) -> Outcome {
        if self.is_retryable() {
            let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 6)).unwrap_or(6);
            let delay = Duration::from_millis(500 * 2u64.pow(exponent));
            Outcome::Retry(delay.min(Duration::from_secs(30)))
        } else {
            Outcome::Terminate(self.to_string())
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        // Details stay in the logs; the body says only what kind of failure it was (or, for a
        // wrong request, what is wrong with it).
        let (status, message) = match &self {
            Error::InvalidRequest(message) => (StatusCode::BAD_REQUEST, message.as_str()),
            Error::Database(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the monitor database is unavailable; retry later",
            ),
            Error::Malformed { .. } | Error::Invalid { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        };
        let body = serde_json::json!({ "error": { "code": self.code(), "message": message } });
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_terminated_as_malformed() {
        let error = Error::Malformed {
            subject: "colony.v1.event.task.failed".into(),
            expected: "TaskEvent",
            message: "buffer underflow".into(),
        };
        match error.outcome(1) {
            Outcome::Terminate(reason) => assert!(reason.starts_with("malformed"), "{reason}"),
            other => panic!("expected terminate, got {other:?}"),
        }
    }

    #[test]
    fn database_errors_back_off_up_to_a_cap() {
        let error = Error::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(error.outcome(1), Outcome::Retry(Duration::from_millis(500)));
        assert_eq!(error.outcome(3), Outcome::Retry(Duration::from_secs(2)));
        assert_eq!(error.outcome(50), Outcome::Retry(Duration::from_secs(30)));
    }
}
