//! colony-monitor: watches the EVENTS stream — run and task lifecycle, worker heartbeats, usage
//! records and the routers' circuit breaker changes — and turns it into metrics, a worker
//! registry with liveness, its own view of queued and running tasks (stale-task detection), the
//! open breakers, how late events arrive, usage summaries, alerts, and a small status API. See
//! `README.md` for subjects, semantics and failure modes.

pub mod alerts;
pub mod anomaly;
pub mod breakers;
mod bus;
pub mod config;
mod error;
pub mod events;
mod http;
pub mod metrics;
mod store;
mod sweep;
mod tasks;
mod usage;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use colony_bus::{Bus, ConsumeOptions, StreamKind};
use colony_runtime::Runtime;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use bus::{CONSUMER, FILTER};
pub use config::Config;

impl colony_runtime::ServiceConfig for Config {
    const ENV_PREFIX: &'static str = config::ENV_PREFIX;
    fn telemetry(&self) -> &colony_telemetry::TelemetryConfig {
        &self.telemetry
    }
}
pub use error::Error;

use anomaly::Signal;
use events::{Event, Tally};
use store::Store;

/// State shared by the consumer and the status API.
struct Monitor {
    store: Store,
    tally: Tally,
    liveness: store::Liveness,
    anomalies: anomaly::Detector,
    /// What the alert rules measure.
    recent: Arc<alerts::Recent>,
    /// The routers' breakers, from their change events.
    breakers: Arc<breakers::Breakers>,
    /// When a running task is stale.
    stale_task_after: Duration,
    started_at: DateTime<Utc>,
}

impl Monitor {
    /// Feeds one model call to the anomaly detector; an anomaly is logged and counted.
    fn watch_call(&self, deployment: &str, latency_ms: u64, cost_micros_usd: u64) {
        // Counts far below 2^52: exact as f64.
        #[expect(
            clippy::cast_precision_loss,
            reason = "latencies and costs far below 2^52"
        )]
        let signals = [
            (Signal::LatencyMs, latency_ms as f64),
            (Signal::CostMicrosUsd, cost_micros_usd as f64),
        ];
        for (signal, value) in signals {
            if let Some(anomaly) = self.anomalies.observe(deployment, signal, value) {
                self.recent.anomaly();
                ::metrics::counter!(metrics::ANOMALIES, "signal" => signal.as_str()).increment(1);
                tracing::warn!(
                    deployment,
                    signal = signal.as_str(),
                    value,
                    mean = anomaly.mean,
                    z = anomaly.z,
                    "anomalous model call"
                );
            }
        }
    }

    /// Applies one decoded event that JetStream stored at `arrived_at`. The database comes
    /// first and counters move only after it, so a retried event is counted once it succeeds.
    async fn apply(&self, event: Event, arrived_at: DateTime<Utc>) -> Result<(), Error> {
        match &event {
            Event::Heartbeat(beat) => self.store.record_heartbeat(beat).await?,
            Event::Usage(call) => {
                // A redelivery of a call already summed moves nothing in memory either.
                if usage::record(self.store.pool(), call).await? {
                    ::metrics::counter!(metrics::TOKENS, "direction" => "prompt")
                        .increment(call.prompt_tokens);
                    ::metrics::counter!(metrics::TOKENS, "direction" => "completion")
                        .increment(call.completion_tokens);
                    self.recent.cost(call.cost_micros_usd);
                    self.watch_call(&call.deployment, call.latency_ms, call.cost_micros_usd);
                } else {
                    ::metrics::counter!(metrics::USAGE_DUPLICATES).increment(1);
                    tracing::debug!(deployment = %call.deployment, "usage event counted before");
                }
            }
            Event::Task { kind, update, .. } => {
                if let Some(update) = update {
                    tasks::record(self.store.pool(), update).await?;
                }
                match *kind {
                    "task.succeeded" => self.recent.task_finished(false),
                    "task.failed" => self.recent.task_finished(true),
                    _ => {}
                }
            }
            Event::Breaker { change, .. } => {
                if let Some(change) = change
                    && self.breakers.apply(change.clone())
                {
                    let open = self.breakers.open().len();
                    #[expect(clippy::cast_precision_loss, reason = "breaker counts are small")]
                    ::metrics::gauge!(metrics::OPEN_BREAKERS).set(open as f64);
                    tracing::info!(
                        router_id = %change.router_id,
                        deployment = %change.deployment,
                        state = ?change.state,
                        open,
                        "router circuit breaker changed"
                    );
                }
            }
            Event::Run { .. } => {}
            Event::Other => tracing::debug!("event of an unknown subject acknowledged"),
        }
        if let Some(occurred_at) = event.occurred_at() {
            self.recent
                .event_lag(events::lag_seconds(occurred_at, arrived_at));
        }
        let kind = event.kind();
        ::metrics::counter!(metrics::EVENTS, "kind" => kind).increment(1);
        self.tally.add(kind);
        Ok(())
    }
}

