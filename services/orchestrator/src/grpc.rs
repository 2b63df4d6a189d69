//! `colony.v1.Orchestrator`: claims, heartbeats, dependency outputs and spawned child tasks
//! from agent-workers.

use std::time::Duration;

use colony_proto::v1;
use colony_proto::v1::orchestrator_server::Orchestrator;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::config::RunsConfig;
use crate::metrics;
use crate::plan::PlannedTask;
use crate::roster::{OnReject, PLANNER, RoleKind, SELF_JUDGE};
use crate::store::{Claim, ClaimRequest, ClaimedTask, Spawn, Store};

pub struct OrchestratorService {
    pub store: Store,
    pub lease: Duration,
    pub runs: RunsConfig,
}

fn task_id(raw: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(raw)
        .map_err(|_| Status::invalid_argument(format!("task_id {raw:?} is not a UUID")))
}

fn attempt(raw: u32) -> Result<i32, Status> {
    i32::try_from(raw)
        .ok()
        .filter(|a| *a >= 1)
        .ok_or_else(|| Status::invalid_argument("attempt must be at least 1"))
}

/// Opens the span of an rpc about one task, as a child of the caller's `traceparent`, and
/// unwraps the request.
fn traced<T>(
    request: Request<T>,
    name: &'static str,
    task_id: fn(&T) -> &str,
) -> (tracing::Span, T) {
    let span = tracing::info_span!("rpc", rpc = name, task_id = tracing::field::Empty);
    let traceparent = request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    colony_telemetry::set_parent(&span, traceparent);
    let request = request.into_inner();
    span.record("task_id", task_id(&request));
    (span, request)
}

/// The largest checkpoint accepted, encoded. gRPC messages stop at 4 MiB by default; a
/// checkpoint must also fit in the claim that hands it on.
const MAX_CHECKPOINT_BYTES: usize = 3 * 1024 * 1024;

/// A stored checkpoint, or `None` (and a warning) when it no longer decodes: the attempt then
/// starts afresh rather than failing.
fn decode_checkpoint(bytes: &[u8]) -> Option<v1::Checkpoint> {
    use prost::Message as _;
    v1::Checkpoint::decode(bytes)
        .inspect_err(
            |error| tracing::warn!(%error, "a stored checkpoint does not decode; starting afresh"),
        )
        .ok()
}

/// Claims, spawns and heartbeats act for a worker: it must say which.
fn require_worker_id(worker_id: &str) -> Result<(), Status> {
    if worker_id.is_empty() {
        return Err(Status::invalid_argument("worker_id is required"));
    }
    Ok(())
}

impl OrchestratorService {
    /// The task's tier: its role's, else `runs.tier`.
    fn tier(&self, role: &str) -> String {
        self.store
            .roster()
            .roles
            .get(role)
            .map(|r| r.tier.clone())
            .filter(|tier| !tier.is_empty())
            .unwrap_or_else(|| self.runs.tier.clone())
    }

