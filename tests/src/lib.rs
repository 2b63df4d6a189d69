//! Harness that starts Colony's five real binaries as processes against the local PostgreSQL
//! and NATS, each stack with its own database and subject prefix, plus helpers to drive it.
#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed setup should stop the test"
)]

pub mod bench;
pub mod otlp;
pub mod stub;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use colony_testkit::{Process, TestBus, TestDb, binary, eventually, free_port, wait_http_ok};
use futures::StreamExt;
use serde_json::Value;

/// How to start a stack.
pub struct StackOptions {
    /// The router's `[[deployments]]` and `default_deployment`, as TOML.
    pub router_toml: String,
    /// Extra environment for the router (the variables its tenants' `api_key_env` name).
    pub router_env: Vec<(String, String)>,
    /// Lease duration given to the orchestrator.
    pub lease: &'static str,
    /// Workers started with the stack.
    pub workers: usize,
    pub worker_slots: u32,
    /// Log filter for every service.
    pub log_filter: &'static str,
    /// Extra environment for the orchestrator (`ORCHESTRATOR__…`), applied last.
    pub orchestrator_env: Vec<(String, String)>,
    /// The orchestrator's config file (TOML), for what the environment cannot say (roster
    /// lists); empty for none.
    pub orchestrator_toml: String,
    /// Where every service exports its spans, if anywhere.
    pub otlp: Option<Otlp>,
}

/// An OTLP/gRPC collector for every service of a stack.
#[derive(Debug, Clone)]
pub struct Otlp {
    pub endpoint: String,
    /// How long the services' batch span processors wait before sending what they hold
    /// (`OTEL_BSP_SCHEDULE_DELAY`); `None` keeps OpenTelemetry's default, 5 s.
    pub batch_delay_ms: Option<u64>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            router_toml: String::new(),
            router_env: Vec::new(),
            lease: "30s",
            workers: 1,
            worker_slots: 4,
            log_filter: "info",
            orchestrator_env: Vec::new(),
            orchestrator_toml: String::new(),
            otlp: None,
        }
    }
}

/// A running stack. Dropping it kills every process and removes the database and streams.
pub struct Stack {
    pub db: TestDb,
    pub bus: TestBus,
    pub orchestrator_url: String,
    pub monitor_url: String,
    pub router_http_url: String,
    pub memory_http_url: String,
    pub workers: Vec<Process>,
    /// Each worker's HTTP base URL (`/metrics`), by index.
    pub worker_urls: Vec<String>,
    worker_env: Vec<(String, String)>,
    orchestrator_env: Vec<(String, String)>,
    orchestrator_args: Vec<String>,
    services: Vec<Process>,
    /// Holds the stack's config files and the workers' workspaces; removed on drop.
    pub config_dir: PathBuf,
    pub http: reqwest::Client,
}

