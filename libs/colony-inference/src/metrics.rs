//! The footprint of loaded models, as Prometheus gauges.

/// Bytes of a loaded model's weights, by kind (`chat`, `embedding`) and model name.
pub const MODEL_BYTES: &str = "colony_inference_model_bytes";
/// Resident memory of the whole process, read after each model load.
pub const RESIDENT_BYTES: &str = "colony_inference_process_resident_bytes";
/// Requests waiting for a model, by kind.
pub const QUEUE_DEPTH: &str = "colony_inference_queue_depth";
/// Requests refused because a model's queue was full, by kind.
pub const QUEUE_REFUSED: &str = "colony_inference_queue_refused_total";
/// Tokens processed, by kind and phase (`prompt`, `generated`).
pub const TOKENS: &str = "colony_inference_tokens_total";

/// Describes the metrics once, so `/metrics` carries their help text.
pub fn describe() {
    metrics::describe_gauge!(
        MODEL_BYTES,
        metrics::Unit::Bytes,
        "Bytes of a loaded model's weights"
    );
    metrics::describe_gauge!(
        RESIDENT_BYTES,
        metrics::Unit::Bytes,
        "Resident memory of the process, read after each model load"
    );
    metrics::describe_gauge!(QUEUE_DEPTH, "Requests waiting for a local model");
    metrics::describe_counter!(
        QUEUE_REFUSED,
        "Requests refused because a local model's queue was full"
    );
    metrics::describe_counter!(TOKENS, "Tokens processed by a local model");
}

/// Records a loaded model's size and the process's resident memory after loading it.
pub fn record_model_loaded(kind: &'static str, model: &str, bytes: u64) {
    metrics::gauge!(MODEL_BYTES, "kind" => kind, "model" => model.to_owned()).set(bytes as f64);
    if let Some(rss) = resident_bytes() {
        metrics::gauge!(RESIDENT_BYTES).set(rss as f64);
    }
}

/// The process's resident set size from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Sets the number of requests waiting for the `kind` model.
pub(crate) fn gauge_queue_depth(kind: &'static str, depth: usize) {
    metrics::gauge!(QUEUE_DEPTH, "kind" => kind).set(depth as f64);
}