    /// The wire answer to one claim, counted.
    fn claim_response(&self, claim: Claim, worker: &str) -> v1::ClaimTaskResponse {
        let lease_ms = self.lease.as_millis() as u64;
        match claim {
            Claim::Refused(reason) => {
                ::metrics::counter!(metrics::CLAIMS, "result" => "refused").increment(1);
                tracing::debug!(%reason, worker, "claim refused");
                v1::ClaimTaskResponse {
                    granted: false,
                    reason,
                    task: None,
                    lease_ms,
                }
            }
            Claim::Granted(task) => {
                let context = self.context(&task);
                let tier = self.tier(&task.role);
                let kind = self.kind(&task.role);
                let tools = self.tools(&task.role);
                let task_budget = self.task_budget_micros(&task.role);
                let task_token_budget = self
                    .store
                    .roster()
                    .roles
                    .get(&task.role)
                    .and_then(|r| r.task_token_budget)
                    .unwrap_or(0);
                let validation = self.validation(&task.role);
                let (context_window, escalation) = self.context_window(&task.role, &tier);
                ::metrics::counter!(metrics::CLAIMS, "result" => "granted").increment(1);
                ::metrics::counter!(metrics::TASKS, "tenant" => task.tenant.clone(), "state" => "running")
                    .increment(1);
                ::metrics::histogram!(metrics::DISPATCH_LATENCY).record(task.waited.max(0.0));
                tracing::debug!(worker, task_id = %task.task_id, attempt = task.attempt, "task claimed");
                v1::ClaimTaskResponse {
                    granted: true,
                    reason: String::new(),
                    task: Some(v1::TaskSpec {
                        tenant: task.tenant,
                        run_id: task.run_id.to_string(),
                        task_id: task.task_id.to_string(),
                        attempt: task.attempt as u32,
                        role: task.role,
                        instructions: task.instructions,
                        tier,
                        max_tokens: self.runs.max_tokens,
                        context,
                        kind: kind as i32,
                        tools,
                        task_budget_micros_usd: task_budget,
                        run_budget_micros_usd: task
                            .run_budget_micros_usd
                            .map_or(0, |micros| u64::try_from(micros).unwrap_or(0)),
                        checkpoint: task.checkpoint.as_deref().and_then(decode_checkpoint),
                        validation,
                        context_window,
                        escalation,
                        task_token_budget,
                    }),
                    lease_ms,
                }
            }
        }
    }

    /// The context window of `tier` (0 when the roster has no profile for it), and the larger
    /// tier `role` may escalate to on overflow.
    fn context_window(&self, role: &str, tier: &str) -> (u64, Option<v1::ContextEscalation>) {
        let roster = self.store.roster();
        let window = roster.profile(tier).map_or(0, |model| model.context_window);
        let escalation = roster
            .roles
            .get(role)
            .map(|r| r.escalate_tier.as_str())
            .filter(|larger| !larger.is_empty() && *larger != tier)
            .and_then(|larger| {
                Some(v1::ContextEscalation {
                    tier: larger.to_owned(),
                    context_window: roster.profile(larger)?.context_window,
                })
            });
        (window, escalation)
    }

    /// The tools `role` may use; none for a role the roster does not know.
    fn tools(&self, role: &str) -> Vec<String> {
        self.store
            .roster()
            .roles
            .get(role)
            .map(|r| r.tools.clone())
            .unwrap_or_default()
    }

    /// How `role`'s answers are checked, with each judge's prompt and tier resolved.
    fn validation(&self, role: &str) -> Option<v1::Validation> {
        let roster = self.store.roster();
        let config = roster.roles.get(role)?.validation.as_ref()?;
        let judges = config
            .judges
            .iter()
            .map(|judge| {
                let as_role = if judge == SELF_JUDGE { role } else { judge };
                v1::Judge {
                    name: judge.clone(),
                    prompt: roster
                        .roles
                        .get(as_role)
                        .map(|r| r.prompt.clone())
                        .unwrap_or_default(),
                    tier: self.tier(as_role),
                }
            })
            .collect();
        Some(v1::Validation {
            judges,
            rubric: config.rubric.clone(),
            max_rounds: config.max_rounds,
            fail_on_reject: config.on_reject == OnReject::Fail,
        })
    }

    /// The task budget of `role` in micro-USD; 0 (none) when the roster sets none.
    fn task_budget_micros(&self, role: &str) -> u64 {
        self.store
            .roster()
            .roles
            .get(role)
            .and_then(|r| r.task_budget_usd)
            // Validated finite and >= 0 at load.
            .map_or(0, |usd| (usd * 1e6).round() as u64)
    }

    /// The wire kind of `role`'s tasks; an unknown role's tasks are agent tasks.
    fn kind(&self, role: &str) -> v1::TaskKind {
        match self.store.roster().roles.get(role).map(|r| r.kind) {
            Some(RoleKind::Noop) => v1::TaskKind::Noop,
            Some(RoleKind::Agent) | None => v1::TaskKind::Agent,
        }
    }

