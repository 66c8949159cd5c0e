//! Memory types: what kind of address space a descriptor's `addr` lives in.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The memory type of a descriptor list (NIXL's `nixl_mem_t`, same numeric values).
///
/// The type decides how `addr`, `len` and `dev` are read: a host virtual address for
/// [`MemType::Dram`], a device address for [`MemType::Vram`], an offset into a file, volume or
/// object for the storage types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum MemType {
    /// Host memory: `addr` is a virtual address in the owner's process, `dev` usually 0.
    #[default]
    Dram = 0,
    /// GPU memory: `addr` is a device address, `dev` the CUDA device index.
    Vram = 1,
    /// A block device or volume: `addr` is a byte offset, `dev` the volume id.
    Blk = 2,
    /// An object in an object store: `addr` is the offset in the object, `dev` the key id.
    Obj = 3,
    /// A file: `addr` is the file offset, `dev` an open fd or a path-mode key.
    File = 4,
}

impl MemType {
    /// Every memory type, in numeric order.
    pub const ALL: [MemType; 5] = [
        MemType::Dram,
        MemType::Vram,
        MemType::Blk,
        MemType::Obj,
        MemType::File,
    ];

    /// The numeric value shared with NIXL.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The inverse of [`MemType::as_u8`].
    pub const fn from_u8(v: u8) -> Option<MemType> {
        match v {
            0 => Some(MemType::Dram),
            1 => Some(MemType::Vram),
            2 => Some(MemType::Blk),
            3 => Some(MemType::Obj),
            4 => Some(MemType::File),
            _ => None,
        }
    }

    /// Short name used by NIXL's Python API: `DRAM`, `VRAM`, `BLOCK`, `OBJ`, `FILE`.
    pub const fn name(self) -> &'static str {
        match self {
            MemType::Dram => "DRAM",
            MemType::Vram => "VRAM",
            MemType::Blk => "BLOCK",
            MemType::Obj => "OBJ",
            MemType::File => "FILE",
        }
    }

    /// The enum name NIXL reports from `get_plugin_mem_types`: `DRAM_SEG`, `FILE_SEG`, ...
    pub const fn seg_name(self) -> &'static str {
        match self {
            MemType::Dram => "DRAM_SEG",
            MemType::Vram => "VRAM_SEG",
            MemType::Blk => "BLK_SEG",
            MemType::Obj => "OBJ_SEG",
            MemType::File => "FILE_SEG",
        }
    }

    /// Storage types address offsets, not memory: a registration of length 0 is unbounded and
    /// transfer descriptors need no alignment to a mapped page.
    pub const fn is_storage(self) -> bool {
        matches!(self, MemType::Blk | MemType::Obj | MemType::File)
    }
}

impl fmt::Display for MemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MemType {
    type Err = Error;

    /// Accepts NIXL's names (`DRAM`, `VRAM`, `BLOCK`, `OBJ`, `FILE`), the legacy `cpu`/`cuda`,
    /// the `*_SEG` enum names and `BLK`, case-insensitively.
    fn from_str(s: &str) -> Result<MemType, Error> {
        let upper = s.trim().to_ascii_uppercase();
        let t = match upper.as_str() {
            "DRAM" | "CPU" | "DRAM_SEG" => MemType::Dram,
            "VRAM" | "CUDA" | "VRAM_SEG" => MemType::Vram,
            "BLOCK" | "BLK" | "BLK_SEG" => MemType::Blk,
            "OBJ" | "OBJ_SEG" => MemType::Obj,
            "FILE" | "FILE_SEG" => MemType::File,
            _ => return Err(Error::invalid_param(format!("unknown memory type {s:?}"))),
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for m in MemType::ALL {
            assert_eq!(m.name().parse::<MemType>().unwrap(), m);
            assert_eq!(m.seg_name().parse::<MemType>().unwrap(), m);
            assert_eq!(MemType::from_u8(m.as_u8()), Some(m));
        }
        assert_eq!("cuda".parse::<MemType>().unwrap(), MemType::Vram);
        assert!("HBM".parse::<MemType>().is_err());
        assert_eq!(MemType::from_u8(5), None);
    }
}
