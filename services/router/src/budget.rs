//! Hard spending budgets in micro-USD, per tenant (from config), per run and per task (named by
//! the request), kept in `router.budgets`.
//!
//! Before a call goes to a provider, [`Budgets::reserve`] reserves its worst-case cost on every
//! budget that applies, atomically (all of them or none); the ledger later settles the
//! reservation to the actual cost (`reserved -= reservation`, `spent += actual`). A call is
//! refused when `spent + reserved + its reservation` would pass any one limit, so concurrent
//! calls can never together spend more than a limit plus one call's overrun of its own
//! reservation.
//!
//! Run and task ids are ids the orchestrator issues, unique across tenants, so a run's or task's
//! budget is keyed by its id alone.
//!
//! Budgets are totals, not per period: nothing resets `spent`. A reservation whose call never
//! reaches the ledger (the process died with the entry in memory, see [`crate::ledger`]) stays
//! reserved, holding that much of the budget back until an operator lowers
//! `reserved_micros`; there is no expiry.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock};

use sqlx::{PgConnection, PgPool, Row};

/// Which kind of budget a row is. The order is the order rows are locked in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Run,
    Task,
    Tenant,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Run => "run",
            Scope::Task => "task",
            Scope::Tenant => "tenant",
        }
    }

    fn from_db(value: &str) -> Self {
        match value {
            "run" => Scope::Run,
            "task" => Scope::Task,
            _ => Scope::Tenant,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run's or task's budget as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The run id or task id.
    pub id: String,
    /// Used only by the first call that names `id`; later calls are held to that first limit,
    /// whatever they name, so a retry cannot raise its own budget.
    pub micros: u64,
}

/// The budgets one call is held to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Held to the tenant's configured limit, if it has one.
    pub tenant: String,
    pub run: Option<Limit>,
    pub task: Option<Limit>,
}

/// Budget rows a granted call holds `amount` on, until the ledger settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub amount: u64,
    /// (scope, key) of every row reserved on.
    pub rows: Vec<(Scope, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The call needs more than is left of one budget. `left` in the message is
    /// `limit - spent - reserved`.
    #[error(
        "the {scope} budget of {key:?} cannot cover this call: {left} of {limit} micro-USD left \
         ({spent} spent, {reserved} reserved by calls in flight), the call needs up to {needed}; \
         raise the {scope} budget or ask for fewer max_tokens",
        left = limit.saturating_sub(spent.saturating_add(*reserved))
    )]
    Exceeded {
        scope: Scope,
        key: String,
        limit: u64,
        spent: u64,
        reserved: u64,
        needed: u64,
    },
    #[error("budget database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The tenants with a configured limit, cached so that calls of tenants without one (and
/// without run or task budgets) never touch the database. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Budgets {
    limited_tenants: Arc<RwLock<HashSet<String>>>,
}

