//! The bus and the outbox against the real NATS JetStream and PostgreSQL.
#![expect(clippy::disallowed_methods, reason = "tests own their tasks directly")]
#![expect(clippy::unwrap_used, reason = "helpers of tests")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use colony_bus::{
    ConsumeOptions, Outbox, OutboxRow, Outcome, RelayOptions, StreamKind, consume, subjects,
};
use colony_proto::v1::TaskDispatch;
use colony_testkit::{TestBus, TestDb, eventually};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn dispatch(task: &str, attempt: u32) -> TaskDispatch {
    TaskDispatch {
        tenant: "acme".into(),
        run_id: "run".into(),
        task_id: task.into(),
        attempt,
        role: "generalist".into(),
        dispatched_at: None,
    }
}

async fn stream_messages(bus: &colony_bus::Bus, kind: StreamKind) -> u64 {
    let mut stream = bus
        .jetstream()
        .get_stream(bus.stream_name(kind))
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn streams_are_created_idempotently_and_duplicates_dropped() {
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    bus.ensure_streams().await.unwrap();
    let subject = subjects::dispatch("generalist");
    bus.publish(&subject, "dispatch-t1-1", &dispatch("t1", 1))
        .await
        .unwrap();
    bus.publish(&subject, "dispatch-t1-1", &dispatch("t1", 1))
        .await
        .unwrap();
    bus.publish(&subject, "dispatch-t1-2", &dispatch("t1", 2))
        .await
        .unwrap();
    assert_eq!(stream_messages(&bus, StreamKind::Dispatch).await, 2);
}

#[tokio::test]
async fn outcomes_map_to_ack_retry_and_term() {
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    let subject = subjects::dispatch("generalist");
    let consumer = bus
        .durable_consumer(StreamKind::Dispatch, "workers-generalist", &subject)
        .await
        .unwrap();
    for (i, task) in ["ok", "retry", "term"].iter().enumerate() {
        bus.publish(&subject, &format!("m{i}"), &dispatch(task, 1))
            .await
            .unwrap();
    }
    bus.publish_bytes(&subject, "garbage", None, b"\xff\xff\xff".as_slice().into())
        .await
        .unwrap();

    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, i64)>::new()));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handler_seen = seen.clone();
    let consumer_task = tokio::spawn(consume(
        bus.clone(),
        consumer,
        ConsumeOptions::new("test", 2),
        shutdown.clone(),
        tracker.clone(),
        move |delivery: colony_bus::Delivery<TaskDispatch>| {
            let seen = handler_seen.clone();
            async move {
                let task = delivery.message.task_id.clone();
                seen.lock()
                    .unwrap()
                    .push((task.clone(), delivery.delivered));
                match (task.as_str(), delivery.delivered) {
                    ("retry", 1) => Outcome::Retry(Duration::from_millis(100)),
                    ("term", _) => Outcome::Terminate("cannot run".into()),
                    _ => Outcome::Ack,
                }
            }
        },
    ));

    eventually(Duration::from_secs(10), "retry redelivered", || {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .contains(&("retry".into(), 2))
                .then_some(())
        }
    })
    .await;
    // Everything was acked or terminated: the work queue is empty; the terminated message
    // and the garbage are kept as dead letters.
    eventually(Duration::from_secs(10), "work queue drained", || {
        let bus = bus.clone();
        async move { (stream_messages(&bus, StreamKind::Dispatch).await == 0).then_some(()) }
    })
    .await;
    assert_eq!(stream_messages(&bus, StreamKind::DeadLetter).await, 2);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().filter(|(t, _)| t == "ok").count(), 1);
    assert_eq!(seen.iter().filter(|(t, _)| t == "term").count(), 1);
    assert!(
        !seen.iter().any(|(t, _)| t.is_empty()),
        "garbage never reached the handler"
    );
    shutdown.cancel();
    consumer_task.await.unwrap();
}

/// Dispatches `d0`..`d4` in one committed transaction.
async fn enqueue_five(db: &TestDb, outbox: &Outbox, subject: &str) {
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..5 {
        outbox
            .enqueue(
                &mut tx,
                subject,
                &format!("d{i}"),
                &dispatch(&format!("t{i}"), 1),
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn outbox_rows_are_published_once_after_commit() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    let outbox = Outbox::new("orchestrator.outbox", "orchestrator_outbox");
    let subject = subjects::dispatch("generalist");

    // A rolled-back transaction leaves nothing to publish.
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &subject, "rolled-back", &dispatch("x", 1))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    enqueue_five(&db, &outbox, &subject).await;

    // Two relays race over the same rows; each row is published by exactly one of them.
    let (a, b) = tokio::join!(
        outbox.relay_once(&db.pool, &bus, 3),
        outbox.relay_once(&db.pool, &bus, 3)
    );
    let first = a.unwrap() + b.unwrap();
    let rest = outbox.relay_once(&db.pool, &bus, 100).await.unwrap();
    assert_eq!(first + rest, 5);
    assert_eq!(outbox.relay_once(&db.pool, &bus, 100).await.unwrap(), 0);
    assert_eq!(stream_messages(&bus, StreamKind::Dispatch).await, 5);

    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM orchestrator.outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "sent rows are deleted");

    // Simulate a crash after publish but before the delete (the rows are back as they were):
    // the repeat is deduplicated.
    enqueue_five(&db, &outbox, &subject).await;
    assert_eq!(outbox.relay_once(&db.pool, &bus, 100).await.unwrap(), 5);
    assert_eq!(stream_messages(&bus, StreamKind::Dispatch).await, 5);
}

