//! What exporting traces costs: the spine's drain (runs queued under maintenance mode, then
//! released) through the agent worker, the router (a 0-ms scripted model) and memory, measured
//! on fresh stacks with OTLP export off and on. With export on, every service sends its spans
//! to an in-process OTLP/gRPC receiver that counts and drops them. Spans are recorded either
//! way (logs carry their trace ids); only their export differs.
//!
//! Rounds alternate the order (off then on, on then off) so drift on a shared machine falls on
//! both sides; the figure is the median of the rounds' paired differences:
//! `telemetry_overhead_pct` = 100 × (off − on) / off, in tasks per second.
//!
//! Usage: `telemetry-bench [--runs N] [--rounds R] [--concurrency C]`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use colony_e2e::bench::{self, checkpoint, drained_secs, set_paused, wait_finished};
use colony_e2e::otlp::OtlpReceiver;
use colony_e2e::{Stack, StackOptions};
use futures::StreamExt as _;

const USAGE: &str = "usage: telemetry-bench [--runs N] [--rounds R] [--concurrency C]";

struct Args {
    runs: usize,
    rounds: usize,
    concurrency: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        runs: 2000,
        rounds: 3,
        concurrency: 32,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = given
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            other => anyhow::bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    anyhow::ensure!(args.runs > 0, "--runs must be positive");
    anyhow::ensure!(args.rounds > 0, "--rounds must be positive");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
    Ok(args)
}

/// One drain on a fresh stack: tasks per second, and spans received per task (export on).
async fn drain(args: &Args, export: bool) -> anyhow::Result<(f64, f64)> {
    let receiver = if export {
        Some(OtlpReceiver::start(false).await?)
    } else {
        None
    };
    let stack = Stack::start(StackOptions {
        router_toml: colony_e2e::scripted_router("done", "0ms"),
        workers: 1,
        worker_slots: 8,
        log_filter: "warn",
        // OpenTelemetry's default batching (every 5 s, or sooner when 512 spans wait), as
        // an installation would run it.
        otlp: receiver.as_ref().map(|r| colony_e2e::Otlp {
            endpoint: r.endpoint.clone(),
            batch_delay_ms: None,
        }),
        ..StackOptions::default()
    })
    .await;
    checkpoint(&stack).await?;
    set_paused(&stack, true).await?;
    let mut submissions = futures::stream::iter(0..args.runs)
        .map(|i| {
            let http = stack.http.clone();
            let url = format!("{}/v1/runs", stack.orchestrator_url);
            async move {
                let response = http
                    .post(url)
                    .json(&serde_json::json!({ "goal": format!("drain {i}") }))
                    .send()
                    .await
                    .context("submitting a run")?;
                let status = response.status();
                anyhow::ensure!(status.as_u16() == 201, "submitting a run: HTTP {status}");
                Ok(())
            }
        })
        .buffer_unordered(args.concurrency);
    while let Some(done) = submissions.next().await {
        done?;
    }
    drop(submissions);
    set_paused(&stack, false).await?;
    wait_finished(&stack, "drain", args.runs).await?;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator.runs WHERE status <> 'succeeded'")
            .fetch_one(&stack.db.pool)
            .await?;
    anyhow::ensure!(failed == 0, "{failed} runs did not succeed");
    let throughput = args.runs as f64 / drained_secs(&stack, "drain").await?;
    drop(stack);
    let spans_per_task = match receiver {
        Some(receiver) => {
            // The services flushed what they still held as they stopped (the stack's drop waits
            // for them); give the last exports a moment to be counted.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let spans = receiver.received() as f64 / args.runs as f64;
            receiver.stop().await;
            anyhow::ensure!(spans > 0.0, "export on, but no span arrived");
            spans
        }
        None => 0.0,
    };
    Ok((throughput, spans_per_task))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut overheads = Vec::new();
    let mut spans = Vec::new();
    for round in 0..args.rounds {
        let order = if round.is_multiple_of(2) {
            [false, true]
        } else {
            [true, false]
        };
        let mut pair = [0.0; 2];
        for export in order {
            eprintln!(
                "round {}/{}: export {}, {} runs",
                round + 1,
                args.rounds,
                if export { "on" } else { "off" },
                args.runs
            );
            let (throughput, spans_per_task) = drain(&args, export).await?;
            eprintln!("  {throughput:.1} tasks/s");
            pair[usize::from(export)] = throughput;
            if export {
                spans.push(spans_per_task);
            }
        }
        off.push(pair[0]);
        on.push(pair[1]);
        overheads.push(100.0 * (pair[0] - pair[1]) / pair[0]);
    }
    let mut figures = BTreeMap::new();
    figures.insert("telemetry_export_off_tasks_per_s", median(off.clone()));
    figures.insert("telemetry_export_on_tasks_per_s", median(on.clone()));
    figures.insert("telemetry_overhead_pct", median(overheads.clone()));
    figures.insert("telemetry_spans_per_task", median(spans));
    for round in 0..args.rounds {
        println!(
            "round {}: off {:.1} tasks/s, on {:.1} tasks/s, overhead {:.1} %",
            round + 1,
            off[round],
            on[round],
            overheads[round]
        );
    }
    for (name, value) in &figures {
        println!("{name:<34} {value:.2}");
    }
    let path = bench::record("", &figures, &[])?;
    println!("figures merged into {}", path.display());
    Ok(())
}
