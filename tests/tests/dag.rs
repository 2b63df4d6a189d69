//! DAG runs end to end with the real binaries: a scripted planner (the router's scripted
//! provider answers the planner's prompt with a plan and every other role with a fixed
//! reply), dependency order as PostgreSQL recorded it, dependency outputs in the dependents'
//! prompts (one of them by reference), and the dial choosing a hybrid run by itself.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::time::Duration;

use colony_e2e::{Stack, StackOptions};
use serde_json::{Value, json};

/// The plan the scripted planner answers with: gather → (draft, facts) → check.
const PLAN: &str = r#"{"tasks": [
  {"id": "gather", "role": "researcher", "instructions": "Research the bees"},
  {"id": "draft", "role": "writer", "instructions": "Write the summary", "depends_on": ["gather"]},
  {"id": "facts", "role": "researcher", "instructions": "List hive facts", "depends_on": ["gather"]},
  {"id": "check", "role": "reviewer", "instructions": "Check the summary", "depends_on": ["draft", "facts"]}
]}"#;

/// Rules match the last user message (the task's instructions): the planner's goal gets the
/// plan; each planned or template task a fixed reply.
fn router() -> String {
    format!(
        r#"
default_deployment = "scripted"

[[deployments]]
name = "scripted"
provider = "scripted"
model = "scripted"
tier = "mid"
input_price_per_mtok = 0.0
output_price_per_mtok = 0.0
timeout = "30s"

[[deployments.script]]
contains = "Research what this goal needs"
reply = "HYBRID-RESEARCH"

[[deployments.script]]
contains = "Using the research"
reply = "HYBRID-DRAFT"

[[deployments.script]]
contains = "Review the draft against this goal"
reply = "HYBRID-FINAL"

[[deployments.script]]
contains = "Research the bees"
reply = "RESEARCH-NOTES-42: bees live in hives and make honey"
delay = "300ms"

[[deployments.script]]
contains = "Write the summary"
reply = "DRAFT-7"
delay = "200ms"

[[deployments.script]]
contains = "List hive facts"
reply = "FACTS-9"

[[deployments.script]]
contains = "Check the summary"
reply = "FINAL-REPORT-OK"

[[deployments.script]]
contains = "Plan the bees project"
reply = '''{PLAN}'''

[[deployments.script]]
reply = "unexpected prompt"
"#
    )
}