    /// What comes before the instructions: the role's prompt (a planner's also lists the
    /// roles it may plan with), then one message per dependency with its output or a
    /// reference to it.
    fn context(&self, task: &ClaimedTask) -> Vec<v1::ChatMessage> {
        let roster = self.store.roster();
        let mut prompt = roster
            .roles
            .get(&task.role)
            .map(|role| role.prompt.clone())
            .unwrap_or_default();
        if task.role == PLANNER {
            prompt = format!("{prompt}\n\n{}", roster.planner_brief());
        }
        let mut context = Vec::with_capacity(task.dependencies.len() + 1);
        if !prompt.trim().is_empty() {
            context.push(v1::ChatMessage {
                role: "system".into(),
                content: prompt,
                ..Default::default()
            });
        }
        context.extend(task.dependencies.iter().map(|dependency| v1::ChatMessage {
            role: "user".into(),
            content: dependency.message(),
            ..Default::default()
        }));
        context
    }
}

/// Claims one `ClaimTasks` call may carry.
const MAX_CLAIMS_PER_CALL: usize = 256;

#[tonic::async_trait]
impl Orchestrator for OrchestratorService {
    async fn claim_task(
        &self,
        request: Request<v1::ClaimTaskRequest>,
    ) -> Result<Response<v1::ClaimTaskResponse>, Status> {
        let (span, request) = traced(request, "ClaimTask", |r| &r.task_id);
        async move {
            require_worker_id(&request.worker_id)?;
            let claim = self
                .store
                .claim(
                    &request.tenant,
                    task_id(&request.task_id)?,
                    attempt(request.attempt)?,
                    &request.worker_id,
                    self.lease,
                )
                .await?;
            Ok(Response::new(
                self.claim_response(claim, &request.worker_id),
            ))
        }
        .instrument(span)
        .await
    }

