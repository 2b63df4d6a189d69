//! Open breakers from the routers' real `BreakerChanged` events on the bus: an open breaker is
//! listed in `/v1/status`, counted in `colony_monitor_open_breakers` and fires an
//! `open_breakers` rule, through half-open; its `closed` change resolves the alert and empties
//! the list. A change older than the one already applied (reordered) changes nothing.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use colony_bus::subjects;
use colony_monitor::alerts::RuleKind;
use colony_proto::v1;
use colony_testkit::{TestBus, TestDb, eventually};
use serde_json::Value;

use common::{WAIT, get_json, metric, wait_for_alert};

async fn changed(
    bus: &colony_bus::Bus,
    deployment: &str,
    state: v1::BreakerState,
    generation: u64,
) {
    bus.publish(
        subjects::BREAKER_CHANGED,
        &format!("breaker-r1-{deployment}-{generation}"),
        &v1::BreakerChanged {
            deployment: deployment.into(),
            router_id: "router-a-1-beef".into(),
            state: state as i32,
            generation,
            occurred_at: Some(colony_proto::now()),
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_open_breaker_is_listed_counted_and_alerted_until_it_closes() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let config = common::quick(vec![common::rule(
        "breakers-open",
        RuleKind::OpenBreakers,
        0.0,
    )]);
    let monitor = common::start(&db, &test_bus, config).await;
    let base = monitor.base.clone();
    let bus = test_bus.connect().await;

    // claude's change to closed arrives before the older one that opened it (reordered): the
    // older one changes nothing. gpt opens.
    changed(&bus, "claude", v1::BreakerState::Closed, 2).await;
    eventually(WAIT, "claude's closed change handled", || async {
        let status = get_json(&format!("{base}/v1/status")).await;
        (status["events"]["breaker.closed"] == 1).then_some(())
    })
    .await;
    changed(&bus, "claude", v1::BreakerState::Open, 1).await;
    changed(&bus, "gpt", v1::BreakerState::Open, 1).await;
    let listed = eventually(WAIT, "both open changes handled", || async {
        let status = get_json(&format!("{base}/v1/status")).await;
        (status["events"]["breaker.open"] == 2).then(|| status["open_breakers"].clone())
    })
    .await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["router_id"], "router-a-1-beef");
    assert_eq!(listed[0]["deployment"], "gpt");
    assert_eq!(listed[0]["state"], "open");
    assert!(listed[0]["since"].is_string(), "{listed:?}");
    let gauge = metric(&base, "colony_monitor_open_breakers").await;
    assert_eq!(gauge, Some(1.0));

    let firing = wait_for_alert(&base, "breakers-open", "firing").await;
    assert_eq!(firing["fired_value"], 1.0);
    assert!(
        firing["summary"]
            .as_str()
            .unwrap()
            .starts_with("breakers-open: open_breakers is 1.000, above 0 (now)"),
        "{firing}"
    );

    // Half-open still counts as open: the alert keeps firing.
    changed(&bus, "gpt", v1::BreakerState::HalfOpen, 2).await;
    eventually(WAIT, "gpt half-open", || async {
        let status = get_json(&format!("{base}/v1/status")).await;
        (status["open_breakers"][0]["state"] == "half_open").then_some(())
    })
    .await;
    // The probe succeeded: closed, resolved, nothing listed, the gauge at 0.
    changed(&bus, "gpt", v1::BreakerState::Closed, 3).await;
    let resolved = wait_for_alert(&base, "breakers-open", "resolved").await;
    assert_eq!(resolved["last_value"], 0.0);
    let firings: i64 =
        sqlx::query_scalar("SELECT count(*) FROM monitor.alerts WHERE rule = 'breakers-open'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(firings, 1, "half-open did not resolve and refire the alert");
    let status = get_json(&format!("{base}/v1/status")).await;
    assert_eq!(status["open_breakers"], Value::Array(Vec::new()));
    eventually(WAIT, "the gauge back at 0", || async {
        (metric(&base, "colony_monitor_open_breakers").await == Some(0.0)).then_some(())
    })
    .await;

    monitor.stop().await;
}
