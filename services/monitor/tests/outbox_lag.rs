//! Outbox lag read from the outbox tables themselves: a router outbox row held back five
//! minutes (a relay that sends nothing, so no event shows a lag) fires an `outbox_lag_seconds`
//! rule; sending it resolves the rule; an outbox table that is gone fails the rule's
//! evaluation, counted by rule.

mod common;

use std::time::Duration;

use colony_monitor::alerts::RuleKind;
use colony_testkit::{TestBus, TestDb, eventually};

use common::{alert, metric, wait_for_alert};

#[tokio::test]
async fn a_held_back_outbox_row_fires_the_outbox_lag_rule_until_it_is_sent() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let config = common::quick(vec![common::rule(
        "outbox-lag",
        RuleKind::OutboxLagSeconds,
        60.0,
    )]);
    let monitor = common::start(&db, &test_bus, config).await;
    let base = monitor.base.clone();

    // Empty outboxes: nothing fires.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(alert(&base, "outbox-lag", "firing").await.is_none());

    sqlx::query(
        "INSERT INTO router.outbox (msg_id, subject, payload, created_at) \
         VALUES ('usage-1', 'colony.v1.event.usage', '\\x00', now() - interval '5 minutes')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let firing = wait_for_alert(&base, "outbox-lag", "firing").await;
    common::assert_fired_five_minutes(&firing, "outbox_lag_seconds", "now");

    // The relay sends it (and deletes the row): resolved.
    sqlx::query("DELETE FROM router.outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_for_alert(&base, "outbox-lag", "resolved").await;

    // An outbox table that is not there fails the evaluation, which is counted.
    sqlx::query("DROP TABLE router.outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(common::WAIT, "the failed evaluations counted", || async {
        metric(
            &base,
            r#"colony_monitor_alert_evaluation_failures_total{rule="outbox-lag"}"#,
        )
        .await
        .filter(|failures| *failures >= 1.0)
    })
    .await;
    let missing = colony_bus::outbox::oldest_age_seconds(&db.pool, "router.outbox")
        .await
        .unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("\"router.outbox\" does not exist"),
        "{missing}"
    );

    monitor.stop().await;
}
