//! The HTTP providers (OpenAI-compatible, Anthropic, Gemini) against a stub server on
//! 127.0.0.1 speaking each wire format, streams (server-sent events) included: the request
//! each sends, parsing, and the classification of every kind of failure.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use colony_router::config::{DeploymentConfig, ProviderKind, Tier};
use colony_router::error::{Error, ErrorClass, ProviderError};
use colony_router::provider::{
    self, ChatMessage, ChatRequest, ChatResponse, ChatStream, Provider, Role, StreamAccumulator,
    StreamEvent, TokenUsage, ToolCall, ToolChoice, ToolSpec,
};
use colony_router::routing::Deployment;
use colony_runtime::Runtime;
use futures::StreamExt as _;
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
    stub_reply(Reply {
        status,
        headers,
        body,
        delay,
        chunk: None,
    })
    .await
}

/// What the stub answers every request with.
struct Reply {
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    delay: Duration,
    /// Send the body in pieces of this many bytes, a moment apart, so the client reads it in
    /// many chunks cut at arbitrary places (inside lines, between `\r` and `\n`).
    chunk: Option<usize>,
}

/// The request's path and query, recorded with its headers under this made-up name.
const STUB_URI: &str = "x-stub-uri";

async fn stub_reply(reply: Reply) -> Stub {
    let Reply {
        status,
        headers,
        body,
        delay,
        chunk,
    } = reply;
    let seen = Seen::default();
    let recorded = seen.clone();
    let handler = post(
        move |uri: Uri, mut request_headers: HeaderMap, body_in: String| {
            let recorded = recorded.clone();
            async move {
                let parsed = serde_json::from_str(&body_in).unwrap_or(Value::Null);
                request_headers.insert(STUB_URI, uri.to_string().parse().unwrap());
                recorded.lock().unwrap().push((request_headers, parsed));
                tokio::time::sleep(delay).await;
                let mut response_headers = HeaderMap::new();
                for (name, value) in headers {
                    response_headers.insert(*name, value.parse().unwrap());
                }
                let body = match chunk {
                    None => Body::from(body),
                    Some(size) => {
                        let pieces: Vec<&'static [u8]> = body.as_bytes().chunks(size).collect();
                        Body::from_stream(futures::stream::iter(pieces).then(|piece| async move {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            Ok::<_, std::io::Error>(piece)
                        }))
                    }
                };
                (
                    StatusCode::from_u16(status).unwrap(),
                    response_headers,
                    body,
                )
            }
        },
    );
    // OpenAI's paths, Anthropic's and Gemini's, answered alike.
    let app = axum::Router::new()
        .route("/v1/chat/completions", handler.clone())
        .route("/v1/messages", handler.clone())
        .route("/v1/models/model-test:generateContent", handler.clone())
        .route("/v1/models/model-test:streamGenerateContent", handler);
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

fn config_of(provider: ProviderKind, base_url: &str, timeout: Duration) -> DeploymentConfig {
    DeploymentConfig {
        base_url: Some(base_url.into()),
        api_key_env: Some("UNUSED".into()),
        api_key: Some(SecretString::from(KEY)),
        tier: Tier::Mid,
        input_price_per_mtok: 1.0,
        output_price_per_mtok: 2.0,
        timeout,
        ..DeploymentConfig::new("gpt", provider, "model-test")
    }
}

fn deployment_of(provider: ProviderKind, base_url: &str, timeout: Duration) -> Deployment {
    let config = config_of(provider, base_url, timeout);
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

// ---- Tools and streaming ----

/// A conversation that used tools: two parallel calls and their results, in JSON mode with a
/// required tool call next.
fn tool_request() -> ChatRequest {
    let call = |id: &str, city: &str| ToolCall {
        id: id.into(),
        name: "weather".into(),
        arguments: format!(r#"{{"city":"{city}"}}"#),
    };
    let result = |id: &str, content: &str| ChatMessage {
        tool_call_id: Some(id.into()),
        ..ChatMessage::new(Role::Tool, content)
    };
    ChatRequest {
        messages: vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "weather in Paris and Oslo?"),
            ChatMessage {
                tool_calls: vec![call("call_a", "Paris"), call("call_b", "Oslo")],
                ..ChatMessage::new(Role::Assistant, "")
            },
            result("call_a", "sunny"),
            result("call_b", r#"{"temp":3}"#),
        ],
        max_tokens: Some(64),
        temperature: Some(0.5),
        top_p: Some(0.9),
        seed: Some(7),
        stop: vec!["END".into()],
        tools: vec![ToolSpec {
            name: "weather".into(),
            description: "Weather of a city".into(),
            parameters: weather_schema(),
        }],
        tool_choice: Some(ToolChoice::Required),
        json_mode: true,
    }
}

fn weather_schema() -> Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}})
}

