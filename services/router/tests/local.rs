//! The embedded chat model as a router deployment, against the real SmolLM2 GGUF (`make models`
//! fetches it): generated text and exact usage over gRPC and the OpenAI-compatible API, privacy
//! routing, streaming, stop sequences, seeded sampling, and a full queue refused as a rate limit.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use common::{stop, wait_ledger_rows};

use colony_inference::chat::{ChatConfig, ChatMessage, ChatModel};
use colony_inference::{DEFAULT_CHAT_MODEL, workspace_models_dir};
use colony_proto::v1::{self, router_client::RouterClient};
use colony_router::config::{Capability, DeploymentConfig, ProviderKind, Tier};
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use serde_json::{Value, json};

fn chat_config(queue_capacity: usize) -> ChatConfig {
    let path = workspace_models_dir().join(DEFAULT_CHAT_MODEL);
    assert!(
        path.is_file(),
        "{} is missing: run `make models`",
        path.display()
    );
    // One thread: tests run side by side, and llama.cpp's threads spin while they wait.
    ChatConfig {
        threads: 1,
        context_tokens: 1024,
        queue_capacity,
        ..ChatConfig::new(path)
    }
}

fn local_deployment(queue_capacity: usize) -> DeploymentConfig {
    DeploymentConfig {
        tier: Tier::Budget,
        context_window: 1024,
        max_output_tokens: 900,
        capabilities: vec![Capability::Streaming],
        local: Some(chat_config(queue_capacity)),
        ..DeploymentConfig::new("smol", ProviderKind::Local, "smollm2-135m-instruct")
    }
}

/// The router with the local model as its default, beside an external deployment that is
/// never reachable (so a request that went there would fail).
async fn start(
    db: &TestDb,
    bus: &TestBus,
    queue_capacity: usize,
) -> (Runtime, colony_router::Handle) {
    common::start_with(db, bus, |config| {
        config.default_deployment = "smol".into();
        config.resilience.retry.max_attempts = 1;
        config.deployments = vec![
            local_deployment(queue_capacity),
            DeploymentConfig {
                tier: Tier::Budget,
                base_url: Some("http://127.0.0.1:9/v1".into()),
                capabilities: vec![Capability::Streaming],
                ..DeploymentConfig::new("remote", ProviderKind::OpenAi, "gpt-test")
            },
        ];
    })
    .await
}

