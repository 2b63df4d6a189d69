//! worker-bench: how agent-worker throughput scales with replicas when the model is slow, and
//! what the worker itself adds to each step.
//!
//! For 1, 2 and 4 worker replicas (each with `--slots` tasks at once, per role) a fresh stack
//! of the release binaries runs `--runs` single-task runs whose agent makes one model call to
//! a scripted deployment that answers after `--model-ms` (50 by default). The runs are queued
//! while dispatch is paused, then released at once; throughput is runs / (resume → last run
//! finished), both by PostgreSQL's clock. With a 50-ms model and a few slots per replica the
//! workers' slots are the bottleneck, so throughput should grow with the replicas until the
//! rest of the stack on this machine's two cores becomes the limit.
//!
//! The worker's own overhead per step comes from the 1-replica stack's worker metrics: the
//! mean time from a granted claim to the published report minus the mean model call
//! (`Router.Complete` round trip) as the worker saw it: prompt building, the memory appends,
//! the trajectory steps and the report.
//!
//! Figures (`target/bench/results.json`): `worker_throughput_1`, `_2`, `_4` (tasks/s),
//! `worker_scaling_1_to_4` (ratio), `worker_step_overhead_ms`.
//!
//! Usage: `worker-bench [--runs N] [--slots S] [--model-ms M]`.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context as _;
use colony_e2e::bench::{checkpoint, drained_secs, set_paused, wait_finished};
use colony_e2e::{Stack, StackOptions, bench, metric_sum, scripted_router};
use tokio::task::JoinSet;

/// Where the CPU goes, printed per stack: `/proc` name prefix → what it is.
const CPU_ACCOUNTS: [(&str, &str); 8] = [
    ("postgres", "postgres"),
    ("nats-server", "nats"),
    ("colony-orchestr", "orchestrator"),
    ("colony-agent-wo", "workers"),
    ("colony-monitor", "monitor"),
    ("colony-router", "router"),
    ("colony-memory", "memory"),
    ("worker-bench", "bench"),
];

struct Args {
    runs: usize,
    slots: u32,
    model_ms: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        runs: 800,
        slots: 1,
        model_ms: 50,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse().context("--runs")?,
            "--slots" => args.slots = value.parse().context("--slots")?,
            "--model-ms" => args.model_ms = value.parse().context("--model-ms")?,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: worker-bench [--runs N] [--slots S] \
                 [--model-ms M]"
            ),
        }
    }
    anyhow::ensure!(
        args.runs > 0 && args.slots > 0,
        "--runs and --slots must be positive"
    );
    Ok(args)
}

/// Submits `total` single-task runs of `phase`, 32 requests at a time.
async fn submit_all(stack: &Stack, phase: &str, total: usize) -> anyhow::Result<()> {
    let mut requests = JoinSet::new();
    for i in 0..total {
        while requests.len() >= 32 {
            if let Some(done) = requests.join_next().await {
                done??;
            }
        }
        let http = stack.http.clone();
        let url = format!("{}/v1/runs", stack.orchestrator_url);
        let goal = format!("{phase} {i}");
        requests.spawn(async move {
            let response = http
                .post(url)
                .json(&serde_json::json!({ "goal": goal, "topology": "monolith" }))
                .send()
                .await
                .context("submitting a run")?;
            let status = response.status();
            anyhow::ensure!(status.as_u16() == 201, "submitting a run: HTTP {status}");
            anyhow::Ok(())
        });
    }
    while let Some(done) = requests.join_next().await {
        done??;
    }
    Ok(())
}

