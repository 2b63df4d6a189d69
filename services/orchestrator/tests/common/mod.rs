//! Database shortcuts the orchestrator's tests share: time passing, without waiting for it.
#![allow(dead_code, reason = "each test crate uses some of these")]
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use colony_testkit::TestDb;
use uuid::Uuid;

/// Ends the lease of `task` (of every leased task when `None`) a second ago, as if its worker
/// had vanished: the reaper's next pass takes it.
pub async fn expire_lease(db: &TestDb, task: Option<Uuid>) {
    sqlx::query(
        "UPDATE orchestrator.tasks SET lease_expires_at = now() - interval '1 second' \
         WHERE lease_expires_at IS NOT NULL AND ($1::uuid IS NULL OR id = $1)",
    )
    .bind(task)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Lets a retry of `task` waiting out its backoff be dispatched now.
pub async fn skip_backoff(db: &TestDb, task: Uuid) {
    sqlx::query(
        "UPDATE orchestrator.tasks SET not_before = now() - interval '1 millisecond' WHERE id = $1",
    )
    .bind(task)
    .execute(&db.pool)
    .await
    .unwrap();
}
