//! Database helpers: connection pool from config and the embedded migrations in `migrations/`.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use sqlx;

/// Every schema's migrations, applied in order by whichever service starts first (sqlx takes
/// an advisory lock, so concurrent starts are safe).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database.url is not a valid PostgreSQL URL: {0}")]
    Url(String),
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect { target: String, source: sqlx::Error },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    #[serde(serialize_with = "serialize_secret")]
    pub url: SecretString,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Apply migrations at start.
    pub migrate: bool,
    /// How PostgreSQL plans Colony's prepared statements on these connections.
    pub plan_cache: PlanCache,
}

/// PostgreSQL's `plan_cache_mode` for a service's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanCache {
    /// One generic plan per prepared statement, reused (`force_generic_plan`). Colony's
    /// statements select by primary keys and fixed states, so a generic plan is as good as a
    /// custom one, and PostgreSQL's default re-planned several of the busiest on every call:
    /// about 40 % of its statement time in a 10,000-task drain (docs/benchmarks.md).
    #[default]
    Generic,
    /// PostgreSQL's own choice per statement (`auto`).
    Auto,
}

impl PlanCache {
    fn setting(self) -> &'static str {
        match self {
            Self::Generic => "force_generic_plan",
            Self::Auto => "auto",
        }
    }
}

fn serialize_secret<S: serde::Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("[REDACTED]")
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/colony"),
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
            migrate: true,
            plan_cache: PlanCache::default(),
        }
    }
}

impl DatabaseConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if let Err(e) = self.url.expose_secret().parse::<PgConnectOptions>() {
            problems.push(format!("database.url: not a PostgreSQL URL: {e}"));
        }
        if self.max_connections == 0 {
            problems.push("database.max_connections: must be at least 1".into());
        }
    }
}

/// Connects a pool and, when configured, applies migrations.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, Error> {
    let options: PgConnectOptions = config
        .url
        .expose_secret()
        .parse()
        .map_err(|e: sqlx::Error| Error::Url(e.to_string()))?;
    let options = options
        .disable_statement_logging()
        .options([("plan_cache_mode", config.plan_cache.setting())]);
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect_with(options)
        .await
        .map_err(|source| Error::Connect { target, source })?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    Ok(pool)
}
