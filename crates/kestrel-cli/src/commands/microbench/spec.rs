//! What `kestrel microbench` measures: the operations, the weight types and
//! matrix roles at the default model's shapes (Gemma 3 270M), parsed from
//! the command line, and the list of cases they expand to.

use anyhow::{bail, Result};
use kestrel_backend::{Activation, KvDType};
use kestrel_formats::DType;

/// Dimensions of the default model, Gemma 3 270M: the shapes a decode step
/// of the model the project serves by default actually runs.
pub const HIDDEN: usize = 640;
pub const FFN: usize = 2048;
pub const N_HEADS: usize = 4;
pub const N_KV_HEADS: usize = 1;
pub const HEAD_DIM: usize = 256;
pub const Q_DIM: usize = N_HEADS * HEAD_DIM;
pub const KV_DIM: usize = N_KV_HEADS * HEAD_DIM;
pub const VOCAB: usize = 262_144;
pub const EPS: f32 = 1e-6;
/// RoPE base of the model's global layers.
pub const ROPE_THETA: f32 = 1_000_000.0;
/// `query_pre_attn_scalar` = 256: q·k is scaled by 1/16.
pub const ATTN_SCALE: f32 = 0.0625;
/// KV block size of the engine (`kestrel_engine::BLOCK_SIZE`).
pub const BLOCK_SIZE: usize = 16;
/// k of the top-k case (a common sampling setting).
pub const TOP_K: usize = 40;

/// One operation of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    RmsNorm,
    AddRmsNorm,
    ResidualNorm,
    Geglu,
    Swiglu,
    Rope,
    QkNormRope,
    QkNormRopeStore,
    Gemv,
    Qkv,
    GatedFfn,
    MatmulResidualNorm,
    GatedFfnResidualNorm,
    Attention,
    Argmax,
    Softmax,
    TopK,
}

/// How the outputs of the two implementations are compared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compare {
    /// Floats: the largest difference relative to the largest reference
    /// magnitude must stay within the tolerance.
    Relative(f64),
    /// Token ids: every one must match.
    Exact,
}

