//! Hugging Face model directories: `config.json` plus `model.safetensors`
//! or `model.safetensors.index.json` and its shards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Dtype as StDtype;
use safetensors::SafeTensors;

use crate::{DType, FormatError, TensorInfo, TensorView};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
}

struct Entry {
    /// `offset` is absolute within the shard file.
    info: TensorInfo,
    shard: usize,
}

/// An open Hugging Face model directory with every shard mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    config: serde_json::Value,
    shards: Vec<Shard>,
    /// Sorted by name.
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsDir")
            .field("dir", &self.dir)
            .field("shards", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FormatError + '_ {
    move |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, FormatError> {
    let text = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|source| FormatError::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl SafetensorsDir {
    /// Opens and validates a model directory. Only F32/F16/BF16 tensors are
    /// accepted; anything else is an error naming the tensor and its dtype.
    pub fn open(dir: impl AsRef<Path>) -> Result<SafetensorsDir, FormatError> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(FormatError::NotModelDir { dir });
        }
        let config = read_json(&config_path)?;

        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        // For sharded models, the index says which shard holds each tensor.
        let (shard_names, weight_map) = if index.is_file() {
            let (names, map) = read_index(&index)?;
            (names, Some((index.clone(), map)))
        } else if single.is_file() {
            (vec![SINGLE_FILE.to_owned()], None)
        } else {
            return Err(FormatError::Malformed {
                path: dir,
                message: format!("neither {SINGLE_FILE} nor {INDEX_FILE} exists"),
            });
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut entries = Vec::new();
        for (si, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(FormatError::MissingShard {
                    index: weight_map.as_ref().map_or(dir.clone(), |(p, _)| p.clone()),
                    shard: name.clone(),
                });
            }
            let (shard, infos) = open_shard(path)?;
            entries.extend(infos.into_iter().map(|info| Entry { info, shard: si }));
            shards.push(shard);
        }
        entries.sort_by(|a, b| a.info.name.cmp(&b.info.name));

        let mut by_name = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if by_name.insert(e.info.name.clone(), i).is_some() {
                return Err(FormatError::Malformed {
                    path: shards[e.shard].path.clone(),
                    message: format!("tensor '{}' appears in more than one shard", e.info.name),
                });
            }
        }
        if let Some((index, map)) = &weight_map {
            for (tensor, shard) in map {
                let found = by_name.get(tensor).map(|i| &shard_names[entries[*i].shard]);
                if found != Some(shard) {
                    return Err(FormatError::Malformed {
                        path: index.clone(),
                        message: format!("tensor '{tensor}' is not in shard '{shard}' as the index says"),
                    });
                }
            }
        }
        Ok(SafetensorsDir {
            dir,
            config,
            shards,
            entries,
            by_name,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed config.json.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Tensor infos sorted by name. `offset` is the absolute offset within
    /// the tensor's own shard file (see [`SafetensorsDir::shard_of`]).
    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.entries.iter().map(|e| e.info.clone()).collect()
    }

    /// Path of the shard file holding `name`.
    pub fn shard_of(&self, name: &str) -> Option<&Path> {
        let e = &self.entries[*self.by_name.get(name)?];
        Some(&self.shards[e.shard].path)
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let e = &self.entries[*self.by_name.get(name)?];
        let start = usize::try_from(e.info.offset).ok()?;
        let data = self.shards[e.shard]
            .map
            .get(start..start.checked_add(e.info.n_bytes)?)?;
        Some(TensorView {
            name: &e.info.name,
            dtype: e.info.dtype,
            shape: &e.info.shape,
            data,
        })
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.info.name.as_str()).collect()
    }

    /// Sum of all tensors' data sizes.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.info.n_bytes as u64).sum()
    }
}

/// Reads the index's weight_map; returns the distinct shard names (sorted)
/// and the tensor -> shard map.
fn read_index(index: &Path) -> Result<(Vec<String>, BTreeMap<String, String>), FormatError> {
    let json = read_json(index)?;
    let bad = |message: String| FormatError::Malformed {
        path: index.to_path_buf(),
        message,
    };
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".to_owned()))?;
    let mut weight_map = BTreeMap::new();
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry for '{tensor}' is not a string")))?;
        // Shards must be plain file names inside the model directory.
        if shard.contains('/') || shard.contains('\\') || shard == ".." || shard.is_empty() {
            return Err(bad(format!(
                "shard name '{shard}' for '{tensor}' is not a plain file name"
            )));
        }
        shards.insert(shard.to_owned());
        weight_map.insert(tensor.clone(), shard.to_owned());
    }
    Ok((shards.into_iter().collect(), weight_map))
}

fn open_shard(path: PathBuf) -> Result<(Shard, Vec<TensorInfo>), FormatError> {
    let file = File::open(&path).map_err(io_err(&path))?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    if len < 8 {
        return Err(FormatError::Truncated {
            path,
            what: "safetensors header length".to_owned(),
            start: 0,
            end: 8,
            len,
        });
    }
    // SAFETY: read-only map; concurrent truncation of model files by another
    // process is outside what any mmap-based loader can defend against.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
    let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| FormatError::Malformed {
        path: path.clone(),
        message: format!("invalid safetensors file: {e}"),
    })?;
    let data_start = 8 + header_len as u64;
    let mut infos = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            other => {
                return Err(FormatError::UnsupportedDtype {
                    path,
                    tensor: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (begin, end) = info.data_offsets;
        infos.push(TensorInfo {
            name,
            dtype,
            shape: info.shape.clone(),
            offset: data_start + begin as u64,
            // read_metadata validated that offsets are ordered and in bounds.
            n_bytes: end.saturating_sub(begin),
        });
    }
    Ok((Shard { path, map }, infos))
}
