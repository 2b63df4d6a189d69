//! Configuration: defaults → file → `AGENT_WORKER__…` environment → overrides, then
//! [`Validate`]. The worker is stateless: there is no database section.

use std::time::Duration;

use colony_bus::BusConfig;
use colony_config::Validate;
use colony_telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

use crate::sandbox::SandboxConfig;

/// Environment prefix: `AGENT_WORKER__HTTP__ADDR` → `http.addr`, `AGENT_WORKER__SLOTS` → `slots`.
pub const ENV_PREFIX: &str = "AGENT_WORKER";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    /// `colony.v1.Orchestrator` (claims and task leases).
    pub orchestrator_url: String,
    /// `colony.v1.Router` (model calls).
    pub router_url: String,
    /// `colony.v1.Memory` (conversation history).
    pub memory_url: String,
    /// Tasks run at once **per role** (v1): a worker with two roles runs up to `2 × slots`.
    pub slots: u32,
    /// Roles whose dispatch subjects (`colony.v1.task.dispatch.<role>`) this worker consumes.
    pub roles: Vec<String>,
    /// This process's identity in claims, reports and heartbeats. Unset: `<hostname>-<pid>-<4
    /// random hex digits>`, unique per process.
    pub worker_id: Option<String>,
    /// Deadline of every orchestrator and memory call.
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    /// Deadline of one `Router.Complete` call.
    #[serde(with = "humantime_serde")]
    pub completion_timeout: Duration,
    /// How often the worker's own heartbeat goes out on `colony.v1.worker.heartbeat`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long in-flight tasks may take to finish and report at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The agent loop: steps, tool deadlines and result sizes.
    pub agent: AgentConfig,
    /// Where workspace tools (`run_command`, `read_file`, `write_file`) run.
    pub sandbox: SandboxConfig,
}

/// The agent loop's bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Most model calls in one attempt. An agent still calling tools after this many fails
    /// with a clear reason instead of looping on.
    pub max_steps: u32,
    /// Deadline of one tool call; a call that takes longer is stopped and the model is told.
    #[serde(with = "humantime_serde")]
    pub tool_timeout: Duration,
    /// A tool result longer than this is cut (saying so) before the model reads it.
    pub max_tool_result_bytes: usize,
    /// Share of the model's context window (the task's `context_window`) a conversation may
    /// fill before a model call; the rest is left for the answer. Beyond it the task escalates
    /// to a larger-context tier, or its older turns are compressed through memory.
    pub context_fill: f64,
    /// Ask the router for streamed answers and publish their text on the bus as it is written
    /// (`colony.v1.event.tokens`); off: whole answers only.
    pub stream_tokens: bool,
    /// Memories retrieved (by the task's instructions) into a fresh prompt of a role that may
    /// use `memory_search`; 0: none.
    pub prompt_memories: u32,
    /// Strategies retrieved into a fresh prompt of a role that may use `suggest_strategy`;
    /// 0: none.
    pub prompt_strategies: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            max_steps: 12,
            tool_timeout: Duration::from_secs(120),
            max_tool_result_bytes: 16 * 1024,
            context_fill: 0.75,
            stream_tokens: true,
            prompt_memories: 5,
            prompt_strategies: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub addr: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::default(),
            bus: BusConfig::default(),
            telemetry: TelemetryConfig::default(),
            orchestrator_url: "http://127.0.0.1:50051".into(),
            router_url: "http://127.0.0.1:50052".into(),
            memory_url: "http://127.0.0.1:50053".into(),
            slots: 4,
            // The orchestrator's default roster.
            roles: [
                "planner",
                "noop",
                "generalist",
                "researcher",
                "writer",
                "reviewer",
            ]
            .map(String::from)
            .to_vec(),
            worker_id: None,
            rpc_timeout: Duration::from_secs(10),
            completion_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            agent: AgentConfig::default(),
            sandbox: SandboxConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:8083".into(),
        }
    }
}

/// Longest `worker_id` accepted; it is repeated in every claim, report and message id.
const MAX_WORKER_ID_LEN: usize = 128;

