//! Weighted sums of flat `f32` vectors, blocked so that the output block stays in L1 cache while every
//! input streams through once. Aggregating K updates then reads each input byte once and writes the output
//! once, which keeps the cost close to a copy of the same bytes.

/// Elements per block: 4096 `f32` = 16 KiB of output, which stays in L1 across the K inputs.
pub const BLOCK: usize = 4096;

/// `out[j] = Σ_i w_i · inputs[i][j]`.
///
/// # Panics
/// When `inputs` and `weights` differ in length, or an input's length differs from `out`'s.
pub fn weighted_sum_into(out: &mut [f32], inputs: &[&[f32]], weights: &[f32]) {
    check(out.len(), inputs, weights);
    if inputs.is_empty() {
        out.fill(0.0);
        return;
    }
    for (b, ob) in out.chunks_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        let end = start + ob.len();
        scale_into(ob, &inputs[0][start..end], weights[0]);
        for (inp, &w) in inputs[1..].iter().zip(&weights[1..]) {
            axpy(ob, &inp[start..end], w);
        }
    }
}

/// `acc[j] += Σ_i w_i · inputs[i][j]` (in place, for `x ← x + Σ w_i Δ_i`).
///
/// # Panics
/// When `inputs` and `weights` differ in length, or an input's length differs from `acc`'s.
pub fn add_weighted_sum(acc: &mut [f32], inputs: &[&[f32]], weights: &[f32]) {
    check(acc.len(), inputs, weights);
    for (b, ab) in acc.chunks_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        let end = start + ab.len();
        for (inp, &w) in inputs.iter().zip(weights) {
            axpy(ab, &inp[start..end], w);
        }
    }
}

fn check(n: usize, inputs: &[&[f32]], weights: &[f32]) {
    assert_eq!(inputs.len(), weights.len(), "one weight per input is required");
    for (i, inp) in inputs.iter().enumerate() {
        assert_eq!(inp.len(), n, "input {i} has the wrong length");
    }
}

#[inline]
fn scale_into(out: &mut [f32], x: &[f32], w: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = w * v;
    }
}

#[inline]
fn axpy(out: &mut [f32], x: &[f32], w: f32) {
    // Written as a zip over equal-length slices so the compiler vectorises it without bounds checks.
    for (o, &v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

/// A running weighted sum that takes updates one at a time (streaming accumulation), so an aggregator
/// can fold each update in as soon as it has been validated and drop it.
#[derive(Debug, Clone)]
pub struct Accumulator {
    sum: Vec<f32>,
    total_weight: f64,
    count: usize,
}

impl Accumulator {
    /// A zero sum of `len` elements.
    pub fn new(len: usize) -> Self {
        Self {
            sum: vec![0.0; len],
            total_weight: 0.0,
            count: 0,
        }
    }

    /// `sum += weight · x`.
    ///
    /// # Panics
    /// When `x` has the wrong length.
    pub fn add(&mut self, x: &[f32], weight: f64) {
        add_weighted_sum(&mut self.sum, &[x], &[weight as f32]);
        self.total_weight += weight;
        self.count += 1;
    }

    /// Updates folded in so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the weights folded in so far.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The weighted mean `Σ w_i x_i / Σ w_i` (all zeros when nothing was added).
    pub fn mean(mut self) -> Vec<f32> {
        if self.total_weight > 0.0 {
            let inv = (1.0 / self.total_weight) as f32;
            for v in &mut self.sum {
                *v *= inv;
            }
        }
        self.sum
    }

    /// The raw weighted sum.
    pub fn into_sum(self) -> Vec<f32> {
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(inputs: &[Vec<f32>], w: &[f32]) -> Vec<f32> {
        let n = inputs.first().map_or(0, Vec::len);
        (0..n)
            .map(|j| inputs.iter().zip(w).map(|(x, &w)| w * x[j]).sum())
            .collect()
    }

    #[test]
    fn hand_computed() {
        let a = [1.0f32, 2.0, 3.0];
        let b = [10.0f32, 20.0, 30.0];
        let mut out = [0.0f32; 3];
        weighted_sum_into(&mut out, &[&a, &b], &[0.5, 0.1]);
        assert_eq!(out, [1.5, 3.0, 4.5]);
        let mut acc = [1.0f32, 1.0, 1.0];
        add_weighted_sum(&mut acc, &[&a, &b], &[1.0, -0.1]);
        assert_eq!(acc, [1.0, 1.0, 1.0]);
    }

    #[test]
    fn accumulator_mean() {
        let mut acc = Accumulator::new(2);
        acc.add(&[1.0, 0.0], 1.0);
        acc.add(&[5.0, 4.0], 3.0);
        assert_eq!(acc.count(), 2);
        assert_eq!(acc.mean(), vec![4.0, 3.0]);
    }

    proptest! {
        #[test]
        fn blocked_equals_naive(len in 0usize..(3 * BLOCK + 17), k in 1usize..5, seed in 0u64..1000) {
            let inputs: Vec<Vec<f32>> = (0..k)
                .map(|i| (0..len).map(|j| (((j as u64 * 31 + i as u64 * 7 + seed) % 97) as f32) - 48.0).collect())
                .collect();
            let w: Vec<f32> = (0..k).map(|i| 0.1 + i as f32 * 0.3).collect();
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let mut out = vec![f32::NAN; len];
            weighted_sum_into(&mut out, &refs, &w);
            let expect = naive(&inputs, &w);
            for (a, b) in out.iter().zip(&expect) {
                prop_assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()));
            }
        }
    }
}
