//! What the monitor's service tests share: a monitor on the test's database and bus with an
//! HTTP port of its own, and reading one series of its metrics.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]
#![allow(dead_code, reason = "each test file uses its own part")]

use std::time::Duration;

use colony_monitor::Config;
use colony_monitor::alerts::{AlertRule, RuleKind};
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use tokio_util::sync::CancellationToken;

/// A running monitor and its base URL.
pub struct Running {
    pub base: String,
    runtime: Runtime,
    handle: colony_monitor::Handle,
}

impl Running {
    /// Shuts the monitor down and waits for it.
    pub async fn stop(self) {
        self.runtime.shutdown.cancel();
        self.handle.wait().await;
    }
}

/// Starts a monitor with `config` on `db` and `bus`, listening on a free loopback port.
pub async fn start(db: &TestDb, bus: &TestBus, config: Config) -> Running {
    let mut config = Config {
        database: db.config(),
        bus: bus.config(),
        ..config
    };
    config.http.addr = "127.0.0.1:0".into();
    let runtime = Runtime::new(CancellationToken::new());
    let handle = colony_monitor::spawn(config, &runtime).await.unwrap();
    Running {
        base: format!("http://{}", handle.http_addr),
        runtime,
        handle,
    }
}

/// The value of one series (name with its labels, exactly as rendered) in Prometheus text.
pub fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

/// A monitor configuration that sweeps and evaluates `rules` every 100 ms, with no cooldown.
pub fn quick(rules: Vec<AlertRule>) -> Config {
    Config {
        sweep_interval: Duration::from_millis(100),
        alerts: colony_monitor::alerts::AlertsConfig {
            evaluate_interval: Duration::from_millis(100),
            cooldown: Duration::ZERO,
            rules,
            ..colony_monitor::alerts::AlertsConfig::default()
        },
        ..Config::default()
    }
}

/// A rule of `kind` named `name` that fires above `threshold`, over 10 minutes, from one event.
pub fn rule(name: &str, kind: RuleKind, threshold: f64) -> AlertRule {
    AlertRule {
        name: name.into(),
        kind,
        threshold,
        window: Duration::from_secs(600),
        min_events: 1,
    }
}

/// How long a test waits for the monitor to see something.
pub const WAIT: Duration = Duration::from_secs(20);

/// `GET url` as JSON; the status must be a success.
pub async fn get_json(url: &str) -> serde_json::Value {
    let response = reqwest::get(url).await.unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

/// One series of the monitor's metrics at `base`, if it is there.
pub async fn metric(base: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    series(&text, name)
}

/// The alert of `rule` in `/v1/alerts` in `state`, if there is one.
pub async fn alert(base: &str, rule: &str, state: &str) -> Option<serde_json::Value> {
    let alerts = get_json(&format!("{base}/v1/alerts")).await;
    alerts["alerts"]
        .as_array()?
        .iter()
        .find(|alert| alert["rule"] == rule && alert["state"] == state)
        .cloned()
}

/// The alert of `rule` in `/v1/alerts`, once it is in `state`.
pub async fn wait_for_alert(base: &str, rule: &str, state: &str) -> serde_json::Value {
    colony_testkit::eventually(WAIT, &format!("{rule} {state}"), || {
        alert(base, rule, state)
    })
    .await
}

/// Asserts that `firing` fired on a lag of five minutes (and a little for the test's own time),
/// and that its summary says so: `<kind> is 3…`, ending with `(<scope>)`.
pub fn assert_fired_five_minutes(firing: &serde_json::Value, kind: &str, scope: &str) {
    let fired = firing["fired_value"].as_f64().unwrap();
    assert!((299.0..330.0).contains(&fired), "{firing}");
    let summary = firing["summary"].as_str().unwrap();
    assert!(summary.contains(&format!("{kind} is 3")), "{firing}");
    assert!(summary.ends_with(&format!("({scope})")), "{firing}");
}
