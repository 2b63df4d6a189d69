//! Claims: a worker takes attempts it was dispatched, many in one transaction. The database
//! decides: an attempt is granted only while it is the current one, queued, past its backoff
//! and maintenance mode is off.

use std::collections::HashSet;
use std::time::Duration;

use colony_proto::v1;
use sqlx::Row;
use uuid::Uuid;

use super::control::NOT_PAUSED;
use super::{Claim, ClaimedTask, OUTBOX, Store, TaskEvent, dag, interval};
use crate::Error;

/// One attempt a worker asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub tenant: String,
    pub task_id: Uuid,
    pub attempt: i32,
}

/// What a refusal is explained from.
#[derive(Debug, Clone)]
pub(crate) struct TaskState {
    pub state: String,
    pub attempt: i32,
    /// Queued with its retry backoff not yet passed.
    pub waiting: bool,
}

/// Why `attempt` of a task in `task` (`None`: no such task of the tenant) cannot be claimed
/// or heartbeated. A cancelled task says "cancelled".
pub(crate) fn refusal_reason(task: Option<TaskState>, attempt: i32) -> String {
    match task {
        None => "unknown task".into(),
        Some(task) if matches!(task.state.as_str(), "cancelling" | "cancelled") => {
            "cancelled".into()
        }
        Some(task) if task.attempt != attempt => format!(
            "stale attempt {attempt}: the current attempt is {}",
            task.attempt
        ),
        Some(task) if task.state == "queued" && task.waiting => {
            format!("attempt {attempt} is not due yet (retry backoff)")
        }
        Some(task) => format!("attempt {attempt} is already {}", task.state),
    }
}

