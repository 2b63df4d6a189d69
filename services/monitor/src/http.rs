//! The status API: `GET /v1/workers`, `GET /v1/status`, `GET /v1/alerts` and `GET /v1/usage`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::breakers::OpenBreaker;
use crate::store::Worker;
use crate::tasks::{self, StaleTask, TaskSummary};
use crate::usage::{self, By, UsageQuery, UsageRow};
use crate::{Error, Monitor};

/// Stale tasks listed in `/v1/status` at most.
const STALE_LISTED: i64 = 50;

pub fn routes(monitor: Arc<Monitor>) -> Router {
    Router::new()
        .route("/v1/workers", get(workers))
        .route("/v1/status", get(status))
        .route("/v1/alerts", get(alerts))
        .route("/v1/usage", get(usage_summary))
        .with_state(monitor)
}

#[derive(Debug, Serialize)]
struct WorkersResponse {
    workers: Vec<Worker>,
}

#[derive(Debug, Serialize)]
struct StatusResponse {
    started_at: DateTime<Utc>,
    /// Events handled by this process since it started, by kind.
    events: BTreeMap<&'static str, u64>,
    events_total: u64,
    /// Up or suspect.
    live_workers: u64,
    /// Of the live ones, those that missed heartbeats (silent past `worker_suspect_after`).
    suspect_workers: u64,
    dead_workers: u64,
    /// The latest anomalous model calls this process saw, oldest first.
    anomalies: Vec<crate::anomaly::Anomaly>,
    /// Queued, running and stale tasks now, in the monitor's own view.
    tasks: TaskSummary,
    /// Running for longer than this is stale.
    stale_task_after_seconds: f64,
    /// The stale tasks, oldest first (50 at most).
    stale_tasks: Vec<StaleTask>,
    /// The routers' open and half-open circuit breakers, by router and deployment.
    open_breakers: Vec<OpenBreaker>,
    /// The largest event lag (event time to JetStream storing it) within the last minute, in
    /// seconds.
    event_lag_seconds: f64,
}

#[derive(Debug, Serialize)]
struct UsageResponse {
    by: By,
    rows: Vec<UsageRow>,
}

#[derive(Debug, Serialize)]
struct AlertsResponse {
    alerts: Vec<crate::alerts::Alert>,
}

/// Firing alerts first, then the 100 most recent resolved ones.
async fn alerts(State(monitor): State<Arc<Monitor>>) -> Result<Json<AlertsResponse>, Error> {
    let alerts = crate::alerts::list(monitor.store.pool(), 100)
        .await
        .map_err(|e| failed("/v1/alerts", e))?;
    Ok(Json(AlertsResponse { alerts }))
}

/// Logs a failed request once, then answers with the error's HTTP form.
fn failed(route: &'static str, error: Error) -> Error {
    tracing::warn!(%error, route, "status request failed");
    error
}

async fn workers(State(monitor): State<Arc<Monitor>>) -> Result<Json<WorkersResponse>, Error> {
    let workers = monitor
        .store
        .workers(monitor.liveness)
        .await
        .map_err(|e| failed("/v1/workers", e))?;
    Ok(Json(WorkersResponse { workers }))
}

async fn status(State(monitor): State<Arc<Monitor>>) -> Result<Json<StatusResponse>, Error> {
    let counts = monitor
        .store
        .counts(monitor.liveness)
        .await
        .map_err(|e| failed("/v1/status", e))?;
    let pool = monitor.store.pool();
    let tasks = tasks::summary(pool, monitor.stale_task_after)
        .await
        .map_err(|e| failed("/v1/status", e))?;
    let stale_tasks = if tasks.stale == 0 {
        Vec::new()
    } else {
        tasks::stale(pool, monitor.stale_task_after, STALE_LISTED)
            .await
            .map_err(|e| failed("/v1/status", e))?
    };
    let events = monitor.tally.snapshot();
    Ok(Json(StatusResponse {
        started_at: monitor.started_at,
        events_total: events.values().sum(),
        events,
        live_workers: counts.alive(),
        suspect_workers: counts.suspect,
        dead_workers: counts.dead,
        anomalies: monitor.anomalies.recent(),
        tasks,
        stale_task_after_seconds: monitor.stale_task_after.as_secs_f64(),
        stale_tasks,
        open_breakers: monitor.breakers.open(),
        event_lag_seconds: monitor
            .recent
            .largest_lag(crate::sweep::EVENT_LAG_GAUGE_WINDOW),
    }))
}

/// Usage summed by tenant, model, deployment or run, most expensive first:
/// `?by=tenant|model|deployment|run&tenant=<t>&since=<RFC 3339>&limit=<1..=1000>`.
async fn usage_summary(
    State(monitor): State<Arc<Monitor>>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<UsageResponse>, Error> {
    let Query(params) = params.map_err(|rejection| Error::InvalidRequest(rejection.body_text()))?;
    let query = UsageQuery::parse(&params).map_err(Error::InvalidRequest)?;
    let rows = usage::summarize(monitor.store.pool(), &query)
        .await
        .map_err(|e| failed("/v1/usage", e))?;
    Ok(Json(UsageResponse { by: query.by, rows }))
}
