//! Flow control: per-tenant limits on in-flight tasks, run creation rate and queue depth,
//! and what happens when a tenant's queue is full.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

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
    /// Sustained run creations per second per tenant (one token bucket shared by every
    /// replica); 0: no limit.
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

/// Per-tenant token buckets for run creation, shared by every replica through PostgreSQL
/// (`orchestrator.run_tokens`). A replica takes tokens from the shared bucket in chunks of
/// about 50 ms of the rate and hands them out locally, so the database sees a few writes a
/// second per busy tenant rather than one per run. Tokens a replica took but did not use
/// within [`CHUNK_LIFETIME`] are dropped, never returned: together the replicas allow at most
/// the configured rate, and under sparse traffic a little less.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    pool: PgPool,
    chunks: Mutex<HashMap<String, Chunk>>,
    /// One fetch from the shared bucket per tenant at a time: requests that find no local
    /// token while a fetch is under way wait for it rather than each taking a chunk (which
    /// would take far more than the rate, and waste what expires unused).
    fetches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Tokens this replica took from a tenant's shared bucket.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    tokens: u32,
    taken: Instant,
}

/// How long a taken chunk may be used.
const CHUNK_LIFETIME: Duration = Duration::from_secs(1);

impl RateLimiter {
    pub fn new(limits: &LimitsConfig, pool: PgPool) -> Self {
        Self {
            rate: limits.runs_per_second_per_tenant,
            burst: f64::from(limits.run_burst_per_tenant.max(1)),
            pool,
            chunks: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
        }
    }

    /// Tokens taken from the shared bucket at once: 50 ms of the rate, at least 1, at most
    /// a tenth of the burst.
    fn chunk_size(&self) -> u32 {
        (self.rate * 0.05).min(self.burst / 10.0).max(1.0) as u32
    }

    /// Takes one token for `tenant`; `Err(wait)` when the shared bucket is empty. If the
    /// database cannot be asked, the run is let through (the limit is advisory) and the
    /// failure logged.
    pub async fn acquire(&self, tenant: &str) -> Result<(), Duration> {
        if self.rate <= 0.0 || self.take_local(tenant) {
            return Ok(());
        }
        let fetch = self.fetch_lock(tenant);
        let _fetching = fetch.lock().await;
        // The fetch this one waited for may have left a token.
        if self.take_local(tenant) {
            return Ok(());
        }
        match self.take_shared(tenant).await {
            Ok(Granted::Tokens(tokens)) => {
                self.keep_local(tenant, tokens - 1);
                Ok(())
            }
            Ok(Granted::Wait(wait)) => Err(wait),
            Err(error) => {
                tracing::warn!(%error, tenant, "run rate check failed; run let through");
                Ok(())
            }
        }
    }

    fn chunks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Chunk>> {
        match self.chunks.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn fetch_lock(&self, tenant: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut fetches = match self.fetches.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if fetches.len() > 10_000 {
            // Locks nobody holds or waits for.
            fetches.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        fetches.entry(tenant.to_owned()).or_default().clone()
    }

    fn take_local(&self, tenant: &str) -> bool {
        let mut chunks = self.chunks();
        match chunks.get_mut(tenant) {
            Some(chunk) if chunk.tokens > 0 && chunk.taken.elapsed() < CHUNK_LIFETIME => {
                chunk.tokens -= 1;
                true
            }
            _ => false,
        }
    }

    fn keep_local(&self, tenant: &str, tokens: u32) {
        let mut chunks = self.chunks();
        if chunks.len() > 10_000 {
            chunks.retain(|_, c| c.taken.elapsed() < CHUNK_LIFETIME);
        }
        let now = Instant::now();
        let chunk = chunks.entry(tenant.to_owned()).or_insert(Chunk {
            tokens: 0,
            taken: now,
        });
        if chunk.taken.elapsed() >= CHUNK_LIFETIME {
            chunk.tokens = 0;
        }
        chunk.tokens += tokens;
        chunk.taken = now;
    }

    /// Takes up to a chunk from the shared bucket (refilled for the time since it was last
    /// touched). The write need not survive a crash (a lost one only gives tokens back), so
    /// it does not wait for the WAL flush.
    async fn take_shared(&self, tenant: &str) -> Result<Granted, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO orchestrator.run_tokens (tenant, tokens, at) VALUES ($1, $2, now()) \
             ON CONFLICT (tenant) DO NOTHING",
        )
        .bind(tenant)
        .bind(self.burst)
        .execute(&mut *tx)
        .await?;
        let (granted, available): (i64, f64) = sqlx::query_as(
            "WITH b AS (SELECT tenant, LEAST($2, tokens + \
                            GREATEST(0, EXTRACT(EPOCH FROM now() - at))::float8 * $3) AS available \
                        FROM orchestrator.run_tokens WHERE tenant = $1 FOR UPDATE) \
             UPDATE orchestrator.run_tokens r \
             SET tokens = b.available - LEAST(floor(b.available), $4), at = now() \
             FROM b WHERE r.tenant = b.tenant \
             RETURNING LEAST(floor(b.available), $4)::int8, b.available",
        )
        .bind(tenant)
        .bind(self.burst)
        .bind(self.rate)
        .bind(f64::from(self.chunk_size()))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(match u32::try_from(granted) {
            Ok(tokens) if tokens > 0 => Granted::Tokens(tokens),
            _ => Granted::Wait(Duration::from_secs_f64(
                ((1.0 - available) / self.rate).max(0.001),
            )),
        })
    }
}

/// What the shared bucket gave.
enum Granted {
    Tokens(u32),
    /// Empty: the time until the next token.
    Wait(Duration),
}
