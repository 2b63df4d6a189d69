//! Consumes worker reports from the REPORTS stream and applies them through the fenced store.

use std::time::Duration;

use colony_bus::{Delivery, Outcome};
use colony_proto::{ErrorClass, v1};
use uuid::Uuid;

use crate::metrics;
use crate::store::{Report, ReportDecision, ReportOutcome, Store};

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
    })
}

pub async fn handle(store: Store, delivery: Delivery<v1::TaskReport>) -> Outcome {
    let report = match parse(delivery.message) {
        Ok(report) => report,
        Err(reason) => {
            tracing::warn!(%reason, subject = %delivery.subject, "invalid report terminated");
            return Outcome::Terminate(format!("invalid report: {reason}"));
        }
    };
    match store.apply_report(&report).await {
        Ok(ReportDecision::Accepted) => {
            let state = match report.outcome {
                ReportOutcome::Succeeded { .. } => "succeeded",
                ReportOutcome::Failed { .. } => "failed",
            };
            // Task and run transitions (retry, dead letter, run outcome) are counted by the
            // store once they commit.
            ::metrics::counter!(metrics::REPORTS, "result" => "accepted").increment(1);
            tracing::info!(task_id = %report.task_id, attempt = report.attempt, state, "report accepted");
            Outcome::Ack
        }
        Ok(ReportDecision::Rejected(reason)) => {
            ::metrics::counter!(metrics::REPORTS, "result" => "rejected").increment(1);
            tracing::info!(task_id = %report.task_id, attempt = report.attempt, %reason, "report rejected");
            Outcome::Ack
        }
        Err(error) => {
            let delay =
                Duration::from_millis(200 * 2u64.pow(delivery.delivered.clamp(1, 7) as u32));
            tracing::warn!(%error, task_id = %report.task_id, "report not applied; retrying");
            Outcome::Retry(delay)
        }
    }
}
