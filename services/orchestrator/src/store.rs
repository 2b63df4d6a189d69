//! Runs and tasks in PostgreSQL. Every state change and the events announcing it are written in
//! one transaction (the outbox), and every change to a task is fenced by its attempt number.

use std::time::Duration;

use chrono::{DateTime, Utc};
use colony_bus::{Outbox, OutboxRow, subjects};
use colony_proto::{ErrorClass, v1};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::Error;
use crate::approval::{ApprovalPolicy, SpawnConfig};
use crate::config::FailurePolicy;
use crate::plan::PlannedTask;
use crate::retry::RetryConfig;
use crate::roster::RosterConfig;
use crate::topology::{Decision, Topology};

mod approval;
mod claim;
mod control;
mod dag;
mod flow;
mod lifecycle;
mod outcome;
mod planning;
pub mod quality;
mod reports;
pub use planning::RunDefaults;
pub(crate) use planning::count_created;
mod spawn;

use crate::retry::Next;
pub use approval::PendingApproval;
pub use claim::ClaimRequest;
pub use control::Maintenance;
pub use dag::{DependencyOutput, OUTPUT_REF_PREFIX};
pub use flow::{ActiveTasks, ActiveWork, Refusal};
use lifecycle::{AttemptEnd, LOCKED_COLUMNS, LockedTask};
use outcome::Effects;
pub use spawn::{Spawn, Spawned};

pub const OUTBOX: Outbox = Outbox::new("orchestrator.outbox", "orchestrator_outbox");

/// A single-task run: one task of `role` with the goal as its instructions, for callers that
/// bypass the dial and the approval gate (tests and tools). Recorded as a monolith.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub tenant: String,
    pub goal: String,
    pub role: String,
}

/// A run as a DAG: the dial's decision and the run's first tasks (a template, or the
/// planner), in dependency order with dependencies named by plan id.
#[derive(Debug, Clone)]
pub struct NewDagRun {
    pub tenant: String,
    pub goal: String,
    pub decision: Decision,
    pub failure_policy: FailurePolicy,
    pub tasks: Vec<PlannedTask>,
    /// -10..10, higher first within the tenant (flow control); 0 by default.
    pub priority: i16,
    /// The run's cost budget in millionths of a US dollar, enforced by the router; `None` for
    /// none.
    pub budget_micros_usd: Option<u64>,
}

/// The topology of a run and why (see [`crate::topology::choose`]).
#[derive(Debug, Clone, Serialize)]
pub struct TopologyView {
    pub topology: String,
    pub overridden: bool,
    pub reason: Option<String>,
    /// What the dial looked at: goal_tokens, working_set_tokens, context_window, fill, quality.
    pub inputs: Option<serde_json::Value>,
}

