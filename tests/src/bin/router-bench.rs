//! Router overhead benchmark: what the router adds to a model call's latency, next to the
//! LiteLLM proxy doing the same job.
//!
//! A 0-ms stub upstream (`colony_e2e::stub`, OpenAI chat completions with usage, answered at
//! once) runs as its own process: this binary started again with `--serve-stub`. On two cores
//! every process competes for CPU anyway, but in its own process the stub's work never runs on
//! the load generator's runtime threads, and its CPU time is accounted separately.
//!
//! An open-loop generator offers `POST /v1/chat/completions` at a fixed rate over a pool of
//! keep-alive HTTP/1.1 connections. A pacing thread sleeps until each request's scheduled time
//! and hands it to the runtime; its latency runs from that scheduled time to the last byte of
//! the answer, so a stalled target or generator shows in the latency instead of slowing the
//! offered load (no coordinated omission). Latencies go into an HDR histogram (µs, 3
//! significant digits).
//!
//! Targets, one after another with the same load (warm-up, then the measured run):
//! the stub directly, the router (the release `colony-router` binary, a fresh database and
//! stream prefix, one `openai` deployment whose `base_url` is the stub), the stub directly
//! again, and the LiteLLM proxy routing one model to the same stub. Overhead = a target's
//! percentile − the percentile of the direct run just before it. The router's peak resident
//! memory is sampled from `/proc/<pid>/status` during its run.
//!
//! Figures (at the default 1,000 requests/s; at another `--rate` every name gets an `_at_<rate>`
//! suffix) are merged into `target/bench/results.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use colony_e2e::bench::{self, ProcessCpu};
use colony_e2e::stub::StubProvider;
use colony_testkit::{Process, TestBus, TestDb, free_port};
use hdrhistogram::Histogram;
use tokio_util::task::TaskTracker;

const USAGE: &str = "\
usage: router-bench [flags]

Measures the latency the router adds to a 0-ms OpenAI-compatible stub upstream at a fixed
request rate, and the same for the LiteLLM proxy; merges the figures into
target/bench/results.json.

flags:
  --rate R             requests per second offered to every target (default 1000)
  --duration S         seconds measured per target (default 20)
  --warmup S           seconds of the same load before each measurement, not counted (default 5)
  --timeout S          per-request timeout in seconds; a timeout counts as an error (default 10)
  --max-in-flight N    requests that may wait for an answer at once; one due beyond that is
                       not sent and counts as an error (default 4096)
  --stub-threads N     runtime threads of the stub process (default 1)
  --skip-litellm       measure the stub and the router only
  --litellm PATH       the LiteLLM proxy's executable
                       (default target/bench/litellm/venv/bin/litellm; scripts/litellm-venv.sh
                       installs it there)
  --litellm-workers N  pass --num_workers N to LiteLLM (default: LiteLLM's own default)
  -h, --help           this text";

/// The deployment (router) and model name (LiteLLM) the load asks for.
const MODEL_NAME: &str = "stub";
/// The model the stub is asked for by both.
const UPSTREAM_MODEL: &str = "stub-model";
/// The rate the headline figures are defined at.
const HEADLINE_RATE: f64 = 1000.0;
/// How long LiteLLM may take to import and start (it loads a large Python package).
const LITELLM_START: Duration = Duration::from_secs(180);
/// How often progress is printed during a long phase.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

struct Args {
    rate: f64,
    duration: Duration,
    warmup: Duration,
    timeout: Duration,
    max_in_flight: usize,
    stub_threads: usize,
    skip_litellm: bool,
    litellm: PathBuf,
    litellm_workers: Option<u32>,
    serve_stub: Option<u16>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        rate: HEADLINE_RATE,
        duration: Duration::from_secs(20),
        warmup: Duration::from_secs(5),
        timeout: Duration::from_secs(10),
        max_in_flight: 4096,
        stub_threads: 1,
        skip_litellm: false,
        litellm: colony_testkit::target_dir().join("bench/litellm/venv/bin/litellm"),
        litellm_workers: None,
        serve_stub: None,
    };
    let secs = |value: &str| -> anyhow::Result<Duration> {
        let secs: f64 = value.parse()?;
        anyhow::ensure!(secs > 0.0 && secs.is_finite(), "durations must be positive");
        Ok(Duration::from_secs_f64(secs))
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--skip-litellm" => {
                args.skip_litellm = true;
                continue;
            }
            _ => {}
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rate" => args.rate = value.parse()?,
            "--duration" => args.duration = secs(&value)?,
            "--warmup" => args.warmup = secs(&value)?,
            "--timeout" => args.timeout = secs(&value)?,
            "--max-in-flight" => args.max_in_flight = value.parse()?,
            "--stub-threads" => args.stub_threads = value.parse()?,
            "--litellm" => args.litellm = PathBuf::from(value),
            "--litellm-workers" => args.litellm_workers = Some(value.parse()?),
            "--serve-stub" => args.serve_stub = Some(value.parse()?),
            other => anyhow::bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        args.rate > 0.0 && args.rate.is_finite(),
        "--rate must be positive"
    );
    anyhow::ensure!(
        args.max_in_flight > 0 && args.stub_threads > 0,
        "--max-in-flight and --stub-threads must be positive"
    );
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(port) = args.serve_stub {
        return serve_stub(port, args.stub_threads);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// The stub process: serves until SIGTERM.
fn serve_stub(port: u16, threads: usize) -> anyhow::Result<()> {
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let mut stub = StubProvider::start_on(&format!("127.0.0.1:{port}")).await?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        terminate.recv().await;
        stub.stop().await;
        Ok(())
    })
}

