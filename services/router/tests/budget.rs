//! Budgets and the batched ledger against a real PostgreSQL: reservations under concurrency
//! never pass a limit, are all-or-nothing across tenant, run and task, never deadlock; the
//! ledger writer writes every entry with its usage event and settlement, in few transactions.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use colony_proto::prost::Message as _;
use colony_proto::v1;
use colony_router::budget::{self, Budgets, Error, Limit, Request, Reservation, Scope};
use colony_router::config::ProviderKind;
use colony_router::error::ErrorClass;
use colony_router::ledger::{Caller, Closed, LedgerConfig, LedgerEntry, LedgerWriter};
use colony_router::provider::TokenUsage;
use colony_runtime::Runtime;
use colony_testkit::TestDb;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

/// A pool wide enough for the races to be real (the testkit's has 5 connections).
async fn wide_pool(db: &TestDb) -> PgPool {
    PgPoolOptions::new()
        .max_connections(32)
        .connect(&db.url)
        .await
        .unwrap()
}

fn request(tenant: &str, run: Option<(&str, u64)>, task: Option<(&str, u64)>) -> Request {
    let limit = |(id, micros): (&str, u64)| Limit {
        id: id.to_owned(),
        micros,
    };
    Request {
        tenant: tenant.to_owned(),
        run: run.map(limit),
        task: task.map(limit),
    }
}

/// (limit, reserved, spent) of every budget row, by (scope, key).
async fn table(pool: &PgPool) -> BTreeMap<(String, String), (i64, i64, i64)> {
    sqlx::query_as::<_, (String, String, i64, i64, i64)>(
        "SELECT scope, key, limit_micros, reserved_micros, spent_micros FROM router.budgets",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(scope, key, limit, reserved, spent)| ((scope, key), (limit, reserved, spent)))
    .collect()
}

