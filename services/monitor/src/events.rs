//! Domain view of what arrives on the EVENTS stream, and the per-kind tally kept since start.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};

use crate::tasks::TaskUpdate;
use crate::usage::Usage;

/// One event, reduced to what the monitor needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A run lifecycle event; `kind` is its label (`run.created`, …).
    Run {
        kind: &'static str,
    },
    /// A task lifecycle event; `kind` is its label (`task.succeeded`, …). `update` is what it
    /// changes in the task view: none for an unknown kind or an event without a task id.
    Task {
        kind: &'static str,
        update: Option<TaskUpdate>,
    },
    Heartbeat(Heartbeat),
    /// One model call.
    Usage(Usage),
    /// A subject the monitor does not know (a newer publisher); acknowledged and counted.
    Other,
}

impl Event {
    /// The low-cardinality label for metrics and `/v1/status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Run { kind } | Event::Task { kind, .. } => kind,
            Event::Heartbeat(_) => "worker.heartbeat",
            Event::Usage(_) => "usage.recorded",
            Event::Other => "other",
        }
    }
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
