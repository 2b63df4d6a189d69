//! Which replica fires schedules: the one holding a session-level PostgreSQL advisory lock on
//! a dedicated connection. The lock lives exactly as long as that session, so a crashed
//! leader's lock is gone as soon as PostgreSQL notices the connection closed, and another
//! replica takes it at its next tick. Leadership is an optimisation (one replica does the
//! work); exactly-once firing does not depend on it (see [`super::store`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};

/// The advisory lock key: "colonycr" in ASCII. Advisory locks are per database, so every
/// installation (and every test database) has its own leader.
pub const LOCK_KEY: i64 = 0x636f_6c6f_6e79_6372;

/// How long a check on the lock connection may take before the connection is given up (a
/// half-open connection would otherwise hang the loop).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Leadership {
    options: PgConnectOptions,
    /// The dedicated connection; it holds the lock while `leading`.
    conn: Option<PgConnection>,
    leading: Arc<AtomicBool>,
}

impl Leadership {
    /// Uses the pool's connection settings for its own connection outside the pool.
    pub fn new(pool: &PgPool) -> Self {
        Self {
            options: (*pool.connect_options()).clone(),
            conn: None,
            leading: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn flag(&self) -> Arc<AtomicBool> {
        self.leading.clone()
    }

    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// Whether this replica leads now. A leader checks that its session (and so its lock) is
    /// still alive; anyone else tries to take the lock.
    pub async fn check(&mut self) -> bool {
        let was_leading = self.is_leader();
        let leading = match tokio::time::timeout(CHECK_TIMEOUT, self.try_lead()).await {
            Ok(Ok(leading)) => leading,
            Ok(Err(error)) => {
                if was_leading {
                    tracing::warn!(%error, "cron leadership connection lost");
                } else {
                    tracing::debug!(%error, "cron leadership check failed");
                }
                self.conn = None;
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?CHECK_TIMEOUT, "cron leadership check timed out");
                self.conn = None;
                false
            }
        };
        if leading != was_leading {
            if leading {
                tracing::info!("cron leadership taken: this replica fires schedules");
            } else {
                tracing::warn!("cron leadership lost");
            }
        }
        self.leading.store(leading, Ordering::Relaxed);
        leading
    }

    async fn try_lead(&mut self) -> Result<bool, sqlx::Error> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self
                .conn
                .insert(PgConnection::connect_with(&self.options).await?),
        };
        if self.leading.load(Ordering::Relaxed) {
            sqlx::query("SELECT 1").execute(&mut *conn).await?;
            return Ok(true);
        }
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut *conn)
            .await
    }

    /// Gives the lock up (on shutdown) so another replica takes over at its next tick.
    pub async fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.leading.swap(false, Ordering::Relaxed) {
            if let Err(error) = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(LOCK_KEY)
                .execute(&mut conn)
                .await
            {
                tracing::warn!(%error, "cron leadership release failed; the lock goes with the connection");
            }
            tracing::info!("cron leadership released");
        }
        if let Err(error) = conn.close().await {
            tracing::debug!(%error, "cron leadership connection did not close cleanly");
        }
    }
}
