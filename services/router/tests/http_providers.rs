//! The HTTP providers (OpenAI-compatible, Anthropic) against a stub server on 127.0.0.1: the
//! request each sends, parsing, and the classification of every kind of failure.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use colony_router::config::{DeploymentConfig, ProviderKind, Tier};
use colony_router::error::{Error, ErrorClass, ProviderError};
use colony_router::provider::{self, ChatMessage, ChatRequest, ChatResponse, Role, TokenUsage};
use colony_router::routing::Deployment;
use colony_runtime::Runtime;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const KEY: &str = "sk-test-0123456789";

/// The headers and JSON body of each request the stub received.
type Seen = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

/// What the stub answers, and what it was sent.
struct Stub {
    base_url: String,
    seen: Seen,
    runtime: Runtime,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.runtime.shutdown.cancel();
    }
}

async fn stub(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    delay: Duration,
) -> Stub {
    let seen = Seen::default();
    let recorded = seen.clone();
    let handler = post(move |request_headers: HeaderMap, body_in: String| {
        let recorded = recorded.clone();
        async move {
            let parsed = serde_json::from_str(&body_in).unwrap_or(Value::Null);
            recorded.lock().unwrap().push((request_headers, parsed));
            tokio::time::sleep(delay).await;
            let mut response_headers = HeaderMap::new();
            for (name, value) in headers {
                response_headers.insert(*name, value.parse().unwrap());
            }
            (
                StatusCode::from_u16(status).unwrap(),
                response_headers,
                body,
            )
        }
    });
    // OpenAI's path and Anthropic's, answered alike.
    let app = axum::Router::new()
        .route("/v1/chat/completions", handler.clone())
        .route("/v1/messages", handler);
    let runtime = Runtime::new(CancellationToken::new());
    let listener = colony_runtime::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    colony_runtime::serve_http(&runtime, listener, app);
    Stub {
        base_url,
        seen,
        runtime,
    }
}

fn deployment(base_url: &str, timeout: Duration) -> Deployment {
    deployment_of(ProviderKind::OpenAi, base_url, timeout)
}

fn deployment_of(provider: ProviderKind, base_url: &str, timeout: Duration) -> Deployment {
    let config = DeploymentConfig {
        base_url: Some(base_url.into()),
        api_key_env: Some("UNUSED".into()),
        api_key: Some(SecretString::from(KEY)),
        tier: Tier::Mid,
        input_price_per_mtok: 1.0,
        output_price_per_mtok: 2.0,
        timeout,
        ..DeploymentConfig::new("gpt", provider, "model-test")
    };
    Deployment::new(&config, provider::build(&config).unwrap())
}

fn request() -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "hello"),
        ],
        max_tokens: Some(64),
        ..ChatRequest::default()
    }
}

async fn call(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
) -> (Result<ChatResponse, ProviderError>, Stub) {
    let stub = stub(status, headers, body, Duration::ZERO).await;
    let result = deployment(&stub.base_url, Duration::from_secs(10))
        .complete(&request())
        .await;
    (result, stub)
}

/// A successful answer with `content`, finish reason `stop` and the provider's token counts.
fn assert_answer(
    result: Result<ChatResponse, ProviderError>,
    content: &str,
    prompt: u64,
    completion: u64,
) {
    let response = result.unwrap();
    assert_eq!(response.content, content);
    assert_eq!(response.finish_reason, "stop");
    assert_eq!(response.usage, TokenUsage { prompt, completion });
}

#[tokio::test]
async fn success_parses_content_finish_reason_and_usage() {
    let body = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
    let (result, stub) = call(200, &[], body).await;
    assert_answer(result, "hi there", 12, 3);
    let (headers, sent) = &stub.seen.lock().unwrap()[0];
    assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
    assert_eq!(
        sent,
        &json!({
            "model": "model-test",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello"}
            ],
            "max_tokens": 64
        })
    );
}

#[tokio::test]
async fn rate_limit_keeps_retry_after() {
    let (result, _stub) = call(
        429,
        &[("retry-after", "2")],
        r#"{"error":{"message":"slow down"}}"#,
    )
    .await;
    let error = result.unwrap_err();
    assert_eq!(
        error,
        ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(2))
        }
    );
    assert_eq!(error.class(), ErrorClass::ExternalRateLimit);
}

#[tokio::test]
async fn server_errors_are_transient_and_gateway_errors_degrading() {
    let (result, _stub) = call(500, &[], "internal error").await;
    assert_eq!(result.unwrap_err().class(), ErrorClass::Transient);
    let (result, _stub) = call(503, &[], "overloaded").await;
    assert_eq!(result.unwrap_err().class(), ErrorClass::ExternalDegrading);
}