/// A NATS subject token: what a role may contain, since it becomes the last subject token.
fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn check_peer_url(problems: &mut Vec<String>, key: &str, url: &str) {
    // TLS is not compiled into the gRPC client, so only plain http:// can work.
    let before = problems.len();
    colony_config::check_url(problems, key, url, &["http"]);
    if problems.len() == before
        && let Err(error) = tonic::transport::Endpoint::from_shared(url.to_owned())
    {
        problems.push(format!("{key}: {url:?} is not a valid URL: {error}"));
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        colony_config::check_socket_addr(problems, "http.addr", &self.http.addr);
        self.bus.validate(problems);
        self.telemetry.validate(problems);
        check_peer_url(problems, "orchestrator_url", &self.orchestrator_url);
        check_peer_url(problems, "router_url", &self.router_url);
        check_peer_url(problems, "memory_url", &self.memory_url);
        if self.slots == 0 {
            problems.push("slots: must be at least 1".into());
        }
        if self.roles.is_empty() {
            problems.push("roles: at least one role is required".into());
        }
        for role in &self.roles {
            if !is_token(role) {
                problems.push(format!(
                    "roles: {role:?} may hold only letters, digits, '_' and '-' (it becomes a \
                     subject token)"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for role in &self.roles {
            if !seen.insert(role) {
                problems.push(format!("roles: {role:?} is listed twice"));
            }
        }
        if let Some(id) = &self.worker_id
            && (id.is_empty()
                || id.len() > MAX_WORKER_ID_LEN
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            problems.push(format!(
                "worker_id: {id:?} must be 1 to {MAX_WORKER_ID_LEN} letters, digits, '_', '-' or '.'"
            ));
        }
        for (key, value) in [
            ("rpc_timeout", self.rpc_timeout),
            ("completion_timeout", self.completion_timeout),
            ("shutdown_grace", self.shutdown_grace),
        ] {
            if value.is_zero() {
                problems.push(format!("{key}: must be more than 0s"));
            }
        }
        self.sandbox.validate(problems);
        if self.agent.max_steps == 0 {
            problems.push("agent.max_steps: must be at least 1".into());
        }
        if self.agent.tool_timeout.is_zero() {
            problems.push("agent.tool_timeout: must be more than 0s".into());
        }
        if self.agent.max_tool_result_bytes < 256 {
            problems.push("agent.max_tool_result_bytes: must be at least 256".into());
        }
        if self.agent.prompt_memories > 20 || self.agent.prompt_strategies > 20 {
            problems.push("agent.prompt_memories, agent.prompt_strategies: at most 20".into());
        }
        if !(self.agent.context_fill > 0.0 && self.agent.context_fill <= 1.0) {
            problems.push("agent.context_fill: must be above 0 and at most 1".into());
        }
        if self.heartbeat_interval < Duration::from_millis(100) {
            problems.push("heartbeat_interval: must be at least 100ms".into());
        }
    }
}

impl Config {
    /// The configured `worker_id`, or a fresh `<hostname>-<pid>-<4 hex>`.
    pub fn resolved_worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(default_worker_id)
    }
}

/// `<hostname>-<pid>-<4 random hex digits>`: unique per process even when replicas share a
/// hostname or a pid (containers).
pub fn default_worker_id() -> String {
    colony_runtime::instance_name("worker")
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_config::Sources;

    fn load(env: &[(&str, &str)]) -> Result<Config, colony_config::Error> {
        let sources = Sources::from_env_pairs(env);
        colony_config::load(ENV_PREFIX, &sources)
    }

    fn problems(env: &[(&str, &str)]) -> String {
        load(env).expect_err("the config is invalid").to_string()
    }

    #[test]
    fn defaults_are_valid() {
        let config = load(&[]).expect("defaults load");
        assert_eq!(config.http.addr, "0.0.0.0:8083");
        assert_eq!(config.orchestrator_url, "http://127.0.0.1:50051");
        assert_eq!(config.router_url, "http://127.0.0.1:50052");
        assert_eq!(config.memory_url, "http://127.0.0.1:50053");
        assert_eq!(config.slots, 4);
        assert_eq!(
            config.roles,
            [
                "planner",
                "noop",
                "generalist",
                "researcher",
                "writer",
                "reviewer"
            ]
        );
        assert_eq!(config.worker_id, None);
        assert_eq!(config.rpc_timeout, Duration::from_secs(10));
        assert_eq!(config.completion_timeout, Duration::from_secs(300));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn compose_environment_is_accepted() {
        let config = load(&[
            ("AGENT_WORKER__HTTP__ADDR", "0.0.0.0:8083"),
            ("AGENT_WORKER__BUS__URL", "nats://nats:4222"),
            (
                "AGENT_WORKER__ORCHESTRATOR_URL",
                "http://orchestrator:50051",
            ),
            ("AGENT_WORKER__ROUTER_URL", "http://router:50052"),
            ("AGENT_WORKER__MEMORY_URL", "http://memory:50053"),
            ("AGENT_WORKER__SLOTS", "4"),
            ("AGENT_WORKER__TELEMETRY__LOG_FORMAT", "json"),
            ("AGENT_WORKER__TELEMETRY__LOG_FILTER", "info"),
        ])
        .expect("the compose environment loads");
        assert_eq!(config.bus.url, "nats://nats:4222");
        assert_eq!(config.orchestrator_url, "http://orchestrator:50051");
        assert_eq!(config.router_url, "http://router:50052");
        assert_eq!(config.memory_url, "http://memory:50053");
        assert_eq!(config.slots, 4);
    }

    #[test]
    fn lists_durations_and_worker_id_come_from_the_environment() {
        let config = load(&[
            ("AGENT_WORKER__ROLES", "planner,coder"),
            ("AGENT_WORKER__WORKER_ID", "w-1.local"),
            ("AGENT_WORKER__COMPLETION_TIMEOUT", "90s"),
            ("AGENT_WORKER__HEARTBEAT_INTERVAL", "250ms"),
        ])
        .expect("the environment loads");
        assert_eq!(config.roles, ["planner", "coder"]);
        assert_eq!(config.worker_id.as_deref(), Some("w-1.local"));
        assert_eq!(config.resolved_worker_id(), "w-1.local");
        assert_eq!(config.completion_timeout, Duration::from_secs(90));
        assert_eq!(config.heartbeat_interval, Duration::from_millis(250));
    }

    #[test]
    fn zero_slots_are_rejected() {
        assert!(problems(&[("AGENT_WORKER__SLOTS", "0")]).contains("slots: must be at least 1"));
    }

    #[test]
    fn empty_or_bad_roles_are_rejected() {
        let mut config = Config {
            roles: Vec::new(),
            ..Config::default()
        };
        let mut found = Vec::new();
        config.validate(&mut found);
        assert_eq!(found, ["roles: at least one role is required"]);

        config.roles = vec!["coder".into(), "a.b".into(), "coder".into(), String::new()];
        let mut found = Vec::new();
        config.validate(&mut found);
        let text = found.join("\n");
        assert!(text.contains("\"a.b\" may hold only"), "{text}");
        assert!(text.contains("\"\" may hold only"), "{text}");
        assert!(text.contains("\"coder\" is listed twice"), "{text}");
    }

    #[test]
    fn bad_urls_are_rejected() {
        let text = problems(&[
            ("AGENT_WORKER__ORCHESTRATOR_URL", "orchestrator:50051"),
            ("AGENT_WORKER__ROUTER_URL", "https://router:50052"),
            ("AGENT_WORKER__MEMORY_URL", "http://mem ory:50053"),
        ]);
        assert!(text.contains("orchestrator_url"), "{text}");
        assert!(text.contains("router_url"), "{text}");
        assert!(text.contains("memory_url"), "{text}");
    }

    #[test]
    fn other_bad_values_are_all_reported() {
        let text = problems(&[
            ("AGENT_WORKER__HTTP__ADDR", "nowhere"),
            ("AGENT_WORKER__WORKER_ID", "has space"),
            ("AGENT_WORKER__RPC_TIMEOUT", "0s"),
            ("AGENT_WORKER__HEARTBEAT_INTERVAL", "10ms"),
        ]);
        for key in [
            "http.addr",
            "worker_id",
            "rpc_timeout",
            "heartbeat_interval",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = load(&[("AGENT_WORKER__SLOTZ", "1")]).expect_err("unknown keys fail");
        assert!(error.to_string().contains("slotz"), "{error}");
    }
}
