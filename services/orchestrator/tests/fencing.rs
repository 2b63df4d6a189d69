//! Claims, heartbeats, reports and the reaper against the real PostgreSQL: the database, not
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]
//! the broker, decides who owns a task, and only the current attempt can finish it.

use std::time::Duration;

use colony_orchestrator::config::{RetryConfig, RetryPolicy};
use colony_orchestrator::store::{Claim, NewRun, Report, ReportDecision, ReportOutcome, Store};
use colony_proto::v1;
use colony_testkit::TestDb;
use uuid::Uuid;

mod common;

const LEASE: Duration = Duration::from_secs(30);

async fn new_run(store: &Store) -> (Uuid, Uuid) {
    store
        .create_run(&NewRun {
            tenant: "acme".into(),
            goal: "write a haiku".into(),
            role: "generalist".into(),
        })
        .await
        .unwrap()
}

fn success(task_id: Uuid, attempt: i32, worker: &str) -> Report {
    Report {
        verdict: None,
        tenant: "acme".into(),
        task_id,
        attempt,
        worker_id: worker.into(),
        outcome: ReportOutcome::Succeeded {
            output: format!("done by {worker}"),
            usage: v1::Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cost_micros_usd: 7,
            },
        },
    }
}

async fn outbox_subjects(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT subject FROM orchestrator.outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_run_is_written_with_its_dispatch_in_one_transaction() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, task_id) = new_run(&store).await;
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "running");
    assert_eq!(run.tasks.len(), 1);
    assert_eq!(run.tasks[0].id, task_id);
    assert_eq!(
        outbox_subjects(&db).await,
        [
            "colony.v1.event.run.created",
            "colony.v1.event.task.queued",
            "colony.v1.task.dispatch.generalist"
        ]
    );
    assert!(store.get_run("other-tenant", run_id).await.is_err());
}

#[tokio::test]
async fn only_one_claim_wins_and_only_its_report_counts() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, task_id) = new_run(&store).await;

    let (a, b) = tokio::join!(
        store.claim("acme", task_id, 1, "worker-a", LEASE),
        store.claim("acme", task_id, 1, "worker-b", LEASE)
    );
    let granted: Vec<&str> = [(a.unwrap(), "worker-a"), (b.unwrap(), "worker-b")]
        .iter()
        .filter_map(|(claim, w)| matches!(claim, Claim::Granted(_)).then_some(*w))
        .collect();
    assert_eq!(granted.len(), 1, "exactly one claim is granted");
    let winner = granted[0];
    let loser = if winner == "worker-a" {
        "worker-b"
    } else {
        "worker-a"
    };

    // A stale attempt number is refused with a reason.
    match store
        .claim("acme", task_id, 2, "worker-c", LEASE)
        .await
        .unwrap()
    {
        Claim::Refused(reason) => assert!(reason.contains("stale attempt"), "{reason}"),
        Claim::Granted(_) => panic!("attempt 2 does not exist yet"),
    }
    assert!(
        store
            .heartbeat("acme", task_id, 1, loser, LEASE)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .heartbeat("acme", task_id, 1, winner, LEASE)
            .await
            .unwrap()
            .is_none()
    );

    assert!(matches!(
        store
            .apply_report(&success(task_id, 1, loser))
            .await
            .unwrap(),
        ReportDecision::Rejected(_)
    ));
    assert_eq!(
        store
            .apply_report(&success(task_id, 1, winner))
            .await
            .unwrap(),
        ReportDecision::Accepted
    );
    // A redelivered copy of the same report changes nothing.
    assert!(matches!(
        store
            .apply_report(&success(task_id, 1, winner))
            .await
            .unwrap(),
        ReportDecision::Rejected(_)
    ));

    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "succeeded");
    assert_eq!(
        run.output.as_deref(),
        Some(format!("done by {winner}").as_str())
    );
    assert_eq!(run.usage.prompt_tokens, 10);
    assert_eq!(run.usage.completion_tokens, 5);
    let accepted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator.task_reports WHERE task_id = $1 AND accepted",
    )
    .bind(task_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(accepted, 1);
    let subjects = outbox_subjects(&db).await;
    assert!(subjects.contains(&"colony.v1.event.task.succeeded".to_owned()));
    assert!(subjects.contains(&"colony.v1.event.run.succeeded".to_owned()));
}

