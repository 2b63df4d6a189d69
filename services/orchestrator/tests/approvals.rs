//! The human approval gate against the real PostgreSQL (and, through the REST API, NATS): a
//! task over the spend threshold or of a role that requires approval waits; approving it
//! dispatches it, rejecting it fails it under the run's failure policy; tenants see only their
//! own approvals.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_orchestrator::Config;
use colony_orchestrator::Error;
use colony_orchestrator::approval::{ApprovalPolicy, ApprovalsConfig};
use colony_orchestrator::config::FailurePolicy;
use colony_orchestrator::plan::PlannedTask;
use colony_orchestrator::roster::RosterConfig;
use colony_orchestrator::store::{
    Claim, NewDagRun, Report, ReportDecision, ReportOutcome, RunView, Store,
};
use colony_orchestrator::topology::{self, Topology};
use colony_proto::v1;
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn task(id: &str, role: &str, deps: &[&str]) -> PlannedTask {
    PlannedTask {
        id: id.into(),
        role: role.into(),
        instructions: format!("do {id}"),
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
    }
}

/// A store whose `writer` role requires approval and whose spend threshold is `threshold`.
fn store(db: &TestDb, threshold: Option<f64>) -> Store {
    let mut roster = RosterConfig::default();
    roster.roles.get_mut("writer").unwrap().requires_approval = true;
    Store::new(db.pool.clone())
        .with_roster(roster)
        .with_approvals(ApprovalPolicy {
            spend_threshold_usd: threshold,
            max_tokens: 512,
            default_tier: String::new(),
        })
}

async fn create(
    store: &Store,
    tenant: &str,
    policy: FailurePolicy,
    tasks: Vec<PlannedTask>,
) -> (Uuid, Vec<Uuid>) {
    let roster = store.roster();
    let goal = "write a report on bees";
    store
        .create_dag_run(&NewDagRun {
            tenant: tenant.into(),
            goal: goal.into(),
            decision: topology::choose(
                goal,
                roster.profile("").unwrap(),
                &roster.dial,
                Some(Topology::Hybrid),
            ),
            failure_policy: policy,
            tasks,
            priority: 0,
            budget_micros_usd: None,
        })
        .await
        .unwrap()
}

async fn claim(store: &Store, task_id: Uuid, attempt: i32) -> Result<(), String> {
    match store
        .claim("acme", task_id, attempt, "w1", LEASE)
        .await
        .unwrap()
    {
        Claim::Granted(_) => Ok(()),
        Claim::Refused(reason) => Err(reason),
    }
}

async fn run_task(store: &Store, task_id: Uuid, output: &str) {
    claim(store, task_id, 1).await.unwrap();
    let decision = store
        .apply_report(&Report {
            verdict: None,
            tenant: "acme".into(),
            task_id,
            attempt: 1,
            worker_id: "w1".into(),
            outcome: ReportOutcome::Succeeded {
                output: output.into(),
                usage: v1::Usage::default(),
            },
        })
        .await
        .unwrap();
    assert_eq!(decision, ReportDecision::Accepted);
}

async fn run(store: &Store, run_id: Uuid) -> RunView {
    store.get_run("acme", run_id).await.unwrap()
}

fn state(run: &RunView, id: Uuid) -> String {
    run.tasks.iter().find(|t| t.id == id).unwrap().state.clone()
}

