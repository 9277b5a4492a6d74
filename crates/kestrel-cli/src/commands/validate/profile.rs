//! Engine profiles: the set of engine options one side of a validation runs
//! with, written as a preset name and/or comma-separated `key=value` pairs
//! (`cuda-reference`, `device=cuda,kernels=reference,graphs=off`,
//! `cuda,kv=f16`).

use std::fmt;
use std::path::PathBuf;

use kestrel_backend::KvDType;
use serde_json::{json, Value};

use crate::device::{Device, Kernels};

/// Named profiles: (name, expansion, what it is for). The expansion is
/// parsed like any user profile, so presets cannot drift from the syntax.
pub const PRESETS: &[(&str, &str, &str)] = &[
    ("cpu", "device=cpu", "the CPU backend (the usual reference)"),
    ("auto", "device=auto", "the GPU when one is usable, else the CPU"),
    ("cuda", "device=cuda", "GPU 0, fused kernels, decode graphs on"),
    (
        "cuda-reference",
        "device=cuda,kernels=reference",
        "GPU 0 with the plain reference kernels",
    ),
    (
        "cuda-nograph",
        "device=cuda,graphs=off",
        "GPU 0 without decode graphs",
    ),
    ("cuda-f16kv", "device=cuda,kv=f16", "GPU 0 with an f16 KV cache"),
    ("cpu-f16kv", "device=cpu,kv=f16", "the CPU with an f16 KV cache"),
];

/// The keys a profile may set, in the order they are documented.
pub const KEYS: &[&str] = &["device", "kernels", "graphs", "kv", "prefix_cache", "model"];

/// One side of a validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// The profile as the user wrote it (names the side in reports).
    pub spec: String,
    pub device: Device,
    pub kernels: Kernels,
    /// Whether CUDA decode steps may be captured and replayed as graphs.
    pub graphs: bool,
    pub kv: KvDType,
    /// Whether the engine keeps prompt blocks for reuse by later requests.
    pub prefix_cache: bool,
    /// A model file other than the command's MODEL (e.g. a requantized copy).
    pub model: Option<PathBuf>,
}

/// Why a profile string was rejected; each names the offending key or item.
#[derive(Clone, Debug, PartialEq)]
pub enum ProfileError {
    Empty,
    UnknownPreset(String),
    UnknownKey(String),
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    RepeatedKey(&'static str),
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProfileError::Empty => write!(
                f,
                "empty profile: give a preset ({}) or key=value pairs",
                preset_names()
            ),
            ProfileError::UnknownPreset(name) => write!(
                f,
                "`{name}` is not a preset ({}) nor a key=value pair",
                preset_names()
            ),
            ProfileError::UnknownKey(key) => write!(
                f,
                "unknown profile key `{key}`: expected one of {}",
                KEYS.join(", ")
            ),
            ProfileError::BadValue { key, value, expected } => {
                write!(f, "profile key `{key}` has value `{value}`, expected {expected}")
            }
            ProfileError::RepeatedKey(key) => write!(f, "profile key `{key}` is given twice"),
        }
    }
}

impl std::error::Error for ProfileError {}

