//! memory-bench: semantic memory search and writes through the release `colony-memory` binary.
//!
//! Search: 100,000 memories of 384 dimensions (a Gaussian mixture of unit vectors, which
//! clusters like sentence embeddings do; queries drawn from the same mixture, not from the
//! stored points) are loaded into PostgreSQL, the service rebuilds its index from them at start,
//! and queries go through `SearchMemories` over gRPC one at a time. Latency is the client's
//! round trip (gRPC, index, PostgreSQL for the live rows, ranking); recall@10 compares the
//! results with an exact search over the same vectors (recency and importance weights are 0
//! for the run, so the service ranks by similarity alone).
//!
//! Writes: distinct facts of 12-16 words through `WriteMemories`, each embedded by the
//! service's own MiniLM model, checked for near-duplicates against the 100,000, stored and
//! announced on the bus; one memory per call (`--batch` for more), from 32 concurrent clients
//! (agents).
//!
//! Usage: `memory-bench [--memories N] [--queries N] [--recall-queries N] [--writes N]
//! [--writers N] [--batch N] [--clusters N]`. Figures go to `target/bench/results.json`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use colony_e2e::bench;
use colony_proto::v1;
use colony_proto::v1::memory_client::MemoryClient;
use colony_testkit::{Process, TestBus, TestDb, binary, free_port, wait_http_ok};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

const DIMENSIONS: usize = 384;
const TENANT: &str = "bench";

