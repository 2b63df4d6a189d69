//! End to end: the five real binaries as processes against the local PostgreSQL and NATS.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_bus::StreamKind;
use colony_e2e::stub::{COMPLETION_TOKENS, PROMPT_TOKENS, StubProvider};
use colony_e2e::{Stack, StackOptions, metric_sum, openai_router};
use colony_proto::v1;
use colony_testkit::eventually;
use futures::StreamExt;
use prost::Message;

/// Every message in the EVENTS stream, as (logical subject, payload).
async fn lifecycle_events(stack: &Stack) -> Vec<(String, Vec<u8>)> {
    let bus = stack.bus.connect().await;
    let stream = bus
        .jetstream()
        .get_stream(bus.stream_name(StreamKind::Events))
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut events = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        events.push((
            bus.logical(message.subject.as_str()).to_owned(),
            message.payload.to_vec(),
        ));
    }
    events
}

async fn count(stack: &Stack, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goal_flows_through_all_five_services() {
    let mut provider = StubProvider::start().await.unwrap();
    let stack = Stack::start(StackOptions {
        router_toml: openai_router(&provider.base_url()),
        // A transient failure is tried twice, 200 ms apart, then dead-lettered.
        orchestrator_env: vec![
            (
                "ORCHESTRATOR__RETRIES__TRANSIENT__MAX_ATTEMPTS".into(),
                "2".into(),
            ),
            (
                "ORCHESTRATOR__RETRIES__TRANSIENT__BACKOFF_BASE".into(),
                "200ms".into(),
            ),
        ],
        ..StackOptions::default()
    })
    .await;

    let run_id = stack.submit("name three colours").await;
    let run = stack.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], "echo: name three colours");
    assert_eq!(run["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(run["usage"]["completion_tokens"], COMPLETION_TOKENS);
    assert_eq!(
        provider.requests.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The answer was streamed onto the events stream as the model wrote it.
    let tokens: Vec<v1::TaskTokens> = stack
        .events(colony_bus::subjects::TASK_TOKENS)
        .await
        .iter()
        .map(|(_, payload)| v1::TaskTokens::decode(payload.as_ref()).unwrap())
        .collect();
    let text: String = tokens.iter().map(|chunk| chunk.text.as_str()).collect();
    assert_eq!(text, "echo: name three colours");
    assert!(tokens.last().is_some_and(|chunk| chunk.done), "{tokens:?}");
    // The router counts the call, its spend and its latency for its tenant.
    let router_metrics = stack.metrics(&stack.router_http_url).await;
    for counter in [
        "colony_router_requests_total{",
        "colony_router_cost_micro_usd_total{",
        "colony_router_request_duration_seconds_count{",
        "colony_router_time_to_first_token_seconds_count{",
    ] {
        assert!(
            router_metrics
                .lines()
                .any(|line| line.starts_with(counter) && line.contains(r#"tenant="default""#)),
            "{counter} by tenant:\n{router_metrics}"
        );
    }

    // State in PostgreSQL, in every service's schema.
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_reports WHERE accepted"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_attempts WHERE outcome = 'succeeded'"
        )
        .await,
        1
    );
    stack.wait_outbox_relayed().await;
    // Memory stores the conversation as it consumes the task's events: eventually.
    eventually(
        Duration::from_secs(20),
        "the conversation in memory",
        || async {
            let all = count(&stack, "SELECT count(*) FROM memory.messages").await;
            let answers = count(
                &stack,
                "SELECT count(*) FROM memory.messages WHERE role = 'assistant'",
            )
            .await;
            (all >= 3 && answers == 1).then_some(())
        },
    )
    .await;
    // Memory's replay log recorded the attempt from the bus: its steps and its outcome.
    eventually(
        Duration::from_secs(10),
        "the attempt in the replay log",
        || async {
            let succeeded = count(
                &stack,
                "SELECT count(*) FROM memory.trajectories WHERE outcome = 'succeeded'",
            )
            .await;
            let assistant_steps = count(
                &stack,
                "SELECT count(*) FROM memory.trajectory_steps WHERE message->>'role' = 'assistant'",
            )
            .await;
            (succeeded == 1 && assistant_steps == 1).then_some(())
        },
    )
    .await;
    // The router writes its ledger in batches just after answering.
    eventually(
        Duration::from_secs(10),
        "the call in the ledger",
        || async {
            let calls = count(
                &stack,
                "SELECT count(*) FROM router.usage_ledger WHERE outcome = 'ok'",
            )
            .await;
            (calls == 1).then_some(())
        },
    )
    .await;

    // Lifecycle events on the bus, in order, with the tenant.
    let events = lifecycle_events(&stack).await;
    let subjects: Vec<&str> = events.iter().map(|(s, _)| s.as_str()).collect();
    for expected in [
        "colony.v1.event.run.created",
        "colony.v1.event.task.queued",
        "colony.v1.event.task.started",
        "colony.v1.event.task.succeeded",
        "colony.v1.event.run.succeeded",
        "colony.v1.usage.recorded",
        "colony.v1.worker.heartbeat",
    ] {
        assert!(
            subjects.contains(&expected),
            "{expected} missing from {subjects:?}"
        );
    }
    let (_, payload) = events
        .iter()
        .find(|(s, _)| s == "colony.v1.event.run.succeeded")
        .unwrap();
    let finished = v1::RunEvent::decode(payload.as_slice()).unwrap();
    assert_eq!(finished.run_id, run_id);
    assert_eq!(finished.tenant, "default");

    // The monitor consumed them.
    let monitor = eventually(Duration::from_secs(10), "monitor counts events", || async {
        let text = stack.metrics(&stack.monitor_url).await;
        (metric_sum(&text, "colony_monitor_events_total") >= 5.0).then_some(text)
    })
    .await;
    assert!(monitor.contains("run.succeeded"), "{monitor}");

    // A malformed protobuf on a consumed subject is terminated, counted and dead-lettered.
    let bus = stack.bus.connect().await;
    bus.publish_bytes(
        "colony.v1.task.report.succeeded",
        "garbage-1",
        None,
        b"\xff\xff\xff not protobuf".as_slice().into(),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "malformed report terminated",
        || async {
            let text = stack.metrics(&stack.orchestrator_url).await;
            (metric_sum(&text, "colony_bus_terminated_total") >= 1.0).then_some(())
        },
    )
    .await;
    let mut dead = bus
        .jetstream()
        .get_stream(bus.stream_name(StreamKind::DeadLetter))
        .await
        .unwrap();
    assert!(dead.info().await.unwrap().state.messages >= 1);

    // An unreachable provider fails the attempt as transient: it is retried after the
    // backoff, then dead-lettered, and the run fails with the class and reason.
    provider.stop().await;
    let failed_id = stack.submit("this one cannot be answered").await;
    let failed = stack.wait_run(&failed_id, Duration::from_secs(60)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["failure"]["error_class"], "transient", "{failed}");
    let reason = failed["failure"]["reason"].as_str().unwrap();
    assert!(reason.contains("router"), "{reason}");
    assert_eq!(failed["tasks"][0]["state"], "dead_lettered", "{failed}");
    assert_eq!(failed["tasks"][0]["attempt"], 2, "{failed}");
    // Two provider calls per attempt: the router retries a transient failure once on the
    // same deployment (resilience.retry.max_attempts = 2) before the attempt fails. The
    // ledger is written in batches just after the answers.
    eventually(
        Duration::from_secs(10),
        "four failed calls recorded",
        || async {
            let failed_calls = count(
                &stack,
                "SELECT count(*) FROM router.usage_ledger WHERE outcome = 'error'",
            )
            .await;
            (failed_calls == 4).then_some(())
        },
    )
    .await;
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_attempts WHERE outcome = 'failed'"
        )
        .await,
        2
    );
    let dead: serde_json::Value = stack
        .http
        .get(format!("{}/v1/dead-letters", stack.orchestrator_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        dead["dead_letters"][0]["run_id"],
        failed_id.as_str(),
        "{dead}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_does_not_lose_its_task() {
    let router = r#"
default_deployment = "slow"

[[deployments]]
name = "slow"
provider = "scripted"
model = "scripted-slow"
tier = "mid"
input_price_per_mtok = 0.0
output_price_per_mtok = 0.0
timeout = "30s"

[[deployments.script]]
reply = "finished after a slow call"
delay = "3s"
"#;
    let mut stack = Stack::start(StackOptions {
        router_toml: router.into(),
        lease: "2s",
        ..StackOptions::default()
    })
    .await;

    let run_id = stack.submit("take your time").await;
    eventually(
        Duration::from_secs(30),
        "task claimed by worker-0",
        || async {
            let run = stack.get_run(&run_id).await;
            (run["tasks"][0]["state"] == "running").then_some(())
        },
    )
    .await;
    // Mid-call: the scripted provider is sleeping on the worker's request.
    stack.workers[0].kill();
    stack.start_worker().await;

    let run = stack.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], "finished after a slow call");
    assert!(run["tasks"][0]["attempt"].as_i64().unwrap() >= 2, "{run}");
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_reports WHERE accepted"
        )
        .await,
        1,
        "exactly one completion accepted"
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_attempts WHERE outcome = 'lease_expired' AND worker_id = 'worker-0'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_attempts WHERE outcome = 'succeeded' AND worker_id = 'worker-1'"
        )
        .await,
        1
    );
}

