//! The JetStream bus and the transactional outbox: idempotent stream and consumer setup, typed
//! protobuf publish and consume with `Nats-Msg-Id` and W3C `traceparent` headers, and the
//! mapping of handler outcomes to ack, nak-with-delay and term.

mod consume;
pub mod metrics;
pub mod outbox;
pub mod subjects;

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use async_nats;
pub use consume::{ConsumeOptions, Delivery, Outcome, ProgressHandle, consume, consume_bytes};
pub use outbox::{Outbox, OutboxRow, RelayOptions};

/// Header carrying the W3C trace context of the publishing span.
pub const TRACEPARENT: &str = "traceparent";
/// Header JetStream deduplicates on within the stream's duplicate window.
pub const MSG_ID: &str = "Nats-Msg-Id";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("consumer {consumer}: {message}")]
    Consumer { consumer: String, message: String },
    #[error("publish to {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The longest wait before asking again for a stream the server failed to store (50 ms
/// doubling: five retries within 1.6 s).
const STREAM_STORE_RETRY_LIMIT: Duration = Duration::from_millis(800);

/// Whether stream creation failed in the server's storage (JetStream's `STREAM_STORE_FAILED`),
/// a server-side failure that a second request may not meet.
fn is_store_failure(error: &jetstream::context::CreateStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::CreateStreamErrorKind::JetStream(ref api)
            if api.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED
    )
}

impl Error {
    /// Publish and connection failures heal by themselves; configuration errors do not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Publish { .. } | Error::Connect { .. } | Error::Database(_)
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub url: String,
    /// Prepended to every subject (`<prefix>.colony.v1…`) and stream name, so that several
    /// Colony installations (or tests) share one NATS server without meeting.
    pub prefix: String,
    /// How long a dispatch or report message may stay unacknowledged before redelivery.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries of one message before JetStream gives up on it.
    pub max_deliver: i64,
    /// How long lifecycle events are kept.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// Bytes of lifecycle events kept.
    pub events_max_bytes: i64,
    /// Window within which a repeated `Nats-Msg-Id` is dropped.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            prefix: String::new(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl BusConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if !(self.url.starts_with("nats://") || self.url.starts_with("tls://")) {
            problems.push(format!(
                "bus.url: {:?} must start with nats:// or tls://",
                self.url
            ));
        }
        if !self
            .prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(format!(
                "bus.prefix: {:?} may hold only letters, digits, '_' and '-'",
                self.prefix
            ));
        }
        if self.ack_wait < Duration::from_secs(1) {
            problems.push("bus.ack_wait: must be at least 1s".into());
        }
        if self.max_deliver < 1 {
            problems.push("bus.max_deliver: must be at least 1".into());
        }
        if self.duplicate_window > self.events_max_age {
            problems.push("bus.duplicate_window: must not exceed bus.events_max_age".into());
        }
    }
}

/// The streams Colony uses. Each is created idempotently by [`Bus::ensure_streams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Work queue of task dispatch hints; one durable consumer per role shared by workers.
    Dispatch,
    /// Work queue of worker reports, consumed by the orchestrator.
    Reports,
    /// Run and task lifecycle, heartbeats and usage records; bounded by age and size.
    Events,
    /// Messages a consumer terminated, kept for inspection.
    DeadLetter,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Dispatch,
        StreamKind::Reports,
        StreamKind::Events,
        StreamKind::DeadLetter,
    ];

    fn base_name(self) -> &'static str {
        match self {
            StreamKind::Dispatch => "COLONY_DISPATCH",
            StreamKind::Reports => "COLONY_REPORTS",
            StreamKind::Events => "COLONY_EVENTS",
            StreamKind::DeadLetter => "COLONY_DEADLETTER",
        }
    }

    fn subjects(self) -> &'static [&'static str] {
        match self {
            StreamKind::Dispatch => &["colony.v1.task.dispatch.>"],
            StreamKind::Reports => &["colony.v1.task.report.>"],
            StreamKind::Events => &[
                "colony.v1.event.>",
                "colony.v1.worker.>",
                "colony.v1.usage.>",
            ],
            StreamKind::DeadLetter => &["colony.v1.deadletter.>"],
        }
    }
}

/// One message for [`Bus::publish_all`]: the logical subject, the `Nats-Msg-Id` that makes a
/// repeat harmless, the trace context, and the encoded protobuf.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub subject: &'a str,
    pub msg_id: &'a str,
    pub traceparent: Option<&'a str>,
    pub payload: Bytes,
}

/// A connection to NATS with JetStream, scoped to one subject prefix.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: Arc<BusConfig>,
}

