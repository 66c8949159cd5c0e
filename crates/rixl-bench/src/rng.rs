//! A small deterministic random generator (xorshift).
//!
//! Deterministic on purpose: the scattered layout ([`crate::layout::desc_offsets`]) must come out
//! the same in the initiator and in a target process, and KV mode draws the same pages on every
//! run, so that runs compare.

/// The generator's state, which must not be 0 (it would stay 0).
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `k` distinct values out of `0..n`, in random order.
    pub fn sample(&mut self, n: u64, k: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        for i in 0..k as usize {
            let j = i + (self.next() % (n - i as u64)) as usize;
            v.swap(i, j);
        }
        v.truncate(k as usize);
        v
    }
}