fn common_env(
    prefix: &str,
    db: &TestDb,
    bus: &TestBus,
    log_filter: &str,
    otlp: Option<&Otlp>,
) -> Vec<(String, String)> {
    let mut env = vec![
        (format!("{prefix}__BUS__URL"), bus.url.clone()),
        (format!("{prefix}__BUS__PREFIX"), bus.prefix.clone()),
        // Redeliver an abandoned message after 5 s rather than 30 s.
        (format!("{prefix}__BUS__ACK_WAIT"), "5s".into()),
        (
            format!("{prefix}__TELEMETRY__LOG_FILTER"),
            log_filter.into(),
        ),
    ];
    if prefix != "AGENT_WORKER" {
        env.push((format!("{prefix}__DATABASE__URL"), db.url.clone()));
    }
    if let Some(otlp) = otlp {
        env.push((
            format!("{prefix}__TELEMETRY__OTLP_ENDPOINT"),
            otlp.endpoint.clone(),
        ));
        if let Some(delay) = otlp.batch_delay_ms {
            env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), delay.to_string()));
        }
    }
    env
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn spawn_orchestrator(
    name: &str,
    args: &[String],
    env: &[(String, String)],
    http: u16,
    grpc: u16,
) -> Process {
    let mut env = env.to_vec();
    env.push(("ORCHESTRATOR__HTTP__ADDR".into(), addr(http)));
    env.push(("ORCHESTRATOR__GRPC__ADDR".into(), addr(grpc)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::spawn(name, &binary("colony-orchestrator"), &args, &env)
}

/// Starts the router binary alone on `db` and `bus` with the config file `config`, its HTTP
/// edge on `http` and gRPC on `grpc` (both on loopback), and `extra_env` (say, the variables
/// its tenants' `api_key_env` name). It applies its migrations itself; wait for `/readyz`
/// before calling it.
pub fn spawn_router(
    db: &TestDb,
    bus: &TestBus,
    config: &std::path::Path,
    log_filter: &str,
    otlp: Option<&Otlp>,
    (http, grpc): (u16, u16),
    extra_env: &[(String, String)],
) -> Process {
    let mut env = common_env("ROUTER", db, bus, log_filter, otlp);
    env.push(("ROUTER__HTTP__ADDR".into(), addr(http)));
    env.push(("ROUTER__GRPC__ADDR".into(), addr(grpc)));
    env.extend_from_slice(extra_env);
    let config = config.to_string_lossy().into_owned();
    Process::spawn(
        "router",
        &binary("colony-router"),
        &["--config", &config],
        &env,
    )
}

/// An extra orchestrator replica started by a test.
pub struct Replica {
    pub process: Process,
    pub http_url: String,
    pub grpc_url: String,
}

impl Stack {
    pub async fn start(options: StackOptions) -> Stack {
        let db = TestDb::new().await;
        let bus = TestBus::new();
        let config_dir = colony_testkit::target_dir()
            .join("test-configs")
            .join(&bus.prefix);
        std::fs::create_dir_all(&config_dir).unwrap();
        let router_config = config_dir.join("router.toml");
        std::fs::write(&router_config, &options.router_toml).unwrap();

        let (orch_http, orch_grpc) = (free_port(), free_port());
        let (router_http, router_grpc) = (free_port(), free_port());
        let (memory_http, memory_grpc) = (free_port(), free_port());
        let monitor_http = free_port();
        let filter = options.log_filter;
        let otlp = options.otlp.as_ref();

        let mut services = Vec::new();
        let mut memory_env = common_env("MEMORY", &db, &bus, filter, otlp);
        memory_env.push(("MEMORY__HTTP__ADDR".into(), addr(memory_http)));
        memory_env.push(("MEMORY__GRPC__ADDR".into(), addr(memory_grpc)));
        // The processes run in the test's directory: give memory the embedding model's path.
        memory_env.push((
            "MEMORY__EMBEDDING__MODEL_DIR".into(),
            colony_inference::workspace_models_dir()
                .join("all-minilm-l6-v2")
                .to_string_lossy()
                .into_owned(),
        ));
        // Summaries are model calls through this stack's router (started next).
        memory_env.push((
            "MEMORY__COMPRESSION__ROUTER_URL".into(),
            format!("http://{}", addr(router_grpc)),
        ));
        services.push(Process::spawn(
            "memory",
            &binary("colony-memory"),
            &[],
            &memory_env,
        ));
        // Migrations run once, from the first service, before the others start.
        wait_http_ok(
            &format!("http://{}/readyz", addr(memory_http)),
            Duration::from_secs(30),
        )
        .await;

        services.push(spawn_router(
            &db,
            &bus,
            &router_config,
            filter,
            otlp,
            (router_http, router_grpc),
            &options.router_env,
        ));

        let mut orch_env = common_env("ORCHESTRATOR", &db, &bus, filter, otlp);
        orch_env.push((
            "ORCHESTRATOR__LEASES__DURATION".into(),
            options.lease.into(),
        ));
        orch_env.push(("ORCHESTRATOR__LEASES__REAP_INTERVAL".into(), "200ms".into()));
        orch_env.extend(options.orchestrator_env.iter().cloned());
        let mut orchestrator_args = Vec::new();
        if !options.orchestrator_toml.is_empty() {
            let path = config_dir.join("orchestrator.toml");
            std::fs::write(&path, &options.orchestrator_toml).unwrap();
            orchestrator_args = vec!["--config".to_owned(), path.to_string_lossy().into_owned()];
        }
        services.push(spawn_orchestrator(
            "orchestrator",
            &orchestrator_args,
            &orch_env,
            orch_http,
            orch_grpc,
        ));

        let mut monitor_env = common_env("MONITOR", &db, &bus, filter, otlp);
        monitor_env.push(("MONITOR__HTTP__ADDR".into(), addr(monitor_http)));
        services.push(Process::spawn(
            "monitor",
            &binary("colony-monitor"),
            &[],
            &monitor_env,
        ));

        let mut worker_env = common_env("AGENT_WORKER", &db, &bus, filter, otlp);
        worker_env.push((
            "AGENT_WORKER__ORCHESTRATOR_URL".into(),
            format!("http://{}", addr(orch_grpc)),
        ));
        worker_env.push((
            "AGENT_WORKER__ROUTER_URL".into(),
            format!("http://{}", addr(router_grpc)),
        ));
        worker_env.push((
            "AGENT_WORKER__MEMORY_URL".into(),
            format!("http://{}", addr(memory_grpc)),
        ));
        worker_env.push((
            "AGENT_WORKER__SLOTS".into(),
            options.worker_slots.to_string(),
        ));
        worker_env.push(("AGENT_WORKER__HEARTBEAT_INTERVAL".into(), "1s".into()));
        worker_env.push((
            "AGENT_WORKER__SANDBOX__ROOT".into(),
            config_dir.join("workspaces").to_string_lossy().into_owned(),
        ));

        let mut stack = Stack {
            orchestrator_url: format!("http://{}", addr(orch_http)),
            monitor_url: format!("http://{}", addr(monitor_http)),
            router_http_url: format!("http://{}", addr(router_http)),
            memory_http_url: format!("http://{}", addr(memory_http)),
            db,
            bus,
            workers: Vec::new(),
            worker_urls: Vec::new(),
            worker_env,
            orchestrator_env: orch_env,
            orchestrator_args,
            services,
            config_dir,
            http: reqwest::Client::new(),
        };
        for url in [
            &stack.router_http_url,
            &stack.orchestrator_url,
            &stack.monitor_url,
        ] {
            wait_http_ok(&format!("{url}/readyz"), Duration::from_secs(30)).await;
        }
        for _ in 0..options.workers {
            stack.start_worker().await;
        }
        stack
    }

    /// What the stack's service `name` (orchestrator, router, memory, monitor) has logged.
    pub fn service_log(&self, name: &str) -> String {
        self.services[self.services_by_name(name)].log_text()
    }

    /// Index of the stack's own service process `name` (orchestrator, router, memory, monitor).
    pub fn services_by_name(&self, name: &str) -> usize {
        self.services
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no service named {name}"))
    }

    /// SIGKILLs one of the stack's services.
    pub fn kill_service(&mut self, index: usize) {
        self.services[index].kill();
    }

    /// Starts another orchestrator replica on the same database and bus and waits until it is
    /// ready. The caller owns the process.
    pub async fn start_orchestrator(&self, name: &str) -> Replica {
        let (http, grpc) = (free_port(), free_port());
        let process = spawn_orchestrator(
            name,
            &self.orchestrator_args,
            &self.orchestrator_env,
            http,
            grpc,
        );
        let http_url = format!("http://{}", addr(http));
        wait_http_ok(&format!("{http_url}/readyz"), Duration::from_secs(30)).await;
        Replica {
            process,
            http_url,
            grpc_url: format!("http://{}", addr(grpc)),
        }
    }

    /// Workers started from now on claim through this orchestrator gRPC address.
    pub fn point_workers_at(&mut self, grpc_url: &str) {
        for (key, value) in &mut self.worker_env {
            if key == "AGENT_WORKER__ORCHESTRATOR_URL" {
                *value = grpc_url.to_owned();
            }
        }
    }

    /// Starts one more agent-worker and waits until it is ready.
    pub async fn start_worker(&mut self) -> usize {
        let port = free_port();
        let mut env = self.worker_env.clone();
        env.push(("AGENT_WORKER__HTTP__ADDR".into(), addr(port)));
        let index = self.workers.len();
        env.push(("AGENT_WORKER__WORKER_ID".into(), format!("worker-{index}")));
        self.workers.push(Process::spawn(
            &format!("agent-worker-{index}"),
            &binary("colony-agent-worker"),
            &[],
            &env,
        ));
        let url = format!("http://{}", addr(port));
        wait_http_ok(&format!("{url}/readyz"), Duration::from_secs(30)).await;
        self.worker_urls.push(url);
        index
    }

    /// Submits a goal; returns the run id.
    pub async fn submit(&self, goal: &str) -> String {
        let response = self
            .http
            .post(format!("{}/v1/runs", self.orchestrator_url))
            .json(&serde_json::json!({ "goal": goal }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
        let run: Value = response.json().await.unwrap();
        run["id"].as_str().unwrap().to_owned()
    }

    pub async fn get_run(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/runs/{id}", self.orchestrator_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the run reaches a final status and returns it.
    pub async fn wait_run(&self, id: &str, timeout: Duration) -> Value {
        eventually(timeout, &format!("run {id} to finish"), || async {
            let run = self.get_run(id).await;
            matches!(
                run["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
            .then_some(run)
        })
        .await
    }

    /// Waits (up to 10 s) until the orchestrator's outbox is empty: the events of the last
    /// transactions are relayed just after they commit, not with them.
    pub async fn wait_outbox_relayed(&self) {
        colony_testkit::eventually(
            Duration::from_secs(10),
            "every orchestrator outbox row relayed",
            || async {
                (self
                    .scalar("SELECT count(*) FROM orchestrator.outbox")
                    .await
                    == 0)
                    .then_some(())
            },
        )
        .await;
    }

    /// One integer from a query on the stack's database (a count, usually).
    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Every message on the events stream under the logical `filter` (`colony.v1.event.run.>`,
    /// say) with its `Nats-Msg-Id`, oldest first: read until none arrives for 500 ms.
    pub async fn events(&self, filter: &str) -> Vec<(String, bytes::Bytes)> {
        let bus = self.bus.connect().await;
        let stream = bus
            .jetstream()
            .get_stream(bus.stream_name(colony_bus::StreamKind::Events))
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: bus.subject(filter),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut events = Vec::new();
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_millis(500), messages.next()).await
        {
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .unwrap();
            events.push((id, message.payload.clone()));
        }
        events
    }

    /// How often each `Nats-Msg-Id` is on the events stream under the logical `filter`.
    pub async fn event_msg_ids(&self, filter: &str) -> HashMap<String, usize> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (id, _) in self.events(filter).await {
            *seen.entry(id).or_default() += 1;
        }
        seen
    }

    pub async fn metrics(&self, base: &str) -> String {
        self.http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Workers first, then the services they call, so nothing logs errors about peers.
        self.workers.clear();
        while let Some(mut process) = self.services.pop() {
            if !std::thread::panicking() {
                process.terminate(Duration::from_secs(10));
            }
        }
        drop(std::fs::remove_dir_all(&self.config_dir));
    }
}

/// A router config with one OpenAI-compatible deployment, `stub` (model `stub-model`, tier
/// `mid`, 1 and 2 US dollars per million prompt and completion tokens), at `base_url`.
pub fn openai_router(base_url: &str) -> String {
    format!(
        r#"
default_deployment = "stub"

[[deployments]]
name = "stub"
provider = "openai"
model = "stub-model"
base_url = "{base_url}"
tier = "mid"
input_price_per_mtok = 1.0
output_price_per_mtok = 2.0
timeout = "5s"
"#
    )
}

/// A router config with one scripted deployment that answers every request with `reply`
/// after `delay` (a humantime duration such as `"150ms"`).
pub fn scripted_router(reply: &str, delay: &str) -> String {
    format!(
        r#"
default_deployment = "scripted"

[[deployments]]
name = "scripted"
provider = "scripted"
model = "scripted"
tier = "mid"
input_price_per_mtok = 0.0
output_price_per_mtok = 0.0
timeout = "30s"

[[deployments.script]]
reply = "{reply}"
delay = "{delay}"
"#
    )
}

/// The sum of every sample of `name` (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
