//! Chaos: worker replicas are SIGKILLed at random while one run of a thousand tasks runs.
//! Every task must complete, none may be lost, and none may have more than one completion
//! accepted.

use std::time::{Duration, Instant};

use colony_e2e::{Stack, StackOptions, scripted_router};

const TASKS: usize = 1000;
const KILLS: usize = 20;
const WORKERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_workers_every_two_seconds_loses_and_duplicates_nothing() {
    let mut stack = Stack::start(StackOptions {
        router_toml: scripted_router("done", "1s"),
        lease: "2s",
        workers: WORKERS,
        worker_slots: 8,
        log_filter: "warn",
        // One run holds every task: the plan bound is raised to fit it.
        orchestrator_env: vec![(
            "ORCHESTRATOR__ROSTER__PLAN_LIMITS__MAX_TASKS".into(),
            TASKS.to_string(),
        )],
        ..StackOptions::default()
    })
    .await;

    let plan: Vec<serde_json::Value> = (0..TASKS)
        .map(|i| {
            serde_json::json!({
                "id": format!("t{i}"),
                "role": "generalist",
                "instructions": format!("chaos task {i}"),
            })
        })
        .collect();
    let response = stack
        .http
        .post(format!("{}/v1/runs", stack.orchestrator_url))
        .json(&serde_json::json!({ "goal": "chaos", "plan": plan }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let run: serde_json::Value = response.json().await.unwrap();
    let run_id = run["id"].as_str().unwrap().to_owned();

    // Kill a pseudo-randomly chosen live worker about every 2 s and start a replacement, so
    // capacity stays and every kill lands on a worker that holds claimed tasks.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_secs(2)).await;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let live: Vec<usize> = (0..stack.workers.len())
            .filter(|&i| stack.workers[i].exited().is_none())
            .collect();
        let victim = live[(seed as usize) % live.len()];
        stack.workers[victim].kill();
        stack.start_worker().await;
        eprintln!("kill {}: worker-{victim}", kill + 1);
    }

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let finished = stack
            .scalar(
                "SELECT count(*) FROM orchestrator.tasks \
                 WHERE state NOT IN ('queued', 'running', 'pending')",
            )
            .await;
        if finished as usize == TASKS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {finished} of {TASKS} tasks finished"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let run = stack.wait_run(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "the run completed");
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM orchestrator.tasks WHERE state = 'succeeded'")
            .await,
        TASKS as i64,
        "every task completed"
    );
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM orchestrator.task_reports WHERE accepted")
            .await,
        TASKS as i64,
        "exactly one accepted completion per task"
    );
    assert_eq!(
        stack
            .scalar(
                "SELECT count(*) FROM (SELECT task_id FROM orchestrator.task_reports \
             WHERE accepted GROUP BY task_id HAVING count(*) > 1) twice"
            )
            .await,
        0
    );
    let expired = stack
        .scalar("SELECT count(*) FROM orchestrator.task_attempts WHERE outcome = 'lease_expired'")
        .await;
    assert!(expired > 0, "the kills interrupted claimed tasks");
    eprintln!("{expired} attempts lost their lease and were re-dispatched");
}
