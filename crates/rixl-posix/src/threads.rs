//! The thread-pool engine: worker threads doing blocking `pread`/`pwrite`.
//!
//! Used when io_uring cannot be set up (an old kernel, `io_uring_disabled`, a seccomp profile
//! such as Docker's default one) or when asked for (`engine=threads`, NIXL's `use_posix_aio`).
//! Posts are queued as cursors over their chunk list, so queueing a post of 100,000 chunks is
//! O(1) and cancelling it drops every chunk not yet started in O(posts queued). Each worker has
//! one operation in flight; idle workers sleep on a condition variable.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use rixl_core::{Error, Result};

use crate::engine::Engine;
use crate::plan::Post;

#[derive(Debug)]
struct Cursor {
    post: Arc<Post>,
    next: usize,
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
}

impl Threads {
    pub fn new(n: usize) -> Result<Threads> {
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
        Ok(Threads { shared, workers })
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

/// Takes the next chunk to run, or accounts for the rest of a stopped post. Returns `None`
/// at shutdown.
fn next_job(sh: &Shared) -> Option<(Arc<Post>, usize)> {
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
            let idx = front.next;
            front.next += 1;
            let post = if front.next == n {
                q.posts.pop_front().expect("front exists").post
            } else {
                front.post.clone()
            };
            return Some((post, idx));
        }
        if q.shutdown {
            return None;
        }
        sh.cv.wait(&mut q);
    }
}

fn worker(sh: &Shared) {
    while let Some((post, idx)) = next_job(sh) {
        let plan = &post.plan;
        let res = plan.run_blocking(&plan.chunks[idx], post.stop_flag());
        if post.chunks_done(1, res) {
            post.finish();
        }
    }
}

impl Engine for Threads {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn submit(&self, post: Arc<Post>) {
        let n = post.plan.chunks.len();
        if n == 0 {
            post.finish();
            return;
        }
        self.shared
            .q
            .lock()
            .posts
            .push_back(Cursor { post, next: 0 });
        if n == 1 {
            self.shared.cv.notify_one();
        } else {
            self.shared.cv.notify_all();
        }
    }

    fn cancel(&self, post: &Arc<Post>) {
        // Drop the chunks no worker has started; the ones running finish on their own (they
        // check the stop flag between partial transfers) and the last one finishes the post.
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
