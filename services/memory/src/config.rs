//! Configuration: defaults → file → `MEMORY__…` environment → overrides, then [`Validate`].

use std::path::Path;
use std::time::Duration;

use colony_bus::BusConfig;
use colony_config::Validate;
use colony_store::DatabaseConfig;
use colony_telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

/// Environment prefix: `MEMORY__GRPC__ADDR` → `grpc.addr`.
pub const ENV_PREFIX: &str = "MEMORY";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub database: DatabaseConfig,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    /// Largest `content` of one message, in UTF-8 bytes.
    pub max_message_bytes: usize,
    /// Most messages one `AppendMessages` call may carry.
    pub max_messages_per_append: usize,
    /// Largest encoded gRPC request accepted; bigger ones fail with RESOURCE_EXHAUSTED before
    /// they reach validation.
    pub max_request_bytes: usize,
    /// A `ListMessages` page stops before its contents pass this many bytes (it always holds
    /// at least one message), so pages stay under clients' default 4 MiB decode limit.
    pub max_page_bytes: usize,
    /// How long in-flight requests may take to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The embedding model, run in this process (all-MiniLM-L6-v2 from `make models`).
    pub embedding: colony_inference::embed::EmbedConfig,
    /// Most texts one `Embed` call may carry.
    pub max_texts_per_embed: usize,
    /// Where embeddings come from: `local` (the model above, in this process) or `router` (an
    /// `[[embeddings]]` model of the router, over its OpenAI-compatible HTTP API).
    pub embedding_provider: EmbeddingProvider,
    /// Used when `embedding_provider = "router"`.
    pub router_embeddings: RouterEmbeddingsConfig,
    /// Longest a request may take; a caller's shorter deadline (`grpc-timeout`) wins.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub semantic: SemanticConfig,
    pub retention: RetentionConfig,
    pub limits: TenantLimitsConfig,
    pub strategies: StrategyConfig,
    pub compression: CompressionConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingProvider {
    Local,
    Router,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterEmbeddingsConfig {
    /// The router's HTTP base URL (its `/v1/embeddings` is called).
    pub url: String,
    /// The embedding model's name in the router's `[[embeddings]]`.
    pub model: String,
    /// Its dimensions; every vector it returns is checked against them.
    pub dimensions: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Semantic memory: merging, ranking, the index and its sync between replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SemanticConfig {
    /// A new memory at least this similar (cosine) to one in the same scope is merged into it.
    pub dedupe_similarity: f32,
    /// Weight of recency in the ranking score: `recency_weight × 0.5^(age / recency_half_life)`.
    pub recency_weight: f32,
    #[serde(with = "humantime_serde")]
    pub recency_half_life: Duration,
    /// Weight of importance (0 to 1) in the ranking score.
    pub importance_weight: f32,
    /// Largest text of one memory, in UTF-8 bytes.
    pub max_text_bytes: usize,
    /// Most memories one `WriteMemories` call may carry.
    pub max_memories_per_write: usize,
    /// Most metadata pairs on one memory.
    pub max_metadata_pairs: usize,
    /// A tenant with fewer memories than this is searched exactly (brute force is faster and
    /// perfect there); above it, through the HNSW graph.
    pub exact_search_below: usize,
    /// Candidates the graph search keeps (HNSW `ef`); more is slower and more accurate.
    pub ef_search: usize,
    /// How often a replica also reads recently changed rows, in case it missed a change event.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
}

/// Time to live per scope, the sweeper's schedule, and how long tombstones stay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Default TTL of memories per scope kind; absent means they do not expire. A memory's own
    /// TTL (given when it is written) wins.
    #[serde(with = "humantime_serde")]
    pub tenant_ttl: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub role_ttl: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub run_ttl: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub session_ttl: Option<Duration>,
    /// Sessions (history, summaries) not appended to for this long are deleted.
    #[serde(with = "humantime_serde")]
    pub session_history_ttl: Option<Duration>,
    /// How long a deleted or expired memory's tombstone is kept so every replica sees it.
    #[serde(with = "humantime_serde")]
    pub tombstone_retention: Duration,
}

/// What one tenant may hold; `tenants` overrides the default for named tenants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimitsConfig {
    pub max_memories: u64,
    pub max_bytes: u64,
    pub tenants: std::collections::BTreeMap<String, TenantLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimit {
    pub max_memories: u64,
    pub max_bytes: u64,
}

impl TenantLimitsConfig {
    /// The limit that applies to `tenant`.
    pub fn for_tenant(&self, tenant: &str) -> TenantLimit {
        self.tenants.get(tenant).copied().unwrap_or(TenantLimit {
            max_memories: self.max_memories,
            max_bytes: self.max_bytes,
        })
    }
}

/// Strategy memory: merging and pruning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyConfig {
    /// Outcomes a strategy needs before it can be pruned.
    pub min_outcomes: u32,
    /// Below this win rate (wins / outcomes) after `min_outcomes`, a strategy is pruned.
    pub min_win_rate: f32,
    /// A new strategy at least this similar to an active one of the same role is merged into it.
    pub dedupe_similarity: f32,
    /// Largest title, when-to-use or strategy text, in bytes.
    pub max_text_bytes: usize,
}