fn provider_at(kind: ProviderKind, base_url: &str) -> Arc<dyn Provider> {
    provider::build(&config_of(kind, base_url, Duration::from_secs(10))).unwrap()
}

/// The answer with text `Let me check.` and calls `weather(Rome)` and `now()`, as every
/// stub below sends it, whole or streamed.
fn checked(ids: [&str; 2], usage: TokenUsage) -> ChatResponse {
    ChatResponse {
        content: "Let me check.".into(),
        tool_calls: vec![
            ToolCall {
                id: ids[0].into(),
                name: "weather".into(),
                arguments: r#"{"city":"Rome"}"#.into(),
            },
            ToolCall {
                id: ids[1].into(),
                name: "now".into(),
                arguments: "{}".into(),
            },
        ],
        finish_reason: "tool_calls".into(),
        usage,
    }
}

/// Streams `request` from a stub sending `body` in 7-byte pieces; answers the stub, the
/// events, and the whole response they build (or the error that ended the stream).
async fn stream_from(
    kind: ProviderKind,
    body: &'static str,
    request: &ChatRequest,
) -> (Stub, Vec<StreamEvent>, Result<ChatResponse, ProviderError>) {
    let stub = stub_reply(Reply {
        status: 200,
        headers: &[("content-type", "text/event-stream")],
        body,
        delay: Duration::ZERO,
        chunk: Some(7),
    })
    .await;
    let stream = match provider_at(kind, &stub.base_url).stream(request).await {
        Ok(stream) => stream,
        Err(error) => return (stub, Vec::new(), Err(error)),
    };
    let (events, result) = drain(stream).await;
    (stub, events, result)
}

async fn drain(mut stream: ChatStream) -> (Vec<StreamEvent>, Result<ChatResponse, ProviderError>) {
    let mut events = Vec::new();
    let mut accumulator = StreamAccumulator::default();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                accumulator.push(&event);
                events.push(event);
            }
            Err(error) => {
                assert!(stream.next().await.is_none(), "an error ends the stream");
                return (events, Err(error));
            }
        }
    }
    let response = accumulator
        .finish()
        .expect("a stream that ends Ok ends with Done");
    (events, Ok(response))
}

/// A stream's error before or after some events.
async fn stream_error(kind: ProviderKind, status: u16, body: &'static str) -> ProviderError {
    let stub = stub_reply(Reply {
        status,
        headers: &[("content-type", "text/event-stream")],
        body,
        delay: Duration::ZERO,
        chunk: Some(5),
    })
    .await;
    let result = match provider_at(kind, &stub.base_url).stream(&request()).await {
        Ok(stream) => drain(stream).await.1,
        Err(error) => Err(error),
    };
    result.unwrap_err()
}

fn text_of(events: &[StreamEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::Text(text) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

// ---- OpenAI-compatible ----

const OPENAI_TOOL_ANSWER: &str = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"Let me check.","tool_calls":[{"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Rome\"}"}},{"id":"call_2","type":"function","function":{"name":"now","arguments":"{}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":40,"completion_tokens":17,"total_tokens":57}}"#;

const OPENAI_STREAM: &str = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"content":"Let me "},"finish_reason":null}]}

