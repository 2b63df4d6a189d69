//! The EVENTS consumer: decodes each payload by its subject (the stream carries several
//! message types), applies it, and maps the result to ack / retry / terminate. The only module
//! that sees prost types.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use colony_bus::{Delivery, Outcome, subjects};
use colony_proto::prost::Message;
use colony_proto::v1;

use crate::Error;
use crate::Monitor;
use crate::breakers::{BreakerChange, BreakerState};
use crate::events::{Event, Heartbeat};
use crate::tasks::{TaskUpdate, Transition};
use crate::usage::Usage;

/// The durable consumer's name.
pub const CONSUMER: &str = "monitor";
/// Everything on the EVENTS stream (`colony.v1.event.>` — breaker changes included —,
/// `colony.v1.worker.>`, `colony.v1.usage.>`). JetStream accepts a filter wider than the stream's subjects; the
/// stream's own subjects bound what arrives.
pub const FILTER: &str = "colony.v1.>";

fn decode_as<M: Message + Default>(
    subject: &str,
    expected: &'static str,
    payload: &Bytes,
) -> Result<M, Error> {
    M::decode(payload.as_ref()).map_err(|error| Error::Malformed {
        subject: subject.to_owned(),
        expected,
        message: error.to_string(),
    })
}

fn time(timestamp: Option<&colony_proto::prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let timestamp = timestamp?;
    DateTime::from_timestamp(timestamp.seconds, u32::try_from(timestamp.nanos).ok()?)
}

fn run_kind(kind: i32) -> &'static str {
    match v1::RunEventKind::try_from(kind) {
        Ok(v1::RunEventKind::Created) => "run.created",
        Ok(v1::RunEventKind::Succeeded) => "run.succeeded",
        Ok(v1::RunEventKind::Failed) => "run.failed",
        Ok(v1::RunEventKind::Cancelled) => "run.cancelled",
        Ok(v1::RunEventKind::Planned) => "run.planned",
        Ok(v1::RunEventKind::Cancelling) => "run.cancelling",
        Ok(v1::RunEventKind::Unspecified) | Err(_) => "run.unspecified",
    }
}

fn task_kind(kind: i32) -> &'static str {
    match v1::TaskEventKind::try_from(kind) {
        Ok(v1::TaskEventKind::Queued) => "task.queued",
        Ok(v1::TaskEventKind::Started) => "task.started",
        Ok(v1::TaskEventKind::Succeeded) => "task.succeeded",
        Ok(v1::TaskEventKind::Failed) => "task.failed",
        Ok(v1::TaskEventKind::Requeued) => "task.requeued",
        Ok(v1::TaskEventKind::Cancelled) => "task.cancelled",
        Ok(v1::TaskEventKind::DeadLettered) => "task.dead_lettered",
        Ok(v1::TaskEventKind::AwaitingApproval) => "task.awaiting_approval",
        Ok(v1::TaskEventKind::Parked) => "task.parked",
        Ok(v1::TaskEventKind::Unspecified) | Err(_) => "task.unspecified",
    }
}

/// The label and the domain state of a breaker state; `None` for one this monitor does not know.
fn breaker_state(state: i32) -> (&'static str, Option<BreakerState>) {
    match v1::BreakerState::try_from(state) {
        Ok(v1::BreakerState::Closed) => ("breaker.closed", Some(BreakerState::Closed)),
        Ok(v1::BreakerState::HalfOpen) => ("breaker.half_open", Some(BreakerState::HalfOpen)),
        Ok(v1::BreakerState::Open) => ("breaker.open", Some(BreakerState::Open)),
        Ok(v1::BreakerState::Unspecified) | Err(_) => ("breaker.unspecified", None),
    }
}

/// What a task event of `kind` does to its task; `None` for an unknown kind.
fn transition(kind: i32) -> Option<Transition> {
    match v1::TaskEventKind::try_from(kind) {
        Ok(v1::TaskEventKind::Queued | v1::TaskEventKind::Requeued) => Some(Transition::Queued),
        Ok(v1::TaskEventKind::Started) => Some(Transition::Started),
        Ok(v1::TaskEventKind::AwaitingApproval) => Some(Transition::AwaitingApproval),
        Ok(v1::TaskEventKind::Parked) => Some(Transition::Parked),
        Ok(
            v1::TaskEventKind::Succeeded
            | v1::TaskEventKind::Failed
            | v1::TaskEventKind::Cancelled
            | v1::TaskEventKind::DeadLettered,
        ) => Some(Transition::Finished),
        Ok(v1::TaskEventKind::Unspecified) | Err(_) => None,
    }
}

