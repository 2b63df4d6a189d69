//! The gRPC edge: clients for the orchestrator, the router and memory, the conversions between
//! prost and domain types, deadlines and trace context on every request, and the one mapping
//! from `tonic::Status` to [`Error`].

use std::time::Duration;

use anyhow::Context as _;
use colony_proto::v1;
use colony_proto::v1::memory_client::MemoryClient;
use colony_proto::v1::orchestrator_client::OrchestratorClient;
use colony_proto::v1::router_client::RouterClient;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::claims::{ClaimLoop, ClaimQueue};
use crate::error::{Error, Peer};
use crate::task::{
    ChatMessage, Checkpoint, ChildTask, Claim, Completion, Dispatch, ErrorClass, Escalation,
    FoundMemory, Judge, Lease, MemoryScope, Spawned, Strategy, TaskSpec, ToolCall, ToolSpec, Usage,
    Validation, WrittenMemory,
};
use crate::worker::Peers;

/// Metadata a Colony service puts on a failed call to say which [`ErrorClass`] it is.
pub use colony_proto::ERROR_CLASS_METADATA;

/// Regenerations when the roster leaves `max_rounds` at 0.
const DEFAULT_VALIDATION_ROUNDS: u32 = 2;

/// The worker's three peers over gRPC. Channels connect lazily, so the worker starts (and
/// stays ready) while a peer is down; calls then fail as transient and are retried.
#[derive(Clone)]
pub struct GrpcPeers {
    orchestrator: OrchestratorClient<Channel>,
    claims: ClaimQueue,
    router: RouterClient<Channel>,
    memory: MemoryClient<Channel>,
    rpc_timeout: Duration,
    completion_timeout: Duration,
}

fn channel(url: &str, connect_timeout: Duration) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("invalid gRPC endpoint {url:?}"))?
        .connect_timeout(connect_timeout)
        .connect_lazy())
}

impl GrpcPeers {
    /// The peers, and the loop that sends this worker's claims in batches (run it on the
    /// service's runtime).
    pub fn new(
        orchestrator_url: &str,
        router_url: &str,
        memory_url: &str,
        worker_id: &str,
        rpc_timeout: Duration,
        completion_timeout: Duration,
    ) -> anyhow::Result<(Self, ClaimLoop)> {
        let orchestrator = OrchestratorClient::new(channel(orchestrator_url, rpc_timeout)?);
        let (claims, claim_loop) =
            crate::claims::queue(orchestrator.clone(), worker_id.to_owned(), rpc_timeout);
        let peers = Self {
            orchestrator,
            claims,
            router: RouterClient::new(channel(router_url, rpc_timeout)?),
            memory: MemoryClient::new(channel(memory_url, rpc_timeout)?),
            rpc_timeout,
            completion_timeout,
        };
        Ok((peers, claim_loop))
    }
}

/// A request with a deadline and the current span's W3C `traceparent`.
pub(crate) fn request<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    if let Some(traceparent) = colony_telemetry::current_traceparent()
        && let Ok(value) = MetadataValue::try_from(traceparent)
    {
        request.metadata_mut().insert("traceparent", value);
    }
    request
}

/// The class of a failed call: from the `colony-error-class` metadata when the peer sent a
/// known one, else from the status code.
pub fn class_of(status: &Status) -> ErrorClass {
    if let Some(class) = status
        .metadata()
        .get(ERROR_CLASS_METADATA)
        .and_then(|value| value.to_str().ok())
        .and_then(ErrorClass::parse)
    {
        return class;
    }
    match status.code() {
        // CANCELLED is what tonic's client answers when the request's own deadline passes.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorClass::Transient,
        Code::ResourceExhausted => ErrorClass::ExternalRateLimit,
        Code::InvalidArgument | Code::FailedPrecondition => ErrorClass::UserFixable,
        _ => ErrorClass::Permanent,
    }
}

/// The one conversion from a failed call to [`Error`], with a human-readable message.
pub fn status_error(peer: Peer, status: &Status, deadline: Duration) -> Error {
    let classified = status.metadata().contains_key(ERROR_CLASS_METADATA);
    let message = match status.code() {
        Code::DeadlineExceeded | Code::Cancelled if !classified => {
            format!("no answer within {deadline:?}")
        }
        Code::Unavailable if !classified => format!("unreachable: {}", status.message()),
        _ if status.message().is_empty() => format!("failed with {:?}", status.code()),
        _ => status.message().to_owned(),
    };
    Error::Call {
        peer,
        class: class_of(status),
        message,
    }
}