/// How the run's DAG came about.
#[derive(Debug, Clone, Serialize)]
pub struct PlanView {
    /// `planner`, `repaired` or `template`; `null` for runs that do not plan, or until their
    /// planner answered.
    pub source: Option<String>,
    /// Every validation error the planner's answers got, in order.
    pub errors: Vec<String>,
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
    pub run_id: Uuid,
    pub role: String,
    pub state: String,
    pub attempt: i32,
    pub worker: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The class and reason of the last failed attempt (of the dead letter, when
    /// `state = dead_lettered`).
    pub error_class: Option<String>,
    pub failure_reason: Option<String>,
    /// While a retry waits out its backoff: when the next attempt may be dispatched.
    pub not_before: Option<DateTime<Utc>>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// Its id within the run's plan or template (`research`).
    pub key: Option<String>,
    /// Tasks that must succeed before this one runs (filled by [`Store::get_run`]).
    pub depends_on: Vec<Uuid>,
}

/// Columns to select for [`TaskView::from_row`].
const TASK_VIEW_COLUMNS: &str = "id, run_id, role, state, attempt, lease_owner, started_at, \
     finished_at, error_class, failure_reason, not_before, dead_lettered_at, plan_key";

impl TaskView {
    fn from_row(t: &sqlx::postgres::PgRow) -> Self {
        TaskView {
            id: t.get("id"),
            run_id: t.get("run_id"),
            role: t.get("role"),
            state: t.get("state"),
            attempt: t.get("attempt"),
            worker: t.get("lease_owner"),
            started_at: t.get("started_at"),
            finished_at: t.get("finished_at"),
            error_class: t.get("error_class"),
            failure_reason: t.get("failure_reason"),
            not_before: t.get("not_before"),
            dead_lettered_at: t.get("dead_lettered_at"),
            key: t.get("plan_key"),
            depends_on: Vec::new(),
        }
    }
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
    /// The run's cost budget, `null` for none.
    pub budget_usd: Option<f64>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `null` for runs created before topologies were recorded.
    pub topology: Option<TopologyView>,
    pub failure_policy: String,
    pub plan: PlanView,
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
    /// Its dependencies' outputs (inline up to `roster.inline_output_bytes`).
    pub dependencies: Vec<DependencyOutput>,
    /// Its run's cost budget (micro-USD), if the run has one.
    pub run_budget_micros_usd: Option<i64>,
    /// The last checkpoint an earlier attempt saved (an encoded `colony.v1.Checkpoint`).
    pub checkpoint: Option<Vec<u8>>,
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
    /// The judges' verdict on the answer, when its role validates answers.
    pub verdict: Option<quality::Verdict>,
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
    retries: RetryConfig,
    roster: std::sync::Arc<RosterConfig>,
    approvals: std::sync::Arc<ApprovalPolicy>,
    spawn: SpawnConfig,
    limits: crate::flow::LimitsConfig,
    /// Wakes this process's dispatcher pass.
    wake: std::sync::Arc<tokio::sync::Notify>,
    /// Recent queue depth per tenant, for admission without a count per run.
    depths: std::sync::Arc<flow::DepthCache>,
    /// What runs get when their request does not say.
    run_defaults: std::sync::Arc<RunDefaults>,
    /// Where dispatcher passes publish their dispatches once committed (see
    /// [`Store::with_dispatch_bus`]); without it they go through the outbox.
    dispatch_bus: Option<colony_bus::Bus>,
    /// Judges' verdicts per tier, blended into the dial's quality.
    quality: std::sync::Arc<quality::MeasuredQuality>,
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
        OUTBOX.enqueue_many(conn, &[self.row()]).await?;
        Ok(())
    }

    /// The event as an outbox row, for transitions that enqueue many at once.
    fn row(&self) -> OutboxRow {
        let name = match self.kind {
            v1::TaskEventKind::Queued => "queued",
            v1::TaskEventKind::Started => "started",
            v1::TaskEventKind::Succeeded => "succeeded",
            v1::TaskEventKind::Failed => "failed",
            v1::TaskEventKind::Requeued => "requeued",
            v1::TaskEventKind::Cancelled => "cancelled",
            v1::TaskEventKind::DeadLettered => "dead_lettered",
            v1::TaskEventKind::AwaitingApproval => "awaiting_approval",
            v1::TaskEventKind::Parked => "parked",
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
        OutboxRow::new(&subjects::task_event(name), &msg_id, &event)
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
    // A run's first revision: later ones come from re-queued dead letters.
    outcome::enqueue_run_event(conn, tenant, run_id, 1, kind, reason, usage).await
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
    let row = dispatch_row(tenant, run_id, task_id, attempt, role, dispatches);
    OUTBOX.enqueue_many(conn, &[row]).await?;
    Ok(())
}

/// The dispatch of `attempt` as an outbox row; `dispatches` keeps a re-dispatch's message id
/// apart from the first.
/// [`Store::undispatch_unclaimed`] builds the same message id in SQL.
fn dispatch_row(
    tenant: &str,
    run_id: Uuid,
    task_id: Uuid,
    attempt: i32,
    role: &str,
    dispatches: i32,
) -> OutboxRow {
    let dispatch = v1::TaskDispatch {
        tenant: tenant.to_owned(),
        run_id: run_id.to_string(),
        task_id: task_id.to_string(),
        attempt: attempt as u32,
        role: role.to_owned(),
        dispatched_at: Some(colony_proto::now()),
    };
    OutboxRow::new(
        &subjects::dispatch(role),
        &format!("dispatch-{task_id}-{attempt}-{dispatches}"),
        &dispatch,
    )
}

impl Store {
    /// A store with the default retry policies.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            retries: RetryConfig::default(),
            roster: std::sync::Arc::new(RosterConfig::default()),
            approvals: std::sync::Arc::new(ApprovalPolicy::default()),
            spawn: SpawnConfig::default(),
            limits: crate::flow::LimitsConfig::default(),
            wake: std::sync::Arc::new(tokio::sync::Notify::new()),
            depths: std::sync::Arc::default(),
            run_defaults: std::sync::Arc::default(),
            dispatch_bus: None,
            quality: std::sync::Arc::default(),
        }
    }