    async fn claim_tasks(
        &self,
        request: Request<v1::ClaimTasksRequest>,
    ) -> Result<Response<v1::ClaimTasksResponse>, Status> {
        let (span, request) = traced(request, "ClaimTasks", |r| &r.worker_id);
        async move {
            require_worker_id(&request.worker_id)?;
            if request.claims.len() > MAX_CLAIMS_PER_CALL {
                return Err(Status::invalid_argument(format!(
                    "{} claims in one call; the limit is {MAX_CLAIMS_PER_CALL}",
                    request.claims.len()
                )));
            }
            let mut claims = Vec::with_capacity(request.claims.len());
            for claim in &request.claims {
                if claim.worker_id != request.worker_id {
                    return Err(Status::invalid_argument(
                        "every claim's worker_id must be the call's worker_id",
                    ));
                }
                claims.push(ClaimRequest {
                    tenant: claim.tenant.clone(),
                    task_id: task_id(&claim.task_id)?,
                    attempt: attempt(claim.attempt)?,
                });
            }
            let started = std::time::Instant::now();
            let answers = self
                .store
                .claim_many(&request.worker_id, self.lease, &claims)
                .await?;
            ::metrics::histogram!(metrics::CLAIM_SECONDS).record(started.elapsed().as_secs_f64());
            Ok(Response::new(v1::ClaimTasksResponse {
                claims: answers
                    .into_iter()
                    .map(|claim| self.claim_response(claim, &request.worker_id))
                    .collect(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn heartbeat_task(
        &self,
        request: Request<v1::HeartbeatTaskRequest>,
    ) -> Result<Response<v1::HeartbeatTaskResponse>, Status> {
        let (span, request) = traced(request, "HeartbeatTask", |r| &r.task_id);
        async move {
            let lost = self
                .store
                .heartbeat(
                    &request.tenant,
                    task_id(&request.task_id)?,
                    attempt(request.attempt)?,
                    &request.worker_id,
                    self.lease,
                )
                .await?;
            Ok(Response::new(v1::HeartbeatTaskResponse {
                keep_going: lost.is_none(),
                reason: lost.unwrap_or_default(),
                lease_ms: self.lease.as_millis() as u64,
            }))
        }
        .instrument(span)
        .await
    }

    async fn get_task_output(
        &self,
        request: Request<v1::GetTaskOutputRequest>,
    ) -> Result<Response<v1::GetTaskOutputResponse>, Status> {
        let (span, request) = traced(request, "GetTaskOutput", |r| &r.task_id);
        async move {
            let id = task_id(&request.task_id)?;
            let (role, output) = self.store.task_output(&request.tenant, id).await?;
            Ok(Response::new(v1::GetTaskOutputResponse {
                task_id: id.to_string(),
                role,
                output,
            }))
        }
        .instrument(span)
        .await
    }

    async fn release_task(
        &self,
        request: Request<v1::ReleaseTaskRequest>,
    ) -> Result<Response<v1::ReleaseTaskResponse>, Status> {
        let (span, request) = traced(request, "ReleaseTask", |r| &r.task_id);
        async move {
            require_worker_id(&request.worker_id)?;
            let released = self
                .store
                .release(
                    &request.tenant,
                    task_id(&request.task_id)?,
                    attempt(request.attempt)?,
                    &request.worker_id,
                )
                .await?;
            ::metrics::counter!(
                metrics::RELEASES,
                "result" => if released { "released" } else { "refused" }
            )
            .increment(1);
            Ok(Response::new(v1::ReleaseTaskResponse { released }))
        }
        .instrument(span)
        .await
    }

    async fn save_checkpoint(
        &self,
        request: Request<v1::SaveCheckpointRequest>,
    ) -> Result<Response<v1::SaveCheckpointResponse>, Status> {
        use prost::Message as _;
        let (span, request) = traced(request, "SaveCheckpoint", |r| &r.task_id);
        async move {
            require_worker_id(&request.worker_id)?;
            let checkpoint = request
                .checkpoint
                .ok_or_else(|| Status::invalid_argument("checkpoint is required"))?;
            let bytes = checkpoint.encode_to_vec();
            if bytes.len() > MAX_CHECKPOINT_BYTES {
                return Err(Status::invalid_argument(format!(
                    "the checkpoint is {} bytes; the limit is {MAX_CHECKPOINT_BYTES}",
                    bytes.len()
                )));
            }
            let refused = self
                .store
                .save_checkpoint(
                    &request.tenant,
                    task_id(&request.task_id)?,
                    attempt(request.attempt)?,
                    &request.worker_id,
                    &bytes,
                )
                .await?;
            ::metrics::counter!(
                metrics::CHECKPOINTS,
                "result" => if refused.is_none() { "saved" } else { "refused" }
            )
            .increment(1);
            Ok(Response::new(v1::SaveCheckpointResponse {
                saved: refused.is_none(),
                reason: refused.unwrap_or_default(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn spawn_tasks(
        &self,
        request: Request<v1::SpawnTasksRequest>,
    ) -> Result<Response<v1::SpawnTasksResponse>, Status> {
        let (span, request) = traced(request, "SpawnTasks", |r| &r.task_id);
        async move {
            require_worker_id(&request.worker_id)?;
            let spawn = Spawn {
                tenant: request.tenant,
                task_id: task_id(&request.task_id)?,
                attempt: attempt(request.attempt)?,
                worker_id: request.worker_id,
                children: request
                    .children
                    .into_iter()
                    .map(|child| PlannedTask {
                        id: child.key,
                        role: child.role,
                        instructions: child.instructions,
                        depends_on: child.depends_on,
                    })
                    .collect(),
                wait: request.wait,
            };
            let spawned = self.store.spawn_tasks(&spawn).await.inspect_err(|error| {
                if !error.is_retryable() {
                    ::metrics::counter!(metrics::SPAWNS, "result" => "refused").increment(1);
                    tracing::info!(%error, "spawn refused");
                }
            })?;
            Ok(Response::new(v1::SpawnTasksResponse {
                children: spawned
                    .children
                    .into_iter()
                    .map(|(key, id)| v1::SpawnedTask {
                        key,
                        task_id: id.to_string(),
                    })
                    .collect(),
                parked: spawned.parked,
            }))
        }
        .instrument(span)
        .await
    }
}