: keep-alive

data:

data: {"choices":[{"index":0,"delta":{"content":"check."},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"weather","arguments":""}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Rome\"}"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_2","type":"function","function":{"name":"now","arguments":"{}"}}]},"finish_reason":null}]}

data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}

data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":17,"total_tokens":57}}

data: [DONE]

"#;

#[tokio::test]
async fn openai_sends_tools_tool_results_and_json_mode_and_reads_tool_calls() {
    let stub = stub(200, &[], OPENAI_TOOL_ANSWER, Duration::ZERO).await;
    let response = provider_at(ProviderKind::OpenAi, &stub.base_url)
        .complete(&tool_request())
        .await
        .unwrap();
    let usage = TokenUsage {
        prompt: 40,
        completion: 17,
    };
    assert_eq!(response, checked(["call_1", "call_2"], usage));
    let sent = stub.seen.lock().unwrap()[0].1.clone();
    assert_eq!(
        sent,
        json!({
            "model": "model-test",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "weather in Paris and Oslo?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_b", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}
                ]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_a"},
                {"role": "tool", "content": "{\"temp\":3}", "tool_call_id": "call_b"}
            ],
            "max_tokens": 64,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["END"],
            "tools": [{"type": "function", "function": {
                "name": "weather",
                "description": "Weather of a city",
                "parameters": weather_schema()
            }}],
            "tool_choice": "required",
            "response_format": {"type": "json_object"}
        })
    );
}

#[tokio::test]
async fn openai_stream_builds_the_same_answer_with_the_final_usage() {
    let (stub, events, streamed) =
        stream_from(ProviderKind::OpenAi, OPENAI_STREAM, &tool_request()).await;
    let usage = TokenUsage {
        prompt: 40,
        completion: 17,
    };
    assert_eq!(streamed.unwrap(), checked(["call_1", "call_2"], usage));
    assert_eq!(text_of(&events), vec!["Let me ", "check."]);
    let (headers, sent) = &stub.seen.lock().unwrap()[0];
    assert_eq!(headers[STUB_URI], "/v1/chat/completions");
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    assert_eq!(sent["tool_choice"], "required");
}

#[tokio::test]
async fn openai_stream_without_usage_or_done_is_estimated() {
    let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi there \"}}]}\r\n\r\n\
                data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"friend\"},\"finish_reason\":\"stop\"}]}\r\n\r\n";
    let (_stub, _events, streamed) = stream_from(ProviderKind::OpenAi, body, &request()).await;
    let response = streamed.unwrap();
    assert_eq!(response.content, "Hi there friend");
    assert_eq!(response.finish_reason, "stop");
    // "be brief" + "hello", "Hi there friend": one token per word.
    assert_eq!(
        response.usage,
        TokenUsage {
            prompt: 3,
            completion: 3
        }
    );
}

#[tokio::test]
async fn openai_stream_failures_are_classified() {
    let truncated = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    let error = stream_error(ProviderKind::OpenAi, 200, truncated).await;
    assert!(matches!(error, ProviderError::Malformed(_)), "{error}");
    assert_eq!(error.class(), ErrorClass::ExternalDegrading);

    let garbage = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: <html>oops</html>\n\n";
    let error = stream_error(ProviderKind::OpenAi, 200, garbage).await;
    assert!(matches!(error, ProviderError::Malformed(_)), "{error}");

    let limited = "data: {\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\",\"code\":\"rate_limit_exceeded\"}}\n\n";
    let error = stream_error(ProviderKind::OpenAi, 200, limited).await;
    assert_eq!(error, ProviderError::RateLimited { retry_after: None });

    let rejected = r#"{"error":{"message":"bad tool schema, sk-test-0123456789","code":"invalid_request_error"}}"#;
    let error = stream_error(ProviderKind::OpenAi, 400, rejected).await;
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert!(error.to_string().contains("bad tool schema"), "{error}");
    assert!(!error.to_string().contains(KEY), "{error}");

    let error = stream_error(ProviderKind::OpenAi, 503, "overloaded").await;
    assert_eq!(error.class(), ErrorClass::ExternalDegrading);
}

