//! Dispatch benchmark: single-task runs through the real stack (five processes, PostgreSQL,
//! JetStream), in three phases on one stack. With `--work noop` (the default) each run's one
//! task has the roster's `noop` role, so the worker reports at once without model or memory
//! and what is measured is Colony's own machinery; with `--work model` it is a monolith run
//! whose agent asks a 0-ms scripted provider through the router and records the conversation
//! in memory, and every figure is recorded with a `model_` prefix.
//!
//! 1. idle: `--paced-runs` runs at `--rate` runs/s, well below saturation → dispatch latency
//!    (task ready → a worker claimed it; `dispatch_p50_ms`, `dispatch_p99_ms`);
//! 2. loaded: runs offered at `--load-rate` runs/s (default 500) for `--load-secs` seconds,
//!    open loop → `dispatch_p99_loaded_ms`, plus the rate actually submitted and completed. If
//!    the stack cannot keep up, the bench says so and reports what it achieved;
//! 3. drain: `--drain-runs` runs (default 10,000) submitted while maintenance mode pauses
//!    dispatch, then resumed → `throughput_tasks_per_s` = runs / (resume → last run finished),
//!    and where the CPU went: `drain_cpu_us_per_task_<process>` (PostgreSQL, NATS, each
//!    service, the bench) and `drain_cpu_us_per_task_total`, from `/proc` before and after.
//!
//! Before each phase the bench asks PostgreSQL for a checkpoint, so that the writes of the
//! set-up or of the phase before (a new database, thousands of runs) are flushed before the
//! clock starts rather than by a checkpoint in the middle of a measurement.
//!
//! Figures are merged into `target/bench/results.json`.
//!
//! Usage: `dispatch-bench [--phases idle,loaded,drain] [--paced-runs N] [--rate R]
//! [--load-rate R] [--load-secs S] [--drain-runs N] [--workers W] [--slots S]
//! [--concurrency C] [--work noop|model]`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use colony_e2e::bench::{checkpoint, drained_secs, set_paused, wait_finished};
use colony_e2e::{Stack, StackOptions, bench};
use futures::StreamExt;
use tokio::task::JoinSet;

/// What each run's single task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// The roster's `noop` role: no model call, no memory.
    Noop,
    /// The monolith template's agent with the 0-ms scripted provider.
    Model,
}

struct Args {
    work: Work,
    idle: bool,
    loaded: bool,
    drain: bool,
    paced_runs: usize,
    rate: f64,
    load_rate: f64,
    load_secs: f64,
    drain_runs: usize,
    workers: usize,
    slots: u32,
    concurrency: usize,
}

const USAGE: &str = "usage: dispatch-bench [--phases idle,loaded,drain] [--paced-runs N] \
[--rate R] [--load-rate R] [--load-secs S] [--drain-runs N] [--workers W] [--slots S] \
[--concurrency C] [--work noop|model]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        work: Work::Noop,
        idle: true,
        loaded: true,
        drain: true,
        paced_runs: 500,
        rate: 50.0,
        load_rate: 500.0,
        load_secs: 10.0,
        drain_runs: 10_000,
        workers: 2,
        slots: 8,
        concurrency: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--phases" => {
                let phases: Vec<&str> = value.split(',').map(str::trim).collect();
                for phase in &phases {
                    anyhow::ensure!(
                        matches!(*phase, "idle" | "loaded" | "drain"),
                        "unknown phase {phase} (idle, loaded, drain)"
                    );
                }
                args.idle = phases.contains(&"idle");
                args.loaded = phases.contains(&"loaded");
                args.drain = phases.contains(&"drain");
            }
            "--paced-runs" => args.paced_runs = value.parse()?,
            "--rate" => args.rate = value.parse()?,
            "--load-rate" => args.load_rate = value.parse()?,
            "--load-secs" => args.load_secs = value.parse()?,
            "--drain-runs" => args.drain_runs = value.parse()?,
            "--workers" => args.workers = value.parse()?,
            "--slots" => args.slots = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            "--work" => {
                args.work = match value.as_str() {
                    "noop" => Work::Noop,
                    "model" => Work::Model,
                    other => anyhow::bail!("unknown work {other} (noop, model)"),
                }
            }
            other => anyhow::bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        args.rate > 0.0 && args.load_rate > 0.0 && args.load_secs > 0.0,
        "rates and durations must be positive"
    );
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
    Ok(args)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Submits one run; the request owns everything it needs, so it can run on its own task.
