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
        Command::Show { id, json } => {
            let run = client.get_run(&id).await?;
            print_run(&run, json);
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
