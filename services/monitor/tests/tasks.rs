//! The monitor's own view of tasks, from real task events on the bus: `monitor.tasks` follows
//! each task's life whatever order its events are handled in; a task started long ago is
//! stale in `/v1/status`, in the gauge and in a firing `stale_tasks` alert, and its end
//! resolves the alert; the queue depth fires its rule. One test per process: the metrics
//! recorder is process-wide.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

mod common;

use std::time::{Duration, SystemTime};

use colony_bus::{Bus, subjects};
use colony_monitor::Config;
use colony_monitor::alerts::RuleKind;
use colony_proto::v1;
use colony_testkit::{TestBus, TestDb, eventually};
use sqlx::PgPool;

use common::{WAIT, get_json, metric, wait_for_alert};

/// Publishes a task event of `kind` for `task_id` at `attempt`, `ago` before now.
async fn task_event(
    bus: &Bus,
    task_id: &str,
    attempt: u32,
    kind: v1::TaskEventKind,
    ago: Duration,
) {
    let name = kind.as_str_name().trim_start_matches("TASK_EVENT_KIND_");
    let event = v1::TaskEvent {
        tenant: "acme".into(),
        run_id: "r1".into(),
        task_id: task_id.into(),
        attempt,
        role: "coder".into(),
        kind: kind as i32,
        occurred_at: Some(colony_proto::timestamp(SystemTime::now() - ago)),
        ..Default::default()
    };
    // A fresh message id each time: a republished event is a redelivery to the monitor.
    bus.publish(
        &subjects::task_event(&name.to_lowercase()),
        &uuid::Uuid::new_v4().to_string(),
        &event,
    )
    .await
    .unwrap();
}