async fn submit(
    http: reqwest::Client,
    base: String,
    goal: String,
    work: Work,
) -> anyhow::Result<()> {
    let body = match work {
        Work::Noop => serde_json::json!({
            "goal": goal,
            "plan": [{ "id": "step", "role": "noop", "instructions": goal }],
        }),
        Work::Model => serde_json::json!({ "goal": goal }),
    };
    let response = http
        .post(format!("{base}/v1/runs"))
        .json(&body)
        .send()
        .await
        .context("submitting a run")?;
    let status = response.status();
    anyhow::ensure!(status.as_u16() == 201, "submitting a run: HTTP {status}");
    Ok(())
}

/// Processes whose CPU time the drain accounts, by the start of their name in
/// `/proc/<pid>/stat` (which keeps 15 bytes), with the figure each one's time goes to.
const CPU_ACCOUNTS: [(&str, &str); 8] = [
    ("postgres", "drain_cpu_us_per_task_postgres"),
    ("nats-server", "drain_cpu_us_per_task_nats"),
    ("colony-orchestr", "drain_cpu_us_per_task_orchestrator"),
    ("colony-agent-wo", "drain_cpu_us_per_task_agent_worker"),
    ("colony-monitor", "drain_cpu_us_per_task_monitor"),
    ("colony-router", "drain_cpu_us_per_task_router"),
    ("colony-memory", "drain_cpu_us_per_task_memory"),
    ("dispatch-bench", "drain_cpu_us_per_task_bench"),
];

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

/// Seconds between two aggregates over the runs of `phase` (PostgreSQL clock).
async fn span_secs(stack: &Stack, phase: &str, from: &str, to: &str) -> anyhow::Result<f64> {
    let span: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT EXTRACT(EPOCH FROM ({to} - {from}))::float8 \
         FROM orchestrator.runs WHERE goal LIKE $1"
    ))
    .bind(format!("{phase} %"))
    .fetch_one(&stack.db.pool)
    .await?;
    span.with_context(|| format!("{phase}: no runs"))
}

