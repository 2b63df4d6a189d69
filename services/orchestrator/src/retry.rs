//! Retry policy per error class: how many attempts a task gets, and how long it waits before
//! the next one (exponential backoff with jitter). Pure: the store applies the decision.

use std::time::Duration;

use colony_proto::ErrorClass;
use serde::{Deserialize, Serialize};

/// One class's policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in one budget, the first included: 1 means never retried.
    pub max_attempts: u32,
    /// Delay after the first failed attempt; doubled after each further one.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Fraction (0..=1) of the delay taken off at random, so retries of many tasks spread out.
    pub jitter: f64,
}

impl RetryPolicy {
    const fn new(max_attempts: u32, base_ms: u64, cap_ms: u64) -> Self {
        Self {
            max_attempts,
            backoff_base: Duration::from_millis(base_ms),
            backoff_cap: Duration::from_millis(cap_ms),
            jitter: 0.2,
        }
    }
}

/// The `retries` config section: one policy per error class. Each field of each class can be
/// set alone (`retries.transient.max_attempts = 1`); the others keep that class's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RetryConfigPatch")]
pub struct RetryConfig {
    pub transient: RetryPolicy,
    pub permanent: RetryPolicy,
    pub user_fixable: RetryPolicy,
    pub external_rate_limit: RetryPolicy,
    pub external_degrading: RetryPolicy,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            transient: RetryPolicy::new(5, 1_000, 60_000),
            permanent: RetryPolicy::new(1, 1_000, 60_000),
            user_fixable: RetryPolicy::new(1, 1_000, 60_000),
            external_rate_limit: RetryPolicy::new(8, 5_000, 300_000),
            external_degrading: RetryPolicy::new(5, 2_000, 120_000),
        }
    }
}

impl RetryConfig {
    pub fn policy(&self, class: ErrorClass) -> &RetryPolicy {
        match class {
            ErrorClass::Transient => &self.transient,
            ErrorClass::Permanent => &self.permanent,
            ErrorClass::UserFixable => &self.user_fixable,
            ErrorClass::ExternalRateLimit => &self.external_rate_limit,
            ErrorClass::ExternalDegrading => &self.external_degrading,
        }
    }

    pub fn validate(&self, problems: &mut Vec<String>) {
        for class in ErrorClass::ALL {
            let policy = self.policy(class);
            let key = format!("retries.{class}");
            if policy.max_attempts == 0 || policy.max_attempts > 1000 {
                problems.push(format!("{key}.max_attempts: must be between 1 and 1000"));
            }
            if policy.backoff_base.is_zero() {
                problems.push(format!("{key}.backoff_base: must be above 0"));
            }
            if policy.backoff_cap < policy.backoff_base {
                problems.push(format!("{key}.backoff_cap: must be at least backoff_base"));
            }
            if policy.backoff_cap > Duration::from_secs(7 * 24 * 3600) {
                problems.push(format!("{key}.backoff_cap: must be at most 7 days"));
            }
            if !(0.0..=1.0).contains(&policy.jitter) {
                problems.push(format!("{key}.jitter: must be a fraction between 0 and 1"));
            }
        }
    }
}

/// What the file and environment may say about one class: any subset of its fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PolicyPatch {
    max_attempts: Option<u32>,
    #[serde(with = "humantime_serde")]
    backoff_base: Option<Duration>,
    #[serde(with = "humantime_serde")]
    backoff_cap: Option<Duration>,
    jitter: Option<f64>,
}

