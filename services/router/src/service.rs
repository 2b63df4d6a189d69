//! One call, streamed or not: plan the deployments to try, call them in order until one
//! answers (falling back on failures that another deployment may not have), account for every
//! provider call.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::budget::{self, Budgets, Reservation};
use crate::config::{ProviderKind, Tier};
use crate::error::{Error, ErrorClass, ProviderError};
use crate::ledger::{Caller, LedgerEntry, LedgerWriter};
use crate::metrics;
use crate::provider::{
    ChatRequest, ChatResponse, ChatStream, StreamAccumulator, StreamEvent, TokenUsage,
};
use crate::resilience::ResilienceConfig;
use crate::resilience::backoff::{Backoff, should_retry};
use crate::resilience::breaker::Attempt;
use crate::resilience::limits::Permit;
use crate::routing::{Deployment, Deployments, Needs};

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
    /// The tasks driving streams; shutdown waits for them before closing the ledger.
    streams: TaskTracker,
    resilience: ResilienceConfig,
    budgets: Budgets,
    ledger: LedgerWriter,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("deployments", &self.deployments)
            .finish_non_exhaustive()
    }
}

/// Whether another deployment may succeed where this one failed: yes for the provider's own
/// trouble (transient, degrading, rate-limited, the router's own limits for it, an open
/// breaker), no for problems with the request itself.
fn falls_back(error: &ProviderError) -> bool {
    matches!(
        error.class(),
        ErrorClass::Transient | ErrorClass::ExternalDegrading | ErrorClass::ExternalRateLimit
    )
}

/// A call let through a deployment's breaker, rate limits and budgets, about to be made.
struct Admitted {
    deployment: Arc<Deployment>,
    /// The caller's request with `max_tokens` set to what this deployment may produce.
    request: ChatRequest,
    attempt: Attempt,
    permit: Permit,
    /// The worst-case cost held on the call's budgets, settled by its ledger entry.
    reservation: Option<Reservation>,
    reason: String,
}

/// What accounting a finished call needs after the breaker and limiter have their report.
struct Reported {
    deployment: Arc<Deployment>,
    reason: String,
    reservation: Option<Reservation>,
}

impl Admitted {
    /// Reports a finished provider call to the breaker and the rate limiter.
    fn report(self, result: Result<TokenUsage, &ProviderError>) -> Reported {
        let used = match result {
            Ok(usage) => {
                self.attempt.success();
                usage.prompt + usage.completion
            }
            Err(error) => {
                self.attempt.failure(error.class());
                0
            }
        };
        self.deployment.limiter.settle(&self.permit, used);
        Reported {
            deployment: self.deployment,
            reason: self.reason,
            reservation: self.reservation,
        }
    }
}

impl Service {
    pub fn new(
        deployments: Deployments,
        pool: PgPool,
        resilience: ResilienceConfig,
        budgets: Budgets,
        ledger: LedgerWriter,
    ) -> Self {
        Self {
            deployments,
            pool,
            streams: TaskTracker::new(),
            resilience,
            budgets,
            ledger,
        }
    }

