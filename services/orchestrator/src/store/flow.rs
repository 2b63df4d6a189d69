//! Flow control in the store: whether a ready attempt may be dispatched at once, the
//! dispatcher pass (round-robin across tenants, priority first within one, per-tenant
//! in-flight and global unclaimed caps), and admission of new runs against the queue bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use colony_bus::{OutboxRow, Outgoing};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::control::NOT_PAUSED;
use super::{OUTBOX, Store, dispatch_row};
use crate::flow::{LimitsConfig, Overflow};
use crate::{Error, metrics};

/// SQL: a tenant's in-flight attempts (dispatched, not finished).
const IN_FLIGHT: &str =
    "state IN ('queued', 'running', 'cancelling') AND dispatched_at IS NOT NULL";

/// Whether a ready attempt of `run_id` may be dispatched in the caller's transaction: not in
/// maintenance mode, its tenant under its in-flight cap, the unclaimed total under its cap, and
/// no attempt of the same tenant with at least its priority waiting for the dispatcher (which
/// keeps priority order). Otherwise it waits (`dispatched_at` NULL) for the dispatcher pass.
/// The limits come from `orchestrator.flow_limits` (written from config at start).
pub(crate) async fn may_dispatch(conn: &mut PgConnection, run_id: Uuid) -> Result<bool, Error> {
    let defaults = LimitsConfig::default();
    let may: Option<bool> = sqlx::query_scalar(&format!(
        "WITH r AS (SELECT tenant, priority FROM orchestrator.runs WHERE id = $1), \
              l AS (SELECT COALESCE((SELECT max_in_flight_per_tenant FROM orchestrator.flow_limits), $2) AS tenant_cap, \
                           COALESCE((SELECT max_unclaimed FROM orchestrator.flow_limits), $3) AS unclaimed_cap) \
         SELECT {NOT_PAUSED} \
            AND (SELECT count(*) FROM orchestrator.tasks t, r \
                 WHERE t.tenant = r.tenant AND t.{IN_FLIGHT}) < (SELECT tenant_cap FROM l) \
            AND (SELECT count(*) FROM orchestrator.tasks \
                 WHERE state = 'queued' AND dispatched_at IS NOT NULL) < (SELECT unclaimed_cap FROM l) \
            AND NOT EXISTS (SELECT 1 FROM orchestrator.tasks t, r \
                            WHERE t.tenant = r.tenant AND t.state = 'queued' \
                              AND t.dispatched_at IS NULL \
                              AND (t.not_before IS NULL OR t.not_before <= now()) \
                              AND t.priority >= r.priority) \
         FROM r"
    ))
    .bind(run_id)
    .bind(defaults.max_in_flight_per_tenant as i32)
    .bind(defaults.max_unclaimed as i32)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(may.unwrap_or(false))
}

/// How long a tenant's counted queue depth stands in for a count.
const DEPTH_FRESH_FOR: Duration = Duration::from_millis(500);

/// Recent queue depths per tenant (this replica's view): the last count, when it was taken,
/// and the runs admitted since.
#[derive(Debug, Default)]
pub(crate) struct DepthCache {
    depths: Mutex<HashMap<String, (i64, Instant)>>,
}

impl DepthCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Instant)>> {
        match self.depths.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records a count of `tenant`'s queue.
    fn counted(&self, tenant: &str, depth: i64) {
        let mut depths = self.lock();
        if depths.len() > 10_000 {
            depths.retain(|_, (_, at)| at.elapsed() < DEPTH_FRESH_FOR);
        }
        depths.insert(tenant.to_owned(), (depth, Instant::now()));
    }

    /// Admits one run of `tenant` (adds it to the depth) if a fresh count says the queue stays
    /// below `bound` with it; `false` when a count is due.
    fn admit_below(&self, tenant: &str, bound: i64) -> bool {
        let mut depths = self.lock();
        match depths.get_mut(tenant) {
            Some((depth, at)) if at.elapsed() < DEPTH_FRESH_FOR && *depth + 1 < bound => {
                *depth += 1;
                true
            }
            _ => false,
        }
    }
}

/// Why a new run was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    QueueFull,
}

