//! colony-memory: conversation history behind the `colony.v1.Memory` gRPC API.
//!
//! Sessions and their messages live in the `memory` schema. An append is one transaction that
//! locks the session row to hand out gap-free sequence numbers; a list pages by sequence
//! number. See `README.md` for the contract, limits and failure modes.

pub mod config;
mod error;
mod grpc;
pub mod metrics;
pub mod session;
mod store;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use colony_bus::Bus;
use colony_proto::v1::memory_server::MemoryServer;
use colony_runtime::Runtime;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;

impl colony_runtime::ServiceConfig for Config {
    const ENV_PREFIX: &'static str = config::ENV_PREFIX;
    fn telemetry(&self) -> &colony_telemetry::TelemetryConfig {
        &self.telemetry
    }
}
pub use error::Error;

/// Runs the service until `shutdown` is cancelled, then shuts down in order.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let runtime = Runtime::new(shutdown);
    let handle = spawn(config, &runtime).await?;
    tracing::info!(http = %handle.http_addr, grpc = %handle.grpc_addr, "colony-memory ready");
    handle.wait().await
}

/// A started service. Cancel the runtime's shutdown token, then [`Handle::wait`].
pub struct Handle {
    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub http_addr: SocketAddr,
    /// Where `colony.v1.Memory` answers.
    pub grpc_addr: SocketAddr,
    runtime: Runtime,
    pool: PgPool,
    bus: Bus,
    grace: Duration,
}

/// Starts the service on `runtime`: connects the database (applying migrations) and the bus,
/// binds both listeners (port 0 picks a free port; the bound addresses are in the handle) and
/// marks the runtime ready.
pub async fn spawn(config: Config, runtime: &Runtime) -> anyhow::Result<Handle> {
    // The recorder first: what is described or recorded before it exists is lost.
    colony_telemetry::prometheus();
    metrics::describe();
    let pool = colony_store::connect(&config.database).await?;
    // v1 consumes nothing; later versions consume run and task events.
    let bus = Bus::connect(&config.bus, "colony-memory").await?;
    bus.ensure_streams().await?;

    let http = colony_runtime::bind(&config.http.addr).await?;
    let http_addr = http.local_addr().context("http listener address")?;
    let grpc = colony_runtime::bind(&config.grpc.addr).await?;
    let grpc_addr = grpc.local_addr().context("grpc listener address")?;

    colony_runtime::serve_http(
        runtime,
        http,
        colony_runtime::health_routes(runtime, colony_telemetry::prometheus()),
    );

    let limits = session::Limits {
        max_message_bytes: config.max_message_bytes,
        max_messages_per_append: config.max_messages_per_append,
        max_page_bytes: config.max_page_bytes,
        max_texts_per_embed: config.max_texts_per_embed,
    };
    let embedder = colony_inference::embed::Embedder::start(config.embedding.clone())
        .context("embedding model")?;
    let service = MemoryServer::new(grpc::MemoryService::new(
        store::Store::new(pool.clone()),
        limits,
        embedder,
    ))
    .max_decoding_message_size(config.max_request_bytes);
    // Stops accepting at cancellation and lets in-flight requests finish.
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

impl Handle {
    /// Waits for the runtime's shutdown token, then shuts down in order. Fails if a server
    /// stopped on its own.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.runtime.shutdown.cancelled().await;
        // Shutdown order: intake has stopped (the cancelled token stops the gRPC and HTTP
        // servers accepting; /readyz answers 503) → finish in-flight requests within the grace
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
