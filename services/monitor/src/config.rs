//! Configuration: defaults → file → `MONITOR__…` environment → overrides, then [`Validate`].

use std::time::Duration;

use colony_bus::BusConfig;
use colony_config::Validate;
use colony_store::DatabaseConfig;
use colony_telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

use crate::alerts::AlertsConfig;
use crate::anomaly::AnomalyConfig;

/// Environment prefix: `MONITOR__WORKER_STALE_AFTER` → `worker_stale_after`.
pub const ENV_PREFIX: &str = "MONITOR";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    /// A worker without a heartbeat for this long is suspect (it missed a couple: busy, a
    /// network blip, or dying). Unset: a third of `worker_stale_after`.
    #[serde(with = "humantime_serde")]
    pub worker_suspect_after: Option<Duration>,
    /// A worker without a heartbeat for this long is dead.
    #[serde(with = "humantime_serde")]
    pub worker_stale_after: Duration,
    /// How often the sweep recounts live workers and looks for dead ones.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Workers not seen for this long are removed from the registry.
    #[serde(with = "humantime_serde")]
    pub worker_retention: Duration,
    /// Events handled at once.
    pub consumer_concurrency: usize,
    /// A task running for longer than this is stale: counted, listed and alerted on (the
    /// monitor never acts on it; the orchestrator's lease reaper does that independently).
    #[serde(with = "humantime_serde")]
    pub stale_task_after: Duration,
    /// A queued or running task without any event for this long is forgotten: its end was
    /// lost (the stream dropped it before the monitor read it).
    #[serde(with = "humantime_serde")]
    pub task_retention: Duration,
    /// Hourly usage rows are kept this long.
    #[serde(with = "humantime_serde")]
    pub usage_retention: Duration,
    /// A usage event redelivered within this long of its first arrival is not counted again.
    #[serde(with = "humantime_serde")]
    pub usage_dedup_window: Duration,
    /// A router's circuit breaker not heard of (no `colony.v1.event.breaker` change) for this
    /// long is forgotten: its router went away, or is idle and refuses nobody. Keep it well
    /// above the routers' `resilience.breaker.open_duration`: a busy router's open breaker
    /// changes once per open duration.
    #[serde(with = "humantime_serde")]
    pub breaker_forget_after: Duration,
    /// The anomaly detector on per-deployment latency and cost.
    pub anomaly: AnomalyConfig,
    /// Alert rules, their webhooks and cooldown.
    pub alerts: AlertsConfig,
    /// How long in-flight events may take to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Status API, `/healthz`, `/readyz`, `/metrics`.
    pub addr: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::default(),
            database: DatabaseConfig::default(),
            bus: BusConfig::default(),
            telemetry: TelemetryConfig::default(),
            // Two missed heartbeats of a worker's default 5-s interval.
            worker_suspect_after: None,
            worker_stale_after: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(5),
            worker_retention: Duration::from_secs(24 * 3600),
            consumer_concurrency: 8,
            stale_task_after: Duration::from_secs(30 * 60),
            task_retention: Duration::from_secs(7 * 24 * 3600),
            usage_retention: Duration::from_secs(90 * 24 * 3600),
            usage_dedup_window: Duration::from_secs(24 * 3600),
            breaker_forget_after: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(10),
            anomaly: AnomalyConfig::default(),
            alerts: AlertsConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:8084".into(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        colony_config::check_socket_addr(problems, "http.addr", &self.http.addr);
        self.database.validate(problems);
        self.bus.validate(problems);
        self.telemetry.validate(problems);
        if self.worker_stale_after < Duration::from_millis(100) {
            problems.push("worker_stale_after: must be at least 100ms".into());
        }
        if let Some(suspect_after) = self.worker_suspect_after
            && (suspect_after.is_zero() || suspect_after >= self.worker_stale_after)
        {
            problems
                .push("worker_suspect_after: must be above 0 and below worker_stale_after".into());
        }
        self.anomaly.validate(problems);
        self.alerts.validate(problems);
        if self.sweep_interval < Duration::from_millis(10) {
            problems.push("sweep_interval: must be at least 10ms".into());
        }
        if self.worker_retention < self.worker_stale_after {
            problems.push(
                "worker_retention: must be at least worker_stale_after, or live workers would be \
                 removed"
                    .into(),
            );
        }
        if self.stale_task_after.is_zero() {
            problems.push("stale_task_after: must be more than 0s".into());
        }
        if self.task_retention < crate::tasks::ENDED_RETENTION
            || self.task_retention <= self.stale_task_after
        {
            problems.push(
                "task_retention: must be at least 1h and longer than stale_task_after, or stuck \
                 tasks would be forgotten before they are reported"
                    .into(),
            );
        }
        if self.usage_retention < Duration::from_secs(3600) {
            problems.push("usage_retention: must be at least 1h (usage is kept per hour)".into());
        }
        if self.usage_dedup_window < Duration::from_secs(60) {
            problems.push(
                "usage_dedup_window: must be at least 1m, longer than a redelivery takes".into(),
            );
        }
        if self.breaker_forget_after < Duration::from_secs(60) {
            problems.push(
                "breaker_forget_after: must be at least 1m, longer than a breaker's open duration"
                    .into(),
            );
        }
        if self.consumer_concurrency == 0 {
            problems.push("consumer_concurrency: must be at least 1".into());
        }
        if self.shutdown_grace.is_zero() {
            problems.push("shutdown_grace: must be more than 0s".into());
        }
    }
}

