//! A batch of reports that are all accepted successes of plain tasks, applied with one
//! statement per kind for the whole batch. A plain task is one whose success changes nothing
//! but itself and its run: not a planner (its answer is judged), no dependents (they may
//! become ready), not a spawned child (a parked parent may resume). Anything else, and any
//! report that would be rejected, leaves the batch to the one-by-one path. Both paths mark
//! successes through [`record_successes`].
//!
//! Every join with the batch also names its ids with `= ANY`, which keeps the planner on the
//! primary keys whatever its statistics say.

use std::collections::HashMap;

use colony_proto::v1;
use sqlx::PgConnection;
use uuid::Uuid;

use super::lifecycle::{LOCKED_COLUMNS, LockedTask};
use super::outcome::{Effects, settle_runs};
use super::{OUTBOX, Report, ReportDecision, ReportOutcome, TaskEvent};
use crate::Error;
use crate::roster::PLANNER;

/// Applies `reports` if every one is an accepted success of a plain task (each task once),
/// and answers `None`, having changed nothing, otherwise. Runs in the caller's transaction;
/// the tasks stay locked until it ends.
pub(crate) async fn apply_plain_successes(
    conn: &mut PgConnection,
    reports: &[Report],
    effects: &mut Effects,
) -> Result<Option<Vec<ReportDecision>>, Error> {
    let mut outputs = Vec::with_capacity(reports.len());
    for report in reports {
        match &report.outcome {
            ReportOutcome::Succeeded { output, usage } => outputs.push((output, *usage)),
            ReportOutcome::Failed { .. } => return Ok(None),
        }
    }
    let mut ids: Vec<Uuid> = reports.iter().map(|r| r.task_id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != reports.len() {
        return Ok(None);
    }
    // Locked in id order, like claims, so batches never wait on each other in a cycle.
    let locked: HashMap<Uuid, LockedTask> = sqlx::query(&format!(
        "SELECT {LOCKED_COLUMNS} FROM orchestrator.tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        let task = LockedTask::from_row(row);
        (task.id, task)
    })
    .collect();
    let mut tasks = Vec::with_capacity(reports.len());
    for report in reports {
        let Some(task) = locked.get(&report.task_id) else {
            return Ok(None);
        };
        let plain_success = task.tenant == report.tenant
            && task.state == "running"
            && task.attempt == report.attempt
            && task.lease_owner.as_deref() == Some(report.worker_id.as_str())
            && task.role != PLANNER
            && !task.has_dependents
            && task.parent_id.is_none();
        if !plain_success {
            return Ok(None);
        }
        tasks.push(task);
    }

    let task_ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    let attempts: Vec<i32> = tasks.iter().map(|t| t.attempt).collect();
    let workers: Vec<&str> = reports.iter().map(|r| r.worker_id.as_str()).collect();
    sqlx::query(
        "INSERT INTO orchestrator.task_reports (task_id, attempt, worker_id, outcome, accepted) \
         SELECT u.id, u.attempt, u.worker, 'succeeded', true \
         FROM unnest($1::uuid[], $2::int4[], $3::text[]) AS u(id, attempt, worker)",
    )
    .bind(&task_ids)
    .bind(&attempts)
    .bind(&workers)
    .execute(&mut *conn)
    .await?;
    let successes: Vec<Success<'_>> = tasks
        .iter()
        .zip(reports)
        .zip(&outputs)
        .map(|((task, report), (output, usage))| Success {
            task,
            worker: &report.worker_id,
            output,
            usage: *usage,
        })
        .collect();
    record_successes(&mut *conn, &successes, effects).await?;
    let runs: Vec<Uuid> = tasks.iter().map(|t| t.run_id).collect();
    settle_runs(&mut *conn, &runs, effects).await?;
    Ok(Some(vec![ReportDecision::Accepted; reports.len()]))
}

/// A current attempt that succeeded, as its report said.
pub(crate) struct Success<'a> {
    pub task: &'a LockedTask,
    pub worker: &'a str,
    pub output: &'a str,
    pub usage: v1::Usage,
}

