//! Reproducible unit vectors for tests and benchmarks.
//!
//! Uniform random unit vectors are the worst case for any nearest-neighbour index: in hundreds of
//! dimensions every point is almost equally far from every other, so "nearest" barely means
//! anything. Sentence embeddings are nothing like that: texts on one topic sit close together,
//! unrelated texts far apart, and within a topic most of the variation lies along a few
//! directions. [`Mixture`] models that as a Gaussian mixture: random unit-length centres (the
//! topics), and around each a Gaussian whose variance is concentrated on a few directions, which
//! differ from cluster to cluster. Points are normalised to unit length, as embeddings are.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// How far points stray from their centre by default: the noise has about this length against
/// the centre's 1, so two points of one cluster have a cosine similarity near
/// `1 / (1 + spread²)` and points of different clusters near 0.
pub const DEFAULT_SPREAD: f32 = 1.0;

/// How fast the noise's variance falls off across directions by default: the `r`-th largest
/// direction (from 0) carries variance proportional to `(r + 1)^-decay`. 0 spreads it evenly
/// over every direction.
pub const DEFAULT_DECAY: f32 = 1.0;

/// A Gaussian mixture in `dimensions` dimensions whose samples are normalised to unit length.
#[derive(Debug, Clone)]
pub struct Mixture {
    dimensions: usize,
    /// Each cluster's centre, `dimensions` values each.
    centres: Vec<f32>,
    /// Each cluster's noise standard deviation per dimension, `dimensions` values each.
    deviations: Vec<f32>,
}

impl Mixture {
    /// `clusters` clusters (at least 1) of the default shape ([`DEFAULT_SPREAD`],
    /// [`DEFAULT_DECAY`]), placed by `seed`.
    pub fn new(dimensions: usize, clusters: usize, seed: u64) -> Self {
        Self::with_shape(dimensions, clusters, DEFAULT_SPREAD, DEFAULT_DECAY, seed)
    }

    /// `clusters` clusters (at least 1) whose noise has length about `spread` and variance
    /// falling off across directions as `(r + 1)^-decay`, placed by `seed`.
    pub fn with_shape(
        dimensions: usize,
        clusters: usize,
        spread: f32,
        decay: f32,
        seed: u64,
    ) -> Self {
        let clusters = clusters.max(1);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut normal = Normal::default();

        let mut centres = Vec::with_capacity(clusters * dimensions);
        for _ in 0..clusters {
            let start = centres.len();
            centres.extend((0..dimensions).map(|_| normal.sample(&mut rng)));
            normalise(&mut centres[start..]);
        }

        let weights: Vec<f32> = (0..dimensions)
            .map(|rank| (rank as f32 + 1.0).powf(-decay))
            .collect();
        let total: f32 = weights.iter().sum();
        let by_rank: Vec<f32> = weights
            .iter()
            .map(|weight| spread * (weight / total).sqrt())
            .collect();
        let mut deviations = Vec::with_capacity(clusters * dimensions);
        let mut order: Vec<usize> = (0..dimensions).collect();
        for _ in 0..clusters {
            // Each cluster varies most along its own directions.
            order.shuffle(&mut rng);
            deviations.extend(order.iter().map(|&rank| by_rank[rank]));
        }

        Self {
            dimensions,
            centres,
            deviations,
        }
    }

    /// How many clusters the mixture has.
    pub fn clusters(&self) -> usize {
        self.centres.len() / self.dimensions.max(1)
    }

    /// `count` unit vectors, each from a cluster chosen uniformly at random. The same seed gives
    /// the same vectors; draw queries from the same mixture with another seed.
    pub fn sample(&self, count: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut normal = Normal::default();
        let clusters = self.clusters();
        (0..count)
            .map(|_| {
                let cluster = rng.random_range(0..clusters);
                let range = cluster * self.dimensions..(cluster + 1) * self.dimensions;
                let mut point: Vec<f32> = self.centres[range.clone()]
                    .iter()
                    .zip(&self.deviations[range])
                    .map(|(&centre, &deviation)| centre + deviation * normal.sample(&mut rng))
                    .collect();
                normalise(&mut point);
                point
            })
            .collect()
    }
}

/// `count` unit vectors from a [`Mixture`] of `clusters` clusters of the default shape, all
/// from `seed`. To draw queries from the same distribution, draw extra vectors and hold them
/// out, or use [`Mixture`] directly.
pub fn clustered_unit_vectors(
    count: usize,
    dimensions: usize,
    clusters: usize,
    seed: u64,
) -> Vec<Vec<f32>> {
    // A different stream for the samples than for the centres, derived from the one seed.
    Mixture::new(dimensions, clusters, seed).sample(count, seed ^ 0x5eed_5eed_5eed_5eed)
}

/// `count` unit vectors uniformly distributed on the sphere, from `seed`.
pub fn uniform_unit_vectors(count: usize, dimensions: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = Normal::default();
    (0..count)
        .map(|_| {
            // A standard normal vector points in a uniformly random direction.
            let mut point: Vec<f32> = (0..dimensions).map(|_| normal.sample(&mut rng)).collect();
            normalise(&mut point);
            point
        })
        .collect()
}

/// Scales `vector` to unit length; leaves an all-zero vector as it is.
fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|value| *value /= norm);
    }
}

/// Standard normal draws by the Box–Muller transform, which yields them in pairs.
#[derive(Default)]
struct Normal {
    spare: Option<f32>,
}

impl Normal {
    fn sample(&mut self, rng: &mut impl Rng) -> f32 {
        if let Some(spare) = self.spare.take() {
            return spare;
        }
        // 1 - u lies in (0, 1], so its logarithm is finite.
        let uniform: f64 = rng.random();
        let radius = (-2.0 * (1.0 - uniform).ln()).sqrt();
        let angle = std::f64::consts::TAU * rng.random::<f64>();
        self.spare = Some((radius * angle.sin()) as f32);
        (radius * angle.cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_have_unit_length_and_repeat_with_the_seed() {
        for vectors in [
            clustered_unit_vectors(50, 32, 4, 7),
            uniform_unit_vectors(50, 32, 7),
        ] {
            assert_eq!(vectors.len(), 50);
            for vector in &vectors {
                assert_eq!(vector.len(), 32);
                assert!((dot(vector, vector) - 1.0).abs() < 1e-5);
            }
        }
        assert_eq!(
            clustered_unit_vectors(5, 8, 2, 1),
            clustered_unit_vectors(5, 8, 2, 1)
        );
        assert_ne!(uniform_unit_vectors(5, 8, 1), uniform_unit_vectors(5, 8, 2));
    }

    #[test]
    fn clustered_points_are_closer_within_a_cluster_than_across() {
        let vectors = clustered_unit_vectors(400, 384, 2, 3);
        // With two clusters, each point's most similar other point is in its own cluster, and
        // the least similar ones are in the other: the similarity spread is wide.
        let similarities: Vec<f32> = vectors[1..].iter().map(|v| dot(&vectors[0], v)).collect();
        let most = similarities.iter().copied().fold(f32::MIN, f32::max);
        let least = similarities.iter().copied().fold(f32::MAX, f32::min);
        assert!(most > 0.3, "most similar {most}");
        assert!(least < 0.2, "least similar {least}");
    }
}
