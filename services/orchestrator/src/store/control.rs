//! Operator controls: cancel a run, re-queue a dead letter, list dead letters, maintenance
//! mode; and the scheduler pass that dispatches attempts once they are due.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::lifecycle::{LOCKED_COLUMNS, LockedTask};
use super::outcome::{self, Effects, settle_run};
use super::{RunView, Store, TASK_VIEW_COLUMNS, TaskEvent, TaskView, enqueue_dispatch};
use crate::Error;
use colony_proto::v1;

/// Maintenance mode as every replica sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Maintenance {
    pub paused: bool,
    pub changed_at: DateTime<Utc>,
}

/// Whether maintenance mode is on, read in the caller's transaction.
pub(crate) async fn paused(conn: &mut PgConnection) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orchestrator.maintenance WHERE paused)")
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// SQL condition: maintenance mode is off (a missing row counts as off).
pub(crate) const NOT_PAUSED: &str =
    "NOT EXISTS (SELECT 1 FROM orchestrator.maintenance WHERE paused)";

impl Store {
    /// Cancels a run: queued (and dead-lettered) tasks at once; running ones become
    /// `cancelling` and stop at their worker's next heartbeat. The run is `cancelled` once no
    /// task is active, `cancelling` until then. Cancelling a cancelled or cancelling run
    /// changes nothing; a succeeded or failed run cannot be cancelled.
    pub async fn cancel_run(&self, tenant: &str, run_id: Uuid) -> Result<RunView, Error> {
        let mut effects = Effects::default();
        let mut tx = self.pool.begin().await?;
        // Task rows before the run row: the lock order of every transition.
        let tasks: Vec<LockedTask> = sqlx::query(&format!(
            "SELECT {LOCKED_COLUMNS} FROM orchestrator.tasks \
             WHERE run_id = $1 AND tenant = $2 ORDER BY id FOR UPDATE"
        ))
        .bind(run_id)
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(LockedTask::from_row)
        .collect();
        let (status, revision): (String, i32) = sqlx::query_as(
            "SELECT status, revision FROM orchestrator.runs \
             WHERE id = $1 AND tenant = $2 FOR UPDATE",
        )
        .bind(run_id)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::RunNotFound(run_id.to_string()))?;
        match status.as_str() {
            "running" => {}
            "cancelling" | "cancelled" => {
                tx.rollback().await?;
                return self.get_run(tenant, run_id).await;
            }
            other => {
                return Err(Error::Conflict(format!(
                    "run {run_id} already {other}; only a running run can be cancelled"
                )));
            }
        }
        sqlx::query("UPDATE orchestrator.runs SET status = 'cancelling' WHERE id = $1")
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        effects.cancellations += 1;
        let mut running = 0;
        for task in &tasks {
            match task.state.as_str() {
                "queued" | "pending" | "dead_lettered" | "awaiting_approval" | "parked" => {
                    self.stop_cancelled(&mut tx, task, &mut effects).await?;
                }
                "running" => {
                    sqlx::query("UPDATE orchestrator.tasks SET state = 'cancelling' WHERE id = $1")
                        .bind(task.id)
                        .execute(&mut *tx)
                        .await?;
                    effects.task(&task.tenant, "cancelling");
                    running += 1;
                }
                _ => {}
            }
        }
        if running > 0 {
            // Workers hear this at once and stop the running tasks; a worker that misses it
            // learns at its next lease heartbeat.
            outcome::enqueue_run_event(
                &mut tx,
                tenant,
                run_id,
                revision,
                v1::RunEventKind::Cancelling,
                "",
                None,
            )
            .await?;
        }
        // With no task running, the last stop_cancelled has already ended the run; this
        // covers a run without tasks to stop.
        settle_run(&mut tx, run_id, &mut effects).await?;
        tx.commit().await?;
        effects.record();
        tracing::info!(%run_id, running, "run cancelled");
        self.get_run(tenant, run_id).await
    }

    /// A task as its tenant sees it; another tenant's task is "not found".
    pub async fn get_task(&self, tenant: &str, task_id: Uuid) -> Result<TaskView, Error> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_VIEW_COLUMNS} FROM orchestrator.tasks WHERE id = $1 AND tenant = $2"
        ))
        .bind(task_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::TaskNotFound(task_id.to_string()))?;
        Ok(TaskView::from_row(&row))
    }

    /// Puts a dead-lettered task back in the queue with the next attempt and a fresh attempt
    /// budget, and its run back to running.
    pub async fn requeue_task(&self, tenant: &str, task_id: Uuid) -> Result<TaskView, Error> {
        let mut effects = Effects::default();
        let mut tx = self.pool.begin().await?;
        let task = sqlx::query(&format!(
            "SELECT {LOCKED_COLUMNS} FROM orchestrator.tasks \
             WHERE id = $1 AND tenant = $2 FOR UPDATE"
        ))
        .bind(task_id)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| LockedTask::from_row(&row))
        .ok_or_else(|| Error::TaskNotFound(task_id.to_string()))?;
        if task.state != "dead_lettered" {
            return Err(Error::Conflict(format!(
                "task {task_id} is {}; only a dead-lettered task can be re-queued",
                task.state
            )));
        }
        let status: String =
            sqlx::query_scalar("SELECT status FROM orchestrator.runs WHERE id = $1 FOR UPDATE")
                .bind(task.run_id)
                .fetch_one(&mut *tx)
                .await?;
        if !matches!(status.as_str(), "running" | "failed") {
            return Err(Error::Conflict(format!(
                "run {} is {status}; its tasks cannot be re-queued",
                task.run_id
            )));
        }
        let attempt = task.attempt + 1;
        let dispatch = super::flow::may_dispatch(&mut tx, task.run_id).await?;
        sqlx::query(
            "UPDATE orchestrator.tasks SET state = 'queued', attempt = $2, budget_start = $2, \
                 lease_owner = NULL, lease_expires_at = NULL, started_at = NULL, \
                 finished_at = NULL, dead_lettered_at = NULL, not_before = NULL, \
                 error_class = NULL, failure_reason = NULL, ready_at = now(), \
                 dispatched_at = CASE WHEN $3 THEN now() END, \
                 dispatches = CASE WHEN $3 THEN 1 ELSE 0 END \
             WHERE id = $1",
        )
        .bind(task.id)
        .bind(attempt)
        .bind(dispatch)
        .execute(&mut *tx)
        .await?;
        TaskEvent {
            tenant: &task.tenant,
            run_id: task.run_id,
            task_id: task.id,
            attempt,
            role: &task.role,
            kind: v1::TaskEventKind::Requeued,
            worker_id: "",
            error_class: v1::ErrorClass::Unspecified,
            reason: "re-queued from the dead letters",
            usage: None,
        }
        .enqueue(&mut tx)
        .await?;
        if dispatch {
            enqueue_dispatch(
                &mut tx,
                &task.tenant,
                task.run_id,
                task.id,
                attempt,
                &task.role,
                1,
            )
            .await?;
        }
        if status == "failed" {
            // Re-opened: a later outcome is announced under a new revision of the run.
            sqlx::query(
                "UPDATE orchestrator.runs SET status = 'running', finished_at = NULL, \
                     output = NULL, failed_task_id = NULL, failure_reason = NULL, \
                     error_class = NULL, revision = revision + 1 \
                 WHERE id = $1",
            )
            .bind(task.run_id)
            .execute(&mut *tx)
            .await?;
            effects.run(&task.tenant, "running");
        }
        // What the failure stopped (skipped dependents; under fail fast, the cancelled rest)
        // waits again for its dependencies.
        super::dag::reopen(&mut tx, task.run_id, status == "failed", &mut effects).await?;
        tx.commit().await?;
        effects.task(&task.tenant, "requeued");
        effects.record();
        tracing::info!(%task_id, attempt, "dead letter re-queued");
        self.get_task(tenant, task_id).await
    }

    /// The tenant's dead-lettered tasks, most recent first.
    pub async fn dead_letters(&self, tenant: &str, limit: i64) -> Result<Vec<TaskView>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_VIEW_COLUMNS} FROM orchestrator.tasks \
             WHERE tenant = $1 AND state = 'dead_lettered' \
             ORDER BY dead_lettered_at DESC, id LIMIT $2"
        ))
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(TaskView::from_row).collect())
    }

    pub async fn maintenance(&self) -> Result<Maintenance, Error> {
        let row =
            sqlx::query("SELECT paused, changed_at FROM orchestrator.maintenance WHERE singleton")
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            Some(row) => Maintenance {
                paused: row.get("paused"),
                changed_at: row.get("changed_at"),
            },
            None => Maintenance {
                paused: false,
                changed_at: Utc::now(),
            },
        })
    }

    /// Returns every dispatched, unclaimed attempt whose dispatch is not waiting in the outbox
    /// to the dispatcher's queue (at start: a dispatch cut off by a crash between its pass's
    /// commit and its publish is sent again at once). A dispatch that was in fact delivered
    /// gets a second message; the claim decides, so the second is refused. Returns how many
    /// were returned.
    pub async fn undispatch_unclaimed(&self) -> Result<u64, Error> {
        // A dispatch still waiting in the outbox will be relayed: that one stays.
        Ok(sqlx::query(
            "UPDATE orchestrator.tasks t SET dispatched_at = NULL \
             WHERE t.state = 'queued' AND t.dispatched_at IS NOT NULL \
               AND NOT EXISTS (SELECT 1 FROM orchestrator.outbox o \
                               WHERE o.msg_id = 'dispatch-' || t.id || '-' || t.attempt \
                                                || '-' || t.dispatches)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Pauses or resumes dispatch for every replica. Resuming dispatches every queued task
    /// again (claims made while paused were refused, so their dispatches were dropped).
    /// Setting the state it already has changes nothing.
    pub async fn set_maintenance(&self, paused: bool) -> Result<Maintenance, Error> {
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "INSERT INTO orchestrator.maintenance (singleton, paused) VALUES (true, $1) \
             ON CONFLICT (singleton) DO UPDATE SET paused = $1, changed_at = now() \
             WHERE maintenance.paused <> $1",
        )
        .bind(paused)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if changed && !paused {
            // Every queued attempt waits for the scheduler again; time spent paused does not
            // count as dispatch latency.
            sqlx::query(
                "UPDATE orchestrator.tasks SET dispatched_at = NULL, \
                     ready_at = GREATEST(ready_at, now()) \
                 WHERE state = 'queued'",
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if changed {
            tracing::warn!(paused, "maintenance mode changed");
        }
        ::metrics::gauge!(crate::metrics::MAINTENANCE).set(if paused { 1.0 } else { 0.0 });
        if changed && !paused {
            let dispatched = self.dispatch_all_due(500).await?;
            tracing::info!(dispatched, "dispatch resumed");
        }
        self.maintenance().await
    }

    /// [`Store::dispatch_due`] passes while one may leave more to dispatch (at most 100).
    pub async fn dispatch_all_due(&self, batch: i64) -> Result<u64, Error> {
        let mut total = 0;
        for _ in 0..100 {
            let count = self.dispatch_due(batch).await?;
            total += count;
            // Below the batch and below one tenant's share of a pass, the pass was limited by
            // the caps or the queue, not by its own bounds: another pass now would find
            // nothing.
            let per_tenant = u64::from(self.limits().per_tenant_per_pass);
            if count == 0 || (count < batch.max(0) as u64 && count < per_tenant) {
                break;
            }
        }
        Ok(total)
    }
}