/// What one measured run saw.
struct Outcome {
    /// Latency of each successful request, µs from its scheduled time.
    latency_us: Histogram<u64>,
    scheduled: u64,
    /// Failed, timed out, or not sent because `--max-in-flight` requests were waiting.
    errors: u64,
    not_sent: u64,
    first_error: Option<String>,
    /// First scheduled time → last answer.
    span_secs: f64,
    /// How late the pacing thread handed a request over, at worst.
    max_send_lag_us: u64,
}

impl Outcome {
    fn ok(&self) -> u64 {
        self.latency_us.len()
    }

    fn achieved_per_s(&self) -> f64 {
        if self.span_secs > 0.0 {
            self.ok() as f64 / self.span_secs
        } else {
            0.0
        }
    }

    fn ms(&self, quantile: f64) -> f64 {
        if self.latency_us.is_empty() {
            return f64::NAN;
        }
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn max_ms(&self) -> f64 {
        if self.latency_us.is_empty() {
            return f64::NAN;
        }
        self.latency_us.max() as f64 / 1000.0
    }
}

/// What the request tasks of one run write to.
struct Tally {
    latency_us: Mutex<Histogram<u64>>,
    errors: AtomicU64,
    in_flight: AtomicUsize,
    first_error: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One target of the load: where to post and what to send.
#[derive(Clone)]
struct Target {
    name: &'static str,
    url: String,
    client: reqwest::Client,
    /// Shared by every request of a run without copying.
    body: bytes::Bytes,
}

fn chat_body(model: &str) -> bytes::Bytes {
    let body = serde_json::json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a benchmark."},
            {"role": "user", "content": "Say hello."}
        ],
        "max_tokens": 16,
    });
    bytes::Bytes::from(body.to_string())
}

fn client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()?)
}

async fn send_one(target: &Target) -> anyhow::Result<()> {
    let response = target
        .client
        .post(&target.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(target.body.clone())
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status.is_success() && body.windows(9).any(|w| w == b"\"choices\""),
        "HTTP {status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    Ok(())
}

async fn timed_request(target: Target, due: Instant, tally: Arc<Tally>) {
    let result = send_one(&target).await;
    let done = Instant::now();
    tally.in_flight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(()) => {
            let us = done.saturating_duration_since(due).as_micros();
            lock(&tally.latency_us).saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
        }
        Err(error) => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            lock(&tally.first_error).get_or_insert_with(|| format!("{error:#}"));
        }
    }
    let mut last = lock(&tally.last_done);
    if last.is_none_or(|last| done > last) {
        *last = Some(done);
    }
}

/// What the pacing thread reports when it has scheduled every request.
struct Paced {
    first_due: Instant,
    /// Per target.
    not_sent: Vec<u64>,
    max_send_lag_us: u64,
}

/// Offers `rate` requests a second to `target` for `duration`, open loop, and waits for every
/// answer.
async fn run_load(
    target: &Target,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    label: &str,
) -> anyhow::Result<Outcome> {
    let mut outcomes = run_interleaved(
        std::slice::from_ref(target),
        rate,
        duration,
        max_in_flight,
        label,
    )
    .await?;
    outcomes.pop().context("one outcome per target")
}