fn db_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_db(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl Budgets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies the configured tenant limits: `Some` creates the tenant's budget or changes its
    /// limit (keeping what it has spent and reserved), `None` deletes it. Tenants not listed
    /// are left as they are in the database but are not enforced by this process.
    pub async fn set_tenant_limits(
        &self,
        pool: &PgPool,
        limits: &[(String, Option<u64>)],
    ) -> Result<(), Error> {
        let (set, unset): (Vec<_>, Vec<_>) = limits.iter().partition(|(_, limit)| limit.is_some());
        let set_names: Vec<&str> = set.iter().map(|(name, _)| name.as_str()).collect();
        let set_limits: Vec<i64> = set
            .iter()
            .map(|(_, limit)| db_int(limit.unwrap_or(0)))
            .collect();
        let unset_names: Vec<&str> = unset.iter().map(|(name, _)| name.as_str()).collect();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO router.budgets (scope, key, tenant, limit_micros) \
             SELECT 'tenant', t.name, t.name, t.lim FROM unnest($1::text[], $2::bigint[]) \
                 AS t(name, lim) ORDER BY t.name \
             ON CONFLICT (scope, key) DO UPDATE \
             SET limit_micros = EXCLUDED.limit_micros, updated_at = now()",
        )
        .bind(&set_names)
        .bind(&set_limits)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM router.budgets WHERE scope = 'tenant' AND key = ANY($1)")
            .bind(&unset_names)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut limited = match self.limited_tenants.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for name in unset_names {
            limited.remove(name);
        }
        limited.extend(set_names.into_iter().map(str::to_owned));
        Ok(())
    }

    fn tenant_is_limited(&self, tenant: &str) -> bool {
        match self.limited_tenants.read() {
            Ok(guard) => guard.contains(tenant),
            Err(poisoned) => poisoned.into_inner().contains(tenant),
        }
    }

    /// Reserves `amount` on every budget that applies to `request`, in one statement: all of
    /// them or none. `Ok(None)` without touching the database when none applies;
    /// [`Error::Exceeded`] (naming the first budget, in lock order, that cannot cover it) when
    /// any one would pass its limit.
    pub async fn reserve(
        &self,
        pool: &PgPool,
        request: &Request,
        amount: u64,
    ) -> Result<Option<Reservation>, Error> {
        let mut rows: Vec<(Scope, String, u64)> = Vec::with_capacity(3);
        if let Some(run) = &request.run {
            rows.push((Scope::Run, run.id.clone(), run.micros));
        }
        if let Some(task) = &request.task {
            rows.push((Scope::Task, task.id.clone(), task.micros));
        }
        if self.tenant_is_limited(&request.tenant) {
            rows.push((Scope::Tenant, request.tenant.clone(), 0));
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let scopes: Vec<&str> = rows.iter().map(|(scope, ..)| scope.as_str()).collect();
        let keys: Vec<&str> = rows.iter().map(|(_, key, _)| key.as_str()).collect();
        let limits: Vec<i64> = rows.iter().map(|(.., limit)| db_int(*limit)).collect();
        let found = sqlx::query(
            "SELECT o_scope, o_key, o_limit, o_reserved, o_spent, o_granted \
             FROM router.budget_reserve($1, $2, $3, $4, $5)",
        )
        .bind(&scopes)
        .bind(&keys)
        .bind(&limits)
        .bind(&request.tenant)
        .bind(db_int(amount))
        .fetch_all(pool)
        .await?;
        let granted = found
            .first()
            .map(|row| row.get::<bool, _>("o_granted"))
            .unwrap_or(true);
        if !granted {
            // The database refused, so some row is over; the first one is named (a refusal is
            // never turned into a grant, even if no row looked over here).
            let over = found
                .iter()
                .find(|row| {
                    let limit = row.get::<i64, _>("o_limit");
                    let used = row
                        .get::<i64, _>("o_spent")
                        .saturating_add(row.get::<i64, _>("o_reserved"));
                    used.saturating_add(db_int(amount)) > limit
                })
                .or(found.first());
            if let Some(row) = over {
                return Err(Error::Exceeded {
                    scope: Scope::from_db(row.get("o_scope")),
                    key: row.get("o_key"),
                    limit: from_db(row.get("o_limit")),
                    spent: from_db(row.get("o_spent")),
                    reserved: from_db(row.get("o_reserved")),
                    needed: amount,
                });
            }
        }
        let rows = found
            .iter()
            .map(|row| (Scope::from_db(row.get("o_scope")), row.get("o_key")))
            .collect();
        Ok(Some(Reservation { amount, rows }))
    }
}

/// A tenant's budget as it stands, in micro-USD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantBudget {
    pub tenant: String,
    pub limit: u64,
    pub spent: u64,
    pub reserved: u64,
}

/// Every tenant budget in the database, those of tenants this process's configuration does
/// not list included (another replica may enforce them; see [`Budgets::set_tenant_limits`]).
pub async fn tenant_budgets(pool: &PgPool) -> Result<Vec<TenantBudget>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT key, limit_micros, spent_micros, reserved_micros FROM router.budgets \
         WHERE scope = 'tenant' ORDER BY key",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| TenantBudget {
            tenant: row.get("key"),
            limit: from_db(row.get("limit_micros")),
            spent: from_db(row.get("spent_micros")),
            reserved: from_db(row.get("reserved_micros")),
        })
        .collect())
}

