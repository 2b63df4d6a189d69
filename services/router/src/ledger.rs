//! The usage ledger: one row per provider call in `router.usage_ledger`, with a `UsageRecord`
//! for `colony.v1.usage.recorded` (msg id `usage-<row id>`) in the router's outbox and the
//! settlement of the call's budget reservation, all in the same transaction.
//!
//! Calls hand their entry to a [`LedgerWriter`] and go on: a background task writes entries in
//! batches (up to `ledger.batch` entries, or what arrived within `ledger.flush_interval`), one
//! transaction per batch, so a busy router pays one commit for many calls instead of one each.
//! The queue is bounded; when it is full, calls wait for room (backpressure) rather than lose
//! their entries. A failed write is retried with backoff, the batch kept.
//!
//! The trade-off: entries waiting in memory when the process dies are lost: no ledger row, no
//! usage event, and their budget reservations stay reserved (their cost is never counted as
//! spent, but the reserved amount keeps later calls out, erring on the safe side until an
//! operator resets the row). An orderly shutdown loses nothing: [`LedgerWriter::close`] writes
//! everything queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use colony_bus::{Outbox, OutboxRow, subjects};
use colony_proto::v1;
use colony_runtime::Runtime;
use metrics::{counter, gauge, histogram};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::budget::{self, Reservation};
use crate::config::ProviderKind;
use crate::error::ErrorClass;
use crate::provider::TokenUsage;
use crate::routing::Deployment;

/// The router's outbox; its relay runs for the life of the service.
pub const OUTBOX: Outbox = Outbox::new("router.outbox", "router_outbox");

use crate::metrics::{BATCH_ENTRIES, FLUSH_SECONDS, LOST, PENDING, WRITE_FAILURES};

/// `ledger.*`: how the writer batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Most entries written in one transaction.
    pub batch: usize,
    /// How long a batch waits for more entries after its first arrives.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Entries that may wait for the writer; calls beyond that wait for room.
    pub queue: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            batch: 256,
            flush_interval: Duration::from_millis(20),
            queue: 4096,
        }
    }
}

impl colony_config::Validate for LedgerConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.batch == 0 {
            problems.push("ledger.batch: must be at least 1".into());
        }
        if self.queue == 0 {
            problems.push("ledger.queue: must be at least 1".into());
        }
        // Bind parameters are arrays, so any batch fits one statement; this only keeps a
        // batch's locks and transaction short.
        if self.batch > 10_000 {
            problems.push("ledger.batch: at most 10000".into());
        }
    }
}

/// Who a call was made for (every record carries the tenant).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub run_id: String,
    pub task_id: String,
    pub attempt: u32,
}

/// One provider call to account for, owned, for the [`LedgerWriter`].
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    pub caller: Caller,
    pub deployment: String,
    pub provider: ProviderKind,
    pub model: String,
    /// `None` when the call succeeded.
    pub error: Option<ErrorClass>,
    pub usage: TokenUsage,
    pub cost_micros: u64,
    pub latency: Duration,
    pub occurred_at: DateTime<Utc>,
    /// The call's trace, carried by its usage event (the writer's task has none of its own).
    pub traceparent: Option<String>,
    /// Settled to `cost_micros` in the entry's transaction.
    pub reservation: Option<Reservation>,
}

impl LedgerEntry {
    /// An entry for a call that just ended, in the current span's trace.
    pub fn new(
        caller: Caller,
        deployment: &Deployment,
        error: Option<ErrorClass>,
        usage: TokenUsage,
        cost_micros: u64,
        latency: Duration,
    ) -> Self {
        Self {
            caller,
            deployment: deployment.name.clone(),
            provider: deployment.provider_kind,
            model: deployment.model.clone(),
            error,
            usage,
            cost_micros,
            latency,
            occurred_at: Utc::now(),
            traceparent: colony_telemetry::current_traceparent(),
            reservation: None,
        }
    }

    /// The entry settling `reservation` (if any) to its cost.
    pub fn with_reservation(self, reservation: Option<Reservation>) -> Self {
        Self {
            reservation,
            ..self
        }
    }

    fn latency_ms(&self) -> u64 {
        u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX)
    }

    fn usage_record(&self) -> v1::UsageRecord {
        v1::UsageRecord {
            tenant: self.caller.tenant.clone(),
            run_id: self.caller.run_id.clone(),
            task_id: self.caller.task_id.clone(),
            attempt: self.caller.attempt,
            deployment: self.deployment.clone(),
            provider: self.provider.as_str().to_owned(),
            model: self.model.clone(),
            usage: Some(v1::Usage {
                prompt_tokens: self.usage.prompt,
                completion_tokens: self.usage.completion,
                cost_micros_usd: self.cost_micros,
            }),
            latency_ms: self.latency_ms(),
            occurred_at: Some(colony_proto::timestamp(self.occurred_at.into())),
        }
    }
}

