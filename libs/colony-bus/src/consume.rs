//! The consume loop: pull with bounded concurrency, decode, trace, handle, and map the outcome
//! to ack / nak-with-delay / term. A message that does not decode is terminated at once (it
//! would never decode on redelivery), counted, logged with its subject and dead-lettered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{Bus, TRACEPARENT, metrics, subjects};

/// What a handler decided about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (including "nothing to do"): remove it.
    Ack,
    /// Could not handle it now; redeliver after the delay.
    Retry(Duration),
    /// Can never be handled: stop redelivery and keep a copy in the dead-letter stream.
    Terminate(String),
}

/// One decoded message and its delivery metadata.
pub struct Delivery<M> {
    pub message: M,
    /// Logical subject (without the installation prefix).
    pub subject: String,
    /// 1 on first delivery.
    pub delivered: i64,
    raw: Arc<jetstream::Message>,
}

impl<M> Delivery<M> {
    /// When JetStream stored the message, on the NATS server's clock; `None` if the delivery's
    /// metadata cannot be read. Unlike the time of handling, it does not grow while a consumer
    /// catches up on a backlog, so `published_at − the event's own time` is how late the
    /// publisher sent it (an outbox's lag).
    pub fn published_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let published = self.raw.info().ok()?.published;
        Some(std::time::SystemTime::from(published).into())
    }

    /// Tells JetStream the work is still going on, restarting its ack timer.
    pub async fn progress(&self) -> Result<(), crate::Error> {
        self.raw
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| crate::Error::Consumer {
                consumer: self.subject.clone(),
                message: e.to_string(),
            })
    }

    /// A handle that can send progress from another task.
    pub fn progress_handle(&self) -> ProgressHandle {
        ProgressHandle {
            raw: self.raw.clone(),
        }
    }
}

/// Sends AckProgress for one message from anywhere.
#[derive(Clone)]
pub struct ProgressHandle {
    raw: Arc<jetstream::Message>,
}

impl ProgressHandle {
    pub async fn progress(&self) {
        if let Err(error) = self.raw.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "ack progress failed");
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Name used in metrics and logs (normally the durable name).
    pub name: String,
    /// Messages handled at once.
    pub concurrency: usize,
    /// How long one pull request waits for messages.
    pub fetch_wait: Duration,
    /// The consumer observes events rather than doing the work a message asks for (the
    /// monitor, memory's replay log): its spans are at debug level, so a trace shows them only
    /// when `telemetry.trace_filter` asks for `colony_bus=debug`. Each event is observed by
    /// several services; at info level their spans would outnumber the work's.
    pub observer: bool,
}

impl ConsumeOptions {
    pub fn new(name: impl Into<String>, concurrency: usize) -> Self {
        Self {
            name: name.into(),
            concurrency: concurrency.max(1),
            fetch_wait: Duration::from_secs(5),
            observer: false,
        }
    }

    /// The options of a consumer that observes events (see [`ConsumeOptions::observer`]).
    pub fn observing(self) -> Self {
        Self {
            observer: true,
            ..self
        }
    }
}

/// Pulls from `consumer` until `shutdown`, handling up to `options.concurrency` messages at
/// once on `tracker`. Only as many messages are requested as there are free slots, so a busy
/// replica never hoards messages that another replica could run.
pub async fn consume<M, H, Fut>(
    bus: Bus,
    consumer: PullConsumer,
    options: ConsumeOptions,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handler: H,
) where
    M: prost::Message + Default + Send + 'static,
    H: Fn(Delivery<M>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let decode = |payload: &Bytes| M::decode(payload.as_ref()).map_err(|e| e.to_string());
    consume_with(bus, consumer, options, shutdown, tracker, decode, handler).await;
}

/// Like [`consume`], for streams that carry several message types: the handler gets the raw
/// payload and decodes by subject. It should answer `Outcome::Terminate("malformed …")` for a
/// payload that does not decode, so the message is counted as malformed.
pub async fn consume_bytes<H, Fut>(
    bus: Bus,
    consumer: PullConsumer,
    options: ConsumeOptions,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handler: H,
) where
    H: Fn(Delivery<Bytes>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let decode = |payload: &Bytes| Ok::<_, String>(payload.clone());
    consume_with(bus, consumer, options, shutdown, tracker, decode, handler).await;
}

