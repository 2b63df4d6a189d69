//! The agent loop end to end: a scripted model drives tool calls through the real router,
//! the worker runs them in its sandbox and feeds the results back, and the run's output
//! depends on what a real command printed.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_e2e::{Stack, StackOptions, metric_sum};
use colony_testkit::eventually;

/// One scripted deployment with the `tools` capability. The first turn reads a file outside
/// the workspace (refused), writes one inside it and counts its words with `wc`; the answer
/// only comes when the last tool result holds `wc`'s real output, so a broken loop or sandbox
/// fails the run (no rule matches: a permanent error).
const ROUTER: &str = r#"
default_deployment = "scripted"

[[deployments]]
name = "scripted"
provider = "scripted"
model = "scripted"
tier = "mid"
capabilities = ["tools"]
# Prompts are free and each written token costs a dollar: a call's reservation is then
# exactly max_tokens dollars, whatever the prompt.
input_price_per_mtok = 0.0
output_price_per_mtok = 1000000.0
timeout = "30s"

[[deployments.script]]
contains = "Count the words"
reply = "Let me look."

[[deployments.script.tool_calls]]
name = "read_file"
arguments = '{"path": "/etc/passwd"}'

[[deployments.script.tool_calls]]
name = "write_file"
arguments = '{"path": "notes/words.txt", "content": "alpha beta gamma\n"}'

[[deployments.script.tool_calls]]
name = "run_command"
arguments = '{"program": "wc", "args": ["-w", "notes/words.txt"]}'

[[deployments.script]]
contains = "3 notes/words.txt"
reply = "The file has 3 words."

[[deployments.script]]
contains = "Resume after a crash"

[[deployments.script.tool_calls]]
name = "write_file"
arguments = '{"path": "step1.txt", "content": "one\n"}'

[[deployments.script]]
contains = "wrote 4 bytes to step1.txt"

[[deployments.script.tool_calls]]
name = "run_command"
arguments = '{"program": "sh", "args": ["-c", "test -e second && echo resumed-ok || { echo $$ > pid; touch second; exec sleep 60; }"]}'

[[deployments.script]]
contains = "resumed-ok"
reply = "finished after a resume"

[[deployments.script]]
contains = "Finish while draining"

[[deployments.script.tool_calls]]
name = "run_command"
arguments = '{"program": "sh", "args": ["-c", "echo $$ > pid; sleep 2; echo drained-ok"]}'

[[deployments.script]]
contains = "drained-ok"
reply = "finished during the drain"

[[deployments.script]]
contains = "Overflow the window"

[[deployments.script.tool_calls]]
name = "run_command"
arguments = '{"program": "seq", "args": ["-f", "line %g", "1", "250"]}'

# Memory's summariser: its transcript shows the call.
[[deployments.script]]
contains = "[called run_command"
reply = "The agent printed 250 numbered lines."

[[deployments.script]]
contains = "250 numbered lines"
reply = "compressed-ok"

[[deployments.script]]
contains = "Tell a story slowly"
reply = "once upon a time"
delay = "1s"
piece_delay = "100ms"

[[deployments.script]]
contains = "Wait for a long time"

[[deployments.script.tool_calls]]
name = "run_command"
arguments = '{"program": "sh", "args": ["-c", "echo $$ > pid; exec sleep 60"]}'
"#;

/// A roster given in a file replaces the default roles: the planner is required, and the
/// hybrid template may name only roles that exist.
const ORCHESTRATOR: &str = r#"
[roster.roles.planner]
prompt = "You split goals into tasks."

[roster.roles.generalist]
prompt = "You are a careful assistant with a workspace."
tools = ["read_file", "write_file", "run_command", "memory_search"]

# (A role the workers consume by default.) Its tier's window holds the prompt but not a
# 250-line command output (about 600 tokens):
# the worker compresses the conversation through memory to go on.
[roster.roles.researcher]
prompt = "You work within a small context window."
tier = "mid"
tools = ["run_command"]

# Models given in a file replace the default profiles: the default tier needs one too.
[roster.models.default]
context_window = 8192
tokens_per_s = 50.0
input_price_per_mtok = 0.0
output_price_per_mtok = 1.0
quality = 0.7

[roster.models.mid]
context_window = 400
tokens_per_s = 50.0
input_price_per_mtok = 0.0
output_price_per_mtok = 1.0
quality = 0.7

[roster.templates]
hybrid = [{ id = "answer", role = "generalist", instructions = "{goal}" }]
"#;

/// `max_tokens` of every model call (the orchestrator's `runs.max_tokens`).
const MAX_TOKENS: i64 = 100;

