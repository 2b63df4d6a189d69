//! Publishes every circuit breaker change of this replica as a `BreakerChanged` on
//! `colony.v1.event.breaker`, so that the monitor can see open breakers (they otherwise live only
//! in this process and its `colony_router_breaker_state` gauge).
//!
//! Best effort, off the call path: breakers hand their changes to a bounded channel without
//! waiting ([`Breaker::send_changes_to`]); one task sends them in order without waiting for
//! JetStream's acknowledgement (like the worker's token chunks). A change that cannot be sent
//! is logged and counted in `colony_router_breaker_events_failed_total`, never failing a call;
//! the next change of that breaker says where it stands again.
//!
//! [`Breaker::send_changes_to`]: crate::resilience::breaker::Breaker::send_changes_to

use colony_bus::{Bus, subjects};
use colony_proto::prost::Message as _;
use colony_proto::v1;
use metrics::counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::BREAKER_EVENTS_FAILED;
use crate::resilience::breaker::{BreakerState, Change};

/// Changes waiting to be sent at most; a breaker changes at most a few times per open duration,
/// so only a stalled connection fills it.
pub const QUEUE: usize = 256;

/// Names this replica in its events (see [`colony_runtime::instance_name`]).
pub fn router_id() -> String {
    colony_runtime::instance_name("router")
}

fn state(state: BreakerState) -> v1::BreakerState {
    match state {
        BreakerState::Closed => v1::BreakerState::Closed,
        BreakerState::HalfOpen => v1::BreakerState::HalfOpen,
        BreakerState::Open => v1::BreakerState::Open,
    }
}

/// The event of `change` in replica `router_id`.
pub fn event(router_id: &str, change: &Change) -> v1::BreakerChanged {
    v1::BreakerChanged {
        deployment: change.deployment.clone(),
        router_id: router_id.to_owned(),
        state: state(change.state) as i32,
        generation: change.generation,
        occurred_at: Some(colony_proto::timestamp(change.at)),
    }
}

/// Sends each change from `changes` until `shutdown` (changes still queued then are dropped:
/// the replica's breakers end with it).
pub async fn publish(
    bus: Bus,
    router_id: String,
    mut changes: mpsc::Receiver<Change>,
    shutdown: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            () = shutdown.cancelled() => return,
            change = changes.recv() => match change {
                Some(change) => change,
                None => return,
            },
        };
        let event = event(&router_id, &change);
        // One id per change of one breaker in one replica: a repeated send is harmless.
        let msg_id = format!(
            "breaker-{router_id}-{}-{}",
            change.deployment, change.generation
        );
        let payload = colony_proto::prost::bytes::Bytes::from(event.encode_to_vec());
        // Sent without waiting for the acknowledgement: the stream still stores it.
        if let Err(error) = bus
            .start_publish(subjects::BREAKER_CHANGED, &msg_id, None, payload)
            .await
        {
            counter!(BREAKER_EVENTS_FAILED, "reason" => "publish").increment(1);
            tracing::warn!(
                %error,
                deployment = %change.deployment,
                state = change.state.as_str(),
                "breaker change not published"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_becomes_its_event() {
        let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let change = Change {
            deployment: "gpt".into(),
            state: BreakerState::HalfOpen,
            generation: 7,
            at,
        };
        let event = event("r1", &change);
        assert_eq!(
            (event.deployment.as_str(), event.router_id.as_str()),
            ("gpt", "r1")
        );
        assert_eq!(event.state(), v1::BreakerState::HalfOpen);
        assert_eq!(event.generation, 7);
        assert_eq!(event.occurred_at.map(|t| t.seconds), Some(1_700_000_000));
        for (domain, wire) in [
            (BreakerState::Closed, v1::BreakerState::Closed),
            (BreakerState::Open, v1::BreakerState::Open),
        ] {
            assert_eq!(state(domain), wire);
        }
    }
}
