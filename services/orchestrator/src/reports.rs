//! Consumes worker reports from the REPORTS stream and applies them through the fenced store.

use std::time::Duration;

use colony_bus::{Delivery, Outcome};
use colony_proto::{ErrorClass, v1};
use uuid::Uuid;

use colony_runtime::batch::{BatchLoop, BatchQueue, Stopped, batch_queue};
use tokio_util::sync::CancellationToken;

use crate::store::{Report, ReportDecision, ReportOutcome, Store};
use crate::{Error, metrics};

/// Durable consumer shared by orchestrator replicas.
pub const CONSUMER: &str = "orchestrator-reports";

/// Turns a wire report into a domain report, or says why it is unusable.
pub fn parse(report: v1::TaskReport) -> Result<Report, String> {
    let task_id = Uuid::parse_str(&report.task_id)
        .map_err(|_| format!("task_id {:?} is not a UUID", report.task_id))?;
    let attempt = i32::try_from(report.attempt)
        .ok()
        .filter(|a| *a >= 1)
        .ok_or("attempt must be at least 1")?;
    if report.worker_id.is_empty() {
        return Err("worker_id is required".into());
    }
    let outcome = match report.outcome {
        Some(v1::task_report::Outcome::Succeeded(done)) => ReportOutcome::Succeeded {
            output: done.output,
            usage: done.usage.unwrap_or_default(),
        },
        Some(v1::task_report::Outcome::Failed(failed)) => ReportOutcome::Failed {
            error_class: ErrorClass::from_wire(failed.error_class),
            message: failed.message,
            usage: failed.usage.unwrap_or_default(),
        },
        None => return Err("report has no outcome".into()),
    };
    Ok(Report {
        tenant: report.tenant,
        task_id,
        attempt,
        worker_id: report.worker_id,
        outcome,
        verdict: report
            .verdict
            .map(|verdict| crate::store::quality::Verdict {
                tier: verdict.tier,
                accepted: verdict.accepted,
                rejections: verdict.rejections,
            }),
    })
}

/// Reports waiting for the next batch at most (the consumer's in-flight limit bounds them).
const QUEUE: usize = 1024;
/// Reports applied in one transaction at most.
const MAX_BATCH: usize = 128;

type Applied = Result<ReportDecision, Error>;

/// Report loops: reports of one run always go to the same loop (so two loops never contend
/// for a run), and the loops' transactions run side by side.
const SHARDS: usize = 4;

/// Where the consumer's handlers queue reports, by run.
#[derive(Clone)]
pub struct ReportQueue {
    shards: Vec<BatchQueue<Report, Applied>>,
}

impl ReportQueue {
    /// The shard of the run named in a report (the task's when the run is missing).
    fn shard(&self, key: &str) -> &BatchQueue<Report, Applied> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let index = (hasher.finish() % self.shards.len() as u64) as usize;
        &self.shards[index]
    }
}

/// Applies queued reports in batches, one loop per shard; run it on the service's runtime.
pub struct ReportLoops {
    loops: Vec<BatchLoop<Report, Applied>>,
    store: Store,
}

pub fn queue(store: Store) -> (ReportQueue, ReportLoops) {
    let (shards, loops) = (0..SHARDS).map(|_| batch_queue(QUEUE, MAX_BATCH)).unzip();
    (ReportQueue { shards }, ReportLoops { loops, store })
}

impl ReportLoops {
    pub async fn run(self, shutdown: CancellationToken) {
        let store = self.store;
        futures::future::join_all(self.loops.into_iter().map(|batches| {
            let store = store.clone();
            batches.run(shutdown.clone(), move |reports| {
                apply(store.clone(), reports)
            })
        }))
        .await;
    }
}

/// Applies `reports` in one transaction; if that fails (a deadlock with another replica, a
/// report the database refuses), each in its own, so one cannot hold back the rest.
async fn apply(store: Store, reports: Vec<Report>) -> Vec<Applied> {
    ::metrics::histogram!(metrics::REPORT_BATCH).record(reports.len() as f64);
    match store.apply_reports(&reports).await {
        Ok(decisions) => decisions.into_iter().map(Ok).collect(),
        Err(error) if reports.len() == 1 => vec![Err(error)],
        Err(error) => {
            tracing::warn!(%error, count = reports.len(), "report batch failed; applying one by one");
            let mut applied = Vec::with_capacity(reports.len());
            for report in &reports {
                applied.push(store.apply_report(report).await);
            }
            applied
        }
    }
}

pub async fn handle(queue: ReportQueue, delivery: Delivery<v1::TaskReport>) -> Outcome {
    // For the log lines: the consumer's span knows nothing of the report.
    let (tenant, run_id) = (
        delivery.message.tenant.clone(),
        delivery.message.run_id.clone(),
    );
    let key = if delivery.message.run_id.is_empty() {
        delivery.message.task_id.clone()
    } else {
        delivery.message.run_id.clone()
    };
    let report = match parse(delivery.message) {
        Ok(report) => report,
        Err(reason) => {
            tracing::warn!(%reason, subject = %delivery.subject, "invalid report terminated");
            return Outcome::Terminate(format!("invalid report: {reason}"));
        }
    };
    let (task_id, attempt) = (report.task_id, report.attempt);
    let state = match report.outcome {
        ReportOutcome::Succeeded { .. } => "succeeded",
        ReportOutcome::Failed { .. } => "failed",
    };
    let applied = queue
        .shard(&key)
        .call(report)
        .await
        .unwrap_or_else(|Stopped| Err(Error::Conflict("the orchestrator is shutting down".into())));
    match applied {
        Ok(ReportDecision::Accepted) => {
            // Task and run transitions (retry, dead letter, run outcome) are counted by the
            // store once they commit.
            ::metrics::counter!(metrics::REPORTS, "result" => "accepted").increment(1);
            tracing::info!(%tenant, %run_id, %task_id, attempt, state, "report accepted");
            Outcome::Ack
        }
        Ok(ReportDecision::Rejected(reason)) => {
            ::metrics::counter!(metrics::REPORTS, "result" => "rejected").increment(1);
            tracing::info!(%tenant, %run_id, %task_id, attempt, %reason, "report rejected");
            Outcome::Ack
        }
        Err(error) => {
            let delay =
                Duration::from_millis(200 * 2u64.pow(delivery.delivered.clamp(1, 7) as u32));
            tracing::warn!(%error, %tenant, %run_id, %task_id, "report not applied; retrying");
            Outcome::Retry(delay)
        }
    }
}
