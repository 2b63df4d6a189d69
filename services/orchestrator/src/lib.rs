//! colony-orchestrator: owns runs and tasks, serves the REST API and the `Orchestrator` gRPC
//! service, dispatches work through its outbox, applies worker reports fenced by attempt, and
//! re-dispatches expired leases.

pub mod config;
mod error;
mod grpc;
pub mod http;
pub mod metrics;
pub mod plan;
pub mod reports;
pub mod store;
pub mod topology;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use colony_bus::{Bus, ConsumeOptions, RelayOptions, StreamKind, subjects};
use colony_proto::v1::orchestrator_server::OrchestratorServer;
use colony_runtime::{Runtime, ServiceConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;
use store::Store;

impl ServiceConfig for Config {
    const ENV_PREFIX: &'static str = config::ENV_PREFIX;
    fn telemetry(&self) -> &colony_telemetry::TelemetryConfig {
        &self.telemetry
    }
}

/// Runs the service until `shutdown` is cancelled, then shuts down in order.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let runtime = Runtime::new(shutdown);
    let handle = spawn(config, &runtime).await?;
    tracing::info!(http = %handle.http_addr, grpc = %handle.grpc_addr, "colony-orchestrator ready");
    handle.wait().await
}

/// A started orchestrator. Cancel the runtime's shutdown token, then [`Handle::wait`].
pub struct Handle {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    runtime: Runtime,
    pool: PgPool,
    bus: Bus,
    grace: Duration,
}

/// Starts the orchestrator on `runtime`: database (with migrations), bus streams, the outbox
/// relay (which first publishes whatever an earlier process left unsent), the report
/// consumer, the reaper, and both listeners.
pub async fn spawn(config: Config, runtime: &Runtime) -> anyhow::Result<Handle> {
    metrics::describe();
    let pool = colony_store::connect(&config.database).await?;
    let bus = Bus::connect(&config.bus, "colony-orchestrator").await?;
    bus.ensure_streams().await?;
    let store = Store::new(pool.clone());

    let http = colony_runtime::bind(&config.http.addr).await?;
    let http_addr = http.local_addr().context("http listener address")?;
    let grpc = colony_runtime::bind(&config.grpc.addr).await?;
    let grpc_addr = grpc.local_addr().context("grpc listener address")?;

    runtime.spawn(store::OUTBOX.run_relay(
        pool.clone(),
        bus.clone(),
        RelayOptions::default(),
        runtime.shutdown.clone(),
    ));

    let consumer = bus
        .durable_consumer(
            StreamKind::Reports,
            reports::CONSUMER,
            &format!("{}.>", subjects::REPORT),
        )
        .await?;
    let report_store = store.clone();
    runtime.spawn(colony_bus::consume(
        bus.clone(),
        consumer,
        ConsumeOptions::new(reports::CONSUMER, 16),
        runtime.shutdown.clone(),
        runtime.tracker.clone(),
        move |delivery| reports::handle(report_store.clone(), delivery),
    ));

    runtime.spawn(reap(
        store.clone(),
        config.leases.clone(),
        runtime.shutdown.clone(),
    ));

    let api = http::routes(http::ApiState {
        store: store.clone(),
        runs: config.runs.clone(),
        max_body_bytes: config.http.max_body_bytes,
    });
    colony_runtime::serve_http(
        runtime,
        http,
        api.merge(colony_runtime::health_routes(
            runtime,
            colony_telemetry::prometheus(),
        )),
    );

    let service = OrchestratorServer::new(grpc::OrchestratorService {
        store,
        lease: config.leases.duration,
        runs: config.runs.clone(),
    });
    colony_runtime::serve_grpc(
        runtime,
        grpc,
        tonic::transport::Server::builder().add_service(service),
    );

    runtime.set_ready(true);
    Ok(Handle {
        http_addr,
        grpc_addr,
        runtime: runtime.clone(),
        pool,
        bus,
        grace: config.shutdown_grace,
    })
}

/// Re-dispatches expired leases every `reap_interval`. Correctness never depends on JetStream
/// redelivery: this loop is what brings a task back after its worker died.
async fn reap(store: Store, leases: config::LeaseConfig, shutdown: CancellationToken) {
    let max_attempts = i32::try_from(leases.max_attempts).unwrap_or(i32::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(leases.reap_interval) => {}
        }
        match store.reap_expired(max_attempts, 100).await {
            Ok(reaped) => {
                if reaped.requeued > 0 {
                    ::metrics::counter!(metrics::LEASES_EXPIRED, "action" => "requeued")
                        .increment(reaped.requeued);
                    ::metrics::counter!(metrics::TASKS, "state" => "requeued")
                        .increment(reaped.requeued);
                    tracing::warn!(count = reaped.requeued, "expired leases re-dispatched");
                }
                if reaped.failed > 0 {
                    ::metrics::counter!(metrics::LEASES_EXPIRED, "action" => "failed")
                        .increment(reaped.failed);
                    ::metrics::counter!(metrics::TASKS, "state" => "failed")
                        .increment(reaped.failed);
                    ::metrics::counter!(metrics::RUNS, "status" => "failed")
                        .increment(reaped.failed);
                    tracing::warn!(count = reaped.failed, "tasks out of attempts failed");
                }
            }
            Err(error) => tracing::warn!(%error, "reaper pass failed"),
        }
        match store
            .redispatch_unclaimed(leases.redispatch_after, 100)
            .await
        {
            Ok(0) => {}
            Ok(count) => {
                ::metrics::counter!(metrics::REDISPATCHED).increment(count);
                tracing::warn!(count, "unclaimed tasks dispatched again");
            }
            Err(error) => tracing::warn!(%error, "redispatch pass failed"),
        }
    }
}

impl Handle {
    /// Waits for the runtime's shutdown token, then shuts down in order.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.runtime.shutdown.cancelled().await;
        // Shutdown order: intake stopped (servers, consumer and reaper watch the token;
        // /readyz answers 503) → in-flight requests and handlers finish within the grace
        // period → flush NATS → close the pool.
        if !self.runtime.drain(self.grace).await {
            tracing::warn!(grace = ?self.grace, "in-flight work did not finish within the grace period");
        }
        if let Err(error) = self.bus.flush().await {
            tracing::warn!(%error, "bus flush failed");
        }
        self.pool.close().await;
        self.runtime.outcome()
    }
}