#[tokio::test]
async fn garbage_bodies_are_degrading() {
    for body in ["<html>oops</html>", r#"{"choices":[]}"#] {
        let (result, _stub) = call(200, &[], body).await;
        let error = result.unwrap_err();
        assert!(matches!(error, ProviderError::Malformed(_)), "{error}");
        assert_eq!(error.class(), ErrorClass::ExternalDegrading);
    }
}

#[tokio::test]
async fn bad_key_is_user_fixable_and_never_echoed() {
    let body = r#"{"error":{"message":"Incorrect API key provided: sk-test-0123456789","code":"invalid_api_key"}}"#;
    let (result, _stub) = call(401, &[], body).await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::UserFixable);
    let status = tonic::Status::from(Error::Provider {
        deployment: "gpt".into(),
        source: error,
    });
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(!status.message().contains(KEY), "{}", status.message());
}

#[tokio::test]
async fn context_too_long_is_user_fixable_and_other_rejections_permanent() {
    let body = r#"{"error":{"message":"This model's maximum context length is 8192 tokens, sk-test-0123456789","code":"context_length_exceeded"}}"#;
    let (result, _stub) = call(400, &[], body).await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::UserFixable);
    assert!(
        !error.to_string().contains(KEY),
        "the key is blotted out: {error}"
    );
    let (result, _stub) = call(404, &[], r#"{"error":{"message":"no such model"}}"#).await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert!(error.to_string().contains("no such model"), "{error}");
}

#[tokio::test]
async fn unreachable_provider_fails_fast_and_transient() {
    let closed = format!("http://127.0.0.1:{}/v1", colony_testkit::free_port());
    let started = Instant::now();
    let error = deployment(&closed, Duration::from_secs(30))
        .complete(&request())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(error, ProviderError::Transport(_)), "{error}");
    assert_eq!(error.class(), ErrorClass::Transient);
    assert!(
        !error.to_string().contains("127.0.0.1"),
        "no URL in {error}"
    );
}

#[tokio::test]
async fn slow_provider_times_out_as_transient() {
    let stub = stub(200, &[], "{}", Duration::from_secs(5)).await;
    let error = deployment(&stub.base_url, Duration::from_millis(200))
        .complete(&request())
        .await
        .unwrap_err();
    assert_eq!(error, ProviderError::Timeout(Duration::from_millis(200)));
    assert_eq!(error.class(), ErrorClass::Transient);
}

async fn anthropic_call(
    status: u16,
    body: &'static str,
    request: &ChatRequest,
) -> (Result<ChatResponse, ProviderError>, Stub) {
    let stub = stub(status, &[], body, Duration::ZERO).await;
    let result = deployment_of(
        ProviderKind::Anthropic,
        &stub.base_url,
        Duration::from_secs(10),
    )
    .complete(request)
    .await;
    (result, stub)
}

#[tokio::test]
async fn anthropic_sends_the_system_apart_and_reads_its_own_usage() {
    let body = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}],"stop_reason":"end_turn","usage":{"input_tokens":21,"output_tokens":4}}"#;
    let (result, stub) = anthropic_call(200, body, &request()).await;
    assert_answer(result, "hi there", 21, 4);
    let (headers, sent) = &stub.seen.lock().unwrap()[0];
    assert_eq!(headers["x-api-key"], KEY);
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert!(headers.get("authorization").is_none());
    assert_eq!(
        sent,
        &json!({
            "model": "model-test",
            "max_tokens": 64,
            "system": "be brief",
            "messages": [{"role": "user", "content": "hello"}]
        })
    );
}

#[tokio::test]
async fn anthropic_gets_a_max_tokens_and_reports_truncation_as_length() {
    let body = r#"{"content":[{"type":"text","text":"cut"}],"stop_reason":"max_tokens","usage":{"input_tokens":3,"output_tokens":1024}}"#;
    let request = ChatRequest {
        max_tokens: None,
        ..request()
    };
    let (result, stub) = anthropic_call(200, body, &request).await;
    assert_eq!(result.unwrap().finish_reason, "length");
    let sent = stub.seen.lock().unwrap()[0].1.clone();
    assert_eq!(sent["max_tokens"], provider::anthropic::DEFAULT_MAX_TOKENS);
}

#[tokio::test]
async fn anthropic_failures_are_classified_with_their_message() {
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let (result, _stub) = anthropic_call(529, overloaded, &request()).await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Transient);
    let (result, _stub) = anthropic_call(
        429,
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        &request(),
    )
    .await;
    assert_eq!(result.unwrap_err().class(), ErrorClass::ExternalRateLimit);
    let (result, _stub) = anthropic_call(
        400,
        r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}"#,
        &request(),
    )
    .await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert!(
        error.to_string().contains("roles must alternate"),
        "{error}"
    );
    let (result, _stub) = anthropic_call(200, r#"{"content":"nope"}"#, &request()).await;
    assert!(matches!(result.unwrap_err(), ProviderError::Malformed(_)));
}
