//! An index that answers exactly while it is small and through the graph once it is large.

use crate::{AnnError, Hit, Hnsw, HnswParams};

/// Below this many vectors, [`Index`] answers by scoring every vector: at a few thousand
/// vectors a linear scan of contiguous memory costs about what a graph search does, and it is
/// never wrong.
pub const DEFAULT_EXACT_BELOW: usize = 2_000;

/// How an [`Index`] is built and when it switches to the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexParams {
    /// The graph's parameters.
    pub hnsw: HnswParams,
    /// Searches score every vector while the index holds fewer than this many; 0 uses the graph
    /// always.
    pub exact_below: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        Self {
            hnsw: HnswParams::default(),
            exact_below: DEFAULT_EXACT_BELOW,
        }
    }
}

/// An [`Hnsw`] graph whose searches scan every vector while it holds fewer than
/// [`IndexParams::exact_below`] of them. The graph is kept up to date throughout, so crossing
/// the threshold in either direction costs nothing.
#[derive(Debug, Clone)]
pub struct Index {
    graph: Hnsw,
    exact_below: usize,
}

impl Index {
    /// An empty index of `dimensions`-long vectors.
    ///
    /// # Panics
    /// If `dimensions` is 0.
    pub fn new(dimensions: usize, params: IndexParams) -> Self {
        Self {
            graph: Hnsw::new(dimensions, params.hnsw),
            exact_below: params.exact_below,
        }
    }

    /// The graph, for what the index does not wrap.
    pub fn graph(&self) -> &Hnsw {
        &self.graph
    }

    /// The length every vector must have.
    pub fn dimensions(&self) -> usize {
        self.graph.dimensions()
    }

    /// How many keys the index holds.
    pub fn len(&self) -> usize {
        self.graph.len()
    }

    /// True if the index holds no key.
    pub fn is_empty(&self) -> bool {
        self.graph.is_empty()
    }

    /// True if `key` is in the index.
    pub fn contains(&self, key: u64) -> bool {
        self.graph.contains(key)
    }

    /// The vector stored under `key`.
    pub fn get(&self, key: u64) -> Option<&[f32]> {
        self.graph.get(key)
    }

    /// Every key in the index, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.graph.keys()
    }

    /// See [`Hnsw::insert`].
    ///
    /// # Errors
    /// As [`Hnsw::insert`].
    pub fn insert(&mut self, key: u64, vector: &[f32]) -> Result<(), AnnError> {
        self.graph.insert(key, vector)
    }

    /// See [`Hnsw::insert_many`].
    ///
    /// # Errors
    /// As [`Hnsw::insert_many`].
    pub fn insert_many<'a>(
        &mut self,
        items: impl IntoIterator<Item = (u64, &'a [f32])>,
    ) -> Result<(), AnnError> {
        self.graph.insert_many(items)
    }

    /// See [`Hnsw::insert_many_with_threads`].
    ///
    /// # Errors
    /// As [`Hnsw::insert_many`].
    pub fn insert_many_with_threads<'a>(
        &mut self,
        items: impl IntoIterator<Item = (u64, &'a [f32])>,
        threads: usize,
    ) -> Result<(), AnnError> {
        self.graph.insert_many_with_threads(items, threads)
    }

    /// See [`Hnsw::remove`].
    pub fn remove(&mut self, key: u64) -> bool {
        self.graph.remove(key)
    }

    /// See [`Hnsw::compact`].
    pub fn compact(&mut self) {
        self.graph.compact();
    }

    /// True while searches scan every vector rather than walk the graph.
    pub fn answers_exactly(&self) -> bool {
        self.len() < self.exact_below
    }

    /// The `k` most similar vectors whose key passes `filter`, best first: exact while the index
    /// is small, else as [`Hnsw::search`].
    ///
    /// # Errors
    /// [`AnnError::Dimension`] or [`AnnError::NonFinite`] for a malformed query.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, AnnError> {
        self.search_with_ef(query, k, self.graph.params().ef_search, filter)
    }

    /// As [`Index::search`] with a beam of `ef` nodes when the graph is used.
    ///
    /// # Errors
    /// [`AnnError::Dimension`] or [`AnnError::NonFinite`] for a malformed query.
    pub fn search_with_ef(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, AnnError> {
        if self.answers_exactly() {
            self.graph.exact_search(query, k, filter)
        } else {
            self.graph.search_with_ef(query, k, ef, filter)
        }
    }

    /// See [`Hnsw::exact_search`].
    ///
    /// # Errors
    /// [`AnnError::Dimension`] or [`AnnError::NonFinite`] for a malformed query.
    pub fn exact_search(
        &self,
        query: &[f32],
        k: usize,
        filter: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, AnnError> {
        self.graph.exact_search(query, k, filter)
    }
}
