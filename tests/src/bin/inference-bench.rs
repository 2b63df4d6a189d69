//! Embedded inference benchmark: Colony's local chat model next to llama.cpp on the same GGUF,
//! the local embedding model's throughput, and the memory both models take.
//!
//! Chat: the fixed prompt of `benches/inference/prompt.txt` (the ChatML rendering of a system
//! and a user message; this binary checks that its own template renders exactly that text),
//! greedy, 63 generated tokens, a fresh KV cache per run, one warm-up run, then the median of
//! `--runs`. Prompt and generation are timed apart. The same measurement runs in llama.cpp
//! through `llama-cpp-python` (`scripts/llamacpp-venv.sh` builds it into target/, a bench
//! step only) with the same thread count; without it the comparison is reported missing.
//!
//! Embeddings: short sentences (10-15 words) in batches of 32 through all-MiniLM-L6-v2,
//! sentences per second over the whole set, median of `--runs`.
//!
//! Memory: the process's resident set before and after loading both models.
//!
//! Figures are merged into `target/bench/results.json`: `local_llm_tokens_per_s`,
//! `local_llm_prompt_tokens_per_s`, `llamacpp_tokens_per_s`, `llamacpp_prompt_tokens_per_s`,
//! `local_llm_vs_llamacpp`, `embed_sentences_per_s`, `inference_rss_mb`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use colony_e2e::bench;
use colony_inference::chat::{ChatConfig, ChatMessage, ChatModel, ChatRequest};
use colony_inference::embed::{EmbedConfig, MiniLm};
use colony_inference::{DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, workspace_models_dir};

const USAGE: &str = "\
usage: inference-bench [flags]
  --threads N        threads for both chat engines (default 2)
  --runs N           measured runs per figure, after one warm-up (default 5)
  --max-tokens N     generated tokens per chat run (default 63)
  --sentences N      sentences embedded per run (default 640)
  --skip-llamacpp    do not build or run llama.cpp for the comparison
";

const SYSTEM: &str = "You are a helpful assistant.";
const USER: &str = "Explain in three sentences why the sky is blue and why sunsets are red.";
const EMBED_BATCH: usize = 32;

struct Flags {
    threads: usize,
    runs: usize,
    max_tokens: u32,
    sentences: usize,
    skip_llamacpp: bool,
}

