//! The replay log: every task attempt's lifecycle (from `colony.v1.event.task.*`) and steps
//! (from `colony.v1.event.trajectory.step`), recorded through two durable consumers and
//! exported as JSON lines, one attempt per line.

use std::pin::Pin;

use colony_bus::{Bus, ConsumeOptions, Delivery, Outcome, StreamKind};
use colony_proto::v1;
use colony_runtime::Runtime;
use futures::Stream;
use sqlx::{PgPool, Row};

use crate::session::check_id;
use crate::{Error, metrics};

pub type ExportStream =
    Pin<Box<dyn Stream<Item = Result<v1::TrajectoryChunk, tonic::Status>> + Send + 'static>>;

const TASK_CONSUMER: &str = "memory-replay-tasks";
const STEP_CONSUMER: &str = "memory-replay-steps";
/// Attempts per exported chunk.
const EXPORT_PAGE: i64 = 200;

/// The replay log over `memory.trajectories` and `memory.trajectory_steps`.
#[derive(Clone)]
pub struct Replay {
    pool: PgPool,
}

/// `TASK_EVENT_KIND_SUCCEEDED` → `succeeded`.
fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn message_json(message: &v1::ChatMessage) -> serde_json::Value {
    serde_json::json!({
        "role": message.role,
        "content": message.content,
        "tool_calls": message.tool_calls.iter().map(|call| serde_json::json!({
            "id": call.id,
            "name": call.name,
            "arguments_json": call.arguments_json,
        })).collect::<Vec<_>>(),
        "tool_call_id": message.tool_call_id,
    })
}

fn occurred_at(timestamp: Option<&prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    timestamp
        .and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        })
        .unwrap_or_else(chrono::Utc::now)
}

/// The ids of an attempt, checked: an event without them cannot be recorded.
fn check_attempt(tenant: &str, run_id: &str, task_id: &str) -> Result<(), Error> {
    check_id("tenant", tenant)?;
    check_id("run_id", run_id)?;
    check_id("task_id", task_id)
}

fn outcome_of(result: Result<(), Error>, kind: &'static str) -> Outcome {
    match result {
        Ok(()) => {
            ::metrics::counter!(metrics::REPLAY_EVENTS, "kind" => kind, "outcome" => "ok")
                .increment(1);
            Outcome::Ack
        }
        Err(error @ Error::InvalidArgument { .. }) => {
            ::metrics::counter!(metrics::REPLAY_EVENTS, "kind" => kind, "outcome" => "invalid")
                .increment(1);
            Outcome::Terminate(format!("not recordable: {error}"))
        }
        Err(error) => {
            tracing::warn!(%error, kind, "replay log write failed; retrying");
            Outcome::Retry(std::time::Duration::from_secs(1))
        }
    }
}

impl Replay {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates the two durable consumers and starts recording.
    pub async fn start(&self, bus: &Bus, runtime: &Runtime) -> anyhow::Result<()> {
        let tasks = bus
            .durable_consumer(
                StreamKind::Events,
                TASK_CONSUMER,
                &format!("{}.>", colony_bus::subjects::EVENT_TASK),
            )
            .await?;
        let steps = bus
            .durable_consumer(
                StreamKind::Events,
                STEP_CONSUMER,
                colony_bus::subjects::TRAJECTORY_STEP,
            )
            .await?;
        let replay = self.clone();
        runtime.spawn(colony_bus::consume(
            bus.clone(),
            tasks,
            ConsumeOptions::new(TASK_CONSUMER, 8).observing(),
            runtime.shutdown.clone(),
            runtime.tracker.clone(),
            move |delivery: Delivery<v1::TaskEvent>| {
                let replay = replay.clone();
                async move { outcome_of(replay.record_task(&delivery.message).await, "task") }
            },
        ));
        let replay = self.clone();
        runtime.spawn(colony_bus::consume(
            bus.clone(),
            steps,
            ConsumeOptions::new(STEP_CONSUMER, 8).observing(),
            runtime.shutdown.clone(),
            runtime.tracker.clone(),
            move |delivery: Delivery<v1::TrajectoryStep>| {
                let replay = replay.clone();
                async move { outcome_of(replay.record_step(&delivery.message).await, "step") }
            },
        ));
        Ok(())
    }