/// Runs the `colony` CLI against the stack; returns its stdout, failing on a non-zero exit.
async fn colony(stack: &Stack, args: &[&str]) -> String {
    let output = tokio::process::Command::new(colony_testkit::binary("colony"))
        .args(args)
        .env("COLONY_API_URL", &stack.orchestrator_url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "colony {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_reaches_a_running_worker_and_maintenance_pauses_dispatch() {
    let router = r#"
default_deployment = "scripted"

[[deployments]]
name = "scripted"
provider = "scripted"
model = "scripted"
tier = "mid"
input_price_per_mtok = 0.0
output_price_per_mtok = 0.0
timeout = "60s"

[[deployments.script]]
contains = "slow"
reply = "far too late"
delay = "30s"

[[deployments.script]]
reply = "quick reply"
"#;
    // Lease 3 s: the worker heartbeats every second.
    let stack = Stack::start(StackOptions {
        router_toml: router.into(),
        lease: "3s",
        ..StackOptions::default()
    })
    .await;

    let run_id = stack.submit("a slow one").await;
    eventually(Duration::from_secs(30), "task running", || async {
        let run = stack.get_run(&run_id).await;
        (run["tasks"][0]["state"] == "running").then_some(())
    })
    .await;
    let cancelled_at = std::time::Instant::now();
    let out = colony(&stack, &["cancel", &run_id]).await;
    assert!(out.contains("cancel"), "{out}");
    let run = stack.wait_run(&run_id, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["tasks"][0]["state"], "cancelled", "{run}");
    // Within about one heartbeat interval, long before the model call would have ended.
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        cancelled_at.elapsed()
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_attempts WHERE outcome = 'cancelled'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_reports WHERE accepted"
        )
        .await,
        0,
        "the stopped worker reported nothing"
    );

    // Maintenance: a run submitted while paused waits, and runs on resume.
    assert!(
        colony(&stack, &["maintenance", "on"])
            .await
            .contains("maintenance on")
    );
    assert!(
        colony(&stack, &["maintenance", "status"])
            .await
            .contains("maintenance on")
    );
    let waiting = stack.submit("a quick one").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = stack.get_run(&waiting).await;
    assert_eq!(run["tasks"][0]["state"], "queued", "{run}");
    assert!(
        colony(&stack, &["maintenance", "off"])
            .await
            .contains("maintenance off")
    );
    let run = stack.wait_run(&waiting, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], "quick reply");

    // Nothing dead-lettered here.
    assert_eq!(colony(&stack, &["dead-letters"]).await, "");
}