/// Session compression: older turns are summarised by a model through the router.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// The router's gRPC URL.
    pub router_url: String,
    /// A deployment by name; empty lets the router choose by `tier`.
    pub deployment: String,
    pub tier: String,
    /// Messages at the end of a session left verbatim by default.
    pub keep_recent: u32,
    /// Longest summary asked for.
    pub max_summary_tokens: u32,
    /// Most messages one summary covers (older ones first); a longer history gets several.
    pub max_messages_per_summary: u32,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// `colony.v1.Memory`.
    pub addr: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            database: DatabaseConfig::default(),
            bus: BusConfig::default(),
            telemetry: TelemetryConfig::default(),
            max_message_bytes: 256 * 1024,
            max_messages_per_append: 256,
            max_request_bytes: 4 * 1024 * 1024,
            max_page_bytes: 2 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            embedding: colony_inference::embed::EmbedConfig {
                // Loaded on first use: sessions work even where the model is not fetched.
                loading: colony_inference::Loading::Lazy,
                ..colony_inference::embed::EmbedConfig::new(
                    Path::new(".cache/models").join(colony_inference::DEFAULT_EMBEDDING_MODEL),
                )
            },
            max_texts_per_embed: 256,
            embedding_provider: EmbeddingProvider::Local,
            router_embeddings: RouterEmbeddingsConfig::default(),
            request_timeout: Duration::from_secs(30),
            semantic: SemanticConfig::default(),
            retention: RetentionConfig::default(),
            limits: TenantLimitsConfig::default(),
            strategies: StrategyConfig::default(),
            compression: CompressionConfig::default(),
        }
    }
}

impl Default for RouterEmbeddingsConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8081".into(),
            model: colony_inference::DEFAULT_EMBEDDING_MODEL.into(),
            dimensions: 384,
            timeout: Duration::from_secs(30),
        }
    }
}

impl Default for SemanticConfig {
    fn default() -> Self {
        Self {
            dedupe_similarity: 0.95,
            recency_weight: 0.1,
            recency_half_life: Duration::from_secs(30 * 24 * 3600),
            importance_weight: 0.1,
            max_text_bytes: 16 * 1024,
            max_memories_per_write: 256,
            max_metadata_pairs: 32,
            exact_search_below: 2_000,
            ef_search: 64,
            sync_interval: Duration::from_secs(10),
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            sweep_interval: Duration::from_secs(60),
            tenant_ttl: None,
            role_ttl: None,
            run_ttl: Some(Duration::from_secs(30 * DAY)),
            session_ttl: Some(Duration::from_secs(30 * DAY)),
            session_history_ttl: Some(Duration::from_secs(90 * DAY)),
            tombstone_retention: Duration::from_secs(3600),
        }
    }
}

impl Default for TenantLimitsConfig {
    fn default() -> Self {
        Self {
            max_memories: 1_000_000,
            max_bytes: 1024 * 1024 * 1024,
            tenants: Default::default(),
        }
    }
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            min_outcomes: 10,
            min_win_rate: 0.4,
            dedupe_similarity: 0.92,
            max_text_bytes: 8 * 1024,
        }
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            router_url: "http://127.0.0.1:50052".into(),
            deployment: String::new(),
            tier: "budget".into(),
            keep_recent: 10,
            max_summary_tokens: 400,
            max_messages_per_summary: 200,
            timeout: Duration::from_secs(120),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:8082".into(),
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:50053".into(),
        }
    }
}

