//! Runs as DAGs against the real PostgreSQL: dependency order and readiness, dependency
//! outputs inline and by reference, both failure policies, and the planner's answers — valid,
//! repaired, or replaced by the template — for each kind of invalid plan.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_orchestrator::config::FailurePolicy;
use colony_orchestrator::plan::PlannedTask;
use colony_orchestrator::roster::{PLANNER, RosterConfig};
use colony_orchestrator::store::{
    Claim, ClaimedTask, NewDagRun, OUTPUT_REF_PREFIX, Report, ReportDecision, ReportOutcome,
    RunView, Store,
};
use colony_orchestrator::topology::{self, Topology};
use colony_proto::{ErrorClass, v1};
use colony_testkit::TestDb;
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

fn diamond() -> Vec<PlannedTask> {
    vec![
        task("start", "researcher", &[]),
        task("left", "writer", &["start"]),
        task("right", "writer", &["start"]),
        task("join", "reviewer", &["left", "right"]),
    ]
}

async fn create(
    store: &Store,
    topology: Topology,
    policy: FailurePolicy,
    tasks: Vec<PlannedTask>,
) -> (Uuid, Vec<Uuid>) {
    let roster = store.roster();
    let goal = "write a report on bees";
    store
        .create_dag_run(&NewDagRun {
            tenant: "acme".into(),
            goal: goal.into(),
            decision: topology::choose(
                goal,
                roster.profile("").unwrap(),
                &roster.dial,
                Some(topology),
            ),
            failure_policy: policy,
            tasks,
            priority: 0,
            budget_micros_usd: None,
        })
        .await
        .unwrap()
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

async fn report(store: &Store, task_id: Uuid, attempt: i32, outcome: ReportOutcome) {
    let decision = store
        .apply_report(&Report {
            verdict: None,
            tenant: "acme".into(),
            task_id,
            attempt,
            worker_id: "w1".into(),
            outcome,
        })
        .await
        .unwrap();
    assert_eq!(decision, ReportDecision::Accepted);
}

fn succeeded(output: &str) -> ReportOutcome {
    ReportOutcome::Succeeded {
        output: output.into(),
        usage: v1::Usage::default(),
    }
}

/// Claims and finishes the current attempt with `output`.
async fn run_task(store: &Store, task_id: Uuid, attempt: i32, output: &str) -> ClaimedTask {
    let claimed = claim(store, task_id, attempt).await.unwrap();
    report(store, task_id, attempt, succeeded(output)).await;
    claimed
}

async fn fail_permanently(store: &Store, task_id: Uuid) {
    claim(store, task_id, 1).await.unwrap();
    report(
        store,
        task_id,
        1,
        ReportOutcome::Failed {
            error_class: ErrorClass::Permanent,
            message: "the model refused".into(),
            usage: v1::Usage::default(),
        },
    )
    .await;
}

async fn run(store: &Store, run_id: Uuid) -> RunView {
    store.get_run("acme", run_id).await.unwrap()
}

fn state(run: &RunView, id: Uuid) -> String {
    run.tasks.iter().find(|t| t.id == id).unwrap().state.clone()
}

/// Dispatch messages written to the outbox for `task_id`.
async fn dispatches(db: &TestDb, task_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox WHERE msg_id LIKE $1")
        .bind(format!("dispatch-{task_id}-%"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_diamond_runs_in_dependency_order() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, ids) = create(&store, Topology::Hybrid, FailurePolicy::FailFast, diamond()).await;
    let [start, left, right, join] = ids[..] else {
        panic!("four tasks: {ids:?}");
    };
    let view = run(&store, run_id).await;
    assert_eq!(view.topology.as_ref().unwrap().topology, "hybrid");
    assert!(view.topology.as_ref().unwrap().overridden);
    assert_eq!(view.failure_policy, "fail_fast");
    assert_eq!(state(&view, start), "queued");
    for id in [left, right, join] {
        assert_eq!(state(&view, id), "pending");
        assert_eq!(
            dispatches(&db, id).await,
            0,
            "nothing dispatched before it is ready"
        );
    }
    let joined = view.tasks.iter().find(|t| t.id == join).unwrap();
    let mut expected = vec![left, right];
    expected.sort();
    assert_eq!(joined.depends_on, expected);
    assert_eq!(joined.key.as_deref(), Some("join"));

    // A dependent is not claimable before its dependencies succeed.
    assert!(claim(&store, left, 1).await.is_err());
    assert!(claim(&store, join, 1).await.is_err());
    let first = run_task(&store, start, 1, "facts about bees").await;
    assert!(first.dependencies.is_empty());

    // Both branches were dispatched in the transaction that finished `start`.
    assert_eq!(dispatches(&db, left).await, 1);
    assert_eq!(dispatches(&db, right).await, 1);
    assert_eq!(dispatches(&db, join).await, 0);
    let left_task = run_task(&store, left, 1, "draft A").await;
    assert_eq!(left_task.dependencies.len(), 1);
    assert_eq!(left_task.dependencies[0].key.as_deref(), Some("start"));
    assert_eq!(
        left_task.dependencies[0].output.as_deref(),
        Some("facts about bees")
    );
    assert!(
        left_task.dependencies[0]
            .message()
            .contains("Output of task \"start\"")
    );
    assert!(
        claim(&store, join, 1).await.is_err(),
        "one branch is not enough"
    );
    run_task(&store, right, 1, "draft B").await;

    let joined = run_task(&store, join, 1, "final report").await;
    let outputs: Vec<_> = joined
        .dependencies
        .iter()
        .map(|d| d.output.clone().unwrap())
        .collect();
    assert_eq!(outputs, ["draft A", "draft B"]);
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "succeeded");
    assert_eq!(view.output.as_deref(), Some("final report"));

    // Order as PostgreSQL recorded it: every task started after its dependencies finished.
    let violations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator.task_dependencies d \
         JOIN orchestrator.tasks t ON t.id = d.task_id \
         JOIN orchestrator.tasks u ON u.id = d.depends_on \
         WHERE t.run_id = $1 AND t.started_at < u.finished_at",
    )
    .bind(run_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(violations, 0);
}

#[tokio::test]
async fn large_outputs_travel_by_reference() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_roster(RosterConfig {
        inline_output_bytes: 16,
        ..RosterConfig::default()
    });
    let (_, ids) = create(
        &store,
        Topology::Hybrid,
        FailurePolicy::FailFast,
        vec![
            task("big", "researcher", &[]),
            task("small", "researcher", &[]),
            task("use", "writer", &["big", "small"]),
        ],
    )
    .await;
    let long = "x".repeat(100);
    run_task(&store, ids[0], 1, &long).await;
    run_task(&store, ids[1], 1, "tiny").await;
    let claimed = claim(&store, ids[2], 1).await.unwrap();
    let big = &claimed.dependencies[0];
    assert_eq!(big.output, None);
    assert_eq!(big.bytes, 100);
    assert!(
        big.message()
            .starts_with(&format!("{OUTPUT_REF_PREFIX}{}\n", ids[0])),
        "{}",
        big.message()
    );
    assert_eq!(claimed.dependencies[1].output.as_deref(), Some("tiny"));
    let (role, output) = store.task_output("acme", ids[0]).await.unwrap();
    assert_eq!((role.as_str(), output), ("researcher", long));
    // Another tenant's, or an unfinished task's output is not handed out.
    assert!(store.task_output("other", ids[0]).await.is_err());
    assert!(store.task_output("acme", ids[2]).await.is_err());
}