fn flags() -> anyhow::Result<Flags> {
    let mut flags = Flags {
        threads: 2,
        runs: 5,
        max_tokens: 63,
        sentences: 640,
        skip_llamacpp: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))?
                .parse()
                .with_context(|| format!("{name}: not a number\n{USAGE}"))
        };
        match arg.as_str() {
            "--threads" => flags.threads = value("--threads")?.max(1),
            "--runs" => flags.runs = value("--runs")?.max(1),
            "--max-tokens" => flags.max_tokens = u32::try_from(value("--max-tokens")?)?,
            "--sentences" => flags.sentences = value("--sentences")?.max(EMBED_BATCH),
            "--skip-llamacpp" => flags.skip_llamacpp = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(flags)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct ChatFigures {
    prompt_tokens: u32,
    generated_tokens: u32,
    prompt_per_s: f64,
    generation_per_s: f64,
    text: String,
}

fn bench_local_chat(
    model: &mut ChatModel,
    flags: &Flags,
    prompt_file: &str,
) -> anyhow::Result<ChatFigures> {
    let messages = vec![
        ChatMessage::new("system", SYSTEM),
        ChatMessage::new("user", USER),
    ];
    let rendered = model.render_prompt(&messages)?;
    if rendered != prompt_file {
        bail!(
            "the chat template renders {rendered:?}, but benches/inference/prompt.txt holds {prompt_file:?}"
        );
    }
    let request = ChatRequest {
        messages,
        max_tokens: Some(flags.max_tokens),
        ..ChatRequest::default()
    };
    let mut prompt_rates = Vec::new();
    let mut generation_rates = Vec::new();
    let mut last = None;
    for run in 0..=flags.runs {
        let answer = model.complete(&request)?;
        let timings = model.last_timings();
        if run > 0 {
            prompt_rates.push(f64::from(answer.usage.prompt_tokens) / timings.prompt.as_secs_f64());
            generation_rates
                .push(f64::from(answer.usage.completion_tokens) / timings.generation.as_secs_f64());
            eprintln!(
                "inference-bench: colony run {run}: prompt {:.0} tok/s, generation {:.1} tok/s ({} tokens)",
                prompt_rates[run - 1],
                generation_rates[run - 1],
                answer.usage.completion_tokens
            );
        }
        last = Some(answer);
    }
    let last = last.context("no run")?;
    Ok(ChatFigures {
        prompt_tokens: last.usage.prompt_tokens,
        generated_tokens: last.usage.completion_tokens,
        prompt_per_s: median(prompt_rates),
        generation_per_s: median(generation_rates),
        text: last.text,
    })
}

fn bench_llamacpp(flags: &Flags, model: &Path, prompt: &Path) -> anyhow::Result<ChatFigures> {
    let repo = repo();
    let venv = Command::new(repo.join("scripts/llamacpp-venv.sh"))
        .current_dir(&repo)
        .output()
        .context("running scripts/llamacpp-venv.sh")?;
    if !venv.status.success() {
        bail!(
            "scripts/llamacpp-venv.sh failed: {}",
            String::from_utf8_lossy(&venv.stderr)
        );
    }
    let python = repo.join(String::from_utf8_lossy(&venv.stdout).trim());
    let output = Command::new(python)
        .arg(repo.join("scripts/llamacpp_bench.py"))
        .args(["--model", &model.to_string_lossy()])
        .args(["--threads", &flags.threads.to_string()])
        .args(["--max-tokens", &flags.max_tokens.to_string()])
        .args(["--runs", &flags.runs.to_string()])
        .args(["--prompt-file", &prompt.to_string_lossy()])
        .output()
        .context("running scripts/llamacpp_bench.py")?;
    if !output.status.success() {
        bail!(
            "llamacpp_bench.py failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let result: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("llamacpp_bench.py printed no JSON")?;
    let number = |key: &str| {
        result[key]
            .as_f64()
            .with_context(|| format!("llamacpp_bench.py: no {key}"))
    };
    Ok(ChatFigures {
        prompt_tokens: number("prompt_tokens")? as u32,
        generated_tokens: number("generated_tokens")? as u32,
        prompt_per_s: number("prompt_tokens_per_s")?,
        generation_per_s: number("generation_tokens_per_s")?,
        text: result["text"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Short sentences of 10-15 words, all different, from a fixed vocabulary.
fn sentences(count: usize) -> Vec<String> {
    const SUBJECTS: [&str; 8] = [
        "The agent",
        "A small team",
        "Our orchestrator",
        "The night shift",
        "A careful reviewer",
        "The memory service",
        "Every worker",
        "The new router",
    ];
    const VERBS: [&str; 8] = [
        "summarised",
        "reviewed",
        "rejected",
        "scheduled",
        "retried",
        "compressed",
        "validated",
        "archived",
    ];
    const OBJECTS: [&str; 8] = [
        "the quarterly sales report",
        "a flaky integration test",
        "three customer complaints",
        "the deployment plan for Friday",
        "an unusually long conversation",
        "the budget for the research project",
        "a list of open security issues",
        "the notes from yesterday's meeting",
    ];
    const ENDINGS: [&str; 5] = [
        "before lunch.",
        "without asking anyone.",
        "after the second attempt failed.",
        "while the database was being upgraded.",
        "and sent a short summary to the team.",
    ];
    (0..count)
        .map(|i| {
            format!(
                "{} {} {} {}",
                SUBJECTS[i % 8],
                VERBS[(i / 8) % 8],
                OBJECTS[(i / 64) % 8],
                ENDINGS[(i / 3) % 5]
            )
        })
        .collect()
}

fn bench_embeddings(model: &MiniLm, flags: &Flags) -> anyhow::Result<f64> {
    let texts = sentences(flags.sentences);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut rates = Vec::new();
    for run in 0..=flags.runs {
        let started = Instant::now();
        for batch in texts.chunks(EMBED_BATCH) {
            let vectors = model.embed(batch)?;
            anyhow::ensure!(vectors.len() == batch.len(), "one vector per sentence");
        }
        let rate = texts.len() as f64 / started.elapsed().as_secs_f64();
        if run > 0 {
            eprintln!("inference-bench: embeddings run {run}: {rate:.0} sentences/s");
            rates.push(rate);
        }
    }
    Ok(median(rates))
}

fn mib(bytes: Option<u64>) -> f64 {
    bytes.map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}

fn main() -> anyhow::Result<()> {
    let flags = flags()?;
    let models = workspace_models_dir();
    let chat_path = models.join(DEFAULT_CHAT_MODEL);
    let prompt_path = repo().join("benches/inference/prompt.txt");
    let prompt_file = std::fs::read_to_string(&prompt_path)
        .with_context(|| format!("reading {}", prompt_path.display()))?;

    let rss_before = colony_inference::metrics::resident_bytes();
    let mut chat = ChatModel::load(&ChatConfig {
        threads: flags.threads,
        context_tokens: 2048,
        // Plain greedy, as the llama.cpp side decodes: the same tokens, the same work per token.
        repeat_penalty: 1.0,
        ..ChatConfig::new(&chat_path)
    })?;
    let embedder = MiniLm::load(&EmbedConfig::new(models.join(DEFAULT_EMBEDDING_MODEL)))?;
    // Both models in memory and each used once, so their pages are resident.
    let _ = embedder.embed(&["warm up"])?;
    let _ = chat.complete(&ChatRequest {
        messages: vec![ChatMessage::new("user", "Hi")],
        max_tokens: Some(1),
        ..ChatRequest::default()
    })?;
    let rss_loaded = colony_inference::metrics::resident_bytes();
    eprintln!(
        "inference-bench: resident memory {:.0} MiB before loading, {:.0} MiB with both models",
        mib(rss_before),
        mib(rss_loaded)
    );

    let local = bench_local_chat(&mut chat, &flags, &prompt_file)?;
    let embed_rate = bench_embeddings(&embedder, &flags)?;
    let rss_after = colony_inference::metrics::resident_bytes().max(rss_loaded);
    drop(chat);

    let llamacpp = if flags.skip_llamacpp {
        None
    } else {
        match bench_llamacpp(&flags, &chat_path, &prompt_path) {
            Ok(figures) => Some(figures),
            Err(error) => {
                eprintln!("inference-bench: llama.cpp comparison missing: {error:#}");
                None
            }
        }
    };

    let mut figures: BTreeMap<&str, f64> = BTreeMap::new();
    let mut forget = Vec::new();
    figures.insert("local_llm_tokens_per_s", local.generation_per_s);
    figures.insert("local_llm_prompt_tokens_per_s", local.prompt_per_s);
    figures.insert("embed_sentences_per_s", embed_rate);
    figures.insert("inference_rss_mb", mib(rss_after));
    figures.insert("inference_rss_before_models_mb", mib(rss_before));
    println!(
        "Embedded inference ({} threads, median of {} runs)",
        flags.threads, flags.runs
    );
    println!(
        "  colony (llama.cpp in process)  prompt {:>6.0} tok/s  generation {:>6.1} tok/s  ({} prompt, {} generated tokens)",
        local.prompt_per_s, local.generation_per_s, local.prompt_tokens, local.generated_tokens
    );
    if let Some(reference) = &llamacpp {
        println!(
            "  llama-cpp-python               prompt {:>6.0} tok/s  generation {:>6.1} tok/s  ({} prompt, {} generated tokens)",
            reference.prompt_per_s,
            reference.generation_per_s,
            reference.prompt_tokens,
            reference.generated_tokens
        );
        let ratio = local.generation_per_s / reference.generation_per_s;
        println!("  generation, colony / llama.cpp {ratio:.2}x (target >= 0.8x)");
        if reference.text != local.text {
            println!("  note: the two engines' greedy answers differ");
        }
        figures.insert("llamacpp_tokens_per_s", reference.generation_per_s);
        figures.insert("llamacpp_prompt_tokens_per_s", reference.prompt_per_s);
        figures.insert("local_llm_vs_llamacpp", ratio);
    } else {
        println!("  llama-cpp-python               missing (see above)");
        forget.extend([
            "llamacpp_tokens_per_s",
            "llamacpp_prompt_tokens_per_s",
            "local_llm_vs_llamacpp",
        ]);
    }
    println!(
        "  embeddings (MiniLM, batch {EMBED_BATCH})    {embed_rate:.0} sentences/s (target >= 200)"
    );
    println!(
        "  resident memory                {:.0} MiB with both models ({:.0} MiB before loading)",
        mib(rss_after),
        mib(rss_before)
    );
    bench::record("", &figures, &forget)?;
    Ok(())
}
