//! The "x8" weight layout of Q4_0, Q5_0 and Q8_0 for the SIMD kernels.
//!
//! GGML stores a row as consecutive 32-element blocks (f16 scale, then the
//! block's quants). A SIMD dot product of one block yields eight i32 lane
//! sums that must be added up before the block's scale applies: per block
//! a horizontal sum (or a convert + FMA), for every token.
//!
//! The x8 layout regroups every 8 consecutive blocks (256 elements) of a row
//! so that a 32-byte vector holds 4 quants of each of the 8 blocks: vector
//! j, lane k (bytes 4k..4k+4) = elements 4j..4j+4 of block k. Eight
//! `vpdpbusd` over j = 0..8 then leave block k's whole dot product in lane
//! k, and one convert + one FMA with the 8 scales (stored together, read
//! with one `vcvtph2ps`) finishes 8 blocks. The activations get the same
//! permutation of 4-byte units once per matmul (`permute_group`).
//!
//! Group of 8 blocks, sizes equal to 8 GGML blocks:
//! * Q8_0: 8 × f16 scales, then 8 vectors of 32 quants (272 bytes);
//! * Q4_0: 8 × f16 scales, then 4 × 32 bytes of nibble pairs: byte b of
//!   pair-vector j holds vector j's byte b (low nibble) and vector j+4's
//!   byte b (high nibble) (144 bytes);
//! * Q5_0: 8 × f16 scales, 8 × u32 fifth-bit masks (bit b of mask j is the
//!   fifth bit of vector j's byte b), then the nibbles as Q4_0 (176 bytes).
//!
//! After the whole groups, 4 or more remaining blocks (rows of 640 = 2.5
//! groups, as gemma's) form a half group of 4 blocks in the same scheme with
//! 16-byte vectors (4 scales, 16-bit masks, 16-byte quant vectors); the
//! last 0..3 blocks stay in the GGML layout.

use kestrel_formats::DType;

use crate::cpu::quant_dot::layout::*;

/// Blocks per group.
pub const GB: usize = 8;

/// Whether `dtype` has an x8 layout.
pub fn has_x8(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q5_0 | DType::Q8_0)
}

fn block_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q4_0 => Q4_0_BYTES,
        DType::Q5_0 => Q5_0_BYTES,
        _ => Q8_0_BYTES,
    }
}

/// The 32 quants of a GGML block as plain values: Q8_0 signed (stored as
/// their byte), Q4_0 0..16, Q5_0 0..32.
fn block_quants(dtype: DType, blk: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    match dtype {
        DType::Q8_0 => q.copy_from_slice(&blk[2..34]),
        DType::Q4_0 => {
            for m in 0..16 {
                q[m] = blk[2 + m] & 0x0F;
                q[m + 16] = blk[2 + m] >> 4;
            }
        }
        _ => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            for m in 0..16 {
                q[m] = (blk[6 + m] & 0x0F) | ((((qh >> m) & 1) as u8) << 4);
                q[m + 16] = (blk[6 + m] >> 4) | ((((qh >> (m + 16)) & 1) as u8) << 4);
            }
        }
    }
    q
}

/// The inverse of `block_quants`: a GGML block from a scale and 32 quants.
fn write_block(dtype: DType, d: [u8; 2], q: &[u8; 32], out: &mut [u8]) {
    out[0..2].copy_from_slice(&d);
    match dtype {
        DType::Q8_0 => out[2..34].copy_from_slice(q),
        DType::Q4_0 => {
            for m in 0..16 {
                out[2 + m] = (q[m] & 0x0F) | (q[m + 16] << 4);
            }
        }
        _ => {
            let mut qh = 0u32;
            for (e, &v) in q.iter().enumerate() {
                qh |= (((v >> 4) & 1) as u32) << e;
            }
            out[2..6].copy_from_slice(&qh.to_le_bytes());
            for m in 0..16 {
                out[6 + m] = (q[m] & 0x0F) | ((q[m + 16] & 0x0F) << 4);
            }
        }
    }
}