/// Runs the service until `shutdown` is cancelled, then shuts down in order.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let runtime = Runtime::new(shutdown);
    let handle = spawn(config, &runtime).await?;
    tracing::info!(http = %handle.http_addr, "colony-monitor ready");
    handle.wait().await;
    Ok(())
}

/// A started service. Cancel the runtime's shutdown token, then [`Handle::wait`].
pub struct Handle {
    /// Where the status API, `/healthz`, `/readyz` and `/metrics` answer.
    pub http_addr: SocketAddr,
    runtime: Runtime,
    pool: PgPool,
    bus: Bus,
    grace: Duration,
}

/// Starts the service on `runtime`: connects the database (applying migrations) and the bus,
/// creates the durable consumer, binds the HTTP listener (port 0 picks a free port; the bound
/// address is in the handle), starts the consumer, the alert rules and the sweep, and marks the
/// runtime ready.
pub async fn spawn(config: Config, runtime: &Runtime) -> anyhow::Result<Handle> {
    metrics::describe();
    let pool = colony_store::connect(&config.database).await?;
    let bus = Bus::connect(&config.bus, "colony-monitor").await?;
    bus.ensure_streams().await?;
    let consumer = bus
        .durable_consumer(StreamKind::Events, CONSUMER, FILTER)
        .await?;

    let http = colony_runtime::bind(&config.http.addr).await?;
    let http_addr = http.local_addr().context("http listener address")?;

    let store = Store::new(pool.clone());
    let liveness = store::Liveness {
        suspect_after: config.suspect_after(),
        dead_after: config.worker_stale_after,
    };
    let monitor = Arc::new(Monitor {
        store: store.clone(),
        tally: Tally::default(),
        liveness,
        anomalies: anomaly::Detector::new(config.anomaly),
        recent: Arc::default(),
        breakers: Arc::new(breakers::Breakers::new(config.breaker_forget_after)),
        stale_task_after: config.stale_task_after,
        started_at: Utc::now(),
    });
    colony_runtime::serve_http(
        runtime,
        http,
        colony_runtime::health_routes(runtime, colony_telemetry::prometheus())
            .merge(http::routes(monitor.clone())),
    );

    let recent = monitor.recent.clone();
    let breakers = monitor.breakers.clone();
    let handler = move |delivery| bus::handle(monitor.clone(), delivery);
    runtime.spawn(colony_bus::consume_bytes(
        bus.clone(),
        consumer,
        ConsumeOptions::new(CONSUMER, config.consumer_concurrency).observing(),
        runtime.shutdown.clone(),
        runtime.tracker.clone(),
        handler,
    ));
    let alerter = alerts::Alerter {
        config: config.alerts.clone(),
        store: store.clone(),
        liveness,
        breakers: breakers.clone(),
        stale_task_after: config.stale_task_after,
        http: reqwest::Client::new(),
    };
    runtime.spawn(alerter.run(
        recent.clone(),
        runtime.shutdown.clone(),
        runtime.tracker.clone(),
    ));
    runtime.spawn(sweep::run(
        store,
        recent,
        breakers,
        sweep::SweepOptions {
            interval: config.sweep_interval,
            liveness,
            worker_retention: config.worker_retention,
            stale_task_after: config.stale_task_after,
            task_retention: config.task_retention,
            usage_retention: config.usage_retention,
            usage_dedup_window: config.usage_dedup_window,
        },
        runtime.shutdown.clone(),
    ));

    runtime.set_ready(true);
    Ok(Handle {
        http_addr,
        runtime: runtime.clone(),
        pool,
        bus,
        grace: config.shutdown_grace,
    })
}

impl Handle {
    /// Waits for the runtime's shutdown token, then shuts down in order.
    pub async fn wait(self) {
        self.runtime.shutdown.cancelled().await;
        // Shutdown order: intake has stopped (the cancelled token ends the pull loop, the sweep
        // and the HTTP server; /readyz answers 503) → let in-flight events finish within the
        // grace period (unfinished ones are redelivered after ack_wait) → flush NATS → close
        // the pool.
        if !self.runtime.drain(self.grace).await {
            tracing::warn!(grace = ?self.grace, "in-flight events did not finish within the grace period");
        }
        if let Err(error) = self.bus.flush().await {
            tracing::warn!(%error, "bus flush failed");
        }
        self.pool.close().await;
    }
}
