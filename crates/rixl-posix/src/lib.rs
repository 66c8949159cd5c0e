//! # rixl-posix: the `POSIX` storage backend
//!
//! Moves bytes between registered host memory (DRAM) and files or block devices (FILE, BLK)
//! of the agent's own machine. It is a local-only backend, like NIXL's `POSIX` plugin: a
//! transfer targets the agent itself, its "remote" descriptors are file offsets
//! (`addr` = offset, `dev` = the registration's key), WRITE stores DRAM into the file and READ
//! loads file bytes into DRAM. Capabilities: local, not remote, no notifications.
//!
//! ## Registrations
//!
//! - **DRAM**: accepted as a token; the agent already validated the range.
//! - **FILE / BLK, fd mode** (NIXL's default): `dev` is an open file descriptor owned by the
//!   caller, who keeps it open while it is registered. Its access mode (`O_RDONLY`, `O_WRONLY`,
//!   `O_RDWR`) and `O_DIRECT` / `O_APPEND` flags are read with `fcntl(F_GETFL)` (WRITEs to an
//!   `O_APPEND` descriptor are refused: Linux would append them regardless of their offset).
//! - **FILE / BLK, path mode**: the meta bytes are `"<ro|rw>[,direct][,sync][,noatime][,create]:<path>"`.
//!   The backend opens the path at registration (`O_RDONLY`/`O_RDWR` plus
//!   `O_DIRECT`/`O_SYNC`/`O_NOATIME`/`O_CREAT`, mode 0644) and closes it when the registration
//!   is gone; `dev` is only the key that transfer descriptors use. Meta bytes that do not parse
//!   exactly mean fd mode (a plain path there is fine: NIXL programs pass one for queries).
//!   An open failure fails the registration with the path and the OS error.
//! - A registration of length 0 covers the whole file (the agent treats it as unbounded).
//!
//! Requests hold the file regions they use, so a file stays open until the last request built
//! on it is dropped, even if it is deregistered first (the agent then refuses to post such a
//! request, and no fd number can be reused under an in-flight operation).
//!
//! ## Transfers
//!
//! A prepared transfer is checked once, when the request is made (DRAM ↔ FILE/BLK only, else
//! `NotSupported`; WRITE needs a writable file and READ a readable one, else `NotAllowed` —
//! NIXL only fails such a request at post time, with `NIXL_ERR_BACKEND`; O_DIRECT alignment,
//! else `InvalidParam` naming the misaligned value and the alignment O_DIRECT needs) and split
//! into operations of at most `max_io_size` bytes (16 MiB).
//! A post hands every operation to the engine at once and returns `InProgress`; the engine's
//! own thread calls `complete` when the last operation finished, with the first error if any.
//! Under `engine=auto`, a small post on buffered files runs in the posting thread instead and
//! returns `Done` (or its error) — see "Engines".
//! Overlapping writes of one post to one buffered file land in descriptor order (the last
//! wins) under `engine=auto` and `threads`, when they are consecutive in the post; otherwise,
//! and always under io_uring, their order is unspecified, as in NIXL.
//! Short reads and writes are resumed where they stopped; a read that reaches the end of the
//! file fails (`Backend`, as in NIXL) with "read of N bytes at offset X of F returned M: end of
//! file". OS errors
//! (ENOSPC, EIO, ...) fail the post with a `Backend` error naming the file and offset and
//! carrying the errno; other posts, the backend and the agent stay usable.
//!
//! Cancelling (or dropping) a request with a post in flight is fenced: operations not started
//! are dropped, those in the kernel are cancelled or waited for, and only then does `cancel`
//! return, so no byte of that post is written afterwards.
//!
//! ## Engines
//!
//! - `io_uring`: one ring and one thread per backend (the `uring` module explains the design):
//!   batched submission, `kernel_queue_size` operations in flight, and at most
//!   `file_inflight_bytes` of O_DIRECT operations in flight per file; registered files; the
//!   thread blocks in `io_uring_enter` until a completion or a new post arrives.
//! - `threads`: worker threads doing `pread`/`pwrite` (the `threads` module explains how they
//!   share a post's operations).
//! - `auto` (the default): O_DIRECT files on io_uring, buffered files on the thread pool, and
//!   buffered posts of at most `inline_max_bytes` in the posting thread. When io_uring cannot
//!   be set up (ENOSYS under seccomp, `kernel.io_uring_disabled`, an old kernel) everything
//!   runs on the thread pool; the fallback is logged with the reason and reported in
//!   `params()["engine_fallback_reason"]`.
//!
//! `params()` reports what runs: `engine` (`io_uring`, `threads`, or `io_uring+threads` for
//! `auto` with io_uring), `engine_direct` and `engine_buffered` (the engine for each kind of
//! file) and `inline_max_bytes` (0 when nothing runs inline).
//!
//! Why `auto` splits the work: the two kinds of I/O are limited by different things.
//!
//! - **O_DIRECT** waits for the device. What matters is the number of operations in flight
//!   per CPU spent, which is io_uring's strength (4 KiB random reads, 128 per post, on the
//!   project's 2-core VM: ~77k IOPS, against ~81k for fio submitting and reaping 128 at a time
//!   and ~38k for the thread pool, whose workers have one operation each). Large sequential
//!   operations are the opposite case: a post of 64 × 16 MiB puts 1 GiB in the device's queue
//!   at once, far more than its 128 tags hold, and everything posted after it waits behind it.
//!   A per-file budget of bytes in flight (`file_inflight_bytes`, 256 MiB: 16 × 16 MiB or
//!   256 × 1 MiB) bounds that without starving the device, and never limits small random
//!   reads (the `uring` module has the measurements).
//! - **Buffered** I/O is a CPU copy between the buffer and the page cache, done by whichever
//!   thread issues the call. io_uring adds work here and no parallelism where it would count:
//!   a buffered write on ext4 cannot be issued without blocking, so io_uring hands every one to
//!   an `io-wq` worker, and serialises the workers of one file (the kernel takes the inode lock
//!   for the whole copy anyway) — one worker copying plus a completion wake-up of the ring
//!   thread per operation; buffered reads from the cache are copied by the ring thread itself
//!   (or by io-wq workers when punted). The thread pool lets one worker write a file's run of
//!   operations in order (the fastest the kernel allows: one copying core), and spreads
//!   cached reads over all cores (on 2 cores ~1.3x one core). See the comparison with NIXL
//!   in `bench/nixl_posix_compare.py`. One copying core is the ceiling for buffered writes to
//!   one file, whoever issues them: a C loop of 1 MiB `pwrite`s, one `pwritev` of 1024 iovecs
//!   per GiB, ascending or descending offsets, inline in the posting thread or on a worker
//!   all measured the same here (8.5–10 GB/s, within the VM's run-to-run noise), so the pool
//!   issues one plain `pwrite` per chunk.
//! - **Small buffered posts** cost more to hand over than to copy: a 4 KiB read is ~1 µs of
//!   copying against ~6 µs (thread pool) or ~8 µs (io_uring) from post to completion, mostly
//!   a thread wake-up on each side. Up to `inline_max_bytes` (512 KiB: where the pool's
//!   parallel copy on 2 cores starts to pay for its hand-offs) the posting thread does the
//!   I/O itself, as NIXL's default libaio queue does for buffered files (Linux AIO on a
//!   buffered file copies inside `io_submit`). It must not block there on a device: reads use
//!   `preadv2(RWF_NOWAIT)`, which only copies what the page cache holds, and the first chunk
//!   that would wait goes, with the rest, to the thread pool (the post then returns
//!   `InProgress`); writes to O_SYNC files never run inline. A plain buffered write can still
//!   sleep briefly in the kernel (dirty-page throttling, memory reclaim), as with NIXL.
//!
//! Keep DRAM buffers page-aligned for buffered I/O: on AMD EPYC hosts the kernel's copy into a
//! buffer that starts a few bytes past a page boundary (what `malloc` returns for large
//! blocks) runs about 4x slower than into an aligned one.
//!
//! ## Parameters
//!
//! | Parameter | Default | Values | What it does |
//! |---|---|---|---|
//! | `engine` | `auto` | one of auto, io_uring, uring, threads, thread_pool, io_uring+threads | `auto`: O_DIRECT on io_uring, buffered on the thread pool, small buffered posts inline; all on the thread pool without io_uring. `io_uring`: everything on io_uring, or a creation error. `threads`: everything on the thread pool. (`io_uring+threads`, what `params()` reports for `auto`, means `auto`.) |
//! | `use_uring` | `false` | a boolean (true/false, yes/no, on/off, 1/0) | NIXL's name: same as `engine=io_uring`. |
//! | `use_aio` | `false` | a boolean (true/false, yes/no, on/off, 1/0) | NIXL's libaio queue, which is asynchronous for O_DIRECT and copies inside `io_submit` for buffered files; `engine=auto` does the same with io_uring and inline posts. |
//! | `use_posix_aio` | `false` | a boolean (true/false, yes/no, on/off, 1/0) | NIXL's POSIX AIO queue; glibc implements it with threads doing pread/pwrite, so this means `engine=threads`. |
//! | `ios_pool_size` | `65536` | an integer in 1..=4294967296 | Most I/O operations one post may need (as NIXL's I/O pool, a larger request is refused with `InvalidParam`). |
//! | `kernel_queue_size` | `256` | an integer in 1..=32768 | io_uring: data operations in flight (the ring is sized from it). |
//! | `num_threads` | `0` | an integer in 0..=1024 | Workers of the thread-pool engine; 0 = auto: 2 per core, 4–32. |
//! | `max_io_size` | `16777216` | an integer in 4096..=1073741824 | Largest single read or write (a multiple of 4096); larger segments are split. |
//! | `inline_max_bytes` | `524288` | an integer in 0..=1073741824 | `engine=auto`: buffered posts of at most this many bytes, and at most one operation per 4 KiB of it (128), start in the posting thread; 0 turns that off. |
//! | `file_inflight_bytes` | `268435456` | an integer in 0..=1099511627776 | io_uring: most bytes of O_DIRECT operations in flight per registered file (one operation always may start, so a larger one still runs); 0 = no limit. Other files' posts go ahead while one file is at its budget. |
//! | `engine_fallback_reason` | (empty) | reported only (any value is ignored) | Why `auto` fell back to the thread pool, when it did. |
//! | `engine_direct` | (empty) | reported only (any value is ignored) | The engine running O_DIRECT posts. |
//! | `engine_buffered` | (empty) | reported only (any value is ignored) | The engine running buffered posts. |
//!
//! `params()` adds `engine_direct`, `engine_buffered` and, after a fallback,
//! `engine_fallback_reason`; these are accepted back (and ignored) so that a backend's
//! effective parameters can create another one.
//!
//! At most one of the three `use_*` flags may be true, and it must agree with `engine`.
//!
//! ## `query_mem`
//!
//! For each descriptor whose meta names a path (a plain path, or a path-mode string whose prefix
//! is stripped, which NIXL does not do): `{"size", "mode", "mtime"}` (mode = `st_mode` in
//! decimal, mtime in epoch seconds, size of a block device from the device), or `None` if it
//! does not exist or the meta is empty. Other `stat` failures (EACCES, ELOOP) are errors.

