//! Property-based fuzzing of parse_gguf_header (the cargo-fuzz target in
//! /fuzz does the same with coverage guidance, but needs nightly): random
//! bytes and mutated valid headers must give Ok or Err, never panic.

use kestrel_formats::{parse_gguf_header, DType, GgufWriter, MetaValue};
use proptest::prelude::*;

fn seed_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", "gemma3")
        .add_meta("gemma3.block_count", 18u32)
        .add_meta("f", 0.5f32)
        .add_meta("d", -1.0f64)
        .add_meta("i", -5i64)
        .add_meta("b", true)
        .add_meta("tokens", vec!["<pad>", "<eos>", "▁a"])
        .add_meta("scores", vec![0.0f32, -1.0, -2.0])
        .add_meta("nested", MetaValue::Array(vec![vec![1i16, 2].into()]));
    w.add_f32_tensor("norm", &[4], &[1.0; 4]).unwrap();
    w.add_quantized_tensor("w", DType::Q4_K, &[2, 256], &[0.1; 512])
        .unwrap();
    w.to_bytes().unwrap()
}

/// Values that tend to break length and count handling.
const INTERESTING: [u64; 9] = [
    0,
    1,
    7,
    0xff,
    0xffff_ffff,
    1 << 32,
    1 << 60,
    i64::MAX as u64,
    u64::MAX,
];

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Word(usize, usize, bool),
    Truncate(usize),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<usize>(), 0..INTERESTING.len(), any::<bool>())
            .prop_map(|(p, v, wide)| Mutation::Word(p, v, wide)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Mutation::Insert(p, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let at = |p: usize, len: usize| p % len;
    match m {
        Mutation::Flip(p, b) => {
            let i = at(*p, bytes.len());
            bytes[i] ^= b | 1;
        }
        Mutation::Word(p, v, wide) => {
            let val = INTERESTING[*v];
            let w = if *wide { 8 } else { 4 };
            let i = at(*p, bytes.len());
            let le = val.to_le_bytes();
            for (k, b) in le[..w].iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        Mutation::Truncate(p) => {
            let n = at(*p, bytes.len());
            bytes.truncate(n);
        }
        Mutation::Delete(p, n) => {
            let i = at(*p, bytes.len());
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Insert(p, ins) => {
            let i = at(*p, bytes.len());
            bytes.splice(i..i, ins.iter().copied());
        }
    }
}

fn check(bytes: &[u8]) {
    if let Ok(h) = parse_gguf_header(bytes) {
        assert!(h.alignment.is_power_of_two());
        assert_eq!(h.data_offset % h.alignment, 0);
        assert!(h.data_offset as usize >= bytes.len().min(24));
        for t in &h.tensors {
            assert_eq!(t.offset % h.alignment, 0);
            let n: usize = t.shape.iter().product();
            assert_eq!(t.dtype.row_bytes(n), Some(t.n_bytes), "{}", t.name);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn random_bytes(mut bytes in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        if magic && bytes.len() >= 8 {
            bytes[..4].copy_from_slice(b"GGUF");
            bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        }
        check(&bytes);
    }

    #[test]
    fn mutated_valid_header(muts in prop::collection::vec(mutation(), 1..6)) {
        let mut bytes = seed_file();
        for m in &muts {
            apply(&mut bytes, m);
        }
        check(&bytes);
    }
}

#[test]
fn seed_is_valid() {
    let h = parse_gguf_header(&seed_file()).unwrap();
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.metadata.len(), 9);
}
