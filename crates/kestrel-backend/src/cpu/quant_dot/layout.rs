//! Byte layouts of GGML's quantized blocks (sizes and field offsets), as
//! defined by ggml-common.h. Every block is little-endian and unaligned.

// 32-element blocks: f16 d [, f16 m] [, u32 high bits], quants.
pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;
pub const Q5_0_BYTES: usize = 22;
pub const Q5_1_BYTES: usize = 24;
pub const Q8_0_BYTES: usize = 34;

// Q2_K: 16 bytes of (scale | min << 4), 64 bytes of 2-bit quants, f16 d, f16 dmin.
pub const Q2_K_BYTES: usize = 84;
pub const Q2_K_SCALES: usize = 0;
pub const Q2_K_QS: usize = 16;
pub const Q2_K_D: usize = 80;
pub const Q2_K_DMIN: usize = 82;

// Q3_K: 32 bytes of high-bit masks, 64 bytes of 2-bit quants, 12 bytes of
// packed 6-bit scales, f16 d.
pub const Q3_K_BYTES: usize = 110;
pub const Q3_K_HMASK: usize = 0;
pub const Q3_K_QS: usize = 32;
pub const Q3_K_SCALES: usize = 96;
pub const Q3_K_D: usize = 108;

// Q4_K: f16 d, f16 dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.
pub const Q4_K_BYTES: usize = 144;
pub const Q4_K_SCALES: usize = 4;
pub const Q4_K_QS: usize = 16;

// Q5_K: as Q4_K with 32 bytes of fifth bits before the nibbles.
pub const Q5_K_BYTES: usize = 176;
pub const Q5_K_SCALES: usize = 4;
pub const Q5_K_QH: usize = 16;
pub const Q5_K_QS: usize = 48;

// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8 scales, f16 d.
pub const Q6_K_BYTES: usize = 210;
pub const Q6_K_QL: usize = 0;
pub const Q6_K_QH: usize = 128;
pub const Q6_K_SCALES: usize = 192;
pub const Q6_K_D: usize = 208;

// Q8_K: f32 d, 256 i8 quants, 16 i16 sums.
pub const Q8_K_BYTES: usize = 292;