impl Store {
    /// The flow limits the dispatcher pass and admission apply.
    pub fn with_limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Writes the limits where inline dispatch (any replica) reads them.
    pub async fn apply_limits(&self) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO orchestrator.flow_limits (singleton, max_in_flight_per_tenant, max_unclaimed) \
             VALUES (true, $1, $2) \
             ON CONFLICT (singleton) DO UPDATE SET max_in_flight_per_tenant = $1, \
                 max_unclaimed = $2, changed_at = now()",
        )
        .bind(self.limits.max_in_flight_per_tenant as i32)
        .bind(self.limits.max_unclaimed as i32)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Wakes the dispatcher loop of this process (a run was created, a task finished).
    pub fn wake_dispatcher(&self) {
        self.wake.notify_one();
    }

    /// Waits until [`Store::wake_dispatcher`] was called (at once if it was since last time).
    pub async fn dispatcher_woken(&self) {
        self.wake.notified().await;
    }

    /// Admits a new run of `tenant` with `priority` against `limits.max_queued_per_tenant`.
    /// When the queue is full: `reject` refuses; `shed_lowest` cancels the tenant's
    /// lowest-priority run that has not started (reason "shed") if its priority is below
    /// `priority`, and refuses otherwise. Returns the shed run. A soft bound: concurrent
    /// creations may pass it by a few.
    pub async fn admit(&self, tenant: &str, priority: i16) -> Result<Option<Uuid>, Refusal> {
        self.admit_inner(tenant, priority)
            .await
            .unwrap_or_else(|error| {
                // Admission is advisory; a failing count must not stop run creation.
                tracing::warn!(%error, tenant, "queue depth check failed");
                Ok(None)
            })
    }

    async fn admit_inner(
        &self,
        tenant: &str,
        priority: i16,
    ) -> Result<Result<Option<Uuid>, Refusal>, Error> {
        let bound = i64::try_from(self.limits.max_queued_per_tenant).unwrap_or(i64::MAX);
        // Well below the bound, a recent count plus this replica's admissions since is enough;
        // a refusal is always decided on a fresh count.
        if self.depths.admit_below(tenant, bound) {
            return Ok(Ok(None));
        }
        let depth: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM orchestrator.tasks \
                 WHERE tenant = $1 AND state IN ('queued', 'pending') LIMIT $2) q",
        )
        .bind(tenant)
        .bind(bound)
        .fetch_one(&self.pool)
        .await?;
        self.depths.counted(tenant, depth);
        if depth < bound {
            self.depths.admit_below(tenant, bound);
            return Ok(Ok(None));
        }
        if self.limits.overflow == Overflow::Reject {
            return Ok(Err(Refusal::QueueFull));
        }
        // The lowest-priority run (newest first among equals) none of whose tasks started.
        let victim: Option<Uuid> = sqlx::query_scalar(
            "SELECT r.id FROM orchestrator.runs r \
             WHERE r.tenant = $1 AND r.status = 'running' AND r.priority < $2 \
               AND NOT EXISTS (SELECT 1 FROM orchestrator.tasks t WHERE t.run_id = r.id \
                               AND t.state NOT IN ('queued', 'pending')) \
             ORDER BY r.priority, r.created_at DESC LIMIT 1",
        )
        .bind(tenant)
        .bind(priority)
        .fetch_optional(&self.pool)
        .await?;
        let Some(victim) = victim else {
            return Ok(Err(Refusal::QueueFull));
        };
        match self.cancel_run(tenant, victim).await {
            Ok(_) => {}
            // Finished or started meanwhile: refuse rather than shed another.
            Err(Error::Conflict(_)) => return Ok(Err(Refusal::QueueFull)),
            Err(error) => return Err(error),
        }
        sqlx::query(
            "UPDATE orchestrator.runs SET failure_reason = 'shed' \
             WHERE id = $1 AND failure_reason IS NULL",
        )
        .bind(victim)
        .execute(&self.pool)
        .await?;
        ::metrics::counter!(crate::metrics::SHED).increment(1);
        tracing::warn!(tenant, run_id = %victim, "queue full: lowest-priority run shed");
        Ok(Ok(Some(victim)))
    }

    /// One dispatcher pass: dispatches up to `batch` ready attempts waiting for dispatch,
    /// round-robin across tenants (every tenant's first before any tenant's second, at most
    /// `limits.per_tenant_per_pass` each), highest priority then oldest first within a tenant,
    /// within each tenant's in-flight cap and the global unclaimed cap. Nothing in
    /// maintenance mode. Safe on several replicas at once (`SKIP LOCKED`).
    pub async fn dispatch_due(&self, batch: i64) -> Result<u64, Error> {
        let mut tx = self.pool.begin().await?;
        if self.dispatch_bus.is_none() {
            OUTBOX.quiet(&mut tx).await?;
        }
        let unclaimed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orchestrator.tasks \
             WHERE state = 'queued' AND dispatched_at IS NOT NULL",
        )
        .fetch_one(&mut *tx)
        .await?;
        let budget = batch.min(i64::from(self.limits.max_unclaimed) - unclaimed);
        if budget <= 0 {
            tx.rollback().await?;
            return Ok(0);
        }
        // Tenants with waiting attempts by a loose index scan (one index probe per tenant),
        // then each tenant's head in priority order under its in-flight cap, locked so another
        // replica's pass skips it: the cost grows with tenants and the batch, not with the
        // depth of the queue. The rank (every tenant's first before any tenant's second) is
        // taken over the heads only.
        let candidates: Vec<Uuid> = sqlx::query_scalar(&format!(
            "WITH RECURSIVE tenants AS ( \
                 (SELECT tenant FROM orchestrator.tasks \
                  WHERE state = 'queued' AND dispatched_at IS NULL ORDER BY tenant LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT t.tenant FROM orchestrator.tasks t \
                         WHERE t.state = 'queued' AND t.dispatched_at IS NULL \
                           AND t.tenant > tenants.tenant ORDER BY t.tenant LIMIT 1) \
                 FROM tenants WHERE tenants.tenant IS NOT NULL), \
             heads AS ( \
                 SELECT head.id, head.priority, head.ready_at, \
                        ROW_NUMBER() OVER (PARTITION BY tenants.tenant \
                                           ORDER BY head.priority DESC, head.ready_at) AS rank \
                 FROM tenants \
                 CROSS JOIN LATERAL ( \
                     SELECT count(*) AS n FROM orchestrator.tasks f \
                     WHERE f.tenant = tenants.tenant AND f.{IN_FLIGHT}) in_flight \
                 CROSS JOIN LATERAL ( \
                     SELECT w.id, w.priority, w.ready_at FROM orchestrator.tasks w \
                     WHERE w.tenant = tenants.tenant AND w.state = 'queued' \
                       AND w.dispatched_at IS NULL \
                       AND (w.not_before IS NULL OR w.not_before <= now()) \
                     ORDER BY w.priority DESC, w.ready_at \
                     LIMIT GREATEST(0, LEAST($1, $2 - in_flight.n)) \
                     FOR UPDATE SKIP LOCKED) head \
                 WHERE tenants.tenant IS NOT NULL AND {NOT_PAUSED}) \
             SELECT id FROM heads ORDER BY rank, priority DESC, ready_at, id LIMIT $3"
        ))
        .bind(i64::from(self.limits.per_tenant_per_pass))
        .bind(i64::from(self.limits.max_in_flight_per_tenant))
        .bind(budget)
        .fetch_all(&mut *tx)
        .await?;
        if candidates.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        // The candidates are locked and were checked above; selecting them by id alone keeps
        // the planner on the primary key whatever its statistics say about the queue.
        let due = sqlx::query(&format!(
            "UPDATE orchestrator.tasks SET dispatched_at = now(), dispatches = dispatches + 1 \
             FROM orchestrator.runs r \
             WHERE tasks.id = ANY($1) AND r.id = tasks.run_id AND {NOT_PAUSED} \
             RETURNING tasks.id, tasks.run_id, tasks.tenant, tasks.role, tasks.attempt, \
                       tasks.dispatches, r.traceparent"
        ))
        .bind(&candidates)
        .fetch_all(&mut *tx)
        .await?;
        let rows: Vec<_> = due
            .iter()
            .map(|task| {
                // The dispatcher's pass is no part of the run's trace: the dispatch continues
                // the trace of the request that created the run.
                dispatch_row(
                    task.get("tenant"),
                    task.get("run_id"),
                    task.get("id"),
                    task.get("attempt"),
                    task.get("role"),
                    task.get("dispatches"),
                )
                .with_traceparent(task.get("traceparent"))
            })
            .collect();
        match &self.dispatch_bus {
            Some(bus) => {
                tx.commit().await?;
                publish_dispatches(bus, &rows).await;
            }
            None => {
                OUTBOX.enqueue_many(&mut tx, &rows).await?;
                tx.commit().await?;
                OUTBOX.wake();
            }
        }
        Ok(due.len() as u64)
    }

    /// Queued and pending tasks of every tenant (the queue depth gauge).
    /// The unfinished work of every tenant: tasks by tenant, role and unfinished state (with
    /// the oldest's wait since it became ready), and running runs by tenant. Both queries read
    /// partial indexes over unfinished rows only, so the cost follows the backlog, not history.
    pub async fn active_work(&self) -> Result<ActiveWork, Error> {
        let tasks = sqlx::query_as::<_, ActiveTasks>(
            "SELECT tenant, role, state, count(*) AS count, \
                    COALESCE(EXTRACT(EPOCH FROM now() - min(ready_at)), 0)::float8 AS oldest_seconds \
             FROM orchestrator.tasks \
             WHERE state IN ('queued', 'pending', 'running', 'cancelling', 'awaiting_approval', 'parked') \
             GROUP BY tenant, role, state",
        )
        .fetch_all(&self.pool)
        .await?;
        let runs = sqlx::query_as::<_, (String, i64)>(
            "SELECT tenant, count(*) FROM orchestrator.runs WHERE status = 'running' GROUP BY tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ActiveWork { tasks, runs })
    }

    /// Analyzes each of the queue's tables that changed by more than it held at its last
    /// analysis (and by at least [`ANALYZE_AFTER_CHANGES`] rows). A queue that goes from empty
    /// to thousands of rows within autovacuum's first minute would otherwise be planned as
    /// empty, and a lookup by id would walk a tenant's whole queue. Returns the tables analyzed.
    pub async fn refresh_statistics(&self) -> Result<Vec<String>, Error> {
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
             WHERE s.schemaname = 'orchestrator' AND s.relname = ANY($2) \
               AND s.n_mod_since_analyze > GREATEST($1, c.reltuples::bigint)",
        )
        .bind(ANALYZE_AFTER_CHANGES)
        .bind(&ANALYZED_TABLES[..])
        .fetch_all(&self.pool)
        .await?;
        for table in &stale {
            // Only names from ANALYZED_TABLES come back.
            sqlx::query(&format!("ANALYZE orchestrator.{table}"))
                .execute(&self.pool)
                .await?;
        }
        Ok(stale)
    }
}