/// Marks `successes` succeeded with one statement per kind: the tasks (output, usage), their
/// attempts, their runs' usage, and a `succeeded` event each. What follows a success (a
/// planner's plan, dependents, parked parents, the run's outcome) is the caller's.
pub(crate) async fn record_successes(
    conn: &mut PgConnection,
    successes: &[Success<'_>],
    effects: &mut Effects,
) -> Result<(), Error> {
    if successes.is_empty() {
        return Ok(());
    }
    let task_ids: Vec<Uuid> = successes.iter().map(|s| s.task.id).collect();
    let run_ids: Vec<Uuid> = successes.iter().map(|s| s.task.run_id).collect();
    let attempts: Vec<i32> = successes.iter().map(|s| s.task.attempt).collect();
    let outputs: Vec<&str> = successes.iter().map(|s| s.output).collect();
    let usage = |pick: fn(&v1::Usage) -> u64| -> Vec<i64> {
        successes
            .iter()
            .map(|s| i64::try_from(pick(&s.usage)).unwrap_or(i64::MAX))
            .collect()
    };
    let (prompt, completion, cost) = (
        usage(|u| u.prompt_tokens),
        usage(|u| u.completion_tokens),
        usage(|u| u.cost_micros_usd),
    );
    sqlx::query(
        "UPDATE orchestrator.tasks t SET state = 'succeeded', finished_at = now(), \
             output = u.output, error_class = NULL, failure_reason = NULL, \
             lease_expires_at = NULL, not_before = NULL, \
             prompt_tokens = t.prompt_tokens + u.prompt, \
             completion_tokens = t.completion_tokens + u.completion, \
             cost_micros_usd = t.cost_micros_usd + u.cost \
         FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) \
              AS u(id, output, prompt, completion, cost) \
         WHERE t.id = ANY($1) AND t.id = u.id",
    )
    .bind(&task_ids)
    .bind(&outputs)
    .bind(&prompt)
    .bind(&completion)
    .bind(&cost)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE orchestrator.task_attempts a SET finished_at = now(), outcome = 'succeeded' \
         FROM unnest($1::uuid[], $2::int4[]) AS u(id, attempt) \
         WHERE a.task_id = ANY($1) AND a.task_id = u.id AND a.attempt = u.attempt \
           AND a.finished_at IS NULL",
    )
    .bind(&task_ids)
    .bind(&attempts)
    .execute(&mut *conn)
    .await?;
    if successes.iter().any(|s| s.usage != v1::Usage::default()) {
        sqlx::query(
            "UPDATE orchestrator.runs r SET prompt_tokens = r.prompt_tokens + s.prompt, \
                 completion_tokens = r.completion_tokens + s.completion, \
                 cost_micros_usd = r.cost_micros_usd + s.cost \
             FROM (SELECT u.id, sum(u.prompt)::int8 AS prompt, \
                          sum(u.completion)::int8 AS completion, sum(u.cost)::int8 AS cost \
                   FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::int8[]) \
                        AS u(id, prompt, completion, cost) GROUP BY u.id) s \
             WHERE r.id = ANY($1) AND r.id = s.id",
        )
        .bind(&run_ids)
        .bind(&prompt)
        .bind(&completion)
        .bind(&cost)
        .execute(&mut *conn)
        .await?;
    }
    let events: Vec<_> = successes
        .iter()
        .map(|s| {
            TaskEvent {
                usage: Some(s.usage),
                ..s.task
                    .event(v1::TaskEventKind::Succeeded, s.task.attempt, s.worker)
            }
            .row()
        })
        .collect();
    OUTBOX.enqueue_many(&mut *conn, &events).await?;
    for success in successes {
        effects.task(&success.task.tenant, "succeeded");
    }
    Ok(())
}