// ---- Anthropic ----

const ANTHROPIC_TOOL_ANSWER: &str = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Let me check."},{"type":"tool_use","id":"toolu_1","name":"weather","input":{"city":"Rome"}},{"type":"tool_use","id":"toolu_2","name":"now","input":{}}],"stop_reason":"tool_use","usage":{"input_tokens":25,"output_tokens":20}}"#;

/// Several `message_delta`s with growing cumulative `output_tokens` (5, 12, 20): the final
/// count is 20, not their sum.
const ANTHROPIC_STREAM: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"model-test","stop_reason":null,"usage":{"input_tokens":25,"output_tokens":1}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type":"ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me "}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"check."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":5}}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"Rome\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":12}}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_2","name":"now","input":{}}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":20}}

event: message_stop
data: {"type":"message_stop"}

"#;

#[tokio::test]
async fn anthropic_sends_tool_use_and_tool_result_blocks_and_reads_tool_calls() {
    let (result, stub) = anthropic_call(200, ANTHROPIC_TOOL_ANSWER, &tool_request()).await;
    let usage = TokenUsage {
        prompt: 25,
        completion: 20,
    };
    assert_eq!(result.unwrap(), checked(["toolu_1", "toolu_2"], usage));
    let sent = stub.seen.lock().unwrap()[0].1.clone();
    assert_eq!(
        sent,
        json!({
            "model": "model-test",
            "max_tokens": 64,
            "system": format!("be brief\n\n{}", provider::anthropic::JSON_INSTRUCTION),
            "messages": [
                {"role": "user", "content": "weather in Paris and Oslo?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_a", "name": "weather",
                     "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_b", "name": "weather",
                     "input": {"city": "Oslo"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_a", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "call_b", "content": "{\"temp\":3}"}
                ]}
            ],
            "temperature": 0.5,
            "top_p": 0.9,
            "stop_sequences": ["END"],
            "tools": [{
                "name": "weather",
                "description": "Weather of a city",
                "input_schema": weather_schema()
            }],
            "tool_choice": {"type": "any"}
        })
    );
}

#[tokio::test]
async fn anthropic_stream_builds_the_same_answer_with_the_last_cumulative_usage() {
    // CRLF line ends, cut into 7-byte pieces.
    let body: &'static str = ANTHROPIC_STREAM.replace('\n', "\r\n").leak();
    let (stub, events, streamed) =
        stream_from(ProviderKind::Anthropic, body, &tool_request()).await;
    let usage = TokenUsage {
        prompt: 25,
        completion: 20,
    };
    assert_eq!(streamed.unwrap(), checked(["toolu_1", "toolu_2"], usage));
    assert_eq!(text_of(&events), vec!["Let me ", "check."]);
    assert!(
        events.contains(&StreamEvent::ToolCall {
            index: 1,
            id: Some("toolu_2".into()),
            name: Some("now".into()),
            arguments: String::new(),
        }),
        "content block 2 is tool call 1: {events:?}"
    );
    let (headers, sent) = &stub.seen.lock().unwrap()[0];
    assert_eq!(headers["x-api-key"], KEY);
    assert_eq!(sent["stream"], true);
}

