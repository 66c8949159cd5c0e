//! The io_uring engine.
//!
//! It runs every post under `engine=io_uring`, and the posts that touch O_DIRECT files under
//! `engine=auto` (buffered files go to the thread pool there: the crate documentation says
//! why).
//!
//! One ring per backend, owned by one thread (`rixl-posix-uring`). Application threads never
//! touch the ring's queues: a post is handed over through an inbox and, if the ring thread is
//! asleep, an `eventfd` write that completes a `POLL_ADD` the thread keeps armed on the ring. Why
//! not submit from the posting thread? io_uring runs completion work ("task work") in the
//! context of the task that submitted, and cancels a task's punted requests when that task
//! exits. With all submissions on the ring thread, application threads are never interrupted to
//! run our completions, and a thread that posts and then exits (a Python worker, a scoped
//! thread) cannot cancel its own transfer by exiting.
//!
//! The ring thread loop: take new posts and cancels from the inbox; fill the submission queue
//! from the pending posts (at most `kernel_queue_size` data operations in flight, and at most
//! `file_inflight_bytes` of O_DIRECT operations per file, see below); reap
//! completions (resubmitting the rest of a short read or write, or recording the error); call
//! [`Post::finish`] for posts whose last chunk is accounted for; then block in
//! `submit_and_wait(1)`, which submits what was queued and sleeps until a completion arrives.
//! Nothing spins: an idle backend is one thread asleep in `io_uring_enter`.
//!
//! Cancellation is fenced: the post's chunks not yet submitted are dropped and every one in
//! flight gets an `IORING_OP_ASYNC_CANCEL`; the canceller waits until each in-flight operation
//! has produced its completion (cancelled or done), so nothing of the post is left in the
//! kernel when `cancel` returns.
//!
//! **Per-file budget.** Without it a post of 64 × 16 MiB O_DIRECT reads put 1 GiB in flight:
//! the block layer splits that into ~1000 requests for the 128 tags of this VM's virtio disk,
//! so most of it only waits in the kernel, and anything posted after it waits behind all of
//! it. The budget (`file_inflight_bytes`, 256 MiB by default; one operation always goes)
//! bounds that: a post whose next chunk's file is at its budget keeps its place in line while
//! later posts on other files are served. How deep to go is the device's business, and this
//! VM's shared virtio disk did not say clearly: within one process, interleaved, budgets of
//! 32–256 MiB read 16 MiB blocks ~4% faster than no budget (1.96 against 1.89 GB/s) and wrote
//! at the same speed, but across processes fio itself wrote 16 MiB blocks at 2.2 GB/s with 4
//! in flight against 4.0 with 64, and a 64 MiB budget lost to none in one run of the
//! comparison script. 256 MiB keeps the deep queue fio prefers here (16 × 16 MiB) while still
//! cutting the worst case by 4x, and beat no budget on all four O_DIRECT rows of a 3-round
//! interleaved run (READ 16 MiB 3.06 against 2.75 GB/s, 1 MiB 2.97 / 2.81; WRITE 6.57 / 5.69
//! and 6.31 / 5.66). It is a parameter because the right depth belongs to the device.
//!
//! Files of FILE/BLK registrations go into the ring's registered-file table (a sparse table,
//! updated at registration and deregistration), which saves the kernel a file-table lookup and
//! reference count per operation: it pays for many small random reads.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use parking_lot::Mutex;
use rixl_core::{Error, ErrorKind, Result, XferOp};

use crate::engine::Engine;
use crate::plan::{Plan, Post};
use crate::region::{FixedOwner, FixedSlot};

/// `user_data` of the eventfd poll.
const UD_WAKE: u64 = u64::MAX;
/// `user_data` of `ASYNC_CANCEL` requests (their own completions carry nothing we need).
const UD_CANCEL: u64 = u64::MAX - 1;
/// Data operations use `gen << 32 | slot` with `gen < 2^31`, never colliding with the above.
const GEN_MASK: u32 = 0x7fff_ffff;
/// Buffered reads at least this large go straight to io_uring's worker threads
/// (`IOSQE_ASYNC`): a cached read is otherwise copied inline by the one ring thread, while the
/// workers copy in parallel on every core (measured: 1 MiB blocks 8.6 → 10–12 GB/s on two
/// cores). Small reads stay inline, where a worker hand-off would cost more than the copy.
/// Buffered writes gain nothing: the kernel serialises them per file anyway.
const ASYNC_MIN: u32 = 256 << 10;
/// Upper bound of the registered-file table.
pub(crate) const MAX_FIXED_FILES: u32 = 4096;

