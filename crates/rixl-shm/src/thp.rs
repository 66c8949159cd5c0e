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
//! target. The call preserves contents and is best effort: an older kernel, THP disabled,
//! memory that cannot be collapsed (shared mappings, `MADV_NOHUGEPAGE`) or no free huge pages
//! leave the memory as it was. Parameter `huge_pages=off` skips it.
//!
//! Collapsing copies every 4 KiB-backed page once and may compact memory to find free huge
//! pages: 2.5 s of one core per GiB here (memory already on huge pages costs nothing). So
//! registering a large host KV pool must not wait for it: ranges go to one background thread
//! at the lowest CPU priority (nice 19), which collapses them 64 MiB at a time, and transfers
//! meanwhile simply run at 4 KiB-page speed. A range
//! deregistered or unmapped before its turn is harmless: the kernel refuses unmapped ranges,
//! and collapsing memory that was mapped again in its place changes nothing but its backing.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

/// Huge page size on x86-64 and arm64 with 4 KiB base pages.
const HUGE: u64 = 2 << 20;

/// Bytes per `madvise` call of the background thread.
const STEP: u64 = 64 << 20;

/// The 2 MiB-aligned part of `[addr, addr + len)`, if any.
pub(crate) fn aligned_interior(addr: u64, len: u64) -> Option<(u64, u64)> {
    let start = addr.checked_add(HUGE - 1)? & !(HUGE - 1);
    let end = addr.checked_add(len)? & !(HUGE - 1);
    (end > start).then(|| (start, end - start))
}

/// Asks the kernel to collapse the aligned interior of `[addr, addr + len)` into huge pages,
/// now. Returns how many bytes it covered, or the kernel's refusal.
pub(crate) fn collapse(addr: u64, len: u64) -> std::io::Result<u64> {
    let Some((start, bytes)) = aligned_interior(addr, len) else {
        return Ok(0);
    };
    // SAFETY: MADV_COLLAPSE only changes how the pages of a range are backed, never their
    // contents or permissions, and the kernel validates the range (unmapped parts give
    // ENOMEM), so no range can make it touch memory unsafely.
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

/// Queues `[addr, addr + len)` for the background thread (started on first use).
pub(crate) fn collapse_later(addr: u64, len: u64) {
    static QUEUE: Mutex<Option<Sender<(u64, u64)>>> = Mutex::new(None);
    if aligned_interior(addr, len).is_none() {
        return;
    }
    let mut q = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    if q.is_none() {
        let (tx, rx) = channel::<(u64, u64)>();
        let spawned = std::thread::Builder::new()
            .name("rixl-shm-thp".into())
            .spawn(move || {
                // SAFETY: setpriority on this thread's own id (Linux nice values are per
                // thread) only lowers its CPU priority; failure is harmless.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                }
                for (addr, len) in rx {
                    collapse_in_steps(addr, len);
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("SHM: no huge-page thread ({e}); registered memory stays as it is");
            return;
        }
        *q = Some(tx);
    }
    if let Some(tx) = q.as_ref() {
        let _ = tx.send((addr, len));
    }
}

fn collapse_in_steps(addr: u64, len: u64) {
    let Some((start, bytes)) = aligned_interior(addr, len) else {
        return;
    };
    let mut done = 0;
    while done < bytes {
        let step = STEP.min(bytes - done);
        if let Err(e) = collapse(start + done, step) {
            // Typically the same answer for the rest of the region (no THP, a shared
            // mapping, freed memory): stop here.
            tracing::debug!(
                "SHM: huge pages for {len} bytes at {addr:#x} refused at +{done} ({e}); \
                 transfers into the rest pin 4 KiB pages"
            );
            return;
        }
        done += step;
    }
    tracing::debug!("SHM: {bytes} bytes at {start:#x} now on huge pages");
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

    /// A private anonymous mapping filled with a pattern, unmapped on drop.
    struct Mapping(*mut u8, usize);

    impl Mapping {
        fn new(len: usize) -> Mapping {
            // SAFETY: a fresh private anonymous mapping of `len` bytes, unmapped on drop.
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
            let mut m = Mapping(p as *mut u8, len);
            for (i, b) in m.bytes_mut().iter_mut().enumerate() {
                *b = (i * 7 % 251) as u8;
            }
            m
        }

        fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is `self.1` bytes, readable and writable, owned by `self`.
            unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
        }

        fn intact(&mut self) -> bool {
            self.bytes_mut()
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i * 7 % 251) as u8)
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps the mapping made in `new`; nothing refers to it afterwards.
            unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
        }
    }

    #[test]
    fn collapse_keeps_contents() {
        let mut m = Mapping::new(8 * HUGE as usize);
        match collapse(m.0 as u64 + 16, m.1 as u64 - 32) {
            Ok(n) => assert!(n >= 6 * HUGE, "collapsed {n} bytes"),
            Err(e) => eprintln!("skip the size check: this kernel refused MADV_COLLAPSE: {e}"),
        }
        assert!(m.intact(), "contents changed");
    }

    /// Bytes of `[addr, addr + len)`'s mappings on huge pages, from /proc/self/smaps.
    fn huge_bytes(addr: u64, len: u64) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
                {
                    inside = lo < addr + len && hi > addr;
                    continue;
                }
            }
            if inside && first == "AnonHugePages:" {
                let kb: u64 = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap();
                total += kb * 1024;
            }
        }
        total
    }

    #[test]
    fn background_collapse_keeps_contents_and_survives_unmapped_ranges() {
        let probe = Mapping::new(4 * HUGE as usize);
        let kernel_collapses = collapse(probe.0 as u64, probe.1 as u64).is_ok();
        // A range nobody maps first: the thread must log it and go on with the next.
        collapse_later(0x10_0000_0000, 4 * HUGE);
        let mut m = Mapping::new(8 * HUGE as usize);
        collapse_later(m.0 as u64, m.1 as u64);
        if kernel_collapses {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while huge_bytes(m.0 as u64, m.1 as u64) < 6 * HUGE {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the background thread did not collapse the region"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        } else {
            eprintln!("skip the huge-page check: this kernel refuses MADV_COLLAPSE");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(m.intact(), "contents changed");
    }
}
