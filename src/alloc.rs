//! The process's global allocator: mimalloc, called so that small blocks land in the size
//! class their size asks for.
//!
//! This module owns how memory is allocated (the binary installs [`Allocator`]). The
//! `mimalloc` crate's own `GlobalAlloc` passes every request to `mi_malloc_aligned`, even
//! for the 8-byte alignment of nearly everything here. That call has a fast path only when
//! the next free block happens to be aligned already; otherwise it over-allocates by the
//! alignment, which pushes the block into the next size class. Measured here (1 M boxed
//! slices each, resident memory per allocation): 80 → 96 bytes, 96 → 113, 160 → 192,
//! 224 → 257, against the exact class with `mi_malloc` (BENCHMARKS.md, sixth run). mimalloc
//! blocks are always aligned to the machine word, so a request that needs no more than that
//! goes to `mi_malloc`; larger alignments still go to the aligned calls.
//!
//! The C code linked in (librdkafka, zlib) allocates from mimalloc too: libmimalloc-sys's
//! `override` feature exports `malloc`, `free` and the rest from the binary. librdkafka
//! allocates per message (it copies every produced payload, and its fetch buffers), and with
//! glibc's malloc, freeing on another thread than the one that allocated, that cost the
//! pipeline measurably: end to end +5–7 %, the plain consumer +15 % (BENCHMARKS.md, seventh
//! session).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment every mimalloc block has (block sizes are multiples of the word size).
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator, with plain calls for word-aligned requests.
pub struct Allocator;

// SAFETY: every method forwards to mimalloc, which returns blocks of at least the requested
// size aligned to at least `WORD` bytes (`mi_malloc`, `mi_zalloc`, `mi_realloc`), or to the
// requested alignment (the `_aligned` calls), or null on failure; `dealloc` frees a block
// that one of them returned, whatever its alignment.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

extern "C" {
    // Part of mimalloc's API, compiled into libmimalloc-sys; the crate declares them only
    // under its `extended` feature.
    fn mi_good_size(size: usize) -> usize;
    fn mi_collect(force: bool);
}

/// Asks mimalloc to return the memory it holds free to the operating system now, rather than
/// keep it for reuse. The benchmark calls it before measuring resident memory growth, so
/// that a measurement does not reuse pages an earlier one freed.
pub fn release_free_memory() {
    // SAFETY: takes no pointers; mimalloc frees only blocks the program freed already.
    unsafe { mi_collect(true) }
}

/// The bytes mimalloc really hands out for a request of `size` bytes: its size class. A
/// buffer that grows one entry at a time can reserve up to that for free, instead of calling
/// the allocator at every growth. (Whichever allocator is installed, the answer is at least
/// `size`, so reserving it is always correct.)
pub fn good_size(size: usize) -> usize {
    // SAFETY: a pure function of its argument; it touches no memory.
    unsafe { mi_good_size(size) }.max(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size classes are at least the request, and reach the next one only past it.
    #[test]
    fn good_size_is_the_class() {
        for size in [1, 8, 100, 161, 192, 1000] {
            assert!(good_size(size) >= size);
        }
        assert_eq!(good_size(161), good_size(192));
        assert!(good_size(193) > good_size(192));
    }

    extern "C" {
        fn mi_is_in_heap_region(p: *const c_void) -> bool;
    }

    /// C code's `malloc` (librdkafka's) is mimalloc's, not glibc's.
    #[test]
    fn c_malloc_is_mimalloc() {
        unsafe {
            let p = libc::malloc(100);
            assert!(!p.is_null());
            assert!(mi_is_in_heap_region(p), "malloc is not mimalloc's");
            libc::free(p);
        }
    }

    /// Blocks are aligned as asked, hold their bytes through growth and shrinking, and
    /// zeroed blocks are zero, for word-aligned and over-aligned layouts alike.
    #[test]
    fn blocks_are_aligned_sized_and_keep_their_bytes() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 7, 8, 24, 80, 224, 1000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc size {size} align {align}");
                    for i in 0..size {
                        *p.add(i) = (i % 251) as u8;
                    }
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(
                        grown as usize % align,
                        0,
                        "realloc size {size} align {align}"
                    );
                    for i in 0..size {
                        assert_eq!(*grown.add(i), (i % 251) as u8);
                    }
                    let shrunk = a.realloc(
                        grown,
                        Layout::from_size_align(size * 3, align).unwrap(),
                        size,
                    );
                    assert_eq!(shrunk as usize % align, 0);
                    assert_eq!(*shrunk.add(size - 1), ((size - 1) % 251) as u8);
                    a.dealloc(shrunk, layout);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(
                        z as usize % align,
                        0,
                        "alloc_zeroed size {size} align {align}"
                    );
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
