//! The `colony.v1.Memory` gRPC adapter: converts between prost and domain types, traces, and
//! records metrics. The only module that sees prost types.

use std::future::Future;
use std::time::Instant;

use colony_proto::v1;
use colony_proto::v1::memory_server::Memory;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use colony_inference::embed::Embedder;

use crate::session::{Limits, StoredMessage};
use crate::store::Store;
use crate::{Error, metrics};

/// The gRPC service.
pub struct MemoryService {
    store: Store,
    limits: Limits,
    embedder: Embedder,
}

impl MemoryService {
    pub fn new(store: Store, limits: Limits, embedder: Embedder) -> Self {
        Self {
            store,
            limits,
            embedder,
        }
    }
}

/// A server span for `method`, continuing the caller's trace when it sent `traceparent`.
fn server_span<T>(method: &'static str, request: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc",
        otel.name = %format_args!("colony.v1.Memory/{method}"),
        rpc.method = method,
        tenant = tracing::field::Empty,
        session_id = tracing::field::Empty,
    );
    let traceparent = request
        .metadata()
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    colony_telemetry::set_parent(&span, traceparent);
    span
}

/// Runs one request: measures it, counts its outcome and logs the failures that are ours.
async fn observe<T>(
    method: &'static str,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = work.await;
    ::metrics::histogram!(metrics::OPERATION_SECONDS, "method" => method)
        .record(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    };
    ::metrics::counter!(metrics::OPERATIONS, "method" => method, "outcome" => outcome).increment(1);
    match result {
        Ok(value) => Ok(Response::new(value)),
        Err(error) => {
            match &error {
                Error::InvalidArgument { .. } => {
                    tracing::debug!(%error, method, "request rejected");
                }
                Error::Database(_) | Error::Embedding(_) => {
                    tracing::warn!(%error, method, "request failed");
                }
            }
            Err(error.into())
        }
    }
}

fn to_proto(message: StoredMessage) -> v1::StoredMessage {
    v1::StoredMessage {
        seq: message.seq,
        message: Some(v1::ChatMessage {
            role: message.role.as_str().to_owned(),
            content: message.content,
            ..Default::default()
        }),
        token_count: u64::from(message.token_count),
        created_at: Some(colony_proto::timestamp(message.created_at.into())),
    }
}

impl MemoryService {
    async fn append(
        &self,
        request: v1::AppendMessagesRequest,
    ) -> Result<v1::AppendMessagesResponse, Error> {
        let span = tracing::Span::current();
        span.record("tenant", request.tenant.as_str());
        span.record("session_id", request.session_id.as_str());
        let messages = request
            .messages
            .into_iter()
            .map(|m| (m.role, m.content))
            .collect();
        let append = self.limits.append(
            request.tenant,
            request.session_id,
            request.run_id,
            request.task_id,
            messages,
        )?;
        let totals = self.store.append(&append).await?;
        ::metrics::counter!(metrics::MESSAGES_APPENDED).increment(append.messages.len() as u64);
        Ok(v1::AppendMessagesResponse {
            message_count: totals.message_count,
            token_count: totals.token_count,
        })
    }

    async fn embed(&self, request: v1::EmbedRequest) -> Result<v1::EmbedResponse, Error> {
        tracing::Span::current().record("tenant", request.tenant.as_str());
        let texts = self.limits.embed(&request.tenant, request.texts)?;
        let vectors = self.embedder.embed(texts).await.map_err(Error::Embedding)?;
        ::metrics::counter!(metrics::TEXTS_EMBEDDED).increment(vectors.len() as u64);
        Ok(v1::EmbedResponse {
            embeddings: vectors
                .into_iter()
                .map(|values| v1::Embedding { values })
                .collect(),
            dimensions: u32::try_from(self.embedder.dimensions()).unwrap_or(u32::MAX),
            model: self.embedder.model_name().to_owned(),
        })
    }

    async fn list(
        &self,
        request: v1::ListMessagesRequest,
    ) -> Result<v1::ListMessagesResponse, Error> {
        let span = tracing::Span::current();
        span.record("tenant", request.tenant.as_str());
        span.record("session_id", request.session_id.as_str());
        let page = self.limits.page(
            request.tenant,
            request.session_id,
            request.after_seq,
            request.page_size,
        )?;
        let page = self.store.list(&page, self.limits.max_page_bytes).await?;
        Ok(v1::ListMessagesResponse {
            messages: page.messages.into_iter().map(to_proto).collect(),
            next_after_seq: page.next_after_seq.unwrap_or(0),
        })
    }
}

#[tonic::async_trait]
impl Memory for MemoryService {
    async fn append_messages(
        &self,
        request: Request<v1::AppendMessagesRequest>,
    ) -> Result<Response<v1::AppendMessagesResponse>, Status> {
        let span = server_span("AppendMessages", &request);
        observe("AppendMessages", self.append(request.into_inner()))
            .instrument(span)
            .await
    }

    async fn embed(
        &self,
        request: Request<v1::EmbedRequest>,
    ) -> Result<Response<v1::EmbedResponse>, Status> {
        let span = server_span("Embed", &request);
        observe("Embed", self.embed(request.into_inner()))
            .instrument(span)
            .await
    }

    async fn list_messages(
        &self,
        request: Request<v1::ListMessagesRequest>,
    ) -> Result<Response<v1::ListMessagesResponse>, Status> {
        let span = server_span("ListMessages", &request);
        observe("ListMessages", self.list(request.into_inner()))
            .instrument(span)
            .await
    }
}
