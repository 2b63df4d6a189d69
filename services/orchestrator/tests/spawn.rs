//! Running tasks spawning children against the real PostgreSQL (and, for the gRPC method,
//! NATS): fencing, the spawn bounds, children dispatched in the spawning transaction, and a
//! parked parent resumed with a new attempt and its children's outputs.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_orchestrator::Config;
use colony_orchestrator::Error;
use colony_orchestrator::approval::SpawnConfig;
use colony_orchestrator::config::FailurePolicy;
use colony_orchestrator::plan::PlannedTask;
use colony_orchestrator::store::{
    Claim, ClaimedTask, NewDagRun, Report, ReportDecision, ReportOutcome, RunView, Spawn, Spawned,
    Store,
};
use colony_orchestrator::topology::{self, Topology};
use colony_proto::v1::orchestrator_client::OrchestratorClient;
use colony_proto::{ErrorClass, v1};
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn child(key: &str, role: &str, deps: &[&str]) -> PlannedTask {
    PlannedTask {
        id: key.into(),
        role: role.into(),
        instructions: format!("do {key}"),
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
    }
}

fn store(db: &TestDb, max_children: usize, max_depth: u32) -> Store {
    Store::new(db.pool.clone()).with_spawn(SpawnConfig {
        max_children_per_task: max_children,
        max_depth,
    })
}

/// A run of one `generalist` task; returns (run, task).
async fn create(store: &Store, policy: FailurePolicy) -> (Uuid, Uuid) {
    let roster = store.roster();
    let goal = "write a report on bees";
    let (run_id, ids) = store
        .create_dag_run(&NewDagRun {
            tenant: "acme".into(),
            goal: goal.into(),
            decision: topology::choose(
                goal,
                roster.profile("").unwrap(),
                &roster.dial,
                Some(Topology::Monolith),
            ),
            failure_policy: policy,
            tasks: vec![child("answer", "generalist", &[])],
            priority: 0,
            budget_micros_usd: None,
        })
        .await
        .unwrap();
    (run_id, ids[0])
}

async fn claim(store: &Store, task_id: Uuid, attempt: i32) -> Result<ClaimedTask, String> {
    match store
        .claim("acme", task_id, attempt, "w1", LEASE)
        .await
        .unwrap()
    {
        Claim::Granted(task) => Ok(task),
        Claim::Refused(reason) => Err(reason),
    }
}

async fn report(store: &Store, task_id: Uuid, attempt: i32, outcome: ReportOutcome) -> bool {
    store
        .apply_report(&Report {
            verdict: None,
            tenant: "acme".into(),
            task_id,
            attempt,
            worker_id: "w1".into(),
            outcome,
        })
        .await
        .unwrap()
        == ReportDecision::Accepted
}

fn succeeded(output: &str) -> ReportOutcome {
    ReportOutcome::Succeeded {
        output: output.into(),
        usage: v1::Usage::default(),
    }
}

async fn run_task(store: &Store, task_id: Uuid, output: &str) {
    claim(store, task_id, 1).await.unwrap();
    assert!(report(store, task_id, 1, succeeded(output)).await);
}

fn spawn(task_id: Uuid, attempt: i32, children: Vec<PlannedTask>, wait: bool) -> Spawn {
    Spawn {
        tenant: "acme".into(),
        task_id,
        attempt,
        worker_id: "w1".into(),
        children,
        wait,
    }
}

fn key(spawned: &Spawned, key: &str) -> Uuid {
    spawned
        .children
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, id)| *id)
        .unwrap()
}

async fn run(store: &Store, run_id: Uuid) -> RunView {
    store.get_run("acme", run_id).await.unwrap()
}

fn task_state(run: &RunView, id: Uuid) -> (String, i32) {
    let task = run.tasks.iter().find(|t| t.id == id).unwrap();
    (task.state.clone(), task.attempt)
}

