//! Alert rules from the configuration, evaluated every `alerts.evaluate_interval` on what the
//! monitor knows: its worker registry, its view of queued and running tasks, the routers'
//! circuit breakers, and the task, usage, anomaly and event-lag samples of a recent window. A rule whose value goes above its threshold fires — one firing alert per rule, kept
//! in `monitor.alerts` — and resolves when the value is back; both are posted to every webhook
//! with retries. A rule that resolved does not fire again within `alerts.cooldown`.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::breakers::Breakers;
use crate::metrics;
use crate::store::{Liveness, Store};
use crate::tasks::{self, TaskSummary};

/// `alerts.*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often every rule is evaluated.
    #[serde(with = "humantime_serde")]
    pub evaluate_interval: Duration,
    /// A rule that resolved fires again only after this long: a flapping value notifies once.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Where firing and resolved alerts are posted (JSON).
    pub webhooks: Vec<String>,
    /// Deadline of one post.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Posts of one notification at most, the first included.
    pub webhook_attempts: u32,
    /// Wait before the first retry, doubled after each.
    #[serde(with = "humantime_serde")]
    pub webhook_backoff: Duration,
    /// The services' outbox tables (`schema.table`) the `outbox_lag_seconds` kind reads.
    pub outbox_tables: Vec<String>,
    pub rules: Vec<AlertRule>,
}

/// `[[alerts.rules]]`: fires while the value of `kind` over `window` is above `threshold`.
/// `queue_depth`, `queue_age_seconds`, `stale_tasks`, `open_breakers` and
/// `outbox_lag_seconds` measure what is now and ignore `window`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub name: String,
    pub kind: RuleKind,
    pub threshold: f64,
    #[serde(with = "humantime_serde", default = "default_window")]
    pub window: Duration,
    /// `task_error_rate` only: finished tasks the window must hold before it is judged.
    #[serde(default = "default_min_events")]
    pub min_events: u64,
}

fn default_window() -> Duration {
    Duration::from_secs(600)
}

fn default_min_events() -> u64 {
    10
}

/// What a rule measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Workers that died (went silent past `worker_stale_after`) within the window.
    DeadWorkers,
    /// Failed tasks / finished tasks (succeeded or failed) in the window.
    TaskErrorRate,
    /// Model spend in the window, as US dollars per hour.
    BudgetBurnUsdPerHour,
    /// Anomalous model calls (latency or cost) in the window.
    Anomalies,
    /// Tasks queued now.
    QueueDepth,
    /// How long the oldest queued task has waited, in seconds.
    QueueAgeSeconds,
    /// Tasks running for longer than `stale_task_after` now.
    StaleTasks,
    /// Routers' circuit breakers open or half-open now, one per (router replica, deployment).
    OpenBreakers,
    /// The largest lag of an event (from its own time to JetStream storing it) in the window,
    /// in seconds.
    EventLagSeconds,
    /// How long the oldest row of any of `alerts.outbox_tables` has waited now, in seconds:
    /// unlike event lag, it sees an outbox whose relay sends nothing at all.
    OutboxLagSeconds,
}

impl RuleKind {
    fn as_str(self) -> &'static str {
        match self {
            RuleKind::DeadWorkers => "dead_workers",
            RuleKind::TaskErrorRate => "task_error_rate",
            RuleKind::BudgetBurnUsdPerHour => "budget_burn_usd_per_hour",
            RuleKind::Anomalies => "anomalies",
            RuleKind::QueueDepth => "queue_depth",
            RuleKind::QueueAgeSeconds => "queue_age_seconds",
            RuleKind::StaleTasks => "stale_tasks",
            RuleKind::OpenBreakers => "open_breakers",
            RuleKind::EventLagSeconds => "event_lag_seconds",
            RuleKind::OutboxLagSeconds => "outbox_lag_seconds",
        }
    }

    /// Measured as things are now, not over the rule's window.
    fn is_instant(self) -> bool {
        matches!(
            self,
            RuleKind::QueueDepth
                | RuleKind::QueueAgeSeconds
                | RuleKind::StaleTasks
                | RuleKind::OpenBreakers
                | RuleKind::OutboxLagSeconds
        )
    }
}

