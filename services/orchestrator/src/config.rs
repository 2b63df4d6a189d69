//! Orchestrator configuration: defaults → file → `ORCHESTRATOR__…` environment.

use std::time::Duration;

use colony_bus::BusConfig;
use colony_store::DatabaseConfig;
use colony_telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

pub use crate::retry::{RetryConfig, RetryPolicy};

pub const ENV_PREFIX: &str = "ORCHESTRATOR";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub database: DatabaseConfig,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    pub runs: RunsConfig,
    pub leases: LeaseConfig,
    /// Cron schedules: the firing loop and its leadership (`cron.tick`, `cron.misfire_grace`, …).
    pub cron: crate::cron::CronConfig,
    /// Retry policy per error class (`retries.<class>.{max_attempts, backoff_base, …}`).
    pub retries: RetryConfig,
    /// Roles, model profiles, the topology dial, plan bounds and template plans.
    pub roster: crate::roster::RosterConfig,
    /// The human approval gate (`approvals.spend_threshold_usd`; roles also carry
    /// `requires_approval`).
    pub approvals: crate::approval::ApprovalsConfig,
    /// Bounds on tasks spawned by running tasks (`spawn.max_children_per_task`,
    /// `spawn.max_depth`).
    pub spawn: crate::approval::SpawnConfig,
    /// Flow control: per-tenant in-flight, queue and run-rate limits, the overflow policy
    /// (`limits.max_in_flight_per_tenant`, `limits.overflow`, …).
    pub limits: crate::flow::LimitsConfig,
    /// How long in-flight work may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The REST API plus `/healthz`, `/readyz`, `/metrics`.
    pub addr: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub addr: String,
}

/// How a goal becomes a run; the roster (`roster.*`) says which tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunsConfig {
    /// Largest goal, in bytes.
    pub max_goal_bytes: usize,
    /// Deprecated (use `roster.templates.monolith`): when set, a monolith run (and a cron
    /// run) is one task of this role with the goal as its instructions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Deprecated (use `roster.roles.<role>.prompt`): when set, replaces the prompt of the
    /// monolith role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// How a run's failed task affects the rest when the request does not say.
    pub failure_policy: FailurePolicy,
    /// Model tier asked of the router; empty for the router's default.
    pub tier: String,
    pub max_tokens: u32,
    /// Tenant of requests without an `X-Colony-Tenant` header.
    pub default_tenant: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How long a claim lasts without a heartbeat.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How often the reaper looks for expired leases.
    #[serde(with = "humantime_serde")]
    pub reap_interval: Duration,
    /// Deprecated and ignored: an expired lease counts as a transient failure, so
    /// `retries.transient` decides. Still accepted so that existing files keep loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// An attempt still unclaimed this long after its dispatch is dispatched again.
    #[serde(with = "humantime_serde")]
    pub redispatch_after: Duration,
}

/// What a dead-lettered task does to the rest of its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// The run fails at once; its tasks that have not started are cancelled.
    #[default]
    FailFast,
    /// Independent branches go on; the failed task's dependents are skipped; the run fails
    /// once nothing is left to run.
    Continue,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::FailFast => "fail_fast",
            FailurePolicy::Continue => "continue",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "fail_fast" => Some(FailurePolicy::FailFast),
            "continue" => Some(FailurePolicy::Continue),
            _ => None,
        }
    }
}

impl RunsConfig {
    /// The role of single-task runs (cron; [`crate::store::NewRun`] from the API's monolith).
    /// Set by [`Config::migrated`] from the monolith template when the file does not say.
    pub fn role(&self) -> &str {
        self.role.as_deref().unwrap_or("generalist")
    }
}