async fn consume_with<M, D, H, Fut>(
    bus: Bus,
    consumer: PullConsumer,
    options: ConsumeOptions,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    decode: D,
    handler: H,
) where
    M: Send + 'static,
    D: Fn(&Bytes) -> Result<M, String> + Copy + Send + Sync + 'static,
    H: Fn(Delivery<M>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(options.concurrency));
    let name: Arc<str> = Arc::from(options.name.as_str());
    let observer = options.observer;
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let batch = consumer
            .batch()
            .max_messages(permits.len())
            .expires(options.fetch_wait)
            .messages();
        let mut batch = tokio::select! {
            () = shutdown.cancelled() => return,
            batch = batch => match batch {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, consumer = %name, "pull request failed");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            },
        };
        loop {
            let next = tokio::select! {
                // Messages already pulled but not yet handled are redelivered after AckWait.
                () = shutdown.cancelled() => return,
                next = batch.next() => next,
            };
            let raw = match next {
                None => break,
                Some(Ok(raw)) => raw,
                Some(Err(error)) => {
                    tracing::debug!(%error, consumer = %name, "pull batch ended");
                    break;
                }
            };
            let Some(permit) = permits.pop() else {
                // More messages than requested cannot happen; hand it back for redelivery.
                drop(raw.ack_with(AckKind::Nak(None)).await);
                continue;
            };
            let bus = bus.clone();
            let handler = handler.clone();
            let name = name.clone();
            tracker.spawn(async move {
                handle_one(&bus, &name, observer, raw, decode, handler).await;
                drop(permit);
            });
        }
    }
}

async fn handle_one<M, D, H, Fut>(
    bus: &Bus,
    name: &str,
    observer: bool,
    raw: jetstream::Message,
    decode: D,
    handler: H,
) where
    D: Fn(&Bytes) -> Result<M, String>,
    H: Fn(Delivery<M>) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let subject = bus.logical(raw.subject.as_str()).to_owned();
    let delivered = raw.info().map(|info| info.delivered).unwrap_or(1);
    let traceparent = raw
        .headers
        .as_ref()
        .and_then(|h| h.get(TRACEPARENT))
        .map(|v| v.as_str().to_owned());
    let span = if observer {
        tracing::debug_span!("consume", consumer = %name, subject = %subject, delivered)
    } else {
        tracing::info_span!("consume", consumer = %name, subject = %subject, delivered)
    };
    colony_telemetry::set_parent(&span, traceparent.as_deref());
    if delivered > 1 {
        ::metrics::counter!(metrics::REDELIVERED, "consumer" => name.to_owned()).increment(1);
    }
    let raw = Arc::new(raw);
    let outcome = match decode(&raw.payload) {
        Err(error) => {
            span.in_scope(|| {
                tracing::warn!(%error, subject = %subject, consumer = %name, "malformed message terminated")
            });
            Outcome::Terminate(format!("malformed protobuf: {error}"))
        }
        Ok(message) => {
            let started = Instant::now();
            let delivery = Delivery {
                message,
                subject: subject.clone(),
                delivered,
                raw: raw.clone(),
            };
            let outcome = handler(delivery).instrument(span.clone()).await;
            ::metrics::histogram!(metrics::HANDLE_SECONDS, "consumer" => name.to_owned())
                .record(started.elapsed().as_secs_f64());
            outcome
        }
    };
    let label = match &outcome {
        Outcome::Ack => "ack",
        Outcome::Retry(_) => "retry",
        Outcome::Terminate(_) => "term",
    };
    ::metrics::counter!(metrics::CONSUMED, "consumer" => name.to_owned(), "outcome" => label)
        .increment(1);
    let ack = match outcome {
        Outcome::Ack => raw.ack().await,
        Outcome::Retry(delay) => raw.ack_with(AckKind::Nak(Some(delay))).await,
        Outcome::Terminate(reason) => {
            let kind = if reason.starts_with("malformed") {
                "malformed"
            } else {
                "handler"
            };
            ::metrics::counter!(metrics::TERMINATED, "consumer" => name.to_owned(), "reason" => kind)
                .increment(1);
            dead_letter(bus, &raw, &subject, &reason).await;
            raw.ack_with(AckKind::Term).await
        }
    };
    if let Err(error) = ack {
        // The message comes back after AckWait; handlers are idempotent, so that is safe.
        span.in_scope(|| tracing::warn!(%error, subject = %subject, "ack failed"));
    }
}

/// Keeps a copy of a terminated message with why it was terminated.
async fn dead_letter(bus: &Bus, raw: &jetstream::Message, subject: &str, reason: &str) {
    let mut headers = async_nats::HeaderMap::new();
    let stream_sequence = raw.info().map(|i| i.stream_sequence).unwrap_or(0);
    headers.insert(
        crate::MSG_ID,
        format!("dead-{}-{stream_sequence}-{subject}", raw.subject).as_str(),
    );
    headers.insert("Colony-Original-Subject", subject);
    headers.insert("Colony-Dead-Reason", reason);
    let wire = bus.subject(&subjects::dead_letter(subject));
    let result = match bus
        .jetstream()
        .publish_with_headers(wire, headers, raw.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = result {
        tracing::error!(%error, subject = %subject, "dead-letter copy failed");
    }
}
