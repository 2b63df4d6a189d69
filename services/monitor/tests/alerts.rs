//! Alerts against a real webhook receiver: a worker dies, the rule fires and the notification
//! gets through after the receiver failed twice; the worker comes back and the alert resolves.
//! State in PostgreSQL, messages on the bus, what the receiver got.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use colony_bus::subjects;
use colony_monitor::Config;
use colony_monitor::alerts::{AlertsConfig, RuleKind};
use colony_proto::v1;
use colony_testkit::{TestBus, TestDb, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// Answers 500 to its first `failures` posts, then 200; keeps every body it was sent.
#[derive(Default)]
struct Receiver {
    failures: Mutex<u32>,
    received: Mutex<Vec<Value>>,
    posts: Mutex<u32>,
}

async fn receive(receiver: Arc<Receiver>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/hook",
        post(move |Json(body): Json<Value>| {
            let receiver = receiver.clone();
            async move {
                *receiver.posts.lock().unwrap() += 1;
                let mut failures = receiver.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                receiver.received.lock().unwrap().push(body);
                StatusCode::OK
            }
        }),
    );
    #[expect(clippy::disallowed_methods, reason = "test server owned by the test")]
    tokio::spawn(async move {
        drop(axum::serve(listener, app).await);
    });
    url
}

async fn heartbeat(bus: &colony_bus::Bus, worker: &str) {
    bus.publish(
        subjects::WORKER_HEARTBEAT,
        &uuid::Uuid::new_v4().to_string(),
        &v1::WorkerHeartbeat {
            worker_id: worker.into(),
            roles: vec!["generalist".into()],
            slots_total: 1,
            sent_at: Some(colony_proto::now()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

async fn alerts(base: &str) -> Vec<Value> {
    let body = common::get_json(&format!("{base}/v1/alerts")).await;
    body["alerts"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_dead_worker_fires_an_alert_delivered_with_retries_and_its_return_resolves_it() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let receiver = Arc::new(Receiver {
        failures: Mutex::new(2),
        ..Receiver::default()
    });
    let hook = receive(receiver.clone()).await;
    let config = Config {
        worker_stale_after: Duration::from_millis(800),
        sweep_interval: Duration::from_millis(100),
        alerts: AlertsConfig {
            evaluate_interval: Duration::from_millis(100),
            cooldown: Duration::ZERO,
            webhooks: vec![hook.clone()],
            webhook_attempts: 4,
            webhook_backoff: Duration::from_millis(50),
            rules: vec![common::rule("workers-died", RuleKind::DeadWorkers, 0.0)],
            ..AlertsConfig::default()
        },
        ..Config::default()
    };
    let monitor = common::start(&db, &test_bus, config).await;
    let base = monitor.base.clone();
    let bus = test_bus.connect().await;

    // A worker beats once, then goes silent: dead after 0.8 s, and the rule fires.
    heartbeat(&bus, "w1").await;
    let firing = eventually(WAIT, "the firing notification", || async {
        let received = receiver.received.lock().unwrap().clone();
        received.into_iter().find(|body| body["event"] == "firing")
    })
    .await;
    assert_eq!(firing["alert"]["rule"], "workers-died");
    assert_eq!(firing["alert"]["state"], "firing");
    assert_eq!(firing["alert"]["fired_value"], 1.0);
    assert!(
        firing["alert"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("workers-died: dead_workers is 1.000, above 0"),
        "{firing}"
    );
    // Delivered on the third post: two failures, retried.
    let (attempts, delivered, last_error): (i32, bool, Option<String>) = sqlx::query_as(
        "SELECT attempts, delivered_at IS NOT NULL, last_error FROM monitor.alert_deliveries \
         WHERE event = 'firing'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((attempts, delivered, last_error), (3, true, None));

    // Still dead for several evaluations: one firing alert, notified once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = alerts(&base).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "firing");
    let firings = receiver
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|body| body["event"] == "firing")
        .count();
    assert_eq!(firings, 1);

    // It comes back: the alert resolves and says so.
    heartbeat(&bus, "w1").await;
    let resolved = eventually(WAIT, "the resolved notification", || async {
        let received = receiver.received.lock().unwrap().clone();
        received
            .into_iter()
            .find(|body| body["event"] == "resolved")
    })
    .await;
    assert_eq!(resolved["alert"]["state"], "resolved");
    assert_eq!(resolved["alert"]["last_value"], 0.0);
    assert!(resolved["alert"]["resolved_at"].is_string(), "{resolved}");
    let (state, resolved_at): (String, bool) = sqlx::query_as(
        "SELECT state, resolved_at IS NOT NULL FROM monitor.alerts WHERE rule = 'workers-died'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), resolved_at), ("resolved", true));
    assert_eq!(alerts(&base).await[0]["state"], "resolved");

    monitor.stop().await;
}
