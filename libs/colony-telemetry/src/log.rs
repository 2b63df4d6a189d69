//! The JSON log line: one object per event with the event's fields, the fields of every span
//! it happened in (so `tenant`, `run_id`, `task_id` set on a task's span appear on each line
//! logged inside it), and the OpenTelemetry `trace_id` and `span_id` that find the line's trace.

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// A span's fields as JSON, kept in its extensions for [`JsonLog`].
struct SpanFields(Map<String, Value>);

/// Records every span's fields (as they are set, `Span::record` included) for [`JsonLog`].
pub(crate) struct SpanFieldsLayer;

impl<S> tracing_subscriber::Layer<S> for SpanFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        if let Some(SpanFields(fields)) = span.extensions_mut().get_mut::<SpanFields>() {
            values.record(&mut JsonVisitor(fields));
        }
    }
}

/// Fields into a JSON object. `otel.*` fields name and shape the exported span; they are not
/// repeated in logs.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        if !field.name().starts_with("otel.") {
            self.0.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

/// Formats an event as one JSON object: `timestamp`, `level`, `target`, the spans' fields
/// (outer first, inner ones win), `span` (the innermost span's name), the event's own fields
/// (`message` included; they win over the spans'), then `trace_id` and `span_id`.
pub(crate) struct JsonLog;

impl<S, N> FormatEvent<S, N> for JsonLog
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::from(timestamp));
        let metadata = event.metadata();
        line.insert("level".into(), Value::from(metadata.level().as_str()));
        line.insert("target".into(), Value::from(metadata.target()));
        let mut ids = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(SpanFields(fields)) = extensions.get::<SpanFields>() {
                    line.extend(
                        fields
                            .iter()
                            .map(|(key, value)| (key.clone(), value.clone())),
                    );
                }
                if let Some(otel) = extensions.get::<tracing_opentelemetry::OtelData>()
                    && let (Some(trace_id), Some(span_id)) = (otel.trace_id(), otel.span_id())
                {
                    ids = Some((trace_id, span_id));
                }
                line.insert("span".into(), Value::from(span.name()));
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        if let Some((trace_id, span_id)) = ids
            && trace_id != opentelemetry::TraceId::INVALID
        {
            line.insert("trace_id".into(), Value::from(trace_id.to_string()));
            line.insert("span_id".into(), Value::from(span_id.to_string()));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_span_fields_and_the_trace_id() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("log-test")))
            .with(SpanFieldsLayer)
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLog)
                    .with_writer(move || writer.clone()),
            );
        let trace_id = tracing::subscriber::with_default(subscriber, || {
            let task = tracing::info_span!(
                "task",
                otel.name = "task t1",
                tenant = "acme",
                run_id = "r1",
                task_id = tracing::field::Empty
            );
            task.record("task_id", "t1");
            task.in_scope(|| {
                let call = tracing::info_span!("call", deployment = "mid");
                call.in_scope(|| tracing::warn!(attempt = 2, tenant = "event wins", "slow call"));
            });
            tracing::info!("outside any span");
            task.context().span().span_context().trace_id().to_string()
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let inside = &lines[0];
        assert_eq!(inside["level"], "WARN");
        assert_eq!(inside["message"], "slow call");
        assert_eq!(inside["attempt"], 2);
        assert_eq!(inside["run_id"], "r1");
        assert_eq!(inside["task_id"], "t1", "recorded after the span began");
        assert_eq!(inside["deployment"], "mid");
        assert_eq!(inside["tenant"], "event wins");
        assert_eq!(inside["span"], "call");
        assert_eq!(inside["trace_id"], trace_id.as_str());
        assert_eq!(inside["span_id"].as_str().map(str::len), Some(16));
        assert!(inside.get("otel.name").is_none(), "{inside}");
        assert!(
            inside["timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z')),
            "{inside}"
        );
        let outside = &lines[1];
        assert_eq!(outside["message"], "outside any span");
        assert!(outside.get("trace_id").is_none(), "{outside}");
    }
}