impl Op {
    pub const ALL: [Op; 17] = [
        Op::RmsNorm,
        Op::AddRmsNorm,
        Op::ResidualNorm,
        Op::Geglu,
        Op::Swiglu,
        Op::Rope,
        Op::QkNormRope,
        Op::QkNormRopeStore,
        Op::Gemv,
        Op::Qkv,
        Op::GatedFfn,
        Op::MatmulResidualNorm,
        Op::GatedFfnResidualNorm,
        Op::Attention,
        Op::Argmax,
        Op::Softmax,
        Op::TopK,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::RmsNorm => "rms_norm",
            Op::AddRmsNorm => "add_rms_norm",
            Op::ResidualNorm => "residual_norm",
            Op::Geglu => "geglu",
            Op::Swiglu => "swiglu",
            Op::Rope => "rope",
            Op::QkNormRope => "qk_norm_rope",
            Op::QkNormRopeStore => "qk_norm_rope_store",
            Op::Gemv => "gemv",
            Op::Qkv => "qkv",
            Op::GatedFfn => "gated_ffn",
            Op::MatmulResidualNorm => "matmul_residual_norm",
            Op::GatedFfnResidualNorm => "gated_ffn_residual_norm",
            Op::Attention => "attention",
            Op::Argmax => "argmax",
            Op::Softmax => "softmax",
            Op::TopK => "top_k",
        }
    }

    /// Whether the op multiplies by weight matrices (and so runs once per `--types` entry).
    pub fn has_weights(self) -> bool {
        matches!(
            self,
            Op::Gemv | Op::Qkv | Op::GatedFfn | Op::MatmulResidualNorm | Op::GatedFfnResidualNorm
        )
    }

    /// The sampler's operations run on the host only: no backend has a
    /// device implementation of them.
    pub fn host_only(self) -> bool {
        matches!(self, Op::Softmax | Op::TopK)
    }

    /// Agreement required between the reference and the fused implementation.
    /// Float tolerances are relative to the largest reference magnitude: both
    /// sides compute the same math in f32, so they differ only by summation
    /// order and contracted multiply-adds (~1e-6); the bounds leave room for
    /// that and still catch any real fault (a wrong element is off by ~1).
    pub fn compare(self) -> Compare {
        match self {
            Op::RmsNorm | Op::AddRmsNorm | Op::ResidualNorm => Compare::Relative(1e-5),
            Op::Geglu | Op::Swiglu | Op::Rope | Op::QkNormRope => Compare::Relative(1e-4),
            // Through an f16 KV cache (a rounding flip of one stored value)
            // or a chain of products whose 8-bit activation quantization can
            // flip by one step.
            Op::QkNormRopeStore
            | Op::Gemv
            | Op::Qkv
            | Op::GatedFfn
            | Op::MatmulResidualNorm
            | Op::GatedFfnResidualNorm
            | Op::Attention => Compare::Relative(1e-3),
            // Both sum exp() in f64; the reference rounds each term less.
            Op::Softmax => Compare::Relative(1e-6),
            Op::Argmax | Op::TopK => Compare::Exact,
        }
    }

    /// What the two implementations are (for the JSON and the docs).
    pub fn implementations(self) -> (&'static str, &'static str) {
        match self {
            Op::RmsNorm => ("rms_norm", "rms_norm"),
            Op::AddRmsNorm => ("add + rms_norm", "add_rms_norm"),
            Op::ResidualNorm => (
                "residual_norm_unfused (rms_norm + add_rms_norm)",
                "Backend::residual_norm",
            ),
            Op::Geglu | Op::Swiglu => ("gated_activation", "gated_activation"),
            Op::Rope | Op::QkNormRope => ("qk_norm_rope", "qk_norm_rope"),
            Op::QkNormRopeStore => (
                "qk_norm_rope_store_unfused (qk_norm_rope x2 + write_kv)",
                "Backend::qk_norm_rope_store",
            ),
            Op::Gemv => ("matmul", "matmul"),
            Op::Qkv => ("qkv_unfused (3 matmuls)", "Backend::qkv"),
            Op::GatedFfn => ("matmul x2 + gated_activation + matmul", "Backend::gated_ffn"),
            Op::MatmulResidualNorm => (
                "matmul_residual_norm_unfused (matmul + residual_norm)",
                "Backend::matmul_residual_norm",
            ),
            Op::GatedFfnResidualNorm => (
                "matmul x2 + gated_activation + matmul + residual_norm_unfused",
                "Backend::gated_ffn_residual_norm",
            ),
            Op::Attention => ("attention", "attention"),
            Op::Argmax => ("read_act + host argmax", "Backend::argmax_rows"),
            Op::Softmax => ("f64 max + sum of exp", "sampling::log_softmax_normalizer"),
            Op::TopK => ("full sort of the vocabulary", "sampling::top_k_candidates"),
        }
    }

    pub fn parse(s: &str) -> Result<Op> {
        let t = s.trim().to_ascii_lowercase();
        match Op::ALL.iter().find(|o| o.name() == t) {
            Some(&o) => Ok(o),
            None => bail!(
                "--ops: unknown operation '{s}'; expected one of: {}",
                Op::ALL.map(Op::name).join(", ")
            ),
        }
    }
}

/// A weight matrix of the default model: its shape `[out, in]` and the type
/// the default GGUF (Q4_K_M) stores it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    AttnQ,
    AttnK,
    AttnV,
    AttnOut,
    FfnGate,
    FfnUp,
    FfnDown,
    LmHead,
}

impl Role {
    pub const ALL: [Role; 8] = [
        Role::AttnQ,
        Role::AttnK,
        Role::AttnV,
        Role::AttnOut,
        Role::FfnGate,
        Role::FfnUp,
        Role::FfnDown,
        Role::LmHead,
    ];

    /// The GEMV shapes measured when `--shapes` is not given.
    pub const DEFAULT_GEMV: [Role; 4] = [Role::AttnOut, Role::FfnUp, Role::FfnDown, Role::LmHead];

    pub fn name(self) -> &'static str {
        match self {
            Role::AttnQ => "attn_q",
            Role::AttnK => "attn_k",
            Role::AttnV => "attn_v",
            Role::AttnOut => "attn_out",
            Role::FfnGate => "ffn_gate",
            Role::FfnUp => "ffn_up",
            Role::FfnDown => "ffn_down",
            Role::LmHead => "lm_head",
        }
    }

    /// `[out, in]`.
    pub fn shape(self) -> (usize, usize) {
        match self {
            Role::AttnQ => (Q_DIM, HIDDEN),
            Role::AttnK | Role::AttnV => (KV_DIM, HIDDEN),
            Role::AttnOut => (HIDDEN, Q_DIM),
            Role::FfnGate | Role::FfnUp => (FFN, HIDDEN),
            Role::FfnDown => (HIDDEN, FFN),
            // Tied to the token embedding.
            Role::LmHead => (VOCAB, HIDDEN),
        }
    }

    /// The type of this matrix in gemma-3-270m-q4_k_m.gguf (`kestrel inspect --tensors`).
    pub fn model_dtype(self) -> DType {
        match self {
            Role::AttnQ | Role::AttnK | Role::FfnGate | Role::FfnUp => DType::Q5_0,
            Role::AttnV | Role::LmHead => DType::Q8_0,
            Role::AttnOut => DType::Q4_K,
            Role::FfnDown => DType::Q6_K,
        }
    }

    pub fn parse(s: &str) -> Result<Role> {
        let t = s.trim().to_ascii_lowercase();
        match Role::ALL.iter().find(|r| r.name() == t) {
            Some(&r) => Ok(r),
            None => bail!(
                "--shapes: unknown matrix '{s}'; expected one of: {}",
                Role::ALL
                    .map(|r| {
                        let (o, i) = r.shape();
                        format!("{} ({o}x{i})", r.name())
                    })
                    .join(", ")
            ),
        }
    }
}