#[tokio::test]
async fn anthropic_stream_failures_are_classified() {
    let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
                 event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
    let error = stream_error(ProviderKind::Anthropic, 200, start).await;
    assert!(matches!(error, ProviderError::Malformed(_)), "{error}");

    let overloaded: &'static str = format!(
        "{start}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n"
    )
    .leak();
    let error = stream_error(ProviderKind::Anthropic, 200, overloaded).await;
    assert!(
        matches!(error, ProviderError::Unavailable { .. }),
        "{error}"
    );
    assert_eq!(error.class(), ErrorClass::ExternalDegrading);

    let limited = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow down\"}}\n\n";
    let error = stream_error(ProviderKind::Anthropic, 200, limited).await;
    assert_eq!(error, ProviderError::RateLimited { retry_after: None });

    let garbage = "event: message_start\ndata: not json\n\n";
    let error = stream_error(ProviderKind::Anthropic, 200, garbage).await;
    assert!(matches!(error, ProviderError::Malformed(_)), "{error}");

    let error = stream_error(
        ProviderKind::Anthropic,
        429,
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    )
    .await;
    assert_eq!(error.class(), ErrorClass::ExternalRateLimit);
}

// ---- Gemini ----

const GEMINI_TOOL_ANSWER: &str = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Let me check."},{"functionCall":{"name":"weather","args":{"city":"Rome"}}},{"functionCall":{"name":"now","args":{}}}]},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":30,"candidatesTokenCount":14,"totalTokenCount":44}}"#;

/// Cumulative `usageMetadata` in every chunk; the last one counts.
const GEMINI_STREAM: &str = r#"data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Let me "}]},"index":0}],"usageMetadata":{"promptTokenCount":30,"candidatesTokenCount":2}}

data: {"candidates":[{"content":{"role":"model","parts":[{"text":"check."}]},"index":0}],"usageMetadata":{"promptTokenCount":30,"candidatesTokenCount":4}}

data: {"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"weather","args":{"city":"Rome"}}},{"functionCall":{"name":"now","args":{}}}]},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":30,"candidatesTokenCount":14}}

"#;

#[tokio::test]
async fn gemini_sends_contents_function_calls_and_responses_and_reads_calls() {
    let stub = stub(200, &[], GEMINI_TOOL_ANSWER, Duration::ZERO).await;
    let response = provider_at(ProviderKind::Gemini, &stub.base_url)
        .complete(&tool_request())
        .await
        .unwrap();
    let usage = TokenUsage {
        prompt: 30,
        completion: 14,
    };
    assert_eq!(response, checked(["call_0", "call_1"], usage));
    let (headers, sent) = &stub.seen.lock().unwrap()[0];
    assert_eq!(headers[STUB_URI], "/v1/models/model-test:generateContent");
    assert_eq!(headers["x-goog-api-key"], KEY);
    assert!(headers.get("authorization").is_none());
    assert_eq!(
        sent,
        &json!({
            "contents": [
                {"role": "user", "parts": [{"text": "weather in Paris and Oslo?"}]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "weather", "response": {"result": "sunny"}}},
                    {"functionResponse": {"name": "weather", "response": {"temp": 3}}}
                ]}
            ],
            "systemInstruction": {"parts": [{"text": "be brief"}]},
            "generationConfig": {
                "maxOutputTokens": 64,
                "temperature": 0.5,
                "topP": 0.9,
                "seed": 7,
                "stopSequences": ["END"],
                "responseMimeType": "application/json"
            },
            "tools": [{"functionDeclarations": [{
                "name": "weather",
                "description": "Weather of a city",
                "parameters": weather_schema()
            }]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}
        })
    );
}