/// One stack with `replicas` workers: its throughput in tasks/s, and the workers' metrics.
async fn measure(args: &Args, replicas: usize) -> anyhow::Result<(f64, Vec<String>)> {
    let stack = Stack::start(StackOptions {
        router_toml: scripted_router("done", &format!("{}ms", args.model_ms)),
        workers: replicas,
        worker_slots: args.slots,
        log_filter: "warn",
        ..StackOptions::default()
    })
    .await;
    let phase = format!("replicas{replicas}");
    set_paused(&stack, true).await?;
    submit_all(&stack, &phase, args.runs).await?;
    checkpoint(&stack).await?;
    let started = Instant::now();
    let cpu_before = bench::cpu_seconds(&CPU_ACCOUNTS);
    set_paused(&stack, false).await?;
    wait_finished(&stack, &phase, args.runs).await?;
    let cpu_after = bench::cpu_seconds(&CPU_ACCOUNTS);
    let elapsed = started.elapsed().as_secs_f64();
    let span = drained_secs(&stack, &phase).await?;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator.runs WHERE status <> 'succeeded'")
            .fetch_one(&stack.db.pool)
            .await?;
    anyhow::ensure!(failed == 0, "{phase}: {failed} runs did not succeed");
    let throughput = args.runs as f64 / span;
    println!(
        "  {replicas} replica(s) x {} slots: {} runs in {span:.2} s = {throughput:.1} tasks/s \
         (bench clock {elapsed:.2} s)",
        args.slots, args.runs,
    );
    let cpu: Vec<String> = cpu_after
        .iter()
        .map(|(name, after)| {
            let used = after - cpu_before.get(name).copied().unwrap_or(0.0);
            format!("{name} {:.0}%", used / elapsed * 100.0)
        })
        .collect();
    println!("  CPU while draining (100% = one core): {}", cpu.join(", "));
    let mut metrics = Vec::with_capacity(replicas);
    for url in &stack.worker_urls {
        metrics.push(stack.metrics(url).await);
    }
    Ok((throughput, metrics))
}

/// Mean claim-to-report time minus mean model call, in ms, over every worker's tasks.
fn step_overhead_ms(metrics: &[String]) -> anyhow::Result<f64> {
    let sum = |name: &str| {
        metrics
            .iter()
            .map(|text| metric_sum(text, name))
            .sum::<f64>()
    };
    let tasks = sum("colony_agent_worker_task_duration_seconds_count");
    let calls = sum("colony_agent_worker_model_call_duration_seconds_count");
    anyhow::ensure!(
        tasks > 0.0 && calls > 0.0,
        "the workers recorded no tasks or model calls"
    );
    let task_mean = sum("colony_agent_worker_task_duration_seconds_sum") / tasks;
    let call_mean = sum("colony_agent_worker_model_call_duration_seconds_sum") / calls;
    println!(
        "  per task: {:.2} ms from claim to report, {:.2} ms of it the model call ({} tasks, \
         {} calls)",
        task_mean * 1e3,
        call_mean * 1e3,
        tasks,
        calls
    );
    Ok((task_mean - call_mean * calls / tasks) * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    println!(
        "worker-bench: {} single-step runs per stack, model {} ms, {} slots per replica",
        args.runs, args.model_ms, args.slots
    );
    let mut figures = BTreeMap::new();
    let mut overhead = 0.0;
    let mut throughput = BTreeMap::new();
    for replicas in [1, 2, 4] {
        let (rate, metrics) = measure(&args, replicas).await?;
        // Printed for every stack; the figure is the unloaded one.
        let per_step = step_overhead_ms(&metrics)?;
        if replicas == 1 {
            overhead = per_step;
        }
        throughput.insert(replicas, rate);
    }
    let scaling = throughput[&4] / throughput[&1];
    figures.insert("worker_throughput_1", throughput[&1]);
    figures.insert("worker_throughput_2", throughput[&2]);
    figures.insert("worker_throughput_4", throughput[&4]);
    figures.insert("worker_scaling_1_to_4", scaling);
    figures.insert("worker_step_overhead_ms", overhead);
    println!(
        "  scaling 1 -> 4 replicas: {scaling:.2}x (target >= 3.5); worker overhead per step \
         {overhead:.2} ms"
    );
    let path = bench::record("", &figures, &[])?;
    println!("  figures written to {}", path.display());
    Ok(())
}
