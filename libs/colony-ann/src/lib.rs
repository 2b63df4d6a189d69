//! In-process approximate nearest-neighbour search over unit-length `f32` embeddings, for the
//! memory service's semantic search.
//!
//! Vectors have a fixed dimension count per index and are L2-normalised by the caller, so the
//! dot product is the cosine similarity: higher is more similar. Keys are `u64` (the memory's
//! database id).
//!
//! - [`Hnsw`]: a Hierarchical Navigable Small World graph: inserts (one at a time, or many at
//!   once on every core), removes that take effect at once, filtered searches, and an exact
//!   (brute-force) search for small sets and ground truth.
//! - [`Index`]: an [`Hnsw`] that answers exactly while it is small.
//! - [`synthetic`]: reproducible test vectors that look like sentence embeddings (clustered) or
//!   do not (uniform).
//! - [`recall_at_k`]: how much of an exact answer an approximate one found.

mod error;
mod hnsw;
mod index;
mod kernel;
pub mod synthetic;

pub use error::AnnError;
pub use hnsw::{COMPACT_AT_DEAD_FRACTION, Hnsw, HnswParams};
pub use index::{DEFAULT_EXACT_BELOW, Index, IndexParams};

/// A search result: a key and its vector's similarity (dot product) to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// The key the vector was stored under.
    pub key: u64,
    /// The dot product of the stored vector and the query.
    pub score: f32,
}

/// The fraction of `exact`'s keys that `approx` also holds: 1.0 when it found them all (and
/// when `exact` is empty). Compare answers for the same `k`. A key that ties on score with one
/// of `exact`'s would be an equally good answer but counts as a miss; with real-valued vectors
/// such ties are vanishingly rare.
pub fn recall_at_k(approx: &[Hit], exact: &[Hit]) -> f64 {
    if exact.is_empty() {
        return 1.0;
    }
    let found = exact
        .iter()
        .filter(|truth| approx.iter().any(|hit| hit.key == truth.key))
        .count();
    found as f64 / exact.len() as f64
}

#[cfg(test)]
mod tests;
