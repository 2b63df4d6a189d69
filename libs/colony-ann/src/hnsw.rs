//! The Hierarchical Navigable Small World graph (Malkov & Yashunin, 2016).
//!
//! Every vector is a node of layer 0; a node reaches layer `l` with probability `m^-l`, so each
//! layer up is about `m` times sparser. A search walks greedily down the sparse layers to land
//! near the query, then runs a beam search of width `ef` on layer 0.
//!
//! The walk compares 8-bit codes of the vectors rather than the vectors: a code is a quarter of
//! the memory, and at a hundred thousand vectors the walk's time goes mostly into fetching each
//! node it scores from main memory. Rounding moves scores slightly, which can swap near-ties in
//! the walk's order but not lose the neighbourhood; the nodes the walk ends with are then scored
//! exactly from the `f32` vectors, and those are the scores returned.
//!
//! Nodes are numbered by slot, in insertion order; the slot indexes the vector arena, the node
//! blocks (links and code), the key table and the upper layers' links. Removing a key only
//! marks its slot dead (a tombstone): the node stays in the graph as a stepping stone, since
//! unlinking it would cut paths other nodes rely on, but it is never returned. Once dead slots
//! make up more than [`COMPACT_AT_DEAD_FRACTION`] of the nodes, the graph is rebuilt from the
//! live vectors.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::kernel::{Kernel, quantise};
use crate::{AnnError, Hit};

/// When dead (removed or replaced) nodes exceed this fraction of all nodes, the next insert or
/// remove rebuilds the graph from the live vectors. Dead nodes cost memory and make each search
/// step through more nodes it cannot return; a rebuild costs about as much as inserting every
/// live vector again, so a quarter keeps that cost to a few inserts per removal.
pub const COMPACT_AT_DEAD_FRACTION: f64 = 0.25;

/// How many new nodes [`Hnsw::insert_many`] links per batch when it has more than one thread
/// (with one, it inserts one node at a time). Within a batch the nodes are compared pairwise
/// (about `BATCH / 2` code dot products per node, cheap next to a walk) and their walks run in
/// parallel; between batches the threads are joined.
const BATCH: usize = 256;

/// How many nodes a planning thread takes at a time.
const PLANS_PER_CLAIM: usize = 4;

/// Fewer plans than this per thread are made on the calling thread: a thread costs more to
/// start than a few walks.
const MIN_PLANS_PER_THREAD: usize = 16;

/// No node is placed above this layer. With `m = 16` a node reaches layer 8 with probability
/// 16⁻⁸, so the cap only matters for tiny `m`, where it keeps the layer count bounded.
const MAX_LAYER: usize = 16;

/// The graph's tuning knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    /// Links kept per node on the layers above 0; layer 0 keeps `2 * m`. More links raise
    /// recall and memory and slow inserts. At least 2 (smaller values are raised to 2).
    pub m: usize,
    /// Beam width while inserting: how many near nodes a new node chooses its links from.
    /// Higher builds a better graph, more slowly. At least `m`.
    pub ef_construction: usize,
    /// Default beam width while searching ([`Hnsw::search`]); a search for `k` results uses at
    /// least `k`. Higher raises recall and latency.
    pub ef_search: usize,
    /// Seeds the draw of each node's top layer, so that the same inserts in the same order build
    /// the same graph.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
            seed: 0x636f_6c6f_6e79,
        }
    }
}

/// A node number paired with its similarity to the vector being searched for.
#[derive(Debug, Clone, Copy)]
struct Scored {
    score: f32,
    slot: u32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    /// Higher score is greater; on equal scores the older node is greater, so every ordering is
    /// total and results do not depend on heap internals.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.slot.cmp(&self.slot))
    }
}

/// One bit per node: has this search scored it yet.
struct Visited {
    words: Vec<u64>,
}

impl Visited {
    fn new(nodes: usize) -> Self {
        Self {
            words: vec![0; nodes.div_ceil(64)],
        }
    }

    fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Marks `slot`; true if it was not marked before.
    fn mark(&mut self, slot: u32) -> bool {
        let word = &mut self.words[slot as usize / 64];
        let bit = 1u64 << (slot % 64);
        let fresh = *word & bit == 0;
        *word |= bit;
        fresh
    }
}

/// Buffers one insert or search reuses across the layers it visits.
struct Scratch {
    visited: Visited,
    slots: Vec<u32>,
    /// Code dot products, in code units.
    raw: Vec<i32>,
}

impl Scratch {
    fn new(nodes: usize) -> Self {
        Self {
            visited: Visited::new(nodes),
            slots: Vec::new(),
            raw: Vec::new(),
        }
    }
}

/// The code of the vector a walk looks for.
struct Probe {
    code: Vec<i8>,
    scale: f32,
}

impl Probe {
    fn new(vector: &[f32]) -> Self {
        let mut code = Vec::with_capacity(vector.len());
        let scale = quantise(vector, &mut code);
        Self { code, scale }
    }
}

