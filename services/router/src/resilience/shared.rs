//! A deployment's rate buckets in PostgreSQL (`router.rate_buckets`), shared by every router
//! replica. Each operation is one statement; the database's clock does the refilling, so the
//! replicas' clocks never have to agree.
//!
//! Rows are locked in `kind` order by every statement that touches more than one, so two
//! replicas leasing both kinds at once never deadlock. The pattern is the one
//! `router.budget_reserve` explains: under READ COMMITTED, `FOR UPDATE` waits for a concurrent
//! writer and then reads the row's newest version, and the UPDATE rewrites that same version, so
//! no lease is ever computed from a level another one already spent.

use sqlx::{PgPool, Row};

/// Which of a deployment's limits a bucket enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Requests,
    Tokens,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        }
    }

    fn from_db(value: &str) -> Option<Self> {
        match value {
            "requests" => Some(Kind::Requests),
            "tokens" => Some(Kind::Tokens),
            _ => None,
        }
    }
}

/// What one lease took from one shared bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lease {
    pub kind: Kind,
    pub granted: f64,
    /// The shared level the lease left behind.
    pub remaining: f64,
}

/// The shared buckets of one deployment.
#[derive(Debug, Clone)]
pub struct SharedBuckets {
    pool: PgPool,
    deployment: String,
    /// The configured per-minute limit of each kind this deployment limits.
    capacities: Vec<(Kind, f64)>,
}

/// The level of bucket `b` refilled up to `now()`. `now()` is the statement's start; a statement
/// that waited for a lock may see an `updated_at` later than its own `now()`, hence `greatest`
/// here and in every `updated_at` written (time is never counted twice).
const REFILLED: &str = "least(b.capacity, b.level + \
     greatest(0, extract(epoch FROM now() - b.updated_at))::float8 * b.per_second)";

impl SharedBuckets {
    pub fn new(pool: PgPool, deployment: &str, capacities: Vec<(Kind, f64)>) -> Self {
        let mut capacities = capacities;
        capacities.sort_by_key(|(kind, _)| *kind);
        Self {
            pool,
            deployment: deployment.to_owned(),
            capacities,
        }
    }

    /// Creates the buckets (full) or applies a changed limit: the level is kept, clipped to the
    /// new capacity, and refilled at the new rate from now on.
    pub async fn sync(&self) -> Result<(), sqlx::Error> {
        let kinds: Vec<&str> = self.capacities.iter().map(|(k, _)| k.as_str()).collect();
        let capacities: Vec<f64> = self.capacities.iter().map(|(_, c)| *c).collect();
        sqlx::query(&format!(
            "INSERT INTO router.rate_buckets AS b \
                 (deployment, kind, capacity, per_second, level, updated_at) \
             SELECT $1, k.kind, k.capacity, k.capacity / 60, k.capacity, now() \
             FROM unnest($2::text[], $3::float8[]) AS k(kind, capacity) ORDER BY k.kind \
             ON CONFLICT (deployment, kind) DO UPDATE \
             SET level = least(EXCLUDED.capacity, {REFILLED}), \
                 capacity = EXCLUDED.capacity, per_second = EXCLUDED.per_second, \
                 updated_at = greatest(b.updated_at, now())"
        ))
        .bind(&self.deployment)
        .bind(&kinds)
        .bind(&capacities)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes up to `wanted` from each named bucket: what it holds after refilling, at most
    /// `wanted` (0 asks for nothing but still reports the level). A bucket missing from the
    /// table (never synced, or deleted by hand) is created first.
    pub async fn lease(&self, wanted: &[(Kind, f64)]) -> Result<Vec<Lease>, sqlx::Error> {
        let leases = self.lease_once(wanted).await?;
        if leases.len() == wanted.len() {
            return Ok(leases);
        }
        self.sync().await?;
        self.lease_once(wanted).await
    }

    async fn lease_once(&self, wanted: &[(Kind, f64)]) -> Result<Vec<Lease>, sqlx::Error> {
        let kinds: Vec<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
        let amounts: Vec<f64> = wanted.iter().map(|(_, a)| a.max(0.0)).collect();
        let rows = sqlx::query(&format!(
            "WITH locked AS ( \
                 SELECT b.kind, w.wanted, {REFILLED} AS available \
                 FROM router.rate_buckets b \
                 JOIN unnest($2::text[], $3::float8[]) AS w(kind, wanted) ON b.kind = w.kind \
                 WHERE b.deployment = $1 ORDER BY b.kind FOR UPDATE OF b \
             ), took AS ( \
                 SELECT kind, available, least(wanted, greatest(available, 0)) AS granted \
                 FROM locked \
             ) \
             UPDATE router.rate_buckets b \
             SET level = t.available - t.granted, updated_at = greatest(b.updated_at, now()) \
             FROM took t WHERE b.deployment = $1 AND b.kind = t.kind \
             RETURNING b.kind, t.granted, b.level"
        ))
        .bind(&self.deployment)
        .bind(&kinds)
        .bind(&amounts)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                Some(Lease {
                    kind: Kind::from_db(row.get("kind"))?,
                    granted: row.get("granted"),
                    remaining: row.get("level"),
                })
            })
            .collect())
    }

    /// Gives back tokens leased but not used, up to each bucket's capacity.
    pub async fn give_back(&self, amounts: &[(Kind, f64)]) -> Result<(), sqlx::Error> {
        let kinds: Vec<&str> = amounts.iter().map(|(k, _)| k.as_str()).collect();
        let amounts: Vec<f64> = amounts.iter().map(|(_, a)| a.max(0.0)).collect();
        sqlx::query(&format!(
            "WITH locked AS ( \
                 SELECT b.kind, w.amount, {REFILLED} AS available \
                 FROM router.rate_buckets b \
                 JOIN unnest($2::text[], $3::float8[]) AS w(kind, amount) ON b.kind = w.kind \
                 WHERE b.deployment = $1 ORDER BY b.kind FOR UPDATE OF b \
             ) \
             UPDATE router.rate_buckets b \
             SET level = least(b.capacity, l.available + l.amount), \
                 updated_at = greatest(b.updated_at, now()) \
             FROM locked l WHERE b.deployment = $1 AND b.kind = l.kind"
        ))
        .bind(&self.deployment)
        .bind(&kinds)
        .bind(&amounts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
