//! Cron schedules that create runs: five-field expressions read in an IANA time zone, a policy
//! for firings missed during an outage, enable/disable/run-now, and a firing loop that one
//! replica at a time leads.
//!
//! - [`schedule`]: pure logic — validation, next fire time across DST changes, what a tick does
//!   with a due schedule. Takes `now` as a parameter.
//! - [`store`]: the `orchestrator.schedules` and `orchestrator.schedule_firings` tables. A
//!   firing records `(schedule_id, fire_at)` under a primary key, creates the run and moves the
//!   schedule's next fire time, all in one transaction: a firing happens once even if two
//!   replicas both think they lead.
//! - [`leader`]: leadership through a PostgreSQL advisory lock held on a dedicated connection.
//! - [`api`]: the REST routes under `/v1/schedules`.
//! - `colony_runtime::clock`: the time source, so tests move through DST changes and outages without waiting.

pub mod api;
pub mod leader;
pub mod schedule;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use api::{ApiState, routes};
pub use colony_runtime::clock::{Clock, ManualClock, SystemClock};
pub use leader::Leadership;
pub use schedule::{CronSpec, FireKind, Missed, SpecError};
pub use store::{Firing, NewSchedule, ScheduleRow, Schedules, TickReport};

use crate::metrics;

/// The `cron` section of the orchestrator's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CronConfig {
    /// Run the firing loop on this replica. Replicas that run it compete for leadership; only
    /// the leader fires.
    pub enabled: bool,
    /// How often the leader looks for due schedules, and how often the others try to lead.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// A firing made later than this after its time is missed, and follows its schedule's
    /// `missed` policy (`skip` or `catch_up`).
    #[serde(with = "humantime_serde")]
    pub misfire_grace: Duration,
    /// Most firings made in one tick; the rest wait for the next tick.
    pub batch: u32,
    /// Most schedules one tenant may have.
    pub max_per_tenant: u32,
}

impl Default for CronConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tick: Duration::from_secs(1),
            misfire_grace: Duration::from_secs(60),
            batch: 100,
            max_per_tenant: 1000,
        }
    }
}

impl CronConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if self.tick < Duration::from_millis(10) || self.tick > Duration::from_secs(60) {
            problems.push("cron.tick: must be between 10ms and 60s".into());
        }
        if self.misfire_grace < self.tick {
            problems.push("cron.misfire_grace: must be at least cron.tick".into());
        }
        if self.batch == 0 {
            problems.push("cron.batch: must be at least 1".into());
        }
        if self.max_per_tenant == 0 {
            problems.push("cron.max_per_tenant: must be at least 1".into());
        }
    }
}

/// Errors of the schedules API and the firing loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong; the message says how. `reason` labels the rejection metric.
    #[error("{message}")]
    InvalidRequest {
        reason: &'static str,
        message: String,
    },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("schedule {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] crate::Error),
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        Error::Store(crate::Error::Database(error))
    }
}

impl Error {
    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            reason,
            message: message.into(),
        }
    }

    /// A short stable code for clients, the same vocabulary as the runs API.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. } | Error::Spec(_) => "invalid_request",
            Error::TooLarge { .. } => "too_large",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Store(inner) => inner.code(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Store(inner) if inner.is_retryable())
    }

    /// The label under which a refused request is counted, if this is a refusal.
    fn rejected_reason(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { reason, .. } => Some(reason),
            Error::Spec(spec) => Some(spec.reason()),
            Error::TooLarge { .. } => Some("too_large"),
            Error::Store(crate::Error::Overloaded { reason, .. }) => Some(reason),
            Error::NotFound(_) | Error::Conflict(_) | Error::Store(_) => None,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Some(reason) = self.rejected_reason() {
            ::metrics::counter!(metrics::REJECTED_REQUESTS, "reason" => reason).increment(1);
        }
        // Internal details stay in the log: the crate's error answers for itself.
        if let Error::Store(inner) = self {
            return inner.into_response();
        }
        let status = match &self {
            Error::InvalidRequest { .. } | Error::Spec(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        (status, Json(body)).into_response()
    }
}

/// The firing loop of one replica. Every `cron.tick` it makes sure it leads (or tries to take
/// the lead), and the leader fires what is due at `clock.now()`.
pub struct Scheduler {
    schedules: Schedules,
    leadership: Leadership,
    config: CronConfig,
    clock: Arc<dyn Clock>,
}

impl Scheduler {
    pub fn new(schedules: Schedules, config: CronConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            leadership: Leadership::new(schedules.pool()),
            schedules,
            config,
            clock,
        }
    }

    /// Runs until `shutdown` is cancelled, then gives up the lead so another replica takes
    /// over at its next tick.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.config.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = interval.tick() => {}
            }
            let leading = tokio::select! {
                () = shutdown.cancelled() => break,
                leading = self.leadership.check() => leading,
            };
            ::metrics::gauge!(metrics::SCHEDULE_LEADER).set(if leading { 1.0 } else { 0.0 });
            if !leading {
                continue;
            }
            // A tick is short and bounded by `cron.batch`; it runs to the end rather than
            // being cut off mid-transaction (the drain grace period covers it).
            self.tick().await;
        }
        self.leadership.release().await;
        ::metrics::gauge!(metrics::SCHEDULE_LEADER).set(0.0);
    }

    /// Tells, after the loop has started, whether it currently leads (as of its last tick).
    pub fn leader_flag(&self) -> Arc<AtomicBool> {
        self.leadership.flag()
    }

    /// One leader tick at the clock's `now`.
    async fn tick(&self) -> TickReport {
        let now = self.clock.now();
        let report = self
            .schedules
            .fire_due(now, self.config.misfire_grace, self.config.batch)
            .await;
        if let Some(error) = &report.error {
            tracing::warn!(%error, "cron tick failed; retrying at the next tick");
        }
        report
    }
}