#![warn(missing_docs)]
#![warn(unreachable_pub)]

mod engine;
mod meta;
mod params;
mod plan;
mod region;
mod threads;
mod uring;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rixl_backend::{
    Backend, BackendContext, BackendFactory, BackendXfer, LocalRegion, PostOutcome, XferSpec,
};
use rixl_core::{Capabilities, CompletionHandle, Error, MemType, Params, RegDesc, Result, XferOp};

use crate::engine::Engine;
use crate::params::{Config, EngineChoice};
use crate::plan::{Chunk, Inline, Plan, Post};
use crate::region::Region;

/// The backend's name.
pub const NAME: &str = "POSIX";

/// `params()["engine"]` of `engine=auto` when io_uring is available.
pub const AUTO_LABEL: &str = "io_uring+threads";

const MEMS: &[MemType] = &[MemType::Dram, MemType::File, MemType::Blk];

/// Registry entry: how the agent creates `POSIX`.
pub const FACTORY: BackendFactory = BackendFactory::new(NAME, params::PARAMS, capabilities, create);

/// What POSIX does, stated once: DRAM to and from files and block devices of its own agent.
/// It registers DRAM too, as the source and destination of its I/O, but never moves DRAM to
/// DRAM, so the agent does not pick it for that.
fn capabilities() -> Capabilities {
    Capabilities::new(MEMS)
        .moving(MemType::Dram, MemType::File)
        .moving(MemType::Dram, MemType::Blk)
        .local()
        .query_mem()
}

