//! A growable buffer of `u32` words that keeps no capacity: [`Words`], a pointer and a
//! 32-bit length where a vector takes 24 bytes, plus 32 bits its owner may use (padding
//! otherwise): 16 bytes, as a boxed slice. Pure: no I/O.
//!
//! This module owns the one piece of `unsafe` memory management in a customer's state: the
//! activity buffer ([`crate::activity`]) lives here. Its capacity is a function of its
//! length, [`capacity`], which rounds up to the allocator's size classes (mimalloc's: 8
//! bytes, the multiples of 16 up to 64, then four classes per doubling). So the buffer grows one
//! entry at a time without calling the allocator while the block's class has room, as a
//! vector would, without storing a capacity; and a boxed slice, which stores no more either,
//! had to call the allocator at every insertion (`realloc`, about 160 instructions with
//! mimalloc even in place: +13 % instructions per event, BENCHMARKS.md, nineteenth session).
//!
//! The invariant every `unsafe` block below relies on: with `len > 0`, `ptr` points to a
//! block allocated by the global allocator with the layout of `capacity(len)` words, whose
//! first `len` words are initialised; with `len == 0`, nothing is allocated and `ptr` is
//! dangling. Every change of `len` reallocates when `capacity` of the new length differs.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut, Range};
use std::ptr::{self, NonNull};

/// Words allocated for a buffer of `len` words: the size class of `len` words, as mimalloc
/// rounds (exact for the classes tested in `rounds_like_the_allocator`; any other answer
/// at least `len` would only waste room or calls, never memory safety).
pub fn capacity(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let bytes = len * 4;
    let rounded = if bytes <= 8 {
        8
    } else if bytes <= 64 {
        bytes.next_multiple_of(16)
    } else {
        // A quarter of the highest power of two in `bytes`.
        let step = 1usize << (usize::BITS - 1 - bytes.leading_zeros() - 2);
        bytes.next_multiple_of(step)
    };
    rounded / 4
}

fn layout(len: usize) -> Layout {
    Layout::array::<u32>(capacity(len)).unwrap_or_else(|_| panic!("{len} words"))
}

/// A buffer of `u32` words whose capacity is [`capacity`] of its length.
pub struct Words {
    ptr: NonNull<u32>,
    len: u32,
    /// The owner's ([`Words::aux`]): not a word of the buffer.
    aux: u32,
}

// SAFETY: `Words` owns its block like a `Box<[u32]>` does, and shares it only through `&self`.
unsafe impl Send for Words {}
unsafe impl Sync for Words {}

impl Default for Words {
    fn default() -> Self {
        Words {
            ptr: NonNull::dangling(),
            len: 0,
            aux: 0,
        }
    }
}

impl Words {
    /// The words of `v`, taking over its block when its capacity is the one [`capacity`]
    /// gives for its length (as after `Vec::with_capacity(capacity(n))` and `n` pushes),
    /// copying them otherwise.
    pub fn from_vec(v: Vec<u32>) -> Self {
        if v.is_empty() || v.capacity() != capacity(v.len()) || v.len() > u32::MAX as usize {
            return Self::from(&v[..]);
        }
        let mut v = std::mem::ManuallyDrop::new(v);
        Words {
            // A vector's buffer pointer is never null.
            ptr: NonNull::new(v.as_mut_ptr()).unwrap_or(NonNull::dangling()),
            len: v.len() as u32,
            aux: 0,
        }
    }

    /// 32 bits the owner keeps beside the buffer, in what would be padding (0 at first;
    /// copied by `clone`).
    pub fn aux(&self) -> u32 {
        self.aux
    }
    pub fn set_aux(&mut self, v: u32) {
        self.aux = v;
    }

    /// Changes the length to `new` words, reallocating if its capacity differs; the words
    /// past the old length (if it grows) are uninitialised until the caller writes them.
    ///
    /// SAFETY (for the caller): when growing, the words from the old length to `new` must be
    /// written before they are read.
    unsafe fn set_len(&mut self, new: usize) {
        let old = self.len as usize;
        assert!(new <= u32::MAX as usize, "{new} words");
        if capacity(new) != capacity(old) {
            self.ptr = if old == 0 {
                let p = alloc::alloc(layout(new));
                NonNull::new(p.cast()).unwrap_or_else(|| alloc::handle_alloc_error(layout(new)))
            } else if new == 0 {
                alloc::dealloc(self.ptr.as_ptr().cast(), layout(old));
                NonNull::dangling()
            } else {
                let p = alloc::realloc(self.ptr.as_ptr().cast(), layout(old), layout(new).size());
                NonNull::new(p.cast()).unwrap_or_else(|| alloc::handle_alloc_error(layout(new)))
            };
        }
        self.len = new as u32;
    }

