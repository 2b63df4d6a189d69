//! Strategy memory (seed 002's ReasoningBank): reusable strategies distilled from validated
//! successes and failures, suggested by relevance and win rate, pruned when they keep losing.
//! Every change is written to `memory.strategy_audit`.

use std::sync::Arc;

use colony_proto::v1;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::config::StrategyConfig;
use crate::embeddings::Embeddings;
use crate::memories::{decode_vector, encode_vector};
use crate::semantic::{check_text, dot};
use crate::session::check_id;
use crate::{Error, metrics};

pub const DEFAULT_SUGGESTIONS: usize = 3;
pub const MAX_SUGGESTIONS: usize = 20;

/// `(wins + 1) / (outcomes + 2)`: an untried strategy starts at one half instead of zero or one.
pub fn smoothed_win_rate(wins: u32, losses: u32) -> f32 {
    (wins as f32 + 1.0) / ((wins + losses) as f32 + 2.0)
}

/// Whether a strategy with these counts is pruned under `config`, and why.
pub fn prune_reason(wins: u32, losses: u32, config: &StrategyConfig) -> Option<String> {
    let outcomes = wins + losses;
    if outcomes < config.min_outcomes || outcomes == 0 {
        return None;
    }
    let rate = wins as f32 / outcomes as f32;
    (rate < config.min_win_rate).then(|| {
        format!(
            "win rate {:.0} % ({wins} of {outcomes}) is below {:.0} % after at least {} outcomes",
            rate * 100.0,
            config.min_win_rate * 100.0,
            config.min_outcomes
        )
    })
}

/// Strategy memory over `memory.strategies`.
pub struct Strategies {
    pool: PgPool,
    embeddings: Arc<Embeddings>,
    config: StrategyConfig,
}

const COLUMNS: &str = "id, role, title, when_to_use, strategy, from_success, wins, losses, uses, \
                       status, pruned_reason, created_at, duplicate_count";

fn unsigned(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

fn record(row: &PgRow) -> Result<v1::StrategyRecord, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let status = match status.as_str() {
        "pruned" => v1::StrategyStatus::Pruned,
        _ => v1::StrategyStatus::Active,
    };
    let created_at: chrono::DateTime<chrono::Utc> = row.try_get("created_at")?;
    Ok(v1::StrategyRecord {
        id: row.try_get("id")?,
        role: row.try_get("role")?,
        title: row.try_get("title")?,
        when_to_use: row.try_get("when_to_use")?,
        strategy: row.try_get("strategy")?,
        from_success: row.try_get("from_success")?,
        wins: unsigned(row.try_get("wins")?),
        losses: unsigned(row.try_get("losses")?),
        uses: unsigned(row.try_get("uses")?),
        status: status.into(),
        pruned_reason: row
            .try_get::<Option<String>, _>("pruned_reason")?
            .unwrap_or_default(),
        created_at: Some(colony_proto::timestamp(created_at.into())),
        duplicate_count: unsigned(row.try_get("duplicate_count")?),
    })
}

async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    strategy_id: i64,
    tenant: &str,
    event: &'static str,
    detail: &str,
    run_id: Option<&str>,
    task_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO memory.strategy_audit (strategy_id, tenant, event, detail, run_id, task_id) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(strategy_id)
    .bind(tenant)
    .bind(event)
    .bind(detail)
    .bind(run_id)
    .bind(task_id)
    .execute(&mut **tx)
    .await?;
    ::metrics::counter!(metrics::STRATEGY_EVENTS, "event" => event).increment(1);
    Ok(())
}

