//! Run-level outcomes, computed from the run's tasks after every task transition, and the
//! metrics a committed transaction's transitions add up to.

use colony_bus::OutboxRow;
use colony_proto::{ErrorClass, v1};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{OUTBOX, dag, usage_of};
use crate::config::FailurePolicy;
use crate::{Error, metrics};

/// A task as far as its run's outcome is concerned.
#[derive(Debug, Clone)]
pub(crate) struct TaskSummary {
    pub id: Uuid,
    pub state: String,
    pub error_class: Option<String>,
    pub failure_reason: Option<String>,
    pub output: Option<String>,
}

/// Where a run ends, once its tasks say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RunOutcome {
    Succeeded {
        output: Option<String>,
    },
    Failed {
        task_id: Uuid,
        error_class: Option<String>,
        reason: String,
    },
    Cancelled,
}

/// Tasks that may still change: a run cannot end while one of them exists.
fn is_active(state: &str) -> bool {
    matches!(
        state,
        "queued" | "running" | "cancelling" | "pending" | "awaiting_approval" | "parked"
    )
}

/// The outcome a run in `status` reaches with `tasks` (in creation order), or `None` if it
/// stays as it is. A running run fails as soon as one task is dead-lettered (`fail_fast`), or
/// once a task is dead-lettered and nothing is left to run (`continue`); it succeeds once
/// every task succeeded, with the output of the last one; a cancelling run is cancelled once
/// no task is active.
pub(crate) fn run_outcome(
    status: &str,
    policy: FailurePolicy,
    tasks: &[TaskSummary],
) -> Option<RunOutcome> {
    match status {
        "running" => {
            let settled = match policy {
                FailurePolicy::FailFast => true,
                FailurePolicy::Continue => !tasks.iter().any(|t| is_active(&t.state)),
            };
            if let Some(task) = tasks
                .iter()
                .find(|t| matches!(t.state.as_str(), "dead_lettered" | "failed"))
                .filter(|_| settled)
            {
                let reason = task.failure_reason.as_deref().unwrap_or("no reason given");
                return Some(RunOutcome::Failed {
                    task_id: task.id,
                    error_class: task.error_class.clone(),
                    reason: format!("task {} failed: {reason}", task.id),
                });
            }
            let done = !tasks.is_empty() && tasks.iter().all(|t| t.state == "succeeded");
            done.then(|| RunOutcome::Succeeded {
                output: tasks.last().and_then(|t| t.output.clone()),
            })
        }
        "cancelling" => {
            (!tasks.iter().any(|t| is_active(&t.state))).then_some(RunOutcome::Cancelled)
        }
        _ => None,
    }
}

/// Message id of a run lifecycle event. A run re-opened by a re-queue (revision > 1) may fail
/// again; its second `failed` must not look like a duplicate of the first.
pub(crate) fn run_event_msg_id(run_id: Uuid, name: &str, revision: i32) -> String {
    if revision <= 1 {
        format!("run-{run_id}-{name}")
    } else {
        format!("run-{run_id}-{name}-r{revision}")
    }
}

pub(crate) async fn enqueue_run_event(
    conn: &mut PgConnection,
    tenant: &str,
    run_id: Uuid,
    revision: i32,
    kind: v1::RunEventKind,
    reason: &str,
    usage: Option<v1::Usage>,
) -> Result<(), Error> {
    let row = run_event_row(tenant, run_id, revision, kind, reason, usage);
    OUTBOX.enqueue_many(conn, &[row]).await?;
    Ok(())
}