/// Packs `g` (8 or 4) GGML blocks into one group: `2g` bytes of scales,
/// then (Q5_0) 8 fifth-bit masks of `g * 4` bits, then the quant vectors of
/// `4g` bytes (Q8_0: 8 of them; Q4_0/Q5_0: 4 nibble-pair vectors).
fn pack_group(dtype: DType, g: usize, src: &[u8], out: &mut [u8]) {
    let bb = block_bytes(dtype);
    let w = 4 * g;
    let mut vecs = [[0u8; 32]; 8];
    for k in 0..g {
        let blk = &src[k * bb..(k + 1) * bb];
        out[2 * k..2 * k + 2].copy_from_slice(&blk[0..2]);
        let q = block_quants(dtype, blk);
        for (j, v) in vecs.iter_mut().enumerate() {
            v[4 * k..4 * k + 4].copy_from_slice(&q[4 * j..4 * j + 4]);
        }
    }
    let body = &mut out[2 * g..];
    match dtype {
        DType::Q8_0 => {
            for (j, v) in vecs.iter().enumerate() {
                body[w * j..w * (j + 1)].copy_from_slice(&v[..w]);
            }
        }
        _ => {
            let nib = if dtype == DType::Q5_0 {
                let mb = w / 8; // mask bytes per vector
                for (j, v) in vecs.iter().enumerate() {
                    let mut mask = 0u32;
                    for (b, &x) in v[..w].iter().enumerate() {
                        mask |= (((x >> 4) & 1) as u32) << b;
                    }
                    body[mb * j..mb * (j + 1)].copy_from_slice(&mask.to_le_bytes()[..mb]);
                }
                &mut body[8 * mb..]
            } else {
                body
            };
            for j in 0..4 {
                for b in 0..w {
                    nib[w * j + b] = (vecs[j][b] & 0x0F) | ((vecs[j + 4][b] & 0x0F) << 4);
                }
            }
        }
    }
}

/// The inverse of `pack_group`.
fn unpack_group(dtype: DType, g: usize, grp: &[u8], dst: &mut [u8]) {
    let bb = block_bytes(dtype);
    let w = 4 * g;
    let body = &grp[2 * g..];
    let mut vecs = [[0u8; 32]; 8];
    match dtype {
        DType::Q8_0 => {
            for (j, v) in vecs.iter_mut().enumerate() {
                v[..w].copy_from_slice(&body[w * j..w * (j + 1)]);
            }
        }
        _ => {
            let mb = w / 8;
            let nib = if dtype == DType::Q5_0 {
                &body[8 * mb..]
            } else {
                body
            };
            for j in 0..4 {
                for b in 0..w {
                    vecs[j][b] = nib[w * j + b] & 0x0F;
                    vecs[j + 4][b] = nib[w * j + b] >> 4;
                }
            }
            if dtype == DType::Q5_0 {
                for (j, v) in vecs.iter_mut().enumerate() {
                    let mut m = [0u8; 4];
                    m[..mb].copy_from_slice(&body[mb * j..mb * (j + 1)]);
                    let mask = u32::from_le_bytes(m);
                    for (b, x) in v[..w].iter_mut().enumerate() {
                        *x |= (((mask >> b) & 1) as u8) << 4;
                    }
                }
            }
        }
    }
    for k in 0..g {
        let mut q = [0u8; 32];
        for (j, v) in vecs.iter().enumerate() {
            q[4 * j..4 * j + 4].copy_from_slice(&v[4 * k..4 * k + 4]);
        }
        let d = [grp[2 * k], grp[2 * k + 1]];
        write_block(dtype, d, &q, &mut dst[k * bb..(k + 1) * bb]);
    }
}

/// How a row of `nb` blocks splits: whole groups of 8, then a half group of
/// 4 when at least 4 blocks remain, then single GGML blocks.
pub fn row_split(nb: usize) -> (usize, bool) {
    let ng = nb / GB;
    (ng, nb - ng * GB >= 4)
}

/// Converts one GGML row (`src`, whole blocks) to the x8 layout in `dst`
/// (same length).
pub fn repack_row(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let bb = block_bytes(dtype);
    let (ng, half) = row_split(src.len() / bb);
    for g in 0..ng {
        let r = g * GB * bb..(g + 1) * GB * bb;
        pack_group(dtype, GB, &src[r.clone()], &mut dst[r]);
    }
    let mut done = ng * GB * bb;
    if half {
        let r = done..done + 4 * bb;
        pack_group(dtype, 4, &src[r.clone()], &mut dst[r]);
        done += 4 * bb;
    }
    dst[done..src.len()].copy_from_slice(&src[done..]);
}