#[tokio::test]
async fn relay_wakes_on_commit_and_traceparent_travels() {
    let _telemetry = colony_telemetry::init("bus-test", &Default::default()).unwrap();
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    let outbox = Outbox::new("orchestrator.outbox", "orchestrator_outbox");
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(outbox.run_relay(
        db.pool.clone(),
        bus.clone(),
        RelayOptions {
            poll_interval: Duration::from_secs(30),
            ..RelayOptions::default()
        },
        shutdown.clone(),
    ));
    let mut sub = bus
        .client()
        .subscribe(bus.subject("colony.v1.task.dispatch.>"))
        .await
        .unwrap();
    // Wait until the relay LISTENs; with a 30 s poll only the notification can wake it.
    eventually(Duration::from_secs(10), "relay listening", || {
        let pool = db.pool.clone();
        let name = db.name.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'",
            )
            .bind(name)
            .fetch_one(&pool)
            .await
            .ok()
            .filter(|n| *n > 0)
        }
    })
    .await;
    // The relay's first pass found nothing; let it settle into waiting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let span = tracing::info_span!("enqueue");
    let expected = span
        .in_scope(colony_telemetry::current_traceparent)
        .unwrap();
    {
        let mut tx = db.pool.begin().await.unwrap();
        let _entered = span.enter();
        outbox
            .enqueue(
                &mut tx,
                &subjects::dispatch("generalist"),
                "w1",
                &dispatch("w", 1),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let message = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("relay woke on NOTIFY")
        .unwrap();
    let headers = message.headers.unwrap();
    assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "w1");
    assert_eq!(headers.get("traceparent").unwrap().as_str(), expected);
    shutdown.cancel();
    relay.await.unwrap();
}

#[tokio::test]
async fn a_row_keeps_its_own_traceparent_and_the_others_take_the_span_s() {
    let _telemetry = colony_telemetry::init("bus-test", &Default::default()).unwrap();
    let db = TestDb::new().await;
    let outbox = Outbox::new("orchestrator.outbox", "orchestrator_outbox");
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let span = tracing::info_span!("enqueue");
    let current = span
        .in_scope(colony_telemetry::current_traceparent)
        .unwrap();
    let subject = subjects::dispatch("generalist");
    let rows = [
        OutboxRow::new(&subject, "own", &dispatch("a", 1)).with_traceparent(Some(own.into())),
        OutboxRow::new(&subject, "span", &dispatch("b", 1)),
    ];
    {
        let mut tx = db.pool.begin().await.unwrap();
        let _entered = span.enter();
        outbox.enqueue_many(&mut tx, &rows).await.unwrap();
        tx.commit().await.unwrap();
    }
    let stored: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT msg_id, traceparent FROM orchestrator.outbox ORDER BY msg_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [
            ("own".to_owned(), Some(own.to_owned())),
            ("span".to_owned(), Some(current)),
        ]
    );
}

/// Dispatch `msg_id` in one committed transaction, quiet or not.
async fn enqueue_one(db: &TestDb, outbox: &Outbox, msg_id: &str, quiet: bool) {
    let mut tx = db.pool.begin().await.unwrap();
    if quiet {
        outbox.quiet(&mut tx).await.unwrap();
    }
    outbox
        .enqueue(
            &mut tx,
            &subjects::dispatch("generalist"),
            msg_id,
            &dispatch(msg_id, 1),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_quiet_transaction_notifies_nobody_and_wake_brings_its_rows_out() {
    let db = TestDb::new().await;
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    let outbox = Outbox::new("orchestrator.outbox", "orchestrator_outbox");
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen("orchestrator_outbox").await.unwrap();
    let mut sub = bus
        .client()
        .subscribe(bus.subject("colony.v1.task.dispatch.>"))
        .await
        .unwrap();

    enqueue_one(&db, &outbox, "q1", true).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "a quiet transaction sent a notification"
    );
    // The same connection notifies again once its transaction is over.
    enqueue_one(&db, &outbox, "q2", false).await;
    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a plain transaction notifies")
        .unwrap();

    // A relay that polls every 30 s publishes both at once when woken in process.
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(outbox.run_relay(
        db.pool.clone(),
        bus.clone(),
        RelayOptions {
            poll_interval: Duration::from_secs(30),
            ..RelayOptions::default()
        },
        shutdown.clone(),
    ));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("the relay's first pass publishes what is unsent")
            .unwrap();
        ids.push(
            message
                .headers
                .unwrap()
                .get("Nats-Msg-Id")
                .unwrap()
                .as_str()
                .to_owned(),
        );
    }
    assert_eq!(ids, ["q1", "q2"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    enqueue_one(&db, &outbox, "q3", true).await;
    outbox.wake();
    let message = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the relay woke in process")
        .unwrap();
    assert_eq!(
        message
            .headers
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .as_str(),
        "q3"
    );
    shutdown.cancel();
    relay.await.unwrap();
}

#[tokio::test]
async fn consumers_share_work_without_duplicates() {
    let test_bus = TestBus::new();
    let bus = test_bus.connect().await;
    let subject = subjects::dispatch("generalist");
    let handled = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut tasks = Vec::new();
    for replica in 0..2 {
        let consumer = bus
            .durable_consumer(StreamKind::Dispatch, "workers-generalist", &subject)
            .await
            .unwrap();
        let handled = handled.clone();
        tasks.push(tokio::spawn(consume(
            bus.clone(),
            consumer,
            ConsumeOptions::new(format!("replica-{replica}"), 4),
            shutdown.clone(),
            tracker.clone(),
            move |_: colony_bus::Delivery<TaskDispatch>| {
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    Outcome::Ack
                }
            },
        )));
    }
    for i in 0..50 {
        bus.publish(&subject, &format!("s{i}"), &dispatch(&format!("t{i}"), 1))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "all handled", || {
        let handled = handled.clone();
        async move { (handled.load(Ordering::SeqCst) >= 50).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 50);
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}
