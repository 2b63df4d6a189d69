//! Long-term semantic memory: writes (embed, merge near-duplicates, persist, index, tell the
//! other replicas), searches (index, then PostgreSQL for the live rows, then ranking), the
//! index's sync between replicas, and the retention sweeper.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use colony_bus::Bus;
use colony_proto::v1;
use colony_runtime::Runtime;
use colony_runtime::clock::Clock;
use futures::StreamExt as _;
use prost::Message as _;

use crate::config::{RetentionConfig, TenantLimitsConfig};
use crate::embeddings::Embeddings;
use crate::index::MemoryIndex;
use crate::memories::{Changes, IndexRow, Memories, Prepared, Target};
use crate::semantic::{
    MemoryRecord, NewMemory, Ranking, ScopeKind, ScoredMemory, SearchFilter, WriteOutcome, dot,
};
use crate::{Error, metrics};

/// Everything semantic memory needs, shared by the gRPC handlers and background tasks.
pub struct LongTerm {
    pub memories: Memories,
    pub index: Arc<MemoryIndex>,
    pub embeddings: Arc<Embeddings>,
    pub ranking: Ranking,
    pub dedupe_similarity: f32,
    pub retention: RetentionConfig,
    pub limits: TenantLimitsConfig,
    pub clock: Arc<dyn Clock>,
    pub bus: Bus,
    /// This replica's name in change events.
    pub origin: String,
}

/// What a search is asked with.
pub enum Query {
    Text(String),
    Vector(Vec<f32>),
}

/// Rows read per page when the index is rebuilt.
const REBUILD_PAGE: i64 = 5_000;
/// Memories expired per sweeper statement.
const EXPIRE_BATCH: i64 = 1_000;

