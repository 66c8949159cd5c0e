//! `SegmentVec`: the vector a request's resolved segments live in, with its memory recycled.
//!
//! A request over 65,536 KV pages holds two 2 MiB segment arrays. Allocating them fresh for every
//! request means the allocator maps new pages and the kernel zero-fills them on first touch,
//! which cost as much as building the request itself. Large vectors are therefore returned to a
//! small process-wide pool when dropped and reused by the next large request. Small vectors
//! (under [`POOL_MIN`] segments) bypass the pool entirely.

use std::ops::{Deref, DerefMut};

use parking_lot::Mutex;

use crate::backend::Segment;

/// Vectors with at least this many segments of capacity are recycled.
pub const POOL_MIN: usize = 4096;
/// At most this many vectors are kept.
const POOL_SLOTS: usize = 16;
/// At most this many segments in all are kept (256 MiB of memory).
const POOL_MAX_SEGMENTS: usize = 8 << 20;

static POOL: Mutex<Vec<Vec<Segment>>> = Mutex::new(Vec::new());

/// A `Vec<Segment>` whose allocation is recycled when large. Derefs to a slice.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentVec {
    v: Vec<Segment>,
}

impl SegmentVec {
    /// An empty vector with room for `n` segments, reusing a pooled allocation if one fits.
    pub fn with_capacity(n: usize) -> SegmentVec {
        if n >= POOL_MIN {
            let mut pool = POOL.lock();
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n && v.capacity() <= n.saturating_mul(4))
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let mut v = pool.swap_remove(i);
                v.clear();
                return SegmentVec { v };
            }
        }
        SegmentVec {
            v: Vec::with_capacity(n),
        }
    }

    /// Appends a segment.
    #[inline]
    pub fn push(&mut self, s: Segment) {
        self.v.push(s);
    }

    /// Shortens the vector to `len` segments.
    pub fn truncate(&mut self, len: usize) {
        self.v.truncate(len);
    }

    /// Moves the segments out into a plain `Vec` (the allocation is not recycled then).
    pub fn into_vec(mut self) -> Vec<Segment> {
        std::mem::take(&mut self.v)
    }
}

impl From<Vec<Segment>> for SegmentVec {
    fn from(v: Vec<Segment>) -> SegmentVec {
        SegmentVec { v }
    }
}

impl FromIterator<Segment> for SegmentVec {
    fn from_iter<I: IntoIterator<Item = Segment>>(iter: I) -> SegmentVec {
        SegmentVec {
            v: iter.into_iter().collect(),
        }
    }
}

impl<'a> IntoIterator for &'a SegmentVec {
    type Item = &'a Segment;
    type IntoIter = std::slice::Iter<'a, Segment>;
    fn into_iter(self) -> Self::IntoIter {
        self.v.iter()
    }
}

impl Deref for SegmentVec {
    type Target = [Segment];
    #[inline]
    fn deref(&self) -> &[Segment] {
        &self.v
    }
}

impl DerefMut for SegmentVec {
    #[inline]
    fn deref_mut(&mut self) -> &mut [Segment] {
        &mut self.v
    }
}

impl Drop for SegmentVec {
    fn drop(&mut self) {
        if self.v.capacity() < POOL_MIN {
            return;
        }
        let mut pool = POOL.lock();
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if pool.len() < POOL_SLOTS && held + self.v.capacity() <= POOL_MAX_SEGMENTS {
            pool.push(std::mem::take(&mut self.v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_vectors_are_recycled_small_ones_are_not() {
        let mut a = SegmentVec::with_capacity(POOL_MIN * 2);
        a.push(Segment {
            addr: 1,
            len: 2,
            dev: 0,
            token: 9,
        });
        let ptr = a.as_ptr();
        drop(a);
        let b = SegmentVec::with_capacity(POOL_MIN * 2);
        assert!(b.is_empty(), "a recycled vector starts empty");
        // Another test may have taken it concurrently; only check reuse when it was ours.
        if b.as_ptr() == ptr {
            assert!(b.v.capacity() >= POOL_MIN * 2);
        }
        let mut s = SegmentVec::with_capacity(4);
        s.push(Segment::default());
        s.truncate(0);
        assert!(s.is_empty());
    }
}
