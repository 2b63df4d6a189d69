//! The in-process nearest-neighbour index of every live memory, one per tenant so a search
//! can only ever see its own tenant's vectors. PostgreSQL stays the source of truth: the
//! index is rebuilt from it at start and brought up to date row by row ([`MemoryIndex::apply`]),
//! and a row is applied only when its revision is newer than what the index holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use chrono::{DateTime, Utc};
use colony_ann::{Hnsw, HnswParams};

use crate::memories::{IndexRow, RowVersion};
use crate::semantic::{Scope, SearchFilter};

/// What a search filters and ranks on, kept next to the vector.
#[derive(Debug, Clone)]
struct Entry {
    scope: Scope,
    metadata: BTreeMap<String, String>,
    expires_at: Option<DateTime<Utc>>,
    revision: i64,
    bytes: u64,
}

struct TenantIndex {
    graph: Hnsw,
    entries: HashMap<i64, Entry>,
    /// Bytes of text of every entry: the tenant's usage against its limit.
    bytes: u64,
    /// Revisions of memories removed, so an older copy of the row read before the removal
    /// cannot bring it back.
    removed: HashMap<i64, (i64, Instant)>,
}

/// Tuning of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexParams {
    pub dimensions: usize,
    /// Tenants with fewer memories are searched exactly.
    pub exact_below: usize,
    pub ef_search: usize,
}

/// Every tenant's index.
pub struct MemoryIndex {
    params: IndexParams,
    tenants: RwLock<HashMap<String, Arc<RwLock<TenantIndex>>>>,
}

/// Ids are database identities: positive, so they fit the graph's unsigned keys.
fn key(id: i64) -> u64 {
    u64::try_from(id).unwrap_or(0)
}

fn id(key: u64) -> i64 {
    i64::try_from(key).unwrap_or(i64::MAX)
}

impl MemoryIndex {
    pub fn new(params: IndexParams) -> Self {
        Self {
            params,
            tenants: RwLock::new(HashMap::new()),
        }
    }

    fn tenant(&self, tenant: &str) -> Option<Arc<RwLock<TenantIndex>>> {
        self.tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
            .cloned()
    }

    fn tenant_or_new(&self, tenant: &str) -> Arc<RwLock<TenantIndex>> {
        if let Some(index) = self.tenant(tenant) {
            return index;
        }
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| {
                Arc::new(RwLock::new(TenantIndex {
                    graph: Hnsw::new(self.params.dimensions, HnswParams::default()),
                    entries: HashMap::new(),
                    bytes: 0,
                    removed: HashMap::new(),
                }))
            })
            .clone()
    }

    /// Brings the index up to date with these rows (newer revisions win; tombstones remove).
    /// Returns how many rows changed it.
    pub fn apply(&self, rows: &[IndexRow]) -> usize {
        // Per tenant, the newest revision of each id.
        let mut by_tenant: BTreeMap<&str, BTreeMap<i64, &IndexRow>> = BTreeMap::new();
        for row in rows {
            let newest = by_tenant
                .entry(row.tenant.as_str())
                .or_default()
                .entry(row.id)
                .or_insert(row);
            if row.revision > newest.revision {
                *newest = row;
            }
        }
        let mut changed = 0;
        for (tenant, rows) in by_tenant {
            let index = self.tenant_or_new(tenant);
            let mut index = index.write().unwrap_or_else(PoisonError::into_inner);
            let rows: Vec<&IndexRow> = rows.into_values().collect();
            changed += index.apply(&rows);
        }
        changed
    }

    /// The ids among `versions` whose revision this index has not applied yet (unknown ids
    /// included): the rows a catch-up pass must read in full.
    pub fn stale(&self, versions: &[RowVersion]) -> Vec<i64> {
        let mut stale = Vec::new();
        let mut by_tenant: BTreeMap<&str, Vec<&RowVersion>> = BTreeMap::new();
        for version in versions {
            by_tenant
                .entry(version.tenant.as_str())
                .or_default()
                .push(version);
        }
        for (tenant, versions) in by_tenant {
            let Some(index) = self.tenant(tenant) else {
                stale.extend(versions.iter().map(|version| version.id));
                continue;
            };
            let index = index.read().unwrap_or_else(PoisonError::into_inner);
            stale.extend(
                versions
                    .iter()
                    .filter(|version| {
                        index
                            .known_revision(version.id)
                            .is_none_or(|known| known < version.revision)
                    })
                    .map(|version| version.id),
            );
        }
        stale
    }

    /// The `k` live memories of `tenant` most similar to `query` that pass `filter` at `now`,
    /// best first, as `(id, cosine similarity)`.
    pub fn search(
        &self,
        tenant: &str,
        query: &[f32],
        filter: &SearchFilter,
        k: usize,
        now: DateTime<Utc>,
    ) -> Vec<(i64, f32)> {
        let Some(index) = self.tenant(tenant) else {
            return Vec::new();
        };
        let index = index.read().unwrap_or_else(PoisonError::into_inner);
        let passes = |key: u64| {
            index.entries.get(&id(key)).is_some_and(|entry| {
                entry.expires_at.is_none_or(|at| at > now)
                    && filter.matches_scope(entry.scope.kind, &entry.scope.id)
                    && filter.matches_metadata(&entry.metadata)
            })
        };
        let hits = if index.entries.len() < self.params.exact_below {
            index.graph.exact_search(query, k, passes)
        } else {
            index
                .graph
                .search_with_ef(query, k, self.params.ef_search.max(k), passes)
        };
        hits.unwrap_or_default()
            .into_iter()
            .filter(|hit| hit.score >= filter.min_similarity)
            .map(|hit| (id(hit.key), hit.score))
            .collect()
    }

    /// The live memory in exactly `scope` most similar to `vector`, if any is at least
    /// `min_similarity` similar: what a new memory would be merged into.
    pub fn nearest_in_scope(
        &self,
        tenant: &str,
        scope: &Scope,
        vector: &[f32],
        min_similarity: f32,
        now: DateTime<Utc>,
    ) -> Option<(i64, f32)> {
        let filter = SearchFilter {
            scopes: vec![scope.clone()],
            metadata: BTreeMap::new(),
            min_similarity,
        };
        self.search(tenant, vector, &filter, 1, now)
            .into_iter()
            .next()
    }

    /// What `tenant` holds: memories and bytes of text.
    pub fn usage(&self, tenant: &str) -> (u64, u64) {
        self.tenant(tenant).map_or((0, 0), |index| {
            let index = index.read().unwrap_or_else(PoisonError::into_inner);
            (index.entries.len() as u64, index.bytes)
        })
    }

    /// Live memories indexed, over all tenants.
    pub fn len(&self) -> usize {
        self.tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|index| {
                index
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }

    /// Every indexed memory of `tenant` with its vector, by id (for checks against the store).
    pub fn snapshot(&self, tenant: &str) -> BTreeMap<i64, Vec<f32>> {
        let Some(index) = self.tenant(tenant) else {
            return BTreeMap::new();
        };
        let index = index.read().unwrap_or_else(PoisonError::into_inner);
        index
            .entries
            .keys()
            .filter_map(|&memory| {
                index
                    .graph
                    .get(key(memory))
                    .map(|vector| (memory, vector.to_vec()))
            })
            .collect()
    }

    /// Forgets removals older than `age`: no row read before them can still be on its way.
    pub fn forget_removals_older_than(&self, age: std::time::Duration) {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        for index in tenants.values() {
            let mut index = index.write().unwrap_or_else(PoisonError::into_inner);
            index.removed.retain(|_, (_, at)| at.elapsed() < age);
        }
    }
}

