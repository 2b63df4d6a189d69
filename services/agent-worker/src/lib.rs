//! colony-agent-worker: runs dispatched tasks. Stateless; replicas share one durable consumer
//! per role on the DISPATCH work queue.
//!
//! For each `TaskDispatch` the worker claims the attempt from the orchestrator (the database
//! decides ownership, not the broker), keeps the lease alive while it works, appends the prompt
//! to memory, asks the router for a completion, appends the reply, and publishes a
//! `TaskReport`. See `README.md` for the contract and failure modes.

mod bus;
mod claims;
pub mod config;
mod error;
mod grpc;
pub mod metrics;
pub mod sandbox;
pub mod task;
pub mod tools;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use colony_bus::{Bus, ConsumeOptions, StreamKind, subjects};
use colony_proto::v1;
use colony_runtime::Runtime;
use tokio_util::sync::CancellationToken;

pub use config::Config;

impl colony_runtime::ServiceConfig for Config {
    const ENV_PREFIX: &'static str = config::ENV_PREFIX;
    fn telemetry(&self) -> &colony_telemetry::TelemetryConfig {
        &self.telemetry
    }
}
pub use error::{Error, Peer};
pub use grpc::ERROR_CLASS_METADATA;

use crate::bus::{BusReporter, WorkerInfo};
use crate::grpc::GrpcPeers;
use crate::worker::{Settings, Slots, Worker};

/// How long abandoned tasks get to notice their cancellation and acknowledge their message.
const ABANDON_WAIT: Duration = Duration::from_secs(5);

/// Runs the worker until `shutdown` is cancelled, then shuts down in order.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let runtime = Runtime::new(shutdown);
    let handle = spawn(config, &runtime).await?;
    tracing::info!(http = %handle.http_addr, worker_id = %handle.worker_id, "colony-agent-worker ready");
    handle.wait().await
}

/// A started worker. Cancel the runtime's shutdown token, then [`Handle::wait`].
pub struct Handle {
    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub http_addr: SocketAddr,
    /// This process's identity in claims, reports and heartbeats.
    pub worker_id: String,
    runtime: Runtime,
    bus: Bus,
    grace: Duration,
    abandon: CancellationToken,
}

/// Starts the worker on `runtime`: connects the bus and ensures the streams and the per-role
/// durable consumers, binds the HTTP listener (port 0 picks a free port; the bound address is
/// in the handle), starts one consumer per role and the worker heartbeat, and marks the
/// runtime ready. The gRPC peers are connected lazily, so a peer that is down does not stop
/// the start.
pub async fn spawn(config: Config, runtime: &Runtime) -> anyhow::Result<Handle> {
    metrics::describe();
    let worker_id = config.resolved_worker_id();
    let bus = Bus::connect(&config.bus, "colony-agent-worker").await?;
    bus.ensure_streams().await?;
    let mut consumers = Vec::with_capacity(config.roles.len());
    for role in &config.roles {
        let consumer = bus
            .durable_consumer(
                StreamKind::Dispatch,
                &bus::durable_name(role),
                &subjects::dispatch(role),
            )
            .await?;
        consumers.push((role.clone(), consumer));
    }
    let (peers, claim_loop) = GrpcPeers::new(
        &config.orchestrator_url,
        &config.router_url,
        &config.memory_url,
        &worker_id,
        config.rpc_timeout,
        config.completion_timeout,
    )?;
    runtime.spawn(claim_loop.run(runtime.shutdown.clone()));

    let http = colony_runtime::bind(&config.http.addr).await?;
    let http_addr = http.local_addr().context("http listener address")?;
    colony_runtime::serve_http(
        runtime,
        http,
        colony_runtime::health_routes(runtime, colony_telemetry::prometheus()),
    );

    let slots = Slots::default();
    let abandon = CancellationToken::new();
    let worker = Arc::new(Worker::new(
        peers,
        BusReporter::new(bus.clone()),
        worker_id.clone(),
        Settings {
            ack_wait: config.bus.ack_wait,
            agent: config.agent.clone(),
            sandbox: config.sandbox.clone(),
        },
        slots.clone(),
        abandon.clone(),
    ));

    // v1: `slots` is per role; each role's consumer runs up to `slots` tasks at once.
    let per_role = usize::try_from(config.slots).context("slots does not fit in usize")?;
    let roles = u32::try_from(config.roles.len()).context("too many roles")?;
    let slots_total = config.slots.saturating_mul(roles);
    ::metrics::gauge!(metrics::SLOTS).set(f64::from(slots_total));
    ::metrics::gauge!(metrics::SLOTS_BUSY).set(0.0);
    for (role, consumer) in consumers {
        let name = bus::durable_name(&role);
        let role: Arc<str> = Arc::from(role);
        let worker = worker.clone();
        let handler = move |delivery| bus::handle(worker.clone(), role.clone(), delivery);
        runtime.spawn(colony_bus::consume::<v1::TaskDispatch, _, _>(
            bus.clone(),
            consumer,
            ConsumeOptions::new(name, per_role),
            runtime.shutdown.clone(),
            runtime.tracker.clone(),
            handler,
        ));
    }
    let cancelled = bus
        .client()
        .subscribe(bus.subject(&subjects::run_event("cancelling")))
        .await
        .context("subscribing to run cancellations")?;
    runtime.spawn(bus::stop_cancelled_runs(
        worker.clone(),
        cancelled,
        runtime.shutdown.clone(),
    ));
    runtime.spawn(bus::publish_heartbeats(
        bus.clone(),
        WorkerInfo {
            worker_id: worker_id.clone(),
            roles: config.roles.clone(),
            slots_total,
            started_at: SystemTime::now(),
        },
        slots,
        config.heartbeat_interval,
        runtime.shutdown.clone(),
    ));

    runtime.set_ready(true);
    Ok(Handle {
        http_addr,
        worker_id,
        runtime: runtime.clone(),
        bus,
        grace: config.shutdown_grace,
        abandon,
    })
}

impl Handle {
    /// Waits for the runtime's shutdown token, then shuts down in order.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.runtime.shutdown.cancelled().await;
        // Shutdown order: intake has stopped (the cancelled token ends every consume loop, the
        // worker heartbeat and the HTTP server; /readyz answers 503) → in-flight tasks get
        // `shutdown_grace` to finish and report → whatever still runs is abandoned: its token
        // is cancelled, it stops without reporting, and its lease expires so the
        // orchestrator's reaper dispatches it again → flush NATS.
        if !self.runtime.drain(self.grace).await {
            tracing::warn!(grace = ?self.grace, "in-flight tasks did not finish within the grace period; abandoning them");
            self.abandon.cancel();
            if tokio::time::timeout(ABANDON_WAIT, self.runtime.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!("abandoned tasks did not stop in time");
            }
        }
        if let Err(error) = self.bus.flush().await {
            tracing::warn!(%error, "bus flush failed");
        }
        Ok(())
    }
}