/// An HNSW index of unit-length `f32` vectors under `u64` keys, scored by dot product (higher is
/// more similar).
///
/// Searches take `&self` and may run concurrently (behind an `RwLock`, say); inserts and removes
/// take `&mut self`. `Clone` gives an independent copy, so a caller can compact or rebuild a copy
/// without holding a write lock and then swap it in.
#[derive(Clone)]
pub struct Hnsw {
    dimensions: usize,
    params: HnswParams,
    /// Links per node on layer 0.
    max_links_bottom: usize,
    /// Where in a node's block its code's scale is; its code follows.
    scale_word: usize,
    /// `u32`s per node in `nodes`.
    node_words: usize,
    /// `1 / ln(m)`: scales the exponential draw of a node's top layer.
    layer_scale: f64,
    kernel: Kernel,
    rng: StdRng,

    /// Every node's vector, `dimensions` values each, in slot order.
    vectors: Vec<f32>,
    /// What the walk reads of each node, in one block per node in slot order: its layer-0
    /// link count and `max_links_bottom` links, the scale of its code (`f32` bits), then its
    /// code (`dimensions` bytes, zero-padded to whole words). One place in memory per node
    /// rather than three: the scale, needed with every code, shares the code's first cache line.
    nodes: Vec<u32>,
    /// Every node's key, in slot order (dead nodes keep theirs).
    keys: Vec<u64>,
    /// Whether each node's key was removed or replaced.
    dead: Vec<bool>,
    dead_count: usize,
    /// The slot of each live key.
    slot_of: HashMap<u64, u32>,
    /// Links above layer 0: per node, `1 + m` numbers for each layer from 1 to its top layer
    /// (empty for the many nodes that live on layer 0 only).
    upper_links: Vec<Vec<u32>>,
    /// Where every search starts: a node on the top layer.
    entry: Option<u32>,
    top_layer: usize,
}

/// A summary: the vectors and links would bury anything else in a log.
impl std::fmt::Debug for Hnsw {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Hnsw")
            .field("dimensions", &self.dimensions)
            .field("params", &self.params)
            .field("len", &self.len())
            .field("dead_nodes", &self.dead_count)
            .field("top_layer", &self.top_layer)
            .finish_non_exhaustive()
    }
}

impl Hnsw {
    /// An empty index of `dimensions`-long vectors.
    ///
    /// # Panics
    /// If `dimensions` is 0.
    pub fn new(dimensions: usize, params: HnswParams) -> Self {
        assert!(dimensions > 0, "an index needs at least one dimension");
        let m = params.m.max(2);
        let params = HnswParams {
            m,
            ef_construction: params.ef_construction.max(m),
            ef_search: params.ef_search.max(1),
            seed: params.seed,
        };
        Self {
            dimensions,
            params,
            max_links_bottom: 2 * m,
            scale_word: 1 + 2 * m,
            node_words: 2 + 2 * m + dimensions.div_ceil(4),
            layer_scale: 1.0 / (m as f64).ln(),
            kernel: Kernel::default(),
            rng: StdRng::seed_from_u64(params.seed),
            vectors: Vec::new(),
            nodes: Vec::new(),
            keys: Vec::new(),
            dead: Vec::new(),
            dead_count: 0,
            slot_of: HashMap::new(),
            upper_links: Vec::new(),
            entry: None,
            top_layer: 0,
        }
    }

    /// The length every vector must have.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The parameters in force (after raising any that were too small).
    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// How many keys the index holds.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    /// True if the index holds no key.
    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    /// True if `key` is in the index.
    pub fn contains(&self, key: u64) -> bool {
        self.slot_of.contains_key(&key)
    }

    /// The vector stored under `key`.
    pub fn get(&self, key: u64) -> Option<&[f32]> {
        self.slot_of.get(&key).map(|&slot| self.vector(slot))
    }

