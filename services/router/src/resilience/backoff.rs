//! When to retry a failed call on the same deployment, and how long to wait first.
//!
//! Attempts are numbered from 1: after the `n`th call failed, [`should_retry`] says whether to
//! make call `n + 1` and [`Backoff::delay`] how long to wait before it. The delay is "full
//! jitter": uniform in `[0, min(max_delay, base_delay · 2^(n-1))]`, which spreads the retries
//! of many callers that failed together instead of sending them back in a wave.

use std::time::Duration;

use rand::Rng;

use super::RetryConfig;
use crate::error::ErrorClass;

/// Whether to call the same deployment again after attempt `attempt` (1-based) failed with
/// `class`: only for retryable classes (never `user_fixable` or `permanent`, which would fail
/// the same way) and only while attempts remain.
pub fn should_retry(class: ErrorClass, attempt: u32, config: &RetryConfig) -> bool {
    class.is_retryable() && attempt < config.max_attempts
}

/// Retry delays for one deployment's calls.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    max_retry_after: Duration,
}

impl Backoff {
    pub fn new(config: &RetryConfig) -> Self {
        Self {
            base: config.base_delay,
            max: config.max_delay,
            max_retry_after: config.max_retry_after,
        }
    }

    /// The most [`Backoff::delay`] waits after attempt `attempt` (1-based) failed, leaving
    /// retry-after aside: `min(max_delay, base_delay · 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        // Past 2^31 the cap has long been reached; the bound keeps the shift defined.
        let doublings = attempt.saturating_sub(1).min(31);
        self.base.saturating_mul(1 << doublings).min(self.max)
    }

    /// How long to wait before retrying after attempt `attempt` (1-based) failed: a random
    /// delay up to [`Backoff::ceiling`], or the provider's `retry_after` when that is longer,
    /// cut to `max_retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        self.delay_with(attempt, retry_after, &mut rand::rng())
    }

    /// [`Backoff::delay`] with the jitter drawn from `rng`.
    pub fn delay_with<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut R,
    ) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        let jittered = Duration::from_nanos(rng.random_range(0..=ceiling));
        match retry_after {
            Some(after) => jittered.max(after.min(self.max_retry_after)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn config() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let backoff = Backoff::new(&config());
        let ceilings: Vec<_> = (1..=7).map(|a| backoff.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let backoff = Backoff::new(&config());
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..=8 {
            let ceiling = backoff.ceiling(attempt);
            let delays: Vec<_> = (0..500)
                .map(|_| backoff.delay_with(attempt, None, &mut rng))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter: the draws cover the range, not just its top.
            let (low, high) = (ceiling / 4, ceiling * 3 / 4);
            assert!(delays.iter().any(|d| *d < low), "attempt {attempt}");
            assert!(delays.iter().any(|d| *d > high), "attempt {attempt}");
        }
        // The thread-local source stays within bounds too.
        for _ in 0..100 {
            assert!(backoff.delay(2, None) <= Duration::from_millis(200));
        }
    }

    #[test]
    fn delays_grow_with_the_attempt() {
        let backoff = Backoff::new(&config());
        let mut rng = StdRng::seed_from_u64(11);
        let mean = |attempt, rng: &mut StdRng| {
            (0..1000)
                .map(|_| backoff.delay_with(attempt, None, rng).as_secs_f64())
                .sum::<f64>()
                / 1000.0
        };
        let means: Vec<_> = (1..=5).map(|a| mean(a, &mut rng)).collect();
        assert!(means.windows(2).all(|w| w[0] < w[1]), "{means:?}");
        // Uniform on [0, ceiling]: about half the ceiling.
        assert!((means[0] - 0.05).abs() < 0.01, "{means:?}");
    }

    #[test]
    fn a_longer_retry_after_is_honoured_up_to_its_cap() {
        let backoff = Backoff::new(&config());
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            assert_eq!(
                backoff.delay_with(1, Some(Duration::from_secs(3)), &mut rng),
                Duration::from_secs(3)
            );
            assert_eq!(
                backoff.delay_with(1, Some(Duration::from_secs(600)), &mut rng),
                Duration::from_secs(10)
            );
            // A shorter one is a floor under the jittered delay, never a ceiling.
            let delay = backoff.delay_with(5, Some(Duration::from_millis(1)), &mut rng);
            assert!(delay >= Duration::from_millis(1) && delay <= Duration::from_secs(2));
        }
    }

    #[test]
    fn only_retryable_classes_are_retried_and_only_while_attempts_remain() {
        let config = config();
        for class in [
            ErrorClass::Transient,
            ErrorClass::ExternalRateLimit,
            ErrorClass::ExternalDegrading,
        ] {
            assert!(should_retry(class, 1, &config), "{class}");
            assert!(should_retry(class, 2, &config), "{class}");
            assert!(!should_retry(class, 3, &config), "{class}");
        }
        for class in [ErrorClass::UserFixable, ErrorClass::Permanent] {
            assert!(!should_retry(class, 1, &config), "{class}");
        }
        let once = RetryConfig {
            max_attempts: 1,
            ..config
        };
        assert!(!should_retry(ErrorClass::Transient, 1, &once));
    }
}
