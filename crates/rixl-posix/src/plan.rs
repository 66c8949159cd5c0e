//! What a prepared transfer does ([`Plan`]: the I/O operations, split and checked once) and the
//! state of one post of it ([`Post`]: how many operations are left, the first error, whether it
//! was cancelled), shared by both engines.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rixl_core::{CompletionHandle, Error, ErrorKind, Result, XferOp};

use crate::region::{self, Region};

/// One read or write: `len` bytes between DRAM at `buf` and file offset `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub buf: u64,
    pub off: u64,
    pub len: u32,
    /// Index into [`Plan::regions`].
    pub region: u32,
}

/// A prepared transfer: every segment split into [`Chunk`]s of at most `max_io_size` bytes.
#[derive(Debug)]
pub(crate) struct Plan {
    pub op: XferOp,
    pub chunks: Vec<Chunk>,
    /// The file regions the chunks use. Holding them keeps their fds open (and unused by
    /// anything else) for as long as a request built on them exists, even if the caller
    /// deregisters in between.
    pub regions: Vec<Arc<Region>>,
    /// Bytes of all chunks together.
    pub bytes: u64,
}

/// How an inline attempt ([`Plan::run_inline`]) ended.
#[derive(Debug)]
pub(crate) enum Inline {
    /// Every chunk moved.
    Done,
    /// Chunk `i` would block (its data is not in the page cache): it and the ones after it
    /// must run on an engine.
    HandOff(usize),
}

impl Plan {
    pub(crate) fn region(&self, c: &Chunk) -> &Region {
        &self.regions[c.region as usize]
    }

    /// True if some chunk is on an O_DIRECT file.
    pub(crate) fn any_direct(&self) -> bool {
        self.regions.iter().any(|r| r.direct)
    }

    /// True if the posting thread may run this plan itself: only buffered files, and no write
    /// to an O_SYNC file (which would wait for the device).
    pub(crate) fn inline_ok(&self) -> bool {
        !self
            .regions
            .iter()
            .any(|r| r.direct || (self.op == XferOp::Write && r.sync))
    }

    /// True if writes of this plan to `r` gain nothing from running in parallel: buffered
    /// writes to one file take its inode lock for the whole copy (ext4, xfs, btrfs), so a
    /// second thread only waits and adds lock hand-offs. O_DIRECT and O_SYNC writes spend
    /// their time waiting for the device, outside that lock, and do run in parallel.
    pub(crate) fn serial_on(&self, r: &Region) -> bool {
        self.op == XferOp::Write && !r.direct && !r.sync
    }