impl Config {
    /// Folds the deprecated `runs.role` / `runs.system_prompt` into the roster: the monolith
    /// template becomes one task of `runs.role`, whose prompt becomes `runs.system_prompt`.
    /// Afterwards `runs.role` always names the monolith role.
    pub fn migrated(mut self) -> Self {
        if let Some(role) = self.runs.role.clone() {
            self.roster.templates.monolith = vec![crate::plan::PlannedTask {
                id: "answer".into(),
                role,
                instructions: crate::roster::GOAL_PLACEHOLDER.into(),
                depends_on: Vec::new(),
            }];
        }
        let monolith_role = self
            .roster
            .templates
            .monolith
            .first()
            .map(|task| task.role.clone())
            .unwrap_or_else(|| "generalist".into());
        if let Some(prompt) = self.runs.system_prompt.take() {
            self.roster
                .roles
                .entry(monolith_role.clone())
                .or_default()
                .prompt = prompt;
        }
        self.runs.role = Some(monolith_role);
        self
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            database: DatabaseConfig::default(),
            bus: BusConfig::default(),
            telemetry: TelemetryConfig::default(),
            runs: RunsConfig::default(),
            leases: LeaseConfig::default(),
            cron: crate::cron::CronConfig::default(),
            retries: RetryConfig::default(),
            roster: crate::roster::RosterConfig::default(),
            approvals: crate::approval::ApprovalsConfig::default(),
            spawn: crate::approval::SpawnConfig::default(),
            limits: crate::flow::LimitsConfig::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:8080".into(),
            max_body_bytes: 1 << 20,
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:50051".into(),
        }
    }
}

impl Default for RunsConfig {
    fn default() -> Self {
        Self {
            max_goal_bytes: 64 * 1024,
            role: None,
            system_prompt: None,
            failure_policy: FailurePolicy::FailFast,
            tier: String::new(),
            max_tokens: 512,
            default_tenant: "default".into(),
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(30),
            reap_interval: Duration::from_secs(1),
            max_attempts: None,
            redispatch_after: Duration::from_secs(60),
        }
    }
}

