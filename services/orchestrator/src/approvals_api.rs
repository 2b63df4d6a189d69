//! The REST API of the human approval gate: list a tenant's tasks awaiting approval, approve
//! one, reject one with a reason.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use crate::Error;
use crate::http::{ApiState, counted, rejected, tenant};
use crate::store::TaskView;

/// Longest rejection reason, in bytes.
const MAX_REASON_BYTES: usize = 4096;

pub fn routes(state: ApiState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/tasks/{id}/approve", post(approve))
        .route("/v1/tasks/{id}/reject", post(reject))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, Error> {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let limit = query.limit.unwrap_or(50).clamp(1, 500);
        state.store.pending_approvals(&tenant, limit).await
    }
    .await;
    counted(StatusCode::OK, "/v1/approvals", result)
        .map(|approvals| Json(serde_json::json!({ "approvals": approvals })))
}

#[tracing::instrument(skip_all, fields(task_id = %id))]
async fn approve(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, Error> {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let id = Uuid::parse_str(&id).map_err(|_| Error::TaskNotFound(id.clone()))?;
        state.store.approve(&tenant, id).await
    }
    .await;
    counted(StatusCode::OK, "/v1/tasks/{id}/approve", result).map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reject {
    reason: String,
}

#[tracing::instrument(skip_all, fields(task_id = %id))]
async fn reject(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Reject>, JsonRejection>,
) -> Result<Json<TaskView>, Error> {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let id = Uuid::parse_str(&id).map_err(|_| Error::TaskNotFound(id.clone()))?;
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
                    "expected {{\"reason\": \"why\"}}: {}",
                    other.body_text()
                )),
            ),
        })?;
        let reason = body.reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
            return Err(rejected(
                "invalid_request",
                Error::InvalidRequest(format!("reason is required: 1 to {MAX_REASON_BYTES} bytes")),
            ));
        }
        state.store.reject(&tenant, id, reason).await
    }
    .await;
    counted(StatusCode::OK, "/v1/tasks/{id}/reject", result).map(Json)
}