/// Offers `rate` requests a second to each of `targets` for `duration`, open loop, taking turns
/// request by request (so that every target meets the machine as it is at the same moments),
/// and waits for every answer. One outcome per target, in order.
async fn run_interleaved(
    targets: &[Target],
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    label: &str,
) -> anyhow::Result<Vec<Outcome>> {
    let per_target = (rate * duration.as_secs_f64()).round() as u64;
    let count = targets.len().max(1) as u64;
    let total = per_target * count;
    let tallies = targets
        .iter()
        .map(|_| {
            Ok(Arc::new(Tally {
                latency_us: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
                errors: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                first_error: Mutex::new(None),
                last_done: Mutex::new(None),
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tracker = TaskTracker::new();
    let runtime = tokio::runtime::Handle::current();
    let (paced_tx, paced_rx) = tokio::sync::oneshot::channel();
    let pacer = {
        let (targets, tallies, tracker, label) = (
            targets.to_vec(),
            tallies.clone(),
            tracker.clone(),
            label.to_owned(),
        );
        // A plain thread, not a runtime task: it sleeps with the OS timer (tens of µs late),
        // where the runtime's timer has a 1 ms granularity.
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                let interval = 1.0 / (rate * count as f64);
                let first_due = Instant::now() + Duration::from_millis(10);
                let (mut not_sent, mut max_lag) = (vec![0u64; targets.len()], Duration::ZERO);
                let mut last_report = Instant::now();
                for i in 0..total {
                    let turn = (i % count) as usize;
                    let (target, tally) = (&targets[turn], &tallies[turn]);
                    let due = first_due + Duration::from_secs_f64(i as f64 * interval);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
                    if tally.in_flight.load(Ordering::Relaxed) >= max_in_flight {
                        not_sent[turn] += 1;
                    } else {
                        tally.in_flight.fetch_add(1, Ordering::Relaxed);
                        tracker
                            .spawn_on(timed_request(target.clone(), due, tally.clone()), &runtime);
                    }
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        eprintln!(
                            "  {label}: {}/{total} scheduled, {} in flight, {} errors, {} not sent",
                            i + 1,
                            tallies
                                .iter()
                                .map(|t| t.in_flight.load(Ordering::Relaxed))
                                .sum::<usize>(),
                            tallies
                                .iter()
                                .map(|t| t.errors.load(Ordering::Relaxed))
                                .sum::<u64>(),
                            not_sent.iter().sum::<u64>(),
                        );
                        last_report = Instant::now();
                    }
                }
                drop(paced_tx.send(Paced {
                    first_due,
                    not_sent,
                    max_send_lag_us: u64::try_from(max_lag.as_micros()).unwrap_or(u64::MAX),
                }));
            })?
    };
    let paced = paced_rx.await.context("the pacing thread stopped")?;
    drop(pacer.join());
    tracker.close();
    tracker.wait().await;

    tallies
        .iter()
        .zip(&paced.not_sent)
        .map(|(tally, not_sent)| {
            let latency_us = std::mem::replace(
                &mut *lock(&tally.latency_us),
                Histogram::new_with_bounds(1, 120_000_000, 3)?,
            );
            let last_done = lock(&tally.last_done).unwrap_or(paced.first_due);
            let first_error = lock(&tally.first_error).take();
            Ok(Outcome {
                latency_us,
                scheduled: per_target,
                errors: tally.errors.load(Ordering::Relaxed) + not_sent,
                not_sent: *not_sent,
                first_error,
                span_secs: last_done
                    .saturating_duration_since(paced.first_due)
                    .as_secs_f64(),
                max_send_lag_us: paced.max_send_lag_us,
            })
        })
        .collect()
}

/// Every process's CPU time at one moment.
struct CpuSnapshot {
    at: Instant,
    processes: Vec<ProcessCpu>,
}

fn cpu_snapshot() -> CpuSnapshot {
    CpuSnapshot {
        at: Instant::now(),
        processes: bench::processes(),
    }
}

/// % of one core used between two snapshots by: this bench, the stub, the target (with its
/// descendants: a server may fork workers), PostgreSQL and NATS (every process of those names). Counted per process,
/// so one that exits in between (a pooled PostgreSQL connection, say) drops out instead of
/// taking its whole past from the sum.
fn cpu_percent(
    before: &CpuSnapshot,
    after: &CpuSnapshot,
    stub: u32,
    target: Option<u32>,
) -> BTreeMap<&'static str, f64> {
    let start: HashMap<u32, f64> = before
        .processes
        .iter()
        .map(|p| (p.pid, p.cpu_secs))
        .collect();
    let used: Vec<ProcessCpu> = after
        .processes
        .iter()
        .map(|p| ProcessCpu {
            cpu_secs: p.cpu_secs - start.get(&p.pid).copied().unwrap_or(0.0),
            ..p.clone()
        })
        .collect();
    let by_name = |prefix: &str| -> f64 {
        used.iter()
            .filter(|p| p.comm.starts_with(prefix))
            .map(|p| p.cpu_secs)
            .sum()
    };
    let own = |pid: u32| -> f64 {
        used.iter()
            .filter(|p| p.pid == pid)
            .map(|p| p.cpu_secs)
            .sum()
    };
    let mut secs = BTreeMap::new();
    secs.insert("bench", own(std::process::id()));
    secs.insert("stub", own(stub));
    if let Some(target) = target {
        secs.insert("target", bench::tree_cpu_secs(&used, target));
    }
    secs.insert("postgres", by_name("postgres"));
    secs.insert("nats", by_name("nats-server"));
    let elapsed = after.at.duration_since(before.at).as_secs_f64();
    secs.into_iter()
        .map(|(name, used)| (name, used / elapsed * 100.0))
        .collect()
}

/// Samples a process's resident memory until stopped; keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rss".into())
            .spawn(move || {
                let mut peak = 0;
                while !flag.load(Ordering::Relaxed) {
                    peak = peak.max(bench::vm_rss_kib(pid).unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(50));
                }
                peak
            })?;
        Ok(Self { stop, thread })
    }

    /// Peak resident memory in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// A measured target: warm-up, then the run, with CPU use around the run.
