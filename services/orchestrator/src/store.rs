//! Runs and tasks in PostgreSQL. Every state change and the events announcing it are written in
//! one transaction (the outbox), and every change to a task is fenced by its attempt number.

use std::time::Duration;

use chrono::{DateTime, Utc};
use colony_bus::{Outbox, subjects};
use colony_proto::{ErrorClass, v1};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::Error;

pub const OUTBOX: Outbox = Outbox::new("orchestrator.outbox", "orchestrator_outbox");

/// What a new run is made of.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub tenant: String,
    pub goal: String,
    pub role: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub task_id: Option<Uuid>,
    pub error_class: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: Uuid,
    pub role: String,
    pub state: String,
    pub attempt: i32,
    pub worker: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error_class: Option<String>,
    pub failure_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub id: Uuid,
    pub tenant: String,
    pub goal: String,
    pub status: String,
    pub output: Option<String>,
    pub failure: Option<Failure>,
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub tasks: Vec<TaskView>,
}

/// A granted claim: what the worker needs to run the attempt.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    pub tenant: String,
    pub run_id: Uuid,
    pub task_id: Uuid,
    pub attempt: i32,
    pub role: String,
    pub instructions: String,
    /// Seconds from the attempt becoming claimable to this claim.
    pub waited: f64,
}

#[derive(Debug, Clone)]
pub enum Claim {
    Granted(ClaimedTask),
    Refused(String),
}

/// The outcome of a worker's report, as the orchestrator decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportDecision {
    Accepted,
    Rejected(String),
}

/// A worker's report in domain terms.
#[derive(Debug, Clone)]
pub struct Report {
    pub tenant: String,
    pub task_id: Uuid,
    pub attempt: i32,
    pub worker_id: String,
    pub outcome: ReportOutcome,
}

#[derive(Debug, Clone)]
pub enum ReportOutcome {
    Succeeded {
        output: String,
        usage: v1::Usage,
    },
    Failed {
        error_class: ErrorClass,
        message: String,
        usage: v1::Usage,
    },
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

fn interval(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn usage_of(prompt: i64, completion: i64, cost_micros: i64) -> v1::Usage {
    v1::Usage {
        prompt_tokens: prompt.max(0) as u64,
        completion_tokens: completion.max(0) as u64,
        cost_micros_usd: cost_micros.max(0) as u64,
    }
}

struct TaskEvent<'a> {
    tenant: &'a str,
    run_id: Uuid,
    task_id: Uuid,
    attempt: i32,
    role: &'a str,
    kind: v1::TaskEventKind,
    worker_id: &'a str,
    error_class: v1::ErrorClass,
    reason: &'a str,
    usage: Option<v1::Usage>,
}

impl TaskEvent<'_> {
    async fn enqueue(self, conn: &mut PgConnection) -> Result<(), Error> {
        let name = match self.kind {
            v1::TaskEventKind::Queued => "queued",
            v1::TaskEventKind::Started => "started",
            v1::TaskEventKind::Succeeded => "succeeded",
            v1::TaskEventKind::Failed => "failed",
            v1::TaskEventKind::Requeued => "requeued",
            v1::TaskEventKind::Unspecified => "unspecified",
        };
        let event = v1::TaskEvent {
            tenant: self.tenant.to_owned(),
            run_id: self.run_id.to_string(),
            task_id: self.task_id.to_string(),
            attempt: self.attempt as u32,
            role: self.role.to_owned(),
            kind: self.kind as i32,
            worker_id: self.worker_id.to_owned(),
            error_class: self.error_class as i32,
            reason: self.reason.to_owned(),
            usage: self.usage,
            occurred_at: Some(colony_proto::now()),
        };
        let msg_id = format!("task-{}-{}-{name}", self.task_id, self.attempt);
        OUTBOX
            .enqueue(conn, &subjects::task_event(name), &msg_id, &event)
            .await?;
        Ok(())
    }
}

async fn enqueue_run_event(
    conn: &mut PgConnection,
    tenant: &str,
    run_id: Uuid,
    kind: v1::RunEventKind,
    reason: &str,
    usage: Option<v1::Usage>,
) -> Result<(), Error> {
    let name = match kind {
        v1::RunEventKind::Created => "created",
        v1::RunEventKind::Succeeded => "succeeded",
        v1::RunEventKind::Failed => "failed",
        v1::RunEventKind::Cancelled => "cancelled",
        v1::RunEventKind::Unspecified => "unspecified",
    };
    let event = v1::RunEvent {
        tenant: tenant.to_owned(),
        run_id: run_id.to_string(),
        kind: kind as i32,
        reason: reason.to_owned(),
        usage,
        occurred_at: Some(colony_proto::now()),
    };
    OUTBOX
        .enqueue(
            conn,
            &subjects::run_event(name),
            &format!("run-{run_id}-{name}"),
            &event,
        )
        .await?;
    Ok(())
}

