//! What the benches share: merging figures into `target/bench/results.json`, driving a stack's
//! runs (maintenance mode, waiting for runs by goal prefix, a PostgreSQL checkpoint before a
//! phase), and reading a process's CPU time and resident memory from `/proc` (Linux only;
//! elsewhere nothing is found).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::Stack;

/// How often [`wait_finished`] counts finished runs. The count scans the runs table (≈ 10 ms
/// of PostgreSQL's time once it holds 15,000 runs), so polling is kept rare: figures are
/// taken from PostgreSQL's own timestamps, not from this clock.
pub const POLL: Duration = Duration::from_secs(1);

/// How long any one phase may take to finish its runs before a bench gives up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(900);

/// Turns the orchestrator's maintenance mode (dispatch paused) on or off.
pub async fn set_paused(stack: &Stack, paused: bool) -> anyhow::Result<()> {
    let response = stack
        .http
        .post(format!("{}/v1/admin/maintenance", stack.orchestrator_url))
        .json(&serde_json::json!({ "paused": paused }))
        .send()
        .await
        .context("setting maintenance mode")?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "setting maintenance mode: HTTP {status}"
    );
    Ok(())
}

/// Runs whose goal starts with `phase` and a space, and have reached `statuses`.
pub async fn count_runs(stack: &Stack, phase: &str, statuses: &[&str]) -> anyhow::Result<usize> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator.runs WHERE goal LIKE $1 AND status = ANY($2)",
    )
    .bind(format!("{phase} %"))
    .bind(statuses)
    .fetch_one(&stack.db.pool)
    .await?;
    Ok(usize::try_from(count)?)
}

/// Waits until the `total` runs of `phase` have finished, printing progress.
pub async fn wait_finished(stack: &Stack, phase: &str, total: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut last_report = Instant::now();
    loop {
        let done = count_runs(stack, phase, &["succeeded", "failed", "cancelled"]).await?;
        if done >= total {
            return Ok(());
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("  {phase}: {done}/{total} runs finished");
            last_report = Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{phase}: only {done}/{total} runs finished within {} s",
            PHASE_TIMEOUT.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Seconds from the end of maintenance mode to the last run of `phase` finishing, both by
/// PostgreSQL's clock (the maintenance row's change time is stamped in the resuming
/// transaction).
pub async fn drained_secs(stack: &Stack, phase: &str) -> anyhow::Result<f64> {
    let span: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM ((SELECT max(finished_at) FROM orchestrator.runs \
                                     WHERE goal LIKE $1) - changed_at))::float8 \
         FROM orchestrator.maintenance WHERE singleton",
    )
    .bind(format!("{phase} %"))
    .fetch_optional(&stack.db.pool)
    .await?
    .flatten();
    let span = span.with_context(|| format!("{phase}: no maintenance row or no finished runs"))?;
    anyhow::ensure!(
        span > 0.0,
        "{phase}: no time between resume and last finish"
    );
    Ok(span)
}

/// Flushes what earlier work left in PostgreSQL's buffers, so that a checkpoint does not land
/// in the middle of the next measurement.
pub async fn checkpoint(stack: &Stack) -> anyhow::Result<()> {
    sqlx::query("CHECKPOINT")
        .execute(&stack.db.pool)
        .await
        .context("CHECKPOINT before a phase (the bench's database user must be a superuser)")?;
    Ok(())
}

/// `target/bench/results.json`: one object, figure name → number, shared by every bench.
pub fn results_path() -> PathBuf {
    colony_testkit::target_dir()
        .join("bench")
        .join("results.json")
}

/// Merges `figures`, each name after `prefix`, into [`results_path`] and removes the figures
/// named in `forget`, keeping every other bench's figures. `forget` is for a figure this run
/// could not measure: a number left from an earlier run would otherwise pass for this one's.
pub fn record(
    prefix: &str,
    figures: &BTreeMap<&str, f64>,
    forget: &[&str],
) -> anyhow::Result<PathBuf> {
    let path = results_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    for name in forget {
        all.remove(*name);
    }
    for (name, value) in figures {
        all.insert(format!("{prefix}{name}"), serde_json::json!(value));
    }
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    Ok(path)
}

/// CPU seconds (user + system) used so far by the processes of each kind in `accounts`
/// (`(start of the name in /proc/<pid>/stat, which keeps 15 bytes; the key it counts
/// under)`), summed per key: the stack's services, PostgreSQL's and NATS's processes, the
/// bench. It counts whatever else runs under those names too, so a bench should run alone.
/// Linux only; elsewhere the map is empty.
pub fn cpu_seconds<'a>(accounts: &[(&str, &'a str)]) -> BTreeMap<&'a str, f64> {
    let mut used = BTreeMap::new();
    for process in processes() {
        if let Some((_, key)) = accounts
            .iter()
            .find(|(name, _)| process.comm.starts_with(name))
        {
            *used.entry(*key).or_insert(0.0) += process.cpu_secs;
        }
    }
    used
}

