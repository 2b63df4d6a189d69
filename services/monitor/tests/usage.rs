//! Usage summaries from real usage events on the bus: `/v1/usage` by tenant, model,
//! deployment and run sums them correctly, counts a redelivered event once, filters by tenant
//! and time, drops hours past retention, and answers a bad query with 400 and a JSON error.
//! One test per process: the metrics recorder is process-wide.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use colony_bus::{Bus, subjects};
use colony_monitor::Config;
use colony_proto::prost::Message as _;
use colony_proto::v1;
use colony_testkit::{TestBus, TestDb, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// One model call, `ago` before now (`None`: an event without a time).
fn call(
    tenant: &str,
    run_id: &str,
    deployment: &str,
    model: &str,
    tokens: (u64, u64),
    cost_micros_usd: u64,
    ago: Option<Duration>,
) -> v1::UsageRecord {
    v1::UsageRecord {
        tenant: tenant.into(),
        run_id: run_id.into(),
        task_id: "t1".into(),
        attempt: 1,
        deployment: deployment.into(),
        provider: "openai".into(),
        model: model.into(),
        usage: Some(v1::Usage {
            prompt_tokens: tokens.0,
            completion_tokens: tokens.1,
            cost_micros_usd,
        }),
        latency_ms: 100,
        occurred_at: ago.map(|ago| colony_proto::timestamp(SystemTime::now() - ago)),
    }
}

/// Publishes `payload` as a usage event with a fresh message id: the same payload published
/// twice reaches the monitor twice, as a redelivery would.
async fn publish(bus: &Bus, payload: &Bytes) {
    bus.publish_bytes(
        subjects::USAGE_RECORDED,
        &uuid::Uuid::new_v4().to_string(),
        None,
        payload.clone(),
    )
    .await
    .unwrap();
}

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn usage(base: &str, query: &str) -> Vec<Value> {
    let (status, body) = get(&format!("{base}/v1/usage?{query}")).await;
    assert_eq!(status, 200, "{query}: {body}");
    body["rows"].as_array().unwrap().clone()
}

/// `(key values…, calls, prompt, completion, cost µUSD)` of each row, in the answer's order.
fn sums(rows: &[Value], keys: &[&str]) -> Vec<Value> {
    rows.iter()
        .map(|row| {
            let mut sum: Vec<Value> = keys.iter().map(|key| row[*key].clone()).collect();
            for field in [
                "calls",
                "prompt_tokens",
                "completion_tokens",
                "cost_micros_usd",
            ] {
                sum.push(row[field].clone());
            }
            Value::Array(sum)
        })
        .collect()
}

#[tokio::test]
async fn usage_events_sum_by_tenant_model_deployment_and_run() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let config = Config {
        sweep_interval: Duration::from_millis(100),
        usage_retention: Duration::from_secs(4 * 3600),
        ..Config::default()
    };
    let monitor = common::start(&db, &test_bus, config).await;
    let base = monitor.base.clone();
    let bus = test_bus.connect().await;

    let minute = Duration::from_secs(60);
    let now = Some(Duration::ZERO);
    let calls = [
        // acme, run r1: two calls on gpt through two deployments, one on claude.
        call("acme", "r1", "gpt-azure", "gpt", (100, 10), 1_000, now),
        call(
            "acme",
            "r1",
            "gpt-openai",
            "gpt",
            (200, 20),
            2_000,
            Some(minute),
        ),
        call(
            "acme",
            "r1",
            "claude",
            "claude",
            (50, 5),
            500,
            Some(2 * minute),
        ),
        // acme, run r2: one call on gpt, two minutes ago.
        call(
            "acme",
            "r2",
            "gpt-azure",
            "gpt",
            (300, 30),
            3_000,
            Some(2 * minute),
        ),
        // globex, run g1: an expensive call, three hours ago (within retention).
        call(
            "globex",
            "g1",
            "claude",
            "claude",
            (10, 1),
            10_000,
            Some(180 * minute),
        ),
    ];
    let payloads: Vec<Bytes> = calls
        .iter()
        .map(|call| Bytes::from(call.encode_to_vec()))
        .collect();
    for payload in &payloads {
        publish(&bus, payload).await;
    }
    // Redelivered: the same call again, counted once.
    publish(&bus, &payloads[0]).await;
    // An event without its time cannot be told from a redelivery: each arrival counts.
    let untimed =
        Bytes::from(call("initech", "i1", "gpt-azure", "gpt", (1, 1), 1, None).encode_to_vec());
    publish(&bus, &untimed).await;
    publish(&bus, &untimed).await;
    // Past retention (4 h; an hour is removed once it ended that long ago): the sweep removes it.
    let old = call(
        "old-corp",
        "o1",
        "gpt-azure",
        "gpt",
        (1, 1),
        1,
        Some(420 * minute),
    );
    publish(&bus, &Bytes::from(old.encode_to_vec())).await;

    // Every arrival handled (counted once applied), then the old call swept.
    eventually(WAIT, "every usage event handled", || async {
        let (_, status) = get(&format!("{base}/v1/status")).await;
        (status["events"]["usage.recorded"] == 9).then_some(())
    })
    .await;
    let by_tenant = eventually(WAIT, "the old call removed", || async {
        let rows = usage(&base, "by=tenant").await;
        (!rows.iter().any(|row| row["tenant"] == "old-corp")).then_some(rows)
    })
    .await;
    assert_eq!(
        sums(&by_tenant, &["tenant"]),
        [
            json!(["globex", 1, 10, 1, 10_000]),
            json!(["acme", 4, 650, 65, 6_500]),
            json!(["initech", 2, 2, 2, 2]),
        ]
    );
    assert_eq!(by_tenant[1]["cost_usd"], 0.0065);
    assert!(by_tenant[1]["first_at"].is_string() && by_tenant[1]["last_at"].is_string());
    assert!(by_tenant[0].get("run_id").is_none(), "{}", by_tenant[0]);

    assert_eq!(
        sums(&usage(&base, "by=model").await, &["model"]),
        [
            json!(["claude", 2, 60, 6, 10_500]),
            json!(["gpt", 5, 602, 62, 6_002]),
        ]
    );
    assert_eq!(
        sums(
            &usage(&base, "by=deployment&tenant=acme").await,
            &["deployment"]
        ),
        [
            json!(["gpt-azure", 2, 400, 40, 4_000]),
            json!(["gpt-openai", 1, 200, 20, 2_000]),
            json!(["claude", 1, 50, 5, 500]),
        ]
    );
    assert_eq!(
        sums(&usage(&base, "by=run").await, &["tenant", "run_id"]),
        [
            json!(["globex", "g1", 1, 10, 1, 10_000]),
            json!(["acme", "r1", 3, 350, 35, 3_500]),
            json!(["acme", "r2", 1, 300, 30, 3_000]),
            json!(["initech", "i1", 2, 2, 2, 2]),
        ]
    );
    // Since an hour ago (rounded down to the hour): globex's call three hours ago is left out.
    let since = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let recent = usage(&base, &format!("by=tenant&since={since}")).await;
    assert_eq!(
        sums(&recent, &["tenant"]),
        [
            json!(["acme", 4, 650, 65, 6_500]),
            json!(["initech", 2, 2, 2, 2])
        ]
    );
    assert_eq!(usage(&base, "by=run&limit=1").await.len(), 1);
    assert_eq!(usage(&base, "tenant=nobody").await, Vec::<Value>::new());

    // Bad queries: 400 with a JSON error that says what is wrong.
    for (query, expected) in [
        ("by=colour", "by must be tenant, model, deployment or run"),
        ("by=run&since=yesterday", "since must be an RFC 3339 time"),
        ("limit=0", "limit must be a whole number from 1 to 1000"),
        ("order=cost", "unknown parameter \"order\""),
    ] {
        let (status, body) = get(&format!("{base}/v1/usage?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{query}: {message}");
    }

    // The redelivery moved no counter either.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        common::series(&metrics, "colony_monitor_usage_duplicates_total"),
        Some(1.0)
    );
    assert_eq!(
        common::series(
            &metrics,
            r#"colony_monitor_tokens_total{direction="prompt"}"#
        ),
        Some(100.0 + 200.0 + 50.0 + 300.0 + 10.0 + 2.0 + 1.0)
    );

    monitor.stop().await;
}
