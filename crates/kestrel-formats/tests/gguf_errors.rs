//! Hostile and broken GGUF input: every case must give a clear error (naming
//! the file and the problem), never a panic or a huge allocation.

mod common;

use kestrel_formats::{parse_gguf_header, FormatError, GgufFile, GgufWriter, ModelFile};

/// Hand-assembles GGUF bytes so tests can write things the writer refuses.
#[derive(Default)]
struct Raw {
    bytes: Vec<u8>,
}

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw::default();
        r.bytes.extend(b"GGUF");
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.bytes.extend(s.as_bytes());
        self
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for d in ne {
            self.u64(*d);
        }
        self.u32(ty).u64(offset)
    }
}

fn err(bytes: &[u8]) -> String {
    parse_gguf_header(bytes)
        .expect_err("hostile input must be rejected")
        .to_string()
}

fn tiny_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", "llama")
        .add_meta("tokens", vec!["a", "b", "c"])
        .add_meta("eps", 1e-5f32);
    w.add_f32_tensor("a.weight", &[2, 4], &[1.0; 8]).unwrap();
    w.add_quantized_tensor("b.weight", kestrel_formats::DType::Q8_0, &[32], &[0.5; 32])
        .unwrap();
    w.to_bytes().unwrap()
}

#[test]
fn bad_magic() {
    let dir = common::temp_dir("magic");
    let path = dir.join("x.gguf");
    std::fs::write(&path, b"GGML\x03\x00\x00\x00rest of file").unwrap();
    let e = GgufFile::open(&path).unwrap_err();
    assert!(matches!(
        e,
        FormatError::NotGguf {
            magic: 0x4c4d_4747,
            ..
        }
    ));
    let msg = e.to_string();
    assert!(msg.contains("x.gguf: not a GGUF file (magic 0x4c4d4747"), "{msg}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_version() {
    for v in [0u32, 1, 4, 99] {
        let msg = err(&Raw::header(v, 0, 0).bytes);
        assert!(msg.contains(&format!("unsupported GGUF version {v}")), "{msg}");
    }
    let msg = err(&Raw::header(3u32.swap_bytes(), 0, 0).bytes);
    assert!(msg.contains("big-endian"), "{msg}");
    assert!(parse_gguf_header(&Raw::header(2, 0, 0).bytes).is_ok());
}

#[test]
fn unknown_tensor_type() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("x", &[32], 99, 0);
    let dir = common::temp_dir("type");
    let path = dir.join("model.gguf");
    std::fs::write(&path, &r.bytes).unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("model.gguf: unsupported tensor type 99 for tensor 'x'"),
        "{msg}"
    );
    // Types ggml knows but kestrel does not (Q8_1 = 9, IQ2_XXS = 16) too.
    for ty in [4, 9, 16, 29] {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("y", &[256], ty, 0);
        assert!(err(&r.bytes).contains(&format!("unsupported tensor type {ty}")));
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn tensor_data_beyond_eof() {
    let bytes = tiny_file();
    let dir = common::temp_dir("eof");
    let path = dir.join("model.gguf");
    // The file ends with b.weight's 34 bytes (+ padding to 32).
    let h = parse_gguf_header(&bytes).unwrap();
    let b = &h.tensors[1];
    let b_start = h.data_offset + b.offset;
    std::fs::write(&path, &bytes[..(b_start + 10) as usize]).unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    let want = format!(
        "model.gguf: truncated: tensor 'b.weight' needs bytes {}..{} but the file has {}",
        b_start,
        b_start + 34,
        b_start + 10
    );
    assert!(msg.contains(&want), "{msg}\nwant: {want}");

    // An offset far beyond the file, without overflow.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("far", &[8], 0, u64::MAX - 31);
    std::fs::write(&path, &r.bytes).unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    assert!(msg.contains("truncated: tensor 'far'"), "{msg}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn absurd_counts_and_lengths() {
    let huge = 1u64 << 60;
    let msg = err(&Raw::header(3, huge, 0).bytes);
    assert!(
        msg.contains("truncated") && msg.contains(&huge.to_string()),
        "{msg}"
    );
    assert!(err(&Raw::header(3, 0, huge).bytes).contains("metadata entries"));
    assert!(err(&Raw::header(3, u64::MAX, u64::MAX).bytes).contains("truncated"));

    // A key with an absurd length.
    let mut r = Raw::header(3, 0, 1);
    r.u64(huge).bytes.extend([0u8; 64]);
    let msg = err(&r.bytes);
    assert!(msg.contains("truncated: metadata key #0"), "{msg}");

    // A string value with an absurd length.
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(u64::MAX);
    assert!(err(&r.bytes).contains("value of metadata 'k'"));

    // An array with an absurd count, of strings and of nested arrays.
    for elem in [0u32, 8, 9] {
        let mut r = Raw::header(3, 0, 1);
        r.str("arr").u32(9).u32(elem).u64(huge);
        let msg = err(&r.bytes);
        assert!(msg.contains("elements in array 'arr'"), "{msg}");
    }

    // Deeply nested arrays are refused, not recursed into.
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..100 {
        r.u32(9).u64(1);
    }
    assert!(err(&r.bytes).contains("nested"));

    // Absurd dimensions: no overflow, no allocation.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("big", &[1 << 40, 1 << 40, 1 << 40], 0, 0);
    assert!(err(&r.bytes).contains("overflows"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("neg", &[u64::MAX], 0, 0);
    assert!(err(&r.bytes).contains("negative"));
}

#[test]
fn malformed_tensor_infos() {
    let cases: [(&[u64], u32, u64, &str); 5] = [
        (&[], 0, 0, "0 dimensions"),
        (&[1, 1, 1, 1, 1], 0, 0, "5 dimensions"),
        (&[100], 12, 0, "not a multiple of the block size 256"),
        (&[32], 0, 8, "not a multiple of the alignment 32"),
        (&[32], 0, 1, "alignment"),
    ];
    for (ne, ty, offset, want) in cases {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("t", ne, ty, offset).bytes.extend([0u8; 64]);
        let msg = err(&r.bytes);
        assert!(msg.contains(want) && msg.contains("'t'"), "{msg} (want {want})");
    }
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[4], 0, 0).tensor("t", &[4], 0, 32);
    assert!(err(&r.bytes).contains("duplicate tensor name 't'"));
}

#[test]
fn malformed_metadata() {
    let mut r = Raw::header(3, 0, 2);
    r.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
    assert!(err(&r.bytes).contains("duplicate metadata key 'k'"));
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u32(0);
    assert!(err(&r.bytes).contains("unknown value type 13"));
    let mut r = Raw::header(3, 0, 1);
    r.str("b").u32(7).bytes.push(2);
    assert!(err(&r.bytes).contains("invalid bool"));
    for (ty, val) in [(4u32, 0u32), (4, 3), (5, 32)] {
        let mut r = Raw::header(3, 0, 1);
        r.str("general.alignment").u32(ty).u32(val);
        assert!(err(&r.bytes).contains("general.alignment"));
    }
    let mut r = Raw::header(3, 0, 1);
    r.str("bad\u{0}key").u32(0).bytes.push(1);
    assert!(parse_gguf_header(&r.bytes).is_ok(), "NUL is valid UTF-8");
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).bytes.extend([0xff, 0xfe]);
    r.u32(0).bytes.push(1);
    assert!(err(&r.bytes).contains("not valid UTF-8"));
}

/// Every prefix of a small valid file fails cleanly (header prefixes via the
/// parser, data prefixes via open).
#[test]
fn every_truncation_point() {
    let bytes = tiny_file();
    let h = parse_gguf_header(&bytes).unwrap();
    let header_end = h.data_offset as usize;
    for cut in 0..header_end.min(bytes.len()) {
        if let Ok(p) = parse_gguf_header(&bytes[..cut]) {
            // Only the zero padding after the last tensor info may be cut.
            assert_eq!(p.tensors.len(), 2, "cut {cut}");
            continue;
        }
        let msg = err(&bytes[..cut]);
        assert!(msg.starts_with("<input>: "), "{msg}");
    }
    let dir = common::temp_dir("cuts");
    let path = dir.join("cut.gguf");
    let last = h.tensors.last().unwrap();
    let needed = (h.data_offset + last.offset) as usize + last.n_bytes;
    for cut in (0..needed).step_by(7).chain([needed - 1]) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let msg = GgufFile::open(&path).unwrap_err().to_string();
        assert!(
            msg.contains("cut.gguf") && msg.contains("truncated"),
            "cut {cut}: {msg}"
        );
    }
    std::fs::write(&path, &bytes[..needed]).unwrap();
    assert!(GgufFile::open(&path).is_ok(), "trailing padding is optional");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_file_and_unknown_format() {
    let dir = common::temp_dir("missing");
    let msg = GgufFile::open(dir.join("nope.gguf")).unwrap_err().to_string();
    assert!(msg.contains("nope.gguf"), "{msg}");
    let other = dir.join("weights.bin");
    std::fs::write(&other, b"hello world").unwrap();
    let e = ModelFile::open(&other).unwrap_err();
    assert!(matches!(e, FormatError::UnknownModelFormat { .. }));
    assert!(e.to_string().contains("weights.bin"));
    let msg = ModelFile::open(dir.join("gone.gguf")).unwrap_err().to_string();
    assert!(msg.contains("gone.gguf"), "{msg}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn metadata_accessor_errors() {
    let dir = common::temp_dir("meta");
    let path = dir.join("meta.gguf");
    std::fs::write(&path, tiny_file()).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let msg = g.get_u32("llama.block_count").unwrap_err().to_string();
    assert!(
        msg.contains("meta.gguf: missing metadata key 'llama.block_count'"),
        "{msg}"
    );
    let msg = g.get_str("eps").unwrap_err().to_string();
    assert!(
        msg.contains("meta.gguf: metadata key 'eps' should be a string but is f32"),
        "{msg}"
    );
    let msg = g.get_f32("tokens").unwrap_err().to_string();
    assert!(msg.contains("'tokens'") && msg.contains("array"), "{msg}");
    assert_eq!(g.opt_f32("eps").unwrap(), Some(1e-5));
    std::fs::remove_dir_all(dir).ok();
}
