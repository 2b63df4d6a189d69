//! The human approval gate: a task that needs approval waits as `awaiting_approval` where it
//! would have been queued; approving it makes it ready through [`dag::promote_ready`] (so it is
//! dispatched like any ready task), rejecting it fails it as user-fixable under its run's
//! failure policy.

use chrono::{DateTime, Utc};
use colony_proto::v1;
use serde::Serialize;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::lifecycle::{LOCKED_COLUMNS, LockedTask};
use super::outcome::{Effects, settle_run};
use super::{Store, TASK_VIEW_COLUMNS, TaskEvent, TaskView, dag, spawn};
use crate::Error;
use crate::config::FailurePolicy;

/// A task waiting for approval, as its tenant sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PendingApproval {
    #[serde(flatten)]
    pub task: TaskView,
    /// Why it needs approval.
    pub approval_reason: Option<String>,
    pub awaiting_since: Option<DateTime<Utc>>,
    pub instructions: String,
}

/// Announces that a task waits for approval.
pub(crate) async fn announce_awaiting(
    conn: &mut PgConnection,
    tenant: &str,
    run_id: Uuid,
    task_id: Uuid,
    attempt: i32,
    role: &str,
    reason: &str,
) -> Result<(), Error> {
    TaskEvent {
        tenant,
        run_id,
        task_id,
        attempt,
        role,
        kind: v1::TaskEventKind::AwaitingApproval,
        worker_id: "",
        error_class: v1::ErrorClass::Unspecified,
        reason,
        usage: None,
    }
    .enqueue(conn)
    .await
}

/// Of the locked pending `candidates`, moves those that are ready but need approval not yet
/// given to `awaiting_approval`; returns the others.
pub(crate) async fn divert_unapproved(
    conn: &mut PgConnection,
    candidates: &[Uuid],
    effects: &mut Effects,
) -> Result<Vec<Uuid>, Error> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let diverted = sqlx::query(
        "UPDATE orchestrator.tasks t SET state = 'awaiting_approval', \
             awaiting_approval_at = now() \
         WHERE t.id = ANY($1) AND t.state = 'pending' \
           AND t.approval_reason IS NOT NULL AND t.approved_at IS NULL \
           AND NOT EXISTS (SELECT 1 FROM orchestrator.task_dependencies d \
                           JOIN orchestrator.tasks u ON u.id = d.depends_on \
                           WHERE d.task_id = t.id AND u.state <> 'succeeded') \
         RETURNING id, run_id, tenant, role, attempt, approval_reason",
    )
    .bind(candidates)
    .fetch_all(&mut *conn)
    .await?;
    let mut gone = Vec::with_capacity(diverted.len());
    for row in &diverted {
        let (tenant, role, reason): (String, String, String) = (
            row.get("tenant"),
            row.get("role"),
            row.get::<Option<String>, _>("approval_reason")
                .unwrap_or_default(),
        );
        let id: Uuid = row.get("id");
        announce_awaiting(
            conn,
            &tenant,
            row.get("run_id"),
            id,
            row.get("attempt"),
            &role,
            &reason,
        )
        .await?;
        effects.task(&tenant, "awaiting_approval");
        gone.push(id);
    }
    Ok(candidates
        .iter()
        .copied()
        .filter(|id| !gone.contains(id))
        .collect())
}