fn rule(name: &str, kind: RuleKind, threshold: f64, window_secs: u64) -> AlertRule {
    AlertRule {
        name: name.into(),
        kind,
        threshold,
        window: Duration::from_secs(window_secs),
        min_events: default_min_events(),
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            evaluate_interval: Duration::from_secs(15),
            cooldown: Duration::from_secs(300),
            webhooks: Vec::new(),
            webhook_timeout: Duration::from_secs(5),
            webhook_attempts: 5,
            webhook_backoff: Duration::from_secs(1),
            outbox_tables: vec!["orchestrator.outbox".into(), "router.outbox".into()],
            rules: vec![
                rule("workers-died", RuleKind::DeadWorkers, 0.0, 900),
                rule("task-error-rate", RuleKind::TaskErrorRate, 0.2, 600),
                rule("budget-burn", RuleKind::BudgetBurnUsdPerHour, 50.0, 900),
                rule("model-anomalies", RuleKind::Anomalies, 3.0, 600),
                // As deploy/prometheus/alerts.yml judges the orchestrator's own queue gauges.
                rule("queue-depth", RuleKind::QueueDepth, 1000.0, 600),
                rule("queue-age", RuleKind::QueueAgeSeconds, 600.0, 600),
                rule("tasks-stale", RuleKind::StaleTasks, 0.0, 600),
                // Like ColonyBreakerOpen in deploy/prometheus/alerts.yml (without its 10-min `for`),
                // from the routers' events.
                rule("breakers-open", RuleKind::OpenBreakers, 0.0, 600),
                // Events a minute late; a fully stuck outbox sends none at all, which
                // outbox-lag catches, as ColonyOutboxLag does from colony_outbox_lag_seconds.
                rule("event-lag", RuleKind::EventLagSeconds, 60.0, 600),
                rule("outbox-lag", RuleKind::OutboxLagSeconds, 60.0, 600),
            ],
        }
    }
}

/// Events older than this are forgotten, whatever the rules' windows.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl AlertsConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if self.evaluate_interval < Duration::from_millis(10) {
            problems.push("alerts.evaluate_interval: must be at least 10ms".into());
        }
        if self.webhook_attempts == 0 || self.webhook_timeout.is_zero() {
            problems
                .push("alerts.webhook_attempts, alerts.webhook_timeout: must be above 0".into());
        }
        for webhook in &self.webhooks {
            if !(webhook.starts_with("http://") || webhook.starts_with("https://")) {
                problems.push(format!(
                    "alerts.webhooks: {webhook:?} is not an http(s) URL"
                ));
            }
        }
        for table in &self.outbox_tables {
            if !colony_bus::outbox::is_table_name(table) {
                problems.push(format!(
                    "alerts.outbox_tables: {table:?} is not a table as schema.table \
                     (lower-case letters, digits and _)"
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for rule in &self.rules {
            if rule.name.trim().is_empty() || !names.insert(rule.name.as_str()) {
                problems.push(format!(
                    "alerts.rules: {:?} must be a non-empty name used once",
                    rule.name
                ));
            }
            if !rule.threshold.is_finite() {
                problems.push(format!(
                    "alerts.rules.{}.threshold: must be a number",
                    rule.name
                ));
            }
            if rule.window.is_zero() || rule.window > MAX_WINDOW {
                problems.push(format!(
                    "alerts.rules.{}.window: must be above 0 and at most 24h",
                    rule.name
                ));
            }
        }
    }
}

/// What happened recently that rules measure, kept for the longest window.
#[derive(Debug)]
enum Sample {
    TaskFinished { failed: bool },
    CostMicrosUsd(u64),
    Anomaly,
}

/// The recent task outcomes, spend, anomalies and event lags this process consumed.
#[derive(Debug, Default)]
pub struct Recent {
    samples: Mutex<VecDeque<(Instant, Sample)>>,
    /// The largest event lag (seconds) of each second that saw events, oldest first: every
    /// event has a lag, so one sample per event would grow with the event rate.
    lags: Mutex<VecDeque<(Instant, f64)>>,
}

/// Event lags within this long of a bucket's first one share its bucket.
const LAG_BUCKET: Duration = Duration::from_secs(1);

impl Recent {
    fn push(&self, sample: Sample) {
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > MAX_WINDOW)
        {
            samples.pop_front();
        }
        samples.push_back((now, sample));
    }

    pub fn task_finished(&self, failed: bool) {
        self.push(Sample::TaskFinished { failed });
    }

    pub fn cost(&self, micros_usd: u64) {
        if micros_usd > 0 {
            self.push(Sample::CostMicrosUsd(micros_usd));
        }
    }

    pub fn anomaly(&self) {
        self.push(Sample::Anomaly);
    }

    /// An event arrived `seconds` late (negative is taken as 0: clock skew).
    pub fn event_lag(&self, seconds: f64) {
        self.event_lag_at(seconds, Instant::now());
    }

    fn event_lag_at(&self, seconds: f64, now: Instant) {
        if seconds.is_nan() {
            return;
        }
        let seconds = seconds.max(0.0);
        let mut lags = self.lags.lock().unwrap_or_else(PoisonError::into_inner);
        while lags
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > MAX_WINDOW)
        {
            lags.pop_front();
        }
        match lags.back_mut() {
            Some((at, largest)) if now.saturating_duration_since(*at) < LAG_BUCKET => {
                *largest = largest.max(seconds);
            }
            _ => lags.push_back((now, seconds)),
        }
    }

    /// The largest event lag within `window`, in seconds; 0 without events.
    pub fn largest_lag(&self, window: Duration) -> f64 {
        self.largest_lag_at(window, Instant::now())
    }

    fn largest_lag_at(&self, window: Duration, now: Instant) -> f64 {
        let lags = self.lags.lock().unwrap_or_else(PoisonError::into_inner);
        lags.iter()
            .rev()
            .take_while(|(at, _)| now.saturating_duration_since(*at) <= window)
            .map(|(_, lag)| *lag)
            .fold(0.0, f64::max)
    }

    /// `(finished, failed, cost micro-USD, anomalies)` within `window`.
    fn within(&self, window: Duration) -> (u64, u64, u64, u64) {
        let now = Instant::now();
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let mut totals = (0, 0, 0, 0);
        for (_, sample) in samples
            .iter()
            .rev()
            .take_while(|(at, _)| now.duration_since(*at) <= window)
        {
            match sample {
                Sample::TaskFinished { failed } => {
                    totals.0 += 1;
                    totals.1 += u64::from(*failed);
                }
                Sample::CostMicrosUsd(micros) => totals.2 += micros,
                Sample::Anomaly => totals.3 += 1,
            }
        }
        totals
    }
}

