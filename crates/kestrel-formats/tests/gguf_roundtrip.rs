//! GgufWriter -> GgufFile::open round trips.

mod common;

use std::collections::BTreeMap;

use common::Rng;
use kestrel_formats::{dequantize_row, parse_gguf_header, DType, GgufFile, GgufWriter, MetaValue, ModelFile};

fn all_kinds() -> Vec<(&'static str, MetaValue)> {
    vec![
        ("k.u8", MetaValue::U8(200)),
        ("k.i8", MetaValue::I8(-100)),
        ("k.u16", MetaValue::U16(60000)),
        ("k.i16", MetaValue::I16(-30000)),
        ("k.u32", MetaValue::U32(4_000_000_000)),
        ("k.i32", MetaValue::I32(-2_000_000_000)),
        ("k.u64", MetaValue::U64(u64::MAX)),
        ("k.i64", MetaValue::I64(i64::MIN)),
        ("k.f32", MetaValue::F32(1e-6)),
        ("k.f64", MetaValue::F64(-2.5e300)),
        ("k.bool", MetaValue::Bool(true)),
        ("k.str", MetaValue::String("héllo ▁world".into())),
        ("k.empty_str", MetaValue::String(String::new())),
        ("k.arr_str", vec!["a", "bc", ""].into()),
        ("k.arr_f32", vec![1.0f32, -2.0].into()),
        ("k.arr_i32", vec![1i32, -2, 3].into()),
        ("k.arr_empty", MetaValue::Array(vec![])),
        (
            "k.arr_nested",
            MetaValue::Array(vec![vec![1u8, 2].into(), vec![3u8].into()]),
        ),
    ]
}

