//! The REST API's run controls: cancel a run, re-queue a dead-lettered task, list dead
//! letters, and maintenance mode.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use crate::Error;
use crate::http::{ApiState, counted, rejected, tenant};
use crate::store::{Maintenance, RunView, TaskView};

pub fn routes(state: ApiState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/tasks/{id}/requeue", post(requeue_task))
        .route("/v1/dead-letters", get(dead_letters))
        .route(
            "/v1/admin/maintenance",
            get(get_maintenance).post(set_maintenance),
        )
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

#[tracing::instrument(skip_all, fields(run_id = %id))]
async fn cancel_run(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<RunView>, Error> {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let id = Uuid::parse_str(&id).map_err(|_| Error::RunNotFound(id.clone()))?;
        state.store.cancel_run(&tenant, id).await
    }
    .await;
    counted(StatusCode::OK, "/v1/runs/{id}/cancel", result).map(Json)
}

#[tracing::instrument(skip_all, fields(task_id = %id))]
async fn requeue_task(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, Error> {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let id = Uuid::parse_str(&id).map_err(|_| Error::TaskNotFound(id.clone()))?;
        state.store.requeue_task(&tenant, id).await
    }
    .await;
    counted(StatusCode::OK, "/v1/tasks/{id}/requeue", result).map(Json)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn dead_letters(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, Error> {
    let tenant = tenant(&headers, &state.runs)?;
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let tasks = state.store.dead_letters(&tenant, limit).await?;
    Ok(Json(serde_json::json!({ "dead_letters": tasks })))
}

async fn get_maintenance(State(state): State<ApiState>) -> Result<Json<Maintenance>, Error> {
    Ok(Json(state.store.maintenance().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMaintenance {
    paused: bool,
}

#[tracing::instrument(skip_all)]
async fn set_maintenance(
    State(state): State<ApiState>,
    body: Result<Json<SetMaintenance>, JsonRejection>,
) -> Result<Json<Maintenance>, Error> {
    let result = async {
        let Json(body) = body.map_err(|rejection| match rejection {
            JsonRejection::BytesRejection(_) => rejected(
                "too_large",
                Error::TooLarge {
                    limit: state.max_body_bytes,
                },
            ),
            other => rejected(
                "invalid_json",
                Error::InvalidRequest(format!(
                    "expected {{\"paused\": true|false}}: {}",
                    other.body_text()
                )),
            ),
        })?;
        state.store.set_maintenance(body.paused).await
    }
    .await;
    counted(StatusCode::OK, "/v1/admin/maintenance", result).map(Json)
}
