//! The `colony.v1.Router` gRPC edge: proto ↔ domain conversion, request validation, and the
//! server span that continues the caller's trace.

use colony_proto::v1::{self, router_server};
use tonic::codegen::http;
use tonic::{Request, Response, Status};

use crate::config::Tier;
use crate::error::Error;
use crate::ledger::Caller;
use crate::metrics;
use crate::provider::{ChatMessage, ChatRequest, Role};
use crate::service::{Call, Completion, Service};

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

    /// For now the whole answer is produced first and then sent as chunks.
    #[tracing::instrument(skip_all, fields(tenant, run_id, task_id, attempt, deployment))]
    async fn complete_stream(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let response = self.complete(request).await?.into_inner();
        let mut chunks: Vec<Result<v1::CompleteChunk, Status>> = Vec::new();
        if !response.content.is_empty() {
            chunks.push(Ok(v1::CompleteChunk {
                chunk: Some(v1::complete_chunk::Chunk::Delta(response.content.clone())),
            }));
        }
        chunks.push(Ok(v1::CompleteChunk {
            chunk: Some(v1::complete_chunk::Chunk::Done(response)),
        }));
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    #[tracing::instrument(skip_all, fields(tenant, run_id, task_id, attempt, deployment))]
    async fn complete(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        let result = async {
            let call = parse(request.into_inner())?;
            let span = tracing::Span::current();
            span.record("tenant", call.caller.tenant.as_str());
            span.record("run_id", call.caller.run_id.as_str());
            span.record("task_id", call.caller.task_id.as_str());
            span.record("attempt", call.caller.attempt);
            self.service.complete(call).await
        };
        match result.await {
            Ok(completion) => Ok(Response::new(completion.into())),
            Err(error) => {
                if matches!(error, Error::InvalidRequest(_)) {
                    metrics::rejected();
                }
                tracing::warn!(%error, class = %error.class(), "complete failed");
                Err(error.into())
            }
        }
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidRequest(message.into())
}

/// Validates a request and converts it to the domain (the HTTP edge's requests too).
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
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            let role = Role::from_name(&message.role).ok_or_else(|| {
                invalid(format!(
                    "messages[{index}].role: {:?} is not system, user, assistant or tool",
                    message.role
                ))
            })?;
            Ok(ChatMessage::new(role, message.content))
        })
        .collect::<Result<_, Error>>()?;
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
            ..ChatRequest::default()
        },
    })
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
            route_reason: completion.route_reason,
            tool_calls: Vec::new(),
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