#[tokio::test]
async fn an_expired_lease_is_redispatched_with_a_new_attempt_and_fences_the_old_one() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, task_id) = new_run(&store).await;
    assert!(matches!(
        store
            .claim("acme", task_id, 1, "dead-worker", Duration::from_secs(1))
            .await
            .unwrap(),
        Claim::Granted(_)
    ));
    assert_eq!(store.reap_expired(100).await.unwrap().requeued, 0);
    common::expire_lease(&db, None).await;
    assert_eq!(store.reap_expired(100).await.unwrap().requeued, 1);
    // An expired lease is a transient failure: attempt 2 waits out the transient backoff
    // before the scheduler dispatches it.
    assert_eq!(
        outbox_subjects(&db)
            .await
            .iter()
            .filter(|s| s.ends_with("dispatch.generalist"))
            .count(),
        1
    );
    assert_eq!(store.dispatch_due(100).await.unwrap(), 0);
    sqlx::query("UPDATE orchestrator.tasks SET not_before = now() - interval '1 millisecond'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(store.dispatch_due(100).await.unwrap(), 1);
    let subjects = outbox_subjects(&db).await;
    assert_eq!(
        subjects
            .iter()
            .filter(|s| s.ends_with("dispatch.generalist"))
            .count(),
        2,
        "a second dispatch was queued"
    );

    // The old worker comes back: its heartbeat and report are refused.
    assert!(
        store
            .heartbeat("acme", task_id, 1, "dead-worker", LEASE)
            .await
            .unwrap()
            .is_some()
    );
    assert!(matches!(
        store
            .apply_report(&success(task_id, 1, "dead-worker"))
            .await
            .unwrap(),
        ReportDecision::Rejected(_)
    ));
    assert!(matches!(
        store
            .claim("acme", task_id, 2, "new-worker", LEASE)
            .await
            .unwrap(),
        Claim::Granted(_)
    ));
    assert_eq!(
        store
            .apply_report(&success(task_id, 2, "new-worker"))
            .await
            .unwrap(),
        ReportDecision::Accepted
    );
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "succeeded");
    assert_eq!(run.tasks[0].attempt, 2);
    let outcomes: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT attempt, outcome FROM orchestrator.task_attempts WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(task_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        [
            (1, Some("lease_expired".to_owned())),
            (2, Some("succeeded".to_owned()))
        ]
    );
}

#[tokio::test]
async fn a_task_out_of_attempts_fails_its_run_with_the_reason() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_retries(RetryConfig {
        transient: RetryPolicy {
            max_attempts: 1,
            ..RetryConfig::default().transient
        },
        ..RetryConfig::default()
    });
    let (run_id, task_id) = new_run(&store).await;
    store.claim("acme", task_id, 1, "w", LEASE).await.unwrap();
    common::expire_lease(&db, None).await;
    let reaped = store.reap_expired(100).await.unwrap();
    assert_eq!(reaped.dead_lettered, 1);
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "failed");
    assert_eq!(run.tasks[0].state, "dead_lettered");
    let failure = run.failure.unwrap();
    assert_eq!(failure.task_id, Some(task_id));
    assert!(
        failure.reason.contains("lease expired"),
        "{}",
        failure.reason
    );
}

#[tokio::test]
async fn a_failed_report_records_the_class_and_reason_on_the_run() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, task_id) = new_run(&store).await;
    store.claim("acme", task_id, 1, "w", LEASE).await.unwrap();
    let report = Report {
        verdict: None,
        outcome: ReportOutcome::Failed {
            error_class: colony_proto::ErrorClass::Permanent,
            message: "router: model not found".into(),
            usage: v1::Usage::default(),
        },
        ..success(task_id, 1, "w")
    };
    assert_eq!(
        store.apply_report(&report).await.unwrap(),
        ReportDecision::Accepted
    );
    // Permanent failures are never retried: dead-lettered at once.
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "failed");
    assert_eq!(run.tasks[0].state, "dead_lettered");
    assert_eq!(run.tasks[0].attempt, 1);
    let failure = run.failure.unwrap();
    assert_eq!(failure.task_id, Some(task_id));
    assert_eq!(failure.error_class.as_deref(), Some("permanent"));
    assert!(failure.reason.contains("model not found"));
}

