//! In-process service test: the monitor against a fresh database and its own NATS prefix.
//! One test, because the metrics recorder is process-wide and the gauge must not be shared.

mod common;

use std::time::Duration;

use bytes::Bytes;
use colony_bus::{Bus, StreamKind, subjects};
use colony_monitor::Config;
use colony_proto::v1;
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb, eventually};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

fn msg_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("the monitor answers")
        .text()
        .await
        .expect("a body")
}

async fn get_json(url: &str) -> Value {
    let response = reqwest::get(url).await.expect("the monitor answers");
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.json().await.expect("a JSON body")
}

async fn wait_for_series(metrics_url: &str, name: &str, expected: f64) {
    eventually(WAIT, &format!("{name} = {expected}"), || async {
        let text = get_text(metrics_url).await;
        (common::series(&text, name) == Some(expected)).then_some(())
    })
    .await;
}

fn worker<'a>(workers: &'a Value, id: &str) -> Option<&'a Value> {
    workers["workers"]
        .as_array()?
        .iter()
        .find(|w| w["worker_id"] == id)
}

async fn publish<M: colony_proto::prost::Message>(bus: &Bus, subject: &str, message: &M) {
    bus.publish(subject, &msg_id(), message)
        .await
        .expect("publish succeeds");
}

#[tokio::test]
async fn events_become_metrics_workers_and_dead_letters() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let mut config = Config {
        database: db.config(),
        bus: test_bus.config(),
        // w1 is up, then suspect from 1.5 s after its heartbeat, then dead from 4 s: long
        // enough that the first assertions see it alive on a busy machine.
        worker_suspect_after: Some(Duration::from_millis(1500)),
        worker_stale_after: Duration::from_secs(4),
        sweep_interval: Duration::from_millis(100),
        // In order, so that the anomaly detector's baseline comes before the spike.
        consumer_concurrency: 1,
        ..Config::default()
    };
    config.http.addr = "127.0.0.1:0".into();
    let runtime = Runtime::new(CancellationToken::new());
    let handle = colony_monitor::spawn(config, &runtime)
        .await
        .expect("the monitor starts");
    let base = format!("http://{}", handle.http_addr);
    let metrics_url = format!("{base}/metrics");
    let bus = test_bus.connect().await;

    // Garbage first: every valid message after it must still be handled.
    bus.publish_bytes(
        &subjects::task_event("failed"),
        &msg_id(),
        None,
        Bytes::from_static(b"\xff\xff\xff\xff"),
    )
    .await
    .expect("publish succeeds");
    publish(
        &bus,
        &subjects::run_event("created"),
        &v1::RunEvent {
            tenant: "acme".into(),
            run_id: "r1".into(),
            kind: v1::RunEventKind::Created as i32,
            occurred_at: Some(colony_proto::now()),
            ..Default::default()
        },
    )
    .await;
    publish(
        &bus,
        &subjects::task_event("succeeded"),
        &v1::TaskEvent {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 1,
            role: "generalist".into(),
            kind: v1::TaskEventKind::Succeeded as i32,
            ..Default::default()
        },
    )
    .await;
    publish(
        &bus,
        subjects::WORKER_HEARTBEAT,
        &v1::WorkerHeartbeat {
            worker_id: "w1".into(),
            roles: vec!["generalist".into(), "planner".into()],
            slots_total: 4,
            slots_busy: 1,
            started_at: Some(colony_proto::now()),
            sent_at: Some(colony_proto::now()),
            version: "0.1.0".into(),
        },
    )
    .await;
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    publish(
        &bus,
        subjects::WORKER_HEARTBEAT,
        &v1::WorkerHeartbeat {
            worker_id: "w-gone".into(),
            roles: vec!["generalist".into()],
            slots_total: 2,
            started_at: Some(colony_proto::timestamp(an_hour_ago)),
            sent_at: Some(colony_proto::timestamp(an_hour_ago)),
            version: "0.0.9".into(),
            ..Default::default()
        },
    )
    .await;
    publish(
        &bus,
        subjects::USAGE_RECORDED,
        &v1::UsageRecord {
            tenant: "acme".into(),
            usage: Some(v1::Usage {
                prompt_tokens: 120,
                completion_tokens: 30,
                cost_micros_usd: 7,
            }),
            ..Default::default()
        },
    )
    .await;

    // Liveness first, while w1's heartbeat is fresh.
    wait_for_series(&metrics_url, "colony_monitor_workers", 1.0).await;
    let workers = get_json(&format!("{base}/v1/workers")).await;
    let w1 = worker(&workers, "w1").expect("w1 is listed");
    assert_eq!(w1["alive"], true, "{w1}");
    assert_eq!(w1["roles"], serde_json::json!(["generalist", "planner"]));
    assert_eq!(w1["slots_total"], 4);
    assert_eq!(w1["slots_busy"], 1);
    assert!(w1["last_seen_at"].is_string(), "{w1}");
    assert_ne!(w1["state"], "dead", "{w1}");
    let gone = worker(&workers, "w-gone").expect("w-gone is listed");
    assert_eq!(gone["alive"], false, "{gone}");
    assert_eq!(gone["state"], "dead", "{gone}");
    // Missing heartbeats, w1 is suspect before it is dead (and still counted live).
    wait_for_series(
        &metrics_url,
        r#"colony_monitor_workers_by_state{state="suspect"}"#,
        1.0,
    )
    .await;
    let workers = get_json(&format!("{base}/v1/workers")).await;
    let w1 = worker(&workers, "w1").expect("w1 is listed");
    assert_eq!(
        (&w1["state"], &w1["alive"]),
        (&serde_json::json!("suspect"), &Value::Bool(true)),
        "{w1}"
    );

    for (name, value) in [
        (r#"colony_monitor_events_total{kind="run.created"}"#, 1.0),
        (r#"colony_monitor_events_total{kind="task.succeeded"}"#, 1.0),
        (
            r#"colony_monitor_events_total{kind="worker.heartbeat"}"#,
            2.0,
        ),
        (r#"colony_monitor_events_total{kind="usage.recorded"}"#, 1.0),
        (r#"colony_monitor_tokens_total{direction="prompt"}"#, 120.0),
        (
            r#"colony_monitor_tokens_total{direction="completion"}"#,
            30.0,
        ),
        (
            r#"colony_bus_terminated_total{consumer="monitor",reason="malformed"}"#,
            1.0,
        ),
    ] {
        wait_for_series(&metrics_url, name, value).await;
    }
    let metrics = get_text(&metrics_url).await;
    assert!(
        !metrics.contains(r#"kind="task.failed""#),
        "the garbage was not counted as an event:\n{metrics}"
    );

    // The terminated message was copied to the dead-letter stream.
    let dead_letter_stream = bus.stream_name(StreamKind::DeadLetter);
    eventually(WAIT, "a copy in the dead-letter stream", || async {
        let mut stream = bus.jetstream().get_stream(&dead_letter_stream).await.ok()?;
        let info = stream.info().await.ok()?;
        (info.state.messages >= 1).then_some(())
    })
    .await;

    let status = get_json(&format!("{base}/v1/status")).await;
    assert_eq!(status["events"]["run.created"], 1, "{status}");
    assert_eq!(status["events"]["task.succeeded"], 1, "{status}");
    assert_eq!(status["events"]["worker.heartbeat"], 2, "{status}");
    assert_eq!(status["events"]["usage.recorded"], 1, "{status}");
    assert_eq!(status["events_total"], 5, "{status}");
    assert_eq!(
        status["dead_workers"].as_u64().map(|n| n >= 1),
        Some(true),
        "{status}"
    );

    // Without further heartbeats w1 goes stale: the sweep drops the gauge to zero.
    wait_for_series(&metrics_url, "colony_monitor_workers", 0.0).await;
    let workers = get_json(&format!("{base}/v1/workers")).await;
    assert_eq!(
        worker(&workers, "w1").map(|w| (w["alive"].clone(), w["state"].clone())),
        Some((Value::Bool(false), serde_json::json!("dead")))
    );
    wait_for_series(
        &metrics_url,
        r#"colony_monitor_workers_by_state{state="dead"}"#,
        2.0,
    )
    .await;

    // A fresh heartbeat brings it back.
    publish(
        &bus,
        subjects::WORKER_HEARTBEAT,
        &v1::WorkerHeartbeat {
            worker_id: "w1".into(),
            roles: vec!["generalist".into()],
            slots_total: 4,
            sent_at: Some(colony_proto::now()),
            ..Default::default()
        },
    )
    .await;
    wait_for_series(&metrics_url, "colony_monitor_workers", 1.0).await;

    // A deployment answering in about 100 ms, then once in 2 s: one latency anomaly.
    for latency_ms in (0..30).map(|i| 95 + i % 10).chain([2000]) {
        publish(
            &bus,
            subjects::USAGE_RECORDED,
            &v1::UsageRecord {
                tenant: "acme".into(),
                deployment: "gpt".into(),
                latency_ms,
                usage: Some(v1::Usage {
                    prompt_tokens: 100,
                    completion_tokens: 10,
                    cost_micros_usd: 40,
                }),
                ..Default::default()
            },
        )
        .await;
    }
    wait_for_series(
        &metrics_url,
        r#"colony_monitor_anomalies_total{signal="latency_ms"}"#,
        1.0,
    )
    .await;
    let status = get_json(&format!("{base}/v1/status")).await;
    let anomalies = status["anomalies"].as_array().expect("anomalies listed");
    assert_eq!(anomalies.len(), 1, "{status}");
    assert_eq!(anomalies[0]["deployment"], "gpt");
    assert_eq!(anomalies[0]["signal"], "latency_ms");
    assert_eq!(anomalies[0]["value"], 2000.0);
    let metrics = get_text(&metrics_url).await;
    assert!(
        !metrics.contains(r#"colony_monitor_anomalies_total{signal="cost_micros_usd"}"#),
        "a steady price is no anomaly:\n{metrics}"
    );

    runtime.shutdown.cancel();
    let readyz = reqwest::get(format!("{base}/readyz")).await;
    if let Ok(response) = readyz {
        assert_ne!(response.status(), reqwest::StatusCode::OK);
    }
    handle.wait().await;
}