fn preset_names() -> String {
    PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

fn on_off(key: &'static str, value: &str) -> Result<bool, ProfileError> {
    match value {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(ProfileError::BadValue {
            key,
            value: value.to_string(),
            expected: "on or off",
        }),
    }
}

impl Default for Profile {
    /// What an unset key means: the same defaults as `kestrel run` (auto
    /// device, fused kernels, graphs on, f32 KV), and no prefix cache so
    /// that every run computes its whole prompt.
    fn default() -> Profile {
        Profile {
            spec: String::new(),
            device: Device::Auto,
            kernels: Kernels::Fused,
            graphs: true,
            kv: KvDType::F32,
            prefix_cache: false,
            model: None,
        }
    }
}

impl Profile {
    /// Parses `spec`. Presets (items without `=`) apply in order, and
    /// key=value pairs override them; a key may be set only once by pairs.
    pub fn parse(spec: &str) -> Result<Profile, ProfileError> {
        let mut p = Profile {
            spec: spec.trim().to_string(),
            ..Profile::default()
        };
        let mut set: Vec<&'static str> = Vec::new();
        let items: Vec<&str> = spec.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        if items.is_empty() {
            return Err(ProfileError::Empty);
        }
        for item in items {
            match item.split_once('=') {
                None => {
                    let Some((_, expansion, _)) = PRESETS.iter().find(|pr| pr.0 == item) else {
                        return Err(ProfileError::UnknownPreset(item.to_string()));
                    };
                    for pair in expansion.split(',') {
                        if let Some((k, v)) = pair.split_once('=') {
                            p.set(k, v)?;
                        }
                    }
                }
                Some((k, v)) => {
                    let key = p.set(k.trim(), v.trim())?;
                    if set.contains(&key) {
                        return Err(ProfileError::RepeatedKey(key));
                    }
                    set.push(key);
                }
            }
        }
        Ok(p)
    }

    /// Applies one pair; returns the key's canonical name.
    fn set(&mut self, key: &str, value: &str) -> Result<&'static str, ProfileError> {
        let bad = |key: &'static str, expected: &'static str| ProfileError::BadValue {
            key,
            value: value.to_string(),
            expected,
        };
        Ok(match key {
            "device" => {
                self.device = value
                    .parse()
                    .map_err(|_| bad("device", "auto, cpu, cuda or cuda:N"))?;
                "device"
            }
            "kernels" => {
                self.kernels = match value {
                    "fused" => Kernels::Fused,
                    "reference" => Kernels::Reference,
                    _ => return Err(bad("kernels", "fused or reference")),
                };
                "kernels"
            }
            "graphs" => {
                self.graphs = on_off("graphs", value)?;
                "graphs"
            }
            "kv" => {
                self.kv = match value {
                    "f32" => KvDType::F32,
                    "f16" => KvDType::F16,
                    "bf16" => KvDType::Bf16,
                    _ => return Err(bad("kv", "f32, f16 or bf16")),
                };
                "kv"
            }
            // Accept the dashed spelling too: it is how the flag would read.
            "prefix_cache" | "prefix-cache" => {
                self.prefix_cache = on_off("prefix_cache", value)?;
                "prefix_cache"
            }
            "model" => {
                if value.is_empty() {
                    return Err(bad("model", "a .gguf file or a Hugging Face model directory"));
                }
                self.model = Some(PathBuf::from(value));
                "model"
            }
            other => return Err(ProfileError::UnknownKey(other.to_string())),
        })
    }

    /// Every option spelled out, for reports.
    pub fn canonical(&self) -> String {
        let mut s = format!(
            "device={},kernels={},graphs={},kv={},prefix_cache={}",
            device_name(self.device),
            kernels_name(self.kernels),
            if self.graphs { "on" } else { "off" },
            kv_name(self.kv),
            if self.prefix_cache { "on" } else { "off" },
        );
        if let Some(m) = &self.model {
            s.push_str(&format!(",model={}", m.display()));
        }
        s
    }

    pub fn to_json(&self) -> Value {
        json!({
            "spec": self.spec,
            "canonical": self.canonical(),
            "device": device_name(self.device),
            "kernels": kernels_name(self.kernels),
            "graphs": self.graphs,
            "kv": kv_name(self.kv),
            "prefix_cache": self.prefix_cache,
            "model": self.model.as_ref().map(|m| m.display().to_string()),
        })
    }
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Auto => "auto".into(),
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
    }
}

fn kernels_name(k: Kernels) -> &'static str {
    match k {
        Kernels::Fused => "fused",
        Kernels::Reference => "reference",
    }
}

pub fn kv_name(k: KvDType) -> &'static str {
    match k {
        KvDType::F32 => "f32",
        KvDType::F16 => "f16",
        KvDType::Bf16 => "bf16",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_pairs_combine() {
        let p = Profile::parse("cuda-reference").unwrap();
        assert_eq!(
            (p.device, p.kernels, p.graphs),
            (Device::Cuda(0), Kernels::Reference, true)
        );
        let p = Profile::parse("cuda, kv=f16 ,graphs=off,prefix_cache=on").unwrap();
        assert_eq!(p.device, Device::Cuda(0));
        assert_eq!((p.kv, p.graphs, p.prefix_cache), (KvDType::F16, false, true));
        let p = Profile::parse("device=cuda:1,model=/tmp/x.gguf").unwrap();
        assert_eq!(p.device, Device::Cuda(1));
        assert_eq!(p.model, Some(PathBuf::from("/tmp/x.gguf")));
        assert_eq!(
            p.canonical(),
            "device=cuda:1,kernels=fused,graphs=on,kv=f32,prefix_cache=off,model=/tmp/x.gguf"
        );
        // A pair overrides what the preset set.
        assert_eq!(Profile::parse("cuda,device=cpu").unwrap().device, Device::Cpu);
    }

    #[test]
    fn every_preset_parses() {
        for (name, _, _) in PRESETS {
            assert!(Profile::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn bad_profiles_name_the_key() {
        let msg = |s: &str| Profile::parse(s).unwrap_err().to_string();
        assert!(msg("device=tpu").contains("`device`"), "{}", msg("device=tpu"));
        assert!(msg("kernels=fast").contains("`kernels`"));
        assert!(msg("kv=q8").contains("`kv`"));
        assert!(msg("graphs=maybe").contains("`graphs`"));
        assert!(msg("prefix_cache=2").contains("`prefix_cache`"));
        assert!(msg("colour=red").contains("`colour`"));
        assert!(msg("gpu-fast").contains("`gpu-fast`"));
        assert!(msg("kv=f16,kv=f32").contains("twice"));
        assert_eq!(Profile::parse(" , ").unwrap_err(), ProfileError::Empty);
    }
}
