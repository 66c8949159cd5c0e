//! Worker threads for large transfers.
//!
//! Small posts copy inline in the caller's thread (a system call or two; handing them to another
//! thread would cost more than the copy). Large posts are split into byte ranges and copied by
//! a few workers in parallel, so that the caller gets `InProgress` at once and a multi-core
//! machine copies faster than one core can. Workers block on a condition variable when idle.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

/// A fixed set of worker threads.
pub(crate) struct Pool {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Pool {
    /// Starts `n` workers named `name`.
    pub(crate) fn new(n: usize, name: &str) -> std::io::Result<Pool> {
        let shared: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(Pool { shared, threads })
    }

    /// Number of workers.
    pub(crate) fn size(&self) -> usize {
        self.threads.len()
    }

    /// Queues a job.
    pub(crate) fn spawn(&self, job: Job) {
        let (q, cv) = &*self.shared;
        q.lock().jobs.push_back(job);
        cv.notify_one();
    }
}

fn worker(shared: &(Mutex<Queue>, Condvar)) {
    let (q, cv) = shared;
    loop {
        let job = {
            let mut g = q.lock();
            loop {
                if let Some(j) = g.jobs.pop_front() {
                    break j;
                }
                if g.stop {
                    return;
                }
                cv.wait(&mut g);
            }
        };
        job();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let (q, cv) = &*self.shared;
        q.lock().stop = true;
        cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