/// The weight types of a case: one type for every matrix, or each matrix in
/// the type the default model stores it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Types {
    Uniform(DType),
    Model,
}

impl Types {
    /// The types measured when `--types` is not given: every type with a
    /// device GEMV kernel, and the default model's mix.
    pub const DEFAULT: [Types; 10] = [
        Types::Uniform(DType::Q8_0),
        Types::Uniform(DType::Q5_0),
        Types::Uniform(DType::Q4_0),
        Types::Uniform(DType::Q4_K),
        Types::Uniform(DType::Q5_K),
        Types::Uniform(DType::Q6_K),
        Types::Uniform(DType::F16),
        Types::Uniform(DType::BF16),
        Types::Uniform(DType::F32),
        Types::Model,
    ];

    pub fn name(self) -> String {
        match self {
            Types::Uniform(d) => d.name().to_ascii_lowercase(),
            Types::Model => "model".into(),
        }
    }

    pub fn of(self, role: Role) -> DType {
        match self {
            Types::Uniform(d) => d,
            Types::Model => role.model_dtype(),
        }
    }

    pub fn parse(s: &str) -> Result<Types> {
        let t = s.trim().to_ascii_lowercase();
        if t == "model" {
            return Ok(Types::Model);
        }
        match DType::ALL.iter().find(|d| d.name().eq_ignore_ascii_case(&t)) {
            Some(&d) => Ok(Types::Uniform(d)),
            None => bail!(
                "--types: unknown weight type '{s}'; expected one of: {}, model",
                DType::ALL.map(|d| d.name().to_ascii_lowercase()).join(", ")
            ),
        }
    }
}

/// One measured case: an operation at one shape (and weight type, context).
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub op: Op,
    /// Activation rows (tokens of the step; sequences for attention).
    pub rows: usize,
    pub types: Option<Types>,
    /// The matrix of a `gemv` case.
    pub role: Option<Role>,
    pub act: Option<Activation>,
    /// Context length of an `attention` case.
    pub ctx: Option<usize>,
    pub kv: KvDType,
    /// Seed of the case's random inputs (the same for both implementations).
    pub seed: u64,
}

pub fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::GeluTanh => "geglu",
        Activation::Silu => "swiglu",
    }
}

pub fn kv_bytes(kv: KvDType) -> usize {
    match kv {
        KvDType::F32 => 4,
        KvDType::F16 | KvDType::Bf16 => 2,
    }
}

impl Case {
    /// "gemv/q4_k/lm_head/r1", "attention/ctx4096/r8", "rms_norm/r1".
    pub fn test_name(&self) -> String {
        let mut parts = vec![self.op.name().to_string()];
        if let Some(t) = self.types {
            parts.push(t.name());
        }
        if let Some(r) = self.role {
            parts.push(r.name().into());
        }
        if let Some(a) = self.act {
            parts.push(act_name(a).into());
        }
        if let Some(c) = self.ctx {
            parts.push(format!("ctx{c}"));
        }
        parts.push(format!("r{}", self.rows));
        parts.join("/")
    }

    /// The weight matrices the case multiplies by.
    pub fn roles(&self) -> Vec<Role> {
        match self.op {
            Op::Gemv => self.role.into_iter().collect(),
            Op::Qkv => vec![Role::AttnQ, Role::AttnK, Role::AttnV],
            Op::GatedFfn | Op::GatedFfnResidualNorm => vec![Role::FfnGate, Role::FfnUp, Role::FfnDown],
            Op::MatmulResidualNorm => vec![Role::AttnOut],
            _ => Vec::new(),
        }
    }

    pub fn dtype(&self, role: Role) -> DType {
        self.types.map_or(DType::F32, |t| t.of(role))
    }