fn plus(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(ttl)
        .ok()
        .and_then(|ttl| now.checked_add_signed(ttl))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl LongTerm {
    /// The default TTL of a scope kind.
    fn scope_ttl(&self, kind: ScopeKind) -> Option<Duration> {
        match kind {
            ScopeKind::Tenant => self.retention.tenant_ttl,
            ScopeKind::Role => self.retention.role_ttl,
            ScopeKind::Run => self.retention.run_ttl,
            ScopeKind::Session => self.retention.session_ttl,
        }
    }

    /// Stores validated memories of one tenant; one outcome per input, in order.
    pub async fn write(
        &self,
        tenant: &str,
        inputs: Vec<NewMemory>,
    ) -> Result<Vec<WriteOutcome>, Error> {
        // Embed what the caller did not, in one batch.
        let missing: Vec<String> = inputs
            .iter()
            .filter(|input| input.embedding.is_none())
            .map(|input| input.text.clone())
            .collect();
        let mut embedded = if missing.is_empty() {
            Vec::new().into_iter()
        } else {
            self.embeddings.embed(missing).await?.into_iter()
        };
        let now = self.clock.now();
        let mut items: Vec<Prepared> = Vec::with_capacity(inputs.len());
        for input in inputs {
            let embedding = match &input.embedding {
                Some(vector) => vector.clone(),
                None => embedded.next().ok_or_else(|| {
                    Error::Unavailable("the embedding model returned too few vectors".into())
                })?,
            };
            let target = self.target(tenant, &input, &embedding, &items, now);
            let expires_at = input
                .ttl
                .or_else(|| self.scope_ttl(input.scope.kind))
                .map(|ttl| plus(now, ttl));
            items.push(Prepared {
                memory: input,
                embedding,
                expires_at,
                target,
            });
        }
        let new: Vec<&Prepared> = items
            .iter()
            .filter(|item| item.target == Target::New)
            .collect();
        self.check_limits(
            tenant,
            new.len() as u64,
            new.iter().map(|item| item.memory.text.len() as u64).sum(),
        )?;
        let (outcomes, rows) = self.memories.write(tenant, &items, now).await?;
        let merged = outcomes.iter().filter(|outcome| outcome.merged).count();
        ::metrics::counter!(metrics::MEMORIES_WRITTEN, "result" => "stored")
            .increment((outcomes.len() - merged) as u64);
        ::metrics::counter!(metrics::MEMORIES_WRITTEN, "result" => "merged")
            .increment(merged as u64);
        self.applied(tenant, &rows).await;
        Ok(outcomes)
    }

    /// Fails when adding `count` memories of `bytes` would pass the tenant's limits. The
    /// count comes from this replica's index, so writes racing on several replicas can pass a
    /// limit by what the replicas have not yet heard of each other (a sync interval at most).
    fn check_limits(&self, tenant: &str, count: u64, bytes: u64) -> Result<(), Error> {
        let limit = self.limits.for_tenant(tenant);
        let (held, held_bytes) = self.index.usage(tenant);
        if count > 0 && held + count > limit.max_memories {
            return Err(Error::LimitExceeded(format!(
                "tenant {tenant:?} would hold {} memories; its limit is {}",
                held + count,
                limit.max_memories
            )));
        }
        if bytes > 0 && held_bytes + bytes > limit.max_bytes {
            return Err(Error::LimitExceeded(format!(
                "tenant {tenant:?} would hold {} bytes of memories; its limit is {}",
                held_bytes + bytes,
                limit.max_bytes
            )));
        }
        Ok(())
    }

    /// Where one input goes: into an earlier input of this write or a stored memory of the same
    /// scope it nearly duplicates, or new.
    fn target(
        &self,
        tenant: &str,
        input: &NewMemory,
        embedding: &[f32],
        earlier: &[Prepared],
        now: DateTime<Utc>,
    ) -> Target {
        let duplicate_of_earlier = earlier.iter().position(|item| {
            item.target == Target::New
                && item.memory.scope == input.scope
                && (item.memory.text == input.text
                    || dot(&item.embedding, embedding) >= self.dedupe_similarity)
        });
        if let Some(j) = duplicate_of_earlier {
            return Target::Earlier(j);
        }
        match self.index.nearest_in_scope(
            tenant,
            &input.scope,
            embedding,
            self.dedupe_similarity,
            now,
        ) {
            Some((id, _)) => Target::Existing(id),
            None => Target::New,
        }
    }

    /// Applies rows this replica changed to its index, then tells the other replicas.
    async fn applied(&self, tenant: &str, rows: &[IndexRow]) {
        self.index.apply(rows);
        ::metrics::gauge!(metrics::INDEX_MEMORIES).set(self.index.len() as f64);
        let event = v1::MemoryChanged {
            tenant: tenant.to_owned(),
            ids: rows.iter().map(|row| row.id).collect(),
            origin: self.origin.clone(),
        };
        let msg_id = format!(
            "memory-{}-{}",
            self.origin,
            rows.iter().map(|row| row.revision).max().unwrap_or(0)
        );
        if let Err(error) = self
            .bus
            .publish(colony_bus::subjects::MEMORY_CHANGED, &msg_id, &event)
            .await
        {
            // The other replicas still pick the change up on their next pass.
            tracing::warn!(%error, "could not announce a memory change");
            ::metrics::counter!(metrics::SYNC_ERRORS, "stage" => "publish").increment(1);
        }
    }

    /// The memories of `tenant` most relevant to `query`, best first.
    pub async fn search(
        &self,
        tenant: &str,
        query: Query,
        filter: &SearchFilter,
        limit: usize,
    ) -> Result<Vec<ScoredMemory>, Error> {
        let vector = match query {
            Query::Vector(vector) => vector,
            Query::Text(text) => self.embeddings.embed_one(&text).await?,
        };
        let now = self.clock.now();
        // More candidates than asked for: recency and importance can reorder them.
        let candidates = (limit * 3).max(30);
        let hits = self.index.search(tenant, &vector, filter, candidates, now);
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = hits.iter().map(|(id, _)| *id).collect();
        // PostgreSQL decides what is live: a memory deleted on another replica a moment ago is
        // gone here too, even before this replica's index hears of it.
        let records = self.memories.records(tenant, &ids, now).await?;
        let similarity: std::collections::HashMap<i64, f32> = hits.into_iter().collect();
        let mut scored: Vec<ScoredMemory> = records
            .into_iter()
            .filter_map(|memory| {
                let similarity = *similarity.get(&memory.id)?;
                let score =
                    self.ranking
                        .score(similarity, memory.updated_at, memory.importance, now);
                Some(ScoredMemory {
                    memory,
                    score,
                    similarity,
                })
            })
            .collect();
        scored.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.memory.id.cmp(&b.memory.id))
        });
        scored.truncate(limit);
        Ok(scored)
    }

    pub async fn get(&self, tenant: &str, id: i64) -> Result<MemoryRecord, Error> {
        self.memories
            .get(tenant, id, self.clock.now())
            .await?
            .ok_or_else(|| not_found(id))
    }

    /// Changes a memory; a new text is embedded again.
    pub async fn update(
        &self,
        tenant: &str,
        id: i64,
        text: Option<String>,
        importance: Option<f32>,
        metadata: Option<std::collections::BTreeMap<String, String>>,
        ttl: Option<Duration>,
    ) -> Result<MemoryRecord, Error> {
        let text = match text {
            Some(text) => {
                // Counted as if nothing were freed: a replaced text's bytes come back after.
                self.check_limits(tenant, 0, text.len() as u64)?;
                let vector = self.embeddings.embed_one(&text).await?;
                Some((text, vector))
            }
            None => None,
        };
        let now = self.clock.now();
        let changes = Changes {
            text,
            importance,
            metadata,
            expires_at: ttl.map(|ttl| plus(now, ttl)),
        };
        let (record, row) = self
            .memories
            .update(tenant, id, &changes, now)
            .await?
            .ok_or_else(|| not_found(id))?;
        self.applied(tenant, std::slice::from_ref(&row)).await;
        Ok(record)
    }

    /// Deletes a memory; `false` when there was none.
    pub async fn delete(&self, tenant: &str, id: i64) -> Result<bool, Error> {
        let Some(row) = self.memories.delete(tenant, id, self.clock.now()).await? else {
            return Ok(false);
        };
        self.applied(tenant, std::slice::from_ref(&row)).await;
        Ok(true)
    }

    /// Rebuilds the index from PostgreSQL, page by page. Returns the number of memories.
    pub async fn rebuild(&self) -> Result<usize, Error> {
        let started = std::time::Instant::now();
        let mut after = 0;
        let mut total = 0;
        loop {
            let rows = self.memories.live_page(after, REBUILD_PAGE).await?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            total += rows.len();
            let index = Arc::clone(&self.index);
            // Graph inserts are CPU work: keep them off the async threads.
            tokio::task::spawn_blocking(move || index.apply(&rows))
                .await
                .map_err(|error| Error::Unavailable(format!("index rebuild: {error}")))?;
        }
        ::metrics::gauge!(metrics::INDEX_MEMORIES).set(self.index.len() as f64);
        tracing::info!(memories = total, elapsed = ?started.elapsed(), "memory index rebuilt");
        Ok(total)
    }

    /// One sweep at the clock's now: expires memories, purges old tombstones and sessions.
    pub async fn sweep(&self, sessions: &crate::store::Store) -> Result<(), Error> {
        let now = self.clock.now();
        loop {
            let expired = self.memories.expire(now, EXPIRE_BATCH).await?;
            if expired.is_empty() {
                break;
            }
            ::metrics::counter!(metrics::MEMORIES_EXPIRED).increment(expired.len() as u64);
            let mut by_tenant: std::collections::BTreeMap<String, Vec<IndexRow>> =
                Default::default();
            for row in expired {
                by_tenant.entry(row.tenant.clone()).or_default().push(row);
            }
            for (tenant, rows) in by_tenant {
                self.applied(&tenant, &rows).await;
            }
        }
        let tombstones_before = self.memories.database_now().await?
            - TimeDelta::from_std(self.retention.tombstone_retention).unwrap_or(TimeDelta::MAX);
        self.memories.purge_tombstones(tombstones_before).await?;
        if let Some(ttl) = self.retention.session_history_ttl {
            let before = now - TimeDelta::from_std(ttl).unwrap_or(TimeDelta::MAX);
            let removed = sessions.expire_sessions(before).await?;
            ::metrics::counter!(metrics::SESSIONS_EXPIRED).increment(removed);
        }
        Ok(())
    }
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("memory {id} does not exist (for this tenant)"))
}

