//! One trace follows a run through the services: every service exports its spans over OTLP to
//! an in-process receiver, and the W3C context crosses NATS headers and gRPC metadata. The
//! services' JSON logs carry the same trace id next to the run's ids.

use std::collections::HashMap;
use std::time::Duration;

use colony_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use colony_e2e::stub::StubProvider;
use colony_e2e::{Stack, StackOptions};
use serde_json::Value;

fn openai_router(base_url: &str) -> String {
    format!(
        r#"
default_deployment = "stub"

[[deployments]]
name = "stub"
provider = "openai"
model = "stub-model"
base_url = "{base_url}"
tier = "mid"
input_price_per_mtok = 1.0
output_price_per_mtok = 2.0
timeout = "5s"
"#
    )
}

/// The spans of one trace, by span id.
struct Trace {
    spans: HashMap<String, ReceivedSpan>,
}

impl Trace {
    fn parent(&self, span: &ReceivedSpan) -> Option<&ReceivedSpan> {
        self.spans.get(&span.parent_span_id)
    }

    /// Whether `span`'s chain of parents reaches a span of `service` before leaving it own.
    fn called_from(&self, span: &ReceivedSpan, service: &str) -> bool {
        let mut current = span;
        while let Some(parent) = self.parent(current) {
            if parent.service == service {
                return true;
            }
            if parent.service != span.service {
                return false;
            }
            current = parent;
        }
        false
    }

    /// Spans of `service` whose own service's chain is entered from `caller`: the first span
    /// of each hop into `service`.
    fn entries(&self, service: &str, caller: &str) -> Vec<&ReceivedSpan> {
        self.spans
            .values()
            .filter(|span| {
                span.service == service
                    && self
                        .parent(span)
                        .is_some_and(|parent| parent.service == caller)
            })
            .collect()
    }

    /// Span ids whose parent is not in the trace (the root's parent is empty).
    fn orphans(&self) -> Vec<&ReceivedSpan> {
        self.spans
            .values()
            .filter(|span| !span.parent_span_id.is_empty() && self.parent(span).is_none())
            .collect()
    }

    fn describe(&self) -> String {
        let mut lines: Vec<String> = self
            .spans
            .values()
            .map(|span| {
                format!(
                    "{} {} [{}] parent {}",
                    span.service, span.name, span.span_id, span.parent_span_id
                )
            })
            .collect();
        lines.sort();
        lines.join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_run_through_every_service() {
    let receiver = OtlpReceiver::start(true).await.unwrap();
    let provider = StubProvider::start().await.unwrap();
    let stack = Stack::start(StackOptions {
        router_toml: openai_router(&provider.base_url()),
        otlp_endpoint: Some(receiver.endpoint.clone()),
        ..StackOptions::default()
    })
    .await;

    let run_id = stack.submit("name three colours").await;
    let run = stack.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // The request that created the run is the trace's root.
    let started = std::time::Instant::now();
    let trace = loop {
        let spans = receiver.spans();
        let root = spans.iter().find(|span| {
            span.service == "colony-orchestrator"
                && span.attributes.get("run_id") == Some(&run_id)
                && span.parent_span_id.is_empty()
        });
        if let Some(root) = root {
            let trace = Trace {
                spans: spans
                    .iter()
                    .filter(|span| span.trace_id == root.trace_id)
                    .map(|span| (span.span_id.clone(), span.clone()))
                    .collect(),
            };
            let services: std::collections::HashSet<&str> = trace
                .spans
                .values()
                .map(|span| span.service.as_str())
                .collect();
            let complete = trace.orphans().is_empty()
                && [
                    "colony-orchestrator",
                    "colony-agent-worker",
                    "colony-router",
                    "colony-memory",
                ]
                .iter()
                .all(|service| services.contains(service));
            if complete {
                break trace;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the run's trace never linked every service:\n{}",
                trace.describe()
            );
        } else {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no root span for run {run_id} among {} spans",
                spans.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let described = trace.describe();

    // The dispatch crossed NATS: the worker's consumer span is a child of the orchestrator.
    let dispatched = trace.entries("colony-agent-worker", "colony-orchestrator");
    assert!(
        dispatched.iter().any(|span| span.name == "consume"),
        "no dispatch consumed as a child of the orchestrator:\n{described}"
    );
    // The worker's gRPC calls carry the context in their metadata: the model call to the
    // router, the conversation to memory. (Claims are batched across tasks, so they belong to
    // no single trace.)
    let router_entries = trace.entries("colony-router", "colony-agent-worker");
    assert!(
        router_entries.iter().any(|span| span.name == "grpc"),
        "no router rpc under the worker:\n{described}"
    );
    // The provider call is a client span inside the router's rpc.
    let provider_calls: Vec<&ReceivedSpan> = trace
        .spans
        .values()
        .filter(|span| span.name == "chat stub-model")
        .collect();
    assert!(!provider_calls.is_empty(), "no provider call:\n{described}");
    for call in &provider_calls {
        assert_eq!(call.service, "colony-router");
        assert_eq!(
            call.attributes.get("deployment").map(String::as_str),
            Some("stub")
        );
        assert!(
            trace.called_from(call, "colony-agent-worker"),
            "provider call not under the worker's rpc:\n{described}"
        );
    }
    let memory_entries = trace.entries("colony-memory", "colony-agent-worker");
    assert!(
        memory_entries
            .iter()
            .any(|span| span.name == "colony.v1.Memory/AppendMessages"),
        "no memory rpc under the worker:\n{described}"
    );
    // Memory also took the task's events from the bus in the same trace.
    assert!(
        memory_entries.iter().any(|span| span.name == "consume"),
        "no memory consumer span under the worker:\n{described}"
    );
    // The worker's report crossed NATS back to the orchestrator.
    assert!(
        trace
            .entries("colony-orchestrator", "colony-agent-worker")
            .iter()
            .any(|span| span.name == "consume"),
        "no report consumed under the worker:\n{described}"
    );

    // The worker's JSON log lines about the task carry the ids and the same trace id.
    let trace_id = trace.spans.values().next().unwrap().trace_id.clone();
    let worker_log = stack.workers[0].log_text();
    let lines: Vec<Value> = worker_log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    assert!(!lines.is_empty(), "no JSON log lines:\n{worker_log}");
    let reported = lines
        .iter()
        .find(|line| line["message"] == "task reported" && line["run_id"] == run_id.as_str())
        .unwrap_or_else(|| panic!("no 'task reported' line for the run:\n{worker_log}"));
    assert_eq!(reported["trace_id"], trace_id.as_str(), "{reported}");
    assert_eq!(reported["tenant"], "default", "{reported}");
    assert!(
        reported["task_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{reported}"
    );
    assert_eq!(reported["level"], "INFO", "{reported}");
    drop(stack);
    receiver.stop().await;
}
