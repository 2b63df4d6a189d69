//! The `memory.memories` table: long-term memories, their vectors, tombstones and each
//! tenant's usage.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::Error;
use crate::semantic::{MemoryRecord, NewMemory, Scope, ScopeKind, WriteOutcome};

/// What the in-process index needs of a memory; `deleted` rows (tombstones, expired or
/// deleted) leave the index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRow {
    pub id: i64,
    pub tenant: String,
    pub scope: Scope,
    pub embedding: Vec<f32>,
    pub metadata: BTreeMap<String, String>,
    pub importance: f32,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub deleted: bool,
    pub revision: i64,
    /// Bytes of its text, counted against the tenant's limit.
    pub bytes: u64,
}

/// Which revision of a memory is stored: enough to tell whether an index entry is current
/// without reading the row's vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowVersion {
    pub id: i64,
    pub tenant: String,
    pub revision: i64,
}

/// Where one input of a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A new memory (or, if the exact same text is already stored in its scope, that one).
    New,
    /// Merged into this stored memory, a near-duplicate.
    Existing(i64),
    /// Merged into an earlier input of the same write.
    Earlier(usize),
}

/// One input of a write, ready to store.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub memory: NewMemory,
    pub embedding: Vec<f32>,
    pub expires_at: Option<DateTime<Utc>>,
    pub target: Target,
}

/// Changes to one memory; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub text: Option<(String, Vec<f32>)>,
    pub importance: Option<f32>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Little-endian f32 bytes, as stored.
