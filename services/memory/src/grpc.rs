//! The `colony.v1.Memory` gRPC adapter: converts between prost and domain types, traces, and
//! records metrics. The only module that sees prost types.

use std::future::Future;
use std::time::Instant;

use colony_proto::v1;
use colony_proto::v1::memory_server::Memory;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::long_term::{LongTerm, Query};
use crate::semantic::{
    self, MemoryRecord, NewMemory, Scope, ScopeKind, ScoredMemory, SearchFilter, SemanticLimits,
};
use crate::session::{Limits, StoredMessage, check_id};
use crate::store::Store;
use crate::{Error, metrics};

/// The gRPC service.
pub struct MemoryService {
    pub store: Store,
    pub limits: Limits,
    pub long_term: Arc<LongTerm>,
    pub semantic_limits: SemanticLimits,
    pub context: crate::context::Context,
    pub strategies: crate::strategy::Strategies,
    pub replay: crate::replay::Replay,
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
                Error::InvalidArgument { .. } | Error::NotFound(_) | Error::LimitExceeded(_) => {
                    tracing::debug!(%error, method, "request rejected");
                }
                Error::Database(_) | Error::Embedding(_) | Error::Unavailable(_) => {
                    tracing::warn!(%error, method, "request failed");
                }
            }
            Err(error.into())
        }
    }
}

/// Puts the request's tenant (and session, when it has one) on the current span.
fn record_ids(tenant: &str, session_id: &str) {
    let span = tracing::Span::current();
    span.record("tenant", tenant);
    if !session_id.is_empty() {
        span.record("session_id", session_id);
    }
}

/// A scope from the wire; unknown kinds are refused.
pub fn scope_from_proto(field: &str, scope: Option<v1::Scope>) -> Result<Scope, Error> {
    let scope = scope.ok_or_else(|| Error::invalid(field, "is required"))?;
    let kind = match v1::ScopeKind::try_from(scope.kind) {
        Ok(v1::ScopeKind::Tenant) => Some(ScopeKind::Tenant),
        Ok(v1::ScopeKind::Role) => Some(ScopeKind::Role),
        Ok(v1::ScopeKind::Run) => Some(ScopeKind::Run),
        Ok(v1::ScopeKind::Session) => Some(ScopeKind::Session),
        Ok(v1::ScopeKind::Unspecified) | Err(_) => None,
    };
    Scope::new(field, kind, scope.id)
}

pub fn scope_to_proto(scope: &Scope) -> v1::Scope {
    let kind = match scope.kind {
        ScopeKind::Tenant => v1::ScopeKind::Tenant,
        ScopeKind::Role => v1::ScopeKind::Role,
        ScopeKind::Run => v1::ScopeKind::Run,
        ScopeKind::Session => v1::ScopeKind::Session,
    };
    v1::Scope {
        kind: kind.into(),
        id: scope.id.clone(),
    }
}

/// A positive time to live from the wire; unset is `None`.
fn ttl_from_proto(
    field: &str,
    ttl: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    let Some(ttl) = ttl else { return Ok(None) };
    let ttl = Duration::try_from(ttl).map_err(|_| Error::invalid(field, "must be positive"))?;
    if ttl.is_zero() {
        return Err(Error::invalid(field, "must be positive"));
    }
    Ok(Some(ttl))
}

fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    colony_proto::timestamp(time.into())
}

pub fn record_to_proto(memory: MemoryRecord) -> v1::MemoryRecord {
    v1::MemoryRecord {
        id: memory.id,
        scope: Some(scope_to_proto(&memory.scope)),
        text: memory.text,
        metadata: memory.metadata.into_iter().collect(),
        importance: memory.importance,
        duplicate_count: memory.duplicate_count,
        created_at: Some(timestamp(memory.created_at)),
        updated_at: Some(timestamp(memory.updated_at)),
        expires_at: memory.expires_at.map(timestamp),
    }
}

