//! The in-process nearest-neighbour index of every live memory, one per tenant so a search
//! can only ever see its own tenant's vectors. PostgreSQL stays the source of truth: the
//! index is rebuilt from it at start and brought up to date row by row ([`MemoryIndex::apply`]),
//! and a row is applied only when its revision is newer than what the index holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use chrono::{DateTime, Utc};
use colony_ann::{Hnsw, HnswParams};

use crate::memories::IndexRow;
use crate::semantic::{Scope, SearchFilter};

/// What a search filters and ranks on, kept next to the vector.
#[derive(Debug, Clone)]
struct Entry {
    scope: Scope,
    metadata: BTreeMap<String, String>,
    expires_at: Option<DateTime<Utc>>,
    revision: i64,
}

struct TenantIndex {
    graph: Hnsw,
    entries: HashMap<i64, Entry>,
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
                    removed: HashMap::new(),
                }))
            })
            .clone()
    }

    /// Brings the index up to date with these rows (newer revisions win; tombstones remove).
    /// Returns how many rows changed it.
    pub fn apply(&self, rows: &[IndexRow]) -> usize {
        let mut by_tenant: BTreeMap<&str, Vec<&IndexRow>> = BTreeMap::new();
        for row in rows {
            by_tenant.entry(row.tenant.as_str()).or_default().push(row);
        }
        let mut changed = 0;
        for (tenant, rows) in by_tenant {
            let index = self.tenant_or_new(tenant);
            let mut index = index.write().unwrap_or_else(PoisonError::into_inner);
            for row in rows {
                changed += usize::from(index.apply(row));
            }
        }
        changed
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

impl TenantIndex {
    fn apply(&mut self, row: &IndexRow) -> bool {
        let known = self
            .entries
            .get(&row.id)
            .map(|entry| entry.revision)
            .or_else(|| self.removed.get(&row.id).map(|(revision, _)| *revision));
        if known.is_some_and(|revision| revision >= row.revision) {
            return false;
        }
        if row.deleted {
            self.remove(row.id, row.revision);
            return true;
        }
        let same_vector = self
            .graph
            .get(key(row.id))
            .is_some_and(|vector| vector == row.embedding.as_slice());
        if !same_vector && let Err(error) = self.graph.insert(key(row.id), &row.embedding) {
            tracing::warn!(%error, memory = row.id, "a stored memory cannot be indexed");
            return false;
        }
        self.removed.remove(&row.id);
        self.entries.insert(
            row.id,
            Entry {
                scope: row.scope.clone(),
                metadata: row.metadata.clone(),
                expires_at: row.expires_at,
                revision: row.revision,
            },
        );
        true
    }

    fn remove(&mut self, memory_id: i64, revision: i64) {
        self.graph.remove(key(memory_id));
        self.entries.remove(&memory_id);
        let removed = self
            .removed
            .entry(memory_id)
            .or_insert((revision, Instant::now()));
        removed.0 = removed.0.max(revision);
    }
}
