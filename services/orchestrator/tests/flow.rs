//! Flow control against real PostgreSQL (and NATS for the API): fairness across tenants,
//! priority within one, the in-flight cap, the run-rate limit and the bounded queue.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_orchestrator::Config;
use colony_orchestrator::config::FailurePolicy;
use colony_orchestrator::flow::{LimitsConfig, Overflow, RateLimiter};
use colony_orchestrator::plan::PlannedTask;
use colony_orchestrator::store::{
    Claim, NewDagRun, NewRun, Report, ReportDecision, ReportOutcome, Store,
};
use colony_orchestrator::topology::{self, Topology};
use colony_proto::v1;
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn run_of(store: &Store, tenant: &str, priority: i16) -> (Uuid, Uuid) {
    let roster = store.roster();
    let goal = "write a haiku";
    let (run_id, tasks) = store
        .create_dag_run(&NewDagRun {
            tenant: tenant.into(),
            goal: goal.into(),
            decision: topology::choose(
                goal,
                roster.profile("").unwrap(),
                &roster.dial,
                Some(Topology::Monolith),
            ),
            failure_policy: FailurePolicy::FailFast,
            tasks: vec![PlannedTask {
                id: "answer".into(),
                role: "generalist".into(),
                instructions: goal.into(),
                depends_on: Vec::new(),
            }],
            priority,
            budget_micros_usd: None,
        })
        .await
        .unwrap();
    (run_id, tasks[0])
}

async fn set_paused(db: &TestDb, paused: bool) {
    // Directly, so that resuming does not run the dispatcher passes itself.
    sqlx::query(
        "INSERT INTO orchestrator.maintenance (singleton, paused) VALUES (true, $1) \
         ON CONFLICT (singleton) DO UPDATE SET paused = $1",
    )
    .bind(paused)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn dispatched(db: &TestDb, task_id: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orchestrator.outbox WHERE msg_id LIKE $1)")
        .bind(format!("dispatch-{task_id}-%"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn in_flight(db: &TestDb, tenant: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator.tasks WHERE tenant = $1 \
         AND state IN ('queued', 'running') AND dispatched_at IS NOT NULL",
    )
    .bind(tenant)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_flooded_tenant_does_not_delay_another_tenants_first_task() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    store.apply_limits().await.unwrap();
    let limits = LimitsConfig::default();
    // Tenant A: one run, then 10,000 more ready tasks in one insert (the shape of
    // `insert_tasks`, waiting for the dispatcher), all older than B's.
    let (run_a, _) = run_of(&store, "tenant-a", 0).await;
    sqlx::query(
        "INSERT INTO orchestrator.tasks \
             (id, run_id, tenant, role, instructions, plan_key, state, dispatched_at, \
              dispatches, ready_at) \
         SELECT gen_random_uuid(), $1, 'tenant-a', 'generalist', 'bulk ' || n, 'bulk-' || n, \
                'queued', NULL, 0, now() - interval '1 hour' + n * interval '1 ms' \
         FROM generate_series(1, 10000) AS n",
    )
    .bind(run_a)
    .execute(&db.pool)
    .await
    .unwrap();
    // B's run arrives while nothing may be dispatched inline, so the dispatcher decides.
    set_paused(&db, true).await;
    let (_, task_b) = run_of(&store, "tenant-b", 0).await;
    set_paused(&db, false).await;
    assert!(!dispatched(&db, task_b).await);

    // A FIFO pass of 100 would take A's 100 oldest; the fair pass takes B's first.
    let first = store.dispatch_due(100).await.unwrap();
    assert!(first > 0);
    assert!(
        dispatched(&db, task_b).await,
        "B's first task dispatched in the first dispatcher pass"
    );
    assert!(
        in_flight(&db, "tenant-a").await <= 1 + i64::from(limits.per_tenant_per_pass),
        "A got at most its share of the pass"
    );

    // Further passes fill A up to its in-flight cap and no further.
    let mut passes = 0;
    while store.dispatch_due(100).await.unwrap() > 0 {
        passes += 1;
        assert!(passes < 50, "the passes stop at the cap");
    }
    assert_eq!(
        in_flight(&db, "tenant-a").await,
        i64::from(limits.max_in_flight_per_tenant)
    );
    // A new tenant still gets through at once (inline) while A is at its cap.
    let (_, task_c) = run_of(&store, "tenant-c", 0).await;
    assert!(dispatched(&db, task_c).await);
}

fn success(task_id: Uuid, worker: &str) -> Report {
    Report {
        verdict: None,
        tenant: "acme".into(),
        task_id,
        attempt: 1,
        worker_id: worker.into(),
        outcome: ReportOutcome::Succeeded {
            output: "done".into(),
            usage: v1::Usage::default(),
        },
    }
}

#[tokio::test]
async fn a_tenants_waiting_tasks_go_out_highest_priority_first() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_limits(LimitsConfig {
        max_in_flight_per_tenant: 1,
        ..LimitsConfig::default()
    });
    store.apply_limits().await.unwrap();
    set_paused(&db, true).await;
    let (_, low) = run_of(&store, "acme", -5).await;
    let (_, first_normal) = run_of(&store, "acme", 0).await;
    let (_, high) = run_of(&store, "acme", 5).await;
    let (_, second_normal) = run_of(&store, "acme", 0).await;
    set_paused(&db, false).await;

    let mut order = Vec::new();
    for _ in 0..4 {
        // One in flight at a time: each pass dispatches exactly the next one.
        assert_eq!(store.dispatch_due(100).await.unwrap(), 1);
        assert_eq!(store.dispatch_due(100).await.unwrap(), 0, "the cap holds");
        let mut sent = Vec::new();
        for id in [low, first_normal, high, second_normal] {
            if !order.contains(&id) && dispatched(&db, id).await {
                sent.push(id);
            }
        }
        assert_eq!(sent.len(), 1);
        let sent = sent[0];
        order.push(sent);
        let claim = store
            .claim("acme", sent, 1, "w1", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Granted(_)));
        let decision = store.apply_report(&success(sent, "w1")).await.unwrap();
        assert_eq!(decision, ReportDecision::Accepted);
    }
    assert_eq!(order, vec![high, first_normal, second_normal, low]);
}

