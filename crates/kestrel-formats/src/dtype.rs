//! Tensor element types and their GGML block geometry.

/// Element type of a stored tensor: plain floats or one of GGML's block
/// quantizations.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

/// Elements per block of the "legacy" quantizations (Q4_0 .. Q8_0).
pub const QK: usize = 32;
/// Elements per super-block of the K-quantizations.
pub const QK_K: usize = 256;

impl DType {
    /// Every supported type, for tests and tools that iterate over them.
    pub const ALL: [DType; 14] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::Q8_K,
    ];

    /// Maps a GGML type id (as stored in GGUF tensor infos) to a type.
    pub fn from_ggml(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            8 => DType::Q8_0,
            10 => DType::Q2_K,
            11 => DType::Q3_K,
            12 => DType::Q4_K,
            13 => DType::Q5_K,
            14 => DType::Q6_K,
            15 => DType::Q8_K,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// The GGML type id of this type.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2_K => 10,
            DType::Q3_K => 11,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::Q8_K => 15,
            DType::BF16 => 30,
        }
    }

    /// The conventional upper-case name ("F32", "Q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::Q8_K => "Q8_K",
        }
    }

    /// Elements per block: 1 for float types, 32 for Q4_0..Q8_0, 256 for K-quants.
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => QK,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::Q8_K => QK_K,
        }
    }

    /// Bytes per block (see the layout comments in `quant`).
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            // f16 d + 16 bytes of nibbles
            DType::Q4_0 => 18,
            // f16 d, f16 m + 16 bytes of nibbles
            DType::Q4_1 => 20,
            // f16 d + u32 high bits + 16 bytes of nibbles
            DType::Q5_0 => 22,
            // f16 d, f16 m + u32 high bits + 16 bytes of nibbles
            DType::Q5_1 => 24,
            // f16 d + 32 signed bytes
            DType::Q8_0 => 34,
            // 16 scale/min bytes + 64 bytes of 2-bit quants + f16 d + f16 dmin
            DType::Q2_K => 84,
            // 32 high-bit bytes + 64 bytes of 2-bit quants + 12 scale bytes + f16 d
            DType::Q3_K => 110,
            // f16 d + f16 dmin + 12 scale bytes + 128 bytes of nibbles
            DType::Q4_K => 144,
            // Q4_K plus 32 high-bit bytes
            DType::Q5_K => 176,
            // 128 low-nibble bytes + 64 high-bit bytes + 16 i8 scales + f16 d
            DType::Q6_K => 210,
            // f32 d + 256 i8 quants + 16 i16 block sums
            DType::Q8_K => 292,
        }
    }

    /// Bytes needed to store `n_elems` elements, or `None` when `n_elems` is
    /// not a whole number of blocks (or the size overflows).
    pub fn row_bytes(self, n_elems: usize) -> Option<usize> {
        if n_elems % self.block_elems() != 0 {
            return None;
        }
        (n_elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// True for the block-quantized types.
    pub fn is_quantized(self) -> bool {
        !matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