    /// Every key in the index, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.slot_of.keys().copied()
    }

    /// Nodes still in the graph whose key was removed or replaced; compaction drops them.
    pub fn dead_nodes(&self) -> usize {
        self.dead_count
    }

    /// Stores `vector` under `key`, replacing the key's previous vector if it had one. The
    /// vector should have unit length (the index does not check).
    ///
    /// # Errors
    /// [`AnnError::Dimension`] or [`AnnError::NonFinite`] for a malformed vector;
    /// [`AnnError::Full`] when no node number is left.
    pub fn insert(&mut self, key: u64, vector: &[f32]) -> Result<(), AnnError> {
        self.check(vector)?;
        self.check_room(1)?;
        self.insert_checked(vec![(key, vector)], 1);
        Ok(())
    }

    /// Stores many vectors, as [`Hnsw::insert`] would one after another (for a key given twice,
    /// the last vector counts), but faster where there are idle cores: the walks that find each
    /// new node's neighbours run on every core, in batches. Meant for loading an index; it
    /// blocks until done.
    ///
    /// With more than one thread the graph differs from the one single inserts would build,
    /// since the nodes of a batch find each other by comparing every pair rather than through
    /// the graph, but it is as good, and the same items give the same graph whatever the number
    /// of threads. With one thread it is a loop of [`Hnsw::insert`].
    ///
    /// # Errors
    /// As [`Hnsw::insert`]; every vector is checked before any is stored, so on an error the
    /// index is unchanged.
    pub fn insert_many<'a>(
        &mut self,
        items: impl IntoIterator<Item = (u64, &'a [f32])>,
    ) -> Result<(), AnnError> {
        self.insert_many_with_threads(items, cores())
    }

    /// [`Hnsw::insert_many`] on at most `threads` threads (the calling one included), for a
    /// caller that must leave cores to others. 1 or 0 runs everything on the calling thread.
    ///
    /// # Errors
    /// As [`Hnsw::insert_many`].
    pub fn insert_many_with_threads<'a>(
        &mut self,
        items: impl IntoIterator<Item = (u64, &'a [f32])>,
        threads: usize,
    ) -> Result<(), AnnError> {
        let items: Vec<(u64, &[f32])> = items.into_iter().collect();
        for (_, vector) in &items {
            self.check(vector)?;
        }
        self.check_room(items.len())?;
        // The last vector given for a key is the one that stays.
        let mut last = HashMap::with_capacity(items.len());
        for (position, (key, _)) in items.iter().enumerate() {
            last.insert(*key, position);
        }
        let items = items
            .into_iter()
            .enumerate()
            .filter(|(position, (key, _))| last.get(key) == Some(position))
            .map(|(_, item)| item)
            .collect();
        self.insert_checked(items, threads);
        Ok(())
    }

    /// Removes `key`; false if it was not there. Searches stop returning it at once.
    pub fn remove(&mut self, key: u64) -> bool {
        let Some(slot) = self.slot_of.remove(&key) else {
            return false;
        };
        self.mark_dead(slot);
        self.compact_if_worn();
        true
    }

    /// Rebuilds the graph from the live vectors, dropping every dead node. Inserts and removes
    /// do this on their own when dead nodes pass [`COMPACT_AT_DEAD_FRACTION`]; it costs about as
    /// much as [`Hnsw::insert_many`] of every live vector.
    pub fn compact(&mut self) {
        let mut rebuilt = Self {
            rng: self.rng.clone(),
            ..Self::new(self.dimensions, self.params)
        };
        let live = self.keys.len() - self.dead_count;
        rebuilt.vectors.reserve_exact(live * self.dimensions);
        rebuilt.nodes.reserve_exact(live * self.node_words);
        rebuilt.keys.reserve_exact(live);
        let items = (0..self.keys.len() as u32)
            .filter(|&slot| !self.dead[slot as usize])
            .map(|slot| (self.keys[slot as usize], self.vector(slot)))
            .collect();
        rebuilt.insert_checked(items, cores());
        *self = rebuilt;
    }

    /// The `k` stored vectors most similar to `query` whose key passes `filter`, best first,
    /// found through the graph with the default beam width (`ef_search`, or `k` if larger).
    /// See [`Hnsw::search_with_ef`].
    ///
    /// # Errors
    /// [`AnnError::Dimension`] or [`AnnError::NonFinite`] for a malformed query.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, AnnError> {
        self.search_with_ef(query, k, self.params.ef_search, filter)
    }

    /// As [`Hnsw::search`] with a beam of `ef` nodes (at least `k`): wider finds more of the
    /// true nearest neighbours and takes longer.
    ///
    /// The filter does not steer the walk: nodes it rejects are stepped through like any other,
    /// and the results are the passing keys among the `ef` nearest live nodes the beam found.
    /// Those are the true nearest passing keys as far as the beam is right. When fewer than `k`
    /// of them pass (a selective filter, or an index with fewer than `k` live keys), the beam
    /// says little about where the passing keys are, so the search falls back to
    /// [`Hnsw::exact_search`] with the same filter, which scores only the keys that pass.
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
        self.check(query)?;
        let Some(entry) = self.entry else {
            return Ok(Vec::new());
        };
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let probe = Probe::new(query);
        let mut scratch = Scratch::new(self.keys.len());
        let mut nearest = self.score_code(&probe, entry);
        for layer in (1..=self.top_layer).rev() {
            nearest = self.closest_on_layer(&probe, nearest, layer, &mut scratch);
        }
        let beam = self.search_layer(&probe, &[nearest], ef.max(k), 0, &mut scratch);
        // Exact scores for the passing nodes of the beam, which put them in their true order.
        scratch.slots.clear();
        scratch.slots.extend(
            beam.iter()
                .map(|node| node.slot)
                .filter(|&slot| filter(self.keys[slot as usize])),
        );
        let mut exact = Vec::with_capacity(scratch.slots.len());
        self.kernel
            .dot_slots(query, &self.vectors, &scratch.slots, &mut exact);
        let mut passing: Vec<Scored> = scratch
            .slots
            .iter()
            .zip(&exact)
            .map(|(&slot, &score)| Scored { score, slot })
            .collect();
        if passing.len() < k {
            return self.exact_search(query, k, filter);
        }
        passing.sort_unstable_by(|a, b| b.cmp(a));
        passing.truncate(k);
        Ok(self.to_hits(passing))
    }

    /// The `k` stored vectors most similar to `query` whose key passes `filter`, best first, by
    /// scoring every live vector that passes: exact, and linear in the index's size.
    ///
    /// # Errors
    /// [`AnnError::Dimension`] or [`AnnError::NonFinite`] for a malformed query.
    pub fn exact_search(
        &self,
        query: &[f32],
        k: usize,
        filter: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, AnnError> {
        self.check(query)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        // Scored in chunks so the kernel's dispatch is paid once per chunk, not per vector.
        const CHUNK: usize = 256;
        let mut best: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
        let mut chunk: Vec<u32> = Vec::with_capacity(CHUNK);
        let mut scores: Vec<f32> = Vec::with_capacity(CHUNK);
        let mut flush = |chunk: &mut Vec<u32>, best: &mut BinaryHeap<Reverse<Scored>>| {
            scores.clear();
            self.kernel
                .dot_slots(query, &self.vectors, chunk, &mut scores);
            for (&slot, &score) in chunk.iter().zip(&scores) {
                push_bounded(best, Scored { score, slot }, k);
            }
            chunk.clear();
        };
        for (slot, &key) in self.keys.iter().enumerate() {
            if self.dead[slot] || !filter(key) {
                continue;
            }
            chunk.push(slot as u32);
            if chunk.len() == CHUNK {
                flush(&mut chunk, &mut best);
            }
        }
        flush(&mut chunk, &mut best);
        Ok(self.to_hits(best.into_iter().map(|Reverse(node)| node).collect()))
    }

    /// The key of the node every search starts from (dead or alive).
    #[cfg(test)]
    pub(crate) fn entry_key(&self) -> Option<u64> {
        self.entry.map(|slot| self.keys[slot as usize])
    }

    /// Fails if `more` nodes would not fit the 32-bit slot numbers.
    fn check_room(&self, more: usize) -> Result<(), AnnError> {
        if self.keys.len().saturating_add(more) > u32::MAX as usize {
            return Err(AnnError::Full);
        }
        Ok(())
    }

    fn check(&self, vector: &[f32]) -> Result<(), AnnError> {
        if vector.len() != self.dimensions {
            return Err(AnnError::Dimension {
                expected: self.dimensions,
                got: vector.len(),
            });
        }
        match vector.iter().position(|value| !value.is_finite()) {
            Some(position) => Err(AnnError::NonFinite { position }),
            None => Ok(()),
        }
    }

    fn vector(&self, slot: u32) -> &[f32] {
        let start = slot as usize * self.dimensions;
        &self.vectors[start..start + self.dimensions]
    }

    fn block(&self, slot: u32) -> &[u32] {
        let start = slot as usize * self.node_words;
        &self.nodes[start..start + self.node_words]
    }

    fn code(&self, slot: u32) -> &[i8] {
        let words = &self.block(slot)[self.scale_word + 1..];
        &pulp::bytemuck::cast_slice(words)[..self.dimensions]
    }

    fn code_scale(&self, slot: u32) -> f32 {
        f32::from_bits(self.nodes[slot as usize * self.node_words + self.scale_word])
    }

    /// The approximate score of a node from its code dot product with a probe of `scale`.
    fn approximate(&self, raw: i32, scale: f32, slot: u32) -> Scored {
        Scored {
            score: raw as f32 * scale * self.code_scale(slot),
            slot,
        }
    }

    fn score_code(&self, probe: &Probe, slot: u32) -> Scored {
        let raw = self.kernel.code_dot(&probe.code, self.code(slot));
        self.approximate(raw, probe.scale, slot)
    }

    /// Approximate scores of `slots` against `probe`, into `scratch.raw` (in code units).
    fn score_codes(&self, probe: &Probe, slots: &[u32], raw: &mut Vec<i32>) {
        raw.clear();
        self.kernel
            .code_dots(&probe.code, slots, |slot| self.code(slot), raw);
    }

    fn max_links(&self, layer: usize) -> usize {
        if layer == 0 {
            self.max_links_bottom
        } else {
            self.params.m
        }
    }

    /// Where a node's link list on `layer` starts: its count, then room for `max_links(layer)`.
    fn link_table(&self, slot: u32, layer: usize) -> (&[u32], usize) {
        if layer == 0 {
            (&self.nodes, slot as usize * self.node_words)
        } else {
            (
                &self.upper_links[slot as usize],
                (layer - 1) * (1 + self.params.m),
            )
        }
    }

    fn links(&self, slot: u32, layer: usize) -> &[u32] {
        let (table, start) = self.link_table(slot, layer);
        let count = table[start] as usize;
        &table[start + 1..start + 1 + count]
    }

    fn set_links(&mut self, slot: u32, layer: usize, links: impl ExactSizeIterator<Item = u32>) {
        let (table, start) = if layer == 0 {
            (&mut self.nodes, slot as usize * self.node_words)
        } else {
            (
                &mut self.upper_links[slot as usize],
                (layer - 1) * (1 + self.params.m),
            )
        };
        table[start] = links.len() as u32;
        for (place, link) in table[start + 1..].iter_mut().zip(links) {
            *place = link;
        }
    }

    /// Marks a node whose key has already left `slot_of` as dead.
    fn mark_dead(&mut self, slot: u32) {
        self.dead[slot as usize] = true;
        self.dead_count += 1;
    }

    /// Compacts when dead nodes pass [`COMPACT_AT_DEAD_FRACTION`], and when nothing is left
    /// alive: then there is nothing to route to, and compacting just empties the graph.
    fn compact_if_worn(&mut self) {
        let worn = self.dead_count as f64 > COMPACT_AT_DEAD_FRACTION * self.keys.len() as f64;
        if self.dead_count > 0 && (worn || self.slot_of.is_empty()) {
            self.compact();
        }
    }

    /// Stores checked, distinct-keyed items: replaced vectors die first, then the new nodes are
    /// linked in batches, their walks spread over `threads` threads.
    fn insert_checked(&mut self, items: Vec<(u64, &[f32])>, threads: usize) {
        let items: Vec<(u64, &[f32])> = items
            .into_iter()
            .filter(|&(key, vector)| self.get(key) != Some(vector))
            .collect();
        for &(key, _) in &items {
            if let Some(slot) = self.slot_of.remove(&key) {
                self.mark_dead(slot);
            }
        }
        self.compact_if_worn();
        // Batching only pays when its walks can run side by side: a node linked right after
        // its own walk finds what it links to still in cache, which saves more than a tenth of
        // an insert's time.
        let batch_size = if threads > 1 { BATCH } else { 1 };
        for batch in items.chunks(batch_size) {
            self.insert_batch(batch, threads);
        }
    }

    /// Adds nodes for keys that are not live. First every node of the batch is stored, and where
    /// each should link is found by walking the graph as it was before the batch, on up to
    /// `threads` threads at once (the walks only read). Then, one node at a time in order, each is linked to the
    /// best of what its walk found and of the batch's earlier nodes, which the walk could not see
    /// and which are compared with it directly. A batch of one is an ordinary HNSW insert.
    fn insert_batch(&mut self, batch: &[(u64, &[f32])], threads: usize) {
        let first = self.keys.len() as u32;
        let mut placed = Vec::with_capacity(batch.len());
        for &(key, vector) in batch {
            let layer = self.draw_layer();
            placed.push((self.append(key, vector, layer), layer));
        }
        let plans = self.plan_all(&placed, threads);
        let mut scratch = Scratch::new(self.keys.len());
        for (position, ((slot, layer), plan)) in placed.iter().zip(plans).enumerate() {
            let earlier = first..first + position as u32;
            self.link(*slot, *layer, plan, earlier, &mut scratch);
        }
    }

    /// The plans of `placed` nodes ([`Hnsw::plan`]), in order, made by up to `threads` threads
    /// (this one and helpers) when there are enough nodes to be worth a thread each. The
    /// threads take a few nodes at a time from a shared counter, so one that the system sets
    /// aside for a while holds the others up by a few walks at most, not by half a batch.
    fn plan_all(&self, placed: &[(u32, usize)], threads: usize) -> Vec<Vec<Vec<Scored>>> {
        let next = AtomicUsize::new(0);
        let work = || -> Vec<(usize, Vec<Vec<Scored>>)> {
            let mut scratch = Scratch::new(self.keys.len());
            let mut done = Vec::new();
            loop {
                let start = next.fetch_add(PLANS_PER_CLAIM, AtomicOrdering::Relaxed);
                if start >= placed.len() {
                    return done;
                }
                for (position, &(slot, layer)) in
                    placed.iter().enumerate().skip(start).take(PLANS_PER_CLAIM)
                {
                    done.push((position, self.plan(slot, layer, &mut scratch)));
                }
            }
        };
        let threads = threads.min(placed.len() / MIN_PLANS_PER_THREAD).max(1);
        let done = if threads == 1 {
            work()
        } else {
            std::thread::scope(|scope| {
                let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
                let mut done = work();
                for helper in helpers {
                    done.extend(
                        helper
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    );
                }
                done
            })
        };
        let mut plans = vec![Vec::new(); placed.len()];
        for (position, plan) in done {
            plans[position] = plan;
        }
        plans
    }

    /// Where the node in `slot` (stored but not linked) should link: for each layer from 0 to
    /// its top `layer` that the graph reaches, the `ef_construction` live nodes most similar to
    /// it found by walking down from the entry point, best first. Only reads the graph.
    fn plan(&self, slot: u32, layer: usize, scratch: &mut Scratch) -> Vec<Vec<Scored>> {
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        let probe = Probe {
            code: self.code(slot).to_vec(),
            scale: self.code_scale(slot),
        };
        let mut nearest = self.score_code(&probe, entry);
        for upper in (layer + 1..=self.top_layer).rev() {
            nearest = self.closest_on_layer(&probe, nearest, upper, scratch);
        }
        let reached = layer.min(self.top_layer);
        let mut plan = vec![Vec::new(); reached + 1];
        let mut starts = vec![nearest];
        for link_layer in (0..=reached).rev() {
            let near = self.search_layer(
                &probe,
                &starts,
                self.params.ef_construction,
                link_layer,
                scratch,
            );
            if !near.is_empty() {
                starts.clone_from(&near);
            }
            plan[link_layer] = near;
        }
        plan
    }

    /// Links the node in `slot`, whose top layer is `layer`, on every layer it is on: to the most
    /// diverse of the best of its `plan` and of the `earlier` nodes of its batch, with links
    /// back from those. It becomes the entry point if it tops every other node.
    fn link(
        &mut self,
        slot: u32,
        layer: usize,
        mut plan: Vec<Vec<Scored>>,
        earlier: std::ops::Range<u32>,
        scratch: &mut Scratch,
    ) {
        scratch.slots.clear();
        scratch.slots.extend(earlier);
        scratch.raw.clear();
        self.kernel.code_dots(
            self.code(slot),
            &scratch.slots,
            |other| self.code(other),
            &mut scratch.raw,
        );
        let scale = self.code_scale(slot);
        let earlier: Vec<Scored> = scratch
            .slots
            .iter()
            .zip(&scratch.raw)
            .map(|(&other, &raw)| self.approximate(raw, scale, other))
            .collect();
        for link_layer in (0..=layer).rev() {
            let mut candidates = plan
                .get_mut(link_layer)
                .map(std::mem::take)
                .unwrap_or_default();
            if !earlier.is_empty() {
                candidates.extend(
                    earlier
                        .iter()
                        .filter(|node| self.top_layer_of(node.slot) >= link_layer),
                );
                candidates.sort_unstable_by(|a, b| b.cmp(a));
                candidates.truncate(self.params.ef_construction);
            }
            // In a batch, the walk that found these ran a while ago and its nodes have left the
            // cache; fetch them all at once rather than one miss at a time.
            for candidate in &candidates {
                self.kernel.prefetch(self.block(candidate.slot));
            }
            let chosen = self.diverse(&candidates, self.max_links(link_layer));
            // Linking back compares each chosen node with its own links: fetch those too.
            for node in &chosen {
                for &link in self.links(node.slot, link_layer) {
                    self.kernel.prefetch(&self.block(link)[self.scale_word..]);
                }
            }
            self.set_links(slot, link_layer, chosen.iter().map(|node| node.slot));
            for node in &chosen {
                let back = Scored {
                    score: node.score,
                    slot,
                };
                self.link_back(node.slot, back, link_layer, scratch);
            }
        }
        if self.entry.is_none() || layer > self.top_layer {
            self.entry = Some(slot);
            self.top_layer = layer;
        }
    }

    /// A node's top layer: exponentially distributed, so layer `l` holds about `m^-l` of them.
    fn draw_layer(&mut self) -> usize {
        let uniform: f64 = self.rng.random();
        let layer = (-(1.0 - uniform).ln() * self.layer_scale).floor();
        (layer as usize).min(MAX_LAYER)
    }

    fn top_layer_of(&self, slot: u32) -> usize {
        self.upper_links[slot as usize].len() / (1 + self.params.m)
    }

    /// Stores a node for a key that is not live, with no links yet, and returns its slot.
    fn append(&mut self, key: u64, vector: &[f32], layer: usize) -> u32 {
        let slot = self.keys.len() as u32;
        self.vectors.extend_from_slice(vector);
        let probe = Probe::new(vector);
        let start = self.nodes.len();
        self.nodes.resize(start + self.node_words, 0);
        let block = &mut self.nodes[start..];
        block[self.scale_word] = probe.scale.to_bits();
        pulp::bytemuck::cast_slice_mut(&mut block[self.scale_word + 1..])[..self.dimensions]
            .copy_from_slice(&probe.code);
        self.keys.push(key);
        self.dead.push(false);
        self.slot_of.insert(key, slot);
        self.upper_links.push(vec![0; layer * (1 + self.params.m)]);
        slot
    }

    /// Adds a link from `from` to `to` (scored against `from`) if the diversity rule allows.
    ///
    /// Every link list is kept as the diversity rule ([`Hnsw::diverse`]) would choose it from
    /// its own links: no link is covered by a better one. Then choosing again from the list plus
    /// `to` needs no full rerun, which would cost up to `max²/2` dot products per list and was
    /// most of an insert's time. The better links stay as they were; `to` joins unless one of
    /// them covers it; worse links stay unless `to` covers them; the worst beyond `max` go.
    /// That is exactly the rerun's result, for about `2·max` dot products. Dead links are
    /// dropped on the way, since they lead nowhere useful.
    fn link_back(&mut self, from: u32, to: Scored, layer: usize, scratch: &mut Scratch) {
        let max = self.max_links(layer);
        let stored = self.links(from, layer).len();
        scratch.slots.clear();
        scratch.slots.extend(
            self.links(from, layer)
                .iter()
                .copied()
                .filter(|&slot| !self.dead[slot as usize]),
        );
        scratch.raw.clear();
        self.kernel.code_dots(
            self.code(from),
            &scratch.slots,
            |slot| self.code(slot),
            &mut scratch.raw,
        );
        let scale = self.code_scale(from);
        let mut links: Vec<Scored> = scratch
            .slots
            .iter()
            .zip(&scratch.raw)
            .map(|(&slot, &raw)| self.approximate(raw, scale, slot))
            .collect();
        links.sort_unstable_by(|a, b| b.cmp(a));
        let better = links.partition_point(|&link| link > to);
        if links[..better]
            .iter()
            .any(|&link| self.covers(link.slot, to))
        {
            if links.len() < stored {
                self.set_links(from, layer, links.iter().map(|link| link.slot));
            }
            return;
        }
        let worse = links.split_off(better);
        links.push(to);
        links.extend(
            worse
                .into_iter()
                .filter(|&link| !self.covers(to.slot, link)),
        );
        links.truncate(max);
        self.set_links(from, layer, links.iter().map(|link| link.slot));
    }

    /// True if `candidate`, scored against some node, is at least as similar to the node `kept`
    /// as to that node: a link to it would add no direction that the link to `kept` lacks.
    fn covers(&self, kept: u32, candidate: Scored) -> bool {
        let raw = self
            .kernel
            .code_dot(self.code(candidate.slot), self.code(kept));
        let scale = self.code_scale(candidate.slot);
        self.approximate(raw, scale, kept).score >= candidate.score
    }

    /// Picks up to `max` links from `candidates` (best first, scored against the node being
    /// linked). A candidate is kept only if no link already kept covers it ([`Hnsw::covers`]):
    /// links then point in different directions, which keeps clusters connected to each other
    /// instead of spending every link inside the nearest cluster.
    fn diverse(&self, candidates: &[Scored], max: usize) -> Vec<Scored> {
        let mut chosen: Vec<Scored> = Vec::with_capacity(max);
        for &candidate in candidates {
            if chosen.len() == max {
                break;
            }
            // Most candidates that fail, fail against one of the first links kept (the
            // nearest), so checking one link at a time and stopping early beats scoring the
            // candidate against all of them in one batch.
            if !chosen.iter().any(|kept| self.covers(kept.slot, candidate)) {
                chosen.push(candidate);
            }
        }
        chosen
    }

    /// Greedy walk on one layer: move to the best-scoring link until none improves.
    fn closest_on_layer(
        &self,
        probe: &Probe,
        mut nearest: Scored,
        layer: usize,
        scratch: &mut Scratch,
    ) -> Scored {
        loop {
            let links = self.links(nearest.slot, layer);
            self.score_codes(probe, links, &mut scratch.raw);
            let best = links
                .iter()
                .zip(&scratch.raw)
                .map(|(&slot, &raw)| self.approximate(raw, probe.scale, slot))
                .max();
            match best {
                Some(best) if best > nearest => nearest = best,
                _ => return nearest,
            }
        }
    }

    /// Beam search on one layer from `starts`: up to `ef` live nodes whose codes score best
    /// against `probe`, best first. Dead nodes are expanded like live ones but never enter the
    /// result.
    fn search_layer(
        &self,
        probe: &Probe,
        starts: &[Scored],
        ef: usize,
        layer: usize,
        scratch: &mut Scratch,
    ) -> Vec<Scored> {
        scratch.visited.clear();
        // To expand, best first.
        let mut frontier: BinaryHeap<Scored> = BinaryHeap::new();
        // The best live nodes so far, worst on top so it can be evicted.
        let mut found: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(ef + 1);
        for &start in starts {
            if scratch.visited.mark(start.slot) {
                frontier.push(start);
                if !self.dead[start.slot as usize] {
                    push_bounded(&mut found, start, ef);
                }
            }
        }
        while let Some(current) = frontier.pop() {
            let worst = worst_if_full(&found, ef);
            if worst.is_some_and(|worst| current < worst) {
                // Everything left on the frontier is worse than all the results.
                break;
            }
            if let Some(next) = frontier.peek() {
                self.kernel.prefetch(self.links(next.slot, layer));
            }
            scratch.slots.clear();
            for &link in self.links(current.slot, layer) {
                if scratch.visited.mark(link) {
                    scratch.slots.push(link);
                    self.kernel.prefetch(&self.block(link)[self.scale_word..]);
                }
            }
            self.score_codes(probe, &scratch.slots, &mut scratch.raw);
            for (&slot, &raw) in scratch.slots.iter().zip(&scratch.raw) {
                let node = self.approximate(raw, probe.scale, slot);
                if worst_if_full(&found, ef).is_some_and(|worst| node <= worst) {
                    continue;
                }
                frontier.push(node);
                if !self.dead[slot as usize] {
                    push_bounded(&mut found, node, ef);
                }
            }
        }
        let mut found: Vec<Scored> = found.into_iter().map(|Reverse(node)| node).collect();
        found.sort_unstable_by(|a, b| b.cmp(a));
        found
    }

    /// Hits for `nodes`, best first.
    fn to_hits(&self, mut nodes: Vec<Scored>) -> Vec<Hit> {
        nodes.sort_unstable_by(|a, b| b.cmp(a));
        nodes
            .into_iter()
            .map(|node| Hit {
                key: self.keys[node.slot as usize],
                score: node.score,
            })
            .collect()
    }
}

