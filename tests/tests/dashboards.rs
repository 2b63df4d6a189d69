//! The Grafana dashboards of `deploy/grafana/dashboards` proven against a live Prometheus: the
//! native stack runs, a real `prometheus` (Debian package) scrapes every service, the test
//! drives runs through every path a panel shows (successes, a failure, a dead worker, memory
//! writes, an open circuit breaker, a malformed message, queued work), then evaluates every
//! panel's PromQL through Prometheus' HTTP API and requires data from each.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use colony_e2e::{Stack, StackOptions};
use colony_testkit::{Process, eventually, free_port, wait_http_ok};
use serde_json::{Value, json};

/// Every dashboard file and the uid Grafana knows it by (links and URLs use the uid).
const DASHBOARDS: [(&str, &str); 5] = [
    ("overview.json", "colony-overview"),
    ("queue-workers.json", "colony-queue-workers"),
    ("router.json", "colony-router"),
    ("memory.json", "colony-memory"),
    ("bus-outbox.json", "colony-bus-outbox"),
];

/// The provisioned Prometheus datasource (deploy/grafana/provisioning/datasources).
const DATASOURCE_UID: &str = "prometheus";

/// Metrics with a `tenant` label: every selector of one must filter on `$tenant`.
const TENANT_METRICS: [&str; 16] = [
    "colony_orchestrator_runs_total",
    "colony_orchestrator_tasks_total",
    "colony_orchestrator_retries_total",
    "colony_orchestrator_dead_letters_total",
    "colony_router_requests_total",
    "colony_router_tokens_total",
    "colony_router_cost_micro_usd_total",
    "colony_router_request_duration_seconds",
    "colony_router_time_to_first_token_seconds",
    "colony_router_tenant_budget_micro_usd",
    "colony_router_tenant_budget_spent_micro_usd",
    "colony_router_tenant_budget_reserved_micro_usd",
    "colony_orchestrator_queue_depth",
    "colony_orchestrator_queue_oldest_age_seconds",
    "colony_orchestrator_active_tasks",
    "colony_orchestrator_active_runs",
];

/// What `$__rate_interval` stands for here (Grafana makes it at least four scrape intervals):
/// a minute covers the whole drive, so the first wave's one-off events (the dead letter, the
/// breaker opening) are still inside the window when the queries run.
const RATE_INTERVAL: &str = "1m";

/// One scripted deployment that answers everything (`primary`, rate-limited so the limiter
/// queue is used), and one that always fails transiently (`flaky`) and falls back to it; a
/// breaker opens after two consecutive failures and stays open for the whole test.
const ROUTER: &str = r#"
default_deployment = "primary"

[resilience.breaker]
failure_threshold = 2
open_duration = "10m"

[[deployments]]
name = "primary"
provider = "scripted"
model = "scripted"
tier = "mid"
capabilities = ["tools"]
input_price_per_mtok = 1.0
output_price_per_mtok = 2.0
timeout = "300s"

[deployments.limits]
requests_per_minute = 100

[[deployments.script]]
contains = "cannot be answered"
fail = "permanent"

# An empty memory is refused by memory (invalid_argument); the second one is stored, or merged
# into the first run's.
[[deployments.script]]
contains = "Remember"

[[deployments.script.tool_calls]]
name = "memory_write"
arguments = '{"text": " "}'

[[deployments.script.tool_calls]]
name = "memory_write"
arguments = '{"text": "The staging cluster needs the VPN.", "scope": "tenant"}'

[[deployments.script]]
contains = "as memory"
reply = "Noted."

[[deployments.script]]
contains = "into memory"
reply = "Noted."

[[deployments.script]]
contains = "Take your time"
reply = "Finished slowly."
delay = "4s"

[[deployments.script]]
contains = "Wait for a long time"
reply = "Far too late."
delay = "280s"

[[deployments.script]]
reply = "Done."
delay = "50ms"

