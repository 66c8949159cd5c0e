//! Descriptors and descriptor lists.
//!
//! A descriptor names a byte range `(addr, len, dev)` in one memory type. Lists are plain vectors
//! of small `Copy` structs so that building 10^5 KV-cache pages costs microseconds; validation
//! (zero length, wrap-around, coverage by a registration) happens once, when the agent prepares or
//! creates a request, not when a list is built.

use crate::error::{Error, Result};
use crate::mem::MemType;

/// A byte range: `len` bytes at `addr` on device / volume / key `dev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Desc {
    /// Address (DRAM, VRAM) or offset (FILE, BLK, OBJ).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device id, volume id, fd or key id, depending on the memory type.
    pub dev: u64,
}

impl Desc {
    /// A descriptor of `len` bytes at `addr` on `dev`.
    pub const fn new(addr: u64, len: u64, dev: u64) -> Desc {
        Desc { addr, len, dev }
    }

    /// One past the last byte, or `None` if `addr + len` wraps around.
    pub const fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }

    /// Checks a transfer descriptor: non-empty and not wrapping around the address space.
    /// `index` names its position in the list in the error.
    pub fn check_xfer(&self, index: usize) -> Result<()> {
        if self.len == 0 {
            return Err(Error::invalid_param(format!(
                "descriptor {index} has length 0 (addr {:#x}, dev {})",
                self.addr, self.dev
            )));
        }
        if self.end().is_none() {
            return Err(Error::invalid_param(format!(
                "descriptor {index} wraps around the address space (addr {:#x} + len {})",
                self.addr, self.len
            )));
        }
        Ok(())
    }
}

/// A registration descriptor: a [`Desc`] plus backend-specific `meta` bytes (a file path or
/// path-mode string for FILE, an object key for OBJ, empty for memory).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct RegDesc {
    /// The range being registered.
    pub desc: Desc,
    /// Backend-specific information; never published in metadata.
    pub meta: Vec<u8>,
}

impl RegDesc {
    /// A registration descriptor with empty meta.
    pub fn new(addr: u64, len: u64, dev: u64) -> RegDesc {
        RegDesc {
            desc: Desc::new(addr, len, dev),
            meta: Vec::new(),
        }
    }

    /// A registration descriptor with meta bytes.
    pub fn with_meta(addr: u64, len: u64, dev: u64, meta: impl Into<Vec<u8>>) -> RegDesc {
        RegDesc {
            desc: Desc::new(addr, len, dev),
            meta: meta.into(),
        }
    }

    /// Checks a registration: memory registrations must be non-empty; storage registrations of
    /// length 0 are unbounded. None may wrap around.
    pub fn check(&self, mem: MemType, index: usize) -> Result<()> {
        let d = &self.desc;
        if d.len == 0 && !mem.is_storage() {
            return Err(Error::invalid_param(format!(
                "registration {index} has length 0 (addr {:#x}); only FILE, BLK and OBJ \
                 registrations may be unbounded",
                d.addr
            ))
            .with_mem(mem));
        }
        if d.end().is_none() {
            return Err(Error::invalid_param(format!(
                "registration {index} wraps around the address space (addr {:#x} + len {})",
                d.addr, d.len
            ))
            .with_mem(mem));
        }
        if d.addr == 0 && matches!(mem, MemType::Dram | MemType::Vram) {
            return Err(
                Error::invalid_param(format!("registration {index} has a null address"))
                    .with_mem(mem),
            );
        }
        Ok(())
    }
}

/// `count` descriptors of `len` bytes, `stride` bytes apart, starting at `addr` (NIXL's Nx5 rows).
/// This is how a KV cache with fixed-size pages is described without materialising every page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StridedDesc {
    /// First page.
    pub addr: u64,
    /// Bytes per page.
    pub len: u64,
    /// Device id.
    pub dev: u64,
    /// Distance between the starts of consecutive pages; at least `len`.
    pub stride: u64,
    /// Number of pages; at least 1.
    pub count: u64,
}

impl StridedDesc {
    /// Checks the row and returns the descriptors it stands for, lazily.
    pub fn expand(&self, row: usize) -> Result<impl ExactSizeIterator<Item = Desc> + '_> {
        if self.count == 0 {
            return Err(Error::not_found(format!("strided row {row} has count 0")));
        }
        if self.stride < self.len {
            return Err(Error::not_found(format!(
                "strided row {row} has stride {} smaller than length {} (pages would overlap)",
                self.stride, self.len
            )));
        }
        let last = self
            .stride
            .checked_mul(self.count - 1)
            .and_then(|off| self.addr.checked_add(off))
            .and_then(|a| a.checked_add(self.len));
        if last.is_none() || self.len == 0 {
            return Err(Error::invalid_param(format!(
                "strided row {row} is empty or wraps around the address space"
            )));
        }
        let count = usize::try_from(self.count)
            .map_err(|_| Error::invalid_param(format!("strided row {row} count too large")))?;
        Ok((0..count)
            .map(move |i| Desc::new(self.addr + self.stride * i as u64, self.len, self.dev)))
    }
}

/// A transfer descriptor list: one memory type, any number of [`Desc`]s (NIXL's `nixlXferDList`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct XferDescList {
    mem: MemType,
    descs: Vec<Desc>,
}

impl XferDescList {
    /// An empty list of `mem` descriptors.
    pub fn new(mem: MemType) -> XferDescList {
        XferDescList {
            mem,
            descs: Vec::new(),
        }
    }

    /// An empty list with room for `n` descriptors.
    pub fn with_capacity(mem: MemType, n: usize) -> XferDescList {
        XferDescList {
            mem,
            descs: Vec::with_capacity(n),
        }
    }

