//! The router in-process on port 0 with a fresh database and bus prefix: a Complete call over
//! gRPC, its ledger row, and its UsageRecord on the bus; the same calls over the
//! OpenAI-compatible HTTP API, and its errors in OpenAI's shape.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use std::time::Duration;

use common::{rule, scripted, stop, wait_ledger_rows};

use colony_bus::subjects::USAGE_RECORDED;
use colony_proto::prost::Message as _;
use colony_proto::v1::{self, router_client::RouterClient};
use colony_router::config::Tier;
use colony_router::error::{ERROR_CLASS_METADATA, ErrorClass};
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use futures::StreamExt;
use sqlx::Row;

fn complete(deployment: &str, tier: &str, text: &str) -> tonic::Request<v1::CompleteRequest> {
    let mut request = tonic::Request::new(v1::CompleteRequest {
        tenant: "acme".into(),
        run_id: "run-1".into(),
        task_id: "task-1".into(),
        attempt: 2,
        deployment: deployment.into(),
        tier: tier.into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: text.into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    request
}

/// The router on port 0 with two scripted deployments: `canned` (mid, the default; a message
/// containing "fail" fails as external_degrading) and `thrifty` (budget).
async fn start(db: &TestDb, test_bus: &TestBus) -> (Runtime, colony_router::Handle) {
    common::start_with(db, test_bus, |config| {
        config.default_deployment = "canned".into();
        config.deployments = vec![
            scripted(
                "canned",
                Tier::Mid,
                vec![
                    rule(Some("fail"), "", Some(ErrorClass::ExternalDegrading)),
                    rule(None, "hello from the script", None),
                ],
            ),
            scripted("thrifty", Tier::Budget, vec![rule(None, "cheap", None)]),
        ];
    })
    .await
}

// Multi-threaded: `TestDb`'s drop closes its pool from a side thread, which needs this runtime
// to keep driving the pool's sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_answers_records_the_ledger_and_publishes_usage() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    let mut usage_records = bus
        .client()
        .subscribe(bus.subject(USAGE_RECORDED))
        .await
        .unwrap();
    let (runtime, handle) = start(&db, &test_bus).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", handle.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RouterClient::new(channel);

    // A successful call through the default deployment.
    let response = client
        .complete(complete("", "", "say hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response,
        v1::CompleteResponse {
            content: "hello from the script".into(),
            usage: Some(v1::Usage {
                prompt_tokens: 2,
                completion_tokens: 4,
                cost_micros_usd: 2 + 4 * 2,
            }),
            deployment: "canned".into(),
            provider: "scripted".into(),
            model: "canned-model".into(),
            finish_reason: "stop".into(),
            route_reason: "default deployment".into(),
            tool_calls: Vec::new(),
        }
    );

    wait_ledger_rows(&db, 1).await;
    let row = sqlx::query(
        "SELECT id, tenant, run_id, task_id, attempt, deployment, provider, model, outcome, \
         error_class, prompt_tokens, completion_tokens, cost_micros_usd \
         FROM router.usage_ledger ORDER BY id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let id: i64 = row.get("id");
    assert_eq!(row.get::<String, _>("tenant"), "acme");
    assert_eq!(row.get::<String, _>("run_id"), "run-1");
    assert_eq!(row.get::<String, _>("task_id"), "task-1");
    assert_eq!(row.get::<i32, _>("attempt"), 2);
    assert_eq!(row.get::<String, _>("deployment"), "canned");
    assert_eq!(row.get::<String, _>("provider"), "scripted");
    assert_eq!(row.get::<String, _>("model"), "canned-model");
    assert_eq!(row.get::<String, _>("outcome"), "ok");
    assert_eq!(row.get::<Option<String>, _>("error_class"), None);
    assert_eq!(row.get::<i64, _>("prompt_tokens"), 2);
    assert_eq!(row.get::<i64, _>("completion_tokens"), 4);
    assert_eq!(row.get::<i64, _>("cost_micros_usd"), 10);

    let message = tokio::time::timeout(Duration::from_secs(10), usage_records.next())
        .await
        .expect("a UsageRecord within 10s")
        .unwrap();
    let msg_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(colony_bus::MSG_ID))
        .map(|v| v.as_str().to_owned());
    assert_eq!(msg_id, Some(format!("usage-{id}")));
    let record = v1::UsageRecord::decode(message.payload.as_ref()).unwrap();
    assert_eq!(
        (
            record.tenant.as_str(),
            record.run_id.as_str(),
            record.task_id.as_str(),
            record.attempt
        ),
        ("acme", "run-1", "task-1", 2)
    );
    assert_eq!(
        (
            record.deployment.as_str(),
            record.provider.as_str(),
            record.model.as_str()
        ),
        ("canned", "scripted", "canned-model")
    );
    assert_eq!(record.usage.unwrap().cost_micros_usd, 10);
    assert!(record.occurred_at.is_some());

    // A tier picks its first deployment.
    let response = client
        .complete(complete("", "budget", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.deployment.as_str(), response.route_reason.as_str()),
        ("thrifty", "cheapest capable deployment of tier budget")
    );

    // A provider failure comes back classified, and is recorded too.
    let status = client
        .complete(complete("canned", "", "please fail"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status.metadata().get(ERROR_CLASS_METADATA).unwrap(),
        "external_degrading"
    );
    wait_ledger_rows(&db, 3).await;
    let row = sqlx::query(
        "SELECT outcome, error_class, deployment, tenant FROM router.usage_ledger \
         ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<String, _>("outcome"), "error");
    assert_eq!(
        row.get::<Option<String>, _>("error_class").as_deref(),
        Some("external_degrading")
    );
    assert_eq!(row.get::<String, _>("tenant"), "acme");

    // An unknown deployment is refused before any call, so nothing is recorded.
    let status = client
        .complete(complete("gpt-9", "", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("unknown deployment \"gpt-9\""),
        "{}",
        status.message()
    );
    assert_eq!(
        status.metadata().get(ERROR_CLASS_METADATA).unwrap(),
        "permanent"
    );
    wait_ledger_rows(&db, 3).await;

    stop(runtime, handle).await;
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM router.outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(unsent, 0, "every usage record was relayed by shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_speak_openai_and_record_the_ledger() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let (runtime, handle) = start(&db, &test_bus).await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        http.post(&url)
            .header("x-colony-tenant", "acme")
            .header("x-colony-run-id", "run-h")
            .json(&body)
            .send()
    };

    // A deployment by name, content as text parts.
    let response = post(serde_json::json!({
        "model": "canned",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "say hi"}]}
        ],
        "max_tokens": 16,
        "top_p": 0.9
    }))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-colony-deployment"], "canned");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "canned-model");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "hello from the script"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"]["total_tokens"],
        body["usage"]["prompt_tokens"].as_u64().unwrap() + 4
    );
    wait_ledger_rows(&db, 1).await;
    let (tenant, run_id, deployment): (String, String, String) = sqlx::query_as(
        "SELECT tenant, run_id, deployment FROM router.usage_ledger ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (tenant.as_str(), run_id.as_str(), deployment.as_str()),
        ("acme", "run-h", "canned")
    );

    // A tier as the model routes by tier.
    let response = post(serde_json::json!({
        "model": "budget", "messages": [{"role": "user", "content": "hi"}]
    }))
    .await
    .unwrap();
    assert_eq!(
        response.headers()["x-colony-route-reason"],
        "cheapest capable deployment of tier budget"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "cheap");

    // Errors come back in OpenAI's shape, with a status a client can act on.
    let user_hi = serde_json::json!([{"role": "user", "content": "hi"}]);
    for (status, body, field, expected) in [
        (
            400,
            serde_json::json!({"model": "canned", "n": 2, "messages": user_hi}),
            "param",
            "n",
        ),
        (
            400,
            serde_json::json!({"model": "gpt-9", "messages": user_hi}),
            "message",
            "unknown deployment \"gpt-9\"",
        ),
        (
            400,
            serde_json::json!({"model": "canned", "messages": [{"role": "bot", "content": "hi"}]}),
            "message",
            "messages[0].role",
        ),
        (
            503,
            serde_json::json!({"model": "canned", "messages": [{"role": "user", "content": "fail"}]}),
            "type",
            "upstream_error",
        ),
    ] {
        let response = post(body).await.unwrap();
        assert_eq!(response.status(), status);
        let body: serde_json::Value = response.json().await.unwrap();
        let got = body["error"][field].as_str().unwrap_or_default().to_owned();
        assert!(got.contains(expected), "error.{field} = {got:?}");
    }
    // Bodies that are not JSON, or too large, too.
    for (status, raw, expected) in [
        (
            400,
            b"{\"model\": ".to_vec(),
            "not a valid chat completion request",
        ),
        (
            413,
            vec![b' '; colony_router::openai_http::MAX_BODY_BYTES + 1],
            "could not be read",
        ),
    ] {
        let response = http
            .post(&url)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{message}");
    }

    // Two answered calls and the failed one are in the ledger; refused requests are not.
    wait_ledger_rows(&db, 3).await;
    stop(runtime, handle).await;
}
