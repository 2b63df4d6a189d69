//! One call, streamed or not: plan the deployments to try, call them in order until one
//! answers (falling back on failures that another deployment may not have), account for every
//! provider call.

use std::time::{Duration, Instant};

use colony_runtime::Runtime;
use futures::StreamExt as _;
use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::config::{ProviderKind, Tier};
use crate::error::{Error, ErrorClass, ProviderError};
use crate::ledger::{self, Caller, Entry};
use crate::metrics;
use crate::provider::{
    ChatRequest, ChatResponse, ChatStream, StreamAccumulator, StreamEvent, TokenUsage,
};
use crate::routing::{Candidate, Deployment, Deployments, Needs};

/// A validated request.
#[derive(Debug, Clone)]
pub struct Call {
    pub caller: Caller,
    /// A deployment by name; empty to pick by tier.
    pub deployment: String,
    pub tier: Option<Tier>,
    pub request: ChatRequest,
    /// The data may go only to deployments of privacy class `local`.
    pub local_only: bool,
    /// Hard budgets the caller named for the task and the run, in micro-USD.
    pub task_budget_micros: Option<u64>,
    pub run_budget_micros: Option<u64>,
}

/// A successful call.
#[derive(Debug, Clone)]
pub struct Completion {
    pub response: ChatResponse,
    pub cost_micros: u64,
    pub deployment: String,
    pub provider: ProviderKind,
    pub model: String,
    pub route_reason: String,
}

/// One item of a streamed call: events as the model writes them, then exactly one `End`.
#[derive(Debug)]
pub enum Streamed {
    /// Text or a tool-call part (never `Done`: the end comes as `End`).
    Event(StreamEvent),
    End(Result<Completion, Error>),
}

/// A stream that has produced its first event: the deployment serving it is fixed.
#[derive(Debug)]
pub struct StreamStart {
    pub deployment: String,
    pub model: String,
    pub route_reason: String,
    pub items: mpsc::Receiver<Streamed>,
}

/// Room for events between the provider and a slow client; a full channel holds the provider.
const STREAM_BUFFER: usize = 64;

pub struct Service {
    deployments: Deployments,
    pool: PgPool,
    runtime: Runtime,
}

/// Whether another deployment may succeed where this one failed: yes for the provider's own
/// trouble (transient, degrading, rate-limited), no for problems with the request itself.
fn falls_back(error: &ProviderError) -> bool {
    matches!(
        error.class(),
        ErrorClass::Transient | ErrorClass::ExternalDegrading | ErrorClass::ExternalRateLimit
    )
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("deployments", &self.deployments)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(deployments: Deployments, pool: PgPool, runtime: Runtime) -> Self {
        Self {
            deployments,
            pool,
            runtime,
        }
    }

    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    fn plan(&self, call: &Call) -> Result<Vec<Candidate>, Error> {
        let needs = Needs::of(&call.request, call.local_only);
        self.deployments.plan(&call.deployment, call.tier, &needs)
    }

    /// Tries the plan's deployments in order. Every provider call, successful or not, is
    /// written to the ledger before the answer goes back; if that write fails the call fails,
    /// so no completion goes unaccounted.
    pub async fn complete(&self, call: Call) -> Result<Completion, Error> {
        let plan = self.plan(&call)?;
        let mut failure = None;
        for candidate in plan {
            let deployment = candidate.deployment;
            tracing::Span::current().record("deployment", deployment.name.as_str());
            let started = Instant::now();
            let result = deployment.complete(&call.request).await;
            let latency = started.elapsed();
            let usage = result.as_ref().map(|r| r.usage).unwrap_or_default();
            let cost_micros = account(
                &self.pool,
                &call,
                &deployment,
                &result.as_ref().map(|_| ()),
                usage,
                latency,
            )
            .await?;
            match result {
                Ok(response) => {
                    return Ok(Completion {
                        response,
                        cost_micros,
                        deployment: deployment.name.clone(),
                        provider: deployment.provider_kind,
                        model: deployment.model.clone(),
                        route_reason: reason_after(candidate.reason, failure.as_ref()),
                    });
                }
                Err(source) => {
                    let fall_back = falls_back(&source);
                    tracing::warn!(deployment = %deployment.name, error = %source, fall_back, "provider call failed");
                    failure = Some(Error::Provider {
                        deployment: deployment.name.clone(),
                        source,
                    });
                    if !fall_back {
                        break;
                    }
                }
            }
        }
        Err(failure.unwrap_or_else(|| Error::Unroutable("no deployment to try".into())))
    }

    /// Like [`Service::complete`], streamed. Deployments are tried in order until one produces
    /// its first event within its timeout; from then on the stream is that deployment's, and
    /// a failure ends it (what was sent cannot be taken back). The provider is driven by a
    /// task of its own, so the call is accounted for even when the client goes away (which
    /// stops the provider).
    pub async fn stream(&self, call: Call) -> Result<StreamStart, Error> {
        let plan = self.plan(&call)?;
        let mut failure = None;
        for candidate in plan {
            let deployment = candidate.deployment;
            let started = Instant::now();
            match first_event(&deployment, &call.request).await {
                Ok((first, rest)) => {
                    let (sender, items) = mpsc::channel(STREAM_BUFFER);
                    let route_reason = reason_after(candidate.reason, failure.as_ref());
                    let start = StreamStart {
                        deployment: deployment.name.clone(),
                        model: deployment.model.clone(),
                        route_reason: route_reason.clone(),
                        items,
                    };
                    let pool = self.pool.clone();
                    self.runtime.spawn(async move {
                        let run = StreamRun {
                            pool,
                            call,
                            deployment,
                            route_reason,
                            started,
                        };
                        run.drive(first, rest, sender).await;
                    });
                    return Ok(start);
                }
                Err(source) => {
                    account(
                        &self.pool,
                        &call,
                        &deployment,
                        &Err(&source),
                        TokenUsage::default(),
                        started.elapsed(),
                    )
                    .await?;
                    let fall_back = falls_back(&source);
                    tracing::warn!(deployment = %deployment.name, error = %source, fall_back, "stream failed before its first event");
                    failure = Some(Error::Provider {
                        deployment: deployment.name.clone(),
                        source,
                    });
                    if !fall_back {
                        break;
                    }
                }
            }
        }
        Err(failure.unwrap_or_else(|| Error::Unroutable("no deployment to try".into())))
    }
}

