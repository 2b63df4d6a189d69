//! What the benches share: merging figures into `target/bench/results.json`, and reading a
//! process's CPU time and resident memory from `/proc` (Linux only; elsewhere nothing is found).

use std::collections::BTreeMap;
use std::path::PathBuf;

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