fn create(ctx: BackendContext) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(Posix::new(ctx.params().values())?))
}

/// The `POSIX` backend. See the crate documentation.
#[derive(Debug)]
pub(crate) struct Posix {
    cfg: Config,
    params: Params,
    /// Runs posts that touch an O_DIRECT file.
    direct: Arc<dyn Engine>,
    /// Runs posts on buffered files only.
    buffered: Arc<dyn Engine>,
    /// Posts on buffered files of at most this many bytes start in the posting thread
    /// (`engine=auto` only; 0 = never).
    inline_max: u64,
    regions: RwLock<HashMap<u64, Arc<Region>>>,
    next_token: AtomicU64,
}

impl Posix {
    /// Creates the backend from its parameters (see the crate documentation).
    pub(crate) fn new(given: &Params) -> Result<Posix> {
        let mut params: Params = rixl_backend::defaults(params::PARAMS);
        params.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
        let cfg = Config::from_params(&params)?;
        let threads = |cfg: &Config| -> Result<Arc<dyn Engine>> {
            Ok(Arc::new(threads::Threads::new(cfg.threads)?))
        };
        let (label, direct, buffered, inline_max): (_, Arc<dyn Engine>, Arc<dyn Engine>, _) =
            match cfg.choice {
                EngineChoice::Threads => {
                    let t = threads(&cfg)?;
                    ("threads", t.clone(), t, 0)
                }
                EngineChoice::Uring => {
                    let u: Arc<dyn Engine> = Arc::new(
                        uring::Uring::new(cfg.queue_depth, cfg.file_inflight).map_err(|e| {
                            Error::backend(format!(
                                "POSIX: io_uring was requested but cannot be used: {}",
                                e.message()
                            ))
                        })?,
                    );
                    ("io_uring", u.clone(), u, 0)
                }
                EngineChoice::Auto => match uring::Uring::new(cfg.queue_depth, cfg.file_inflight) {
                    Ok(u) => (AUTO_LABEL, Arc::new(u), threads(&cfg)?, cfg.inline_max),
                    Err(e) => {
                        tracing::warn!(
                            "POSIX: io_uring unavailable ({}); using the thread-pool engine",
                            e.message()
                        );
                        params.insert("engine_fallback_reason".into(), e.message().to_owned());
                        let t = threads(&cfg)?;
                        ("threads", t.clone(), t, cfg.inline_max)
                    }
                },
            };
        params.insert("engine".into(), label.into());
        params.insert("engine_direct".into(), direct.name().into());
        params.insert("engine_buffered".into(), buffered.name().into());
        params.insert("inline_max_bytes".into(), inline_max.to_string());
        params.insert("num_threads".into(), cfg.threads.to_string());
        Ok(Posix {
            cfg,
            params,
            direct,
            buffered,
            inline_max,
            regions: RwLock::new(HashMap::new()),
            next_token: AtomicU64::new(1),
        })
    }