/// A tenant or role name: what may appear in a subject token and a label.
pub fn is_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl colony_config::Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        colony_config::check_socket_addr(problems, "http.addr", &self.http.addr);
        colony_config::check_socket_addr(problems, "grpc.addr", &self.grpc.addr);
        self.database.validate(problems);
        self.bus.validate(problems);
        self.telemetry.validate(problems);
        self.cron.validate(problems);
        if let Some(role) = &self.runs.role {
            if !is_name(role) {
                problems.push(format!(
                    "runs.role: {role:?} must be 1-64 letters, digits, '_' or '-'"
                ));
            } else if !self.roster.roles.contains_key(role) {
                problems.push(format!("runs.role: {role:?} is not a role of the roster"));
            }
        }
        self.roster.validate(problems);
        let tier = &self.runs.tier;
        if self.roster.profile(tier).is_none() {
            problems.push(format!(
                "roster.models: no capability profile for the default tier {:?} (runs.tier; an empty tier is {:?})",
                tier,
                crate::roster::DEFAULT_TIER
            ));
        }
        if !is_name(&self.runs.default_tenant) {
            problems.push(format!(
                "runs.default_tenant: {:?} must be 1-64 letters, digits, '_' or '-'",
                self.runs.default_tenant
            ));
        }
        if self.runs.max_goal_bytes == 0 || self.runs.max_goal_bytes > self.http.max_body_bytes {
            problems.push("runs.max_goal_bytes: must be between 1 and http.max_body_bytes".into());
        }
        if self.leases.duration < Duration::from_secs(1) {
            problems.push("leases.duration: must be at least 1s".into());
        }
        if self.leases.reap_interval.is_zero() || self.leases.reap_interval > self.leases.duration {
            problems
                .push("leases.reap_interval: must be above 0 and at most leases.duration".into());
        }
        if self.leases.redispatch_after < Duration::from_secs(1) {
            problems.push("leases.redispatch_after: must be at least 1s".into());
        }
        self.retries.validate(problems);
        self.approvals.validate(problems);
        colony_config::Validate::validate(&self.limits, problems);
        self.spawn.validate(problems);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_config::{Sources, load};

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources::from_env_pairs(pairs)
    }

    #[test]
    fn defaults_are_valid() {
        let config: Config = load(ENV_PREFIX, &Sources::default()).unwrap();
        assert_eq!(config.leases.duration, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_are_all_reported() {
        let error = load::<Config>(
            ENV_PREFIX,
            &env(&[
                ("ORCHESTRATOR__HTTP__ADDR", "nowhere"),
                ("ORCHESTRATOR__RUNS__ROLE", "a.b"),
                ("ORCHESTRATOR__LEASES__DURATION", "10ms"),
            ]),
        )
        .unwrap_err();
        let text = error.to_string();
        for key in ["http.addr", "runs.role", "leases.duration"] {
            assert!(text.contains(key), "{text}");
        }
    }

    #[test]
    fn the_deprecated_runs_role_and_prompt_fold_into_the_roster() {
        let config: Config = load(ENV_PREFIX, &Sources::default()).unwrap();
        let migrated = config.migrated();
        assert_eq!(migrated.runs.role(), "generalist");
        assert_eq!(migrated.roster, crate::roster::RosterConfig::default());

        let config: Config = load(
            ENV_PREFIX,
            &env(&[
                ("ORCHESTRATOR__RUNS__ROLE", "writer"),
                ("ORCHESTRATOR__RUNS__SYSTEM_PROMPT", "be a poet"),
            ]),
        )
        .unwrap();
        let migrated = config.migrated();
        assert_eq!(migrated.runs.role(), "writer");
        assert_eq!(migrated.roster.templates.monolith.len(), 1);
        assert_eq!(migrated.roster.templates.monolith[0].role, "writer");
        assert_eq!(migrated.roster.roles["writer"].prompt, "be a poet");

        let unknown = load::<Config>(ENV_PREFIX, &env(&[("ORCHESTRATOR__RUNS__ROLE", "poet")]))
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("not a role of the roster"), "{unknown}");
        let no_profile = load::<Config>(ENV_PREFIX, &env(&[("ORCHESTRATOR__RUNS__TIER", "huge")]))
            .unwrap_err()
            .to_string();
        assert!(no_profile.contains("roster.models"), "{no_profile}");
    }

    #[test]
    fn one_retry_field_can_be_set_alone() {
        let config: Config = load(
            ENV_PREFIX,
            &env(&[
                ("ORCHESTRATOR__RETRIES__TRANSIENT__MAX_ATTEMPTS", "1"),
                (
                    "ORCHESTRATOR__RETRIES__EXTERNAL_RATE_LIMIT__BACKOFF_CAP",
                    "10m",
                ),
                ("ORCHESTRATOR__RETRIES__EXTERNAL_DEGRADING__JITTER", "0"),
            ]),
        )
        .unwrap();
        let defaults = RetryConfig::default();
        assert_eq!(
            config.retries.transient,
            RetryPolicy {
                max_attempts: 1,
                ..defaults.transient
            }
        );
        assert_eq!(
            config.retries.external_rate_limit.backoff_cap,
            Duration::from_secs(600)
        );
        assert_eq!(
            config.retries.external_rate_limit.backoff_base,
            Duration::from_secs(5)
        );
        assert_eq!(config.retries.external_degrading.jitter, 0.0);
        assert_eq!(config.retries.permanent, defaults.permanent);
    }

    #[test]
    fn bad_retry_policies_are_reported() {
        let error = load::<Config>(
            ENV_PREFIX,
            &env(&[
                ("ORCHESTRATOR__RETRIES__TRANSIENT__MAX_ATTEMPTS", "0"),
                ("ORCHESTRATOR__RETRIES__PERMANENT__JITTER", "1.5"),
                ("ORCHESTRATOR__RETRIES__USER_FIXABLE__BACKOFF_CAP", "1ms"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for key in [
            "retries.transient.max_attempts",
            "retries.permanent.jitter",
            "retries.user_fixable.backoff_cap",
        ] {
            assert!(error.contains(key), "{error}");
        }
        let unknown = load::<Config>(
            ENV_PREFIX,
            &env(&[("ORCHESTRATOR__RETRIES__TRANSIENT__ATTEMPTS", "3")]),
        );
        assert!(unknown.is_err());
    }
}
