//! colony-memory: conversation history, long-term semantic memory, strategy memory and the
//! replay log behind the `colony.v1.Memory` gRPC API.
//!
//! PostgreSQL (the `memory` schema) is the source of truth. Each replica keeps an in-process
//! nearest-neighbour index of the live memories, rebuilt at start and kept in sync through
//! `colony.v1.event.memory.changed` events. See `README.md` for the contract, limits and
//! failure modes.

pub mod config;
mod context;
mod embeddings;
mod error;
mod grpc;
mod index;
mod long_term;
mod memories;
pub mod metrics;
mod replay;
pub mod semantic;
pub mod session;
mod store;
mod strategy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use colony_bus::Bus;
use colony_proto::v1::memory_server::MemoryServer;
use colony_runtime::Runtime;
use colony_runtime::clock::{Clock, SystemClock};
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
    long_term: Arc<long_term::LongTerm>,
}

/// Starts the service on `runtime`: connects the database (applying migrations) and the bus,
/// rebuilds the memory index, starts its sync, the sweeper and the replay log, binds both
/// listeners (port 0 picks a free port; the bound addresses are in the handle) and marks the
/// runtime ready.
pub async fn spawn(config: Config, runtime: &Runtime) -> anyhow::Result<Handle> {
    spawn_with_clock(config, runtime, Arc::new(SystemClock)).await
}

/// [`spawn`] with the clock that decides expiry and recency (tests move it by hand).
pub async fn spawn_with_clock(
    config: Config,
    runtime: &Runtime,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Handle> {
    // The recorder first: what is described or recorded before it exists is lost.
    colony_telemetry::prometheus();
    metrics::describe();
    let pool = colony_store::connect(&config.database).await?;
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
    let embeddings = Arc::new(match config.embedding_provider {
        config::EmbeddingProvider::Local => embeddings::Embeddings::Local(
            colony_inference::embed::Embedder::start(config.embedding.clone())
                .context("embedding model")?,
        ),
        config::EmbeddingProvider::Router => embeddings::Embeddings::Router(
            embeddings::RouterEmbeddings::new(&config.router_embeddings)
                .context("router embeddings client")?,
        ),
    });
    let semantic = &config.semantic;
    let long_term = Arc::new(long_term::LongTerm {
        memories: memories::Memories::new(pool.clone()),
        index: Arc::new(index::MemoryIndex::new(index::IndexParams {
            dimensions: embeddings.dimensions(),
            exact_below: semantic.exact_search_below,
            ef_search: semantic.ef_search,
        })),
        embeddings: embeddings.clone(),
        ranking: semantic::Ranking {
            recency_weight: semantic.recency_weight,
            recency_half_life: semantic.recency_half_life,
            importance_weight: semantic.importance_weight,
        },
        dedupe_similarity: semantic.dedupe_similarity,
        retention: config.retention.clone(),
        limits: config.limits.clone(),
        clock,
        bus: bus.clone(),
        origin: uuid::Uuid::new_v4().simple().to_string(),
    });
    // Subscribes to other replicas' changes, then rebuilds the index from PostgreSQL.
    long_term::start_sync(long_term.clone(), runtime, semantic.sync_interval).await?;
    let sessions = store::Store::new(pool.clone());
    long_term::start_sweeper(
        long_term.clone(),
        sessions.clone(),
        runtime,
        config.retention.sweep_interval,
    );
    let replay = replay::Replay::new(pool.clone());
    replay.start(&bus, runtime).await?;

    let service = MemoryServer::new(grpc::MemoryService {
        store: sessions,
        limits,
        semantic_limits: semantic::SemanticLimits {
            max_text_bytes: semantic.max_text_bytes,
            max_memories_per_write: semantic.max_memories_per_write,
            max_metadata_pairs: semantic.max_metadata_pairs,
            dimensions: embeddings.dimensions(),
        },
        context: context::Context::new(
            pool.clone(),
            config.compression.clone(),
            long_term.clone(),
        )?,
        strategies: strategy::Strategies::new(
            pool.clone(),
            embeddings.clone(),
            config.strategies.clone(),
        ),
        replay,
        long_term: long_term.clone(),
    })
    .max_decoding_message_size(config.max_request_bytes);
    // Stops accepting at cancellation and lets in-flight requests finish. A caller's shorter
    // `grpc-timeout` wins over the configured request timeout.
    colony_runtime::serve_grpc(
        runtime,
        grpc,
        tonic::transport::Server::builder()
            .timeout(config.request_timeout)
            .add_service(service),
    );

    runtime.set_ready(true);
    Ok(Handle {
        http_addr,
        grpc_addr,
        runtime: runtime.clone(),
        pool,
        bus,
        grace: config.shutdown_grace,
        long_term,
    })
}

impl Handle {
    /// What this replica's index holds for `tenant`: each memory's id and vector.
    pub fn indexed(&self, tenant: &str) -> std::collections::BTreeMap<i64, Vec<f32>> {
        self.long_term.index.snapshot(tenant)
    }

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