pub fn encode_vector(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode_vector(bytes: &[u8]) -> Result<Vec<f32>, sqlx::Error> {
    if !bytes.len().is_multiple_of(4) {
        return Err(sqlx::Error::Decode(
            format!(
                "a stored embedding has {} bytes, not a multiple of 4",
                bytes.len()
            )
            .into(),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

fn metadata_json(metadata: &BTreeMap<String, String>) -> String {
    serde_json::to_string(metadata).unwrap_or_else(|_| "{}".into())
}

fn decode_metadata(row: &PgRow) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let sqlx::types::Json(metadata) =
        row.try_get::<sqlx::types::Json<BTreeMap<String, String>>, _>("metadata")?;
    Ok(metadata)
}

fn decode_scope(row: &PgRow) -> Result<Scope, sqlx::Error> {
    let kind: String = row.try_get("scope_kind")?;
    let kind = ScopeKind::parse(&kind).ok_or_else(|| {
        sqlx::Error::Decode(format!("unknown scope kind {kind:?} in memory.memories").into())
    })?;
    Ok(Scope {
        kind,
        id: row.try_get("scope_id")?,
    })
}

fn count(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// Columns for [`IndexRow`].
const INDEX_COLUMNS: &str = "id, tenant, scope_kind, scope_id, embedding, metadata, importance, \
                             updated_at, expires_at, deleted_at IS NOT NULL AS deleted, revision, \
                             octet_length(content) AS bytes";
/// Columns for [`MemoryRecord`].
const RECORD_COLUMNS: &str = "id, scope_kind, scope_id, content, metadata, importance, \
                              duplicate_count, created_at, updated_at, expires_at";

fn index_row(row: &PgRow) -> Result<IndexRow, sqlx::Error> {
    Ok(IndexRow {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        scope: decode_scope(row)?,
        embedding: decode_vector(row.try_get::<&[u8], _>("embedding")?)?,
        metadata: decode_metadata(row)?,
        importance: row.try_get("importance")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
        deleted: row.try_get("deleted")?,
        revision: row.try_get("revision")?,
        bytes: u64::try_from(row.try_get::<i32, _>("bytes")?).unwrap_or(0),
    })
}

fn record(row: &PgRow) -> Result<MemoryRecord, sqlx::Error> {
    Ok(MemoryRecord {
        id: row.try_get("id")?,
        scope: decode_scope(row)?,
        text: row.try_get("content")?,
        metadata: decode_metadata(row)?,
        importance: row.try_get("importance")?,
        duplicate_count: count(row.try_get("duplicate_count")?),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

/// Access to `memory.memories`.
#[derive(Clone)]
pub struct Memories {
    pool: PgPool,
}

/// A merge keeps the later expiry of the two; `NULL` (never) wins.
const MERGED_EXPIRY: &str = "CASE WHEN m.expires_at IS NULL OR $EXP IS NULL THEN NULL \
                             ELSE GREATEST(m.expires_at, $EXP) END";

impl Memories {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Stores one write in one transaction: merges into near-duplicates and inserts the rest
    /// (an exact text already stored in the scope is merged by the unique index). Returns what
    /// happened to each input and the rows for the index.
    pub async fn write(
        &self,
        tenant: &str,
        items: &[Prepared],
        now: DateTime<Utc>,
    ) -> Result<(Vec<WriteOutcome>, Vec<IndexRow>), Error> {
        let mut tx = self.pool.begin().await?;
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; items.len()];
        let mut rows = Vec::new();
        // Inputs merged into an earlier one add to its count.
        let mut extra = vec![0i32; items.len()];
        for item in items {
            if let Target::Earlier(j) = item.target
                && let Some(count) = extra.get_mut(j)
            {
                *count += 1;
            }
        }
        let mut inserts = Vec::new();
        for (index, item) in items.iter().enumerate() {
            match item.target {
                Target::Existing(id) => {
                    match merge_into(&mut tx, tenant, id, item, 1 + extra[index], now).await? {
                        Some((outcome, row)) => {
                            outcomes[index] = Some(outcome);
                            rows.push(row);
                        }
                        // Deleted in the meantime: store it as new after all.
                        None => inserts.push(index),
                    }
                }
                Target::New => inserts.push(index),
                Target::Earlier(_) => {}
            }
        }
        insert(
            &mut tx,
            tenant,
            items,
            &inserts,
            &extra,
            now,
            &mut outcomes,
            &mut rows,
        )
        .await?;
        tx.commit().await?;
        // Inputs merged into an earlier input answer with its id and final count.
        let mut results = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let outcome = match item.target {
                Target::Earlier(j) => outcomes
                    .get(j)
                    .copied()
                    .flatten()
                    .map(|o| WriteOutcome { merged: true, ..o }),
                _ => outcomes[index],
            };
            results.push(outcome.ok_or_else(|| {
                sqlx::Error::Protocol(format!("write input {index} has no stored row"))
            })?);
        }
        Ok((results, rows))
    }

    /// The live memories of `tenant` among `ids` (not deleted, not expired at `now`), in no
    /// order.
    pub async fn records(
        &self,
        tenant: &str,
        ids: &[i64],
        now: DateTime<Utc>,
    ) -> Result<Vec<MemoryRecord>, Error> {
        // Selected by id alone, the tenant checked here: given `tenant = $1` too, a planner
        // without statistics (a young or freshly loaded table) walked the tenant's whole
        // exact-text index instead of the primary key (20 ms instead of 0.3 ms at 20,000).
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS}, tenant FROM memory.memories \
             WHERE id = ANY($1) AND deleted_at IS NULL \
               AND (expires_at IS NULL OR expires_at > $2)"
        ))
        .bind(ids)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<&str, _>("tenant")? == tenant {
                records.push(record(row)?);
            }
        }
        Ok(records)
    }

    /// One live memory, or `None`.
    pub async fn get(
        &self,
        tenant: &str,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<MemoryRecord>, Error> {
        Ok(self.records(tenant, &[id], now).await?.pop())
    }

    /// Applies `changes` to a live memory; `None` when there is none.
    pub async fn update(
        &self,
        tenant: &str,
        id: i64,
        changes: &Changes,
        now: DateTime<Utc>,
    ) -> Result<Option<(MemoryRecord, IndexRow)>, Error> {
        let (text, embedding) = match &changes.text {
            Some((text, embedding)) => (Some(text.as_str()), Some(encode_vector(embedding))),
            None => (None, None),
        };
        let row = sqlx::query(&format!(
            "UPDATE memory.memories SET \
                 content = COALESCE($3, content), embedding = COALESCE($4, embedding), \
                 importance = COALESCE($5, importance), \
                 metadata = COALESCE($6::jsonb, metadata), \
                 expires_at = COALESCE($7, expires_at), updated_at = $8, \
                 revision = nextval('memory.memory_revision'), changed_at = now() \
             WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL \
               AND (expires_at IS NULL OR expires_at > $8) \
             RETURNING {RECORD_COLUMNS}, tenant, embedding, false AS deleted, revision, \
                 octet_length(content) AS bytes"
        ))
        .bind(tenant)
        .bind(id)
        .bind(text)
        .bind(embedding)
        .bind(changes.importance)
        .bind(changes.metadata.as_ref().map(metadata_json))
        .bind(changes.expires_at)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(|error| {
            unique_violation(
                error,
                "text",
                "this text is already stored in the memory's scope",
            )
        })?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some((record(&row)?, index_row(&row)?)))
    }

    /// Deletes a live memory (leaving a tombstone for the other replicas); `None` when there
    /// was none.
    pub async fn delete(
        &self,
        tenant: &str,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<IndexRow>, Error> {
        let row = sqlx::query(&format!(
            "UPDATE memory.memories SET deleted_at = $3, \
                 revision = nextval('memory.memory_revision'), changed_at = now() \
             WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL \
             RETURNING {INDEX_COLUMNS}"
        ))
        .bind(tenant)
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(index_row).transpose().map_err(Error::from)
    }

    /// Live memories with an id above `after_id`, by id: the index is rebuilt page by page.
    pub async fn live_page(&self, after_id: i64, limit: i64) -> Result<Vec<IndexRow>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {INDEX_COLUMNS} FROM memory.memories \
             WHERE deleted_at IS NULL AND id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(index_row).collect::<Result<_, _>>()?)
    }

    /// These memories as they are now, tombstones included.
    pub async fn index_rows(&self, ids: &[i64]) -> Result<Vec<IndexRow>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {INDEX_COLUMNS} FROM memory.memories WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(index_row).collect::<Result<_, _>>()?)
    }

    /// The versions of memories changed (by the database's clock) after `since`, tombstones
    /// included: ids and revisions only, so re-reading an overlap costs little.
    pub async fn changed_since(&self, since: DateTime<Utc>) -> Result<Vec<RowVersion>, Error> {
        let rows =
            sqlx::query("SELECT id, tenant, revision FROM memory.memories WHERE changed_at > $1")
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                Ok(RowVersion {
                    id: row.try_get("id")?,
                    tenant: row.try_get("tenant")?,
                    revision: row.try_get("revision")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Error::from)
    }

    /// The database's clock, which orders `changed_at`.
    pub async fn database_now(&self) -> Result<DateTime<Utc>, Error> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Turns memories expired at `now` into tombstones. Returns them, for the index and the
    /// other replicas.
    pub async fn expire(&self, now: DateTime<Utc>, batch: i64) -> Result<Vec<IndexRow>, Error> {
        let rows = sqlx::query(&format!(
            "UPDATE memory.memories SET deleted_at = $1, \
                 revision = nextval('memory.memory_revision'), changed_at = now() \
             WHERE id IN (SELECT id FROM memory.memories \
                          WHERE deleted_at IS NULL AND expires_at <= $1 \
                          ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING {INDEX_COLUMNS}"
        ))
        .bind(now)
        .bind(batch)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(index_row).collect::<Result<_, _>>()?)
    }

    /// Purges tombstones older than `before` (every replica has long seen them).
    pub async fn purge_tombstones(&self, before: DateTime<Utc>) -> Result<u64, Error> {
        let result = sqlx::query(
            "DELETE FROM memory.memories WHERE deleted_at IS NOT NULL AND changed_at < $1",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }
}