/// Keeps this replica's index current: subscribes to change events first, rebuilds from
/// PostgreSQL, then applies announced changes as they come and, every `sync_interval`, whatever
/// changed since the last pass (in case an event was missed). Marks nothing ready: the caller
/// waits for the returned rebuild.
pub async fn start_sync(
    long_term: Arc<LongTerm>,
    runtime: &Runtime,
    sync_interval: Duration,
) -> anyhow::Result<()> {
    let subject = long_term.bus.subject(colony_bus::subjects::MEMORY_CHANGED);
    let mut changes = long_term.bus.client().subscribe(subject).await?;
    let mut since = long_term.memories.database_now().await?;
    long_term.rebuild().await?;
    let shutdown = runtime.shutdown.clone();
    // Rows changed this long before a pass's start are read again: a transaction that took a
    // `changed_at` before the last pass but committed after it is still seen.
    let overlap = TimeDelta::from_std(sync_interval * 2).unwrap_or(TimeDelta::MAX);
    runtime.spawn(async move {
        // The first pass one interval after the rebuild, which has just read everything.
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + sync_interval, sync_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                message = changes.next() => {
                    let Some(message) = message else { break };
                    apply_event(&long_term, &message.payload).await;
                }
                _ = ticker.tick() => {
                    match catch_up(&long_term, since - overlap).await {
                        Ok(started) => since = started,
                        Err(error) => {
                            tracing::warn!(%error, "memory index catch-up failed");
                            ::metrics::counter!(metrics::SYNC_ERRORS, "stage" => "catch_up").increment(1);
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

async fn apply_event(long_term: &LongTerm, payload: &[u8]) {
    let event = match v1::MemoryChanged::decode(payload) {
        Ok(event) => event,
        Err(error) => {
            tracing::warn!(%error, "undecodable memory change event");
            ::metrics::counter!(metrics::SYNC_ERRORS, "stage" => "decode").increment(1);
            return;
        }
    };
    if event.origin == long_term.origin || event.ids.is_empty() {
        return;
    }
    match long_term.memories.index_rows(&event.ids).await {
        Ok(rows) => {
            let changed = long_term.index.apply(&rows);
            ::metrics::counter!(metrics::SYNC_APPLIED, "via" => "event").increment(changed as u64);
            ::metrics::gauge!(metrics::INDEX_MEMORIES).set(long_term.index.len() as f64);
        }
        Err(error) => {
            tracing::warn!(%error, "could not read announced memory changes");
            ::metrics::counter!(metrics::SYNC_ERRORS, "stage" => "read").increment(1);
        }
    }
}

/// Rows a catch-up pass reads in full at a time, bounding its memory after a bulk load.
const CATCH_UP_CHUNK: usize = 2_000;

/// Applies rows changed since `since`; returns the database time this pass started at. Only
/// ids and revisions are read for the whole window; full rows (with their vectors) only for
/// what this replica has not applied yet, so the overlap re-read each pass costs little.
async fn catch_up(long_term: &LongTerm, since: DateTime<Utc>) -> Result<DateTime<Utc>, Error> {
    let started = long_term.memories.database_now().await?;
    let versions = long_term.memories.changed_since(since).await?;
    let stale = long_term.index.stale(&versions);
    let mut changed = 0;
    for ids in stale.chunks(CATCH_UP_CHUNK) {
        let rows = long_term.memories.index_rows(ids).await?;
        changed += long_term.index.apply(&rows);
    }
    long_term
        .index
        .forget_removals_older_than(long_term.retention.tombstone_retention);
    ::metrics::counter!(metrics::SYNC_APPLIED, "via" => "catch_up").increment(changed as u64);
    ::metrics::gauge!(metrics::INDEX_MEMORIES).set(long_term.index.len() as f64);
    Ok(started)
}

/// Runs the retention sweeper every `interval` until shutdown.
pub fn start_sweeper(
    long_term: Arc<LongTerm>,
    sessions: crate::store::Store,
    runtime: &Runtime,
    interval: Duration,
) {
    let shutdown = runtime.shutdown.clone();
    runtime.spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    if let Err(error) = long_term.sweep(&sessions).await {
                        tracing::warn!(%error, "retention sweep failed");
                        ::metrics::counter!(metrics::SWEEP_ERRORS).increment(1);
                    }
                }
            }
        }
    });
}