struct Measured {
    outcome: Outcome,
    cpu: BTreeMap<&'static str, f64>,
}

async fn measure(
    args: &Args,
    target: &Target,
    stub_pid: u32,
    target_pid: Option<u32>,
) -> anyhow::Result<Measured> {
    eprintln!(
        "{}: warm-up, {} s at {} requests/s",
        target.name,
        args.warmup.as_secs_f64(),
        args.rate
    );
    let warm = run_load(
        target,
        args.rate,
        args.warmup,
        args.max_in_flight,
        &format!("{} warm-up", target.name),
    )
    .await?;
    if warm.ok() == 0 {
        anyhow::bail!(
            "{}: no request succeeded during the warm-up ({})",
            target.name,
            warm.first_error.as_deref().unwrap_or("no error recorded")
        );
    }
    eprintln!(
        "{}: measuring, {} s at {} requests/s",
        target.name,
        args.duration.as_secs_f64(),
        args.rate
    );
    let before = cpu_snapshot();
    let outcome = run_load(
        target,
        args.rate,
        args.duration,
        args.max_in_flight,
        target.name,
    )
    .await?;
    let after = cpu_snapshot();
    Ok(Measured {
        outcome,
        cpu: cpu_percent(&before, &after, stub_pid, target_pid),
    })
}

