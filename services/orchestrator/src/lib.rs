//! colony-orchestrator: owns runs and tasks, serves the REST API and the `Orchestrator` gRPC
//! service, dispatches work through its outbox, applies worker reports fenced by attempt,
//! retries failed attempts and expired leases per error class (then dead-letters them),
//! cancels runs, and pauses dispatch in maintenance mode. A run is a DAG of role tasks: the
//! topology dial picks monolith, hybrid (a template) or swarm (a planner whose plan is
//! validated, repaired or replaced by the template), and dependents run once their
//! dependencies succeeded, with their outputs in context.

pub mod approval;
mod approvals_api;
pub mod config;
mod control;
pub mod cron;
mod error;
pub mod flow;
mod grpc;
pub mod http;
pub mod metrics;
pub mod plan;
pub mod reports;
pub mod retry;
pub mod roster;
pub mod store;
pub mod topology;
mod watch;

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
/// consumer, one recovery pass over expired leases, the reaper and scheduler loop, and both
/// listeners.
pub async fn spawn(config: Config, runtime: &Runtime) -> anyhow::Result<Handle> {
    metrics::describe();
    // The deprecated `runs.role` / `runs.system_prompt` become the roster's monolith.
    let config = config.migrated();
    let pool = colony_store::connect(&config.database).await?;
    let bus = Bus::connect(&config.bus, "colony-orchestrator").await?;
    bus.ensure_streams().await?;
    let store = Store::new(pool.clone())
        .with_dispatch_bus(bus.clone())
        .with_retries(config.retries.clone())
        .with_roster(config.roster.clone())
        .with_approvals(approval::ApprovalPolicy {
            spend_threshold_usd: config.approvals.spend_threshold_usd,
            max_tokens: config.runs.max_tokens,
            default_tier: config.runs.tier.clone(),
        })
        .with_spawn(config.spawn)
        .with_limits(config.limits.clone())
        .with_run_defaults(store::RunDefaults {
            tier: config.runs.tier.clone(),
            failure_policy: config.runs.failure_policy,
        });
    store.load_quality().await?;
    if config.leases.max_attempts.is_some() {
        tracing::warn!(
            "leases.max_attempts is deprecated and ignored: an expired lease counts as a \
             transient failure, so retries.transient.max_attempts decides"
        );
    }

    let http = colony_runtime::bind(&config.http.addr).await?;
    let http_addr = http.local_addr().context("http listener address")?;
    let grpc = colony_runtime::bind(&config.grpc.addr).await?;
    let grpc_addr = grpc.local_addr().context("grpc listener address")?;

    // Dispatcher passes publish after they commit, not through the outbox: a dispatch that a
    // crash cut off would otherwise wait for `leases.redispatch_after`. Before the relay
    // starts, so that the dispatches still in the outbox are told apart.
    let undispatched = store
        .undispatch_unclaimed()
        .await
        .context("returning unclaimed dispatches to the queue")?;
    if undispatched > 0 {
        tracing::info!(undispatched, "unclaimed dispatches returned to the queue");
    }
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
    // Reports in flight at once; the ones that wait together are applied in one transaction.
    let (report_queue, report_loop) = reports::queue(store.clone());
    runtime.spawn(report_loop.run(runtime.shutdown.clone()));
    runtime.spawn(colony_bus::consume(
        bus.clone(),
        consumer,
        ConsumeOptions::new(reports::CONSUMER, 128),
        runtime.shutdown.clone(),
        runtime.tracker.clone(),
        move |delivery| reports::handle(report_queue.clone(), delivery),
    ));

    // Recovery: attempts whose lease expired while no orchestrator ran (their workers died
    // with it, or meanwhile) are re-queued before anything is served; the relay above
    // publishes what an earlier process left unsent.
    // Flow limits first: inline dispatch on every replica reads them from the database.
    store
        .apply_limits()
        .await
        .context("writing the flow limits")?;
    recover(&store).await?;
    runtime.spawn(reap(
        store.clone(),
        config.leases.clone(),
        runtime.shutdown.clone(),
    ));
    runtime.spawn(dispatch(
        store.clone(),
        config.leases.reap_interval,
        runtime.shutdown.clone(),
    ));

    // Cron: every replica runs the loop; the one holding the advisory lock fires.
    let schedules = cron::Schedules::new(&store);
    let clock: std::sync::Arc<dyn cron::Clock> = std::sync::Arc::new(cron::SystemClock);
    if config.cron.enabled {
        let scheduler = cron::Scheduler::new(schedules.clone(), config.cron.clone(), clock.clone());
        runtime.spawn(scheduler.run(runtime.shutdown.clone()));
    }

    let rate = std::sync::Arc::new(flow::RateLimiter::new(&config.limits, pool.clone()));
    let api = http::routes(http::ApiState {
        store: store.clone(),
        runs: config.runs.clone(),
        max_body_bytes: config.http.max_body_bytes,
        rate: rate.clone(),
    });
    let api = api.merge(control::routes(http::ApiState {
        store: store.clone(),
        runs: config.runs.clone(),
        max_body_bytes: config.http.max_body_bytes,
        rate: rate.clone(),
    }));
    let api = api.merge(approvals_api::routes(http::ApiState {
        store: store.clone(),
        runs: config.runs.clone(),
        max_body_bytes: config.http.max_body_bytes,
        rate: rate.clone(),
    }));
    let api = api.merge(watch::routes(watch::WatchState {
        store: store.clone(),
        runs: config.runs.clone(),
        bus: bus.clone(),
        shutdown: runtime.shutdown.clone(),
    }));
    let api = api.merge(cron::routes(cron::ApiState {
        schedules,
        runs: config.runs.clone(),
        cron: config.cron.clone(),
        clock,
        max_body_bytes: config.http.max_body_bytes,
    }));
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

/// One reaper pass over every expired lease, then the due dispatches, before serving.
async fn recover(store: &Store) -> anyhow::Result<()> {
    let mut total = store::Reaped::default();
    loop {
        let reaped = store
            .reap_expired(REAP_BATCH)
            .await
            .context("recovering expired leases")?;
        count_reaped(&reaped);
        total.requeued += reaped.requeued;
        total.dead_lettered += reaped.dead_lettered;
        total.cancelled += reaped.cancelled;
        if reaped.requeued + reaped.dead_lettered + reaped.cancelled < REAP_BATCH as u64 {
            break;
        }
    }
    let dispatched = store
        .dispatch_all_due(DISPATCH_BATCH)
        .await
        .context("dispatching due tasks")?;
    let maintenance = store
        .maintenance()
        .await
        .context("reading maintenance mode")?;
    ::metrics::gauge!(metrics::MAINTENANCE).set(if maintenance.paused { 1.0 } else { 0.0 });
    tracing::info!(
        requeued = total.requeued,
        dead_lettered = total.dead_lettered,
        cancelled = total.cancelled,
        dispatched,
        paused = maintenance.paused,
        "recovered expired leases"
    );
    Ok(())
}

const REAP_BATCH: i64 = 100;
const DISPATCH_BATCH: i64 = 500;

fn count_reaped(reaped: &store::Reaped) {
    for (action, count) in [
        ("requeued", reaped.requeued),
        ("dead_lettered", reaped.dead_lettered),
        ("cancelled", reaped.cancelled),
    ] {
        if count > 0 {
            ::metrics::counter!(metrics::LEASES_EXPIRED, "action" => action).increment(count);
        }
    }
    if reaped.requeued > 0 {
        tracing::warn!(count = reaped.requeued, "expired leases re-queued");
    }
    if reaped.dead_lettered > 0 {
        tracing::warn!(
            count = reaped.dead_lettered,
            "tasks out of attempts dead-lettered"
        );
    }
    if reaped.cancelled > 0 {
        tracing::info!(
            count = reaped.cancelled,
            "cancelled tasks whose worker went away stopped"
        );
    }
}

/// How often the reaper reads the work gauges (queue depth and age, unfinished tasks and runs)
/// at most: fresh enough for a scrape, cheap for the database.
const WORK_GAUGES_EVERY: Duration = Duration::from_secs(2);

/// Every `reap_interval`: ends expired leases (re-queued, dead-lettered or cancelled),
/// dispatches again attempts nobody claimed and sets the work gauges (the dispatcher
/// loop dispatches attempts whose backoff has passed).
/// Correctness never depends on JetStream redelivery: this loop is what brings a task back
/// after its worker died. Nothing is dispatched in maintenance mode.
async fn reap(store: Store, leases: config::LeaseConfig, shutdown: CancellationToken) {
    let mut gauges = metrics::WorkGauges::default();
    let mut last_gauges: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(leases.reap_interval) => {}
        }
        match store.maintenance().await {
            Ok(maintenance) => ::metrics::gauge!(metrics::MAINTENANCE).set(if maintenance.paused {
                1.0
            } else {
                0.0
            }),
            Err(error) => tracing::warn!(%error, "reading maintenance mode failed"),
        }
        match store.reap_expired(REAP_BATCH).await {
            Ok(reaped) => count_reaped(&reaped),
            Err(error) => tracing::warn!(%error, "reaper pass failed"),
        }
        if last_gauges.is_none_or(|at| at.elapsed() >= WORK_GAUGES_EVERY) {
            last_gauges = Some(std::time::Instant::now());
            match store.active_work().await {
                Ok(work) => gauges.record(&work),
                Err(error) => tracing::warn!(%error, "reading the work gauges failed"),
            }
        }
        match store.refresh_statistics().await {
            Ok(tables) if tables.is_empty() => {}
            Ok(tables) => tracing::debug!(?tables, "queue tables analyzed"),
            Err(error) => tracing::warn!(%error, "refreshing the queue tables' statistics failed"),
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

/// The dispatcher: woken by run creation and finished attempts in this process, and every
/// `tick` (retries whose backoff passed, slots freed on other replicas), it dispatches ready
/// attempts that wait for dispatch — round-robin across tenants, priority first, within the
/// flow limits ([`Store::dispatch_due`]). Nothing is dispatched in maintenance mode.
async fn dispatch(store: Store, tick: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = store.dispatcher_woken() => {}
            () = tokio::time::sleep(tick) => {}
        }
        match store.dispatch_all_due(DISPATCH_BATCH).await {
            Ok(0) => {}
            Ok(count) => tracing::debug!(count, "due tasks dispatched"),
            Err(error) => tracing::warn!(%error, "dispatcher pass failed"),
        }
        // Wake-ups that arrive meanwhile are kept and served by one pass: a busy orchestrator
        // applies many report batches a second, and each would otherwise cost a pass.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(DISPATCH_COALESCE) => {}
        }
    }
}

/// The least time between two dispatcher passes.
const DISPATCH_COALESCE: Duration = Duration::from_millis(5);

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
