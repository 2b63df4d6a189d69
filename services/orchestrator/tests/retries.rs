//! Retries per error class, dead letters and re-queue, cancellation and maintenance mode
//! against the real PostgreSQL: every decision is the store's, fenced by attempt.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_orchestrator::Error;
use colony_orchestrator::config::{RetryConfig, RetryPolicy};
use colony_orchestrator::store::{Claim, NewRun, Report, ReportDecision, ReportOutcome, Store};
use colony_proto::{ErrorClass, v1};
use colony_testkit::TestDb;
use uuid::Uuid;

mod common;

const LEASE: Duration = Duration::from_secs(30);

/// The default policies without jitter, so delays are exact.
fn exact() -> RetryConfig {
    let mut config = RetryConfig::default();
    for policy in [
        &mut config.transient,
        &mut config.permanent,
        &mut config.user_fixable,
        &mut config.external_rate_limit,
        &mut config.external_degrading,
    ] {
        policy.jitter = 0.0;
    }
    config
}

async fn new_run(store: &Store, tenant: &str) -> (Uuid, Uuid) {
    store
        .create_run(&NewRun {
            tenant: tenant.into(),
            goal: "write a haiku".into(),
            role: "generalist".into(),
        })
        .await
        .unwrap()
}

fn failure(task_id: Uuid, attempt: i32, worker: &str, class: ErrorClass) -> Report {
    Report {
        verdict: None,
        tenant: "acme".into(),
        task_id,
        attempt,
        worker_id: worker.into(),
        outcome: ReportOutcome::Failed {
            error_class: class,
            message: format!("attempt {attempt} failed ({class})"),
            usage: v1::Usage {
                prompt_tokens: 1,
                completion_tokens: 0,
                cost_micros_usd: 0,
            },
        },
    }
}

fn success(task_id: Uuid, attempt: i32, worker: &str) -> Report {
    Report {
        verdict: None,
        outcome: ReportOutcome::Succeeded {
            output: "done".into(),
            usage: v1::Usage::default(),
        },
        ..failure(task_id, attempt, worker, ErrorClass::Transient)
    }
}

async fn claim(store: &Store, task_id: Uuid, attempt: i32, worker: &str) -> Claim {
    store
        .claim("acme", task_id, attempt, worker, LEASE)
        .await
        .unwrap()
}

async fn granted(store: &Store, task_id: Uuid, attempt: i32, worker: &str) {
    match claim(store, task_id, attempt, worker).await {
        Claim::Granted(_) => {}
        Claim::Refused(reason) => panic!("attempt {attempt} refused: {reason}"),
    }
}

async fn refused(store: &Store, task_id: Uuid, attempt: i32) -> String {
    match claim(store, task_id, attempt, "someone").await {
        Claim::Refused(reason) => reason,
        Claim::Granted(_) => panic!("attempt {attempt} was granted"),
    }
}

/// Makes the task's backoff pass now.

#[derive(Debug, PartialEq)]
struct TaskRow {
    state: String,
    attempt: i32,
    /// Seconds from the failed attempt's end to `not_before` (one transaction, one `now()`).
    delay: Option<f64>,
    dispatched: bool,
}

