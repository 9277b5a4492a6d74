//! Opening either kind of model: a GGUF file or a Hugging Face directory.

use std::io::Read;
use std::path::Path;

use crate::gguf_header::GGUF_MAGIC;
use crate::{FormatError, GgufFile, SafetensorsDir, TensorView};

/// A model in either supported format.
#[derive(Debug)]
pub enum ModelFile {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
}

impl ModelFile {
    /// Opens `path`: a directory is a Hugging Face model directory; a file
    /// named `*.gguf` or starting with the GGUF magic is GGUF; a
    /// `*.safetensors` file or `config.json` opens its parent directory.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile, FormatError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            return SafetensorsDir::open(path).map(ModelFile::Safetensors);
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext.eq_ignore_ascii_case("gguf") || starts_with_gguf_magic(path) {
            return GgufFile::open(path).map(ModelFile::Gguf);
        }
        let is_hf_file =
            ext.eq_ignore_ascii_case("safetensors") || path.file_name().is_some_and(|n| n == "config.json");
        if is_hf_file {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            return SafetensorsDir::open(parent).map(ModelFile::Safetensors);
        }
        Err(FormatError::UnknownModelFormat {
            path: path.to_path_buf(),
            message:
                "not a GGUF file (no .gguf extension or GGUF magic) and not a Hugging Face model directory"
                    .to_owned(),
        })
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        match self {
            ModelFile::Gguf(g) => g.tensor(name),
            ModelFile::Safetensors(s) => s.tensor(name),
        }
    }

    /// The GGUF file path or the model directory.
    pub fn path(&self) -> &Path {
        match self {
            ModelFile::Gguf(g) => g.path(),
            ModelFile::Safetensors(s) => s.dir(),
        }
    }
}

fn starts_with_gguf_magic(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && u32::from_le_bytes(magic) == GGUF_MAGIC
}
