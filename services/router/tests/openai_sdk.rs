//! OpenAI's official Python client against the router, unchanged apart from base URL and key:
//! plain and streamed completions (with usage), tool calls both ways, the model list, and the
//! client's own error types for a bad model and a bad key. The client lives in a virtualenv that
//! `make sdk-env` creates (`make test` does it first); its interpreter is found at
//! `target/sdk-env/bin/python` or at `$COLONY_SDK_PYTHON`.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use std::path::PathBuf;

use colony_router::config::{
    Capability, EmbeddingDeploymentConfig, EmbeddingProviderKind, TenantConfig, Tier,
};
use colony_testkit::{TestBus, TestDb};
use common::{rule, rule_from, scripted, start_with, stop};
use secrecy::SecretString;
use serde_json::{Value, json};

fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("COLONY_SDK_PYTHON") {
        return PathBuf::from(path);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = workspace.join("target/sdk-env/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make sdk-env` (it installs OpenAI's Python client)",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openais_python_client_works_unchanged() {
    let python = python();
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let (runtime, handle) = start_with(&db, &bus, |config| {
        let mut canned = scripted("canned", Tier::Mid, vec![]);
        canned.capabilities = vec![Capability::Tools, Capability::Streaming];
        canned.script = vec![
            rule_from(json!({"contains": "weather", "tool_calls": [
                {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}
            ]})),
            rule(Some("sunny"), "Sunny in Oslo.", None),
            rule(None, "hello from the router", None),
        ];
        config.deployments = vec![canned];
        config.default_deployment = "canned".into();
        config.embeddings = vec![EmbeddingDeploymentConfig {
            name: "minilm".into(),
            provider: EmbeddingProviderKind::Local,
            local: colony_inference::embed::EmbedConfig::new(
                colony_inference::workspace_models_dir()
                    .join(colony_inference::DEFAULT_EMBEDDING_MODEL),
            ),
        }];
        config.tenants = vec![TenantConfig {
            name: "acme".into(),
            api_key_env: "UNUSED".into(),
            api_key: Some(SecretString::from("sk-acme-sdk")),
            budget_usd: None,
        }];
    })
    .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_client.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("http://{}/v1", handle.http_addr))
        .arg("sk-acme-sdk")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "the client script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(seen["plain"]["content"], "hello from the router");
    assert_eq!(seen["plain"]["finish_reason"], "stop");
    assert!(seen["plain"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(seen["deployment_header"], "canned");
    assert_eq!(seen["stream"]["content"], "hello from the router");
    assert_eq!(seen["stream"]["finish_reason"], "stop");
    assert_eq!(seen["stream"]["completion_tokens"], 4);
    assert_eq!(seen["tools"]["finish_reason"], "tool_calls");
    assert_eq!(seen["tools"]["name"], "get_weather");
    assert_eq!(seen["tools"]["arguments"], json!({"city": "Oslo"}));
    assert_eq!(seen["tools"]["answer"], "Sunny in Oslo.");
    assert_eq!(seen["stream_tool_arguments"], "{\"city\": \"Oslo\"}");
    assert_eq!(seen["models"], json!(["canned"]));
    assert_eq!(seen["embeddings"]["count"], 2);
    assert_eq!(seen["embeddings"]["dimensions"], 384);
    assert!(
        seen["embeddings"]["similarity"].as_f64().unwrap() > 0.5,
        "{seen}"
    );
    assert!(seen["embeddings"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(seen["bad_model"]["status"], 400);
    assert!(
        seen["bad_model"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown deployment"),
        "{seen}"
    );
    assert_eq!(seen["bad_key"]["status"], 401);

    stop(runtime, handle).await;
}