async fn dispatches(db: &TestDb, task_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox WHERE msg_id LIKE $1")
        .bind(format!("dispatch-{task_id}-%"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_parked_parent_resumes_with_a_new_attempt_and_its_childrens_outputs() {
    let db = TestDb::new().await;
    let store = store(&db, 8, 2);
    let (run_id, parent) = create(&store, FailurePolicy::FailFast).await;
    claim(&store, parent, 1).await.unwrap();
    let children = vec![
        child("facts", "researcher", &[]),
        child("draft", "writer", &["facts"]),
    ];

    // Fenced like a report: the current attempt and the lease holder only.
    let stale = store
        .spawn_tasks(&spawn(parent, 2, children.clone(), true))
        .await;
    assert!(
        matches!(&stale, Err(Error::Conflict(m)) if m.contains("stale attempt 2")),
        "{stale:?}"
    );
    let other = store
        .spawn_tasks(&Spawn {
            worker_id: "w2".into(),
            ..spawn(parent, 1, children.clone(), true)
        })
        .await;
    assert!(
        matches!(&other, Err(Error::Conflict(m)) if m.contains("lease")),
        "{other:?}"
    );

    let spawned = store
        .spawn_tasks(&spawn(parent, 1, children, true))
        .await
        .unwrap();
    assert!(spawned.parked);
    let (facts, draft) = (key(&spawned, "facts"), key(&spawned, "draft"));
    // The ready child was dispatched by the spawning transaction itself.
    assert_eq!(dispatches(&db, facts).await, 1);
    assert_eq!(dispatches(&db, draft).await, 0);
    let view = run(&store, run_id).await;
    assert_eq!(task_state(&view, parent), ("parked".into(), 1));
    assert_eq!(task_state(&view, facts).0, "queued");
    assert_eq!(task_state(&view, draft).0, "pending");
    assert_eq!(
        view.tasks.iter().find(|t| t.id == parent).unwrap().worker,
        None
    );

    // The parked attempt holds no lease: its worker is told to stop, and its report is refused.
    let lost = store
        .heartbeat("acme", parent, 1, "w1", LEASE)
        .await
        .unwrap();
    assert!(lost.unwrap().contains("parked"));
    assert!(!report(&store, parent, 1, succeeded("too early")).await);

    run_task(&store, facts, "bees pollinate").await;
    assert_eq!(task_state(&run(&store, run_id).await, parent).0, "parked");
    run_task(&store, draft, "a draft about bees").await;
    let view = run(&store, run_id).await;
    assert_eq!(task_state(&view, parent), ("queued".into(), 2));
    assert_eq!(
        dispatches(&db, parent).await,
        2,
        "dispatched again on resume"
    );
    assert!(
        claim(&store, parent, 1).await.is_err(),
        "the old attempt is gone"
    );

    let resumed = claim(&store, parent, 2).await.unwrap();
    let outputs: Vec<(Option<String>, Option<String>)> = resumed
        .dependencies
        .iter()
        .map(|d| (d.key.clone(), d.output.clone()))
        .collect();
    assert_eq!(
        outputs,
        [
            (Some("facts".into()), Some("bees pollinate".into())),
            (Some("draft".into()), Some("a draft about bees".into())),
        ]
    );
    assert!(report(&store, parent, 2, succeeded("the report")).await);
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "succeeded");
    assert_eq!(view.output.as_deref(), Some("the report"));
}

#[tokio::test]
async fn spawns_beyond_the_bounds_or_with_a_cycle_are_refused() {
    let db = TestDb::new().await;
    let store = store(&db, 2, 1);
    let (_, parent) = create(&store, FailurePolicy::FailFast).await;
    claim(&store, parent, 1).await.unwrap();
    let invalid = |result: Result<Spawned, Error>| match result {
        Err(Error::InvalidRequest(message)) => message,
        other => panic!("expected an invalid request, got {other:?}"),
    };

    let message = invalid(
        store
            .spawn_tasks(&spawn(
                parent,
                1,
                vec![
                    child("a", "researcher", &[]),
                    child("b", "researcher", &[]),
                    child("c", "researcher", &[]),
                ],
                false,
            ))
            .await,
    );
    assert!(message.contains("spawn.max_children_per_task"), "{message}");
    assert!(message.contains("3 children"), "{message}");

    let message = invalid(
        store
            .spawn_tasks(&spawn(
                parent,
                1,
                vec![
                    child("a", "researcher", &["b"]),
                    child("b", "researcher", &["a"]),
                ],
                false,
            ))
            .await,
    );
    assert!(message.contains("cycle"), "{message}");

    let message = invalid(
        store
            .spawn_tasks(&spawn(parent, 1, vec![child("a", "poet", &[])], false))
            .await,
    );
    assert!(message.contains("not in the roster"), "{message}");

    // Depth: a child (depth 1) may not spawn grandchildren when spawn.max_depth is 1.
    let spawned = store
        .spawn_tasks(&spawn(
            parent,
            1,
            vec![child("a", "researcher", &[])],
            false,
        ))
        .await
        .unwrap();
    assert!(!spawned.parked);
    let a = key(&spawned, "a");
    claim(&store, a, 1).await.unwrap();
    let message = invalid(
        store
            .spawn_tasks(&spawn(a, 1, vec![child("aa", "researcher", &[])], false))
            .await,
    );
    assert!(message.contains("spawn.max_depth"), "{message}");
    assert!(message.contains("depth 2"), "{message}");

    // The count covers earlier spawns: one more fits, a second does not.
    store
        .spawn_tasks(&spawn(
            parent,
            1,
            vec![child("b", "researcher", &[])],
            false,
        ))
        .await
        .unwrap();
    let message = invalid(
        store
            .spawn_tasks(&spawn(
                parent,
                1,
                vec![child("c", "researcher", &[])],
                false,
            ))
            .await,
    );
    assert!(message.contains("spawn.max_children_per_task"), "{message}");
}

#[tokio::test]
async fn under_continue_a_parent_resumes_and_sees_which_children_failed() {
    let db = TestDb::new().await;
    let store = store(&db, 8, 2);
    let (run_id, parent) = create(&store, FailurePolicy::Continue).await;
    claim(&store, parent, 1).await.unwrap();
    let spawned = store
        .spawn_tasks(&spawn(
            parent,
            1,
            vec![
                child("bad", "researcher", &[]),
                child("good", "researcher", &[]),
            ],
            true,
        ))
        .await
        .unwrap();
    let (bad, good) = (key(&spawned, "bad"), key(&spawned, "good"));
    claim(&store, bad, 1).await.unwrap();
    assert!(
        report(
            &store,
            bad,
            1,
            ReportOutcome::Failed {
                error_class: ErrorClass::Permanent,
                message: "the model refused".into(),
                usage: v1::Usage::default(),
            },
        )
        .await
    );
    assert_eq!(task_state(&run(&store, run_id).await, parent).0, "parked");
    run_task(&store, good, "fine").await;
    assert_eq!(
        task_state(&run(&store, run_id).await, parent),
        ("queued".into(), 2)
    );
    let resumed = claim(&store, parent, 2).await.unwrap();
    let bad_note = resumed
        .dependencies
        .iter()
        .find(|d| d.task_id == bad)
        .and_then(|d| d.output.clone())
        .unwrap();
    assert!(bad_note.contains("dead_lettered"), "{bad_note}");
    assert!(bad_note.contains("the model refused"), "{bad_note}");
}

#[tokio::test]
async fn under_fail_fast_a_failed_child_fails_the_run_and_cancels_the_parent() {
    let db = TestDb::new().await;
    let store = store(&db, 8, 2);
    let (run_id, parent) = create(&store, FailurePolicy::FailFast).await;
    claim(&store, parent, 1).await.unwrap();
    let spawned = store
        .spawn_tasks(&spawn(
            parent,
            1,
            vec![child("bad", "researcher", &[])],
            true,
        ))
        .await
        .unwrap();
    let bad = key(&spawned, "bad");
    claim(&store, bad, 1).await.unwrap();
    report(
        &store,
        bad,
        1,
        ReportOutcome::Failed {
            error_class: ErrorClass::Permanent,
            message: "the model refused".into(),
            usage: v1::Usage::default(),
        },
    )
    .await;
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "failed");
    assert_eq!(task_state(&view, parent).0, "cancelled");
}

/// `SpawnTasks` through the running service's gRPC listener.
#[tokio::test]
async fn spawn_tasks_over_grpc() {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let config = Config {
        database: db.config(),
        bus: bus.config(),
        http: colony_orchestrator::config::HttpConfig {
            addr: "127.0.0.1:0".into(),
            max_body_bytes: 4096,
        },
        grpc: colony_orchestrator::config::GrpcConfig {
            addr: "127.0.0.1:0".into(),
        },
        ..Config::default()
    };
    let runtime = Runtime::new(CancellationToken::new());
    let handle = colony_orchestrator::spawn(config, &runtime).await.unwrap();
    let url = format!("http://{}", handle.http_addr);
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{url}/v1/runs"))
        .header("x-colony-tenant", "acme")
        .json(&json!({ "goal": "a haiku", "topology": "monolith" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = created["id"].as_str().unwrap().to_owned();
    let task_id = created["tasks"][0]["id"].as_str().unwrap().to_owned();
    let mut grpc = OrchestratorClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .unwrap();
    let claimed = grpc
        .claim_task(v1::ClaimTaskRequest {
            tenant: "acme".into(),
            task_id: task_id.clone(),
            attempt: 1,
            worker_id: "w1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(claimed.granted, "{}", claimed.reason);
    let request = |attempt: u32, children: Vec<v1::ChildTask>| v1::SpawnTasksRequest {
        tenant: "acme".into(),
        task_id: task_id.clone(),
        attempt,
        worker_id: "w1".into(),
        children,
        wait: true,
    };
    let one = |key: &str, deps: &[&str]| v1::ChildTask {
        key: key.into(),
        role: "researcher".into(),
        instructions: format!("look into {key}"),
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
    };

    let stale = grpc
        .spawn_tasks(request(2, vec![one("a", &[])]))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert!(
        stale.message().contains("stale attempt"),
        "{}",
        stale.message()
    );
    let cycle = grpc
        .spawn_tasks(request(1, vec![one("a", &["b"]), one("b", &["a"])]))
        .await
        .unwrap_err();
    assert_eq!(cycle.code(), tonic::Code::InvalidArgument);
    assert!(cycle.message().contains("cycle"), "{}", cycle.message());

    let spawned = grpc
        .spawn_tasks(request(1, vec![one("a", &[]), one("b", &["a"])]))
        .await
        .unwrap()
        .into_inner();
    assert!(spawned.parked);
    let keys: Vec<&str> = spawned.children.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    let view: Value = http
        .get(format!("{url}/v1/runs/{run_id}"))
        .header("x-colony-tenant", "acme")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let states: Vec<(&str, &str)> = view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap(), t["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&(task_id.as_str(), "parked")), "{states:?}");
    assert!(
        states.contains(&(spawned.children[0].task_id.as_str(), "queued")),
        "{states:?}"
    );
    runtime.shutdown.cancel();
}