/// Sets the tenant budget gauges every `every` until `shutdown`. Every replica reads the
/// whole table, so every replica reports every tenant: aggregate with `max`, not `sum`.
pub async fn report_tenant_budgets(
    pool: PgPool,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut gauges = colony_telemetry::GaugeSet::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tenant_budgets(&pool).await {
            Ok(budgets) => crate::metrics::tenant_budgets(&mut gauges, &budgets),
            Err(error) => tracing::warn!(%error, "reading the tenant budget gauges failed"),
        }
    }
}

/// Settles one reservation to what the call actually cost (see [`settle_many`]); `actual` 0
/// releases it.
pub async fn settle(
    pool: &PgPool,
    reservation: &Reservation,
    actual: u64,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    settle_many(&mut conn, &[(reservation, actual)]).await
}

/// Settles reservations to their actual cost in one statement: `reserved -= reservation`,
/// `spent += actual` on each reserved row, summed per row. `actual` may pass the reservation (a
/// provider that overran max_tokens); it is charged all the same. Rows are locked in the same
/// order [`Budgets::reserve`] locks them, so settling and reserving never deadlock. Run it last
/// in its transaction: the locks are held until commit.
pub async fn settle_many(
    conn: &mut PgConnection,
    settlements: &[(&Reservation, u64)],
) -> Result<(), sqlx::Error> {
    let mut totals: BTreeMap<(Scope, &str), (u64, u64)> = BTreeMap::new();
    for (reservation, actual) in settlements {
        for (scope, key) in &reservation.rows {
            let total = totals.entry((*scope, key.as_str())).or_default();
            total.0 = total.0.saturating_add(reservation.amount);
            total.1 = total.1.saturating_add(*actual);
        }
    }
    if totals.is_empty() {
        return Ok(());
    }
    let scopes: Vec<&str> = totals.keys().map(|(scope, _)| scope.as_str()).collect();
    let keys: Vec<&str> = totals.keys().map(|(_, key)| *key).collect();
    let released: Vec<i64> = totals.values().map(|(r, _)| db_int(*r)).collect();
    let spent: Vec<i64> = totals.values().map(|(_, s)| db_int(*s)).collect();
    // `greatest` keeps a row valid if it was recreated (its limit removed and set again)
    // while a reservation on it was in flight.
    sqlx::query(
        "WITH s AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
                        AS s(scope, key, released, spent)), \
              locked AS (SELECT b.scope, b.key FROM router.budgets b \
                         JOIN s ON b.scope = s.scope AND b.key = s.key \
                         ORDER BY b.scope, b.key FOR UPDATE OF b) \
         UPDATE router.budgets b \
         SET reserved_micros = greatest(b.reserved_micros - s.released, 0), \
             spent_micros = b.spent_micros + s.spent, updated_at = now() \
         FROM s, locked l \
         WHERE b.scope = s.scope AND b.key = s.key AND l.scope = s.scope AND l.key = s.key",
    )
    .bind(&scopes)
    .bind(&keys)
    .bind(&released)
    .bind(&spent)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceeded_says_which_budget_what_is_left_and_what_the_call_needs() {
        let error = Error::Exceeded {
            scope: Scope::Run,
            key: "run-1".into(),
            limit: 1000,
            spent: 500,
            reserved: 200,
            needed: 400,
        };
        assert_eq!(
            error.to_string(),
            "the run budget of \"run-1\" cannot cover this call: 300 of 1000 micro-USD left \
             (500 spent, 200 reserved by calls in flight), the call needs up to 400; raise the \
             run budget or ask for fewer max_tokens"
        );
    }

    #[test]
    fn scopes_sort_in_the_database_lock_order() {
        let mut scopes = [Scope::Tenant, Scope::Task, Scope::Run];
        scopes.sort();
        let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }
}
