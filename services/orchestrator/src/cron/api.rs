//! `/v1/schedules`: create, list, read, enable, disable, run now, delete. Same tenant header,
//! error body and metrics as the runs API.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::store::{Firing, NewSchedule, ScheduleRow, Schedules};
use super::{Clock, CronConfig, CronSpec, Error, Missed};
use crate::config::{RunsConfig, is_name};
use crate::metrics;

#[derive(Clone)]
pub struct ApiState {
    pub schedules: Schedules,
    pub runs: RunsConfig,
    pub cron: CronConfig,
    pub clock: Arc<dyn Clock>,
    pub max_body_bytes: usize,
}

pub fn routes(state: ApiState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/schedules", post(create).get(list))
        .route("/v1/schedules/{id}", get(read).delete(remove))
        .route("/v1/schedules/{id}/enable", post(enable))
        .route("/v1/schedules/{id}/disable", post(disable))
        .route("/v1/schedules/{id}/run-now", post(run_now))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A time as UTC and as wall-clock time in the schedule's zone (RFC 3339 with its offset).
#[derive(Debug, Clone, Serialize)]
pub struct FireTime {
    pub utc: DateTime<Utc>,
    pub local: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastFire {
    pub fire_at: FireTime,
    pub fired_at: Option<DateTime<Utc>>,
    pub kind: Option<String>,
    pub run_id: Option<Uuid>,
}

/// A schedule as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    pub id: Uuid,
    pub tenant: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub goal: String,
    pub missed: String,
    pub enabled: bool,
    pub next_fire: Option<FireTime>,
    pub last_fire: Option<LastFire>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<ScheduleRow> for ScheduleView {
    fn from(row: ScheduleRow) -> Self {
        let zone = super::schedule::parse_zone(&row.timezone).ok();
        let time = |utc: DateTime<Utc>| FireTime {
            utc,
            local: match zone {
                Some(zone) => utc.with_timezone(&zone).to_rfc3339(),
                None => utc.to_rfc3339(),
            },
        };
        Self {
            next_fire: row.next_fire_at.map(time),
            last_fire: row.last_fire_at.map(|at| LastFire {
                fire_at: time(at),
                fired_at: row.last_fired_at,
                kind: row.last_kind.clone(),
                run_id: row.last_run_id,
            }),
            id: row.id,
            tenant: row.tenant,
            name: row.name,
            cron: row.cron,
            timezone: row.timezone,
            goal: row.goal,
            missed: row.missed,
            enabled: row.enabled,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSchedule {
    name: Option<String>,
    cron: Option<String>,
    timezone: Option<String>,
    goal: Option<String>,
    missed: Option<String>,
    enabled: Option<bool>,
}

fn tenant(headers: &HeaderMap, runs: &RunsConfig) -> Result<String, Error> {
    crate::http::tenant_of(headers, &runs.default_tenant)
        .map_err(|message| Error::invalid("invalid_request", message))
}

fn schedule_id(raw: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(raw).map_err(|_| Error::NotFound(raw.to_owned()))
}

/// Answers and counts the request under its route template.
fn respond(route: &'static str, result: Result<Response, Error>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    ::metrics::counter!(metrics::HTTP_REQUESTS, "route" => route, "status" => response.status().as_str().to_owned())
        .increment(1);
    response
}

fn required(field: &'static str, value: Option<String>) -> Result<String, Error> {
    match value {
        Some(value) if !value.trim().is_empty() => Ok(value),
        _ => Err(Error::invalid(
            "invalid_request",
            format!("{field} is required and must not be blank"),
        )),
    }
}

/// Checks a create request completely before anything is stored.
fn validate(state: &ApiState, tenant: String, body: CreateSchedule) -> Result<NewSchedule, Error> {
    let name = required("name", body.name)?;
    if !is_name(&name) {
        return Err(Error::invalid(
            "invalid_request",
            "name must be 1-64 letters, digits, '_' or '-'",
        ));
    }
    let cron = required("cron", body.cron)?.trim().to_owned();
    let timezone = required("timezone", body.timezone)?.trim().to_owned();
    let spec = CronSpec::parse(&cron, &timezone)?;
    let goal = required("goal", body.goal)?;
    if goal.len() > state.runs.max_goal_bytes {
        return Err(Error::invalid(
            "invalid_request",
            format!(
                "goal is {} bytes; the limit is {}",
                goal.len(),
                state.runs.max_goal_bytes
            ),
        ));
    }
    let missed = match body.missed.as_deref() {
        None => Missed::default(),
        Some(value) => Missed::parse(value).ok_or_else(|| {
            Error::invalid(
                "invalid_request",
                format!("missed must be \"skip\" or \"catch_up\", not {value:?}"),
            )
        })?,
    };
    Ok(NewSchedule {
        tenant,
        name,
        cron,
        timezone,
        spec,
        goal,
        missed,
        enabled: body.enabled.unwrap_or(true),
    })
}

async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<CreateSchedule>, JsonRejection>,
) -> Response {
    respond("/v1/schedules", create_inner(&state, &headers, body).await)
}

#[tracing::instrument(skip_all, fields(tenant, schedule_id))]
async fn create_inner(
    state: &ApiState,
    headers: &HeaderMap,
    body: Result<Json<CreateSchedule>, JsonRejection>,
) -> Result<Response, Error> {
    let tenant = tenant(headers, &state.runs)?;
    tracing::Span::current().record("tenant", tenant.as_str());
    let Json(body) = body.map_err(|rejection| match rejection {
        JsonRejection::BytesRejection(_) => Error::TooLarge {
            limit: state.max_body_bytes,
        },
        other => Error::invalid(
            "invalid_json",
            format!("invalid JSON body: {}", other.body_text()),
        ),
    })?;
    let new = validate(state, tenant, body)?;
    let row = state
        .schedules
        .create(&new, state.clock.now(), state.cron.max_per_tenant)
        .await?;
    tracing::Span::current().record("schedule_id", tracing::field::display(row.id));
    tracing::info!(name = %row.name, cron = %row.cron, timezone = %row.timezone, "schedule created");
    Ok((StatusCode::CREATED, Json(ScheduleView::from(row))).into_response())
}

async fn list(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let schedules: Vec<ScheduleView> = state
            .schedules
            .list(&tenant)
            .await?
            .into_iter()
            .map(ScheduleView::from)
            .collect();
        Ok(Json(serde_json::json!({ "schedules": schedules })).into_response())
    };
    respond("/v1/schedules", result.await)
}

async fn read(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let row = state.schedules.get(&tenant, schedule_id(&id)?).await?;
        Ok(Json(ScheduleView::from(row)).into_response())
    };
    respond("/v1/schedules/{id}", result.await)
}

async fn remove(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let id = schedule_id(&id)?;
        state.schedules.delete(&tenant, id).await?;
        tracing::info!(schedule_id = %id, %tenant, "schedule deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    respond("/v1/schedules/{id}", result.await)
}

async fn set_enabled(
    state: &ApiState,
    headers: &HeaderMap,
    id: &str,
    enabled: bool,
) -> Result<Response, Error> {
    let tenant = tenant(headers, &state.runs)?;
    let id = schedule_id(id)?;
    let row = state
        .schedules
        .set_enabled(&tenant, id, enabled, state.clock.now())
        .await?;
    tracing::info!(schedule_id = %id, %tenant, enabled, "schedule updated");
    Ok(Json(ScheduleView::from(row)).into_response())
}

async fn enable(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    respond(
        "/v1/schedules/{id}/enable",
        set_enabled(&state, &headers, &id, true).await,
    )
}

async fn disable(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    respond(
        "/v1/schedules/{id}/disable",
        set_enabled(&state, &headers, &id, false).await,
    )
}

#[derive(Debug, Serialize)]
struct RunNow {
    run_id: Uuid,
    firing: Firing,
    schedule: ScheduleView,
}

async fn run_now(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let tenant = tenant(&headers, &state.runs)?;
        let id = schedule_id(&id)?;
        let (row, firing) = state
            .schedules
            .run_now(&tenant, id, state.clock.now())
            .await?;
        tracing::info!(schedule_id = %id, run_id = %firing.run_id, "schedule run now");
        Ok((
            StatusCode::CREATED,
            Json(RunNow {
                run_id: firing.run_id,
                firing,
                schedule: ScheduleView::from(row),
            }),
        )
            .into_response())
    };
    respond("/v1/schedules/{id}/run-now", result.await)
}
