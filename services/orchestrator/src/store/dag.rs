//! Runs as DAGs: inserting a plan's tasks with their dependencies, making dependents
//! claimable once every dependency succeeded (dispatched in the same transaction through the
//! outbox), skipping or cancelling what can no longer run, the planner's answer (valid →
//! its tasks; invalid → repair, then the template), and dependency outputs for a claim.

use std::collections::HashMap;

use colony_proto::v1;
use serde::Serialize;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::lifecycle::{LockedTask, end_attempt};
use super::outcome::{Effects, enqueue_run_event};
use super::{Store, TaskEvent, control, enqueue_dispatch};
use crate::Error;
use crate::plan::{PlanError, PlannedTask, ValidPlan};
use crate::roster::PLANNER;
use crate::topology::Topology;

/// First line of a context message that carries a dependency's output by reference.
pub const OUTPUT_REF_PREFIX: &str = "colony-ref: task-output ";

/// A dependency of a claimed task and, when small enough, its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DependencyOutput {
    pub task_id: Uuid,
    /// Its id in the plan (`research`), when it came from one.
    pub key: Option<String>,
    pub role: String,
    pub bytes: i64,
    /// `None` when larger than `roster.inline_output_bytes`: fetched by reference.
    pub output: Option<String>,
}

impl DependencyOutput {
    /// How the dependency is named in its dependents' context.
    pub fn heading(&self) -> String {
        match &self.key {
            Some(key) => format!(
                "Output of task {key:?} (role {}, task {}):",
                self.role, self.task_id
            ),
            None => format!("Output of task {} (role {}):", self.task_id, self.role),
        }
    }

    /// The context message content: the output inline, or a reference the worker resolves.
    pub fn message(&self) -> String {
        match &self.output {
            Some(output) => format!("{}\n{output}", self.heading()),
            None => format!(
                "{OUTPUT_REF_PREFIX}{}\n{} ({} bytes, fetched by reference)",
                self.task_id,
                self.heading(),
                self.bytes
            ),
        }
    }
}

/// Decides, as tasks are created, which of them wait for a human's approval once ready.
pub(crate) struct Gate<'a> {
    pub roster: &'a crate::roster::RosterConfig,
    pub policy: &'a crate::approval::ApprovalPolicy,
}

/// The task rows inserted for a run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inserted {
    /// In the plan's order.
    pub ids: Vec<Uuid>,
    pub queued: u64,
    pub pending: u64,
    /// Ready at once, but waiting for approval.
    pub awaiting: u64,
}

/// Inserts `tasks` (in dependency order, every dependency named by its plan id within
/// `tasks`) into the run: tasks without dependencies are queued and dispatched (unless in
/// maintenance mode), the others wait as `pending`. A task the `gate` says needs approval
/// records why; ready at once, it waits as `awaiting_approval` instead of being queued.
pub(crate) async fn insert_tasks(
    conn: &mut PgConnection,
    tenant: &str,
    run_id: Uuid,
    tasks: &[PlannedTask],
    gate: Option<&Gate<'_>>,
) -> Result<Inserted, Error> {
    // Flow control: ready tasks are dispatched at once only within the tenant's limits;
    // otherwise they wait for the dispatcher pass.
    let dispatch = super::flow::may_dispatch(&mut *conn, run_id).await?;
    let mut ids: HashMap<&str, Uuid> = HashMap::with_capacity(tasks.len());
    let mut inserted = Inserted::default();
    for task in tasks {
        let id = Uuid::now_v7();
        ids.insert(task.id.as_str(), id);
        inserted.ids.push(id);
        let approval = gate.and_then(|g| g.policy.reason(g.roster, &task.role, &task.instructions));
        let awaiting = task.depends_on.is_empty() && approval.is_some();
        let ready = task.depends_on.is_empty() && approval.is_none();
        sqlx::query(
            "INSERT INTO orchestrator.tasks \
                 (id, run_id, tenant, role, instructions, plan_key, state, dispatched_at, \
                  dispatches, approval_reason, awaiting_approval_at) \
             VALUES ($1, $2, $3, $4, $5, $6, \
                     CASE WHEN $7 THEN 'queued' WHEN $10 THEN 'awaiting_approval' \
                          ELSE 'pending' END, \
                     CASE WHEN $7 AND $8 THEN now() END, CASE WHEN $7 AND $8 THEN 1 ELSE 0 END, \
                     $9, CASE WHEN $10 THEN now() END)",
        )
        .bind(id)
        .bind(run_id)
        .bind(tenant)
        .bind(&task.role)
        .bind(&task.instructions)
        .bind(&task.id)
        .bind(ready)
        .bind(dispatch)
        .bind(&approval)
        .bind(awaiting)
        .execute(&mut *conn)
        .await?;
        let mut depends_on: Vec<Uuid> = task
            .depends_on
            .iter()
            .filter_map(|key| ids.get(key.as_str()).copied())
            .collect();
        depends_on.sort_unstable();
        depends_on.dedup();
        if !depends_on.is_empty() {
            sqlx::query(
                "INSERT INTO orchestrator.task_dependencies (task_id, depends_on) \
                 SELECT $1, unnest($2::uuid[])",
            )
            .bind(id)
            .bind(&depends_on)
            .execute(&mut *conn)
            .await?;
        }
        if ready {
            inserted.queued += 1;
            TaskEvent {
                tenant,
                run_id,
                task_id: id,
                attempt: 1,
                role: &task.role,
                kind: v1::TaskEventKind::Queued,
                worker_id: "",
                error_class: v1::ErrorClass::Unspecified,
                reason: "",
                usage: None,
            }
            .enqueue(&mut *conn)
            .await?;
            if dispatch {
                enqueue_dispatch(&mut *conn, tenant, run_id, id, 1, &task.role, 1).await?;
            }
        } else if let Some(reason) = approval.as_deref().filter(|_| awaiting) {
            inserted.awaiting += 1;
            super::approval::announce_awaiting(
                &mut *conn, tenant, run_id, id, 1, &task.role, reason,
            )
            .await?;
        } else {
            inserted.pending += 1;
        }
    }
    Ok(inserted)
}