enum Cmd {
    Post(Arc<Post>),
    Cancel(Arc<Post>),
    Shutdown,
}

struct Shared {
    ring: IoUring,
    efd: OwnedFd,
    inbox: Mutex<Vec<Cmd>>,
    /// True while the ring thread may be about to block: posters must then wake it.
    sleeping: AtomicBool,
    /// Free registered-file slots (empty when the kernel has no sparse file tables).
    files: Mutex<Vec<u32>>,
    /// Maximum data operations in flight.
    depth: usize,
    /// Most bytes of O_DIRECT operations in flight per file (`u64::MAX`: no limit).
    file_cap: u64,
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        self.inbox.lock().push(cmd);
        // Pairs with the ring thread's `sleeping.store(true)` followed by its inbox check:
        // either it sees our command, or we see that it may sleep and wake it.
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to our eventfd. It cannot block (EFD_NONBLOCK);
        // failure (EAGAIN at a saturated counter) still leaves the eventfd readable.
        unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

impl FixedOwner for Shared {
    fn release(&self, slot: u32) {
        let mut free = self.files.lock();
        match self.ring.submitter().register_files_update(slot, &[-1]) {
            Ok(_) => free.push(slot),
            // Leave the slot out of circulation rather than hand out one the kernel may still
            // consider busy.
            Err(e) => tracing::warn!("POSIX: cannot clear io_uring file slot {slot}: {e}"),
        }
    }
}

/// The engine handle. Dropping it stops and joins the ring thread.
pub(crate) struct Uring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    fixed_files: u32,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("depth", &self.shared.depth)
            .field("fixed_files", &self.fixed_files)
            .finish_non_exhaustive()
    }
}

fn setup_err(what: &str, e: &io::Error) -> Error {
    Error::from_io(ErrorKind::Backend, format!("io_uring {what}"), e)
}

impl Uring {
    /// Sets up a ring for `depth` data operations in flight. Any failure (no io_uring in the
    /// kernel, `io_uring_disabled`, a seccomp filter, missing opcodes) is an error the caller
    /// may answer by falling back to the thread pool.
    pub(crate) fn new(depth: u32, file_cap: u64) -> Result<Uring> {
        // Room for every data operation, one cancel per data operation and the wake-up poll,
        // so that one loop iteration can never overfill the submission queue. The completion
        // queue is twice as large (the kernel default), so it cannot overflow either.
        let sq_entries = (depth.saturating_mul(2) + 2).next_power_of_two().min(32768);
        let depth = depth.min((sq_entries - 2) / 2).max(1) as usize;
        let ring = IoUring::builder()
            .build(sq_entries)
            .map_err(|e| setup_err("setup failed", &e))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| setup_err("probe failed", &e))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
        ] {
            if !probe.is_supported(code) {
                return Err(Error::backend(format!(
                    "io_uring of this kernel lacks IORING_OP_{name}"
                )));
            }
        }
        // SAFETY: eventfd(2) has no memory arguments.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(setup_err("eventfd failed", &io::Error::last_os_error()));
        }
        // SAFETY: `efd` was just created and is owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let fixed_files = fixed_table_size();
        let fixed_files =
            if fixed_files > 0 && ring.submitter().register_files_sparse(fixed_files).is_ok() {
                fixed_files
            } else {
                0
            };
        let shared = Arc::new(Shared {
            ring,
            efd,
            inbox: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            files: Mutex::new((0..fixed_files).rev().collect()),
            depth,
            file_cap,
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rixl-posix-uring".into())
            .spawn(move || RingThread::new(&sh).run())
            .map_err(|e| setup_err("thread could not be started", &e))?;
        Ok(Uring {
            shared,
            thread: Some(thread),
            fixed_files,
        })
    }
}

