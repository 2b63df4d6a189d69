//! Every metric the memory service records.

/// Requests handled, by `method` (gRPC method name) and `outcome` (`ok` or an error code).
pub const OPERATIONS: &str = "colony_memory_operations_total";
/// Time spent on one request, by `method`.
pub const OPERATION_SECONDS: &str = "colony_memory_operation_duration_seconds";
/// Messages stored by `AppendMessages`.
pub const MESSAGES_APPENDED: &str = "colony_memory_messages_appended_total";

/// Texts turned into vectors by `Embed`.
pub const TEXTS_EMBEDDED: &str = "colony_memory_texts_embedded_total";

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
    colony_inference::metrics::describe();
    colony_bus::metrics::describe();
}
