//! Provider and call errors, their sorting into the five [`ErrorClass`]es, and the one
//! conversion to `tonic::Status`.

use std::time::Duration;

use colony_inference::InferenceError;

pub use colony_proto::{ERROR_CLASS_METADATA, ErrorClass};
use tonic::metadata::MetadataValue;

/// gRPC metadata carrying a provider's retry-after, in milliseconds, when it sent one.
pub const RETRY_AFTER_METADATA: &str = "colony-retry-after-ms";

/// Why a provider call failed. Messages never carry the API key or a provider URL.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("the request to the provider failed: {0}")]
    Transport(String),
    #[error("no answer from the provider within {0:?}")]
    Timeout(Duration),
    #[error("the provider is rate limiting")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the provider failed (HTTP {status})")]
    Server { status: u16 },
    #[error("the provider is unavailable (HTTP {status})")]
    Unavailable { status: u16 },
    #[error("the provider sent an unreadable response: {0}")]
    Malformed(String),
    #[error("the provider refused the credentials (HTTP {status}): check the deployment's API key")]
    Unauthorized { status: u16 },
    #[error("the prompt does not fit the model's context window: {0}")]
    ContextTooLong(String),
    #[error("the provider rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("scripted failure ({0})")]
    Scripted(ErrorClass),
    #[error("no script rule matches the last user or tool message")]
    NoScriptRule,
    /// The router's own rate limits for the deployment refused the call (it was not made).
    #[error("{0}")]
    Queue(crate::resilience::limits::Refused),
    /// The deployment's circuit breaker is open (the call was not made).
    #[error("{0}")]
    CircuitOpen(crate::resilience::breaker::Open),
    /// The embedded model could not answer (busy, not loaded, or failed).
    #[error("{0}")]
    Local(colony_inference::InferenceError),
}

impl ProviderError {
    /// Sorts a non-success HTTP answer. `message` is the provider's own error text; it is
    /// dropped for credential errors, whose text may quote part of the key.
    pub fn from_http(status: u16, retry_after: Option<Duration>, message: String) -> Self {
        match status {
            429 => ProviderError::RateLimited { retry_after },
            401 | 403 => ProviderError::Unauthorized { status },
            413 => ProviderError::ContextTooLong(message),
            400 if mentions_context_length(&message) => ProviderError::ContextTooLong(message),
            502..=504 => ProviderError::Unavailable { status },
            408 | 500..=599 => ProviderError::Server { status },
            _ => ProviderError::Rejected { status, message },
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ProviderError::Transport(_)
            | ProviderError::Timeout(_)
            | ProviderError::Server { .. } => ErrorClass::Transient,
            ProviderError::RateLimited { .. } => ErrorClass::ExternalRateLimit,
            ProviderError::Unavailable { .. } | ProviderError::Malformed(_) => {
                ErrorClass::ExternalDegrading
            }
            ProviderError::Unauthorized { .. } | ProviderError::ContextTooLong(_) => {
                ErrorClass::UserFixable
            }
            ProviderError::Rejected { .. } | ProviderError::NoScriptRule => ErrorClass::Permanent,
            ProviderError::Scripted(class) => *class,
            ProviderError::Queue(crate::resilience::limits::Refused::TooLarge { .. }) => {
                ErrorClass::UserFixable
            }
            ProviderError::Queue(_) => ErrorClass::ExternalRateLimit,
            ProviderError::CircuitOpen(_) => ErrorClass::ExternalDegrading,
            ProviderError::Local(error) => match error {
                InferenceError::QueueFull { .. } => ErrorClass::ExternalRateLimit,
                InferenceError::Model(_) | InferenceError::Stopped { .. } => {
                    ErrorClass::ExternalDegrading
                }
                InferenceError::Engine { .. } => ErrorClass::Transient,
                InferenceError::InvalidRequest(_) | InferenceError::ContextOverflow { .. } => {
                    ErrorClass::UserFixable
                }
            },
        }
    }

    /// When trying again may succeed, if the failure says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after } => *retry_after,
            ProviderError::Queue(refused) => refused.retry_after(),
            ProviderError::CircuitOpen(open) => open.retry_in,
            ProviderError::Local(InferenceError::QueueFull { .. }) => Some(LOCAL_QUEUE_RETRY),
            _ => None,
        }
    }

    /// Whether the provider was actually called (and the call belongs in the ledger).
    pub fn reached_provider(&self) -> bool {
        !matches!(
            self,
            ProviderError::Queue(_) | ProviderError::CircuitOpen(_)
        )
    }
}

/// When to try a full local model's queue again: a queued answer takes about a second.
const LOCAL_QUEUE_RETRY: Duration = Duration::from_secs(1);