#[tokio::test]
async fn fail_fast_fails_the_run_and_cancels_what_has_not_started() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, ids) = create(&store, Topology::Hybrid, FailurePolicy::FailFast, diamond()).await;
    run_task(&store, ids[0], 1, "facts").await;
    fail_permanently(&store, ids[1]).await;
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "failed");
    let failure = view.failure.as_ref().unwrap();
    assert_eq!(failure.task_id, Some(ids[1]));
    assert!(failure.reason.contains("the model refused"), "{failure:?}");
    assert_eq!(state(&view, ids[1]), "dead_lettered");
    assert_eq!(
        state(&view, ids[2]),
        "cancelled",
        "queued sibling cancelled"
    );
    assert_eq!(
        state(&view, ids[3]),
        "cancelled",
        "pending dependent cancelled"
    );
    assert!(claim(&store, ids[2], 1).await.is_err());

    // Re-queueing the dead letter re-opens the run: what the failure stopped runs again.
    store.requeue_task("acme", ids[1]).await.unwrap();
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "running");
    assert_eq!(state(&view, ids[2]), "queued");
    assert_eq!(state(&view, ids[3]), "pending");
    run_task(&store, ids[1], 2, "draft A").await;
    run_task(&store, ids[2], 1, "draft B").await;
    run_task(&store, ids[3], 1, "report").await;
    assert_eq!(run(&store, run_id).await.status, "succeeded");
}