/// A run lifecycle event as an outbox row.
fn run_event_row(
    tenant: &str,
    run_id: Uuid,
    revision: i32,
    kind: v1::RunEventKind,
    reason: &str,
    usage: Option<v1::Usage>,
) -> OutboxRow {
    let name = match kind {
        v1::RunEventKind::Created => "created",
        v1::RunEventKind::Succeeded => "succeeded",
        v1::RunEventKind::Failed => "failed",
        v1::RunEventKind::Cancelled => "cancelled",
        v1::RunEventKind::Planned => "planned",
        v1::RunEventKind::Cancelling => "cancelling",
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
    OutboxRow::new(
        &colony_bus::subjects::run_event(name),
        &run_event_msg_id(run_id, name, revision),
        &event,
    )
}

/// Recomputes the run's status from its tasks and, if it ends, records and announces how
/// ([`settle_runs`] for one run).
pub(crate) async fn settle_run(
    conn: &mut PgConnection,
    run_id: Uuid,
    effects: &mut Effects,
) -> Result<Option<RunOutcome>, Error> {
    let mut outcomes = settle_runs(conn, &[run_id], effects).await?;
    Ok(outcomes.pop().flatten())
}

/// A run as [`settle_runs`] reads it.
struct RunState {
    id: Uuid,
    status: String,
    tenant: String,
    revision: i32,
    policy: FailurePolicy,
    tasks: Vec<TaskSummary>,
}

/// Recomputes each run's status from its tasks (the run rows locked after the task rows, the
/// order every transaction follows, and among themselves in id order) and records and
/// announces how those that end, ended: one read, one update and one outbox statement for
/// the whole set. Answers each run's outcome in the order of `run_ids`.
pub(crate) async fn settle_runs(
    conn: &mut PgConnection,
    run_ids: &[Uuid],
    effects: &mut Effects,
) -> Result<Vec<Option<RunOutcome>>, Error> {
    let mut ids = run_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    // The runs (locked) and their tasks in one round trip: one row per task. Within a run,
    // spawned children come before the tasks of its plan, so that the run's output is its
    // last planned task's, not a child's.
    let rows = sqlx::query(
        "SELECT r.id AS run_id, r.status, r.tenant, r.revision, r.failure_policy, \
                t.id, t.state, t.error_class, t.failure_reason, t.output \
         FROM orchestrator.runs r LEFT JOIN orchestrator.tasks t ON t.run_id = r.id \
         WHERE r.id = ANY($1) \
         ORDER BY r.id, t.spawn_depth DESC, t.created_at, t.id FOR UPDATE OF r",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut runs: Vec<RunState> = Vec::with_capacity(ids.len());
    for row in &rows {
        let id: Uuid = row.get("run_id");
        if runs.last().is_none_or(|run| run.id != id) {
            runs.push(RunState {
                id,
                status: row.get("status"),
                tenant: row.get("tenant"),
                revision: row.get("revision"),
                policy: FailurePolicy::parse(row.get("failure_policy")).unwrap_or_default(),
                tasks: Vec::new(),
            });
        }
        if let (Some(run), Some(task_id)) = (runs.last_mut(), row.get::<Option<Uuid>, _>("id")) {
            run.tasks.push(TaskSummary {
                id: task_id,
                state: row.get("state"),
                error_class: row.get("error_class"),
                failure_reason: row.get("failure_reason"),
                output: row.get("output"),
            });
        }
    }
    if let Some(missing) = ids.iter().find(|id| !runs.iter().any(|run| run.id == **id)) {
        return Err(Error::RunNotFound(missing.to_string()));
    }
    let ended: Vec<(&RunState, RunOutcome)> = runs
        .iter()
        .filter_map(|run| Some((run, run_outcome(&run.status, run.policy, &run.tasks)?)))
        .collect();
    if !ended.is_empty() {
        record_run_outcomes(conn, &ended, effects).await?;
    }
    Ok(run_ids
        .iter()
        .map(|id| {
            ended
                .iter()
                .find(|(run, _)| run.id == *id)
                .map(|(_, outcome)| outcome.clone())
        })
        .collect())
}

/// Writes the end of each of `ended` and its event, with one statement per kind; a failed
/// run's unstarted tasks are then cancelled.
async fn record_run_outcomes(
    conn: &mut PgConnection,
    ended: &[(&RunState, RunOutcome)],
    effects: &mut Effects,
) -> Result<(), Error> {
    let mut ids = Vec::with_capacity(ended.len());
    let mut statuses = Vec::with_capacity(ended.len());
    let mut outputs = Vec::with_capacity(ended.len());
    let mut failed_tasks = Vec::with_capacity(ended.len());
    let mut reasons = Vec::with_capacity(ended.len());
    let mut classes = Vec::with_capacity(ended.len());
    for (run, outcome) in ended {
        let (status, output, failed_task, class, reason) = match outcome {
            RunOutcome::Succeeded { output } => ("succeeded", output.as_deref(), None, None, None),
            RunOutcome::Failed {
                task_id,
                error_class,
                reason,
            } => (
                "failed",
                None,
                Some(*task_id),
                error_class.as_deref(),
                Some(reason.as_str()),
            ),
            RunOutcome::Cancelled => ("cancelled", None, None, None, None),
        };
        ids.push(run.id);
        statuses.push(status);
        outputs.push(output);
        failed_tasks.push(failed_task);
        reasons.push(reason);
        classes.push(class);
    }
    let totals: Vec<(Uuid, v1::Usage)> = sqlx::query(
        "UPDATE orchestrator.runs r SET status = u.status, output = u.output, \
             finished_at = now(), failed_task_id = u.failed_task, \
             failure_reason = u.reason, error_class = u.class \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[]) \
              AS u(id, status, output, failed_task, reason, class) \
         WHERE r.id = ANY($1) AND r.id = u.id \
         RETURNING r.id, r.prompt_tokens, r.completion_tokens, r.cost_micros_usd",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&outputs)
    .bind(&failed_tasks)
    .bind(&reasons)
    .bind(&classes)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        let usage = usage_of(
            row.get("prompt_tokens"),
            row.get("completion_tokens"),
            row.get("cost_micros_usd"),
        );
        (row.get("id"), usage)
    })
    .collect();
    let events: Vec<OutboxRow> = ended
        .iter()
        .zip(&statuses)
        .zip(&reasons)
        .map(|(((run, _), status), reason)| {
            let kind = match *status {
                "succeeded" => v1::RunEventKind::Succeeded,
                "failed" => v1::RunEventKind::Failed,
                _ => v1::RunEventKind::Cancelled,
            };
            let usage = totals
                .iter()
                .find(|(id, _)| *id == run.id)
                .map(|(_, usage)| *usage);
            run_event_row(
                &run.tenant,
                run.id,
                run.revision,
                kind,
                reason.unwrap_or(""),
                usage,
            )
        })
        .collect();
    OUTBOX.enqueue_many(&mut *conn, &events).await?;
    for ((run, _), status) in ended.iter().zip(&statuses) {
        effects.run(&run.tenant, status);
    }
    for ((run, _), status) in ended.iter().zip(&statuses) {
        if *status == "failed" {
            // Fail fast: what has not started never will (under `continue` nothing is left).
            dag::cancel_unstarted(conn, &run.tenant, run.id, effects).await?;
        }
    }
    Ok(())
}