impl PolicyPatch {
    fn over(self, default: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(default.max_attempts),
            backoff_base: self.backoff_base.unwrap_or(default.backoff_base),
            backoff_cap: self.backoff_cap.unwrap_or(default.backoff_cap),
            jitter: self.jitter.unwrap_or(default.jitter),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RetryConfigPatch {
    transient: PolicyPatch,
    permanent: PolicyPatch,
    user_fixable: PolicyPatch,
    external_rate_limit: PolicyPatch,
    external_degrading: PolicyPatch,
}

impl From<RetryConfigPatch> for RetryConfig {
    fn from(patch: RetryConfigPatch) -> Self {
        let default = RetryConfig::default();
        Self {
            transient: patch.transient.over(default.transient),
            permanent: patch.permanent.over(default.permanent),
            user_fixable: patch.user_fixable.over(default.user_fixable),
            external_rate_limit: patch.external_rate_limit.over(default.external_rate_limit),
            external_degrading: patch.external_degrading.over(default.external_degrading),
        }
    }
}

/// Delay before the next attempt once `failed` attempts (≥ 1) of the current budget have
/// failed: `min(cap, base × 2^(failed−1))`, minus up to `jitter` of it. `sample` is a uniform
/// random number in `[0, 1)`; it is a parameter so that this stays a pure function.
pub fn backoff(policy: &RetryPolicy, failed: u32, sample: f64) -> Duration {
    let doublings = failed.saturating_sub(1).min(64) as i32;
    let cap = policy.backoff_cap.as_secs_f64();
    let delay = (policy.backoff_base.as_secs_f64() * 2f64.powi(doublings)).min(cap);
    let cut = policy.jitter.clamp(0.0, 1.0) * sample.clamp(0.0, 1.0);
    Duration::try_from_secs_f64(delay * (1.0 - cut)).unwrap_or(policy.backoff_cap)
}

/// What happens to a task after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Queue the next attempt, claimable after `delay`.
    Retry { delay: Duration },
    /// Out of attempts (or a class that is never retried): park it as a dead letter.
    DeadLetter,
}

/// Decides after the `used`-th attempt (≥ 1) of the current budget failed.
pub fn after_failure(policy: &RetryPolicy, used: u32, sample: f64) -> Next {
    if used < policy.max_attempts {
        Next::Retry {
            delay: backoff(policy, used, sample),
        }
    } else {
        Next::DeadLetter
    }
}

/// A uniform sample in `[0, 1)` for [`backoff`].
pub fn jitter_sample() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(value: f64) -> Duration {
        Duration::from_secs_f64(value)
    }

