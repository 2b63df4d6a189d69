//! The five error classes every failure is sorted into, as a domain type shared by the services
//! that produce and consume them, with the one mapping to and from the wire.

use std::fmt;

use crate::v1;

/// gRPC metadata key on a failed call that names its class (`transient`, `permanent`, …).
pub const METADATA_KEY: &str = "colony-error-class";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth retrying soon: a dropped connection, a timeout, an unavailable peer.
    Transient,
    /// Retrying cannot help: a bug, an invalid request from our side.
    Permanent,
    /// The user must change something: a bad goal, a prompt too large, a missing key.
    UserFixable,
    /// A provider said "slow down"; retry after its retry-after.
    ExternalRateLimit,
    /// A provider is failing or answering garbage; back off and prefer another.
    ExternalDegrading,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::Transient,
        ErrorClass::Permanent,
        ErrorClass::UserFixable,
        ErrorClass::ExternalRateLimit,
        ErrorClass::ExternalDegrading,
    ];

    /// The name used in metadata, logs, metric labels and database columns.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::UserFixable => "user_fixable",
            ErrorClass::ExternalRateLimit => "external_rate_limit",
            ErrorClass::ExternalDegrading => "external_degrading",
        }
    }

    /// The inverse of [`ErrorClass::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|class| class.as_str() == name)
    }

    /// Whether trying again (later, or elsewhere) can succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, ErrorClass::Permanent | ErrorClass::UserFixable)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ErrorClass> for v1::ErrorClass {
    fn from(class: ErrorClass) -> Self {
        match class {
            ErrorClass::Transient => v1::ErrorClass::Transient,
            ErrorClass::Permanent => v1::ErrorClass::Permanent,
            ErrorClass::UserFixable => v1::ErrorClass::UserFixable,
            ErrorClass::ExternalRateLimit => v1::ErrorClass::ExternalRateLimit,
            ErrorClass::ExternalDegrading => v1::ErrorClass::ExternalDegrading,
        }
    }
}

impl From<v1::ErrorClass> for ErrorClass {
    /// An unspecified class is treated as permanent: nothing says a retry would help.
    fn from(class: v1::ErrorClass) -> Self {
        match class {
            v1::ErrorClass::Transient => ErrorClass::Transient,
            v1::ErrorClass::UserFixable => ErrorClass::UserFixable,
            v1::ErrorClass::ExternalRateLimit => ErrorClass::ExternalRateLimit,
            v1::ErrorClass::ExternalDegrading => ErrorClass::ExternalDegrading,
            v1::ErrorClass::Permanent | v1::ErrorClass::Unspecified => ErrorClass::Permanent,
        }
    }
}

impl ErrorClass {
    /// From the raw enum value of a decoded message; unknown values are permanent.
    pub fn from_wire(value: i32) -> Self {
        v1::ErrorClass::try_from(value)
            .map(Self::from)
            .unwrap_or(ErrorClass::Permanent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wire_values_round_trip() {
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(class.as_str()), Some(class));
            assert_eq!(ErrorClass::from(v1::ErrorClass::from(class)), class);
            assert_eq!(
                ErrorClass::from_wire(v1::ErrorClass::from(class) as i32),
                class
            );
        }
        assert_eq!(ErrorClass::parse("TRANSIENT"), None);
        assert_eq!(ErrorClass::from_wire(99), ErrorClass::Permanent);
        assert_eq!(ErrorClass::from_wire(0), ErrorClass::Permanent);
    }

    #[test]
    fn only_permanent_and_user_fixable_are_final() {
        let final_classes: Vec<_> = ErrorClass::ALL
            .into_iter()
            .filter(|c| !c.is_retryable())
            .collect();
        assert_eq!(
            final_classes,
            [ErrorClass::Permanent, ErrorClass::UserFixable]
        );
    }
}