#[tokio::test]
async fn the_in_flight_cap_holds_for_new_runs() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone()).with_limits(LimitsConfig {
        max_in_flight_per_tenant: 2,
        ..LimitsConfig::default()
    });
    store.apply_limits().await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (_, task) = store
            .create_run(&NewRun {
                tenant: "acme".into(),
                goal: "write a haiku".into(),
                role: "generalist".into(),
            })
            .await
            .unwrap();
        tasks.push(task);
    }
    let mut sent = 0;
    for task in &tasks {
        sent += i64::from(dispatched(&db, *task).await);
    }
    assert_eq!(sent, 2, "the first two dispatched at once, the rest wait");
    assert_eq!(store.dispatch_due(100).await.unwrap(), 0);
    assert_eq!(in_flight(&db, "acme").await, 2);
    // Another tenant is not held back by acme's cap.
    let (_, other) = run_of(&store, "other", 0).await;
    assert!(dispatched(&db, other).await);
}

struct Api {
    url: String,
    client: reqwest::Client,
    runtime: Runtime,
    _db: TestDb,
    _bus: TestBus,
}

async fn start(limits: LimitsConfig) -> Api {
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
        limits,
        ..Config::default()
    };
    let runtime = Runtime::new(CancellationToken::new());
    let handle = colony_orchestrator::spawn(config, &runtime).await.unwrap();
    Api {
        url: format!("http://{}", handle.http_addr),
        client: reqwest::Client::new(),
        runtime,
        _db: db,
        _bus: bus,
    }
}

impl Api {
    async fn post(&self, tenant: &str, body: Value) -> (u16, Option<String>, Value) {
        let response = self
            .client
            .post(format!("{}/v1/runs", self.url))
            .header("x-colony-tenant", tenant)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            status,
            retry_after,
            response.json().await.unwrap_or(Value::Null),
        )
    }

    async fn get(&self, tenant: &str, run_id: &str) -> Value {
        self.client
            .get(format!("{}/v1/runs/{run_id}", self.url))
            .header("x-colony-tenant", tenant)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.runtime.shutdown.cancel();
    }
}