    /// Why the case cannot run (a row length that is not a whole number of
    /// the type's blocks, as K-quants of 640-wide rows), if so.
    pub fn unsupported(&self) -> Option<String> {
        for role in self.roles() {
            let d = self.dtype(role);
            let (_, cols) = role.shape();
            if d.row_bytes(cols).is_none() {
                return Some(format!(
                    "{} rows of {cols} are not a whole number of {d} blocks of {}",
                    role.name(),
                    d.block_elems()
                ));
            }
        }
        None
    }

    /// Bytes of the stored weights of `role`.
    pub fn weight_bytes(&self, role: Role) -> f64 {
        let (rows, cols) = role.shape();
        let d = self.dtype(role);
        (rows * d.row_bytes(cols).unwrap_or(cols * 4)) as f64
    }

    /// Bytes of the data a decode step reads once per layer from memory:
    /// the weights, or the KV cache of an attention case (0: none, the
    /// op's inputs are the step's own activations, hot in cache).
    pub fn streamed_bytes(&self) -> f64 {
        match self.op {
            Op::Attention => {
                let ctx = self.ctx.unwrap_or(0) as f64;
                2.0 * self.rows as f64 * ctx * KV_DIM as f64 * kv_bytes(self.kv) as f64
            }
            _ => self.roles().iter().map(|&role| self.weight_bytes(role)).sum(),
        }
    }

    /// Bytes that must move between memory and the compute units (weights,
    /// activations in and out, the KV cache read), and floating-point
    /// operations of the multiply-adds; intermediates a fused kernel keeps
    /// on chip are not counted, so both implementations are rated against
    /// the same minimum traffic.
    pub fn cost(&self) -> (f64, f64) {
        let r = self.rows as f64;
        let f = 4.0;
        let (h, ffn, q, kv) = (HIDDEN as f64, FFN as f64, Q_DIM as f64, KV_DIM as f64);
        let weights: f64 = self.roles().iter().map(|&role| self.weight_bytes(role)).sum();
        let macs: f64 = self
            .roles()
            .iter()
            .map(|&role| {
                let (o, i) = role.shape();
                (o * i) as f64
            })
            .sum();
        let flops = 2.0 * r * macs;
        match self.op {
            Op::RmsNorm => (f * (2.0 * r * h + h), 0.0),
            Op::AddRmsNorm => (f * (4.0 * r * h + h), 0.0),
            Op::ResidualNorm => (f * (4.0 * r * h + 2.0 * h), 0.0),
            Op::Geglu | Op::Swiglu => (f * 3.0 * r * ffn, 0.0),
            Op::Rope => (f * (2.0 * r * q + HEAD_DIM as f64 / 2.0), 0.0),
            Op::QkNormRope => (f * (2.0 * r * q + HEAD_DIM as f64 * 1.5), 0.0),
            Op::QkNormRopeStore => {
                let elt = kv_bytes(self.kv) as f64;
                (
                    f * (2.0 * r * q + 3.0 * r * kv + HEAD_DIM as f64 * 2.5) + 2.0 * r * kv * elt,
                    0.0,
                )
            }
            Op::Gemv => {
                let (o, i) = self.role.map_or((0, 0), Role::shape);
                (weights + f * r * (o + i) as f64, flops)
            }
            Op::Qkv => (weights + f * r * (h + q + 2.0 * kv), flops),
            Op::GatedFfn => (weights + f * 2.0 * r * h, flops),
            // a in, delta out, x read and written, out, two norm weights.
            Op::MatmulResidualNorm => (weights + f * (r * q + 4.0 * r * h + 2.0 * h), flops),
            Op::GatedFfnResidualNorm => (weights + f * (5.0 * r * h + 2.0 * h), flops),
            Op::Attention => {
                let ctx = self.ctx.unwrap_or(0) as f64;
                let elt = kv_bytes(self.kv) as f64;
                (2.0 * r * ctx * kv * elt + f * 2.0 * r * q, 4.0 * r * ctx * q)
            }
            Op::Argmax | Op::Softmax | Op::TopK => (f * r * VOCAB as f64, 0.0),
        }
    }
}

/// What the command line asked for.
#[derive(Clone, Debug)]
pub struct Selection {
    pub ops: Vec<Op>,
    pub types: Vec<Types>,
    pub shapes: Vec<Role>,
    pub rows: Vec<usize>,
    pub ctx: Vec<usize>,
    pub kv: KvDType,
    pub seed: u64,
}

