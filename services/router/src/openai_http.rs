//! The OpenAI-compatible HTTP edge: `POST /v1/chat/completions` (streamed as server-sent
//! events or not, with function calling), `GET /v1/models` and `POST /v1/embeddings`, in
//! OpenAI's wire format, so that OpenAI's client libraries work against the router with only
//! the base URL and key changed. A request is turned into the same `CompleteRequest` the gRPC
//! edge takes and validated by the same code; errors come back in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`).
//!
//! `model` names a deployment, or a tier (`budget`, `mid`, `frontier`) to route by tier. With
//! tenants configured, `Authorization: Bearer <tenant key>` says who calls; without, the API is
//! open and the tenant comes from `x-colony-tenant` (default `default`). `x-colony-run-id` and
//! `x-colony-task-id` attribute the call in the ledger, `x-colony-local-only: true` keeps the
//! data on local deployments, `x-colony-task-budget-micros` / `x-colony-run-budget-micros`
//! name hard budgets. The response names the deployment that served it and why in
//! `x-colony-deployment` and `x-colony-route-reason`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use colony_inference::InferenceError;
use colony_inference::embed::Embedder;
use colony_proto::v1;
use futures::StreamExt as _;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::{TenantConfig, Tier};
use crate::error::{Error, ErrorClass, ProviderError};
use crate::metrics;
use crate::provider::{StreamEvent, TokenUsage};
use crate::resilience::limits::Refused;
use crate::service::{Completion, Service, StreamStart, Streamed};

const TENANT_HEADER: &str = "x-colony-tenant";
const RUN_HEADER: &str = "x-colony-run-id";
const TASK_HEADER: &str = "x-colony-task-id";
const LOCAL_ONLY_HEADER: &str = "x-colony-local-only";
const TASK_BUDGET_HEADER: &str = "x-colony-task-budget-micros";
const RUN_BUDGET_HEADER: &str = "x-colony-run-budget-micros";
const DEFAULT_TENANT: &str = "default";
/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Who may call: tenants and their keys, or nobody configured (open).
#[derive(Debug, Default)]
pub struct Tenants {
    keys: Vec<(String, SecretString)>,
}

impl Tenants {
    pub fn from_config(tenants: &[TenantConfig]) -> Self {
        Self {
            keys: tenants
                .iter()
                .filter_map(|t| Some((t.name.clone(), t.api_key.clone()?)))
                .collect(),
        }
    }

    /// The tenant a request is for: the owner of its bearer key, or with no tenants configured
    /// the `x-colony-tenant` header.
    fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        if self.keys.is_empty() {
            let tenant = header(headers, TENANT_HEADER)?;
            return Ok(Some(tenant)
                .filter(|tenant| !tenant.is_empty())
                .unwrap_or_else(|| DEFAULT_TENANT.to_owned()));
        }
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default();
        // Every key is compared, in time independent of where they differ.
        let mut tenant = None;
        for (name, key) in &self.keys {
            if constant_time_eq(presented.as_bytes(), key.expose_secret().as_bytes()) {
                tenant = Some(name.clone());
            }
        }
        tenant.ok_or_else(|| {
            metrics::rejected();
            ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "invalid_request_error",
                code: Some("invalid_api_key"),
                param: None,
                message: if presented.is_empty() {
                    "no API key: send Authorization: Bearer <your tenant key>".into()
                } else {
                    "the API key is not one of this router's tenant keys".into()
                },
                retry_after_secs: None,
            }
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The router's embedding models by name, each on its own model thread.
pub type Embedders = HashMap<String, Embedder>;

struct Edge {
    service: Arc<Service>,
    tenants: Tenants,
    embedders: Embedders,
}

/// The routes of this edge, for the router's HTTP listener.
pub fn routes(service: Arc<Service>, tenants: Tenants, embedders: Embedders) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(Edge {
            service,
            tenants,
            embedders,
        }))
}

