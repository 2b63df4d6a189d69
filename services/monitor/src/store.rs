//! The `monitor` schema: the worker registry.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::Error;
use crate::events::Heartbeat;

/// A registered worker as the status API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Worker {
    pub worker_id: String,
    pub roles: Vec<String>,
    pub slots_total: u32,
    pub slots_busy: u32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Seen within `worker_stale_after` (up or suspect).
    pub alive: bool,
    pub state: WorkerState,
}

/// Where a worker stands by its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Seen within `worker_suspect_after`.
    Up,
    /// Silent for longer than `worker_suspect_after`, not yet `worker_stale_after`.
    Suspect,
    /// Silent for longer than `worker_stale_after`.
    Dead,
}

impl WorkerState {
    pub const ALL: [WorkerState; 3] = [WorkerState::Up, WorkerState::Suspect, WorkerState::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Up => "up",
            WorkerState::Suspect => "suspect",
            WorkerState::Dead => "dead",
        }
    }

    fn parse(state: &str) -> Self {
        match state {
            "up" => WorkerState::Up,
            "suspect" => WorkerState::Suspect,
            _ => WorkerState::Dead,
        }
    }
}

/// How long a silent worker stays up, then suspect, before it is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub suspect_after: Duration,
    pub dead_after: Duration,
}

/// Workers in the registry by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerCounts {
    pub up: u64,
    pub suspect: u64,
    pub dead: u64,
}

impl WorkerCounts {
    /// Up or suspect: not given up on.
    pub fn alive(&self) -> u64 {
        self.up + self.suspect
    }

    pub fn of(&self, state: WorkerState) -> u64 {
        match state {
            WorkerState::Up => self.up,
            WorkerState::Suspect => self.suspect,
            WorkerState::Dead => self.dead,
        }
    }
}

/// A worker's state from its last heartbeat, in SQL (`$1` suspect after, `$2` dead after, in
/// seconds).
const STATE_SQL: &str = "CASE WHEN last_seen_at > now() - make_interval(secs => $1) THEN 'up' \
      WHEN last_seen_at > now() - make_interval(secs => $2) THEN 'suspect' ELSE 'dead' END";

/// Access to the monitor tables. Only this service reads or writes them.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn slots(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Records a heartbeat. `last_seen_at` is the heartbeat's send time, never later than now
    /// (a fast worker clock cannot keep it alive), and never moves backwards: a redelivered or
    /// reordered older heartbeat changes nothing.
    pub async fn record_heartbeat(&self, beat: &Heartbeat) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO monitor.workers \
                 (worker_id, roles, slots_total, slots_busy, version, started_at, last_seen_at) \
             VALUES ($1, $2, $3, $4, $5, COALESCE($6, now()), LEAST(COALESCE($7, now()), now())) \
             ON CONFLICT (worker_id) DO UPDATE SET \
                 roles = EXCLUDED.roles, slots_total = EXCLUDED.slots_total, \
                 slots_busy = EXCLUDED.slots_busy, version = EXCLUDED.version, \
                 started_at = EXCLUDED.started_at, last_seen_at = EXCLUDED.last_seen_at \
             WHERE monitor.workers.last_seen_at <= EXCLUDED.last_seen_at",
        )
        .bind(&beat.worker_id)
        .bind(&beat.roles)
        .bind(slots(beat.slots_total))
        .bind(slots(beat.slots_busy))
        .bind(&beat.version)
        .bind(beat.started_at)
        .bind(beat.sent_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every registered worker, most recently seen first.
    pub async fn workers(&self, liveness: Liveness) -> Result<Vec<Worker>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT worker_id, roles, slots_total, slots_busy, version, started_at, last_seen_at, \
                    {STATE_SQL} AS state \
             FROM monitor.workers ORDER BY last_seen_at DESC, worker_id"
        ))
        .bind(seconds(liveness.suspect_after))
        .bind(seconds(liveness.dead_after))
        .fetch_all(&self.pool)
        .await?;
        let workers = rows
            .iter()
            .map(|row| {
                let state = WorkerState::parse(row.try_get("state")?);
                let slots_total: i32 = row.try_get("slots_total")?;
                let slots_busy: i32 = row.try_get("slots_busy")?;
                Ok(Worker {
                    worker_id: row.try_get("worker_id")?,
                    roles: row.try_get("roles")?,
                    slots_total: u32::try_from(slots_total).unwrap_or(0),
                    slots_busy: u32::try_from(slots_busy).unwrap_or(0),
                    version: row.try_get("version")?,
                    started_at: row.try_get("started_at")?,
                    last_seen_at: row.try_get("last_seen_at")?,
                    alive: state != WorkerState::Dead,
                    state,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(workers)
    }

    /// How many registered workers are in each state.
    pub async fn counts(&self, liveness: Liveness) -> Result<WorkerCounts, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {STATE_SQL} AS state, count(*) AS workers FROM monitor.workers GROUP BY 1"
        ))
        .bind(seconds(liveness.suspect_after))
        .bind(seconds(liveness.dead_after))
        .fetch_all(&self.pool)
        .await?;
        let mut counts = WorkerCounts {
            up: 0,
            suspect: 0,
            dead: 0,
        };
        for row in rows {
            let workers = u64::try_from(row.try_get::<i64, _>("workers")?).unwrap_or(0);
            match WorkerState::parse(row.try_get("state")?) {
                WorkerState::Up => counts.up = workers,
                WorkerState::Suspect => counts.suspect = workers,
                WorkerState::Dead => counts.dead = workers,
            }
        }
        Ok(counts)
    }

    /// Dead workers' ids and when they were last seen, oldest first.
    pub async fn dead_workers(
        &self,
        stale_after: Duration,
    ) -> Result<Vec<(String, DateTime<Utc>)>, Error> {
        let rows = sqlx::query(
            "SELECT worker_id, last_seen_at FROM monitor.workers \
             WHERE last_seen_at <= now() - make_interval(secs => $1) ORDER BY last_seen_at",
        )
        .bind(seconds(stale_after))
        .fetch_all(&self.pool)
        .await?;
        let dead = rows
            .iter()
            .map(|row| Ok((row.try_get("worker_id")?, row.try_get("last_seen_at")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(dead)
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Workers that died within `window`: silent past `dead_after`, but not by more than
    /// `window` more.
    pub async fn recently_dead(
        &self,
        dead_after: Duration,
        window: Duration,
    ) -> Result<u64, Error> {
        let dead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM monitor.workers \
             WHERE last_seen_at <= now() - make_interval(secs => $1) \
               AND last_seen_at > now() - make_interval(secs => $1 + $2)",
        )
        .bind(seconds(dead_after))
        .bind(seconds(window))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(dead).unwrap_or(0))
    }

    /// Forgets workers not seen for `retention`. Returns how many were removed.
    pub async fn prune(&self, retention: Duration) -> Result<u64, Error> {
        let result = sqlx::query(
            "DELETE FROM monitor.workers WHERE last_seen_at < now() - make_interval(secs => $1)",
        )
        .bind(seconds(retention))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }
}
