//! Schedules and their firings in PostgreSQL.
//!
//! A firing is one transaction: lock the due schedule (`FOR UPDATE SKIP LOCKED`, so replicas
//! never take the same one), insert `(schedule_id, fire_at)` into `schedule_firings` (its
//! primary key refuses a second insert of the same firing), create the run through
//! [`Store::create_run_in`], and move the schedule's next fire time past `now`. Either all of
//! it commits or none of it does, so a firing happens once even with two leaders, a retried
//! tick or a crash half-way.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::schedule::{self, CronSpec, FireKind, Missed};
use super::{Error, SpecError};
use crate::metrics;
use crate::store::{Refusal, Store};

const COLUMNS: &str = "id, tenant, name, cron, timezone, goal, missed, enabled, next_fire_at, \
                       last_fire_at, last_fired_at, last_kind, last_run_id, created_at, updated_at";

/// A schedule as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: Uuid,
    pub tenant: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub goal: String,
    pub missed: String,
    pub enabled: bool,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fire_at: Option<DateTime<Utc>>,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub last_kind: Option<String>,
    pub last_run_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ScheduleRow {
    pub fn spec(&self) -> Result<CronSpec, SpecError> {
        CronSpec::parse(&self.cron, &self.timezone)
    }

    /// The stored policy; an unknown value (impossible under the table's CHECK) reads as skip.
    pub fn missed_policy(&self) -> Missed {
        Missed::parse(&self.missed).unwrap_or_default()
    }
}

/// What a new schedule is made of, validated.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub tenant: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub spec: CronSpec,
    pub goal: String,
    pub missed: Missed,
    pub enabled: bool,
}

/// One firing that created a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Firing {
    pub schedule_id: Uuid,
    pub fire_at: DateTime<Utc>,
    #[serde(serialize_with = "kind_name")]
    pub kind: FireKind,
    pub run_id: Uuid,
}

fn kind_name<S: serde::Serializer>(kind: &FireKind, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(kind.as_str())
}

/// What one tick did.
#[derive(Debug, Default)]
pub struct TickReport {
    pub fired: Vec<Firing>,
    /// Late firings dropped (`skip`) or folded into a catch-up run (`catch_up`).
    pub missed: u64,
    /// Firings another replica had already made (refused by the primary key).
    pub duplicates: u64,
    /// Schedules whose stored expression no longer parses; they were disabled.
    pub invalid: u64,
    /// The error that ended the tick early, if one did.
    pub error: Option<Error>,
}