impl Config {
    /// When a silent worker turns suspect: `worker_suspect_after`, or a third of
    /// `worker_stale_after` (10 s of the default 30 s: two missed heartbeats of a worker's
    /// default 5-s interval).
    pub fn suspect_after(&self) -> Duration {
        self.worker_suspect_after
            .unwrap_or(self.worker_stale_after / 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_config::Sources;

    fn load(env: &[(&str, &str)]) -> Result<Config, colony_config::Error> {
        let sources = Sources::from_env_pairs(env);
        colony_config::load(ENV_PREFIX, &sources)
    }

    #[test]
    fn defaults_are_valid() {
        let config = load(&[]).expect("defaults load");
        assert_eq!(config.http.addr, "0.0.0.0:8084");
        assert_eq!(config.worker_stale_after, Duration::from_secs(30));
        assert_eq!(config.stale_task_after, Duration::from_secs(1800));
        assert_eq!(config.usage_retention, Duration::from_secs(90 * 24 * 3600));
        assert_eq!(config.breaker_forget_after, Duration::from_secs(600));
        let rules: Vec<&str> = config
            .alerts
            .rules
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert!(
            rules.ends_with(&["breakers-open", "event-lag", "outbox-lag"]),
            "{rules:?}"
        );
    }

    #[test]
    fn environment_sets_durations() {
        let config = load(&[
            ("MONITOR__WORKER_STALE_AFTER", "2s"),
            ("MONITOR__SWEEP_INTERVAL", "250ms"),
            ("MONITOR__HTTP__ADDR", "127.0.0.1:0"),
        ])
        .expect("the environment loads");
        assert_eq!(config.worker_stale_after, Duration::from_secs(2));
        assert_eq!(config.suspect_after(), Duration::from_secs(2) / 3);
        assert_eq!(config.sweep_interval, Duration::from_millis(250));
        assert_eq!(config.http.addr, "127.0.0.1:0");
    }

    #[test]
    fn bad_values_are_all_reported() {
        let error = load(&[
            ("MONITOR__SWEEP_INTERVAL", "1ms"),
            ("MONITOR__WORKER_RETENTION", "10s"),
            ("MONITOR__CONSUMER_CONCURRENCY", "0"),
            ("MONITOR__WORKER_SUSPECT_AFTER", "30s"),
            ("MONITOR__STALE_TASK_AFTER", "2h"),
            ("MONITOR__TASK_RETENTION", "90m"),
            ("MONITOR__USAGE_RETENTION", "10m"),
            ("MONITOR__USAGE_DEDUP_WINDOW", "1s"),
            ("MONITOR__BREAKER_FORGET_AFTER", "30s"),
        ])
        .expect_err("bad values fail");
        let text = error.to_string();
        for key in [
            "sweep_interval",
            "worker_retention",
            "consumer_concurrency",
            "worker_suspect_after",
            "task_retention",
            "usage_retention",
            "usage_dedup_window",
            "breaker_forget_after",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
        let unknown = load(&[("MONITOR__GRPC__ADDR", "127.0.0.1:1")]).expect_err("no grpc section");
        assert!(unknown.to_string().contains("grpc"), "{unknown}");
    }
}
