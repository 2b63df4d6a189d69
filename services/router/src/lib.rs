//! colony-router: the only way agents reach models. It serves `colony.v1.Router` over gRPC and
//! an OpenAI-compatible HTTP API, plans the deployments that can take a request (privacy,
//! capabilities, context window, price, latency), calls them through per-deployment rate limits
//! and circuit breakers with retries and fallbacks, holds each call's worst-case cost on its
//! budgets in PostgreSQL, sorts every failure into one of five error classes, and writes each
//! call's usage and cost to `router.usage_ledger` in batches, with a `UsageRecord` per call
//! (published on `colony.v1.usage.recorded` by the outbox relay). Every circuit breaker change
//! is published on `colony.v1.event.breaker` (best effort) for the monitor.

pub mod breaker_events;
pub mod budget;
pub mod config;
pub mod error;
pub mod grpc;
pub mod ledger;
pub mod metrics;
pub mod openai_http;
pub mod provider;
pub mod resilience;
pub mod routing;
pub mod service;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use colony_bus::{Bus, RelayOptions};
use colony_proto::v1::router_server::RouterServer;
use colony_runtime::Runtime;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

impl colony_runtime::ServiceConfig for Config {
    const ENV_PREFIX: &'static str = config::ENV_PREFIX;
    fn telemetry(&self) -> &colony_telemetry::TelemetryConfig {
        &self.telemetry
    }
    fn load(sources: &colony_config::Sources) -> Result<Self, colony_config::Error> {
        config::load(sources)
    }
}

use crate::config::ProviderKind;
use crate::routing::Deployments;

/// A started router. Cancel the runtime's shutdown token, then [`Handle::wait`].
pub struct Handle {
    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub http_addr: SocketAddr,
    /// Where `colony.v1.Router` answers.
    pub grpc_addr: SocketAddr,
    runtime: Runtime,
    grace: Duration,
    grpc: JoinHandle<()>,
    service: std::sync::Arc<service::Service>,
    relay: CancellationToken,
    pool: PgPool,
    bus: Bus,
}

/// Starts the router on `runtime`: builds every deployment's provider, connects the database
/// (applying migrations) and the bus, binds both listeners (port 0 picks a free port; the bound
/// addresses are in the handle), starts the gRPC server, the health endpoints, the outbox
/// relay and the breaker-change publisher, and marks the runtime ready.
/// How often the tenant budget gauges are read from the database: fresh enough for a scrape,
/// cheap for the database.
const TENANT_BUDGET_GAUGES_EVERY: Duration = Duration::from_secs(5);