#[tokio::test]
async fn gemini_plain_answers_and_named_tool_choice() {
    let body = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"deep thought","thought":true},{"text":"hi there"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":21,"candidatesTokenCount":4}}"#;
    let plain = stub(200, &[], body, Duration::ZERO).await;
    let request = ChatRequest {
        tools: tool_request().tools,
        tool_choice: Some(ToolChoice::Tool("weather".into())),
        ..request()
    };
    let result = provider_at(ProviderKind::Gemini, &plain.base_url)
        .complete(&request)
        .await;
    assert_answer(result, "hi there", 21, 4);
    let sent = plain.seen.lock().unwrap()[0].1.clone();
    assert_eq!(
        sent["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}})
    );
    assert!(
        sent.get("generationConfig")
            .unwrap()
            .get("responseMimeType")
            .is_none()
    );

    let blocked = r#"{"candidates":[{"finishReason":"SAFETY","index":0}]}"#;
    let blocked_stub = stub(200, &[], blocked, Duration::ZERO).await;
    let response = provider_at(ProviderKind::Gemini, &blocked_stub.base_url)
        .complete(&request)
        .await
        .unwrap();
    assert_eq!(response.finish_reason, "content_filter");
    assert_eq!(response.content, "");
    let cut =
        r#"{"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"MAX_TOKENS"}]}"#;
    let cut_stub = stub(200, &[], cut, Duration::ZERO).await;
    let response = provider_at(ProviderKind::Gemini, &cut_stub.base_url)
        .complete(&request)
        .await
        .unwrap();
    assert_eq!(response.finish_reason, "length");
}

#[tokio::test]
async fn gemini_stream_builds_the_same_answer_with_the_last_usage() {
    let (stub, events, streamed) =
        stream_from(ProviderKind::Gemini, GEMINI_STREAM, &tool_request()).await;
    let usage = TokenUsage {
        prompt: 30,
        completion: 14,
    };
    assert_eq!(streamed.unwrap(), checked(["call_0", "call_1"], usage));
    assert_eq!(text_of(&events), vec!["Let me ", "check."]);
    let (headers, _) = &stub.seen.lock().unwrap()[0];
    assert_eq!(
        headers[STUB_URI],
        "/v1/models/model-test:streamGenerateContent?alt=sse"
    );
    assert_eq!(headers["x-goog-api-key"], KEY);
}

#[tokio::test]
async fn gemini_failures_are_classified() {
    let gemini = |status, body| async move {
        let stub = stub(status, &[], body, Duration::ZERO).await;
        provider_at(ProviderKind::Gemini, &stub.base_url)
            .complete(&request())
            .await
            .unwrap_err()
    };
    let error = gemini(
        429,
        r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#,
    )
    .await;
    assert_eq!(error.class(), ErrorClass::ExternalRateLimit);
    let error = gemini(
        503,
        r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#,
    )
    .await;
    assert!(
        matches!(error, ProviderError::Unavailable { .. }),
        "{error}"
    );
    let error = gemini(
        400,
        r#"{"error":{"code":400,"message":"Invalid JSON payload received.","status":"INVALID_ARGUMENT"}}"#,
    )
    .await;
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert!(
        error
            .to_string()
            .contains("Invalid JSON payload received. (INVALID_ARGUMENT)"),
        "{error}"
    );
    for garbage in ["<html>oops</html>", r#"{"candidates":[]}"#] {
        let error = gemini(200, garbage).await;
        assert!(matches!(error, ProviderError::Malformed(_)), "{error}");
    }

    let truncated = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}]}\n\n";
    let error = stream_error(ProviderKind::Gemini, 200, truncated).await;
    assert!(matches!(error, ProviderError::Malformed(_)), "{error}");
    let garbage = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}]}\n\ndata: {\"candidates\n\n";
    let error = stream_error(ProviderKind::Gemini, 200, garbage).await;
    assert!(matches!(error, ProviderError::Malformed(_)), "{error}");
    let overloaded = "data: {\"error\":{\"code\":503,\"message\":\"The model is overloaded.\",\"status\":\"UNAVAILABLE\"}}\n\n";
    let error = stream_error(ProviderKind::Gemini, 200, overloaded).await;
    assert_eq!(error.class(), ErrorClass::ExternalDegrading);
    let error = stream_error(
        ProviderKind::Gemini,
        429,
        r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}"#,
    )
    .await;
    assert_eq!(error.class(), ErrorClass::ExternalRateLimit);
}