/// Queues (and dispatches, through the outbox, unless in maintenance mode) those of
/// `candidates` that are pending and whose dependencies all succeeded. The candidates are
/// locked first: two dependencies succeeding at once are serialised on their common
/// dependent, so the second sees the first's success and the dependent is never forgotten.
pub(crate) async fn promote_ready(
    conn: &mut PgConnection,
    candidates: &[Uuid],
    effects: &mut Effects,
) -> Result<u64, Error> {
    if candidates.is_empty() {
        return Ok(0);
    }
    let locked: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM orchestrator.tasks WHERE id = ANY($1) AND state = 'pending' \
         ORDER BY id FOR UPDATE",
    )
    .bind(candidates)
    .fetch_all(&mut *conn)
    .await?;
    // Tasks that need approval wait for it instead of being queued.
    let locked = super::approval::divert_unapproved(&mut *conn, &locked, effects).await?;
    if locked.is_empty() {
        return Ok(0);
    }
    // Dependents of one task share its run: one flow-control decision for them all.
    let run_id: Option<Uuid> =
        sqlx::query_scalar("SELECT run_id FROM orchestrator.tasks WHERE id = $1")
            .bind(locked[0])
            .fetch_optional(&mut *conn)
            .await?;
    let dispatch = match run_id {
        Some(run_id) => super::flow::may_dispatch(&mut *conn, run_id).await?,
        None => false,
    };
    let ready = sqlx::query(
        "UPDATE orchestrator.tasks t SET state = 'queued', ready_at = now(), \
             dispatched_at = CASE WHEN $2 THEN now() END, \
             dispatches = CASE WHEN $2 THEN t.dispatches + 1 ELSE t.dispatches END \
         WHERE t.id = ANY($1) AND t.state = 'pending' \
           AND NOT EXISTS (SELECT 1 FROM orchestrator.task_dependencies d \
                           JOIN orchestrator.tasks u ON u.id = d.depends_on \
                           WHERE d.task_id = t.id AND u.state <> 'succeeded') \
         RETURNING id, run_id, tenant, role, attempt, dispatches",
    )
    .bind(&locked)
    .bind(dispatch)
    .fetch_all(&mut *conn)
    .await?;
    for task in &ready {
        let (tenant, run_id, id, attempt, role): (String, Uuid, Uuid, i32, String) = (
            task.get("tenant"),
            task.get("run_id"),
            task.get("id"),
            task.get("attempt"),
            task.get("role"),
        );
        TaskEvent {
            tenant: &tenant,
            run_id,
            task_id: id,
            attempt,
            role: &role,
            kind: v1::TaskEventKind::Queued,
            worker_id: "",
            error_class: v1::ErrorClass::Unspecified,
            reason: "dependencies succeeded",
            usage: None,
        }
        .enqueue(&mut *conn)
        .await?;
        if dispatch {
            let dispatches: i32 = task.get("dispatches");
            enqueue_dispatch(&mut *conn, &tenant, run_id, id, attempt, &role, dispatches).await?;
        }
        effects.task(&tenant, "queued");
    }
    Ok(ready.len() as u64)
}