    fn what(&self) -> &'static str {
        match self.op {
            XferOp::Read => "read",
            XferOp::Write => "write",
        }
    }

    /// An operation failed with an OS error after `done` of its bytes had moved.
    pub(crate) fn io_error(&self, c: &Chunk, done: u64, err: &io::Error) -> Error {
        let r = self.region(c);
        let after = if done > 0 {
            format!(" after {done} bytes")
        } else {
            String::new()
        };
        Error::from_io(
            ErrorKind::Backend,
            format!(
                "POSIX {} of {} bytes at offset {} of {} failed{after}",
                self.what(),
                c.len,
                c.off,
                r.label
            ),
            err,
        )
        .with_backend(crate::NAME)
        .with_mem(r.mem)
        .with_op(self.op)
    }

    /// A read reached the end of the file after `got` bytes.
    pub(crate) fn eof_error(&self, c: &Chunk, got: u64) -> Error {
        let r = self.region(c);
        Error::backend(format!(
            "POSIX read of {} bytes at offset {} of {} returned {got}: end of file (the file \
             ends at offset {})",
            c.len,
            c.off,
            r.label,
            c.off + got
        ))
        .with_backend(crate::NAME)
        .with_mem(r.mem)
        .with_op(self.op)
    }

    /// A write made no progress without reporting an error (never expected from Linux; turned
    /// into an error so that it cannot loop forever).
    pub(crate) fn stalled_write_error(&self, c: &Chunk, done: u64) -> Error {
        let r = self.region(c);
        Error::backend(format!(
            "POSIX write of {} bytes at offset {} of {} wrote nothing after {done} bytes",
            c.len, c.off, r.label
        ))
        .with_backend(crate::NAME)
        .with_mem(r.mem)
        .with_op(self.op)
    }

    /// After a short O_DIRECT read of `done` bytes: is that the end of the file? (A buffered
    /// read is simply retried and returns 0 at the end, but retrying an O_DIRECT read from an
    /// unaligned end-of-file offset fails with EINVAL instead, which would hide the real cause.)
    pub(crate) fn direct_read_hit_eof(&self, c: &Chunk, done: u64) -> bool {
        let r = self.region(c);
        r.direct
            && self.op == XferOp::Read
            && region::file_size(r.fd).is_ok_and(|size| c.off + done >= size)
    }

    /// Runs one chunk with blocking pread/pwrite, resuming after short transfers; stops early
    /// (without error: the post reports why it stopped) once `stop` is set.
    pub(crate) fn run_blocking(&self, c: &Chunk, stop: &AtomicBool) -> Result<()> {
        let r = self.region(c);
        let len = u64::from(c.len);
        let mut done = 0u64;
        while done < len {
            let buf = (c.buf + done) as usize;
            let n = (len - done) as usize;
            let off = (c.off + done) as libc::off_t;
            let res = match self.op {
                // SAFETY: the agent validated `buf..buf+len` against a DRAM registration, whose
                // owner promised (`Agent::register_mem`) that it stays allocated and untouched
                // while a transfer may run; the plan keeps `r.fd` open. Offsets were checked to
                // fit in `off_t` when the plan was built.
                XferOp::Read => unsafe { libc::pread(r.fd, buf as *mut libc::c_void, n, off) },
                // SAFETY: as above; pwrite only reads the buffer.
                XferOp::Write => unsafe { libc::pwrite(r.fd, buf as *const libc::c_void, n, off) },
            };
            if res < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io_error(c, done, &e));
            }
            if res == 0 {
                return Err(match self.op {
                    XferOp::Read => self.eof_error(c, done),
                    XferOp::Write => self.stalled_write_error(c, done),
                });
            }
            done += res as u64;
            if done < len {
                if self.direct_read_hit_eof(c, done) {
                    return Err(self.eof_error(c, done));
                }
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Runs the plan in the calling thread, chunk after chunk, as long as nothing has to wait
    /// for a device: reads use `preadv2(RWF_NOWAIT)`, which copies from the page cache and
    /// returns `EAGAIN` (or a short count) where the data is not cached; the first such chunk
    /// is handed back, to be redone in full by an engine (reading it again is harmless).
    /// Writes are plain `pwrite`s ([`Plan::inline_ok`] keeps O_SYNC files out), which copy
    /// into the page cache. An error fails the whole post, as it would on an engine.
    pub(crate) fn run_inline(&self) -> Result<Inline> {
        static NEVER: AtomicBool = AtomicBool::new(false);
        for (i, c) in self.chunks.iter().enumerate() {
            match self.op {
                XferOp::Write => self.run_blocking(c, &NEVER)?,
                XferOp::Read => {
                    if !self.read_nowait(c) {
                        return Ok(Inline::HandOff(i));
                    }
                }
            }
        }
        Ok(Inline::Done)
    }

    /// Reads chunk `c` with `RWF_NOWAIT`; false if it could not be read without blocking (or
    /// failed: the engine that redoes it reports the error with a blocking read).
    fn read_nowait(&self, c: &Chunk) -> bool {
        let r = self.region(c);
        if !r.nowait.load(Ordering::Relaxed) {
            return false;
        }
        let len = u64::from(c.len);
        let mut done = 0u64;
        while done < len {
            let iov = libc::iovec {
                iov_base: (c.buf + done) as usize as *mut libc::c_void,
                iov_len: (len - done) as usize,
            };
            let off = (c.off + done) as libc::off_t;
            // SAFETY: `iov` describes the unread rest of the chunk's DRAM range, which the
            // agent validated against a registration whose owner keeps it valid and untouched
            // during transfers; the plan keeps `r.fd` open; the offset fits in `off_t`.
            let res = unsafe { libc::preadv2(r.fd, &iov, 1, off, libc::RWF_NOWAIT) };
            if res < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // A kernel or file system without RWF_NOWAIT for buffered reads.
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                        r.nowait.store(false, Ordering::Relaxed);
                        return false;
                    }
                    _ => return false,
                }
            }
            // 0 is the end of the file: the engine's blocking read reports it properly.
            if res == 0 {
                return false;
            }
            done += res as u64;
        }
        true
    }
}

