//! Per-task transitions once an attempt ends: success, failure (retry with backoff or dead
//! letter, by the class's policy), and the end of a cancelled attempt. Each runs in the
//! caller's transaction, with the task row already locked, and then settles the run.

use colony_proto::{ErrorClass, v1};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::dag::{self, PlannerAnswer};
use super::outcome::{Effects, settle_run};
use super::{Store, TaskEvent, interval};
use crate::Error;
use crate::retry::{self, Next};

/// The fields of a task row a transition needs, read `FOR UPDATE`.
#[derive(Debug, Clone)]
pub(crate) struct LockedTask {
    pub id: Uuid,
    pub run_id: Uuid,
    pub tenant: String,
    pub role: String,
    pub state: String,
    pub attempt: i32,
    pub budget_start: i32,
    pub lease_owner: Option<String>,
    /// The task that spawned it, if any.
    pub parent_id: Option<Uuid>,
    /// Whether other tasks depend on it (so its success may make them ready).
    pub has_dependents: bool,
}

/// Columns to select for [`LockedTask::from_row`], from `orchestrator.tasks` under any alias
/// (`id` in the subquery is the outer row's: `task_dependencies` has no `id`).
pub(crate) const LOCKED_COLUMNS: &str = "id, run_id, tenant, role, state, attempt, budget_start, lease_owner, parent_id, \
     EXISTS (SELECT 1 FROM orchestrator.task_dependencies d WHERE d.depends_on = id) \
         AS has_dependents";

impl LockedTask {
    pub fn from_row(row: &sqlx::postgres::PgRow) -> Self {
        Self {
            id: row.get("id"),
            run_id: row.get("run_id"),
            tenant: row.get("tenant"),
            role: row.get("role"),
            state: row.get("state"),
            attempt: row.get("attempt"),
            budget_start: row.get("budget_start"),
            lease_owner: row.get("lease_owner"),
            parent_id: row.get("parent_id"),
            has_dependents: row.get("has_dependents"),
        }
    }

    /// Attempts used in the current budget, this one included.
    pub fn used(&self) -> u32 {
        u32::try_from(self.attempt - self.budget_start + 1)
            .unwrap_or(1)
            .max(1)
    }

    pub(super) fn event<'a>(
        &'a self,
        kind: v1::TaskEventKind,
        attempt: i32,
        worker: &'a str,
    ) -> TaskEvent<'a> {
        TaskEvent {
            tenant: &self.tenant,
            run_id: self.run_id,
            task_id: self.id,
            attempt,
            role: &self.role,
            kind,
            worker_id: worker,
            error_class: v1::ErrorClass::Unspecified,
            reason: "",
            usage: None,
        }
    }
}

/// How an attempt that did not succeed ended, as `task_attempts.outcome` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptEnd {
    /// The worker reported a failure.
    Failed,
    /// The worker stopped renewing its lease.
    LeaseExpired,
}

impl AttemptEnd {
    fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Failed => "failed",
            AttemptEnd::LeaseExpired => "lease_expired",
        }
    }
}

pub(crate) async fn end_attempt(
    conn: &mut PgConnection,
    task_id: Uuid,
    attempt: i32,
    outcome: &str,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE orchestrator.task_attempts SET finished_at = now(), outcome = $3 \
         WHERE task_id = $1 AND attempt = $2 AND finished_at IS NULL",
    )
    .bind(task_id)
    .bind(attempt)
    .bind(outcome)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Adds an attempt's usage to its task and run.