/// The tasks that depend directly on `task_id`.
pub(crate) async fn dependents(conn: &mut PgConnection, task_id: Uuid) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT task_id FROM orchestrator.task_dependencies WHERE depends_on = $1",
    )
    .bind(task_id)
    .fetch_all(&mut *conn)
    .await?)
}

/// Marks every pending task downstream of `failed` as skipped (the `continue` policy).
pub(crate) async fn skip_dependents(
    conn: &mut PgConnection,
    failed: &LockedTask,
    effects: &mut Effects,
) -> Result<u64, Error> {
    let reason = format!("skipped: dependency {} failed", failed.id);
    let skipped = sqlx::query(
        "WITH RECURSIVE down(id) AS ( \
             SELECT task_id FROM orchestrator.task_dependencies WHERE depends_on = $1 \
             UNION SELECT d.task_id FROM orchestrator.task_dependencies d \
                   JOIN down ON d.depends_on = down.id) \
         UPDATE orchestrator.tasks SET state = 'skipped', finished_at = now(), \
             failure_reason = $2 \
         WHERE id IN (SELECT id FROM down) AND state = 'pending' \
         RETURNING id, role, attempt",
    )
    .bind(failed.id)
    .bind(&reason)
    .fetch_all(&mut *conn)
    .await?;
    for task in &skipped {
        let role: String = task.get("role");
        TaskEvent {
            tenant: &failed.tenant,
            run_id: failed.run_id,
            task_id: task.get("id"),
            attempt: task.get("attempt"),
            role: &role,
            kind: v1::TaskEventKind::Cancelled,
            worker_id: "",
            error_class: v1::ErrorClass::Unspecified,
            reason: &reason,
            usage: None,
        }
        .enqueue(&mut *conn)
        .await?;
        effects.task(&failed.tenant, "skipped");
    }
    Ok(skipped.len() as u64)
}

/// Cancels the run's tasks that have not started (queued or pending): a fail-fast run has
/// failed. Running tasks finish; their results are kept but start nothing.
pub(crate) async fn cancel_unstarted(
    conn: &mut PgConnection,
    tenant: &str,
    run_id: Uuid,
    effects: &mut Effects,
) -> Result<u64, Error> {
    let cancelled = sqlx::query(
        "UPDATE orchestrator.tasks SET state = 'cancelled', finished_at = now(), \
             not_before = NULL, failure_reason = 'cancelled: the run failed' \
         WHERE run_id = $1 \
           AND state IN ('queued', 'pending', 'awaiting_approval', 'parked') \
         RETURNING id, role, attempt",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    for task in &cancelled {
        let role: String = task.get("role");
        TaskEvent {
            tenant,
            run_id,
            task_id: task.get("id"),
            attempt: task.get("attempt"),
            role: &role,
            kind: v1::TaskEventKind::Cancelled,
            worker_id: "",
            error_class: v1::ErrorClass::Unspecified,
            reason: "the run failed",
            usage: None,
        }
        .enqueue(&mut *conn)
        .await?;
        effects.task(tenant, "cancelled");
    }
    Ok(cancelled.len() as u64)
}

/// Puts back what a failure stopped in a re-opened run (skipped and, once the run had failed,
/// cancelled tasks) and queues whatever is ready.
pub(crate) async fn reopen(
    conn: &mut PgConnection,
    run_id: Uuid,
    run_had_failed: bool,
    effects: &mut Effects,
) -> Result<(), Error> {
    let reopened: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE orchestrator.tasks SET state = 'pending', finished_at = NULL, \
             failure_reason = NULL \
         WHERE run_id = $1 AND (state = 'skipped' OR ($2 AND state = 'cancelled')) \
         RETURNING id",
    )
    .bind(run_id)
    .bind(run_had_failed)
    .fetch_all(&mut *conn)
    .await?;
    promote_ready(conn, &reopened, effects).await?;
    Ok(())
}