/// A unique-index violation as the caller's mistake; other errors as they are.
fn unique_violation(error: sqlx::Error, field: &str, reason: &str) -> Error {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => Error::invalid(field, reason),
        _ => Error::Database(error),
    }
}

async fn merge_into(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    id: i64,
    item: &Prepared,
    added: i32,
    now: DateTime<Utc>,
) -> Result<Option<(WriteOutcome, IndexRow)>, Error> {
    let row = sqlx::query(&format!(
        "UPDATE memory.memories m SET duplicate_count = m.duplicate_count + $3, \
             importance = GREATEST(m.importance, $4), updated_at = $5, \
             expires_at = {}, metadata = m.metadata || $7::jsonb, \
             revision = nextval('memory.memory_revision'), changed_at = now() \
         WHERE m.tenant = $1 AND m.id = $2 AND m.deleted_at IS NULL \
         RETURNING {INDEX_COLUMNS}, duplicate_count",
        MERGED_EXPIRY.replace("$EXP", "$6::timestamptz")
    ))
    .bind(tenant)
    .bind(id)
    .bind(added)
    .bind(item.memory.importance)
    .bind(now)
    .bind(item.expires_at)
    .bind(metadata_json(&item.memory.metadata))
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let outcome = WriteOutcome {
        id,
        merged: true,
        duplicate_count: count(row.try_get("duplicate_count")?),
    };
    Ok(Some((outcome, index_row(&row)?)))
}