    /// The prepared transfer for `plan`: which engine runs it and whether it starts inline.
    fn xfer_for(&self, plan: Plan) -> PosixXfer {
        let engine = if plan.any_direct() {
            self.direct.clone()
        } else {
            self.buffered.clone()
        };
        // A budget in bytes and in system calls: many tiny pieces must not keep the caller
        // in thousands of them.
        let inline = self.inline_max > 0
            && plan.bytes <= self.inline_max
            && plan.chunks.len() as u64 <= (self.inline_max / 4096).max(1)
            && plan.inline_ok();
        PosixXfer {
            plan: Arc::new(plan),
            engine,
            inline,
            current: Mutex::new(None),
        }
    }

    fn build_plan(&self, spec: &XferSpec<'_>) -> Result<Plan> {
        if spec.local_mem != MemType::Dram
            || !matches!(spec.remote_mem, MemType::File | MemType::Blk)
        {
            return Err(Error::not_supported(format!(
                "POSIX moves DRAM to and from FILE/BLK; it cannot transfer {} to {}",
                spec.local_mem, spec.remote_mem
            )));
        }
        if !spec.loopback {
            return Err(Error::not_supported(format!(
                "POSIX is local-only: the target must be this agent, not {:?}",
                spec.peer
            )));
        }
        if spec.local.len() != spec.remote.len() {
            return Err(Error::invalid_param(format!(
                "{} local segments but {} file segments",
                spec.local.len(),
                spec.remote.len()
            )));
        }
        let map = self.regions.read();
        let max_io = u64::from(self.cfg.max_io);
        let mut regions: Vec<Arc<Region>> = Vec::new();
        let mut index_of: HashMap<u64, u32> = HashMap::new();
        let mut last: Option<(u64, u32)> = None;
        let mut chunks = Vec::with_capacity(spec.local.len());
        let mut bytes = 0u64;
        for (i, (l, r)) in spec.local.iter().zip(spec.remote.iter()).enumerate() {
            if l.len != r.len {
                return Err(Error::invalid_param(format!(
                    "segment {i}: {} DRAM bytes but {} file bytes",
                    l.len, r.len
                )));
            }
            let ri = match last {
                Some((tok, idx)) if tok == r.token => idx,
                _ => {
                    let idx = match index_of.get(&r.token) {
                        Some(&idx) => idx,
                        None => {
                            let reg = map.get(&r.token).ok_or_else(|| {
                                Error::not_found(format!(
                                    "segment {i}: {} registration (dev {}) is not registered \
                                     with POSIX any more",
                                    spec.remote_mem, r.dev
                                ))
                            })?;
                            let idx = regions.len() as u32;
                            regions.push(reg.clone());
                            index_of.insert(r.token, idx);
                            idx
                        }
                    };
                    last = Some((r.token, idx));
                    idx
                }
            };
            let reg = &regions[ri as usize];
            check_segment(spec.op, reg, i, l.addr, r.addr, l.len)?;
            bytes += l.len;
            let mut done = 0u64;
            while done < l.len {
                let n = (l.len - done).min(max_io);
                chunks.push(Chunk {
                    buf: l.addr + done,
                    off: r.addr + done,
                    len: n as u32,
                    region: ri,
                });
                done += n;
            }
            if chunks.len() > self.cfg.ios_pool_size {
                return Err(Error::invalid_param(format!(
                    "the transfer needs more than ios_pool_size={} I/O operations (segments are \
                     split at {} bytes); raise ios_pool_size or max_io_size",
                    self.cfg.ios_pool_size, self.cfg.max_io
                )));
            }
        }
        Ok(Plan {
            op: spec.op,
            chunks,
            regions,
            bytes,
        })
    }
}

