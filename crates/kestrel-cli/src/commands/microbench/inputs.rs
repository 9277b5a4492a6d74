//! Deterministic random inputs: both implementations of a case get exactly
//! the same numbers, whatever the backend.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use kestrel_formats::{quantize_row, DType};

use super::spec::{Case, Role};

/// SplitMix64: tiny, seedable and good enough for benchmark inputs (the
/// CLI has no RNG dependency of its own).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// The inputs of a case, derived from its seed: `acts(i)` is the i-th
/// activation or vector the op asks for.
pub struct Inputs {
    seed: u64,
    /// Stored bytes of each weight matrix, built once and uploaded to both backends.
    pub weights: BTreeMap<Role, HostWeight>,
}

pub struct HostWeight {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: Vec<u8>,
}

/// Distinct rows quantized per matrix; taller matrices repeat them. Quantizing
/// all 262,144 rows of the LM head for every type would take longer than
/// measuring it, and the bytes moved (all that the timing depends on) are
/// the same.
const DISTINCT_ROWS: usize = 256;

impl Inputs {
    pub fn build(case: &Case) -> Result<Inputs> {
        let mut weights = BTreeMap::new();
        for (i, role) in case.roles().into_iter().enumerate() {
            let (rows, cols) = role.shape();
            let dtype = case.dtype(role);
            let w = host_weight(dtype, rows, cols, case.seed.wrapping_add(1000 + i as u64))
                .with_context(|| format!("building a random {dtype} {} [{rows}, {cols}]", role.name()))?;
            weights.insert(role, w);
        }
        Ok(Inputs {
            seed: case.seed,
            weights,
        })
    }

    /// Input `i` of the case: `n` values uniform in [-scale, scale).
    pub fn act(&self, i: u64, n: usize, scale: f32) -> Vec<f32> {
        Rng::new(self.seed.wrapping_mul(31).wrapping_add(i)).vec(n, scale)
    }

    /// A norm weight: values around 1, as trained RMSNorm weights are.
    pub fn norm_weight(&self, i: u64, n: usize) -> Vec<f32> {
        self.act(i, n, 0.5).into_iter().map(|v| 1.0 + v).collect()
    }

    pub fn weight(&self, role: Role) -> Result<&HostWeight> {
        self.weights
            .get(&role)
            .with_context(|| format!("the case has no {} matrix", role.name()))
    }
}

/// A `[rows, cols]` matrix of `dtype`: rows of varied magnitude with an
/// outlier each (as trained weights have), quantized by kestrel_formats.
pub fn host_weight(dtype: DType, rows: usize, cols: usize, seed: u64) -> Result<HostWeight> {
    let row_bytes = dtype
        .row_bytes(cols)
        .with_context(|| format!("{cols} columns are not a whole number of {dtype} blocks"))?;
    let mut rng = Rng::new(seed);
    let distinct = rows.min(DISTINCT_ROWS);
    let mut pattern = Vec::with_capacity(distinct * row_bytes);
    for _ in 0..distinct {
        let scale = 0.05 + (rng.uniform() + 1.0) * 0.5;
        let mut row = rng.vec(cols, scale);
        let at = (rng.next_u64() % cols as u64) as usize;
        row[at] *= 4.0;
        quantize_row(dtype, &row, &mut pattern)?;
    }
    let total = rows.checked_mul(row_bytes).context("weight size overflows")?;
    let mut bytes = Vec::with_capacity(total);
    while bytes.len() < total {
        let take = (total - bytes.len()).min(pattern.len());
        bytes.extend_from_slice(&pattern[..take]);
    }
    Ok(HostWeight {
        dtype,
        rows,
        cols,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_uniform_in_range() {
        let a = Rng::new(5).vec(10_000, 1.0);
        assert_eq!(a, Rng::new(5).vec(10_000, 1.0));
        assert_ne!(a, Rng::new(6).vec(10_000, 1.0));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn tall_weights_repeat_the_distinct_rows() {
        let w = host_weight(DType::Q8_0, 600, 64, 1).unwrap();
        let rb = DType::Q8_0.row_bytes(64).unwrap();
        assert_eq!(w.bytes.len(), 600 * rb);
        assert_eq!(
            w.bytes[..rb],
            w.bytes[DISTINCT_ROWS * rb..(DISTINCT_ROWS + 1) * rb]
        );
        assert_ne!(w.bytes[..rb], w.bytes[rb..2 * rb]);
        assert!(host_weight(DType::Q4_K, 4, 640, 1).is_err());
    }
}
