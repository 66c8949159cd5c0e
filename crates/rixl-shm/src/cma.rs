//! Cross-memory attach: moving segment lists with `process_vm_readv` / `process_vm_writev`.
//!
//! One system call moves up to `IOV_MAX` (1024) segment pairs, so 4 KiB KV pages do not pay a
//! system call each. The kernel may stop early (a fault in one of the ranges); the cursor then
//! resumes from the exact byte where it stopped, and a call that makes no progress is an error.

use rixl_core::{Error, ErrorKind, Result, Segment, XferOp};

/// Most iovecs per call (Linux `UIO_MAXIOV`).
pub(crate) const IOV_MAX: usize = 1024;

/// A position inside a segment list: segment index and byte offset within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// Segment index.
    pub seg: usize,
    /// Offset inside that segment.
    pub off: u64,
}

/// Moves all of `local[..]` ↔ `remote[..]` (equal lengths position by position) with the
/// process `pid`. `keep_going` is consulted before every system call (cancellation).
pub(crate) fn transfer(
    pid: u32,
    op: XferOp,
    local: &[Segment],
    remote: &[Segment],
    keep_going: impl FnMut() -> bool,
) -> Result<()> {
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    // Small requests (the latency-critical ones) use stack arrays; zero-filling two full
    // IOV_MAX arrays would cost more than copying a 4 KiB page.
    if local.len() <= SMALL {
        let mut liov = [empty; SMALL];
        let mut riov = [empty; SMALL];
        return transfer_with(pid, op, local, remote, &mut liov, &mut riov, keep_going);
    }
    let n = local.len().min(IOV_MAX);
    let mut liov = vec![empty; n];
    let mut riov = vec![empty; n];
    transfer_with(pid, op, local, remote, &mut liov, &mut riov, keep_going)
}

/// Segment count up to which iovec arrays live on the stack.
const SMALL: usize = 16;

fn transfer_with(
    pid: u32,
    op: XferOp,
    local: &[Segment],
    remote: &[Segment],
    liov: &mut [libc::iovec],
    riov: &mut [libc::iovec],
    mut keep_going: impl FnMut() -> bool,
) -> Result<()> {
    let max = liov.len();
    let mut cur = Cursor::default();
    while cur.seg < local.len() {
        if !keep_going() {
            return Err(Error::canceled("the transfer was cancelled"));
        }
        let mut n = 0usize;
        let mut expect: u64 = 0;
        let mut i = cur.seg;
        let mut off = cur.off;
        while i < local.len() && n < max {
            let (l, r) = (&local[i], &remote[i]);
            let len = l.len - off;
            liov[n] = libc::iovec {
                iov_base: (l.addr + off) as usize as *mut libc::c_void,
                iov_len: len as usize,
            };
            riov[n] = libc::iovec {
                iov_base: (r.addr + off) as usize as *mut libc::c_void,
                iov_len: len as usize,
            };
            expect += len;
            n += 1;
            i += 1;
            off = 0;
        }
        // SAFETY: the local iovecs describe memory this process registered (the caller of
        // `Agent::register_mem` guarantees it stays valid and untouched during the transfer);
        // the remote iovecs are only dereferenced by the kernel in the target process, which
        // checks them and fails with EFAULT rather than touching anything else.
        let done = unsafe {
            match op {
                XferOp::Write => libc::process_vm_writev(
                    pid as libc::pid_t,
                    liov.as_ptr(),
                    n as libc::c_ulong,
                    riov.as_ptr(),
                    n as libc::c_ulong,
                    0,
                ),
                XferOp::Read => libc::process_vm_readv(
                    pid as libc::pid_t,
                    liov.as_ptr(),
                    n as libc::c_ulong,
                    riov.as_ptr(),
                    n as libc::c_ulong,
                    0,
                ),
            }
        };
        if done < 0 {
            let err = std::io::Error::last_os_error();
            return Err(os_error(pid, op, &err));
        }
        let done = done as u64;
        if done == 0 {
            return Err(Error::backend(format!(
                "process_vm_{} with process {pid} made no progress at segment {} (+{})",
                if op == XferOp::Write {
                    "writev"
                } else {
                    "readv"
                },
                cur.seg,
                cur.off
            )));
        }
        if done == expect {
            cur = Cursor { seg: i, off: 0 };
        } else {
            advance(local, &mut cur, done);
        }
    }
    Ok(())
}

