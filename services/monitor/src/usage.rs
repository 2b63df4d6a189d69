//! Model usage summed from usage events (one per model call, from the router) into
//! `monitor.usage`: calls, tokens and cost per hour, tenant, run, deployment and model; and
//! the summaries `GET /v1/usage` answers from it.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::Error;

/// One model call's usage, as a usage event reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub tenant: String,
    pub run_id: String,
    /// The deployment that served the call, and the provider's model behind it.
    pub deployment: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros_usd: u64,
    pub latency_ms: u64,
    /// The call's own time; without one, the event's arrival.
    pub occurred_at: Option<DateTime<Utc>>,
    /// What identifies the event among redeliveries: its encoded payload, which carries the
    /// call's time to the nanosecond. `None` when the event has no time: then two distinct
    /// calls could encode alike, and counting a redelivery twice is better than dropping a call.
    pub identity: Option<Bytes>,
}

fn db_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Adds one call to its hour's row, in one statement; an event whose identity was counted
/// within `usage_dedup_window` adds nothing. Returns whether it was counted.
pub async fn record(pool: &PgPool, usage: &Usage) -> Result<bool, Error> {
    let counted = sqlx::query(
        "WITH first_time AS ( \
             INSERT INTO monitor.usage_seen (digest) \
             SELECT md5($1::bytea)::uuid WHERE $1::bytea IS NOT NULL \
             ON CONFLICT (digest) DO NOTHING RETURNING digest) \
         INSERT INTO monitor.usage AS u (hour, tenant, run_id, deployment, model, calls, \
             prompt_tokens, completion_tokens, cost_micros_usd, first_at, last_at) \
         SELECT date_trunc('hour', at, 'UTC'), $2, $3, $4, $5, 1, $6, $7, $8, at, at \
         FROM (SELECT COALESCE($9::timestamptz, now()) AS at) AS call \
         WHERE $1::bytea IS NULL OR EXISTS (SELECT 1 FROM first_time) \
         ON CONFLICT (hour, tenant, run_id, deployment, model) DO UPDATE SET \
             calls = u.calls + 1, \
             prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens, \
             completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens, \
             cost_micros_usd = u.cost_micros_usd + EXCLUDED.cost_micros_usd, \
             first_at = LEAST(u.first_at, EXCLUDED.first_at), \
             last_at = GREATEST(u.last_at, EXCLUDED.last_at) \
         RETURNING 1",
    )
    .bind(usage.identity.as_deref())
    .bind(&usage.tenant)
    .bind(&usage.run_id)
    .bind(&usage.deployment)
    .bind(&usage.model)
    .bind(db_int(usage.prompt_tokens))
    .bind(db_int(usage.completion_tokens))
    .bind(db_int(usage.cost_micros_usd))
    .bind(usage.occurred_at)
    .fetch_optional(pool)
    .await?;
    Ok(counted.is_some())
}

/// Removes the hours that ended more than `retention` ago, and identities older than
/// `dedup_window`.
pub async fn prune(
    pool: &PgPool,
    retention: Duration,
    dedup_window: Duration,
) -> Result<(), Error> {
    let hours = sqlx::query(
        "DELETE FROM monitor.usage WHERE hour < now() - make_interval(secs => $1) - interval '1 hour'",
    )
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await?;
    if hours.rows_affected() > 0 {
        tracing::debug!(
            rows = hours.rows_affected(),
            ?retention,
            "usage past retention removed"
        );
    }
    sqlx::query("DELETE FROM monitor.usage_seen WHERE seen_at < now() - make_interval(secs => $1)")
        .bind(dedup_window.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(())
}

/// What `GET /v1/usage` sums by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum By {
    Tenant,
    /// The provider's model, over every deployment serving it.
    Model,
    Deployment,
    /// A run (with its tenant).
    Run,
}

impl By {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "tenant" => Some(By::Tenant),
            "model" => Some(By::Model),
            "deployment" => Some(By::Deployment),
            "run" => Some(By::Run),
            _ => None,
        }
    }

    /// The grouping columns: fixed names, never request text, so they can be put in the SQL.
    fn columns(self) -> &'static [&'static str] {
        match self {
            By::Tenant => &["tenant"],
            By::Model => &["model"],
            By::Deployment => &["deployment"],
            By::Run => &["tenant", "run_id"],
        }
    }
}

/// Rows answered when `limit` is not given, and the most that may be asked for.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// A parsed `GET /v1/usage` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub by: By,
    /// Only this tenant's usage.
    pub tenant: Option<String>,
    /// Only usage from this hour on (usage is kept per hour: `since` is rounded down to one).
    pub since: Option<DateTime<Utc>>,
    pub limit: i64,
}

impl UsageQuery {
    /// Parses the query string's parameters; the error says what is wrong, for the client.
    pub fn parse(params: &[(String, String)]) -> Result<Self, String> {
        let mut query = UsageQuery {
            by: By::Tenant,
            tenant: None,
            since: None,
            limit: DEFAULT_LIMIT,
        };
        let mut given = std::collections::HashSet::new();
        for (name, value) in params {
            if !given.insert(name.as_str()) {
                return Err(format!("parameter {name:?} is given more than once"));
            }
            match name.as_str() {
                "by" => {
                    query.by = By::parse(value).ok_or_else(|| {
                        format!("by must be tenant, model, deployment or run, not {value:?}")
                    })?;
                }
                "tenant" => query.tenant = Some(value.clone()),
                "since" => {
                    let since = DateTime::parse_from_rfc3339(value).map_err(|_| {
                        format!(
                            "since must be an RFC 3339 time such as 2025-01-01T00:00:00Z, not \
                             {value:?} (a '+' in a query string must be sent as %2B)"
                        )
                    })?;
                    query.since = Some(since.with_timezone(&Utc));
                }
                "limit" => {
                    query.limit = value
                        .parse()
                        .ok()
                        .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                        .ok_or_else(|| {
                            format!(
                                "limit must be a whole number from 1 to {MAX_LIMIT}, not {value:?}"
                            )
                        })?;
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; expected by, tenant, since, limit"
                    ));
                }
            }
        }
        Ok(query)
    }
}

