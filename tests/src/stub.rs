//! A small OpenAI-compatible HTTP server for tests: answers chat completions with an echo of
//! the last user message and fixed usage, over real HTTP, whole or streamed as OpenAI streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::http::header;
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const PROMPT_TOKENS: u64 = 21;
pub const COMPLETION_TOKENS: u64 = 4;

pub struct StubProvider {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// The answer as OpenAI streams it (server-sent events): the text, the finish reason, the
/// usage, then `[DONE]`.
fn streamed(model: &Value, content: &str, usage: Value) -> Response {
    let chunk = |choices: Value, usage: Value| {
        json!({
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": choices,
            "usage": usage
        })
    };
    let events = [
        chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": null}]),
            Value::Null,
        ),
        chunk(
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            Value::Null,
        ),
        chunk(json!([]), usage),
    ];
    let mut body: String = events
        .iter()
        .map(|event| format!("data: {event}\n\n"))
        .collect();
    body.push_str("data: [DONE]\n\n");
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

impl StubProvider {
    /// Starts on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on `addr` (`host:port`).
    pub async fn start_on(addr: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let last = body["messages"]
                        .as_array()
                        .and_then(|m| m.last())
                        .and_then(|m| m["content"].as_str())
                        .unwrap_or("")
                        .to_owned();
                    let content = format!("echo: {last}");
                    let usage = json!({
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": COMPLETION_TOKENS,
                        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS
                    });
                    if body["stream"].as_bool() == Some(true) {
                        return streamed(&body["model"], &content, usage);
                    }
                    Json(json!({
                        "id": "chatcmpl-stub",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop"
                        }],
                        "usage": usage
                    }))
                    .into_response()
                }
            }),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        #[expect(clippy::disallowed_methods, reason = "test server owned by the test")]
        let server = tokio::spawn(async move {
            drop(
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        drop(stopped.await);
                    })
                    .await,
            );
        });
        Ok(Self {
            addr,
            requests,
            stop: Some(stop),
            server: Some(server),
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops answering: new connections are refused.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(server) = self.server.take() {
            drop(server.await);
        }
    }
}