impl Store {
    /// Tasks of `tenant` waiting for approval, oldest first.
    pub async fn pending_approvals(
        &self,
        tenant: &str,
        limit: i64,
    ) -> Result<Vec<PendingApproval>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_VIEW_COLUMNS}, approval_reason, awaiting_approval_at, instructions \
             FROM orchestrator.tasks WHERE tenant = $1 AND state = 'awaiting_approval' \
             ORDER BY awaiting_approval_at, id LIMIT $2"
        ))
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| PendingApproval {
                task: TaskView::from_row(row),
                approval_reason: row.get("approval_reason"),
                awaiting_since: row.get("awaiting_approval_at"),
                instructions: row.get("instructions"),
            })
            .collect())
    }

    /// Locks a task of `tenant` that waits for approval, or says why it cannot be decided.
    async fn lock_awaiting(
        conn: &mut PgConnection,
        tenant: &str,
        task_id: Uuid,
    ) -> Result<LockedTask, Error> {
        let task = sqlx::query(&format!(
            "SELECT {LOCKED_COLUMNS} FROM orchestrator.tasks \
             WHERE id = $1 AND tenant = $2 FOR UPDATE"
        ))
        .bind(task_id)
        .bind(tenant)
        .fetch_optional(&mut *conn)
        .await?
        .map(|row| LockedTask::from_row(&row))
        .ok_or_else(|| Error::TaskNotFound(task_id.to_string()))?;
        if task.state != "awaiting_approval" {
            return Err(Error::Conflict(format!(
                "task {task_id} is {}; only a task awaiting approval can be approved or rejected",
                task.state
            )));
        }
        Ok(task)
    }

    /// Approves a task waiting for approval: it becomes ready (queued and dispatched like any
    /// ready task) in this transaction.
    pub async fn approve(&self, tenant: &str, task_id: Uuid) -> Result<TaskView, Error> {
        let mut effects = Effects::default();
        let mut tx = self.pool.begin().await?;
        let task = Self::lock_awaiting(&mut tx, tenant, task_id).await?;
        sqlx::query(
            "UPDATE orchestrator.tasks SET state = 'pending', approved_at = now() WHERE id = $1",
        )
        .bind(task.id)
        .execute(&mut *tx)
        .await?;
        dag::promote_ready(&mut tx, &[task.id], &mut effects).await?;
        tx.commit().await?;
        effects.record();
        ::metrics::counter!(crate::metrics::APPROVALS, "decision" => "approved").increment(1);
        tracing::info!(%task_id, run_id = %task.run_id, "task approved");
        self.get_task(tenant, task_id).await
    }

    /// Rejects a task waiting for approval: it fails as user-fixable with `reason`, and its
    /// run's failure policy applies (fail fast: the run fails; continue: its dependents are
    /// skipped and independent branches go on).
    pub async fn reject(
        &self,
        tenant: &str,
        task_id: Uuid,
        reason: &str,
    ) -> Result<TaskView, Error> {
        let mut effects = Effects::default();
        let mut tx = self.pool.begin().await?;
        let task = Self::lock_awaiting(&mut tx, tenant, task_id).await?;
        let message = format!("rejected: {reason}");
        let class = colony_proto::ErrorClass::UserFixable;
        sqlx::query(
            "UPDATE orchestrator.tasks SET state = 'failed', finished_at = now(), \
                 error_class = $2, failure_reason = $3 WHERE id = $1",
        )
        .bind(task.id)
        .bind(class.as_str())
        .bind(&message)
        .execute(&mut *tx)
        .await?;
        TaskEvent {
            tenant: &task.tenant,
            run_id: task.run_id,
            task_id: task.id,
            attempt: task.attempt,
            role: &task.role,
            kind: v1::TaskEventKind::Failed,
            worker_id: "",
            error_class: v1::ErrorClass::from(class),
            reason: &message,
            usage: None,
        }
        .enqueue(&mut tx)
        .await?;
        effects.task(&task.tenant, "failed");
        let policy: String =
            sqlx::query_scalar("SELECT failure_policy FROM orchestrator.runs WHERE id = $1")
                .bind(task.run_id)
                .fetch_one(&mut *tx)
                .await?;
        if policy == FailurePolicy::Continue.as_str() {
            dag::skip_dependents(&mut tx, &task, &mut effects).await?;
        }
        spawn::resume_parked(&mut tx, task.run_id, &mut effects).await?;
        settle_run(&mut tx, task.run_id, &mut effects).await?;
        tx.commit().await?;
        effects.record();
        ::metrics::counter!(crate::metrics::APPROVALS, "decision" => "rejected").increment(1);
        tracing::info!(%task_id, run_id = %task.run_id, reason, "task rejected");
        self.get_task(tenant, task_id).await
    }
}