/// Parses a comma-separated list (already split by clap) with `parse`,
/// dropping duplicates and keeping the order given; `default` when empty.
pub fn parse_list<T: PartialEq + Copy>(
    given: &[String],
    default: &[T],
    parse: impl Fn(&str) -> Result<T>,
) -> Result<Vec<T>> {
    if given.is_empty() {
        return Ok(default.to_vec());
    }
    let mut out = Vec::new();
    for s in given.iter().filter(|s| !s.trim().is_empty()) {
        let v = parse(s)?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

impl Selection {
    /// Every case, in the order of `--ops`; cases that cannot run (see
    /// `Case::unsupported`) are kept and reported as skipped.
    pub fn cases(&self) -> Vec<Case> {
        let mut out = Vec::new();
        for &op in &self.ops {
            for &rows in &self.rows {
                let base = Case {
                    op,
                    rows,
                    types: None,
                    role: None,
                    act: None,
                    ctx: None,
                    kv: self.kv,
                    seed: 0,
                };
                let mut variants = vec![base];
                if op.has_weights() {
                    variants = self
                        .types
                        .iter()
                        .map(|&t| Case {
                            types: Some(t),
                            ..variants[0].clone()
                        })
                        .collect();
                }
                if op == Op::Gemv {
                    variants = variants
                        .iter()
                        .flat_map(|c| {
                            self.shapes.iter().map(move |&r| Case {
                                role: Some(r),
                                ..c.clone()
                            })
                        })
                        .collect();
                }
                if op == Op::GatedFfn {
                    variants = variants
                        .iter()
                        .flat_map(|c| {
                            [Activation::GeluTanh, Activation::Silu].map(|a| Case {
                                act: Some(a),
                                ..c.clone()
                            })
                        })
                        .collect();
                }
                if op == Op::Attention {
                    variants = variants
                        .iter()
                        .flat_map(|c| {
                            self.ctx.iter().map(move |&n| Case {
                                ctx: Some(n),
                                ..c.clone()
                            })
                        })
                        .collect();
                }
                out.extend(variants);
            }
        }
        for (i, c) in out.iter_mut().enumerate() {
            c.seed = self.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_say_what_is_accepted() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()).unwrap(), op);
        }
        let e = Op::parse("rmsnorm").unwrap_err().to_string();
        assert!(
            e.contains("--ops") && e.contains("'rmsnorm'") && e.contains("rms_norm"),
            "{e}"
        );
        assert_eq!(Types::parse("Q4_K").unwrap(), Types::Uniform(DType::Q4_K));
        assert_eq!(Types::parse("model").unwrap(), Types::Model);
        let e = Types::parse("q9_k").unwrap_err().to_string();
        assert!(e.contains("--types") && e.contains("q6_k"), "{e}");
        assert!(Role::parse("lm_head").is_ok() && Role::parse("lm").is_err());
    }

    #[test]
    fn k_quants_of_640_wide_rows_are_skipped_with_a_reason() {
        let sel = Selection {
            ops: vec![Op::Gemv, Op::Qkv],
            types: vec![Types::Uniform(DType::Q4_K), Types::Model],
            shapes: vec![Role::FfnUp, Role::FfnDown],
            rows: vec![1],
            ctx: vec![512],
            kv: KvDType::F16,
            seed: 1,
        };
        let cases = sel.cases();
        // gemv: 2 types x 2 shapes; qkv: 2 types.
        assert_eq!(cases.len(), 6);
        let why = |name: &str| {
            cases
                .iter()
                .find(|c| c.test_name() == name)
                .map(Case::unsupported)
                .unwrap_or_else(|| panic!("no case {name}"))
        };
        assert!(why("gemv/q4_k/ffn_up/r1").unwrap().contains("Q4_K"));
        assert_eq!(why("gemv/q4_k/ffn_down/r1"), None);
        assert!(why("qkv/q4_k/r1").is_some());
        assert_eq!(why("qkv/model/r1"), None);
        // Seeds differ per case, so no two cases share their inputs.
        let mut seeds: Vec<u64> = cases.iter().map(|c| c.seed).collect();
        seeds.dedup();
        assert_eq!(seeds.len(), cases.len());
    }

    #[test]
    fn gemv_traffic_is_weights_plus_activations() {
        let c = Case {
            op: Op::Gemv,
            rows: 8,
            types: Some(Types::Uniform(DType::Q8_0)),
            role: Some(Role::LmHead),
            act: None,
            ctx: None,
            kv: KvDType::F16,
            seed: 0,
        };
        let (bytes, flops) = c.cost();
        let weights = (VOCAB * 640 / 32 * 34) as f64;
        assert_eq!(bytes, weights + 4.0 * 8.0 * (VOCAB + 640) as f64);
        assert_eq!(flops, 2.0 * 8.0 * (VOCAB * 640) as f64);
    }
}
