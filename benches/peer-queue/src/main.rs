//! Peer benchmark: how fast a plain Rust PostgreSQL job queue (apalis with apalis-postgres)
//! drains the same number of no-op jobs as Colony's drain phase, on the same PostgreSQL.
//!
//! 1. create a fresh database and apply apalis's migrations;
//! 2. fill one queue with `--jobs` no-op jobs (default 10,000) while no worker runs;
//! 3. start `--workers` workers (default 2), each running at most `--concurrency` jobs at once
//!    (default 8, like Colony's 2 workers × 8 slots), and time from the start of the workers
//!    (the queue is full) to the last job recorded as done in PostgreSQL;
//! 4. print `peer_queue_tasks_per_s`, merge it into the main repository's
//!    `target/bench/results.json` and drop the database.
//!
//! Usage: `peer-queue-bench [--jobs N] [--workers W] [--concurrency C] [--batch B]
//! [--pubsub] [--database-url URL]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use apalis::prelude::*;
use apalis_postgres::{Config, PostgresStorage};
use futures::FutureExt;
use sqlx::postgres::{PgPool, PgPoolOptions};

struct Args {
    jobs: usize,
    workers: usize,
    concurrency: usize,
    batch: usize,
    pubsub: bool,
    server_url: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        jobs: 10_000,
        workers: 2,
        concurrency: 8,
        batch: 8,
        pubsub: false,
        server_url: "postgres://postgres@127.0.0.1:5432".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--pubsub" {
            args.pubsub = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--jobs" => args.jobs = value.parse()?,
            "--workers" => args.workers = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            "--batch" => args.batch = value.parse()?,
            "--database-url" => args.server_url = value.trim_end_matches('/').to_owned(),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(
        args.jobs > 0 && args.workers > 0 && args.concurrency > 0 && args.batch > 0,
        "--jobs, --workers, --concurrency and --batch must be positive"
    );
    Ok(args)
}

/// The no-op job: nothing to do, like Colony's 0-ms scripted provider.
async fn noop(_job: u32) -> Result<(), BoxDynError> {
    Ok(())
}

/// `target/bench/results.json` of the main repository (this crate lives in `benches/`).
fn results_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/bench/results.json")
        .components()
        .collect()
}

/// Merges `figures` into the results file, keeping every other figure.
fn record(figures: &BTreeMap<&str, f64>) -> anyhow::Result<PathBuf> {
    let path = results_path();
    let path = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            std::fs::create_dir_all(dir)?;
            std::fs::canonicalize(dir)?.join(name)
        }
        _ => path,
    };
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

async fn done_count(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE status = 'Done'")
            .fetch_one(pool)
            .await?,
    )
}

/// Fills the queue, drains it and returns jobs/s (PostgreSQL clock: workers started → last
/// `done_at`).
async fn drain(args: &Args, pool: &PgPool) -> anyhow::Result<f64> {
    PostgresStorage::<()>::setup(pool)
        .await
        .context("applying apalis migrations")?;
    let config = Config::default().queue("peer-bench").batch_size(args.batch);

    eprintln!("filling the queue with {} jobs", args.jobs);
    let fill = Instant::now();
    let mut sink = PostgresStorage::<u32>::new(pool).with_config(config.clone());
    let jobs = u32::try_from(args.jobs)?;
    for chunk_start in (0..jobs).step_by(1000) {
        let end = (chunk_start + 1000).min(jobs);
        let mut items = futures::stream::iter(chunk_start..end);
        sink.push_stream(&mut items)
            .await
            .map_err(|e| anyhow::anyhow!("pushing jobs: {e}"))?;
    }
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        queued as usize == args.jobs,
        "{queued} jobs queued, expected {}",
        args.jobs
    );
    eprintln!(
        "queue full ({queued} jobs in {:.1} s); starting {} workers x {} concurrency ({})",
        fill.elapsed().as_secs_f64(),
        args.workers,
        args.concurrency,
        if args.pubsub {
            "LISTEN/NOTIFY + polling"
        } else {
            "polling"
        }
    );

    let started: f64 = sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")
        .fetch_one(pool)
        .await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for index in 0..args.workers {
        let storage = PostgresStorage::<u32>::new(pool).with_config(config.clone());
        let mut stop = stop_rx.clone();
        let signal = async move {
            // Ends when the bench says so (or the sender is gone).
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let name = format!("peer-worker-{index}");
        // The workers run on this task; each job runs on its own tokio task (`parallelize`).
        let worker = if args.pubsub {
            WorkerBuilder::new(name.as_str())
                .backend(storage.with_pubsub())
                .concurrency(args.concurrency)
                .parallelize(tokio::spawn)
                .build(noop)
                .run_until(signal)
                .boxed_local()
        } else {
            WorkerBuilder::new(name.as_str())
                .backend(storage)
                .concurrency(args.concurrency)
                .parallelize(tokio::spawn)
                .build(noop)
                .run_until(signal)
                .boxed_local()
        };
        workers.push(worker);
    }
    let mut workers = futures::future::try_join_all(workers);

    let monitor = async {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut last_report = Instant::now();
        loop {
            let done = done_count(pool).await?;
            if done as usize >= args.jobs {
                return anyhow::Ok(());
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!("{done}/{} jobs done", args.jobs);
                last_report = Instant::now();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {done}/{} jobs done after 10 minutes",
                args.jobs
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        outcome = &mut workers => {
            anyhow::bail!("the workers stopped before the queue was drained: {outcome:?}");
        }
        outcome = monitor => outcome?,
    }
    let last_done: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(done_at))::float8 FROM apalis.jobs WHERE status = 'Done'",
    )
    .fetch_one(pool)
    .await?;
    stop_tx.send_replace(true);
    // The figure is taken; workers that do not stop within 10 s are left behind.
    match tokio::time::timeout(Duration::from_secs(10), workers).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => eprintln!("a worker stopped with an error: {error}"),
        Err(_) => eprintln!("the workers did not stop within 10 s"),
    }
    let span = last_done - started;
    anyhow::ensure!(span > 0.0, "no time elapsed between start and last job");
    Ok(args.jobs as f64 / span)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", args.server_url))
        .await
        .context("connecting to PostgreSQL")?;
    let database = format!("peer_queue_bench_{}", std::process::id());
    // The name is built here from the process id: nothing outside reaches it.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&admin)
        .await
        .context("creating the bench database")?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&format!("{}/{database}", args.server_url))
        .await;
    let outcome = match pool {
        Ok(pool) => {
            let outcome = drain(&args, &pool).await;
            pool.close().await;
            outcome
        }
        Err(error) => Err(error.into()),
    };
    let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    let rate = outcome?;
    dropped.context("dropping the bench database")?;

    let figures = BTreeMap::from([("peer_queue_tasks_per_s", rate)]);
    println!(
        "peer queue: apalis-postgres, {} jobs, {} workers x {} concurrency, fetch batch {}, {}",
        args.jobs,
        args.workers,
        args.concurrency,
        args.batch,
        if args.pubsub { "pubsub" } else { "polling" }
    );
    for (name, value) in &figures {
        println!("{name:<24} {value:.2}");
    }
    let path = record(&figures)?;
    println!("figures merged into {}", path.display());
    Ok(())
}
