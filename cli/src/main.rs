//! `colony`: the command-line client of the Colony REST API.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(version, about = "Submit goals to Colony and follow their runs")]
struct Cli {
    /// Orchestrator REST API.
    #[arg(
        long,
        env = "COLONY_API_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    api: String,
    /// Tenant to act for.
    #[arg(long, env = "COLONY_TENANT", global = true)]
    tenant: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a goal and wait for its result.
    Run {
        goal: String,
        /// Print every state change while waiting.
        #[arg(long)]
        follow: bool,
        /// Return after submitting, without waiting.
        #[arg(long, conflicts_with = "follow")]
        detach: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Print the run as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the text a run's models write, as they write it, until the run ends (exit code 0
    /// when it succeeded).
    Watch { run_id: String },
    /// Show one run.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List recent runs.
    Runs {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel a run: queued tasks stop at once, running ones at their next heartbeat.
    Cancel {
        run_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Re-queue a dead-lettered task with a fresh attempt budget; its run runs again.
    Requeue { task_id: String },
    /// List the tenant's dead-lettered tasks, most recent first.
    DeadLetters {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// List the tenant's tasks awaiting approval, oldest first.
    Approvals {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Approve a task awaiting approval: it is dispatched.
    Approve { task_id: String },
    /// Reject a task awaiting approval: it fails (user-fixable) with the reason, and its run's
    /// failure policy applies.
    Reject {
        task_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Maintenance mode: pause dispatch system-wide (in-flight work finishes), or resume.
    Maintenance {
        #[arg(value_enum)]
        action: MaintenanceAction,
    },
    /// Cron schedules that create runs.
    #[command(subcommand)]
    Cron(CronCommand),
}

/// A schedule is named by its id or its name.
#[derive(Subcommand)]
enum CronCommand {
    /// List the tenant's schedules with their next and last fire times.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one schedule.
    Show {
        schedule: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a schedule.
    Create {
        #[arg(long)]
        name: String,
        /// Five cron fields: minute hour day-of-month month day-of-week, e.g. "30 2 * * *".
        #[arg(long)]
        cron: String,
        /// IANA time zone the fields are read in, e.g. Europe/Paris.
        #[arg(long)]
        tz: String,
        /// The goal of every run it creates.
        #[arg(long)]
        goal: String,
        /// Firings missed while Colony was down: skip them, or run once to catch up.
        #[arg(long, default_value = "skip", value_parser = ["skip", "catch_up"])]
        missed: String,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        #[arg(long)]
        json: bool,
    },
    /// Enable a schedule: it fires from its next fire time on.
    Enable { schedule: String },
    /// Disable a schedule: it stops firing until enabled.
    Disable { schedule: String },
    /// Fire a schedule now, enabled or not; prints the run id.
    RunNow { schedule: String },
    /// Delete a schedule (its runs stay).
    Delete { schedule: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MaintenanceAction {
    /// Pause: nothing is dispatched and claims are refused.
    On,
    /// Resume: queued tasks are dispatched again at once.
    Off,
    /// Show whether dispatch is paused.
    Status,
}

struct Client {
    http: reqwest::Client,
    api: String,
    tenant: Option<String>,
}

impl Client {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.api.trim_end_matches('/')))
            .timeout(Duration::from_secs(30));
        match &self.tenant {
            Some(tenant) => request.header("x-colony-tenant", tenant),
            None => request,
        }
    }

    /// Follows `GET /v1/runs/{id}/stream` (server-sent events) until it ends: the model text
    /// to stdout as it arrives, which task and model call it belongs to on stderr.
    async fn watch(&self, run_id: &str) -> anyhow::Result<bool> {
        use futures::StreamExt as _;
        use std::io::Write as _;
        // No overall timeout: the stream lasts as long as the run.
        let mut request = self.http.get(format!(
            "{}/v1/runs/{run_id}/stream",
            self.api.trim_end_matches('/')
        ));
        if let Some(tenant) = &self.tenant {
            request = request.header("x-colony-tenant", tenant);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the Colony API at {}", self.api))?;
        let status = response.status();
        if !status.is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            bail!(
                "{status}: {}",
                body["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        let mut body = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut current = (String::new(), 0);
        let mut stdout = std::io::stdout();
        while let Some(bytes) = body.next().await {
            pending.extend_from_slice(&bytes.context("the run's stream broke off")?);
            while let Some(end) = pending.windows(2).position(|pair| pair == b"\n\n") {
                let block: Vec<u8> = pending.drain(..end + 2).collect();
                let Some((event, data)) = sse_event(&String::from_utf8_lossy(&block)) else {
                    continue;
                };
                if event == "end" {
                    let status = data["status"].as_str().unwrap_or("?").to_owned();
                    eprintln!("run {run_id} {status}");
                    return Ok(status == "succeeded");
                }
                let call = (
                    data["task_id"].as_str().unwrap_or("?").to_owned(),
                    data["model_call"].as_u64().unwrap_or(0),
                );
                if call != current {
                    eprintln!("[task {} · model call {}]", call.0, call.1);
                    current = call;
                }
                print!("{}", data["text"].as_str().unwrap_or(""));
                if data["done"] == true {
                    println!();
                }
                stdout.flush().ok();
            }
        }
        bail!("the run's stream ended before the run did; `colony show {run_id}` tells where it is")
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the Colony API at {}", self.api))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            bail!("{status}: {message}");
        }
        Ok(body)
    }

    async fn get_run(&self, id: &str) -> anyhow::Result<Value> {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/runs/{id}")))
            .await
    }
}

fn summary(run: &Value) -> String {
    let task = &run["tasks"][0];
    format!(
        "run {} {} (task {}, attempt {})",
        run["id"].as_str().unwrap_or("?"),
        run["status"].as_str().unwrap_or("?"),
        task["state"].as_str().unwrap_or("-"),
        task["attempt"].as_i64().unwrap_or(0)
    )
}

fn print_run(run: &Value, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string_pretty(run).unwrap_or_default());
        return;
    }
    println!("{}", summary(run));
    if let Some(output) = run["output"].as_str() {
        println!("\n{output}\n");
    }
    if let Some(reason) = run["failure"]["reason"].as_str() {
        let class = run["failure"]["error_class"].as_str().unwrap_or("unknown");
        println!("failed ({class}): {reason}");
    }
    let usage = &run["usage"];
    println!(
        "tokens: {} prompt + {} completion, cost ${:.6}",
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["cost_usd"].as_f64().unwrap_or(0.0)
    );
}

fn is_final(run: &Value) -> bool {
    matches!(
        run["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let client = Client {
        http: reqwest::Client::new(),
        api: cli.api,
        tenant: cli.tenant,
    };
    match cli.command {
        Command::Run {
            goal,
            follow,
            detach,
            timeout,
            json,
        } => {
            let created = client
                .send(
                    client
                        .request(reqwest::Method::POST, "/v1/runs")
                        .json(&json!({ "goal": goal })),
                )
                .await?;
            let id = created["id"]
                .as_str()
                .context("the API returned no run id")?
                .to_owned();
            if detach {
                println!("{id}");
                return Ok(true);
            }
            eprintln!("submitted run {id}");
            let deadline = Instant::now() + Duration::from_secs(timeout);
            let mut last = String::new();
            loop {
                let run = client.get_run(&id).await?;
                let line = summary(&run);
                if follow && line != last {
                    eprintln!("{line}");
                    last = line;
                }
                if is_final(&run) {
                    print_run(&run, json);
                    return Ok(run["status"] == "succeeded");
                }
                if Instant::now() > deadline {
                    bail!(
                        "run {id} did not finish within {timeout}s; `colony show {id}` checks again"
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Command::Watch { run_id } => client.watch(&run_id).await,
        Command::Show { id, json } => {
            let run = client.get_run(&id).await?;
            print_run(&run, json);
            Ok(true)
        }
        Command::Cron(command) => cron(&client, command).await,
        Command::Cancel { run_id, json } => {
            let run = client
                .send(client.request(reqwest::Method::POST, &format!("/v1/runs/{run_id}/cancel")))
                .await?;
            if json {
                print_run(&run, true);
            } else if run["status"] == "cancelling" {
                println!(
                    "{} (its running tasks stop at their next heartbeat)",
                    summary(&run)
                );
            } else {
                println!("{}", summary(&run));
            }
            Ok(true)
        }
        Command::Requeue { task_id } => {
            let task = client
                .send(client.request(
                    reqwest::Method::POST,
                    &format!("/v1/tasks/{task_id}/requeue"),
                ))
                .await?;
            println!(
                "task {} {} (attempt {}, run {})",
                task["id"].as_str().unwrap_or("?"),
                task["state"].as_str().unwrap_or("?"),
                task["attempt"].as_i64().unwrap_or(0),
                task["run_id"].as_str().unwrap_or("?")
            );
            Ok(true)
        }
        Command::Approvals { limit, json } => {
            let list = client
                .send(client.request(
                    reqwest::Method::GET,
                    &format!("/v1/approvals?limit={limit}"),
                ))
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(true);
            }
            for task in list["approvals"].as_array().into_iter().flatten() {
                println!(
                    "{}  run {}  {}  {}",
                    task["id"].as_str().unwrap_or("?"),
                    task["run_id"].as_str().unwrap_or("?"),
                    task["role"].as_str().unwrap_or("?"),
                    task["approval_reason"].as_str().unwrap_or("")
                );
            }
            Ok(true)
        }
        Command::Approve { task_id } => {
            let task = client
                .send(client.request(
                    reqwest::Method::POST,
                    &format!("/v1/tasks/{task_id}/approve"),
                ))
                .await?;
            println!(
                "task {} approved: {} (run {})",
                task["id"].as_str().unwrap_or("?"),
                task["state"].as_str().unwrap_or("?"),
                task["run_id"].as_str().unwrap_or("?")
            );
            Ok(true)
        }
        Command::Reject { task_id, reason } => {
            let task = client
                .send(
                    client
                        .request(
                            reqwest::Method::POST,
                            &format!("/v1/tasks/{task_id}/reject"),
                        )
                        .json(&json!({ "reason": reason })),
                )
                .await?;
            println!(
                "task {} rejected: {} (run {})",
                task["id"].as_str().unwrap_or("?"),
                task["state"].as_str().unwrap_or("?"),
                task["run_id"].as_str().unwrap_or("?")
            );
            Ok(true)
        }
        Command::DeadLetters { limit, json } => {
            let list = client
                .send(client.request(
                    reqwest::Method::GET,
                    &format!("/v1/dead-letters?limit={limit}"),
                ))
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(true);
            }
            for task in list["dead_letters"].as_array().into_iter().flatten() {
                println!(
                    "{}  run {}  attempt {}  {}: {}",
                    task["id"].as_str().unwrap_or("?"),
                    task["run_id"].as_str().unwrap_or("?"),
                    task["attempt"].as_i64().unwrap_or(0),
                    task["error_class"].as_str().unwrap_or("unknown"),
                    task["failure_reason"].as_str().unwrap_or("")
                );
            }
            Ok(true)
        }
        Command::Maintenance { action } => {
            let request = match action {
                MaintenanceAction::Status => {
                    client.request(reqwest::Method::GET, "/v1/admin/maintenance")
                }
                MaintenanceAction::On | MaintenanceAction::Off => client
                    .request(reqwest::Method::POST, "/v1/admin/maintenance")
                    .json(&json!({ "paused": matches!(action, MaintenanceAction::On) })),
            };
            let state = client.send(request).await?;
            let since = state["changed_at"].as_str().unwrap_or("?");
            if state["paused"] == true {
                println!("maintenance on: dispatch paused since {since}");
            } else {
                println!("maintenance off: dispatching (since {since})");
            }
            Ok(true)
        }
        Command::Runs { limit } => {
            let runs = client
                .send(client.request(reqwest::Method::GET, &format!("/v1/runs?limit={limit}")))
                .await?;
            for run in runs["runs"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<9}  {}",
                    run["id"].as_str().unwrap_or("?"),
                    run["status"].as_str().unwrap_or("?"),
                    run["goal"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(60)
                        .collect::<String>()
                );
            }
            Ok(true)
        }
    }
}

/// The id of a schedule given by id or by name.
async fn schedule_id(client: &Client, schedule: &str) -> anyhow::Result<String> {
    if schedule.len() == 36 && schedule.chars().filter(|c| *c == '-').count() == 4 {
        return Ok(schedule.to_owned());
    }
    let list = client
        .send(client.request(reqwest::Method::GET, "/v1/schedules"))
        .await?;
    list["schedules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == schedule)
        .and_then(|s| s["id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no schedule named {schedule:?}"))
}

fn fire_time(time: &Value) -> String {
    time["local"].as_str().unwrap_or("-").to_owned()
}

fn print_schedule(schedule: &Value, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(schedule).unwrap_or_default()
        );
        return;
    }
    println!(
        "schedule {} {:?} ({})",
        schedule["id"].as_str().unwrap_or("?"),
        schedule["name"].as_str().unwrap_or("?"),
        if schedule["enabled"] == true {
            "enabled"
        } else {
            "disabled"
        }
    );
    println!(
        "  cron {:?} in {}, missed firings: {}",
        schedule["cron"].as_str().unwrap_or("?"),
        schedule["timezone"].as_str().unwrap_or("?"),
        schedule["missed"].as_str().unwrap_or("?")
    );
    println!("  goal: {}", schedule["goal"].as_str().unwrap_or(""));
    if schedule["next_fire"].is_null() {
        println!("  next: -");
    } else {
        println!(
            "  next: {} ({} UTC)",
            fire_time(&schedule["next_fire"]),
            schedule["next_fire"]["utc"].as_str().unwrap_or("?")
        );
    }
    let last = &schedule["last_fire"];
    if !last.is_null() {
        println!(
            "  last: {} ({}), run {}",
            fire_time(&last["fire_at"]),
            last["kind"].as_str().unwrap_or("?"),
            last["run_id"].as_str().unwrap_or("-")
        );
    }
}

async fn cron(client: &Client, command: CronCommand) -> anyhow::Result<bool> {
    use reqwest::Method;
    match command {
        CronCommand::List { json } => {
            let list = client
                .send(client.request(Method::GET, "/v1/schedules"))
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(true);
            }
            for s in list["schedules"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<20}  {:<8}  {:<16}  {:<20}  next {}",
                    s["id"].as_str().unwrap_or("?"),
                    s["name"].as_str().unwrap_or("?"),
                    if s["enabled"] == true { "on" } else { "off" },
                    s["cron"].as_str().unwrap_or("?"),
                    s["timezone"].as_str().unwrap_or("?"),
                    fire_time(&s["next_fire"])
                );
            }
        }
        CronCommand::Show { schedule, json } => {
            let id = schedule_id(client, &schedule).await?;
            let schedule = client
                .send(client.request(Method::GET, &format!("/v1/schedules/{id}")))
                .await?;
            print_schedule(&schedule, json);
        }
        CronCommand::Create {
            name,
            cron,
            tz,
            goal,
            missed,
            disabled,
            json,
        } => {
            let schedule = client
                .send(client.request(Method::POST, "/v1/schedules").json(&json!({
                    "name": name,
                    "cron": cron,
                    "timezone": tz,
                    "goal": goal,
                    "missed": missed,
                    "enabled": !disabled,
                })))
                .await?;
            print_schedule(&schedule, json);
        }
        CronCommand::Enable { schedule } => {
            let id = schedule_id(client, &schedule).await?;
            let schedule = client
                .send(client.request(Method::POST, &format!("/v1/schedules/{id}/enable")))
                .await?;
            print_schedule(&schedule, false);
        }
        CronCommand::Disable { schedule } => {
            let id = schedule_id(client, &schedule).await?;
            let schedule = client
                .send(client.request(Method::POST, &format!("/v1/schedules/{id}/disable")))
                .await?;
            print_schedule(&schedule, false);
        }
        CronCommand::RunNow { schedule } => {
            let id = schedule_id(client, &schedule).await?;
            let fired = client
                .send(client.request(Method::POST, &format!("/v1/schedules/{id}/run-now")))
                .await?;
            println!("{}", fired["run_id"].as_str().unwrap_or("?"));
        }
        CronCommand::Delete { schedule } => {
            let id = schedule_id(client, &schedule).await?;
            client
                .send(client.request(Method::DELETE, &format!("/v1/schedules/{id}")))
                .await?;
            eprintln!("schedule {id} deleted");
        }
    }
    Ok(true)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("colony: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// One server-sent event: its name and its data as JSON (`None` for comments and keep-alives).
fn sse_event(block: &str) -> Option<(String, Value)> {
    let mut event = None;
    let mut data = None;
    for line in block.lines() {
        if let Some(name) = line.strip_prefix("event:") {
            event = Some(name.trim().to_owned());
        } else if let Some(value) = line.strip_prefix("data:") {
            data = serde_json::from_str(value.trim()).ok();
        }
    }
    Some((event?, data?))
}
