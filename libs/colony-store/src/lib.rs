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
    let options = options.disable_statement_logging();
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