    /// Reads the verdicts recorded so far (by every replica) into the dial's quality.
    pub async fn load_quality(&self) -> Result<(), Error> {
        self.quality.load(&self.pool).await
    }

    /// What this replica knows of the tiers' measured quality.
    pub fn measured_quality(&self) -> &quality::MeasuredQuality {
        &self.quality
    }

    /// Dispatcher passes publish their dispatches on `bus` right after they commit, instead of
    /// writing each to the outbox for the relay to publish and delete: a dispatch need not be
    /// durable, because an attempt that stays unclaimed is dispatched again (by
    /// [`Store::redispatch_unclaimed`], and at start by [`Store::undispatch_unclaimed`]). That
    /// saves every task two outbox writes and a relay pass. Dispatches written in other
    /// transactions (run creation, dependents, retries) still go through the outbox.
    pub fn with_dispatch_bus(mut self, bus: colony_bus::Bus) -> Self {
        self.dispatch_bus = Some(bus);
        self
    }

    /// Which tasks wait for a human's approval (besides roles with `requires_approval`).
    pub fn with_approvals(mut self, policy: ApprovalPolicy) -> Self {
        self.approvals = std::sync::Arc::new(policy);
        self
    }

    /// Bounds on tasks spawned by running tasks.
    pub fn with_spawn(mut self, spawn: SpawnConfig) -> Self {
        self.spawn = spawn;
        self
    }