async fn enqueue_dispatch(
    conn: &mut PgConnection,
    tenant: &str,
    run_id: Uuid,
    task_id: Uuid,
    attempt: i32,
    role: &str,
    dispatches: i32,
) -> Result<(), Error> {
    let dispatch = v1::TaskDispatch {
        tenant: tenant.to_owned(),
        run_id: run_id.to_string(),
        task_id: task_id.to_string(),
        attempt: attempt as u32,
        role: role.to_owned(),
        dispatched_at: Some(colony_proto::now()),
    };
    OUTBOX
        .enqueue(
            conn,
            &subjects::dispatch(role),
            &format!("dispatch-{task_id}-{attempt}-{dispatches}"),
            &dispatch,
        )
        .await?;
    Ok(())
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates a run with its single task and queues the dispatch, all in one transaction.
    pub async fn create_run(&self, new: &NewRun) -> Result<(Uuid, Uuid), Error> {
        let run_id = Uuid::now_v7();
        let task_id = Uuid::now_v7();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO orchestrator.runs (id, tenant, goal, status) VALUES ($1, $2, $3, 'running')",
        )
        .bind(run_id)
        .bind(&new.tenant)
        .bind(&new.goal)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO orchestrator.tasks (id, run_id, tenant, role, instructions, state) \
             VALUES ($1, $2, $3, $4, $5, 'queued')",
        )
        .bind(task_id)
        .bind(run_id)
        .bind(&new.tenant)
        .bind(&new.role)
        .bind(&new.goal)
        .execute(&mut *tx)
        .await?;
        enqueue_run_event(
            &mut tx,
            &new.tenant,
            run_id,
            v1::RunEventKind::Created,
            "",
            None,
        )
        .await?;
        TaskEvent {
            tenant: &new.tenant,
            run_id,
            task_id,
            attempt: 1,
            role: &new.role,
            kind: v1::TaskEventKind::Queued,
            worker_id: "",
            error_class: v1::ErrorClass::Unspecified,
            reason: "",
            usage: None,
        }
        .enqueue(&mut tx)
        .await?;
        enqueue_dispatch(&mut tx, &new.tenant, run_id, task_id, 1, &new.role, 1).await?;
        tx.commit().await?;
        Ok((run_id, task_id))
    }

    /// A run as its tenant sees it; another tenant's run is "not found".
    pub async fn get_run(&self, tenant: &str, run_id: Uuid) -> Result<RunView, Error> {
        let row = sqlx::query(
            "SELECT id, tenant, goal, status, output, failed_task_id, failure_reason, error_class, \
                    prompt_tokens, completion_tokens, cost_micros_usd, created_at, finished_at \
             FROM orchestrator.runs WHERE id = $1 AND tenant = $2",
        )
        .bind(run_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::RunNotFound(run_id.to_string()))?;
        let tasks = sqlx::query(
            "SELECT id, role, state, attempt, lease_owner, started_at, finished_at, error_class, \
                    failure_reason \
             FROM orchestrator.tasks WHERE run_id = $1 ORDER BY created_at, id",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|t| TaskView {
            id: t.get("id"),
            role: t.get("role"),
            state: t.get("state"),
            attempt: t.get("attempt"),
            worker: t.get("lease_owner"),
            started_at: t.get("started_at"),
            finished_at: t.get("finished_at"),
            error_class: t.get("error_class"),
            failure_reason: t.get("failure_reason"),
        })
        .collect();
        let reason: Option<String> = row.get("failure_reason");
        Ok(RunView {
            id: row.get("id"),
            tenant: row.get("tenant"),
            goal: row.get("goal"),
            status: row.get("status"),
            output: row.get("output"),
            failure: reason.map(|reason| Failure {
                task_id: row.get("failed_task_id"),
                error_class: row.get("error_class"),
                reason,
            }),
            usage: Usage {
                prompt_tokens: row.get("prompt_tokens"),
                completion_tokens: row.get("completion_tokens"),
                cost_usd: row.get::<i64, _>("cost_micros_usd") as f64 / 1e6,
            },
            created_at: row.get("created_at"),
            finished_at: row.get("finished_at"),
            tasks,
        })
    }

    /// The most recent runs of a tenant, newest first, without their tasks.
    pub async fn list_runs(&self, tenant: &str, limit: i64) -> Result<Vec<RunView>, Error> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM orchestrator.runs WHERE tenant = $1 ORDER BY created_at DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut runs = Vec::with_capacity(ids.len());
        for id in ids {
            let mut run = self.get_run(tenant, id).await?;
            run.tasks.clear();
            runs.push(run);
        }
        Ok(runs)
    }

    /// Claims `attempt` of a task for `worker`. Granted only if that attempt is the current one
    /// and nobody holds it: the conditional update is the whole decision.
    pub async fn claim(
        &self,
        tenant: &str,
        task_id: Uuid,
        attempt: i32,
        worker: &str,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE orchestrator.tasks \
             SET state = 'running', lease_owner = $4, \
                 lease_expires_at = now() + make_interval(secs => $5), \
                 started_at = now() \
             WHERE id = $1 AND tenant = $2 AND attempt = $3 AND state = 'queued' \
             RETURNING run_id, role, instructions, \
                       EXTRACT(EPOCH FROM (now() - ready_at))::float8 AS waited",
        )
        .bind(task_id)
        .bind(tenant)
        .bind(attempt)
        .bind(worker)
        .bind(interval(lease))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(Claim::Refused(
                self.refusal(tenant, task_id, attempt).await?,
            ));
        };
        let claimed = ClaimedTask {
            tenant: tenant.to_owned(),
            run_id: row.get("run_id"),
            task_id,
            attempt,
            role: row.get("role"),
            instructions: row.get("instructions"),
            waited: row.get("waited"),
        };
        sqlx::query(
            "INSERT INTO orchestrator.task_attempts (task_id, attempt, worker_id) VALUES ($1, $2, $3)",
        )
        .bind(task_id)
        .bind(attempt)
        .bind(worker)
        .execute(&mut *tx)
        .await?;
        TaskEvent {
            tenant,
            run_id: claimed.run_id,
            task_id,
            attempt,
            role: &claimed.role,
            kind: v1::TaskEventKind::Started,
            worker_id: worker,
            error_class: v1::ErrorClass::Unspecified,
            reason: "",
            usage: None,
        }
        .enqueue(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(Claim::Granted(claimed))
    }

    /// Explains why a claim was refused.
    async fn refusal(&self, tenant: &str, task_id: Uuid, attempt: i32) -> Result<String, Error> {
        let row = sqlx::query(
            "SELECT state, attempt FROM orchestrator.tasks WHERE id = $1 AND tenant = $2",
        )
        .bind(task_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => "unknown task".into(),
            Some(row) => {
                let state: String = row.get("state");
                let current: i32 = row.get("attempt");
                if current != attempt {
                    format!("stale attempt {attempt}: the current attempt is {current}")
                } else {
                    format!("attempt {attempt} is already {state}")
                }
            }
        })
    }

    /// Extends the lease of `attempt` if `worker` still holds it.
    pub async fn heartbeat(
        &self,
        tenant: &str,
        task_id: Uuid,
        attempt: i32,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<String>, Error> {
        let extended = sqlx::query(
            "UPDATE orchestrator.tasks SET lease_expires_at = now() + make_interval(secs => $5) \
             WHERE id = $1 AND tenant = $2 AND attempt = $3 AND lease_owner = $4 \
               AND state = 'running'",
        )
        .bind(task_id)
        .bind(tenant)
        .bind(attempt)
        .bind(worker)
        .bind(interval(lease))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if extended == 1 {
            Ok(None)
        } else {
            Ok(Some(self.refusal(tenant, task_id, attempt).await?))
        }
    }

    /// Applies a worker's report if it belongs to the current attempt and the reporting worker
    /// holds its lease; otherwise records it as rejected. Every report is recorded.
    pub async fn apply_report(&self, report: &Report) -> Result<ReportDecision, Error> {
        let mut tx = self.pool.begin().await?;
        let task = sqlx::query(
            "SELECT run_id, role, state, attempt, lease_owner FROM orchestrator.tasks \
             WHERE id = $1 AND tenant = $2 FOR UPDATE",
        )
        .bind(report.task_id)
        .bind(&report.tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome_name = match report.outcome {
            ReportOutcome::Succeeded { .. } => "succeeded",
            ReportOutcome::Failed { .. } => "failed",
        };
        let decision = match &task {
            None => ReportDecision::Rejected("unknown task".into()),
            Some(task) => {
                let state: String = task.get("state");
                let attempt: i32 = task.get("attempt");
                let owner: Option<String> = task.get("lease_owner");
                if attempt != report.attempt {
                    ReportDecision::Rejected(format!(
                        "stale attempt {}: the current attempt is {attempt}",
                        report.attempt
                    ))
                } else if state != "running" {
                    ReportDecision::Rejected(format!("attempt {attempt} is already {state}"))
                } else if owner.as_deref() != Some(report.worker_id.as_str()) {
                    ReportDecision::Rejected("the reporting worker does not hold the lease".into())
                } else {
                    ReportDecision::Accepted
                }
            }
        };
        let reason = match &decision {
            ReportDecision::Accepted => None,
            ReportDecision::Rejected(reason) => Some(reason.as_str()),
        };
        sqlx::query(
            "INSERT INTO orchestrator.task_reports (task_id, attempt, worker_id, outcome, accepted, reason) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(report.task_id)
        .bind(report.attempt)
        .bind(&report.worker_id)
        .bind(outcome_name)
        .bind(decision == ReportDecision::Accepted)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        if let (ReportDecision::Accepted, Some(task)) = (&decision, task) {
            let run_id: Uuid = task.get("run_id");
            let role: String = task.get("role");
            self.finish(&mut tx, report, run_id, &role).await?;
        }
        tx.commit().await?;
        Ok(decision)
    }

    /// Marks the task and its run finished and announces both.
    async fn finish(
        &self,
        tx: &mut PgConnection,
        report: &Report,
        run_id: Uuid,
        role: &str,
    ) -> Result<(), Error> {
        let (state, output, class, message, usage) = match &report.outcome {
            ReportOutcome::Succeeded { output, usage } => {
                ("succeeded", Some(output.as_str()), None, None, *usage)
            }
            ReportOutcome::Failed {
                error_class,
                message,
                usage,
            } => (
                "failed",
                None,
                Some(*error_class),
                Some(message.as_str()),
                *usage,
            ),
        };
        let class_text = class.map(ErrorClass::as_str);
        sqlx::query(
            "UPDATE orchestrator.tasks SET state = $2, finished_at = now(), output = $3, \
                 error_class = $4, failure_reason = $5, lease_expires_at = NULL, \
                 prompt_tokens = prompt_tokens + $6, completion_tokens = completion_tokens + $7, \
                 cost_micros_usd = cost_micros_usd + $8 \
             WHERE id = $1",
        )
        .bind(report.task_id)
        .bind(state)
        .bind(output)
        .bind(class_text)
        .bind(message)
        .bind(usage.prompt_tokens as i64)
        .bind(usage.completion_tokens as i64)
        .bind(usage.cost_micros_usd as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE orchestrator.task_attempts SET finished_at = now(), outcome = $3 \
             WHERE task_id = $1 AND attempt = $2",
        )
        .bind(report.task_id)
        .bind(report.attempt)
        .bind(state)
        .execute(&mut *tx)
        .await?;
        let totals = sqlx::query(
            "UPDATE orchestrator.runs SET status = $2, output = $3, finished_at = now(), \
                 failed_task_id = CASE WHEN $2 = 'failed' THEN $4 END, \
                 failure_reason = $5, error_class = $6, \
                 prompt_tokens = prompt_tokens + $7, completion_tokens = completion_tokens + $8, \
                 cost_micros_usd = cost_micros_usd + $9 \
             WHERE id = $1 RETURNING prompt_tokens, completion_tokens, cost_micros_usd",
        )
        .bind(run_id)
        .bind(state)
        .bind(output)
        .bind(report.task_id)
        .bind(message.map(|m| format!("task {} failed: {m}", report.task_id)))
        .bind(class_text)
        .bind(usage.prompt_tokens as i64)
        .bind(usage.completion_tokens as i64)
        .bind(usage.cost_micros_usd as i64)
        .fetch_one(&mut *tx)
        .await?;
        let run_usage = usage_of(
            totals.get("prompt_tokens"),
            totals.get("completion_tokens"),
            totals.get("cost_micros_usd"),
        );
        let (task_kind, run_kind) = if class.is_some() {
            (v1::TaskEventKind::Failed, v1::RunEventKind::Failed)
        } else {
            (v1::TaskEventKind::Succeeded, v1::RunEventKind::Succeeded)
        };
        TaskEvent {
            tenant: &report.tenant,
            run_id,
            task_id: report.task_id,
            attempt: report.attempt,
            role,
            kind: task_kind,
            worker_id: &report.worker_id,
            error_class: class.map_or(v1::ErrorClass::Unspecified, v1::ErrorClass::from),
            reason: message.unwrap_or(""),
            usage: Some(usage),
        }
        .enqueue(tx)
        .await?;
        enqueue_run_event(
            tx,
            &report.tenant,
            run_id,
            run_kind,
            message.unwrap_or(""),
            Some(run_usage),
        )
        .await?;
        Ok(())
    }

    /// Re-dispatches attempts whose lease expired, with the next attempt number; a task out of
    /// attempts fails its run. Safe to run on several replicas at once (`SKIP LOCKED`).
    pub async fn reap_expired(&self, max_attempts: i32, batch: i64) -> Result<Reaped, Error> {
        let mut tx = self.pool.begin().await?;
        let expired = sqlx::query(
            "SELECT id, run_id, tenant, role, attempt, lease_owner FROM orchestrator.tasks \
             WHERE state = 'running' AND lease_expires_at < now() \
             ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let mut reaped = Reaped::default();
        for task in expired {
            let task_id: Uuid = task.get("id");
            let run_id: Uuid = task.get("run_id");
            let tenant: String = task.get("tenant");
            let role: String = task.get("role");
            let attempt: i32 = task.get("attempt");
            let owner: Option<String> = task.get("lease_owner");
            sqlx::query(
                "UPDATE orchestrator.task_attempts SET finished_at = now(), outcome = 'lease_expired' \
                 WHERE task_id = $1 AND attempt = $2",
            )
            .bind(task_id)
            .bind(attempt)
            .execute(&mut *tx)
            .await?;
            if attempt >= max_attempts {
                let report = Report {
                    tenant: tenant.clone(),
                    task_id,
                    attempt,
                    worker_id: owner.unwrap_or_default(),
                    outcome: ReportOutcome::Failed {
                        error_class: ErrorClass::Transient,
                        message: format!("lease expired on all {attempt} attempts"),
                        usage: v1::Usage::default(),
                    },
                };
                self.finish(&mut tx, &report, run_id, &role).await?;
                reaped.failed += 1;
                continue;
            }
            let next = attempt + 1;
            sqlx::query(
                "UPDATE orchestrator.tasks SET state = 'queued', attempt = $2, lease_owner = NULL, \
                     lease_expires_at = NULL, ready_at = now(), dispatched_at = now(), \
                     dispatches = 1 WHERE id = $1",
            )
            .bind(task_id)
            .bind(next)
            .execute(&mut *tx)
            .await?;
            TaskEvent {
                tenant: &tenant,
                run_id,
                task_id,
                attempt: next,
                role: &role,
                kind: v1::TaskEventKind::Requeued,
                worker_id: owner.as_deref().unwrap_or(""),
                error_class: v1::ErrorClass::Transient,
                reason: "lease expired",
                usage: None,
            }
            .enqueue(&mut tx)
            .await?;
            enqueue_dispatch(&mut tx, &tenant, run_id, task_id, next, &role, 1).await?;
            reaped.requeued += 1;
        }
        tx.commit().await?;
        Ok(reaped)
    }

    /// Dispatches again attempts that stayed unclaimed for `after`: their message may have been
    /// lost or run out of deliveries. A duplicate dispatch is harmless (the claim decides).
    pub async fn redispatch_unclaimed(&self, after: Duration, batch: i64) -> Result<u64, Error> {
        let mut tx = self.pool.begin().await?;
        let stale = sqlx::query(
            "UPDATE orchestrator.tasks SET dispatched_at = now(), dispatches = dispatches + 1 \
             WHERE id IN (SELECT id FROM orchestrator.tasks \
                          WHERE state = 'queued' \
                            AND dispatched_at < now() - make_interval(secs => $1) \
                          ORDER BY dispatched_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING id, run_id, tenant, role, attempt, dispatches",
        )
        .bind(interval(after))
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        for task in &stale {
            enqueue_dispatch(
                &mut tx,
                task.get("tenant"),
                task.get("run_id"),
                task.get("id"),
                task.get("attempt"),
                task.get("role"),
                task.get("dispatches"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(stale.len() as u64)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub requeued: u64,
    pub failed: u64,
}
