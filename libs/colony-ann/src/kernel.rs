//! Dot products, the hot loop of every search.
//!
//! The workspace builds for baseline x86-64, where plain loops vectorise only 4 wide (SSE). pulp
//! picks the widest instructions the CPU has at run time (AVX2 + FMA on any recent x86) and
//! compiles the loop for them. Choosing costs a branch and a call that cannot be inlined, so the
//! graph search scores all the unvisited neighbours of a node in one call rather than one call
//! per pair.

use pulp::{Arch, Simd, WithSimd};

/// Picks the vector instructions once; cheap to copy into every index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    arch: Arch,
}

impl Default for Kernel {
    fn default() -> Self {
        Self { arch: Arch::new() }
    }
}

impl Kernel {
    /// `a · b`. The slices have the same length.
    pub(crate) fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        self.arch.dispatch(OnePair { a, b })
    }

    /// Appends to `scores` the dot product of `query` with the stored vector of each slot in
    /// `slots`, in order. `arena` holds the vectors back to back, `query.len()` values each.
    pub(crate) fn dot_slots(
        self,
        query: &[f32],
        arena: &[f32],
        slots: &[u32],
        scores: &mut Vec<f32>,
    ) {
        self.arch.dispatch(ManySlots {
            query,
            arena,
            slots,
            scores,
        });
    }
}

struct OnePair<'a> {
    a: &'a [f32],
    b: &'a [f32],
}

impl WithSimd for OnePair<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        dot_in(simd, self.a, self.b)
    }
}

struct ManySlots<'a> {
    query: &'a [f32],
    arena: &'a [f32],
    slots: &'a [u32],
    scores: &'a mut Vec<f32>,
}

impl WithSimd for ManySlots<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let dimensions = self.query.len();
        self.scores.reserve(self.slots.len());
        for &slot in self.slots {
            let start = slot as usize * dimensions;
            let stored = &self.arena[start..start + dimensions];
            self.scores.push(dot_in(simd, self.query, stored));
        }
    }
}

/// Four independent accumulators so consecutive fused multiply-adds do not wait on each other
/// (their latency is several cycles; two can issue per cycle).
#[inline(always)]
fn dot_in<S: Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let (a_lanes, a_rest) = S::as_simd_f32s(a);
    let (b_lanes, b_rest) = S::as_simd_f32s(b);

    let zero = simd.splat_f32s(0.0);
    let mut sums = [zero; 4];
    let mut a_blocks = a_lanes.chunks_exact(4);
    let mut b_blocks = b_lanes.chunks_exact(4);
    for (a_block, b_block) in (&mut a_blocks).zip(&mut b_blocks) {
        sums[0] = simd.mul_add_e_f32s(a_block[0], b_block[0], sums[0]);
        sums[1] = simd.mul_add_e_f32s(a_block[1], b_block[1], sums[1]);
        sums[2] = simd.mul_add_e_f32s(a_block[2], b_block[2], sums[2]);
        sums[3] = simd.mul_add_e_f32s(a_block[3], b_block[3], sums[3]);
    }
    for (&a_lane, &b_lane) in a_blocks.remainder().iter().zip(b_blocks.remainder()) {
        sums[0] = simd.mul_add_e_f32s(a_lane, b_lane, sums[0]);
    }
    let pairs = [
        simd.add_f32s(sums[0], sums[1]),
        simd.add_f32s(sums[2], sums[3]),
    ];
    let mut total = simd.reduce_sum_f32s(simd.add_f32s(pairs[0], pairs[1]));
    for (&a_value, &b_value) in a_rest.iter().zip(b_rest) {
        total += a_value * b_value;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn matches_a_plain_loop_for_every_length() {
        let kernel = Kernel::default();
        for length in 0..100 {
            let a: Vec<f32> = (0..length).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..length).map(|i| (i as f32 * 0.11).cos()).collect();
            let expected = plain_dot(&a, &b);
            let got = kernel.dot(&a, &b);
            assert!(
                (expected - got).abs() <= 1e-4 * (1.0 + expected.abs()),
                "length {length}: {expected} vs {got}"
            );
        }
    }

    #[test]
    fn scores_slots_in_order() {
        let kernel = Kernel::default();
        let dimensions = 5;
        let arena: Vec<f32> = (0..4 * dimensions).map(|i| i as f32).collect();
        let query = [1.0, 0.0, 0.0, 0.0, 1.0];
        let mut scores = vec![-1.0];
        kernel.dot_slots(&query, &arena, &[3, 0, 2], &mut scores);
        assert_eq!(scores, vec![-1.0, 15.0 + 19.0, 0.0 + 4.0, 10.0 + 14.0]);
    }
}
