//! Flow control: per-tenant limits on in-flight tasks, run creation rate and queue depth,
//! and what happens when a tenant's queue is full.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `limits.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Dispatched and running tasks per tenant; more wait for the dispatcher.
    pub max_in_flight_per_tenant: u32,
    /// Dispatched-but-unclaimed tasks across all tenants.
    pub max_unclaimed: u32,
    /// Tasks the dispatcher takes from one tenant per pass before every other tenant's turn.
    pub per_tenant_per_pass: u32,
    /// Queued and pending tasks per tenant; a new run past this meets `overflow`.
    pub max_queued_per_tenant: u64,
    pub overflow: Overflow,
    /// Sustained run creations per second per tenant (token bucket, per replica); 0: no limit.
    pub runs_per_second_per_tenant: f64,
    /// The bucket's size: runs a tenant may create at once.
    pub run_burst_per_tenant: u32,
}

/// What a new run meets when its tenant's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// HTTP 429.
    Reject,
    /// Cancel the tenant's lowest-priority queued run (reason "shed") if the new run's priority
    /// is higher; otherwise reject.
    ShedLowest,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_in_flight_per_tenant: 256,
            max_unclaimed: 10_000,
            per_tenant_per_pass: 64,
            max_queued_per_tenant: 100_000,
            overflow: Overflow::Reject,
            runs_per_second_per_tenant: 1_000.0,
            run_burst_per_tenant: 10_000,
        }
    }
}

impl colony_config::Validate for LimitsConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.max_in_flight_per_tenant == 0 {
            problems.push("limits.max_in_flight_per_tenant: must be at least 1".into());
        }
        if self.max_unclaimed == 0 {
            problems.push("limits.max_unclaimed: must be at least 1".into());
        }
        if self.per_tenant_per_pass == 0 {
            problems.push("limits.per_tenant_per_pass: must be at least 1".into());
        }
        if self.max_queued_per_tenant == 0 {
            problems.push("limits.max_queued_per_tenant: must be at least 1".into());
        }
        if !self.runs_per_second_per_tenant.is_finite() || self.runs_per_second_per_tenant < 0.0 {
            problems.push("limits.runs_per_second_per_tenant: must be 0 or more".into());
        }
        if self.runs_per_second_per_tenant > 0.0 && self.run_burst_per_tenant == 0 {
            problems.push("limits.run_burst_per_tenant: must be at least 1".into());
        }
    }
}

/// Per-tenant token buckets for run creation. In process: with several replicas each allows
/// the configured rate.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets idle this long are full again and forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl RateLimiter {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            rate: limits.runs_per_second_per_tenant,
            burst: f64::from(limits.run_burst_per_tenant.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `tenant` at `now`; `Err(wait)` when the bucket is empty.
    pub fn acquire(&self, tenant: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < FORGET_AFTER);
        }
        let bucket = buckets.entry(tenant.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(&LimitsConfig {
            runs_per_second_per_tenant: rate,
            run_burst_per_tenant: burst,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let limiter = limiter(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.acquire("a", t0).is_ok());
        }
        let wait = limiter.acquire("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another tenant has its own bucket.
        assert!(limiter.acquire("b", t0).is_ok());
        assert!(
            limiter
                .acquire("a", t0 + Duration::from_millis(500))
                .is_ok()
        );
        assert!(
            limiter
                .acquire("a", t0 + Duration::from_millis(500))
                .is_err()
        );
    }

    #[test]
    fn a_zero_rate_is_unlimited() {
        let limiter = limiter(0.0, 1);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(limiter.acquire("a", t0).is_ok());
        }
    }
}