async fn task_row(db: &TestDb, task_id: Uuid) -> TaskRow {
    let (state, attempt, delay, dispatched): (String, i32, Option<f64>, bool) = sqlx::query_as(
        "SELECT t.state, t.attempt, \
                EXTRACT(EPOCH FROM t.not_before - a.finished_at)::float8, \
                t.dispatched_at IS NOT NULL \
         FROM orchestrator.tasks t \
         LEFT JOIN orchestrator.task_attempts a ON a.task_id = t.id AND a.attempt = t.attempt - 1 \
         WHERE t.id = $1",
    )
    .bind(task_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    TaskRow {
        state,
        attempt,
        delay,
        dispatched,
    }
}

async fn msg_ids(db: &TestDb, like: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT msg_id FROM orchestrator.outbox WHERE msg_id LIKE $1 ORDER BY id")
        .bind(like)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn each_class_retries_with_its_own_backoff_until_its_budget_is_spent() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_retries(exact());
    // (class, delays before attempts 2..=max, in seconds)
    let table: [(ErrorClass, &[f64]); 5] = [
        (ErrorClass::Transient, &[1.0, 2.0, 4.0, 8.0]),
        (
            ErrorClass::ExternalRateLimit,
            &[5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0],
        ),
        (ErrorClass::ExternalDegrading, &[2.0, 4.0, 8.0, 16.0]),
        (ErrorClass::Permanent, &[]),
        (ErrorClass::UserFixable, &[]),
    ];
    for (class, delays) in table {
        let (run_id, task_id) = new_run(&store, "acme").await;
        let max = delays.len() as i32 + 1;
        for attempt in 1..=max {
            if attempt > 1 {
                // Not dispatched nor claimable before its backoff passed.
                assert!(!task_row(&db, task_id).await.dispatched);
                assert_eq!(store.dispatch_due(100).await.unwrap(), 0);
                let reason = refused(&store, task_id, attempt).await;
                assert!(reason.contains("not due"), "{reason}");
                common::skip_backoff(&db, task_id).await;
                assert_eq!(store.dispatch_due(100).await.unwrap(), 1);
                assert!(task_row(&db, task_id).await.dispatched);
            }
            granted(&store, task_id, attempt, "w").await;
            assert_eq!(
                store
                    .apply_report(&failure(task_id, attempt, "w", class))
                    .await
                    .unwrap(),
                ReportDecision::Accepted
            );
            let row = task_row(&db, task_id).await;
            if attempt < max {
                let expected = delays[attempt as usize - 1];
                assert_eq!(row.state, "queued", "{class} attempt {attempt}");
                assert_eq!(row.attempt, attempt + 1, "{class}");
                let delay = row.delay.unwrap();
                assert!(
                    (delay - expected).abs() < 1e-3,
                    "{class} after attempt {attempt}: {delay}s, expected {expected}s"
                );
                // The old attempt is fenced.
                let late = store
                    .apply_report(&success(task_id, attempt, "w"))
                    .await
                    .unwrap();
                assert!(matches!(late, ReportDecision::Rejected(_)), "{late:?}");
            } else {
                assert_eq!(row.state, "dead_lettered", "{class}");
                assert_eq!(row.attempt, max, "{class}");
            }
        }
        let run = store.get_run("acme", run_id).await.unwrap();
        assert_eq!(run.status, "failed", "{class}");
        let failure = run.failure.unwrap();
        assert_eq!(failure.task_id, Some(task_id));
        assert_eq!(failure.error_class.as_deref(), Some(class.as_str()));
        assert!(
            failure.reason.contains(&format!("attempt {max} failed")),
            "{}",
            failure.reason
        );
        // Usage of every attempt adds up.
        assert_eq!(run.usage.prompt_tokens, i64::from(max));
        assert_eq!(
            msg_ids(&db, &format!("task-{task_id}-%-requeued"))
                .await
                .len(),
            delays.len(),
            "{class}"
        );
        assert_eq!(
            msg_ids(&db, &format!("task-{task_id}-{max}-dead_lettered")).await,
            [format!("task-{task_id}-{max}-dead_lettered")]
        );
        assert_eq!(
            msg_ids(&db, &format!("dispatch-{task_id}-%")).await.len(),
            max as usize,
            "one dispatch per attempt"
        );
    }
}

#[tokio::test]
async fn jitter_spreads_retries_below_the_plain_delay() {
    let db = TestDb::new().await;
    let mut retries = RetryConfig::default();
    retries.transient.jitter = 0.5;
    let store = Store::new(db.pool.clone()).with_retries(retries);
    let mut delays = Vec::new();
    for _ in 0..20 {
        let (_, task_id) = new_run(&store, "acme").await;
        granted(&store, task_id, 1, "w").await;
        store
            .apply_report(&failure(task_id, 1, "w", ErrorClass::Transient))
            .await
            .unwrap();
        delays.push(task_row(&db, task_id).await.delay.unwrap());
    }
    for delay in &delays {
        assert!((0.5 - 1e-3..=1.0 + 1e-3).contains(delay), "{delays:?}");
    }
    let spread = delays.iter().cloned().fold(f64::MIN, f64::max)
        - delays.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 0.01, "jitter spreads the delays: {delays:?}");
}

