//! The `memory` schema: sessions and their messages.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::Error;
use crate::session::{Append, Page, PageRequest, Role, StoredMessage, Totals, page_cut};

/// Access to the memory tables. Only this service reads or writes them.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

/// Stored counts are never negative (CHECK constraints); read them as unsigned.
fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Stores `append.messages` at the end of the session in one transaction, creating the
    /// session on first use. The session row is locked while sequence numbers are assigned,
    /// so concurrent appends to one session serialize and `seq` stays gap-free.
    pub async fn append(&self, append: &Append) -> Result<Totals, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO memory.sessions (tenant, session_id, run_id) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant, session_id) DO NOTHING",
        )
        .bind(&append.tenant)
        .bind(&append.session_id)
        .bind(&append.run_id)
        .execute(&mut *tx)
        .await?;
        let last_seq: i64 = sqlx::query_scalar(
            "SELECT last_seq FROM memory.sessions WHERE tenant = $1 AND session_id = $2 \
             FOR UPDATE",
        )
        .bind(&append.tenant)
        .bind(&append.session_id)
        .fetch_one(&mut *tx)
        .await?;

        let count = append.messages.len();
        let mut seqs = Vec::with_capacity(count);
        let mut roles = Vec::with_capacity(count);
        let mut contents = Vec::with_capacity(count);
        let mut tokens = Vec::with_capacity(count);
        let mut token_sum = 0i64;
        for (seq, message) in (last_seq + 1..).zip(&append.messages) {
            // Validation bounds messages far below i32::MAX tokens (see config).
            let token_count = i32::try_from(message.token_count).unwrap_or(i32::MAX);
            seqs.push(seq);
            roles.push(message.role.as_str());
            contents.push(message.content.as_str());
            tokens.push(token_count);
            token_sum += i64::from(token_count);
        }
        sqlx::query(
            "INSERT INTO memory.messages \
                 (tenant, session_id, seq, role, content, token_count, run_id, task_id) \
             SELECT $1, $2, m.seq, m.role, m.content, m.token_count, $7, $8 \
             FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::integer[]) \
                 AS m(seq, role, content, token_count)",
        )
        .bind(&append.tenant)
        .bind(&append.session_id)
        .bind(&seqs)
        .bind(&roles)
        .bind(&contents)
        .bind(&tokens)
        .bind(&append.run_id)
        .bind(&append.task_id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "UPDATE memory.sessions \
             SET last_seq = last_seq + $3, message_count = message_count + $3, \
                 token_count = token_count + $4, run_id = COALESCE(run_id, $5), \
                 updated_at = now() \
             WHERE tenant = $1 AND session_id = $2 \
             RETURNING message_count, token_count",
        )
        .bind(&append.tenant)
        .bind(&append.session_id)
        .bind(i64::try_from(count).unwrap_or(i64::MAX))
        .bind(token_sum)
        .bind(&append.run_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Totals {
            message_count: unsigned(row.try_get("message_count")?),
            token_count: unsigned(row.try_get("token_count")?),
        })
    }

    /// One page of the session, oldest first. A session that does not exist (for this tenant)
    /// reads as empty.
    pub async fn list(&self, request: &PageRequest, max_page_bytes: usize) -> Result<Page, Error> {
        // Messages are append-only, so reading sizes first and contents second is consistent.
        let after_seq = i64::try_from(request.after_seq).unwrap_or(i64::MAX);
        let sizes = sqlx::query(
            "SELECT seq, octet_length(content) AS bytes FROM memory.messages \
             WHERE tenant = $1 AND session_id = $2 AND seq > $3 ORDER BY seq LIMIT $4",
        )
        .bind(&request.tenant)
        .bind(&request.session_id)
        .bind(after_seq)
        .bind(i64::from(request.page_size) + 1)
        .fetch_all(&self.pool)
        .await?;
        let byte_sizes = sizes
            .iter()
            .map(|row| {
                row.try_get::<i32, _>("bytes")
                    .map(|b| usize::try_from(b).unwrap_or(0))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let page_size = usize::try_from(request.page_size).unwrap_or(usize::MAX);
        let taken = page_cut(&byte_sizes, page_size, max_page_bytes);
        let Some(last) = taken.checked_sub(1).and_then(|i| sizes.get(i)) else {
            return Ok(Page {
                messages: Vec::new(),
                next_after_seq: None,
            });
        };
        let last_seq: i64 = last.try_get("seq")?;
        let rows = sqlx::query(
            "SELECT seq, role, content, token_count, created_at FROM memory.messages \
             WHERE tenant = $1 AND session_id = $2 AND seq > $3 AND seq <= $4 ORDER BY seq",
        )
        .bind(&request.tenant)
        .bind(&request.session_id)
        .bind(after_seq)
        .bind(last_seq)
        .fetch_all(&self.pool)
        .await?;
        let messages = rows
            .iter()
            .map(|row| {
                let role: String = row.try_get("role")?;
                let role = role.parse::<Role>().map_err(|()| {
                    sqlx::Error::Decode(format!("unknown role {role:?} in memory.messages").into())
                })?;
                let token_count: i32 = row.try_get("token_count")?;
                let created_at: DateTime<Utc> = row.try_get("created_at")?;
                Ok(StoredMessage {
                    seq: unsigned(row.try_get("seq")?),
                    role,
                    content: row.try_get("content")?,
                    token_count: u32::try_from(token_count).unwrap_or(0),
                    created_at,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let next_after_seq = (taken < sizes.len()).then(|| unsigned(last_seq));
        Ok(Page {
            messages,
            next_after_seq,
        })
    }

    /// Deletes sessions (messages and summaries with them) not appended to since `before`.
    pub async fn expire_sessions(&self, before: DateTime<Utc>) -> Result<u64, Error> {
        let result = sqlx::query("DELETE FROM memory.sessions WHERE updated_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected())
    }
}
