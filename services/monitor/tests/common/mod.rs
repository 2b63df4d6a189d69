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