    /// Waits (at most `grace`) for streams still being driven, then writes every queued
    /// ledger entry. For shutdown, after intake stopped.
    pub async fn close(&self, grace: Duration) {
        self.streams.close();
        if tokio::time::timeout(grace, self.streams.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "streams still running after the grace period");
        }
        self.ledger.close().await;
    }

    /// Holds the call's worst-case cost on its budgets (tenant, and the run and task when the
    /// caller named their budgets).
    async fn reserve(
        &self,
        call: &Call,
        deployment: &Deployment,
        prompt_tokens: u64,
        max_tokens: u32,
    ) -> Result<Option<Reservation>, Error> {
        let limit = |id: &str, micros: Option<u64>| {
            micros
                .filter(|_| !id.is_empty())
                .map(|micros| budget::Limit {
                    id: id.to_owned(),
                    micros,
                })
        };
        let request = budget::Request {
            tenant: call.caller.tenant.clone(),
            run: limit(&call.caller.run_id, call.run_budget_micros),
            task: limit(&call.caller.task_id, call.task_budget_micros),
        };
        let worst_case = deployment.cost_micros(TokenUsage {
            prompt: prompt_tokens,
            completion: u64::from(max_tokens),
        });
        Ok(self
            .budgets
            .reserve(&self.pool, &request, worst_case)
            .await?)
    }

    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    /// Tries the plan's deployments in order, each through its breaker and rate limits, and
    /// retries a deployment (with backoff) on transient failures and rate limits before
    /// falling back to the next. `call_once` makes one provider call and reports it; its
    /// error decides what happens next.
    async fn run_plan<T, F, Fut>(&self, call: &Call, mut call_once: F) -> Result<T, Error>
    where
        F: FnMut(Admitted) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let needs = Needs::of(&call.request, call.local_only);
        let plan = self.deployments.plan(&call.deployment, call.tier, &needs)?;
        let retry = &self.resilience.retry;
        let backoff = Backoff::new(retry);
        let mut failure: Option<Error> = None;
        for candidate in plan {
            let deployment = candidate.deployment;
            tracing::Span::current().record("deployment", deployment.name.as_str());
            let max_tokens = deployment.output_budget(needs.prompt_tokens, call.request.max_tokens);
            let mut attempt_number = 1;
            loop {
                let result = match admit(&deployment, needs.prompt_tokens, max_tokens).await {
                    Ok((attempt, permit)) => {
                        let reservation = match self
                            .reserve(call, &deployment, needs.prompt_tokens, max_tokens)
                            .await
                        {
                            Ok(reservation) => reservation,
                            Err(error) => {
                                // No call is made: give the limiter its tokens back; the
                                // unreported attempt leaves the breaker as it was.
                                deployment.limiter.settle(&permit, 0);
                                drop(attempt);
                                return Err(error);
                            }
                        };
                        // The provider call as its own client span, a child of the rpc's.
                        let span = tracing::info_span!(
                            "provider_call",
                            otel.name = %format_args!("chat {}", deployment.model),
                            otel.kind = "client",
                            deployment = %deployment.name,
                            provider = ?deployment.provider_kind,
                            attempt = attempt_number,
                        );
                        call_once(Admitted {
                            deployment: deployment.clone(),
                            request: ChatRequest {
                                max_tokens: Some(max_tokens),
                                ..call.request.clone()
                            },
                            attempt,
                            permit,
                            reservation,
                            reason: reason_after(&candidate.reason, failure.as_ref()),
                        })
                        .instrument(span)
                        .await
                    }
                    Err(refused) => Err(refused),
                };
                let source = match result {
                    Ok(value) => return Ok(value),
                    Err(source) => source,
                };
                let class = source.class();
                let retry_after = source.retry_after();
                let retry_here = source.reached_provider()
                    && matches!(class, ErrorClass::Transient | ErrorClass::ExternalRateLimit)
                    && should_retry(class, attempt_number, retry)
                    && retry_after.is_none_or(|after| after <= retry.max_retry_after);
                let fall_back = falls_back(&source);
                tracing::warn!(deployment = %deployment.name, error = %source, retry_here, fall_back, "deployment failed");
                failure = Some(Error::Provider {
                    deployment: deployment.name.clone(),
                    source,
                });
                if retry_here {
                    metrics::retried(&deployment.name);
                    tokio::time::sleep(backoff.delay(attempt_number, retry_after)).await;
                    attempt_number += 1;
                    continue;
                }
                if !fall_back {
                    return Err(failure.unwrap_or_else(unreachable_failure));
                }
                metrics::fell_back(&deployment.name);
                break;
            }
        }
        Err(failure.unwrap_or_else(unreachable_failure))
    }

    /// Tries the plan's deployments (see `run_plan`). Every provider call, successful or not,
    /// is written to the ledger before the answer goes back; if that write fails the call
    /// fails, so no completion goes unaccounted.
    pub async fn complete(&self, call: Call) -> Result<Completion, Error> {
        let started = Instant::now();
        let provider_micros = AtomicU64::new(0);
        let ledger_failure: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
        let result = self
            .run_plan(&call, |admitted| {
                let (call, ledger, provider_micros, ledger_failure) =
                    (&call, &self.ledger, &provider_micros, &ledger_failure);
                async move {
                    let called = Instant::now();
                    let result = admitted.deployment.complete(&admitted.request).await;
                    let latency = called.elapsed();
                    provider_micros.fetch_add(micros(latency), Ordering::Relaxed);
                    let usage = result.as_ref().map(|r| r.usage).unwrap_or_default();
                    let reported = admitted.report(result.as_ref().map(|r| r.usage));
                    let deployment = reported.deployment.clone();
                    let reason = reported.reason.clone();
                    let cost_micros = match account(
                        ledger,
                        call,
                        reported,
                        &result.as_ref().map(|_| ()),
                        usage,
                        latency,
                    )
                    .await
                    {
                        Ok(cost) => cost,
                        Err(error) => {
                            // Not the provider's fault: stop here, without falling back.
                            if let Ok(mut slot) = ledger_failure.lock() {
                                *slot = Some(error);
                            }
                            return Err(ProviderError::Rejected {
                                status: 0,
                                message: "cannot record usage".into(),
                            });
                        }
                    };
                    let response = result?;
                    Ok(Completion {
                        response,
                        cost_micros,
                        deployment: deployment.name.clone(),
                        provider: deployment.provider_kind,
                        model: deployment.model.clone(),
                        route_reason: reason,
                    })
                }
            })
            .await;
        if let Ok(mut slot) = ledger_failure.lock()
            && let Some(error) = slot.take()
        {
            return Err(error);
        }
        if let Ok(completion) = &result {
            let waited = Duration::from_micros(provider_micros.load(Ordering::Relaxed));
            metrics::overhead(
                &completion.deployment,
                started.elapsed().saturating_sub(waited),
            );
        }
        result
    }

    /// Like [`Service::complete`], streamed. Deployments are tried as for `complete` until one
    /// produces its first event within its timeout; from then on the stream is that
    /// deployment's, and a failure ends it (what was sent cannot be taken back). The provider
    /// is driven by a task of its own, so the call is accounted for even when the client goes
    /// away (which stops the provider).
    pub async fn stream(&self, call: Call) -> Result<StreamStart, Error> {
        let ledger_failure: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
        let result = self
            .run_plan(&call, |admitted| {
                let (call, ledger, streams, ledger_failure) =
                    (&call, &self.ledger, &self.streams, &ledger_failure);
                async move {
                    let started = Instant::now();
                    match first_event(&admitted.deployment, &admitted.request).await {
                        Ok((first, rest)) => {
                            metrics::first_token(
                                &admitted.deployment.name,
                                &call.caller.tenant,
                                started.elapsed(),
                            );
                            let (sender, items) = mpsc::channel(STREAM_BUFFER);
                            let start = StreamStart {
                                deployment: admitted.deployment.name.clone(),
                                model: admitted.deployment.model.clone(),
                                route_reason: admitted.reason.clone(),
                                items,
                            };
                            let run = StreamRun {
                                ledger: ledger.clone(),
                                call: call.clone(),
                                admitted,
                                started,
                            };
                            streams.spawn(run.drive(first, rest, sender));
                            Ok(start)
                        }
                        Err(source) => {
                            let reported = admitted.report(Err(&source));
                            if let Err(error) = account(
                                ledger,
                                call,
                                reported,
                                &Err(&source),
                                TokenUsage::default(),
                                started.elapsed(),
                            )
                            .await
                                && let Ok(mut slot) = ledger_failure.lock()
                            {
                                *slot = Some(error);
                                return Err(ProviderError::Rejected {
                                    status: 0,
                                    message: "cannot record usage".into(),
                                });
                            }
                            Err(source)
                        }
                    }
                }
            })
            .await;
        if let Ok(mut slot) = ledger_failure.lock()
            && let Some(error) = slot.take()
        {
            return Err(error);
        }
        result
    }
}