/// POSTs `body` to `path` of the router's HTTP API as tenant acme.
async fn send(addr: std::net::SocketAddr, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .header("x-colony-tenant", "acme")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn chat(handle: &colony_router::Handle, body: Value) -> (reqwest::StatusCode, Value) {
    let response = send(handle.http_addr, "/v1/chat/completions", &body).await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// The text of a streamed answer: its `content` deltas joined, and the usage chunk.
async fn chat_streamed(handle: &colony_router::Handle, mut body: Value) -> (String, Value) {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = send(handle.http_addr, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let mut content = String::new();
    let mut usage = Value::Null;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(piece);
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    (content, usage)
}

fn question(text: &str, max_tokens: u32) -> Value {
    json!({
        "model": "smol",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text}
        ],
        "max_tokens": max_tokens
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_model_answers_over_grpc_with_exact_usage_and_privacy_routing() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start(&db, &bus, 4).await;
    let mut client = RouterClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .unwrap();
    let messages = vec![
        v1::ChatMessage {
            role: "system".into(),
            content: "You are a helpful assistant.".into(),
            ..Default::default()
        },
        v1::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
            ..Default::default()
        },
    ];
    // local_only with no deployment named: only the local model may take it.
    let response = client
        .complete(v1::CompleteRequest {
            tenant: "acme".into(),
            messages: messages.clone(),
            max_tokens: 24,
            local_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.deployment, "smol");
    assert_eq!(response.provider, "local");
    assert!(
        response
            .content
            .chars()
            .filter(|c| c.is_alphabetic())
            .count()
            > 3,
        "generated text: {:?}",
        response.content
    );

    // The usage is the model's own count of the prompt it read and the tokens it wrote.
    let model = ChatModel::load(&chat_config(1)).unwrap();
    let prompt = model
        .render_prompt(&[
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new("user", "What is the capital of France?"),
        ])
        .unwrap();
    let usage = response.usage.unwrap();
    assert_eq!(
        usage.prompt_tokens as usize,
        model.tokenize(&prompt, true).len()
    );
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 24);

    wait_ledger_rows(&db, 1).await;
    let (prompt_tokens, completion_tokens): (i64, i64) =
        sqlx::query_as("SELECT prompt_tokens, completion_tokens FROM router.usage_ledger")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(prompt_tokens, i64::try_from(usage.prompt_tokens).unwrap());
    assert_eq!(
        completion_tokens,
        i64::try_from(usage.completion_tokens).unwrap()
    );

    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_and_whole_answers_agree_and_stop_and_seed_work_over_http() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start(&db, &bus, 4).await;

    let body = question("Name the planets of the solar system.", 32);
    let (status, whole) = chat(&handle, body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!text.trim().is_empty());
    let (streamed, usage) = chat_streamed(&handle, body.clone()).await;
    assert_eq!(streamed, text, "greedy: the stream carries the same text");
    assert_eq!(
        usage["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    assert_eq!(usage["prompt_tokens"], whole["usage"]["prompt_tokens"]);

    // A stop sequence from the middle of the answer cuts it there.
    let word = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 4)
        .nth(1)
        .unwrap()
        .to_owned();
    let mut stopped_body = body.clone();
    stopped_body["stop"] = json!([word]);
    let (_, stopped) = chat(&handle, stopped_body).await;
    let cut = text.find(&word).unwrap();
    assert_eq!(
        stopped["choices"][0]["message"]["content"],
        json!(&text[..cut])
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Sampling with a seed repeats itself.
    let mut sampled = question("Invent a name for a cat.", 12);
    sampled["temperature"] = json!(1.0);
    sampled["top_p"] = json!(0.9);
    sampled["seed"] = json!(1234);
    let (_, a) = chat(&handle, sampled.clone()).await;
    let (_, b) = chat(&handle, sampled).await;
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );

    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_local_queue_is_a_rate_limit_and_a_gone_client_frees_the_model() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start(&db, &bus, 1).await;
    let addr = handle.http_addr;

    // A long streamed answer occupies the model (counting to 1,000 takes far longer than
    // this test) ...
    let mut long_body = question("Count from 1 to 1000, one number per line.", 900);
    long_body["stream"] = json!(true);
    let mut long = send(addr, "/v1/chat/completions", &long_body).await;
    assert_eq!(long.status(), 200);
    assert!(long.chunk().await.unwrap().is_some(), "the answer started");

    // ... one more request may wait (it is answered later) ...
    let waiting = runtime.spawn(async move {
        send(addr, "/v1/chat/completions", &question("Say hello.", 4))
            .await
            .status()
    });
    colony_testkit::eventually(
        std::time::Duration::from_secs(10),
        "the second request waiting in the model's queue",
        || async {
            let metrics = reqwest::get(format!("http://{addr}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics
                .contains("colony_inference_queue_depth{kind=\"chat\"} 1")
                .then_some(())
        },
    )
    .await;
    // ... and the next is refused at once.
    let (status, refused) = chat(&handle, question("Say hello.", 4)).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["code"], "rate_limit_exceeded", "{refused}");

    // The long answer's client goes away: the model stops it and answers the waiting one.
    drop(long);
    assert_eq!(waiting.await.unwrap(), 200);

    stop(runtime, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_endpoint_serves_the_local_embedding_model() {
    use base64::Engine as _;
    use colony_router::config::{EmbeddingDeploymentConfig, EmbeddingProviderKind};

    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = common::start_with(&db, &bus, |config| {
        config.default_deployment = "smol".into();
        config.deployments = vec![local_deployment(2)];
        config.embeddings = vec![EmbeddingDeploymentConfig {
            name: "minilm".into(),
            provider: EmbeddingProviderKind::Local,
            local: colony_inference::embed::EmbedConfig::new(
                workspace_models_dir().join(colony_inference::DEFAULT_EMBEDDING_MODEL),
            ),
        }];
    })
    .await;
    let addr = handle.http_addr;
    let post = |body: Value| async move {
        let response = send(addr, "/v1/embeddings", &body).await;
        let status = response.status();
        (status, response.json::<Value>().await.unwrap())
    };

    let texts = [
        "The cat sits on the mat.",
        "A kitten is lying on a rug.",
        "Quarterly revenue grew by four percent.",
    ];
    let (status, body) = post(json!({"model": "minilm", "input": texts})).await;
    assert_eq!(status, 200, "{body}");
    let vectors: Vec<Vec<f32>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| serde_json::from_value(item["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(vectors.len(), 3);
    assert!(vectors.iter().all(|v| v.len() == 384));
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(dot(&vectors[0], &vectors[1]) > dot(&vectors[0], &vectors[2]) + 0.2);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() >= 3 * 5);

    // base64: the same floats, little-endian.
    let (_, encoded) =
        post(json!({"model": "minilm", "input": texts[0], "encoding_format": "base64"})).await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(decoded, vectors[0]);

    // Clear errors: unknown model, empty text, token ids, wrong dimensions.
    let (status, body) = post(json!({"model": "smol", "input": "hi"})).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("minilm")
    );
    for (request, param) in [
        (json!({"model": "minilm", "input": ""}), "input"),
        (json!({"model": "minilm", "input": [[1, 2, 3]]}), "input"),
        (
            json!({"model": "minilm", "input": "hi", "dimensions": 128}),
            "dimensions",
        ),
    ] {
        let (status, body) = post(request).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
    }

    stop(runtime, handle).await;
}