/// Opens `deployment`'s stream and waits for its first event, within the deployment's
/// timeout: until then nothing has reached the client, so a failure may still fall back.
async fn first_event(
    deployment: &Deployment,
    request: &ChatRequest,
) -> Result<(StreamEvent, ChatStream), ProviderError> {
    let open = async {
        let mut stream = deployment.stream(request).await?;
        match stream.next().await {
            Some(Ok(event)) => Ok((event, stream)),
            Some(Err(error)) => Err(error),
            None => Err(ProviderError::Malformed(
                "the stream ended before any event".into(),
            )),
        }
    };
    tokio::time::timeout(deployment.timeout, open)
        .await
        .unwrap_or(Err(ProviderError::Timeout(deployment.timeout)))
}

/// A stream after its first event, driven to its end by its own task.
struct StreamRun {
    pool: PgPool,
    call: Call,
    deployment: std::sync::Arc<Deployment>,
    route_reason: String,
    started: Instant,
}

impl StreamRun {
    async fn drive(self, first: StreamEvent, mut rest: ChatStream, sender: mpsc::Sender<Streamed>) {
        let deployment = &self.deployment;
        let deadline = tokio::time::Instant::from_std(self.started) + deployment.timeout;
        let mut accumulated = StreamAccumulator::default();
        let mut next = Some(Ok(first));
        let mut client_gone = false;
        let outcome: Result<(), ProviderError> = loop {
            let event = match next.take() {
                Some(event) => event,
                None => match tokio::time::timeout_at(deadline, rest.next()).await {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        break Err(ProviderError::Malformed(
                            "the stream ended without its final event".into(),
                        ));
                    }
                    Err(_) => break Err(ProviderError::Timeout(deployment.timeout)),
                },
            };
            match event {
                Ok(event) => {
                    accumulated.push(&event);
                    if matches!(event, StreamEvent::Done { .. }) {
                        break Ok(());
                    }
                    if sender.send(Streamed::Event(event)).await.is_err() {
                        // The client went away: dropping `rest` stops the provider.
                        client_gone = true;
                        break Ok(());
                    }
                }
                Err(error) => break Err(error),
            }
        };
        drop(rest);
        let latency = self.started.elapsed();
        let partial = accumulated.partial();
        let response = match (&outcome, accumulated.finish()) {
            (Ok(()), Some(response)) => response,
            // Cut short (client gone or provider failure): count what was produced.
            _ => partial,
        };
        let usage = if response.usage == TokenUsage::default() {
            TokenUsage::estimate(&self.call.request, &response.content)
        } else {
            response.usage
        };
        let result = outcome.as_ref().map(|_| ());
        let end = match account(&self.pool, &self.call, deployment, &result, usage, latency).await {
            Err(error) => Err(error),
            Ok(cost_micros) => match outcome {
                Ok(()) => Ok(Completion {
                    response: ChatResponse { usage, ..response },
                    cost_micros,
                    deployment: deployment.name.clone(),
                    provider: deployment.provider_kind,
                    model: deployment.model.clone(),
                    route_reason: self.route_reason,
                }),
                Err(source) => Err(Error::Provider {
                    deployment: deployment.name.clone(),
                    source,
                }),
            },
        };
        if let Err(error) = &end {
            tracing::warn!(deployment = %deployment.name, %error, "stream ended with an error");
        }
        if !client_gone {
            // A client that left meanwhile has no use for the end.
            let _ = sender.send(Streamed::End(end)).await;
        }
    }
}

/// The reason a candidate served, noting the failure that moved the call to it.
fn reason_after(reason: String, failure: Option<&Error>) -> String {
    match failure {
        Some(Error::Provider { deployment, source }) => {
            format!("{reason} (after {deployment} failed: {})", source.class())
        }
        _ => reason,
    }
}

/// Metrics and the ledger row of one provider call; answers its cost.
async fn account(
    pool: &PgPool,
    call: &Call,
    deployment: &Deployment,
    result: &Result<(), &ProviderError>,
    usage: TokenUsage,
    latency: Duration,
) -> Result<u64, Error> {
    let cost_micros = deployment.cost_micros(usage);
    let error = result.as_ref().err().map(|e| e.class());
    metrics::call(&deployment.name, latency, usage, cost_micros, error);
    if error.is_none() {
        deployment.observe_latency(latency);
    }
    ledger::record(
        pool,
        &Entry {
            caller: &call.caller,
            deployment,
            error,
            usage,
            cost_micros,
            latency,
        },
    )
    .await?;
    Ok(cost_micros)
}
