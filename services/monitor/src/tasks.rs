//! The monitor's own view of tasks, kept in `monitor.tasks` from the task events it consumes:
//! which tasks are queued and since when, which run and since when. It is independent of the
//! orchestrator's tables and of its lease reaper: a task running longer than
//! `stale_task_after` is **stale** — counted, listed and alerted on, never acted upon.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::Error;
use crate::metrics;

/// Where a task event leaves its task. Within one attempt a task only moves forward through
/// these (awaiting approval → queued → started → ended); a new attempt starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Waits for a human's approval before it may be queued.
    AwaitingApproval,
    /// Queued or re-queued: waits for a worker.
    Queued,
    /// A worker claimed it.
    Started,
    /// Its attempt ended waiting for spawned children; it is queued again with a new attempt.
    Parked,
    /// Succeeded, failed, cancelled or dead-lettered. A failed attempt that is retried is
    /// followed by a re-queue with the next attempt, which supersedes this.
    Finished,
}

impl Transition {
    /// The state it leaves the task in (`monitor.tasks.state`).
    pub fn state(self) -> &'static str {
        match self {
            Transition::Queued => "queued",
            Transition::Started => "running",
            Transition::AwaitingApproval | Transition::Parked => "waiting",
            Transition::Finished => "finished",
        }
    }

    /// Its place in an attempt's life (`monitor.tasks.stage`): of two events of one attempt,
    /// the later stage wins whatever their clocks say (the orchestrator replica that started a
    /// task and the one that finished it may disagree by a few milliseconds).
    pub fn stage(self) -> i16 {
        match self {
            Transition::AwaitingApproval => 0,
            Transition::Queued => 1,
            Transition::Started => 2,
            Transition::Parked | Transition::Finished => 3,
        }
    }
}

/// A task event, reduced to what the task view needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskUpdate {
    pub task_id: String,
    pub tenant: String,
    pub run_id: String,
    pub role: String,
    pub attempt: u32,
    pub transition: Transition,
    /// The event's own time; without one, its arrival.
    pub occurred_at: Option<DateTime<Utc>>,
}

/// Applies one task event, in one statement. It applies only if it comes later in the task's
/// life than the one the row holds — a higher attempt, or the same attempt at a later stage,
/// or the same stage at a later event time — so redelivered and reordered events change
/// nothing. Ended tasks stay as rows (`finished`, `waiting`) until the sweep removes them, so
/// that a late older event cannot bring them back.
pub async fn record(pool: &PgPool, update: &TaskUpdate) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO monitor.tasks (task_id, tenant, run_id, role, attempt, stage, state, since) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, now())) \
         ON CONFLICT (task_id) DO UPDATE SET \
             tenant = EXCLUDED.tenant, run_id = EXCLUDED.run_id, \
             role = CASE WHEN EXCLUDED.role <> '' THEN EXCLUDED.role ELSE monitor.tasks.role END, \
             attempt = EXCLUDED.attempt, stage = EXCLUDED.stage, state = EXCLUDED.state, \
             since = EXCLUDED.since, updated_at = now(), stale_reported_at = NULL \
         WHERE (monitor.tasks.attempt, monitor.tasks.stage, monitor.tasks.since) \
             < (EXCLUDED.attempt, EXCLUDED.stage, EXCLUDED.since)",
    )
    .bind(&update.task_id)
    .bind(&update.tenant)
    .bind(&update.run_id)
    .bind(&update.role)
    .bind(i64::from(update.attempt))
    .bind(update.transition.stage())
    .bind(update.transition.state())
    .bind(update.occurred_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Queued and running tasks now, as the sweep, the alert rules and `/v1/status` see them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TaskSummary {
    pub queued: u64,
    pub running: u64,
    /// Running for longer than `stale_task_after`.
    pub stale: u64,
    /// How long the oldest queued task has waited (0 with none queued).
    pub queue_oldest_age_seconds: f64,
}

fn count(row: &sqlx::postgres::PgRow, column: &str) -> Result<u64, sqlx::Error> {
    Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
}

/// Counts queued, running and stale tasks, and the oldest queued task's wait.
pub async fn summary(pool: &PgPool, stale_after: Duration) -> Result<TaskSummary, Error> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE state = 'queued') AS queued, \
                count(*) FILTER (WHERE state = 'running') AS running, \
                count(*) FILTER (WHERE state = 'running' \
                                   AND since <= now() - make_interval(secs => $1)) AS stale, \
                EXTRACT(EPOCH FROM now() - min(since) FILTER (WHERE state = 'queued'))::float8 \
                    AS oldest \
         FROM monitor.tasks WHERE state IN ('queued', 'running')",
    )
    .bind(stale_after.as_secs_f64())
    .fetch_one(pool)
    .await?;
    let oldest: Option<f64> = row.try_get("oldest")?;
    Ok(TaskSummary {
        queued: count(&row, "queued")?,
        running: count(&row, "running")?,
        stale: count(&row, "stale")?,
        // A publisher's clock ahead of the database's would make it negative.
        queue_oldest_age_seconds: oldest.unwrap_or(0.0).max(0.0),
    })
}

/// A task running for longer than `stale_task_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleTask {
    pub task_id: String,
    pub tenant: String,
    pub run_id: String,
    pub role: String,
    pub attempt: u32,
    /// When it started (its `started` event's time).
    pub since: DateTime<Utc>,
}