/// One process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessCpu {
    pub pid: u32,
    pub parent: u32,
    /// The command name, cut by the kernel to 15 bytes.
    pub comm: String,
    /// User plus system time so far, in seconds.
    pub cpu_secs: f64,
}

/// Parses one `/proc/<pid>/stat` line.
pub fn parse_stat(stat: &str) -> Option<ProcessCpu> {
    // /proc reports CPU time in USER_HZ ticks, 100 a second on Linux.
    const TICKS_PER_SECOND: f64 = 100.0;
    // `pid (comm) state ...`: comm may hold spaces and parentheses, so split around the first
    // `(` and the last `)`.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let pid = stat[..open].trim().parse().ok()?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm: state is field 0, the parent's pid field 1, utime 11 and stime 12.
    let parent = fields.get(1)?.parse().ok()?;
    let ticks: f64 = [11, 12]
        .iter()
        .map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum::<Option<f64>>()?;
    Some(ProcessCpu {
        pid,
        parent,
        comm,
        cpu_secs: ticks / TICKS_PER_SECOND,
    })
}

/// Every process on the machine, as far as `/proc` can be read.
pub fn processes() -> Vec<ProcessCpu> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        // Only the numbered entries: `self` and `thread-self` are this process again and one
        // of its threads, which would count it twice.
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter_map(|stat| parse_stat(&stat))
        .collect()
}

/// CPU seconds used so far by `pid` and every process descended from it (a server that forks
/// workers counts with them).
pub fn tree_cpu_secs(all: &[ProcessCpu], pid: u32) -> f64 {
    let mut tree = vec![pid];
    let mut total = 0.0;
    while let Some(next) = tree.pop() {
        for process in all {
            if process.pid == next {
                total += process.cpu_secs;
            } else if process.parent == next {
                tree.push(process.pid);
            }
        }
    }
    total
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Resident memory of `pid` now, in KiB; `None` once it has exited.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name() {
        let stat = "4242 (my (odd) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 \
                    3 0 1000 1000000 500 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(ProcessCpu {
                pid: 4242,
                parent: 17,
                comm: "my (odd) name".into(),
                cpu_secs: 3.25,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_tree_counts_descendants_only() {
        let p = |pid, parent, cpu_secs| ProcessCpu {
            pid,
            parent,
            comm: String::new(),
            cpu_secs,
        };
        let all = [
            p(1, 0, 100.0),
            p(10, 1, 1.0),
            p(11, 10, 2.0),
            p(12, 11, 4.0),
            p(20, 1, 8.0),
        ];
        assert_eq!(tree_cpu_secs(&all, 10), 7.0);
        assert_eq!(tree_cpu_secs(&all, 99), 0.0);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status =
            "Name:\tcolony-router\nVmPeak:\t  900000 kB\nVmRSS:\t   23456 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss_kib(status), Some(23_456));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
    }
}
