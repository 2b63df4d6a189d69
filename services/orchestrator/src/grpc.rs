//! `colony.v1.Orchestrator`: claims and heartbeats from agent-workers.

use std::time::Duration;

use colony_proto::v1;
use colony_proto::v1::orchestrator_server::Orchestrator;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::config::RunsConfig;
use crate::metrics;
use crate::store::{Claim, Store};

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

fn traced<T>(request: &Request<T>, name: &'static str) -> tracing::Span {
    let span = tracing::info_span!("rpc", rpc = name, task_id = tracing::field::Empty);
    let traceparent = request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    colony_telemetry::set_parent(&span, traceparent);
    span
}

#[tonic::async_trait]
impl Orchestrator for OrchestratorService {
    async fn claim_task(
        &self,
        request: Request<v1::ClaimTaskRequest>,
    ) -> Result<Response<v1::ClaimTaskResponse>, Status> {
        let span = traced(&request, "ClaimTask");
        let request = request.into_inner();
        span.record("task_id", request.task_id.as_str());
        let _entered = span.enter();
        if request.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is required"));
        }
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
        let lease_ms = self.lease.as_millis() as u64;
        Ok(Response::new(match claim {
            Claim::Refused(reason) => {
                ::metrics::counter!(metrics::CLAIMS, "result" => "refused").increment(1);
                tracing::debug!(%reason, worker = %request.worker_id, "claim refused");
                v1::ClaimTaskResponse {
                    granted: false,
                    reason,
                    task: None,
                    lease_ms,
                }
            }
            Claim::Granted(task) => {
                ::metrics::counter!(metrics::CLAIMS, "result" => "granted").increment(1);
                ::metrics::counter!(metrics::TASKS, "state" => "running").increment(1);
                ::metrics::histogram!(metrics::DISPATCH_LATENCY).record(task.waited.max(0.0));
                tracing::info!(worker = %request.worker_id, attempt = task.attempt, "task claimed");
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
                        tier: self.runs.tier.clone(),
                        max_tokens: self.runs.max_tokens,
                        context: vec![v1::ChatMessage {
                            role: "system".into(),
                            content: self.runs.system_prompt.clone(),
                        }],
                    }),
                    lease_ms,
                }
            }
        }))
    }

    async fn heartbeat_task(
        &self,
        request: Request<v1::HeartbeatTaskRequest>,
    ) -> Result<Response<v1::HeartbeatTaskResponse>, Status> {
        let span = traced(&request, "HeartbeatTask");
        let request = request.into_inner();
        span.record("task_id", request.task_id.as_str());
        let _entered = span.enter();
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
}
