//! What keeps a deployment's trouble from becoming everyone's trouble: a rate limiter with a
//! bounded wait queue ([`limits`]), a circuit breaker ([`breaker`]) and retry backoff
//! ([`backoff`]). Each piece is self-contained and per deployment; the router decides how to
//! chain them (typically: breaker → limiter → provider call → report to both → maybe retry).
//! The rate limits may be shared by every router replica through PostgreSQL ([`shared`]).

pub mod backoff;
pub mod breaker;
pub mod limits;
pub mod shared;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::metrics::{
    BREAKER_EVENTS_FAILED, BREAKER_REJECTIONS, BREAKER_STATE, BREAKER_TRANSITIONS, QUEUE_DEPTH,
    QUEUE_REFUSALS, QUEUE_WAIT_SECONDS, RATE_LEASES,
};

/// How the router protects deployments and itself; one setting for every deployment. Every key
/// has a default, so the whole table may be left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    pub queue: QueueConfig,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub shared_limits: SharedLimitsConfig,
}

/// Rate limits shared by the router replicas through the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedLimitsConfig {
    /// Router replicas expected to share each deployment's limits. While the database cannot
    /// be reached, each replica limits on its own to this fraction (1/replicas) of the
    /// configured rates, so that the fleet stays near the limits.
    pub replicas: u32,
}

impl Default for SharedLimitsConfig {
    fn default() -> Self {
        Self { replicas: 1 }
    }
}

/// The wait queue in front of a deployment's rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Requests that may wait for a deployment at once; 0 refuses at once whenever the limits
    /// have no room.
    pub capacity: usize,
    /// Longest a request may expect to wait; one that would wait longer is refused at once
    /// with a retry-after rather than held.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 64,
            max_wait: Duration::from_secs(10),
        }
    }
}

/// Retries of a failed call on the same deployment (before any fallback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Calls per deployment per request, the first included: 2 means one retry.
    pub max_attempts: u32,
    /// Upper bound of the first retry's delay; each further retry doubles it.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Upper bound of any retry's computed delay.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Longest a provider's retry-after is honoured for; a longer one is cut to this (the
    /// request should not sit idle for minutes because a provider asked).
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
        }
    }
}

/// A deployment's circuit breaker. It opens after `failure_threshold` consecutive failures
/// that speak of the provider's health (see [`breaker`] for which those are).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls before letting probes through.
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
    /// Calls let through at once while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }
}

impl ResilienceConfig {
    /// Pushes one message per problem, keys named as under a `[resilience]` table.
    pub fn validate(&self, problems: &mut Vec<String>) {
        let retry = &self.retry;
        if retry.max_attempts == 0 {
            problems
                .push("resilience.retry.max_attempts: must be at least 1 (1 = no retries)".into());
        }
        if retry.base_delay.is_zero() {
            problems.push("resilience.retry.base_delay: must be more than 0s".into());
        }
        if retry.base_delay > retry.max_delay {
            problems.push(format!(
                "resilience.retry.max_delay: must be at least base_delay ({:?}), not {:?}",
                retry.base_delay, retry.max_delay
            ));
        }
        let breaker = &self.breaker;
        if breaker.failure_threshold == 0 {
            problems.push("resilience.breaker.failure_threshold: must be at least 1".into());
        }
        if breaker.open_duration.is_zero() {
            problems.push("resilience.breaker.open_duration: must be more than 0s".into());
        }
        if breaker.half_open_probes == 0 {
            problems.push("resilience.breaker.half_open_probes: must be at least 1".into());
        }
        if self.shared_limits.replicas == 0 {
            problems.push("resilience.shared_limits.replicas: must be at least 1".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_default_and_durations_are_humantime() {
        let config: ResilienceConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, ResilienceConfig::default());
        let mut problems = Vec::new();
        config.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");

        let config: ResilienceConfig = serde_json::from_str(
            r#"{"queue": {"max_wait": "1s 500ms"}, "breaker": {"open_duration": "1m"}}"#,
        )
        .unwrap();
        assert_eq!(config.queue.max_wait, Duration::from_millis(1500));
        assert_eq!(config.queue.capacity, 64);
        assert_eq!(config.breaker.open_duration, Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error =
            serde_json::from_str::<ResilienceConfig>(r#"{"retry": {"attempts": 3}}"#).unwrap_err();
        assert!(error.to_string().contains("attempts"), "{error}");
    }

    #[test]
    fn each_problem_is_reported() {
        let config = ResilienceConfig {
            queue: QueueConfig::default(),
            retry: RetryConfig {
                max_attempts: 0,
                base_delay: Duration::from_secs(3),
                max_delay: Duration::from_secs(2),
                max_retry_after: Duration::from_secs(10),
            },
            breaker: BreakerConfig {
                failure_threshold: 0,
                open_duration: Duration::ZERO,
                half_open_probes: 0,
            },
            shared_limits: SharedLimitsConfig { replicas: 0 },
        };
        let mut problems = Vec::new();
        config.validate(&mut problems);
        for expected in [
            "resilience.retry.max_attempts: must be at least 1",
            "resilience.retry.max_delay: must be at least base_delay (3s), not 2s",
            "resilience.breaker.failure_threshold: must be at least 1",
            "resilience.breaker.open_duration: must be more than 0s",
            "resilience.breaker.half_open_probes: must be at least 1",
            "resilience.shared_limits.replicas: must be at least 1",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "missing {expected:?} in {problems:?}"
            );
        }
    }
}