/// The outputs of `task_id`'s dependencies, then of the children it spawned, in creation
/// order; inline up to `inline_bytes`. A child that did not succeed (a parent resumes under
/// the `continue` policy whatever became of its children) says so instead, inline.
pub(crate) async fn dependency_outputs(
    conn: &mut PgConnection,
    task_id: Uuid,
    inline_bytes: usize,
) -> Result<Vec<DependencyOutput>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM ( \
             SELECT t.id, t.plan_key, t.role, t.state, t.failure_reason, t.created_at, \
                    COALESCE(octet_length(t.output), 0)::int8 AS bytes, \
                    CASE WHEN COALESCE(octet_length(t.output), 0) <= $2 THEN t.output END \
                        AS output \
             FROM orchestrator.task_dependencies d \
             JOIN orchestrator.tasks t ON t.id = d.depends_on \
             WHERE d.task_id = $1 \
             UNION ALL \
             SELECT t.id, t.plan_key, t.role, t.state, t.failure_reason, t.created_at, \
                    COALESCE(octet_length(t.output), 0)::int8, \
                    CASE WHEN COALESCE(octet_length(t.output), 0) <= $2 THEN t.output END \
             FROM orchestrator.tasks t WHERE t.parent_id = $1) o \
         ORDER BY o.created_at, o.id",
    )
    .bind(task_id)
    .bind(i64::try_from(inline_bytes).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let state: String = row.get("state");
            if state != "succeeded" {
                let reason: Option<String> = row.get("failure_reason");
                let note = format!(
                    "[this task did not succeed: it is {state}; {}]",
                    reason.as_deref().unwrap_or("no reason given")
                );
                return DependencyOutput {
                    task_id: row.get("id"),
                    key: row.get("plan_key"),
                    role: row.get("role"),
                    bytes: note.len() as i64,
                    output: Some(note),
                };
            }
            DependencyOutput {
                task_id: row.get("id"),
                key: row.get("plan_key"),
                role: row.get("role"),
                bytes: row.get("bytes"),
                output: row
                    .get::<Option<String>, _>("output")
                    .or_else(|| (row.get::<i64, _>("bytes") == 0).then(String::new)),
            }
        })
        .collect())
}

/// What became of a planner's answer.
#[derive(Debug)]
pub(crate) enum PlannerAnswer {
    /// Valid (first time: `planner`; after repairs: `repaired`) or replaced (`template`).
    Planned {
        plan: ValidPlan,
        source: &'static str,
    },
    /// Invalid, with repairs left: the planner is asked again.
    Repair(PlanError),
}

/// The run of a planner task, as far as its answer is concerned.
struct PlanningRun {
    goal: String,
    planned: bool,
    errors: usize,
}

impl Store {
    /// Judges a planner's answer: its plan, a repair, or the template once repairs ran out.
    /// `None` when the run already has its plan (the answer is then just an output).
    pub(crate) async fn judge_plan(
        &self,
        conn: &mut PgConnection,
        task: &LockedTask,
        output: &str,
    ) -> Result<Option<PlannerAnswer>, Error> {
        if task.role != PLANNER {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT goal, plan_source IS NOT NULL AS planned, \
                    jsonb_array_length(plan_errors) AS errors \
             FROM orchestrator.runs WHERE id = $1",
        )
        .bind(task.run_id)
        .fetch_one(&mut *conn)
        .await?;
        let run = PlanningRun {
            goal: row.get("goal"),
            planned: row.get("planned"),
            errors: usize::try_from(row.get::<i32, _>("errors")).unwrap_or(0),
        };
        if run.planned {
            return Ok(None);
        }
        let roster = &self.roster;
        Ok(Some(match roster.check_plan(output) {
            Ok(plan) => PlannerAnswer::Planned {
                plan,
                source: if run.errors == 0 {
                    "planner"
                } else {
                    "repaired"
                },
            },
            Err(error) if run.errors < roster.max_plan_repairs as usize => {
                PlannerAnswer::Repair(error)
            }
            Err(error) => {
                tracing::warn!(
                    task_id = %task.id, run_id = %task.run_id, code = error.code(),
                    "planner out of repairs; the template replaces its plan"
                );
                self.record_plan_error(conn, task.run_id, &error).await?;
                let plan = roster
                    .template(Topology::Hybrid, &run.goal)
                    .or_else(|| roster.template(Topology::Monolith, &run.goal))
                    .unwrap_or(ValidPlan {
                        tasks: Vec::new(),
                        depths: Vec::new(),
                    });
                PlannerAnswer::Planned {
                    plan,
                    source: "template",
                }
            }
        }))
    }