/// Lets a call through `deployment`'s breaker, then its rate limits (waiting in its queue if
/// need be). Refusals are errors of the deployment, so the plan moves on.
async fn admit(
    deployment: &Arc<Deployment>,
    prompt_tokens: u64,
    max_tokens: u32,
) -> Result<(Attempt, Permit), ProviderError> {
    let attempt = deployment
        .breaker
        .allow()
        .map_err(ProviderError::CircuitOpen)?;
    let permit = deployment
        .limiter
        .acquire(prompt_tokens + u64::from(max_tokens))
        .await
        .map_err(ProviderError::Queue)?;
    Ok((attempt, permit))
}

/// A plan always has a candidate, so some failure is always recorded; this stands in should
/// that ever not hold.
fn unreachable_failure() -> Error {
    Error::Unroutable("no deployment could be tried".into())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Opens `deployment`'s stream and waits for its first event, within the deployment's
/// first-token timeout: until then nothing has reached the client, so a failure may still
/// fall back.
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
    tokio::time::timeout(deployment.first_token_timeout, open)
        .await
        .unwrap_or(Err(ProviderError::Timeout(deployment.first_token_timeout)))
}

/// A stream after its first event, driven to its end by its own task.
struct StreamRun {
    ledger: LedgerWriter,
    call: Call,
    admitted: Admitted,
    started: Instant,
}

