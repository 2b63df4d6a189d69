//! Cron schedules against real PostgreSQL with a controlled clock: DST changes, missed-firing
//! policies after an outage, exactly-once firing with two loops on one database, and the
//! `/v1/schedules` API with its validation errors.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone as _, Utc};
use colony_orchestrator::Config;
use colony_orchestrator::cron::{
    CronConfig, CronSpec, FireKind, ManualClock, Missed, NewSchedule, ScheduleRow, Scheduler,
    Schedules,
};
use colony_orchestrator::store::Store;
use colony_runtime::Runtime;
use colony_testkit::{TestBus, TestDb, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const GRACE: Duration = Duration::from_secs(60);
const ONE_MINUTE: TimeDelta = TimeDelta::minutes(1);
const FIVE_MINUTES: TimeDelta = TimeDelta::minutes(5);

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn new_schedule(tenant: &str, name: &str, cron: &str, zone: &str, missed: Missed) -> NewSchedule {
    NewSchedule {
        tenant: tenant.into(),
        name: name.into(),
        cron: cron.into(),
        timezone: zone.into(),
        spec: CronSpec::parse(cron, zone).unwrap(),
        goal: format!("scheduled goal of {name}"),
        missed,
        enabled: true,
    }
}

async fn create(schedules: &Schedules, now: DateTime<Utc>, new: NewSchedule) -> ScheduleRow {
    schedules.create(&new, now, 1000).await.unwrap()
}

/// Every firing of a schedule: (fire_at, kind, missed, run goal).
async fn firings(db: &TestDb, schedule: Uuid) -> Vec<(DateTime<Utc>, String, i32, String)> {
    sqlx::query_as(
        "SELECT f.fire_at, f.kind, f.missed, r.goal FROM orchestrator.schedule_firings f \
         JOIN orchestrator.runs r ON r.id = f.run_id \
         WHERE f.schedule_id = $1 ORDER BY f.fire_at",
    )
    .bind(schedule)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn fire_times(db: &TestDb, schedule: Uuid) -> Vec<DateTime<Utc>> {
    firings(db, schedule)
        .await
        .into_iter()
        .map(|f| f.0)
        .collect()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

/// Ticks every `step` of controlled time from `from` to `to`, as the firing loop would.
async fn tick_through(
    schedules: &Schedules,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: TimeDelta,
) {
    let mut now = from;
    while now <= to {
        let report = schedules.fire_due(now, GRACE, 100).await;
        assert!(report.error.is_none(), "{:?}", report.error);
        assert_eq!(report.duplicates, 0);
        now += step;
    }
}

#[tokio::test]
async fn a_0230_schedule_fires_once_on_the_spring_forward_and_the_fall_back_day() {
    let db = TestDb::new().await;
    let schedules = Schedules::new(&Store::new(db.pool.clone()));

    // Europe/Berlin, 30 March 2025: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    let spring = create(
        &schedules,
        utc(2025, 3, 28, 12, 0),
        new_schedule(
            "acme",
            "berlin-spring",
            "30 2 * * *",
            "Europe/Berlin",
            Missed::Skip,
        ),
    )
    .await;
    assert_eq!(spring.next_fire_at, Some(utc(2025, 3, 29, 1, 30)));
    tick_through(
        &schedules,
        utc(2025, 3, 28, 12, 0),
        utc(2025, 4, 1, 0, 0),
        FIVE_MINUTES,
    )
    .await;
    assert_eq!(
        fire_times(&db, spring.id).await,
        [
            utc(2025, 3, 29, 1, 30), // 02:30 CET
            utc(2025, 3, 30, 1, 0),  // 03:00 CEST, the first instant after the gap: once
            utc(2025, 3, 31, 0, 30), // 02:30 CEST
        ]
    );

    // Europe/Berlin, 26 October 2025: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    let autumn = create(
        &schedules,
        utc(2025, 10, 24, 12, 0),
        new_schedule(
            "acme",
            "berlin-autumn",
            "30 2 * * *",
            "Europe/Berlin",
            Missed::Skip,
        ),
    )
    .await;
    // America/New_York, 2 November 2025: 02:00 EDT falls back to 01:00 EST; 01:30 twice.
    let new_york = create(
        &schedules,
        utc(2025, 10, 24, 12, 0),
        new_schedule(
            "acme",
            "ny-autumn",
            "30 1 * * *",
            "America/New_York",
            Missed::Skip,
        ),
    )
    .await;
    tick_through(
        &schedules,
        utc(2025, 10, 24, 12, 0),
        utc(2025, 11, 4, 0, 0),
        FIVE_MINUTES,
    )
    .await;
    let autumn_times = fire_times(&db, autumn.id).await;
    let around_change: Vec<_> = autumn_times
        .iter()
        .filter(|t| **t >= utc(2025, 10, 25, 0, 0) && **t < utc(2025, 10, 28, 0, 0))
        .copied()
        .collect();
    assert_eq!(
        around_change,
        [
            utc(2025, 10, 25, 0, 30), // 02:30 CEST
            utc(2025, 10, 26, 0, 30), // the first 02:30 (CEST) only, not 01:30Z (CET) too
            utc(2025, 10, 27, 1, 30), // 02:30 CET
        ]
    );
    let ny_times = fire_times(&db, new_york.id).await;
    let ny_around: Vec<_> = ny_times
        .iter()
        .filter(|t| **t >= utc(2025, 11, 1, 12, 0) && **t < utc(2025, 11, 4, 0, 0))
        .copied()
        .collect();
    assert_eq!(
        ny_around,
        [
            utc(2025, 11, 2, 5, 30), // 01:30 EDT, once
            utc(2025, 11, 3, 6, 30), // 01:30 EST
        ]
    );
    // One firing per local day, each with its run.
    assert_eq!(autumn_times.len(), 10, "{autumn_times:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM orchestrator.runs").await,
        count(&db, "SELECT count(*) FROM orchestrator.schedule_firings").await
    );
    let kinds = count(
        &db,
        "SELECT count(*) FROM orchestrator.schedule_firings WHERE kind <> 'scheduled' OR missed <> 0",
    )
    .await;
    assert_eq!(kinds, 0, "every DST firing was on time");
}