/// Publishes committed dispatches; one that JetStream does not acknowledge is counted and left
/// to [`Store::redispatch_unclaimed`].
async fn publish_dispatches(bus: &colony_bus::Bus, rows: &[OutboxRow]) {
    let traceparent = colony_telemetry::current_traceparent();
    let messages: Vec<Outgoing<'_>> = rows
        .iter()
        .map(|row| Outgoing {
            subject: &row.subject,
            msg_id: &row.msg_id,
            traceparent: row.traceparent.as_deref().or(traceparent.as_deref()),
            payload: row.payload.clone().into(),
        })
        .collect();
    for ack in bus.publish_all(&messages).await {
        if let Err(error) = ack {
            ::metrics::counter!(metrics::DISPATCHES_UNPUBLISHED).increment(1);
            tracing::warn!(%error, "dispatch not published; it is dispatched again once leases.redispatch_after passes");
        }
    }
}

/// The orchestrator's tables that grow with the queue.
const ANALYZED_TABLES: [&str; 3] = ["tasks", "runs", "task_attempts"];

/// Row changes below which a table's statistics are left to autovacuum.
const ANALYZE_AFTER_CHANGES: i64 = 1_000;

/// Unfinished tasks of one tenant and role in one state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActiveTasks {
    pub tenant: String,
    pub role: String,
    pub state: String,
    pub count: i64,
    /// Seconds since the longest-waiting of them became ready.
    pub oldest_seconds: f64,
}

/// What [`Store::active_work`] found.
#[derive(Debug, Clone, Default)]
pub struct ActiveWork {
    pub tasks: Vec<ActiveTasks>,
    /// Running runs by tenant.
    pub runs: Vec<(String, i64)>,
}
