//! Session compression and context assembly. Older turns are summarised by a model through
//! the router; the originals stay stored and each summary names the sequence range it stands
//! for. A context that fits the caller's budget is the whole history (full-context mode, no
//! retrieval); otherwise it is summaries + the most recent messages + relevant memories, and
//! anything that still does not fit is counted in `omitted_messages`, never dropped silently.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use colony_proto::v1;
use colony_proto::v1::router_client::RouterClient;
use sqlx::{PgPool, Row};
use tonic::transport::Channel;

use crate::config::CompressionConfig;
use crate::long_term::{LongTerm, Query};
use crate::semantic::SearchFilter;
use crate::session::{Role, check_id, estimate_tokens};
use crate::{Error, metrics};

pub const DEFAULT_CONTEXT_MEMORIES: usize = 5;
pub const MAX_CONTEXT_MEMORIES: usize = 50;

/// Input tokens one summary call is given at most (a small local model has 4,096 in all).
const MAX_SUMMARY_INPUT_TOKENS: u64 = 2_500;

const SUMMARY_INSTRUCTIONS: &str = "You compress conversation history for an AI agent. \
Summarise the conversation below in a few sentences. Keep every fact, decision, name, number, \
result and open question the agent may need later; leave out pleasantries. Write only the \
summary.";

/// A summary as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub first_seq: u64,
    pub last_seq: u64,
    pub text: String,
    pub token_count: u64,
    pub created_at: DateTime<Utc>,
}

impl Summary {
    pub fn to_proto(&self) -> v1::SessionSummary {
        v1::SessionSummary {
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            text: self.text.clone(),
            token_count: self.token_count,
            created_at: Some(colony_proto::timestamp(self.created_at.into())),
        }
    }
}

struct Message {
    seq: u64,
    role: String,
    content: String,
    token_count: u64,
    created_at: DateTime<Utc>,
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Compression and context assembly.
pub struct Context {
    pool: PgPool,
    router: RouterClient<Channel>,
    config: CompressionConfig,
    long_term: Arc<LongTerm>,
}

impl Context {
    /// The router connection is made on first use, so memory starts without the router.
    pub fn new(
        pool: PgPool,
        config: CompressionConfig,
        long_term: Arc<LongTerm>,
    ) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(config.router_url.clone())?
            .timeout(config.timeout)
            .connect_lazy();
        Ok(Self {
            pool,
            router: RouterClient::new(channel),
            config,
            long_term,
        })
    }