    /// The approval gate applied to tasks as they are created.
    fn gate(&self) -> dag::Gate<'_> {
        dag::Gate {
            roster: &self.roster,
            policy: &self.approvals,
        }
    }

    /// The roster plans are validated against and templates come from.
    pub fn with_roster(mut self, roster: RosterConfig) -> Self {
        self.roster = std::sync::Arc::new(roster);
        self
    }

    pub fn roster(&self) -> &RosterConfig {
        &self.roster
    }

    /// The retry policies applied to failed attempts and expired leases.
    pub fn with_retries(mut self, retries: RetryConfig) -> Self {
        self.retries = retries;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates a run with its single task and queues the dispatch, all in one transaction.
    pub async fn create_run(&self, new: &NewRun) -> Result<(Uuid, Uuid), Error> {
        let run = NewDagRun {
            tenant: new.tenant.clone(),
            goal: new.goal.clone(),
            decision: Decision {
                topology: Topology::Monolith,
                overridden: true,
                reason: "a single-task run".into(),
                inputs: crate::topology::DialInputs {
                    goal_tokens: crate::topology::estimate_tokens(&new.goal),
                    working_set_tokens: 0,
                    context_window: 0,
                    fill: 0.0,
                    quality: 0.0,
                },
            },
            failure_policy: FailurePolicy::FailFast,
            priority: 0,
            budget_micros_usd: None,
            tasks: vec![PlannedTask {
                id: "answer".into(),
                role: new.role.clone(),
                instructions: new.goal.clone(),
                depends_on: Vec::new(),
            }],
        };
        let mut tx = self.pool.begin().await?;
        let (run_id, tasks) = Self::create_dag_run_gated_in(&mut tx, &run, None).await?;
        tx.commit().await?;
        let task_id = tasks
            .first()
            .copied()
            .ok_or_else(|| Error::InvalidRequest("a run needs at least one task".into()))?;
        Ok((run_id, task_id))
    }

    /// Creates a DAG run: the run with its dial decision, its first tasks and their
    /// dependencies; tasks without dependencies are dispatched. One transaction.
    pub async fn create_dag_run(&self, new: &NewDagRun) -> Result<(Uuid, Vec<Uuid>), Error> {
        let mut tx = self.pool.begin().await?;
        OUTBOX.quiet(&mut tx).await?;
        let ids = self.create_dag_run_in(&mut tx, new).await?;
        tx.commit().await?;
        OUTBOX.wake();
        // Tasks held back by flow control wait for the dispatcher.
        self.wake_dispatcher();
        Ok(ids)
    }

    /// [`Store::create_dag_run`] in the caller's transaction. Returns the run id and its
    /// tasks' ids in `new.tasks` order.
    /// The approval gate applies; the caller wakes the dispatcher once it has committed.
    pub async fn create_dag_run_in(
        &self,
        tx: &mut PgConnection,
        new: &NewDagRun,
    ) -> Result<(Uuid, Vec<Uuid>), Error> {
        Self::create_dag_run_gated_in(tx, new, Some(&self.gate())).await
    }

    async fn create_dag_run_gated_in(
        tx: &mut PgConnection,
        new: &NewDagRun,
        gate: Option<&dag::Gate<'_>>,
    ) -> Result<(Uuid, Vec<Uuid>), Error> {
        if new.tasks.is_empty() {
            return Err(Error::InvalidRequest(
                "a run needs at least one task".into(),
            ));
        }
        let run_id = Uuid::now_v7();
        let inputs = serde_json::to_value(&new.decision.inputs)
            .map_err(|e| Error::InvalidRequest(format!("dial inputs: {e}")))?;
        sqlx::query(
            "INSERT INTO orchestrator.runs (id, tenant, goal, status, topology, topology_reason, \
                 topology_overridden, dial_inputs, failure_policy, priority, budget_micros_usd, \
                 traceparent) \
             VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(run_id)
        .bind(&new.tenant)
        .bind(&new.goal)
        .bind(new.decision.topology.as_str())
        .bind(&new.decision.reason)
        .bind(new.decision.overridden)
        .bind(inputs)
        .bind(new.failure_policy.as_str())
        .bind(new.priority.clamp(-10, 10))
        .bind(
            new.budget_micros_usd
                .map(|micros| i64::try_from(micros).unwrap_or(i64::MAX)),
        )
        // Dispatches made later by the dispatcher carry it (see `dispatch_due`).
        .bind(colony_telemetry::current_traceparent())
        .execute(&mut *tx)
        .await?;
        enqueue_run_event(
            &mut *tx,
            &new.tenant,
            run_id,
            v1::RunEventKind::Created,
            "",
            None,
        )
        .await?;
        // In maintenance mode ready tasks wait for the scheduler (`dispatched_at` NULL), which
        // dispatches them on resume.
        let inserted = dag::insert_tasks(&mut *tx, &new.tenant, run_id, &new.tasks, gate).await?;
        Ok((run_id, inserted.ids))
    }

    /// A run as its tenant sees it; another tenant's run is "not found".
    pub async fn get_run(&self, tenant: &str, run_id: Uuid) -> Result<RunView, Error> {
        let row = sqlx::query(
            "SELECT id, tenant, goal, status, output, failed_task_id, failure_reason, error_class, \
                    prompt_tokens, completion_tokens, cost_micros_usd, created_at, finished_at, \
                    topology, topology_reason, topology_overridden, dial_inputs, \
                    failure_policy, plan_source, plan_errors, budget_micros_usd \
             FROM orchestrator.runs WHERE id = $1 AND tenant = $2",
        )
        .bind(run_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::RunNotFound(run_id.to_string()))?;
        let mut tasks: Vec<TaskView> = sqlx::query(&format!(
            "SELECT {TASK_VIEW_COLUMNS} \
             FROM orchestrator.tasks WHERE run_id = $1 ORDER BY created_at, id"
        ))
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(TaskView::from_row)
        .collect();
        let edges: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT d.task_id, d.depends_on FROM orchestrator.task_dependencies d \
             JOIN orchestrator.tasks t ON t.id = d.task_id WHERE t.run_id = $1 \
             ORDER BY d.depends_on",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        for (task_id, depends_on) in edges {
            if let Some(task) = tasks.iter_mut().find(|t| t.id == task_id) {
                task.depends_on.push(depends_on);
            }
        }
        let reason: Option<String> = row.get("failure_reason");
        let topology: Option<String> = row.get("topology");
        let errors: serde_json::Value = row.get("plan_errors");
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
            budget_usd: row
                .get::<Option<i64>, _>("budget_micros_usd")
                .map(|micros| micros as f64 / 1e6),
            created_at: row.get("created_at"),
            finished_at: row.get("finished_at"),
            topology: topology.map(|topology| TopologyView {
                topology,
                overridden: row.get("topology_overridden"),
                reason: row.get("topology_reason"),
                inputs: row.get("dial_inputs"),
            }),
            failure_policy: row.get("failure_policy"),
            plan: PlanView {
                source: row.get("plan_source"),
                errors: serde_json::from_value(errors).unwrap_or_default(),
            },
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

    /// Claims `attempt` of a task for `worker` (see [`Store::claim_many`]).
    pub async fn claim(
        &self,
        tenant: &str,
        task_id: Uuid,
        attempt: i32,
        worker: &str,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let request = ClaimRequest {
            tenant: tenant.to_owned(),
            task_id,
            attempt,
        };
        let claims = self.claim_many(worker, lease, &[request]).await?;
        // `claim_many` answers every request.
        Ok(claims
            .into_iter()
            .next()
            .unwrap_or_else(|| Claim::Refused("no answer".into())))
    }

    /// Explains why a claim or heartbeat was refused. A cancelled task says "cancelled".
    async fn refusal(&self, tenant: &str, task_id: Uuid, attempt: i32) -> Result<String, Error> {
        let row = sqlx::query(
            "SELECT state, attempt, not_before > now() AS waiting \
             FROM orchestrator.tasks WHERE id = $1 AND tenant = $2",
        )
        .bind(task_id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(claim::refusal_reason(
            row.as_ref().map(|row| claim::TaskState {
                state: row.get("state"),
                attempt: row.get("attempt"),
                waiting: row.get::<Option<bool>, _>("waiting") == Some(true),
            }),
            attempt,
        ))
    }

    /// Extends the lease of `attempt` if `worker` still holds it. Otherwise says why the worker
    /// must stop; "cancelled" when its run was cancelled, which also ends the task.
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
            return Ok(None);
        }
        // The run was cancelled while this worker ran the task: now it knows, so the task
        // has stopped.
        let mut tx = self.pool.begin().await?;
        let cancelling = sqlx::query(&format!(
            "SELECT {LOCKED_COLUMNS} FROM orchestrator.tasks \
             WHERE id = $1 AND tenant = $2 AND attempt = $3 AND lease_owner = $4 \
               AND state = 'cancelling' FOR UPDATE"
        ))
        .bind(task_id)
        .bind(tenant)
        .bind(attempt)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = cancelling {
            let mut effects = Effects::default();
            self.stop_cancelled(&mut tx, &LockedTask::from_row(&row), &mut effects)
                .await?;
            tx.commit().await?;
            effects.record();
            return Ok(Some("cancelled".into()));
        }
        tx.rollback().await?;
        Ok(Some(self.refusal(tenant, task_id, attempt).await?))
    }

    /// Saves `checkpoint` (opaque bytes) for `attempt` if `worker` holds its lease and it
    /// runs; otherwise says why not, as a refused heartbeat would.
    pub async fn save_checkpoint(
        &self,
        tenant: &str,
        task_id: Uuid,
        attempt: i32,
        worker: &str,
        checkpoint: &[u8],
    ) -> Result<Option<String>, Error> {
        let saved = sqlx::query(
            "INSERT INTO orchestrator.task_checkpoints (task_id, attempt, checkpoint) \
             SELECT id, attempt, $5 FROM orchestrator.tasks \
             WHERE id = $1 AND tenant = $2 AND attempt = $3 AND lease_owner = $4 \
               AND state = 'running' \
             ON CONFLICT (task_id) DO UPDATE \
             SET attempt = EXCLUDED.attempt, checkpoint = EXCLUDED.checkpoint, saved_at = now()",
        )
        .bind(task_id)
        .bind(tenant)
        .bind(attempt)
        .bind(worker)
        .bind(checkpoint)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if saved == 1 {
            return Ok(None);
        }
        Ok(Some(self.refusal(tenant, task_id, attempt).await?))
    }

    /// Applies a worker's report (see [`Store::apply_reports`]).
    pub async fn apply_report(&self, report: &Report) -> Result<ReportDecision, Error> {
        let decisions = self.apply_reports(std::slice::from_ref(report)).await?;
        // `apply_reports` decides every report.
        Ok(decisions
            .into_iter()
            .next()
            .unwrap_or_else(|| ReportDecision::Rejected("no decision".into())))
    }

    /// Applies workers' reports in order, in one transaction: each is applied if it belongs to
    /// the current attempt and the reporting worker holds its lease, and recorded as rejected
    /// otherwise. Every report is recorded. One commit for many reports is what lets a busy
    /// orchestrator keep up; if the transaction fails, none of them is applied.
    pub async fn apply_reports(&self, reports: &[Report]) -> Result<Vec<ReportDecision>, Error> {
        let mut tx = self.pool.begin().await?;
        OUTBOX.quiet(&mut tx).await?;
        let mut effects = Effects::default();
        let decisions = match reports::apply_plain_successes(&mut tx, reports, &mut effects).await?
        {
            Some(decisions) => decisions,
            None => {
                let mut decisions = Vec::with_capacity(reports.len());
                for report in reports {
                    decisions.push(self.apply_report_in(&mut tx, report, &mut effects).await?);
                }
                decisions
            }
        };
        // Only the verdicts of applied reports count: a stale or duplicate report's answer
        // was never the task's.
        let verdicts: Vec<&quality::Verdict> = reports
            .iter()
            .zip(&decisions)
            .filter(|(_, decision)| **decision == ReportDecision::Accepted)
            .filter_map(|(report, _)| report.verdict.as_ref())
            .collect();
        let totals = if verdicts.is_empty() {
            Vec::new()
        } else {
            quality::record(&mut tx, &verdicts).await?
        };
        tx.commit().await?;
        self.quality.update(totals);
        OUTBOX.wake();
        effects.record();
        // Finished attempts free in-flight slots of their tenants.
        self.wake_dispatcher();
        Ok(decisions)
    }

    async fn apply_report_in(
        &self,
        tx: &mut PgConnection,
        report: &Report,
        effects: &mut Effects,
    ) -> Result<ReportDecision, Error> {
        let task = sqlx::query(&format!(
            "SELECT {LOCKED_COLUMNS} FROM orchestrator.tasks \
             WHERE id = $1 AND tenant = $2 FOR UPDATE"
        ))
        .bind(report.task_id)
        .bind(&report.tenant)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| LockedTask::from_row(&row));
        let outcome_name = match report.outcome {
            ReportOutcome::Succeeded { .. } => "succeeded",
            ReportOutcome::Failed { .. } => "failed",
        };
        let holder = |task: &LockedTask| {
            task.attempt == report.attempt
                && task.lease_owner.as_deref() == Some(report.worker_id.as_str())
        };
        let decision = match &task {
            None => ReportDecision::Rejected("unknown task".into()),
            Some(task) if task.attempt != report.attempt => ReportDecision::Rejected(format!(
                "stale attempt {}: the current attempt is {}",
                report.attempt, task.attempt
            )),
            Some(task) if matches!(task.state.as_str(), "cancelling" | "cancelled") => {
                ReportDecision::Rejected("cancelled".into())
            }
            Some(task) if task.state != "running" => ReportDecision::Rejected(format!(
                "attempt {} is already {}",
                task.attempt, task.state
            )),
            Some(task) if !holder(task) => {
                ReportDecision::Rejected("the reporting worker does not hold the lease".into())
            }
            Some(_) => ReportDecision::Accepted,
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
        if let Some(task) = &task {
            let worker = report.worker_id.as_str();
            match (&decision, &report.outcome) {
                (ReportDecision::Accepted, ReportOutcome::Succeeded { output, usage }) => {
                    self.succeed(tx, task, worker, output, *usage, effects)
                        .await?;
                }
                (
                    ReportDecision::Accepted,
                    ReportOutcome::Failed {
                        error_class,
                        message,
                        usage,
                    },
                ) => {
                    self.fail(
                        tx,
                        task,
                        worker,
                        AttemptEnd::Failed,
                        *error_class,
                        message,
                        *usage,
                        effects,
                    )
                    .await?;
                }
                (ReportDecision::Rejected(_), _) if task.state == "cancelling" && holder(task) => {
                    // It finished before it heard of the cancellation: its attempt is over.
                    self.stop_cancelled(tx, task, effects).await?;
                }
                (ReportDecision::Rejected(_), _) => {}
            }
        }
        Ok(decision)
    }

    /// Ends `worker`'s lease on `attempt` now, so the reaper's next pass handles the task as
    /// it handles an expired lease. `false` when the attempt is not that worker's running (or
    /// cancelling) one: nothing changes.
    pub async fn release(
        &self,
        tenant: &str,
        task_id: Uuid,
        attempt: i32,
        worker: &str,
    ) -> Result<bool, Error> {
        let released = sqlx::query(
            "UPDATE orchestrator.tasks SET lease_expires_at = now() \
             WHERE id = $1 AND tenant = $2 AND attempt = $3 AND lease_owner = $4 \
               AND state IN ('running', 'cancelling')",
        )
        .bind(task_id)
        .bind(tenant)
        .bind(attempt)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(released.rows_affected() == 1)
    }

    /// Ends attempts whose lease expired. An expired lease counts as a transient failure: the
    /// task is queued again after the transient backoff while its attempt budget lasts, and
    /// dead-lettered (failing its run) after that. A cancelling task whose worker went away is
    /// cancelled. Safe to run on several replicas at once (`SKIP LOCKED`).
    pub async fn reap_expired(&self, batch: i64) -> Result<Reaped, Error> {
        let mut tx = self.pool.begin().await?;
        let expired: Vec<LockedTask> = sqlx::query(&format!(
            "SELECT {LOCKED_COLUMNS} FROM orchestrator.tasks \
             WHERE state IN ('running', 'cancelling') AND lease_expires_at < now() \
             ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(LockedTask::from_row)
        .collect();
        let mut reaped = Reaped::default();
        let mut effects = Effects::default();
        for task in &expired {
            if task.state == "cancelling" {
                self.stop_cancelled(&mut tx, task, &mut effects).await?;
                reaped.cancelled += 1;
                continue;
            }
            let owner = task.lease_owner.clone().unwrap_or_default();
            let message = format!("lease expired on attempt {} (worker {owner})", task.attempt);
            let next = self
                .fail(
                    &mut tx,
                    task,
                    &owner,
                    AttemptEnd::LeaseExpired,
                    ErrorClass::Transient,
                    &message,
                    v1::Usage::default(),
                    &mut effects,
                )
                .await?;
            match next {
                Next::Retry { .. } => reaped.requeued += 1,
                Next::DeadLetter => reaped.dead_lettered += 1,
            }
        }
        tx.commit().await?;
        effects.record();
        Ok(reaped)
    }

    /// Dispatches again attempts that stayed unclaimed for `after`: their message may have been
    /// lost or run out of deliveries. A duplicate dispatch is harmless (the claim decides).
    /// Nothing is dispatched in maintenance mode.
    pub async fn redispatch_unclaimed(&self, after: Duration, batch: i64) -> Result<u64, Error> {
        let mut tx = self.pool.begin().await?;
        let stale = sqlx::query(&format!(
            "UPDATE orchestrator.tasks SET dispatched_at = now(), dispatches = dispatches + 1 \
             WHERE id IN (SELECT id FROM orchestrator.tasks \
                          WHERE state = 'queued' \
                            AND dispatched_at < now() - make_interval(secs => $1) \
                          ORDER BY dispatched_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
               AND {} \
             RETURNING id, run_id, tenant, role, attempt, dispatches",
            control::NOT_PAUSED
        ))
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

/// What one reaper pass did with expired leases.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Queued again with the next attempt (after the transient backoff).
    pub requeued: u64,
    /// Out of transient attempts: dead-lettered.
    pub dead_lettered: u64,
    /// Cancelling tasks whose worker went away.
    pub cancelled: u64,
}
