//! Getting host inputs onto any backend through the `Backend` trait alone,
//! so that the CPU and CUDA paths run the same code.

use anyhow::{bail, Context, Result};
use kestrel_backend::{Backend, BatchLayout, KvSpec, RopeParams, RopeStyle, SeqLayout};
use kestrel_formats::{DType, TensorView};

use super::inputs::HostWeight;
use super::spec::{BLOCK_SIZE, HEAD_DIM, KV_DIM, N_KV_HEADS, ROPE_THETA};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An activation holding `data` (`rows * cols` values).
///
/// The trait has no host-to-device write for activations, so the values go
/// up as an F32 "embedding table" and are gathered by `embed` with token i
/// = row i and scale 1: an exact copy on every backend. Call this before
/// `prepare_batch` of the op's own batch: a later batch replaces the
/// device metadata an earlier one refers to.
pub fn act<B: Backend>(be: &B, rows: usize, cols: usize, data: &[f32]) -> Result<B::Act> {
    if data.len() != rows * cols {
        bail!("input of {rows} x {cols} given {} values", data.len());
    }
    if rows == 0 || cols == 0 {
        return Ok(be.alloc_act(rows, cols)?);
    }
    let shape = [rows, cols];
    let bytes = f32_bytes(data);
    let table = be
        .upload_matrix(&TensorView {
            name: "microbench input",
            dtype: DType::F32,
            shape: &shape,
            data: &bytes,
        })
        .context("uploading an input")?;
    let tokens: Vec<u32> = (0..rows as u32).collect();
    let blocks: Vec<u32> = (0..rows.div_ceil(BLOCK_SIZE) as u32).collect();
    let batch = be.prepare_batch(&BatchLayout::single(&tokens, 0, &blocks, BLOCK_SIZE as u32))?;
    let mut out = be.alloc_act(rows, cols)?;
    be.embed(&table, &batch, 1.0, &mut out)?;
    // The table is freed on return: let the copy finish first.
    be.synchronize()?;
    Ok(out)
}

/// An f32 vector (norm weights).
pub fn vector<B: Backend>(be: &B, name: &str, data: &[f32]) -> Result<B::Vector> {
    let shape = [data.len()];
    let bytes = f32_bytes(data);
    Ok(be.upload_vector(
        &TensorView {
            name,
            dtype: DType::F32,
            shape: &shape,
            data: &bytes,
        },
        0.0,
    )?)
}

pub fn weight<B: Backend>(be: &B, name: &str, w: &HostWeight) -> Result<B::Weight> {
    let shape = [w.rows, w.cols];
    be.upload_matrix(&TensorView {
        name,
        dtype: w.dtype,
        shape: &shape,
        data: &w.bytes,
    })
    .with_context(|| format!("uploading {name} ({} [{}, {}])", w.dtype, w.rows, w.cols))
}

/// The RoPE of the model's global layers (NeoX pairs over the whole head).
pub fn rope<B: Backend>(be: &B) -> Result<B::Rope> {
    let pairs = HEAD_DIM / 2;
    let inv_freq = (0..pairs)
        .map(|i| ROPE_THETA.powf(-((2 * i) as f32) / HEAD_DIM as f32))
        .collect();
    Ok(be.make_rope(&RopeParams {
        style: RopeStyle::Neox,
        inv_freq,
        mscale: 1.0,
    })?)
}

/// Blocks sequence `i` of a batch whose sequences hold up to `ctx` tokens owns.
fn table(i: usize, ctx: usize) -> Vec<u32> {
    let nb = ctx.div_ceil(BLOCK_SIZE);
    (i * nb..(i + 1) * nb).map(|b| b as u32).collect()
}

fn slot(table: &[u32], pos: usize) -> u32 {
    table[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32
}

/// A KV pool of one layer with room for `seqs` sequences of `ctx` tokens.
pub fn kv_spec(seqs: usize, ctx: usize, dtype: kestrel_backend::KvDType) -> KvSpec {
    KvSpec {
        n_layers: 1,
        num_blocks: seqs * ctx.div_ceil(BLOCK_SIZE),
        block_size: BLOCK_SIZE,
        n_kv_heads: N_KV_HEADS,
        head_dim: HEAD_DIM,
        dtype,
    }
}

/// A decode step: sequence i (of `ctxs.len()`) adds one token at position
/// `ctxs[i] - 1`, in its own blocks of a pool built by `kv_spec(len, max ctx)`.
pub fn decode_layout(ctxs: &[usize]) -> BatchLayout {
    let max = ctxs.iter().copied().max().unwrap_or(1);
    let mut b = BatchLayout {
        block_size: BLOCK_SIZE as u32,
        ..BatchLayout::default()
    };
    for (i, &ctx) in ctxs.iter().enumerate() {
        let t = table(i, max);
        b.tokens.push(i as u32);
        b.positions.push(ctx as u32 - 1);
        b.slot_mapping.push(slot(&t, ctx - 1));
        b.seqs.push(SeqLayout {
            block_table: t,
            context_len: ctx as u32,
            query_start: i as u32,
            query_len: 1,
        });
    }
    b
}

/// Every token 0..ctx of each of the sequences of `decode_layout(ctxs)`, to
/// fill their KV cache (rows in order: sequence 0's tokens, then 1's, ...).
pub fn fill_layout(ctxs: &[usize]) -> BatchLayout {
    let max = ctxs.iter().copied().max().unwrap_or(1);
    let mut b = BatchLayout {
        block_size: BLOCK_SIZE as u32,
        ..BatchLayout::default()
    };
    for (i, &ctx) in ctxs.iter().enumerate() {
        let t = table(i, max);
        let start = b.tokens.len() as u32;
        for pos in 0..ctx {
            b.tokens.push(0);
            b.positions.push(pos as u32);
            b.slot_mapping.push(slot(&t, pos));
        }
        b.seqs.push(SeqLayout {
            block_table: t,
            context_len: ctx as u32,
            query_start: start,
            query_len: ctx as u32,
        });
    }
    b
}

/// A pool for `ctxs` whose every slot holds random keys and values.
pub fn filled_pool<B: Backend>(
    be: &B,
    ctxs: &[usize],
    dtype: kestrel_backend::KvDType,
    k: &[f32],
    v: &[f32],
) -> Result<B::KvPool> {
    let max = ctxs.iter().copied().max().unwrap_or(1);
    let n: usize = ctxs.iter().sum();
    let mut pool = be.alloc_kv(&kv_spec(ctxs.len(), max, dtype))?;
    let ka = act(be, n, KV_DIM, k)?;
    let va = act(be, n, KV_DIM, v)?;
    let fill = be.prepare_batch(&fill_layout(ctxs))?;
    be.write_kv(&mut pool, 0, &ka, &va, &fill)?;
    be.synchronize()?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_fill_layouts_agree_on_slots() {
        let ctxs = [20, 3];
        let d = decode_layout(&ctxs);
        let f = fill_layout(&ctxs);
        assert_eq!(d.positions, vec![19, 2]);
        // Sequence 1 owns blocks 2.. (20 tokens need 2 blocks of 16).
        assert_eq!(d.seqs[1].block_table, vec![2, 3]);
        assert_eq!(d.slot_mapping, vec![16 + 3, 2 * 16 + 2]);
        assert_eq!(f.tokens.len(), 23);
        assert_eq!(f.slot_mapping[19], d.slot_mapping[0]);
        assert_eq!(f.slot_mapping[22], d.slot_mapping[1]);
        assert_eq!(kv_spec(2, 20, kestrel_backend::KvDType::F16).num_blocks, 4);
    }
}