impl Store {
    /// Claims every requested attempt that may be claimed for `worker`, in one transaction,
    /// and answers each request in order. The rows are locked by primary key alone (whatever
    /// the planner's statistics say about the queue), checked, then updated together.
    pub async fn claim_many(
        &self,
        worker: &str,
        lease: Duration,
        requests: &[ClaimRequest],
    ) -> Result<Vec<Claim>, Error> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids: Vec<Uuid> = requests.iter().map(|r| r.task_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = self.pool.begin().await?;
        OUTBOX.quiet(&mut tx).await?;
        // Locked in id order, so two batches never wait on each other in a cycle.
        let rows = sqlx::query(&format!(
            "SELECT id, tenant, state, attempt, \
                    COALESCE(not_before > now(), false) AS waiting, {NOT_PAUSED} AS open \
             FROM orchestrator.tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let paused = rows.first().is_some_and(|row| !row.get::<bool, _>("open"));
        let found: std::collections::HashMap<Uuid, (String, TaskState)> = rows
            .iter()
            .map(|row| {
                let state = TaskState {
                    state: row.get("state"),
                    attempt: row.get("attempt"),
                    waiting: row.get("waiting"),
                };
                (row.get("id"), (row.get("tenant"), state))
            })
            .collect();
        // Each request's verdict: granted (the task is claimed below) or why not.
        let mut granted: HashSet<Uuid> = HashSet::new();
        let verdicts: Vec<Result<(), String>> = requests
            .iter()
            .map(|request| {
                let task = found
                    .get(&request.task_id)
                    .filter(|(tenant, _)| *tenant == request.tenant)
                    .map(|(_, state)| state);
                match task {
                    Some(task)
                        if task.state == "queued"
                            && task.attempt == request.attempt
                            && !task.waiting =>
                    {
                        if paused {
                            Err("maintenance".into())
                        } else if granted.insert(request.task_id) {
                            Ok(())
                        } else {
                            // The same dispatch twice in one batch: the first one has it.
                            Err(format!("attempt {} is already running", request.attempt))
                        }
                    }
                    other => Err(refusal_reason(other.cloned(), request.attempt)),
                }
            })
            .collect();
        let granted: Vec<Uuid> = granted.into_iter().collect();
        let mut claimed = std::collections::HashMap::with_capacity(granted.len());
        if !granted.is_empty() {
            let rows = sqlx::query(
                "UPDATE orchestrator.tasks \
                 SET state = 'running', lease_owner = $2, \
                     lease_expires_at = now() + make_interval(secs => $3), started_at = now() \
                 WHERE id = ANY($1) \
                 RETURNING id, tenant, run_id, role, instructions, attempt, \
                           EXTRACT(EPOCH FROM (now() - ready_at))::float8 AS waited, \
                           (SELECT r.budget_micros_usd FROM orchestrator.runs r \
                            WHERE r.id = tasks.run_id) AS run_budget, \
                           (SELECT c.checkpoint FROM orchestrator.task_checkpoints c \
                            WHERE c.task_id = tasks.id) AS checkpoint, \
                           (EXISTS (SELECT 1 FROM orchestrator.task_dependencies d \
                                    WHERE d.task_id = tasks.id) \
                            OR EXISTS (SELECT 1 FROM orchestrator.tasks c \
                                       WHERE c.parent_id = tasks.id)) AS has_inputs",
            )
            .bind(&granted)
            .bind(worker)
            .bind(interval(lease))
            .fetch_all(&mut *tx)
            .await?;
            let attempts: Vec<i32> = rows.iter().map(|row| row.get("attempt")).collect();
            let ids: Vec<Uuid> = rows.iter().map(|row| row.get("id")).collect();
            sqlx::query(
                "INSERT INTO orchestrator.task_attempts (task_id, attempt, worker_id) \
                 SELECT u.id, u.attempt, $3 FROM unnest($1::uuid[], $2::int4[]) AS u(id, attempt)",
            )
            .bind(&ids)
            .bind(&attempts)
            .bind(worker)
            .execute(&mut *tx)
            .await?;
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let task_id: Uuid = row.get("id");
                let dependencies = if row.get::<bool, _>("has_inputs") {
                    dag::dependency_outputs(&mut tx, task_id, self.roster.inline_output_bytes)
                        .await?
                } else {
                    Vec::new()
                };
                let task = ClaimedTask {
                    tenant: row.get("tenant"),
                    run_id: row.get("run_id"),
                    task_id,
                    attempt: row.get("attempt"),
                    role: row.get("role"),
                    instructions: row.get("instructions"),
                    waited: row.get("waited"),
                    dependencies,
                    run_budget_micros_usd: row.get("run_budget"),
                    checkpoint: row.get("checkpoint"),
                };
                events.push(
                    TaskEvent {
                        tenant: &task.tenant,
                        run_id: task.run_id,
                        task_id,
                        attempt: task.attempt,
                        role: &task.role,
                        kind: v1::TaskEventKind::Started,
                        worker_id: worker,
                        error_class: v1::ErrorClass::Unspecified,
                        reason: "",
                        usage: None,
                    }
                    .row(),
                );
                claimed.insert(task_id, task);
            }
            OUTBOX.enqueue_many(&mut tx, &events).await?;
        }
        tx.commit().await?;
        OUTBOX.wake();
        Ok(requests
            .iter()
            .zip(verdicts)
            .map(|(request, verdict)| match verdict {
                Ok(()) => claimed
                    .remove(&request.task_id)
                    .map_or_else(|| Claim::Refused("unknown task".into()), Claim::Granted),
                Err(reason) => Claim::Refused(reason),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: &str, attempt: i32, waiting: bool) -> Option<TaskState> {
        Some(TaskState {
            state: state.into(),
            attempt,
            waiting,
        })
    }

    #[test]
    fn refusals_say_why() {
        assert_eq!(refusal_reason(None, 1), "unknown task");
        assert_eq!(refusal_reason(task("cancelling", 1, false), 1), "cancelled");
        assert_eq!(
            refusal_reason(task("queued", 3, false), 2),
            "stale attempt 2: the current attempt is 3"
        );
        assert_eq!(
            refusal_reason(task("queued", 2, true), 2),
            "attempt 2 is not due yet (retry backoff)"
        );
        assert_eq!(
            refusal_reason(task("running", 2, false), 2),
            "attempt 2 is already running"
        );
    }
}
