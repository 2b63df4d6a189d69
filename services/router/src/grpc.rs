//! The `colony.v1.Router` gRPC edge: proto ↔ domain conversion, request validation, and the
//! server span that continues the caller's trace.

use colony_proto::v1::{self, router_server};
use tonic::codegen::http;
use tonic::{Request, Response, Status};

use crate::config::Tier;
use crate::error::Error;
use crate::ledger::Caller;
use crate::metrics;
use crate::provider::StreamEvent;
use crate::provider::{ChatMessage, ChatRequest, Role, ToolCall, ToolChoice, ToolSpec};
use crate::service::{Call, Completion, Service, Streamed};
use futures::StreamExt as _;

/// The span of one gRPC request, child of the caller's `traceparent` when it sent one.
pub fn request_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", path = %request.uri().path());
    let traceparent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    colony_telemetry::set_parent(&span, traceparent);
    span
}

/// The gRPC face of [`Service`].
pub struct Router {
    service: std::sync::Arc<Service>,
}

impl Router {
    pub fn new(service: std::sync::Arc<Service>) -> Self {
        Self { service }
    }
}

/// The chunks of a streamed completion.
pub type ChunkStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<v1::CompleteChunk, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl router_server::Router for Router {
    type CompleteStreamStream = ChunkStream;

    /// Chunks as the model writes them, then one `done` chunk with the whole response; a
    /// failure after the first chunk ends the stream with the classified status.
    #[tracing::instrument(skip_all, fields(tenant, run_id, task_id, attempt, deployment))]
    async fn complete_stream(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let result = async {
            let call = parse(request.into_inner())?;
            record_caller(&call);
            self.service.stream(call).await
        };
        let start = match result.await {
            Ok(start) => start,
            Err(error) => return Err(refuse(error)),
        };
        let chunks = tokio_stream::wrappers::ReceiverStream::new(start.items).map(|item| {
            use v1::complete_chunk::Chunk;
            let chunk = match item {
                Streamed::Event(StreamEvent::Text(text)) => Chunk::Delta(text),
                Streamed::Event(StreamEvent::ToolCall {
                    index,
                    id,
                    name,
                    arguments,
                }) => Chunk::ToolCall(v1::ToolCallDelta {
                    index,
                    id: id.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    arguments_json: arguments,
                }),
                // The service never forwards `Done`; its end comes as `End`.
                Streamed::Event(StreamEvent::Done { .. }) => {
                    return Err(Status::internal("unexpected end event"));
                }
                Streamed::End(Ok(completion)) => Chunk::Done(completion.into()),
                Streamed::End(Err(error)) => return Err(error.into()),
            };
            Ok(v1::CompleteChunk { chunk: Some(chunk) })
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    #[tracing::instrument(skip_all, fields(tenant, run_id, task_id, attempt, deployment))]
    async fn complete(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        let result = async {
            let call = parse(request.into_inner())?;
            record_caller(&call);
            self.service.complete(call).await
        };
        match result.await {
            Ok(completion) => Ok(Response::new(completion.into())),
            Err(error) => Err(refuse(error)),
        }
    }
}

fn record_caller(call: &Call) {
    let span = tracing::Span::current();
    span.record("tenant", call.caller.tenant.as_str());
    span.record("run_id", call.caller.run_id.as_str());
    span.record("task_id", call.caller.task_id.as_str());
    span.record("attempt", call.caller.attempt);
}

/// Counts and logs a failed call, and makes its status.
fn refuse(error: Error) -> Status {
    if matches!(error, Error::InvalidRequest(_)) {
        metrics::rejected();
    }
    tracing::warn!(%error, class = %error.class(), "complete failed");
    error.into()
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidRequest(message.into())
}

/// Validates a request and converts it to the domain (the HTTP edge's requests too).
/// Stop sequences a request may give (OpenAI's limit).
pub(crate) const MAX_STOP_SEQUENCES: usize = 4;

pub(crate) fn parse(request: v1::CompleteRequest) -> Result<Call, Error> {
    if request.tenant.trim().is_empty() {
        return Err(invalid("tenant must not be empty"));
    }
    if request.messages.is_empty() {
        return Err(invalid("at least one message is required"));
    }
    let tier = match request.tier.as_str() {
        "" => None,
        name => Some(Tier::from_name(name).ok_or_else(|| {
            invalid(format!(
                "unknown tier {name:?}: expected budget, mid or frontier"
            ))
        })?),
    };
    if let Some(temperature) = request.temperature
        && !(temperature.is_finite() && temperature >= 0.0)
    {
        return Err(invalid(format!(
            "temperature must be a number >= 0, not {temperature}"
        )));
    }
    if let Some(top_p) = request.top_p
        && !(top_p > 0.0 && top_p <= 1.0)
    {
        return Err(invalid(format!(
            "top_p must be more than 0 and at most 1, not {top_p}"
        )));
    }
    if request.stop.len() > MAX_STOP_SEQUENCES || request.stop.iter().any(String::is_empty) {
        return Err(invalid(format!(
            "stop: at most {MAX_STOP_SEQUENCES} sequences, none of them empty"
        )));
    }
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| parse_message(index, message))
        .collect::<Result<_, Error>>()?;
    let tools = request
        .tools
        .into_iter()
        .enumerate()
        .map(|(index, tool)| parse_tool(index, tool))
        .collect::<Result<Vec<_>, Error>>()?;
    let tool_choice = match request.tool_choice.as_str() {
        "" => None,
        "auto" => Some(ToolChoice::Auto),
        "none" => Some(ToolChoice::None),
        "required" => Some(ToolChoice::Required),
        name => {
            if !tools.iter().any(|t| t.name == name) {
                return Err(invalid(format!(
                    "tool_choice: {name:?} is not auto, none, required or the name of a given tool"
                )));
            }
            Some(ToolChoice::Tool(name.to_owned()))
        }
    };
    Ok(Call {
        caller: Caller {
            tenant: request.tenant,
            run_id: request.run_id,
            task_id: request.task_id,
            attempt: request.attempt,
        },
        deployment: request.deployment,
        tier,
        request: ChatRequest {
            messages,
            max_tokens: (request.max_tokens > 0).then_some(request.max_tokens),
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            stop: request.stop,
            tools,
            tool_choice,
            json_mode: request.json_mode,
        },
        local_only: request.local_only,
        task_budget_micros: (request.task_budget_micros_usd > 0)
            .then_some(request.task_budget_micros_usd),
        run_budget_micros: (request.run_budget_micros_usd > 0)
            .then_some(request.run_budget_micros_usd),
    })
}

fn parse_message(index: usize, message: v1::ChatMessage) -> Result<ChatMessage, Error> {
    let role = Role::from_name(&message.role).ok_or_else(|| {
        invalid(format!(
            "messages[{index}].role: {:?} is not system, user, assistant or tool",
            message.role
        ))
    })?;
    if !message.tool_calls.is_empty() && role != Role::Assistant {
        return Err(invalid(format!(
            "messages[{index}].tool_calls: only assistant messages call tools"
        )));
    }
    if role == Role::Tool && message.tool_call_id.is_empty() {
        return Err(invalid(format!(
            "messages[{index}].tool_call_id: a tool message must say which call it answers"
        )));
    }
    let tool_calls = message
        .tool_calls
        .into_iter()
        .enumerate()
        .map(|(call_index, call)| {
            if call.name.is_empty() {
                return Err(invalid(format!(
                    "messages[{index}].tool_calls[{call_index}].name: must not be empty"
                )));
            }
            Ok(ToolCall {
                id: call.id,
                name: call.name,
                arguments: call.arguments_json,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(ChatMessage {
        role,
        content: message.content,
        tool_calls,
        tool_call_id: Some(message.tool_call_id).filter(|id| !id.is_empty()),
    })
}

fn parse_tool(index: usize, tool: v1::Tool) -> Result<ToolSpec, Error> {
    let valid_name = !tool.name.is_empty()
        && tool.name.len() <= 64
        && tool
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid_name {
        return Err(invalid(format!(
            "tools[{index}].name: {:?} must be 1-64 letters, digits, _ or -",
            tool.name
        )));
    }
    let parameters = if tool.parameters_json.trim().is_empty() {
        serde_json::json!({"type": "object", "properties": {}})
    } else {
        let value: serde_json::Value = serde_json::from_str(&tool.parameters_json)
            .map_err(|e| invalid(format!("tools[{index}].parameters: not JSON: {e}")))?;
        if !value.is_object() {
            return Err(invalid(format!(
                "tools[{index}].parameters: must be a JSON Schema object"
            )));
        }
        value
    };
    Ok(ToolSpec {
        name: tool.name,
        description: tool.description,
        parameters,
    })
}

fn proto_tool_calls(calls: &[ToolCall]) -> Vec<v1::ToolCall> {
    calls
        .iter()
        .map(|call| v1::ToolCall {
            id: call.id.clone(),
            name: call.name.clone(),
            arguments_json: call.arguments.clone(),
        })
        .collect()
}

impl From<Completion> for v1::CompleteResponse {
    fn from(completion: Completion) -> Self {
        Self {
            content: completion.response.content,
            usage: Some(v1::Usage {
                prompt_tokens: completion.response.usage.prompt,
                completion_tokens: completion.response.usage.completion,
                cost_micros_usd: completion.cost_micros,
            }),
            deployment: completion.deployment,
            provider: completion.provider.as_str().to_owned(),
            model: completion.model,
            finish_reason: completion.response.finish_reason,
            tool_calls: proto_tool_calls(&completion.response.tool_calls),
            route_reason: completion.route_reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> v1::CompleteRequest {
        v1::CompleteRequest {
            tenant: "acme".into(),
            tier: "budget".into(),
            max_tokens: 0,
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn rejection(change: impl FnOnce(&mut v1::CompleteRequest)) -> String {
        let mut request = request();
        change(&mut request);
        let error = parse(request).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        error.to_string()
    }

    #[test]
    fn valid_requests_become_calls() {
        let call = parse(request()).unwrap();
        assert_eq!(call.tier, Some(Tier::Budget));
        assert_eq!(call.request.max_tokens, None);
        assert_eq!(
            call.request.messages,
            vec![ChatMessage::new(Role::User, "hi")]
        );
    }

    #[test]
    fn invalid_requests_say_what_is_wrong() {
        assert!(rejection(|r| r.tenant = " ".into()).contains("tenant must not be empty"));
        assert!(rejection(|r| r.messages.clear()).contains("at least one message"));
        assert!(rejection(|r| r.tier = "gold".into()).contains("unknown tier \"gold\""));
        assert!(rejection(|r| r.messages[0].role = "bot".into()).contains("messages[0].role"));
        assert!(rejection(|r| r.temperature = Some(f32::NAN)).contains("temperature"));
    }
}