#[tokio::test]
async fn an_expired_lease_counts_as_transient() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_retries(RetryConfig {
        transient: RetryPolicy {
            max_attempts: 2,
            ..exact().transient
        },
        ..exact()
    });
    let (run_id, task_id) = new_run(&store, "acme").await;
    for attempt in 1..=2 {
        if attempt > 1 {
            common::skip_backoff(&db, task_id).await;
            store.dispatch_due(100).await.unwrap();
        }
        granted(&store, task_id, attempt, "vanishing").await;
        common::expire_lease(&db, Some(task_id)).await;
        let reaped = store.reap_expired(100).await.unwrap();
        if attempt == 1 {
            assert_eq!(reaped.requeued, 1);
            let row = task_row(&db, task_id).await;
            assert_eq!((row.state.as_str(), row.attempt), ("queued", 2));
            assert!((row.delay.unwrap() - 1.0).abs() < 1e-3, "{row:?}");
        } else {
            assert_eq!(reaped.dead_lettered, 1);
        }
    }
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "failed");
    assert_eq!(run.tasks[0].state, "dead_lettered");
    assert_eq!(run.tasks[0].error_class.as_deref(), Some("transient"));
    let outcomes: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT outcome FROM orchestrator.task_attempts WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(task_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        [Some("lease_expired".into()), Some("lease_expired".into())]
    );
}

#[tokio::test]
async fn a_dead_letter_is_requeued_with_a_fresh_budget_and_reopens_its_run() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_retries(RetryConfig {
        transient: RetryPolicy {
            max_attempts: 2,
            ..exact().transient
        },
        ..exact()
    });
    let (run_id, task_id) = new_run(&store, "acme").await;
    let fail_budget = |first: i32| {
        let store = store.clone();
        let db = &db;
        async move {
            for attempt in first..first + 2 {
                if attempt > first {
                    common::skip_backoff(db, task_id).await;
                    store.dispatch_due(100).await.unwrap();
                }
                granted(&store, task_id, attempt, "w").await;
                store
                    .apply_report(&failure(task_id, attempt, "w", ErrorClass::Transient))
                    .await
                    .unwrap();
            }
        }
    };
    fail_budget(1).await;
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "failed");

    // Listed for its tenant only, with class and reason.
    let dead = store.dead_letters("acme", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, task_id);
    assert_eq!(dead[0].run_id, run_id);
    assert_eq!(dead[0].state, "dead_lettered");
    assert_eq!(dead[0].error_class.as_deref(), Some("transient"));
    assert!(
        dead[0]
            .failure_reason
            .as_deref()
            .unwrap()
            .contains("attempt 2 failed")
    );
    assert!(dead[0].dead_lettered_at.is_some());
    assert!(store.dead_letters("other", 10).await.unwrap().is_empty());
    assert!(matches!(
        store.requeue_task("other", task_id).await,
        Err(Error::TaskNotFound(_))
    ));

    let task = store.requeue_task("acme", task_id).await.unwrap();
    assert_eq!((task.state.as_str(), task.attempt), ("queued", 3));
    assert!(task.error_class.is_none() && task.dead_lettered_at.is_none());
    assert!(store.dead_letters("acme", 10).await.unwrap().is_empty());
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "running");
    assert!(run.failure.is_none() && run.finished_at.is_none());
    // Dispatched at once, as attempt 3.
    assert_eq!(
        msg_ids(&db, &format!("dispatch-{task_id}-3-%")).await,
        [format!("dispatch-{task_id}-3-1")]
    );
    // Only a dead letter can be re-queued.
    assert!(matches!(
        store.requeue_task("acme", task_id).await,
        Err(Error::Conflict(_))
    ));

    // A fresh budget: two more attempts before it is dead-lettered again.
    fail_budget(3).await;
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "failed");
    assert_eq!(run.tasks[0].attempt, 4);
    store.requeue_task("acme", task_id).await.unwrap();
    granted(&store, task_id, 5, "w").await;
    assert_eq!(
        store.apply_report(&success(task_id, 5, "w")).await.unwrap(),
        ReportDecision::Accepted
    );
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "succeeded");
    assert_eq!(run.output.as_deref(), Some("done"));
    // Each outcome of the re-opened run is announced under its own msg id.
    assert_eq!(
        msg_ids(&db, &format!("run-{run_id}-%")).await,
        [
            format!("run-{run_id}-created"),
            format!("run-{run_id}-failed"),
            format!("run-{run_id}-failed-r2"),
            format!("run-{run_id}-succeeded-r3"),
        ]
    );
}