/// Upper bound for `max_message_bytes`: a token estimate must fit the `integer` column.
const MAX_MESSAGE_BYTES_CEILING: usize = 64 * 1024 * 1024;

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        colony_config::check_socket_addr(problems, "http.addr", &self.http.addr);
        colony_config::check_socket_addr(problems, "grpc.addr", &self.grpc.addr);
        self.database.validate(problems);
        self.bus.validate(problems);
        self.telemetry.validate(problems);
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
            problems.push(format!(
                "max_message_bytes: must be between 1 and {MAX_MESSAGE_BYTES_CEILING}"
            ));
        }
        if self.max_messages_per_append == 0 {
            problems.push("max_messages_per_append: must be at least 1".into());
        }
        if self.max_request_bytes < self.max_message_bytes {
            problems.push(
                "max_request_bytes: must be at least max_message_bytes, or no message could reach \
                 that limit"
                    .into(),
            );
        }
        if self.max_page_bytes == 0 {
            problems.push("max_page_bytes: must be at least 1".into());
        }
        if self.max_texts_per_embed == 0 {
            problems.push("max_texts_per_embed: must be at least 1".into());
        }
        if self.embedding.batch_size == 0 || self.embedding.queue_capacity == 0 {
            problems.push("embedding: batch_size and queue_capacity must be at least 1".into());
        }
        let unit = |value: f32| (0.0..=1.0).contains(&value);
        if !unit(self.semantic.dedupe_similarity) || !unit(self.strategies.dedupe_similarity) {
            problems.push(
                "semantic.dedupe_similarity, strategies.dedupe_similarity: must be between 0 and 1"
                    .into(),
            );
        }
        if !unit(self.strategies.min_win_rate) {
            problems.push("strategies.min_win_rate: must be between 0 and 1".into());
        }
        if !(self.semantic.recency_weight >= 0.0 && self.semantic.importance_weight >= 0.0) {
            problems.push(
                "semantic.recency_weight, semantic.importance_weight: must not be negative".into(),
            );
        }
        if self.semantic.recency_half_life.is_zero() {
            problems.push("semantic.recency_half_life: must be more than 0s".into());
        }
        if self.semantic.max_text_bytes == 0
            || self.semantic.max_text_bytes > self.max_request_bytes
        {
            problems
                .push("semantic.max_text_bytes: must be between 1 and max_request_bytes".into());
        }
        if self.semantic.max_memories_per_write == 0 || self.semantic.ef_search == 0 {
            problems.push(
                "semantic.max_memories_per_write, semantic.ef_search: must be at least 1".into(),
            );
        }
        if self.semantic.sync_interval.is_zero() || self.retention.sweep_interval.is_zero() {
            problems.push(
                "semantic.sync_interval, retention.sweep_interval: must be more than 0s".into(),
            );
        }
        if self.retention.tombstone_retention < self.semantic.sync_interval * 2 {
            problems.push(
                "retention.tombstone_retention: must be at least twice semantic.sync_interval, \
                 or a replica could miss a deletion"
                    .into(),
            );
        }
        if self.compression.keep_recent == 0 || self.compression.max_messages_per_summary == 0 {
            problems.push(
                "compression.keep_recent, compression.max_messages_per_summary: must be at least 1"
                    .into(),
            );
        }
        if self.embedding_provider == EmbeddingProvider::Router {
            colony_config::check_url(
                problems,
                "router_embeddings.url",
                &self.router_embeddings.url,
                &["http", "https"],
            );
            if self.router_embeddings.model.is_empty() || self.router_embeddings.dimensions == 0 {
                problems.push(
                    "router_embeddings: model and dimensions are required with embedding_provider = \"router\""
                        .into(),
                );
            }
        }
        colony_config::check_url(
            problems,
            "compression.router_url",
            &self.compression.router_url,
            &["http"],
        );
        if self.request_timeout.is_zero() {
            problems.push("request_timeout: must be more than 0s".into());
        }
        if self.shutdown_grace.is_zero() {
            problems.push("shutdown_grace: must be more than 0s".into());
        }
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
        assert_eq!(config.grpc.addr, "0.0.0.0:50053");
        assert_eq!(config.http.addr, "0.0.0.0:8082");
        assert_eq!(config.max_message_bytes, 256 * 1024);
        assert_eq!(config.max_messages_per_append, 256);
    }

    #[test]
    fn environment_sets_limits_and_sections() {
        let config = load(&[
            ("MEMORY__MAX_MESSAGE_BYTES", "1000"),
            ("MEMORY__MAX_MESSAGES_PER_APPEND", "3"),
            ("MEMORY__GRPC__ADDR", "127.0.0.1:0"),
            ("MEMORY__SHUTDOWN_GRACE", "2s"),
        ])
        .expect("the environment loads");
        assert_eq!(config.max_message_bytes, 1000);
        assert_eq!(config.max_messages_per_append, 3);
        assert_eq!(config.grpc.addr, "127.0.0.1:0");
        assert_eq!(config.shutdown_grace, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_are_all_reported() {
        let error = load(&[
            ("MEMORY__GRPC__ADDR", "nowhere"),
            ("MEMORY__MAX_MESSAGES_PER_APPEND", "0"),
            ("MEMORY__MAX_REQUEST_BYTES", "10"),
        ])
        .expect_err("bad values fail");
        let text = error.to_string();
        assert!(text.contains("grpc.addr"), "{text}");
        assert!(text.contains("max_messages_per_append"), "{text}");
        assert!(text.contains("max_request_bytes"), "{text}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = load(&[("MEMORY__MAX_MESSAGE_BYTEZ", "1")]).expect_err("unknown keys fail");
        assert!(error.to_string().contains("max_message_bytez"), "{error}");
    }
}