fn row(scope: &str, key: &str) -> (String, String) {
    (scope.to_owned(), key.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_pass_a_limit() {
    let db = TestDb::new().await;
    let pool = wide_pool(&db).await;
    let budgets = Budgets::new();
    // Held, never settled: exactly three reservations of 300 fit a budget of 1000.
    let calls = (0..100).map(|_| {
        let (pool, budgets) = (pool.clone(), budgets.clone());
        async move {
            budgets
                .reserve(&pool, &request("acme", Some(("run-held", 1000)), None), 300)
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let granted = results.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(Error::Exceeded { .. })))
        .count();
    assert_eq!((granted, refused), (3, 97));
    assert_eq!(table(&pool).await[&row("run", "run-held")], (1000, 900, 0));

    // Reserved and settled below the reservation: every grant keeps its 250 spent, so at most
    // three fit (the third needs 2 × 250 + 300 = 800 ≤ 1000, a fourth 3 × 250 + 300 = 1050).
    let calls = (0..100).map(|_| {
        let (pool, budgets) = (pool.clone(), budgets.clone());
        async move {
            let reserved = budgets
                .reserve(&pool, &request("acme", Some(("run-tiny", 1000)), None), 300)
                .await;
            match reserved {
                Ok(Some(reservation)) => {
                    budget::settle(&pool, &reservation, 250).await.unwrap();
                    true
                }
                Ok(None) => panic!("a run budget applies"),
                Err(Error::Exceeded { .. }) => false,
                Err(error) => panic!("{error}"),
            }
        }
    });
    let granted = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|granted| *granted)
        .count();
    let (limit, reserved, spent) = table(&pool).await[&row("run", "run-tiny")];
    assert!((1..=3).contains(&granted), "{granted} granted");
    assert_eq!((limit, reserved, spent), (1000, 0, 250 * granted as i64));
    assert!(spent <= limit + 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_run_and_task_budgets_reserve_together_or_not_at_all() {
    let db = TestDb::new().await;
    let budgets = Budgets::new();
    budgets
        .set_tenant_limits(&db.pool, &[("acme".into(), Some(10_000))])
        .await
        .unwrap();
    let call = request("acme", Some(("run-1", 5_000)), Some(("task-1", 1_000)));
    let first = budgets
        .reserve(&db.pool, &call, 600)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.amount, 600);
    assert_eq!(
        first.rows,
        [
            (Scope::Run, "run-1".to_owned()),
            (Scope::Task, "task-1".to_owned()),
            (Scope::Tenant, "acme".to_owned()),
        ]
    );
    let after_first = table(&db.pool).await;
    assert_eq!(
        after_first,
        BTreeMap::from([
            (row("run", "run-1"), (5_000, 600, 0)),
            (row("task", "task-1"), (1_000, 600, 0)),
            (row("tenant", "acme"), (10_000, 600, 0)),
        ])
    );

    // The task budget cannot take another 600: refused, and no row changes (updated_at
    // included).
    let stamps = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(scope || key || updated_at::text, ',' ORDER BY scope, key) \
             FROM router.budgets",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let before = stamps().await;
    let error = budgets.reserve(&db.pool, &call, 600).await.unwrap_err();
    match &error {
        Error::Exceeded {
            scope,
            key,
            limit,
            spent,
            reserved,
            needed,
        } => assert_eq!(
            (*scope, key.as_str(), *limit, *spent, *reserved, *needed),
            (Scope::Task, "task-1", 1_000, 0, 600, 600)
        ),
        Error::Database(error) => panic!("{error}"),
    }
    assert!(
        error.to_string().contains("400 of 1000 micro-USD left"),
        "{error}"
    );
    assert_eq!(table(&db.pool).await, after_first);
    assert_eq!(stamps().await, before);

    // Another task of the same run fits; a later call naming another run limit is held to
    // the first.
    let other = request("acme", Some(("run-1", 1)), Some(("task-2", 1_000)));
    let second = budgets
        .reserve(&db.pool, &other, 400)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        table(&db.pool).await[&row("run", "run-1")],
        (5_000, 1_000, 0)
    );

    // Settling: the first overran its reservation (the provider ignored max_tokens) and is
    // charged all of it; the second cost less than it reserved.
    budget::settle(&db.pool, &first, 700).await.unwrap();
    budget::settle(&db.pool, &second, 100).await.unwrap();
    assert_eq!(
        table(&db.pool).await,
        BTreeMap::from([
            (row("run", "run-1"), (5_000, 0, 800)),
            (row("task", "task-1"), (1_000, 0, 700)),
            (row("task", "task-2"), (1_000, 0, 100)),
            (row("tenant", "acme"), (10_000, 0, 800)),
        ])
    );

    // Changing a tenant limit keeps what was spent; removing it deletes the budget.
    budgets
        .set_tenant_limits(&db.pool, &[("acme".into(), Some(900))])
        .await
        .unwrap();
    assert_eq!(table(&db.pool).await[&row("tenant", "acme")], (900, 0, 800));
    let refused = budgets
        .reserve(&db.pool, &request("acme", None, None), 101)
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::Exceeded {
                scope: Scope::Tenant,
                ..
            })
        ),
        "{refused:?}"
    );
    budgets
        .set_tenant_limits(&db.pool, &[("acme".into(), None)])
        .await
        .unwrap();
    assert!(!table(&db.pool).await.contains_key(&row("tenant", "acme")));
}

#[tokio::test]
async fn tenant_budgets_read_limit_spent_and_reserved_of_every_tenant() {
    let db = TestDb::new().await;
    let budgets = Budgets::new();
    budgets
        .set_tenant_limits(
            &db.pool,
            &[("acme".into(), Some(10_000)), ("globex".into(), Some(500))],
        )
        .await
        .unwrap();
    let settled = budgets
        .reserve(&db.pool, &request("acme", None, None), 700)
        .await
        .unwrap()
        .unwrap();
    budget::settle(&db.pool, &settled, 400).await.unwrap();
    // In flight: reserved, not yet spent. A run budget is no tenant's.
    budgets
        .reserve(&db.pool, &request("acme", Some(("run-1", 900)), None), 300)
        .await
        .unwrap()
        .unwrap();
    let read = budget::tenant_budgets(&db.pool).await.unwrap();
    assert_eq!(
        read,
        [
            budget::TenantBudget {
                tenant: "acme".into(),
                limit: 10_000,
                spent: 400,
                reserved: 300,
            },
            budget::TenantBudget {
                tenant: "globex".into(),
                limit: 500,
                spent: 0,
                reserved: 0,
            },
        ]
    );
}