[[deployments]]
name = "flaky"
provider = "scripted"
model = "scripted-flaky"
tier = "frontier"
input_price_per_mtok = 1.0
output_price_per_mtok = 2.0
timeout = "5s"
fallbacks = ["primary"]

[[deployments.script]]
fail = "transient"

# Budgets, so the tenant budget gauges have tenants; their keys guard the HTTP API.
[[tenants]]
name = "default"
api_key_env = "COLONY_DASHBOARDS_DEFAULT_KEY"
budget_usd = 1000.0

[[tenants]]
name = "acme"
api_key_env = "COLONY_DASHBOARDS_ACME_KEY"
budget_usd = 1000.0
"#;

/// The API key of `tenant` in the router's environment.
fn api_key(tenant: &str) -> String {
    format!("dashboards-{tenant}-key")
}

/// A generalist that may search memory (recalled into every prompt) and write it.
const ORCHESTRATOR: &str = r#"
[roster.roles.planner]
prompt = "You split goals into tasks."

[roster.roles.generalist]
prompt = "You are a careful assistant."
tools = ["memory_search", "memory_write"]

# The roster has no researcher, writer or reviewer for the default hybrid template.
[roster.templates]
hybrid = [{ id = "answer", role = "generalist", instructions = "{goal}" }]
"#;

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards")
}

/// Every dashboard, by file name.
fn dashboards() -> Vec<(&'static str, Value)> {
    let dir = dashboards_dir();
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    found.sort();
    let mut expected: Vec<&str> = DASHBOARDS.iter().map(|(file, _)| *file).collect();
    expected.sort_unstable();
    assert_eq!(found, expected, "dashboards in {}", dir.display());
    DASHBOARDS
        .iter()
        .map(|(file, _)| {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let dashboard = serde_json::from_str(&text)
                .unwrap_or_else(|error| panic!("{file} is not JSON: {error}"));
            (*file, dashboard)
        })
        .collect()
}

/// The panels of a dashboard, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        all.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            all.extend(inner);
        }
    }
    all
}

/// A panel's PromQL, substituted as Grafana would with every variable at "All".
struct Query {
    dashboard: String,
    panel: String,
    ref_id: String,
    expr: String,
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} / {:?} / {}: {}",
            self.dashboard, self.panel, self.ref_id, self.expr
        )
    }
}

fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$tenant", ".*")
        .replace("$instance", ".*")
}

fn queries(dashboards: &[(&str, Value)]) -> Vec<Query> {
    let mut queries = Vec::new();
    for (_, dashboard) in dashboards {
        for panel in panels(dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap();
                assert!(
                    !substitute(expr).contains('$'),
                    "a variable the test does not know in {expr}"
                );
                queries.push(Query {
                    dashboard: dashboard["title"].as_str().unwrap().to_owned(),
                    panel: panel["title"].as_str().unwrap().to_owned(),
                    ref_id: target["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: substitute(expr),
                });
            }
        }
    }
    queries
}

/// Each metric selector in `expr` (`name{matchers}`) of a Colony metric or `up`, as
/// (name, matchers). A Colony metric named without matchers comes back with empty ones.
fn selectors(expr: &str) -> Vec<(String, String)> {
    let bytes = expr.as_bytes();
    let mut found = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let starts_word =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let word_end = bytes[at..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(bytes.len(), |end| at + end);
        if !starts_word || word_end == at {
            at += 1;
            continue;
        }
        let word = &expr[at..word_end];
        if word.starts_with("colony_") || word == "up" {
            let matchers = if bytes.get(word_end) == Some(&b'{') {
                let close = expr[word_end..].find('}').unwrap() + word_end;
                expr[word_end + 1..close].to_owned()
            } else {
                String::new()
            };
            found.push((word.to_owned(), matchers));
        }
        at = word_end;
    }
    found
}

/// `label_values(selector, label)` split into its parts.
fn label_values(query: &str) -> (String, String) {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a label_values query: {query}"));
    let (selector, label) = inner.rsplit_once(',').unwrap();
    (selector.trim().to_owned(), label.trim().to_owned())
}

