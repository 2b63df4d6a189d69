//! Domain view of what arrives on the EVENTS stream, and the per-kind tally kept since start.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};

use crate::breakers::BreakerChange;
use crate::tasks::TaskUpdate;
use crate::usage::Usage;

/// One event, reduced to what the monitor needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A run lifecycle event; `kind` is its label (`run.created`, …).
    Run {
        kind: &'static str,
        occurred_at: Option<DateTime<Utc>>,
    },
    /// A task lifecycle event; `kind` is its label (`task.succeeded`, …). `update` is what it
    /// changes in the task view: none for an unknown kind or an event without a task id.
    Task {
        kind: &'static str,
        occurred_at: Option<DateTime<Utc>>,
        update: Option<TaskUpdate>,
    },
    Heartbeat(Heartbeat),
    /// One model call.
    Usage(Usage),
    /// A router's circuit breaker changed; `kind` is `breaker.<state>`. `change` is none for a
    /// state this monitor does not know (a newer publisher): counted only.
    Breaker {
        kind: &'static str,
        change: Option<BreakerChange>,
    },
    /// A subject the monitor does not know (a newer publisher); acknowledged and counted.
    Other,
}

impl Event {
    /// The low-cardinality label for metrics and `/v1/status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Run { kind, .. } | Event::Task { kind, .. } | Event::Breaker { kind, .. } => {
                kind
            }
            Event::Heartbeat(_) => "worker.heartbeat",
            Event::Usage(_) => "usage.recorded",
            Event::Other => "other",
        }
    }

    /// When the event happened, by its publisher's clock: what its lag is measured from.
    pub fn occurred_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Event::Run { occurred_at, .. } | Event::Task { occurred_at, .. } => *occurred_at,
            Event::Heartbeat(beat) => beat.sent_at,
            Event::Usage(call) => call.occurred_at,
            Event::Breaker { change, .. } => change.as_ref().and_then(|c| c.occurred_at),
            Event::Other => None,
        }
    }
}

/// How late an event arrived, in seconds: from its own time to `arrived_at`. Never negative:
/// an event "from the future" says the clocks disagree (they must be in sync, NTP), not that it
/// was early.
pub fn lag_seconds(occurred_at: DateTime<Utc>, arrived_at: DateTime<Utc>) -> f64 {
    let lag = arrived_at.signed_duration_since(occurred_at);
    // Milliseconds in an i64 hold ±292 million years: exact enough as f64 seconds.
    #[expect(clippy::cast_precision_loss, reason = "lags far below 2^52 ms")]
    let seconds = lag.num_milliseconds() as f64 / 1000.0;
    seconds.max(0.0)
}

/// A worker's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub worker_id: String,
    pub roles: Vec<String>,
    pub slots_total: u32,
    pub slots_busy: u32,
    pub version: String,
    pub started_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// Counts of events by kind since the process started.
#[derive(Debug, Default)]
pub struct Tally {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Tally {
    pub fn add(&self, kind: &'static str) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry(kind).or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_are_never_negative() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let later = at + chrono::Duration::milliseconds(1500);
        assert!((lag_seconds(at, later) - 1.5).abs() < 1e-9);
        assert!(lag_seconds(later, at).abs() < f64::EPSILON);
    }

    #[test]
    fn tally_counts_by_kind() {
        let tally = Tally::default();
        tally.add("run.created");
        tally.add("run.created");
        tally.add(Event::Other.kind());
        let snapshot = tally.snapshot();
        assert_eq!(snapshot.get("run.created"), Some(&2));
        assert_eq!(snapshot.get("other"), Some(&1));
    }
}