/// Converts one x8 row back to GGML's layout (for dequantization).
pub fn unpack_row(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let bb = block_bytes(dtype);
    let (ng, half) = row_split(src.len() / bb);
    for g in 0..ng {
        let r = g * GB * bb..(g + 1) * GB * bb;
        unpack_group(dtype, GB, &src[r.clone()], &mut dst[r]);
    }
    let mut done = ng * GB * bb;
    if half {
        let r = done..done + 4 * bb;
        unpack_group(dtype, 4, &src[r.clone()], &mut dst[r]);
        done += 4 * bb;
    }
    dst[done..src.len()].copy_from_slice(&src[done..]);
}

/// Applies the x8 permutation to the activation quants of one group of `g`
/// blocks (`32 g` values): unit (4 bytes) k*8 + j moves to j*g + k.
pub fn permute_group(q: &mut [i8], g: usize) {
    let mut tmp = [0i8; 256];
    for k in 0..g {
        for j in 0..GB {
            let (s, d) = (4 * (k * GB + j), 4 * (j * g + k));
            tmp[d..d + 4].copy_from_slice(&q[s..s + 4]);
        }
    }
    q[..32 * g].copy_from_slice(&tmp[..32 * g]);
}

/// Applies the x8 permutation to a whole activation row of `cols` quants
/// (matching `repack_row`'s split).
pub fn permute_row(q: &mut [i8], cols: usize) {
    let (ng, half) = row_split(cols / 32);
    for g in 0..ng {
        permute_group(&mut q[256 * g..256 * (g + 1)], GB);
    }
    if half {
        permute_group(&mut q[256 * ng..256 * ng + 128], 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repack_then_unpack_is_the_identity() {
        for dtype in [DType::Q4_0, DType::Q5_0, DType::Q8_0] {
            let bb = block_bytes(dtype);
            // 23 blocks: two groups, a half group and three single blocks.
            let src: Vec<u8> = (0..23 * bb).map(|i| (i * 73 + i / 7) as u8).collect();
            let mut packed = vec![0u8; src.len()];
            repack_row(dtype, &src, &mut packed);
            assert_ne!(
                packed[..20 * bb],
                src[..20 * bb],
                "{dtype}: the layout must change"
            );
            let mut back = vec![0u8; src.len()];
            unpack_row(dtype, &packed, &mut back);
            // Quants and bits are moved, never altered.
            assert_eq!(back, src, "{dtype}");
            assert_eq!(
                &packed[20 * bb..],
                &src[20 * bb..],
                "{dtype}: the rest stays GGML"
            );
        }
    }

    #[test]
    fn lane_k_of_vector_j_holds_block_k_elements_4j() {
        // Q8_0: block k's quant e = 10k + e.
        let mut src = vec![0u8; 8 * Q8_0_BYTES];
        for k in 0..8 {
            for e in 0..32 {
                src[k * Q8_0_BYTES + 2 + e] = (10 * k + e) as u8;
            }
        }
        let mut packed = vec![0u8; src.len()];
        repack_row(DType::Q8_0, &src, &mut packed);
        for j in 0..8 {
            for k in 0..8 {
                for i in 0..4 {
                    assert_eq!(packed[16 + 32 * j + 4 * k + i] as usize, 10 * k + 4 * j + i);
                }
            }
        }
        let mut act: Vec<i8> = (0..256).map(|e| (e / 32 * 10 + e % 32) as i8).collect();
        permute_group(&mut act, 8);
        assert_eq!(
            &packed[16..],
            &act.iter().map(|&v| v as u8).collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn half_group_lanes_hold_four_blocks() {
        let mut src = vec![0u8; 4 * Q8_0_BYTES];
        for k in 0..4 {
            for e in 0..32 {
                src[k * Q8_0_BYTES + 2 + e] = (10 * k + e) as u8;
            }
        }
        let mut packed = vec![0u8; src.len()];
        repack_row(DType::Q8_0, &src, &mut packed);
        for j in 0..8 {
            for k in 0..4 {
                for i in 0..4 {
                    assert_eq!(packed[8 + 16 * j + 4 * k + i] as usize, 10 * k + 4 * j + i);
                }
            }
        }
        let mut act: Vec<i8> = (0..128).map(|e| (e / 32 * 10 + e % 32) as i8).collect();
        permute_row(&mut act, 128);
        let act: Vec<u8> = act.iter().map(|&v| v as u8).collect();
        assert_eq!(&packed[8..], &act[..]);
    }
}