fn db_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Writes `entries` in one transaction: their ledger rows (one statement), their usage events
/// (one statement) and the settlement of their reservations (one statement, last, because it
/// holds budget row locks until commit). Returns the row ids in the order of `entries`.
pub async fn write_batch(
    pool: &PgPool,
    entries: &[LedgerEntry],
) -> Result<Vec<i64>, colony_bus::Error> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&LedgerEntry) -> i64| entries.iter().map(f).collect::<Vec<i64>>();
    let tenants: Vec<&str> = entries.iter().map(|e| e.caller.tenant.as_str()).collect();
    let runs: Vec<&str> = entries.iter().map(|e| e.caller.run_id.as_str()).collect();
    let tasks: Vec<&str> = entries.iter().map(|e| e.caller.task_id.as_str()).collect();
    let deployments: Vec<&str> = entries.iter().map(|e| e.deployment.as_str()).collect();
    let providers: Vec<&str> = entries.iter().map(|e| e.provider.as_str()).collect();
    let models: Vec<&str> = entries.iter().map(|e| e.model.as_str()).collect();
    let outcomes: Vec<&str> = entries
        .iter()
        .map(|e| if e.error.is_some() { "error" } else { "ok" })
        .collect();
    let classes: Vec<Option<&str>> = entries
        .iter()
        .map(|e| e.error.map(ErrorClass::as_str))
        .collect();
    let occurred: Vec<DateTime<Utc>> = entries.iter().map(|e| e.occurred_at).collect();
    let mut tx = pool.begin().await?;
    // Ids come from the sequence in `input`, which is materialized once (it is read twice and
    // calls a volatile function), so each id is paired with its entry's position without
    // relying on the order of INSERT … RETURNING.
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH input AS ( \
             SELECT nextval('router.usage_ledger_id_seq') AS id, u.* \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], \
                         $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[], \
                         $11::bigint[], $12::bigint[], $13::bigint[], $14::timestamptz[]) \
                  WITH ORDINALITY AS u(tenant, run_id, task_id, attempt, deployment, provider, \
                         model, outcome, error_class, prompt_tokens, completion_tokens, \
                         cost_micros_usd, latency_ms, occurred_at, ord)), \
         inserted AS ( \
             INSERT INTO router.usage_ledger (id, tenant, run_id, task_id, attempt, deployment, \
                 provider, model, outcome, error_class, prompt_tokens, completion_tokens, \
                 cost_micros_usd, latency_ms, occurred_at) \
             SELECT id, tenant, run_id, task_id, attempt, deployment, provider, model, outcome, \
                 error_class, prompt_tokens, completion_tokens, cost_micros_usd, latency_ms, \
                 occurred_at \
             FROM input) \
         SELECT id FROM input ORDER BY ord",
    )
    .bind(&tenants)
    .bind(&runs)
    .bind(&tasks)
    .bind(column(|e| i64::from(e.caller.attempt)))
    .bind(&deployments)
    .bind(&providers)
    .bind(&models)
    .bind(&outcomes)
    .bind(&classes)
    .bind(column(|e| db_int(e.usage.prompt)))
    .bind(column(|e| db_int(e.usage.completion)))
    .bind(column(|e| db_int(e.cost_micros)))
    .bind(column(|e| db_int(e.latency_ms())))
    .bind(&occurred)
    .fetch_all(&mut *tx)
    .await?;
    let events: Vec<OutboxRow> = entries
        .iter()
        .zip(&ids)
        .map(|(entry, id)| {
            OutboxRow::new(
                subjects::USAGE_RECORDED,
                &format!("usage-{id}"),
                &entry.usage_record(),
            )
            .with_traceparent(entry.traceparent.clone())
        })
        .collect();
    OUTBOX.enqueue_many(&mut tx, &events).await?;
    let settlements: Vec<(&Reservation, u64)> = entries
        .iter()
        .filter_map(|e| e.reservation.as_ref().map(|r| (r, e.cost_micros)))
        .collect();
    budget::settle_many(&mut tx, &settlements).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Why an entry was not taken: the writer was closed (or its task ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the usage ledger writer is closed")]
pub struct Closed;

/// What the writer has committed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Committed transactions (one per batch).
    pub batches: u64,
    /// Entries in them.
    pub entries: u64,
    /// Failed batch writes (each retried).
    pub failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    pending: AtomicU64,
    batches: AtomicU64,
    entries: AtomicU64,
    failures: AtomicU64,
}

impl Counters {
    fn add_pending(&self, n: u64) {
        let now = self
            .pending
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        gauge!(PENDING).set(now as f64);
    }

    fn sub_pending(&self, n: u64) {
        let now = self
            .pending
            .fetch_sub(n, Ordering::Relaxed)
            .saturating_sub(n);
        gauge!(PENDING).set(now as f64);
    }
}

/// Hands entries to the background writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LedgerWriter {
    sender: mpsc::Sender<LedgerEntry>,
    close: CancellationToken,
    done: watch::Receiver<bool>,
    counters: Arc<Counters>,
}