async fn submit(stack: &Stack, body: Value) -> String {
    let response = stack
        .http
        .post(format!("{}/v1/runs", stack.orchestrator_url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let run: Value = response.json().await.unwrap();
    run["id"].as_str().unwrap().to_owned()
}

async fn count(stack: &Stack, sql: &str, run_id: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(run_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_dag_runs_in_order_with_its_dependencies_outputs() {
    let stack = Stack::start(StackOptions {
        router_toml: router(),
        // The research notes (above 16 bytes) reach their dependents by reference.
        orchestrator_env: vec![(
            "ORCHESTRATOR__ROSTER__INLINE_OUTPUT_BYTES".into(),
            "16".into(),
        )],
        ..StackOptions::default()
    })
    .await;

    let run_id = submit(
        &stack,
        json!({"goal": "Plan the bees project", "topology": "swarm"}),
    )
    .await;
    let run = stack.wait_run(&run_id, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], "FINAL-REPORT-OK", "{run}");
    assert_eq!(run["topology"]["topology"], "swarm", "{run}");
    assert_eq!(run["topology"]["overridden"], true, "{run}");
    assert_eq!(run["plan"]["source"], "planner", "{run}");
    let keys: Vec<&str> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["plan", "gather", "draft", "facts", "check"], "{run}");

    // Dependency order as PostgreSQL recorded it: no task started before one of its
    // dependencies finished, and the plan's tasks after the planner.
    let violations = count(
        &stack,
        "SELECT count(*) FROM orchestrator.task_dependencies d \
         JOIN orchestrator.tasks t ON t.id = d.task_id \
         JOIN orchestrator.tasks u ON u.id = d.depends_on \
         WHERE t.run_id = $1::uuid AND (t.started_at IS NULL OR t.started_at < u.finished_at)",
        &run_id,
    )
    .await;
    assert_eq!(violations, 0);
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM orchestrator.task_dependencies d \
             JOIN orchestrator.tasks t ON t.id = d.task_id WHERE t.run_id = $1::uuid",
            &run_id
        )
        .await,
        4
    );
    let before_planner = count(
        &stack,
        "SELECT count(*) FROM orchestrator.tasks t \
         JOIN orchestrator.tasks p ON p.run_id = t.run_id AND p.role = 'planner' \
         WHERE t.run_id = $1::uuid AND t.id <> p.id AND t.started_at < p.finished_at",
        &run_id,
    )
    .await;
    assert_eq!(before_planner, 0);

    // The dependents' prompts held their dependencies' outputs: the research notes fetched by
    // reference (no reference line reached memory), the short draft inline.
    let prompt_with = |needle: &'static str| {
        let stack = &stack;
        let run_id = run_id.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM memory.messages m \
                 WHERE m.run_id = $1 AND m.role = 'user' AND m.content LIKE $2",
            )
            .bind(&run_id)
            .bind(format!("%{needle}%"))
            .fetch_one(&stack.db.pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        prompt_with("RESEARCH-NOTES-42: bees live in hives").await,
        2,
        "draft and facts got the research notes"
    );
    assert_eq!(prompt_with("DRAFT-7").await, 1, "check got the draft");
    assert_eq!(prompt_with("FACTS-9").await, 1, "check got the facts");
    assert_eq!(prompt_with("colony-ref:").await, 0);
    // The planner's system prompt listed the roster's roles.
    let planner_system: String = sqlx::query_scalar(
        "SELECT content FROM memory.messages WHERE run_id = $1 AND role = 'system' \
         ORDER BY seq LIMIT 1",
    )
    .bind(&run_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    for role in ["researcher", "writer", "reviewer", "generalist"] {
        assert!(planner_system.contains(role), "{planner_system}");
    }

    // The dial, left alone, gives a goal too large for one agent the hybrid template.
    let goal = format!(
        "Summarise the following notes. {}",
        "lorem ipsum ".repeat(60)
    );
    let hybrid_id = submit(&stack, json!({ "goal": goal })).await;
    let hybrid = stack.wait_run(&hybrid_id, Duration::from_secs(60)).await;
    assert_eq!(hybrid["status"], "succeeded", "{hybrid}");
    assert_eq!(hybrid["topology"]["topology"], "hybrid", "{hybrid}");
    assert_eq!(hybrid["topology"]["overridden"], false, "{hybrid}");
    assert!(
        hybrid["topology"]["inputs"]["fill"].as_f64().unwrap() > 0.25,
        "{hybrid}"
    );
    assert_eq!(hybrid["output"], "HYBRID-FINAL", "{hybrid}");
    let roles: Vec<&str> = hybrid["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["researcher", "writer", "reviewer"]);

    // A run may carry its plan; a noop step passes its instructions on without the router.
    let given_id = submit(
        &stack,
        json!({ "goal": "summarise with a brief", "plan": [
            { "id": "brief", "role": "noop", "instructions": "BRIEF-5: keep it short" },
            { "id": "draft", "role": "writer", "instructions": "Write the summary",
              "depends_on": ["brief"] },
        ]}),
    )
    .await;
    let given = stack.wait_run(&given_id, Duration::from_secs(60)).await;
    assert_eq!(given["status"], "succeeded", "{given}");
    assert_eq!(given["output"], "DRAFT-7", "{given}");
    assert_eq!(given["tasks"][0]["state"], "succeeded", "{given}");
    let noop_id = given["tasks"][0]["id"].as_str().unwrap();
    let noop_calls: i64 =
        sqlx::query_scalar("SELECT count(*) FROM router.usage_ledger WHERE task_id::text = $1")
            .bind(noop_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(noop_calls, 0, "a noop step never reaches the router");
    let draft_prompt: String = sqlx::query_scalar(
        "SELECT string_agg(content, '\n') FROM memory.messages WHERE task_id::text = $1",
    )
    .bind(given["tasks"][1]["id"].as_str().unwrap())
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert!(draft_prompt.contains("BRIEF-5"), "{draft_prompt}");
}
