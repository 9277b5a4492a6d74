//! Owned, aligned byte storage for weights.
//!
//! Why a copy rather than a pointer into the caller's memory map: the
//! `Backend` trait hands us a `TensorView<'_>` whose lifetime ends with the
//! call, and `Weight` must be `'static`. Keeping a raw pointer would make the
//! safe `upload_matrix` rely on an unchecked promise of the caller (keep the
//! map alive) — unsound. Copying costs one memcpy at load and the weights'
//! size in anonymous memory (253 MB for the default model), and buys:
//! 64-byte alignment, and on Linux transparent huge pages for large tensors
//! (fewer TLB misses while streaming the 178 MB LM head every token).
//! Quantized blocks are copied as they are: no dequantization at load.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::error::BackendError;

/// Tensors at least this large are aligned to 2 MiB and advised to use huge pages.
const HUGE_THRESHOLD: usize = 4 << 20;
const HUGE_ALIGN: usize = 2 << 20;
const CACHE_ALIGN: usize = 64;

/// Immutable bytes on a 64-byte (or 2 MiB) boundary.
pub struct AlignedBytes {
    ptr: NonNull<u8>,
    len: usize,
    layout: Option<Layout>,
}

// SAFETY: the buffer is exclusively owned and never mutated after
// construction, so sharing `&[u8]` views across threads is sound.
unsafe impl Send for AlignedBytes {}
unsafe impl Sync for AlignedBytes {}

impl AlignedBytes {
    /// Copies `src` into a fresh aligned allocation.
    pub fn copy_from(src: &[u8], what: &str) -> Result<AlignedBytes, BackendError> {
        if src.is_empty() {
            return Ok(AlignedBytes {
                ptr: NonNull::dangling(),
                len: 0,
                layout: None,
            });
        }
        let align = if src.len() >= HUGE_THRESHOLD {
            HUGE_ALIGN
        } else {
            CACHE_ALIGN
        };
        let layout = Layout::from_size_align(src.len(), align)
            .map_err(|e| BackendError::OutOfMemory(format!("{what}: {} bytes: {e}", src.len())))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            BackendError::OutOfMemory(format!("{what}: cannot allocate {} bytes", src.len()))
        })?;
        if align == HUGE_ALIGN {
            advise_huge_pages(ptr, src.len());
        }
        // SAFETY: `ptr` is a fresh allocation of `src.len()` bytes that
        // cannot overlap `src`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.as_ptr(), src.len()) };
        Ok(AlignedBytes {
            ptr,
            len: src.len(),
            layout: Some(layout),
        })
    }

    /// Allocates `len` bytes and lets `fill` write them (zeroed before).
    pub fn build(len: usize, what: &str, fill: impl FnOnce(&mut [u8])) -> Result<AlignedBytes, BackendError> {
        let zeros = AlignedBytes::zeroed(len, what)?;
        let mut b = zeros;
        if let Some(layout) = b.layout {
            // SAFETY: `ptr` is our own allocation of `layout.size()` zeroed
            // bytes, not shared yet.
            let s = unsafe { std::slice::from_raw_parts_mut(b.ptr.as_ptr(), layout.size()) };
            fill(s);
        }
        b.len = len;
        Ok(b)
    }

    fn zeroed(len: usize, what: &str) -> Result<AlignedBytes, BackendError> {
        if len == 0 {
            return Ok(AlignedBytes {
                ptr: NonNull::dangling(),
                len: 0,
                layout: None,
            });
        }
        let align = if len >= HUGE_THRESHOLD {
            HUGE_ALIGN
        } else {
            CACHE_ALIGN
        };
        let layout = Layout::from_size_align(len, align)
            .map_err(|e| BackendError::OutOfMemory(format!("{what}: {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| BackendError::OutOfMemory(format!("{what}: cannot allocate {len} bytes")))?;
        if align == HUGE_ALIGN {
            advise_huge_pages(ptr, len);
        }
        Ok(AlignedBytes {
            ptr,
            len,
            layout: Some(layout),
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes owned by `self`
        // (or is dangling with len 0, which is valid for an empty slice).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `copy_from` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

/// Asks the kernel to back the range with transparent huge pages (a hint:
/// failure only costs TLB misses, so the result is ignored).
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the range is one live allocation we own; MADV_HUGEPAGE does not
    // change its contents or validity.
    unsafe {
        libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: NonNull<u8>, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_aligns() {
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let b = AlignedBytes::copy_from(&src, "t").unwrap();
        assert_eq!(b.as_slice(), &src[..]);
        assert_eq!(b.as_slice().as_ptr() as usize % CACHE_ALIGN, 0);
        let big = vec![3u8; HUGE_THRESHOLD + 5];
        let b = AlignedBytes::copy_from(&big, "big").unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % HUGE_ALIGN, 0);
        assert_eq!(b.len(), big.len());
        assert!(b.as_slice().iter().all(|&x| x == 3));
        let e = AlignedBytes::copy_from(&[], "empty").unwrap();
        assert!(e.is_empty());
    }
}
