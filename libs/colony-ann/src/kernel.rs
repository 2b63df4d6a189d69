//! Dot products, the hot loop of every search, and the 8-bit codes the graph walks on.
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
    #[cfg(target_arch = "x86_64")]
    sse: Option<pulp::core_arch::x86::Sse>,
}

impl Default for Kernel {
    fn default() -> Self {
        Self {
            arch: Arch::new(),
            #[cfg(target_arch = "x86_64")]
            sse: pulp::core_arch::x86::Sse::try_new(),
        }
    }
}

/// The unit the CPU moves memory in.
const CACHE_LINE: usize = 64;

impl Kernel {
    /// Asks the CPU to start loading `memory` into cache. A walk scores nodes scattered over the
    /// whole index, so each is a cache miss; asking for all of a node's neighbours before
    /// scoring the first has their loads overlap instead of queueing one after another.
    /// A hint only: it never faults, and does nothing where unsupported.
    #[inline(always)]
    pub(crate) fn prefetch<T>(self, memory: &[T]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(sse) = self.sse {
            let start = memory.as_ptr().cast::<i8>();
            let bytes = std::mem::size_of_val(memory);
            // Steps of a line from an unaligned start can stop short of the last line.
            let last = bytes.checked_sub(1).into_iter();
            for offset in (0..bytes).step_by(CACHE_LINE).chain(last) {
                sse._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.wrapping_add(offset));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = memory;
    }

    /// The dot product of two codes, in code units (scale by both codes' scales).
    pub(crate) fn code_dot(self, a: &[i8], b: &[i8]) -> i32 {
        self.arch.dispatch(OneCodePair { a, b })
    }

    /// Appends to `scores` the dot product of the code `query` with `code_of(slot)` for each
    /// slot in `slots`, in order, in code units.
    pub(crate) fn code_dots<'a>(
        self,
        query: &[i8],
        slots: &[u32],
        code_of: impl Fn(u32) -> &'a [i8],
        scores: &mut Vec<i32>,
    ) {
        self.arch.dispatch(ManyCodes {
            query,
            slots,
            code_of,
            scores,
            _codes: std::marker::PhantomData,
        });
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

/// Rounds `vector` to 8-bit integers, appending them to `codes`, and returns the scale that
/// maps them back: `value ≈ code * scale`. The scale is per vector, from its largest value, so
/// every code uses the whole range.
pub(crate) fn quantise(vector: &[f32], codes: &mut Vec<i8>) -> f32 {
    let largest = vector
        .iter()
        .fold(0.0f32, |largest, value| largest.max(value.abs()));
    if largest == 0.0 {
        codes.extend(std::iter::repeat_n(0, vector.len()));
        return 0.0;
    }
    let to_code = 127.0 / largest;
    // Within ±127 by construction; `as` saturates anyway.
    codes.extend(vector.iter().map(|value| (value * to_code).round() as i8));
    largest / 127.0
}

struct OneCodePair<'a> {
    a: &'a [i8],
    b: &'a [i8],
}

impl WithSimd for OneCodePair<'_> {
    type Output = i32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> i32 {
        code_dot_in(self.a, self.b)
    }
}

struct ManyCodes<'a, 'b, F> {
    query: &'a [i8],
    slots: &'a [u32],
    code_of: F,
    scores: &'a mut Vec<i32>,
    _codes: std::marker::PhantomData<&'b [i8]>,
}

impl<'b, F: Fn(u32) -> &'b [i8]> WithSimd for ManyCodes<'_, 'b, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        self.scores.reserve(self.slots.len());
        for &slot in self.slots {
            self.scores
                .push(code_dot_in(self.query, (self.code_of)(slot)));
        }
    }
}

/// A plain loop: integer sums are exact in any order, so the compiler vectorises it on its own
/// (16-bit products summed pairwise into 32 bits) for whatever instructions `with_simd` enabled.
/// A product of two codes fits an `i16` and over 100,000 of them fit an `i32`, so nothing
/// wraps; the wrapping operations only keep debug builds' overflow checks, which would stop the
/// loop from vectorising, out of it.
#[inline(always)]
fn code_dot_in(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).fold(0i32, |sum, (&x, &y)| {
        sum.wrapping_add(i32::from(i16::from(x).wrapping_mul(i16::from(y))))
    })
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
            let mut scores = Vec::new();
            kernel.dot_slots(&a, &b, &[0], &mut scores);
            let got = scores[0];
            assert!(
                (expected - got).abs() <= 1e-4 * (1.0 + expected.abs()),
                "length {length}: {expected} vs {got}"
            );
        }
    }

    #[test]
    fn codes_approximate_the_vector() {
        let vector: Vec<f32> = (0..384).map(|i| (i as f32 * 0.7).sin() / 14.0).collect();
        let mut codes = Vec::new();
        let scale = quantise(&vector, &mut codes);
        assert_eq!(codes.len(), 384);
        assert!(codes.iter().any(|&code| code.unsigned_abs() == 127));
        for (value, code) in vector.iter().zip(&codes) {
            assert!((value - f32::from(*code) * scale).abs() <= scale / 2.0 + 1e-7);
        }

        let kernel = Kernel::default();
        let other: Vec<f32> = (0..384).map(|i| (i as f32 * 0.3).cos() / 14.0).collect();
        let mut other_codes = Vec::new();
        let other_scale = quantise(&other, &mut other_codes);
        let exact = plain_dot(&vector, &other);
        let approximate = kernel.code_dot(&codes, &other_codes) as f32 * scale * other_scale;
        assert!(
            (exact - approximate).abs() < 2e-3,
            "{exact} vs {approximate}"
        );
        let plain: i32 = codes
            .iter()
            .zip(&other_codes)
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum();
        assert_eq!(kernel.code_dot(&codes, &other_codes), plain);

        let mut zero = Vec::new();
        assert_eq!(quantise(&[0.0; 4], &mut zero), 0.0);
        assert_eq!(zero, vec![0; 4]);
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

        let codes: Vec<i8> = (0..4 * dimensions as i8).collect();
        let mut code_scores = vec![-1];
        let code_of = |slot: u32| &codes[slot as usize * dimensions..][..dimensions];
        kernel.code_dots(&[1, 0, 0, 0, 1], &[3, 0, 2], code_of, &mut code_scores);
        assert_eq!(code_scores, vec![-1, 15 + 19, 4, 10 + 14]);
    }
}
