//! Tasks spawning child tasks into their run, fenced like a report, and parents that park
//! while their children run: the parent's lease is released (no worker slot held) and, once
//! every child finished, it becomes ready again with a new attempt through
//! [`dag::promote_ready`], its children's outputs in its claim's context.

use colony_proto::v1;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::lifecycle::{LOCKED_COLUMNS, LockedTask, end_attempt};
use super::outcome::Effects;
use super::{Store, TaskEvent, dag};
use crate::Error;
use crate::plan::{self, PlannedTask};

/// A running task's request to add children to its run.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub tenant: String,
    pub task_id: Uuid,
    pub attempt: i32,
    pub worker_id: String,
    /// `id` is the child's key; `depends_on` names other children of this request.
    pub children: Vec<PlannedTask>,
    /// Park the parent until every child finished.
    pub wait: bool,
}

/// What a spawn did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    /// (key, task id) in request order.
    pub children: Vec<(String, Uuid)>,
    pub parked: bool,
}

/// Task states in which a child has not finished.
const UNFINISHED: &str = "('pending', 'queued', 'running', 'cancelling', 'awaiting_approval', \
                          'parked')";

/// Resumes the parked parents of `run_id` whose children all finished (under `fail_fast`,
/// only if they all succeeded: otherwise the failing run cancels the parent): each gets a new
/// attempt with a fresh retry budget and is made ready like any task whose dependencies
/// succeeded. Nothing resumes in a run that is no longer running.
pub(crate) async fn resume_parked(
    conn: &mut PgConnection,
    run_id: Uuid,
    effects: &mut Effects,
) -> Result<u64, Error> {
    let parents: Vec<Uuid> = sqlx::query_scalar(&format!(
        "SELECT p.id FROM orchestrator.tasks p JOIN orchestrator.runs r ON r.id = p.run_id \
         WHERE p.run_id = $1 AND p.state = 'parked' AND r.status = 'running' \
           AND NOT EXISTS (SELECT 1 FROM orchestrator.tasks c \
                           WHERE c.parent_id = p.id AND c.state IN {UNFINISHED}) \
           AND (r.failure_policy = 'continue' \
                OR NOT EXISTS (SELECT 1 FROM orchestrator.tasks c \
                               WHERE c.parent_id = p.id AND c.state <> 'succeeded')) \
         ORDER BY p.id FOR UPDATE OF p"
    ))
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    if parents.is_empty() {
        return Ok(0);
    }
    sqlx::query(
        "UPDATE orchestrator.tasks SET state = 'pending', attempt = attempt + 1, \
             budget_start = attempt + 1, lease_owner = NULL, lease_expires_at = NULL, \
             started_at = NULL \
         WHERE id = ANY($1)",
    )
    .bind(&parents)
    .execute(&mut *conn)
    .await?;
    tracing::info!(%run_id, parents = parents.len(), "children finished; parents resume");
    dag::promote_ready(conn, &parents, effects).await
}