/// Waits until `check` succeeds, while `process` is alive, for at most `timeout`.
async fn wait_ready<F, Fut>(
    what: &str,
    process: &mut Process,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    loop {
        if check().await {
            return Ok(());
        }
        if let Some(code) = process.exited() {
            anyhow::bail!(
                "{what} exited ({code:?}) before it was ready; its log:\n{}",
                tail(&process.log_text(), 30)
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what} was not ready within {} s; its log:\n{}",
                timeout.as_secs(),
                tail(&process.log_text(), 30)
            );
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            eprintln!("  waiting for {what} to be ready");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn http_ok(client: &reqwest::Client, url: &str) -> bool {
    matches!(client.get(url).timeout(Duration::from_secs(2)).send().await,
             Ok(response) if response.status().is_success())
}

fn router_config(stub_port: u16) -> String {
    format!(
        r#"default_deployment = "{MODEL_NAME}"

[[deployments]]
name = "{MODEL_NAME}"
provider = "openai"
model = "{UPSTREAM_MODEL}"
base_url = "http://127.0.0.1:{stub_port}/v1"
input_price_per_mtok = 0.15
output_price_per_mtok = 0.6
timeout = "30s"
"#
    )
}

/// The router's run, and its memory.
struct RouterRun {
    measured: Measured,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    ledger_rows: i64,
    /// The router's own `colony_router_overhead_seconds` histogram after the run.
    internal: Vec<(f64, f64)>,
    /// The stub directly and the router, taking turns request by request, each at the rate.
    paired: Vec<Outcome>,
}

/// The cumulative buckets (upper bound in seconds, count) of histogram `name` in a Prometheus
/// text page, summed over label sets.
fn histogram_buckets(page: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in page.lines().filter(|line| line.starts_with(&prefix)) {
        let Some(le) = line
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        buckets.entry(le.to_owned()).or_insert((bound, 0.0)).1 += count;
    }
    let mut buckets: Vec<(f64, f64)> = buckets.into_values().filter(|(b, _)| !b.is_nan()).collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The upper bound, in ms, of the bucket holding quantile `q`: "q of the samples took at most
/// this". NaN without samples.
fn bucket_quantile_ms(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, count)| *count);
    if total <= 0.0 {
        return f64::NAN;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::NAN, |(bound, _)| bound * 1000.0)
}

async fn bench_router(
    args: &Args,
    direct: &Target,
    stub_port: u16,
    stub_pid: u32,
) -> anyhow::Result<RouterRun> {
    eprintln!("router: fresh database and stream prefix, release binary");
    let db = TestDb::new().await;
    let bus = TestBus::new();
    let dir = colony_testkit::target_dir().join("bench").join("router");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join(format!("router-{}.toml", bus.prefix));
    std::fs::write(&config, router_config(stub_port))?;
    let (http_port, grpc_port) = (free_port(), free_port());
    let mut router = colony_e2e::spawn_router(
        &db,
        &bus,
        &config,
        "warn",
        None,
        (http_port, grpc_port),
        &[],
    );
    let base = format!("http://127.0.0.1:{http_port}");
    let probe = client(Duration::from_secs(2))?;
    let readyz = format!("{base}/readyz");
    let result = async {
        wait_ready("the router", &mut router, Duration::from_secs(60), || {
            http_ok(&probe, &readyz)
        })
        .await?;
        let target = Target {
            name: "router",
            url: format!("{base}/v1/chat/completions"),
            client: client(args.timeout)?,
            body: chat_body(MODEL_NAME),
        };
        let rss_idle_kib = bench::vm_rss_kib(router.pid()).unwrap_or(0);
        let sampler = RssSampler::start(router.pid())?;
        let measured = measure(args, &target, stub_pid, Some(router.pid())).await;
        let rss_peak_kib = sampler.stop();
        let measured = measured?;
        let ledger_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM router.usage_ledger")
            .fetch_one(&db.pool)
            .await
            .context("counting the router's ledger rows")?;
        // Then both at once, taking turns: each percentile difference is then between
        // requests that met the machine at the same moments (the stub serves twice the rate).
        eprintln!(
            "router: paired with direct, {} s, each at {} requests/s",
            args.duration.as_secs_f64(),
            args.rate
        );
        let paired = run_interleaved(
            &[direct.clone(), target.clone()],
            args.rate,
            args.duration,
            args.max_in_flight,
            "paired",
        )
        .await?;
        let page = probe
            .get(format!("{base}/metrics"))
            .send()
            .await
            .context("reading the router's metrics")?
            .text()
            .await?;
        Ok(RouterRun {
            measured,
            rss_idle_kib,
            rss_peak_kib,
            ledger_rows,
            internal: histogram_buckets(&page, "colony_router_overhead_seconds"),
            paired,
        })
    }
    .await;
    router.terminate(Duration::from_secs(10));
    drop(std::fs::remove_file(&config));
    result
}

fn litellm_config(stub_port: u16) -> String {
    // No database and no master key: LiteLLM then keeps no spend logs and checks no keys. The
    // key below is never checked by the stub; LiteLLM's OpenAI client wants one.
    format!(
        "model_list:
  - model_name: {MODEL_NAME}
    litellm_params:
      model: openai/{UPSTREAM_MODEL}
      api_base: http://127.0.0.1:{stub_port}/v1
      api_key: bench-dummy-key
litellm_settings:
  telemetry: false
"
    )
}

async fn bench_litellm(args: &Args, stub_port: u16, stub_pid: u32) -> anyhow::Result<Measured> {
    anyhow::ensure!(
        args.litellm.is_file(),
        "{} not found (run scripts/litellm-venv.sh to install LiteLLM)",
        args.litellm.display()
    );
    let dir = colony_testkit::target_dir().join("bench").join("litellm");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, litellm_config(stub_port))?;
    let port = free_port();
    let config_arg = config.to_string_lossy().into_owned();
    let port_arg = port.to_string();
    let workers = args.litellm_workers.map(|n| n.to_string());
    let mut argv = vec![
        "--config",
        &config_arg,
        "--host",
        "127.0.0.1",
        "--port",
        &port_arg,
    ];
    if let Some(workers) = &workers {
        argv.extend(["--num_workers", workers]);
    }
    let mut env = vec![
        // Offline: the model cost map shipped with the package, not a download at start.
        ("LITELLM_LOCAL_MODEL_COST_MAP".to_owned(), "True".to_owned()),
        ("LITELLM_TELEMETRY".to_owned(), "False".to_owned()),
        ("LITELLM_LOG".to_owned(), "ERROR".to_owned()),
        // The router checks no keys, so neither does LiteLLM here: the same job on both sides.
        // LiteLLM refuses to start without a master key unless told this is intended.
        (
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY".to_owned(),
            "true".to_owned(),
        ),
        // Tokenizer and other libraries look for caches under HOME.
        ("HOME".to_owned(), std::env::var("HOME").unwrap_or_default()),
    ];
    if let Some(venv) = args.litellm.parent().and_then(Path::parent) {
        env.push((
            "VIRTUAL_ENV".to_owned(),
            venv.to_string_lossy().into_owned(),
        ));
    }
    eprintln!(
        "litellm: starting {} ({} workers)",
        args.litellm.display(),
        workers.as_deref().unwrap_or("LiteLLM's default number of")
    );
    let mut litellm = Process::spawn("litellm", &args.litellm, &argv, &env);
    let base = format!("http://127.0.0.1:{port}");
    let probe = client(Duration::from_secs(2))?;
    let liveliness = format!("{base}/health/liveliness");
    let result = async {
        wait_ready("LiteLLM", &mut litellm, LITELLM_START, || {
            http_ok(&probe, &liveliness)
        })
        .await?;
        let target = Target {
            name: "litellm",
            url: format!("{base}/v1/chat/completions"),
            client: client(args.timeout)?,
            body: chat_body(MODEL_NAME),
        };
        measure(args, &target, stub_pid, Some(litellm.pid())).await
    }
    .await;
    litellm.terminate(Duration::from_secs(10));
    result
}