/// The query of a templating variable (a string, or an object with `query`).
fn variable_query(variable: &Value) -> &str {
    variable["query"]
        .as_str()
        .or_else(|| variable["query"]["query"].as_str())
        .unwrap()
}

#[test]
fn dashboards_are_templated_and_point_at_the_provisioned_datasource() {
    // Whatever the provisioning files are called, one of them declares the Prometheus
    // datasource under the uid the panels name.
    let provisioning = dashboards_dir().join("../provisioning/datasources");
    let mut prometheus_uids = Vec::new();
    for entry in std::fs::read_dir(&provisioning).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .extension()
            .is_some_and(|ext| ext == "yml" || ext == "yaml")
        {
            continue;
        }
        let file: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for datasource in file["datasources"].as_sequence().into_iter().flatten() {
            if datasource["type"].as_str() == Some("prometheus") {
                prometheus_uids.push(datasource["uid"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    assert_eq!(
        prometheus_uids,
        [DATASOURCE_UID],
        "Prometheus datasources provisioned in {}",
        provisioning.display()
    );

    // Job names in queries are the scrape config's (this test's Prometheus uses them too).
    let scrape: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dashboards_dir().join("../../prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let scraped_jobs: BTreeSet<&str> = scrape["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|job| job["job_name"].as_str())
        .collect();

    let mut uids = BTreeSet::new();
    for ((file, dashboard), (_, uid)) in dashboards().iter().zip(DASHBOARDS) {
        let variables = dashboard["templating"]["list"].as_array().unwrap();
        let queries = panels(dashboard)
            .into_iter()
            .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
            .filter_map(|target| target["expr"].as_str())
            .chain(variables.iter().map(variable_query));
        for query in queries {
            for (at, matcher) in query.match_indices(r#"job=~""#) {
                let rest = &query[at + matcher.len()..];
                for job in rest[..rest.find('"').unwrap()].split('|') {
                    assert!(
                        scraped_jobs.contains(job),
                        "{file}: job {job:?} is not scraped by deploy/prometheus/prometheus.yml"
                    );
                }
            }
        }
        assert_eq!(dashboard["uid"], uid, "{file}");
        assert!(uids.insert(uid), "{file}: uid {uid} twice");
        for name in ["tenant", "instance"] {
            let variable = variables
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{file}: no {name} variable"));
            assert_eq!(variable["type"], "query", "{file}: {name}");
            assert_eq!(variable["includeAll"], true, "{file}: {name}");
            assert_eq!(variable["allValue"], ".*", "{file}: {name}");
            assert_eq!(
                variable["datasource"]["uid"], DATASOURCE_UID,
                "{file}: {name}"
            );
            label_values(variable_query(variable));
        }

        let mut ids = BTreeSet::new();
        let panels = panels(dashboard);
        assert!(
            (5..=12).contains(&panels.len()),
            "{file}: {} panels",
            panels.len()
        );
        for panel in panels {
            let title = panel["title"].as_str().unwrap();
            let id = panel["id"].as_u64().unwrap();
            assert!(ids.insert(id), "{file}: panel id {id} twice ({title})");
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], DATASOURCE_UID,
                "{file}: {title}"
            );
            assert!(
                panel["description"]
                    .as_str()
                    .is_some_and(|d| !d.trim().is_empty()),
                "{file}: {title} has no description"
            );
            assert!(
                panel["fieldConfig"]["defaults"]["unit"].is_string(),
                "{file}: {title} has no unit"
            );
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: {title} has no query");
            for target in targets {
                assert_eq!(
                    target["datasource"]["uid"], DATASOURCE_UID,
                    "{file}: {title}"
                );
                let expr = target["expr"].as_str().unwrap();
                let found = selectors(expr);
                assert!(!found.is_empty(), "{file}: {title}: no metric in {expr}");
                for (metric, matchers) in found {
                    assert!(
                        matchers.contains(r#"instance=~"$instance""#),
                        "{file}: {title}: {metric} not filtered by instance in {expr}"
                    );
                    let base = metric.trim_end_matches("_bucket");
                    if TENANT_METRICS.contains(&base) {
                        assert!(
                            matchers.contains(r#"tenant=~"$tenant""#),
                            "{file}: {title}: {metric} not filtered by tenant in {expr}"
                        );
                    }
                }
                if expr.contains("rate(") {
                    assert!(
                        expr.contains("[$__rate_interval]"),
                        "{file}: {title}: a rate without $__rate_interval in {expr}"
                    );
                }
            }
        }
    }
}

/// The `prometheus` binary on PATH.
fn prometheus_binary() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("prometheus"))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`prometheus` is not on PATH: install the Debian package `prometheus` \
                 (`make promtool` does; `make test` runs it first)"
            )
        })
}

