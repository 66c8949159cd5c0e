//! A memory arena that a peer process maps at the same addresses.
//!
//! The conformance cases describe the target's memory with the test process's own
//! [`TestBuffer`](crate::TestBuffer)s: they register `dst` on the target, write into
//! `dst.whole()` and then check `dst`'s bytes. To run the same cases with the target agent in
//! another process, that process must see those very bytes at those very addresses. The arena
//! makes that true: a sparse `memfd` mapped shared in the test process, inherited by every peer
//! process it spawns, and mapped there at the same address (`MAP_FIXED_NOREPLACE`, so a clash is
//! an error, never a silent overwrite). Once installed, every new `TestBuffer` of the process is
//! carved out of it.
//!
//! Allocation is a bump pointer (buffers are never reused, so a late write by a buggy backend
//! cannot land in a later case's buffer); freeing punches a hole so the memory goes back to the
//! kernel. The mapping is virtual address space only until pages are touched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Virtual size of the arena: far more than all buffers of one test binary together.
const ARENA_LEN: u64 = 256 << 30;
/// First address tried for the arena (16 TiB): see `Arena::create`.
const ARENA_BASE: u64 = 16 << 40;
/// Buffer alignment inside the arena.
const ALIGN: u64 = 4096;
/// Environment variable that hands the arena to a peer process: `fd,addr,len`.
pub(crate) const ARENA_ENV: &str = "RIXL_TESTKIT_ARENA";

/// The process's arena, once installed.
pub(crate) struct Arena {
    fd: i32,
    base: u64,
    len: u64,
    next: AtomicU64,
}

static ARENA: OnceLock<Arena> = OnceLock::new();

/// The arena if one is installed (then new test buffers come from it).
pub(crate) fn get() -> Option<&'static Arena> {
    ARENA.get()
}

/// Creates and installs the arena in this (test) process, once. Peer processes get it through
/// [`Arena::env`] and [`attach_from_env`].
pub(crate) fn install() -> &'static Arena {
    ARENA.get_or_init(|| Arena::create().unwrap_or_else(|e| panic!("test arena: {e}")))
}

/// Maps the parent's arena at the same address, if [`ARENA_ENV`] is set; returns whether it
/// did. The mapping lives as long as the process. It is not installed as this process's
/// allocator: the parent owns the arena's free space, and a peer allocating from it would hand
/// out the parent's buffers again.
pub(crate) fn attach_from_env() -> Result<bool, String> {
    let Ok(spec) = std::env::var(ARENA_ENV) else {
        return Ok(false);
    };
    let parts: Vec<u64> = spec
        .split(',')
        .map(|s| s.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad {ARENA_ENV}={spec:?}"))?;
    let [fd, base, len] = parts[..] else {
        return Err(format!("bad {ARENA_ENV}={spec:?}: expected fd,addr,len"));
    };
    let fd = i32::try_from(fd).map_err(|_| format!("bad fd in {ARENA_ENV}"))?;
    Arena::map(fd, base, len)?;
    Ok(true)
}

impl Arena {
    fn create() -> Result<Arena, String> {
        // SAFETY: memfd_create only reads the NUL-terminated name; no CLOEXEC, on purpose, so
        // that spawned peer processes inherit the descriptor.
        let fd = unsafe { libc::memfd_create(c"rixl-testkit-arena".as_ptr(), 0) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: plain system call on the descriptor just created.
        if unsafe { libc::ftruncate(fd, ARENA_LEN as libc::off_t) } != 0 {
            return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
        }
        // Where the kernel would put the mapping (just below the libraries) is where a peer's
        // own libraries, heap mappings and thread stacks land too, at addresses that ASLR moves
        // by up to a TiB: a peer could not map the arena there. So take a fixed slot far below
        // that area and far above the program and its brk heap.
        let mut last = String::new();
        for slot in 0..8u64 {
            match Arena::map(fd, ARENA_BASE + slot * (1 << 40), ARENA_LEN) {
                Ok(a) => return Ok(a),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Maps `len` bytes of `fd` at exactly `at`.
    fn map(fd: i32, at: u64, len: u64) -> Result<Arena, String> {
        // SAFETY: a new shared mapping of the memfd; with MAP_FIXED_NOREPLACE the kernel refuses
        // (EEXIST) rather than replace anything already mapped at `hint`.
        let p = unsafe {
            libc::mmap(
                at as usize as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of the arena at {at:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let base = p as usize as u64;
        if base != at {
            return Err(format!(
                "the kernel mapped the arena at {base:#x}, not at {at:#x} (kernel < 4.17?)"
            ));
        }
        Ok(Arena {
            fd,
            base,
            len,
            next: AtomicU64::new(0),
        })
    }

    /// The value of [`ARENA_ENV`] that lets a child map this arena.
    pub(crate) fn env(&self) -> String {
        format!("{},{},{}", self.fd, self.base, self.len)
    }

    /// `len` fresh, zeroed, 4096-aligned bytes.
    pub(crate) fn alloc(&self, len: usize) -> *mut u8 {
        let rounded = (len as u64).div_ceil(ALIGN) * ALIGN;
        let off = self.next.fetch_add(rounded, Ordering::Relaxed);
        assert!(
            off + rounded <= self.len,
            "the test arena ({} GiB) is exhausted",
            self.len >> 30
        );
        (self.base + off) as usize as *mut u8
    }

    /// Gives the pages of a buffer back to the kernel. The range is never handed out again.
    pub(crate) fn free(&self, ptr: *mut u8, len: usize) {
        let off = ptr as usize as u64 - self.base;
        let rounded = (len as u64).div_ceil(ALIGN) * ALIGN;
        // SAFETY: fallocate on our own memfd, over a range this arena handed out; punching a
        // hole only drops page contents (reads see zeros), it never unmaps anything.
        unsafe {
            libc::fallocate(
                self.fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                rounded as libc::off_t,
            );
        }
    }

    /// True when `ptr` lies in the arena.
    pub(crate) fn contains(&self, ptr: *const u8) -> bool {
        let p = ptr as usize as u64;
        p >= self.base && p < self.base + self.len
    }
}
