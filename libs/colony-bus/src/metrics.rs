//! Bus and outbox metrics, shared by every service that uses the bus.

pub const PUBLISHED: &str = "colony_bus_published_total";
pub const CONSUMED: &str = "colony_bus_consumed_total";
pub const REDELIVERED: &str = "colony_bus_redelivered_total";
pub const TERMINATED: &str = "colony_bus_terminated_total";
pub const HANDLE_SECONDS: &str = "colony_bus_handle_duration_seconds";
pub const OUTBOX_RELAYED: &str = "colony_outbox_relayed_total";
pub const OUTBOX_LAG_SECONDS: &str = "colony_outbox_lag_seconds";
pub const OUTBOX_ERRORS: &str = "colony_outbox_relay_errors_total";

/// Registers descriptions so `/metrics` explains every series.
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        PUBLISHED,
        "Messages published to JetStream, by subject kind."
    );
    describe_counter!(
        CONSUMED,
        "Messages handled by a consumer, by consumer and outcome (ack, retry, term)."
    );
    describe_counter!(
        REDELIVERED,
        "Messages received more than once, by consumer."
    );
    describe_counter!(
        TERMINATED,
        "Messages terminated (not redelivered) and copied to the dead-letter stream, by consumer and reason."
    );
    describe_histogram!(
        HANDLE_SECONDS,
        Unit::Seconds,
        "Time a handler spent on one message."
    );
    describe_counter!(
        OUTBOX_RELAYED,
        "Outbox rows published to JetStream, by table."
    );
    describe_gauge!(
        OUTBOX_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest unsent outbox row seen by the last relay pass, by table."
    );
    describe_counter!(OUTBOX_ERRORS, "Failed outbox relay passes, by table.");
}