pub async fn spawn(config: Config, runtime: &Runtime) -> anyhow::Result<Handle> {
    // The recorder first: what is described or recorded before it exists is lost (the local
    // model records its size while the deployments are built).
    colony_telemetry::prometheus();
    colony_inference::metrics::describe();
    metrics::describe();
    let pool = colony_store::connect(&config.database).await?;
    let deployments = Deployments::from_config(&config, Some(&pool))?;
    let mut embedders = openai_http::Embedders::new();
    for embedding in &config.embeddings {
        let embedder = colony_inference::embed::Embedder::start(embedding.local.clone())
            .map_err(|err| anyhow::anyhow!("embedding model {}: {err}", embedding.name))?;
        embedders.insert(embedding.name.clone(), embedder);
    }
    for deployment in deployments
        .iter()
        .filter(|d| d.provider_kind == ProviderKind::Scripted)
    {
        tracing::warn!(
            deployment = %deployment.name,
            "deployment uses the scripted provider: replies are canned, not generated"
        );
    }
    let bus = Bus::connect(&config.bus, "colony-router").await?;
    bus.ensure_streams().await?;
    // Wired before any call can move a breaker, so that no change goes unpublished.
    let router_id = breaker_events::router_id();
    let (breaker_changes, changed_breakers) = tokio::sync::mpsc::channel(breaker_events::QUEUE);
    for deployment in deployments.iter() {
        deployment.breaker.send_changes_to(breaker_changes.clone());
    }
    drop(breaker_changes);
    tracing::info!(%router_id, "breaker changes published as this replica");
    runtime.spawn(breaker_events::publish(
        bus.clone(),
        router_id,
        changed_breakers,
        runtime.shutdown.clone(),
    ));
    let http = colony_runtime::bind(&config.http.addr).await?;
    let grpc = colony_runtime::bind(&config.grpc.addr).await?;
    let http_addr = http.local_addr()?;
    let grpc_addr = grpc.local_addr()?;

    let budgets = budget::Budgets::new();
    let tenant_limits: Vec<(String, Option<u64>)> = config
        .tenants
        .iter()
        .map(|tenant| (tenant.name.clone(), tenant.budget_micros()))
        .collect();
    budgets.set_tenant_limits(&pool, &tenant_limits).await?;
    runtime.spawn(budget::report_tenant_budgets(
        pool.clone(),
        TENANT_BUDGET_GAUGES_EVERY,
        runtime.shutdown.clone(),
    ));
    for deployment in deployments.iter() {
        deployment.limiter.sync().await?;
    }
    // Gives back rate-limit leases a replica left unused, and at shutdown all of them (before
    // the pool closes: `Handle::wait` drains tracked tasks first).
    let tended: Vec<_> = deployments.iter().cloned().collect();
    let shutdown = runtime.shutdown.clone();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(resilience::limits::TEND_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            for deployment in &tended {
                deployment.limiter.tend().await;
            }
        }
        for deployment in &tended {
            deployment.limiter.release().await;
        }
    });
    let ledger = ledger::LedgerWriter::spawn(pool.clone(), &config.ledger, runtime);
    let service = std::sync::Arc::new(service::Service::new(
        deployments,
        pool.clone(),
        config.resilience.clone(),
        budgets,
        ledger,
    ));
    colony_runtime::serve_http(
        runtime,
        http,
        colony_runtime::health_routes(runtime, colony_telemetry::prometheus()).merge(
            openai_http::routes(
                service.clone(),
                openai_http::Tenants::from_config(&config.tenants),
                embedders,
            ),
        ),
    );
    let router = grpc::Router::new(service.clone());
    let grpc = colony_runtime::serve_grpc(
        runtime,
        grpc,
        tonic::transport::Server::builder()
            .trace_fn(grpc::request_span)
            .add_service(RouterServer::new(router)),
    );
    // Not a child of the root token: the relay outlives intake (see `Handle::wait`).
    let relay = CancellationToken::new();
    runtime.spawn(ledger::OUTBOX.run_relay(
        pool.clone(),
        bus.clone(),
        RelayOptions::default(),
        relay.clone(),
    ));
    runtime.set_ready(true);
    Ok(Handle {
        http_addr,
        grpc_addr,
        runtime: runtime.clone(),
        grace: config.shutdown_grace,
        grpc,
        service,
        relay,
        pool,
        bus,
    })
}

impl Handle {
    /// Waits for the runtime's shutdown token, then shuts down in order. Fails if the gRPC
    /// server stopped on its own.
    pub async fn wait(self) -> anyhow::Result<()> {
        let runtime = self.runtime;
        runtime.shutdown.cancelled().await;
        // 1. Stop intake: the cancelled token makes /readyz answer 503 and stops both servers
        //    accepting; in-flight calls finish, each handing its entry to the ledger writer.
        let served = tokio::time::timeout(self.grace, self.grpc).await;
        // 2. Let streams still being driven end, then write every queued ledger entry (each
        //    with its outbox row).
        self.service.close(self.grace).await;
        // 3. Stop the relay, wait for every tracked task, then relay what the last calls wrote
        //    (rows left unsent are published by the next start).
        self.relay.cancel();
        if !runtime.drain(self.grace).await {
            tracing::warn!(grace = ?self.grace, "tasks still running after the grace period");
        }
        if let Err(error) = ledger::OUTBOX
            .relay_once(&self.pool, &self.bus, RelayOptions::default().batch)
            .await
        {
            tracing::warn!(%error, "final outbox pass failed");
        }
        // 4. Flush NATS, then close the pool.
        if let Err(error) = self.bus.flush().await {
            tracing::warn!(%error, "nats flush failed");
        }
        self.pool.close().await;
        match served {
            Ok(joined) => {
                joined.context("grpc server task panicked")?;
                runtime.outcome()
            }
            Err(_) => anyhow::bail!("in-flight calls did not finish within {:?}", self.grace),
        }
    }
}

/// Runs the router until `shutdown` is cancelled (by a signal in the binary).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let runtime = Runtime::new(shutdown);
    let handle = spawn(config, &runtime).await?;
    tracing::info!(http = %handle.http_addr, grpc = %handle.grpc_addr, "colony-router ready");
    handle.wait().await
}
