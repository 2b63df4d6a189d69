//! The public REST API: submit a goal, read a run.

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use uuid::Uuid;

use crate::config::{RunsConfig, is_name};
use crate::store::{NewRun, RunView, Store};
use crate::{Error, metrics};

/// Header naming the tenant a request acts for.
pub const TENANT_HEADER: &str = "x-colony-tenant";

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub runs: RunsConfig,
    pub max_body_bytes: usize,
}

pub fn routes(state: ApiState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/runs", post(create_run).get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRun {
    goal: Option<String>,
}

/// The tenant a request acts for, or why its header is refused.
pub(crate) fn tenant_of(headers: &HeaderMap, default: &str) -> Result<String, String> {
    match headers.get(TENANT_HEADER) {
        None => Ok(default.to_owned()),
        Some(value) => match value.to_str() {
            Ok(tenant) if is_name(tenant) => Ok(tenant.to_owned()),
            _ => Err(format!(
                "{TENANT_HEADER} must be 1-64 letters, digits, '_' or '-'"
            )),
        },
    }
}

pub(crate) fn tenant(headers: &HeaderMap, runs: &RunsConfig) -> Result<String, Error> {
    tenant_of(headers, &runs.default_tenant).map_err(Error::InvalidRequest)
}

pub(crate) fn rejected(reason: &'static str, error: Error) -> Error {
    ::metrics::counter!(metrics::REJECTED_REQUESTS, "reason" => reason).increment(1);
    error
}

pub(crate) fn count(route: &'static str, status: StatusCode) {
    ::metrics::counter!(metrics::HTTP_REQUESTS, "route" => route, "status" => status.as_str().to_owned())
        .increment(1);
}

async fn create_run(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<CreateRun>, JsonRejection>,
) -> Result<(StatusCode, Json<RunView>), Error> {
    let result = create_run_inner(&state, &headers, body).await;
    let status = match &result {
        Ok(_) => StatusCode::CREATED,
        Err(Error::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        Err(Error::InvalidRequest(_)) => StatusCode::BAD_REQUEST,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    count("/v1/runs", status);
    result.map(|run| (StatusCode::CREATED, Json(run)))
}

#[tracing::instrument(skip_all, fields(tenant, run_id))]
async fn create_run_inner(
    state: &ApiState,
    headers: &HeaderMap,
    body: Result<Json<CreateRun>, JsonRejection>,
) -> Result<RunView, Error> {
    let tenant = tenant(headers, &state.runs)?;
    tracing::Span::current().record("tenant", tenant.as_str());
    let Json(body) = body.map_err(|rejection| match rejection {
        JsonRejection::BytesRejection(_) => rejected(
            "too_large",
            Error::TooLarge {
                limit: state.max_body_bytes,
            },
        ),
        other => rejected(
            "invalid_json",
            Error::InvalidRequest(format!("invalid JSON body: {}", other.body_text())),
        ),
    })?;
    let goal = body.goal.unwrap_or_default();
    if goal.trim().is_empty() {
        return Err(rejected(
            "invalid_request",
            Error::InvalidRequest("goal is required and must not be blank".into()),
        ));
    }
    if goal.len() > state.runs.max_goal_bytes {
        return Err(rejected(
            "invalid_request",
            Error::InvalidRequest(format!(
                "goal is {} bytes; the limit is {}",
                goal.len(),
                state.runs.max_goal_bytes
            )),
        ));
    }
    let (run_id, _) = state
        .store
        .create_run(&NewRun {
            tenant: tenant.clone(),
            goal,
            role: state.runs.role.clone(),
        })
        .await?;
    tracing::Span::current().record("run_id", tracing::field::display(run_id));
    ::metrics::counter!(metrics::RUNS, "status" => "created").increment(1);
    ::metrics::counter!(metrics::TASKS, "state" => "queued").increment(1);
    tracing::info!("run created");
    state.store.get_run(&tenant, run_id).await
}

async fn get_run(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<RunView>, Error> {
    let tenant = tenant(&headers, &state.runs)?;
    let id = Uuid::parse_str(&id).map_err(|_| Error::RunNotFound(id.clone()))?;
    Ok(Json(state.store.get_run(&tenant, id).await?))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn list_runs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, Error> {
    let tenant = tenant(&headers, &state.runs)?;
    let limit = query.limit.unwrap_or(20).clamp(1, 200);
    let runs = state.store.list_runs(&tenant, limit).await?;
    Ok(Json(serde_json::json!({ "runs": runs })))
}
