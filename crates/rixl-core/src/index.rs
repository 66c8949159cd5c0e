//! The registration index: registrations of one (memory type, backend), sorted by `(dev, addr)`.
//!
//! Every transfer descriptor must lie inside exactly one registration. NIXL scans; RIXL keeps
//! registrations sorted and non-overlapping, so the only candidate for a descriptor is the last
//! registration starting at or before it, found by binary search. Callers that walk many
//! descriptors pass the previous hit as a hint: KV-cache pages usually fall into the same region
//! as their neighbour, which makes the common lookup O(1).
//!
//! Overlapping registrations are refused (NIXL accepts them silently and then needs two
//! deregistrations). An index built with [`RegIndex::allowing_overlap`] accepts them for legacy
//! programs; lookups then scan back over the candidates that could still reach the descriptor.

use crate::desc::Desc;
use crate::error::{Error, Result};

/// One registration and the caller's payload for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegEntry<T> {
    /// The registered range; `len == 0` means unbounded (storage types only).
    pub desc: Desc,
    /// Whatever the owner keeps per registration (backend token, public data, ...).
    pub value: T,
}

impl<T> RegEntry<T> {
    /// One past the last covered offset; unbounded registrations reach the end of the space.
    fn end(&self) -> u64 {
        if self.desc.len == 0 {
            u64::MAX
        } else {
            self.desc.addr.saturating_add(self.desc.len)
        }
    }

    /// True when `d` lies entirely inside this registration (same `dev`).
    pub fn covers(&self, d: &Desc) -> bool {
        d.dev == self.desc.dev
            && self.desc.addr <= d.addr
            && d.addr.checked_add(d.len).is_some_and(|e| e <= self.end())
    }
}

/// Registrations sorted by `(dev, addr)`; see the module documentation.
#[derive(Clone, Debug)]
pub struct RegIndex<T> {
    entries: Vec<RegEntry<T>>,
    allow_overlap: bool,
    /// Longest bounded registration, used to bound the backward scan when overlap is allowed.
    max_len: u64,
    has_unbounded: bool,
}

impl<T> Default for RegIndex<T> {
    fn default() -> Self {
        RegIndex::new()
    }
}

impl<T> RegIndex<T> {
    /// An empty index that refuses overlapping registrations.
    pub fn new() -> RegIndex<T> {
        RegIndex {
            entries: Vec::new(),
            allow_overlap: false,
            max_len: 0,
            has_unbounded: false,
        }
    }