/// Runs one call; a client that never answers is cut off shortly after the deadline even if
/// the peer ignores `grpc-timeout`.
pub(crate) async fn call<T>(
    peer: Peer,
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Error> {
    within(peer, deadline, async {
        call.await.map(tonic::Response::into_inner)
    })
    .await
}

/// One call of `method` on the orchestrator or memory client of `peers`
/// (`rpc!(self.memory.append_messages(message))`), with the RPC deadline and the trace
/// context: a future of the answer.
macro_rules! rpc {
    ($peers:ident.orchestrator.$method:ident($message:expr)) => {
        rpc!(@ $peers, orchestrator, Peer::Orchestrator, $method, $message)
    };
    ($peers:ident.memory.$method:ident($message:expr)) => {
        rpc!(@ $peers, memory, Peer::Memory, $method, $message)
    };
    (@ $peers:ident, $client:ident, $peer:expr, $method:ident, $message:expr) => {
        async {
            let mut client = $peers.$client.clone();
            call(
                $peer,
                $peers.rpc_timeout,
                client.$method(request($message, $peers.rpc_timeout)),
            )
            .await
        }
    };
}

/// `work` (one or more calls to `peer`) with `deadline` and a little slack for the peer's own
/// deadline error to arrive first.
async fn within<T>(
    peer: Peer,
    deadline: Duration,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Error> {
    let limit = deadline + Duration::from_millis(500);
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(status)) => Err(status_error(peer, &status, deadline)),
        Err(_) => Err(Error::Call {
            peer,
            class: ErrorClass::Transient,
            message: format!("no answer within {deadline:?}"),
        }),
    }
}

/// A chat message on the wire (to the router, to memory, on the bus as a trajectory step).
pub(crate) fn to_proto_message(message: &ChatMessage) -> v1::ChatMessage {
    v1::ChatMessage {
        role: message.role.clone(),
        content: message.content.clone(),
        tool_calls: message
            .tool_calls
            .iter()
            .map(|call| v1::ToolCall {
                id: call.id.clone(),
                name: call.name.clone(),
                arguments_json: call.arguments.clone(),
            })
            .collect(),
        tool_call_id: message.tool_call_id.clone(),
    }
}

fn from_proto_message(message: v1::ChatMessage) -> ChatMessage {
    ChatMessage {
        role: message.role,
        content: message.content,
        tool_calls: message
            .tool_calls
            .into_iter()
            .map(tool_call_from_proto)
            .collect(),
        tool_call_id: message.tool_call_id,
    }
}

fn tool_call_from_proto(call: v1::ToolCall) -> ToolCall {
    ToolCall {
        id: call.id,
        name: call.name,
        arguments: call.arguments_json,
    }
}

fn tool_to_proto(tool: &ToolSpec) -> v1::Tool {
    v1::Tool {
        name: tool.name.to_owned(),
        description: tool.description.to_owned(),
        parameters_json: tool.parameters.to_string(),
    }
}

fn scope(kind: v1::ScopeKind, id: &str) -> v1::Scope {
    v1::Scope {
        kind: kind.into(),
        id: id.to_owned(),
    }
}

pub(crate) fn usage_to_proto(usage: Usage) -> Option<v1::Usage> {
    Some(v1::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cost_micros_usd: usage.cost_micros_usd,
    })
}

fn usage_from_proto(usage: Option<v1::Usage>) -> Usage {
    let usage = usage.unwrap_or_default();
    Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cost_micros_usd: usage.cost_micros_usd,
    }
}

