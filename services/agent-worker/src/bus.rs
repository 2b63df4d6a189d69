//! The bus edge: the dispatch consumer's handler (prost → domain, decision → ack / nak /
//! term), report publishing (domain → prost) and the worker heartbeat.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use colony_bus::{Bus, Delivery, Outcome, ProgressHandle, subjects};
use colony_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::grpc::usage_to_proto;
use crate::task::{ChatMessage, Dispatch, Report, TaskOutcome, TaskSpec, TokenChunk};
use crate::worker::{Disposition, Peers, Progress, Reporter, Slots, Worker};

/// The durable consumer every replica shares for `role`, so replicas split the work queue.
pub fn durable_name(role: &str) -> String {
    format!("workers-{role}")
}

impl Progress for ProgressHandle {
    fn progress(&self) -> impl Future<Output = ()> + Send {
        ProgressHandle::progress(self)
    }
}

/// The dispatch in domain terms, or why it can never be claimed.
pub fn dispatch_from_proto(message: v1::TaskDispatch) -> Result<Dispatch, String> {
    for (field, value) in [("tenant", &message.tenant), ("task_id", &message.task_id)] {
        if value.is_empty() {
            return Err(format!("malformed dispatch: {field} is empty"));
        }
    }
    if message.attempt == 0 {
        return Err("malformed dispatch: attempt is 0".into());
    }
    Ok(Dispatch {
        dispatched_at: message
            .dispatched_at
            .and_then(|at| SystemTime::try_from(at).ok()),
        tenant: message.tenant,
        run_id: message.run_id,
        task_id: message.task_id,
        attempt: message.attempt,
        role: message.role,
    })
}

/// Handles one delivery from the consumer of `role`.
pub async fn handle<P: Peers, R: Reporter>(
    worker: Arc<Worker<P, R>>,
    role: Arc<str>,
    delivery: Delivery<v1::TaskDispatch>,
) -> Outcome {
    let progress = delivery.progress_handle();
    let dispatch = match dispatch_from_proto(delivery.message) {
        Ok(dispatch) => dispatch,
        Err(reason) => {
            tracing::warn!(%reason, subject = %delivery.subject, "dispatch terminated");
            return Outcome::Terminate(reason);
        }
    };
    match worker.handle(&role, dispatch, progress).await {
        Disposition::Done => Outcome::Ack,
        Disposition::Retry(delay) => Outcome::Retry(delay),
        Disposition::Reject(reason) => Outcome::Terminate(reason),
    }
}

pub fn report_to_proto(report: &Report) -> v1::TaskReport {
    let outcome = match &report.outcome {
        TaskOutcome::Succeeded {
            output,
            usage,
            deployment,
        } => v1::task_report::Outcome::Succeeded(v1::TaskSucceeded {
            output: output.clone(),
            usage: usage_to_proto(*usage),
            deployment: deployment.clone(),
        }),
        TaskOutcome::Failed {
            class,
            message,
            usage,
        } => v1::task_report::Outcome::Failed(v1::TaskFailed {
            error_class: v1::ErrorClass::from(*class) as i32,
            message: message.clone(),
            usage: usage_to_proto(*usage),
        }),
    };
    v1::TaskReport {
        tenant: report.tenant.clone(),
        run_id: report.run_id.clone(),
        task_id: report.task_id.clone(),
        attempt: report.attempt,
        worker_id: report.worker_id.clone(),
        outcome: Some(outcome),
        finished_at: Some(colony_proto::timestamp(report.finished_at)),
        verdict: report.verdict.as_ref().map(|verdict| v1::Verdict {
            tier: verdict.tier.clone(),
            accepted: verdict.accepted,
            rejections: verdict.rejections,
        }),
    }
}

/// Publishes reports on `colony.v1.task.report.<succeeded|failed>`.
#[derive(Clone)]
pub struct BusReporter {
    bus: Bus,
}

impl BusReporter {
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }
}

impl Reporter for BusReporter {
    async fn publish(&self, report: &Report) -> Result<(), Error> {
        self.bus
            .publish(
                &subjects::report(report.outcome.kind()),
                &report.msg_id(),
                &report_to_proto(report),
            )
            .await
            .map_err(Error::from)
    }

    async fn steps(
        &self,
        task: &TaskSpec,
        first: u32,
        messages: &[ChatMessage],
    ) -> Result<(), Error> {
        // Published together: each waits for JetStream's ack, and one at a time they would
        // add a round trip per message to the task.
        let publishes = (first..).zip(messages).map(|(step, message)| {
            let event = v1::TrajectoryStep {
                tenant: task.tenant.clone(),
                run_id: task.run_id.clone(),
                task_id: task.task_id.clone(),
                attempt: task.attempt,
                role: task.role.clone(),
                step,
                message: Some(crate::grpc::to_proto_message(message)),
                occurred_at: Some(colony_proto::now()),
            };
            // One id per step of an attempt: a retried publish is a duplicate, not a new step.
            let msg_id = format!(
                "step-{}-{}-{}-{}-{step}",
                task.tenant, task.run_id, task.task_id, task.attempt
            );
            async move {
                self.bus
                    .publish(subjects::TRAJECTORY_STEP, &msg_id, &event)
                    .await
            }
        });
        futures::future::try_join_all(publishes).await?;
        Ok(())
    }

