//! Per-registration state of FILE and BLK regions: the file descriptor, who owns it, how it may
//! be used, and what O_DIRECT needs from it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use rixl_core::{Error, ErrorKind, MemType, Params, Result};

use crate::meta::PathMode;

/// What O_DIRECT requires of a transfer on one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DioAlign {
    /// Buffer addresses must be multiples of this.
    pub mem: u64,
    /// File offsets and lengths must be multiples of this.
    pub offset: u64,
    /// Where the numbers came from, for error messages.
    pub source: &'static str,
}

/// Something that owns an io_uring registered-file slot and must hear when it is free again.
pub(crate) trait FixedOwner: Send + Sync {
    /// Clears `slot` in the ring's file table (the kernel drops its reference to the file).
    fn release(&self, slot: u32);
}

/// A registered-file slot held by a region.
pub(crate) struct FixedSlot {
    pub slot: u32,
    pub owner: Arc<dyn FixedOwner>,
}

/// One FILE or BLK registration.
pub(crate) struct Region {
    /// The descriptor used for I/O.
    pub fd: RawFd,
    /// Set in path mode: the backend opened the file and closes it when the region goes away.
    /// In fd mode the caller owns `fd` and must keep it open while it is registered (as in
    /// NIXL).
    owned: Option<OwnedFd>,
    pub readable: bool,
    pub writable: bool,
    /// An fd-mode descriptor opened with O_APPEND: Linux's pwrite and io_uring ignore the
    /// offset of every write to it, so WRITEs are refused.
    pub append: bool,
    /// Opened with O_DIRECT (path mode `direct`, or an fd whose status flags include it).
    pub direct: bool,
    /// Opened with O_SYNC or O_DSYNC (path mode `sync`, or the fd's status flags): every write
    /// waits for the device, so writes to it are neither serialised nor run inline.
    pub sync: bool,
    /// Cleared once a `RWF_NOWAIT` read of this file was refused as unsupported, so inline
    /// reads stop trying it (see `Plan::run_inline`).
    pub nowait: AtomicBool,
    /// Bytes of O_DIRECT operations on this file in flight on the io_uring engine. Only the
    /// ring thread reads and updates it (see `uring`'s per-file limit).
    pub ring_bytes: AtomicU64,
    /// The most `ring_bytes` has been (tests check the per-file budget with it).
    #[cfg(test)]
    pub ring_peak: AtomicU64,
    /// O_DIRECT alignment; only checked when `direct`.
    pub align: DioAlign,
    /// How messages name the file: its path, or `fd N (path)`.
    pub label: String,
    pub mem: MemType,
    /// The io_uring registered-file slot, when the engine gave it one.
    pub fixed: Option<FixedSlot>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("fd", &self.fd)
            .field("owned", &self.owned.is_some())
            .field("label", &self.label)
            .field("direct", &self.direct)
            .field("sync", &self.sync)
            .field("fixed", &self.fixed.as_ref().map(|s| s.slot))
            .finish_non_exhaustive()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // Clear the ring's reference before the fd closes, so the file is really closed (and a
        // tmpfs holding it can be unmounted) once deregistration has run.
        if let Some(f) = self.fixed.take() {
            f.owner.release(f.slot);
        }
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid_param(format!("path {} contains a NUL byte", path.display())))
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat`; fstat on a bad fd just fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(errno());
    }
    Ok(st)
}

fn is_blk(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFBLK
}

/// The size of the file behind `fd` (block devices report theirs through `lseek`).
pub(crate) fn file_size(fd: RawFd) -> io::Result<u64> {
    let st = fstat(fd)?;
    if is_blk(&st) {
        // SAFETY: lseek on a valid fd; it does not touch memory.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if end < 0 {
            return Err(errno());
        }
        return Ok(end as u64);
    }
    Ok(st.st_size.max(0) as u64)
}

/// O_DIRECT alignment of `fd`: the logical block size for block devices (`BLKSSZGET`), else
/// what `statx(STATX_DIOALIGN)` reports (Linux 6.1+), else 512 bytes, the classic rule.
pub(crate) fn dio_align(fd: RawFd) -> DioAlign {
    if let Ok(st) = fstat(fd) {
        if is_blk(&st) {
            let mut lbs: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the pointer, which points at `lbs`.
            let r = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut lbs as *mut libc::c_int) };
            if r == 0 && lbs > 0 {
                return DioAlign {
                    mem: lbs as u64,
                    offset: lbs as u64,
                    source: "the device's logical block size (BLKSSZGET)",
                };
            }
        }
    }
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty, NUL-terminated path with AT_EMPTY_PATH makes statx describe `fd`; it
    // writes only into `stx`.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        let offset = u64::from(stx.stx_dio_offset_align);
        let mem = match stx.stx_dio_mem_align {
            0 => offset,
            m => u64::from(m),
        };
        return DioAlign {
            mem,
            offset,
            source: "statx(STATX_DIOALIGN)",
        };
    }
    DioAlign {
        mem: 512,
        offset: 512,
        source: "the default 512-byte sector (the file system does not report its own)",
    }
}

impl Region {
    /// Opens the file of a path-mode registration.
    pub(crate) fn open(mem: MemType, m: &PathMode<'_>) -> Result<Region> {
        let path = m.path();
        let c = cstring(path)?;
        // SAFETY: `c` is a valid NUL-terminated string; the mode argument is read only with
        // O_CREAT, and 0644 is a valid mode.
        let fd = unsafe { libc::open(c.as_ptr(), m.open_flags(), 0o644 as libc::c_uint) };
        if fd < 0 {
            let e = errno();
            // NIXL reports a failed registration as a backend error; the message keeps the
            // path and the OS error, and `os_error()` the errno.
            return Err(Error::from_io(
                ErrorKind::Backend,
                format!(
                    "POSIX cannot open {} for a {mem} registration ({}{})",
                    path.display(),
                    if m.write { "read-write" } else { "read-only" },
                    if m.direct { ", O_DIRECT" } else { "" }
                ),
                &e,
            )
            .with_mem(mem));
        }
        // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let label = path.display().to_string();
        let st = fstat(fd).map_err(|e| {
            Error::from_io(ErrorKind::Backend, format!("POSIX cannot stat {label}"), &e)
        })?;
        check_kind(mem, &st, &label)?;
        Ok(Region {
            fd,
            owned: Some(owned),
            readable: true,
            writable: m.write,
            append: false,
            direct: m.direct,
            sync: m.sync,
            nowait: AtomicBool::new(true),
            ring_bytes: AtomicU64::new(0),
            #[cfg(test)]
            ring_peak: AtomicU64::new(0),
            align: if m.direct { dio_align(fd) } else { NO_ALIGN },
            label,
            mem,
            fixed: None,
        })
    }

    /// Adopts a caller-owned fd (NIXL's fd-in-`dev` mode). `meta`, if it is a plain path, only
    /// improves messages.
    pub(crate) fn borrow_fd(mem: MemType, dev: u64, meta: &[u8]) -> Result<Region> {
        let fd = RawFd::try_from(dev).map_err(|_| {
            Error::invalid_param(format!(
                "{mem} registration: dev {dev} is not a file descriptor (and the meta bytes are \
                 not a path-mode string such as \"rw,create:/path\")"
            ))
            .with_mem(mem)
        })?;
        // SAFETY: F_GETFL only queries the descriptor's status flags.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 {
            let e = errno();
            return Err(Error::from_io(
                ErrorKind::InvalidParam,
                format!(
                    "{mem} registration: fd {fd} (from dev) is not an open file descriptor, and \
                     the meta bytes are not a path-mode string such as \"rw,create:/path\""
                ),
                &e,
            )
            .with_mem(mem));
        }
        let name = if meta.is_empty() {
            proc_fd_path(fd)
        } else {
            Some(String::from_utf8_lossy(meta).into_owned())
        };
        let label = match name {
            Some(n) => format!("fd {fd} ({n})"),
            None => format!("fd {fd}"),
        };
        let st = fstat(fd).map_err(|e| {
            Error::from_io(ErrorKind::Backend, format!("POSIX cannot stat {label}"), &e)
        })?;
        check_kind(mem, &st, &label)?;
        let acc = fl & libc::O_ACCMODE;
        let direct = fl & libc::O_DIRECT != 0;
        Ok(Region {
            fd,
            owned: None,
            readable: acc == libc::O_RDONLY || acc == libc::O_RDWR,
            writable: acc == libc::O_WRONLY || acc == libc::O_RDWR,
            append: fl & libc::O_APPEND != 0,
            direct,
            // O_SYNC is __O_SYNC | O_DSYNC: the O_DSYNC bit is set for both.
            sync: fl & libc::O_DSYNC != 0,
            nowait: AtomicBool::new(true),
            ring_bytes: AtomicU64::new(0),
            #[cfg(test)]
            ring_peak: AtomicU64::new(0),
            align: if direct { dio_align(fd) } else { NO_ALIGN },
            label,
            mem,
            fixed: None,
        })
    }

    /// True when the backend opened (and will close) the file.
    #[cfg(test)]
    pub(crate) fn owned(&self) -> bool {
        self.owned.as_ref().map(AsRawFd::as_raw_fd) == Some(self.fd)
    }
}

const NO_ALIGN: DioAlign = DioAlign {
    mem: 1,
    offset: 1,
    source: "no O_DIRECT",
};

/// FILE takes regular files and block devices; BLK takes block devices and regular files
/// standing in for them. Directories, pipes, sockets and character devices cannot be addressed
/// by offset and are refused up front instead of failing every transfer.
fn check_kind(mem: MemType, st: &libc::stat, label: &str) -> Result<()> {
    let t = st.st_mode & libc::S_IFMT;
    if t == libc::S_IFREG || t == libc::S_IFBLK {
        return Ok(());
    }
    let what = match t {
        libc::S_IFDIR => "a directory",
        libc::S_IFCHR => "a character device",
        libc::S_IFIFO => "a pipe",
        libc::S_IFSOCK => "a socket",
        _ => "not a regular file",
    };
    Err(Error::invalid_param(format!(
        "{mem} registration: {label} is {what}; POSIX needs a regular file or a block device"
    ))
    .with_mem(mem))
}

fn proc_fd_path(fd: RawFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.display().to_string())
}

/// `query_mem` for one path: `{"size","mode","mtime"}`, or `None` when it does not exist.
pub(crate) fn query(path: &Path) -> Result<Option<Params>> {
    let c = cstring(path)?;
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    if unsafe { libc::stat(c.as_ptr(), &mut st) } != 0 {
        let e = errno();
        return match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Ok(None),
            _ => Err(Error::from_io(
                ErrorKind::Backend,
                format!("POSIX cannot stat {}", path.display()),
                &e,
            )),
        };
    }
    let mut size = st.st_size.max(0) as u64;
    if is_blk(&st) {
        // A block device's st_size is 0: ask the device.
        // SAFETY: `c` is NUL-terminated; the flags are valid.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: `fd` was just opened and is owned here.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Ok(n) = file_size(owned.as_raw_fd()) {
                size = n;
            }
        }
    }
    let mut p = Params::new();
    p.insert("size".into(), size.to_string());
    p.insert("mode".into(), st.st_mode.to_string());
    p.insert("mtime".into(), st.st_mtime.to_string());
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta;

    /// A path in the temp dir, unique to this process; removed on drop.
    struct Tmp(std::path::PathBuf);

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn tmp(name: &str) -> Tmp {
        Tmp(std::env::temp_dir().join(format!("rixl-posix-region-{}-{name}", std::process::id())))
    }

    #[test]
    fn open_create_and_close() {
        let t = tmp("open.bin");
        let p = &t.0;
        let _ = std::fs::remove_file(p);
        let s = format!("rw,create:{}", p.display());
        let r = Region::open(MemType::File, &meta::parse(s.as_bytes()).unwrap()).unwrap();
        assert!(r.owned() && r.writable && r.readable && !r.direct);
        assert!(p.exists());
        let q = query(p).unwrap().unwrap();
        assert_eq!(q["size"], "0");
        let mode: u32 = q["mode"].parse().unwrap();
        assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
        assert_eq!(mode & 0o777, 0o644 & !umask());
        let fd = r.fd;
        drop(r);
        // SAFETY: F_GETFD only queries the (now closed) descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags, -1, "closed on drop");
        std::fs::remove_file(p).unwrap();
        assert!(query(p).unwrap().is_none());
    }

    fn umask() -> u32 {
        // SAFETY: umask only swaps the process's file mode mask; it is set straight back.
        let m = unsafe { libc::umask(0o022) };
        // SAFETY: as above.
        unsafe { libc::umask(m) };
        m as u32
    }

    #[test]
    fn open_failure_names_path_and_errno() {
        let m = meta::parse(b"ro:/nonexistent-dir/x").unwrap();
        let e = Region::open(MemType::File, &m).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x"), "{e}");
        assert_eq!(e.os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn borrowed_fd_flags() {
        let t = tmp("borrow.bin");
        std::fs::write(&t.0, b"abc").unwrap();
        let f = std::fs::File::open(&t.0).unwrap();
        let r = Region::borrow_fd(MemType::File, f.as_raw_fd() as u64, b"").unwrap();
        assert!(!r.owned() && r.readable && !r.writable);
        assert!(r.label.contains("borrow.bin"), "{}", r.label);
        drop(r);
        // SAFETY: F_GETFD only queries the descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags, -1, "a borrowed fd stays open");
        let e = Region::borrow_fd(MemType::File, 999_999, b"").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParam);
        let e = Region::borrow_fd(MemType::File, u64::MAX, b"").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParam);
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let e = Region::borrow_fd(MemType::File, dir.as_raw_fd() as u64, b"").unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn direct_alignment_is_reported() {
        let t = tmp("align.bin");
        let f = std::fs::File::create(&t.0).unwrap();
        let a = dio_align(f.as_raw_fd());
        assert!(
            a.offset.is_power_of_two() && a.mem.is_power_of_two(),
            "{a:?}"
        );
        assert!(a.offset <= 4096, "{a:?}");
    }
}
