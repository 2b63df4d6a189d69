//! The REST API in-process against real PostgreSQL and NATS: what a client sees.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_orchestrator::Config;
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Api {
    url: String,
    client: reqwest::Client,
    runtime: Runtime,
    _db: TestDb,
    _bus: TestBus,
}

async fn start() -> Api {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let config = Config {
        database: db.config(),
        bus: bus.config(),
        http: colony_orchestrator::config::HttpConfig {
            addr: "127.0.0.1:0".into(),
            max_body_bytes: 4096,
        },
        grpc: colony_orchestrator::config::GrpcConfig {
            addr: "127.0.0.1:0".into(),
        },
        runs: colony_orchestrator::config::RunsConfig {
            max_goal_bytes: 1024,
            ..Default::default()
        },
        ..Config::default()
    };
    let runtime = Runtime::new(CancellationToken::new());
    let handle = colony_orchestrator::spawn(config, &runtime).await.unwrap();
    Api {
        url: format!("http://{}", handle.http_addr),
        client: reqwest::Client::new(),
        runtime,
        _db: db,
        _bus: bus,
    }
}

impl Api {
    async fn post_raw(&self, body: &str) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}/v1/runs", self.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.runtime.shutdown.cancel();
    }
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_good_input_a_run() {
    let api = start().await;
    for (body, status, needle) in [
        ("{not json", 400, "invalid JSON"),
        ("{}", 400, "goal is required"),
        (r#"{"goal": "   "}"#, 400, "goal is required"),
        (r#"{"goal": 42}"#, 400, "invalid JSON"),
        (
            &json!({"goal": "x".repeat(2000)}).to_string(),
            400,
            "limit is 1024",
        ),
        (
            &json!({"goal": "x".repeat(5000)}).to_string(),
            413,
            "larger than 4096",
        ),
    ] {
        let (got, error) = api.post_raw(body).await;
        assert_eq!(got, status, "{body:.40}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body:.40}: {message}");
    }

    let (status, run) = api.post_raw(r#"{"goal": "say hello"}"#).await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["status"], "running");
    assert_eq!(run["tenant"], "default");
    let id = run["id"].as_str().unwrap();
    let fetched: Value = api
        .client
        .get(format!("{}/v1/runs/{id}", api.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["goal"], "say hello");
    assert_eq!(fetched["tasks"][0]["state"], "queued");

    // Another tenant cannot see it; a bad tenant header is refused.
    let other = api
        .client
        .get(format!("{}/v1/runs/{id}", api.url))
        .header("x-colony-tenant", "someone-else")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
    let bad = api
        .client
        .post(format!("{}/v1/runs", api.url))
        .header("x-colony-tenant", "no spaces please")
        .json(&json!({"goal": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);

    let metrics = api
        .client
        .get(format!("{}/metrics", api.url))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("colony_orchestrator_rejected_requests_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_dial_chooses_a_topology_a_request_can_override() {
    let api = start().await;
    let (status, run) = api.post_raw(r#"{"goal": "say hello"}"#).await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["topology"]["topology"], "monolith", "{run}");
    assert_eq!(run["topology"]["overridden"], false, "{run}");
    assert_eq!(run["topology"]["inputs"]["goal_tokens"], 3, "{run}");
    assert_eq!(run["failure_policy"], "fail_fast");
    assert_eq!(run["tasks"][0]["role"], "generalist");

    let (status, run) = api
        .post_raw(r#"{"goal": "say hello", "topology": "hybrid", "failure_policy": "continue"}"#)
        .await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["topology"]["overridden"], true, "{run}");
    assert_eq!(run["failure_policy"], "continue");
    let states: Vec<&str> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "pending", "pending"], "{run}");
    assert_eq!(run["tasks"][1]["depends_on"][0], run["tasks"][0]["id"]);

    let (status, run) = api
        .post_raw(r#"{"goal": "say hello", "topology": "swarm"}"#)
        .await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["tasks"][0]["role"], "planner", "{run}");
    assert!(run["plan"]["source"].is_null(), "{run}");

    for body in [
        r#"{"goal": "x", "topology": "mesh"}"#,
        r#"{"goal": "x", "failure_policy": "sometimes"}"#,
    ] {
        let (status, error) = api.post_raw(body).await;
        assert_eq!(status, 400, "{body}: {error}");
    }
}

#[tokio::test]
async fn a_run_may_carry_its_plan_validated_like_a_planners() {
    let api = start().await;
    let (status, run) = api
        .post_raw(
            r#"{"goal": "ship it", "plan": [
                {"id": "build", "role": "noop", "instructions": "build"},
                {"id": "test", "role": "generalist", "instructions": "test it", "depends_on": ["build"]}
            ]}"#,
        )
        .await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["topology"]["topology"], "hybrid", "{run}");
    assert_eq!(run["topology"]["overridden"], true, "{run}");
    assert_eq!(
        run["topology"]["reason"],
        "the request gave its plan (2 tasks)"
    );
    let roles: Vec<&str> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["noop", "generalist"], "{run}");
    assert_eq!(run["tasks"][1]["depends_on"][0], run["tasks"][0]["id"]);

    for (body, says) in [
        (
            r#"{"goal": "x", "plan": [{"id": "a", "role": "wizard", "instructions": "x"}]}"#,
            "wizard",
        ),
        (
            r#"{"goal": "x", "plan": [
                {"id": "a", "role": "noop", "instructions": "x", "depends_on": ["b"]},
                {"id": "b", "role": "noop", "instructions": "x", "depends_on": ["a"]}]}"#,
            "cycle",
        ),
        (r#"{"goal": "x", "plan": []}"#, "no tasks"),
    ] {
        let (status, error) = api.post_raw(body).await;
        assert_eq!(status, 400, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("invalid plan: "), "{error}");
        assert!(message.contains(says), "{says}: {error}");
    }
}