/// Decodes `payload` as the type its logical `subject` carries. Kind labels come from the
/// decoded enum, not from the subject, so they stay a fixed set whatever a publisher sends.
pub fn decode(subject: &str, payload: &Bytes) -> Result<Event, Error> {
    let family = subject.rsplit_once('.').map_or("", |(family, _)| family);
    if family == subjects::EVENT_RUN {
        let event: v1::RunEvent = decode_as(subject, "RunEvent", payload)?;
        return Ok(Event::Run {
            kind: run_kind(event.kind),
            occurred_at: time(event.occurred_at.as_ref()),
        });
    }
    if family == subjects::EVENT_TASK {
        let event: v1::TaskEvent = decode_as(subject, "TaskEvent", payload)?;
        let occurred_at = time(event.occurred_at.as_ref());
        let update = transition(event.kind)
            .filter(|_| !event.task_id.is_empty())
            .map(|transition| TaskUpdate {
                occurred_at,
                task_id: event.task_id,
                tenant: event.tenant,
                run_id: event.run_id,
                role: event.role,
                attempt: event.attempt,
                transition,
            });
        return Ok(Event::Task {
            kind: task_kind(event.kind),
            occurred_at,
            update,
        });
    }
    if subject == subjects::BREAKER_CHANGED {
        let event: v1::BreakerChanged = decode_as(subject, "BreakerChanged", payload)?;
        if event.router_id.is_empty() || event.deployment.is_empty() {
            return Err(Error::Invalid {
                subject: subject.to_owned(),
                expected: "BreakerChanged",
                reason: "router_id or deployment is empty".into(),
            });
        }
        let (kind, state) = breaker_state(event.state);
        let occurred_at = time(event.occurred_at.as_ref());
        return Ok(Event::Breaker {
            kind,
            change: state.map(|state| BreakerChange {
                router_id: event.router_id,
                deployment: event.deployment,
                state,
                generation: event.generation,
                occurred_at,
            }),
        });
    }
    if subject == subjects::WORKER_HEARTBEAT {
        let beat: v1::WorkerHeartbeat = decode_as(subject, "WorkerHeartbeat", payload)?;
        if beat.worker_id.is_empty() {
            return Err(Error::Invalid {
                subject: subject.to_owned(),
                expected: "WorkerHeartbeat",
                reason: "worker_id is empty".into(),
            });
        }
        return Ok(Event::Heartbeat(Heartbeat {
            started_at: time(beat.started_at.as_ref()),
            sent_at: time(beat.sent_at.as_ref()),
            worker_id: beat.worker_id,
            roles: beat.roles,
            slots_total: beat.slots_total,
            slots_busy: beat.slots_busy,
            version: beat.version,
        }));
    }
    if subject == subjects::USAGE_RECORDED {
        let record: v1::UsageRecord = decode_as(subject, "UsageRecord", payload)?;
        let usage = record.usage.unwrap_or_default();
        let occurred_at = time(record.occurred_at.as_ref());
        return Ok(Event::Usage(Usage {
            tenant: record.tenant,
            run_id: record.run_id,
            deployment: record.deployment,
            model: record.model,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost_micros_usd: usage.cost_micros_usd,
            latency_ms: record.latency_ms,
            identity: occurred_at.is_some().then(|| payload.clone()),
            occurred_at,
        }));
    }
    Ok(Event::Other)
}