async fn start_stub(args: &Args) -> anyhow::Result<(Process, u16)> {
    let port = free_port();
    let exe = std::env::current_exe().context("finding this binary to start the stub")?;
    let mut stub = Process::spawn(
        "stub",
        &exe,
        &[
            "--serve-stub",
            &port.to_string(),
            "--stub-threads",
            &args.stub_threads.to_string(),
        ],
        &[],
    );
    let probe = Target {
        name: "stub",
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        client: client(Duration::from_secs(2))?,
        body: chat_body(UPSTREAM_MODEL),
    };
    wait_ready("the stub", &mut stub, Duration::from_secs(10), || async {
        send_one(&probe).await.is_ok()
    })
    .await?;
    Ok((stub, port))
}

/// A figure's name in results.json: the headline names at the headline rate, a suffixed one at
/// any other, so that a run at another rate never passes for the headline.
fn figure_name(name: &str, rate: f64) -> String {
    if rate == HEADLINE_RATE {
        name.to_owned()
    } else {
        format!("{name}_at_{rate}")
    }
}

fn row(name: &str, outcome: &Outcome) -> String {
    format!(
        "{name:<10} {:>8} {:>8} {:>7} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>8}",
        outcome.scheduled,
        outcome.ok(),
        outcome.errors,
        outcome.achieved_per_s(),
        outcome.ms(0.50),
        outcome.ms(0.90),
        outcome.ms(0.99),
        outcome.max_ms(),
        outcome.max_send_lag_us,
    )
}

fn cpu_line(name: &str, cpu: &BTreeMap<&str, f64>) -> String {
    let parts: Vec<String> = cpu
        .iter()
        .map(|(account, pct)| format!("{account} {pct:.0}%"))
        .collect();
    format!(
        "  CPU during {name} (% of one core; 2 cores = 200%): {}",
        parts.join(", ")
    )
}

/// Overhead of `target` over `direct` at `quantile`, ms.
fn overhead(target: &Outcome, direct: &Outcome, quantile: f64) -> f64 {
    target.ms(quantile) - direct.ms(quantile)
}