async fn start() -> Stack {
    start_with_lease("30s").await
}

async fn start_with_lease(lease: &'static str) -> Stack {
    Stack::start(StackOptions {
        router_toml: ROUTER.into(),
        orchestrator_toml: ORCHESTRATOR.into(),
        orchestrator_env: vec![(
            "ORCHESTRATOR__RUNS__MAX_TOKENS".into(),
            MAX_TOKENS.to_string(),
        )],
        lease,
        ..StackOptions::default()
    })
    .await
}

/// Submits `goal` as one generalist task; returns the run id.
async fn submit(stack: &Stack, goal: &str) -> String {
    submit_with(
        stack,
        serde_json::json!({ "goal": goal, "topology": "monolith" }),
    )
    .await
}

async fn submit_with(stack: &Stack, body: serde_json::Value) -> String {
    let response = stack
        .http
        .post(format!("{}/v1/runs", stack.orchestrator_url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let run: serde_json::Value = response.json().await.unwrap();
    run["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_agent_uses_tools_and_answers_from_their_results() {
    let stack = start().await;
    let run_id = submit(&stack, "Count the words in a new notes file.").await;
    let run = stack.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");

    let output: String = sqlx::query_scalar(
        "SELECT output FROM orchestrator.tasks WHERE run_id = $1::uuid AND role = 'generalist'",
    )
    .bind(&run_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(output, "The file has 3 words.");

    // The replay log holds the whole conversation: prompt (system, user), the model's turn
    // with three tool calls, three tool results, the answer.
    let steps: Vec<serde_json::Value> = eventually(
        Duration::from_secs(10),
        "the attempt's seven steps in the replay log",
        || async {
            let steps: Vec<serde_json::Value> = sqlx::query_scalar(
                "SELECT message FROM memory.trajectory_steps WHERE run_id = $1 ORDER BY step",
            )
            .bind(&run_id)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
            (steps.len() == 7).then_some(steps)
        },
    )
    .await;
    let roles: Vec<&str> = steps
        .iter()
        .map(|step| step["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [
            "system",
            "user",
            "assistant",
            "tool",
            "tool",
            "tool",
            "assistant"
        ]
    );
    let calls: Vec<&str> = steps[2]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|call| call["name"].as_str().unwrap())
        .collect();
    assert_eq!(calls, ["read_file", "write_file", "run_command"]);
    let refused = steps[3]["content"].as_str().unwrap();
    assert!(
        refused.starts_with("error:") && refused.contains("outside the workspace"),
        "{refused}"
    );
    assert_eq!(steps[4]["content"], "wrote 17 bytes to notes/words.txt");
    let counted = steps[5]["content"].as_str().unwrap();
    assert!(
        counted.starts_with("exit code 0") && counted.contains("3 notes/words.txt"),
        "{counted}"
    );

    // The workspace went with the reported task; the calls were counted.
    let workspaces = stack.config_dir.join("workspaces");
    let left: Vec<_> = std::fs::read_dir(&workspaces)
        .map(|dir| dir.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "workspaces left behind: {left:?}");
    let worker_metrics = stack.metrics(&stack.worker_urls[0]).await;
    assert_eq!(
        metric_sum(&worker_metrics, "colony_agent_worker_tool_calls_total"),
        3.0
    );
    assert!(
        worker_metrics
            .contains(r#"colony_agent_worker_tool_calls_total{tool="read_file",result="error"} 1"#),
        "{worker_metrics}"
    );
}

/// The workspace of the stack's one running task and the pid its command wrote into `pid`,
/// once it has.
async fn running_command(stack: &Stack) -> (std::path::PathBuf, i32) {
    let workspaces = stack.config_dir.join("workspaces");
    eventually(Duration::from_secs(30), "the command running", || {
        let workspaces = workspaces.clone();
        async move {
            let workspace = std::fs::read_dir(&workspaces)
                .ok()?
                .flatten()
                .next()?
                .path();
            let pid = std::fs::read_to_string(workspace.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((workspace, pid))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_kills_its_running_command() {
    let stack = start().await;
    let run_id = submit(&stack, "Wait for a long time.").await;
    // The command writes its pid into the workspace, then becomes `sleep 60`.
    let (workspace, pid) = running_command(&stack).await;
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists(), "the command runs");

    let cancelled_at = std::time::Instant::now();
    let response = stack
        .http
        .post(format!(
            "{}/v1/runs/{run_id}/cancel",
            stack.orchestrator_url
        ))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    // The worker hears the cancellation on the bus (not at its next lease heartbeat, 10 s
    // away) and kills the command's process group. The margin is for a loaded machine; the
    // time it took is printed.
    eventually(Duration::from_secs(5), "the command killed", || {
        let gone = !proc_dir.exists()
            || std::fs::read_to_string(proc_dir.join("stat"))
                .is_ok_and(|stat| stat.split_whitespace().nth(2) == Some("Z"));
        async move { gone.then_some(()) }
    })
    .await;
    println!(
        "command killed {} ms after the cancel request",
        cancelled_at.elapsed().as_millis()
    );
    eventually(Duration::from_secs(5), "the workspace removed", || {
        let gone = !workspace.exists();
        async move { gone.then_some(()) }
    })
    .await;
    let run = stack.wait_run(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "cancelled", "{run:#}");
    let worker_metrics = stack.metrics(&stack.worker_urls[0]).await;
    assert!(
        worker_metrics.contains(
            r#"colony_agent_worker_tasks_total{role="generalist",outcome="cancelled"} 1"#
        ),
        "{worker_metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_budget_stops_the_agent_loop_between_model_calls() {
    let stack = start().await;
    // What the first model call of the word-count conversation costs, from a run without a
    // budget (the router's ledger holds each call).
    let free = submit(&stack, "Count the words in a new notes file.").await;
    let run = stack.wait_run(&free, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let first_call: i64 = eventually(Duration::from_secs(10), "two calls in the ledger", || {
        let pool = stack.db.pool.clone();
        let run_id = free.clone();
        async move {
            let costs: Vec<i64> = sqlx::query_scalar(
                "SELECT cost_micros_usd FROM router.usage_ledger WHERE run_id = $1 \
                 ORDER BY id",
            )
            .bind(&run_id)
            .fetch_all(&pool)
            .await
            .unwrap();
            (costs.len() == 2).then(|| costs[0])
        }
    })
    .await;
    assert!(first_call > 0);

    // Each call reserves MAX_TOKENS dollars. The first fits; after it the run has spent
    // `first_call`, and half of that is all that is left over the next reservation.
    let budget_usd = (MAX_TOKENS * 1_000_000 + first_call / 2) as f64 / 1e6;
    let limited = submit_with(
        &stack,
        serde_json::json!({
            "goal": "Count the words in a new notes file.",
            "topology": "monolith",
            "budget_usd": budget_usd,
        }),
    )
    .await;
    let run = stack.wait_run(&limited, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["budget_usd"], budget_usd);
    let (class, reason): (String, String) = sqlx::query_as(
        "SELECT error_class, failure_reason FROM orchestrator.runs WHERE id = $1::uuid",
    )
    .bind(&limited)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert!(
        reason.contains("budget") && reason.contains("model call 2 of the agent loop"),
        "{class}: {reason}"
    );
    // The tools of the first turn ran; the loop stopped before a second model call.
    let tool_steps: i64 = stack
        .scalar(&format!(
            "SELECT count(*) FROM memory.trajectory_steps WHERE run_id = '{limited}' \
             AND message->>'role' = 'tool'"
        ))
        .await;
    assert_eq!(tool_steps, 3);

    // A budget that is not a number of dollars is refused.
    let response = stack
        .http
        .post(format!("{}/v1/runs", stack.orchestrator_url))
        .json(&serde_json::json!({ "goal": "x", "budget_usd": -1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body.to_string()
            .contains("budget_usd must be a number from 0"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_attempt_resumes_from_the_checkpoint_of_a_killed_worker() {
    let mut stack = start_with_lease("2s").await;
    let run_id = submit(&stack, "Resume after a crash.").await;
    // Attempt 1: the model writes a file (checkpointed), then runs a command that marks the
    // workspace and hangs. The worker is killed there.
    let (_, pid) = running_command(&stack).await;
    stack.workers[0].kill();
    // A killed worker cannot stop its commands: this one is the test's to end.
    drop(
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status(),
    );
    stack.start_worker().await;

    // Attempt 2 (after the lease expired) resumes with the conversation so far: it asks the
    // model once for the command and once for the answer, not three times from the start.
    let run = stack.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let output: String = sqlx::query_scalar(
        "SELECT output FROM orchestrator.tasks WHERE run_id = $1::uuid AND role = 'generalist'",
    )
    .bind(&run_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(output, "finished after a resume");
    let calls: Vec<(i32, i64)> = eventually(Duration::from_secs(10), "the ledger", || {
        let pool = stack.db.pool.clone();
        let run_id = run_id.clone();
        async move {
            let calls: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT attempt, count(*) FROM router.usage_ledger WHERE run_id = $1 \
                 GROUP BY attempt ORDER BY attempt",
            )
            .bind(&run_id)
            .fetch_all(&pool)
            .await
            .unwrap();
            (calls.iter().map(|(_, n)| n).sum::<i64>() == 4).then_some(calls)
        }
    })
    .await;
    assert_eq!(calls, [(1, 2), (2, 2)]);
    let worker_metrics = stack.metrics(&stack.worker_urls[1]).await;
    assert_eq!(
        metric_sum(&worker_metrics, "colony_agent_worker_resumed_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_task_finish_its_command_and_report() {
    let mut stack = start().await;
    let run_id = submit(&stack, "Finish while draining.").await;
    running_command(&stack).await;
    // The worker stops taking work, lets the task's two-second command end, has the model
    // answer, reports, and only then exits (well inside its 30 s shutdown grace).
    let code = stack.workers[0].terminate(Duration::from_secs(25));
    assert_eq!(code, Some(0), "the worker exits cleanly after draining");
    let run = stack.wait_run(&run_id, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let output: String = sqlx::query_scalar(
        "SELECT output FROM orchestrator.tasks WHERE run_id = $1::uuid AND role = 'generalist'",
    )
    .bind(&run_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(output, "finished during the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_outgrowing_its_window_is_compressed_through_memory() {
    let stack = start().await;
    let run_id = submit_with(
        &stack,
        serde_json::json!({
            "goal": "overflow",
            "plan": [{
                "id": "long",
                "role": "researcher",
                "instructions": "Overflow the window: print many lines.",
                "depends_on": []
            }]
        }),
    )
    .await;
    let run = stack.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    // The second model call saw memory's summary instead of the long output.
    assert_eq!(run["output"], "compressed-ok", "{run:#}");

    // The compressed turns are stored in the attempt's own session, with the summary that
    // stands for them.
    let (session, messages): (String, i64) = sqlx::query_as(
        "SELECT session_id, count(*) FROM memory.messages \
         WHERE session_id LIKE $1 || '/%/context' GROUP BY session_id",
    )
    .bind(&run_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(messages, 2, "the tool call and its result");
    let summaries: Vec<String> =
        sqlx::query_scalar("SELECT content FROM memory.session_summaries WHERE session_id = $1")
            .bind(&session)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(summaries, ["The agent printed 250 numbered lines."]);

    let metrics = stack.metrics(&stack.worker_urls[0]).await;
    assert_eq!(
        metric_sum(&metrics, "colony_agent_worker_context_overflows_total"),
        1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("colony_agent_worker_context_overflows_total{action=\"compressed\"} 1"),
        "{metrics}"
    );
}

/// The events of a server-sent event stream: (event name, data).
fn sse_events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(value).ok();
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stream_shows_the_text_as_the_model_writes_it_then_ends() {
    let stack = start().await;
    let run_id = submit(&stack, "Tell a story slowly.").await;
    let url = format!("{}/v1/runs/{run_id}/stream", stack.orchestrator_url);
    // The model waits a second before its first word: the stream is open by then.
    let response = stack.http.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    // The body ends when the run does.
    let events = sse_events(&response.text().await.unwrap());
    let (last, status) = events.last().unwrap();
    assert_eq!(
        (last.as_str(), &status["status"]),
        ("end", &serde_json::json!("succeeded"))
    );
    let tokens: Vec<&serde_json::Value> = events
        .iter()
        .filter(|(name, _)| name == "tokens")
        .map(|(_, data)| data)
        .collect();
    let text: String = tokens
        .iter()
        .map(|chunk| chunk["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "once upon a time");
    // Written over time: more than one piece before the end of the call.
    assert!(tokens.len() > 2, "{tokens:?}");
    assert_eq!(tokens.last().unwrap()["done"], true);

    // A finished run's stream is its end at once; another tenant's run is not found.
    let events = sse_events(
        &stack
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "end");
    let response = stack
        .http
        .get(&url)
        .header("x-colony-tenant", "someone-else")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);

    // `colony watch` prints the text as it comes and exits 0 when the run succeeded.
    let run_id = submit(&stack, "Tell a story slowly.").await;
    let output = tokio::process::Command::new(colony_testkit::binary("colony"))
        .args(["watch", &run_id])
        .env("COLONY_API_URL", &stack.orchestrator_url)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "once upon a time\n"
    );
    assert!(stderr.contains("· model call 1]"), "{stderr}");
    assert!(
        stderr.ends_with(&format!("run {run_id} succeeded\n")),
        "{stderr}"
    );
}
