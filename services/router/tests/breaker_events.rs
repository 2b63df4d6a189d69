//! Every change of a deployment's circuit breaker is published on `colony.v1.event.breaker`:
//! a failing deployment's breaker opens, a probe after the open period closes it, and a
//! subscriber on the bus sees open → half-open → closed from one router replica, in order.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use std::time::Duration;

use colony_bus::subjects;
use colony_proto::prost::Message as _;
use colony_proto::v1;
use colony_router::config::Tier;
use colony_router::error::ErrorClass;
use colony_testkit::{TestBus, TestDb};
use common::{rule, scripted, start_with, stop};
use futures::StreamExt as _;
use serde_json::json;

async fn chat(url: &str, text: &str) -> u16 {
    reqwest::Client::new()
        .post(url)
        .json(&json!({"model": "flaky", "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn next_change(events: &mut colony_bus::async_nats::Subscriber) -> v1::BreakerChanged {
    let message = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a breaker event within 10 s")
        .unwrap();
    v1::BreakerChanged::decode(message.payload.as_ref()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_changes_are_published_in_order() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    let mut events = bus
        .client()
        .subscribe(bus.subject(subjects::BREAKER_CHANGED))
        .await
        .unwrap();
    let (runtime, handle) = start_with(&db, &test_bus, |config| {
        config.deployments = vec![scripted(
            "flaky",
            Tier::Mid,
            vec![
                rule(Some("down"), "", Some(ErrorClass::ExternalDegrading)),
                rule(None, "flaky answers", None),
            ],
        )];
        config.default_deployment = "flaky".into();
        config.resilience.retry.max_attempts = 1;
        config.resilience.breaker.failure_threshold = 1;
        config.resilience.breaker.open_duration = Duration::from_millis(300);
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);

    // One health failure opens it (no fallback: the call fails).
    assert_ne!(chat(&url, "down").await, 200);
    let opened = next_change(&mut events).await;
    assert_eq!(opened.deployment, "flaky");
    assert_eq!(opened.state(), v1::BreakerState::Open);
    assert_eq!(opened.generation, 1);
    assert!(!opened.router_id.is_empty());
    let occurred_at = opened.occurred_at.unwrap();
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .abs_diff(u64::try_from(occurred_at.seconds).unwrap());
    assert!(age < 60, "occurred_at is {age} s away from now");

    // After the open period the next call is a probe; its success closes the breaker.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(chat(&url, "hi").await, 200);
    let half_open = next_change(&mut events).await;
    let closed = next_change(&mut events).await;
    assert_eq!(
        [half_open.state(), closed.state()],
        [v1::BreakerState::HalfOpen, v1::BreakerState::Closed]
    );
    assert_eq!([half_open.generation, closed.generation], [2, 3]);
    for later in [&half_open, &closed] {
        assert_eq!(later.router_id, opened.router_id);
        assert_eq!(later.deployment, "flaky");
    }

    // JetStream stored them too (the EVENTS stream's `colony.v1.event.>` covers the subject).
    let stream = bus
        .jetstream()
        .get_stream(bus.stream_name(colony_bus::StreamKind::Events))
        .await
        .unwrap();
    let last = stream
        .get_last_raw_message_by_subject(&bus.subject(subjects::BREAKER_CHANGED))
        .await
        .unwrap();
    assert_eq!(v1::BreakerChanged::decode(last.payload).unwrap(), closed);
    stop(runtime, handle).await;
}