struct Args {
    memories: usize,
    queries: usize,
    recall_queries: usize,
    writes: usize,
    writers: usize,
    /// Memories per `WriteMemories` call.
    batch: usize,
    clusters: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        memories: 100_000,
        queries: 2_000,
        recall_queries: 500,
        writes: 3_000,
        writers: 32,
        batch: 1,
        clusters: 1_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        let value: usize = value.parse()?;
        match flag.as_str() {
            "--memories" => args.memories = value,
            "--queries" => args.queries = value,
            "--recall-queries" => args.recall_queries = value,
            "--writes" => args.writes = value,
            "--writers" => args.writers = value,
            "--batch" => args.batch = value,
            "--clusters" => args.clusters = value,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(
        args.memories > 0 && args.queries > 0 && args.writers > 0 && args.batch > 0,
        "--memories, --queries, --writers and --batch must be positive"
    );
    args.recall_queries = args.recall_queries.min(args.queries);
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn encode(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Loads `vectors` as memories of the tenant scope straight into PostgreSQL, in batches.
async fn load(db: &TestDb, vectors: &[Vec<f32>]) -> anyhow::Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(vectors.len());
    for (chunk_index, chunk) in vectors.chunks(5_000).enumerate() {
        let contents: Vec<String> = (0..chunk.len())
            .map(|i| format!("bench memory {}", chunk_index * 5_000 + i))
            .collect();
        let embeddings: Vec<Vec<u8>> = chunk.iter().map(|v| encode(v)).collect();
        let chunk_ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO memory.memories (tenant, scope_kind, scope_id, content, embedding, \
                 created_at, updated_at) \
             SELECT $1, 'tenant', '', c, e, now(), now() \
             FROM UNNEST($2::text[], $3::bytea[]) WITH ORDINALITY AS i(c, e, n) ORDER BY n \
             RETURNING id",
        )
        .bind(TENANT)
        .bind(&contents)
        .bind(&embeddings)
        .fetch_all(&db.pool)
        .await?;
        ids.extend(chunk_ids);
    }
    Ok(ids)
}

/// Ids of the `k` vectors most similar to `query`, by brute force.
fn exact_top(vectors: &[Vec<f32>], ids: &[i64], query: &[f32], k: usize) -> Vec<i64> {
    let mut scored: Vec<(f32, i64)> = vectors
        .iter()
        .zip(ids)
        .map(|(v, id)| (v.iter().zip(query).map(|(a, b)| a * b).sum::<f32>(), *id))
        .collect();
    scored.select_nth_unstable_by(k, |a, b| b.0.total_cmp(&a.0));
    scored.truncate(k);
    scored.into_iter().map(|(_, id)| id).collect()
}

fn resident_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A distinct fact of 12-16 words (about 20 tokens, like the inference bench's sentences and
/// the short facts agents store): four independent choices from word lists of coprime lengths,
/// so neighbouring writes share little.
fn sentence(i: usize) -> String {
    const WHO: [&str; 13] = [
        "The deploy script",
        "Our staging database",
        "The billing service",
        "The nightly report",
        "The flaky login test",
        "The search index",
        "The onboarding flow",
        "The metrics dashboard",
        "The mobile app",
        "The payment gateway",
        "The data warehouse",
        "The support inbox",
        "The release checklist",
    ];
    const WHAT: [&str; 17] = [
        "needs the VPN to reach production",
        "moved to the new cluster",
        "times out on large payloads",
        "reads a shared config file",
        "belongs to the platform team",
        "restarts after every migration",
        "keeps secrets in the vault",
        "pages the on-call engineer",
        "breaks on daylight saving changes",
        "was rewritten in Rust",
        "hits a strict vendor rate limit",
        "keeps invoices for seven years",
        "gets a quarterly security review",
        "slows down during batch imports",
        "logs a correlation id per request",
        "caches results for five minutes",
        "is being replaced next year",
    ];
    const WHEN: [&str; 7] = [
        "since spring",
        "after the incident",
        "per the design review",
        "until further notice",
        "as of last week",
        "on weekdays",
        "for now",
    ];
    const WHO_SAYS: [&str; 11] = [
        "Maria", "Kofi", "Yuki", "Dan", "Liis", "Ana", "Ravi", "Awa", "Erik", "Linh", "Jorge",
    ];
    format!(
        "{} {} {}, says {}.",
        WHO[i % WHO.len()],
        WHAT[i % WHAT.len()],
        WHEN[i % WHEN.len()],
        WHO_SAYS[i % WHO_SAYS.len()],
    )
}

async fn run(args: Args) -> anyhow::Result<()> {
    let db = TestDb::new().await;
    let bus = TestBus::new();
    // The schema first: the service applies migrations, so start it once on the empty database.
    let (http, grpc) = (free_port(), free_port());
    let models =
        colony_inference::workspace_models_dir().join(colony_inference::DEFAULT_EMBEDDING_MODEL);
    let env = vec![
        ("MEMORY__DATABASE__URL".to_owned(), db.url.clone()),
        ("MEMORY__DATABASE__MAX_CONNECTIONS".to_owned(), "16".into()),
        ("MEMORY__BUS__URL".to_owned(), bus.url.clone()),
        ("MEMORY__BUS__PREFIX".to_owned(), bus.prefix.clone()),
        ("MEMORY__HTTP__ADDR".to_owned(), format!("127.0.0.1:{http}")),
        ("MEMORY__GRPC__ADDR".to_owned(), format!("127.0.0.1:{grpc}")),
        ("MEMORY__TELEMETRY__LOG_FILTER".to_owned(), "warn".into()),
        (
            "MEMORY__EMBEDDING__MODEL_DIR".to_owned(),
            models.to_string_lossy().into_owned(),
        ),
        ("MEMORY__EMBEDDING__LOADING".to_owned(), "eager".into()),
        ("MEMORY__SEMANTIC__RECENCY_WEIGHT".to_owned(), "0".into()),
        ("MEMORY__SEMANTIC__IMPORTANCE_WEIGHT".to_owned(), "0".into()),
    ];
    let readyz = format!("http://127.0.0.1:{http}/readyz");
    let mut first = Process::spawn("memory", &binary("colony-memory"), &[], &env);
    wait_http_ok(&readyz, Duration::from_secs(60)).await;
    first.terminate(Duration::from_secs(10));

    println!(
        "memory-bench: {} memories of {DIMENSIONS} dimensions ({} clusters), {} queries",
        args.memories, args.clusters, args.queries
    );
    let mixture = colony_ann::synthetic::Mixture::new(DIMENSIONS, args.clusters, 7);
    let vectors = mixture.sample(args.memories, 1);
    let queries = mixture.sample(args.queries, 2);
    let started = Instant::now();
    let ids = load(&db, &vectors).await?;
    println!(
        "  loaded into PostgreSQL in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Settle the table as autovacuum would have on one that was not filled a second ago:
    // otherwise its vacuum and analyze of the fresh 100,000 rows land in the middle of the
    // measured searches, and the planner has no statistics.
    let started = Instant::now();
    sqlx::query("VACUUM ANALYZE memory.memories")
        .execute(&db.pool)
        .await?;
    println!(
        "  vacuumed and analyzed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let service = Process::spawn("memory", &binary("colony-memory"), &[], &env);
    wait_http_ok(&readyz, Duration::from_secs(600)).await;
    let rebuild_s = started.elapsed().as_secs_f64();
    println!("  service ready (index rebuilt from PostgreSQL) in {rebuild_s:.1} s");
    let mut client = MemoryClient::new(
        Channel::from_shared(format!("http://127.0.0.1:{grpc}"))?
            .connect()
            .await?,
    );

    // Warm-up, then one query at a time.
    for query in queries.iter().take(50) {
        search(&mut client, query).await?;
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let mut recall_sum = 0.0;
    for (i, query) in queries.iter().enumerate() {
        let started = Instant::now();
        let found = search(&mut client, query).await?;
        latency.record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))?;
        if i < args.recall_queries {
            let exact = exact_top(&vectors, &ids, query, 10);
            let hits = found.iter().filter(|id| exact.contains(id)).count();
            recall_sum += hits as f64 / 10.0;
        }
    }
    // The service's own time per search (from its /metrics), to split gRPC from the work.
    let metrics = reqwest::get(format!("http://127.0.0.1:{http}/metrics"))
        .await?
        .text()
        .await?;
    let server_sum = server_seconds(&metrics, "sum");
    let server_count = server_seconds(&metrics, "count");
    let server_mean_ms = if server_count > 0.0 {
        server_sum / server_count * 1000.0
    } else {
        0.0
    };
    let p50 = latency.value_at_quantile(0.50) as f64 / 1000.0;
    let p99 = latency.value_at_quantile(0.99) as f64 / 1000.0;
    let recall = recall_sum / args.recall_queries as f64;
    let rss = resident_mb(service.pid()).unwrap_or(0.0);
    println!(
        "  search: p50 {p50:.3} ms, p99 {p99:.3} ms, max {:.3} ms (mean inside the service {server_mean_ms:.3} ms); recall@10 {recall:.4} ({} queries); service RSS {rss:.0} MiB",
        latency.max() as f64 / 1000.0,
        args.recall_queries
    );

    // Writes: concurrent single-memory calls, each embedded by the service.
    let started = Instant::now();
    let per_writer = args.writes.div_ceil(args.writers * args.batch);
    let batch = args.batch;
    let mut tasks = Vec::new();
    for writer in 0..args.writers {
        let mut client = client.clone();
        tasks.push(async move {
            let mut merged = 0usize;
            for n in 0..per_writer {
                let first = (writer * per_writer + n) * batch;
                let memories = (first..first + batch)
                    .map(|i| v1::MemoryInput {
                        scope: Some(v1::Scope {
                            kind: v1::ScopeKind::Tenant.into(),
                            id: String::new(),
                        }),
                        text: sentence(i),
                        ..Default::default()
                    })
                    .collect();
                let response = client
                    .write_memories(v1::WriteMemoriesRequest {
                        tenant: TENANT.into(),
                        memories,
                    })
                    .await?
                    .into_inner();
                merged += response.results.iter().filter(|r| r.merged).count();
            }
            anyhow::Ok(merged)
        });
    }
    // One task is plenty for clients that mostly wait.
    let mut merged = 0;
    for result in futures::future::join_all(tasks).await {
        merged += result?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let written = per_writer * args.writers * args.batch;
    let writes_per_s = written as f64 / elapsed;
    println!(
        "  writes: {written} in {elapsed:.1} s = {writes_per_s:.0}/s ({} concurrent writers, {} per call; {merged} merged as near-duplicates)",
        args.writers, args.batch
    );

    let figures = BTreeMap::from([
        ("search_p50_ms", p50),
        ("search_p99_ms", p99),
        ("recall_at_10", recall),
        ("writes_per_s", writes_per_s),
        ("index_rebuild_s", rebuild_s),
        ("rss_mb", rss),
    ]);
    let path = bench::record("memory_", &figures, &[])?;
    println!("  figures written to {}", path.display());
    drop(service);
    Ok(())
}

/// `sum` or `count` of the service's SearchMemories duration histogram.
fn server_seconds(metrics: &str, part: &str) -> f64 {
    let name =
        format!("colony_memory_operation_duration_seconds_{part}{{method=\"SearchMemories\"}}");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name.as_str()))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn search(client: &mut MemoryClient<Channel>, query: &[f32]) -> anyhow::Result<Vec<i64>> {
    let response = client
        .search_memories(v1::SearchMemoriesRequest {
            tenant: TENANT.into(),
            query_embedding: query.to_vec(),
            limit: 10,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response
        .results
        .iter()
        .filter_map(|r| r.memory.as_ref().map(|m| m.id))
        .collect())
}