fn advance(segs: &[Segment], cur: &mut Cursor, mut bytes: u64) {
    while bytes > 0 && cur.seg < segs.len() {
        let left = segs[cur.seg].len - cur.off;
        if bytes >= left {
            bytes -= left;
            cur.seg += 1;
            cur.off = 0;
        } else {
            cur.off += bytes;
            bytes = 0;
        }
    }
}

/// Maps an errno from `process_vm_*` to an error that says what to do.
pub(crate) fn os_error(pid: u32, op: XferOp, err: &std::io::Error) -> Error {
    let errno = err.raw_os_error().unwrap_or(0);
    let (kind, msg) = match errno {
        libc::ESRCH => (
            ErrorKind::RemoteDisconnect,
            format!("process {pid} no longer exists"),
        ),
        libc::EPERM => (
            ErrorKind::Backend,
            format!(
                "the kernel refused access to process {pid} (process_vm_{}: EPERM). Both agents must \
                 run as the same user (or this one as root), and ptrace access must be allowed: \
                 check /proc/sys/kernel/yama/ptrace_scope (0 or 1 with a same-user peer) and \
                 container seccomp / CAP_SYS_PTRACE settings",
                if op == XferOp::Write { "writev" } else { "readv" }
            ),
        ),
        libc::EFAULT => (
            ErrorKind::Backend,
            format!(
                "an address is not mapped (in this process or in process {pid}): registered memory \
                 was freed while still registered"
            ),
        ),
        _ => (ErrorKind::Backend, format!("cross-process copy with process {pid} failed")),
    };
    Error::from_io(kind, msg, err).with_op(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_many_segments_within_own_process() {
        let src: Vec<u8> = (0..3000 * 64).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; 3000 * 64];
        // 3000 segments of 61 bytes spaced 64 apart: more than IOV_MAX per call.
        let seg = |base: u64, i: u64| Segment {
            addr: base + i * 64,
            len: 61,
            dev: 0,
            token: 0,
        };
        let local: Vec<Segment> = (0..3000).map(|i| seg(src.as_ptr() as u64, i)).collect();
        let remote: Vec<Segment> = (0..3000).map(|i| seg(dst.as_mut_ptr() as u64, i)).collect();
        transfer(std::process::id(), XferOp::Write, &local, &remote, || true).unwrap();
        for i in 0..3000 {
            assert_eq!(src[i * 64..i * 64 + 61], dst[i * 64..i * 64 + 61]);
            assert_eq!(&dst[i * 64 + 61..i * 64 + 64], &[0, 0, 0]);
        }
        dst.fill(0);
        // READ with dst as the local side pulls the same bytes back.
        transfer(std::process::id(), XferOp::Read, &remote, &local, || true).unwrap();
        assert_eq!(
            src[64 * 2999..64 * 2999 + 61],
            dst[64 * 2999..64 * 2999 + 61]
        );
        let e = transfer(std::process::id(), XferOp::Write, &local, &remote, || false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Canceled);
    }

    #[test]
    fn advance_resumes_mid_segment() {
        let segs = [
            Segment {
                addr: 0,
                len: 10,
                dev: 0,
                token: 0,
            },
            Segment {
                addr: 0,
                len: 5,
                dev: 0,
                token: 0,
            },
        ];
        let mut c = Cursor::default();
        advance(&segs, &mut c, 12);
        assert_eq!(c, Cursor { seg: 1, off: 2 });
        advance(&segs, &mut c, 3);
        assert_eq!(c, Cursor { seg: 2, off: 0 });
    }

    #[test]
    fn dead_pid_is_remote_disconnect() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let b = [0u8; 8];
        let mut d = [0u8; 8];
        let l = [Segment {
            addr: b.as_ptr() as u64,
            len: 8,
            dev: 0,
            token: 0,
        }];
        let r = [Segment {
            addr: d.as_mut_ptr() as u64,
            len: 8,
            dev: 0,
            token: 0,
        }];
        let e = transfer(pid, XferOp::Write, &l, &r, || true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RemoteDisconnect, "{e}");
    }
}
