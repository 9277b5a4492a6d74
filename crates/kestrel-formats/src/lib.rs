//! Model file formats for kestrel: memory-mapped GGUF and safetensors
//! readers, GGML quantized block layouts with reference (de)quantization, and
//! a small GGUF writer for building synthetic models.
//!
//! Shapes everywhere are row-major, outermost first (PyTorch order): a GGUF
//! tensor with ggml `ne = [in, out]` has `shape = [out, in]`.

mod default_model;
mod dtype;
mod error;
mod gguf_file;
mod gguf_header;
mod gguf_writer;
mod meta;
mod model_file;
mod quant;
mod safetensors_dir;
mod tensor;

pub use default_model::{default_model_path, DEFAULT_MODEL_FILE};
pub use dtype::{DType, QK, QK_K};
pub use error::FormatError;
pub use gguf_file::GgufFile;
pub use gguf_header::{parse_gguf_header, parse_gguf_header_from, GgufHeader, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use gguf_writer::GgufWriter;
pub use meta::MetaValue;
pub use model_file::ModelFile;
pub use quant::{dequantize_row, quantize_row};
pub use safetensors_dir::SafetensorsDir;
pub use tensor::{TensorInfo, TensorView};
