//! Recovery of a lone orchestrator: SIGKILLed while runs are being created and their events
//! relayed, so that the outbox holds rows it never sent. A new process on the same database
//! and bus publishes them, dispatches the queued tasks, and every run finishes with each
//! event on the bus once.

use std::time::{Duration, Instant};

use colony_e2e::{Stack, StackOptions, scripted_router};
use colony_testkit::Process;
use tokio::task::JoinSet;

/// Runs submitted at once in each round; the kill lands while they are being created.
const BURST: usize = 100;

/// Rounds (kill, restart) at most, until one leaves unsent rows behind.
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_orchestrator_publishes_what_a_killed_one_left_unsent() {
    let mut stack = Stack::start(StackOptions {
        router_toml: scripted_router("done", "0ms"),
        workers: 0,
        log_filter: "error",
        ..StackOptions::default()
    })
    .await;
    let mut api = stack.orchestrator_url.clone();
    let mut current: Option<Process> = None;
    let mut left_unsent = 0;
    let mut round = 0;
    while left_unsent == 0 && round < ROUNDS {
        round += 1;
        let mut submissions = JoinSet::new();
        for i in 0..BURST {
            let (http, api) = (stack.http.clone(), api.clone());
            submissions.spawn(async move {
                // Answers are not awaited to the end: the process dies under them.
                drop(
                    http.post(format!("{api}/v1/runs"))
                        .json(&serde_json::json!({ "goal": format!("round {round} run {i}") }))
                        .send()
                        .await,
                );
            });
        }
        // Kill once a part of the burst is in the database, while the relay is behind.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stack.scalar("SELECT count(*) FROM orchestrator.runs").await
            < ((round - 1) * BURST + BURST / 4) as i64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        match current.take() {
            Some(mut process) => process.kill(),
            None => {
                let first = stack.services_by_name("orchestrator");
                stack.kill_service(first);
            }
        }
        submissions.join_all().await;
        left_unsent = stack
            .scalar("SELECT count(*) FROM orchestrator.outbox")
            .await;
        let replica = stack
            .start_orchestrator(&format!("orchestrator-{round}"))
            .await;
        api = replica.http_url.clone();
        stack.point_workers_at(&replica.grpc_url);
        current = Some(replica.process);
    }
    eprintln!("round {round}: the kill left {left_unsent} outbox rows unsent");
    assert!(
        left_unsent > 0,
        "no kill in {ROUNDS} rounds left unsent outbox rows behind"
    );

    stack.start_worker().await;
    let runs = stack.scalar("SELECT count(*) FROM orchestrator.runs").await;
    assert!(runs > 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = stack
            .scalar("SELECT count(*) FROM orchestrator.runs WHERE status = 'succeeded'")
            .await;
        if done == runs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {runs} runs succeeded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.wait_outbox_relayed().await;
    let seen = stack.event_msg_ids("colony.v1.event.run.>").await;
    let count = |suffix: &str| seen.keys().filter(|id| id.ends_with(suffix)).count() as i64;
    assert_eq!(count("-created"), runs, "one run.created per run");
    assert_eq!(count("-succeeded"), runs, "one run.succeeded per run");
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "published twice: {repeated:?}");
    drop(current);
}