    async fn record_plan_error(
        &self,
        conn: &mut PgConnection,
        run_id: Uuid,
        error: &PlanError,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE orchestrator.runs SET plan_errors = plan_errors || jsonb_build_array($2::text) \
             WHERE id = $1",
        )
        .bind(run_id)
        .bind(error.to_string())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Sends an invalid plan back: the planner task is queued again with a new attempt (and a
    /// fresh retry budget), the validation error appended to its instructions.
    pub(crate) async fn repair_plan(
        &self,
        conn: &mut PgConnection,
        task: &LockedTask,
        worker: &str,
        error: &PlanError,
        effects: &mut Effects,
    ) -> Result<(), Error> {
        self.record_plan_error(conn, task.run_id, error).await?;
        end_attempt(conn, task.id, task.attempt, "invalid_plan").await?;
        let attempt = task.attempt + 1;
        let dispatch = !control::paused(&mut *conn).await?;
        let note = format!(
            "\n\nYour previous plan was refused: {error}. Answer again with the corrected plan, \
             as JSON only."
        );
        sqlx::query(
            "UPDATE orchestrator.tasks SET state = 'queued', attempt = $2, budget_start = $2, \
                 instructions = instructions || $3, lease_owner = NULL, \
                 lease_expires_at = NULL, started_at = NULL, not_before = NULL, \
                 ready_at = now(), dispatched_at = CASE WHEN $4 THEN now() END, \
                 dispatches = CASE WHEN $4 THEN 1 ELSE 0 END \
             WHERE id = $1",
        )
        .bind(task.id)
        .bind(attempt)
        .bind(&note)
        .bind(dispatch)
        .execute(&mut *conn)
        .await?;
        let reason = format!("invalid plan ({}): {error}", error.code());
        TaskEvent {
            tenant: &task.tenant,
            run_id: task.run_id,
            task_id: task.id,
            attempt,
            role: &task.role,
            kind: v1::TaskEventKind::Requeued,
            worker_id: worker,
            error_class: v1::ErrorClass::Unspecified,
            reason: &reason,
            usage: None,
        }
        .enqueue(&mut *conn)
        .await?;
        if dispatch {
            enqueue_dispatch(
                &mut *conn,
                &task.tenant,
                task.run_id,
                task.id,
                attempt,
                &task.role,
                1,
            )
            .await?;
        }
        effects.task(&task.tenant, "requeued");
        ::metrics::counter!(crate::metrics::PLANS, "source" => "repair", "code" => error.code())
            .increment(1);
        tracing::info!(task_id = %task.id, attempt, code = error.code(), "invalid plan sent back for repair");
        Ok(())
    }

    /// Adds a planner's (or the template's) tasks to the run and records where they came from.
    pub(crate) async fn apply_plan(
        &self,
        conn: &mut PgConnection,
        task: &LockedTask,
        plan: &ValidPlan,
        source: &'static str,
        effects: &mut Effects,
    ) -> Result<(), Error> {
        let inserted = insert_tasks(
            conn,
            &task.tenant,
            task.run_id,
            &plan.tasks,
            Some(&self.gate()),
        )
        .await?;
        sqlx::query("UPDATE orchestrator.runs SET plan_source = $2 WHERE id = $1")
            .bind(task.run_id)
            .bind(source)
            .execute(&mut *conn)
            .await?;
        let reason = format!(
            "{source}: {} tasks, depth {}",
            plan.tasks.len(),
            plan.depth()
        );
        enqueue_run_event(
            conn,
            &task.tenant,
            task.run_id,
            1,
            v1::RunEventKind::Planned,
            &reason,
            None,
        )
        .await?;
        for _ in 0..inserted.queued {
            effects.task(&task.tenant, "queued");
        }
        ::metrics::counter!(crate::metrics::PLANS, "source" => source, "code" => "ok").increment(1);
        tracing::info!(run_id = %task.run_id, source, tasks = plan.tasks.len(), "run planned");
        Ok(())
    }

    /// The output of a succeeded task of `tenant`: (role, output).
    pub async fn task_output(
        &self,
        tenant: &str,
        task_id: Uuid,
    ) -> Result<(String, String), Error> {
        let row = sqlx::query(
            "SELECT role, state, output FROM orchestrator.tasks WHERE id = $1 AND tenant = $2",
        )
        .bind(task_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::TaskNotFound(task_id.to_string()))?;
        let state: String = row.get("state");
        if state != "succeeded" {
            return Err(Error::Conflict(format!(
                "task {task_id} is {state}; only a succeeded task has an output"
            )));
        }
        Ok((
            row.get("role"),
            row.get::<Option<String>, _>("output").unwrap_or_default(),
        ))
    }
}
