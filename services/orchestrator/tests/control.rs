//! Run controls through the running service (REST, gRPC and the bus, in-process against real
//! PostgreSQL and NATS): retries dispatched by the scheduler pass, dead letters and re-queue,
//! cancellation reaching a running worker, maintenance mode, and recovery on start.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_bus::{StreamKind, subjects};
use colony_orchestrator::Config;
use colony_orchestrator::config::RetryConfig;
use colony_orchestrator::store::{Claim, NewRun, Store};
use colony_proto::v1;
use colony_proto::v1::orchestrator_client::OrchestratorClient;
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb, eventually};
use futures::TryStreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod common;

const WAIT: Duration = Duration::from_secs(15);

/// Fast, exact retries: 200 ms base, no jitter.
fn fast_retries() -> RetryConfig {
    let mut retries = RetryConfig::default();
    retries.transient.backoff_base = Duration::from_millis(200);
    retries.transient.jitter = 0.0;
    retries
}

fn config(db: &TestDb, bus: &TestBus) -> Config {
    Config {
        database: db.config(),
        bus: bus.config(),
        http: colony_orchestrator::config::HttpConfig {
            addr: "127.0.0.1:0".into(),
            max_body_bytes: 4096,
        },
        grpc: colony_orchestrator::config::GrpcConfig {
            addr: "127.0.0.1:0".into(),
        },
        leases: colony_orchestrator::config::LeaseConfig {
            reap_interval: Duration::from_millis(100),
            ..Default::default()
        },
        retries: fast_retries(),
        ..Config::default()
    }
}

struct Service {
    url: String,
    grpc: OrchestratorClient<tonic::transport::Channel>,
    http: reqwest::Client,
    runtime: Runtime,
    handle: Option<colony_orchestrator::Handle>,
}

impl Service {
    async fn start(config: Config) -> Service {
        let runtime = Runtime::new(CancellationToken::new());
        let handle = colony_orchestrator::spawn(config, &runtime).await.unwrap();
        let grpc = OrchestratorClient::connect(format!("http://{}", handle.grpc_addr))
            .await
            .unwrap();
        Service {
            url: format!("http://{}", handle.http_addr),
            grpc,
            http: reqwest::Client::new(),
            runtime,
            handle: Some(handle),
        }
    }