impl Bus {
    /// Connects to NATS. `name` shows in the server's connection list.
    pub async fn connect(config: &BusConfig, name: &str) -> Result<Self, Error> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(config.connect_timeout)
            .retry_on_initial_connect()
            .connect(config.url.as_str());
        let client = tokio::time::timeout(config.connect_timeout, client)
            .await
            .map_err(|_| Error::Connect {
                url: config.url.clone(),
                message: format!("no answer within {:?}", config.connect_timeout),
            })?
            .map_err(|e| Error::Connect {
                url: config.url.clone(),
                message: e.to_string(),
            })?;
        let jetstream = jetstream::new(client.clone());
        Ok(Self {
            client,
            jetstream,
            config: Arc::new(config.clone()),
        })
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The wire subject for a logical subject such as `colony.v1.event.run.created`.
    pub fn subject(&self, logical: &str) -> String {
        if self.config.prefix.is_empty() {
            logical.to_owned()
        } else {
            format!("{}.{logical}", self.config.prefix)
        }
    }

    /// The logical subject of a wire subject (the inverse of [`Bus::subject`]).
    pub fn logical<'a>(&self, wire: &'a str) -> &'a str {
        if self.config.prefix.is_empty() {
            return wire;
        }
        wire.strip_prefix(self.config.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(wire)
    }

    pub fn stream_name(&self, kind: StreamKind) -> String {
        if self.config.prefix.is_empty() {
            kind.base_name().to_owned()
        } else {
            format!("{}_{}", self.config.prefix, kind.base_name())
        }
    }

    fn stream_config(&self, kind: StreamKind) -> stream::Config {
        let subjects = kind.subjects().iter().map(|s| self.subject(s)).collect();
        let base = stream::Config {
            name: self.stream_name(kind),
            subjects,
            storage: stream::StorageType::File,
            duplicate_window: self.config.duplicate_window,
            ..Default::default()
        };
        match kind {
            StreamKind::Dispatch | StreamKind::Reports => stream::Config {
                retention: stream::RetentionPolicy::WorkQueue,
                ..base
            },
            StreamKind::Events => stream::Config {
                retention: stream::RetentionPolicy::Limits,
                max_age: self.config.events_max_age,
                max_bytes: self.config.events_max_bytes,
                ..base
            },
            StreamKind::DeadLetter => stream::Config {
                retention: stream::RetentionPolicy::Limits,
                max_age: Duration::from_secs(30 * 24 * 3600),
                ..base
            },
        }
    }

    /// Creates every stream that does not exist yet; existing streams are left as they are.
    pub async fn ensure_streams(&self) -> Result<(), Error> {
        for kind in StreamKind::ALL {
            let config = self.stream_config(kind);
            let name = config.name.clone();
            let mut retry_in = Duration::from_millis(50);
            loop {
                match self.jetstream.get_or_create_stream(config.clone()).await {
                    Ok(_) => break,
                    // NATS servers (2.9 at least) remove an account's stream directory when
                    // its last stream is deleted; a stream created at that moment fails with
                    // "could not create storage directory". Asking again succeeds.
                    Err(error)
                        if is_store_failure(&error) && retry_in <= STREAM_STORE_RETRY_LIMIT =>
                    {
                        tracing::warn!(stream = %name, %error, "stream creation failed in the server's storage; retrying");
                        tokio::time::sleep(retry_in).await;
                        retry_in *= 2;
                    }
                    Err(error) => {
                        return Err(Error::Stream {
                            stream: name,
                            message: error.to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Creates (or reuses) a durable pull consumer on `kind` for the logical `filter` subject.
    pub async fn durable_consumer(
        &self,
        kind: StreamKind,
        durable: &str,
        filter: &str,
    ) -> Result<consumer::PullConsumer, Error> {
        let stream_name = self.stream_name(kind);
        let stream = self
            .jetstream
            .get_stream(&stream_name)
            .await
            .map_err(|e| Error::Stream {
                stream: stream_name.clone(),
                message: e.to_string(),
            })?;
        let config = consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            filter_subject: self.subject(filter),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: self.config.max_deliver,
            max_ack_pending: 10_000,
            ..Default::default()
        };
        stream
            .get_or_create_consumer(durable, config)
            .await
            .map_err(|e| Error::Consumer {
                consumer: durable.to_owned(),
                message: e.to_string(),
            })
    }

    /// Publishes `message` on the logical `subject` and waits for JetStream's acknowledgement.
    /// `msg_id` makes the publish idempotent within the duplicate window.
    pub async fn publish<M: prost::Message>(
        &self,
        subject: &str,
        msg_id: &str,
        message: &M,
    ) -> Result<(), Error> {
        let traceparent = colony_telemetry::current_traceparent();
        self.publish_bytes(
            subject,
            msg_id,
            traceparent.as_deref(),
            Bytes::from(message.encode_to_vec()),
        )
        .await
    }

    /// Publishes raw bytes (the outbox relay stores encoded messages) and waits for the ack.
    pub async fn publish_bytes(
        &self,
        subject: &str,
        msg_id: &str,
        traceparent: Option<&str>,
        payload: Bytes,
    ) -> Result<(), Error> {
        self.start_publish(subject, msg_id, traceparent, payload)
            .await?
            .await
            .map_err(|e| Error::Publish {
                subject: subject.to_owned(),
                message: e.to_string(),
            })
            .map(|_| ())
    }

    /// Sends a publish and returns the future of its acknowledgement, so callers can pipeline.
    pub async fn start_publish(
        &self,
        subject: &str,
        msg_id: &str,
        traceparent: Option<&str>,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID, msg_id);
        if let Some(traceparent) = traceparent {
            headers.insert(TRACEPARENT, traceparent);
        }
        let wire = self.subject(subject);
        let future = self
            .jetstream
            .publish_with_headers(wire, headers, payload)
            .await
            .map_err(|e| Error::Publish {
                subject: subject.to_owned(),
                message: e.to_string(),
            })?;
        ::metrics::counter!(metrics::PUBLISHED, "kind" => subjects::kind_of(subject)).increment(1);
        Ok(future)
    }

    /// Sends every message, then waits for all their acknowledgements together: one round trip
    /// for the batch. Answers, in order, whether JetStream acknowledged each one.
    pub async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Vec<Result<(), Error>> {
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            pending.push(
                self.start_publish(
                    message.subject,
                    message.msg_id,
                    message.traceparent,
                    message.payload.clone(),
                )
                .await,
            );
        }
        futures::future::join_all(pending.into_iter().zip(messages).map(
            |(started, message)| async move {
                started?.await.map(|_| ()).map_err(|e| Error::Publish {
                    subject: message.subject.to_owned(),
                    message: e.to_string(),
                })
            },
        ))
        .await
    }

    /// Waits until everything sent so far has reached the server (used at shutdown).
    pub async fn flush(&self) -> Result<(), Error> {
        self.client.flush().await.map_err(|e| Error::Publish {
            subject: "<flush>".into(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stream_the_server_failed_to_store_is_asked_for_again() {
        use jetstream::context::{CreateStreamError, CreateStreamErrorKind};
        let api = |err_code: u64, description: &str| -> CreateStreamError {
            let error: jetstream::Error = serde_json::from_value(serde_json::json!({
                "code": 500, "err_code": err_code, "description": description
            }))
            .expect("a JetStream API error as the server sends it");
            error.into()
        };
        assert!(is_store_failure(&api(
            10077,
            "stream store failed: could not create storage directory"
        )));
        assert!(!is_store_failure(&api(
            10058,
            "stream name already in use with a different configuration"
        )));
        assert!(!is_store_failure(&CreateStreamError::new(
            CreateStreamErrorKind::TimedOut
        )));
    }

    /// Whether the NATS subject filter `filter` (with `*` and `>` wildcards) matches `subject`.
    fn matches(filter: &str, subject: &str) -> bool {
        let mut subject_tokens = subject.split('.');
        for token in filter.split('.') {
            match (token, subject_tokens.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (literal, Some(actual)) if literal == actual => {}
                _ => return false,
            }
        }
        subject_tokens.next().is_none()
    }

    #[test]
    fn every_event_subject_falls_within_the_events_stream() {
        assert!(!matches("colony.v1.event.>", "colony.v1.event"));
        assert!(!matches("colony.v1.event.*", "colony.v1.event.run.created"));
        for subject in [
            subjects::run_event("created"),
            subjects::task_event("failed"),
            subjects::WORKER_HEARTBEAT.to_owned(),
            subjects::USAGE_RECORDED.to_owned(),
            subjects::TRAJECTORY_STEP.to_owned(),
            subjects::TASK_TOKENS.to_owned(),
            subjects::MEMORY_CHANGED.to_owned(),
            subjects::BREAKER_CHANGED.to_owned(),
        ] {
            let streams: Vec<StreamKind> = StreamKind::ALL
                .into_iter()
                .filter(|kind| kind.subjects().iter().any(|f| matches(f, &subject)))
                .collect();
            assert_eq!(streams, [StreamKind::Events], "{subject}");
        }
    }
}
