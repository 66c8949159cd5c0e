//! Transparent huge pages for registered memory.
//!
//! `process_vm_readv` / `process_vm_writev` pin the *peer's* pages for every call, one page at a
//! time. When the peer's registered memory sits on 4 KiB pages that bookkeeping dominates: on
//! the machines RIXL is measured on, one 1 MiB call moves 13.6 GB/s into 4 KiB pages and
//! 26.8 GB/s into 2 MiB pages, and a 64 KiB call takes 5.7 against 3.3 µs. Which one a
//! process gets is luck: THP in `madvise` mode, the allocator, fragmentation, whether the
//! buffer was touched after a `fork` (copy-on-write splits huge pages).
//!
//! So each agent asks the kernel to back the 2 MiB-aligned interior of every DRAM region it
//! registers with huge pages (`MADV_COLLAPSE`, Linux 6.1+), since any agent may be a peer's
//! target. The call preserves contents, is synchronous (about the cost of copying the region
//! once, paid at registration, not per transfer) and best effort: an older kernel, THP
//! disabled, memory that cannot be collapsed (shared mappings, `MADV_NOHUGEPAGE`) or no free
//! huge pages leave the memory as it was. Parameter `huge_pages=off` skips it.

/// Huge page size on x86-64 and arm64 with 4 KiB base pages.
const HUGE: u64 = 2 << 20;

/// The 2 MiB-aligned part of `[addr, addr + len)`, if any.
pub fn aligned_interior(addr: u64, len: u64) -> Option<(u64, u64)> {
    let start = addr.checked_add(HUGE - 1)? & !(HUGE - 1);
    let end = addr.checked_add(len)? & !(HUGE - 1);
    (end > start).then(|| (start, end - start))
}

/// Asks the kernel to collapse the aligned interior of `[addr, addr + len)` into huge pages.
/// Returns how many bytes it covered, or the kernel's refusal (callers only log it).
pub fn collapse(addr: u64, len: u64) -> std::io::Result<u64> {
    let Some((start, bytes)) = aligned_interior(addr, len) else {
        return Ok(0);
    };
    // SAFETY: MADV_COLLAPSE only changes how the pages of a range are backed, never their
    // contents or permissions, and the kernel validates the range (unmapped parts give
    // ENOMEM). The range lies inside memory the caller registered and keeps mapped.
    let r = unsafe {
        libc::madvise(
            start as usize as *mut libc::c_void,
            bytes as usize,
            libc::MADV_COLLAPSE,
        )
    };
    if r == 0 {
        Ok(bytes)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interior_is_the_aligned_part_only() {
        assert_eq!(aligned_interior(0, HUGE), Some((0, HUGE)));
        assert_eq!(aligned_interior(16, HUGE), None);
        assert_eq!(aligned_interior(16, 3 * HUGE), Some((HUGE, 2 * HUGE)));
        assert_eq!(aligned_interior(HUGE - 1, HUGE + 1), Some((HUGE, HUGE)));
        assert_eq!(aligned_interior(4096, 4096), None);
        assert_eq!(aligned_interior(u64::MAX - 10, 100), None);
    }

    #[test]
    fn collapse_keeps_contents() {
        let len = 8 * HUGE as usize;
        // SAFETY: a fresh private anonymous mapping of `len` bytes, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping above is `len` bytes, readable and writable, and ours alone.
        let buf = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        match collapse(p as u64 + 16, len as u64 - 32) {
            Ok(n) => assert!(n >= 6 * HUGE, "collapsed {n} bytes"),
            Err(e) => eprintln!("skip the size check: this kernel refused MADV_COLLAPSE: {e}"),
        }
        assert!(
            buf.iter()
                .enumerate()
                .all(|(i, b)| *b == (i * 7 % 251) as u8),
            "contents changed"
        );
        // SAFETY: unmaps the mapping made above; `buf` is not used afterwards.
        unsafe { libc::munmap(p, len) };
    }
}
