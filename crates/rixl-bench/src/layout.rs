//! Where a request's descriptors lie, on both sides, and how a row's data is filled and checked.
//!
//! Memory layout, on both sides: `threads × pipeline_depth` slots per stream of `max_block ×
//! max_batch` bytes (twice that with `--layout scattered`); the request at pipeline position `k`
//! of thread `t` of stream `i` uses slot `i × threads × depth + t × depth + k` of the initiator's
//! buffer. On the target it uses the same slot for manytoone (one target buffer holding every
//! initiator's slots) and slot `t × depth + k` of target `i`'s buffer otherwise. The `batch`
//! descriptors of a request lie in its slot at [`desc_offsets`]: back to back, or scattered
//! (file targets: the same offsets, descriptor `j` in file `j mod num_files`, see [`file_pos`]).
//!
//! The initiator and a target process each compute all of this from the same options (which the
//! handshake checks), so that a command names a row by its block and batch sizes only.

use crate::cli::Config;
use crate::rng::Xorshift;

/// Offsets, from a slot's start, of the `batch` descriptors of one side of a request.
///
/// Contiguous: back to back (RIXL merges them into one range). Scattered: descriptor `j` at
/// block position `2 × p(j)` for a shuffle `p` of `0..batch`, a different shuffle on each side:
/// list neighbours are not memory neighbours and a hole of one block separates any two
/// descriptors, so that no merging can collapse them. The shuffle depends only on `batch` and
/// the side, so the target process computes the same offsets from the same options.
pub fn desc_offsets(scattered: bool, block: u64, batch: u64, remote: bool) -> Vec<u64> {
    if !scattered {
        return (0..batch).map(|j| j * block).collect();
    }
    let side = if remote { 0xD1B5_4A32_D192_ED03 } else { 0 };
    // (Xorshift needs a non-zero state.)
    let mut rng = Xorshift((0x9E37_79B9_7F4A_7C15 ^ batch.rotate_left(17) ^ side) | 1);
    rng.sample(batch, batch)
        .into_iter()
        .map(|p| 2 * p * block)
        .collect()
}

/// Where a row's descriptors lie in every slot of one side, to fill and check it.
#[derive(Clone, Debug)]
pub struct SlotLayout {
    pub stride: u64,
    pub block: u64,
    /// Descriptor offsets in a slot, sorted.
    sorted: Vec<u64>,
    /// Bytes from the slot's start to the end of the last descriptor.
    pub span: u64,
}

impl SlotLayout {
    pub fn new(cfg: &Config, block: u64, batch: u64, remote: bool) -> SlotLayout {
        let mut sorted = desc_offsets(cfg.scattered, block, batch, remote);
        sorted.sort_unstable();
        SlotLayout {
            stride: cfg.slot_stride,
            block,
            sorted,
            span: cfg.span(block, batch),
        }
    }

    /// Sets the first `span` bytes (descriptors and holes) of the first `slots` slots to
    /// `byte`.
    pub fn fill(&self, buf: &mut [u8], slots: u64, byte: u8) {
        for s in 0..slots {
            let a = ((s * self.stride) as usize).min(buf.len());
            let b = (a + self.span as usize).min(buf.len());
            buf[a..b].fill(byte);
        }
    }

    /// The first wrong byte among the first `span` bytes of the first `slots` slots: bytes of
    /// descriptors must be `inside`, the holes between them `outside` (so that a transfer that
    /// landed at the wrong offset is caught too). Returns (offset in `buf`, value).
    pub fn mismatch(&self, buf: &[u8], slots: u64, inside: u8, outside: u8) -> Option<(u64, u8)> {
        let check = |a: usize, b: usize, want: u8| -> Option<(u64, u8)> {
            let (a, b) = (a.min(buf.len()), b.min(buf.len()));
            buf[a..b]
                .iter()
                .position(|&x| x != want)
                .map(|i| ((a + i) as u64, buf[a + i]))
        };
        for s in 0..slots {
            let base = (s * self.stride) as usize;
            let mut cursor = base;
            for &off in &self.sorted {
                let start = base + off as usize;
                let end = start + self.block as usize;
                if let Some(bad) = check(cursor, start, outside) {
                    return Some(bad);
                }
                if let Some(bad) = check(start, end, inside) {
                    return Some(bad);
                }
                cursor = end;
            }
            if let Some(bad) = check(cursor, base + self.span as usize, outside) {
                return Some(bad);
            }
        }
        None
    }
}

/// File index and offset of descriptor `j` of slot `s`, at offset `off` in its slot.
pub fn file_pos(cfg: &Config, s: u64, j: u64, off: u64) -> (usize, u64) {
    ((j % cfg.args.num_files) as usize, s * cfg.slot_stride + off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    #[test]
    fn scattered_offsets_never_touch_and_are_shuffled() {
        for batch in [1u64, 2, 3, 16, 128] {
            for remote in [false, true] {
                let mut o = desc_offsets(true, 4096, batch, remote);
                o.sort_unstable();
                // Every other block position, each once: a one-block hole after each.
                assert_eq!(o, (0..batch).map(|j| 2 * j * 4096).collect::<Vec<_>>());
            }
        }
        let l = desc_offsets(true, 1, 128, false);
        let r = desc_offsets(true, 1, 128, true);
        assert_ne!(l, r, "each side has its own shuffle");
        assert!(l.windows(2).any(|w| w[0] > w[1]), "not in address order");
        assert_eq!(desc_offsets(true, 1, 128, false), l, "deterministic");
        assert_eq!(desc_offsets(false, 10, 3, true), [0, 10, 20]);
    }

    #[test]
    fn slots_are_filled_and_checked_with_their_holes() {
        // Slots of 10 bytes; descriptors of 2 bytes at 0 and 4; span 8.
        let lay = SlotLayout {
            stride: 10,
            block: 2,
            sorted: vec![0, 4],
            span: 8,
        };
        let mut b = vec![0u8; 40];
        lay.fill(&mut b, 4, 0xaa);
        assert_eq!(b.iter().filter(|&&x| x == 0xaa).count(), 32);
        for s in 0..4 {
            for o in [0, 1, 4, 5] {
                b[s * 10 + o] = 0xbb;
            }
        }
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), None);
        b[23] = 0xbb; // in a hole of slot 2: a write that landed at the wrong offset
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), Some((23, 0xbb)));
        b[23] = 0xaa;
        b[35] = 7;
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), Some((35, 7)));
        // Bytes past the span, and slots not asked for, are not looked at.
        b[35] = 0xbb;
        b[38] = 1;
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), None);
        b[5] = 0;
        assert_eq!(lay.mismatch(&b[10..], 3, 0xbb, 0xaa), None);
        let buf = Buffer::new(5000, 1);
        assert_eq!(buf.addr() % 4096, 0);
        assert_eq!(buf.bytes().len(), 5000);
    }
}
