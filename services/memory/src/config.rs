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