    /// An empty index that accepts overlapping and duplicate registrations (NIXL's behaviour).
    pub fn allowing_overlap() -> RegIndex<T> {
        RegIndex {
            allow_overlap: true,
            ..RegIndex::new()
        }
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All registrations in `(dev, addr)` order.
    pub fn entries(&self) -> &[RegEntry<T>] {
        &self.entries
    }

    /// The registration at position `i` (positions shift on insert and removal).
    pub fn get(&self, i: usize) -> Option<&RegEntry<T>> {
        self.entries.get(i)
    }

    /// Checks that `desc` could be inserted: the overlap rule, without inserting.
    pub fn check_insert(&self, desc: &Desc) -> Result<()> {
        if self.allow_overlap {
            return Ok(());
        }
        let new = RegEntry {
            desc: *desc,
            value: (),
        };
        let pos = self.lower_bound(desc.dev, desc.addr);
        let clash = |e: &RegEntry<T>| {
            e.desc.dev == desc.dev && e.desc.addr < new.end() && desc.addr < e.end()
        };
        let neighbours = [pos.checked_sub(1), Some(pos)];
        for e in neighbours
            .into_iter()
            .flatten()
            .filter_map(|i| self.entries.get(i))
        {
            if clash(e) {
                return Err(Error::invalid_param(format!(
                    "registration (addr {:#x}, len {}, dev {}) overlaps the existing registration \
                     (addr {:#x}, len {}, dev {}); set RIXL_ALLOW_OVERLAPPING_REGISTRATIONS=1 to \
                     accept overlaps as NIXL does",
                    desc.addr, desc.len, desc.dev, e.desc.addr, e.desc.len, e.desc.dev
                )));
            }
        }
        Ok(())
    }

    /// Inserts a registration; refuses overlaps unless the index allows them.
    pub fn insert(&mut self, desc: Desc, value: T) -> Result<()> {
        self.check_insert(&desc)?;
        let pos = self.upper_bound(desc.dev, desc.addr);
        if desc.len == 0 {
            self.has_unbounded = true;
        }
        self.max_len = self.max_len.max(desc.len);
        self.entries.insert(pos, RegEntry { desc, value });
        Ok(())
    }

    /// Position of the registration that equals `desc` exactly.
    pub fn find_exact(&self, desc: &Desc) -> Option<usize> {
        let start = self.lower_bound(desc.dev, desc.addr);
        self.entries[start..]
            .iter()
            .take_while(|e| e.desc.dev == desc.dev && e.desc.addr == desc.addr)
            .position(|e| e.desc.len == desc.len)
            .map(|p| start + p)
    }

    /// Position of the first registration that equals `desc` exactly and whose payload
    /// satisfies `pred` (with overlaps allowed, the same range can be registered twice).
    pub fn find_exact_where(&self, desc: &Desc, pred: impl Fn(&T) -> bool) -> Option<usize> {
        let start = self.lower_bound(desc.dev, desc.addr);
        self.entries[start..]
            .iter()
            .take_while(|e| e.desc.dev == desc.dev && e.desc.addr == desc.addr)
            .position(|e| e.desc.len == desc.len && pred(&e.value))
            .map(|p| start + p)
    }

    /// Removes the registration at position `i` (from a `find_*` call) and returns its payload.
    pub fn remove_at(&mut self, i: usize) -> T {
        self.entries.remove(i).value
    }

    /// Removes the registration that equals `desc` exactly and returns its payload.
    pub fn remove_exact(&mut self, desc: &Desc) -> Option<T> {
        let i = self.find_exact(desc)?;
        Some(self.entries.remove(i).value)
    }

    /// Position of the registration covering `d`, if any.
    pub fn find_covering(&self, d: &Desc) -> Option<usize> {
        let ub = self.upper_bound(d.dev, d.addr);
        let cand = ub.checked_sub(1)?;
        if !self.allow_overlap {
            return self.entries[cand].covers(d).then_some(cand);
        }
        // With overlaps an earlier, longer registration may cover `d`: scan back while an entry
        // could still reach it.
        let reach_from = if self.has_unbounded {
            0
        } else {
            d.addr.saturating_sub(self.max_len)
        };
        self.entries[..=cand]
            .iter()
            .rposition(|e| e.covers(d) || e.desc.dev != d.dev || e.desc.addr < reach_from)
            .filter(|&i| self.entries[i].covers(d))
    }

    /// Like [`RegIndex::find_covering`], trying position `hint` first.
    #[inline]
    pub fn find_covering_hinted(&self, d: &Desc, hint: usize) -> Option<usize> {
        match self.entries.get(hint) {
            Some(e) if e.covers(d) => Some(hint),
            _ => self.find_covering(d),
        }
    }

    /// Removes every registration and returns them.
    pub fn drain(&mut self) -> Vec<RegEntry<T>> {
        self.max_len = 0;
        self.has_unbounded = false;
        std::mem::take(&mut self.entries)
    }

    /// First position whose `(dev, addr)` is not less than the key.
    fn lower_bound(&self, dev: u64, addr: u64) -> usize {
        self.entries
            .partition_point(|e| (e.desc.dev, e.desc.addr) < (dev, addr))
    }

    /// First position whose `(dev, addr)` is greater than the key.
    fn upper_bound(&self, dev: u64, addr: u64) -> usize {
        self.entries
            .partition_point(|e| (e.desc.dev, e.desc.addr) <= (dev, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_overlap_and_finds_cover() {
        let mut ix = RegIndex::new();
        ix.insert(Desc::new(0x1000, 0x1000, 0), 'a').unwrap();
        ix.insert(Desc::new(0x3000, 0x1000, 0), 'b').unwrap();
        ix.insert(Desc::new(0x1000, 0x1000, 1), 'c').unwrap();
        let e = ix.insert(Desc::new(0x1800, 0x1000, 0), 'x').unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidParam);
        assert!(e.to_string().contains("0x1000"), "{e}");
        assert!(ix.insert(Desc::new(0x1000, 0x1000, 0), 'x').is_err());
        // Adjacent is fine.
        ix.insert(Desc::new(0x2000, 0x1000, 0), 'd').unwrap();
        let at = |a, l, dv| {
            ix.find_covering(&Desc::new(a, l, dv))
                .map(|i| ix.entries()[i].value)
        };
        assert_eq!(at(0x1000, 0x1000, 0), Some('a'));
        assert_eq!(at(0x1fff, 1, 0), Some('a'));
        assert_eq!(
            at(0x1fff, 2, 0),
            None,
            "spanning two registrations is refused"
        );
        assert_eq!(at(0x3800, 0x800, 0), Some('b'));
        assert_eq!(at(0x1800, 16, 1), Some('c'));
        assert_eq!(at(0x1800, 16, 2), None);
        assert_eq!(at(0x0fff, 2, 0), None);
        assert_eq!(ix.remove_exact(&Desc::new(0x2000, 0x800, 0)), None);
        assert_eq!(ix.remove_exact(&Desc::new(0x2000, 0x1000, 0)), Some('d'));
        assert_eq!(ix.len(), 3);
    }

    #[test]
    fn unbounded_storage_registration() {
        let mut ix = RegIndex::new();
        ix.insert(Desc::new(0, 0, 5), ()).unwrap();
        assert!(ix.find_covering(&Desc::new(1 << 40, 4096, 5)).is_some());
        assert!(ix.find_covering(&Desc::new(0, 1, 6)).is_none());
        assert!(ix.insert(Desc::new(1 << 20, 10, 5), ()).is_err());
    }

    #[test]
    fn overlap_allowed_when_asked() {
        let mut ix = RegIndex::allowing_overlap();
        ix.insert(Desc::new(0x1000, 0x10000, 0), 1).unwrap();
        ix.insert(Desc::new(0x2000, 0x100, 0), 2).unwrap();
        ix.insert(Desc::new(0x2000, 0x100, 0), 3).unwrap();
        let i = ix.find_covering(&Desc::new(0x9000, 16, 0)).unwrap();
        assert_eq!(ix.entries()[i].value, 1);
        assert!(ix.remove_exact(&Desc::new(0x2000, 0x100, 0)).is_some());
        assert!(ix.remove_exact(&Desc::new(0x2000, 0x100, 0)).is_some());
        assert!(ix.remove_exact(&Desc::new(0x2000, 0x100, 0)).is_none());
    }

    proptest! {
        /// The index agrees with a linear scan on every lookup.
        #[test]
        fn matches_linear_scan(
            regs in proptest::collection::vec((0u64..64, 1u64..16, 0u64..3), 0..40),
            probes in proptest::collection::vec((0u64..90, 1u64..20, 0u64..3), 1..60),
        ) {
            let mut ix = RegIndex::new();
            let mut accepted: Vec<Desc> = Vec::new();
            for (a, l, d) in regs {
                let desc = Desc::new(a * 4, l * 4, d);
                let overlaps = accepted.iter().any(|r| r.dev == d && r.addr < desc.addr + desc.len && desc.addr < r.addr + r.len);
                prop_assert_eq!(ix.insert(desc, ()).is_ok(), !overlaps);
                if !overlaps { accepted.push(desc); }
            }
            for (a, l, d) in probes {
                let p = Desc::new(a * 3, l, d);
                let linear = accepted.iter().find(|r| r.dev == p.dev && r.addr <= p.addr && p.addr + p.len <= r.addr + r.len);
                let found = ix.find_covering(&p).map(|i| ix.entries()[i].desc);
                prop_assert_eq!(found, linear.copied());
                prop_assert_eq!(ix.find_covering_hinted(&p, 0).map(|i| ix.entries()[i].desc), linear.copied());
            }
        }
    }
}