fn optional(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

/// The text a task is matched against.
fn matching_text(title: &str, when_to_use: &str) -> String {
    format!("{title}. {when_to_use}")
}

impl Strategies {
    pub fn new(pool: PgPool, embeddings: Arc<Embeddings>, config: StrategyConfig) -> Self {
        Self {
            pool,
            embeddings,
            config,
        }
    }

    /// Stores a strategy, or merges it into an active near-duplicate of the same role.
    pub async fn add(&self, request: v1::AddStrategyRequest) -> Result<v1::StrategyRecord, Error> {
        check_id("tenant", &request.tenant)?;
        check_id("role", &request.role)?;
        let max = self.config.max_text_bytes;
        check_text("title", &request.title, max)?;
        check_text("when_to_use", &request.when_to_use, max)?;
        check_text("strategy", &request.strategy, max)?;
        let embedding = self
            .embeddings
            .embed_one(&matching_text(&request.title, &request.when_to_use))
            .await?;
        let mut tx = self.pool.begin().await?;
        // Serialises adds for one role so two equivalent strategies cannot both be stored.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))")
            .bind(&request.tenant)
            .bind(&request.role)
            .execute(&mut *tx)
            .await?;
        let active = sqlx::query(
            "SELECT id, embedding FROM memory.strategies \
             WHERE tenant = $1 AND role = $2 AND status = 'active'",
        )
        .bind(&request.tenant)
        .bind(&request.role)
        .fetch_all(&mut *tx)
        .await?;
        let mut best: Option<(i64, f32)> = None;
        for row in &active {
            let vector = decode_vector(row.try_get::<&[u8], _>("embedding")?)?;
            let similarity = dot(&vector, &embedding);
            if similarity >= self.config.dedupe_similarity
                && best.is_none_or(|(_, s)| similarity > s)
            {
                best = Some((row.try_get("id")?, similarity));
            }
        }
        let run_id = optional(&request.source_run_id);
        let task_id = optional(&request.source_task_id);
        let row = if let Some((id, similarity)) = best {
            let row = sqlx::query(&format!(
                "UPDATE memory.strategies SET duplicate_count = duplicate_count + 1, \
                     updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
            ))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            let detail = format!("{:?} (similarity {similarity:.3})", request.title);
            audit(
                &mut tx,
                id,
                &request.tenant,
                "merged",
                &detail,
                run_id,
                task_id,
            )
            .await?;
            row
        } else {
            let row = sqlx::query(&format!(
                "INSERT INTO memory.strategies (tenant, role, title, when_to_use, strategy, \
                     from_success, embedding, source_run_id, source_task_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
            ))
            .bind(&request.tenant)
            .bind(&request.role)
            .bind(&request.title)
            .bind(&request.when_to_use)
            .bind(&request.strategy)
            .bind(request.from_success)
            .bind(encode_vector(&embedding))
            .bind(run_id)
            .bind(task_id)
            .fetch_one(&mut *tx)
            .await?;
            let id: i64 = row.try_get("id")?;
            let origin = if request.from_success {
                "from a validated success"
            } else {
                "from a validated failure"
            };
            audit(
                &mut tx,
                id,
                &request.tenant,
                "created",
                origin,
                run_id,
                task_id,
            )
            .await?;
            row
        };
        tx.commit().await?;
        Ok(record(&row)?)
    }

    /// Active strategies of the role ranked by relevance × smoothed win rate; each one
    /// returned counts as a use.
    pub async fn suggest(
        &self,
        request: v1::SuggestStrategiesRequest,
    ) -> Result<v1::SuggestStrategiesResponse, Error> {
        check_id("tenant", &request.tenant)?;
        check_id("role", &request.role)?;
        check_text("task", &request.task, self.config.max_text_bytes)?;
        let limit = match usize::try_from(request.limit).unwrap_or(usize::MAX) {
            0 => DEFAULT_SUGGESTIONS,
            n => n.min(MAX_SUGGESTIONS),
        };
        let query = self.embeddings.embed_one(&request.task).await?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS}, embedding FROM memory.strategies \
             WHERE tenant = $1 AND role = $2 AND status = 'active'"
        ))
        .bind(&request.tenant)
        .bind(&request.role)
        .fetch_all(&self.pool)
        .await?;
        let mut ranked = Vec::with_capacity(rows.len());
        for row in &rows {
            let strategy = record(row)?;
            let vector = decode_vector(row.try_get::<&[u8], _>("embedding")?)?;
            let relevance = dot(&vector, &query);
            let score = relevance * smoothed_win_rate(strategy.wins, strategy.losses);
            ranked.push(v1::StrategySuggestion {
                strategy: Some(strategy),
                relevance,
                score,
            });
        }
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
        ranked.truncate(limit);
        if !ranked.is_empty() {
            let mut tx = self.pool.begin().await?;
            for suggestion in &mut ranked {
                let Some(strategy) = suggestion.strategy.as_mut() else {
                    continue;
                };
                sqlx::query("UPDATE memory.strategies SET uses = uses + 1 WHERE id = $1")
                    .bind(strategy.id)
                    .execute(&mut *tx)
                    .await?;
                strategy.uses += 1;
                let detail = format!("relevance {:.3}", suggestion.relevance);
                audit(
                    &mut tx,
                    strategy.id,
                    &request.tenant,
                    "suggested",
                    &detail,
                    None,
                    None,
                )
                .await?;
            }
            tx.commit().await?;
        }
        Ok(v1::SuggestStrategiesResponse {
            suggestions: ranked,
        })
    }

    /// Counts a win or a loss and prunes the strategy when it falls below the floor.
    pub async fn record_outcome(
        &self,
        request: v1::RecordStrategyOutcomeRequest,
    ) -> Result<v1::RecordStrategyOutcomeResponse, Error> {
        check_id("tenant", &request.tenant)?;
        if request.strategy_id <= 0 {
            return Err(Error::invalid(
                "strategy_id",
                "must be a positive strategy id",
            ));
        }
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE memory.strategies SET wins = wins + $3::int, losses = losses + 1 - $3::int, \
                 updated_at = now() \
             WHERE tenant = $1 AND id = $2 AND status = 'active' RETURNING {COLUMNS}"
        ))
        .bind(&request.tenant)
        .bind(request.strategy_id)
        .bind(i32::from(request.success))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(Error::NotFound(format!(
                "strategy {} is not an active strategy of this tenant",
                request.strategy_id
            )));
        };
        let mut strategy = record(&row)?;
        let (event, detail) = if request.success {
            ("win", "")
        } else {
            ("loss", "")
        };
        let run_id = optional(&request.run_id);
        let task_id = optional(&request.task_id);
        audit(
            &mut tx,
            strategy.id,
            &request.tenant,
            event,
            detail,
            run_id,
            task_id,
        )
        .await?;
        let reason = prune_reason(strategy.wins, strategy.losses, &self.config);
        if let Some(reason) = &reason {
            sqlx::query(
                "UPDATE memory.strategies SET status = 'pruned', pruned_reason = $2 WHERE id = $1",
            )
            .bind(strategy.id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            audit(
                &mut tx,
                strategy.id,
                &request.tenant,
                "pruned",
                reason,
                run_id,
                task_id,
            )
            .await?;
            strategy.status = v1::StrategyStatus::Pruned.into();
            strategy.pruned_reason = reason.clone();
        }
        tx.commit().await?;
        Ok(v1::RecordStrategyOutcomeResponse {
            strategy: Some(strategy),
            pruned: reason.is_some(),
        })
    }

    pub async fn list(
        &self,
        request: v1::ListStrategiesRequest,
    ) -> Result<v1::ListStrategiesResponse, Error> {
        check_id("tenant", &request.tenant)?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM memory.strategies \
             WHERE tenant = $1 AND ($2 = '' OR role = $2) AND ($3 OR status = 'active') \
             ORDER BY id"
        ))
        .bind(&request.tenant)
        .bind(&request.role)
        .bind(request.include_pruned)
        .fetch_all(&self.pool)
        .await?;
        Ok(v1::ListStrategiesResponse {
            strategies: rows.iter().map(record).collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_waits_for_enough_outcomes_then_applies_the_floor() {
        let config = StrategyConfig::default();
        assert_eq!(
            prune_reason(0, 9, &config),
            None,
            "nine outcomes are too few"
        );
        assert!(prune_reason(3, 7, &config).is_some(), "30 % after 10");
        assert_eq!(prune_reason(4, 6, &config), None, "exactly 40 % stays");
        assert_eq!(prune_reason(0, 0, &config), None);
        let reason = prune_reason(1, 9, &config).expect("pruned");
        assert!(reason.contains("10 %"), "{reason}");
    }

    #[test]
    fn smoothing_starts_untried_strategies_at_one_half() {
        assert!((smoothed_win_rate(0, 0) - 0.5).abs() < 1e-6);
        assert!(smoothed_win_rate(9, 1) > smoothed_win_rate(1, 0));
        assert!(smoothed_win_rate(0, 3) < 0.5);
    }
}
