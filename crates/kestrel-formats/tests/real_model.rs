//! Checks against the real default model (Gemma 3 270M, Q4_K_M GGUF).
//! Fails (does not skip) when the model is absent: run scripts/fetch-model.sh.

mod common;

use kestrel_formats::{DType, GgufFile, ModelFile};

fn open() -> GgufFile {
    let path = common::model_path();
    GgufFile::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

#[test]
fn header_and_metadata() {
    let g = open();
    assert!(g.version() == 3 || g.version() == 2);
    assert_eq!(g.architecture().unwrap(), "gemma3");
    assert_eq!(g.get_u32("gemma3.block_count").unwrap(), 18);
    assert_eq!(g.get_u32("gemma3.embedding_length").unwrap(), 640);
    assert!(g.get_f32("gemma3.attention.layer_norm_rms_epsilon").unwrap() > 0.0);
    let tokens = g
        .meta("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap();
    assert_eq!(tokens.len(), 262144);
    assert_eq!(g.opt_u32("no.such.key").unwrap(), None);
    let err = g.get_u32("no.such.key").unwrap_err().to_string();
    assert!(
        err.contains("no.such.key") && err.contains("gemma-3-270m"),
        "{err}"
    );
    let err = g.get_u32("general.architecture").unwrap_err().to_string();
    assert!(
        err.contains("general.architecture") && err.contains("string"),
        "{err}"
    );
    assert_eq!(g.file_size(), std::fs::metadata(g.path()).unwrap().len());
}

#[test]
fn token_embedding() {
    let g = open();
    let t = g.tensor("token_embd.weight").expect("token_embd.weight");
    assert_eq!(t.dtype, DType::Q8_0);
    assert_eq!(t.shape, &[262144, 640]);
    assert_eq!(t.rows(), 262144);
    assert_eq!(t.cols(), 640);
    assert_eq!(t.data.len(), 262144 * 680);
    assert_eq!(t.row(1).len(), 680);
    let info = g
        .tensor_infos()
        .iter()
        .find(|i| i.name == "token_embd.weight")
        .unwrap();
    // Absolute offsets are aligned and past the header.
    assert_eq!(info.offset % 32, 0);
    assert!(info.offset >= g.data_offset());
    assert_eq!(info.n_bytes, t.data.len());
}

fn row_stats(dtype: DType, want: &str) {
    let g = open();
    let info = g
        .tensor_infos()
        .iter()
        .find(|i| i.dtype == dtype)
        .unwrap_or_else(|| panic!("{want}: the model has no {dtype:?} tensor"));
    let t = g.tensor(&info.name).unwrap();
    assert!(t.rows() > 1, "{}: {:?}", info.name, t.shape);
    for r in [0, t.rows() / 2, t.rows() - 1] {
        let mut out = vec![0.0f32; t.cols()];
        kestrel_formats::dequantize_row(dtype, t.row(r), &mut out).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "{} row {r}", info.name);
        let n = out.len() as f64;
        let mean = out.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = out.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt();
        assert!(
            (1e-4..10.0).contains(&std),
            "{} ({dtype:?}) row {r}: std {std}",
            info.name
        );
    }
}

#[test]
fn q4_k_rows() {
    row_stats(DType::Q4_K, "Q4_K");
}

#[test]
fn q6_k_rows() {
    row_stats(DType::Q6_K, "Q6_K");
}

#[test]
fn q5_0_rows() {
    row_stats(DType::Q5_0, "Q5_0");
}

#[test]
fn every_tensor_is_consistent() {
    let g = open();
    assert!(!g.tensor_infos().is_empty());
    for info in g.tensor_infos() {
        let t = g.tensor(&info.name).unwrap();
        assert_eq!(t.data.len(), info.dtype.row_bytes(t.cols()).unwrap() * t.rows());
        assert_eq!(info.offset % g.alignment(), 0, "{}", info.name);
    }
    let norm = g.tensor("output_norm.weight").expect("output_norm.weight");
    assert_eq!(norm.dtype, DType::F32);
    assert_eq!(norm.shape, &[640]);
    assert!(norm.to_f32().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn model_file_dispatch() {
    let m = ModelFile::open(common::model_path()).unwrap();
    assert!(matches!(m, ModelFile::Gguf(_)));
    assert_eq!(m.tensor("token_embd.weight").unwrap().dtype, DType::Q8_0);
}

/// Cutting the real file anywhere must give a clear error, never a panic.
#[test]
fn truncated_real_model() {
    let path = common::model_path();
    let bytes = std::fs::read(&path).unwrap();
    let g = open();
    let dir = common::temp_dir("trunc-real");
    let cut_path = dir.join("cut.gguf");
    let cuts = [
        0,
        3,
        7,
        23,
        1000,
        100_000,
        (g.data_offset() - 1) as usize,
        g.data_offset() as usize + 4096,
        bytes.len() - 1,
    ];
    for cut in cuts {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&cut_path).expect_err("truncated file must not open");
        let msg = err.to_string();
        assert!(
            msg.contains("cut.gguf") && msg.contains("truncated"),
            "cut at {cut}: {msg}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}
