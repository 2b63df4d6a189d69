//! The one error type of the worker. Its only sources are the peers it calls (orchestrator,
//! router, memory) and the bus; `grpc.rs` builds it from a `tonic::Status` in one place, and
//! `bus.rs` maps what the worker decided to ack / nak-with-delay / term.

use std::fmt;

use crate::task::ErrorClass;

/// Which peer a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Orchestrator,
    Router,
    Memory,
}

impl Peer {
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Orchestrator => "orchestrator",
            Peer::Router => "router",
            Peer::Memory => "memory",
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call to a peer, or a publish, failed. The display form is human-readable and names
/// the peer (`router: provider unreachable: …`); it goes into failed reports as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer failed the call, or could not be reached in time.
    #[error("{peer}: {message}")]
    Call {
        peer: Peer,
        class: ErrorClass,
        message: String,
    },
    /// The peer answered, but with something the worker cannot use.
    #[error("{peer}: unusable answer: {message}")]
    InvalidResponse { peer: Peer, message: String },
    #[error("bus: {0}")]
    Bus(#[from] colony_bus::Error),
    /// A model call was not made: it could pass the task's token budget.
    #[error("{0}")]
    TokenBudget(String),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Call { class, .. } => *class,
            Error::InvalidResponse { .. } => ErrorClass::Permanent,
            Error::Bus(error) if error.is_retryable() => ErrorClass::Transient,
            Error::Bus(_) => ErrorClass::Permanent,
            Error::TokenBudget(_) => ErrorClass::UserFixable,
        }
    }

    /// A short, stable name for logs: the error class, or what else went wrong.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Call { class, .. } => class.as_str(),
            Error::InvalidResponse { .. } => "invalid_response",
            Error::Bus(_) => "bus",
            Error::TokenBudget(_) => "token_budget",
        }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_peer() {
        let error = Error::Call {
            peer: Peer::Router,
            class: ErrorClass::ExternalDegrading,
            message: "provider unreachable: connection refused".into(),
        };
        assert_eq!(
            error.to_string(),
            "router: provider unreachable: connection refused"
        );
        assert_eq!(error.code(), "external_degrading");
        assert!(error.is_retryable());
        let error = Error::InvalidResponse {
            peer: Peer::Orchestrator,
            message: "granted without a task".into(),
        };
        assert_eq!(
            error.to_string(),
            "orchestrator: unusable answer: granted without a task"
        );
        assert!(!error.is_retryable());
    }
}