/// Handles one delivery. Errors are logged here, once.
pub async fn handle(monitor: Arc<Monitor>, delivery: Delivery<Bytes>) -> Outcome {
    // The lag of an event runs to when JetStream stored it, not to now: a monitor catching up
    // on a backlog (after a restart, or the first start replaying the stream) is not lag of
    // the publishers. Without the delivery's metadata, now is the next best thing.
    let arrived_at = delivery.published_at().unwrap_or_else(Utc::now);
    let result = match decode(&delivery.subject, &delivery.message) {
        Ok(event) => monitor.apply(event, arrived_at).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => Outcome::Ack,
        Err(error) => {
            let outcome = error.outcome(delivery.delivered);
            match &outcome {
                Outcome::Retry(delay) => tracing::warn!(
                    %error,
                    subject = %delivery.subject,
                    delivered = delivery.delivered,
                    ?delay,
                    "event not handled; will retry"
                ),
                _ => tracing::warn!(
                    %error,
                    subject = %delivery.subject,
                    code = error.code(),
                    "event terminated"
                ),
            }
            outcome
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<M: Message>(message: &M) -> Bytes {
        Bytes::from(message.encode_to_vec())
    }

    #[test]
    fn decodes_by_subject_with_kinds_from_the_payload() {
        let run = v1::RunEvent {
            kind: v1::RunEventKind::Created as i32,
            ..Default::default()
        };
        assert_eq!(
            decode("colony.v1.event.run.created", &bytes(&run)).ok(),
            Some(Event::Run {
                kind: "run.created",
                occurred_at: None,
            })
        );
        let task = v1::TaskEvent {
            kind: v1::TaskEventKind::Succeeded as i32,
            ..Default::default()
        };
        // The label follows the payload even when the subject's last token is unexpected.
        let event = decode("colony.v1.event.task.whatever", &bytes(&task)).ok();
        assert_eq!(event.map(|e| e.kind()), Some("task.succeeded"));
        let unknown_kind = v1::TaskEvent {
            kind: 99,
            ..Default::default()
        };
        let event = decode("colony.v1.event.task.x", &bytes(&unknown_kind)).ok();
        assert_eq!(event.map(|e| e.kind()), Some("task.unspecified"));
    }

    #[test]
    fn heartbeat_and_usage_keep_their_fields() {
        let beat = v1::WorkerHeartbeat {
            worker_id: "w1".into(),
            roles: vec!["generalist".into()],
            slots_total: 4,
            slots_busy: 1,
            sent_at: Some(colony_proto::prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            version: "0.1.0".into(),
            ..Default::default()
        };
        let Ok(Event::Heartbeat(decoded)) = decode(subjects::WORKER_HEARTBEAT, &bytes(&beat))
        else {
            panic!("expected a heartbeat");
        };
        assert_eq!(decoded.worker_id, "w1");
        assert_eq!(decoded.slots_total, 4);
        assert_eq!(
            decoded.sent_at.map(|t| t.timestamp_nanos_opt()),
            Some(Some(1_700_000_000_000_000_005))
        );
        assert_eq!(decoded.started_at, None);

        let usage = v1::UsageRecord {
            tenant: "acme".into(),
            run_id: "r1".into(),
            deployment: "gpt-azure".into(),
            model: "gpt".into(),
            usage: Some(v1::Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
                cost_micros_usd: 0,
            }),
            ..Default::default()
        };
        assert_eq!(
            decode(subjects::USAGE_RECORDED, &bytes(&usage)).ok(),
            Some(Event::Usage(Usage {
                tenant: "acme".into(),
                run_id: "r1".into(),
                deployment: "gpt-azure".into(),
                model: "gpt".into(),
                prompt_tokens: 10,
                completion_tokens: 3,
                cost_micros_usd: 0,
                latency_ms: 0,
                occurred_at: None,
                // Without the call's time the payload does not identify it.
                identity: None,
            }))
        );
        let timed = v1::UsageRecord {
            occurred_at: Some(colony_proto::now()),
            ..usage
        };
        let Ok(Event::Usage(decoded)) = decode(subjects::USAGE_RECORDED, &bytes(&timed)) else {
            panic!("expected usage");
        };
        assert_eq!(decoded.identity, Some(bytes(&timed)));
        assert!(decoded.occurred_at.is_some());
    }

    #[test]
    fn task_events_become_updates_of_their_task() {
        let at = colony_proto::now();
        let event = |kind: v1::TaskEventKind, task_id: &str| v1::TaskEvent {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: task_id.into(),
            attempt: 2,
            role: "coder".into(),
            kind: kind as i32,
            occurred_at: Some(at),
            ..Default::default()
        };
        let update = |kind| match decode("colony.v1.event.task.x", &bytes(&event(kind, "t1"))) {
            Ok(Event::Task { update, .. }) => update.map(|u| u.transition),
            other => panic!("expected a task event, got {other:?}"),
        };
        use v1::TaskEventKind as K;
        assert_eq!(update(K::Queued), Some(Transition::Queued));
        assert_eq!(update(K::Requeued), Some(Transition::Queued));
        assert_eq!(update(K::Started), Some(Transition::Started));
        assert_eq!(
            update(K::AwaitingApproval),
            Some(Transition::AwaitingApproval)
        );
        assert_eq!(update(K::Parked), Some(Transition::Parked));
        for ended in [K::Succeeded, K::Failed, K::Cancelled, K::DeadLettered] {
            assert_eq!(update(ended), Some(Transition::Finished), "{ended:?}");
        }
        assert_eq!(update(K::Unspecified), None);

        let Ok(Event::Task {
            update: Some(started),
            ..
        }) = decode(
            "colony.v1.event.task.started",
            &bytes(&event(K::Started, "t1")),
        )
        else {
            panic!("expected a task update");
        };
        assert_eq!(
            (
                started.tenant.as_str(),
                started.run_id.as_str(),
                started.role.as_str()
            ),
            ("acme", "r1", "coder")
        );
        assert_eq!((started.task_id.as_str(), started.attempt), ("t1", 2));
        assert_eq!(started.occurred_at.map(|t| t.timestamp()), Some(at.seconds));
        // Counted, but without a task id there is nothing to track.
        let anonymous = decode(
            "colony.v1.event.task.started",
            &bytes(&event(K::Started, "")),
        );
        assert!(
            matches!(
                anonymous,
                Ok(Event::Task {
                    kind: "task.started",
                    update: None,
                    ..
                })
            ),
            "{anonymous:?}"
        );
    }

    #[test]
    fn garbage_is_malformed_and_anonymous_heartbeats_are_invalid() {
        let garbage = Bytes::from_static(b"\xff\xff\xff\xff");
        let error = decode("colony.v1.event.task.failed", &garbage).err();
        assert_eq!(error.as_ref().map(Error::code), Some("malformed"));
        let anonymous = bytes(&v1::WorkerHeartbeat::default());
        let error = decode(subjects::WORKER_HEARTBEAT, &anonymous).err();
        assert_eq!(error.as_ref().map(Error::code), Some("invalid"));
    }

    #[test]
    fn breaker_changes_keep_their_order_and_time() {
        let at = colony_proto::now();
        let changed = |state: v1::BreakerState| v1::BreakerChanged {
            deployment: "gpt".into(),
            router_id: "r1".into(),
            state: state as i32,
            generation: 3,
            occurred_at: Some(at),
        };
        let event = decode(
            subjects::BREAKER_CHANGED,
            &bytes(&changed(v1::BreakerState::HalfOpen)),
        );
        let Ok(Event::Breaker {
            kind: "breaker.half_open",
            change: Some(change),
        }) = &event
        else {
            panic!("expected a breaker change, got {event:?}");
        };
        assert_eq!(
            (change.router_id.as_str(), change.deployment.as_str()),
            ("r1", "gpt")
        );
        assert_eq!(
            (change.state, change.generation),
            (BreakerState::HalfOpen, 3)
        );
        assert_eq!(
            event
                .ok()
                .and_then(|e| e.occurred_at())
                .map(|t| t.timestamp()),
            Some(at.seconds)
        );
        // A state from a newer router is counted, not applied.
        let unknown = v1::BreakerChanged {
            state: 42,
            ..changed(v1::BreakerState::Open)
        };
        assert_eq!(
            decode(subjects::BREAKER_CHANGED, &bytes(&unknown)).ok(),
            Some(Event::Breaker {
                kind: "breaker.unspecified",
                change: None
            })
        );
        let anonymous = v1::BreakerChanged {
            router_id: String::new(),
            ..changed(v1::BreakerState::Open)
        };
        let error = decode(subjects::BREAKER_CHANGED, &bytes(&anonymous)).err();
        assert_eq!(error.as_ref().map(Error::code), Some("invalid"));
    }

    #[test]
    fn unknown_subjects_are_other() {
        let event = decode("colony.v1.worker.retired", &Bytes::from_static(b"\xff")).ok();
        assert_eq!(event, Some(Event::Other));
    }
}
