//! Rate limits shared by router replicas through a real PostgreSQL, in real time (leases need
//! the database, so tokio's paused clock cannot drive them): two replicas together are held to
//! one deployment's limits, one replica alone still gets all of them, the queue's refusals are
//! unchanged, unused leases go back, changed limits apply, and a failing database makes each
//! replica fall back to its share of the rates until it answers again.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_router::config::RateLimits;
use colony_router::resilience::limits::{Limiter, Refused};
use colony_router::resilience::{QueueConfig, SharedLimitsConfig};
use colony_testkit::TestDb;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;

/// A replica's own pool, as a separate router process would have.
async fn pool(db: &TestDb) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url)
        .await
        .unwrap()
}

async fn replica(
    pool: PgPool,
    rpm: Option<u32>,
    tpm: Option<u32>,
    queue: usize,
    replicas: u32,
) -> Limiter {
    let limiter = Limiter::shared(
        "gpt",
        &RateLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        },
        &QueueConfig {
            capacity: queue,
            max_wait: Duration::from_secs(3),
        },
        &SharedLimitsConfig { replicas },
        pool.clone(),
    );
    limiter.sync().await.unwrap();
    limiter
}

/// Asks for `tokens` again and again until `until`, pausing briefly after a refusal; returns
/// how many were admitted.
async fn flood(limiter: &Limiter, tokens: u64, until: Instant) -> u64 {
    let mut admitted = 0;
    while Instant::now() < until {
        match limiter.acquire(tokens).await {
            Ok(_) => admitted += 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    admitted
}

/// The shared bucket's level as the database holds it now (refilled), by kind.
async fn level(pool: &PgPool, kind: &str) -> f64 {
    sqlx::query_scalar(
        "SELECT least(capacity, level + \
             extract(epoch FROM now() - updated_at)::float8 * per_second) \
         FROM router.rate_buckets WHERE deployment = 'gpt' AND kind = $1",
    )
    .bind(kind)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_together_are_held_to_one_limit() {
    let db = TestDb::new().await;
    // 120 a minute: a burst of 120, then 2 a second; leases of at least 6.
    let a = replica(pool(&db).await, Some(120), None, 0, 2).await;
    let b = replica(pool(&db).await, Some(120), None, 0, 2).await;
    let start = Instant::now();
    let window = Duration::from_secs(3);
    let (from_a, from_b) = tokio::join!(flood(&a, 0, start + window), flood(&b, 0, start + window));
    let elapsed = start.elapsed().as_secs_f64();
    let total = from_a + from_b;
    eprintln!("admitted {from_a} + {from_b} = {total} in {elapsed:.2} s (bound 120 + 2/s)");
    // Never more than the burst plus the rate over the whole time, whatever the split.
    let most = 120.0 + 2.0 * elapsed;
    assert!((total as f64) <= most + 1e-6, "admitted {total} > {most}");
    // And not much less: what a replica leased last may be in its hands, unused.
    let least = 120.0 + 2.0 * window.as_secs_f64() - 2.0 * 6.0;
    assert!(total as f64 >= least, "admitted {total} < {least}");
    assert!(from_a > 0 && from_b > 0, "{from_a} {from_b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_alone_gets_the_whole_rate() {
    let db = TestDb::new().await;
    // 600 a minute: a burst of 600, then 10 a second.
    let limiter = replica(pool(&db).await, Some(600), None, 0, 2).await;
    let start = Instant::now();
    let window = Duration::from_secs(2);
    let admitted = flood(&limiter, 0, start + window).await;
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("admitted {admitted} in {elapsed:.2} s (bound 600 + 10/s)");
    assert!(
        admitted as f64 <= 600.0 + 10.0 * elapsed + 1e-6,
        "{admitted}"
    );
    // Starved, a replica leases at most every 250 ms: it may lag by that much of the rate.
    assert!(admitted as f64 >= 600.0 + 10.0 * 2.0 - 5.0, "{admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_admitted_in_order_at_the_shared_rate() {
    let db = TestDb::new().await;
    let limiter = replica(pool(&db).await, Some(120), None, 10, 1).await;
    for _ in 0..120 {
        limiter.acquire(0).await.unwrap();
    }
    let start = Instant::now();
    let order = std::sync::Mutex::new(Vec::new());
    futures::future::join_all((0..3).map(|i| {
        let (limiter, order) = (&limiter, &order);
        async move {
            let permit = limiter.acquire(0).await.unwrap();
            order
                .lock()
                .unwrap()
                .push((i, start.elapsed(), permit.waited));
        }
    }))
    .await;
    let order = order.into_inner().unwrap();
    assert_eq!(
        order.iter().map(|(i, ..)| *i).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // One each half second (the first sooner: the bucket refilled while it was spent), late by
    // at most a short lease's pause and a round trip.
    let times: Vec<f64> = order.iter().map(|(_, at, _)| at.as_secs_f64()).collect();
    assert!(times[0] <= 0.8, "{times:?}");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!((0.4..=0.8).contains(&gap), "{times:?}");
    }
    assert_eq!(limiter.queue_depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_keep_their_meaning() {
    let db = TestDb::new().await;
    let limiter = replica(pool(&db).await, Some(60), Some(1000), 1, 1).await;
    let too_large = limiter.acquire(1001).await.unwrap_err();
    assert_eq!(
        too_large,
        Refused::TooLarge {
            tokens: 1001,
            limit: 1000
        }
    );
    // Spend the requests bucket everywhere.
    for _ in 0..60 {
        limiter.acquire(0).await.unwrap();
    }
    let mut waiting = Box::pin(limiter.acquire(0));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    let full = limiter.acquire(0).await.unwrap_err();
    assert!(
        matches!(full, Refused::QueueFull { waiting: 1, .. }),
        "{full}"
    );
    // One ahead and this one at one a second.
    let retry_after = full.retry_after().unwrap();
    assert!(
        retry_after > Duration::from_millis(1500) && retry_after <= Duration::from_secs(2),
        "{retry_after:?}"
    );
    waiting.await.unwrap();

    // A wait beyond the maximum (3 s) is refused at once.
    let limiter = replica(pool(&db).await, Some(60), None, 10, 1).await;
    let mut first = Box::pin(limiter.acquire(0));
    // Long enough for its lease to come back (short: the bucket was spent above), so the
    // limiter knows what the shared bucket holds.
    let polled = tokio::time::timeout(Duration::from_millis(300), first.as_mut()).await;
    assert!(polled.is_err());
    let mut second = Box::pin(limiter.acquire(0));
    let mut third = Box::pin(limiter.acquire(0));
    assert!(futures::poll!(second.as_mut()).is_pending());
    assert!(futures::poll!(third.as_mut()).is_pending());
    let start = Instant::now();
    let refused = limiter.acquire(0).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(50));
    assert!(matches!(refused, Refused::WaitTooLong { .. }), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unused_leases_go_back_to_the_shared_bucket() {
    let db = TestDb::new().await;
    let (pool_a, pool_b) = (pool(&db).await, pool(&db).await);
    // 6000 tokens a minute: leases of at least 300.
    let a = replica(pool_a, None, Some(6000), 0, 2).await;
    let b = replica(pool_b.clone(), None, Some(6000), 0, 2).await;
    // A takes a lease of 1000, uses 100 of it and leaves 900 in its hands.
    let permit = a.acquire(1000).await.unwrap();
    a.settle(&permit, 100);
    let after_lease = level(&pool_b, "tokens").await;
    assert!((after_lease - 5000.0).abs() < 20.0, "{after_lease}");
    // Recently used: tending gives nothing back yet.
    a.tend().await;
    assert!((level(&pool_b, "tokens").await - after_lease).abs() < 20.0);
    // B can have all that is left but not what A holds...
    assert!(b.acquire(5000).await.is_ok());
    assert!(b.acquire(900).await.is_err());
    // ...until A gives it back (B asks the database again after its pause of 250 ms).
    a.release().await;
    assert!(level(&pool_b, "tokens").await >= 900.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.acquire(900).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_leases_are_given_back_by_tending() {
    let db = TestDb::new().await;
    let pool = pool(&db).await;
    let limiter = replica(pool.clone(), Some(600), None, 0, 1).await;
    // A lease of 30 (a twentieth of 600), one of them used.
    limiter.acquire(0).await.unwrap();
    assert!(level(&pool, "requests").await < 571.0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    limiter.tend().await;
    // 29 back, and refilled to the full 600 meanwhile.
    let level = level(&pool, "requests").await;
    assert!(level > 599.0, "{level}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_limit_applies_and_clips_the_level() {
    let db = TestDb::new().await;
    let pool = pool(&db).await;
    replica(pool.clone(), Some(600), None, 0, 1).await;
    assert!((level(&pool, "requests").await - 600.0).abs() < 1e-6);
    let smaller = replica(pool.clone(), Some(60), None, 0, 1).await;
    assert!((level(&pool, "requests").await - 60.0).abs() < 1e-3);
    let start = Instant::now();
    let mut admitted = 0;
    while smaller.acquire(0).await.is_ok() {
        admitted += 1;
    }
    let most = 60.0 + start.elapsed().as_secs_f64();
    assert!((60.0..=most).contains(&f64::from(admitted)), "{admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_database_falls_back_to_the_replicas_share_until_it_answers() {
    let db = TestDb::new().await;
    let pool = pool(&db).await;
    // 120 a minute shared by 2 replicas: 1 a second each while the database fails.
    let limiter = replica(pool.clone(), Some(120), None, 0, 2).await;
    sqlx::query("ALTER TABLE router.rate_buckets RENAME TO rate_buckets_away")
        .execute(&db.pool)
        .await
        .unwrap();
    let start = Instant::now();
    let window = Duration::from_secs(2);
    let admitted = flood(&limiter, 0, start + window).await;
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("admitted {admitted} in {elapsed:.2} s without the database (share: 1/s)");
    // No burst: the fallback starts empty and refills at the replica's share.
    assert!((1..=3).contains(&admitted), "{admitted}");

    sqlx::query("ALTER TABLE router.rate_buckets_away RENAME TO rate_buckets")
        .execute(&db.pool)
        .await
        .unwrap();
    // The next try (within a second) finds the shared bucket, full again.
    let start = Instant::now();
    let admitted = flood(&limiter, 0, start + Duration::from_millis(1500)).await;
    eprintln!("admitted {admitted} in the 1.5 s after the database came back");
    assert!(admitted >= 110, "{admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_together_are_held_to_one_token_limit_by_real_usage() {
    let db = TestDb::new().await;
    // 6000 tokens a minute: a burst of 6000, then 100 a second; leases of at least 300.
    let a = replica(pool(&db).await, None, Some(6000), 0, 2).await;
    let b = replica(pool(&db).await, None, Some(6000), 0, 2).await;
    // Each call reserves 200 tokens and uses 100: the other 100 come back to the replica.
    async fn calls(limiter: &Limiter, until: Instant) -> u64 {
        let mut used = 0;
        while Instant::now() < until {
            match limiter.acquire(200).await {
                Ok(permit) => {
                    limiter.settle(&permit, 100);
                    used += 100;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        used
    }
    let start = Instant::now();
    let until = start + Duration::from_secs(2);
    let (from_a, from_b) = tokio::join!(calls(&a, until), calls(&b, until));
    let elapsed = start.elapsed().as_secs_f64();
    let used = (from_a + from_b) as f64;
    eprintln!("used {from_a} + {from_b} = {used} tokens in {elapsed:.2} s (bound 6000 + 100/s)");
    assert!(used <= 6000.0 + 100.0 * elapsed + 1e-6, "{used}");
    // What each replica may hold unused at the end: a slice, and a call's reservation.
    assert!(
        used >= 6000.0 + 100.0 * 2.0 - 2.0 * (300.0 + 200.0),
        "{used}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_that_fit_are_not_refused_while_a_lease_is_under_way() {
    let db = TestDb::new().await;
    // No queue: the local limiter would admit all 50 at once from a full bucket; the shared
    // one must too, although its slices are 6 and each lease takes a round trip.
    let limiter = replica(pool(&db).await, Some(120), None, 0, 1).await;
    let results = futures::future::join_all((0..50).map(|_| limiter.acquire(0))).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(limiter.queue_depth(), 0);
}
