//! One trace follows a run through the services: every service exports its spans over OTLP to
//! an in-process receiver, and the W3C context crosses NATS headers and gRPC metadata. The
//! services' JSON logs carry the same trace id next to the run's ids.

use std::collections::HashMap;
use std::time::Duration;

use colony_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use colony_e2e::stub::StubProvider;
use colony_e2e::{Otlp, Stack, StackOptions, openai_router};
use serde_json::Value;

/// The trace and span of the client that creates the run (its `traceparent`).
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

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

    /// Spans whose parent is not in the trace, but for the root (the client's span is its
    /// parent).
    fn orphans(&self) -> Vec<&ReceivedSpan> {
        self.spans
            .values()
            .filter(|span| {
                span.parent_span_id != CLIENT_SPAN
                    && !span.parent_span_id.is_empty()
                    && self.parent(span).is_none()
            })
            .collect()
    }

    /// What the run's trace does not show yet, of the links every run makes.
    fn missing(&self) -> Vec<&'static str> {
        let has = |service: &str, caller: &str, name: &str| {
            self.entries(service, caller)
                .iter()
                .any(|span| span.name == name)
        };
        let provider_calls: Vec<&ReceivedSpan> = self
            .spans
            .values()
            .filter(|span| span.name == "chat stub-model")
            .collect();
        let checks = [
            (self.orphans().is_empty(), "every span's parent"),
            // The dispatch crossed NATS: the worker's consumer span is the orchestrator's child.
            (
                has("colony-agent-worker", "colony-orchestrator", "consume"),
                "the dispatch consumed under the orchestrator",
            ),
            // The worker's gRPC calls carry the context in their metadata: the model call to
            // the router, the conversation to memory. (Claims are batched across tasks, so
            // they belong to no single trace.)
            (
                has("colony-router", "colony-agent-worker", "grpc"),
                "a router rpc under the worker",
            ),
            (
                has(
                    "colony-memory",
                    "colony-agent-worker",
                    "colony.v1.Memory/AppendMessages",
                ),
                "a memory rpc under the worker",
            ),
            // The provider call is a client span inside the router's rpc.
            (
                !provider_calls.is_empty()
                    && provider_calls.iter().all(|call| {
                        call.service == "colony-router"
                            && call.attributes.get("deployment").map(String::as_str) == Some("stub")
                            && self.called_from(call, "colony-agent-worker")
                    }),
                "the provider call inside the router's rpc",
            ),
            // The worker's report crossed NATS back to the orchestrator.
            (
                has("colony-orchestrator", "colony-agent-worker", "consume"),
                "the report consumed under the worker",
            ),
        ];
        checks
            .into_iter()
            .filter(|(met, _)| !met)
            .map(|(_, what)| what)
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
        // Spans sent every 100 ms rather than every 5 s, so the test need not wait.
        otlp: Some(Otlp {
            endpoint: receiver.endpoint.clone(),
            batch_delay_ms: Some(100),
        }),
        ..StackOptions::default()
    })
    .await;

    // The client's own trace: the run joins it, as a child of the client's span.
    let response = stack
        .http
        .post(format!("{}/v1/runs", stack.orchestrator_url))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&serde_json::json!({ "goal": "name three colours" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let run_id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let run = stack.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // The request that created the run is the root of the run's part of the client's trace.
    let started = std::time::Instant::now();
    let trace = loop {
        let spans = receiver.spans();
        let root = spans.iter().find(|span| {
            span.service == "colony-orchestrator"
                && span.attributes.get("run_id") == Some(&run_id)
                && span.trace_id == CLIENT_TRACE
                && span.parent_span_id == CLIENT_SPAN
                && span.name == "POST /v1/runs"
        });
        if let Some(root) = root {
            let trace = Trace {
                spans: spans
                    .iter()
                    .filter(|span| span.trace_id == root.trace_id)
                    .map(|span| (span.span_id.clone(), span.clone()))
                    .collect(),
            };
            let missing = trace.missing();
            if missing.is_empty() {
                break trace;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the run's trace lacks {missing:?}:\n{}",
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
    // The orchestrator's line about the report it applied: the same run, the same trace.
    let orchestrator_log = stack.service_log("orchestrator");
    let accepted = orchestrator_log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["message"] == "report accepted" && line["run_id"] == run_id.as_str())
        .unwrap_or_else(|| panic!("no 'report accepted' line for the run:\n{orchestrator_log}"));
    assert_eq!(accepted["trace_id"], trace_id.as_str(), "{accepted}");
    assert_eq!(accepted["tenant"], "default", "{accepted}");
    assert_eq!(accepted["task_id"], reported["task_id"], "{accepted}");
    drop(stack);
    receiver.stop().await;
}
