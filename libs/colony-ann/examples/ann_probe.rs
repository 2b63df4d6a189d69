//! Measures the index on synthetic data: build time, search latency and recall@k against exact
//! search, for a few beam widths.
//!
//! `cargo run --release -p colony-ann --example ann_probe -- --count 100000`
//!
//! Options: `--count N` vectors (100000), `--queries N` (1000), `--dimensions N` (384),
//! `--clusters N` (count / 100: about a hundred vectors per topic), `--k N` (10),
//! `--ef A,B,..` (16,32,64,128), `--data clustered,isotropic,uniform` (all three), `--seed N`,
//! `--m N` and `--ef-construction N` (the defaults of [`HnswParams`]), `--insert many|one`
//! (build with one `insert_many` call, on every core, or with one `insert` per vector),
//! `--threads N` (the threads `insert_many` may use; every core by default).
//!
//! Data sets: `clustered` is the default [`Mixture`] (noise concentrated on a few directions per
//! cluster, as in sentence embeddings); `isotropic` is the same mixture with the noise spread
//! evenly over every direction (harder); `uniform` is uniform on the sphere (the worst case).
//! Queries are drawn from the same distribution as the data but are not in the index. Searches
//! run one at a time on one thread; each latency is one `search_with_ef` call.

use std::error::Error;
use std::time::{Duration, Instant};

use colony_ann::synthetic::{DEFAULT_SPREAD, Mixture, uniform_unit_vectors};
use colony_ann::{Hit, Hnsw, HnswParams, recall_at_k};

struct Options {
    count: usize,
    queries: usize,
    dimensions: usize,
    clusters: Option<usize>,
    k: usize,
    efs: Vec<usize>,
    data: Vec<String>,
    seed: u64,
    params: HnswParams,
    one_by_one: bool,
    threads: usize,
}

fn parse() -> Result<Options, Box<dyn Error>> {
    let mut options = Options {
        count: 100_000,
        queries: 1_000,
        dimensions: 384,
        clusters: None,
        k: 10,
        efs: vec![16, 32, 64, 128],
        data: vec!["clustered".into(), "isotropic".into(), "uniform".into()],
        seed: 42,
        params: HnswParams::default(),
        one_by_one: false,
        threads: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--count" => options.count = value.parse()?,
            "--queries" => options.queries = value.parse()?,
            "--dimensions" => options.dimensions = value.parse()?,
            "--clusters" => options.clusters = Some(value.parse()?),
            "--k" => options.k = value.parse()?,
            "--seed" => options.seed = value.parse()?,
            "--m" => options.params.m = value.parse()?,
            "--ef-construction" => options.params.ef_construction = value.parse()?,
            "--threads" => options.threads = value.parse()?,
            "--insert" => {
                options.one_by_one = match value.as_str() {
                    "one" => true,
                    "many" => false,
                    other => return Err(format!("--insert one or many, not {other}").into()),
                }
            }
            "--ef" => options.efs = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--data" => options.data = value.split(',').map(String::from).collect(),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok(options)
}

fn main() -> Result<(), Box<dyn Error>> {
    let options = parse()?;
    let clusters = options.clusters.unwrap_or((options.count / 100).max(1));
    println!(
        "{} vectors of {} dimensions, {} held-out queries, recall@{} against exact search",
        options.count, options.dimensions, options.queries, options.k
    );
    for data in &options.data {
        let (label, vectors, queries) = match data.as_str() {
            "clustered" | "isotropic" => {
                let decay = if data == "clustered" {
                    colony_ann::synthetic::DEFAULT_DECAY
                } else {
                    0.0
                };
                let mixture = Mixture::with_shape(
                    options.dimensions,
                    clusters,
                    DEFAULT_SPREAD,
                    decay,
                    options.seed,
                );
                (
                    format!("{data}: {clusters} clusters, noise decay {decay}"),
                    mixture.sample(options.count, options.seed + 1),
                    mixture.sample(options.queries, options.seed + 2),
                )
            }
            "uniform" => (
                "uniform on the sphere".to_string(),
                uniform_unit_vectors(options.count, options.dimensions, options.seed + 1),
                uniform_unit_vectors(options.queries, options.dimensions, options.seed + 2),
            ),
            other => return Err(format!("unknown data set {other}").into()),
        };
        probe(&label, &vectors, &queries, &options)?;
    }
    Ok(())
}

fn probe(
    label: &str,
    vectors: &[Vec<f32>],
    queries: &[Vec<f32>],
    options: &Options,
) -> Result<(), Box<dyn Error>> {
    println!("\n== {label}");
    let mut graph = Hnsw::new(options.dimensions, options.params);
    let params = graph.params();
    let started = Instant::now();
    if options.one_by_one {
        for (key, vector) in vectors.iter().enumerate() {
            graph.insert(key as u64, vector)?;
        }
    } else {
        graph.insert_many_with_threads(
            vectors
                .iter()
                .enumerate()
                .map(|(key, vector)| (key as u64, vector.as_slice())),
            options.threads,
        )?;
    }
    let build = started.elapsed();
    println!(
        "build: {:.2} s for {} vectors ({:.0} µs each; {}; m {}, ef_construction {})",
        build.as_secs_f64(),
        vectors.len(),
        build.as_secs_f64() * 1e6 / vectors.len().max(1) as f64,
        if options.one_by_one {
            "one insert each".to_string()
        } else {
            format!("insert_many on {} threads", options.threads)
        },
        params.m,
        params.ef_construction
    );

    let mut exact_times = Vec::with_capacity(queries.len());
    let mut truth: Vec<Vec<Hit>> = Vec::with_capacity(queries.len());
    for query in queries {
        let started = Instant::now();
        truth.push(graph.exact_search(query, options.k, |_| true)?);
        exact_times.push(started.elapsed());
    }
    let (p50, p99) = percentiles(&mut exact_times);
    println!("exact:  p50 {p50:>9.1} µs  p99 {p99:>9.1} µs  recall 1.000");

    for &ef in &options.efs {
        let mut times = Vec::with_capacity(queries.len());
        let mut recall = 0.0;
        for (query, exact) in queries.iter().zip(&truth) {
            let started = Instant::now();
            let hits = graph.search_with_ef(query, options.k, ef, |_| true)?;
            times.push(started.elapsed());
            recall += recall_at_k(&hits, exact);
        }
        let (p50, p99) = percentiles(&mut times);
        println!(
            "ef {ef:>4}: p50 {p50:>9.1} µs  p99 {p99:>9.1} µs  recall {:.3}",
            recall / queries.len().max(1) as f64
        );
    }
    Ok(())
}

/// The median and 99th percentile, in microseconds.
fn percentiles(times: &mut [Duration]) -> (f64, f64) {
    if times.is_empty() {
        return (0.0, 0.0);
    }
    times.sort_unstable();
    let at = |fraction: f64| {
        let index = ((times.len() as f64 * fraction).ceil() as usize).clamp(1, times.len()) - 1;
        times[index].as_secs_f64() * 1e6
    };
    (at(0.5), at(0.99))
}