    /// Records a lifecycle event: the attempt's row is created on its first event and its
    /// outcome is the latest event's kind (events arriving late do not overwrite newer ones).
    pub async fn record_task(&self, event: &v1::TaskEvent) -> Result<(), Error> {
        check_attempt(&event.tenant, &event.run_id, &event.task_id)?;
        let kind = v1::TaskEventKind::try_from(event.kind)
            .map(|kind| short_name(kind.as_str_name(), "TASK_EVENT_KIND_"))
            .unwrap_or_else(|_| format!("unknown_{}", event.kind));
        let error_class = match v1::ErrorClass::try_from(event.error_class) {
            Ok(v1::ErrorClass::Unspecified) | Err(_) => String::new(),
            Ok(class) => short_name(class.as_str_name(), "ERROR_CLASS_"),
        };
        let usage = event.usage.unwrap_or_default();
        let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO memory.trajectories AS t (tenant, run_id, task_id, attempt, role, \
                 outcome, error_class, reason, prompt_tokens, completion_tokens, \
                 cost_micros_usd, started_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) \
             ON CONFLICT (tenant, run_id, task_id, attempt) DO UPDATE SET \
                 role = CASE WHEN t.role = '' THEN EXCLUDED.role ELSE t.role END, \
                 outcome = EXCLUDED.outcome, error_class = EXCLUDED.error_class, \
                 reason = EXCLUDED.reason, \
                 prompt_tokens = GREATEST(t.prompt_tokens, EXCLUDED.prompt_tokens), \
                 completion_tokens = GREATEST(t.completion_tokens, EXCLUDED.completion_tokens), \
                 cost_micros_usd = GREATEST(t.cost_micros_usd, EXCLUDED.cost_micros_usd), \
                 started_at = LEAST(t.started_at, EXCLUDED.started_at), \
                 updated_at = EXCLUDED.updated_at \
             WHERE t.updated_at <= EXCLUDED.updated_at",
        )
        .bind(&event.tenant)
        .bind(&event.run_id)
        .bind(&event.task_id)
        .bind(i32::try_from(event.attempt).unwrap_or(i32::MAX))
        .bind(&event.role)
        .bind(kind)
        .bind(error_class)
        .bind(&event.reason)
        .bind(signed(usage.prompt_tokens))
        .bind(signed(usage.completion_tokens))
        .bind(signed(usage.cost_micros_usd))
        .bind(occurred_at(event.occurred_at.as_ref()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records one step; a repeated step number keeps the first.
    pub async fn record_step(&self, step: &v1::TrajectoryStep) -> Result<(), Error> {
        check_attempt(&step.tenant, &step.run_id, &step.task_id)?;
        let Some(message) = &step.message else {
            return Err(Error::invalid("message", "is required"));
        };
        let at = occurred_at(step.occurred_at.as_ref());
        let attempt = i32::try_from(step.attempt).unwrap_or(i32::MAX);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO memory.trajectories (tenant, run_id, task_id, attempt, role, \
                 started_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
             ON CONFLICT (tenant, run_id, task_id, attempt) DO NOTHING",
        )
        .bind(&step.tenant)
        .bind(&step.run_id)
        .bind(&step.task_id)
        .bind(attempt)
        .bind(&step.role)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO memory.trajectory_steps (tenant, run_id, task_id, attempt, step, \
                 message, occurred_at) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&step.tenant)
        .bind(&step.run_id)
        .bind(&step.task_id)
        .bind(attempt)
        .bind(i32::try_from(step.step).unwrap_or(i32::MAX))
        .bind(message_json(message).to_string())
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The tenant's attempts (of one run, when given) as JSON lines, oldest first, streamed
    /// page by page.
    pub async fn export(
        &self,
        request: v1::ExportTrajectoriesRequest,
    ) -> Result<ExportStream, Error> {
        check_id("tenant", &request.tenant)?;
        if !request.run_id.is_empty() {
            check_id("run_id", &request.run_id)?;
        }
        struct Cursor {
            pool: PgPool,
            tenant: String,
            run_id: String,
            after: Option<(chrono::DateTime<chrono::Utc>, String, String, i32)>,
            done: bool,
        }
        let cursor = Cursor {
            pool: self.pool.clone(),
            tenant: request.tenant,
            run_id: request.run_id,
            after: None,
            done: false,
        };
        let stream = futures::stream::unfold(cursor, |mut cursor| async move {
            if cursor.done {
                return None;
            }
            let page = export_page(
                &cursor.pool,
                &cursor.tenant,
                &cursor.run_id,
                cursor.after.as_ref(),
            )
            .await;
            match page {
                Err(error) => {
                    tracing::warn!(%error, "trajectory export failed");
                    cursor.done = true;
                    Some((Err(tonic::Status::from(error)), cursor))
                }
                Ok((lines, last)) => {
                    cursor.done = last.is_none() || lines.is_empty();
                    cursor.after = last;
                    if lines.is_empty() {
                        return None;
                    }
                    Some((
                        Ok(v1::TrajectoryChunk {
                            jsonl: lines.into_bytes(),
                        }),
                        cursor,
                    ))
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

type ExportKey = (chrono::DateTime<chrono::Utc>, String, String, i32);

/// One page of JSON lines after `after`, and the key of its last attempt (`None` at the end).
async fn export_page(
    pool: &PgPool,
    tenant: &str,
    run_id: &str,
    after: Option<&ExportKey>,
) -> Result<(String, Option<ExportKey>), Error> {
    let (after_at, after_run, after_task, after_attempt) = match after {
        Some((at, run, task, attempt)) => (Some(*at), run.as_str(), task.as_str(), *attempt),
        None => (None, "", "", 0),
    };
    let rows = sqlx::query(
        "SELECT t.started_at, t.run_id, t.task_id, t.attempt, json_build_object( \
             'tenant', t.tenant, 'run_id', t.run_id, 'task_id', t.task_id, \
             'attempt', t.attempt, 'role', t.role, 'outcome', t.outcome, \
             'error_class', t.error_class, 'reason', t.reason, \
             'usage', json_build_object('prompt_tokens', t.prompt_tokens, \
                 'completion_tokens', t.completion_tokens, 'cost_micros_usd', t.cost_micros_usd), \
             'started_at', t.started_at, 'updated_at', t.updated_at, \
             'steps', (SELECT coalesce(json_agg(json_build_object('step', s.step, \
                          'occurred_at', s.occurred_at, 'message', s.message) ORDER BY s.step), \
                          '[]'::json) \
                       FROM memory.trajectory_steps s \
                       WHERE s.tenant = t.tenant AND s.run_id = t.run_id \
                         AND s.task_id = t.task_id AND s.attempt = t.attempt) \
         )::text AS line \
         FROM memory.trajectories t \
         WHERE t.tenant = $1 AND ($2 = '' OR t.run_id = $2) \
           AND ($3::timestamptz IS NULL \
                OR (t.started_at, t.run_id, t.task_id, t.attempt) > ($3, $4, $5, $6)) \
         ORDER BY t.started_at, t.run_id, t.task_id, t.attempt LIMIT $7",
    )
    .bind(tenant)
    .bind(run_id)
    .bind(after_at)
    .bind(after_run)
    .bind(after_task)
    .bind(after_attempt)
    .bind(EXPORT_PAGE)
    .fetch_all(pool)
    .await?;
    let mut lines = String::new();
    let mut last = None;
    for row in &rows {
        let line: String = row.try_get("line")?;
        lines.push_str(&line);
        lines.push('\n');
        last = Some((
            row.try_get("started_at")?,
            row.try_get("run_id")?,
            row.try_get("task_id")?,
            row.try_get("attempt")?,
        ));
    }
    if i64::try_from(rows.len()).unwrap_or(0) < EXPORT_PAGE {
        // A short page is the last one.
        return Ok((lines, None));
    }
    Ok((lines, last))
}
