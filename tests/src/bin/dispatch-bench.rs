//! Dispatch benchmark: single-task runs through the real stack (five processes, PostgreSQL,
//! JetStream) with a 0-ms scripted provider, in two phases:
//!
//! 1. burst: `--runs` runs submitted as fast as `--concurrency` clients can → throughput, and
//!    dispatch latency under a backlog (`dispatch_burst_p50_ms`, `dispatch_burst_p99_ms`);
//! 2. paced: `--paced-runs` runs at `--rate` runs/s, below saturation → dispatch latency
//!    (task ready → a worker claimed it; `dispatch_p50_ms`, `dispatch_p99_ms`).
//!
//! Figures are merged into `target/bench/results.json`.
//!
//! Usage: `dispatch-bench [--runs N] [--paced-runs N] [--rate R] [--workers W] [--slots S]
//! [--concurrency C]`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use colony_e2e::{Stack, StackOptions};
use futures::StreamExt;

const ROUTER: &str = r#"
default_deployment = "instant"

[[deployments]]
name = "instant"
provider = "scripted"
model = "scripted-instant"
tier = "mid"
input_price_per_mtok = 0.0
output_price_per_mtok = 0.0
timeout = "30s"

[[deployments.script]]
reply = "done"
delay = "0ms"
"#;

struct Args {
    runs: usize,
    paced_runs: usize,
    rate: f64,
    workers: usize,
    slots: u32,
    concurrency: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        runs: 1000,
        paced_runs: 500,
        rate: 50.0,
        workers: 2,
        slots: 8,
        concurrency: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse()?,
            "--paced-runs" => args.paced_runs = value.parse()?,
            "--rate" => args.rate = value.parse()?,
            "--workers" => args.workers = value.parse()?,
            "--slots" => args.slots = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Merges `figures` into `target/bench/results.json`, keeping other benches' figures.
fn record(figures: &BTreeMap<&str, f64>) -> anyhow::Result<std::path::PathBuf> {
    let dir = colony_testkit::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    for (name, value) in figures {
        all.insert((*name).to_owned(), serde_json::json!(value));
    }
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    Ok(path)
}

/// Waits until `total` runs have finished, printing progress.
async fn wait_finished(stack: &Stack, total: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_report = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orchestrator.runs WHERE status IN ('succeeded', 'failed')",
        )
        .fetch_one(&stack.db.pool)
        .await?;
        if done as usize >= total {
            return Ok(());
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("{done}/{total} runs finished");
            last_report = Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "runs did not finish within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sorted dispatch latencies in ms of the tasks whose goal starts with `phase`. Both
/// timestamps come from PostgreSQL's clock, so the difference is exact.
async fn latencies(stack: &Stack, phase: &str) -> anyhow::Result<Vec<f64>> {
    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (started_at - ready_at))::float8 * 1000 \
         FROM orchestrator.tasks WHERE instructions LIKE $1",
    )
    .bind(format!("{phase} %"))
    .fetch_all(&stack.db.pool)
    .await?;
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    eprintln!(
        "starting the stack: {} workers x {} slots",
        args.workers, args.slots
    );
    let stack = Stack::start(StackOptions {
        router_toml: ROUTER.into(),
        workers: args.workers,
        worker_slots: args.slots,
        log_filter: "warn",
        ..StackOptions::default()
    })
    .await;

    eprintln!(
        "burst: submitting {} runs ({} at a time)",
        args.runs, args.concurrency
    );
    futures::stream::iter(0..args.runs)
        .for_each_concurrent(args.concurrency, |i| {
            let stack = &stack;
            async move {
                stack.submit(&format!("burst {i}")).await;
            }
        })
        .await;
    wait_finished(&stack, args.runs).await?;
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (max(finished_at) - min(created_at)))::float8 \
         FROM orchestrator.runs WHERE goal LIKE 'burst %'",
    )
    .fetch_one(&stack.db.pool)
    .await?;
    let burst = latencies(&stack, "burst").await?;

    eprintln!("paced: {} runs at {} runs/s", args.paced_runs, args.rate);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..args.paced_runs {
        ticker.tick().await;
        let stack = &stack;
        pending.push(async move { stack.submit(&format!("paced {i}")).await });
        while let Some(Some(_)) = futures::FutureExt::now_or_never(pending.next()) {}
    }
    while pending.next().await.is_some() {}
    wait_finished(&stack, args.runs + args.paced_runs).await?;
    let paced = latencies(&stack, "paced").await?;

    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator.runs WHERE status = 'failed'")
            .fetch_one(&stack.db.pool)
            .await?;
    anyhow::ensure!(failed == 0, "{failed} runs failed");

    let figures = BTreeMap::from([
        ("dispatch_p50_ms", percentile(&paced, 50.0)),
        ("dispatch_p99_ms", percentile(&paced, 99.0)),
        ("dispatch_burst_p50_ms", percentile(&burst, 50.0)),
        ("dispatch_burst_p99_ms", percentile(&burst, 99.0)),
        ("throughput_tasks_per_s", args.runs as f64 / span),
    ]);
    println!(
        "burst runs: {}  paced runs: {} at {}/s  workers: {} x {} slots  submit concurrency: {}",
        args.runs, args.paced_runs, args.rate, args.workers, args.slots, args.concurrency
    );
    for (name, value) in &figures {
        println!("{name:<24} {value:.2}");
    }
    let path = record(&figures)?;
    println!("figures merged into {}", path.display());
    Ok(())
}
