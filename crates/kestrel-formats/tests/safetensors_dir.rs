//! Hugging Face model directories written with the safetensors crate.

mod common;

use std::path::Path;

use kestrel_formats::{DType, FormatError, ModelFile, SafetensorsDir};
use safetensors::tensor::{Dtype, TensorView};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

fn write_config(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "gemma3_text", "hidden_size": 4, "num_hidden_layers": 2}"#,
    )
    .unwrap();
}

fn write_shard(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn single_file_dir() {
    let dir = common::temp_dir("st-single");
    write_config(&dir);
    let emb: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    write_shard(
        &dir.join("model.safetensors"),
        vec![
            ("embed.weight", Dtype::F32, vec![3, 4], f32_bytes(&emb)),
            (
                "norm.weight",
                Dtype::BF16,
                vec![4],
                bf16_bytes(&[1.0, 2.0, -3.0, 0.5]),
            ),
            (
                "lm.weight",
                Dtype::F16,
                vec![2, 2],
                f16_bytes(&[0.25, -0.5, 8.0, 1.0]),
            ),
        ],
    );
    let st = SafetensorsDir::open(&dir).unwrap();
    assert_eq!(st.dir(), dir.as_path());
    assert_eq!(st.config()["hidden_size"], 4);
    assert_eq!(
        st.tensor_names(),
        vec!["embed.weight", "lm.weight", "norm.weight"]
    );
    assert_eq!(st.total_bytes(), 48 + 8 + 8);

    let e = st.tensor("embed.weight").unwrap();
    assert_eq!((e.dtype, e.shape), (DType::F32, &[3usize, 4][..]));
    assert_eq!(e.to_f32().unwrap(), emb);
    assert_eq!(e.row(1), &f32_bytes(&emb[4..8])[..]);
    let n = st.tensor("norm.weight").unwrap();
    assert_eq!(n.dtype, DType::BF16);
    assert_eq!(n.to_f32().unwrap(), vec![1.0, 2.0, -3.0, 0.5]);
    let l = st.tensor("lm.weight").unwrap();
    assert_eq!(l.dtype, DType::F16);
    assert_eq!(l.to_f32().unwrap(), vec![0.25, -0.5, 8.0, 1.0]);
    assert!(st.tensor("nope").is_none());

    // Offsets in tensor_infos are absolute within the shard file.
    let file = std::fs::read(dir.join("model.safetensors")).unwrap();
    for info in st.tensor_infos() {
        let t = st.tensor(&info.name).unwrap();
        let start = info.offset as usize;
        assert_eq!(&file[start..start + info.n_bytes], t.data, "{}", info.name);
    }

    let m = ModelFile::open(&dir).unwrap();
    assert!(matches!(m, ModelFile::Safetensors(_)));
    assert_eq!(m.path(), dir.as_path());
    assert_eq!(m.tensor("lm.weight").unwrap().shape, &[2, 2]);
    // Pointing at config.json opens the directory too.
    assert!(matches!(
        ModelFile::open(dir.join("config.json")).unwrap(),
        ModelFile::Safetensors(_)
    ));
    std::fs::remove_dir_all(dir).ok();
}

fn write_sharded(dir: &Path) {
    write_config(dir);
    write_shard(
        &dir.join("model-00001-of-00002.safetensors"),
        vec![("a", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))],
    );
    write_shard(
        &dir.join("model-00002-of-00002.safetensors"),
        vec![
            ("b", Dtype::F32, vec![1, 3], f32_bytes(&[3.0, 4.0, 5.0])),
            ("c", Dtype::BF16, vec![2], bf16_bytes(&[6.0, 7.0])),
        ],
    );
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 24},
            "weight_map": {"a": "model-00001-of-00002.safetensors",
                           "b": "model-00002-of-00002.safetensors",
                           "c": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
}

#[test]
fn sharded_dir() {
    let dir = common::temp_dir("st-sharded");
    write_sharded(&dir);
    let st = SafetensorsDir::open(&dir).unwrap();
    assert_eq!(st.tensor_names(), vec!["a", "b", "c"]);
    assert_eq!(st.tensor("a").unwrap().to_f32().unwrap(), vec![1.0, 2.0]);
    assert_eq!(st.tensor("b").unwrap().to_f32().unwrap(), vec![3.0, 4.0, 5.0]);
    assert_eq!(st.tensor("c").unwrap().to_f32().unwrap(), vec![6.0, 7.0]);
    assert!(st
        .shard_of("c")
        .unwrap()
        .ends_with("model-00002-of-00002.safetensors"));
    assert_eq!(st.total_bytes(), 8 + 12 + 4);

    // A shard the index names but that is gone.
    std::fs::remove_file(dir.join("model-00001-of-00002.safetensors")).unwrap();
    let e = SafetensorsDir::open(&dir).unwrap_err();
    assert!(matches!(e, FormatError::MissingShard { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("model.safetensors.index.json") && msg.contains("model-00001-of-00002"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn index_disagreeing_with_shards() {
    let dir = common::temp_dir("st-index");
    write_sharded(&dir);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00002-of-00002.safetensors",
                           "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let msg = SafetensorsDir::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("'a'"), "{msg}");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "../x"}}"#,
    )
    .unwrap();
    let msg = SafetensorsDir::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("not a plain file name"), "{msg}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn no_config_json() {
    let dir = common::temp_dir("st-noconfig");
    let e = SafetensorsDir::open(&dir).unwrap_err();
    let msg = e.to_string();
    assert_eq!(
        msg,
        format!(
            "{}: no config.json: not a Hugging Face model directory",
            dir.display()
        )
    );
    assert!(ModelFile::open(&dir).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_json_and_missing_weights() {
    let dir = common::temp_dir("st-badjson");
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    let msg = SafetensorsDir::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("config.json: invalid JSON"), "{msg}");
    write_config(&dir);
    let msg = SafetensorsDir::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("neither model.safetensors"), "{msg}");
    std::fs::write(dir.join("model.safetensors"), b"\x10\x00\x00").unwrap();
    let msg = SafetensorsDir::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("model.safetensors: truncated"), "{msg}");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    let msg = SafetensorsDir::open(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("model.safetensors: invalid safetensors file"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn unsupported_dtype() {
    let dir = common::temp_dir("st-dtype");
    write_config(&dir);
    write_shard(
        &dir.join("model.safetensors"),
        vec![
            ("ok", Dtype::F32, vec![1], f32_bytes(&[1.0])),
            ("ids", Dtype::I64, vec![2], vec![0u8; 16]),
        ],
    );
    let e = SafetensorsDir::open(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("model.safetensors: tensor 'ids' has unsupported dtype I64"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).ok();
}
