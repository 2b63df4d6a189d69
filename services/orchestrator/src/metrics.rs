//! Orchestrator metrics. Labels are low-cardinality: never ids.

pub const RUNS: &str = "colony_orchestrator_runs_total";
pub const TASKS: &str = "colony_orchestrator_tasks_total";
pub const CLAIMS: &str = "colony_orchestrator_claims_total";
pub const REPORTS: &str = "colony_orchestrator_reports_total";
/// Histogram.
pub const CLAIM_SECONDS: &str = "colony_orchestrator_claim_duration_seconds";
/// Histogram.
pub const REPORT_BATCH: &str = "colony_orchestrator_report_batch_size";
pub const LEASES_EXPIRED: &str = "colony_orchestrator_leases_expired_total";
pub const REDISPATCHED: &str = "colony_orchestrator_redispatched_total";
pub const DISPATCHES_UNPUBLISHED: &str = "colony_orchestrator_dispatches_unpublished_total";
pub const DISPATCH_LATENCY: &str = "colony_orchestrator_dispatch_latency_seconds";
pub const HTTP_REQUESTS: &str = "colony_orchestrator_http_requests_total";
pub const REJECTED_REQUESTS: &str = "colony_orchestrator_rejected_requests_total";
pub const SHED: &str = "colony_orchestrator_shed_total";
/// Gauge by tenant and role: queued and pending tasks.
pub const QUEUE_DEPTH: &str = "colony_orchestrator_queue_depth";
/// Gauge by tenant and role: how long the longest-waiting queued task has been ready.
pub const QUEUE_OLDEST_AGE: &str = "colony_orchestrator_queue_oldest_age_seconds";
/// Gauge by tenant and state: unfinished tasks.
pub const ACTIVE_TASKS: &str = "colony_orchestrator_active_tasks";
/// Gauge by tenant: running runs.
pub const ACTIVE_RUNS: &str = "colony_orchestrator_active_runs";
pub const RETRIES: &str = "colony_orchestrator_retries_total";
pub const DEAD_LETTERS: &str = "colony_orchestrator_dead_letters_total";
pub const CANCELLATIONS: &str = "colony_orchestrator_cancellations_total";
pub const MAINTENANCE: &str = "colony_orchestrator_maintenance";
pub const SCHEDULE_FIRINGS: &str = "colony_orchestrator_schedule_firings_total";
pub const SCHEDULE_LEADER: &str = "colony_orchestrator_schedule_leader";
pub const PLANS: &str = "colony_orchestrator_plans_total";
pub const TOPOLOGIES: &str = "colony_orchestrator_topologies_total";
pub const APPROVALS: &str = "colony_orchestrator_approvals_total";
pub const SPAWNS: &str = "colony_orchestrator_spawns_total";
pub const CHECKPOINTS: &str = "colony_orchestrator_checkpoints_total";
/// ReleaseTask calls by `result` (`released`, `refused`).
pub const RELEASES: &str = "colony_orchestrator_releases_total";
/// Answers judged per model tier (all replicas, as this one last read them).
pub const MODEL_VERDICTS: &str = "colony_orchestrator_model_verdicts";

pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        RUNS,
        "Runs by status reached: created, succeeded, failed, cancelled, running (re-opened by a \
         re-queue)."
    );
    describe_counter!(
        TASKS,
        "Task transitions by state reached: queued, running, succeeded, failed (an attempt), \
         requeued, dead_lettered, cancelling, cancelled."
    );
    describe_counter!(CLAIMS, "Claims by result: granted or refused.");
    describe_counter!(
        SHED,
        "Queued runs cancelled to make room for a higher-priority run (limits.overflow = \
         shed_lowest)."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Queued and pending tasks by tenant and role (a tenant's depth is bounded by \
         limits.max_queued_per_tenant). Every replica reports the whole database."
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "How long the longest-waiting queued task of a tenant and role has been ready."
    );
    describe_gauge!(
        ACTIVE_TASKS,
        "Unfinished tasks by tenant and state (queued, pending, running, cancelling, \
         awaiting_approval, parked)."
    );
    describe_gauge!(ACTIVE_RUNS, "Running runs by tenant.");
    describe_counter!(
        APPROVALS,
        "Approval decisions on tasks awaiting approval, by decision: approved or rejected."
    );
    describe_counter!(
        SPAWNS,
        "SpawnTasks calls by result: spawned, parked (spawned and waits), refused."
    );
    describe_counter!(
        CHECKPOINTS,
        "SaveCheckpoint calls by result: saved, refused (the attempt is no longer the caller's)."
    );
    describe_counter!(
        RELEASES,
        "ReleaseTask calls by result: released (the lease ends now), refused (not the caller's attempt)."
    );
    describe_gauge!(
        MODEL_VERDICTS,
        "Answers judged per model tier, by every replica (as this one last read the totals)."
    );
    describe_counter!(
        REPORTS,
        "Worker reports by result: accepted, or rejected (stale attempt, not the lease holder, finished)."
    );
    describe_histogram!(
        CLAIM_SECONDS,
        Unit::Seconds,
        "Time to decide one ClaimTask or ClaimTasks call (one transaction)."
    );
    describe_histogram!(
        REPORT_BATCH,
        Unit::Count,
        "Reports applied in one transaction."
    );
    describe_counter!(
        LEASES_EXPIRED,
        "Leases the reaper found expired, by action: requeued, dead_lettered or cancelled."
    );
    describe_counter!(
        REDISPATCHED,
        "Attempts dispatched again because nobody claimed them within leases.redispatch_after."
    );
    describe_counter!(
        DISPATCHES_UNPUBLISHED,
        "Dispatches of a dispatcher pass that JetStream did not acknowledge (sent again after \
         leases.redispatch_after)."
    );
    describe_histogram!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "Time from a task attempt becoming claimable to a worker claiming it."
    );
    describe_counter!(HTTP_REQUESTS, "REST API requests by route and status code.");
    describe_counter!(
        REJECTED_REQUESTS,
        "REST API requests refused for bad input, by reason (invalid_json, too_large, invalid_request, \
         rate_limited, queue_full)."
    );
    metrics::describe_counter!(
        SCHEDULE_FIRINGS,
        "Cron schedule firings by outcome: fired (on time), manual (run-now), caught_up (one run for \
         missed firings), missed (late firings dropped or folded into a catch-up), duplicate \
         (already made by another replica), refused (the tenant's queue was full), invalid, \
         failed."
    );
    metrics::describe_gauge!(
        SCHEDULE_LEADER,
        "1 on the replica that leads cron firing (holds the advisory lock), 0 elsewhere."
    );
    describe_counter!(
        RETRIES,
        "Attempts queued again after a failure (an expired lease counts as transient), by error class."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Tasks dead-lettered (out of attempts or a class never retried), by error class."
    );
    describe_counter!(
        CANCELLATIONS,
        "Runs cancelled through the API (repeated requests for one run count once)."
    );
    describe_counter!(
        PLANS,
        "Planner answers by outcome: source planner, repaired or template (code ok), or repair \
         (code: the validation error)."
    );
    describe_counter!(
        TOPOLOGIES,
        "Runs created through the API by topology (monolith, hybrid, swarm) and whether the \
         request overrode the dial."
    );
    describe_gauge!(
        MAINTENANCE,
        "1 while maintenance mode pauses dispatch and claims, else 0 (shared by every replica)."
    );
    colony_bus::metrics::describe();
}

/// Sets the work gauges from one reading of the database (a drained queue reads 0 rather
/// than its last depth).
#[derive(Debug, Default)]
pub struct WorkGauges {
    gauges: colony_telemetry::GaugeSet,
}

impl WorkGauges {
    pub fn record(&mut self, work: &crate::store::ActiveWork) {
        use colony_telemetry::GaugeKey;
        use std::collections::HashMap;
        let mut values: HashMap<GaugeKey, f64> = HashMap::new();
        for group in &work.tasks {
            let by_role = vec![
                ("tenant", group.tenant.clone()),
                ("role", group.role.clone()),
            ];
            if matches!(group.state.as_str(), "queued" | "pending") {
                *values.entry((QUEUE_DEPTH, by_role.clone())).or_default() += group.count as f64;
            }
            if group.state == "queued" {
                let oldest = values.entry((QUEUE_OLDEST_AGE, by_role)).or_default();
                *oldest = oldest.max(group.oldest_seconds);
            }
            let by_state = vec![
                ("tenant", group.tenant.clone()),
                ("state", group.state.clone()),
            ];
            *values.entry((ACTIVE_TASKS, by_state)).or_default() += group.count as f64;
        }
        for (tenant, count) in &work.runs {
            values.insert(
                (ACTIVE_RUNS, vec![("tenant", tenant.clone())]),
                *count as f64,
            );
        }
        self.gauges.record(values);
    }
}