/// Offers `total` runs of `phase` at `rate` runs/s, open loop: each submission runs on its own
/// task, so a slow answer does not delay the next one. Returns the seconds the offering took.
async fn offer(
    stack: &Stack,
    phase: &str,
    total: usize,
    rate: f64,
    work: Work,
) -> anyhow::Result<f64> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut requests = JoinSet::new();
    let started = Instant::now();
    let mut last_report = Instant::now();
    for i in 0..total {
        ticker.tick().await;
        requests.spawn(submit(
            stack.http.clone(),
            stack.orchestrator_url.clone(),
            format!("{phase} {i}"),
            work,
        ));
        while let Some(done) = requests.try_join_next() {
            done??;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {phase}: {}/{total} runs offered, {} requests in flight",
                i + 1,
                requests.len()
            );
            last_report = Instant::now();
        }
    }
    let offered = started.elapsed().as_secs_f64();
    while let Some(done) = requests.join_next().await {
        done??;
    }
    Ok(offered)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    eprintln!(
        "starting the stack: {} workers x {} slots",
        args.workers, args.slots
    );
    let stack = Stack::start(StackOptions {
        router_toml: colony_e2e::scripted_router("done", "0ms"),
        workers: args.workers,
        worker_slots: args.slots,
        log_filter: "warn",
        ..StackOptions::default()
    })
    .await;
    let mut figures = BTreeMap::new();
    let mut notes = Vec::new();

    if args.idle {
        checkpoint(&stack).await?;
        eprintln!("idle: {} runs at {} runs/s", args.paced_runs, args.rate);
        offer(&stack, "idle", args.paced_runs, args.rate, args.work).await?;
        wait_finished(&stack, "idle", args.paced_runs).await?;
        let idle = latencies(&stack, "idle").await?;
        figures.insert("dispatch_p50_ms", percentile(&idle, 50.0));
        figures.insert("dispatch_p99_ms", percentile(&idle, 99.0));
        notes.push(format!(
            "idle: {} runs at {} runs/s",
            args.paced_runs, args.rate
        ));
    }

    if args.loaded {
        checkpoint(&stack).await?;
        let total = (args.load_rate * args.load_secs).round() as usize;
        eprintln!(
            "loaded: {total} runs offered at {} runs/s for {} s",
            args.load_rate, args.load_secs
        );
        let offered_secs = offer(&stack, "loaded", total, args.load_rate, args.work).await?;
        wait_finished(&stack, "loaded", total).await?;
        let loaded = latencies(&stack, "loaded").await?;
        // What the stack took in (first → last run created) and got done (first run created →
        // last run finished), by PostgreSQL's clock.
        let accepted = total as f64
            / span_secs(&stack, "loaded", "min(created_at)", "max(created_at)").await?;
        let completed = total as f64
            / span_secs(&stack, "loaded", "min(created_at)", "max(finished_at)").await?;
        let generator = total as f64 / offered_secs;
        figures.insert("dispatch_p50_loaded_ms", percentile(&loaded, 50.0));
        figures.insert("dispatch_p99_loaded_ms", percentile(&loaded, 99.0));
        figures.insert("dispatch_loaded_offered_per_s", generator);
        figures.insert("dispatch_loaded_accepted_per_s", accepted);
        figures.insert("dispatch_loaded_completed_per_s", completed);
        let kept_up = accepted >= 0.95 * args.load_rate && completed >= 0.95 * args.load_rate;
        notes.push(format!(
            "loaded: {total} runs offered at {} runs/s (generator achieved {generator:.1}/s); \
             the API accepted {accepted:.1}/s and the stack completed {completed:.1}/s",
            args.load_rate
        ));
        notes.push(if kept_up {
            format!("loaded: the stack kept up with {} runs/s", args.load_rate)
        } else {
            format!(
                "loaded: NOT KEPT UP - the stack did not sustain {} runs/s; \
                 dispatch_p99_loaded_ms is the latency at the rate it achieved, \
                 runs queued behind the backlog",
                args.load_rate
            )
        });
    }

    if args.drain {
        checkpoint(&stack).await?;
        let total = args.drain_runs;
        eprintln!("drain: maintenance on, queueing {total} runs");
        set_paused(&stack, true).await?;
        let mut last_report = Instant::now();
        let mut submitted = 0usize;
        let mut submissions = futures::stream::iter(0..total)
            .map(|i| {
                submit(
                    stack.http.clone(),
                    stack.orchestrator_url.clone(),
                    format!("drain {i}"),
                    args.work,
                )
            })
            .buffer_unordered(args.concurrency);
        while let Some(done) = submissions.next().await {
            done?;
            submitted += 1;
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!("  drain: {submitted}/{total} runs queued");
                last_report = Instant::now();
            }
        }
        // A run is `running` from its creation; its task stays `queued` until a claim.
        let early: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orchestrator.tasks \
             WHERE instructions LIKE 'drain %' AND state <> 'queued'",
        )
        .fetch_one(&stack.db.pool)
        .await?;
        anyhow::ensure!(
            early == 0,
            "{early} drain tasks started while maintenance mode was on"
        );
        eprintln!("drain: {total} runs queued; maintenance off, draining");
        let resumed = Instant::now();
        let cpu_before = bench::cpu_seconds(&CPU_ACCOUNTS);
        set_paused(&stack, false).await?;
        wait_finished(&stack, "drain", total).await?;
        let cpu_after = bench::cpu_seconds(&CPU_ACCOUNTS);
        let observed = resumed.elapsed().as_secs_f64();
        let span = drained_secs(&stack, "drain").await?;
        figures.insert("throughput_tasks_per_s", total as f64 / span);
        let mut cpu_total = 0.0;
        for (name, after) in &cpu_after {
            let used = after - cpu_before.get(name).copied().unwrap_or(0.0);
            cpu_total += used;
            figures.insert(name, used * 1e6 / total as f64);
        }
        figures.insert(
            "drain_cpu_us_per_task_total",
            cpu_total * 1e6 / total as f64,
        );
        notes.push(format!(
            "drain: CPU {cpu_total:.1} s over {observed:.1} s ({:.0} % of one core)",
            cpu_total / observed * 100.0
        ));
        notes.push(format!(
            "drain: {total} runs in {span:.2} s from resume to last finish \
             (bench clock, polled every {} ms: {observed:.2} s)",
            bench::POLL.as_millis()
        ));
    }

    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator.runs WHERE status <> 'succeeded'")
            .fetch_one(&stack.db.pool)
            .await?;
    anyhow::ensure!(failed == 0, "{failed} runs did not succeed");

    println!(
        "workers: {} x {} slots  submit concurrency (drain): {}",
        args.workers, args.slots, args.concurrency
    );
    let prefix = match args.work {
        Work::Noop => "",
        Work::Model => "model_",
    };
    for note in &notes {
        println!("{note}");
    }
    for (name, value) in &figures {
        println!("{prefix}{name:<32} {value:.2}");
    }
    let path = bench::record(prefix, &figures, &[])?;
    println!("figures merged into {}", path.display());
    Ok(())
}