/// Failed writes during close are retried this often before the batch is given up (with an
/// error log), so a dead database cannot hold shutdown forever.
const CLOSE_ATTEMPTS: u32 = 5;

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50 * 2u64.pow(failures.min(7))).min(Duration::from_secs(5))
}

impl LedgerWriter {
    /// Starts the writer's task on `runtime`. The task is not stopped by the runtime's
    /// shutdown token, since calls still finishing during shutdown need it: stop intake first,
    /// then [`LedgerWriter::close`], then drain the runtime and relay the outbox one last time.
    pub fn spawn(pool: PgPool, config: &LedgerConfig, runtime: &Runtime) -> Self {
        let (sender, receiver) = mpsc::channel(config.queue.max(1));
        let (finished, done) = watch::channel(false);
        let close = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let task = Flusher {
            pool,
            receiver,
            close: close.clone(),
            counters: counters.clone(),
            max: config.batch.max(1),
            interval: config.flush_interval,
        };
        runtime.spawn(async move {
            task.run().await;
            // `send_replace` stores the value even when no handle is left to see it.
            finished.send_replace(true);
        });
        Self {
            sender,
            close,
            done,
            counters,
        }
    }

    /// Queues `entry`, waiting for room when the queue is full. Returns once the writer has
    /// the entry, not once it is committed.
    pub async fn record(&self, entry: LedgerEntry) -> Result<(), Closed> {
        self.counters.add_pending(1);
        let sent = self.sender.send(entry).await.map_err(|_| Closed);
        if sent.is_err() {
            self.counters.sub_pending(1);
        }
        sent
    }

    /// Stops taking entries, writes every queued one, and returns when the writer's task has
    /// finished. Any clone may close; calls on the others then get [`Closed`].
    pub async fn close(&self) {
        self.close.cancel();
        let mut done = self.done.clone();
        // An error means the task is gone already, which is what this waits for.
        drop(done.wait_for(|finished| *finished).await);
    }

    pub fn stats(&self) -> LedgerStats {
        LedgerStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            entries: self.counters.entries.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
        }
    }
}

/// The writer's task.
struct Flusher {
    pool: PgPool,
    receiver: mpsc::Receiver<LedgerEntry>,
    close: CancellationToken,
    counters: Arc<Counters>,
    max: usize,
    interval: Duration,
}

impl Flusher {
    /// Until closed (or every handle is dropped) and the queue is empty: collects a batch,
    /// writes it.
    async fn run(mut self) {
        let mut closing = false;
        loop {
            let first = tokio::select! {
                entry = self.receiver.recv() => entry,
                () = self.close.cancelled(), if !closing => {
                    closing = self.begin_closing();
                    continue;
                }
            };
            // `None`: closed and drained, or every handle dropped.
            let Some(first) = first else { break };
            let mut batch = Vec::with_capacity(self.max.min(1024));
            batch.push(first);
            let deadline = tokio::time::Instant::now() + self.interval;
            while batch.len() < self.max {
                if let Ok(entry) = self.receiver.try_recv() {
                    batch.push(entry);
                    continue;
                }
                // While closing, nothing more is coming: write what there is at once.
                if closing {
                    break;
                }
                tokio::select! {
                    entry = self.receiver.recv() => match entry {
                        Some(entry) => batch.push(entry),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = self.close.cancelled() => closing = self.begin_closing(),
                }
            }
            self.flush(batch).await;
        }
    }

    fn begin_closing(&mut self) -> bool {
        // New entries are refused; those already queued are still received.
        self.receiver.close();
        true
    }

    /// Writes `batch`, retrying failures with backoff. Gives up only after
    /// [`CLOSE_ATTEMPTS`] failures once closing.
    async fn flush(&self, batch: Vec<LedgerEntry>) {
        let count = batch.len() as u64;
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            match write_batch(&self.pool, &batch).await {
                Ok(_) => {
                    histogram!(FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
                    histogram!(BATCH_ENTRIES).record(count as f64);
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    self.counters.entries.fetch_add(count, Ordering::Relaxed);
                    self.counters.sub_pending(count);
                    return;
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    counter!(WRITE_FAILURES).increment(1);
                    if self.close.is_cancelled() && failures >= CLOSE_ATTEMPTS {
                        tracing::error!(
                            %error,
                            entries = count,
                            failures,
                            "usage ledger entries lost at shutdown: the database kept failing"
                        );
                        counter!(LOST).increment(count);
                        self.counters.sub_pending(count);
                        return;
                    }
                    tracing::warn!(%error, entries = count, failures, "usage ledger write failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(30), Duration::from_secs(5));
    }

    #[test]
    fn config_defaults_apply_to_missing_keys() {
        let config: LedgerConfig = serde_json::from_str(r#"{"batch": 8}"#).unwrap();
        assert_eq!(
            config,
            LedgerConfig {
                batch: 8,
                ..LedgerConfig::default()
            }
        );
    }
}
