//! The thread-pool engine: worker threads doing blocking `pread`/`pwrite`.
//!
//! Used when io_uring cannot be set up (an old kernel, `io_uring_disabled`, a seccomp profile
//! such as Docker's default one), when asked for (`engine=threads`, NIXL's `use_posix_aio`), and
//! by `engine=auto` for every post on buffered files (the crate documentation says why).
//!
//! Posts are queued as cursors over their chunk list, so queueing a post of 100,000 chunks is
//! O(1) and cancelling it drops every chunk not yet started in O(posts queued). Idle workers
//! sleep on a condition variable. A worker takes a *claim* of consecutive chunks from the
//! front cursor, sized by what limits the chunks:
//!
//! - O_DIRECT chunks wait for the device: one chunk per claim, so that every worker keeps one
//!   I/O in flight and the pool reaches the queue depth it has workers for.
//! - Buffered writes (not O_SYNC) to one file: the whole run of consecutive chunks on that
//!   file. Linux file systems hold the inode lock for the whole copy of a buffered write, so
//!   several workers on one file only queue on that lock (measured on ext4 with 4 workers:
//!   1 MiB blocks 5.4-7 GB/s against 8-9.6 GB/s for one thread; a later C test, median of 8
//!   interleaved passes on a quiet VM: 1, 2, 4 writer threads 9.8, 9.3, 9.1 GB/s with 16 MiB
//!   and 9.3, 9.0, 8.8 with 1 MiB writes); one worker writing them in
//!   order runs at the speed of one copying core, which is the most the kernel allows.
//! - Other buffered chunks (reads, O_SYNC writes) are CPU copies that do scale across cores:
//!   claims of about a quarter of the post's share per woken worker (64 KiB to 4 MiB), which
//!   balances the copy over the cores with few trips through the queue lock even when the
//!   chunks are 4 KiB.
//!
//! A post on buffered files wakes at most one worker per CPU (the copies are CPU-bound; more
//! would only take turns on the same cores); a post with O_DIRECT chunks wakes every worker it
//! has chunks for.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use rixl_core::{Error, Result};

use crate::engine::Engine;
use crate::plan::Post;

/// Smallest and largest claim of buffered chunks that run in parallel.
const CLAIM_MIN: u64 = 64 << 10;
const CLAIM_MAX: u64 = 4 << 20;

#[derive(Debug)]
struct Cursor {
    post: Arc<Post>,
    next: usize,
    /// Bytes a claim of parallel buffered chunks aims at.
    claim: u64,
}

#[derive(Debug, Default)]
struct Queue {
    posts: VecDeque<Cursor>,
    shutdown: bool,
}

#[derive(Debug, Default)]
struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
}

/// The engine. Dropping it stops and joins the workers (no post can be in flight then: every
/// request holding the engine fences its post before letting go of it).
#[derive(Debug)]
pub(crate) struct Threads {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// CPUs this process may run on: the most workers a buffered post wakes.
    cpus: usize,
}

impl Threads {
    pub(crate) fn new(n: usize) -> Result<Threads> {
        let shared = Arc::new(Shared::default());
        let mut workers = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let sh = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("rixl-posix-io-{i}"))
                .spawn(move || worker(&sh))
                .map_err(|e| {
                    Error::from_io(
                        rixl_core::ErrorKind::Backend,
                        "POSIX cannot start its I/O threads",
                        &e,
                    )
                });
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    stop(&shared, &mut workers);
                    return Err(e);
                }
            }
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Threads {
            shared,
            workers,
            cpus,
        })
    }
}

