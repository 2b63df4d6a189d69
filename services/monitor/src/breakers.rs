//! The routers' circuit breakers as their `colony.v1.event.breaker` events tell: the latest
//! state per (router replica, deployment).
//!
//! Kept in memory, not in PostgreSQL: a breaker lives in its router's memory and starts closed
//! when the router starts, so there is nothing to keep across restarts on that side; a
//! restarted monitor knows no breaker until its next change (a breaker of a router under
//! traffic whose provider stays down changes at least every open duration: open → half-open
//! probe → open). A breaker not heard of for `breaker_forget_after` (counted from the change's
//! own time, so a change replayed from the stream is as old as it is) is forgotten, so a router
//! replica that went away (crashed, scaled down) with an open breaker does not keep it open
//! here forever; an idle router's open breaker, which refuses nobody, is forgotten the same way.
//! With several monitor replicas each knows the changes it consumed.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// Half-open counts as open: it still refuses every call but its probes, and counting it
    /// keeps a breaker that reopens after each failed probe from resolving its alert every
    /// open duration.
    pub fn is_open(self) -> bool {
        !matches!(self, BreakerState::Closed)
    }
}

/// One `BreakerChanged` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerChange {
    pub router_id: String,
    pub deployment: String,
    pub state: BreakerState,
    /// Orders one breaker's changes (bumped by each).
    pub generation: u64,
    pub occurred_at: Option<DateTime<Utc>>,
}

/// A breaker that is open or half-open, as `GET /v1/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenBreaker {
    pub router_id: String,
    pub deployment: String,
    pub state: BreakerState,
    /// When it changed to `state` (the event's time, or its arrival without one).
    pub since: DateTime<Utc>,
}

#[derive(Debug)]
struct Known {
    state: BreakerState,
    generation: u64,
    since: DateTime<Utc>,
    heard_at: Instant,
}

/// The latest state of every breaker heard of within `forget_after`.
#[derive(Debug)]
pub struct Breakers {
    forget_after: Duration,
    known: Mutex<HashMap<(String, String), Known>>,
}

impl Breakers {
    pub fn new(forget_after: Duration) -> Self {
        Self {
            forget_after,
            known: Mutex::default(),
        }
    }

    /// Takes `change` unless the breaker already had a later one (events are handled several
    /// at once, so they may arrive out of order; a redelivery repeats a generation). Answers
    /// whether it was taken.
    pub fn apply(&self, change: BreakerChange) -> bool {
        self.apply_at(change, Instant::now())
    }

    fn apply_at(&self, change: BreakerChange, now: Instant) -> bool {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (change.router_id, change.deployment);
        if known
            .get(&key)
            .is_some_and(|breaker| breaker.generation >= change.generation)
        {
            return false;
        }
        // Heard of when it happened, not when it arrived: a change replayed from the stream
        // (a new durable consumer reads what the stream still holds) is as old as it is, so a
        // breaker that opened days ago is forgotten at once rather than shown open anew.
        let age = change
            .occurred_at
            .and_then(|at| Utc::now().signed_duration_since(at).to_std().ok())
            .unwrap_or_default()
            .min(self.forget_after);
        known.insert(
            key,
            Known {
                state: change.state,
                generation: change.generation,
                since: change.occurred_at.unwrap_or_else(Utc::now),
                heard_at: now.checked_sub(age).unwrap_or(now),
            },
        );
        true
    }

    /// The open and half-open breakers, by router and deployment; forgets those not heard of
    /// for `forget_after`.
    pub fn open(&self) -> Vec<OpenBreaker> {
        self.open_at(Instant::now())
    }

    fn open_at(&self, now: Instant) -> Vec<OpenBreaker> {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known.retain(|_, breaker| {
            now.saturating_duration_since(breaker.heard_at) < self.forget_after
        });
        let mut open: Vec<OpenBreaker> = known
            .iter()
            .filter(|(_, breaker)| breaker.state.is_open())
            .map(|((router_id, deployment), breaker)| OpenBreaker {
                router_id: router_id.clone(),
                deployment: deployment.clone(),
                state: breaker.state,
                since: breaker.since,
            })
            .collect();
        open.sort_by(|a, b| (&a.router_id, &a.deployment).cmp(&(&b.router_id, &b.deployment)));
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(
        router: &str,
        deployment: &str,
        state: BreakerState,
        generation: u64,
    ) -> BreakerChange {
        BreakerChange {
            router_id: router.into(),
            deployment: deployment.into(),
            state,
            generation,
            occurred_at: None,
        }
    }

    fn open_keys(breakers: &Breakers, now: Instant) -> Vec<(String, BreakerState)> {
        breakers
            .open_at(now)
            .into_iter()
            .map(|b| (format!("{}/{}", b.router_id, b.deployment), b.state))
            .collect()
    }

    #[test]
    fn the_latest_change_of_each_breaker_counts_and_half_open_is_open() {
        let breakers = Breakers::new(Duration::from_secs(600));
        let now = Instant::now();
        assert!(breakers.apply_at(change("r1", "gpt", BreakerState::Open, 1), now));
        assert!(breakers.apply_at(change("r2", "gpt", BreakerState::Open, 1), now));
        assert!(breakers.apply_at(change("r1", "claude", BreakerState::Open, 1), now));
        assert!(breakers.apply_at(change("r1", "claude", BreakerState::HalfOpen, 2), now));
        assert!(breakers.apply_at(change("r2", "gpt", BreakerState::HalfOpen, 2), now));
        assert!(breakers.apply_at(change("r2", "gpt", BreakerState::Closed, 3), now));
        // Reordered: an older change of r2/gpt arrives last and changes nothing; so does a
        // redelivery.
        assert!(!breakers.apply_at(change("r2", "gpt", BreakerState::Open, 1), now));
        assert!(!breakers.apply_at(change("r2", "gpt", BreakerState::Closed, 3), now));
        assert_eq!(
            open_keys(&breakers, now),
            [
                ("r1/claude".to_owned(), BreakerState::HalfOpen),
                ("r1/gpt".to_owned(), BreakerState::Open),
            ]
        );
    }

    #[test]
    fn breakers_not_heard_of_are_forgotten() {
        let breakers = Breakers::new(Duration::from_secs(600));
        let start = Instant::now();
        breakers.apply_at(change("gone", "gpt", BreakerState::Open, 1), start);
        breakers.apply_at(
            change("alive", "gpt", BreakerState::Open, 5),
            start + Duration::from_secs(300),
        );
        let later = start + Duration::from_secs(700);
        assert_eq!(
            open_keys(&breakers, later),
            [("alive/gpt".to_owned(), BreakerState::Open)]
        );
        // Forgotten: a later change of it is taken whatever its generation.
        assert!(breakers.apply_at(change("gone", "gpt", BreakerState::Closed, 1), later));

        // A change that happened longer ago than that (replayed from the stream) is forgotten
        // at once; one "from the future" (clock skew) counts as new.
        let replayed = BreakerChange {
            occurred_at: Some(Utc::now() - chrono::Duration::hours(3)),
            ..change("old", "gpt", BreakerState::Open, 1)
        };
        let skewed = BreakerChange {
            occurred_at: Some(Utc::now() + chrono::Duration::minutes(5)),
            ..change("ahead", "gpt", BreakerState::Open, 1)
        };
        assert!(breakers.apply_at(replayed, later));
        assert!(breakers.apply_at(skewed, later));
        assert_eq!(
            open_keys(&breakers, later),
            [
                ("ahead/gpt".to_owned(), BreakerState::Open),
                ("alive/gpt".to_owned(), BreakerState::Open),
            ]
        );
    }
}