/// The registered-file table size: bounded by RLIMIT_NOFILE, which the kernel enforces for it.
fn fixed_table_size() -> u32 {
    // SAFETY: an all-zero `rlimit` is valid; getrlimit writes only into it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `rl` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 0;
    }
    let cur = u32::try_from(rl.rlim_cur).unwrap_or(u32::MAX);
    // Leave the process most of its descriptors; the table only needs one slot per region.
    (cur / 2).min(MAX_FIXED_FILES)
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.shared.send(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Engine for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn submit(&self, post: Arc<Post>) {
        self.shared.send(Cmd::Post(post));
    }

    fn cancel(&self, post: &Arc<Post>) {
        self.shared.send(Cmd::Cancel(post.clone()));
    }

    fn fixed_slot(&self, fd: RawFd) -> Option<FixedSlot> {
        let mut free = self.shared.files.lock();
        let slot = free.pop()?;
        match self
            .shared
            .ring
            .submitter()
            .register_files_update(slot, &[fd])
        {
            Ok(_) => Some(FixedSlot {
                slot,
                owner: self.shared.clone(),
            }),
            Err(e) => {
                free.push(slot);
                tracing::debug!("POSIX: no io_uring file slot for fd {fd}: {e}");
                None
            }
        }
    }
}

struct InFlight {
    post: Arc<Post>,
    chunk: u32,
    /// Bytes of the chunk already transferred (short reads and writes resume after them).
    done: u64,
    /// Bytes this operation added to its file's [`Region::ring_bytes`] (0 if it is not
    /// O_DIRECT).
    ///
    /// [`Region::ring_bytes`]: crate::region::Region
    charged: u64,
}

struct Slot {
    gen: u32,
    op: Option<InFlight>,
}

enum Pending {
    /// The chunks of a post from `next` on.
    Cursor { post: Arc<Post>, next: usize },
    /// The rest of one chunk after a short transfer.
    Rest {
        post: Arc<Post>,
        chunk: u32,
        done: u64,
    },
}

impl Pending {
    fn post(&self) -> &Arc<Post> {
        match self {
            Pending::Cursor { post, .. } | Pending::Rest { post, .. } => post,
        }
    }

    /// Chunks this entry still stands for.
    fn count(&self) -> usize {
        match self {
            Pending::Cursor { post, next } => post.plan.chunks.len() - next,
            Pending::Rest { .. } => 1,
        }
    }
}

struct RingThread<'a> {
    sh: &'a Shared,
    slots: Vec<Slot>,
    free: Vec<u32>,
    inflight: usize,
    pending: VecDeque<Pending>,
    finished: Vec<Arc<Post>>,
    cqes: Vec<(u64, i32, u32)>,
    cmds: Vec<Cmd>,
    shutting: bool,
    wake_armed: bool,
}

fn user_data(slot: usize, gen: u32) -> u64 {
    (u64::from(gen) << 32) | slot as u64
}

/// Whether one more O_DIRECT operation of `len` bytes may start on a file that has `busy` bytes
/// in flight, under a per-file budget of `cap` bytes. One operation always may (a chunk larger
/// than the budget must still run).
pub(crate) fn admits(busy: u64, len: u64, cap: u64) -> bool {
    busy == 0 || busy.saturating_add(len) <= cap
}

/// The SQE for the rest of chunk `idx` after `done` bytes.
fn entry_for(plan: &Plan, idx: u32, done: u64) -> squeue::Entry {
    let c = &plan.chunks[idx as usize];
    let r = plan.region(c);
    let buf = (c.buf + done) as usize as *mut u8;
    let len = c.len - done as u32;
    let off = c.off + done;
    let e = match (plan.op, &r.fixed) {
        (XferOp::Read, Some(f)) => opcode::Read::new(types::Fixed(f.slot), buf, len)
            .offset(off)
            .build(),
        (XferOp::Read, None) => opcode::Read::new(types::Fd(r.fd), buf, len)
            .offset(off)
            .build(),
        (XferOp::Write, Some(f)) => opcode::Write::new(types::Fixed(f.slot), buf, len)
            .offset(off)
            .build(),
        (XferOp::Write, None) => opcode::Write::new(types::Fd(r.fd), buf, len)
            .offset(off)
            .build(),
    };
    if plan.op == XferOp::Read && !r.direct && len >= ASYNC_MIN {
        e.flags(squeue::Flags::ASYNC)
    } else {
        e
    }
}

