//! The router's configuration: listeners, dependencies and the model deployments it routes to.

use std::collections::HashSet;
use std::time::Duration;

use colony_bus::BusConfig;
use colony_config::{Sources, Validate};
use colony_store::DatabaseConfig;
use colony_telemetry::TelemetryConfig;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::error::ErrorClass;

/// Environment prefix: `ROUTER__GRPC__ADDR` sets `grpc.addr`.
pub const ENV_PREFIX: &str = "ROUTER";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub database: DatabaseConfig,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    /// How long shutdown waits for in-flight calls and background tasks.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The deployment used when a request names neither a deployment nor a served tier.
    pub default_deployment: String,
    pub deployments: Vec<DeploymentConfig>,
    /// Who may use the OpenAI-compatible API, each with its own key and budget. With none
    /// configured the API is open and the tenant comes from the `x-colony-tenant` header
    /// (for a single-user install behind its own network boundary).
    pub tenants: Vec<TenantConfig>,
    /// Rate-limit queues, retries and circuit breakers, for every deployment.
    pub resilience: crate::resilience::ResilienceConfig,
    /// How the usage ledger is written (in batches, off the request path).
    pub ledger: crate::ledger::LedgerConfig,
    /// Embedding models served on `POST /v1/embeddings`, by name.
    pub embeddings: Vec<EmbeddingDeploymentConfig>,
}

/// An embedding model of the router. Only the embedded one exists: all-MiniLM-L6-v2 run in
/// process (`provider = "local"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingDeploymentConfig {
    /// What clients pass as `model`.
    pub name: String,
    pub provider: EmbeddingProviderKind,
    /// Model directory, batch size, token limit, queue bound, loading.
    pub local: colony_inference::embed::EmbedConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingProviderKind {
    Local,
}

/// A tenant of the HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Name of the environment variable holding the tenant's API key.
    pub api_key_env: String,
    /// Resolved from `api_key_env` by [`load`]; never read from a file and never logged.
    #[serde(
        skip_deserializing,
        serialize_with = "colony_config::secret::serialize_opt"
    )]
    pub api_key: Option<SecretString>,
    /// Hard limit on the tenant's total spend in USD; unset is unlimited.
    #[serde(default)]
    pub budget_usd: Option<f64>,
}

impl TenantConfig {
    /// The budget in micro-USD.
    pub fn budget_micros(&self) -> Option<u64> {
        // `as` saturates; validated finite and non-negative.
        self.budget_usd.map(|usd| (usd * 1e6).round() as u64)
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
            shutdown_grace: Duration::from_secs(30),
            default_deployment: String::new(),
            deployments: Vec::new(),
            tenants: Vec::new(),
            resilience: crate::resilience::ResilienceConfig::default(),
            ledger: crate::ledger::LedgerConfig::default(),
            embeddings: Vec::new(),
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub addr: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:8081".into(),
        }
    }
}

/// The `colony.v1.Router` gRPC service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub addr: String,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:50052".into(),
        }
    }
}

/// What answers a deployment's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any server speaking OpenAI's `/chat/completions`.
    OpenAi,
    /// Anthropic's Messages API (`/messages`).
    Anthropic,
    /// Google's Gemini API (`/models/{model}:generateContent`).
    Gemini,
    /// Canned replies from the deployment's `script`, for tests and demos.
    Scripted,
    /// A GGUF model run inside the router (the `local` table says which and how).
    Local,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Scripted => "scripted",
            ProviderKind::Local => "local",
        }
    }
}