#[tokio::test]
async fn cancelling_stops_queued_tasks_at_once() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, task_id) = new_run(&store, "acme").await;
    let run = store.cancel_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "cancelled");
    assert_eq!(run.tasks[0].state, "cancelled");
    assert!(run.finished_at.is_some());
    assert_eq!(refused(&store, task_id, 1).await, "cancelled");
    // Idempotent.
    let again = store.cancel_run("acme", run_id).await.unwrap();
    assert_eq!(again.status, "cancelled");
    assert_eq!(
        msg_ids(&db, &format!("%{run_id}-cancelled")).await,
        [format!("run-{run_id}-cancelled")]
    );
    assert_eq!(
        msg_ids(&db, &format!("task-{task_id}-%-cancelled")).await,
        [format!("task-{task_id}-1-cancelled")]
    );
    assert!(matches!(
        store.cancel_run("other", run_id).await,
        Err(Error::RunNotFound(_))
    ));
    assert!(matches!(
        store.cancel_run("acme", Uuid::now_v7()).await,
        Err(Error::RunNotFound(_))
    ));

    // A task waiting out a retry backoff is queued too: cancelled at once.
    let (run_id, task_id) = new_run(&store, "acme").await;
    granted(&store, task_id, 1, "w").await;
    store
        .apply_report(&failure(task_id, 1, "w", ErrorClass::Transient))
        .await
        .unwrap();
    let run = store.cancel_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "cancelled");
    assert_eq!(run.tasks[0].state, "cancelled");
    assert_eq!(store.dispatch_due(100).await.unwrap(), 0);
}

#[tokio::test]
async fn a_running_task_hears_of_the_cancellation_at_its_next_heartbeat() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (run_id, task_id) = new_run(&store, "acme").await;
    granted(&store, task_id, 1, "w").await;
    let run = store.cancel_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "cancelling");
    assert_eq!(run.tasks[0].state, "cancelling");
    assert!(
        msg_ids(&db, &format!("run-{run_id}-cancelled"))
            .await
            .is_empty(),
        "not cancelled while its worker runs"
    );
    assert_eq!(
        store.cancel_run("acme", run_id).await.unwrap().status,
        "cancelling"
    );

    let heartbeat = store
        .heartbeat("acme", task_id, 1, "w", LEASE)
        .await
        .unwrap();
    assert_eq!(heartbeat.as_deref(), Some("cancelled"));
    let run = store.get_run("acme", run_id).await.unwrap();
    assert_eq!(run.status, "cancelled");
    assert_eq!(run.tasks[0].state, "cancelled");
    assert_eq!(
        msg_ids(&db, &format!("run-{run_id}-cancelled")).await.len(),
        1
    );
    // Told again if it asks again; its late report is rejected.
    assert_eq!(
        store
            .heartbeat("acme", task_id, 1, "w", LEASE)
            .await
            .unwrap()
            .as_deref(),
        Some("cancelled")
    );
    assert_eq!(
        store.apply_report(&success(task_id, 1, "w")).await.unwrap(),
        ReportDecision::Rejected("cancelled".into())
    );
    let outcome: Option<String> = sqlx::query_scalar(
        "SELECT outcome FROM orchestrator.task_attempts WHERE task_id = $1 AND attempt = 1",
    )
    .bind(task_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(outcome.as_deref(), Some("cancelled"));
    assert_eq!(
        store.get_run("acme", run_id).await.unwrap().output,
        None,
        "the late report changed nothing"
    );
}

