//! Worker liveness, the sweep's part: sets the live-worker gauges, warns once about each worker
//! that went silent, and forgets workers past their retention.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::metrics;
use crate::store::{Liveness, Store, WorkerState};

/// Which dead workers have been reported, so each is warned about once.
#[derive(Debug, Default)]
pub struct DeadWorkers {
    reported: HashSet<String>,
}

impl DeadWorkers {
    /// Takes the workers dead now; returns those not reported before. A worker that comes back
    /// (or is forgotten) leaves the set, so dying again is reported again.
    pub fn update<'a>(
        &mut self,
        dead_now: &'a [(String, DateTime<Utc>)],
    ) -> Vec<&'a (String, DateTime<Utc>)> {
        let newly: Vec<_> = dead_now
            .iter()
            .filter(|(id, _)| !self.reported.contains(id))
            .collect();
        self.reported = dead_now.iter().map(|(id, _)| id.clone()).collect();
        newly
    }
}

/// One sweep of the registry.
pub async fn sweep(
    store: &Store,
    liveness: Liveness,
    retention: Duration,
    dead: &mut DeadWorkers,
) -> Result<(), crate::Error> {
    let forgotten = store.prune(retention).await?;
    if forgotten > 0 {
        tracing::info!(forgotten, ?retention, "forgot long-dead workers");
    }
    let counts = store.counts(liveness).await?;
    // The gauges take an f64; worker counts are far below 2^52.
    ::metrics::gauge!(metrics::WORKERS).set(counts.alive() as f64);
    for state in WorkerState::ALL {
        ::metrics::gauge!(metrics::WORKERS_BY_STATE, "state" => state.as_str())
            .set(counts.of(state) as f64);
    }
    let dead_now = store.dead_workers(liveness.dead_after).await?;
    for (worker_id, last_seen_at) in dead.update(&dead_now) {
        tracing::warn!(
            %worker_id,
            %last_seen_at,
            stale_after = ?liveness.dead_after,
            "worker is dead: no heartbeat within stale_after"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead(ids: &[&str]) -> Vec<(String, DateTime<Utc>)> {
        ids.iter()
            .map(|id| ((*id).to_owned(), Utc::now()))
            .collect()
    }

    fn ids(newly: Vec<&(String, DateTime<Utc>)>) -> Vec<&str> {
        newly.into_iter().map(|(id, _)| id.as_str()).collect()
    }

    #[test]
    fn each_dead_worker_is_reported_once() {
        let mut reported = DeadWorkers::default();
        assert_eq!(ids(reported.update(&dead(&["a", "b"]))), ["a", "b"]);
        assert!(reported.update(&dead(&["a", "b"])).is_empty());
        assert_eq!(ids(reported.update(&dead(&["a", "b", "c"]))), ["c"]);
        // "a" came back; when it dies again it is reported again.
        assert!(reported.update(&dead(&["b", "c"])).is_empty());
        assert_eq!(ids(reported.update(&dead(&["a", "b", "c"]))), ["a"]);
    }
}