fn stop(shared: &Shared, workers: &mut Vec<JoinHandle<()>>) {
    shared.q.lock().shutdown = true;
    shared.cv.notify_all();
    let me = std::thread::current().id();
    for w in workers.drain(..) {
        // A worker never owns the engine, but never join yourself whatever happens.
        if w.thread().id() != me {
            let _ = w.join();
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        stop(&self.shared, &mut self.workers);
    }
}

/// The end (exclusive) of the claim that starts at the cursor's next chunk.
fn claim_end(c: &Cursor) -> usize {
    let plan = &c.post.plan;
    let n = plan.chunks.len();
    let first = &plan.chunks[c.next];
    let r = plan.region(first);
    if r.direct {
        return c.next + 1;
    }
    if plan.serial_on(r) {
        let region = first.region;
        let run = plan.chunks[c.next..]
            .iter()
            .take_while(|ch| ch.region == region)
            .count();
        return c.next + run;
    }
    let mut end = c.next;
    let mut bytes = 0u64;
    while end < n && bytes < c.claim {
        let ch = &plan.chunks[end];
        let r = plan.region(ch);
        // Stop before a chunk another rule claims differently.
        if end > c.next && (r.direct || plan.serial_on(r)) {
            break;
        }
        bytes += u64::from(ch.len);
        end += 1;
    }
    end
}

/// Takes the next claim (post, first chunk, end), or accounts for the rest of a stopped post.
/// Returns `None` at shutdown.
fn next_job(sh: &Shared) -> Option<(Arc<Post>, usize, usize)> {
    let mut q = sh.q.lock();
    loop {
        if let Some(front) = q.posts.front_mut() {
            let n = front.post.plan.chunks.len();
            if front.post.stopped() {
                let c = q.posts.pop_front().expect("front exists");
                let rest = n - c.next;
                drop(q);
                if c.post.chunks_done(rest, Ok(())) {
                    c.post.finish();
                }
                q = sh.q.lock();
                continue;
            }
            let start = front.next;
            let end = claim_end(front);
            front.next = end;
            let post = if end == n {
                q.posts.pop_front().expect("front exists").post
            } else {
                front.post.clone()
            };
            return Some((post, start, end));
        }
        if q.shutdown {
            return None;
        }
        sh.cv.wait(&mut q);
    }
}

fn worker(sh: &Shared) {
    while let Some((post, start, end)) = next_job(sh) {
        let plan = &post.plan;
        for idx in start..end {
            if post.stopped() {
                // Failed or cancelled: the rest of the claim is skipped.
                if post.chunks_done(end - idx, Ok(())) {
                    post.finish();
                }
                break;
            }
            let res = plan.run_blocking(&plan.chunks[idx], post.stop_flag());
            if post.chunks_done(1, res) {
                post.finish();
            }
        }
    }
}

impl Engine for Threads {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn submit(&self, post: Arc<Post>) {
        let plan = &post.plan;
        let n = plan.chunks.len() - post.first;
        if n == 0 {
            post.finish();
            return;
        }
        let wake = if plan.any_direct() {
            n.min(self.workers.len())
        } else if plan.op == rixl_core::XferOp::Write
            && plan.regions.len() == 1
            && plan.serial_on(&plan.regions[0])
        {
            1
        } else {
            n.min(self.workers.len()).min(self.cpus)
        };
        let share = plan.bytes / wake.max(1) as u64;
        let claim = (share / 4).clamp(CLAIM_MIN, CLAIM_MAX);
        let next = post.first;
        self.shared
            .q
            .lock()
            .posts
            .push_back(Cursor { post, next, claim });
        if wake >= self.workers.len() {
            self.shared.cv.notify_all();
        } else {
            for _ in 0..wake {
                self.shared.cv.notify_one();
            }
        }
    }

    fn cancel(&self, post: &Arc<Post>) {
        // Drop the chunks no worker has started; the ones running finish on their own (they
        // check the stop flag between partial transfers and between the chunks of a claim)
        // and the last one finishes the post.
        let rest = {
            let mut q = self.shared.q.lock();
            match q.posts.iter().position(|c| Arc::ptr_eq(&c.post, post)) {
                Some(i) => {
                    let c = q.posts.remove(i).expect("index found above");
                    post.plan.chunks.len() - c.next
                }
                None => 0,
            }
        };
        if post.chunks_done(rest, Ok(())) {
            post.finish();
        }
    }
}

/// The claims workers would take from `post` with claims of `claim` bytes, as `(start, end)`.
#[cfg(test)]
pub(crate) fn claims(post: Arc<Post>, claim: u64) -> Vec<(usize, usize)> {
    let n = post.plan.chunks.len();
    let mut c = Cursor {
        next: post.first,
        post,
        claim,
    };
    let mut out = Vec::new();
    while c.next < n {
        let end = claim_end(&c);
        out.push((c.next, end));
        c.next = end;
    }
    out
}