impl<'a> RingThread<'a> {
    fn new(sh: &'a Shared) -> RingThread<'a> {
        RingThread {
            sh,
            slots: (0..sh.depth).map(|_| Slot { gen: 0, op: None }).collect(),
            free: (0..sh.depth as u32).rev().collect(),
            inflight: 0,
            pending: VecDeque::new(),
            finished: Vec::new(),
            cqes: Vec::with_capacity(sh.depth * 2),
            cmds: Vec::new(),
            shutting: false,
            wake_armed: false,
        }
    }

    /// Pushes one SQE; false if the submission queue is full.
    fn push(&mut self, e: &squeue::Entry) -> bool {
        // SAFETY: only this thread ever creates a SubmissionQueue of this ring, one at a time.
        let mut sq = unsafe { self.sh.ring.submission_shared() };
        // SAFETY: every SQE pushed here refers only to memory that outlives its completion:
        // data buffers are registered DRAM whose owner keeps it valid while a transfer may run
        // (and `cancel` / drop of the request wait for this completion); fds are kept open by
        // the plan the in-flight slot holds; the poll and cancel SQEs carry no pointers.
        unsafe { sq.push(e) }.is_ok()
    }

    fn arm_wake(&mut self) {
        let e = opcode::PollAdd::new(types::Fd(self.sh.efd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(UD_WAKE);
        self.wake_armed = self.push(&e);
    }

    fn drain_eventfd(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into `v`; the eventfd is non-blocking.
        unsafe {
            libc::read(
                self.sh.efd.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            self.sh.sleeping.store(false, Ordering::SeqCst);
            std::mem::swap(&mut self.cmds, &mut *self.sh.inbox.lock());
            let mut cmds = std::mem::take(&mut self.cmds);
            for c in cmds.drain(..) {
                match c {
                    Cmd::Post(p) => {
                        let next = p.first;
                        self.pending.push_back(Pending::Cursor { post: p, next });
                    }
                    Cmd::Cancel(p) => self.cancel(&p),
                    Cmd::Shutdown => self.shutting = true,
                }
            }
            self.cmds = cmds;
            self.fill();
            self.reap();
            self.fill();
            if !self.wake_armed {
                self.arm_wake();
            }
            for p in self.finished.drain(..) {
                p.finish();
            }
            if self.shutting && self.inflight == 0 && self.pending.is_empty() {
                return;
            }
            self.sh.sleeping.store(true, Ordering::SeqCst);
            // Never sleep without the wake-up poll armed (it can only fail to arm while the
            // submission queue is full, and submitting empties it): nothing could wake us.
            let more_work = !self.wake_armed || !self.sh.inbox.lock().is_empty() || self.cq_ready();
            if more_work {
                if let Err(e) = self.sh.ring.submit() {
                    self.enter_error(&e);
                }
                continue;
            }
            if let Err(e) = self.sh.ring.submit_and_wait(1) {
                self.enter_error(&e);
            }
        }
    }

    fn cq_ready(&self) -> bool {
        // SAFETY: only this thread ever creates a CompletionQueue of this ring, one at a time.
        let cq = unsafe { self.sh.ring.completion_shared() };
        !cq.is_empty()
    }

    fn enter_error(&self, e: &io::Error) {
        match e.raw_os_error() {
            // Interrupted, or the kernel wants completions reaped first: the loop does that.
            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
            _ => {
                // Not expected from a healthy ring; avoid a hot loop while it persists.
                tracing::error!("POSIX: io_uring_enter failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Moves pending chunks into the submission queue while slots are free.
    ///
    /// Entries are taken in order, except that an entry whose next chunk is on an O_DIRECT file
    /// already at its in-flight budget ([`admits`]) is passed over (it keeps its place) so that
    /// posts on other files can go meanwhile.
    fn fill(&mut self) {
        let mut i = 0;
        while self.inflight < self.sh.depth && i < self.pending.len() {
            let entry = &self.pending[i];
            if entry.post().stopped() {
                let p = self.pending.remove(i).expect("index in range");
                if p.post().chunks_done(p.count(), Ok(())) {
                    self.finished.push(p.post().clone());
                }
                continue;
            }
            let (post, chunk, done) = match entry {
                Pending::Cursor { post, next } => (post.clone(), *next as u32, 0),
                Pending::Rest { post, chunk, done } => (post.clone(), *chunk, *done),
            };
            let c = &post.plan.chunks[chunk as usize];
            let r = post.plan.region(c);
            let charged = if r.direct { u64::from(c.len) - done } else { 0 };
            if charged > 0 {
                let busy = r.ring_bytes.load(Ordering::Relaxed);
                if !admits(busy, charged, self.sh.file_cap) {
                    i += 1;
                    continue;
                }
            }
            let slot = self
                .free
                .pop()
                .expect("inflight < depth leaves a free slot") as usize;
            let gen = self.slots[slot].gen;
            let e = entry_for(&post.plan, chunk, done).user_data(user_data(slot, gen));
            if !self.push(&e) {
                self.free.push(slot as u32);
                return;
            }
            r.ring_bytes.fetch_add(charged, Ordering::Relaxed);
            #[cfg(test)]
            r.ring_peak
                .fetch_max(r.ring_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
            self.slots[slot].op = Some(InFlight {
                post,
                chunk,
                done,
                charged,
            });
            self.inflight += 1;
            let exhausted = match &mut self.pending[i] {
                Pending::Cursor { post, next } => {
                    *next += 1;
                    *next == post.plan.chunks.len()
                }
                Pending::Rest { .. } => true,
            };
            if exhausted {
                self.pending.remove(i);
            }
        }
    }

    fn cancel(&mut self, post: &Arc<Post>) {
        let mut skipped = 0usize;
        self.pending.retain(|p| {
            if Arc::ptr_eq(p.post(), post) {
                skipped += p.count();
                false
            } else {
                true
            }
        });
        if post.chunks_done(skipped, Ok(())) {
            self.finished.push(post.clone());
        }
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            if s.op.as_ref().is_some_and(|op| Arc::ptr_eq(&op.post, post)) {
                let e = opcode::AsyncCancel::new(user_data(i, s.gen))
                    .build()
                    .user_data(UD_CANCEL);
                // If the queue were full the operation would simply run to completion, which
                // the canceller waits for anyway.
                let _ = self.push(&e);
            }
        }
    }

    fn reap(&mut self) {
        {
            // SAFETY: only this thread ever creates a CompletionQueue of this ring.
            let cq = unsafe { self.sh.ring.completion_shared() };
            for c in cq {
                self.cqes.push((c.user_data(), c.result(), c.flags()));
            }
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        for &(ud, res, flags) in &cqes {
            match ud {
                UD_WAKE => {
                    self.drain_eventfd();
                    if !cqueue::more(flags) {
                        self.wake_armed = false;
                    }
                }
                UD_CANCEL => {}
                _ => self.complete(ud, res),
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }

    /// Handles the completion of a data operation.
    fn complete(&mut self, ud: u64, res: i32) {
        let slot = (ud & 0xffff_ffff) as usize;
        let gen = (ud >> 32) as u32;
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.gen != gen {
            return;
        }
        let Some(mut op) = s.op.take() else {
            return;
        };
        s.gen = (s.gen + 1) & GEN_MASK;
        self.free.push(slot as u32);
        self.inflight -= 1;
        let plan = &op.post.plan;
        let c = plan.chunks[op.chunk as usize];
        plan.region(&c)
            .ring_bytes
            .fetch_sub(op.charged, Ordering::Relaxed);
        let len = u64::from(c.len);
        let outcome: Option<Result<()>> = if res < 0 {
            let errno = -res;
            if errno == libc::ECANCELED && op.post.stopped() {
                Some(Ok(()))
            } else if (errno == libc::EINTR || errno == libc::EAGAIN) && !op.post.stopped() {
                None
            } else {
                Some(Err(plan.io_error(
                    &c,
                    op.done,
                    &io::Error::from_raw_os_error(errno),
                )))
            }
        } else {
            op.done += res as u64;
            if op.done >= len {
                Some(Ok(()))
            } else if res == 0 {
                Some(Err(match plan.op {
                    XferOp::Read => plan.eof_error(&c, op.done),
                    XferOp::Write => plan.stalled_write_error(&c, op.done),
                }))
            } else if op.post.stopped() {
                Some(Ok(()))
            } else if plan.direct_read_hit_eof(&c, op.done) {
                Some(Err(plan.eof_error(&c, op.done)))
            } else {
                None
            }
        };
        match outcome {
            Some(r) => {
                if op.post.chunks_done(1, r) {
                    self.finished.push(op.post);
                }
            }
            // A short transfer (or a retryable error): the rest goes first in line.
            None => self.pending.push_front(Pending::Rest {
                post: op.post,
                chunk: op.chunk,
                done: op.done,
            }),
        }
    }
}