async fn add_usage(
    conn: &mut PgConnection,
    task: &LockedTask,
    usage: v1::Usage,
) -> Result<(), Error> {
    if usage == v1::Usage::default() {
        return Ok(());
    }
    for table in ["tasks", "runs"] {
        let id = if table == "tasks" {
            task.id
        } else {
            task.run_id
        };
        sqlx::query(&format!(
            "UPDATE orchestrator.{table} SET prompt_tokens = prompt_tokens + $2, \
                 completion_tokens = completion_tokens + $3, \
                 cost_micros_usd = cost_micros_usd + $4 WHERE id = $1"
        ))
        .bind(id)
        .bind(usage.prompt_tokens as i64)
        .bind(usage.completion_tokens as i64)
        .bind(usage.cost_micros_usd as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

impl Store {
    /// The current attempt succeeded. A planner's answer is judged first: an invalid plan
    /// sends the planner back (the task does not succeed); a valid one (or the template) adds
    /// its tasks to the run. Dependents whose dependencies have all succeeded are dispatched
    /// in this transaction; then the run is settled.
    pub(crate) async fn succeed(
        &self,
        conn: &mut PgConnection,
        task: &LockedTask,
        worker: &str,
        output: &str,
        usage: v1::Usage,
        effects: &mut Effects,
    ) -> Result<(), Error> {
        let answer = self.judge_plan(conn, task, output).await?;
        if let Some(PlannerAnswer::Repair(error)) = &answer {
            add_usage(conn, task, usage).await?;
            return self.repair_plan(conn, task, worker, error, effects).await;
        }
        let success = super::reports::Success {
            task,
            worker,
            output,
            usage,
        };
        super::reports::record_successes(conn, std::slice::from_ref(&success), effects).await?;
        if let Some(PlannerAnswer::Planned { plan, source }) = &answer {
            self.apply_plan(conn, task, plan, source, effects).await?;
        }
        if task.has_dependents {
            let dependents = dag::dependents(conn, task.id).await?;
            dag::promote_ready(conn, &dependents, effects).await?;
        }
        // Only a spawned child's success can complete a parked parent's children.
        if task.parent_id.is_some() {
            super::spawn::resume_parked(conn, task.run_id, effects).await?;
        }
        settle_run(conn, task.run_id, effects).await?;
        Ok(())
    }

    /// The current attempt failed with `class` (an expired lease counts as transient): the
    /// next attempt is queued after the class's backoff while the budget lasts, otherwise the
    /// task is dead-lettered and its run settled.
    #[expect(
        clippy::too_many_arguments,
        reason = "one transition, every input named"
    )]
    pub(crate) async fn fail(
        &self,
        conn: &mut PgConnection,
        task: &LockedTask,
        worker: &str,
        end: AttemptEnd,
        class: ErrorClass,
        message: &str,
        usage: v1::Usage,
        effects: &mut Effects,
    ) -> Result<Next, Error> {
        end_attempt(conn, task.id, task.attempt, end.as_str()).await?;
        add_usage(conn, task, usage).await?;
        let wire_class = v1::ErrorClass::from(class);
        if end == AttemptEnd::Failed {
            TaskEvent {
                error_class: wire_class,
                reason: message,
                usage: Some(usage),
                ..task.event(v1::TaskEventKind::Failed, task.attempt, worker)
            }
            .enqueue(conn)
            .await?;
            effects.task(&task.tenant, "failed");
        }
        let policy = self.retries.policy(class);
        let next = retry::after_failure(policy, task.used(), retry::jitter_sample());
        match next {
            Next::Retry { delay } => {
                let attempt = task.attempt + 1;
                // Neither dispatched nor claimable before `not_before`; the scheduler pass
                // dispatches it then (`dispatched_at` NULL marks it as waiting).
                sqlx::query(
                    "UPDATE orchestrator.tasks SET state = 'queued', attempt = $2, \
                         lease_owner = NULL, lease_expires_at = NULL, started_at = NULL, \
                         not_before = now() + make_interval(secs => $3), \
                         ready_at = now() + make_interval(secs => $3), \
                         dispatched_at = NULL, dispatches = 0, \
                         error_class = $4, failure_reason = $5 \
                     WHERE id = $1",
                )
                .bind(task.id)
                .bind(attempt)
                .bind(interval(delay))
                .bind(class.as_str())
                .bind(message)
                .execute(&mut *conn)
                .await?;
                TaskEvent {
                    error_class: wire_class,
                    reason: message,
                    ..task.event(v1::TaskEventKind::Requeued, attempt, worker)
                }
                .enqueue(conn)
                .await?;
                effects.task(&task.tenant, "requeued");
                effects.retry(&task.tenant, class);
                tracing::info!(
                    task_id = %task.id, attempt, class = class.as_str(), delay = ?delay,
                    "attempt failed; retrying after backoff"
                );
            }
            Next::DeadLetter => {
                sqlx::query(
                    "UPDATE orchestrator.tasks SET state = 'dead_lettered', finished_at = now(), \
                         dead_lettered_at = now(), lease_expires_at = NULL, not_before = NULL, \
                         error_class = $2, failure_reason = $3 \
                     WHERE id = $1",
                )
                .bind(task.id)
                .bind(class.as_str())
                .bind(message)
                .execute(&mut *conn)
                .await?;
                TaskEvent {
                    error_class: wire_class,
                    reason: message,
                    ..task.event(v1::TaskEventKind::DeadLettered, task.attempt, worker)
                }
                .enqueue(conn)
                .await?;
                effects.task(&task.tenant, "dead_lettered");
                effects.dead_letter(&task.tenant, class);
                let policy: String = sqlx::query_scalar(
                    "SELECT failure_policy FROM orchestrator.runs WHERE id = $1",
                )
                .bind(task.run_id)
                .fetch_one(&mut *conn)
                .await?;
                if policy == crate::config::FailurePolicy::Continue.as_str() {
                    dag::skip_dependents(conn, task, effects).await?;
                }
                tracing::warn!(
                    task_id = %task.id, attempt = task.attempt, used = task.used(),
                    class = class.as_str(), reason = message, "task dead-lettered"
                );
                super::spawn::resume_parked(conn, task.run_id, effects).await?;
                settle_run(conn, task.run_id, effects).await?;
            }
        }
        Ok(next)
    }

    /// Ends a task whose run was cancelled: at once when nothing runs it, or when its worker
    /// learns of the cancellation (heartbeat, late report) or its lease expires.
    pub(crate) async fn stop_cancelled(
        &self,
        conn: &mut PgConnection,
        task: &LockedTask,
        effects: &mut Effects,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE orchestrator.tasks SET state = 'cancelled', finished_at = now(), \
                 lease_expires_at = NULL, not_before = NULL, dead_lettered_at = NULL \
             WHERE id = $1",
        )
        .bind(task.id)
        .execute(&mut *conn)
        .await?;
        end_attempt(conn, task.id, task.attempt, "cancelled").await?;
        TaskEvent {
            reason: "cancelled",
            ..task.event(
                v1::TaskEventKind::Cancelled,
                task.attempt,
                task.lease_owner.as_deref().unwrap_or(""),
            )
        }
        .enqueue(conn)
        .await?;
        effects.task(&task.tenant, "cancelled");
        settle_run(conn, task.run_id, effects).await?;
        Ok(())
    }
}