/// Checks one segment against its file: access mode, offsets that fit in `off_t`, O_DIRECT
/// alignment.
fn check_segment(op: XferOp, reg: &Region, i: usize, buf: u64, off: u64, len: u64) -> Result<()> {
    let mem = reg.mem;
    match op {
        XferOp::Write if reg.append => {
            return Err(Error::not_allowed(format!(
                "segment {i}: WRITE to {} is not allowed: the descriptor was opened with \
                 O_APPEND, so Linux would append the data instead of writing it at offset {off}",
                reg.label
            ))
            .with_mem(mem));
        }
        XferOp::Write if !reg.writable => {
            return Err(Error::not_allowed(format!(
                "segment {i}: WRITE to {} is not allowed: it was registered read-only",
                reg.label
            ))
            .with_mem(mem));
        }
        XferOp::Read if !reg.readable => {
            return Err(Error::not_allowed(format!(
                "segment {i}: READ from {} is not allowed: it was opened write-only",
                reg.label
            ))
            .with_mem(mem));
        }
        _ => {}
    }
    // pread/pwrite and io_uring take signed offsets (io_uring reads -1 as "current position").
    if off.checked_add(len).is_none_or(|end| end > i64::MAX as u64) {
        return Err(Error::invalid_param(format!(
            "segment {i}: offset {off} + length {len} of {} is beyond the largest file offset",
            reg.label
        ))
        .with_mem(mem));
    }
    if reg.direct {
        let a = reg.align;
        let bad = if !buf.is_multiple_of(a.mem) {
            Some(format!(
                "buffer address {buf:#x} is not a multiple of {} bytes",
                a.mem
            ))
        } else if !off.is_multiple_of(a.offset) {
            Some(format!(
                "file offset {off} is not a multiple of {} bytes",
                a.offset
            ))
        } else if !len.is_multiple_of(a.offset) {
            Some(format!(
                "length {len} is not a multiple of {} bytes",
                a.offset
            ))
        } else {
            None
        };
        if let Some(what) = bad {
            return Err(Error::invalid_param(format!(
                "segment {i}: {} is opened with O_DIRECT, which needs buffer addresses aligned to \
                 {} bytes and offsets and lengths aligned to {} bytes (from {}): {what}",
                reg.label, a.mem, a.offset, a.source
            ))
            .with_mem(mem));
        }
    }
    Ok(())
}