pub fn scored_to_proto(scored: ScoredMemory) -> v1::ScoredMemory {
    v1::ScoredMemory {
        memory: Some(record_to_proto(scored.memory)),
        score: scored.score,
        similarity: scored.similarity,
    }
}

/// A memory id from the wire: database ids are positive.
fn memory_id(id: i64) -> Result<i64, Error> {
    if id <= 0 {
        return Err(Error::invalid("id", "must be a positive memory id"));
    }
    Ok(id)
}

/// The scopes of a search: each checked; empty means every scope of the tenant.
pub fn scopes_from_proto(scopes: Vec<v1::Scope>) -> Result<Vec<Scope>, Error> {
    scopes
        .into_iter()
        .enumerate()
        .map(|(i, scope)| scope_from_proto(&format!("scopes[{i}]"), Some(scope)))
        .collect()
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
        record_ids(&request.tenant, "");
        let texts = self.limits.embed(&request.tenant, request.texts)?;
        let embeddings = &self.long_term.embeddings;
        let vectors = embeddings.embed(texts).await?;
        ::metrics::counter!(metrics::TEXTS_EMBEDDED).increment(vectors.len() as u64);
        Ok(v1::EmbedResponse {
            embeddings: vectors
                .into_iter()
                .map(|values| v1::Embedding { values })
                .collect(),
            dimensions: u32::try_from(embeddings.dimensions()).unwrap_or(u32::MAX),
            model: embeddings.model_name().to_owned(),
        })
    }

    fn new_memory(&self, index: usize, input: v1::MemoryInput) -> Result<NewMemory, Error> {
        let field = |name: &str| format!("memories[{index}].{name}");
        let limits = &self.semantic_limits;
        let scope = scope_from_proto(&field("scope"), input.scope)?;
        semantic::check_text(&field("text"), &input.text, limits.max_text_bytes)?;
        let importance = match input.importance {
            Some(value) => semantic::check_importance(&field("importance"), value)?,
            None => semantic::DEFAULT_IMPORTANCE,
        };
        Ok(NewMemory {
            scope,
            text: input.text,
            metadata: limits.metadata(&field("metadata"), input.metadata.into_iter().collect())?,
            importance,
            ttl: ttl_from_proto(&field("ttl"), input.ttl)?,
            embedding: limits.embedding(&field("embedding"), input.embedding)?,
        })
    }

    async fn write_memories(
        &self,
        request: v1::WriteMemoriesRequest,
    ) -> Result<v1::WriteMemoriesResponse, Error> {
        record_ids(&request.tenant, "");
        check_id("tenant", &request.tenant)?;
        self.semantic_limits.write_count(request.memories.len())?;
        let inputs = request
            .memories
            .into_iter()
            .enumerate()
            .map(|(index, input)| self.new_memory(index, input))
            .collect::<Result<Vec<_>, _>>()?;
        let outcomes = self.long_term.write(&request.tenant, inputs).await?;
        Ok(v1::WriteMemoriesResponse {
            results: outcomes
                .into_iter()
                .map(|outcome| v1::WriteResult {
                    id: outcome.id,
                    merged: outcome.merged,
                    duplicate_count: outcome.duplicate_count,
                })
                .collect(),
        })
    }

    async fn search_memories(
        &self,
        request: v1::SearchMemoriesRequest,
    ) -> Result<v1::SearchMemoriesResponse, Error> {
        record_ids(&request.tenant, "");
        check_id("tenant", &request.tenant)?;
        let query = match (
            request.query.trim().is_empty(),
            self.semantic_limits
                .embedding("query_embedding", request.query_embedding)?,
        ) {
            (true, Some(vector)) => Query::Vector(vector),
            (false, None) => {
                semantic::check_text("query", &request.query, self.semantic_limits.max_text_bytes)?;
                Query::Text(request.query)
            }
            (true, None) => {
                return Err(Error::invalid(
                    "query",
                    "give a query text or a query_embedding",
                ));
            }
            (false, Some(_)) => {
                return Err(Error::invalid(
                    "query",
                    "give a query text or a query_embedding, not both",
                ));
            }
        };
        if !request.min_similarity.is_finite() {
            return Err(Error::invalid("min_similarity", "must be a number"));
        }
        let filter = SearchFilter {
            scopes: scopes_from_proto(request.scopes)?,
            metadata: self
                .semantic_limits
                .metadata("metadata", request.metadata.into_iter().collect())?,
            // 0 (unset) means no minimum: unrelated texts can have a negative cosine.
            min_similarity: if request.min_similarity == 0.0 {
                f32::NEG_INFINITY
            } else {
                request.min_similarity
            },
        };
        let results = self
            .long_term
            .search(
                &request.tenant,
                query,
                &filter,
                semantic::search_limit(request.limit),
            )
            .await?;
        Ok(v1::SearchMemoriesResponse {
            results: results.into_iter().map(scored_to_proto).collect(),
        })
    }

    async fn get_memory(&self, request: v1::GetMemoryRequest) -> Result<v1::MemoryRecord, Error> {
        record_ids(&request.tenant, "");
        check_id("tenant", &request.tenant)?;
        let id = memory_id(request.id)?;
        Ok(record_to_proto(
            self.long_term.get(&request.tenant, id).await?,
        ))
    }

    async fn update_memory(
        &self,
        request: v1::UpdateMemoryRequest,
    ) -> Result<v1::MemoryRecord, Error> {
        record_ids(&request.tenant, "");
        check_id("tenant", &request.tenant)?;
        let id = memory_id(request.id)?;
        let limits = &self.semantic_limits;
        if let Some(text) = &request.text {
            semantic::check_text("text", text, limits.max_text_bytes)?;
        }
        let importance = request
            .importance
            .map(|value| semantic::check_importance("importance", value))
            .transpose()?;
        let metadata = if request.replace_metadata {
            Some(limits.metadata(
                "metadata",
                request.metadata.into_iter().collect::<BTreeMap<_, _>>(),
            )?)
        } else if !request.metadata.is_empty() {
            return Err(Error::invalid(
                "metadata",
                "set replace_metadata to replace the metadata",
            ));
        } else {
            None
        };
        let ttl = ttl_from_proto("ttl", request.ttl)?;
        let record = self
            .long_term
            .update(&request.tenant, id, request.text, importance, metadata, ttl)
            .await?;
        Ok(record_to_proto(record))
    }

    async fn compress_session(
        &self,
        request: v1::CompressSessionRequest,
    ) -> Result<v1::CompressSessionResponse, Error> {
        record_ids(&request.tenant, &request.session_id);
        self.context.compress_request(request).await
    }

    async fn get_context(
        &self,
        request: v1::GetContextRequest,
    ) -> Result<v1::GetContextResponse, Error> {
        record_ids(&request.tenant, &request.session_id);
        self.context.get(request).await
    }

    async fn add_strategy(
        &self,
        request: v1::AddStrategyRequest,
    ) -> Result<v1::StrategyRecord, Error> {
        record_ids(&request.tenant, "");
        self.strategies.add(request).await
    }

    async fn suggest_strategies(
        &self,
        request: v1::SuggestStrategiesRequest,
    ) -> Result<v1::SuggestStrategiesResponse, Error> {
        record_ids(&request.tenant, "");
        self.strategies.suggest(request).await
    }

    async fn record_strategy_outcome(
        &self,
        request: v1::RecordStrategyOutcomeRequest,
    ) -> Result<v1::RecordStrategyOutcomeResponse, Error> {
        record_ids(&request.tenant, "");
        self.strategies.record_outcome(request).await
    }

    async fn list_strategies(
        &self,
        request: v1::ListStrategiesRequest,
    ) -> Result<v1::ListStrategiesResponse, Error> {
        record_ids(&request.tenant, "");
        self.strategies.list(request).await
    }

    async fn delete_memory(
        &self,
        request: v1::DeleteMemoryRequest,
    ) -> Result<v1::DeleteMemoryResponse, Error> {
        record_ids(&request.tenant, "");
        check_id("tenant", &request.tenant)?;
        let id = memory_id(request.id)?;
        let deleted = self.long_term.delete(&request.tenant, id).await?;
        Ok(v1::DeleteMemoryResponse { deleted })
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

/// A unary method: its span, then [`observe`] around the handler of the same name. Written in
/// the shape `#[tonic::async_trait]` gives trait methods, because that attribute does not see
/// into macro invocations.
macro_rules! unary {
    ($method:ident, $handler:ident, $name:literal, $request:ty, $response:ty) => {
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            request: Request<$request>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Response<$response>, Status>>
                    + Send
                    + 'async_trait,
            >,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                let span = server_span($name, &request);
                observe($name, self.$handler(request.into_inner()))
                    .instrument(span)
                    .await
            })
        }
    };
}