/// `host:port` of a stack URL.
fn host_port(url: &str) -> &str {
    url.strip_prefix("http://").unwrap()
}

/// A Prometheus scraping one stack every second, with its config and data in a directory of
/// its own; killed and removed on drop.
struct Prometheus {
    process: Process,
    dir: PathBuf,
    url: String,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(stack: &Stack) -> Prometheus {
        let binary = prometheus_binary();
        let dir = colony_testkit::target_dir()
            .join("test-prometheus")
            .join(&stack.bus.prefix);
        std::fs::create_dir_all(&dir).unwrap();
        // The job names are the compose config's (deploy/prometheus/prometheus.yml): the
        // dashboards' instance variables select by them.
        let jobs = [
            ("orchestrator", vec![stack.orchestrator_url.as_str()]),
            ("router", vec![stack.router_http_url.as_str()]),
            ("memory", vec![stack.memory_http_url.as_str()]),
            ("monitor", vec![stack.monitor_url.as_str()]),
            (
                "agent-worker",
                stack.worker_urls.iter().map(String::as_str).collect(),
            ),
        ];
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n",
        );
        for (job, urls) in jobs {
            let targets: Vec<String> = urls
                .iter()
                .map(|url| format!("\"{}\"", host_port(url)))
                .collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let args = [
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::spawn("prometheus", &binary, &args, &[]);
        let url = format!("http://127.0.0.1:{port}");
        wait_http_ok(&format!("{url}/-/ready"), Duration::from_secs(30)).await;
        Prometheus {
            process,
            dir,
            url,
            http: reqwest::Client::new(),
        }
    }

    /// The `data` of an API call, or why there is none.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .query(params)
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let body: Value = response.json().await.map_err(|error| error.to_string())?;
        if body["status"] != "success" {
            return Err(format!("status {}: {}", body["status"], body["error"]));
        }
        Ok(body["data"].clone())
    }