#[tokio::test]
async fn continue_finishes_independent_branches_and_skips_dependents() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, ids) = create(
        &store,
        Topology::Hybrid,
        FailurePolicy::Continue,
        vec![
            task("doomed", "researcher", &[]),
            task("after-doomed", "writer", &["doomed"]),
            task("last", "reviewer", &["after-doomed"]),
            task("fine", "researcher", &[]),
            task("after-fine", "writer", &["fine"]),
        ],
    )
    .await;
    let [doomed, after_doomed, last, fine, after_fine] = ids[..] else {
        panic!("five tasks");
    };
    fail_permanently(&store, doomed).await;
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "running", "an independent branch is left");
    assert_eq!(view.failure_policy, "continue");
    assert_eq!(state(&view, after_doomed), "skipped");
    assert_eq!(state(&view, last), "skipped", "transitively");
    assert_eq!(state(&view, fine), "queued");

    run_task(&store, fine, 1, "fine output").await;
    assert_eq!(run(&store, run_id).await.status, "running");
    run_task(&store, after_fine, 1, "after fine").await;
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "failed", "nothing is left to run");
    let failure = view.failure.as_ref().unwrap();
    assert_eq!(failure.task_id, Some(doomed));
    assert!(failure.reason.contains(&doomed.to_string()), "{failure:?}");
}

fn plan_json(tasks: &[(&str, &str, &[&str])]) -> String {
    let tasks: Vec<_> = tasks
        .iter()
        .map(|(id, role, deps)| {
            serde_json::json!({
                "id": id, "role": role, "instructions": format!("do {id}"), "depends_on": deps
            })
        })
        .collect();
    serde_json::json!({ "tasks": tasks }).to_string()
}

fn valid_plan() -> String {
    plan_json(&[
        ("gather", "researcher", &[]),
        ("draft", "writer", &["gather"]),
    ])
}

/// Each kind of invalid plan: words its validation error contains, and the answer.
fn invalid_plans() -> Vec<(&'static str, String)> {
    vec![
        (
            "form a cycle",
            plan_json(&[("a", "writer", &["b"]), ("b", "writer", &["a"])]),
        ),
        (
            "which is not in the roster",
            plan_json(&[("a", "poet", &[])]),
        ),
        (
            "at most 4 are allowed",
            // Five tasks where the test roster allows four: too large.
            plan_json(&[
                ("a", "writer", &[]),
                ("b", "writer", &[]),
                ("c", "writer", &[]),
                ("d", "writer", &[]),
                ("e", "writer", &[]),
            ]),
        ),
    ]
}

fn planner_roster() -> RosterConfig {
    let mut roster = RosterConfig::default();
    roster.plan_limits.max_tasks = 4;
    roster.max_plan_repairs = 2;
    roster
}

async fn swarm(store: &Store) -> (Uuid, Uuid) {
    let (run_id, ids) = create(
        store,
        Topology::Swarm,
        FailurePolicy::FailFast,
        vec![PlannedTask {
            id: "plan".into(),
            role: PLANNER.into(),
            instructions: "write a report on bees".into(),
            depends_on: Vec::new(),
        }],
    )
    .await;
    (run_id, ids[0])
}