impl Backend for Posix {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    /// Host memory to and from storage only: DRAM→DRAM is another backend's job.
    unsafe fn register(&self, mem: MemType, desc: &RegDesc) -> Result<LocalRegion> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        match mem {
            // Host memory needs no state: the agent validated it and gives us its addresses.
            // A distinct token per registration keeps the agent from merging across two.
            MemType::Dram => {}
            MemType::File | MemType::Blk => {
                let mut region = match meta::parse(&desc.meta) {
                    Some(m) => Region::open(mem, &m)?,
                    None => Region::borrow_fd(mem, desc.desc.dev, &desc.meta)?,
                };
                let engine = if region.direct {
                    &self.direct
                } else {
                    &self.buffered
                };
                region.fixed = engine.fixed_slot(region.fd);
                self.regions.write().insert(token, Arc::new(region));
            }
            other => {
                return Err(Error::not_supported(format!(
                    "POSIX cannot register {other} memory (DRAM, FILE and BLK only)"
                ))
                .with_mem(other))
            }
        }
        Ok(LocalRegion {
            token,
            public: Vec::new(),
        })
    }

    fn deregister(&self, mem: MemType, token: u64) -> Result<()> {
        if mem == MemType::Dram {
            return Ok(());
        }
        // Dropping our reference closes an owned file now, unless a request built on it still
        // exists (it closes when that request is dropped).
        match self.regions.write().remove(&token) {
            Some(_) => Ok(()),
            None => Err(Error::not_found(format!(
                "POSIX has no {mem} registration with token {token}"
            ))),
        }
    }

    unsafe fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>> {
        let plan = self.build_plan(&spec)?;
        Ok(Box::new(self.xfer_for(plan)))
    }

    fn query_mem(&self, _mem: MemType, descs: &[RegDesc]) -> Result<Vec<Option<Params>>> {
        descs
            .iter()
            .map(|d| match meta::query_path(&d.meta) {
                Some(p) => region::query(p),
                None => Ok(None),
            })
            .collect()
    }
}

/// A prepared POSIX transfer.
#[derive(Debug)]
struct PosixXfer {
    plan: Arc<Plan>,
    engine: Arc<dyn Engine>,
    /// Start each post in the posting thread ([`Plan::run_inline`]).
    inline: bool,
    /// The latest post (finished or not).
    current: Mutex<Option<Arc<Post>>>,
}

impl BackendXfer for PosixXfer {
    fn post(&self, notif: Option<&[u8]>, done: CompletionHandle) -> Result<PostOutcome> {
        if notif.is_some() {
            return Err(Error::backend(
                "POSIX cannot deliver notifications (it is a local storage backend)",
            ));
        }
        if self.plan.chunks.is_empty() {
            // Nothing to move (the agent never prepares empty transfers; be safe anyway).
            return Ok(PostOutcome::Done);
        }
        let mut first = 0;
        if self.inline {
            // The previous post has finished (the agent refuses to repost one in progress).
            *self.current.lock() = None;
            match self.plan.run_inline()? {
                Inline::Done => return Ok(PostOutcome::Done),
                Inline::HandOff(i) => first = i,
            }
        }
        let post = Post::new(self.plan.clone(), first, done);
        *self.current.lock() = Some(post.clone());
        self.engine.submit(post);
        Ok(PostOutcome::InProgress)
    }

    fn cancel(&self) -> Result<()> {
        let cur = self.current.lock().clone();
        if let Some(p) = cur {
            if p.request_cancel() {
                self.engine.cancel(&p);
            }
            p.wait_finished();
        }
        Ok(())
    }
}

impl Drop for PosixXfer {
    fn drop(&mut self) {
        // A request dropped mid-post must not leave I/O into memory its owner may now free.
        let _ = self.cancel();
    }
}

#[cfg(test)]
mod tests;

// The parameter table in the crate docs is the one the code declares.
rixl_backend::params_doc_test!(params::PARAMS);