/// An OpenAI chat completion request: the fields the router acts on. Other fields OpenAI
/// clients send (`user`, `presence_penalty`, …) are accepted and ignored.
#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: String,
    messages: Vec<RequestMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    /// A string or an array of strings.
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    tools: Vec<RequestTool>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct RequestMessage {
    role: String,
    /// A string, or an array of content parts of which only `text` parts are supported.
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RequestTool {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionSpec,
}

#[derive(Debug, Deserialize)]
struct FunctionSpec {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    id: String,
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

/// An error in OpenAI's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        metrics::rejected();
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
            retry_after_secs: None,
        }
    }
}

impl ApiError {
    fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let message = match &error {
            Error::Ledger(_) | Error::Budget(crate::budget::Error::Database(_)) => {
                "cannot record usage".to_owned()
            }
            _ => error.to_string(),
        };
        let (status, kind, code) = match &error {
            Error::InvalidRequest(_) => {
                metrics::rejected();
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Error::Unroutable(_) => {
                metrics::rejected();
                (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("no_capable_deployment"),
                )
            }
            Error::Provider {
                source: ProviderError::ContextTooLong(_),
                ..
            } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            Error::Provider {
                source: ProviderError::Queue(Refused::TooLarge { .. }),
                ..
            } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("rate_limit_too_small"),
            ),
            Error::Provider {
                source:
                    ProviderError::RateLimited { .. }
                    | ProviderError::Queue(_)
                    | ProviderError::Local(colony_inference::InferenceError::QueueFull { .. }),
                ..
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Error::Budget(crate::budget::Error::Exceeded { .. }) => (
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_quota",
                Some("budget_exceeded"),
            ),
            Error::Provider { .. } | Error::Ledger(_) | Error::LedgerClosed | Error::Budget(_) => {
                match error.class() {
                    ErrorClass::Transient | ErrorClass::ExternalDegrading => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream_error",
                        Some("upstream_unavailable"),
                    ),
                    _ => (
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        Some("upstream_failed"),
                    ),
                }
            }
        };
        let retry_after_secs = error
            .retry_after()
            .map(|after| after.as_secs_f64().ceil() as u64);
        Self {
            status,
            kind,
            code,
            param: None,
            message,
            retry_after_secs,
        }
    }
}

async fn chat_completions(
    State(edge): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match answer(&edge, &headers, body).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(status = %error.status, message = %error.message, "chat completion failed");
            error.into_response()
        }
    }
}

async fn answer(
    edge: &Edge,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = edge.tenants.authenticate(headers)?;
    let body = body.map_err(|rejection| ApiError {
        status: rejection.status(),
        ..ApiError::invalid(
            format!(
                "the request body could not be read: {}",
                rejection.body_text()
            ),
            None,
        )
    })?;
    let request: ChatCompletionRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::invalid(
            format!("the body is not a valid chat completion request: {error}"),
            None,
        )
    })?;
    let stream = request.stream;
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|options| options.include_usage);
    let call = crate::grpc::parse(complete_request(tenant, headers, request)?)?;
    if stream {
        let start = edge.service.stream(call).await?;
        return Ok(stream_response(start, include_usage));
    }
    let completion = edge.service.complete(call).await?;
    let mut response = axum::Json(completion_body(&completion)).into_response();
    route_headers(
        &mut response,
        &completion.deployment,
        &completion.route_reason,
    );
    Ok(response)
}