#[derive(Debug, Default)]
struct PostSlow {
    error: Option<Error>,
    cancelled: bool,
    finished: bool,
}

/// One post of a plan, shared by the posting thread and the engine.
///
/// Every chunk from `first` on is accounted exactly once through [`Post::chunks_done`]: when it completed, failed,
/// or was skipped because the post stopped. The call that accounts for the last one must call
/// [`Post::finish`], which reports the result. Nothing of the post is in the kernel or in a
/// worker any more at that point, which is what makes `cancel` (wait for `finish`) fenced.
#[derive(Debug)]
pub(crate) struct Post {
    pub plan: Arc<Plan>,
    /// The first chunk this post runs: 0, or where an inline attempt handed over.
    pub first: usize,
    done: CompletionHandle,
    outstanding: AtomicUsize,
    /// Set on the first error or on cancel: chunks not yet started are skipped.
    stop: AtomicBool,
    slow: Mutex<PostSlow>,
    cv: Condvar,
}

impl Post {
    /// A post of chunks `first..` of `plan`.
    pub(crate) fn new(plan: Arc<Plan>, first: usize, done: CompletionHandle) -> Arc<Post> {
        let n = plan.chunks.len() - first;
        Arc::new(Post {
            plan,
            first,
            done,
            outstanding: AtomicUsize::new(n),
            stop: AtomicBool::new(false),
            slow: Mutex::new(PostSlow::default()),
            cv: Condvar::new(),
        })
    }

    /// True once the post failed or was cancelled: start nothing more of it.
    #[inline]
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The flag engines pass to blocking I/O so it can give up early.
    pub(crate) fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }

    /// Accounts for `n` chunks; `result` is theirs (only the first error of a post is kept).
    /// Returns true when these were the last ones: the caller must then call [`Post::finish`].
    pub(crate) fn chunks_done(&self, n: usize, result: Result<()>) -> bool {
        if n == 0 {
            return false;
        }
        if let Err(e) = result {
            let mut s = self.slow.lock();
            if s.error.is_none() && !s.cancelled {
                s.error = Some(e);
            }
            self.stop.store(true, Ordering::Release);
        }
        self.outstanding.fetch_sub(n, Ordering::AcqRel) == n
    }

    /// Reports the post's result and wakes `cancel` waiters.
    pub(crate) fn finish(&self) {
        let result = {
            let mut s = self.slow.lock();
            s.finished = true;
            self.cv.notify_all();
            if s.cancelled {
                Err(Error::canceled("the transfer was cancelled"))
            } else if let Some(e) = s.error.take() {
                Err(e)
            } else {
                Ok(())
            }
        };
        self.done.complete(result);
    }

    /// Marks the post cancelled. Returns false if it had already finished (nothing to do).
    pub(crate) fn request_cancel(&self) -> bool {
        let mut s = self.slow.lock();
        if s.finished {
            return false;
        }
        s.cancelled = true;
        self.stop.store(true, Ordering::Release);
        true
    }

    /// Blocks until every chunk of the post is accounted for.
    pub(crate) fn wait_finished(&self) {
        let mut s = self.slow.lock();
        while !s.finished {
            self.cv.wait(&mut s);
        }
    }

    /// Whether the post has finished.
    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        self.slow.lock().finished
    }
}
