//! Telemetry for every Colony binary: JSON (or pretty) logs carrying the trace id, OpenTelemetry spans exported over
//! OTLP when configured, a process-wide Prometheus recorder, and W3C trace-context helpers.

mod gauges;
mod log;

pub use gauges::{GaugeKey, GaugeSet};

use std::collections::HashMap;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log filter {filter:?}: {message}")]
    Filter { filter: String, message: String },
    #[error("cannot build the OTLP exporter for {endpoint}: {message}")]
    Otlp { endpoint: String, message: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info,colony_router=debug`: which events are logged.
    pub log_filter: String,
    /// An `EnvFilter` directive: which spans are recorded for traces (and give log lines their
    /// `trace_id`), independent of `log_filter`, so quieter logs keep whole traces.
    pub trace_filter: String,
    /// OTLP/gRPC collector, for example `http://otel-collector:4317`. Spans are exported only
    /// when set.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_filter: "info".into(),
            trace_filter: "info".into(),
            otlp_endpoint: None,
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        for (key, filter) in [
            ("log_filter", &self.log_filter),
            ("trace_filter", &self.trace_filter),
        ] {
            if let Err(e) = EnvFilter::try_new(filter) {
                problems.push(format!(
                    "telemetry.{key}: {filter:?} is not a valid filter: {e}"
                ));
            }
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.push(format!(
                "telemetry.otlp_endpoint: {endpoint:?} must start with http:// or https://"
            ));
        }
    }
}

/// Keeps the tracer provider alive; dropping it flushes spans that are still buffered.
pub struct Guard {
    provider: SdkTracerProvider,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry: span flush failed: {error}");
        }
    }
}

/// Installs logging and tracing for `service`. Safe to call more than once in one process (the
/// second subscriber is ignored), which in-process service tests rely on.
pub fn init(service: &'static str, config: &TelemetryConfig) -> Result<Guard, Error> {
    // The recorder goes in first: descriptions given before it exists would be lost, and the
    // services describe their metrics as they start.
    drop(prometheus());
    let filter = |directive: &String| {
        EnvFilter::try_new(directive).map_err(|e| Error::Filter {
            filter: directive.clone(),
            message: e.to_string(),
        })
    };
    let log_filter = filter(&config.log_filter)?;
    let trace_filter = filter(&config.trace_filter)?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| Error::Otlp {
                endpoint: endpoint.clone(),
                message: e.to_string(),
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(trace_filter);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let registry = tracing_subscriber::registry().with(otel);
    let installed = match config.log_format {
        // The span fields layer sees the spans logs see: unfiltered it would enable every
        // callsite of every dependency.
        LogFormat::Json => registry
            .with(log::SpanFieldsLayer.with_filter(filter(&config.log_filter)?))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(log::JsonLog)
                    .with_filter(log_filter),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_filter(log_filter))
            .try_init(),
    };
    // A second init in one process (tests) keeps the first subscriber; that is fine.
    drop(installed);
    Ok(Guard { provider })
}

/// Histogram buckets in seconds, from one millisecond to two minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Buckets for a service's own overhead (`*_overhead_seconds`), which lives below a
/// millisecond: from 50 µs to 100 ms.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_overhead_seconds".into()),
                        OVERHEAD_BUCKETS,
                    )
                })
                .expect("the bucket lists are non-empty constants")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which case metrics go
            // there; the handle still renders (empty) output.
            drop(metrics::set_global_recorder(recorder));
            handle
        })
        .clone()
}

/// The W3C `traceparent` of the current span, to put into NATS headers or gRPC metadata.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span named by `traceparent`, when it parses.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    drop(span.set_parent(context));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_flows_from_span_to_span() {
        let _guard = init("telemetry-test", &TelemetryConfig::default()).unwrap();
        let outer = tracing::info_span!("outer");
        let traceparent = outer.in_scope(current_traceparent).expect("a sampled span");
        assert!(traceparent.starts_with("00-"), "{traceparent}");
        let inner = tracing::info_span!("inner");
        set_parent(&inner, Some(&traceparent));
        let child = inner.in_scope(current_traceparent).unwrap();
        assert_eq!(child[3..35], traceparent[3..35], "same trace id");
        assert_ne!(child, traceparent, "a new span id");
    }

    #[test]
    fn bad_filter_is_reported() {
        let mut problems = Vec::new();
        TelemetryConfig {
            log_filter: "info,[".into(),
            ..TelemetryConfig::default()
        }
        .validate(&mut problems);
        assert_eq!(problems.len(), 1);
    }
}