fn route_headers(response: &mut Response, deployment: &str, reason: &str) {
    for (name, value) in [
        ("x-colony-deployment", deployment),
        ("x-colony-route-reason", reason),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Result<String, ApiError> {
    headers.get(name).map_or(Ok(String::new()), |value| {
        value
            .to_str()
            .map(str::to_owned)
            .map_err(|_| ApiError::invalid(format!("header {name} is not visible ASCII"), None))
    })
}

fn micros_header(headers: &HeaderMap, name: &str) -> Result<u64, ApiError> {
    let text = header(headers, name)?;
    if text.is_empty() {
        return Ok(0);
    }
    text.trim().parse().map_err(|_| {
        ApiError::invalid(
            format!("header {name}: {text:?} is not a whole number of micro-USD"),
            None,
        )
    })
}

/// The gRPC request this HTTP request stands for; what only HTTP can get wrong is checked
/// here, the rest by the gRPC edge's validation.
fn complete_request(
    tenant: String,
    headers: &HeaderMap,
    request: ChatCompletionRequest,
) -> Result<v1::CompleteRequest, ApiError> {
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n: only one choice (n = 1) is supported",
            Some("n"),
        ));
    }
    if request.model.trim().is_empty() {
        return Err(ApiError::invalid(
            "model: name a deployment, or a tier (budget, mid, frontier)",
            Some("model"),
        ));
    }
    let json_mode = match request.response_format.as_ref().map(|f| f.kind.as_str()) {
        None | Some("text") => false,
        Some("json_object") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("response_format: {other:?} is not supported; use text or json_object"),
                Some("response_format"),
            ));
        }
    };
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            Ok(v1::ChatMessage {
                role: message.role,
                content: text_of(&message.content).ok_or_else(|| {
                    ApiError::invalid(
                        format!(
                            "messages[{index}].content: expected a string or an array of \
                             text parts"
                        ),
                        Some("messages"),
                    )
                })?,
                tool_calls: message
                    .tool_calls
                    .into_iter()
                    .map(|call| v1::ToolCall {
                        id: call.id,
                        name: call.function.name,
                        arguments_json: call.function.arguments,
                    })
                    .collect(),
                tool_call_id: message.tool_call_id.unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let tools = request
        .tools
        .into_iter()
        .enumerate()
        .map(|(index, tool)| {
            if tool.kind != "function" {
                return Err(ApiError::invalid(
                    format!(
                        "tools[{index}].type: {:?} is not supported; use function",
                        tool.kind
                    ),
                    Some("tools"),
                ));
            }
            Ok(v1::Tool {
                name: tool.function.name,
                description: tool.function.description,
                parameters_json: tool
                    .function
                    .parameters
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let tool_choice = match &request.tool_choice {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(choice)) if ["auto", "none", "required"].contains(&choice.as_str()) => {
            choice.clone()
        }
        Some(choice) => match choice.pointer("/function/name") {
            Some(Value::String(name)) if choice.get("type") == Some(&json!("function")) => {
                name.clone()
            }
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice: expected \"auto\", \"none\", \"required\" or \
                     {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    Some("tool_choice"),
                ));
            }
        },
    };
    let local_only = match header(headers, LOCAL_ONLY_HEADER)?.as_str() {
        "" | "false" | "0" => false,
        "true" | "1" => true,
        other => {
            return Err(ApiError::invalid(
                format!("header {LOCAL_ONLY_HEADER}: {other:?} is not true or false"),
                None,
            ));
        }
    };
    let stop = match request.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(stop)) => vec![stop],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(stop) => Ok(stop),
                _ => Err(ApiError::invalid(
                    "stop: expected a string or an array of strings",
                    Some("stop"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop: expected a string or an array of strings",
                Some("stop"),
            ));
        }
    };
    let (deployment, tier) = match Tier::from_name(&request.model) {
        Some(tier) => (String::new(), tier.as_str().to_owned()),
        None => (request.model, String::new()),
    };
    Ok(v1::CompleteRequest {
        tenant,
        run_id: header(headers, RUN_HEADER)?,
        task_id: header(headers, TASK_HEADER)?,
        attempt: 0,
        deployment,
        tier,
        messages,
        max_tokens: request
            .max_completion_tokens
            .or(request.max_tokens)
            .unwrap_or(0),
        temperature: request.temperature,
        top_p: request.top_p,
        seed: request.seed,
        stop,
        tools,
        tool_choice,
        json_mode,
        local_only,
        task_budget_micros_usd: micros_header(headers, TASK_BUDGET_HEADER)?,
        run_budget_micros_usd: micros_header(headers, RUN_BUDGET_HEADER)?,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::now_v7().simple())
}

fn usage_body(usage: TokenUsage) -> Value {
    json!({
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion,
    })
}

