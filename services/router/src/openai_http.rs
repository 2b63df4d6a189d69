//! The OpenAI-compatible HTTP edge: `POST /v1/chat/completions` (non-streaming) in OpenAI's
//! wire format, so that any OpenAI client can use the router. A request is turned into the
//! same `CompleteRequest` the gRPC edge takes and validated by the same code; errors come back
//! in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).
//!
//! `model` names a deployment, or a tier (`budget`, `mid`, `frontier`) to route by tier. The
//! tenant comes from `x-colony-tenant` (default `default`); `x-colony-run-id` and
//! `x-colony-task-id` attribute the call in the ledger. The response names the deployment
//! that served it and why in `x-colony-deployment` and `x-colony-route-reason`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use colony_proto::v1;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Tier;
use crate::error::{Error, ErrorClass, ProviderError};
use crate::metrics;
use crate::service::{Completion, Service};

const TENANT_HEADER: &str = "x-colony-tenant";
const RUN_HEADER: &str = "x-colony-run-id";
const TASK_HEADER: &str = "x-colony-task-id";
const DEFAULT_TENANT: &str = "default";
/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// The routes of this edge, for the router's HTTP listener.
pub fn routes(service: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(service)
}

/// An OpenAI chat completion request: the fields the router acts on. Other fields OpenAI
/// clients send (`top_p`, `user`, …) are accepted and ignored.
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
    stream: bool,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    tools: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RequestMessage {
    role: String,
    /// A string, or an array of content parts of which only `text` parts are supported.
    #[serde(default)]
    content: Value,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
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
            Error::Ledger(_) => "cannot record usage".to_owned(),
            _ => error.to_string(),
        };
        let (status, kind, code) = match &error {
            Error::InvalidRequest(_) => {
                metrics::rejected();
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
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
                source: ProviderError::RateLimited { .. },
                ..
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Error::Provider { .. } | Error::Ledger(_) => match error.class() {
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
            },
        };
        let retry_after_secs = match &error {
            Error::Provider {
                source:
                    ProviderError::RateLimited {
                        retry_after: Some(after),
                    },
                ..
            } => Some(after.as_secs_f64().ceil() as u64),
            _ => None,
        };
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
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match answer(&service, &headers, body).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(status = %error.status, message = %error.message, "chat completion failed");
            error.into_response()
        }
    }
}

async fn answer(
    service: &Service,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
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
    let call = crate::grpc::parse(complete_request(headers, request)?)?;
    let completion = service.complete(call).await?;
    let mut response = axum::Json(completion_body(&completion)).into_response();
    for (name, value) in [
        ("x-colony-deployment", completion.deployment.as_str()),
        ("x-colony-route-reason", completion.route_reason.as_str()),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

/// The gRPC request this HTTP request stands for; what only HTTP can get wrong is checked
/// here, the rest by the gRPC edge's validation.
fn complete_request(
    headers: &HeaderMap,
    request: ChatCompletionRequest,
) -> Result<v1::CompleteRequest, ApiError> {
    if request.stream {
        return Err(ApiError::invalid(
            "stream: streaming is not supported by this router yet; send \"stream\": false",
            Some("stream"),
        ));
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n: only one choice (n = 1) is supported",
            Some("n"),
        ));
    }
    if request.tools.is_some() {
        return Err(ApiError::invalid(
            "tools: function calling is not supported by this router yet",
            Some("tools"),
        ));
    }
    if request.model.trim().is_empty() {
        return Err(ApiError::invalid(
            "model: name a deployment, or a tier (budget, mid, frontier)",
            Some("model"),
        ));
    }
    let header = |name: &str| -> Result<String, ApiError> {
        headers.get(name).map_or(Ok(String::new()), |value| {
            value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::invalid(format!("header {name} is not visible ASCII"), None))
        })
    };
    let tenant = Some(header(TENANT_HEADER)?)
        .filter(|tenant| !tenant.is_empty())
        .unwrap_or_else(|| DEFAULT_TENANT.to_owned());
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
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let (deployment, tier) = match Tier::from_name(&request.model) {
        Some(tier) => (String::new(), tier.as_str().to_owned()),
        None => (request.model, String::new()),
    };
    Ok(v1::CompleteRequest {
        tenant,
        run_id: header(RUN_HEADER)?,
        task_id: header(TASK_HEADER)?,
        attempt: 0,
        deployment,
        tier,
        messages,
        max_tokens: request
            .max_completion_tokens
            .or(request.max_tokens)
            .unwrap_or(0),
        temperature: request.temperature,
        ..Default::default()
    })
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
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let usage = completion.response.usage;
    json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
        "object": "chat.completion",
        "created": created,
        "model": completion.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.response.content},
            "finish_reason": completion.response.finish_reason,
        }],
        "usage": {
            "prompt_tokens": usage.prompt,
            "completion_tokens": usage.completion,
            "total_tokens": usage.prompt + usage.completion,
        },
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