#[test]
fn metadata_and_tensors_round_trip() {
    let dir = common::temp_dir("roundtrip");
    let path = dir.join("tiny.gguf");
    let mut rng = Rng(12345);
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", "testarch");
    for (k, v) in all_kinds() {
        w.add_meta(k, v);
    }
    // Re-adding a key replaces the value.
    w.add_meta("k.u8", MetaValue::U8(201));

    let mut expected = BTreeMap::new();
    for (i, dtype) in DType::ALL.iter().enumerate() {
        let shape = match i % 3 {
            0 => vec![3, 256],
            1 => vec![256],
            _ => vec![2, 1, 512],
        };
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
        let name = format!("t.{}", dtype.name());
        w.add_quantized_tensor(&name, *dtype, &shape, &values).unwrap();
        expected.insert(name, (*dtype, shape, values));
    }
    w.write_to(&path).unwrap();

    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture().unwrap(), "testarch");
    for (k, v) in all_kinds() {
        let want = if k == "k.u8" { MetaValue::U8(201) } else { v };
        assert_eq!(g.meta(k), Some(&want), "{k}");
    }
    assert_eq!(g.metadata().len(), all_kinds().len() + 1);
    assert_eq!(g.get_u32("k.u16").unwrap(), 60000);
    assert!(g.get_u32("k.i8").is_err(), "negative is not a u32");
    assert!(g.get_u32("k.u64").is_err(), "too large for u32");
    assert_eq!(g.get_f32("k.i32").unwrap(), -2e9);
    assert_eq!(g.get_f32("k.f64").unwrap(), f32::NEG_INFINITY);
    assert_eq!(g.get_str("k.str").unwrap(), "héllo ▁world");
    assert_eq!(g.opt_str("absent").unwrap(), None);
    assert!(g.opt_str("k.u8").is_err());
    assert_eq!(g.meta("k.bool").and_then(MetaValue::as_bool), Some(true));

    assert_eq!(g.tensor_infos().len(), DType::ALL.len());
    let mut prev_end = 0;
    for info in g.tensor_infos() {
        // File order is insertion order; offsets absolute and aligned.
        assert!(info.offset >= prev_end);
        assert_eq!(info.offset % 32, 0);
        prev_end = info.offset + info.n_bytes as u64;
        let (dtype, shape, values) = &expected[&info.name];
        let t = g.tensor(&info.name).unwrap();
        assert_eq!(t.dtype, *dtype);
        assert_eq!(t.shape, shape.as_slice());
        let got = t.to_f32().unwrap();
        // Compare with quantize+dequantize of the same values, row by row.
        let cols = t.cols();
        let mut want = vec![0.0; values.len()];
        for (r, (src, dst)) in values.chunks(cols).zip(want.chunks_mut(cols)).enumerate() {
            let mut q = Vec::new();
            kestrel_formats::quantize_row(*dtype, src, &mut q).unwrap();
            assert_eq!(t.row(r), q.as_slice(), "{} row {r}", info.name);
            dequantize_row(*dtype, &q, dst).unwrap();
        }
        assert_eq!(got, want, "{}", info.name);
    }
    assert_eq!(g.file_size(), std::fs::metadata(&path).unwrap().len());
    assert!(g.tensor("missing").is_none());

    // The same bytes through the header parser: offsets are relative there.
    let h = parse_gguf_header(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(h.tensors[0].offset, 0);
    assert_eq!(h.data_offset, g.data_offset());
    assert_eq!(h.tensors[1].offset + h.data_offset, g.tensor_infos()[1].offset);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shape_is_reversed_ggml_ne() {
    let mut w = GgufWriter::new();
    w.add_f32_tensor("m", &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        .unwrap();
    let bytes = w.to_bytes().unwrap();
    let h = parse_gguf_header(&bytes).unwrap();
    assert_eq!(h.tensors[0].shape, vec![2, 3]);
    // On disk: n_dims = 2 then ne = [3, 2] (innermost first).
    let needle: Vec<u8> = [
        2u32.to_le_bytes().to_vec(),
        3u64.to_le_bytes().to_vec(),
        2u64.to_le_bytes().to_vec(),
    ]
    .concat();
    assert!(bytes.windows(needle.len()).any(|w| w == needle.as_slice()));
}

#[test]
fn custom_alignment_and_version_2() {
    let dir = common::temp_dir("align");
    let path = dir.join("a.gguf");
    let mut w = GgufWriter::new();
    w.set_alignment(64).unwrap().set_version(2);
    w.add_f32_tensor("a", &[3], &[1.0, 2.0, 3.0]).unwrap();
    w.add_f32_tensor("b", &[5], &[1.0; 5]).unwrap();
    w.write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 2);
    assert_eq!(g.alignment(), 64);
    for i in g.tensor_infos() {
        assert_eq!(i.offset % 64, 0, "{}", i.name);
    }
    assert_eq!(g.tensor("b").unwrap().to_f32().unwrap(), vec![1.0; 5]);
    assert!(GgufWriter::new().set_alignment(48).is_err());
    // ModelFile picks GGUF by magic even without the extension.
    let renamed = dir.join("model.bin");
    std::fs::copy(&path, &renamed).unwrap();
    assert!(matches!(ModelFile::open(&renamed).unwrap(), ModelFile::Gguf(_)));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut w = GgufWriter::new();
    let e = w
        .add_tensor("q", DType::Q8_0, &[2, 32], vec![0u8; 67])
        .unwrap_err();
    assert!(e.to_string().contains("needs 68 bytes, got 67"), "{e}");
    let e = w.add_tensor("q", DType::Q4_K, &[100], vec![]).unwrap_err();
    assert!(e.to_string().contains("not a multiple"), "{e}");
    w.add_tensor("q", DType::Q8_0, &[32], vec![0u8; 34]).unwrap();
    assert!(w.add_tensor("q", DType::Q8_0, &[32], vec![0u8; 34]).is_err());
    assert!(w.add_tensor("z", DType::F32, &[], vec![0u8; 4]).is_err());
    let mut w = GgufWriter::new();
    w.add_meta(
        "mixed",
        MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
    );
    assert!(w.to_bytes().unwrap_err().to_string().contains("mixed"));
}
