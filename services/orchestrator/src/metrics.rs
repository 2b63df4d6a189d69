//! Orchestrator metrics. Labels are low-cardinality: never ids.

pub const RUNS: &str = "colony_orchestrator_runs_total";
pub const TASKS: &str = "colony_orchestrator_tasks_total";
pub const CLAIMS: &str = "colony_orchestrator_claims_total";
pub const REPORTS: &str = "colony_orchestrator_reports_total";
pub const LEASES_EXPIRED: &str = "colony_orchestrator_leases_expired_total";
pub const REDISPATCHED: &str = "colony_orchestrator_redispatched_total";
pub const DISPATCH_LATENCY: &str = "colony_orchestrator_dispatch_latency_seconds";
pub const HTTP_REQUESTS: &str = "colony_orchestrator_http_requests_total";
pub const REJECTED_REQUESTS: &str = "colony_orchestrator_rejected_requests_total";

pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(RUNS, "Runs by status reached: created, succeeded, failed.");
    describe_counter!(
        TASKS,
        "Task transitions by state reached: queued, running, succeeded, failed, requeued."
    );
    describe_counter!(CLAIMS, "Claims by result: granted or refused.");
    describe_counter!(
        REPORTS,
        "Worker reports by result: accepted, or rejected (stale attempt, not the lease holder, finished)."
    );
    describe_counter!(
        LEASES_EXPIRED,
        "Leases the reaper found expired, by action: requeued or failed."
    );
    describe_counter!(
        REDISPATCHED,
        "Attempts dispatched again because nobody claimed them within leases.redispatch_after."
    );
    describe_histogram!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "Time from a task attempt becoming claimable to a worker claiming it."
    );
    describe_counter!(HTTP_REQUESTS, "REST API requests by route and status code.");
    describe_counter!(
        REJECTED_REQUESTS,
        "REST API requests refused for bad input, by reason (invalid_json, too_large, invalid_request)."
    );
    colony_bus::metrics::describe();
}
