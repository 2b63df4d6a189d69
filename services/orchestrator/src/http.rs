//! The public REST API: submit a goal, read a run.

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use uuid::Uuid;

use crate::config::{FailurePolicy, RunsConfig, is_name};
use crate::plan::PlannedTask;
use crate::roster::PLANNER;
use crate::store::{NewDagRun, RunView, Store};
use crate::topology::{self, Topology};
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
    let result = create_run_inner(&state, &headers, body).await;
    counted(StatusCode::CREATED, "/v1/runs", result).map(|run| (StatusCode::CREATED, Json(run)))
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
    let priority = body.priority.unwrap_or(0);
    if !(-10..=10).contains(&priority) {
        return Err(rejected(
            "invalid_request",
            Error::InvalidRequest(format!("priority is {priority}; it must be -10..10")),
        ));
    }
    if let Err(wait) = state.rate.acquire(&tenant, std::time::Instant::now()) {
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
    let mut new = plan_run(
        state,
        tenant.clone(),
        goal,
        body.topology,
        body.failure_policy,
        body.plan,
    )?;
    new.priority = priority;
    let (run_id, _) = state.store.create_dag_run(&new).await?;
    tracing::Span::current().record("run_id", tracing::field::display(run_id));
    ::metrics::counter!(metrics::RUNS, "status" => "created").increment(1);
    ::metrics::counter!(
        metrics::TOPOLOGIES,
        "topology" => new.decision.topology.as_str(),
        "overridden" => if new.decision.overridden { "true" } else { "false" }
    )
    .increment(1);
    let queued = new.tasks.iter().filter(|t| t.depends_on.is_empty()).count();
    ::metrics::counter!(metrics::TASKS, "state" => "queued").increment(queued as u64);
    tracing::info!(
        topology = new.decision.topology.as_str(),
        reason = %new.decision.reason,
        tasks = new.tasks.len(),
        "run created"
    );
    state.store.get_run(&tenant, run_id).await
}

/// Turns the dial and picks the run's first tasks: the topology's template, or for a swarm
/// its planner.
fn plan_run(
    state: &ApiState,
    tenant: String,
    goal: String,
    requested: Option<Topology>,
    failure_policy: Option<FailurePolicy>,
    given: Option<Vec<PlannedTask>>,
) -> Result<NewDagRun, Error> {
    let roster = state.store.roster();
    let default_profile = topology::ModelProfile {
        context_window: 8192,
        tokens_per_s: 50.0,
        input_price_per_mtok: 1.0,
        output_price_per_mtok: 2.0,
        quality: 0.7,
    };
    // Validation guarantees the default tier's profile; the fallback keeps a bad deploy
    // serving.
    let profile = roster.profile(&state.runs.tier).unwrap_or(&default_profile);
    let mut decision = topology::choose(&goal, profile, &roster.dial, requested);
    if let Some(given) = given {
        let count = given.len();
        let plan = roster.check_given_plan(given).map_err(|error| {
            rejected(
                "invalid_plan",
                Error::InvalidRequest(format!("invalid plan: {error}")),
            )
        })?;
        // The caller decomposed the goal: the dial's inputs are kept for the record.
        decision.topology = requested.unwrap_or(if count == 1 {
            Topology::Monolith
        } else {
            Topology::Hybrid
        });
        decision.overridden = true;
        decision.reason = format!("the request gave its plan ({count} tasks)");
        return Ok(NewDagRun {
            tenant,
            goal,
            decision,
            failure_policy: failure_policy.unwrap_or(state.runs.failure_policy),
            tasks: plan.tasks,
            priority: 0,
        });
    }
    let tasks = match roster.template(decision.topology, &goal) {
        Some(plan) => plan.tasks,
        None => vec![PlannedTask {
            id: "plan".into(),
            role: PLANNER.into(),
            instructions: goal.clone(),
            depends_on: Vec::new(),
        }],
    };
    Ok(NewDagRun {
        tenant,
        goal,
        decision,
        failure_policy: failure_policy.unwrap_or(state.runs.failure_policy),
        tasks,
        priority: 0,
    })
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