/// How many threads the machine runs at once.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The worst of `found` if it already holds `capacity` nodes.
fn worst_if_full(found: &BinaryHeap<Reverse<Scored>>, capacity: usize) -> Option<Scored> {
    if found.len() < capacity {
        return None;
    }
    found.peek().map(|Reverse(worst)| *worst)
}

/// Adds `node` to `best`, evicting the worst if that makes more than `capacity`.
fn push_bounded(best: &mut BinaryHeap<Reverse<Scored>>, node: Scored, capacity: usize) {
    if best.len() < capacity {
        best.push(Reverse(node));
    } else if let Some(mut worst) = best.peek_mut()
        && node > worst.0
    {
        *worst = Reverse(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{clustered_unit_vectors, uniform_unit_vectors};

    /// Every live node's live links, on every layer it is on, are as [`Hnsw::diverse`] would
    /// choose them from themselves (none covered by a better one), and no more than the layer
    /// allows.
    fn assert_lists_are_diverse(graph: &Hnsw) {
        for slot in 0..graph.keys.len() as u32 {
            if graph.dead[slot as usize] {
                continue;
            }
            let layers = graph.upper_links[slot as usize].len() / (1 + graph.params.m);
            for layer in 0..=layers {
                let links = graph.links(slot, layer);
                assert!(links.len() <= graph.max_links(layer));
                let probe = Probe {
                    code: graph.code(slot).to_vec(),
                    scale: graph.code_scale(slot),
                };
                let mut scored: Vec<Scored> = links
                    .iter()
                    .filter(|&&link| !graph.dead[link as usize])
                    .map(|&link| graph.score_code(&probe, link))
                    .collect();
                scored.sort_unstable_by(|a, b| b.cmp(a));
                for (rank, &link) in scored.iter().enumerate() {
                    assert!(
                        !scored[..rank]
                            .iter()
                            .any(|better| graph.covers(better.slot, link)),
                        "node {slot} layer {layer}: link {} is covered by a better one",
                        link.slot
                    );
                }
            }
        }
    }

    #[test]
    fn insert_many_on_one_thread_is_a_loop_of_insert() {
        let vectors = clustered_unit_vectors(600, 64, 6, 7);
        let mut one_by_one = Hnsw::new(64, HnswParams::default());
        for (key, vector) in vectors.iter().enumerate() {
            one_by_one.insert(key as u64, vector).expect("insert");
        }
        let mut at_once = Hnsw::new(64, HnswParams::default());
        let items = vectors
            .iter()
            .enumerate()
            .map(|(key, vector)| (key as u64, vector.as_slice()));
        at_once
            .insert_many_with_threads(items, 1)
            .expect("insert_many");
        assert_eq!(at_once.nodes, one_by_one.nodes);
        assert_eq!(at_once.upper_links, one_by_one.upper_links);
    }

    #[test]
    fn insert_many_builds_the_same_graph_on_any_number_of_threads() {
        let vectors = clustered_unit_vectors(1_200, 64, 12, 5);
        let items = || {
            vectors
                .iter()
                .enumerate()
                .map(|(key, vector)| (key as u64, vector.as_slice()))
        };
        let mut graphs = [2, 3, 4].map(|threads| {
            let mut graph = Hnsw::new(64, HnswParams::default());
            graph
                .insert_many_with_threads(items(), threads)
                .expect("insert_many");
            graph
        });
        for graph in &graphs[1..] {
            assert_eq!(graph.nodes, graphs[0].nodes);
            assert_eq!(graph.upper_links, graphs[0].upper_links);
            assert_eq!(graph.entry, graphs[0].entry);
        }
        assert_lists_are_diverse(&graphs[0]);
        // Appending a second load to a graph goes through the walks too.
        for graph in &mut graphs {
            let more = clustered_unit_vectors(600, 64, 12, 6);
            let items = more
                .iter()
                .enumerate()
                .map(|(key, vector)| (5_000 + key as u64, vector.as_slice()));
            graph
                .insert_many_with_threads(items, 2)
                .expect("insert_many");
        }
        assert_eq!(graphs[1].nodes, graphs[0].nodes);
        assert_lists_are_diverse(&graphs[0]);
    }

    #[test]
    fn link_lists_stay_diverse_through_inserts_and_removes() {
        // Clustered vectors exercise links covering each other; uniform ones, where little
        // covers anything, fill lists up so that the worst links must go.
        for vectors in [
            clustered_unit_vectors(1_500, 64, 15, 3),
            uniform_unit_vectors(1_500, 64, 3),
        ] {
            let mut graph = Hnsw::new(64, HnswParams::default());
            for (key, vector) in vectors.iter().enumerate() {
                graph.insert(key as u64, vector).expect("insert");
            }
            assert_lists_are_diverse(&graph);

            for key in (0..1_500).step_by(7) {
                graph.remove(key);
            }
            for (key, vector) in vectors.iter().enumerate().take(300) {
                graph.insert(10_000 + key as u64, vector).expect("insert");
            }
            assert_lists_are_diverse(&graph);
        }
        let graph = {
            let mut graph = Hnsw::new(64, HnswParams::default());
            for (key, vector) in uniform_unit_vectors(1_500, 64, 4).iter().enumerate() {
                graph.insert(key as u64, vector).expect("insert");
            }
            graph
        };
        let full = (0..graph.keys.len() as u32)
            .filter(|&slot| graph.links(slot, 0).len() == graph.max_links(0))
            .count();
        assert!(
            full > 0,
            "no list filled up, so the truncation went untested"
        );
    }
}
