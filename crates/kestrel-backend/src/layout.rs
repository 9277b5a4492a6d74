//! Plain data that crosses the Backend boundary: batch metadata, KV pool
//! shape, attention and RoPE parameters. No device types here.

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama as stored in GGUF (the converter
    /// permuted q/k so that this style applies).
    Interleaved,
    /// Halves (x[i], x[i + d/2]): NeoX / Hugging Face layout (gemma, qwen,
    /// llama from safetensors).
    Neox,
}

/// One RoPE configuration: `inv_freq[i]` is the angle per position of pair i
/// (already including any frequency scaling such as llama3's). Rotates the
/// first `2 * inv_freq.len()` dimensions of a head.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub style: RopeStyle,
    pub inv_freq: Vec<f32>,
    /// Multiplier of cos/sin (YaRN's attention factor); 1.0 otherwise.
    pub mscale: f32,
}

/// Element type of the KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDType {
    F32,
    F16,
    Bf16,
}

/// Shape of the paged KV pool: `num_blocks` blocks of `block_size` token
/// slots, per layer, each slot holding `n_kv_heads * head_dim` keys and as
/// many values. Slot `s` lives in block `s / block_size` at offset
/// `s % block_size`.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSpec {
    pub n_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDType,
}

impl KvSpec {
    /// Bytes the pool takes on the device.
    pub fn bytes(&self) -> usize {
        let elt = match self.dtype {
            KvDType::F32 => 4,
            KvDType::F16 | KvDType::Bf16 => 2,
        };
        2 * self.n_layers * self.num_blocks * self.block_size * self.n_kv_heads * self.head_dim * elt
    }
}

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    /// KV block ids of the sequence, in order of position.
    pub block_table: Vec<u32>,
    /// Tokens in the KV cache once this step's tokens are written.
    pub context_len: u32,
    /// First row of this sequence's tokens in the step.
    pub query_start: u32,
    /// Number of this sequence's tokens in the step.
    pub query_len: u32,
}

/// The flattened batch of one forward step (vLLM-style): tokens of several
/// sequences, each a contiguous run of rows.
///
/// A row may also read keys that other rows of the same step store: the
/// rows of one sequence entry (a prefill chunk), or single-row entries that
/// share a block table at consecutive positions (a speculative step checks
/// a sequence's drafts this way, so that it runs on the decode kernels).
/// Such rows must be adjacent and in position order: backends that read a
/// step's earlier keys before the step's stores finish rely on it (see
/// [`BatchLayout::first_new_positions`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchLayout {
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// KV slot of each token (block * block_size + offset).
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqLayout>,
    pub block_size: u32,
}

impl BatchLayout {
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// For each row, the first position of its sequence whose key this
    /// step stores: the row's own position, or, where the row before it
    /// stores the key at the position just before (into the slot this row's
    /// table maps that position to), that row's value. Keys from there on
    /// exist only once the step's K/V stores ran; keys before it were in
    /// the pool when the step began. `seq_of` maps rows to entries of
    /// `seqs` (rows outside every entry keep their own position).
    pub fn first_new_positions(&self, seq_of: &[u32]) -> Vec<u32> {
        let mut fresh: Vec<u32> = self.positions.clone();
        for r in 1..fresh.len() {
            let Some(s) = seq_of.get(r).and_then(|&i| self.seqs.get(i as usize)) else {
                continue;
            };
            if self.prev_row_stores_key_of(r, s) {
                fresh[r] = fresh[r - 1];
            }
        }
        fresh
    }

    /// Whether some sequence entry reads a key that another entry of this
    /// step stores (a speculative step's rows): the row before an entry's
    /// first row stores the key that row reads just before its position.
    pub fn has_chained_rows(&self) -> bool {
        self.seqs
            .iter()
            .any(|s| s.query_len > 0 && self.prev_row_stores_key_of(s.query_start as usize, s))
    }

    /// Whether row `r - 1` stores the key that row `r`, of entry `s`, reads
    /// at the position just before its own (the slot `s`'s table maps that
    /// position to).
    fn prev_row_stores_key_of(&self, r: usize, s: &SeqLayout) -> bool {
        let (Some(&pos), Some(&before)) = (
            self.positions.get(r),
            r.checked_sub(1).and_then(|q| self.positions.get(q)),
        ) else {
            return false;
        };
        if pos == 0 || before + 1 != pos {
            return false;
        }
        let (prev, bs) = (pos - 1, self.block_size.max(1));
        let slot = s
            .block_table
            .get((prev / bs) as usize)
            .map(|&block| block as u64 * bs as u64 + (prev % bs) as u64);
        slot.is_some() && slot == self.slot_mapping.get(r - 1).map(|&x| x as u64)
    }

    /// Layout of a single sequence whose tokens `tokens` sit at positions
    /// `start..start+len`, with KV in `block_table`: one entry (a prefill
    /// chunk; its rows see each other's keys).
    pub fn single(tokens: &[u32], start: u32, block_table: &[u32], block_size: u32) -> Self {
        let mut l = BatchLayout {
            block_size,
            ..BatchLayout::default()
        };
        l.push_tokens(tokens.iter().copied(), start as usize, block_table, false);
        l
    }