/// A `text/event-stream` of `chat.completion.chunk` objects, ended by `data: [DONE]`, as
/// OpenAI streams: the first chunk carries the role, the last one the finish reason, then
/// (when the client asked with `stream_options.include_usage`) one chunk with the usage and
/// no choices. A failure after the first chunk is sent as an `{"error": …}` event.
fn stream_response(start: StreamStart, include_usage: bool) -> Response {
    let id = completion_id();
    let created = unix_now();
    let model = start.model.clone();
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut body = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            body["usage"] = usage;
        }
        sse_data(&body.to_string())
    };
    let mut first = true;
    let events = ReceiverStream::new(start.items).flat_map(move |item| {
        let mut out: Vec<Bytes> = Vec::new();
        let role = if std::mem::take(&mut first) {
            json!({"role": "assistant"})
        } else {
            json!({})
        };
        let delta = |mut delta: Value, extra: Value| {
            if let (Some(delta), Some(extra)) = (delta.as_object_mut(), extra.as_object()) {
                delta.extend(extra.clone());
            }
            json!([{"index": 0, "delta": delta, "finish_reason": null}])
        };
        match item {
            Streamed::Event(StreamEvent::Text(text)) => {
                out.push(chunk(delta(role, json!({"content": text})), None));
            }
            Streamed::Event(StreamEvent::ToolCall {
                index,
                id,
                name,
                arguments,
            }) => {
                let mut call = json!({"index": index, "function": {"arguments": arguments}});
                if let Some(id) = id {
                    call["id"] = json!(id);
                    call["type"] = json!("function");
                }
                if let Some(name) = name {
                    call["function"]["name"] = json!(name);
                }
                out.push(chunk(delta(role, json!({"tool_calls": [call]})), None));
            }
            Streamed::Event(StreamEvent::Done { .. }) => {}
            Streamed::End(Ok(completion)) => {
                let finish = json!([{
                    "index": 0,
                    "delta": role,
                    "finish_reason": completion.response.finish_reason,
                }]);
                out.push(chunk(finish, None));
                if include_usage {
                    out.push(chunk(
                        json!([]),
                        Some(usage_body(completion.response.usage)),
                    ));
                }
                out.push(sse_data("[DONE]"));
            }
            Streamed::End(Err(error)) => {
                let error = ApiError::from(error);
                out.push(sse_data(&error.body().to_string()));
            }
        }
        futures::stream::iter(out.into_iter().map(Ok::<_, std::convert::Infallible>))
    });
    let mut response = Response::new(axum::body::Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    route_headers(&mut response, &start.deployment, &start.route_reason);
    response
}