/// The claim answer in domain terms. The attempt's identity comes from the dispatch; the
/// spec may leave it out, but must not contradict it.
pub fn claim_from_proto(
    dispatch: &Dispatch,
    response: v1::ClaimTaskResponse,
) -> Result<Claim, Error> {
    if !response.granted {
        return Ok(Claim::Refused {
            reason: response.reason,
        });
    }
    let invalid = |message: String| Error::InvalidResponse {
        peer: Peer::Orchestrator,
        message,
    };
    let spec = response
        .task
        .ok_or_else(|| invalid("claim granted without a task".into()))?;
    if (!spec.task_id.is_empty() && spec.task_id != dispatch.task_id)
        || (spec.attempt != 0 && spec.attempt != dispatch.attempt)
        || (!spec.tenant.is_empty() && spec.tenant != dispatch.tenant)
    {
        return Err(invalid(format!(
            "claim for {}/{} attempt {} granted task {}/{} attempt {}",
            dispatch.tenant,
            dispatch.task_id,
            dispatch.attempt,
            spec.tenant,
            spec.task_id,
            spec.attempt
        )));
    }
    let or = |value: String, fallback: &str| {
        if value.is_empty() {
            fallback.to_owned()
        } else {
            value
        }
    };
    let noop = spec.kind() == v1::TaskKind::Noop;
    Ok(Claim::Granted {
        task: Box::new(TaskSpec {
            noop,
            tenant: dispatch.tenant.clone(),
            run_id: or(spec.run_id, &dispatch.run_id),
            task_id: dispatch.task_id.clone(),
            attempt: dispatch.attempt,
            role: or(spec.role, &dispatch.role),
            instructions: spec.instructions,
            tier: spec.tier,
            max_tokens: spec.max_tokens,
            context: spec.context.into_iter().map(from_proto_message).collect(),
            tools: spec.tools,
            task_budget_micros_usd: spec.task_budget_micros_usd,
            run_budget_micros_usd: spec.run_budget_micros_usd,
            checkpoint: spec.checkpoint.map(|checkpoint| Checkpoint {
                model_calls: checkpoint.model_calls,
                messages: checkpoint
                    .messages
                    .into_iter()
                    .map(from_proto_message)
                    .collect(),
                usage: usage_from_proto(checkpoint.usage),
            }),
            validation: spec.validation.map(|validation| Validation {
                judges: validation
                    .judges
                    .into_iter()
                    .map(|judge| Judge {
                        name: judge.name,
                        prompt: judge.prompt,
                        tier: judge.tier,
                    })
                    .collect(),
                rubric: validation.rubric,
                max_rounds: if validation.max_rounds == 0 {
                    DEFAULT_VALIDATION_ROUNDS
                } else {
                    validation.max_rounds
                },
                fail_on_reject: validation.fail_on_reject,
            }),
            context_window: spec.context_window,
            task_token_budget: spec.task_token_budget,
            escalation: spec.escalation.map(|escalation| Escalation {
                tier: escalation.tier,
                context_window: escalation.context_window,
            }),
        }),
        lease: Duration::from_millis(response.lease_ms),
    })
}

/// A router request for `task`'s model call: its tier, budgets and the tools offered.
fn complete_request(
    task: &TaskSpec,
    messages: &[ChatMessage],
    tools: &[ToolSpec],
) -> v1::CompleteRequest {
    v1::CompleteRequest {
        tenant: task.tenant.clone(),
        run_id: task.run_id.clone(),
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        deployment: String::new(),
        tier: task.tier.clone(),
        messages: messages.iter().map(to_proto_message).collect(),
        max_tokens: task.max_tokens,
        tools: tools.iter().map(tool_to_proto).collect(),
        task_budget_micros_usd: task.task_budget_micros_usd,
        run_budget_micros_usd: task.run_budget_micros_usd,
        ..Default::default()
    }
}

fn completion_from_proto(response: v1::CompleteResponse) -> Completion {
    Completion {
        content: response.content,
        usage: usage_from_proto(response.usage),
        deployment: response.deployment,
        tool_calls: response
            .tool_calls
            .into_iter()
            .map(tool_call_from_proto)
            .collect(),
    }
}

impl Peers for GrpcPeers {
    async fn claim(&self, dispatch: &Dispatch, worker_id: &str) -> Result<Claim, Error> {
        let message = v1::ClaimTaskRequest {
            tenant: dispatch.tenant.clone(),
            task_id: dispatch.task_id.clone(),
            attempt: dispatch.attempt,
            worker_id: worker_id.to_owned(),
        };
        let response = self.claims.claim(message).await?;
        claim_from_proto(dispatch, response)
    }

    async fn heartbeat(&self, task: &TaskSpec, worker_id: &str) -> Result<Lease, Error> {
        let message = v1::HeartbeatTaskRequest {
            tenant: task.tenant.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            worker_id: worker_id.to_owned(),
        };
        let response = rpc!(self.orchestrator.heartbeat_task(message)).await?;
        Ok(if response.keep_going {
            Lease::Held {
                lease: (response.lease_ms > 0).then(|| Duration::from_millis(response.lease_ms)),
            }
        } else {
            Lease::Lost {
                reason: response.reason,
            }
        })
    }