    async fn tokens(&self, task: &TaskSpec, chunk: &TokenChunk) -> Result<(), Error> {
        let event = v1::TaskTokens {
            tenant: task.tenant.clone(),
            run_id: task.run_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            model_call: chunk.model_call,
            seq: chunk.seq,
            text: chunk.text.clone(),
            done: chunk.done,
            sent_at: Some(colony_proto::now()),
        };
        let msg_id = format!(
            "tokens-{}-{}-{}-{}-{}-{}",
            task.tenant, task.run_id, task.task_id, task.attempt, chunk.model_call, chunk.seq
        );
        // Best effort, on the model call's path: sent without waiting for JetStream's
        // acknowledgement (the stream still stores it; a lost chunk only costs watchers text).
        let traceparent = colony_telemetry::current_traceparent();
        let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&event));
        self.bus
            .start_publish(
                subjects::TASK_TOKENS,
                &msg_id,
                traceparent.as_deref(),
                payload,
            )
            .await
            .map(drop)
            .map_err(Error::from)
    }
}

/// Stops this worker's tasks of every run being cancelled (`colony.v1.event.run.cancelling`,
/// a plain subscription: every replica hears every cancellation) until shutdown. The lease
/// heartbeat would say so too, but only a third of a lease later.
pub async fn stop_cancelled_runs<P: Peers, R: Reporter>(
    worker: Arc<Worker<P, R>>,
    mut events: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    use futures::StreamExt as _;
    use prost::Message as _;
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            message = events.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        match v1::RunEvent::decode(message.payload.as_ref()) {
            Ok(event) => {
                let stopped = worker.cancel_run(&event.tenant, &event.run_id);
                if stopped > 0 {
                    tracing::info!(tenant = %event.tenant, run_id = %event.run_id, stopped, "run cancelled; stopping its tasks");
                }
            }
            Err(error) => {
                tracing::warn!(%error, subject = %message.subject, "undecodable run event ignored");
            }
        }
    }
}

/// What the worker heartbeat says about this process.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub roles: Vec<String>,
    pub slots_total: u32,
    pub started_at: SystemTime,
}

/// Publishes a `WorkerHeartbeat` at once and then every `interval` until `shutdown`. A failed
/// publish is logged; the next tick tries again.
pub async fn publish_heartbeats(
    bus: Bus,
    info: WorkerInfo,
    slots: Slots,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence: u64 = 0;
    // The start time keeps msg ids unique across restarts of a worker with a fixed id, which
    // JetStream would otherwise drop as duplicates within its window.
    let started_ms = info
        .started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        sequence += 1;
        let beat = v1::WorkerHeartbeat {
            worker_id: info.worker_id.clone(),
            roles: info.roles.clone(),
            slots_total: info.slots_total,
            slots_busy: slots.busy(),
            started_at: Some(colony_proto::timestamp(info.started_at)),
            sent_at: Some(colony_proto::now()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let msg_id = format!("hb-{}-{started_ms}-{sequence}", info.worker_id);
        let published = tokio::select! {
            () = shutdown.cancelled() => return,
            published = bus.publish(subjects::WORKER_HEARTBEAT, &msg_id, &beat) => published,
        };
        if let Err(error) = published {
            tracing::warn!(%error, sequence, "worker heartbeat publish failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{ErrorClass, Usage};

    #[test]
    fn dispatches_need_tenant_task_and_attempt() {
        let good = v1::TaskDispatch {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 1,
            role: "generalist".into(),
            dispatched_at: Some(colony_proto::now()),
        };
        let dispatch = dispatch_from_proto(good.clone()).unwrap();
        assert_eq!(dispatch.task_id, "t1");
        assert!(dispatch.dispatched_at.is_some());
        let no_tenant = v1::TaskDispatch {
            tenant: String::new(),
            ..good.clone()
        };
        assert_eq!(
            dispatch_from_proto(no_tenant).unwrap_err(),
            "malformed dispatch: tenant is empty"
        );
        let no_attempt = v1::TaskDispatch { attempt: 0, ..good };
        assert!(dispatch_from_proto(no_attempt).is_err());
    }

    #[test]
    fn reports_convert_with_class_and_usage() {
        let report = Report {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 3,
            worker_id: "w1".into(),
            outcome: TaskOutcome::Failed {
                class: ErrorClass::ExternalRateLimit,
                message: "router: slow down".into(),
                usage: Usage::default(),
            },
            finished_at: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            verdict: Some(crate::task::Verdict {
                tier: "mid".into(),
                accepted: false,
                rejections: 3,
            }),
        };
        let proto = report_to_proto(&report);
        assert_eq!(proto.attempt, 3);
        assert_eq!(
            proto.verdict,
            Some(v1::Verdict {
                tier: "mid".into(),
                accepted: false,
                rejections: 3
            })
        );
        assert_eq!(proto.finished_at.unwrap().seconds, 10);
        let Some(v1::task_report::Outcome::Failed(failed)) = proto.outcome else {
            panic!("a failed outcome");
        };
        assert_eq!(failed.error_class(), v1::ErrorClass::ExternalRateLimit);
        assert_eq!(failed.message, "router: slow down");
        for class in ErrorClass::ALL {
            assert_eq!(
                v1::ErrorClass::from(class).as_str_name(),
                format!("ERROR_CLASS_{}", class.as_str().to_uppercase())
            );
        }
    }
}
