//! Process runtime shared by the services: signals → cancellation, one task tracker, readiness,
//! and the `/healthz`, `/readyz`, `/metrics` endpoints.

pub mod batch;
pub mod clock;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use service::{ServiceConfig, main};

/// `<hostname>-<pid>-<4 random hex digits>` (`fallback` when there is no hostname): names one
/// service process in its events, unique per process even when replicas share a hostname or a
/// pid (containers). Only letters, digits, `_`, `-` and `.`, so it fits a message id.
pub fn instance_name(fallback: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_owned());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..4])
}
pub use tokio_util::sync::CancellationToken as Shutdown;

/// The root of a service's lifetime: cancelling `shutdown` stops intake everywhere; `tracker`
/// owns every background task so shutdown can wait for them.
#[derive(Clone)]
pub struct Runtime {
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    ready: Arc<AtomicBool>,
    failure: Arc<OnceLock<String>>,
}

impl Runtime {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            tracker: TaskTracker::new(),
            ready: Arc::new(AtomicBool::new(false)),
            failure: Arc::new(OnceLock::new()),
        }
    }

    /// A part the service cannot run without stopped on its own: record why (the first reason
    /// wins) and shut the whole service down.
    pub fn fail(&self, reason: impl Into<String>) {
        drop(self.failure.set(reason.into()));
        self.shutdown.cancel();
    }

    /// `Err` with the recorded reason if [`Runtime::fail`] was called; what a service's run
    /// returns after its orderly shutdown.
    pub fn outcome(&self) -> anyhow::Result<()> {
        match self.failure.get() {
            Some(reason) => Err(anyhow::anyhow!("{reason}")),
            None => Ok(()),
        }
    }

    /// Spawns `future` on the tracker so shutdown waits for it.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(future)
    }

    /// Marks the service ready (dependencies connected, consumers running).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.shutdown.is_cancelled()
    }

    /// Waits for every tracked task, at most `grace`. Returns false when the grace ran out.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.set_ready(false);
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // Not tracked: it must outlive the tracker's drain to cancel it.
    #[expect(
        clippy::disallowed_methods,
        reason = "the signal watcher outlives the tracker"
    )]
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
            () = token.cancelled() => return,
        }
        token.cancel();
    });
    Ok(())
}

#[derive(Clone)]
struct HealthState {
    runtime: Runtime,
    metrics: PrometheusHandle,
}

/// `/healthz` (the process answers), `/readyz` (ready and not shutting down), `/metrics`
/// (Prometheus text). Merge a service's own routes into it.
pub fn health_routes(runtime: &Runtime, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(HealthState {
            runtime: runtime.clone(),
            metrics,
        })
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, &'static str) {
    if state.runtime.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn render_metrics(State(state): State<HealthState>) -> String {
    state.metrics.run_upkeep();
    state.metrics.render()
}

/// Binds `addr`, failing with the address in the message.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid listen address {addr:?}: {e}"))?;
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Serves `router` on `listener` until `shutdown`, as a tracked task.
pub fn serve_http(runtime: &Runtime, listener: TcpListener, router: Router) {
    let shutdown = runtime.shutdown.clone();
    runtime.spawn(async move {
        let local = listener.local_addr().ok();
        // As for gRPC below: small answers must not wait for the peer's delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "setting TCP_NODELAY failed");
            }
        });
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(%error, ?local, "http server failed");
        }
    });
}

/// Serves a tonic `router` on `listener` until shutdown, as a tracked task. In-flight calls
/// finish after cancellation; a server that stops on its own fails the runtime.
pub fn serve_grpc(
    runtime: &Runtime,
    listener: TcpListener,
    router: tonic::transport::server::Router,
) -> tokio::task::JoinHandle<()> {
    let owner = runtime.clone();
    runtime.spawn(async move {
        // Small request/response frames: without TCP_NODELAY, Nagle's algorithm holds an
        // answer's last segment until the peer's delayed ACK (~40 ms on Linux) on every call.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |stream| {
                if let Ok(stream) = &stream
                    && let Err(error) = stream.set_nodelay(true)
                {
                    tracing::debug!(%error, "setting TCP_NODELAY failed");
                }
                stream
            },
        );
        let served = router
            .serve_with_incoming_shutdown(incoming, owner.shutdown.clone().cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "grpc server failed; shutting down");
            owner.fail(format!("grpc server failed: {error}"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_state_and_shutdown() {
        let runtime = Runtime::new(CancellationToken::new());
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve_http(
            &runtime,
            listener,
            health_routes(&runtime, colony_telemetry::prometheus()),
        );
        let url = format!("http://{addr}");
        let client = reqwest::Client::new();
        let status = |path: &'static str| {
            let client = client.clone();
            let url = url.clone();
            async move {
                client
                    .get(format!("{url}{path}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        assert_eq!(status("/healthz").await, 200);
        assert_eq!(status("/readyz").await, 503);
        runtime.set_ready(true);
        assert_eq!(status("/readyz").await, 200);
        assert_eq!(status("/metrics").await, 200);
        runtime.shutdown.cancel();
        assert!(runtime.drain(Duration::from_secs(5)).await);
        assert!(!runtime.is_ready());
    }

    #[test]
    fn instance_names_are_unique_and_safe() {
        let (a, b) = (instance_name("worker"), instance_name("worker"));
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')),
            "{a}"
        );
    }
}