async fn dispatches(db: &TestDb, task_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox WHERE msg_id LIKE $1")
        .bind(format!("dispatch-{task_id}-%"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn events(db: &TestDb, task_id: Uuid, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox WHERE msg_id = $1")
        .bind(format!("task-{task_id}-1-{kind}"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_task_over_the_threshold_waits_until_approved() {
    let db = TestDb::new().await;
    // Any model call costs more than a millionth of a dollar.
    let store = store(&db, Some(0.000_001));
    let (run_id, ids) = create(
        &store,
        "acme",
        FailurePolicy::FailFast,
        vec![task("research", "researcher", &[])],
    )
    .await;
    let id = ids[0];
    assert_eq!(state(&run(&store, run_id).await, id), "awaiting_approval");
    assert_eq!(
        dispatches(&db, id).await,
        0,
        "not dispatched before approval"
    );
    assert_eq!(events(&db, id, "awaiting_approval").await, 1);
    assert!(claim(&store, id, 1).await.is_err(), "not claimable");

    let pending = store.pending_approvals("acme", 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].task.id, id);
    let reason = pending[0].approval_reason.clone().unwrap();
    assert!(reason.contains("above the threshold"), "{reason}");
    // Another tenant neither sees nor decides it.
    assert!(
        store
            .pending_approvals("other", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.approve("other", id).await,
        Err(Error::TaskNotFound(_))
    ));
    assert!(matches!(
        store.reject("other", id, "no").await,
        Err(Error::TaskNotFound(_))
    ));

    let approved = store.approve("acme", id).await.unwrap();
    assert_eq!(approved.state, "queued");
    assert_eq!(dispatches(&db, id).await, 1, "dispatched by the approval");
    assert!(
        store
            .pending_approvals("acme", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.approve("acme", id).await,
        Err(Error::Conflict(_))
    ));
    run_task(&store, id, "facts").await;
    assert_eq!(run(&store, run_id).await.status, "succeeded");
}

#[tokio::test]
async fn a_role_that_requires_approval_waits_when_its_dependencies_succeed() {
    let db = TestDb::new().await;
    let store = store(&db, None);
    let (run_id, ids) = create(
        &store,
        "acme",
        FailurePolicy::FailFast,
        vec![
            task("research", "researcher", &[]),
            task("write", "writer", &["research"]),
        ],
    )
    .await;
    let [research, write] = ids[..] else {
        panic!("two tasks");
    };
    assert_eq!(state(&run(&store, run_id).await, research), "queued");
    assert_eq!(state(&run(&store, run_id).await, write), "pending");
    run_task(&store, research, "facts").await;
    assert_eq!(
        state(&run(&store, run_id).await, write),
        "awaiting_approval"
    );
    assert_eq!(dispatches(&db, write).await, 0);
    store.approve("acme", write).await.unwrap();
    assert_eq!(dispatches(&db, write).await, 1);
    let claimed = match store.claim("acme", write, 1, "w1", LEASE).await.unwrap() {
        Claim::Granted(task) => task,
        Claim::Refused(reason) => panic!("refused: {reason}"),
    };
    assert_eq!(claimed.dependencies[0].output.as_deref(), Some("facts"));
}

#[tokio::test]
async fn rejection_fails_the_task_under_the_runs_policy() {
    let db = TestDb::new().await;
    let store = store(&db, None);

    // Fail fast: the run fails at once and what has not started is cancelled.
    let (run_id, ids) = create(
        &store,
        "acme",
        FailurePolicy::FailFast,
        vec![
            task("write", "writer", &[]),
            task("other", "researcher", &[]),
        ],
    )
    .await;
    let [write, other] = ids[..] else {
        panic!("two tasks");
    };
    let rejected = store.reject("acme", write, "too expensive").await.unwrap();
    assert_eq!(rejected.state, "failed");
    assert_eq!(rejected.error_class.as_deref(), Some("user_fixable"));
    assert_eq!(
        rejected.failure_reason.as_deref(),
        Some("rejected: too expensive")
    );
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "failed");
    let failure = view.failure.as_ref().unwrap();
    assert_eq!(failure.task_id, Some(write));
    assert!(
        failure.reason.contains("too expensive"),
        "{}",
        failure.reason
    );
    assert_eq!(state(&view, other), "cancelled");

    // Continue: the rejected task's dependents are skipped, independent branches go on.
    let (run_id, ids) = create(
        &store,
        "acme",
        FailurePolicy::Continue,
        vec![
            task("write", "writer", &[]),
            task("review", "reviewer", &["write"]),
            task("other", "researcher", &[]),
        ],
    )
    .await;
    let [write, review, other] = ids[..] else {
        panic!("three tasks");
    };
    store.reject("acme", write, "not now").await.unwrap();
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "running");
    assert_eq!(state(&view, review), "skipped");
    assert_eq!(state(&view, other), "queued");
    run_task(&store, other, "facts").await;
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "failed");
    assert_eq!(view.failure.as_ref().unwrap().task_id, Some(write));
}

/// The REST API and its tenant isolation, with the service running in-process.
#[tokio::test]
async fn approvals_through_the_api_are_scoped_to_the_tenant() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let mut config = Config {
        database: db.config(),
        bus: bus.config(),
        http: colony_orchestrator::config::HttpConfig {
            addr: "127.0.0.1:0".into(),
            max_body_bytes: 4096,
        },
        grpc: colony_orchestrator::config::GrpcConfig {
            addr: "127.0.0.1:0".into(),
        },
        approvals: ApprovalsConfig {
            spend_threshold_usd: Some(0.000_001),
        },
        ..Config::default()
    };
    config.runs.tier = String::new();
    let runtime = Runtime::new(CancellationToken::new());
    let handle = colony_orchestrator::spawn(config, &runtime).await.unwrap();
    let url = format!("http://{}", handle.http_addr);
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, tenant: &str, body: Option<Value>| {
        let mut request = http
            .request(method, format!("{url}{path}"))
            .header("x-colony-tenant", tenant);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, created) = send(
        reqwest::Method::POST,
        "/v1/runs",
        "acme",
        Some(json!({ "goal": "a haiku", "topology": "monolith" })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let task_id = created["tasks"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["tasks"][0]["state"], "awaiting_approval");

    let (status, list) = send(reqwest::Method::GET, "/v1/approvals", "acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["approvals"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["approvals"][0]["id"], task_id.as_str());
    assert!(
        list["approvals"][0]["approval_reason"]
            .as_str()
            .unwrap()
            .contains("estimated spend")
    );
    let (_, list) = send(reqwest::Method::GET, "/v1/approvals", "globex", None).await;
    assert_eq!(list["approvals"].as_array().unwrap().len(), 0, "{list}");
    let approve = format!("/v1/tasks/{task_id}/approve");
    let reject = format!("/v1/tasks/{task_id}/reject");
    let (status, _) = send(reqwest::Method::POST, &approve, "globex", None).await;
    assert_eq!(status, 404, "another tenant's task is not found");
    let (status, body) = send(
        reqwest::Method::POST,
        &reject,
        "acme",
        Some(json!({ "reason": " " })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, task) = send(reqwest::Method::POST, &approve, "acme", None).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["state"], "queued");
    let (status, body) = send(
        reqwest::Method::POST,
        &reject,
        "acme",
        Some(json!({ "reason": "late" })),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    runtime.shutdown.cancel();
}