/// Below this many new vectors, a batch is inserted one by one (the parallel path costs more
/// CPU per vector and only pays off for a rebuild's pages).
const PARALLEL_INSERT_FROM: usize = 256;

impl TenantIndex {
    /// Applies rows of this tenant (ids unique); returns how many changed the index.
    /// The revision of `id` this index holds, or removed last.
    fn known_revision(&self, id: i64) -> Option<i64> {
        self.entries
            .get(&id)
            .map(|entry| entry.revision)
            .or_else(|| self.removed.get(&id).map(|(revision, _)| *revision))
    }

    fn apply(&mut self, rows: &[&IndexRow]) -> usize {
        let mut changed = 0;
        let mut inserts: Vec<&IndexRow> = Vec::new();
        for &row in rows {
            let known = self.known_revision(row.id);
            if known.is_some_and(|revision| revision >= row.revision) {
                continue;
            }
            if row.deleted {
                self.remove(row.id, row.revision);
                changed += 1;
                continue;
            }
            let same_vector = self
                .graph
                .get(key(row.id))
                .is_some_and(|vector| vector == row.embedding.as_slice());
            if same_vector {
                self.record(row);
                changed += 1;
            } else {
                inserts.push(row);
            }
        }
        let batch = inserts.len() >= PARALLEL_INSERT_FROM
            && self
                .graph
                .insert_many(
                    inserts
                        .iter()
                        .map(|row| (key(row.id), row.embedding.as_slice())),
                )
                .is_ok();
        for row in inserts {
            // Without the batch (small, or a row in it was refused), one by one.
            if !batch && let Err(error) = self.graph.insert(key(row.id), &row.embedding) {
                tracing::warn!(%error, memory = row.id, "a stored memory cannot be indexed");
                continue;
            }
            self.record(row);
            changed += 1;
        }
        changed
    }

    fn record(&mut self, row: &IndexRow) {
        self.removed.remove(&row.id);
        let old = self.entries.insert(
            row.id,
            Entry {
                scope: row.scope.clone(),
                metadata: row.metadata.clone(),
                expires_at: row.expires_at,
                revision: row.revision,
                bytes: row.bytes,
            },
        );
        self.bytes = self.bytes + row.bytes - old.map_or(0, |entry| entry.bytes.min(self.bytes));
    }

    fn remove(&mut self, memory_id: i64, revision: i64) {
        self.graph.remove(key(memory_id));
        if let Some(entry) = self.entries.remove(&memory_id) {
            self.bytes = self.bytes.saturating_sub(entry.bytes);
        }
        let removed = self
            .removed
            .entry(memory_id)
            .or_insert((revision, Instant::now()));
        removed.0 = removed.0.max(revision);
    }
}