#[tonic::async_trait]
impl Memory for MemoryService {
    type ExportTrajectoriesStream = crate::replay::ExportStream;

    unary!(
        write_memories,
        write_memories,
        "WriteMemories",
        v1::WriteMemoriesRequest,
        v1::WriteMemoriesResponse
    );
    unary!(
        search_memories,
        search_memories,
        "SearchMemories",
        v1::SearchMemoriesRequest,
        v1::SearchMemoriesResponse
    );
    unary!(
        get_memory,
        get_memory,
        "GetMemory",
        v1::GetMemoryRequest,
        v1::MemoryRecord
    );
    unary!(
        update_memory,
        update_memory,
        "UpdateMemory",
        v1::UpdateMemoryRequest,
        v1::MemoryRecord
    );
    unary!(
        delete_memory,
        delete_memory,
        "DeleteMemory",
        v1::DeleteMemoryRequest,
        v1::DeleteMemoryResponse
    );
    unary!(
        compress_session,
        compress_session,
        "CompressSession",
        v1::CompressSessionRequest,
        v1::CompressSessionResponse
    );
    unary!(
        get_context,
        get_context,
        "GetContext",
        v1::GetContextRequest,
        v1::GetContextResponse
    );
    unary!(
        add_strategy,
        add_strategy,
        "AddStrategy",
        v1::AddStrategyRequest,
        v1::StrategyRecord
    );
    unary!(
        suggest_strategies,
        suggest_strategies,
        "SuggestStrategies",
        v1::SuggestStrategiesRequest,
        v1::SuggestStrategiesResponse
    );
    unary!(
        record_strategy_outcome,
        record_strategy_outcome,
        "RecordStrategyOutcome",
        v1::RecordStrategyOutcomeRequest,
        v1::RecordStrategyOutcomeResponse
    );
    unary!(
        list_strategies,
        list_strategies,
        "ListStrategies",
        v1::ListStrategiesRequest,
        v1::ListStrategiesResponse
    );

    async fn export_trajectories(
        &self,
        request: Request<v1::ExportTrajectoriesRequest>,
    ) -> Result<Response<Self::ExportTrajectoriesStream>, Status> {
        let span = server_span("ExportTrajectories", &request);
        observe(
            "ExportTrajectories",
            self.replay.export(request.into_inner()),
        )
        .instrument(span)
        .await
    }

    unary!(
        append_messages,
        append,
        "AppendMessages",
        v1::AppendMessagesRequest,
        v1::AppendMessagesResponse
    );
    unary!(embed, embed, "Embed", v1::EmbedRequest, v1::EmbedResponse);
    unary!(
        list_messages,
        list,
        "ListMessages",
        v1::ListMessagesRequest,
        v1::ListMessagesResponse
    );
}
