//! What the router's integration tests share: scripted deployments and a router started
//! in-process on port 0 against a fresh database and bus prefix.
#![allow(dead_code, reason = "each test file uses a different part")]

use std::time::Duration;

use colony_router::Config;
use colony_router::config::{DeploymentConfig, ProviderKind, ScriptRule, Tier};
use colony_router::error::ErrorClass;
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use tokio_util::sync::CancellationToken;

/// A scripted deployment at $1 / $2 per million tokens, with a 5 s timeout.
pub fn scripted(name: &str, tier: Tier, script: Vec<ScriptRule>) -> DeploymentConfig {
    DeploymentConfig {
        tier,
        input_price_per_mtok: 1.0,
        output_price_per_mtok: 2.0,
        timeout: Duration::from_secs(5),
        script,
        ..DeploymentConfig::new(name, ProviderKind::Scripted, &format!("{name}-model"))
    }
}

/// A script rule: `reply` (or a failure of `fail`'s class) when the last user message
/// contains `contains`. Built from JSON so rules keep their defaults for other keys.
pub fn rule(contains: Option<&str>, reply: &str, fail: Option<ErrorClass>) -> ScriptRule {
    serde_json::from_value(serde_json::json!({
        "contains": contains,
        "reply": reply,
        "fail": fail,
    }))
    .unwrap()
}

/// Starts the router with `configure`'s deployments (and anything else it sets) and waits
/// until it is ready.
pub async fn start_with(
    db: &TestDb,
    test_bus: &TestBus,
    configure: impl FnOnce(&mut Config),
) -> (Runtime, colony_router::Handle) {
    let mut config = Config {
        database: db.config(),
        bus: test_bus.config(),
        http: colony_router::config::HttpConfig {
            addr: "127.0.0.1:0".into(),
        },
        grpc: colony_router::config::GrpcConfig {
            addr: "127.0.0.1:0".into(),
        },
        ..Config::default()
    };
    configure(&mut config);
    let runtime = Runtime::new(CancellationToken::new());
    let handle = colony_router::spawn(config, &runtime).await.unwrap();
    colony_testkit::wait_http_ok(
        &format!("http://{}/readyz", handle.http_addr),
        Duration::from_secs(5),
    )
    .await;
    (runtime, handle)
}

pub async fn ledger_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM router.usage_ledger")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Waits (up to 5 s) until the ledger holds `expected` rows: the router writes it in batches
/// after answering.
pub async fn wait_ledger_rows(db: &TestDb, expected: i64) {
    colony_testkit::eventually(
        Duration::from_secs(5),
        &format!("{expected} ledger rows"),
        || async { (ledger_rows(db).await == expected).then_some(()) },
    )
    .await;
}

/// A script rule from its JSON form, for rules with keys `rule` does not take (`delay`,
/// `piece_delay`, `tool_calls`).
pub fn rule_from(value: serde_json::Value) -> ScriptRule {
    serde_json::from_value(value).unwrap()
}

/// Shuts a router started by [`start_with`] down and waits until it has.
pub async fn stop(runtime: Runtime, handle: colony_router::Handle) {
    runtime.shutdown.cancel();
    handle.wait().await.unwrap();
}
