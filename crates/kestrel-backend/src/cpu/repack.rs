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
//! Blocks past the last whole group (rows of 640 = 2.5 groups) stay in the
//! GGML layout at the end of the row.

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

/// Converts one GGML row (`src`, whole blocks) to the x8 layout in `dst`
/// (same length).
pub fn repack_row(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let bb = block_bytes(dtype);
    let nb = src.len() / bb;
    let ng = nb / GB;
    let gbytes = GB * bb;
    for g in 0..ng {
        let out = &mut dst[g * gbytes..(g + 1) * gbytes];
        let mut vecs = [[0u8; 32]; GB];
        for k in 0..GB {
            let blk = &src[(g * GB + k) * bb..(g * GB + k + 1) * bb];
            out[2 * k..2 * k + 2].copy_from_slice(&blk[0..2]);
            let q = block_quants(dtype, blk);
            for j in 0..GB {
                vecs[j][4 * k..4 * k + 4].copy_from_slice(&q[4 * j..4 * j + 4]);
            }
        }
        let body = &mut out[16..];
        match dtype {
            DType::Q8_0 => {
                for j in 0..GB {
                    body[32 * j..32 * j + 32].copy_from_slice(&vecs[j]);
                }
            }
            _ => {
                let nib = if dtype == DType::Q5_0 {
                    for j in 0..GB {
                        let mut mask = 0u32;
                        for (b, &v) in vecs[j].iter().enumerate() {
                            mask |= (((v >> 4) & 1) as u32) << b;
                        }
                        body[4 * j..4 * j + 4].copy_from_slice(&mask.to_le_bytes());
                    }
                    &mut body[32..]
                } else {
                    body
                };
                for j in 0..4 {
                    for b in 0..32 {
                        nib[32 * j + b] = (vecs[j][b] & 0x0F) | ((vecs[j + 4][b] & 0x0F) << 4);
                    }
                }
            }
        }
    }
    let tail = ng * gbytes;
    dst[tail..src.len()].copy_from_slice(&src[tail..]);
}

/// Converts one x8 row back to GGML's layout (for dequantization).
pub fn unpack_row(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let bb = block_bytes(dtype);
    let nb = src.len() / bb;
    let ng = nb / GB;
    let gbytes = GB * bb;
    for g in 0..ng {
        let grp = &src[g * gbytes..(g + 1) * gbytes];
        let body = &grp[16..];
        let mut vecs = [[0u8; 32]; GB];
        match dtype {
            DType::Q8_0 => {
                for (j, v) in vecs.iter_mut().enumerate() {
                    v.copy_from_slice(&body[32 * j..32 * j + 32]);
                }
            }
            _ => {
                let nib = if dtype == DType::Q5_0 { &body[32..] } else { body };
                for j in 0..4 {
                    for b in 0..32 {
                        vecs[j][b] = nib[32 * j + b] & 0x0F;
                        vecs[j + 4][b] = nib[32 * j + b] >> 4;
                    }
                }
                if dtype == DType::Q5_0 {
                    for (j, v) in vecs.iter_mut().enumerate() {
                        let mask = u32::from_le_bytes([
                            body[4 * j],
                            body[4 * j + 1],
                            body[4 * j + 2],
                            body[4 * j + 3],
                        ]);
                        for (b, x) in v.iter_mut().enumerate() {
                            *x |= (((mask >> b) & 1) as u8) << 4;
                        }
                    }
                }
            }
        }
        for k in 0..GB {
            let mut q = [0u8; 32];
            for j in 0..GB {
                q[4 * j..4 * j + 4].copy_from_slice(&vecs[j][4 * k..4 * k + 4]);
            }
            let d = [grp[2 * k], grp[2 * k + 1]];
            write_block(dtype, d, &q, &mut dst[(g * GB + k) * bb..(g * GB + k + 1) * bb]);
        }
    }
    let tail = ng * gbytes;
    dst[tail..src.len()].copy_from_slice(&src[tail..]);
}

/// Applies the x8 permutation to one group of 256 activation quants: unit
/// (4 bytes) k*8 + j moves to j*8 + k.
pub fn permute_group(q: &mut [i8]) {
    let mut tmp = [0i8; 256];
    for k in 0..GB {
        for j in 0..GB {
            let (s, d) = (4 * (k * GB + j), 4 * (j * GB + k));
            tmp[d..d + 4].copy_from_slice(&q[s..s + 4]);
        }
    }
    q[..256].copy_from_slice(&tmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repack_then_unpack_is_the_identity() {
        for dtype in [DType::Q4_0, DType::Q5_0, DType::Q8_0] {
            let bb = block_bytes(dtype);
            // 20 blocks: two groups and a tail of four.
            let src: Vec<u8> = (0..20 * bb).map(|i| (i * 73 + i / 7) as u8).collect();
            let mut packed = vec![0u8; src.len()];
            repack_row(dtype, &src, &mut packed);
            assert_ne!(packed, src, "{dtype}: the layout must change");
            let mut back = vec![0u8; src.len()];
            unpack_row(dtype, &packed, &mut back);
            // Q5_0 / Q4_0 round-trip exactly (nibbles and bits are moved,
            // never altered).
            assert_eq!(back, src, "{dtype}");
            assert_eq!(&packed[16 * bb..], &src[16 * bb..], "{dtype}: tail stays GGML");
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
        permute_group(&mut act);
        assert_eq!(
            &packed[16..],
            &act.iter().map(|&v| v as u8).collect::<Vec<_>>()[..]
        );
    }
}
