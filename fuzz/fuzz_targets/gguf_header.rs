//! Feeds arbitrary bytes to the GGUF header parser: it must return Ok or Err,
//! never panic, and never allocate far beyond the input size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = kestrel_formats::parse_gguf_header(data) {
        // Whatever parses must be internally consistent.
        assert!(h.alignment.is_power_of_two());
        assert_eq!(h.data_offset % h.alignment, 0);
        for t in &h.tensors {
            assert_eq!(t.offset % h.alignment, 0);
            assert_eq!(t.dtype.row_bytes(*t.shape.last().unwrap_or(&1)).is_some(), true);
        }
    }
});
