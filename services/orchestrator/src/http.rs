//! The public REST API: submit a goal, read a run.

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::config::{FailurePolicy, RunsConfig, is_name};
use crate::plan::PlannedTask;
use crate::store::{RunView, Store};
use crate::topology::Topology;
use crate::{Error, metrics};

/// Header naming the tenant a request acts for.
pub const TENANT_HEADER: &str = "x-colony-tenant";

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub runs: RunsConfig,
    pub max_body_bytes: usize,
    /// Run creations per tenant (`limits.runs_per_second_per_tenant`), shared by the routers.
    pub rate: std::sync::Arc<crate::flow::RateLimiter>,
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
    /// Overrides the dial.
    topology: Option<Topology>,
    failure_policy: Option<FailurePolicy>,
    /// -10..10, higher first within the tenant; 0 when absent.
    priority: Option<i16>,
    /// The run's tasks, given by the caller instead of the dial's template or a planner;
    /// validated like a planner's plan (roles, ids, cycles, bounds).
    plan: Option<Vec<PlannedTask>>,
    /// The most the run's model calls may cost, in US dollars; the router refuses a call that
    /// would pass it. Absent: no run budget.
    budget_usd: Option<f64>,
}

/// The largest run budget accepted, in US dollars: a typo guard, not a policy.
const MAX_RUN_BUDGET_USD: f64 = 1_000_000.0;

/// A run budget in micro-USD, or why it is refused.
fn budget_micros(budget_usd: Option<f64>) -> Result<Option<u64>, String> {
    match budget_usd {
        None => Ok(None),
        Some(usd) if usd.is_finite() && (0.0..=MAX_RUN_BUDGET_USD).contains(&usd) => {
            // In range, so the product fits.
            Ok(Some((usd * 1e6).round() as u64))
        }
        Some(usd) => Err(format!(
            "budget_usd must be a number from 0 to {MAX_RUN_BUDGET_USD}, not {usd}"
        )),
    }
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

/// Counts the request under `route` with the status its result answers with (`ok` on success).
pub(crate) fn counted<T>(
    ok: StatusCode,
    route: &'static str,
    result: Result<T, Error>,
) -> Result<T, Error> {
    count(route, result.as_ref().map_or_else(Error::status, |_| ok));
    result
}

async fn create_run(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<CreateRun>, JsonRejection>,
) -> Result<(StatusCode, Json<RunView>), Error> {
    // The root of the run's trace, or a child of the caller's when it sent a W3C
    // `traceparent`: a client's own trace then follows the run through every service.
    let span = tracing::info_span!(
        "create_run",
        otel.name = "POST /v1/runs",
        otel.kind = "server",
        tenant = tracing::field::Empty,
        run_id = tracing::field::Empty,
    );
    colony_telemetry::set_parent(
        &span,
        headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok()),
    );
    let result = create_run_inner(&state, &headers, body)
        .instrument(span)
        .await;
    counted(StatusCode::CREATED, "/v1/runs", result).map(|run| (StatusCode::CREATED, Json(run)))
}

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
    let priority = body.priority.unwrap_or(0);
    if !(-10..=10).contains(&priority) {
        return Err(rejected(
            "invalid_request",
            Error::InvalidRequest(format!("priority is {priority}; it must be -10..10")),
        ));
    }
    let budget = budget_micros(body.budget_usd)
        .map_err(|message| rejected("invalid_request", Error::InvalidRequest(message)))?;
    if let Err(wait) = state.rate.acquire(&tenant).await {
        return Err(rejected(
            "rate_limited",
            Error::Overloaded {
                reason: "rate_limited",
                message: format!("tenant {tenant} creates runs faster than its limit; retry later"),
                retry_after: wait,
            },
        ));
    }
    if let Err(crate::store::Refusal::QueueFull) = state.store.admit(&tenant, priority).await {
        return Err(rejected(
            "queue_full",
            Error::Overloaded {
                reason: "queue_full",
                message: format!(
                    "tenant {tenant} has {} or more queued tasks; retry later",
                    state.store.limits().max_queued_per_tenant
                ),
                retry_after: std::time::Duration::from_secs(1),
            },
        ));
    }
    let mut new = state
        .store
        .plan_run(
            tenant.clone(),
            goal,
            body.topology,
            body.failure_policy,
            body.plan,
        )
        .map_err(|error| rejected("invalid_plan", error))?;
    new.priority = priority;
    new.budget_micros_usd = budget;
    let (run_id, _) = state.store.create_dag_run(&new).await?;
    tracing::Span::current().record("run_id", tracing::field::display(run_id));
    crate::store::count_created(&new);
    tracing::info!(
        topology = new.decision.topology.as_str(),
        reason = %new.decision.reason,
        tasks = new.tasks.len(),
        "run created"
    );
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