/// One summed group. Only the keys of the grouping are present.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Exact, in millionths of a US dollar.
    pub cost_micros_usd: u64,
    pub cost_usd: f64,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

fn key(row: &sqlx::postgres::PgRow, by: By, column: &str) -> Result<Option<String>, sqlx::Error> {
    if by.columns().contains(&column) {
        row.try_get(column).map(Some)
    } else {
        Ok(None)
    }
}

fn sum(row: &sqlx::postgres::PgRow, column: &str) -> Result<u64, sqlx::Error> {
    Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
}

/// Usage summed by `query.by`, most expensive first.
pub async fn summarize(pool: &PgPool, query: &UsageQuery) -> Result<Vec<UsageRow>, Error> {
    let columns = query.by.columns().join(", ");
    let rows = sqlx::query(&format!(
        "SELECT {columns}, sum(calls)::bigint AS calls, \
                sum(prompt_tokens)::bigint AS prompt_tokens, \
                sum(completion_tokens)::bigint AS completion_tokens, \
                sum(cost_micros_usd)::bigint AS cost_micros_usd, \
                min(first_at) AS first_at, max(last_at) AS last_at \
         FROM monitor.usage \
         WHERE ($1::timestamptz IS NULL OR hour >= date_trunc('hour', $1::timestamptz, 'UTC')) \
           AND ($2::text IS NULL OR tenant = $2) \
         GROUP BY {columns} ORDER BY sum(cost_micros_usd) DESC, {columns} LIMIT $3"
    ))
    .bind(query.since)
    .bind(query.tenant.as_deref())
    .bind(query.limit)
    .fetch_all(pool)
    .await?;
    let summed = rows
        .iter()
        .map(|row| {
            let cost_micros_usd = sum(row, "cost_micros_usd")?;
            // Cost far below 2^52 micro-dollars: exact as f64.
            #[expect(clippy::cast_precision_loss, reason = "costs far below 2^52")]
            let cost_usd = cost_micros_usd as f64 / 1e6;
            Ok(UsageRow {
                tenant: key(row, query.by, "tenant")?,
                run_id: key(row, query.by, "run_id")?,
                deployment: key(row, query.by, "deployment")?,
                model: key(row, query.by, "model")?,
                calls: sum(row, "calls")?,
                prompt_tokens: sum(row, "prompt_tokens")?,
                completion_tokens: sum(row, "completion_tokens")?,
                cost_micros_usd,
                cost_usd,
                first_at: row.try_get("first_at")?,
                last_at: row.try_get("last_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(summed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<UsageQuery, String> {
        let params: Vec<(String, String)> = pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        UsageQuery::parse(&params)
    }

    #[test]
    fn a_query_defaults_to_tenants_and_takes_every_parameter() {
        assert_eq!(
            parse(&[]),
            Ok(UsageQuery {
                by: By::Tenant,
                tenant: None,
                since: None,
                limit: DEFAULT_LIMIT,
            })
        );
        let query = parse(&[
            ("by", "run"),
            ("tenant", "acme"),
            ("since", "2025-01-01T10:30:00+02:00"),
            ("limit", "5"),
        ]);
        assert_eq!(
            query,
            Ok(UsageQuery {
                by: By::Run,
                tenant: Some("acme".into()),
                since: DateTime::parse_from_rfc3339("2025-01-01T08:30:00Z")
                    .ok()
                    .map(|t| t.with_timezone(&Utc)),
                limit: 5,
            })
        );
        assert_eq!(parse(&[("by", "model")]).map(|q| q.by), Ok(By::Model));
        assert_eq!(
            parse(&[("by", "deployment")]).map(|q| q.by),
            Ok(By::Deployment)
        );
    }

    #[test]
    fn bad_parameters_are_explained() {
        for (pairs, expected) in [
            (
                vec![("by", "colour")],
                "by must be tenant, model, deployment or run",
            ),
            (
                vec![("since", "yesterday")],
                "since must be an RFC 3339 time",
            ),
            (
                vec![("limit", "0")],
                "limit must be a whole number from 1 to 1000",
            ),
            (vec![("limit", "1001")], "limit must be a whole number"),
            (vec![("limit", "ten")], "limit must be a whole number"),
            (vec![("sort", "cost")], "unknown parameter \"sort\""),
            (
                vec![("by", "run"), ("by", "tenant")],
                "given more than once",
            ),
        ] {
            let error = parse(&pairs).err().unwrap_or_default();
            assert!(error.contains(expected), "{pairs:?}: {error:?}");
        }
    }

    #[test]
    fn only_the_grouping_columns_become_keys() {
        assert_eq!(By::Run.columns(), ["tenant", "run_id"]);
        assert_eq!(By::Model.columns(), ["model"]);
    }
}