/// A coarse price/quality class that requests ask for instead of naming a deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Budget,
    #[default]
    Mid,
    Frontier,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Budget => "budget",
            Tier::Mid => "mid",
            Tier::Frontier => "frontier",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Tier::Budget, Tier::Mid, Tier::Frontier]
            .into_iter()
            .find(|tier| tier.as_str() == name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub name: String,
    pub provider: ProviderKind,
    pub model: String,
    /// Endpoint root: for openai `https://host/v1` (any OpenAI-compatible server), for
    /// anthropic `https://api.anthropic.com/v1`, for gemini
    /// `https://generativelanguage.googleapis.com/v1beta`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Name of the environment variable holding the API key (HTTP providers; none for servers
    /// without authentication).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Resolved from `api_key_env` by [`load`]; never read from a file and never logged.
    #[serde(
        skip_deserializing,
        serialize_with = "colony_config::secret::serialize_opt"
    )]
    pub api_key: Option<SecretString>,
    #[serde(default)]
    pub tier: Tier,
    /// USD per million prompt tokens.
    pub input_price_per_mtok: f64,
    /// USD per million completion tokens.
    pub output_price_per_mtok: f64,
    /// Bound on one call, connection included (a stream's whole length too).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Bound on a stream's wait for its first event; past it the stream falls back like a
    /// failed call. Unset: `timeout`.
    #[serde(default, with = "humantime_serde")]
    pub first_token_timeout: Option<Duration>,
    /// Prompt plus completion tokens the model accepts.
    #[serde(default = "default_context_window")]
    pub context_window: u32,
    /// Completion tokens reserved (and asked for) when a request sets no `max_tokens`.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
    /// What the deployment can do beyond plain chat; requests that need a capability are
    /// routed only to deployments that list it.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    #[serde(default)]
    pub limits: RateLimits,
    /// Where the data goes; `local_only` requests go only to `local` deployments. Unset:
    /// `local` for scripted deployments, `external` for everything else.
    #[serde(default)]
    pub privacy: Option<Privacy>,
    /// Deployments tried, in order, when this one fails with a retryable error.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Rules of a scripted deployment, tried in order.
    #[serde(default)]
    pub script: Vec<ScriptRule>,
    /// The model of a `local` deployment: GGUF path, threads, context, queue bound.
    #[serde(default)]
    pub local: Option<colony_inference::chat::ChatConfig>,
}

fn default_context_window() -> u32 {
    8192
}

fn default_max_output_tokens() -> u32 {
    1024
}

/// A capability beyond plain chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// Function calling.
    Tools,
    /// A JSON object as the answer.
    Json,
    /// Token streaming (others stream their whole answer at once).
    Streaming,
}

/// Requests and tokens per minute a deployment may take; unset is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens; a call takes its prompt and maximum output up front.
    pub tokens_per_minute: Option<u32>,
}

/// Whether a deployment keeps the data inside this installation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Privacy {
    Local,
    External,
}

impl Privacy {
    pub fn as_str(self) -> &'static str {
        match self {
            Privacy::Local => "local",
            Privacy::External => "external",
        }
    }
}

impl DeploymentConfig {
    /// A deployment with every optional key at its default, free of charge: for tests and
    /// tools that build configs in code.
    pub fn new(name: &str, provider: ProviderKind, model: &str) -> Self {
        Self {
            name: name.into(),
            provider,
            model: model.into(),
            base_url: None,
            api_key_env: None,
            api_key: None,
            tier: Tier::default(),
            input_price_per_mtok: 0.0,
            output_price_per_mtok: 0.0,
            timeout: default_timeout(),
            first_token_timeout: None,
            context_window: default_context_window(),
            max_output_tokens: default_max_output_tokens(),
            capabilities: Vec::new(),
            limits: RateLimits::default(),
            privacy: None,
            fallbacks: Vec::new(),
            script: Vec::new(),
            local: None,
        }
    }

    /// The declared privacy class, or the provider's default.
    pub fn privacy_class(&self) -> Privacy {
        self.privacy.unwrap_or(match self.provider {
            ProviderKind::Scripted | ProviderKind::Local => Privacy::Local,
            _ => Privacy::External,
        })
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

/// One canned answer of a scripted deployment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptRule {
    /// Matches when the last user or tool message contains this text (so a tool's result can
    /// drive the next step); a rule without it always matches.
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub reply: String,
    /// Waited before answering (when streaming: before the first piece).
    #[serde(default, with = "humantime_serde")]
    pub delay: Duration,
    /// When streaming: waited between one word-sized piece of the reply and the next.
    #[serde(default, with = "humantime_serde")]
    pub piece_delay: Duration,
    /// Fail with this class instead of replying.
    #[serde(default)]
    pub fail: Option<ErrorClass>,
    /// Tools to call in the answer (after the reply text, if any), with ids `call_0`,
    /// `call_1`, ...; the finish reason is then `tool_calls`.
    #[serde(default)]
    pub tool_calls: Vec<ScriptToolCall>,
}

/// A tool call a scripted rule answers with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptToolCall {
    pub name: String,
    /// The arguments as JSON text.
    #[serde(default = "empty_arguments")]
    pub arguments: String,
}

fn empty_arguments() -> String {
    "{}".into()
}

