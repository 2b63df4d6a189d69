//! The usage ledger: one row per provider call in `router.usage_ledger` and, in the same
//! transaction, a `UsageRecord` in the outbox for `colony.v1.usage.recorded`.

use std::time::Duration;

use chrono::Utc;
use colony_bus::{Outbox, subjects};
use colony_proto::v1;
use sqlx::PgPool;

use crate::error::ErrorClass;
use crate::provider::TokenUsage;
use crate::routing::Deployment;

/// The router's outbox; its relay runs for the life of the service.
pub const OUTBOX: Outbox = Outbox::new("router.outbox", "router_outbox");

/// Who a call was made for (every record carries the tenant).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub run_id: String,
    pub task_id: String,
    pub attempt: u32,
}

/// One provider call to account for.
#[derive(Debug)]
pub struct Entry<'a> {
    pub caller: &'a Caller,
    pub deployment: &'a Deployment,
    /// `None` when the call succeeded.
    pub error: Option<ErrorClass>,
    pub usage: TokenUsage,
    pub cost_micros: u64,
    pub latency: Duration,
}

fn db_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Writes the ledger row and enqueues its `UsageRecord` (msg id `usage-<row id>`) atomically.
/// Returns the row id.
pub async fn record(pool: &PgPool, entry: &Entry<'_>) -> Result<i64, colony_bus::Error> {
    let occurred_at = Utc::now();
    let latency_ms = u64::try_from(entry.latency.as_millis()).unwrap_or(u64::MAX);
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO router.usage_ledger (tenant, run_id, task_id, attempt, deployment, provider, \
         model, outcome, error_class, prompt_tokens, completion_tokens, cost_micros_usd, \
         latency_ms, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
    )
    .bind(&entry.caller.tenant)
    .bind(&entry.caller.run_id)
    .bind(&entry.caller.task_id)
    .bind(i64::from(entry.caller.attempt))
    .bind(&entry.deployment.name)
    .bind(entry.deployment.provider_kind.as_str())
    .bind(&entry.deployment.model)
    .bind(if entry.error.is_some() { "error" } else { "ok" })
    .bind(entry.error.map(ErrorClass::as_str))
    .bind(db_int(entry.usage.prompt))
    .bind(db_int(entry.usage.completion))
    .bind(db_int(entry.cost_micros))
    .bind(db_int(latency_ms))
    .bind(occurred_at)
    .fetch_one(&mut *tx)
    .await?;
    let record = v1::UsageRecord {
        tenant: entry.caller.tenant.clone(),
        run_id: entry.caller.run_id.clone(),
        task_id: entry.caller.task_id.clone(),
        attempt: entry.caller.attempt,
        deployment: entry.deployment.name.clone(),
        provider: entry.deployment.provider_kind.as_str().to_owned(),
        model: entry.deployment.model.clone(),
        usage: Some(v1::Usage {
            prompt_tokens: entry.usage.prompt,
            completion_tokens: entry.usage.completion,
            cost_micros_usd: entry.cost_micros,
        }),
        latency_ms,
        occurred_at: Some(colony_proto::timestamp(occurred_at.into())),
    };
    OUTBOX
        .enqueue(
            &mut tx,
            subjects::USAGE_RECORDED,
            &format!("usage-{id}"),
            &record,
        )
        .await?;
    tx.commit().await?;
    Ok(id)
}
