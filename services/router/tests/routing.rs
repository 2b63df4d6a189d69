//! Routing and resilience end to end, over the OpenAI-compatible HTTP API and gRPC: fallback
//! when a deployment fails, the breaker opening and recovering, the router's own rate limits,
//! the privacy and context-window rules, tenant keys, `/v1/models`, and streams.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use std::time::Duration;

use colony_proto::v1::{self, router_client::RouterClient};
use colony_router::config::{Capability, Privacy, RateLimits, TenantConfig, Tier};
use colony_router::error::ErrorClass;
use colony_testkit::{TestBus, TestDb};
use common::{ledger_rows, rule, rule_from, scripted, start_with, stop, wait_ledger_rows};
use futures::StreamExt as _;
use secrecy::SecretString;
use serde_json::{Value, json};

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new().post(url).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deployment_falls_back_and_its_breaker_opens_then_recovers() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut flaky = scripted(
            "flaky",
            Tier::Mid,
            vec![
                rule(Some("down"), "", Some(ErrorClass::ExternalDegrading)),
                rule(None, "flaky answers", None),
            ],
        );
        flaky.input_price_per_mtok = 0.1;
        flaky.fallbacks = vec!["steady".into()];
        config.deployments = vec![
            flaky,
            scripted(
                "steady",
                Tier::Frontier,
                vec![rule(None, "steady answers", None)],
            ),
        ];
        config.default_deployment = "flaky".into();
        config.resilience.breaker.failure_threshold = 2;
        config.resilience.breaker.open_duration = Duration::from_millis(500);
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);

    // Each failure of flaky falls back to steady, and says so.
    for _ in 0..2 {
        let (status, headers, body) =
            post(&url, &[], json!({"model": "mid", "messages": user("down")})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-colony-deployment"], "steady");
        let reason = headers["x-colony-route-reason"].to_str().unwrap();
        assert!(
            reason
                .contains("fallback configured for flaky (after flaky failed: external_degrading)"),
            "{reason}"
        );
        assert_eq!(body["choices"][0]["message"]["content"], "steady answers");
    }
    // Two failures in a row opened flaky's breaker: even a request it could answer skips it,
    // without a provider call.
    // Two calls, each a failed flaky call and a steady one.
    wait_ledger_rows(&db, 4).await;
    let (status, headers, _) =
        post(&url, &[], json!({"model": "mid", "messages": user("hi")})).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-colony-deployment"], "steady");
    wait_ledger_rows(&db, 5).await;
    let flaky_calls: i64 =
        sqlx::query_scalar("SELECT count(*) FROM router.usage_ledger WHERE deployment = 'flaky'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        flaky_calls, 2,
        "the open breaker kept the third call from flaky"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", handle.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("colony_router_breaker_state{deployment=\"flaky\"} 2"),
        "breaker state not exported as open"
    );

    // After the open period a probe goes through; its success closes the breaker.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, headers, _) =
        post(&url, &[], json!({"model": "mid", "messages": user("hi")})).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-colony-deployment"], "flaky");
    let (_, headers, _) = post(&url, &[], json!({"model": "mid", "messages": user("hi")})).await;
    assert_eq!(headers["x-colony-deployment"], "flaky");

    // By name, a failure that should not fall back (the request's own fault) does not.
    let (status, _, body) = post(
        &url,
        &[],
        json!({"model": "flaky", "messages": [{"role": "tool", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_own_rate_limits_answer_429_with_retry_after() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut limited = scripted("limited", Tier::Mid, vec![rule(None, "ok", None)]);
        limited.limits = RateLimits {
            requests_per_minute: Some(2),
            tokens_per_minute: None,
        };
        config.deployments = vec![limited];
        config.default_deployment = "limited".into();
        config.resilience.queue.capacity = 0;
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    for _ in 0..2 {
        let (status, _, _) = post(
            &url,
            &[],
            json!({"model": "limited", "messages": user("hi")}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, headers, body) = post(
        &url,
        &[],
        json!({"model": "limited", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    // One request per 30 s refills.
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    wait_ledger_rows(&db, 2).await;
    assert_eq!(
        ledger_rows(&db).await,
        2,
        "the refused call reached no provider"
    );

    // Over gRPC the same refusal is RESOURCE_EXHAUSTED with the retry-after in metadata.
    let mut client = RouterClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .unwrap();
    let status = client
        .complete(v1::CompleteRequest {
            tenant: "acme".into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.metadata().get("colony-retry-after-ms").is_some());
    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_capabilities_and_context_window_rules_hold_end_to_end() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut cloud = scripted("cloud", Tier::Mid, vec![rule(None, "from the cloud", None)]);
        cloud.privacy = Some(Privacy::External);
        cloud.input_price_per_mtok = 0.01;
        cloud.capabilities = vec![Capability::Tools, Capability::Json];
        cloud.context_window = 100_000;
        let mut local = scripted("local", Tier::Mid, vec![rule(None, "from here", None)]);
        local.context_window = 2000;
        local.max_output_tokens = 500;
        config.deployments = vec![cloud, local];
        config.default_deployment = "cloud".into();
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let local_only = [("x-colony-local-only", "true")];

    let (status, headers, _) = post(
        &url,
        &local_only,
        json!({"model": "mid", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-colony-deployment"], "local");
    let (status, _, body) = post(
        &url,
        &local_only,
        json!({"model": "cloud", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "no_capable_deployment");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cloud is external and the request is local-only"),
        "{body}"
    );

    // Local-only data that needs tools nobody local has: refused, never sent out.
    let tools = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]);
    let (status, _, body) = post(
        &url,
        &local_only,
        json!({"model": "mid", "messages": user("hi"), "tools": tools}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Without the local-only mark the cheaper capable deployment takes it.
    let (status, headers, _) = post(
        &url,
        &[],
        json!({"model": "mid", "messages": user("hi"), "tools": tools}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-colony-deployment"], "cloud");

    // A prompt beyond local's window, local-only: nothing can take it, and the error says
    // why for each deployment.
    let long = "word ".repeat(3000);
    let (status, _, body) = post(
        &url,
        &local_only,
        json!({"model": "mid", "messages": user(&long)}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("local's window of 2000 tokens is smaller"),
        "{message}"
    );
    // By name, a window too small is OpenAI's context error.
    let (status, _, body) = post(
        &url,
        &[],
        json!({"model": "local", "messages": user(&long)}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    // By tier, it goes to the deployment whose window fits.
    let (status, headers, _) =
        post(&url, &[], json!({"model": "mid", "messages": user(&long)})).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-colony-deployment"], "cloud");
    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_keys_guard_the_api_and_models_lists_the_catalogue() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        config.deployments = vec![scripted("canned", Tier::Mid, vec![rule(None, "ok", None)])];
        config.default_deployment = "canned".into();
        config.tenants = vec![TenantConfig {
            name: "acme".into(),
            api_key_env: "UNUSED".into(),
            api_key: Some(SecretString::from("sk-acme-123")),
            budget_usd: None,
        }];
    })
    .await;
    let base = format!("http://{}/v1", handle.http_addr);
    let url = format!("{base}/chat/completions");
    let (status, _, body) = post(
        &url,
        &[],
        json!({"model": "canned", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, _, _) = post(
        &url,
        &[("authorization", "Bearer sk-wrong")],
        json!({"model": "canned", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = post(
        &url,
        &[
            ("authorization", "Bearer sk-acme-123"),
            ("x-colony-tenant", "other"),
        ],
        json!({"model": "canned", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 200);
    wait_ledger_rows(&db, 1).await;
    let tenant: String = sqlx::query_scalar("SELECT tenant FROM router.usage_ledger")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tenant, "acme", "the key decides the tenant, not the header");

    let http = reqwest::Client::new();
    let models: Value = http
        .get(format!("{base}/models"))
        .bearer_auth("sk-acme-123")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "canned");
    assert_eq!(models["data"][0]["colony"]["privacy"], "local");
    assert_eq!(models["data"][0]["colony"]["context_window"], 8192);
    let response = http
        .post(format!("{base}/embeddings"))
        .bearer_auth("sk-acme-123")
        .json(&json!({"model": "x", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    stop(runtime, handle).await;
}

/// The body of an SSE response as its `data:` payloads.
async fn sse_data(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_speak_openai_sse_and_grpc_and_are_accounted() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut broken = scripted(
            "broken",
            Tier::Mid,
            vec![rule(None, "", Some(ErrorClass::Transient))],
        );
        broken.input_price_per_mtok = 0.0;
        broken.output_price_per_mtok = 0.0;
        config.deployments = vec![
            broken,
            scripted(
                "canned",
                Tier::Mid,
                vec![rule(None, "streamed words here", None)],
            ),
        ];
        config.default_deployment = "canned".into();
        config.resilience.retry.max_attempts = 1;
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let response = reqwest::Client::new()
        .post(&url)
        .json(&json!({
            "model": "mid",
            "messages": user("hi"),
            "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    // The cheaper deployment failed before its first event: the stream fell back.
    assert_eq!(response.headers()["x-colony-deployment"], "canned");
    let data = sse_data(response).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "streamed words here");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);

    // gRPC: deltas, then one done chunk with usage and cost.
    let mut client = RouterClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .unwrap();
    let mut stream = client
        .complete_stream(v1::CompleteRequest {
            tenant: "acme".into(),
            deployment: "canned".into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut done = None;
    while let Some(chunk) = stream.next().await {
        match chunk.unwrap().chunk.unwrap() {
            v1::complete_chunk::Chunk::Delta(delta) => text.push_str(&delta),
            v1::complete_chunk::Chunk::Done(response) => done = Some(response),
            v1::complete_chunk::Chunk::ToolCall(_) => panic!("no tools here"),
        }
    }
    let done = done.unwrap();
    assert_eq!(text, "streamed words here");
    assert_eq!(done.content, text);
    assert_eq!(done.usage.unwrap().completion_tokens, 3);

    // The failed attempt and both streams are in the ledger, in the order they were made.
    // The writer commits in batches off the request path, with no bound on how soon (a failed
    // write is retried with backoff of up to 5 s), so waiting for the rows under a deadline
    // races it; an orderly stop writes every queued entry, so the rows are read after it.
    stop(runtime, handle).await;
    let outcomes: Vec<(String, String)> =
        sqlx::query_as("SELECT deployment, outcome FROM router.usage_ledger ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        outcomes,
        [
            ("broken".to_owned(), "error".to_owned()),
            ("canned".to_owned(), "ok".to_owned()),
            ("canned".to_owned(), "ok".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_a_first_token_in_time_falls_back() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut slow: colony_router::config::DeploymentConfig = scripted("slow", Tier::Mid, vec![]);
        slow.script = vec![rule_from(json!({"reply": "late", "delay": "3s"}))];
        slow.input_price_per_mtok = 0.0;
        slow.first_token_timeout = Some(Duration::from_millis(200));
        config.deployments = vec![
            slow,
            scripted("fast", Tier::Mid, vec![rule(None, "on time", None)]),
        ];
        config.default_deployment = "slow".into();
        config.resilience.retry.max_attempts = 1;
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let response = reqwest::Client::new()
        .post(&url)
        .json(&json!({"model": "mid", "messages": user("hi"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-colony-deployment"], "fast");
    let reason = response.headers()["x-colony-route-reason"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("after slow failed: transient"), "{reason}");
    let text: String = sse_data(response)
        .await
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "on time");
    wait_ledger_rows(&db, 2).await;
    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_round_trip_in_openai_shape_streamed_or_not() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut agent = scripted("agent", Tier::Mid, vec![]);
        agent.capabilities = vec![Capability::Tools];
        agent.script = vec![
            rule_from(json!({"contains": "weather", "tool_calls": [
                {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}
            ]})),
            rule(None, "It is sunny in Oslo.", None),
        ];
        config.deployments = vec![agent];
        config.default_deployment = "agent".into();
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
    }}]);
    let (status, _, body) = post(
        &url,
        &[],
        json!({"model": "agent", "messages": user("weather in Oslo?"), "tools": tools}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
    let id = call["id"].as_str().unwrap().to_owned();

    // The tool's result goes back as a tool message answering that call.
    let (status, _, body) = post(
        &url,
        &[],
        json!({"model": "agent", "tools": tools, "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": id, "content": "sunny"},
            {"role": "user", "content": "so?"}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "It is sunny in Oslo."
    );

    // Streamed, the call arrives as tool_calls deltas and a tool_calls finish.
    let response = reqwest::Client::new()
        .post(&url)
        .json(&json!({"model": "agent", "messages": user("weather?"), "tools": tools, "stream": true}))
        .send()
        .await
        .unwrap();
    let chunks: Vec<Value> = sse_data(response)
        .await
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let arguments: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"city\":\"Oslo\"}");
    assert!(
        chunks.iter().any(
            |c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
        )
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // A tool message that answers no call id is refused.
    let (status, _, body) = post(
        &url,
        &[],
        json!({"model": "agent", "messages": [{"role": "tool", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tool_call_id")
    );
    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_calls_overspend_a_tiny_budget_by_at_most_one_reservation() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut priced = scripted("priced", Tier::Mid, vec![]);
        priced.script = vec![rule_from(
            json!({"reply": "four words of answer", "delay": "20ms"}),
        )];
        // $10 / $100 per million tokens: a call reserves ~ 4 prompt tokens × 10 + 20 × 100.
        priced.input_price_per_mtok = 10.0;
        priced.output_price_per_mtok = 100.0;
        config.deployments = vec![priced];
        config.default_deployment = "priced".into();
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let limit: u64 = 5_000;
    let calls = (0..100).map(|_| {
        let url = url.clone();
        async move {
            post(
                &url,
                &[
                    ("x-colony-run-id", "run-tiny"),
                    ("x-colony-run-budget-micros", "5000"),
                ],
                json!({"model": "priced", "messages": user("go"), "max_tokens": 20}),
            )
            .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|(status, ..)| *status == 200).count();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(status, ..)| *status == 402)
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(
        ok + refused.len(),
        100,
        "every call answered or refused for budget"
    );
    assert!(ok >= 1, "the budget covers at least one call");
    let message = refused[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("run budget of \"run-tiny\""), "{message}");
    assert_eq!(refused[0]["error"]["code"], "budget_exceeded");

    wait_ledger_rows(&db, i64::try_from(ok).unwrap()).await;
    let (limit_db, reserved, spent): (i64, i64, i64) = sqlx::query_as(
        "SELECT limit_micros, reserved_micros, spent_micros FROM router.budgets \
         WHERE scope = 'run' AND key = 'run-tiny'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let ledger_cost: i64 =
        sqlx::query_scalar("SELECT sum(cost_micros_usd)::bigint FROM router.usage_ledger")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(limit_db, i64::try_from(limit).unwrap());
    assert_eq!(reserved, 0, "every reservation was settled");
    assert_eq!(
        spent, ledger_cost,
        "the budget was charged what the ledger says"
    );
    // One reservation is at most 4 × 10 + 20 × 100 = 2040 micro-USD (the prompt estimate
    // rounds up): reserving never lets the run spend past its limit plus one of them.
    assert!(spent <= 5_000 + 2_040, "spent {spent}");
    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_stops_the_provider_and_the_call_is_still_accounted() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut slow = scripted("slow", Tier::Mid, vec![]);
        slow.script = vec![rule_from(json!({
            "reply": "one two three four five six seven eight nine ten",
            "piece_delay": "500ms"
        }))];
        config.deployments = vec![slow];
        config.default_deployment = "slow".into();
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let started = std::time::Instant::now();
    let mut response = reqwest::Client::new()
        .post(&url)
        .json(&json!({"model": "slow", "messages": user("hi"), "stream": true}))
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("one"));
    drop(response);
    // The whole answer would take about 5 s; the call ends when the router notices the client
    // is gone, and its ledger row counts what was produced.
    wait_ledger_rows(&db, 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let completion_tokens: i64 =
        sqlx::query_scalar("SELECT completion_tokens FROM router.usage_ledger")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        (1..10).contains(&completion_tokens),
        "{completion_tokens} of 10 words"
    );
    stop(runtime, handle).await;
}

/// An upstream answering every request with `status` and `body`, until the returned runtime
/// is shut down.
async fn upstream(status: u16, body: &'static str) -> (String, colony_runtime::Runtime) {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || async move {
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                body,
            )
        }),
    );
    let runtime = colony_runtime::Runtime::new(tokio_util::sync::CancellationToken::new());
    let listener = colony_runtime::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    colony_runtime::serve_http(&runtime, listener, app);
    (base_url, runtime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bodies_and_server_errors_from_real_upstreams_fall_back() {
    let (garbage_url, garbage) = upstream(200, "<html>definitely not json").await;
    let (failing_url, failing) = upstream(500, r#"{"error": {"message": "boom"}}"#).await;
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let http = |name: &str, url: &str| colony_router::config::DeploymentConfig {
            base_url: Some(url.to_owned()),
            ..colony_router::config::DeploymentConfig::new(
                name,
                colony_router::config::ProviderKind::OpenAi,
                "model-x",
            )
        };
        let mut garbage = http("garbage", &garbage_url);
        garbage.fallbacks = vec!["failing".into(), "canned".into()];
        config.deployments = vec![
            garbage,
            http("failing", &failing_url),
            scripted("canned", Tier::Mid, vec![rule(None, "safe answer", None)]),
        ];
        config.default_deployment = "garbage".into();
        config.resilience.retry.max_attempts = 1;
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", handle.http_addr);
    let (status, headers, body) = post(
        &url,
        &[],
        json!({"model": "garbage", "messages": user("hi")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "safe answer");
    assert_eq!(headers["x-colony-deployment"], "canned");
    let reason = headers["x-colony-route-reason"].to_str().unwrap();
    assert!(
        reason.contains("fallback configured for garbage (after failing failed: transient)"),
        "{reason}"
    );
    wait_ledger_rows(&db, 3).await;
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT deployment, outcome, error_class FROM router.usage_ledger ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (
                "garbage".to_owned(),
                "error".to_owned(),
                Some("external_degrading".to_owned())
            ),
            (
                "failing".to_owned(),
                "error".to_owned(),
                Some("transient".to_owned())
            ),
            ("canned".to_owned(), "ok".to_owned(), None),
        ]
    );
    stop(runtime, handle).await;
    garbage.shutdown.cancel();
    failing.shutdown.cancel();
}
