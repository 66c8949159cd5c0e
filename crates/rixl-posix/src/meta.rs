//! FILE path mode: `"<ro|rw>[,direct][,sync][,noatime][,create]:<path>"` in a registration's
//! meta bytes (NIXL-API §3.12).
//!
//! The grammar is strict on purpose: anything that does not parse exactly (no colon, another
//! access word, an unknown or upper-case flag, an empty path) is *not* an error but means "this
//! is not path mode", and the registration falls back to NIXL's fd-in-`dev` mode. A plain path in
//! the meta bytes (which NIXL programs pass for `query_memory`) therefore keeps working as before.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A parsed path-mode string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PathMode<'a> {
    /// `rw` (true) or `ro` (false).
    pub write: bool,
    /// `direct`: open with `O_DIRECT`.
    pub direct: bool,
    /// `sync`: open with `O_SYNC`.
    pub sync: bool,
    /// `noatime`: open with `O_NOATIME`.
    pub noatime: bool,
    /// `create`: open with `O_CREAT`, mode 0644.
    pub create: bool,
    /// The path, as raw bytes (Linux paths need not be UTF-8).
    pub path: &'a [u8],
}

impl<'a> PathMode<'a> {
    /// The path as a `Path`.
    pub(crate) fn path(&self) -> &'a Path {
        Path::new(OsStr::from_bytes(self.path))
    }

    /// `open(2)` flags for this mode (always `O_CLOEXEC`).
    pub(crate) fn open_flags(&self) -> libc::c_int {
        let mut f = if self.write {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        f |= libc::O_CLOEXEC;
        if self.direct {
            f |= libc::O_DIRECT;
        }
        if self.sync {
            f |= libc::O_SYNC;
        }
        if self.noatime {
            f |= libc::O_NOATIME;
        }
        if self.create {
            f |= libc::O_CREAT;
        }
        f
    }
}

/// Parses `meta` as a path-mode string; `None` means fd-in-`dev` mode.
pub(crate) fn parse(meta: &[u8]) -> Option<PathMode<'_>> {
    let colon = meta.iter().position(|&b| b == b':')?;
    let (head, path) = (&meta[..colon], &meta[colon + 1..]);
    if path.is_empty() || path.contains(&0) {
        return None;
    }
    let mut words = head.split(|&b| b == b',');
    let write = match words.next()? {
        b"ro" => false,
        b"rw" => true,
        _ => return None,
    };
    let mut m = PathMode {
        write,
        direct: false,
        sync: false,
        noatime: false,
        create: false,
        path,
    };
    for w in words {
        match w {
            b"direct" => m.direct = true,
            b"sync" => m.sync = true,
            b"noatime" => m.noatime = true,
            b"create" => m.create = true,
            _ => return None,
        }
    }
    Some(m)
}

/// The path a registration's meta names, for `query_mem`: the path of a path-mode string, or
/// the meta bytes themselves (NIXL's plain-path form). `None` for empty meta.
pub(crate) fn query_path(meta: &[u8]) -> Option<&Path> {
    if let Some(m) = parse(meta) {
        return Some(m.path());
    }
    if meta.is_empty() || meta.contains(&0) {
        return None;
    }
    Some(Path::new(OsStr::from_bytes(meta)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_flag() {
        let m = parse(b"rw,direct,sync,noatime,create:/data/kv.bin").unwrap();
        assert!(m.write && m.direct && m.sync && m.noatime && m.create);
        assert_eq!(m.path, b"/data/kv.bin");
        let m = parse(b"ro:/x").unwrap();
        assert!(!m.write && !m.direct && !m.create);
        let f = m.open_flags();
        assert_eq!(f & libc::O_ACCMODE, libc::O_RDONLY);
        assert_eq!(f & libc::O_CLOEXEC, libc::O_CLOEXEC);
        let f = parse(b"rw,direct,create:/x").unwrap().open_flags();
        assert_eq!(f & libc::O_ACCMODE, libc::O_RDWR);
        assert_ne!(f & libc::O_DIRECT, 0);
        assert_ne!(f & libc::O_CREAT, 0);
        // The path may itself contain colons: only the first one splits.
        assert_eq!(parse(b"ro:/a:b").unwrap().path, b"/a:b");
    }

    #[test]
    fn anything_else_falls_back() {
        for bad in [
            &b""[..],
            b"/plain/path",
            b"rw",
            b"rw:",
            b"wo:/x",
            b"RW:/x",
            b"rw,fast:/x",
            b"rw,:/x",
            b",rw:/x",
            b"rw,Direct:/x",
            b"rw:/nul\0byte",
        ] {
            assert!(parse(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn query_paths() {
        assert_eq!(query_path(b"rw,create:/a/b").unwrap(), Path::new("/a/b"));
        assert_eq!(query_path(b"/a/b").unwrap(), Path::new("/a/b"));
        assert!(query_path(b"").is_none());
    }
}