#[tokio::test]
async fn a_cancelled_task_also_stops_on_a_late_report_or_an_expired_lease() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());

    // Finished before its next heartbeat: the report is rejected and the run cancelled.
    let (run_id, task_id) = new_run(&store, "acme").await;
    granted(&store, task_id, 1, "w").await;
    store.cancel_run("acme", run_id).await.unwrap();
    assert_eq!(
        store.apply_report(&success(task_id, 1, "w")).await.unwrap(),
        ReportDecision::Rejected("cancelled".into())
    );
    assert_eq!(
        store.get_run("acme", run_id).await.unwrap().status,
        "cancelled"
    );

    // Its worker died: the reaper ends it.
    let (run_id, task_id) = new_run(&store, "acme").await;
    granted(&store, task_id, 1, "w").await;
    store.cancel_run("acme", run_id).await.unwrap();
    common::expire_lease(&db, Some(task_id)).await;
    assert_eq!(store.reap_expired(100).await.unwrap().cancelled, 1);
    assert_eq!(
        store.get_run("acme", run_id).await.unwrap().status,
        "cancelled"
    );

    // A finished run cannot be cancelled.
    let (run_id, task_id) = new_run(&store, "acme").await;
    granted(&store, task_id, 1, "w").await;
    store.apply_report(&success(task_id, 1, "w")).await.unwrap();
    match store.cancel_run("acme", run_id).await {
        Err(Error::Conflict(message)) => assert!(message.contains("succeeded"), "{message}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn maintenance_pauses_dispatch_and_claims_and_resume_dispatches_again() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let (_, queued) = new_run(&store, "acme").await;
    let (running_run, running) = new_run(&store, "acme").await;
    granted(&store, running, 1, "w").await;

    assert!(!store.maintenance().await.unwrap().paused);
    assert!(store.set_maintenance(true).await.unwrap().paused);
    assert!(store.maintenance().await.unwrap().paused);

    // Nothing new is dispatched, nothing claimed.
    let (_, created) = new_run(&store, "acme").await;
    assert!(
        msg_ids(&db, &format!("dispatch-{created}-%"))
            .await
            .is_empty()
    );
    assert_eq!(refused(&store, queued, 1).await, "maintenance");
    assert_eq!(refused(&store, created, 1).await, "maintenance");
    assert_eq!(store.dispatch_due(100).await.unwrap(), 0);
    sqlx::query("UPDATE orchestrator.tasks SET dispatched_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        store
            .redispatch_unclaimed(Duration::from_secs(1), 100)
            .await
            .unwrap(),
        0
    );
    // In-flight work finishes.
    assert!(
        store
            .heartbeat("acme", running, 1, "w", LEASE)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.apply_report(&success(running, 1, "w")).await.unwrap(),
        ReportDecision::Accepted
    );
    assert_eq!(
        store.get_run("acme", running_run).await.unwrap().status,
        "succeeded"
    );
    // Pausing twice changes nothing.
    assert!(store.set_maintenance(true).await.unwrap().paused);

    // Resume: both queued tasks are dispatched again at once, and can be claimed.
    assert!(!store.set_maintenance(false).await.unwrap().paused);
    assert_eq!(
        msg_ids(&db, &format!("dispatch-{queued}-%")).await,
        [
            format!("dispatch-{queued}-1-1"),
            format!("dispatch-{queued}-1-2")
        ]
    );
    assert_eq!(
        msg_ids(&db, &format!("dispatch-{created}-%")).await,
        [format!("dispatch-{created}-1-1")]
    );
    granted(&store, queued, 1, "w").await;
    granted(&store, created, 1, "w").await;
    // Resuming twice dispatches nothing more.
    store.set_maintenance(false).await.unwrap();
    assert_eq!(
        msg_ids(&db, "dispatch-%").await.len(),
        4,
        "queued ×2, running ×1, created ×1"
    );
}