/// Stale tasks, oldest first, at most `limit`.
pub async fn stale(
    pool: &PgPool,
    stale_after: Duration,
    limit: i64,
) -> Result<Vec<StaleTask>, Error> {
    let rows = sqlx::query(
        "SELECT task_id, tenant, run_id, role, attempt, since FROM monitor.tasks \
         WHERE state = 'running' AND since <= now() - make_interval(secs => $1) \
         ORDER BY since, task_id LIMIT $2",
    )
    .bind(stale_after.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    stale_tasks(&rows)
}

fn stale_tasks(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<StaleTask>, Error> {
    let stale = rows
        .iter()
        .map(|row| {
            Ok(StaleTask {
                task_id: row.try_get("task_id")?,
                tenant: row.try_get("tenant")?,
                run_id: row.try_get("run_id")?,
                role: row.try_get("role")?,
                attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(0),
                since: row.try_get("since")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(stale)
}

/// Stale tasks not reported before, marked reported, oldest first, at most `limit`: each stale
/// attempt is reported once, whatever the number of sweeps or monitor replicas.
pub async fn newly_stale(
    pool: &PgPool,
    stale_after: Duration,
    limit: i64,
) -> Result<Vec<StaleTask>, Error> {
    let rows = sqlx::query(
        "WITH found AS ( \
             SELECT task_id FROM monitor.tasks \
             WHERE state = 'running' AND since <= now() - make_interval(secs => $1) \
               AND stale_reported_at IS NULL \
             ORDER BY since, task_id LIMIT $2 FOR UPDATE SKIP LOCKED) \
         UPDATE monitor.tasks t SET stale_reported_at = now() FROM found \
         WHERE t.task_id = found.task_id \
         RETURNING t.task_id, t.tenant, t.run_id, t.role, t.attempt, t.since",
    )
    .bind(stale_after.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut stale = stale_tasks(&rows)?;
    stale.sort_by(|a, b| (a.since, &a.task_id).cmp(&(b.since, &b.task_id)));
    Ok(stale)
}

/// Stale tasks reported (logged and counted) per sweep at most; the next sweeps report the
/// rest.
const STALE_REPORTS_PER_SWEEP: i64 = 100;

/// How long rows of ended or waiting tasks are kept after their last write: far longer than a
/// redelivery or a reordering among concurrently handled events takes, so an older event
/// arriving late still finds the row that makes it a no-op.
pub const ENDED_RETENTION: Duration = Duration::from_secs(3600);

/// Removes ended and waiting tasks after [`ENDED_RETENTION`], and queued or running ones not
/// heard of for `retention` (their end was never seen: the stream dropped it before the monitor
/// read it). Returns how many open tasks were forgotten.
pub async fn prune(pool: &PgPool, retention: Duration) -> Result<u64, Error> {
    let forgotten = sqlx::query_scalar::<_, i64>(
        "WITH gone AS ( \
             DELETE FROM monitor.tasks \
             WHERE updated_at < now() - make_interval(secs => $1) \
               AND (state IN ('waiting', 'finished') \
                    OR updated_at < now() - make_interval(secs => $2)) \
             RETURNING state) \
         SELECT count(*) FILTER (WHERE state IN ('queued', 'running')) FROM gone",
    )
    .bind(ENDED_RETENTION.min(retention).as_secs_f64())
    .bind(retention.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(forgotten).unwrap_or(0))
}

/// The sweep's part: forgets old rows, then sets the task gauges.
pub async fn sweep(pool: &PgPool, stale_after: Duration, retention: Duration) -> Result<(), Error> {
    let forgotten = prune(pool, retention).await?;
    if forgotten > 0 {
        tracing::warn!(
            forgotten,
            ?retention,
            "forgot queued or running tasks without an event within task_retention"
        );
    }
    let newly_stale = newly_stale(pool, stale_after, STALE_REPORTS_PER_SWEEP).await?;
    ::metrics::counter!(metrics::STALE_TASKS_DETECTED).increment(newly_stale.len() as u64);
    for task in &newly_stale {
        tracing::warn!(
            tenant = %task.tenant,
            run_id = %task.run_id,
            task_id = %task.task_id,
            attempt = task.attempt,
            role = %task.role,
            since = %task.since,
            ?stale_after,
            "task stale: running longer than stale_task_after (reported, not acted upon)"
        );
    }
    let summary = summary(pool, stale_after).await?;
    // The gauges take an f64; task counts are far below 2^52.
    #[expect(clippy::cast_precision_loss, reason = "task counts far below 2^52")]
    {
        ::metrics::gauge!(metrics::QUEUED_TASKS).set(summary.queued as f64);
        ::metrics::gauge!(metrics::RUNNING_TASKS).set(summary.running as f64);
        ::metrics::gauge!(metrics::STALE_TASKS).set(summary.stale as f64);
    }
    ::metrics::gauge!(metrics::QUEUE_OLDEST_AGE).set(summary.queue_oldest_age_seconds);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Transition; 5] = [
        Transition::AwaitingApproval,
        Transition::Queued,
        Transition::Started,
        Transition::Parked,
        Transition::Finished,
    ];

    #[test]
    fn an_attempt_moves_forward_through_the_stages() {
        let stages: Vec<i16> = ALL.iter().map(|t| t.stage()).collect();
        assert!(stages.windows(2).all(|w| w[0] <= w[1]), "{stages:?}");
        // Only queued and running tasks are open; the others are kept as ended rows.
        let open: Vec<_> = ALL
            .iter()
            .filter(|t| matches!(t.state(), "queued" | "running"))
            .collect();
        assert_eq!(open, [&Transition::Queued, &Transition::Started]);
        assert_eq!(Transition::Parked.state(), "waiting");
        assert_eq!(Transition::Finished.state(), "finished");
    }
}
