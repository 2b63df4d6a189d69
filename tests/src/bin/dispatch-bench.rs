//! Dispatch benchmark: submits N single-task runs through the real stack with a 0-ms scripted
//! provider and reports dispatch latency (task ready → worker claimed it, p50/p99) and
//! throughput. Figures are merged into `target/bench/results.json`.
//!
//! Usage: `dispatch-bench [--runs N] [--workers W] [--slots S] [--concurrency C]`.

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
    workers: usize,
    slots: u32,
    concurrency: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        runs: 1000,
        workers: 2,
        slots: 8,
        concurrency: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse()?,
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
        "submitting {} runs ({} at a time)",
        args.runs, args.concurrency
    );
    let started = Instant::now();
    futures::stream::iter(0..args.runs)
        .for_each_concurrent(args.concurrency, |i| {
            let stack = &stack;
            async move {
                stack.submit(&format!("bench goal {i}")).await;
            }
        })
        .await;
    let submitted = started.elapsed();
    eprintln!("submitted in {submitted:.1?}; waiting for completion");

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_report = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orchestrator.runs WHERE status IN ('succeeded', 'failed')",
        )
        .fetch_one(&stack.db.pool)
        .await?;
        if done as usize >= args.runs {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("{done}/{} runs finished", args.runs);
            last_report = Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "runs did not finish within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator.runs WHERE status = 'failed'")
            .fetch_one(&stack.db.pool)
            .await?;
    anyhow::ensure!(failed == 0, "{failed} runs failed");
    // Both timestamps come from PostgreSQL's clock, so the difference is exact.
    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (started_at - ready_at))::float8 * 1000 FROM orchestrator.tasks",
    )
    .fetch_all(&stack.db.pool)
    .await?;
    latencies.sort_by(f64::total_cmp);
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (max(finished_at) - min(created_at)))::float8 FROM orchestrator.runs",
    )
    .fetch_one(&stack.db.pool)
    .await?;

    let figures = BTreeMap::from([
        ("dispatch_p50_ms", percentile(&latencies, 50.0)),
        ("dispatch_p99_ms", percentile(&latencies, 99.0)),
        ("throughput_tasks_per_s", args.runs as f64 / span),
    ]);
    println!(
        "runs: {}  workers: {} x {} slots  submit concurrency: {}",
        args.runs, args.workers, args.slots, args.concurrency
    );
    for (name, value) in &figures {
        println!("{name:<24} {value:.2}");
    }
    let path = record(&figures)?;
    println!("figures merged into {}", path.display());
    Ok(())
}