#[derive(Clone)]
pub struct Schedules {
    pool: PgPool,
    /// Runs are planned, gated and admitted as the API's are.
    store: Store,
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

fn count(outcome: &'static str, by: u64) {
    if by > 0 {
        ::metrics::counter!(metrics::SCHEDULE_FIRINGS, "outcome" => outcome).increment(by);
    }
}

/// What one attempt at the next due schedule did.
enum Step {
    /// Nothing is due.
    Idle,
    Done {
        fired: Option<Firing>,
        missed: u32,
        duplicate: bool,
        invalid: bool,
    },
}

impl Schedules {
    pub fn new(store: &Store) -> Self {
        Self {
            pool: store.pool().clone(),
            store: store.clone(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Stores a new schedule whose first fire time is the first after `now` (none while
    /// disabled). A second schedule of the same name in a tenant is a conflict.
    pub async fn create(
        &self,
        new: &NewSchedule,
        now: DateTime<Utc>,
        max_per_tenant: u32,
    ) -> Result<ScheduleRow, Error> {
        let existing: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orchestrator.schedules WHERE tenant = $1")
                .bind(&new.tenant)
                .fetch_one(&self.pool)
                .await?;
        if existing >= i64::from(max_per_tenant) {
            return Err(Error::invalid(
                "too_many_schedules",
                format!(
                    "tenant {} already has {existing} schedules; the limit is {max_per_tenant}",
                    new.tenant
                ),
            ));
        }
        let next = if new.enabled {
            new.spec.next_after(now)
        } else {
            None
        };
        sqlx::query_as::<_, ScheduleRow>(&format!(
            "INSERT INTO orchestrator.schedules \
                 (id, tenant, name, cron, timezone, goal, missed, enabled, next_fire_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(&new.tenant)
        .bind(&new.name)
        .bind(&new.cron)
        .bind(&new.timezone)
        .bind(&new.goal)
        .bind(new.missed.as_str())
        .bind(new.enabled)
        .bind(next)
        .fetch_one(&self.pool)
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                Error::Conflict(format!("a schedule named {:?} already exists", new.name))
            } else {
                error.into()
            }
        })
    }

    /// A tenant's schedules by name.
    pub async fn list(&self, tenant: &str) -> Result<Vec<ScheduleRow>, Error> {
        Ok(sqlx::query_as::<_, ScheduleRow>(&format!(
            "SELECT {COLUMNS} FROM orchestrator.schedules WHERE tenant = $1 ORDER BY name"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One schedule as its tenant sees it; another tenant's is "not found".
    pub async fn get(&self, tenant: &str, id: Uuid) -> Result<ScheduleRow, Error> {
        sqlx::query_as::<_, ScheduleRow>(&format!(
            "SELECT {COLUMNS} FROM orchestrator.schedules WHERE id = $1 AND tenant = $2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    async fn lock(conn: &mut PgConnection, tenant: &str, id: Uuid) -> Result<ScheduleRow, Error> {
        sqlx::query_as::<_, ScheduleRow>(&format!(
            "SELECT {COLUMNS} FROM orchestrator.schedules WHERE id = $1 AND tenant = $2 FOR UPDATE"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Enables (next fire time: the first after `now`; firings while it was disabled are not
    /// caught up) or disables (no next fire time) a schedule. Doing it twice changes nothing.
    pub async fn set_enabled(
        &self,
        tenant: &str,
        id: Uuid,
        enabled: bool,
        now: DateTime<Utc>,
    ) -> Result<ScheduleRow, Error> {
        let mut tx = self.pool.begin().await?;
        let row = Self::lock(&mut tx, tenant, id).await?;
        if row.enabled == enabled {
            return Ok(row);
        }
        let next = if enabled {
            row.spec()?.next_after(now)
        } else {
            None
        };
        let row = sqlx::query_as::<_, ScheduleRow>(&format!(
            "UPDATE orchestrator.schedules SET enabled = $2, next_fire_at = $3, updated_at = now() \
             WHERE id = $1 RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(enabled)
        .bind(next)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Deletes a schedule and its firing history (the runs it created stay).
    pub async fn delete(&self, tenant: &str, id: Uuid) -> Result<(), Error> {
        let deleted =
            sqlx::query("DELETE FROM orchestrator.schedules WHERE id = $1 AND tenant = $2")
                .bind(id)
                .bind(tenant)
                .execute(&self.pool)
                .await?
                .rows_affected();
        if deleted == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// Fires a schedule now, enabled or not, without moving its next fire time.
    pub async fn run_now(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<(ScheduleRow, Firing), Error> {
        if let Err(Refusal::QueueFull) = self.store.admit(tenant, 0).await {
            return Err(Error::Store(crate::Error::Overloaded {
                reason: "queue_full",
                message: format!(
                    "tenant {tenant} has {} or more queued tasks; retry later",
                    self.store.limits().max_queued_per_tenant
                ),
                retry_after: std::time::Duration::from_secs(1),
            }));
        }
        let mut tx = self.pool.begin().await?;
        let row = Self::lock(&mut tx, tenant, id).await?;
        let Some(firing) = self.fire(&mut tx, &row, now, FireKind::Manual, 0).await? else {
            return Err(Error::Conflict(format!(
                "schedule {id} already fired at {now}; try again"
            )));
        };
        let row = Self::record_last(&mut tx, &row, &firing, row.next_fire_at).await?;
        tx.commit().await?;
        self.store.wake_dispatcher();
        count("manual", 1);
        Ok((row, firing))
    }

    /// Makes the firings due at `now`, at most `batch` of them, one transaction each. Safe to
    /// run on several replicas at once.
    pub async fn fire_due(&self, now: DateTime<Utc>, grace: Duration, batch: u32) -> TickReport {
        let mut report = TickReport::default();
        for _ in 0..batch {
            match self.fire_next_due(now, grace).await {
                Ok(Step::Idle) => break,
                Ok(Step::Done {
                    fired,
                    missed,
                    duplicate,
                    invalid,
                }) => {
                    report.missed += u64::from(missed);
                    report.duplicates += u64::from(duplicate);
                    report.invalid += u64::from(invalid);
                    report.fired.extend(fired);
                }
                Err(error) => {
                    count("failed", 1);
                    report.error = Some(error);
                    break;
                }
            }
        }
        report
    }

    async fn fire_next_due(&self, now: DateTime<Utc>, grace: Duration) -> Result<Step, Error> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query_as::<_, ScheduleRow>(&format!(
            "SELECT {COLUMNS} FROM orchestrator.schedules \
             WHERE enabled AND next_fire_at <= $1 \
             ORDER BY next_fire_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(Step::Idle);
        };
        let (Some(due), Ok(spec)) = (row.next_fire_at, row.spec()) else {
            // Stored before a rule changed (a zone gone from the tz database): stop it rather
            // than let it block the loop, and say so.
            sqlx::query(
                "UPDATE orchestrator.schedules SET enabled = false, next_fire_at = NULL, \
                     updated_at = now() WHERE id = $1",
            )
            .bind(row.id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::error!(schedule_id = %row.id, cron = %row.cron, timezone = %row.timezone,
                "schedule no longer parses; disabled");
            count("invalid", 1);
            return Ok(Step::Done {
                fired: None,
                missed: 0,
                duplicate: false,
                invalid: true,
            });
        };
        let plan = schedule::plan(&spec, row.missed_policy(), due, now, grace);
        let mut fired = None;
        let mut duplicate = false;
        let mut refused = false;
        // The tenant's queue bound holds for scheduled runs too: a firing it refuses is
        // skipped like a missed one, and the schedule moves on.
        let admitted = match plan.fire {
            Some(_) => !matches!(
                self.store.admit(&row.tenant, 0).await,
                Err(Refusal::QueueFull)
            ),
            None => false,
        };
        if let Some((fire_at, kind)) = plan.fire.filter(|_| admitted) {
            match self.fire(&mut tx, &row, fire_at, kind, plan.missed).await? {
                Some(firing) => fired = Some(firing),
                None => duplicate = true,
            }
        }
        match &fired {
            Some(firing) => {
                Self::record_last(&mut tx, &row, firing, plan.next).await?;
            }
            None => {
                refused = plan.fire.is_some() && !admitted;
                sqlx::query(
                    "UPDATE orchestrator.schedules SET next_fire_at = $2, updated_at = now() \
                     WHERE id = $1",
                )
                .bind(row.id)
                .bind(plan.next)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        if fired.is_some() {
            self.store.wake_dispatcher();
        }

        count("missed", u64::from(plan.missed));
        count("duplicate", u64::from(duplicate));
        count("refused", u64::from(refused));
        if refused {
            tracing::warn!(schedule_id = %row.id, tenant = %row.tenant,
                "schedule firing refused: the tenant's queue is full");
        }
        if plan.missed > 0 {
            tracing::warn!(schedule_id = %row.id, missed = plan.missed, policy = %row.missed,
                "schedule missed firings");
        }
        if let Some(firing) = &fired {
            count(
                match firing.kind {
                    FireKind::CatchUp => "caught_up",
                    FireKind::Scheduled | FireKind::Manual => "fired",
                },
                1,
            );
            tracing::info!(schedule_id = %row.id, run_id = %firing.run_id,
                fire_at = %firing.fire_at, kind = firing.kind.as_str(), "schedule fired");
        }
        if plan.next.is_none() {
            tracing::warn!(schedule_id = %row.id, "schedule has no further fire time");
        }
        Ok(Step::Done {
            fired,
            missed: plan.missed,
            duplicate,
            invalid: false,
        })
    }

    /// Records the firing `(schedule, fire_at)` and creates its run, in the caller's
    /// transaction. `None` if that firing was already made: nothing is created.
    async fn fire(
        &self,
        conn: &mut PgConnection,
        row: &ScheduleRow,
        fire_at: DateTime<Utc>,
        kind: FireKind,
        missed: u32,
    ) -> Result<Option<Firing>, Error> {
        let claimed = sqlx::query(
            "INSERT INTO orchestrator.schedule_firings (schedule_id, fire_at, kind, missed) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (schedule_id, fire_at) DO NOTHING",
        )
        .bind(row.id)
        .bind(fire_at)
        .bind(kind.as_str())
        .bind(i32::try_from(missed).unwrap_or(i32::MAX))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if claimed == 0 {
            tracing::info!(schedule_id = %row.id, %fire_at, "firing already made elsewhere");
            return Ok(None);
        }
        // Planned like an API run with no options: the dial, the roster's template, the
        // approval gate.
        let new = self
            .store
            .plan_run(row.tenant.clone(), row.goal.clone(), None, None, None)?;
        let (run_id, _) = self.store.create_dag_run_in(&mut *conn, &new).await?;
        sqlx::query(
            "UPDATE orchestrator.schedule_firings SET run_id = $3 \
             WHERE schedule_id = $1 AND fire_at = $2",
        )
        .bind(row.id)
        .bind(fire_at)
        .bind(run_id)
        .execute(&mut *conn)
        .await?;
        crate::store::count_created(&new);
        Ok(Some(Firing {
            schedule_id: row.id,
            fire_at,
            kind,
            run_id,
        }))
    }

    async fn record_last(
        conn: &mut PgConnection,
        row: &ScheduleRow,
        firing: &Firing,
        next: Option<DateTime<Utc>>,
    ) -> Result<ScheduleRow, Error> {
        Ok(sqlx::query_as::<_, ScheduleRow>(&format!(
            "UPDATE orchestrator.schedules SET next_fire_at = $2, last_fire_at = $3, \
                 last_fired_at = now(), last_kind = $4, last_run_id = $5, updated_at = now() \
             WHERE id = $1 RETURNING {COLUMNS}"
        ))
        .bind(row.id)
        .bind(next)
        .bind(firing.fire_at)
        .bind(firing.kind.as_str())
        .bind(firing.run_id)
        .fetch_one(&mut *conn)
        .await?)
    }
}