impl Store {
    /// Adds `spawn.children` to the run of a running task, if `spawn.attempt` is its current
    /// attempt and `spawn.worker_id` holds its lease. Children are validated like a plan and
    /// against `spawn.max_children_per_task` and `spawn.max_depth`; the ready ones are
    /// dispatched in this transaction. With `wait`, the parent parks (lease released) until
    /// every child finished.
    pub async fn spawn_tasks(&self, spawn: &Spawn) -> Result<Spawned, Error> {
        let mut effects = Effects::default();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {LOCKED_COLUMNS}, spawn_depth, \
                    (SELECT count(*) FROM orchestrator.tasks c WHERE c.parent_id = t.id) \
                        AS children \
             FROM orchestrator.tasks t WHERE id = $1 AND tenant = $2 FOR UPDATE"
        ))
        .bind(spawn.task_id)
        .bind(&spawn.tenant)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::TaskNotFound(spawn.task_id.to_string()))?;
        let parent = LockedTask::from_row(&row);
        let depth: i32 = row.get("spawn_depth");
        let existing: i64 = row.get("children");
        if parent.attempt != spawn.attempt {
            return Err(Error::Conflict(format!(
                "stale attempt {}: the current attempt is {}",
                spawn.attempt, parent.attempt
            )));
        }
        if parent.state != "running" {
            return Err(Error::Conflict(format!(
                "attempt {} is {}; only a running task can spawn",
                parent.attempt, parent.state
            )));
        }
        if parent.lease_owner.as_deref() != Some(spawn.worker_id.as_str()) {
            return Err(Error::Conflict(
                "the spawning worker does not hold the lease".into(),
            ));
        }
        let limits = self.spawn;
        let total = usize::try_from(existing).unwrap_or(usize::MAX) + spawn.children.len();
        if total > limits.max_children_per_task {
            return Err(Error::InvalidRequest(format!(
                "spawn refused: task {} would have {total} children; at most {} are allowed \
                 (spawn.max_children_per_task)",
                parent.id, limits.max_children_per_task
            )));
        }
        let child_depth = depth + 1;
        if u32::try_from(child_depth).unwrap_or(u32::MAX) > limits.max_depth {
            return Err(Error::InvalidRequest(format!(
                "spawn refused: children of task {} would be at spawn depth {child_depth}; at \
                 most {} is allowed (spawn.max_depth)",
                parent.id, limits.max_depth
            )));
        }
        let roster = &self.roster;
        let valid = plan::validate(
            plan::Plan {
                tasks: spawn.children.clone(),
            },
            &roster.plan_roles(),
            &roster.plan_limits,
        )
        .map_err(|error| Error::InvalidRequest(format!("spawn refused: {error}")))?;
        let status: String =
            sqlx::query_scalar("SELECT status FROM orchestrator.runs WHERE id = $1")
                .bind(parent.run_id)
                .fetch_one(&mut *tx)
                .await?;
        if status != "running" {
            return Err(Error::Conflict(format!(
                "run {} is {status}; only a running run takes new tasks",
                parent.run_id
            )));
        }
        let inserted = dag::insert_tasks(
            &mut tx,
            &parent.tenant,
            parent.run_id,
            &valid.tasks,
            Some(&self.gate()),
        )
        .await?;
        sqlx::query(
            "UPDATE orchestrator.tasks SET parent_id = $1, spawn_depth = $2 WHERE id = ANY($3)",
        )
        .bind(parent.id)
        .bind(child_depth)
        .bind(&inserted.ids)
        .execute(&mut *tx)
        .await?;
        for _ in 0..inserted.queued {
            effects.task(&parent.tenant, "queued");
        }
        for _ in 0..inserted.awaiting {
            effects.task(&parent.tenant, "awaiting_approval");
        }
        if spawn.wait {
            self.park(&mut tx, &parent, inserted.ids.len(), &mut effects)
                .await?;
            // The parent's next attempt starts afresh, its children's outputs in its context.
            sqlx::query("DELETE FROM orchestrator.task_checkpoints WHERE task_id = $1")
                .bind(parent.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        effects.record();
        let result = if spawn.wait { "parked" } else { "spawned" };
        ::metrics::counter!(crate::metrics::SPAWNS, "result" => result).increment(1);
        tracing::info!(
            task_id = %parent.id, attempt = parent.attempt, children = inserted.ids.len(),
            parked = spawn.wait, "children spawned"
        );
        let by_key: std::collections::HashMap<&str, Uuid> = valid
            .tasks
            .iter()
            .map(|t| t.id.as_str())
            .zip(inserted.ids.iter().copied())
            .collect();
        Ok(Spawned {
            children: spawn
                .children
                .iter()
                .filter_map(|c| by_key.get(c.id.as_str()).map(|id| (c.id.clone(), *id)))
                .collect(),
            parked: spawn.wait,
        })
    }

    /// Ends the parent's attempt without a result and releases its lease: it holds no worker
    /// slot until [`resume_parked`] makes it ready again.
    async fn park(
        &self,
        conn: &mut PgConnection,
        parent: &LockedTask,
        children: usize,
        effects: &mut Effects,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE orchestrator.tasks SET state = 'parked', lease_owner = NULL, \
                 lease_expires_at = NULL WHERE id = $1",
        )
        .bind(parent.id)
        .execute(&mut *conn)
        .await?;
        end_attempt(conn, parent.id, parent.attempt, "parked").await?;
        let reason = format!("waits for {children} children");
        TaskEvent {
            tenant: &parent.tenant,
            run_id: parent.run_id,
            task_id: parent.id,
            attempt: parent.attempt,
            role: &parent.role,
            kind: v1::TaskEventKind::Parked,
            worker_id: parent.lease_owner.as_deref().unwrap_or(""),
            error_class: v1::ErrorClass::Unspecified,
            reason: &reason,
            usage: None,
        }
        .enqueue(conn)
        .await?;
        effects.task(&parent.tenant, "parked");
        Ok(())
    }
}