async fn planned_events(db: &TestDb, run_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox WHERE msg_id = $1")
        .bind(format!("run-{run_id}-planned"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_valid_plan_becomes_the_runs_tasks() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_roster(planner_roster());
    let (run_id, planner) = swarm(&store).await;
    run_task(
        &store,
        planner,
        1,
        &format!("```json\n{}\n```", valid_plan()),
    )
    .await;
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "running");
    assert_eq!(view.plan.source.as_deref(), Some("planner"));
    assert!(view.plan.errors.is_empty());
    assert_eq!(planned_events(&db, run_id).await, 1);
    let keys: Vec<_> = view.tasks.iter().map(|t| t.key.clone().unwrap()).collect();
    assert_eq!(keys, ["plan", "gather", "draft"]);
    assert_eq!(view.tasks[1].state, "queued", "no dependency: runs at once");
    assert!(
        view.tasks[1].depends_on.is_empty(),
        "not even on the planner"
    );
    assert_eq!(view.tasks[2].state, "pending");
    run_task(&store, view.tasks[1].id, 1, "facts").await;
    run_task(&store, view.tasks[2].id, 1, "the report").await;
    let view = run(&store, run_id).await;
    assert_eq!(view.status, "succeeded");
    assert_eq!(view.output.as_deref(), Some("the report"));
}

#[tokio::test]
async fn each_kind_of_invalid_plan_is_repaired() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_roster(planner_roster());
    for (kind, answer) in invalid_plans() {
        let (run_id, planner) = swarm(&store).await;
        run_task(&store, planner, 1, &answer).await;
        let view = run(&store, run_id).await;
        assert_eq!(view.tasks.len(), 1, "{kind}: no tasks from an invalid plan");
        assert_eq!(view.tasks[0].state, "queued", "{kind}: sent back");
        assert_eq!(view.tasks[0].attempt, 2);
        assert_eq!(view.plan.errors.len(), 1);
        assert!(
            view.plan.errors[0].contains(kind),
            "{kind}: {:?}",
            view.plan.errors
        );
        assert_eq!(planned_events(&db, run_id).await, 0);

        // The repair request carries the error in the planner's instructions.
        let second = run_task(&store, planner, 2, &valid_plan()).await;
        assert!(
            second.instructions.contains("previous plan was refused"),
            "{}",
            second.instructions
        );
        assert!(
            second.instructions.contains(kind),
            "{}",
            second.instructions
        );
        let view = run(&store, run_id).await;
        assert_eq!(view.plan.source.as_deref(), Some("repaired"), "{kind}");
        assert_eq!(view.tasks.len(), 3, "{kind}");
        assert_eq!(view.tasks[0].state, "succeeded");
        assert_eq!(planned_events(&db, run_id).await, 1);
    }
}

#[tokio::test]
async fn each_kind_of_invalid_plan_is_replaced_by_the_template_after_the_bound() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_roster(planner_roster());
    for (kind, answer) in invalid_plans() {
        let (run_id, planner) = swarm(&store).await;
        // The first answer and two repairs (max_plan_repairs = 2) are all invalid.
        for attempt in 1..=3 {
            run_task(&store, planner, attempt, &answer).await;
        }
        let view = run(&store, run_id).await;
        assert_eq!(view.plan.source.as_deref(), Some("template"), "{kind}");
        assert_eq!(view.plan.errors.len(), 3, "{kind}: {:?}", view.plan.errors);
        assert!(view.plan.errors.iter().all(|e| e.contains(kind)));
        let roles: Vec<_> = view.tasks.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(
            roles,
            ["planner", "researcher", "writer", "reviewer"],
            "{kind}"
        );
        assert_eq!(view.tasks[0].state, "succeeded");
        assert_eq!(view.tasks[0].attempt, 3);
        assert!(
            view.tasks[1]
                .key
                .as_deref()
                .is_some_and(|key| key == "research")
        );
        assert_eq!(view.tasks[1].state, "queued");
        assert_eq!(planned_events(&db, run_id).await, 1);
        let attempts: Vec<String> = sqlx::query_scalar(
            "SELECT outcome FROM orchestrator.task_attempts WHERE task_id = $1 ORDER BY attempt",
        )
        .bind(planner)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(attempts, ["invalid_plan", "invalid_plan", "succeeded"]);
    }
}