impl StreamRun {
    async fn drive(self, first: StreamEvent, mut rest: ChatStream, sender: mpsc::Sender<Streamed>) {
        let deployment = self.admitted.deployment.clone();
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
        let reported = self.admitted.report(outcome.as_ref().map(|_| usage));
        let route_reason = reported.reason.clone();
        let result = outcome.as_ref().map(|_| ());
        let end = match account(&self.ledger, &self.call, reported, &result, usage, latency).await {
            Err(error) => Err(error),
            Ok(cost_micros) => match outcome {
                Ok(()) => Ok(Completion {
                    response: ChatResponse { usage, ..response },
                    cost_micros,
                    deployment: deployment.name.clone(),
                    provider: deployment.provider_kind,
                    model: deployment.model.clone(),
                    route_reason,
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
fn reason_after(reason: &str, failure: Option<&Error>) -> String {
    match failure {
        Some(Error::Provider { deployment, source }) => {
            format!("{reason} (after {deployment} failed: {})", source.class())
        }
        _ => reason.to_owned(),
    }
}

/// Metrics and the ledger entry of one provider call (which settles its reservation);
/// answers its cost. The entry is written in the ledger's next batch, off the request path.
async fn account(
    ledger: &LedgerWriter,
    call: &Call,
    reported: Reported,
    result: &Result<(), &ProviderError>,
    usage: TokenUsage,
    latency: Duration,
) -> Result<u64, Error> {
    let deployment = &reported.deployment;
    let cost_micros = deployment.cost_micros(usage);
    let error = result.as_ref().err().map(|e| e.class());
    metrics::call(
        &deployment.name,
        &call.caller.tenant,
        latency,
        usage,
        cost_micros,
        error,
    );
    if error.is_none() {
        deployment.observe_latency(latency);
    }
    let entry = LedgerEntry::new(
        call.caller.clone(),
        deployment,
        error,
        usage,
        cost_micros,
        latency,
    )
    .with_reservation(reported.reservation);
    ledger
        .record(entry)
        .await
        .map_err(|_| Error::LedgerClosed)?;
    Ok(cost_micros)
}
