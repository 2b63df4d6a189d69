//! Two orchestrator replicas on one database and bus, one of them SIGKILLed mid-stream: the
//! survivor relays what the dead one left in the outbox, applies every report once, and
//! nothing is published twice.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::{Duration, Instant};

use colony_e2e::{Stack, StackOptions, scripted_router};

const RUNS: usize = 200;

async fn submit_to(stack: &Stack, api: &str, goal: &str) {
    let response = stack
        .http
        .post(format!("{api}/v1/runs"))
        .json(&serde_json::json!({ "goal": goal }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_replica_finishes_what_a_killed_one_started() {
    let mut stack = Stack::start(StackOptions {
        router_toml: scripted_router("done", "100ms"),
        lease: "2s",
        workers: 0,
        log_filter: "warn",
        ..StackOptions::default()
    })
    .await;
    // Workers claim through the second replica, which survives.
    let survivor = stack.start_orchestrator("orchestrator-b").await;
    stack.point_workers_at(&survivor.grpc_url);
    stack.start_worker().await;
    stack.start_worker().await;

    // Half the runs through the first replica, which is then killed without warning.
    let first = stack.orchestrator_url.clone();
    for i in 0..RUNS / 2 {
        submit_to(&stack, &first, &format!("replica run {i}")).await;
    }
    let victim = stack.services_by_name("orchestrator");
    stack.kill_service(victim);
    for i in RUNS / 2..RUNS {
        submit_to(&stack, &survivor.http_url, &format!("replica run {i}")).await;
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = stack
            .scalar("SELECT count(*) FROM orchestrator.runs WHERE status = 'succeeded'")
            .await;
        if done as usize == RUNS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {RUNS} runs succeeded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM orchestrator.task_reports WHERE accepted")
            .await,
        RUNS as i64,
        "each report applied once"
    );
    // The survivor relays what the killed replica left, and the last runs' events.
    stack.wait_outbox_relayed().await;

    // Every lifecycle event is on the bus exactly once, whichever replica relayed it.
    let seen = stack.event_msg_ids("colony.v1.event.run.>").await;
    assert_eq!(
        seen.keys().filter(|id| id.ends_with("-succeeded")).count(),
        RUNS,
        "one run.succeeded per run"
    );
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "published twice: {repeated:?}");
    drop(survivor);
}