/// One alert as the status API and the webhooks show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub id: i64,
    pub rule: String,
    pub state: String,
    pub threshold: f64,
    pub fired_value: f64,
    pub last_value: f64,
    pub summary: String,
    pub fired_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

const ALERT_COLUMNS: &str =
    "id, rule, state, threshold, fired_value, last_value, summary, fired_at, resolved_at";

fn alert_from(row: &sqlx::postgres::PgRow) -> Result<Alert, sqlx::Error> {
    Ok(Alert {
        id: row.try_get("id")?,
        rule: row.try_get("rule")?,
        state: row.try_get("state")?,
        threshold: row.try_get("threshold")?,
        fired_value: row.try_get("fired_value")?,
        last_value: row.try_get("last_value")?,
        summary: row.try_get("summary")?,
        fired_at: row.try_get("fired_at")?,
        resolved_at: row.try_get("resolved_at")?,
    })
}

/// Firing alerts first, then the most recently fired; at most `limit`.
pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<Alert>, Error> {
    let rows = sqlx::query(&format!(
        "SELECT {ALERT_COLUMNS} FROM monitor.alerts \
         ORDER BY state = 'firing' DESC, fired_at DESC, id DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(alert_from)
        .collect::<Result<_, sqlx::Error>>()?)
}

/// What a rule's value is measured over, for its alert's summary.
fn scope(rule: &AlertRule, stale_task_after: Duration) -> String {
    let format = humantime_serde::re::humantime::format_duration;
    match rule.kind {
        RuleKind::StaleTasks => format!("running longer than {}", format(stale_task_after)),
        kind if kind.is_instant() => "now".into(),
        _ => format!("over {}", format(rule.window)),
    }
}

/// Evaluates the rules and notifies the webhooks.
pub struct Alerter {
    pub config: AlertsConfig,
    pub store: Store,
    pub liveness: Liveness,
    /// The routers' breakers (`open_breakers`).
    pub breakers: std::sync::Arc<Breakers>,
    /// When a running task is stale (`stale_tasks`).
    pub stale_task_after: Duration,
    pub http: reqwest::Client,
}

/// The task view, read at most once per evaluation round whatever the number of task rules.
#[derive(Default)]
struct TaskView(Option<TaskSummary>);

impl TaskView {
    async fn get(&mut self, alerter: &Alerter) -> Result<TaskSummary, Error> {
        if let Some(summary) = self.0 {
            return Ok(summary);
        }
        let summary = tasks::summary(alerter.store.pool(), alerter.stale_task_after).await?;
        self.0 = Some(summary);
        Ok(summary)
    }
}

impl Alerter {
    /// Evaluates every rule each `evaluate_interval` until `shutdown`; notifications are
    /// delivered on `tracker`, so shutdown waits for them (their retries stop at shutdown).
    pub async fn run(
        self,
        recent: std::sync::Arc<Recent>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let alerter = std::sync::Arc::new(self);
        let mut ticker = tokio::time::interval(alerter.config.evaluate_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let mut task_view = TaskView::default();
            for rule in &alerter.config.rules {
                match alerter.evaluate(rule, &recent, &mut task_view).await {
                    Ok(Some((alert, event))) => {
                        for webhook in &alerter.config.webhooks {
                            tracker.spawn(alerter.clone().deliver(
                                webhook.clone(),
                                alert.clone(),
                                event,
                                shutdown.clone(),
                            ));
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        ::metrics::counter!(
                            metrics::ALERT_EVALUATION_FAILURES,
                            "rule" => rule.name.clone()
                        )
                        .increment(1);
                        tracing::warn!(%error, rule = %rule.name, "alert rule not evaluated");
                    }
                }
            }
        }
    }

    /// The rule's value now.
    async fn value(
        &self,
        rule: &AlertRule,
        recent: &Recent,
        task_view: &mut TaskView,
    ) -> Result<f64, Error> {
        let (finished, failed, cost, anomalies) = recent.within(rule.window);
        // Counts far below 2^52: exact as f64.
        #[expect(clippy::cast_precision_loss, reason = "event counts far below 2^52")]
        Ok(match rule.kind {
            RuleKind::DeadWorkers => {
                self.store
                    .recently_dead(self.liveness.dead_after, rule.window)
                    .await? as f64
            }
            RuleKind::TaskErrorRate if finished < rule.min_events.max(1) => 0.0,
            RuleKind::TaskErrorRate => failed as f64 / finished as f64,
            RuleKind::BudgetBurnUsdPerHour => {
                cost as f64 / 1e6 * 3600.0 / rule.window.as_secs_f64()
            }
            RuleKind::Anomalies => anomalies as f64,
            RuleKind::QueueDepth => task_view.get(self).await?.queued as f64,
            RuleKind::QueueAgeSeconds => task_view.get(self).await?.queue_oldest_age_seconds,
            RuleKind::StaleTasks => task_view.get(self).await?.stale as f64,
            RuleKind::OpenBreakers => self.breakers.open().len() as f64,
            RuleKind::EventLagSeconds => recent.largest_lag(rule.window),
            RuleKind::OutboxLagSeconds => {
                let mut oldest: f64 = 0.0;
                for table in &self.config.outbox_tables {
                    // A missing table fails the rule with PostgreSQL's "relation ... does not
                    // exist", which names it.
                    let age =
                        colony_bus::outbox::oldest_age_seconds(self.store.pool(), table).await?;
                    oldest = oldest.max(age);
                }
                oldest
            }
        })
    }

    /// Moves the rule's alert on: fired (when above the threshold, not firing yet and out of
    /// cooldown), kept, or resolved. Returns the alert and the event to notify, if any.
    async fn evaluate(
        &self,
        rule: &AlertRule,
        recent: &Recent,
        task_view: &mut TaskView,
    ) -> Result<Option<(Alert, &'static str)>, Error> {
        let value = self.value(rule, recent, task_view).await?;
        let above = value > rule.threshold;
        ::metrics::gauge!(metrics::ALERTS_FIRING, "rule" => rule.name.clone()).set(if above {
            1.0
        } else {
            0.0
        });
        let pool = self.store.pool();
        if above {
            let kept = sqlx::query(
                "UPDATE monitor.alerts SET last_value = $2 WHERE rule = $1 AND state = 'firing'",
            )
            .bind(&rule.name)
            .bind(value)
            .execute(pool)
            .await?;
            if kept.rows_affected() > 0 {
                return Ok(None);
            }
            let resolved_lately: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM monitor.alerts WHERE rule = $1 \
                   AND resolved_at > now() - make_interval(secs => $2))",
            )
            .bind(&rule.name)
            .bind(self.config.cooldown.as_secs_f64())
            .fetch_one(pool)
            .await?;
            if resolved_lately {
                ::metrics::counter!(metrics::ALERTS_SUPPRESSED, "rule" => rule.name.clone())
                    .increment(1);
                return Ok(None);
            }
            let summary = format!(
                "{}: {} is {value:.3}, above {} ({})",
                rule.name,
                rule.kind.as_str(),
                rule.threshold,
                scope(rule, self.stale_task_after)
            );
            // Another replica may have fired it meanwhile: then theirs stands.
            let fired = sqlx::query(&format!(
                "INSERT INTO monitor.alerts (rule, state, threshold, fired_value, last_value, summary) \
                 VALUES ($1, 'firing', $2, $3, $3, $4) \
                 ON CONFLICT (rule) WHERE state = 'firing' DO NOTHING RETURNING {ALERT_COLUMNS}"
            ))
            .bind(&rule.name)
            .bind(rule.threshold)
            .bind(value)
            .bind(&summary)
            .fetch_optional(pool)
            .await?;
            let Some(row) = fired else { return Ok(None) };
            tracing::warn!(rule = %rule.name, value, threshold = rule.threshold, "alert firing");
            return Ok(Some((alert_from(&row)?, "firing")));
        }
        let resolved = sqlx::query(&format!(
            "UPDATE monitor.alerts SET state = 'resolved', resolved_at = now(), last_value = $2 \
             WHERE rule = $1 AND state = 'firing' RETURNING {ALERT_COLUMNS}"
        ))
        .bind(&rule.name)
        .bind(value)
        .fetch_optional(pool)
        .await?;
        let Some(row) = resolved else { return Ok(None) };
        tracing::info!(rule = %rule.name, value, "alert resolved");
        Ok(Some((alert_from(&row)?, "resolved")))
    }

    /// Posts `alert`'s `event` to `webhook` until it answers 2xx, at most `webhook_attempts`
    /// times with doubling waits; every attempt is recorded in `monitor.alert_deliveries`.
    async fn deliver(
        self: std::sync::Arc<Self>,
        webhook: String,
        alert: Alert,
        event: &'static str,
        shutdown: CancellationToken,
    ) {
        let body = serde_json::json!({ "event": event, "alert": alert });
        let mut delay = self.config.webhook_backoff;
        for attempt in 1..=self.config.webhook_attempts {
            let posted = self
                .http
                .post(&webhook)
                .timeout(self.config.webhook_timeout)
                .json(&body)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            let error = posted.err().map(|error| error.to_string());
            if let Err(record) = self
                .record_delivery(alert.id, event, &webhook, attempt, error.as_deref())
                .await
            {
                tracing::warn!(error = %record, "alert delivery not recorded");
            }
            let Some(error) = error else {
                ::metrics::counter!(metrics::ALERT_NOTIFICATIONS, "result" => "delivered")
                    .increment(1);
                return;
            };
            tracing::warn!(%error, %webhook, attempt, rule = %alert.rule, event, "alert webhook failed");
            if attempt == self.config.webhook_attempts {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            delay = delay.saturating_mul(2);
        }
        ::metrics::counter!(metrics::ALERT_NOTIFICATIONS, "result" => "failed").increment(1);
    }

    async fn record_delivery(
        &self,
        alert_id: i64,
        event: &str,
        webhook: &str,
        attempts: u32,
        error: Option<&str>,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO monitor.alert_deliveries \
               (alert_id, event, webhook, attempts, delivered_at, last_error) \
             VALUES ($1, $2, $3, $4, CASE WHEN $5::text IS NULL THEN now() END, $5) \
             ON CONFLICT (alert_id, event, webhook) DO UPDATE SET \
               attempts = EXCLUDED.attempts, delivered_at = EXCLUDED.delivered_at, \
               last_error = EXCLUDED.last_error",
        )
        .bind(alert_id)
        .bind(event)
        .bind(webhook)
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .bind(error)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_what_happened_within_them() {
        let recent = Recent::default();
        recent.task_finished(true);
        recent.task_finished(false);
        recent.cost(250_000);
        recent.cost(0);
        recent.anomaly();
        assert_eq!(recent.within(Duration::from_secs(60)), (2, 1, 250_000, 1));
        assert_eq!(recent.within(Duration::ZERO), (0, 0, 0, 0));
    }

    #[test]
    fn the_largest_lag_of_a_window_counts_in_bounded_buckets() {
        let recent = Recent::default();
        let start = Instant::now();
        recent.event_lag_at(2.0, start);
        recent.event_lag_at(-5.0, start);
        recent.event_lag_at(f64::NAN, start);
        recent.event_lag_at(7.5, start + Duration::from_millis(500));
        recent.event_lag_at(1.0, start + Duration::from_secs(30));
        // Within a second of each other, the lags share a bucket.
        assert_eq!(recent.lags.lock().map(|lags| lags.len()).ok(), Some(2));
        let later = start + Duration::from_secs(40);
        assert!((recent.largest_lag_at(Duration::from_secs(60), later) - 7.5).abs() < 1e-9);
        assert!((recent.largest_lag_at(Duration::from_secs(20), later) - 1.0).abs() < 1e-9);
        assert!(recent.largest_lag_at(Duration::from_secs(5), later).abs() < f64::EPSILON);
        // Negative lags count as 0, never below.
        let skewed = Recent::default();
        skewed.event_lag_at(-3.0, start);
        assert!(skewed.largest_lag_at(Duration::from_secs(60), start).abs() < f64::EPSILON);
    }

    #[test]
    fn task_rules_parse_and_say_what_they_measure() {
        let parsed: Result<Vec<AlertRule>, _> = serde_json::from_value(serde_json::json!([
            {"name": "deep", "kind": "queue_depth", "threshold": 100.0},
            {"name": "old", "kind": "queue_age_seconds", "threshold": 300.0},
            {"name": "stuck", "kind": "stale_tasks", "threshold": 0.0, "window": "1m"},
            {"name": "open", "kind": "open_breakers", "threshold": 0.0},
            {"name": "late", "kind": "event_lag_seconds", "threshold": 60.0, "window": "10m"},
            {"name": "held", "kind": "outbox_lag_seconds", "threshold": 60.0},
        ]));
        let rules = parsed.expect("the task rule kinds parse");
        let kinds: Vec<RuleKind> = rules.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                RuleKind::QueueDepth,
                RuleKind::QueueAgeSeconds,
                RuleKind::StaleTasks,
                RuleKind::OpenBreakers,
                RuleKind::EventLagSeconds,
                RuleKind::OutboxLagSeconds,
            ]
        );
        let stale_after = Duration::from_secs(1800);
        assert_eq!(scope(&rules[0], stale_after), "now");
        assert_eq!(scope(&rules[2], stale_after), "running longer than 30m");
        assert_eq!(scope(&rules[3], stale_after), "now");
        assert_eq!(scope(&rules[4], stale_after), "over 10m");
        assert_eq!(scope(&rules[5], stale_after), "now");
        let windowed = rule("burn", RuleKind::BudgetBurnUsdPerHour, 1.0, 900);
        assert_eq!(scope(&windowed, stale_after), "over 15m");
        let unknown: Result<AlertRule, _> = serde_json::from_value(
            serde_json::json!({"name": "x", "kind": "queue_length", "threshold": 1.0}),
        );
        assert!(unknown.is_err());
    }

    #[test]
    fn defaults_are_valid_and_bad_rules_are_named() {
        let mut problems = Vec::new();
        AlertsConfig::default().validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let config = AlertsConfig {
            webhooks: vec!["ftp://example".into()],
            outbox_tables: vec!["outbox; DROP TABLE monitor.alerts".into()],
            rules: vec![
                rule("twice", RuleKind::Anomalies, 1.0, 60),
                rule("twice", RuleKind::DeadWorkers, f64::NAN, 0),
            ],
            ..AlertsConfig::default()
        };
        config.validate(&mut problems);
        let text = problems.join("\n");
        for expected in [
            "alerts.webhooks: \"ftp://example\"",
            "alerts.outbox_tables: \"outbox; DROP TABLE monitor.alerts\" is not a table",
            "alerts.rules: \"twice\" must be a non-empty name used once",
            "alerts.rules.twice.threshold",
            "alerts.rules.twice.window",
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
    }
}