    #[test]
    fn defaults_follow_the_classes() {
        let config = RetryConfig::default();
        let table = [
            (ErrorClass::Transient, 5, 1.0, 60.0),
            (ErrorClass::Permanent, 1, 1.0, 60.0),
            (ErrorClass::UserFixable, 1, 1.0, 60.0),
            (ErrorClass::ExternalRateLimit, 8, 5.0, 300.0),
            (ErrorClass::ExternalDegrading, 5, 2.0, 120.0),
        ];
        for (class, attempts, base, cap) in table {
            let policy = config.policy(class);
            assert_eq!(policy.max_attempts, attempts, "{class}");
            assert_eq!(policy.backoff_base, secs(base), "{class}");
            assert_eq!(policy.backoff_cap, secs(cap), "{class}");
            assert!((policy.jitter - 0.2).abs() < f64::EPSILON, "{class}");
        }
        let mut problems = Vec::new();
        config.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_without_jitter() {
        let policy = RetryPolicy {
            jitter: 0.0,
            ..RetryConfig::default().external_rate_limit
        };
        // 5s base, 5 min cap.
        let table = [
            (1, 5.0),
            (2, 10.0),
            (3, 20.0),
            (4, 40.0),
            (5, 80.0),
            (6, 160.0),
            (7, 300.0),
            (8, 300.0),
            (1000, 300.0),
            (u32::MAX, 300.0),
        ];
        for (failed, expected) in table {
            assert_eq!(backoff(&policy, failed, 0.7), secs(expected), "{failed}");
        }
        // Attempt "0" is treated as the first.
        assert_eq!(backoff(&policy, 0, 0.0), secs(5.0));
    }

    #[test]
    fn jitter_takes_off_at_most_its_fraction() {
        let policy = RetryConfig::default().transient; // 1s base, 60s cap, jitter 0.2
        let table = [
            (1, 0.0, 1.0),
            (1, 0.5, 0.9),
            (1, 0.999_999, 0.8),
            (3, 0.5, 3.6),
            (10, 0.0, 60.0),
            (10, 0.5, 54.0),
            // Out-of-range samples are clamped.
            (1, -3.0, 1.0),
            (1, 7.0, 0.8),
        ];
        for (failed, sample, expected) in table {
            let got = backoff(&policy, failed, sample).as_secs_f64();
            assert!((got - expected).abs() < 1e-6, "{failed} {sample}: {got}");
        }
    }

    /// For every attempt and a grid of samples: the delay never exceeds the cap, never drops
    /// below (1 − jitter) of the un-jittered delay, and never shrinks as attempts grow.
    #[test]
    fn backoff_is_bounded_and_monotonic() {
        for policy in [
            RetryConfig::default().transient,
            RetryConfig::default().external_rate_limit,
            RetryConfig::default().external_degrading,
            RetryPolicy {
                max_attempts: 3,
                backoff_base: Duration::from_millis(1),
                backoff_cap: Duration::from_millis(1),
                jitter: 1.0,
            },
        ] {
            for step in 0..=20 {
                let sample = f64::from(step) / 20.0;
                let mut previous = Duration::ZERO;
                for failed in 1..200 {
                    let delay = backoff(&policy, failed, sample);
                    let plain = backoff(
                        &RetryPolicy {
                            jitter: 0.0,
                            ..policy
                        },
                        failed,
                        0.0,
                    );
                    assert!(delay <= policy.backoff_cap, "{policy:?} {failed}");
                    assert!(
                        delay.as_secs_f64() >= plain.as_secs_f64() * (1.0 - policy.jitter) - 1e-9,
                        "{policy:?} {failed} {sample}"
                    );
                    assert!(delay >= previous, "{policy:?} {failed} {sample}");
                    previous = delay;
                }
            }
        }
    }

    proptest::proptest! {
        /// Any valid policy, attempt and sample: bounded by the cap and by (1 − jitter) of the
        /// plain exponential delay, and the next attempt never waits less.
        #[test]
        fn backoff_properties(
            base_ms in 1u64..100_000,
            extra_ms in 0u64..1_000_000,
            jitter in 0.0f64..=1.0,
            failed in 1u32..10_000,
            sample in 0.0f64..1.0,
        ) {
            let policy = RetryPolicy {
                max_attempts: 5,
                backoff_base: Duration::from_millis(base_ms),
                backoff_cap: Duration::from_millis(base_ms + extra_ms),
                jitter,
            };
            let delay = backoff(&policy, failed, sample);
            let plain = backoff(&RetryPolicy { jitter: 0.0, ..policy }, failed, sample);
            proptest::prop_assert!(delay <= policy.backoff_cap);
            proptest::prop_assert!(plain <= policy.backoff_cap);
            proptest::prop_assert!(plain >= policy.backoff_base);
            proptest::prop_assert!(
                delay.as_secs_f64() >= plain.as_secs_f64() * (1.0 - jitter) - 1e-9
            );
            proptest::prop_assert!(backoff(&policy, failed + 1, sample) >= delay);
        }
    }

    #[test]
    fn only_attempts_under_the_maximum_are_retried() {
        let config = RetryConfig::default();
        assert_eq!(
            after_failure(config.policy(ErrorClass::Permanent), 1, 0.0),
            Next::DeadLetter
        );
        assert_eq!(
            after_failure(config.policy(ErrorClass::UserFixable), 1, 0.0),
            Next::DeadLetter
        );
        let transient = config.policy(ErrorClass::Transient);
        for used in 1..5 {
            assert!(matches!(
                after_failure(transient, used, 0.0),
                Next::Retry { .. }
            ));
        }
        assert_eq!(after_failure(transient, 5, 0.0), Next::DeadLetter);
        assert_eq!(after_failure(transient, 6, 0.0), Next::DeadLetter);
    }

    #[test]
    fn samples_are_fractions() {
        for _ in 0..1000 {
            let sample = jitter_sample();
            assert!((0.0..1.0).contains(&sample));
        }
    }
}