/// Inserts `items[indices]`; an exact text already stored in its scope is merged instead.
#[allow(clippy::too_many_arguments)]
async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    items: &[Prepared],
    indices: &[usize],
    extra: &[i32],
    now: DateTime<Utc>,
    outcomes: &mut [Option<WriteOutcome>],
    rows: &mut Vec<IndexRow>,
) -> Result<(), Error> {
    if indices.is_empty() {
        return Ok(());
    }
    let mut kinds = Vec::with_capacity(indices.len());
    let mut scope_ids = Vec::with_capacity(indices.len());
    let mut contents = Vec::with_capacity(indices.len());
    let mut embeddings = Vec::with_capacity(indices.len());
    let mut metadata = Vec::with_capacity(indices.len());
    let mut importance = Vec::with_capacity(indices.len());
    let mut expiry = Vec::with_capacity(indices.len());
    let mut counts = Vec::with_capacity(indices.len());
    for &index in indices {
        let item = &items[index];
        kinds.push(item.memory.scope.kind.as_str());
        scope_ids.push(item.memory.scope.id.as_str());
        contents.push(item.memory.text.as_str());
        embeddings.push(encode_vector(&item.embedding));
        metadata.push(metadata_json(&item.memory.metadata));
        importance.push(item.memory.importance);
        expiry.push(item.expires_at);
        counts.push(1 + extra[index]);
    }
    let returned = sqlx::query(&format!(
        "INSERT INTO memory.memories AS m (tenant, scope_kind, scope_id, content, embedding, \
             metadata, importance, duplicate_count, created_at, updated_at, expires_at) \
         SELECT $1, i.kind, i.scope_id, i.content, i.embedding, i.metadata::jsonb, \
             i.importance, i.count, $10, $10, i.expires_at \
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::real[], \
                     $8::integer[], $9::timestamptz[]) \
             AS i(kind, scope_id, content, embedding, metadata, importance, count, expires_at) \
         ON CONFLICT (md5(content), tenant, scope_kind, scope_id) WHERE deleted_at IS NULL \
         DO UPDATE SET duplicate_count = m.duplicate_count + EXCLUDED.duplicate_count, \
             importance = GREATEST(m.importance, EXCLUDED.importance), \
             updated_at = EXCLUDED.updated_at, expires_at = {}, \
             metadata = m.metadata || EXCLUDED.metadata, \
             revision = nextval('memory.memory_revision'), changed_at = now() \
         RETURNING {INDEX_COLUMNS}, duplicate_count, content, (xmax = 0) AS inserted",
        MERGED_EXPIRY.replace("$EXP", "EXCLUDED.expires_at")
    ))
    .bind(tenant)
    .bind(&kinds)
    .bind(&scope_ids)
    .bind(&contents)
    .bind(&embeddings)
    .bind(&metadata)
    .bind(&importance)
    .bind(&counts)
    .bind(&expiry)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    // RETURNING has no defined order: match rows back by scope and text, unique in one write.
    let mut by_key: BTreeMap<(Scope, String), usize> = BTreeMap::new();
    for &index in indices {
        let item = &items[index];
        by_key.insert((item.memory.scope.clone(), item.memory.text.clone()), index);
    }
    for row in &returned {
        let scope = decode_scope(row)?;
        let content: String = row.try_get("content")?;
        let inserted: bool = row.try_get("inserted")?;
        if let Some(&index) = by_key.get(&(scope, content)) {
            outcomes[index] = Some(WriteOutcome {
                id: row.try_get("id")?,
                merged: !inserted,
                duplicate_count: count(row.try_get("duplicate_count")?),
            });
        }
        rows.push(index_row(row)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_through_bytes() {
        let values = vec![0.25f32, -1.5, 3.0e-8, f32::MAX];
        let bytes = encode_vector(&values);
        assert_eq!(bytes.len(), 16);
        assert_eq!(decode_vector(&bytes).expect("decodes"), values);
        assert!(decode_vector(&[1, 2, 3]).is_err());
    }
}