    /// The same tokens as one single-row entry per token, each seeing the
    /// keys up to its own position: a speculative step's rows (the last
    /// token, then the drafts), which decode kernels and graphs take as
    /// they take rows of different sequences.
    pub fn chained(tokens: &[u32], start: u32, block_table: &[u32], block_size: u32) -> Self {
        let mut l = BatchLayout {
            block_size,
            ..BatchLayout::default()
        };
        l.push_tokens(tokens.iter().copied(), start as usize, block_table, true);
        l
    }

    /// Appends `tokens` at positions `from..` of a sequence whose KV lives
    /// in `table`: as one entry (a chunk; its rows see each other's keys)
    /// or, with `per_row`, one single-row entry per token (see `chained`).
    /// Returns the first row.
    pub fn push_tokens(
        &mut self,
        tokens: impl IntoIterator<Item = u32>,
        from: usize,
        table: &[u32],
        per_row: bool,
    ) -> u32 {
        let bs = self.block_size as usize;
        let start = self.tokens.len() as u32;
        let mut p = from;
        for t in tokens {
            self.tokens.push(t);
            self.positions.push(p as u32);
            self.slot_mapping
                .push(table[p / bs] * bs as u32 + (p % bs) as u32);
            if per_row {
                self.seqs.push(SeqLayout {
                    block_table: table.to_vec(),
                    context_len: p as u32 + 1,
                    query_start: self.tokens.len() as u32 - 1,
                    query_len: 1,
                });
            }
            p += 1;
        }
        if !per_row {
            self.seqs.push(SeqLayout {
                block_table: table.to_vec(),
                context_len: p as u32,
                query_start: start,
                query_len: (p - from) as u32,
            });
        }
        start
    }
}

/// Attention parameters of one layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of q·k.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions
    /// `p - window + 1 ..= p`. None: all earlier positions.
    pub window: Option<u32>,
    /// Attention-logit soft-capping (gemma2); None for most models.
    pub softcap: Option<f32>,
}

/// Index of the largest element (the first one on ties); 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best_v = x;
            best = i;
        }
    }
    best
}

/// One logits row's sampling decision, taken on the device
/// (`Backend::sample_rows`): the engine's sampler chain with its parameters
/// already normalised and its random draw made on the host, so the seeded
/// RNG stays on the host and only token ids come back.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSample {
    /// Argmax after the penalties (temperature 0 or unusable).
    pub greedy: bool,
    /// 1 / temperature.
    pub inv_t: f32,
    /// Keep the `top_k` best; 0: off.
    pub top_k: u32,
    /// Keep the best-first prefix reaching this mass; >= 1: off.
    pub top_p: f32,
    /// Keep scaled logits >= this (ln min_p); -inf: off.
    pub min_p_log: f32,
    /// Repetition penalty applied to every listed token; 1: off.
    pub repetition: f32,
    /// Presence and frequency penalties, for listed tokens with a count.
    pub presence: f32,
    pub frequency: f32,
    /// Uniform draw in [0, 1).
    pub u: f64,
    /// Distinct (token id, times generated) pairs the penalties apply to.
    pub penalties: Vec<(u32, u32)>,
}

impl DeviceSample {
    /// The plain argmax: no penalty, no filter, no draw.
    pub fn argmax() -> DeviceSample {
        DeviceSample {
            greedy: true,
            inv_t: 1.0,
            top_k: 0,
            top_p: 2.0,
            min_p_log: f32::NEG_INFINITY,
            repetition: 1.0,
            presence: 0.0,
            frequency: 0.0,
            u: 0.0,
            penalties: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table: &[u32], context_len: u32, row: u32, len: u32) -> SeqLayout {
        SeqLayout {
            block_table: table.to_vec(),
            context_len,
            query_start: row,
            query_len: len,
        }
    }

    /// Rows 0-2: one sequence's speculative rows (table [3, 1], positions
    /// 15-17 across a block edge); row 3: another sequence's decode at the
    /// next position number but in its own block; rows 4-5: a prefill chunk.
    fn mixed() -> (BatchLayout, Vec<u32>) {
        let t = [3u32, 1];
        let layout = BatchLayout {
            tokens: vec![1, 2, 3, 4, 5, 6],
            positions: vec![15, 16, 17, 18, 0, 1],
            slot_mapping: vec![3 * 16 + 15, 16, 17, 7 * 16 + 2, 9 * 16, 9 * 16 + 1],
            seqs: vec![
                entry(&t, 16, 0, 1),
                entry(&t, 17, 1, 1),
                entry(&t, 18, 2, 1),
                entry(&[5, 7], 19, 3, 1),
                entry(&[9], 2, 4, 2),
            ],
            block_size: 16,
        };
        (layout, vec![0, 1, 2, 3, 4, 4])
    }

    #[test]
    fn first_new_positions_follow_the_rows_that_store_a_rows_keys() {
        let (l, seq_of) = mixed();
        assert_eq!(l.first_new_positions(&seq_of), vec![15, 15, 15, 18, 0, 0]);
        assert!(l.has_chained_rows());
    }

    #[test]
    fn plain_decode_and_prefill_steps_have_no_chained_rows() {
        let (mut l, _) = mixed();
        // Only the other sequence's decode and the prefill chunk.
        l.tokens.drain(..3);
        l.positions.drain(..3);
        l.slot_mapping.drain(..3);
        l.seqs.drain(..3);
        for (i, s) in l.seqs.iter_mut().enumerate() {
            s.query_start = [0, 1][i];
        }
        assert_eq!(l.first_new_positions(&[0, 1, 1]), vec![18, 0, 0]);
        assert!(!l.has_chained_rows());
    }
}