    async fn release(&self, task: &TaskSpec, worker_id: &str) -> Result<bool, Error> {
        let message = v1::ReleaseTaskRequest {
            tenant: task.tenant.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            worker_id: worker_id.to_owned(),
        };
        let response = rpc!(self.orchestrator.release_task(message)).await?;
        Ok(response.released)
    }

    async fn task_output(&self, task: &TaskSpec, task_id: &str) -> Result<String, Error> {
        let message = v1::GetTaskOutputRequest {
            tenant: task.tenant.clone(),
            task_id: task_id.to_owned(),
        };
        let response = rpc!(self.orchestrator.get_task_output(message)).await?;
        Ok(response.output)
    }

    async fn append(&self, task: &TaskSpec, messages: &[ChatMessage]) -> Result<(), Error> {
        let message = v1::AppendMessagesRequest {
            tenant: task.tenant.clone(),
            // v1: one conversation per run.
            session_id: task.run_id.clone(),
            run_id: task.run_id.clone(),
            task_id: task.task_id.clone(),
            messages: messages.iter().map(to_proto_message).collect(),
        };
        rpc!(self.memory.append_messages(message)).await.map(drop)
    }

    async fn complete(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<Completion, Error> {
        let message = complete_request(task, messages, tools);
        let mut client = self.router.clone();
        let response = call(
            Peer::Router,
            self.completion_timeout,
            client.complete(request(message, self.completion_timeout)),
        )
        .await?;
        Ok(completion_from_proto(response))
    }

    async fn complete_streamed(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: &mpsc::UnboundedSender<String>,
    ) -> Result<Completion, Error> {
        use futures::StreamExt as _;
        use v1::complete_chunk::Chunk;
        let deadline = self.completion_timeout;
        let message = complete_request(task, messages, tools);
        let mut client = self.router.clone();
        let streamed = async {
            let mut chunks = client
                .complete_stream(request(message, deadline))
                .await?
                .into_inner();
            while let Some(chunk) = chunks.next().await {
                match chunk?.chunk {
                    // A closed receiver only means no one forwards the text any more.
                    Some(Chunk::Delta(text)) => drop(deltas.send(text)),
                    Some(Chunk::Done(response)) => return Ok(completion_from_proto(response)),
                    Some(Chunk::ToolCall(_)) | None => {}
                }
            }
            Err(Status::unavailable(
                "the router's stream ended without its final chunk",
            ))
        };
        within(Peer::Router, deadline, streamed).await
    }

    async fn save_checkpoint(
        &self,
        task: &TaskSpec,
        worker_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<Option<String>, Error> {
        let message = v1::SaveCheckpointRequest {
            tenant: task.tenant.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            worker_id: worker_id.to_owned(),
            checkpoint: Some(v1::Checkpoint {
                model_calls: checkpoint.model_calls,
                messages: checkpoint.messages.iter().map(to_proto_message).collect(),
                usage: usage_to_proto(checkpoint.usage),
                attempt: task.attempt,
            }),
        };
        let response = rpc!(self.orchestrator.save_checkpoint(message)).await?;
        Ok((!response.saved).then_some(response.reason))
    }

    async fn compress(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
    ) -> Result<Vec<String>, Error> {
        // Its own session, so that the summaries cover this conversation only (the run's
        // session interleaves its tasks); the originals stay stored there.
        let session_id = format!("{}/{}/{}/context", task.run_id, task.task_id, task.attempt);
        let append = v1::AppendMessagesRequest {
            tenant: task.tenant.clone(),
            session_id: session_id.clone(),
            run_id: task.run_id.clone(),
            task_id: task.task_id.clone(),
            // The tool calls are part of what happened: written out for the summariser.
            messages: messages
                .iter()
                .map(|message| {
                    let mut proto = to_proto_message(message);
                    for call in &message.tool_calls {
                        proto
                            .content
                            .push_str(&format!("\n[called {}({})]", call.name, call.arguments));
                    }
                    proto
                })
                .collect(),
        };
        rpc!(self.memory.append_messages(append)).await?;
        let compress = v1::CompressSessionRequest {
            tenant: task.tenant.clone(),
            session_id,
            keep_recent: Some(0),
        };
        // Summarising is model calls through the router: the completion deadline applies.
        let mut client = self.memory.clone();
        let response = call(
            Peer::Memory,
            self.completion_timeout,
            client.compress_session(request(compress, self.completion_timeout)),
        )
        .await?;
        Ok(response
            .summaries
            .into_iter()
            .map(|summary| summary.text)
            .collect())
    }

    async fn search_memories(
        &self,
        task: &TaskSpec,
        query: &str,
        limit: u32,
    ) -> Result<Vec<FoundMemory>, Error> {
        let message = v1::SearchMemoriesRequest {
            tenant: task.tenant.clone(),
            query: query.to_owned(),
            scopes: vec![
                scope(v1::ScopeKind::Tenant, ""),
                scope(v1::ScopeKind::Role, &task.role),
                scope(v1::ScopeKind::Run, &task.run_id),
            ],
            limit,
            ..Default::default()
        };
        let response = rpc!(self.memory.search_memories(message)).await?;
        Ok(response
            .results
            .into_iter()
            .filter_map(|scored| {
                let memory = scored.memory?;
                Some(FoundMemory {
                    id: memory.id,
                    text: memory.text,
                    score: scored.score,
                })
            })
            .collect())
    }

    async fn write_memory(
        &self,
        task: &TaskSpec,
        memory_scope: MemoryScope,
        text: &str,
        importance: Option<f32>,
    ) -> Result<WrittenMemory, Error> {
        let target = match memory_scope {
            MemoryScope::Tenant => scope(v1::ScopeKind::Tenant, ""),
            MemoryScope::Role => scope(v1::ScopeKind::Role, &task.role),
            MemoryScope::Run => scope(v1::ScopeKind::Run, &task.run_id),
        };
        let message = v1::WriteMemoriesRequest {
            tenant: task.tenant.clone(),
            memories: vec![v1::MemoryInput {
                scope: Some(target),
                text: text.to_owned(),
                importance,
                metadata: [
                    ("run_id".to_owned(), task.run_id.clone()),
                    ("task_id".to_owned(), task.task_id.clone()),
                ]
                .into(),
                ..Default::default()
            }],
        };
        let response = rpc!(self.memory.write_memories(message)).await?;
        let written =
            response
                .results
                .into_iter()
                .next()
                .ok_or_else(|| Error::InvalidResponse {
                    peer: Peer::Memory,
                    message: "no result for the memory written".into(),
                })?;
        Ok(WrittenMemory {
            id: written.id,
            merged: written.merged,
        })
    }

    async fn suggest_strategies(
        &self,
        task: &TaskSpec,
        about: &str,
        limit: u32,
    ) -> Result<Vec<Strategy>, Error> {
        let message = v1::SuggestStrategiesRequest {
            tenant: task.tenant.clone(),
            role: task.role.clone(),
            task: about.to_owned(),
            limit,
        };
        let response = rpc!(self.memory.suggest_strategies(message)).await?;
        Ok(response
            .suggestions
            .into_iter()
            .filter_map(|suggestion| {
                let strategy = suggestion.strategy?;
                Some(Strategy {
                    id: strategy.id,
                    title: strategy.title,
                    when_to_use: strategy.when_to_use,
                    strategy: strategy.strategy,
                    wins: strategy.wins,
                    losses: strategy.losses,
                })
            })
            .collect())
    }

    async fn record_strategy_outcome(
        &self,
        task: &TaskSpec,
        strategy_id: i64,
        success: bool,
    ) -> Result<(), Error> {
        let message = v1::RecordStrategyOutcomeRequest {
            tenant: task.tenant.clone(),
            strategy_id,
            success,
            run_id: task.run_id.clone(),
            task_id: task.task_id.clone(),
        };
        rpc!(self.memory.record_strategy_outcome(message))
            .await
            .map(drop)
    }

    async fn spawn(
        &self,
        task: &TaskSpec,
        worker_id: &str,
        children: &[ChildTask],
        wait: bool,
    ) -> Result<Spawned, Error> {
        let message = v1::SpawnTasksRequest {
            tenant: task.tenant.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            worker_id: worker_id.to_owned(),
            children: children
                .iter()
                .map(|child| v1::ChildTask {
                    key: child.key.clone(),
                    role: child.role.clone(),
                    instructions: child.instructions.clone(),
                    depends_on: child.depends_on.clone(),
                })
                .collect(),
            wait,
        };
        let response = rpc!(self.orchestrator.spawn_tasks(message)).await?;
        Ok(Spawned {
            children: response
                .children
                .into_iter()
                .map(|child| (child.key, child.task_id))
                .collect(),
            parked: response.parked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classified(code: Code, class: &'static str) -> Status {
        let mut status = Status::new(code, "deployment mock: the provider is rate limiting");
        status
            .metadata_mut()
            .insert(ERROR_CLASS_METADATA, MetadataValue::from_static(class));
        status
    }

    #[test]
    fn metadata_wins_over_the_status_code() {
        for class in ErrorClass::ALL {
            assert_eq!(class_of(&classified(Code::Internal, class.as_str())), class);
        }
        // An unknown class falls back to the code.
        assert_eq!(
            class_of(&classified(Code::ResourceExhausted, "bogus")),
            ErrorClass::ExternalRateLimit
        );
    }

    #[test]
    fn status_codes_map_to_classes() {
        let cases = [
            (Code::Unavailable, ErrorClass::Transient),
            (Code::DeadlineExceeded, ErrorClass::Transient),
            (Code::Cancelled, ErrorClass::Transient),
            (Code::ResourceExhausted, ErrorClass::ExternalRateLimit),
            (Code::InvalidArgument, ErrorClass::UserFixable),
            (Code::FailedPrecondition, ErrorClass::UserFixable),
            (Code::Internal, ErrorClass::Permanent),
            (Code::Unknown, ErrorClass::Permanent),
            (Code::NotFound, ErrorClass::Permanent),
        ];
        for (code, class) in cases {
            assert_eq!(class_of(&Status::new(code, "x")), class, "{code:?}");
        }
    }

    #[test]
    fn messages_are_human_readable() {
        let deadline = Duration::from_secs(300);
        let error = status_error(
            Peer::Router,
            &Status::unavailable("tcp connect error"),
            deadline,
        );
        assert_eq!(error.to_string(), "router: unreachable: tcp connect error");
        let error = status_error(
            Peer::Router,
            &Status::cancelled("Timeout expired"),
            deadline,
        );
        assert_eq!(error.to_string(), "router: no answer within 300s");
        assert_eq!(error.class(), ErrorClass::Transient);
        let error = status_error(
            Peer::Router,
            &classified(Code::ResourceExhausted, "external_rate_limit"),
            deadline,
        );
        assert_eq!(
            error.to_string(),
            "router: deployment mock: the provider is rate limiting"
        );
        assert_eq!(error.class(), ErrorClass::ExternalRateLimit);
        let error = status_error(Peer::Memory, &Status::new(Code::Internal, ""), deadline);
        assert_eq!(error.to_string(), "memory: failed with Internal");
    }

    fn dispatch() -> Dispatch {
        Dispatch {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 2,
            role: "generalist".into(),
            dispatched_at: None,
        }
    }

    #[test]
    fn claims_convert_and_must_match_the_dispatch() {
        let refused = claim_from_proto(
            &dispatch(),
            v1::ClaimTaskResponse {
                granted: false,
                reason: "stale attempt".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            refused.unwrap(),
            Claim::Refused {
                reason: "stale attempt".into()
            }
        );

        let spec = v1::TaskSpec {
            task_id: "t1".into(),
            attempt: 2,
            instructions: "do it".into(),
            tier: "mid".into(),
            max_tokens: 100,
            context: vec![v1::ChatMessage {
                role: "system".into(),
                content: "be brief".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let granted = claim_from_proto(
            &dispatch(),
            v1::ClaimTaskResponse {
                granted: true,
                task: Some(spec.clone()),
                lease_ms: 30_000,
                ..Default::default()
            },
        )
        .unwrap();
        let Claim::Granted { task, lease } = granted else {
            panic!("granted: {granted:?}");
        };
        assert_eq!(lease, Duration::from_secs(30));
        assert_eq!((task.tenant.as_str(), task.run_id.as_str()), ("acme", "r1"));
        assert_eq!(task.role, "generalist");
        assert_eq!(task.context, [ChatMessage::new("system", "be brief")]);

        let other_attempt = claim_from_proto(
            &dispatch(),
            v1::ClaimTaskResponse {
                granted: true,
                task: Some(v1::TaskSpec { attempt: 3, ..spec }),
                ..Default::default()
            },
        );
        assert!(matches!(other_attempt, Err(Error::InvalidResponse { .. })));
        let no_task = claim_from_proto(
            &dispatch(),
            v1::ClaimTaskResponse {
                granted: true,
                ..Default::default()
            },
        );
        assert!(matches!(no_task, Err(Error::InvalidResponse { .. })));
    }
}