fn error_note(name: &str, outcome: &Outcome) -> Option<String> {
    (outcome.errors > 0).then(|| {
        format!(
            "{name}: {} of {} requests failed ({:.1} %; {} not sent at the in-flight cap); \
             latencies are of the successful ones. First error: {}",
            outcome.errors,
            outcome.scheduled,
            outcome.errors as f64 / outcome.scheduled as f64 * 100.0,
            outcome.not_sent,
            outcome.first_error.as_deref().unwrap_or("-")
        )
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    eprintln!(
        "router-bench: {} requests/s, {} s warm-up + {} s per target",
        args.rate,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );
    let (mut stub, stub_port) = start_stub(&args).await?;
    let stub_pid = stub.pid();
    let direct_target = Target {
        name: "direct",
        url: format!("http://127.0.0.1:{stub_port}/v1/chat/completions"),
        client: client(args.timeout)?,
        body: chat_body(UPSTREAM_MODEL),
    };

    let direct = measure(&args, &direct_target, stub_pid, None).await?;
    let router = bench_router(&args, &direct_target, stub_port, stub_pid).await?;
    let (direct_again, litellm) = if args.skip_litellm {
        (None, Err("skipped (--skip-litellm)".to_owned()))
    } else {
        // A second baseline right before LiteLLM, so that each target is compared with the
        // machine as it was just before its own run.
        let again = measure(&args, &direct_target, stub_pid, None).await?;
        let litellm = bench_litellm(&args, stub_port, stub_pid)
            .await
            .map_err(|error| format!("{error:#}"));
        (Some(again), litellm)
    };
    stub.terminate(Duration::from_secs(5));

    println!();
    println!(
        "router overhead bench: {} requests/s offered, {} s measured per target after {} s warm-up",
        args.rate,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64()
    );
    println!(
        "{:<10} {:>8} {:>8} {:>7} {:>10} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "target",
        "sched",
        "ok",
        "errors",
        "achieved/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "lag µs"
    );
    println!("{}", row("direct", &direct.outcome));
    println!("{}", row("router", &router.measured.outcome));
    if let Some(again) = &direct_again {
        println!("{}", row("direct", &again.outcome));
    }
    if let Ok(litellm) = &litellm {
        println!("{}", row("litellm", &litellm.outcome));
    }
    println!("(lag: how late the pacing thread sent a request, at worst; latency counts it)");

    let mut figures: BTreeMap<String, f64> = BTreeMap::new();
    let mut put = |name: &str, value: f64| {
        if value.is_finite() {
            figures.insert(figure_name(name, args.rate), value);
        }
    };
    let r = &router.measured.outcome;
    let d = &direct.outcome;
    let router_p99 = overhead(r, d, 0.99);
    println!(
        "router overhead: p50 {:+.3} ms, p90 {:+.3} ms, p99 {router_p99:+.3} ms, peak RSS {:.1} MB \
         (idle {:.1} MB), {} ledger rows",
        overhead(r, d, 0.50),
        overhead(r, d, 0.90),
        router.rss_peak_kib as f64 / 1024.0,
        router.rss_idle_kib as f64 / 1024.0,
        router.ledger_rows,
    );
    // The router's own account of its time per call (service time minus provider wait, warm-up
    // included), read from its histogram: each figure is the upper bound of a bucket.
    let internal_p50 = bucket_quantile_ms(&router.internal, 0.50);
    let internal_p99 = bucket_quantile_ms(&router.internal, 0.99);
    println!(
        "router internal overhead (its histogram, bucket upper bounds): p50 <= {internal_p50:.3} ms, \
         p99 <= {internal_p99:.3} ms"
    );
    // The headline overhead is the paired one: run after run, the direct baseline's own p99
    // moves by more than the router adds, so only requests that met the same moments compare.
    // The sequential difference stays, under its own names.
    let mut headline_p99 = router_p99;
    if let [paired_direct, paired_router] = router.paired.as_slice() {
        println!(
            "{}\n{}",
            row("direct*", paired_direct),
            row("router*", paired_router)
        );
        let (p50, p90, p99) = (
            overhead(paired_router, paired_direct, 0.50),
            overhead(paired_router, paired_direct, 0.90),
            overhead(paired_router, paired_direct, 0.99),
        );
        println!(
            "router overhead, paired (* rows: taking turns request by request): p50 {p50:+.3} ms, \
             p90 {p90:+.3} ms, p99 {p99:+.3} ms"
        );
        put("router_overhead_p50_ms", p50);
        put("router_overhead_p90_ms", p90);
        put("router_overhead_p99_ms", p99);
        headline_p99 = p99;
    }
    put("router_internal_overhead_p50_ms", internal_p50);
    put("router_internal_overhead_p99_ms", internal_p99);
    put("router_sequential_overhead_p50_ms", overhead(r, d, 0.50));
    put("router_sequential_overhead_p90_ms", overhead(r, d, 0.90));
    put("router_sequential_overhead_p99_ms", router_p99);
    put("router_direct_p50_ms", d.ms(0.50));
    put("router_direct_p99_ms", d.ms(0.99));
    put("router_p50_ms", r.ms(0.50));
    put("router_p99_ms", r.ms(0.99));
    put("router_max_ms", r.max_ms());
    put("router_achieved_per_s", r.achieved_per_s());
    put("router_errors", r.errors as f64);
    put("router_rss_mb", router.rss_peak_kib as f64 / 1024.0);
    put("router_rss_idle_mb", router.rss_idle_kib as f64 / 1024.0);
    if let Some(cpu) = router.measured.cpu.get("target") {
        put("router_cpu_percent", *cpu);
    }
    // When LiteLLM was tried, its figures from an earlier run go, so that none passes for this
    // run's: a failed start or a run without one success leaves them absent.
    let forget: Vec<String> = if args.skip_litellm {
        Vec::new()
    } else {
        [
            "litellm_overhead_p50_ms",
            "litellm_overhead_p90_ms",
            "litellm_overhead_p99_ms",
            "litellm_p50_ms",
            "litellm_p99_ms",
            "litellm_achieved_per_s",
            "litellm_errors",
            "litellm_cpu_percent",
            "router_litellm_overhead_ratio_p99",
        ]
        .map(|name| figure_name(name, args.rate))
        .into()
    };
    match (&litellm, &direct_again) {
        (Ok(litellm), Some(again)) => {
            let l = &litellm.outcome;
            let a = &again.outcome;
            let litellm_p99 = overhead(l, a, 0.99);
            println!(
                "litellm overhead: p50 {:+.3} ms, p90 {:+.3} ms, p99 {litellm_p99:+.3} ms",
                overhead(l, a, 0.50),
                overhead(l, a, 0.90),
            );
            put("litellm_overhead_p50_ms", overhead(l, a, 0.50));
            put("litellm_overhead_p90_ms", overhead(l, a, 0.90));
            put("litellm_overhead_p99_ms", litellm_p99);
            put("litellm_p50_ms", l.ms(0.50));
            put("litellm_p99_ms", l.ms(0.99));
            put("litellm_achieved_per_s", l.achieved_per_s());
            put("litellm_errors", l.errors as f64);
            if let Some(cpu) = litellm.cpu.get("target") {
                put("litellm_cpu_percent", *cpu);
            }
            // Both sequential, each against the direct run just before it.
            if router_p99 > 0.0 && litellm_p99.is_finite() {
                let ratio = litellm_p99 / router_p99;
                println!("p99 overhead (sequential), LiteLLM / router: {ratio:.1}x");
                put("router_litellm_overhead_ratio_p99", ratio);
            }
        }
        (Err(why), _) => println!("litellm: NOT MEASURED - {why}"),
        (Ok(_), None) => {}
    }

    println!("{}", cpu_line("direct", &direct.cpu));
    println!("{}", cpu_line("router", &router.measured.cpu));
    if let Some(again) = &direct_again {
        println!("{}", cpu_line("direct (second)", &again.cpu));
    }
    if let Ok(litellm) = &litellm {
        println!("{}", cpu_line("litellm", &litellm.cpu));
    }
    let mut notes: Vec<String> = [
        error_note("direct", &direct.outcome),
        error_note("router", r),
        direct_again
            .as_ref()
            .and_then(|a| error_note("direct (second)", &a.outcome)),
        litellm
            .as_ref()
            .ok()
            .and_then(|l| error_note("litellm", &l.outcome)),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (name, outcome) in [
        ("router", Some(r)),
        ("litellm", litellm.as_ref().ok().map(|l| &l.outcome)),
    ] {
        if let Some(outcome) = outcome
            && outcome.achieved_per_s() < 0.95 * args.rate
        {
            notes.push(format!(
                "{name}: NOT KEPT UP - {:.1} answers/s of {} offered",
                outcome.achieved_per_s(),
                args.rate
            ));
        }
    }
    if args.rate == HEADLINE_RATE {
        notes.push(format!(
            "target: router p99 overhead (paired) <= 1 ms at 1,000 requests/s: {}",
            if headline_p99 <= 1.0 {
                "met"
            } else {
                "NOT met"
            }
        ));
    }
    for note in &notes {
        println!("{note}");
    }

    let refs: BTreeMap<&str, f64> = figures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let forget_refs: Vec<&str> = forget.iter().map(String::as_str).collect();
    let path = bench::record("", &refs, &forget_refs)?;
    println!("figures merged into {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headline_names_only_at_the_headline_rate() {
        assert_eq!(
            figure_name("router_overhead_p99_ms", 1000.0),
            "router_overhead_p99_ms"
        );
        assert_eq!(
            figure_name("router_overhead_p99_ms", 500.0),
            "router_overhead_p99_ms_at_500"
        );
    }

    #[test]
    fn histogram_quantiles_are_bucket_upper_bounds() {
        let page = "# TYPE colony_router_overhead_seconds histogram\n\
            colony_router_overhead_seconds_bucket{deployment=\"a\",le=\"0.0005\"} 50\n\
            colony_router_overhead_seconds_bucket{deployment=\"a\",le=\"0.001\"} 98\n\
            colony_router_overhead_seconds_bucket{deployment=\"a\",le=\"+Inf\"} 100\n\
            colony_router_overhead_seconds_sum{deployment=\"a\"} 0.05\n";
        let buckets = histogram_buckets(page, "colony_router_overhead_seconds");
        assert_eq!(buckets.len(), 3);
        assert_eq!(bucket_quantile_ms(&buckets, 0.5), 0.5);
        assert_eq!(bucket_quantile_ms(&buckets, 0.98), 1.0);
        assert!(bucket_quantile_ms(&buckets, 0.99).is_infinite());
        assert!(bucket_quantile_ms(&[], 0.5).is_nan());
    }

    #[test]
    fn overhead_is_the_difference_of_percentiles() {
        let outcome = |values: &[u64]| {
            let mut latency_us = Histogram::new_with_bounds(1, 120_000_000, 3).unwrap();
            for v in values {
                latency_us.record(*v).unwrap();
            }
            Outcome {
                latency_us,
                scheduled: values.len() as u64,
                errors: 0,
                not_sent: 0,
                first_error: None,
                span_secs: 1.0,
                max_send_lag_us: 0,
            }
        };
        let direct = outcome(&[100, 200, 300, 400]);
        let target = outcome(&[600, 700, 800, 900]);
        assert!((overhead(&target, &direct, 0.5) - 0.5).abs() < 0.01);
        assert_eq!(target.achieved_per_s(), 4.0);
    }
}
