//! Every metric the monitor records.

/// Events handled, by `kind` (`run.created`, `task.failed`, `worker.heartbeat`,
/// `usage.recorded`, …; never an id).
pub const EVENTS: &str = "colony_monitor_events_total";
/// Workers whose last heartbeat is within `worker_stale_after` (up or suspect).
pub const WORKERS: &str = "colony_monitor_workers";
/// Registered workers by `state` (`up`, `suspect`, `dead`).
pub const WORKERS_BY_STATE: &str = "colony_monitor_workers_by_state";
/// Model calls whose latency or cost stood out of their deployment's moving baseline, by
/// `signal` (`latency_ms`, `cost_micros_usd`).
pub const ANOMALIES: &str = "colony_monitor_anomalies_total";
/// Alert rules above their threshold at the last evaluation (1) or not (0), by `rule`.
pub const ALERTS_FIRING: &str = "colony_monitor_alerts_firing";
/// Firings held back because the rule resolved within `alerts.cooldown`, by `rule`.
pub const ALERTS_SUPPRESSED: &str = "colony_monitor_alerts_suppressed_total";
/// Rule evaluations that failed (the database, a missing outbox table), by `rule`.
pub const ALERT_EVALUATION_FAILURES: &str = "colony_monitor_alert_evaluation_failures_total";
/// Alert notifications to webhooks by `result` (`delivered`, `failed` after every attempt).
pub const ALERT_NOTIFICATIONS: &str = "colony_monitor_alert_notifications_total";
/// Model tokens reported by usage records, by `direction` (`prompt`, `completion`).
pub const TOKENS: &str = "colony_monitor_tokens_total";
/// Usage events not counted again because they were counted before (redeliveries).
pub const USAGE_DUPLICATES: &str = "colony_monitor_usage_duplicates_total";
/// Tasks queued, in the monitor's own view from task events, at the last sweep.
pub const QUEUED_TASKS: &str = "colony_monitor_queued_tasks";
/// Tasks running, in the monitor's own view, at the last sweep.
pub const RUNNING_TASKS: &str = "colony_monitor_running_tasks";
/// Tasks running for longer than `stale_task_after` at the last sweep.
pub const STALE_TASKS: &str = "colony_monitor_stale_tasks";
/// Tasks found stale (running longer than `stale_task_after`), each attempt counted once.
pub const STALE_TASKS_DETECTED: &str = "colony_monitor_stale_tasks_detected_total";
/// How long the oldest queued task had waited at the last sweep, in seconds.
pub const QUEUE_OLDEST_AGE: &str = "colony_monitor_queue_oldest_age_seconds";

/// Routers' circuit breakers open or half-open, one per (router replica, deployment), from
/// their change events.
pub const OPEN_BREAKERS: &str = "colony_monitor_open_breakers";
/// The largest event lag (event time to JetStream storing it) within the minute before the last
/// sweep, in seconds.
pub const EVENT_LAG: &str = "colony_monitor_event_lag_seconds";

/// Registers descriptions so `/metrics` explains every series.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge};
    describe_counter!(
        EVENTS,
        "Events handled from the EVENTS stream, by kind (run.created, task.failed, worker.heartbeat, usage.recorded, ...)."
    );
    describe_gauge!(
        WORKERS,
        "Workers whose last heartbeat is within worker_stale_after, as of the last sweep."
    );
    describe_gauge!(
        WORKERS_BY_STATE,
        "Registered workers by state as of the last sweep: up (heard within worker_suspect_after), suspect, dead (silent past worker_stale_after)."
    );
    describe_counter!(
        ANOMALIES,
        "Model calls whose latency or cost stood more than anomaly.z_threshold deviations from their deployment's moving mean, by signal."
    );
    describe_gauge!(
        ALERTS_FIRING,
        "Alert rules above their threshold at the last evaluation (1) or not (0), by rule."
    );
    describe_counter!(
        ALERTS_SUPPRESSED,
        "Firings held back because the rule resolved within alerts.cooldown, by rule."
    );
    describe_counter!(
        ALERT_EVALUATION_FAILURES,
        "Alert rule evaluations that failed (the database, a missing outbox table), by rule: the rule keeps its last state."
    );
    describe_counter!(
        ALERT_NOTIFICATIONS,
        "Alert notifications to webhooks by result: delivered, failed (after every attempt)."
    );
    describe_counter!(
        TOKENS,
        "Model tokens reported by usage records, by direction (prompt, completion)."
    );
    describe_counter!(
        USAGE_DUPLICATES,
        "Usage events not counted again because they were counted within usage_dedup_window (redeliveries)."
    );
    describe_gauge!(
        QUEUED_TASKS,
        "Tasks queued in the monitor's own view (from task events), as of the last sweep."
    );
    describe_gauge!(
        RUNNING_TASKS,
        "Tasks running in the monitor's own view (from task events), as of the last sweep."
    );
    describe_gauge!(
        STALE_TASKS,
        "Tasks running for longer than stale_task_after, as of the last sweep. The monitor only reports them."
    );
    describe_counter!(
        STALE_TASKS_DETECTED,
        "Tasks found running for longer than stale_task_after, each attempt once (and logged once, at warn, with its ids)."
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        "Seconds the oldest queued task had waited at the last sweep (0 with none queued)."
    );
    describe_gauge!(
        OPEN_BREAKERS,
        "Routers' circuit breakers open or half-open, one per router replica and deployment, as \
         their colony.v1.event.breaker changes tell (breakers not heard of for \
         breaker_forget_after are forgotten)."
    );
    describe_gauge!(
        EVENT_LAG,
        ::metrics::Unit::Seconds,
        "The largest lag of the events consumed within the minute before the last sweep: from \
         the event's own time (occurred_at, sent_at) to JetStream storing it, i.e. outbox and \
         publish delay. 0 without events; needs synchronised clocks."
    );
    colony_bus::metrics::describe();
}
