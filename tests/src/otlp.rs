//! An in-process OTLP/gRPC trace receiver: what the services export, kept for a test to read
//! (or counted and dropped, for a bench).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One received span, ids in lowercase hex (an empty `parent_span_id` for a root).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
}

#[derive(Default)]
struct Collector {
    keep: bool,
    spans: Mutex<Vec<ReceivedSpan>>,
    received: std::sync::atomic::AtomicU64,
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|value| value.value.as_ref()) {
        Some(AnyValue::StringValue(text)) => text.clone(),
        Some(AnyValue::IntValue(number)) => number.to_string(),
        Some(AnyValue::DoubleValue(number)) => number.to_string(),
        Some(AnyValue::BoolValue(flag)) => flag.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(pairs: &[KeyValue]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|pair| (pair.key.clone(), text(pair.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .map(|resource| attributes(&resource.attributes))
                .and_then(|mut attributes| attributes.remove("service.name"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        self.received
            .fetch_add(received.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if self.keep
            && let Ok(mut spans) = self.spans.lock()
        {
            spans.extend(received);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; dropping it stops the server.
pub struct OtlpReceiver {
    /// `http://127.0.0.1:<port>`, for `*__TELEMETRY__OTLP_ENDPOINT`.
    pub endpoint: String,
    collector: Arc<Collector>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl OtlpReceiver {
    /// A receiver that keeps every span (`keep`), or only counts them (a bench's sink).
    pub async fn start(keep: bool) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let collector = Arc::new(Collector {
            keep,
            ..Collector::default()
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::from_arc(collector.clone()))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        tasks.close();
        Ok(Self {
            endpoint,
            collector,
            stop,
            tasks,
        })
    }

    /// The spans received so far (none when started without `keep`).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector
            .spans
            .lock()
            .map(|spans| spans.clone())
            .unwrap_or_default()
    }

    /// How many spans were received so far.
    pub fn received(&self) -> u64 {
        self.collector
            .received
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
