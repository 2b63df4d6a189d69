//! Every metric the monitor records.

/// Events handled, by `kind` (`run.created`, `task.failed`, `worker.heartbeat`,
/// `usage.recorded`, …; never an id).
pub const EVENTS: &str = "colony_monitor_events_total";
/// Workers whose last heartbeat is within `worker_stale_after`.
pub const WORKERS: &str = "colony_monitor_workers";
/// Model tokens reported by usage records, by `direction` (`prompt`, `completion`).
pub const TOKENS: &str = "colony_monitor_tokens_total";

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
    describe_counter!(
        TOKENS,
        "Model tokens reported by usage records, by direction (prompt, completion)."
    );
    colony_bus::metrics::describe();
}