    /// Stops it as SIGTERM would, and waits until it has.
    async fn stop(mut self) {
        self.runtime.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.wait().await.unwrap();
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .timeout(Duration::from_secs(10));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Submits a goal; returns (run id, task id).
    async fn submit(&self) -> (String, String) {
        let (status, run) = self.post("/v1/runs", json!({"goal": "say hello"})).await;
        assert_eq!(status, 201, "{run}");
        (
            run["id"].as_str().unwrap().to_owned(),
            run["tasks"][0]["id"].as_str().unwrap().to_owned(),
        )
    }

    async fn claim(&self, task_id: &str, attempt: u32) -> v1::ClaimTaskResponse {
        self.grpc
            .clone()
            .claim_task(v1::ClaimTaskRequest {
                tenant: "default".into(),
                task_id: task_id.into(),
                attempt,
                worker_id: "w".into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn heartbeat(&self, task_id: &str, attempt: u32) -> v1::HeartbeatTaskResponse {
        self.grpc
            .clone()
            .heartbeat_task(v1::HeartbeatTaskRequest {
                tenant: "default".into(),
                task_id: task_id.into(),
                attempt,
                worker_id: "w".into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn run_status(&self, run_id: &str) -> String {
        let (_, run) = self.get(&format!("/v1/runs/{run_id}")).await;
        run["status"].as_str().unwrap_or_default().to_owned()
    }

    async fn wait_status(&self, run_id: &str, status: &str) -> Value {
        eventually(WAIT, &format!("run {run_id} {status}"), || async {
            let (_, run) = self.get(&format!("/v1/runs/{run_id}")).await;
            (run["status"] == status).then_some(run)
        })
        .await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.runtime.shutdown.cancel();
    }
}

/// Publishes a worker's report the way an agent-worker does.
async fn report(bus: &TestBus, task_id: &str, attempt: u32, outcome: v1::task_report::Outcome) {
    let name = match outcome {
        v1::task_report::Outcome::Succeeded(_) => "succeeded",
        v1::task_report::Outcome::Failed(_) => "failed",
    };
    bus.connect()
        .await
        .publish(
            &subjects::report(name),
            &format!("report-{task_id}-{attempt}"),
            &v1::TaskReport {
                tenant: "default".into(),
                task_id: task_id.into(),
                attempt,
                worker_id: "w".into(),
                outcome: Some(outcome),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

fn succeeded() -> v1::task_report::Outcome {
    v1::task_report::Outcome::Succeeded(v1::TaskSucceeded {
        output: "hello".into(),
        ..Default::default()
    })
}

fn failed(class: v1::ErrorClass) -> v1::task_report::Outcome {
    v1::task_report::Outcome::Failed(v1::TaskFailed {
        error_class: class as i32,
        message: format!("router: {}", class.as_str_name()),
        usage: None,
    })
}

async fn scalar<T>(db: &TestDb, sql: &str) -> T
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test]
async fn a_transient_failure_is_retried_after_its_backoff_and_a_permanent_one_dead_lettered() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let service = Service::start(config(&db, &bus)).await;

    let (run_id, task_id) = service.submit().await;
    assert!(service.claim(&task_id, 1).await.granted);
    report(&bus, &task_id, 1, failed(v1::ErrorClass::Transient)).await;
    // The scheduler pass dispatches attempt 2 through the outbox once 200 ms have passed.
    eventually(WAIT, "attempt 2 dispatched", || async {
        // Dispatched (attempt 2 stamped) and relayed (its outbox row is gone once sent).
        let sent: bool = sqlx::query_scalar(
            "SELECT t.attempt = 2 AND t.dispatched_at IS NOT NULL \
                    AND NOT EXISTS (SELECT 1 FROM orchestrator.outbox WHERE msg_id = $2) \
             FROM orchestrator.tasks t WHERE t.id = $1::uuid",
        )
        .bind(&task_id)
        .bind(format!("dispatch-{task_id}-2-1"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        sent.then_some(())
    })
    .await;
    let (_, run) = service.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(run["status"], "running", "{run}");
    assert_eq!(run["tasks"][0]["attempt"], 2, "{run}");
    assert_eq!(run["tasks"][0]["error_class"], "transient", "{run}");
    assert!(service.claim(&task_id, 2).await.granted);

    // A permanent failure is not retried: dead-lettered, the run failed.
    report(&bus, &task_id, 2, failed(v1::ErrorClass::Permanent)).await;
    let run = service.wait_status(&run_id, "failed").await;
    assert_eq!(run["failure"]["error_class"], "permanent", "{run}");
    assert_eq!(run["failure"]["task_id"], task_id.as_str(), "{run}");
    assert_eq!(run["tasks"][0]["state"], "dead_lettered", "{run}");

    let (status, dead) = service.get("/v1/dead-letters").await;
    assert_eq!(status, 200);
    assert_eq!(dead["dead_letters"][0]["id"], task_id.as_str(), "{dead}");
    assert_eq!(
        dead["dead_letters"][0]["error_class"], "permanent",
        "{dead}"
    );

    // Re-queued: attempt 3, its run running again; only once.
    let (status, task) = service
        .post(&format!("/v1/tasks/{task_id}/requeue"), json!({}))
        .await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["state"], "queued");
    assert_eq!(task["attempt"], 3);
    assert_eq!(service.run_status(&run_id).await, "running");
    let (status, error) = service
        .post(&format!("/v1/tasks/{task_id}/requeue"), json!({}))
        .await;
    assert_eq!(status, 409, "{error}");
    assert_eq!(error["error"]["code"], "conflict");
    for id in [Uuid::now_v7().to_string(), "not-a-uuid".to_owned()] {
        let (status, error) = service
            .post(&format!("/v1/tasks/{id}/requeue"), json!({}))
            .await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["error"]["code"], "not_found");
    }
    let (_, dead) = service.get("/v1/dead-letters").await;
    assert_eq!(dead["dead_letters"], json!([]));

    assert!(service.claim(&task_id, 3).await.granted);
    report(&bus, &task_id, 3, succeeded()).await;
    let run = service.wait_status(&run_id, "succeeded").await;
    assert_eq!(run["output"], "hello");

    let text = service
        .http
        .get(format!("{}/metrics", service.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "colony_orchestrator_retries_total",
        "colony_orchestrator_dead_letters_total",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
}

#[tokio::test]
async fn cancellation_reaches_a_running_worker_within_a_heartbeat() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let service = Service::start(config(&db, &bus)).await;

    // Queued: cancelled at once.
    let (queued_run, queued_task) = service.submit().await;
    let (status, run) = service
        .post(&format!("/v1/runs/{queued_run}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "cancelled");
    assert!(!service.claim(&queued_task, 1).await.granted);

    // Running: cancelling until its worker's next heartbeat.
    let (run_id, task_id) = service.submit().await;
    let claim = service.claim(&task_id, 1).await;
    assert!(claim.granted, "{}", claim.reason);
    assert!(service.heartbeat(&task_id, 1).await.keep_going);
    let (status, run) = service
        .post(&format!("/v1/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "cancelling");
    assert_eq!(run["tasks"][0]["state"], "cancelling");
    let beat = service.heartbeat(&task_id, 1).await;
    assert!(!beat.keep_going);
    assert_eq!(beat.reason, "cancelled");
    assert_eq!(service.run_status(&run_id).await, "cancelled");
    // Idempotent.
    let (status, run) = service
        .post(&format!("/v1/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!((status, run["status"].as_str()), (200, Some("cancelled")));

    // Its late report is rejected.
    report(&bus, &task_id, 1, succeeded()).await;
    let reason: String = eventually(WAIT, "late report recorded", || async {
        sqlx::query_scalar::<_, String>(
            "SELECT reason FROM orchestrator.task_reports WHERE task_id = $1::uuid AND NOT accepted",
        )
        .bind(&task_id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(reason, "cancelled");
    let (_, run) = service.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["output"], Value::Null);
    // Both cancelled runs announced on the bus.
    let bus_client = bus.connect().await;
    let events = bus_client
        .jetstream()
        .get_stream(bus_client.stream_name(StreamKind::Events))
        .await
        .unwrap();
    let cancelled_subject = bus_client.subject("colony.v1.event.run.cancelled");
    eventually(WAIT, "two run.cancelled events", || async {
        let mut info = events.info_with_subjects(&cancelled_subject).await.unwrap();
        let mut count = 0;
        while let Some((_, n)) = info.try_next().await.unwrap() {
            count += n;
        }
        (count == 2).then_some(())
    })
    .await;

    // Finished, unknown and other tenants' runs.
    let (done_run, done_task) = service.submit().await;
    assert!(service.claim(&done_task, 1).await.granted);
    report(&bus, &done_task, 1, succeeded()).await;
    service.wait_status(&done_run, "succeeded").await;
    let (status, error) = service
        .post(&format!("/v1/runs/{done_run}/cancel"), json!({}))
        .await;
    assert_eq!(status, 409, "{error}");
    assert_eq!(error["error"]["code"], "conflict");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already succeeded")
    );
    let (status, _) = service
        .post(&format!("/v1/runs/{}/cancel", Uuid::now_v7()), json!({}))
        .await;
    assert_eq!(status, 404);
    let other = service
        .http
        .post(format!("{}/v1/runs/{done_run}/cancel", service.url))
        .header("x-colony-tenant", "someone-else")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
}

#[tokio::test]
async fn maintenance_mode_pauses_claims_until_resumed() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let service = Service::start(config(&db, &bus)).await;
    let (status, state) = service.get("/v1/admin/maintenance").await;
    assert_eq!((status, state["paused"].as_bool()), (200, Some(false)));

    let (running_run, running_task) = service.submit().await;
    assert!(service.claim(&running_task, 1).await.granted);

    let (status, state) = service
        .post("/v1/admin/maintenance", json!({"paused": true}))
        .await;
    assert_eq!((status, state["paused"].as_bool()), (200, Some(true)));
    let (_, state) = service.get("/v1/admin/maintenance").await;
    assert_eq!(state["paused"], true);

    let (_, paused_task) = service.submit().await;
    let claim = service.claim(&paused_task, 1).await;
    assert!(!claim.granted);
    assert_eq!(claim.reason, "maintenance");
    let dispatches: i64 = scalar(&db, "SELECT sum(dispatches)::int8 FROM orchestrator.tasks").await;
    assert_eq!(dispatches, 1, "only the first run was dispatched");
    // In-flight work finishes.
    assert!(service.heartbeat(&running_task, 1).await.keep_going);
    report(&bus, &running_task, 1, succeeded()).await;
    service.wait_status(&running_run, "succeeded").await;

    for body in [
        json!({"paused": "yes"}),
        json!({}),
        json!({"paused": true, "x": 1}),
    ] {
        let (status, error) = service.post("/v1/admin/maintenance", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], "invalid_request", "{error}");
    }

    let (status, state) = service
        .post("/v1/admin/maintenance", json!({"paused": false}))
        .await;
    assert_eq!((status, state["paused"].as_bool()), (200, Some(false)));
    let sent: bool = scalar(&db, "SELECT sum(dispatches) = 2 FROM orchestrator.tasks").await;
    assert!(sent, "the paused run was dispatched on resume");
    assert!(service.claim(&paused_task, 1).await.granted);
    let text = service
        .http
        .get(format!("{}/metrics", service.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("colony_orchestrator_maintenance"), "{text}");
}

/// An orchestrator stops, leaving a worker's attempt running; meanwhile the worker dies and a
/// run is written whose outbox rows nobody relays. A new orchestrator on the same database
/// re-queues the orphaned attempt before it serves, and publishes every unsent row.
#[tokio::test]
async fn a_new_orchestrator_recovers_orphaned_attempts_and_unsent_outbox_rows() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let first = Service::start(config(&db, &bus)).await;
    let (orphan_run, orphan_task) = first.submit().await;
    assert!(first.claim(&orphan_task, 1).await.granted);
    first.stop().await;

    let orphan_task = Uuid::parse_str(&orphan_task).unwrap();
    common::expire_lease(&db, Some(orphan_task)).await;
    let store = Store::new(db.pool.clone());
    let runs: Vec<(Uuid, Uuid)> = futures::future::try_join_all(
        [
            "written just before the crash",
            "dispatched just before the crash",
        ]
        .map(|goal| {
            let store = &store;
            async move {
                let run = NewRun {
                    tenant: "default".into(),
                    goal: goal.into(),
                    role: "generalist".into(),
                };
                store.create_run(&run).await
            }
        }),
    )
    .await
    .unwrap();
    let [(unsent_run, unsent_task), (lost_run, lost_task)] = runs[..] else {
        panic!("two runs")
    };
    // A dispatcher pass publishes after its commit: the second run's dispatch was lost in a
    // crash between the two (its outbox row is removed to model that).
    sqlx::query("DELETE FROM orchestrator.outbox WHERE msg_id LIKE 'dispatch-' || $1 || '-%'")
        .bind(lost_task.to_string())
        .execute(&db.pool)
        .await
        .unwrap();
    let unsent: i64 = scalar(&db, "SELECT count(*) FROM orchestrator.outbox").await;
    // The two new runs' five rows, and perhaps the claim's `started` event if the first
    // orchestrator stopped before relaying it.
    assert!(unsent >= 5, "{unsent}");

    // Its reaper loop first runs 2 s after start: whatever is done before that is recovery.
    let mut second_config = config(&db, &bus);
    second_config.leases.reap_interval = Duration::from_secs(2);
    let second = Service::start(second_config).await;
    // Re-queued before the new orchestrator served anything.
    let (state, attempt): (String, i32) =
        sqlx::query_as("SELECT state, attempt FROM orchestrator.tasks WHERE id = $1")
            .bind(orphan_task)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempt), ("queued", 2));
    let outcome: Option<String> = sqlx::query_scalar(
        "SELECT outcome FROM orchestrator.task_attempts WHERE task_id = $1 AND attempt = 1",
    )
    .bind(orphan_task)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(outcome.as_deref(), Some("lease_expired"));

    // Everything relayed: the unsent rows and attempt 2's dispatch after its backoff.
    eventually(WAIT, "every outbox row sent", || async {
        let (unsent, dispatched): (i64, bool) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orchestrator.outbox), \
                    (SELECT attempt = 2 AND dispatched_at IS NOT NULL \
                     FROM orchestrator.tasks WHERE id = $1)",
        )
        .bind(orphan_task)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (unsent == 0 && dispatched).then_some(())
    })
    .await;
    let bus_client = bus.connect().await;
    let mut stream = bus_client
        .jetstream()
        .get_stream(bus_client.stream_name(StreamKind::Dispatch))
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        4,
        "orphan attempts 1 and 2, the unsent run's dispatch and the lost one sent again at start"
    );

    // Both runs go on: claims work on the new orchestrator.
    assert!(second.claim(&orphan_task.to_string(), 2).await.granted);
    assert!(second.claim(&unsent_task.to_string(), 1).await.granted);
    assert!(second.claim(&lost_task.to_string(), 1).await.granted);
    assert!(matches!(
        store
            .claim("default", orphan_task, 1, "w", Duration::from_secs(5))
            .await
            .unwrap(),
        Claim::Refused(_)
    ));
    assert_eq!(second.run_status(&orphan_run).await, "running");
    assert_eq!(second.run_status(&unsent_run.to_string()).await, "running");
    assert_eq!(second.run_status(&lost_run.to_string()).await, "running");
}