#[tokio::test]
async fn calls_without_a_budget_never_touch_the_database() {
    // Nothing listens there: any query would fail.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
        .unwrap();
    let budgets = Budgets::new();
    let reserved = budgets
        .reserve(&pool, &request("acme", None, None), 300)
        .await;
    assert!(matches!(reserved, Ok(None)), "{reserved:?}");
    // The check is real: a named run budget does go to the database.
    let reserved = budgets
        .reserve(&pool, &request("acme", Some(("run", 1)), None), 300)
        .await;
    assert!(matches!(reserved, Err(Error::Database(_))), "{reserved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_budgets_under_concurrency_do_not_deadlock() {
    let db = TestDb::new().await;
    let pool = wide_pool(&db).await;
    let budgets = Budgets::new();
    budgets
        .set_tenant_limits(
            &pool,
            &[
                ("acme".into(), Some(u64::from(u32::MAX))),
                ("globex".into(), Some(u64::from(u32::MAX))),
            ],
        )
        .await
        .unwrap();
    let runtime = Runtime::new(CancellationToken::new());
    // A writer settling in batches, concurrently with reservations on the same rows.
    let writer = LedgerWriter::spawn(
        pool.clone(),
        &LedgerConfig {
            batch: 16,
            flush_interval: Duration::from_millis(2),
            ..LedgerConfig::default()
        },
        &runtime,
    );
    let calls = (0..400u64).map(|i| {
        let (pool, budgets, writer) = (pool.clone(), budgets.clone(), writer.clone());
        async move {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            // Runs shared across tenants' calls and tasks shared across runs: every pair of
            // calls has some budget in common with many others.
            let run = format!("run-{}", i % 3);
            let task = format!("task-{}", i % 5);
            let call = request(tenant, Some((&run, 1 << 40)), Some((&task, 1 << 40)));
            let reservation = budgets.reserve(&pool, &call, 10).await.unwrap().unwrap();
            if i % 3 == 0 {
                budget::settle(&pool, &reservation, 7).await.unwrap();
            } else {
                writer
                    .record(entry(&format!("{i}"), 7, None, Some(reservation)))
                    .await
                    .unwrap();
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(calls))
        .await
        .expect("no call hangs");
    writer.close().await;
    let rows = table(&pool).await;
    let total = |scope: &str| -> i64 {
        rows.iter()
            .filter(|((s, _), _)| s == scope)
            .map(|(_, (_, reserved, spent))| {
                assert_eq!(*reserved, 0, "every reservation settled");
                spent
            })
            .sum()
    };
    for scope in ["tenant", "run", "task"] {
        assert_eq!(total(scope), 400 * 7, "{scope}");
    }
}

fn entry(
    task: &str,
    cost_micros: u64,
    error: Option<ErrorClass>,
    reservation: Option<Reservation>,
) -> LedgerEntry {
    LedgerEntry {
        caller: Caller {
            tenant: "acme".into(),
            run_id: "run-1".into(),
            task_id: task.into(),
            attempt: 2,
        },
        deployment: "canned".into(),
        provider: ProviderKind::Scripted,
        model: "canned-model".into(),
        error,
        usage: TokenUsage {
            prompt: 11,
            completion: 22,
        },
        cost_micros,
        latency: Duration::from_millis(45),
        occurred_at: chrono::Utc::now(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        reservation,
    }
}

/// id, task, outcome, error class, provider, attempt, tokens, cost, latency.
type LedgerRow = (i64, String, String, String, String, i32, i64, i64, i64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_records_every_entry_with_its_event_and_settlement() {
    let db = TestDb::new().await;
    let budgets = Budgets::new();
    let reservation = budgets
        .reserve(
            &db.pool,
            &request("acme", Some(("run-1", 1_000)), None),
            500,
        )
        .await
        .unwrap();
    let runtime = Runtime::new(CancellationToken::new());
    let writer = LedgerWriter::spawn(db.pool.clone(), &LedgerConfig::default(), &runtime);
    for i in 0..20 {
        let error = (i == 7).then_some(ErrorClass::ExternalDegrading);
        let reservation = if i == 3 { reservation.clone() } else { None };
        writer
            .record(entry(&format!("task-{i}"), 100 + i, error, reservation))
            .await
            .unwrap();
    }
    writer.close().await;
    assert_eq!(
        writer.record(entry("late", 1, None, None)).await,
        Err(Closed)
    );

    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT id, task_id, outcome, coalesce(error_class, ''), provider, attempt, \
                prompt_tokens + completion_tokens, cost_micros_usd, latency_ms \
         FROM router.usage_ledger ORDER BY cost_micros_usd",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 20);
    for (i, (_, task, outcome, class, provider, attempt, tokens, cost, latency)) in
        rows.iter().enumerate()
    {
        assert_eq!(task, &format!("task-{i}"));
        let expected = if i == 7 {
            ("error", "external_degrading")
        } else {
            ("ok", "")
        };
        assert_eq!((outcome.as_str(), class.as_str()), expected);
        assert_eq!(
            (provider.as_str(), *attempt, *tokens, *cost, *latency),
            ("scripted", 2, 33, 100 + i as i64, 45)
        );
    }
    let events: Vec<(String, Vec<u8>, Option<String>)> =
        sqlx::query_as("SELECT msg_id, payload, traceparent FROM router.outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 20);
    for (msg_id, payload, traceparent) in &events {
        let record = v1::UsageRecord::decode(payload.as_slice()).unwrap();
        let (id, ..) = rows.iter().find(|row| row.1 == record.task_id).unwrap();
        assert_eq!(msg_id, &format!("usage-{id}"));
        assert_eq!(record.tenant, "acme");
        assert_eq!(record.usage.unwrap().completion_tokens, 22);
        assert_eq!(
            traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "the call's trace, not the writer's"
        );
    }
    assert_eq!(table(&db.pool).await[&row("run", "run-1")], (1_000, 0, 103));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_arriving_together_share_transactions() {
    let db = TestDb::new().await;
    let runtime = Runtime::new(CancellationToken::new());
    // A queue much smaller than the burst: callers wait for room, none is dropped.
    let writer = LedgerWriter::spawn(
        db.pool.clone(),
        &LedgerConfig {
            batch: 256,
            flush_interval: Duration::from_millis(50),
            queue: 64,
        },
        &runtime,
    );
    let writer = Arc::new(writer);
    let calls = (0..500).map(|i| {
        let writer = writer.clone();
        async move { writer.record(entry(&format!("t{i}"), 1, None, None)).await }
    });
    for recorded in futures::future::join_all(calls).await {
        recorded.unwrap();
    }
    writer.close().await;
    let stats = writer.stats();
    assert_eq!(stats.entries, 500);
    assert!(stats.batches <= 25, "{stats:?}");
    let count = |table: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("router.usage_ledger").await, 500);
    assert_eq!(count("router.outbox").await, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_retried_and_nothing_is_lost() {
    let db = TestDb::new().await;
    sqlx::query("ALTER TABLE router.usage_ledger RENAME TO usage_ledger_away")
        .execute(&db.pool)
        .await
        .unwrap();
    let runtime = Runtime::new(CancellationToken::new());
    let writer = LedgerWriter::spawn(db.pool.clone(), &LedgerConfig::default(), &runtime);
    for i in 0..10 {
        writer
            .record(entry(&format!("t{i}"), 1, None, None))
            .await
            .unwrap();
    }
    colony_testkit::eventually(Duration::from_secs(10), "a write failed", || {
        let failures = writer.stats().failures;
        async move { (failures >= 2).then_some(()) }
    })
    .await;
    sqlx::query("ALTER TABLE router.usage_ledger_away RENAME TO usage_ledger")
        .execute(&db.pool)
        .await
        .unwrap();
    writer.close().await;
    assert_eq!(writer.stats().entries, 10);
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM router.usage_ledger")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(written, 10);
}
