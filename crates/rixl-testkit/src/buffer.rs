//! Page-aligned test buffers and byte patterns.
//!
//! A [`TestBuffer`] owns a zeroed, 4096-aligned allocation that backends read and write by
//! address: from the heap, or from the shared arena once a cross-process harness installed one
//! (so that a peer process sees the same bytes at the same address). It holds only a raw pointer, never a Rust reference to the bytes, so a backend
//! writing into it while the test holds `&TestBuffer` is fine; the slices it hands out
//! ([`TestBuffer::as_slice`]) must only be used while no transfer into the buffer is in flight.
//!
//! Patterns are position-dependent pseudo-random bytes: a byte copied to the wrong place, a page
//! copied twice or a short copy shows up as a mismatch at a precise offset.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

use rixl::{Desc, MemType, RegDesc, RegDescList};

/// The pattern byte at position `i` for `seed`.
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    (pattern_word(seed, i / 8) >> ((i % 8) * 8)) as u8
}

/// 8 pattern bytes at once (splitmix64 of the seed and the word index).
fn pattern_word(seed: u64, word: u64) -> u64 {
    let mut z = seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` pattern bytes for `seed` starting at pattern position `start`.
pub fn pattern(seed: u64, start: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = start;
    let end = start + len as u64;
    while i < end {
        if i.is_multiple_of(8) && end - i >= 8 {
            v.extend_from_slice(&pattern_word(seed, i / 8).to_le_bytes());
            i += 8;
        } else {
            v.push(pattern_byte(seed, i));
            i += 1;
        }
    }
    v
}

/// Asserts that two byte strings are equal, reporting the first differing offset instead of
/// dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    if actual.len() != expected.len() {
        panic!(
            "{what}: length {} differs from the expected {}",
            actual.len(),
            expected.len()
        );
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .expect("slices differ");
    let bad = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
    panic!(
        "{what}: {bad} of {} bytes differ; first at offset {first}: got {:#04x}, expected {:#04x}",
        actual.len(),
        actual[first],
        expected[first]
    );
}

/// A zeroed, page-aligned heap buffer for transfers. See the module documentation.
pub struct TestBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: a TestBuffer owns its allocation exclusively, like a `Box<[u8]>`; it has no
// thread-affine state, and all access to the bytes goes through `&self` (reads) or `&mut self`
// (writes), so the usual borrow rules make sharing across threads as safe as for `Box<[u8]>`.
unsafe impl Send for TestBuffer {}
// SAFETY: see `Send` above; `&TestBuffer` only allows reads of the bytes.
unsafe impl Sync for TestBuffer {}

impl TestBuffer {
    /// Alignment of every buffer.
    pub const ALIGN: usize = 4096;

    /// A zeroed buffer of `len` (> 0) bytes.
    pub fn new(len: usize) -> TestBuffer {
        assert!(len > 0, "a TestBuffer must not be empty");
        let layout = Layout::from_size_align(len, Self::ALIGN).expect("valid layout");
        let raw = match crate::arena::get() {
            // Fresh arena pages are zero and 4096-aligned (see `arena`).
            Some(arena) => arena.alloc(len),
            // SAFETY: `layout` has a non-zero size (checked above).
            None => unsafe { alloc::alloc_zeroed(layout) },
        };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        TestBuffer { ptr, layout }
    }

    /// A buffer of `len` bytes holding `pattern(seed, 0, len)`.
    pub fn with_pattern(len: usize, seed: u64) -> TestBuffer {
        let mut b = TestBuffer::new(len);
        b.fill_pattern(seed);
        b
    }

    /// The address of the first byte, as descriptors carry it.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as usize as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: buffers are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// A DRAM descriptor (dev 0) for `len` bytes at `offset`; panics if out of bounds.
    pub fn desc(&self, offset: usize, len: usize) -> Desc {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len()),
            "descriptor {offset}+{len} outside a buffer of {} bytes",
            self.len()
        );
        Desc::new(self.addr() + offset as u64, len as u64, 0)
    }

    /// A descriptor for the whole buffer.
    pub fn whole(&self) -> Desc {
        self.desc(0, self.len())
    }

    /// A registration descriptor for the whole buffer.
    pub fn reg_desc(&self) -> RegDesc {
        RegDesc::new(self.addr(), self.len() as u64, 0)
    }

    /// A one-entry DRAM registration list for the whole buffer.
    pub fn reg_list(&self) -> RegDescList {
        RegDescList::from_descs(MemType::Dram, vec![self.reg_desc()])
    }

    /// The bytes. Use only while no transfer into this buffer is in flight.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len()` initialised (zeroed at allocation) bytes owned by this
        // buffer. Backends write them only during transfers, and the caller promises, per the
        // method's documentation, that none is in flight while the slice is alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// A copy of `len` bytes at `offset`.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        self.as_slice()[offset..offset + len].to_vec()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees no other slice of the buffer is
        // alive in this program; transfers are not in flight by the same promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// Sets every byte to `b`.
    pub fn fill(&mut self, b: u8) {
        self.as_mut_slice().fill(b);
    }

    /// Fills the buffer with `pattern(seed, 0, len)`.
    pub fn fill_pattern(&mut self, seed: u64) {
        let p = pattern(seed, 0, self.len());
        self.as_mut_slice().copy_from_slice(&p);
    }

    /// Copies `bytes` to `offset`.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.as_mut_slice()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Asserts that `len` bytes at `offset` equal `expected`.
    #[track_caller]
    pub fn assert_range(&self, offset: usize, expected: &[u8], what: &str) {
        assert_bytes_eq(
            &self.as_slice()[offset..offset + expected.len()],
            expected,
            what,
        );
    }

    /// Asserts that `len` bytes at `offset` are all `b`.
    #[track_caller]
    pub fn assert_filled(&self, offset: usize, len: usize, b: u8, what: &str) {
        let s = &self.as_slice()[offset..offset + len];
        if let Some(p) = s.iter().position(|&x| x != b) {
            panic!(
                "{what}: byte at offset {} is {:#04x}, expected {b:#04x}",
                offset + p,
                s[p]
            );
        }
    }
}

impl Drop for TestBuffer {
    fn drop(&mut self) {
        match crate::arena::get() {
            Some(arena) if arena.contains(self.ptr.as_ptr()) => {
                arena.free(self.ptr.as_ptr(), self.len())
            }
            // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly `layout` (the arena was
            // not the allocator: it does not contain `ptr`) and is freed once.
            _ => unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) },
        }
    }
}

impl fmt::Debug for TestBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestBuffer")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_patterned() {
        let mut b = TestBuffer::new(10_000);
        assert_eq!(b.addr() % TestBuffer::ALIGN as u64, 0);
        b.assert_filled(0, b.len(), 0, "fresh buffer");
        b.fill_pattern(7);
        assert_eq!(b.read(3, 20), pattern(7, 3, 20));
        for i in [0u64, 1, 7, 8, 9, 4095, 9999] {
            assert_eq!(b.as_slice()[i as usize], pattern_byte(7, i));
        }
        assert_ne!(pattern(7, 0, 64), pattern(8, 0, 64));
        assert_ne!(pattern(7, 0, 64), pattern(7, 64, 64));
        b.write(5, &[1, 2, 3]);
        b.assert_range(5, &[1, 2, 3], "write");
        assert_eq!(b.desc(10, 20), Desc::new(b.addr() + 10, 20, 0));
    }

    #[test]
    #[should_panic(expected = "first at offset 2")]
    fn mismatch_names_the_offset() {
        assert_bytes_eq(&[1, 2, 3, 4], &[1, 2, 0, 4], "x");
    }
}