    /// Ok when the instant query returns at least one sample with a number (not NaN), the
    /// answer otherwise.
    async fn has_data(&self, expr: &str) -> Result<(), String> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        let samples = data["result"].as_array().cloned().unwrap_or_default();
        let numeric = samples.iter().any(|sample| {
            sample["value"][1]
                .as_str()
                .and_then(|value| value.parse::<f64>().ok())
                .is_some_and(|value| !value.is_nan())
        });
        if numeric {
            Ok(())
        } else {
            Err(format!("no numeric sample: {}", data["result"]))
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.process.kill();
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

/// A run submitted for a tenant (runs are read back as their tenant).
struct Run {
    tenant: &'static str,
    id: String,
}

/// Submits `goal` for `tenant` as one generalist task.
async fn submit(stack: &Stack, tenant: &'static str, goal: &str) -> Run {
    let response = stack
        .http
        .post(format!("{}/v1/runs", stack.orchestrator_url))
        .header("x-colony-tenant", tenant)
        .json(&json!({ "goal": goal, "topology": "monolith" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let run: Value = response.json().await.unwrap();
    Run {
        tenant,
        id: run["id"].as_str().unwrap().to_owned(),
    }
}

async fn get_run(stack: &Stack, run: &Run) -> Value {
    stack
        .http
        .get(format!("{}/v1/runs/{}", stack.orchestrator_url, run.id))
        .header("x-colony-tenant", run.tenant)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until the run's first task is running; returns the worker running it.
async fn running(stack: &Stack, run: &Run) -> String {
    eventually(
        Duration::from_secs(30),
        &format!("run {} running", run.id),
        || async {
            let task = &get_run(stack, run).await["tasks"][0];
            (task["state"] == "running")
                .then(|| task["worker"].as_str().map(str::to_owned))
                .flatten()
        },
    )
    .await
}

/// Waits for every run to finish and checks how each ended.
async fn expect_runs(stack: &Stack, runs: &[(&str, Run)]) {
    for (status, run) in runs {
        let finished = eventually(
            Duration::from_secs(60),
            &format!("run {} to finish", run.id),
            || async {
                let view = get_run(stack, run).await;
                matches!(
                    view["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
                .then_some(view)
            },
        )
        .await;
        assert_eq!(finished["status"], *status, "{finished:#}");
    }
}

/// One chat completion through the router's OpenAI-compatible API (non-streamed calls are
/// the ones whose overhead the router measures).
async fn chat(stack: &Stack, tenant: &str, model: &str, stream: bool) {
    let response = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.router_http_url))
        .bearer_auth(api_key(tenant))
        .json(&json!({
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": "Say something short."}]
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "{model}: {status} {body}");
}

/// One wave of ordinary traffic: runs for two tenants (one writes memory), and direct router
/// calls, streamed and not.
async fn wave(stack: &Stack) {
    let runs = vec![
        (
            "succeeded",
            submit(stack, "default", "Name three colours.").await,
        ),
        (
            "succeeded",
            submit(stack, "acme", "Name three rivers.").await,
        ),
        (
            "succeeded",
            submit(stack, "acme", "Remember what staging needs.").await,
        ),
    ];
    futures::future::join_all([
        chat(stack, "acme", "primary", false),
        chat(stack, "default", "primary", true),
        chat(stack, "acme", "flaky", false),
    ])
    .await;
    expect_runs(stack, &runs).await;
}

/// Where `service`'s scrape breaks the naming scheme (docs/observability.md):
/// `colony_<service>_<name>_<unit>` (or a shared library's `colony_bus_`, `colony_outbox_`,
/// `colony_inference_`), `_total` on counters only, a description for each, no id labels.
fn naming_problems(service: &str, scrape: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let described: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# HELP "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let owned = [service, "bus", "outbox", "inference"]
                .iter()
                .any(|owner| name.starts_with(&format!("colony_{owner}_")));
            if !owned {
                problems.push(format!("{service}: {name} is not colony_{service}_…"));
            }
            if (kind == "counter") != name.ends_with("_total") {
                problems.push(format!("{service}: {kind} {name}: _total is for counters"));
            }
            if !described.contains(name) {
                problems.push(format!("{service}: {name} has no description"));
            }
        } else if !line.starts_with('#')
            && let Some((_, labels)) = line.split_once('{')
        {
            for pair in labels.split("\",") {
                let label = pair.split('=').next().unwrap_or_default();
                if label.ends_with("_id") {
                    problems.push(format!("{service}: id label {label} in {line}"));
                }
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_returns_data_from_a_live_prometheus() {
    let started = Instant::now();
    let dashboards = dashboards();
    let queries = queries(&dashboards);
    let mut stack = Stack::start(StackOptions {
        router_toml: ROUTER.into(),
        router_env: ["default", "acme"]
            .map(|tenant| {
                (
                    format!("COLONY_DASHBOARDS_{}_KEY", tenant.to_uppercase()),
                    api_key(tenant),
                )
            })
            .to_vec(),
        orchestrator_toml: ORCHESTRATOR.into(),
        // Short, so the dead worker's lease expires within the test.
        lease: "3s",
        workers: 2,
        ..StackOptions::default()
    })
    .await;
    let prometheus = Prometheus::start(&stack).await;

    // A worker dies mid-task: its lease expires, the task is retried on the other worker, and
    // JetStream redelivers the dead worker's unacknowledged dispatch (a stale claim, refused).
    let slow = submit(&stack, "default", "Take your time with this one.").await;
    let worker = running(&stack, &slow).await;
    let index: usize = worker.strip_prefix("worker-").unwrap().parse().unwrap();
    stack.workers[index].kill();

    // First wave, with a run that fails for good (dead-lettered), the flaky deployment's
    // breaker opening, and a malformed report for the bus to terminate.
    let failing = submit(&stack, "default", "This one cannot be answered.").await;
    let bus = stack.bus.connect().await;
    bus.publish_bytes(
        "colony.v1.task.report.succeeded",
        "dashboards-garbage",
        None,
        b"\xff\xff not protobuf".as_slice().into(),
    )
    .await
    .unwrap();
    wave(&stack).await;
    expect_runs(&stack, &[("failed", failing), ("succeeded", slow)]).await;

    // A second wave once Prometheus has seen the first: histograms whose series appear with
    // their first observations only get a rate (and a quantile) from later ones.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wave(&stack).await;

    // Work left in flight for the gauges: one task running for minutes, and one queued
    // behind maintenance mode (which pauses dispatch).
    let long = submit(&stack, "acme", "Wait for a long time.").await;
    running(&stack, &long).await;
    let paused = stack
        .http
        .post(format!("{}/v1/admin/maintenance", stack.orchestrator_url))
        .json(&json!({ "paused": true }))
        .send()
        .await
        .unwrap();
    assert!(paused.status().is_success(), "{}", paused.status());
    let queued = submit(&stack, "default", "Wait behind maintenance.").await;
    assert_eq!(
        get_run(&stack, &queued).await["tasks"][0]["state"],
        "queued"
    );
    let driven = started.elapsed();

    // Every metric every service exports follows the naming scheme and is described.
    let mut failures = Vec::new();
    let mut services = vec![
        ("orchestrator", stack.orchestrator_url.clone()),
        ("router", stack.router_http_url.clone()),
        ("memory", stack.memory_http_url.clone()),
        ("monitor", stack.monitor_url.clone()),
    ];
    for (worker, url) in stack.worker_urls.iter().enumerate() {
        if worker != index {
            services.push(("agent_worker", url.clone()));
        }
    }
    for (service, url) in &services {
        failures.extend(naming_problems(service, &stack.metrics(url).await));
    }

    // The variables' choices come from Prometheus too.
    for (file, dashboard) in &dashboards {
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let (selector, label) = label_values(variable_query(variable));
            let values = eventually(
                Duration::from_secs(30),
                &format!("{file}: values of ${}", variable["name"]),
                || async {
                    prometheus
                        .api(
                            &format!("/api/v1/label/{label}/values"),
                            &[("match[]", &selector)],
                        )
                        .await
                        .ok()
                        .filter(|values| values.as_array().is_some_and(|v| !v.is_empty()))
                },
            )
            .await;
            if variable["name"] == "tenant" {
                for tenant in ["default", "acme"] {
                    if !values.as_array().unwrap().contains(&json!(tenant)) {
                        failures.push(format!("{file}: $tenant lacks {tenant}: {values}"));
                    }
                }
            }
        }
    }

    // Every panel's every query, until each has data: counters need two scrapes for a rate,
    // and the work gauges are read every two seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<(&Query, String)> = queries.iter().map(|q| (q, String::new())).collect();
    while !pending.is_empty() {
        let answers = futures::future::join_all(
            pending
                .iter()
                .map(|(query, _)| prometheus.has_data(&query.expr)),
        )
        .await;
        pending = pending
            .into_iter()
            .zip(answers)
            .filter_map(|((query, _), answer)| answer.err().map(|why| (query, why)))
            .collect();
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    failures.extend(
        pending
            .iter()
            .map(|(query, why)| format!("{query}\n    -> {why}")),
    );
    assert!(
        failures.is_empty(),
        "{} of {} queries without data (driven in {driven:?}):\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
}