fn monolith(priority: i16) -> Value {
    json!({"goal": "write a haiku", "topology": "monolith", "priority": priority})
}

#[tokio::test]
async fn creating_runs_too_fast_gets_429_with_retry_after() {
    let api = start(LimitsConfig {
        runs_per_second_per_tenant: 0.1,
        run_burst_per_tenant: 2,
        ..LimitsConfig::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(api.post("acme", monolith(0)).await.0, 201);
    }
    let (status, retry_after, body) = api.post("acme", monolith(0)).await;
    assert_eq!(status, 429);
    let seconds: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=10).contains(&seconds), "{seconds}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // The limit is per tenant.
    assert_eq!(api.post("other", monolith(0)).await.0, 201);
    // A priority out of range is a bad request.
    assert_eq!(api.post("other", monolith(11)).await.0, 400);
}

#[tokio::test]
async fn replicas_share_one_run_rate_bucket_per_tenant() {
    let db = TestDb::new().await;
    let limits = LimitsConfig {
        runs_per_second_per_tenant: 1.0,
        run_burst_per_tenant: 3,
        ..LimitsConfig::default()
    };
    // Two replicas' limiters on one database: together they allow the burst, not twice it.
    let (a, b) = (
        RateLimiter::new(&limits, db.pool.clone()),
        RateLimiter::new(&limits, db.pool.clone()),
    );
    assert!(a.acquire("acme").await.is_ok());
    assert!(b.acquire("acme").await.is_ok());
    assert!(a.acquire("acme").await.is_ok());
    let wait = b.acquire("acme").await.unwrap_err();
    assert!(wait <= Duration::from_secs(1), "{wait:?}");
    assert!(a.acquire("acme").await.is_err());
    // Another tenant has its own bucket.
    assert!(b.acquire("other").await.is_ok());
    // A second later (the bucket's clock moved back a second) one more token is there.
    sqlx::query(
        "UPDATE orchestrator.run_tokens SET at = at - interval '1 second' WHERE tenant = 'acme'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(b.acquire("acme").await.is_ok());
    assert!(a.acquire("acme").await.is_err());

    // Many requests at once on one replica wait for one fetch instead of each taking a
    // chunk: the burst serves them all.
    let herd = std::sync::Arc::new(RateLimiter::new(
        &LimitsConfig {
            runs_per_second_per_tenant: 200.0,
            run_burst_per_tenant: 100,
            ..LimitsConfig::default()
        },
        db.pool.clone(),
    ));
    let granted = futures::future::join_all((0..100).map(|_| {
        let herd = herd.clone();
        async move { herd.acquire("herd").await.is_ok() }
    }))
    .await;
    assert!(granted.iter().all(|ok| *ok), "{granted:?}");

    // Rate 0: no limit, and nothing written.
    let unlimited = RateLimiter::new(
        &LimitsConfig {
            runs_per_second_per_tenant: 0.0,
            ..LimitsConfig::default()
        },
        db.pool.clone(),
    );
    for _ in 0..100 {
        assert!(unlimited.acquire("free").await.is_ok());
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator.run_tokens WHERE tenant = 'free'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_full_queue_rejects_new_runs() {
    let api = start(LimitsConfig {
        max_queued_per_tenant: 2,
        overflow: Overflow::Reject,
        ..LimitsConfig::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(api.post("acme", monolith(0)).await.0, 201);
    }
    let (status, retry_after, body) = api.post("acme", monolith(10)).await;
    assert_eq!(status, 429);
    assert!(retry_after.is_some());
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(api.post("other", monolith(0)).await.0, 201);
}

#[tokio::test]
async fn a_full_queue_sheds_its_lowest_priority_run_for_a_higher_one() {
    let api = start(LimitsConfig {
        max_queued_per_tenant: 2,
        overflow: Overflow::ShedLowest,
        ..LimitsConfig::default()
    })
    .await;
    let (status, _, normal) = api.post("acme", monolith(0)).await;
    assert_eq!(status, 201);
    let (status, _, low) = api.post("acme", monolith(-5)).await;
    assert_eq!(status, 201);
    // Nothing queued is below -5: refused.
    let (status, _, body) = api.post("acme", monolith(-5)).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "queue_full");
    // A higher priority sheds the lowest.
    let (status, _, _) = api.post("acme", monolith(3)).await;
    assert_eq!(status, 201);
    let shed = api.get("acme", low["id"].as_str().unwrap()).await;
    assert_eq!(shed["status"], "cancelled");
    assert_eq!(shed["failure"]["reason"], "shed");
    let kept = api.get("acme", normal["id"].as_str().unwrap()).await;
    assert_eq!(kept["status"], "running");
}

/// The work gauges as a Prometheus scrape would show them after `work` is recorded.
fn render_gauges(
    gauges: &mut colony_orchestrator::metrics::WorkGauges,
    work: &colony_orchestrator::store::ActiveWork,
) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || gauges.record(work));
    handle.render()
}

#[tokio::test]
async fn work_gauges_follow_each_tenants_queue_and_read_zero_once_it_drains() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    set_paused(&db, true).await;
    let (_, a1) = run_of(&store, "tenant-a", 0).await;
    run_of(&store, "tenant-a", 0).await;
    let (_, b1) = run_of(&store, "tenant-b", 0).await;
    sqlx::query(
        "UPDATE orchestrator.tasks SET ready_at = now() - interval '90 seconds' WHERE id = $1",
    )
    .bind(a1)
    .execute(&db.pool)
    .await
    .unwrap();

    let mut gauges = colony_orchestrator::metrics::WorkGauges::default();
    let work = store.active_work().await.unwrap();
    let text = render_gauges(&mut gauges, &work);
    assert!(
        text.contains(r#"colony_orchestrator_queue_depth{tenant="tenant-a",role="generalist"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"colony_orchestrator_queue_depth{tenant="tenant-b",role="generalist"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"colony_orchestrator_active_tasks{tenant="tenant-a",state="queued"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"colony_orchestrator_active_runs{tenant="tenant-b"} 1"#),
        "{text}"
    );
    let age: f64 = text
        .lines()
        .find(|line| {
            line.starts_with(
                r#"colony_orchestrator_queue_oldest_age_seconds{tenant="tenant-a",role="generalist"}"#,
            )
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no age for tenant-a:\n{text}"));
    assert!((90.0..120.0).contains(&age), "{age}");

    // B's task is claimed and finishes: its run ends and its gauges go to 0, A's stay.
    set_paused(&db, false).await;
    store.dispatch_due(100).await.unwrap();
    let claim = store
        .claim("tenant-b", b1, 1, "worker-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Granted(_)));
    let work = store.active_work().await.unwrap();
    let text = render_gauges(&mut gauges, &work);
    assert!(
        text.contains(r#"colony_orchestrator_queue_depth{tenant="tenant-b",role="generalist"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(r#"colony_orchestrator_active_tasks{tenant="tenant-b",state="running"} 1"#),
        "{text}"
    );
    let report = Report {
        tenant: "tenant-b".into(),
        ..success(b1, "worker-1")
    };
    assert_eq!(
        store.apply_report(&report).await.unwrap(),
        ReportDecision::Accepted
    );
    let work = store.active_work().await.unwrap();
    let text = render_gauges(&mut gauges, &work);
    for zero in [
        r#"colony_orchestrator_active_tasks{tenant="tenant-b",state="running"} 0"#,
        r#"colony_orchestrator_active_runs{tenant="tenant-b"} 0"#,
    ] {
        assert!(text.contains(zero), "{zero}:\n{text}");
    }
    assert!(
        text.contains(r#"colony_orchestrator_queue_depth{tenant="tenant-a",role="generalist"} 2"#),
        "{text}"
    );
}
