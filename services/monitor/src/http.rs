//! The status API: `GET /v1/workers` and `GET /v1/status`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::store::Worker;
use crate::{Error, Monitor};

pub fn routes(monitor: Arc<Monitor>) -> Router {
    Router::new()
        .route("/v1/workers", get(workers))
        .route("/v1/status", get(status))
        .route("/v1/alerts", get(alerts))
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
    let events = monitor.tally.snapshot();
    Ok(Json(StatusResponse {
        started_at: monitor.started_at,
        events_total: events.values().sum(),
        events,
        live_workers: counts.alive(),
        suspect_workers: counts.suspect,
        dead_workers: counts.dead,
        anomalies: monitor.anomalies.recent(),
    }))
}