    /// A list owning `descs`.
    pub fn from_descs(mem: MemType, descs: Vec<Desc>) -> XferDescList {
        XferDescList { mem, descs }
    }

    /// Expands strided rows in order (rows of 4 and 4 give indices 0..7).
    pub fn from_strided(mem: MemType, rows: &[StridedDesc]) -> Result<XferDescList> {
        if rows.is_empty() {
            return Err(Error::not_found("strided descriptor list has no rows"));
        }
        let mut total = 0usize;
        for r in rows {
            total = total.saturating_add(usize::try_from(r.count).unwrap_or(usize::MAX));
        }
        let mut descs = Vec::with_capacity(total.min(1 << 24));
        for (i, r) in rows.iter().enumerate() {
            descs.extend(r.expand(i)?);
        }
        Ok(XferDescList { mem, descs })
    }

    /// The memory type.
    pub fn mem(&self) -> MemType {
        self.mem
    }

    /// The descriptors.
    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    /// Mutable access to the descriptors.
    pub fn descs_mut(&mut self) -> &mut Vec<Desc> {
        &mut self.descs
    }

    /// Adds a descriptor.
    pub fn push(&mut self, d: Desc) {
        self.descs.push(d);
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// True when the list holds no descriptor.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Sum of the descriptor lengths (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.descs.iter().fold(0u64, |a, d| a.saturating_add(d.len))
    }
}

impl std::ops::Index<usize> for XferDescList {
    type Output = Desc;
    fn index(&self, i: usize) -> &Desc {
        &self.descs[i]
    }
}

/// A registration descriptor list (NIXL's `nixlRegDList`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegDescList {
    mem: MemType,
    descs: Vec<RegDesc>,
}

impl RegDescList {
    /// An empty list of `mem` registrations.
    pub fn new(mem: MemType) -> RegDescList {
        RegDescList {
            mem,
            descs: Vec::new(),
        }
    }

    /// A list owning `descs`.
    pub fn from_descs(mem: MemType, descs: Vec<RegDesc>) -> RegDescList {
        RegDescList { mem, descs }
    }

    /// The memory type.
    pub fn mem(&self) -> MemType {
        self.mem
    }

    /// The registration descriptors.
    pub fn descs(&self) -> &[RegDesc] {
        &self.descs
    }

    /// Mutable access to the registration descriptors.
    pub fn descs_mut(&mut self) -> &mut Vec<RegDesc> {
        &mut self.descs
    }

    /// Adds a registration descriptor.
    pub fn push(&mut self, d: RegDesc) {
        self.descs.push(d);
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// True when the list holds no descriptor.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// The same ranges as a transfer list (NIXL's `trim()`): meta is dropped.
    pub fn trim(&self) -> XferDescList {
        XferDescList {
            mem: self.mem,
            descs: self.descs.iter().map(|r| r.desc).collect(),
        }
    }
}

impl std::ops::Index<usize> for RegDescList {
    type Output = RegDesc;
    fn index(&self, i: usize) -> &RegDesc {
        &self.descs[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfer_checks() {
        assert!(Desc::new(0x1000, 16, 0).check_xfer(0).is_ok());
        assert_eq!(
            Desc::new(0x1000, 0, 0).check_xfer(2).unwrap_err().kind(),
            crate::ErrorKind::InvalidParam
        );
        let e = Desc::new(u64::MAX - 3, 16, 0).check_xfer(1).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidParam);
        assert!(e.to_string().contains("wraps"));
    }

    #[test]
    fn reg_checks() {
        assert!(RegDesc::new(0, 0, 7).check(MemType::File, 0).is_ok());
        assert!(RegDesc::new(0x1000, 0, 0).check(MemType::Dram, 0).is_err());
        assert!(RegDesc::new(0, 64, 0).check(MemType::Dram, 0).is_err());
        assert!(RegDesc::new(u64::MAX, 2, 0)
            .check(MemType::File, 0)
            .is_err());
    }

    #[test]
    fn strided_expands_in_row_order() {
        let rows = [
            StridedDesc {
                addr: 0x1000,
                len: 16,
                dev: 0,
                stride: 32,
                count: 4,
            },
            StridedDesc {
                addr: 0x9000,
                len: 8,
                dev: 1,
                stride: 8,
                count: 4,
            },
        ];
        let l = XferDescList::from_strided(MemType::Dram, &rows).unwrap();
        assert_eq!(l.len(), 8);
        assert_eq!(l[3], Desc::new(0x1000 + 96, 16, 0));
        assert_eq!(l[4], Desc::new(0x9000, 8, 1));
        assert_eq!(l.total_bytes(), 4 * 16 + 4 * 8);
        let bad = StridedDesc {
            addr: 1,
            len: 16,
            dev: 0,
            stride: 8,
            count: 2,
        };
        assert_eq!(
            XferDescList::from_strided(MemType::Dram, &[bad])
                .unwrap_err()
                .kind(),
            crate::ErrorKind::NotFound
        );
        let zero = StridedDesc {
            addr: 1,
            len: 16,
            dev: 0,
            stride: 16,
            count: 0,
        };
        assert!(XferDescList::from_strided(MemType::Dram, &[zero]).is_err());
        assert!(XferDescList::from_strided(MemType::Dram, &[]).is_err());
        let wrap = StridedDesc {
            addr: u64::MAX - 100,
            len: 16,
            dev: 0,
            stride: 64,
            count: 4,
        };
        assert_eq!(
            XferDescList::from_strided(MemType::Dram, &[wrap])
                .unwrap_err()
                .kind(),
            crate::ErrorKind::InvalidParam
        );
    }
}
