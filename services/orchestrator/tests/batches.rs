//! Claims and reports in batches against the real PostgreSQL: one transaction answers every
//! request in order, with the same fencing as one at a time.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_orchestrator::config::FailurePolicy;
use colony_orchestrator::plan::PlannedTask;
use colony_orchestrator::store::{
    Claim, ClaimRequest, NewDagRun, Report, ReportDecision, ReportOutcome, Store,
};
use colony_orchestrator::topology::{self, Topology};
use colony_proto::v1;
use colony_testkit::TestDb;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

/// A single-task run of `tenant`; returns its task.
async fn task_of(store: &Store, tenant: &str) -> Uuid {
    let roster = store.roster();
    let (_, ids) = store
        .create_dag_run(&NewDagRun {
            tenant: tenant.into(),
            goal: "count to three".into(),
            decision: topology::choose(
                "count to three",
                roster.profile("").unwrap(),
                &roster.dial,
                Some(Topology::Monolith),
            ),
            failure_policy: FailurePolicy::FailFast,
            tasks: vec![PlannedTask {
                id: "step".into(),
                role: "noop".into(),
                instructions: "count".into(),
                depends_on: Vec::new(),
            }],
            priority: 0,
            budget_micros_usd: None,
        })
        .await
        .unwrap();
    ids[0]
}

fn request(tenant: &str, task_id: Uuid, attempt: i32) -> ClaimRequest {
    ClaimRequest {
        tenant: tenant.into(),
        task_id,
        attempt,
    }
}

fn refusal(claim: &Claim) -> Option<&str> {
    match claim {
        Claim::Granted(_) => None,
        Claim::Refused(reason) => Some(reason),
    }
}

#[tokio::test]
async fn one_claim_call_answers_every_request_in_order() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let a = task_of(&store, "acme").await;
    let b = task_of(&store, "acme").await;
    let other = task_of(&store, "globex").await;
    let unknown = Uuid::new_v4();

    let claims = store
        .claim_many(
            "w1",
            LEASE,
            &[
                request("acme", a, 1),
                request("acme", b, 2),
                request("acme", other, 1),
                request("acme", unknown, 1),
                request("acme", a, 1),
            ],
        )
        .await
        .unwrap();
    assert_eq!(claims.len(), 5);
    let Claim::Granted(granted) = &claims[0] else {
        panic!("the first claim of {a} is granted: {claims:?}");
    };
    assert_eq!((granted.task_id, granted.attempt), (a, 1));
    assert_eq!(granted.role, "noop");
    assert_eq!(
        refusal(&claims[1]),
        Some("stale attempt 2: the current attempt is 1")
    );
    // Another tenant's task does not exist for this tenant.
    assert_eq!(refusal(&claims[2]), Some("unknown task"));
    assert_eq!(refusal(&claims[3]), Some("unknown task"));
    // The same dispatch twice in one call: the first one has it.
    assert_eq!(refusal(&claims[4]), Some("attempt 1 is already running"));

    let (state, owner, attempts): (String, String, i64) = sqlx::query_as(
        "SELECT t.state, t.lease_owner, \
                (SELECT count(*) FROM orchestrator.task_attempts WHERE task_id = t.id) \
         FROM orchestrator.tasks t WHERE t.id = $1",
    )
    .bind(a)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), owner.as_str(), attempts),
        ("running", "w1", 1)
    );
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox WHERE msg_id = $1")
            .bind(format!("task-{a}-1-started"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(started, 1);
    // b was not claimed by the stale request.
    let b_state: String = sqlx::query_scalar("SELECT state FROM orchestrator.tasks WHERE id = $1")
        .bind(b)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(b_state, "queued");

    // In maintenance mode nothing is granted.
    store.set_maintenance(true).await.unwrap();
    let paused = store
        .claim_many("w1", LEASE, &[request("acme", b, 1)])
        .await
        .unwrap();
    assert_eq!(refusal(&paused[0]), Some("maintenance"));
}

#[tokio::test]
async fn reports_in_one_transaction_are_fenced_one_by_one() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let a = task_of(&store, "acme").await;
    let b = task_of(&store, "acme").await;
    let claims = store
        .claim_many("w1", LEASE, &[request("acme", a, 1), request("acme", b, 1)])
        .await
        .unwrap();
    assert!(claims.iter().all(|c| refusal(c).is_none()), "{claims:?}");
    let report = |task_id, worker: &str| Report {
        verdict: None,
        tenant: "acme".into(),
        task_id,
        attempt: 1,
        worker_id: worker.into(),
        outcome: ReportOutcome::Succeeded {
            output: format!("done by {worker}"),
            usage: v1::Usage::default(),
        },
    };
    let decisions = store
        .apply_reports(&[
            report(a, "w1"),
            report(b, "w2"),
            report(a, "w1"),
            report(b, "w1"),
        ])
        .await
        .unwrap();
    assert_eq!(
        decisions,
        [
            ReportDecision::Accepted,
            ReportDecision::Rejected("the reporting worker does not hold the lease".into()),
            ReportDecision::Rejected("attempt 1 is already succeeded".into()),
            ReportDecision::Accepted,
        ]
    );
    let runs: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, output FROM orchestrator.runs ORDER BY created_at")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        runs,
        [
            ("succeeded".to_owned(), Some("done by w1".to_owned())),
            ("succeeded".to_owned(), Some("done by w1".to_owned())),
        ]
    );
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM orchestrator.task_reports")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 4, "every report is recorded");
}

#[tokio::test]
async fn a_batch_of_plain_successes_is_applied_together() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let a = task_of(&store, "acme").await;
    let b = task_of(&store, "acme").await;
    store
        .claim_many("w1", LEASE, &[request("acme", a, 1), request("acme", b, 1)])
        .await
        .unwrap();
    let report = |task_id, tokens| Report {
        verdict: None,
        tenant: "acme".into(),
        task_id,
        attempt: 1,
        worker_id: "w1".into(),
        outcome: ReportOutcome::Succeeded {
            output: format!("{tokens} tokens"),
            usage: v1::Usage {
                prompt_tokens: tokens,
                completion_tokens: 1,
                cost_micros_usd: 5,
            },
        },
    };
    let decisions = store
        .apply_reports(&[report(a, 10), report(b, 20)])
        .await
        .unwrap();
    assert_eq!(
        decisions,
        [ReportDecision::Accepted, ReportDecision::Accepted]
    );
    let runs: Vec<(String, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT r.status, r.output, r.prompt_tokens, r.cost_micros_usd \
         FROM orchestrator.runs r JOIN orchestrator.tasks t ON t.run_id = r.id \
         ORDER BY t.prompt_tokens",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        runs,
        [
            ("succeeded".to_owned(), Some("10 tokens".to_owned()), 10, 5),
            ("succeeded".to_owned(), Some("20 tokens".to_owned()), 20, 5),
        ]
    );
    let (accepted, finished): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orchestrator.task_reports WHERE accepted), \
                (SELECT count(*) FROM orchestrator.task_attempts WHERE outcome = 'succeeded')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((accepted, finished), (2, 2));
    for id in [a, b] {
        let msg_id = format!("task-{id}-1-succeeded");
        let events: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox WHERE msg_id = $1")
                .bind(&msg_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(events, 1, "{msg_id}");
    }
    // A repeat of an applied report is rejected (the batch goes one by one).
    let again = store.apply_reports(&[report(a, 10)]).await.unwrap();
    assert_eq!(
        again,
        [ReportDecision::Rejected(
            "attempt 1 is already succeeded".into()
        )]
    );
}
