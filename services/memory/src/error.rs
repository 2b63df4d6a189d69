//! The one error type of the memory service and its one conversion to `tonic::Status`.

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; retrying it unchanged cannot help.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// No such thing for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// The tenant's limits do not allow it.
    #[error("{0}")]
    LimitExceeded(String),
    /// A service this one depends on (the router) did not answer usefully; retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedding model could not answer (busy, not loaded, failed).
    #[error("embedding model: {0}")]
    Embedding(colony_inference::InferenceError),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A short, stable name for metrics labels and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::NotFound(_) => "not_found",
            Error::LimitExceeded(_) => "resource_exhausted",
            Error::Unavailable(_) => "unavailable",
            Error::Embedding(colony_inference::InferenceError::QueueFull { .. }) => {
                "resource_exhausted"
            }
            Error::Embedding(_) => "unavailable",
            Error::Database(_) if self.is_retryable() => "unavailable",
            Error::Database(_) => "internal",
        }
    }

    /// Whether the same request may succeed later (the database was unreachable or busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidArgument { .. } | Error::NotFound(_) | Error::LimitExceeded(_) => false,
            Error::Unavailable(_) => true,
            Error::Embedding(error) => !matches!(
                error,
                colony_inference::InferenceError::InvalidRequest(_)
                    | colony_inference::InferenceError::ContextOverflow { .. }
            ),
            Error::Database(error) => matches!(
                error,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(error.to_string()),
            Error::NotFound(_) => tonic::Status::not_found(error.to_string()),
            Error::LimitExceeded(_) => tonic::Status::resource_exhausted(error.to_string()),
            Error::Unavailable(_) => tonic::Status::unavailable(error.to_string()),
            // Database details stay in the logs; clients learn only whether to retry.
            Error::Database(_) if error.is_retryable() => {
                tonic::Status::unavailable("the memory database is unavailable; retry later")
            }
            Error::Database(_) => tonic::Status::internal("internal error"),
            // The model's errors are the user's to act on (`make models`, back off).
            Error::Embedding(inner) => match inner {
                colony_inference::InferenceError::QueueFull { .. } => {
                    tonic::Status::resource_exhausted(error.to_string())
                }
                colony_inference::InferenceError::InvalidRequest(_)
                | colony_inference::InferenceError::ContextOverflow { .. } => {
                    tonic::Status::invalid_argument(error.to_string())
                }
                _ => tonic::Status::unavailable(error.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status = tonic::Status::from(Error::invalid("tenant", "is required"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "tenant: is required");
    }

    #[test]
    fn database_errors_do_not_leak() {
        let status = tonic::Status::from(Error::Database(sqlx::Error::Protocol(
            "secret detail".into(),
        )));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("secret"));
        let status = tonic::Status::from(Error::Database(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