fn sse_data(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// `GET /v1/models`: every deployment as an OpenAI model object, with what routing knows of it
/// under `colony`.
async fn models(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    if let Err(error) = edge.tenants.authenticate(&headers) {
        return error.into_response();
    }
    let data: Vec<Value> = edge
        .service
        .deployments()
        .iter()
        .map(|d| {
            let mut capabilities: Vec<Value> = d
                .capabilities
                .iter()
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect();
            capabilities.sort_by_key(|c| c.to_string());
            json!({
                "id": d.name,
                "object": "model",
                "created": 0,
                "owned_by": d.provider_kind.as_str(),
                "colony": {
                    "model": d.model,
                    "tier": d.tier.as_str(),
                    "context_window": d.context_window,
                    "capabilities": capabilities,
                    "privacy": d.privacy.as_str(),
                },
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Inputs one embeddings request may carry (OpenAI's limit).
const MAX_EMBEDDING_INPUTS: usize = 2048;

/// An OpenAI embeddings request. Token-id inputs and other dimensions than the model's are
/// refused with a clear error.
#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    /// A string or an array of strings.
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

/// `POST /v1/embeddings`: vectors from an embedding model of the router (the embedded
/// all-MiniLM-L6-v2 by default), as floats or, when asked, base64 little-endian `f32`s.
async fn embeddings(
    State(edge): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Result<axum::Json<EmbeddingsRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match embed(&edge, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn embed(
    edge: &Edge,
    headers: &HeaderMap,
    body: Result<axum::Json<EmbeddingsRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    edge.tenants.authenticate(headers)?;
    let axum::Json(request) =
        body.map_err(|rejection| ApiError::invalid(rejection.body_text(), None))?;
    let Some(embedder) = edge.embedders.get(&request.model) else {
        let mut known: Vec<&str> = edge.embedders.keys().map(String::as_str).collect();
        known.sort_unstable();
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message: if known.is_empty() {
                "no embedding model is configured on this router".into()
            } else {
                format!(
                    "{:?} is not an embedding model of this router (it has: {})",
                    request.model,
                    known.join(", ")
                )
            },
            retry_after_secs: None,
        });
    };
    let not_text = || {
        ApiError::invalid(
            "input: expected a string or an array of strings (token ids are not supported)",
            Some("input"),
        )
    };
    let inputs: Vec<String> = match request.input {
        Value::String(text) => vec![text],
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Ok(text),
                _ => Err(not_text()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(not_text()),
    };
    if inputs.is_empty() || inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid(
            format!("input: between 1 and {MAX_EMBEDDING_INPUTS} texts"),
            Some("input"),
        ));
    }
    if inputs.iter().any(|text| text.is_empty()) {
        return Err(ApiError::invalid(
            "input: texts must not be empty",
            Some("input"),
        ));
    }
    if let Some(dimensions) = request.dimensions
        && dimensions != embedder.dimensions()
    {
        return Err(ApiError::invalid(
            format!(
                "dimensions: {} gives {}-dimensional vectors only",
                request.model,
                embedder.dimensions()
            ),
            Some("dimensions"),
        ));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format: {other:?} is not float or base64"),
                Some("encoding_format"),
            ));
        }
    };
    let embedded = embedder
        .embed_counted(inputs)
        .await
        .map_err(|error| embedding_error(&request.model, &error))?;
    let data: Vec<Value> = embedded
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    bytes,
                ))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {
            "prompt_tokens": embedded.total_tokens(),
            "total_tokens": embedded.total_tokens(),
        },
    }))
    .into_response())
}

fn embedding_error(model: &str, error: &InferenceError) -> ApiError {
    let (status, kind, code, retry_after_secs) = match error {
        InferenceError::QueueFull { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            Some(1),
        ),
        InferenceError::InvalidRequest(_) | InferenceError::ContextOverflow { .. } => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", None, None)
        }
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            Some("upstream_unavailable"),
            None,
        ),
    };
    ApiError {
        status,
        kind,
        code,
        param: None,
        message: format!("embedding model {model}: {error}"),
        retry_after_secs,
    }
}

/// A message's text: a string, or the concatenated `text` parts of an array (`null` is
/// empty, as for an assistant message that only called tools).
fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::Null => Some(String::new()),
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match (part.get("type"), part.get("text")) {
                (Some(Value::String(kind)), Some(Value::String(text))) if kind == "text" => {
                    Some(text.as_str())
                }
                _ => None,
            })
            .collect::<Option<Vec<&str>>>()
            .map(|texts| texts.concat()),
        _ => None,
    }
}

/// The OpenAI `chat.completion` object for `completion`.
fn completion_body(completion: &Completion) -> Value {
    let response = &completion.response;
    let mut message = json!({"role": "assistant", "content": response.content});
    if !response.tool_calls.is_empty() {
        message["tool_calls"] =
            crate::provider::openai::tool_calls_json(&response.tool_calls).into();
        if response.content.is_empty() {
            message["content"] = Value::Null;
        }
    }
    json!({
        "id": completion_id(),
        "object": "chat.completion",
        "created": unix_now(),
        "model": completion.model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": response.finish_reason,
        }],
        "usage": usage_body(response.usage),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_parts_are_joined_and_other_shapes_refused() {
        assert_eq!(text_of(&json!("hi")).as_deref(), Some("hi"));
        assert_eq!(text_of(&Value::Null).as_deref(), Some(""));
        assert_eq!(
            text_of(&json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]))
                .as_deref(),
            Some("ab")
        );
        assert_eq!(
            text_of(&json!([{"type": "image_url", "image_url": {}}])),
            None
        );
        assert_eq!(text_of(&json!(7)), None);
    }
}