#[tokio::test]
async fn an_unclaimed_attempt_is_dispatched_again() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (_, task_id) = new_run(&store).await;
    assert_eq!(
        store
            .redispatch_unclaimed(Duration::from_secs(60), 100)
            .await
            .unwrap(),
        0
    );
    sqlx::query("UPDATE orchestrator.tasks SET dispatched_at = now() - interval '2 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        store
            .redispatch_unclaimed(Duration::from_secs(60), 100)
            .await
            .unwrap(),
        1
    );
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT msg_id FROM orchestrator.outbox WHERE subject LIKE '%dispatch%' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        ids,
        [
            format!("dispatch-{task_id}-1-1"),
            format!("dispatch-{task_id}-1-2")
        ]
    );
    // Once claimed, it is no longer dispatched.
    store.claim("acme", task_id, 1, "w", LEASE).await.unwrap();
    sqlx::query("UPDATE orchestrator.tasks SET dispatched_at = now() - interval '2 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        store
            .redispatch_unclaimed(Duration::from_secs(60), 100)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn only_the_lease_holder_saves_checkpoints_and_the_next_claim_carries_the_last() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (_, task_id) = new_run(&store).await;
    let Claim::Granted(first) = store.claim("acme", task_id, 1, "w1", LEASE).await.unwrap() else {
        panic!("the first claim is granted");
    };
    assert_eq!(first.checkpoint, None);
    assert_eq!(
        store
            .save_checkpoint("acme", task_id, 1, "w1", b"step one")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .save_checkpoint("acme", task_id, 1, "w1", b"step two")
            .await
            .unwrap(),
        None
    );
    // Another worker, another tenant, another attempt: refused, nothing stored.
    for (tenant, attempt, worker) in [("acme", 1, "w2"), ("other", 1, "w1"), ("acme", 2, "w1")] {
        let refused = store
            .save_checkpoint(tenant, task_id, attempt, worker, b"intruder")
            .await
            .unwrap();
        assert!(refused.is_some(), "{tenant} {attempt} {worker}");
    }
    // The lease runs out: the next attempt's claim carries the last checkpoint saved.
    common::expire_lease(&db, Some(task_id)).await;
    store.reap_expired(10).await.unwrap();
    common::skip_backoff(&db, task_id).await;
    let Claim::Granted(second) = store.claim("acme", task_id, 2, "w2", LEASE).await.unwrap() else {
        panic!("the second attempt is granted");
    };
    assert_eq!(second.checkpoint.as_deref(), Some(&b"step two"[..]));
}

#[tokio::test]
async fn judged_reports_move_their_tiers_measured_quality_and_rejected_ones_do_not() {
    use colony_orchestrator::store::quality::{Tally, Verdict};
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let judged = |task_id, worker: &str, tier: &str, rejections| Report {
        verdict: Some(Verdict {
            tier: tier.into(),
            accepted: rejections < 2,
            rejections,
        }),
        ..success(task_id, 1, worker)
    };
    // On the default tier: accepted as written twice, after a rejection once, still rejected
    // after two once.
    for rejections in [0, 0, 1, 2] {
        let (_, task_id) = new_run(&store).await;
        assert!(matches!(
            store.claim("acme", task_id, 1, "w", LEASE).await.unwrap(),
            Claim::Granted(_)
        ));
        // A worker without the lease: its report is refused and its verdict not counted.
        assert!(matches!(
            store
                .apply_report(&judged(task_id, "intruder", "", 0))
                .await
                .unwrap(),
            ReportDecision::Rejected(_)
        ));
        assert_eq!(
            store
                .apply_report(&judged(task_id, "w", "", rejections))
                .await
                .unwrap(),
            ReportDecision::Accepted
        );
    }
    let totals: (i64, i64) = sqlx::query_as(
        "SELECT judged, accepted_first FROM orchestrator.model_quality WHERE tier = 'default'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(totals, (4, 2));
    let tally = Tally {
        judged: 4,
        accepted_first: 2,
    };
    assert_eq!(store.measured_quality().tally("default"), Some(tally));

    // Another replica reads the totals at start, and its dial uses the blend of the
    // configured 0.7 (weighing as 20 verdicts) and 2 of 4.
    let other = Store::new(db.pool.clone());
    other.load_quality().await.unwrap();
    assert_eq!(other.measured_quality().tally("default"), Some(tally));
    let planned = other
        .plan_run("acme".into(), "write a haiku".into(), None, None, None)
        .unwrap();
    let expected = (0.7 * 20.0 + 2.0) / 24.0;
    assert!(
        (planned.decision.inputs.quality - expected).abs() < 1e-9,
        "{}",
        planned.decision.inputs.quality
    );
}

#[tokio::test]
async fn a_released_lease_is_requeued_by_the_next_reaper_pass_and_only_its_holder_can_release() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (_, task_id) = new_run(&store).await;
    assert!(matches!(
        store.claim("acme", task_id, 1, "w", LEASE).await.unwrap(),
        Claim::Granted(_)
    ));
    // Not the holder, not the attempt: nothing changes.
    assert!(!store.release("acme", task_id, 1, "other").await.unwrap());
    assert!(!store.release("acme", task_id, 2, "w").await.unwrap());
    assert_eq!(store.reap_expired(10).await.unwrap().requeued, 0);
    // The holder gives it back: a 30-s lease ends now, and the reaper queues attempt 2.
    assert!(store.release("acme", task_id, 1, "w").await.unwrap());
    assert_eq!(store.reap_expired(10).await.unwrap().requeued, 1);
    let (state, attempt): (String, i32) =
        sqlx::query_as("SELECT state, attempt FROM orchestrator.tasks WHERE id = $1")
            .bind(task_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempt), ("queued", 2));
    assert!(
        !store.release("acme", task_id, 1, "w").await.unwrap(),
        "already over"
    );
}
