//! The periodic sweep: worker liveness, the task, breaker and event-lag gauges, and retention
//! of workers, tasks and usage. Each part fails on its own (logged, tried again next interval).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alerts::Recent;
use crate::breakers::Breakers;
use crate::store::{Liveness, Store};
use crate::{metrics, tasks, usage, workers};

/// `colony_monitor_event_lag_seconds` is the largest lag within this long before each sweep.
pub const EVENT_LAG_GAUGE_WINDOW: Duration = Duration::from_secs(60);

/// What the sweep judges and keeps.
#[derive(Debug, Clone, Copy)]
pub struct SweepOptions {
    pub interval: Duration,
    pub liveness: Liveness,
    pub worker_retention: Duration,
    pub stale_task_after: Duration,
    pub task_retention: Duration,
    pub usage_retention: Duration,
    pub usage_dedup_window: Duration,
}

/// Sweeps every `options.interval` until `shutdown`.
pub async fn run(
    store: Store,
    recent: Arc<Recent>,
    breakers: Arc<Breakers>,
    options: SweepOptions,
    shutdown: CancellationToken,
) {
    let mut dead = workers::DeadWorkers::default();
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let pool = store.pool();
        // Here too, not only when an event arrives: forgotten breakers leave the count.
        #[expect(clippy::cast_precision_loss, reason = "breaker counts are small")]
        ::metrics::gauge!(metrics::OPEN_BREAKERS).set(breakers.open().len() as f64);
        ::metrics::gauge!(metrics::EVENT_LAG).set(recent.largest_lag(EVENT_LAG_GAUGE_WINDOW));
        if let Err(error) = workers::sweep(
            &store,
            options.liveness,
            options.worker_retention,
            &mut dead,
        )
        .await
        {
            tracing::warn!(%error, "worker sweep failed");
        }
        if let Err(error) =
            tasks::sweep(pool, options.stale_task_after, options.task_retention).await
        {
            tracing::warn!(%error, "task sweep failed");
        }
        if let Err(error) =
            usage::prune(pool, options.usage_retention, options.usage_dedup_window).await
        {
            tracing::warn!(%error, "usage retention sweep failed");
        }
    }
}