/// Transitions made by one transaction, counted once it has committed.
#[derive(Debug, Default)]
#[must_use = "record the effects once the transaction has committed"]
pub(crate) struct Effects {
    /// Task states reached, by tenant.
    tasks: Vec<(String, &'static str)>,
    /// Run statuses reached, by tenant.
    runs: Vec<(String, &'static str)>,
    retries: Vec<(String, ErrorClass)>,
    dead_letters: Vec<(String, ErrorClass)>,
    pub cancellations: u64,
}

impl Effects {
    /// A task of `tenant` reached `state`.
    pub fn task(&mut self, tenant: &str, state: &'static str) {
        self.tasks.push((tenant.to_owned(), state));
    }

    /// A run of `tenant` reached `status`.
    pub fn run(&mut self, tenant: &str, status: &'static str) {
        self.runs.push((tenant.to_owned(), status));
    }

    /// A task of `tenant` is queued again after a failure of `class`.
    pub fn retry(&mut self, tenant: &str, class: ErrorClass) {
        self.retries.push((tenant.to_owned(), class));
    }

    /// A task of `tenant` is dead-lettered after a failure of `class`.
    pub fn dead_letter(&mut self, tenant: &str, class: ErrorClass) {
        self.dead_letters.push((tenant.to_owned(), class));
    }

    pub fn record(self) {
        for (tenant, state) in self.tasks {
            ::metrics::counter!(metrics::TASKS, "tenant" => tenant, "state" => state).increment(1);
        }
        for (tenant, status) in self.runs {
            ::metrics::counter!(metrics::RUNS, "tenant" => tenant, "status" => status).increment(1);
        }
        for (tenant, class) in self.retries {
            ::metrics::counter!(metrics::RETRIES, "tenant" => tenant, "class" => class.as_str())
                .increment(1);
        }
        for (tenant, class) in self.dead_letters {
            ::metrics::counter!(metrics::DEAD_LETTERS, "tenant" => tenant, "class" => class.as_str())
                .increment(1);
        }
        if self.cancellations > 0 {
            ::metrics::counter!(metrics::CANCELLATIONS).increment(self.cancellations);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: &str) -> TaskSummary {
        TaskSummary {
            id: Uuid::now_v7(),
            state: state.into(),
            error_class: (state == "dead_lettered").then(|| "permanent".into()),
            failure_reason: (state == "dead_lettered").then(|| "bad request".into()),
            output: (state == "succeeded").then(|| format!("{state} output")),
        }
    }

    fn outcome(status: &str, states: &[&str]) -> Option<&'static str> {
        let tasks: Vec<_> = states.iter().map(|s| task(s)).collect();
        run_outcome(status, FailurePolicy::FailFast, &tasks).map(|o| match o {
            RunOutcome::Succeeded { .. } => "succeeded",
            RunOutcome::Failed { .. } => "failed",
            RunOutcome::Cancelled => "cancelled",
        })
    }

    #[test]
    fn a_run_ends_from_its_tasks() {
        let table: &[(&str, &[&str], Option<&str>)] = &[
            ("running", &[], None),
            ("running", &["queued"], None),
            ("running", &["running"], None),
            ("running", &["succeeded"], Some("succeeded")),
            ("running", &["succeeded", "queued"], None),
            ("running", &["succeeded", "succeeded"], Some("succeeded")),
            ("running", &["dead_lettered"], Some("failed")),
            ("running", &["running", "dead_lettered"], Some("failed")),
            ("running", &["failed"], Some("failed")),
            ("cancelling", &["cancelling"], None),
            ("cancelling", &["cancelled", "running"], None),
            ("cancelling", &["cancelled"], Some("cancelled")),
            ("cancelling", &["cancelled", "succeeded"], Some("cancelled")),
            ("cancelling", &[], Some("cancelled")),
            // Final runs stay final whatever their tasks do.
            ("succeeded", &["succeeded"], None),
            ("failed", &["dead_lettered"], None),
            ("cancelled", &["cancelled"], None),
        ];
        for (status, states, expected) in table {
            assert_eq!(outcome(status, states), *expected, "{status} {states:?}");
        }
    }

    #[test]
    fn a_failed_run_names_the_task_class_and_reason() {
        let tasks = [task("succeeded"), task("dead_lettered")];
        let Some(RunOutcome::Failed {
            task_id,
            error_class,
            reason,
        }) = run_outcome("running", FailurePolicy::FailFast, &tasks)
        else {
            panic!("the run fails");
        };
        assert_eq!(task_id, tasks[1].id);
        assert_eq!(error_class.as_deref(), Some("permanent"));
        assert_eq!(reason, format!("task {} failed: bad request", tasks[1].id));
        assert_eq!(
            run_outcome("running", FailurePolicy::FailFast, &[task("succeeded")]),
            Some(RunOutcome::Succeeded {
                output: Some("succeeded output".into())
            })
        );
    }

    #[test]
    fn continue_waits_for_independent_branches() {
        let policy = FailurePolicy::Continue;
        let kind = |states: &[&str]| {
            let tasks: Vec<_> = states.iter().map(|s| task(s)).collect();
            run_outcome("running", policy, &tasks).map(|o| match o {
                RunOutcome::Succeeded { .. } => "succeeded",
                RunOutcome::Failed { .. } => "failed",
                RunOutcome::Cancelled => "cancelled",
            })
        };
        assert_eq!(kind(&["dead_lettered", "running"]), None);
        assert_eq!(kind(&["dead_lettered", "pending"]), None);
        assert_eq!(
            kind(&["dead_lettered", "skipped", "succeeded"]),
            Some("failed")
        );
        assert_eq!(kind(&["succeeded", "pending"]), None);
        assert_eq!(kind(&["succeeded", "succeeded"]), Some("succeeded"));
        assert_eq!(
            outcome("running", &["dead_lettered", "pending"]),
            Some("failed"),
            "fail fast does not wait"
        );
    }

    #[test]
    fn msg_ids_of_a_reopened_run_differ() {
        let id = Uuid::now_v7();
        assert_eq!(
            run_event_msg_id(id, "failed", 1),
            format!("run-{id}-failed")
        );
        assert_ne!(
            run_event_msg_id(id, "failed", 1),
            run_event_msg_id(id, "failed", 2)
        );
    }
}