#[tokio::test]
async fn after_an_outage_skip_resumes_and_catch_up_runs_once() {
    let db = TestDb::new().await;
    let schedules = Schedules::new(&Store::new(db.pool.clone()));
    let start = utc(2025, 6, 1, 7, 30);
    let skip = create(
        &schedules,
        start,
        new_schedule(
            "acme",
            "hourly-skip",
            "0 * * * *",
            "Europe/Paris",
            Missed::Skip,
        ),
    )
    .await;
    let catch_up = create(
        &schedules,
        start,
        new_schedule(
            "acme",
            "hourly-catch-up",
            "0 * * * *",
            "Europe/Paris",
            Missed::CatchUp,
        ),
    )
    .await;

    // 08:00:10: on time, both fire.
    let report = schedules
        .fire_due(utc(2025, 6, 1, 8, 0) + TimeDelta::seconds(10), GRACE, 100)
        .await;
    assert_eq!(report.fired.len(), 2);
    assert!(report.fired.iter().all(|f| f.kind == FireKind::Scheduled));

    // Every orchestrator is down from 08:01 to 13:20: 09:00 … 13:00 are missed.
    let back = utc(2025, 6, 1, 13, 20);
    let report = schedules.fire_due(back, GRACE, 100).await;
    assert!(report.error.is_none());
    assert_eq!(report.missed, 10, "five missed firings per schedule");
    assert_eq!(report.fired.len(), 1, "only the catch_up schedule fires");
    assert_eq!(report.fired[0].schedule_id, catch_up.id);
    assert_eq!(report.fired[0].kind, FireKind::CatchUp);
    assert_eq!(report.fired[0].fire_at, utc(2025, 6, 1, 13, 0));
    // A second tick right after does nothing: the catch-up happened once.
    let again = schedules
        .fire_due(back + TimeDelta::seconds(1), GRACE, 100)
        .await;
    assert!(again.fired.is_empty() && again.missed == 0);
    for id in [skip.id, catch_up.id] {
        let row = schedules.get("acme", id).await.unwrap();
        assert_eq!(row.next_fire_at, Some(utc(2025, 6, 1, 14, 0)));
    }

    // Both resume on schedule.
    tick_through(
        &schedules,
        utc(2025, 6, 1, 13, 21),
        utc(2025, 6, 1, 15, 0),
        ONE_MINUTE,
    )
    .await;
    let skip_firings = firings(&db, skip.id).await;
    assert_eq!(
        skip_firings
            .iter()
            .map(|f| (f.0, f.1.as_str(), f.2))
            .collect::<Vec<_>>(),
        [
            (utc(2025, 6, 1, 8, 0), "scheduled", 0),
            (utc(2025, 6, 1, 14, 0), "scheduled", 0),
            (utc(2025, 6, 1, 15, 0), "scheduled", 0),
        ]
    );
    let catch_up_firings = firings(&db, catch_up.id).await;
    assert_eq!(
        catch_up_firings
            .iter()
            .map(|f| (f.0, f.1.as_str(), f.2))
            .collect::<Vec<_>>(),
        [
            (utc(2025, 6, 1, 8, 0), "scheduled", 0),
            (utc(2025, 6, 1, 13, 0), "catch_up", 5),
            (utc(2025, 6, 1, 14, 0), "scheduled", 0),
            (utc(2025, 6, 1, 15, 0), "scheduled", 0),
        ]
    );
    assert!(
        catch_up_firings
            .iter()
            .all(|f| f.3 == "scheduled goal of hourly-catch-up")
    );
    let row = schedules.get("acme", catch_up.id).await.unwrap();
    assert_eq!(row.last_fire_at, Some(utc(2025, 6, 1, 15, 0)));
    assert_eq!(row.last_kind.as_deref(), Some("scheduled"));

    // Disabled through a whole day, then enabled: firings while disabled are not caught up.
    let off = schedules
        .set_enabled("acme", catch_up.id, false, utc(2025, 6, 1, 15, 30))
        .await
        .unwrap();
    assert_eq!(off.next_fire_at, None);
    tick_through(
        &schedules,
        utc(2025, 6, 1, 15, 30),
        utc(2025, 6, 1, 18, 0),
        ONE_MINUTE,
    )
    .await;
    let on = schedules
        .set_enabled("acme", catch_up.id, true, utc(2025, 6, 2, 16, 30))
        .await
        .unwrap();
    assert_eq!(on.next_fire_at, Some(utc(2025, 6, 2, 17, 0)));
    let report = schedules
        .fire_due(utc(2025, 6, 2, 16, 31), GRACE, 100)
        .await;
    assert!(report.fired.iter().all(|f| f.schedule_id != catch_up.id));
    assert_eq!(firings(&db, catch_up.id).await.len(), 4);

    // Run now: one manual firing; the next fire time does not move.
    let (row, firing) = schedules
        .run_now("acme", catch_up.id, utc(2025, 6, 2, 16, 40))
        .await
        .unwrap();
    assert_eq!(firing.kind, FireKind::Manual);
    assert_eq!(row.next_fire_at, Some(utc(2025, 6, 2, 17, 0)));
    assert_eq!(row.last_run_id, Some(firing.run_id));
    assert!(
        schedules
            .run_now("other-tenant", catch_up.id, utc(2025, 6, 2, 16, 41))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn concurrent_ticks_never_fire_twice() {
    // Four "leaders" at once (as if leadership had failed) on the same due schedules.
    let db = TestDb::new().await;
    let schedules = Schedules::new(&Store::new(db.pool.clone()));
    let start = utc(2025, 1, 1, 0, 0);
    for n in 0..20 {
        create(
            &schedules,
            start,
            new_schedule("acme", &format!("s{n}"), "*/5 * * * *", "UTC", Missed::Skip),
        )
        .await;
    }
    for minute in [5, 10, 15] {
        let now = start + TimeDelta::minutes(minute);
        let reports =
            futures::future::join_all((0..4).map(|_| schedules.fire_due(now, GRACE, 100))).await;
        let fired: usize = reports.iter().map(|r| r.fired.len()).sum();
        assert_eq!(fired, 20, "each of 20 schedules fired once at +{minute}m");
        assert!(reports.iter().all(|r| r.error.is_none()));
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM orchestrator.schedule_firings").await,
        60
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM orchestrator.runs").await,
        60
    );

    // Even a tick that finds a schedule due whose firing was already made (another leader
    // committed it) creates nothing: the firing's primary key refuses it, and the schedule
    // still moves on.
    let first = schedules.list("acme").await.unwrap().remove(0);
    let due = first.next_fire_at.unwrap();
    sqlx::query(
        "INSERT INTO orchestrator.schedule_firings (schedule_id, fire_at, kind) \
         VALUES ($1, $2, 'scheduled')",
    )
    .bind(first.id)
    .bind(due)
    .execute(&db.pool)
    .await
    .unwrap();
    let report = schedules.fire_due(due, GRACE, 100).await;
    assert_eq!(report.duplicates, 1);
    assert_eq!(report.fired.len(), 19);
    assert!(report.fired.iter().all(|f| f.schedule_id != first.id));
    assert_eq!(
        count(&db, "SELECT count(*) FROM orchestrator.runs").await,
        79
    );
    let moved = schedules.get("acme", first.id).await.unwrap();
    assert_eq!(moved.next_fire_at, Some(due + TimeDelta::minutes(5)));
}

struct Loop {
    runtime: Runtime,
    leading: Arc<AtomicBool>,
}

fn start_loop(db: &TestDb, clock: &ManualClock) -> Loop {
    let runtime = Runtime::new(CancellationToken::new());
    let scheduler = Scheduler::new(
        Schedules::new(&Store::new(db.pool.clone())),
        CronConfig {
            tick: Duration::from_millis(20),
            ..CronConfig::default()
        },
        Arc::new(clock.clone()),
    );
    let leading = scheduler.leader_flag();
    runtime.spawn(scheduler.run(runtime.shutdown.clone()));
    Loop { runtime, leading }
}

#[tokio::test]
async fn two_replicas_loops_fire_each_tick_once_and_hand_over_on_shutdown() {
    let db = TestDb::new().await;
    let schedules = Schedules::new(&Store::new(db.pool.clone()));
    let start = utc(2025, 3, 29, 23, 0);
    let clock = ManualClock::new(start);
    let mut ids = Vec::new();
    for (name, cron) in [("every-minute", "* * * * *"), ("every-two", "*/2 * * * *")] {
        ids.push(
            create(
                &schedules,
                start,
                new_schedule("acme", name, cron, "Europe/Berlin", Missed::Skip),
            )
            .await
            .id,
        );
    }
    let a = start_loop(&db, &clock);
    let b = start_loop(&db, &clock);
    let leaders = || {
        [&a, &b]
            .iter()
            .filter(|l| l.leading.load(Ordering::Relaxed))
            .count()
    };
    eventually(Duration::from_secs(10), "a leader", || async {
        (leaders() == 1).then_some(())
    })
    .await;

    // Advance controlled time a minute at a time; the leader fires each minute once.
    let mut expected = 0;
    for minute in 1..=6 {
        clock.set(start + TimeDelta::minutes(minute));
        expected += 1 + usize::from(minute % 2 == 0);
        eventually(Duration::from_secs(10), "the minute's firings", || async {
            let fired = count(&db, "SELECT count(*) FROM orchestrator.schedule_firings").await;
            (fired as usize >= expected).then_some(())
        })
        .await;
        assert_eq!(leaders(), 1, "exactly one leader");
    }

    // The leader shuts down; the other takes over at its next tick and goes on firing.
    let (leader, follower) = if a.leading.load(Ordering::Relaxed) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    leader.runtime.shutdown.cancel();
    eventually(Duration::from_secs(10), "a new leader", || async {
        follower.leading.load(Ordering::Relaxed).then_some(())
    })
    .await;
    for minute in 7..=8 {
        clock.set(start + TimeDelta::minutes(minute));
        expected += 1 + usize::from(minute % 2 == 0);
        eventually(Duration::from_secs(10), "the minute's firings", || async {
            let fired = count(&db, "SELECT count(*) FROM orchestrator.schedule_firings").await;
            (fired as usize >= expected).then_some(())
        })
        .await;
    }
    // Let both loops tick a while longer: nothing more fires, nothing fired twice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let total = count(&db, "SELECT count(*) FROM orchestrator.schedule_firings").await;
    assert_eq!(total as usize, expected);
    assert_eq!(
        count(&db, "SELECT count(*) FROM orchestrator.runs").await,
        total
    );
    let every_minute = fire_times(&db, ids[0]).await;
    assert_eq!(
        every_minute,
        (1..=8)
            .map(|m| start + TimeDelta::minutes(m))
            .collect::<Vec<_>>()
    );
    follower.runtime.shutdown.cancel();
    a.runtime.tracker.close();
    b.runtime.tracker.close();
    a.runtime.tracker.wait().await;
    b.runtime.tracker.wait().await;
}

struct Api {
    url: String,
    client: reqwest::Client,
    runtime: Runtime,
    _db: TestDb,
    _bus: TestBus,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.runtime.shutdown.cancel();
    }
}

async fn start_api() -> Api {
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
        runs: colony_orchestrator::config::RunsConfig {
            max_goal_bytes: 1024,
            ..Default::default()
        },
        cron: CronConfig {
            tick: Duration::from_millis(50),
            ..CronConfig::default()
        },
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
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url))
            .header("x-colony-tenant", "acme");
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn the_schedules_api_validates_and_manages_schedules() {
    use reqwest::Method;
    let api = start_api().await;
    let good = json!({
        "name": "nightly",
        "cron": "30 2 * * *",
        "timezone": "Europe/Paris",
        "goal": "summarise the day",
        "missed": "catch_up",
    });
    let with = |key: &str, value: Value| {
        let mut body = good.clone();
        body[key] = value;
        body.to_string()
    };
    let without = |key: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(key);
        body.to_string()
    };
    for (body, status, needle) in [
        ("{not json".to_owned(), 400, "invalid JSON"),
        (with("cron", json!("61 * * * *")), 400, "five-field"),
        (with("cron", json!("0 0 * * * *")), 400, "five-field"),
        (with("cron", json!("0 0 30 2 *")), 400, "never fires"),
        (with("timezone", json!("Europe/Atlantis")), 400, "IANA"),
        (with("timezone", json!("CEST")), 400, "IANA"),
        (with("missed", json!("sometimes")), 400, "catch_up"),
        (with("name", json!("no spaces")), 400, "name must be"),
        (with("goal", json!("x".repeat(2000))), 400, "limit is 1024"),
        (with("extra", json!(1)), 400, "invalid JSON"),
        (without("goal"), 400, "goal is required"),
        (without("cron"), 400, "cron is required"),
        (without("timezone"), 400, "timezone is required"),
        (
            with("goal", json!("x".repeat(5000))),
            413,
            "larger than 4096",
        ),
    ] {
        let (got, error) = api.call(Method::POST, "/v1/schedules", Some(&body)).await;
        assert_eq!(got, status, "{body:.60}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body:.60}: {message}");
        let code = error["error"]["code"].as_str().unwrap_or_default();
        assert!(
            ["invalid_request", "too_large"].contains(&code),
            "{body:.60}: {error}"
        );
    }

    let (status, created) = api
        .call(Method::POST, "/v1/schedules", Some(&good.to_string()))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["tenant"], "acme");
    assert_eq!(created["missed"], "catch_up");
    assert_eq!(created["enabled"], true);
    let local = created["next_fire"]["local"].as_str().unwrap();
    // 02:30 Paris time, or 03:00 CEST if the next one falls on the spring-forward day.
    assert!(
        local.contains("T02:30:00+0") || local.contains("T03:00:00+02:00"),
        "{local}"
    );
    let next_utc: DateTime<Utc> = created["next_fire"]["utc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(next_utc > Utc::now());
    assert!(created["last_fire"].is_null());
    let id = created["id"].as_str().unwrap().to_owned();

    let (status, _) = api
        .call(Method::POST, "/v1/schedules", Some(&good.to_string()))
        .await;
    assert_eq!(status, 409, "the same name twice");

    let (status, list) = api.call(Method::GET, "/v1/schedules", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);
    let other = api
        .client
        .get(format!("{}/v1/schedules/{id}", api.url))
        .header("x-colony-tenant", "someone-else")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404, "another tenant's schedule");
    let (status, _) = api
        .call(Method::GET, "/v1/schedules/not-a-uuid", None)
        .await;
    assert_eq!(status, 404);

    let (status, disabled) = api
        .call(Method::POST, &format!("/v1/schedules/{id}/disable"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(disabled["enabled"], false);
    assert!(disabled["next_fire"].is_null());
    let (_, enabled) = api
        .call(Method::POST, &format!("/v1/schedules/{id}/enable"), None)
        .await;
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["next_fire"], created["next_fire"]);

    let (status, fired) = api
        .call(Method::POST, &format!("/v1/schedules/{id}/run-now"), None)
        .await;
    assert_eq!(status, 201, "{fired}");
    let run_id = fired["run_id"].as_str().unwrap();
    assert_eq!(fired["firing"]["kind"], "manual");
    assert_eq!(fired["schedule"]["last_fire"]["run_id"], run_id);
    let (status, run) = api
        .call(Method::GET, &format!("/v1/runs/{run_id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(run["goal"], "summarise the day");

    let (status, _) = api
        .call(Method::DELETE, &format!("/v1/schedules/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = api
        .call(Method::GET, &format!("/v1/schedules/{id}"), None)
        .await;
    assert_eq!(status, 404);

    // The replica leads (it is alone) and says so; refusals are counted by reason.
    let metrics = eventually(Duration::from_secs(10), "the leader gauge", || async {
        let text = api
            .client
            .get(format!("{}/metrics", api.url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("colony_orchestrator_schedule_leader 1")
            .then_some(text)
    })
    .await;
    for needle in [
        "colony_orchestrator_rejected_requests_total{reason=\"invalid_cron\"}",
        "colony_orchestrator_rejected_requests_total{reason=\"invalid_timezone\"}",
        "colony_orchestrator_schedule_firings_total{outcome=\"manual\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn a_firing_is_planned_by_the_dial_gated_by_approval_and_bounded_by_the_queue() {
    let db = TestDb::new().await;
    let mut roster = colony_orchestrator::roster::RosterConfig::default();
    roster
        .roles
        .get_mut("generalist")
        .unwrap()
        .requires_approval = true;
    let store = Store::new(db.pool.clone()).with_roster(roster).with_limits(
        colony_orchestrator::flow::LimitsConfig {
            max_queued_per_tenant: 1,
            ..Default::default()
        },
    );
    let schedules = Schedules::new(&store);
    let start = utc(2025, 6, 2, 9, 0);
    let schedule = create(
        &schedules,
        start,
        new_schedule("acme", "daily", "1 9 * * *", "UTC", Missed::Skip),
    )
    .await;

    // The first firing: the dial chose (not overridden), its record is on the run, and the
    // role that requires approval waits for it.
    let report = schedules.fire_due(start + ONE_MINUTE, GRACE, 100).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.fired.len(), 1);
    let (topology, overridden, reason): (String, bool, String) = sqlx::query_as(
        "SELECT topology, topology_overridden, topology_reason FROM orchestrator.runs \
         WHERE id = $1",
    )
    .bind(report.fired[0].run_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(topology, "monolith");
    assert!(!overridden, "the dial chose: {reason}");
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM orchestrator.tasks WHERE run_id = $1")
            .bind(report.fired[0].run_id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(states, ["awaiting_approval"]);

    // A task is queued for the tenant, its bound: the next day's firing is refused, the
    // schedule moves on, and run-now answers that the queue is full.
    sqlx::query("UPDATE orchestrator.tasks SET state = 'queued'")
        .execute(&db.pool)
        .await
        .unwrap();
    let next_day = start + TimeDelta::days(1) + ONE_MINUTE;
    let report = schedules.fire_due(next_day, GRACE, 100).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert!(report.fired.is_empty());
    assert_eq!(
        count(&db, "SELECT count(*) FROM orchestrator.runs").await,
        1
    );
    let moved = schedules.get("acme", schedule.id).await.unwrap();
    assert_eq!(
        moved.next_fire_at,
        Some(start + TimeDelta::days(2) + ONE_MINUTE)
    );
    let refused = schedules.run_now("acme", schedule.id, next_day).await;
    assert!(
        matches!(&refused, Err(error) if error.to_string().contains("queue")),
        "{refused:?}"
    );
}