    /// Inserts `words` at `at` (at most the length).
    pub fn insert(&mut self, at: usize, words: &[u32]) {
        let (old, n) = (self.len(), words.len());
        assert!(at <= old, "insert at {at} of {old}");
        // SAFETY: the block holds `old + n` words after `set_len`; the first `old` are the
        // old ones (realloc keeps them), moved up by `n` from `at`, and `words` fills the gap,
        // so all `old + n` are initialised.
        unsafe {
            self.set_len(old + n);
            let p = self.ptr.as_ptr();
            ptr::copy(p.add(at), p.add(at + n), old - at);
            ptr::copy_nonoverlapping(words.as_ptr(), p.add(at), n);
        }
    }

    /// Removes the words `r`.
    pub fn remove(&mut self, r: Range<usize>) {
        let old = self.len();
        assert!(r.start <= r.end && r.end <= old, "remove {r:?} of {old}");
        // SAFETY: the words after `r` move down over it before the length shrinks (and the
        // block with it), so the first `old - r.len()` words stay initialised.
        unsafe {
            let p = self.ptr.as_ptr();
            ptr::copy(p.add(r.end), p.add(r.start), old - r.end);
            self.set_len(old - r.len());
        }
    }

    /// Replaces the words `r` with `words`.
    pub fn replace(&mut self, r: Range<usize>, words: &[u32]) {
        if r.len() == words.len() {
            self[r].copy_from_slice(words);
        } else if r.len() > words.len() {
            self[r.start..r.start + words.len()].copy_from_slice(words);
            self.remove(r.start + words.len()..r.end);
        } else {
            let k = r.len();
            self[r.clone()].copy_from_slice(&words[..k]);
            self.insert(r.end, &words[k..]);
        }
    }
}

impl From<&[u32]> for Words {
    fn from(s: &[u32]) -> Self {
        let mut w = Words::default();
        w.insert(0, s);
        w
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the invariant: a block of this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), layout(self.len as usize)) }
        }
    }
}

impl Clone for Words {
    fn clone(&self) -> Self {
        let mut w = Words::from(&self[..]);
        w.aux = self.aux;
        w
    }
}

impl Deref for Words {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: the invariant: `len` initialised words (or none, at a dangling pointer).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl DerefMut for Words {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `deref`, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The classes are the allocator's: the buffer asks for exactly what it is given.
    #[test]
    fn rounds_like_the_allocator() {
        for len in 1..20_000 {
            assert_eq!(
                capacity(len) * 4,
                crate::alloc::good_size(len * 4),
                "{len} words"
            );
        }
        assert_eq!(capacity(0), 0);
        assert_eq!(
            (capacity(1), capacity(3), capacity(16), capacity(17)),
            (2, 4, 16, 20)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(usize, Vec<u32>),
        Remove(usize, usize),
        Replace(usize, usize, Vec<u32>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let words = || proptest::collection::vec(any::<u32>(), 0..40);
        prop_oneof![
            (any::<usize>(), words()).prop_map(|(a, w)| Op::Insert(a, w)),
            (any::<usize>(), 0usize..40).prop_map(|(a, n)| Op::Remove(a, n)),
            (any::<usize>(), 0usize..40, words()).prop_map(|(a, n, w)| Op::Replace(a, n, w)),
        ]
    }

    proptest! {
        /// Behaves like a `Vec<u32>` through growth, shrinking to nothing and back.
        #[test]
        fn like_a_vector(ops in proptest::collection::vec(op(), 0..60)) {
            let mut w = Words::default();
            let mut v: Vec<u32> = Vec::new();
            for o in ops {
                match o {
                    Op::Insert(a, x) => {
                        let a = a % (v.len() + 1);
                        w.insert(a, &x);
                        v.splice(a..a, x);
                    }
                    Op::Remove(a, n) => {
                        let a = a % (v.len() + 1);
                        let r = a..(a + n).min(v.len());
                        w.remove(r.clone());
                        v.drain(r);
                    }
                    Op::Replace(a, n, x) => {
                        let a = a % (v.len() + 1);
                        let r = a..(a + n).min(v.len());
                        w.replace(r.clone(), &x);
                        v.splice(r, x);
                    }
                }
                prop_assert_eq!(&w[..], &v[..]);
                prop_assert_eq!(&w.clone()[..], &v[..]);
            }
            let mut exact = Vec::with_capacity(capacity(v.len()));
            exact.extend_from_slice(&v);
            let p = exact.as_ptr();
            let taken = Words::from_vec(exact);
            prop_assert_eq!(&taken[..], &v[..]);
            prop_assert!(v.is_empty() || taken.as_ptr() == p, "the vector's block is taken over");
            prop_assert_eq!(&Words::from_vec(v.clone())[..], &v[..]);
        }
    }
}