    /// `(last_seq, token_count, summarized_through_seq)` of a session; `None` if it does not
    /// exist for this tenant.
    async fn session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<(u64, u64, u64)>, Error> {
        let row = sqlx::query(
            "SELECT last_seq, token_count, summarized_through_seq FROM memory.sessions \
             WHERE tenant = $1 AND session_id = $2",
        )
        .bind(tenant)
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some((
            unsigned(row.try_get("last_seq")?),
            unsigned(row.try_get("token_count")?),
            unsigned(row.try_get("summarized_through_seq")?),
        )))
    }

    async fn messages(
        &self,
        tenant: &str,
        session_id: &str,
        after_seq: u64,
        through_seq: u64,
    ) -> Result<Vec<Message>, Error> {
        let rows = sqlx::query(
            "SELECT seq, role, content, token_count, created_at FROM memory.messages \
             WHERE tenant = $1 AND session_id = $2 AND seq > $3 AND seq <= $4 ORDER BY seq",
        )
        .bind(tenant)
        .bind(session_id)
        .bind(signed(after_seq))
        .bind(signed(through_seq))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Message {
                    seq: unsigned(row.try_get("seq")?),
                    role: row.try_get("role")?,
                    content: row.try_get("content")?,
                    token_count: unsigned(i64::from(row.try_get::<i32, _>("token_count")?)),
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Error::from)
    }

    async fn summaries(&self, tenant: &str, session_id: &str) -> Result<Vec<Summary>, Error> {
        let rows = sqlx::query(
            "SELECT first_seq, last_seq, content, token_count, created_at \
             FROM memory.session_summaries WHERE tenant = $1 AND session_id = $2 \
             ORDER BY first_seq",
        )
        .bind(tenant)
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Summary {
                    first_seq: unsigned(row.try_get("first_seq")?),
                    last_seq: unsigned(row.try_get("last_seq")?),
                    text: row.try_get("content")?,
                    token_count: unsigned(i64::from(row.try_get::<i32, _>("token_count")?)),
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Error::from)
    }

    /// Summarises everything but the last `keep_recent` messages that no summary covers yet,
    /// one router call per chunk. Returns the summaries made and how far summaries now reach.
    pub async fn compress(
        &self,
        tenant: &str,
        session_id: &str,
        keep_recent: u64,
    ) -> Result<(Vec<Summary>, u64), Error> {
        let Some((last_seq, _, mut through)) = self.session(tenant, session_id).await? else {
            return Err(Error::NotFound(format!(
                "session {session_id:?} does not exist (for this tenant)"
            )));
        };
        let target = last_seq.saturating_sub(keep_recent);
        let mut made = Vec::new();
        while through < target {
            let chunk_end = target.min(through + u64::from(self.config.max_messages_per_summary));
            let mut messages = self
                .messages(tenant, session_id, through, chunk_end)
                .await?;
            // Within what one call can read; always at least one message.
            let mut tokens = 0;
            let fitting = messages
                .iter()
                .take_while(|message| {
                    tokens += message.token_count;
                    tokens <= MAX_SUMMARY_INPUT_TOKENS
                })
                .count()
                .max(1);
            messages.truncate(fitting);
            let Some(last) = messages.last() else { break };
            let summary = self.summarise(tenant, session_id, &messages).await?;
            let covered_through = last.seq;
            let stored = self
                .store_summary(tenant, session_id, through, covered_through, &summary)
                .await?;
            // `None`: another caller compressed the same messages meanwhile; theirs stands.
            if let Some(summary) = stored {
                made.push(summary);
            }
            through = match self.session(tenant, session_id).await? {
                Some((_, _, through)) => through,
                None => break,
            };
        }
        Ok((made, through))
    }

    /// One router call: the summary of `messages`.
    async fn summarise(
        &self,
        tenant: &str,
        session_id: &str,
        messages: &[Message],
    ) -> Result<String, Error> {
        let transcript = messages
            .iter()
            .map(|message| format!("[{}] {}: {}", message.seq, message.role, message.content))
            .collect::<Vec<_>>()
            .join("\n");
        let request = v1::CompleteRequest {
            tenant: tenant.to_owned(),
            deployment: self.config.deployment.clone(),
            tier: self.config.tier.clone(),
            messages: vec![
                v1::ChatMessage {
                    role: Role::System.as_str().into(),
                    content: SUMMARY_INSTRUCTIONS.into(),
                    ..Default::default()
                },
                v1::ChatMessage {
                    role: Role::User.as_str().into(),
                    content: transcript,
                    ..Default::default()
                },
            ],
            max_tokens: self.config.max_summary_tokens,
            temperature: Some(0.0),
            ..Default::default()
        };
        let mut router = self.router.clone();
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.config.timeout);
        let response = router.complete(request).await.map_err(|status| {
            Error::Unavailable(format!(
                "summarising session {session_id:?} through the router failed: {}: {}",
                status.code(),
                status.message()
            ))
        })?;
        let text = response.into_inner().content.trim().to_owned();
        if text.is_empty() {
            return Err(Error::Unavailable(format!(
                "the router returned an empty summary for session {session_id:?}"
            )));
        }
        Ok(text)
    }

    /// Stores a summary of `after_seq + 1 ..= last_seq` if summaries still reach exactly
    /// `after_seq`; `None` when another caller got there first.
    async fn store_summary(
        &self,
        tenant: &str,
        session_id: &str,
        after_seq: u64,
        last_seq: u64,
        text: &str,
    ) -> Result<Option<Summary>, Error> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE memory.sessions SET summarized_through_seq = $4 \
             WHERE tenant = $1 AND session_id = $2 AND summarized_through_seq = $3",
        )
        .bind(tenant)
        .bind(session_id)
        .bind(signed(after_seq))
        .bind(signed(last_seq))
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            return Ok(None);
        }
        let token_count = estimate_tokens(text);
        let created_at: DateTime<Utc> = sqlx::query_scalar(
            "INSERT INTO memory.session_summaries \
                 (tenant, session_id, first_seq, last_seq, content, token_count) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
        )
        .bind(tenant)
        .bind(session_id)
        .bind(signed(after_seq + 1))
        .bind(signed(last_seq))
        .bind(text)
        .bind(i32::try_from(token_count).unwrap_or(i32::MAX))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        ::metrics::counter!(metrics::SUMMARIES_CREATED).increment(1);
        Ok(Some(Summary {
            first_seq: after_seq + 1,
            last_seq,
            text: text.to_owned(),
            token_count: u64::from(token_count),
            created_at,
        }))
    }

    pub async fn compress_request(
        &self,
        request: v1::CompressSessionRequest,
    ) -> Result<v1::CompressSessionResponse, Error> {
        check_id("tenant", &request.tenant)?;
        check_id("session_id", &request.session_id)?;
        let keep_recent = request.keep_recent.unwrap_or(self.config.keep_recent);
        let (made, through) = self
            .compress(&request.tenant, &request.session_id, u64::from(keep_recent))
            .await?;
        Ok(v1::CompressSessionResponse {
            summary: made.last().map(Summary::to_proto),
            summarized_through_seq: through,
            summaries: made.iter().map(Summary::to_proto).collect(),
        })
    }

    /// The context for a model within `token_budget`; see the module documentation.
    pub async fn get(
        &self,
        request: v1::GetContextRequest,
    ) -> Result<v1::GetContextResponse, Error> {
        check_id("tenant", &request.tenant)?;
        check_id("session_id", &request.session_id)?;
        if request.token_budget == 0 {
            return Err(Error::invalid("token_budget", "must be at least 1"));
        }
        let tenant = request.tenant.as_str();
        let session_id = request.session_id.as_str();
        let budget = request.token_budget;
        let Some((last_seq, total_tokens, _)) = self.session(tenant, session_id).await? else {
            return Ok(v1::GetContextResponse {
                full_context: true,
                ..Default::default()
            });
        };
        if total_tokens <= budget {
            let messages = self.messages(tenant, session_id, 0, last_seq).await?;
            return Ok(v1::GetContextResponse {
                full_context: true,
                messages: messages.into_iter().map(to_proto).collect(),
                token_count: total_tokens,
                ..Default::default()
            });
        }

        // Memories first: they are bounded by their limit.
        let mut memories = Vec::new();
        if !request.query.trim().is_empty() {
            crate::semantic::check_text("query", &request.query, 64 * 1024)?;
            let limit = match usize::try_from(request.memory_limit).unwrap_or(usize::MAX) {
                0 => DEFAULT_CONTEXT_MEMORIES,
                n => n.min(MAX_CONTEXT_MEMORIES),
            };
            let filter = SearchFilter {
                scopes: crate::grpc::scopes_from_proto(request.scopes)?,
                ..SearchFilter::default()
            };
            memories = self
                .long_term
                .search(tenant, Query::Text(request.query), &filter, limit)
                .await?;
        }
        let mut memory_tokens: u64 = memories
            .iter()
            .map(|m| u64::from(estimate_tokens(&m.memory.text)))
            .sum();
        while memory_tokens > budget / 4 && memories.pop().is_some() {
            memory_tokens = memories
                .iter()
                .map(|m| u64::from(estimate_tokens(&m.memory.text)))
                .sum();
        }
        let available = budget - memory_tokens;

        // The newest messages that fit half of what is left stay verbatim; the rest is
        // summarised (on demand, through the router).
        let recent = self
            .messages(
                tenant,
                session_id,
                last_seq.saturating_sub(u64::from(self.config.max_messages_per_summary)),
                last_seq,
            )
            .await?;
        let mut tail_tokens = 0;
        let keep = recent
            .iter()
            .rev()
            .take_while(|message| {
                tail_tokens += message.token_count;
                tail_tokens <= available / 2
            })
            .count();
        let (_, through) = self.compress(tenant, session_id, keep as u64).await?;
        let mut summaries = self.summaries(tenant, session_id).await?;
        let mut summary_tokens: u64 = summaries.iter().map(|s| s.token_count).sum();
        let mut omitted = 0;
        // Summaries that do not fit go oldest first, and what they covered is reported.
        while summary_tokens > available && !summaries.is_empty() {
            let dropped = summaries.remove(0);
            summary_tokens -= dropped.token_count;
            omitted += dropped.last_seq - dropped.first_seq + 1;
        }
        let mut room = available - summary_tokens;
        let uncovered = self.messages(tenant, session_id, through, last_seq).await?;
        let mut verbatim = Vec::new();
        for message in uncovered.into_iter().rev() {
            if message.token_count > room {
                omitted += message.seq - through;
                break;
            }
            room -= message.token_count;
            verbatim.push(message);
        }
        verbatim.reverse();
        let verbatim_tokens: u64 = verbatim.iter().map(|m| m.token_count).sum();
        Ok(v1::GetContextResponse {
            full_context: false,
            token_count: memory_tokens + summary_tokens + verbatim_tokens,
            summaries: summaries.iter().map(Summary::to_proto).collect(),
            messages: verbatim.into_iter().map(to_proto).collect(),
            memories: memories
                .into_iter()
                .map(crate::grpc::scored_to_proto)
                .collect(),
            omitted_messages: omitted,
        })
    }
}

fn to_proto(message: Message) -> v1::StoredMessage {
    v1::StoredMessage {
        seq: message.seq,
        message: Some(v1::ChatMessage {
            role: message.role,
            content: message.content,
            ..Default::default()
        }),
        token_count: message.token_count,
        created_at: Some(colony_proto::timestamp(message.created_at.into())),
    }
}