/// `(state, attempt)` of a task in `monitor.tasks`.
async fn task(pool: &PgPool, task_id: &str) -> Option<(String, i64)> {
    sqlx::query_as("SELECT state, attempt FROM monitor.tasks WHERE task_id = $1")
        .bind(task_id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn wait_for_task(pool: &PgPool, task_id: &str, state: &str, attempt: i64) {
    eventually(
        WAIT,
        &format!("{task_id} {state} at attempt {attempt}"),
        || async { (task(pool, task_id).await == Some((state.to_owned(), attempt))).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn task_events_keep_a_task_view_that_reports_stale_tasks_and_the_queue() {
    use v1::TaskEventKind::{Failed, Queued, Requeued, Started, Succeeded};

    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let config = Config {
        stale_task_after: Duration::from_secs(600),
        ..common::quick(vec![
            common::rule("tasks-stale", RuleKind::StaleTasks, 0.0),
            common::rule("queue-depth", RuleKind::QueueDepth, 1.0),
            common::rule("queue-age", RuleKind::QueueAgeSeconds, 3600.0),
        ])
    };
    let monitor = common::start(&db, &test_bus, config).await;
    let base = monitor.base.clone();
    let bus = test_bus.connect().await;
    let pool = &db.pool;
    let second = Duration::from_secs(1);

    // A task's whole life: queued, started, succeeded.
    task_event(&bus, "t-done", 1, Queued, 3 * second).await;
    task_event(&bus, "t-done", 1, Started, 2 * second).await;
    task_event(&bus, "t-done", 1, Succeeded, second).await;
    wait_for_task(pool, "t-done", "finished", 1).await;
    // Redelivered late, its start changes nothing.
    task_event(&bus, "t-done", 1, Started, 2 * second).await;

    // Its end handled before its start: the start, earlier in the attempt, changes nothing
    // even with a later clock (another orchestrator replica's).
    task_event(&bus, "t-reordered", 1, Succeeded, 2 * second).await;
    wait_for_task(pool, "t-reordered", "finished", 1).await;
    task_event(&bus, "t-reordered", 1, Started, Duration::ZERO).await;

    // A failed attempt is retried: the next attempt's re-queue stands, whatever came first.
    task_event(&bus, "t-retried", 2, Requeued, second).await;
    wait_for_task(pool, "t-retried", "queued", 2).await;
    task_event(&bus, "t-retried", 1, Failed, 2 * second).await;
    task_event(&bus, "t-retried", 1, Started, 3 * second).await;

    // Two tasks wait, one of them for 20 minutes.
    task_event(&bus, "t-waiting", 1, Queued, 20 * 60 * second).await;

    // A task started an hour ago and never heard of again: stale (after 10 minutes).
    task_event(&bus, "t-stuck", 1, Queued, 3601 * second).await;
    task_event(&bus, "t-stuck", 1, Started, 3600 * second).await;
    wait_for_task(pool, "t-stuck", "running", 1).await;
    wait_for_task(pool, "t-waiting", "queued", 1).await;

    // Let the late events be handled (they are no-ops, so there is nothing to wait for).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(task(pool, "t-done").await, Some(("finished".to_owned(), 1)));
    assert_eq!(
        task(pool, "t-reordered").await,
        Some(("finished".to_owned(), 1))
    );
    assert_eq!(
        task(pool, "t-retried").await,
        Some(("queued".to_owned(), 2))
    );
    let (tenant, run_id, role): (String, String, String) =
        sqlx::query_as("SELECT tenant, run_id, role FROM monitor.tasks WHERE task_id = 't-stuck'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        (tenant.as_str(), run_id.as_str(), role.as_str()),
        ("acme", "r1", "coder")
    );

    // The gauges, after a sweep.
    eventually(WAIT, "the task gauges", || async {
        let stale = metric(&base, "colony_monitor_stale_tasks").await;
        let queued = metric(&base, "colony_monitor_queued_tasks").await;
        (stale == Some(1.0) && queued == Some(2.0)).then_some(())
    })
    .await;
    assert_eq!(
        metric(&base, "colony_monitor_running_tasks").await,
        Some(1.0)
    );
    let oldest = metric(&base, "colony_monitor_queue_oldest_age_seconds")
        .await
        .unwrap();
    assert!((1199.0..1300.0).contains(&oldest), "{oldest}");

    // Reported once (counted, logged), however many sweeps see it.
    eventually(WAIT, "the stale task reported", || async {
        (metric(&base, "colony_monitor_stale_tasks_detected_total").await == Some(1.0))
            .then_some(())
    })
    .await;
    let reported: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT stale_reported_at FROM monitor.tasks WHERE task_id = 't-stuck'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(reported.is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(&base, "colony_monitor_stale_tasks_detected_total").await,
        Some(1.0)
    );

    // The status lists it.
    let status = get_json(&format!("{base}/v1/status")).await;
    assert_eq!(status["tasks"]["queued"], 2, "{status}");
    assert_eq!(status["tasks"]["running"], 1, "{status}");
    assert_eq!(status["tasks"]["stale"], 1, "{status}");
    assert_eq!(status["stale_task_after_seconds"], 600.0, "{status}");
    let stale = status["stale_tasks"].as_array().unwrap();
    assert_eq!(stale.len(), 1, "{status}");
    assert_eq!(stale[0]["task_id"], "t-stuck");
    assert_eq!(stale[0]["tenant"], "acme");
    assert_eq!(stale[0]["run_id"], "r1");
    assert_eq!(stale[0]["role"], "coder");
    assert_eq!(stale[0]["attempt"], 1);
    assert!(stale[0]["since"].is_string(), "{status}");

    // The rules fire: one stale task, two queued (above 1); the oldest waited under an hour.
    let firing = wait_for_alert(&base, "tasks-stale", "firing").await;
    assert_eq!(firing["fired_value"], 1.0);
    assert!(
        firing["summary"]
            .as_str()
            .unwrap()
            .starts_with("tasks-stale: stale_tasks is 1.000, above 0 (running longer than 10m)"),
        "{firing}"
    );
    let deep = wait_for_alert(&base, "queue-depth", "firing").await;
    assert_eq!(deep["fired_value"], 2.0);
    let alerts = get_json(&format!("{base}/v1/alerts")).await;
    assert!(
        !alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|alert| alert["rule"] == "queue-age"),
        "{alerts}"
    );

    // The stuck task ends at last (the monitor never ended it): the alert resolves.
    task_event(&bus, "t-stuck", 1, Succeeded, Duration::ZERO).await;
    let resolved = wait_for_alert(&base, "tasks-stale", "resolved").await;
    assert_eq!(resolved["last_value"], 0.0);
    eventually(WAIT, "no stale task", || async {
        (metric(&base, "colony_monitor_stale_tasks").await == Some(0.0)).then_some(())
    })
    .await;
    let status = get_json(&format!("{base}/v1/status")).await;
    assert_eq!(status["stale_tasks"], serde_json::json!([]), "{status}");

    monitor.stop().await;
}
