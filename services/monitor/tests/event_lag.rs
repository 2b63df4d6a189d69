//! Event lag from real events on the bus: a heartbeat sent on time leaves the lag near 0; a
//! task event whose `occurred_at` is five minutes old (an outbox that held it back) raises
//! `colony_monitor_event_lag_seconds`, `/v1/status`'s `event_lag_seconds` and fires an
//! `event_lag_seconds` rule.

mod common;

use std::time::{Duration, SystemTime};

use colony_bus::subjects;
use colony_monitor::alerts::RuleKind;
use colony_proto::v1;
use colony_testkit::{TestBus, TestDb, eventually};
use serde_json::Value;

use common::{WAIT, get_json, metric, wait_for_alert};

#[tokio::test]
async fn an_event_five_minutes_late_fires_the_event_lag_rule() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let config = common::quick(vec![common::rule(
        "event-lag",
        RuleKind::EventLagSeconds,
        60.0,
    )]);
    let monitor = common::start(&db, &test_bus, config).await;
    let base = monitor.base.clone();
    let bus = test_bus.connect().await;

    // On time: handled, no lag to speak of, nothing fires.
    bus.publish(
        subjects::WORKER_HEARTBEAT,
        "hb-1",
        &v1::WorkerHeartbeat {
            worker_id: "w1".into(),
            sent_at: Some(colony_proto::now()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let lag = eventually(WAIT, "the heartbeat handled", || async {
        let status = get_json(&format!("{base}/v1/status")).await;
        (status["events"]["worker.heartbeat"] == 1).then(|| status["event_lag_seconds"].clone())
    })
    .await;
    assert!(lag.as_f64().unwrap() < 30.0, "{lag}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alerts = get_json(&format!("{base}/v1/alerts")).await;
    assert_eq!(alerts["alerts"], Value::Array(Vec::new()));

    // Five minutes late.
    let five_minutes_ago = SystemTime::now() - Duration::from_secs(300);
    bus.publish(
        &subjects::task_event("queued"),
        "task-late-1",
        &v1::TaskEvent {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 1,
            role: "coder".into(),
            kind: v1::TaskEventKind::Queued as i32,
            occurred_at: Some(colony_proto::timestamp(five_minutes_ago)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let firing = wait_for_alert(&base, "event-lag", "firing").await;
    common::assert_fired_five_minutes(&firing, "event_lag_seconds", "over 10m");
    let gauge = eventually(WAIT, "the lag gauge", || async {
        metric(&base, "colony_monitor_event_lag_seconds")
            .await
            .filter(|lag| *lag > 60.0)
    })
    .await;
    assert!((299.0..330.0).contains(&gauge), "{gauge}");
    let status = get_json(&format!("{base}/v1/status")).await;
    assert!(
        status["event_lag_seconds"].as_f64().unwrap() >= 299.0,
        "{status}"
    );

    monitor.stop().await;
}