/// Loads the config for `ROUTER`, then reads every deployment's API key from the environment
/// variable its `api_key_env` names (in `sources.env`, which is the process environment for
/// the binary). A named variable that is unset or empty is a configuration error.
pub fn load(sources: &Sources) -> Result<Config, colony_config::Error> {
    let mut config: Config = colony_config::load(ENV_PREFIX, sources)?;
    let mut problems = Vec::new();
    for (index, deployment) in config.deployments.iter_mut().enumerate() {
        let Some(var) = &deployment.api_key_env else {
            continue;
        };
        match sources.env.get(var).filter(|key| !key.is_empty()) {
            Some(key) => deployment.api_key = Some(SecretString::from(key.as_str())),
            None => problems.push(format!(
                "{}.api_key_env: environment variable {var} is not set",
                label(index, deployment)
            )),
        }
    }
    for (index, tenant) in config.tenants.iter_mut().enumerate() {
        match sources
            .env
            .get(&tenant.api_key_env)
            .filter(|key| !key.is_empty())
        {
            Some(key) => tenant.api_key = Some(SecretString::from(key.as_str())),
            None => problems.push(format!(
                "tenants[{index}] ({:?}).api_key_env: environment variable {} is not set",
                tenant.name, tenant.api_key_env
            )),
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(colony_config::Error::Invalid(problems))
    }
}

fn label(index: usize, deployment: &DeploymentConfig) -> String {
    format!("deployments[{index}] ({:?})", deployment.name)
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        colony_config::check_socket_addr(problems, "http.addr", &self.http.addr);
        colony_config::check_socket_addr(problems, "grpc.addr", &self.grpc.addr);
        self.database.validate(problems);
        self.bus.validate(problems);
        self.telemetry.validate(problems);
        self.resilience.validate(problems);
        self.ledger.validate(problems);
        if self.deployments.is_empty() {
            problems.push(
                "no deployments configured: add a [[deployments]] entry to the router config"
                    .into(),
            );
            return;
        }
        let mut seen = HashSet::new();
        for (index, deployment) in self.deployments.iter().enumerate() {
            if !seen.insert(deployment.name.as_str()) {
                problems.push(format!(
                    "{}: the name is used by another deployment",
                    label(index, deployment)
                ));
            }
            deployment.validate(&label(index, deployment), problems);
        }
        for (index, deployment) in self.deployments.iter().enumerate() {
            for fallback in &deployment.fallbacks {
                if fallback == &deployment.name || !seen.contains(fallback.as_str()) {
                    problems.push(format!(
                        "{}.fallbacks: {fallback:?} is not another configured deployment",
                        label(index, deployment)
                    ));
                }
            }
        }
        let mut embedding_names = HashSet::new();
        for (index, embedding) in self.embeddings.iter().enumerate() {
            let label = format!("embeddings[{index}] ({:?})", embedding.name);
            if embedding.name.trim().is_empty() {
                problems.push(format!("{label}.name: must not be empty"));
            }
            if !embedding_names.insert(embedding.name.as_str()) {
                problems.push(format!(
                    "{label}: the name is used by another embedding model"
                ));
            }
            if embedding.local.batch_size == 0 || embedding.local.queue_capacity == 0 {
                problems.push(format!(
                    "{label}.local: batch_size and queue_capacity must be more than 0"
                ));
            }
        }
        let mut tenants = HashSet::new();
        for (index, tenant) in self.tenants.iter().enumerate() {
            let label = format!("tenants[{index}] ({:?})", tenant.name);
            if tenant.name.trim().is_empty() {
                problems.push(format!("{label}.name: must not be empty"));
            }
            if !tenants.insert(tenant.name.as_str()) {
                problems.push(format!("{label}: the name is used by another tenant"));
            }
            if let Some(budget) = tenant.budget_usd
                && !(budget.is_finite() && budget >= 0.0)
            {
                problems.push(format!(
                    "{label}.budget_usd: must be a number >= 0, not {budget}"
                ));
            }
        }
        if !seen.contains(self.default_deployment.as_str()) {
            problems.push(format!(
                "default_deployment: {:?} is not a configured deployment (configured: {})",
                self.default_deployment,
                self.deployments
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
}

impl DeploymentConfig {
    fn validate(&self, label: &str, problems: &mut Vec<String>) {
        if self.name.trim().is_empty() {
            problems.push(format!("{label}.name: must not be empty"));
        }
        if self.model.trim().is_empty() {
            problems.push(format!("{label}.model: must not be empty"));
        }
        for (key, price) in [
            ("input_price_per_mtok", self.input_price_per_mtok),
            ("output_price_per_mtok", self.output_price_per_mtok),
        ] {
            if !(price.is_finite() && price >= 0.0) {
                problems.push(format!("{label}.{key}: must be a number >= 0, not {price}"));
            }
        }
        if self.timeout.is_zero() {
            problems.push(format!("{label}.timeout: must be more than 0s"));
        }
        if let Some(first) = self.first_token_timeout
            && (first.is_zero() || first > self.timeout)
        {
            problems.push(format!(
                "{label}.first_token_timeout: must be more than 0s and at most timeout ({:?})",
                self.timeout
            ));
        }
        if self.context_window == 0 {
            problems.push(format!("{label}.context_window: must be more than 0"));
        }
        if self.max_output_tokens == 0 || self.max_output_tokens >= self.context_window {
            problems.push(format!(
                "{label}.max_output_tokens: must be more than 0 and less than context_window ({})",
                self.context_window
            ));
        }
        for (key, limit) in [
            ("requests_per_minute", self.limits.requests_per_minute),
            ("tokens_per_minute", self.limits.tokens_per_minute),
        ] {
            if limit == Some(0) {
                problems.push(format!(
                    "{label}.limits.{key}: must be more than 0 (leave it out for no limit)"
                ));
            }
        }
        match self.provider {
            ProviderKind::OpenAi | ProviderKind::Anthropic | ProviderKind::Gemini => match &self
                .base_url
            {
                Some(url) => colony_config::check_url(
                    problems,
                    &format!("{label}.base_url"),
                    url,
                    &["http", "https"],
                ),
                None => problems.push(format!(
                    "{label}.base_url: required for provider \"{}\" (for example {})",
                    self.provider.as_str(),
                    match self.provider {
                        ProviderKind::Anthropic => "https://api.anthropic.com/v1",
                        ProviderKind::Gemini => "https://generativelanguage.googleapis.com/v1beta",
                        _ => "https://host/v1",
                    }
                )),
            },
            ProviderKind::Local => match &self.local {
                None => problems.push(format!(
                    "{label}.local: a local deployment needs a [deployments.local] table with model_path (make models fetches the default model)"
                )),
                Some(local) => {
                    if self.context_window > local.context_tokens {
                        problems.push(format!(
                            "{label}.context_window: {} is more than the local model's context_tokens ({})",
                            self.context_window, local.context_tokens
                        ));
                    }
                    if local.queue_capacity == 0 {
                        problems.push(format!("{label}.local.queue_capacity: must be more than 0"));
                    }
                    if self.base_url.is_some() || self.api_key_env.is_some() {
                        problems.push(format!(
                            "{label}: base_url and api_key_env apply only to HTTP providers (openai, anthropic, gemini)"
                        ));
                    }
                }
            },
            ProviderKind::Scripted => {
                if self.script.is_empty() {
                    problems.push(format!(
                        "{label}.script: a scripted deployment needs at least one rule"
                    ));
                }
                if self.base_url.is_some() || self.api_key_env.is_some() {
                    problems.push(format!(
                        "{label}: base_url and api_key_env apply only to HTTP providers (openai, anthropic, gemini)"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const SCRIPTED: &str = r#"
default_deployment = "canned"

[[deployments]]
name = "canned"
provider = "scripted"
model = "script-v1"
input_price_per_mtok = 0.0
output_price_per_mtok = 0.0
script = [{ reply = "hello" }]
"#;

    const OPENAI: &str = r#"
[[deployments]]
name = "gpt"
provider = "openai"
model = "gpt-4o-mini"
base_url = "https://models.invalid/v1"
api_key_env = "TEST_ROUTER_KEY"
tier = "budget"
input_price_per_mtok = 0.15
output_price_per_mtok = 0.6
timeout = "5s"
"#;

    fn load_toml(name: &str, text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let path =
            std::env::temp_dir().join(format!("colony-router-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let sources = Sources {
            file: Some(path.clone()),
            ..Sources::from_env_pairs(env)
        };
        let result = load(&sources).map_err(|e| e.to_string());
        std::fs::remove_file(path).unwrap();
        result
    }

    #[test]
    fn scripted_config_loads_with_defaults() {
        let config = load_toml("scripted", SCRIPTED, &[]).unwrap();
        let deployment = &config.deployments[0];
        assert_eq!(deployment.provider, ProviderKind::Scripted);
        assert_eq!(deployment.tier, Tier::Mid);
        assert_eq!(deployment.timeout, Duration::from_secs(60));
        assert_eq!(config.grpc.addr, "0.0.0.0:50052");
        assert_eq!(config.http.addr, "0.0.0.0:8081");
    }

    #[test]
    fn no_deployments_says_what_to_add() {
        let error = load_toml("empty", "", &[]).unwrap_err();
        assert!(error.contains("no deployments configured: add a [[deployments]] entry"));
    }

    #[test]
    fn unknown_default_names_the_configured_ones() {
        let text = SCRIPTED.replace(
            "default_deployment = \"canned\"",
            "default_deployment = \"x\"",
        );
        let error = load_toml("default", &text, &[]).unwrap_err();
        assert!(
            error.contains(
                "default_deployment: \"x\" is not a configured deployment (configured: canned)"
            ),
            "{error}"
        );
    }

    #[test]
    fn api_key_comes_from_the_named_variable_and_is_redacted() {
        let text = format!("default_deployment = \"gpt\"\n{OPENAI}");
        let config = load_toml("key", &text, &[("TEST_ROUTER_KEY", "sk-secret")]).unwrap();
        let deployment = &config.deployments[0];
        assert_eq!(
            deployment.api_key.as_ref().map(|k| k.expose_secret()),
            Some("sk-secret")
        );
        assert_eq!(
            (deployment.tier, deployment.timeout),
            (Tier::Budget, Duration::from_secs(5))
        );
        let dump = colony_config::redacted_json(&config);
        assert!(
            !dump.contains("sk-secret") && dump.contains("[REDACTED]"),
            "{dump}"
        );

        let error = load_toml("nokey", &text, &[]).unwrap_err();
        assert!(
            error.contains("environment variable TEST_ROUTER_KEY is not set"),
            "{error}"
        );
    }

    #[test]
    fn a_key_cannot_be_written_into_the_file() {
        let text = format!("default_deployment = \"gpt\"\n{OPENAI}api_key = \"sk-inline\"\n");
        let error = load_toml("inline", &text, &[("TEST_ROUTER_KEY", "k")]).unwrap_err();
        assert!(error.contains("api_key"), "{error}");
    }

    #[test]
    fn bad_url_bad_price_and_duplicates_are_each_reported() {
        let text = format!(
            "default_deployment = \"gpt\"\n{}{}",
            OPENAI.replace("https://models.invalid/v1", "models.invalid/v1"),
            OPENAI.replace("0.15", "-1.0")
        );
        let error = load_toml("bad", &text, &[("TEST_ROUTER_KEY", "k")]).unwrap_err();
        for expected in [
            "deployments[0] (\"gpt\").base_url: \"models.invalid/v1\" must start with one of http://, https://",
            "deployments[1] (\"gpt\"): the name is used by another deployment",
            "deployments[1] (\"gpt\").input_price_per_mtok: must be a number >= 0",
        ] {
            assert!(error.contains(expected), "missing {expected:?} in {error}");
        }
    }

    #[test]
    fn provider_specific_keys_are_checked() {
        let openai = OPENAI
            .replace("base_url = \"https://models.invalid/v1\"\n", "")
            .replace("api_key_env = \"TEST_ROUTER_KEY\"\n", "");
        let error = load_toml(
            "nourl",
            &format!("default_deployment = \"gpt\"\n{openai}"),
            &[],
        )
        .unwrap_err();
        assert!(
            error.contains("base_url: required for provider \"openai\""),
            "{error}"
        );

        let scripted = SCRIPTED.replace(
            "script = [{ reply = \"hello\" }]",
            "base_url = \"http://x\"",
        );
        let error = load_toml("norules", &scripted, &[]).unwrap_err();
        assert!(error.contains("needs at least one rule"), "{error}");
        assert!(error.contains("apply only to HTTP providers"), "{error}");
    }

    #[test]
    fn unknown_provider_is_refused() {
        let text = SCRIPTED.replace("\"scripted\"", "\"anthropic\"");
        let error = load_toml("provider", &text, &[]).unwrap_err();
        assert!(error.contains("anthropic"), "{error}");
    }
}
