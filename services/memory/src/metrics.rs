//! Every metric the memory service records.

/// Requests handled, by `method` (gRPC method name) and `outcome` (`ok` or an error code).
pub const OPERATIONS: &str = "colony_memory_operations_total";
/// Time spent on one request, by `method`.
pub const OPERATION_SECONDS: &str = "colony_memory_operation_duration_seconds";
/// Messages stored by `AppendMessages`.
pub const MESSAGES_APPENDED: &str = "colony_memory_messages_appended_total";

/// Texts turned into vectors by `Embed`.
pub const TEXTS_EMBEDDED: &str = "colony_memory_texts_embedded_total";

/// Memories written, by `result`: `stored` (new) or `merged` (into a near-duplicate).
pub const MEMORIES_WRITTEN: &str = "colony_memory_memories_written_total";
/// Live memories in this replica's index.
pub const INDEX_MEMORIES: &str = "colony_memory_index_memories";
/// Index changes applied from other replicas, by `via`: `event` or `catch_up`.
pub const SYNC_APPLIED: &str = "colony_memory_sync_applied_total";
/// Failures keeping the index in sync, by `stage`.
pub const SYNC_ERRORS: &str = "colony_memory_sync_errors_total";
/// Memories expired by the sweeper.
pub const MEMORIES_EXPIRED: &str = "colony_memory_memories_expired_total";
/// Sessions deleted by the sweeper after their history TTL.
pub const SESSIONS_EXPIRED: &str = "colony_memory_sessions_expired_total";
/// Sweeps that failed.
pub const SWEEP_ERRORS: &str = "colony_memory_sweep_errors_total";
/// Sessions compressed into a summary.
pub const SUMMARIES_CREATED: &str = "colony_memory_summaries_created_total";
/// Strategy events, by `event`: created, merged, suggested, win, loss, pruned.
pub const STRATEGY_EVENTS: &str = "colony_memory_strategy_events_total";
/// Replay-log events recorded, by `kind` (task, step) and `outcome` (ok, invalid).
pub const REPLAY_EVENTS: &str = "colony_memory_replay_events_total";

/// Registers descriptions so `/metrics` explains every series.
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        OPERATIONS,
        "gRPC requests handled, by method and outcome (ok, invalid_argument, unavailable, internal)."
    );
    describe_histogram!(
        OPERATION_SECONDS,
        Unit::Seconds,
        "Time spent on one gRPC request, by method."
    );
    describe_counter!(MESSAGES_APPENDED, "Messages stored by AppendMessages.");
    describe_counter!(TEXTS_EMBEDDED, "Texts turned into vectors by Embed.");
    use ::metrics::describe_gauge;
    describe_counter!(
        MEMORIES_WRITTEN,
        "Memories written, by result: stored (new) or merged (into a near-duplicate)."
    );
    describe_gauge!(INDEX_MEMORIES, "Live memories in this replica's index.");
    describe_counter!(
        SYNC_APPLIED,
        "Index changes applied from other replicas, by via (event, catch_up)."
    );
    describe_counter!(SYNC_ERRORS, "Failures keeping the index in sync, by stage.");
    describe_counter!(
        MEMORIES_EXPIRED,
        "Memories expired by the retention sweeper."
    );
    describe_counter!(
        SESSIONS_EXPIRED,
        "Sessions deleted after their history TTL."
    );
    describe_counter!(SWEEP_ERRORS, "Retention sweeps that failed.");
    describe_counter!(
        SUMMARIES_CREATED,
        "Session summaries made through the router."
    );
    describe_counter!(
        STRATEGY_EVENTS,
        "Strategy events, by event (created, merged, suggested, win, loss, pruned)."
    );
    describe_counter!(
        REPLAY_EVENTS,
        "Replay-log events recorded, by kind (task, step) and outcome (ok, invalid)."
    );
    colony_inference::metrics::describe();
    colony_bus::metrics::describe();
}
