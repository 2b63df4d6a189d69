//! Measured quality per model tier: workers report their judges' verdicts, and the dial's
//! quality for a tier moves from the roster's configured value toward the share of answers
//! accepted without a rejection, as verdicts accumulate.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use sqlx::{PgConnection, PgPool, Row};

use crate::Error;
use crate::metrics;
use crate::roster::DEFAULT_TIER;

/// How many verdicts the configured quality weighs as: the measured share takes over as the
/// verdicts outnumber it.
pub const PRIOR_WEIGHT: f64 = 20.0;

/// A validated report's verdict, as the orchestrator keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The tier that wrote the answer; empty for the router's default tier.
    pub tier: String,
    pub accepted: bool,
    pub rejections: u32,
}

impl Verdict {
    /// Accepted as first written: what quality measures.
    fn first_pass(&self) -> bool {
        self.accepted && self.rejections == 0
    }

    fn tier_key(&self) -> &str {
        if self.tier.is_empty() {
            DEFAULT_TIER
        } else {
            &self.tier
        }
    }
}

/// Verdicts of one tier so far (across every replica, as of the last time this one looked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub judged: i64,
    pub accepted_first: i64,
}

impl Tally {
    /// The configured quality blended with the measured share: `configured` counts as
    /// [`PRIOR_WEIGHT`] verdicts.
    #[expect(
        clippy::cast_precision_loss,
        reason = "verdict counts are far below 2^52"
    )]
    pub fn blend(self, configured: f64) -> f64 {
        let judged = self.judged.max(0) as f64;
        let accepted = self.accepted_first.clamp(0, self.judged.max(0)) as f64;
        (configured * PRIOR_WEIGHT + accepted) / (PRIOR_WEIGHT + judged)
    }
}

/// The tallies this replica knows, refreshed whenever it records verdicts and at start.
#[derive(Debug, Default)]
pub struct MeasuredQuality {
    tallies: RwLock<HashMap<String, Tally>>,
}

impl MeasuredQuality {
    /// The quality the dial should use for `tier` (empty: the default tier) whose configured
    /// quality is `configured`.
    pub fn of(&self, tier: &str, configured: f64) -> f64 {
        let key = if tier.is_empty() { DEFAULT_TIER } else { tier };
        self.tallies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .map_or(configured, |tally| tally.blend(configured))
    }

    pub fn tally(&self, tier: &str) -> Option<Tally> {
        self.tallies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tier)
            .copied()
    }

    /// Takes in totals read from the database (newer than what it had).
    pub fn update(&self, totals: impl IntoIterator<Item = (String, Tally)>) {
        let mut tallies = self.tallies.write().unwrap_or_else(PoisonError::into_inner);
        for (tier, tally) in totals {
            ::metrics::gauge!(metrics::MODEL_VERDICTS, "tier" => tier.clone())
                .set(tally.judged as f64);
            tallies.insert(tier, tally);
        }
    }

    /// Every tier's totals from the database.
    pub async fn load(&self, pool: &PgPool) -> Result<(), Error> {
        let rows =
            sqlx::query("SELECT tier, judged, accepted_first FROM orchestrator.model_quality")
                .fetch_all(pool)
                .await?;
        let totals = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<String, _>("tier")?,
                    Tally {
                        judged: row.try_get("judged")?,
                        accepted_first: row.try_get("accepted_first")?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        self.update(totals);
        Ok(())
    }
}

/// Adds `verdicts` to their tiers' totals; returns the new totals of the tiers touched.
pub async fn record(
    tx: &mut PgConnection,
    verdicts: &[&Verdict],
) -> Result<Vec<(String, Tally)>, Error> {
    let mut added: HashMap<&str, Tally> = HashMap::new();
    for verdict in verdicts {
        let tally = added.entry(verdict.tier_key()).or_default();
        tally.judged += 1;
        tally.accepted_first += i64::from(verdict.first_pass());
    }
    // In a fixed order, so that two transactions never wait on each other's rows.
    let mut tiers: Vec<_> = added.into_iter().collect();
    tiers.sort_unstable_by_key(|(tier, _)| *tier);
    let mut totals = Vec::with_capacity(tiers.len());
    for (tier, tally) in tiers {
        let row = sqlx::query(
            "INSERT INTO orchestrator.model_quality (tier, judged, accepted_first) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (tier) DO UPDATE SET \
               judged = model_quality.judged + EXCLUDED.judged, \
               accepted_first = model_quality.accepted_first + EXCLUDED.accepted_first, \
               updated_at = now() \
             RETURNING judged, accepted_first",
        )
        .bind(tier)
        .bind(tally.judged)
        .bind(tally.accepted_first)
        .fetch_one(&mut *tx)
        .await?;
        totals.push((
            tier.to_owned(),
            Tally {
                judged: row.try_get("judged")?,
                accepted_first: row.try_get("accepted_first")?,
            },
        ));
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_quality_gives_way_to_measured_verdicts() {
        let none = Tally::default();
        assert!((none.blend(0.7) - 0.7).abs() < 1e-9);
        // As many verdicts as the prior's weight, all accepted first time: halfway to 1.
        let good = Tally {
            judged: 20,
            accepted_first: 20,
        };
        assert!((good.blend(0.7) - 0.85).abs() < 1e-9);
        // Many verdicts, a fifth accepted first time: close to 0.2.
        let poor = Tally {
            judged: 2000,
            accepted_first: 400,
        };
        assert!((poor.blend(0.9) - 0.2).abs() < 0.01);

        let measured = MeasuredQuality::default();
        assert!((measured.of("mid", 0.7) - 0.7).abs() < 1e-9);
        measured.update([("mid".to_owned(), good)]);
        assert!((measured.of("mid", 0.7) - 0.85).abs() < 1e-9);
        assert!((measured.of("", 0.7) - 0.7).abs() < 1e-9, "another tier");
    }

    #[test]
    fn only_answers_accepted_as_written_count_as_first_pass() {
        let verdict = |accepted, rejections| Verdict {
            tier: String::new(),
            accepted,
            rejections,
        };
        assert!(verdict(true, 0).first_pass());
        assert!(!verdict(true, 1).first_pass());
        assert!(!verdict(false, 2).first_pass());
        assert_eq!(verdict(true, 0).tier_key(), DEFAULT_TIER);
    }
}