fn mentions_context_length(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "context_length",
        "context length",
        "context window",
        "too many tokens",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// Everything a `Complete` call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No deployment can take the request (privacy, capabilities, window).
    #[error("{0}")]
    Unroutable(String),
    #[error("deployment {deployment}: {source}")]
    Provider {
        deployment: String,
        #[source]
        source: ProviderError,
    },
    /// The call's usage could not be written; the call fails rather than go unaccounted.
    #[error("cannot record usage: {0}")]
    Ledger(#[from] colony_bus::Error),
    /// The ledger no longer takes entries: the router is shutting down.
    #[error("the router is shutting down")]
    LedgerClosed,
    /// A budget cannot cover the call's worst-case cost (or could not be checked).
    #[error("{0}")]
    Budget(#[from] crate::budget::Error),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest(_) => ErrorClass::Permanent,
            Error::Unroutable(_) => ErrorClass::UserFixable,
            Error::Provider { source, .. } => source.class(),
            Error::Ledger(_) | Error::LedgerClosed => ErrorClass::Transient,
            Error::Budget(crate::budget::Error::Exceeded { .. }) => ErrorClass::UserFixable,
            Error::Budget(crate::budget::Error::Database(_)) => ErrorClass::Transient,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidRequest(_) | Error::Unroutable(_) => tonic::Code::InvalidArgument,
            Error::Provider {
                source: ProviderError::Unauthorized { .. },
                ..
            } => tonic::Code::FailedPrecondition,
            Error::Budget(crate::budget::Error::Exceeded { .. }) => tonic::Code::FailedPrecondition,
            Error::Provider { .. } | Error::Ledger(_) | Error::LedgerClosed | Error::Budget(_) => {
                match self.class() {
                    ErrorClass::Transient | ErrorClass::ExternalDegrading => {
                        tonic::Code::Unavailable
                    }
                    ErrorClass::ExternalRateLimit => tonic::Code::ResourceExhausted,
                    ErrorClass::UserFixable => tonic::Code::InvalidArgument,
                    ErrorClass::Permanent => tonic::Code::Internal,
                }
            }
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Provider { source, .. } => source.retry_after(),
            _ => None,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = match &error {
            // Database details stay in the router's log.
            Error::Ledger(_) | Error::Budget(crate::budget::Error::Database(_)) => {
                "cannot record usage".to_owned()
            }
            _ => error.to_string(),
        };
        let mut status = tonic::Status::new(error.code(), message);
        let metadata = status.metadata_mut();
        metadata.insert(
            ERROR_CLASS_METADATA,
            MetadataValue::from_static(error.class().as_str()),
        );
        if let Some(retry_after) = error.retry_after() {
            let millis = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
            metadata.insert(RETRY_AFTER_METADATA, millis.into());
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_are_classified() {
        let class = |status, message: &str| {
            ProviderError::from_http(status, None, message.to_owned()).class()
        };
        assert_eq!(class(429, ""), ErrorClass::ExternalRateLimit);
        assert_eq!(class(500, ""), ErrorClass::Transient);
        assert_eq!(class(408, ""), ErrorClass::Transient);
        for status in [502, 503, 504] {
            assert_eq!(class(status, ""), ErrorClass::ExternalDegrading);
        }
        assert_eq!(class(401, ""), ErrorClass::UserFixable);
        assert_eq!(class(403, ""), ErrorClass::UserFixable);
        assert_eq!(class(413, ""), ErrorClass::UserFixable);
        assert_eq!(
            class(400, "This model's maximum context length is 8192 tokens"),
            ErrorClass::UserFixable
        );
        assert_eq!(class(400, "unknown field"), ErrorClass::Permanent);
        assert_eq!(class(404, "no such model"), ErrorClass::Permanent);
    }

    #[test]
    fn status_carries_code_class_and_retry_after() {
        let status = tonic::Status::from(Error::Provider {
            deployment: "gpt".into(),
            source: ProviderError::RateLimited {
                retry_after: Some(Duration::from_millis(1500)),
            },
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let metadata = status.metadata();
        assert_eq!(
            metadata.get(ERROR_CLASS_METADATA).unwrap(),
            "external_rate_limit"
        );
        assert_eq!(metadata.get(RETRY_AFTER_METADATA).unwrap(), "1500");

        let codes = [
            (
                ProviderError::Timeout(Duration::from_secs(1)),
                tonic::Code::Unavailable,
            ),
            (
                ProviderError::Malformed("x".into()),
                tonic::Code::Unavailable,
            ),
            (
                ProviderError::Unauthorized { status: 401 },
                tonic::Code::FailedPrecondition,
            ),
            (
                ProviderError::ContextTooLong("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (ProviderError::NoScriptRule, tonic::Code::Internal),
        ];
        for (source, code) in codes {
            let error = Error::Provider {
                deployment: "d".into(),
                source,
            };
            assert_eq!(error.code(), code, "{error}");
        }
    }

    #[test]
    fn credential_errors_drop_the_provider_text() {
        let error = ProviderError::from_http(401, None, "Incorrect API key: sk-abc123".into());
        assert!(!error.to_string().contains("sk-abc123"), "{error}");
    }
}
