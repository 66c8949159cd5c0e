//! The agent's notification queue.
//!
//! Backends push notifications (from the sender named by the connection they arrived on) into
//! one queue per agent; the application drains it, optionally filtered by backend, or blocks on
//! it with a timeout. Nobody polls: a push wakes the sleepers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// One received notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sending agent's name.
    pub from: String,
    /// The message; may be empty.
    pub msg: Vec<u8>,
    /// Index of the backend that delivered it (creation order in the receiving agent).
    pub backend: usize,
}

/// The per-agent queue. Backends get a [`NotifSender`] bound to their index.
#[derive(Debug, Default)]
pub struct NotifQueue {
    queue: Mutex<VecDeque<Notification>>,
    cond: Condvar,
    pushed: AtomicU64,
    /// Notifications queued right now (read without the lock by spinning waiters).
    queued: AtomicUsize,
}

/// How long a waiter spins before sleeping: a notification round trip on one host takes tens of
/// microseconds, and a sleeping thread adds a wake-up (several microseconds here) to each leg.
const SPIN: Duration = Duration::from_micros(50);

impl NotifQueue {
    /// An empty queue.
    pub fn new() -> Arc<NotifQueue> {
        Arc::new(NotifQueue::default())
    }

    /// A sender that tags what it pushes with backend index `backend`.
    pub fn sender(self: &Arc<Self>, backend: usize) -> NotifSender {
        NotifSender {
            queue: self.clone(),
            backend,
        }
    }

    fn push(&self, n: Notification) {
        let mut q = self.queue.lock();
        q.push_back(n);
        self.queued.store(q.len(), Ordering::Release);
        drop(q);
        self.pushed.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
    }

    /// True when nothing is queued (one atomic load).
    pub fn is_empty(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    /// Removes and returns the notifications accepted by `filter` (by backend index), in
    /// arrival order; others stay queued.
    pub fn drain(&self, mut filter: impl FnMut(usize) -> bool) -> Vec<Notification> {
        let mut q = self.queue.lock();
        let mut out = Vec::new();
        if q.iter().all(|n| filter(n.backend)) {
            out.extend(q.drain(..));
        } else {
            q.retain(|n| {
                if filter(n.backend) {
                    out.push(n.clone());
                    false
                } else {
                    true
                }
            });
        }
        self.queued.store(q.len(), Ordering::Release);
        out
    }

    /// Blocks until a notification accepted by `filter` is queued or `timeout` passes; returns
    /// whether one is there. Does not remove anything.
    pub fn wait(&self, timeout: Duration, filter: impl FnMut(usize) -> bool) -> bool {
        self.wait_with(timeout, filter, || {}, || {})
    }

    /// Like [`NotifQueue::wait`], calling `progress` while spinning (to let backends deliver
    /// what has arrived without waiting for their own threads), and `before_sleep` once if the
    /// spin phase ends empty-handed, before blocking (it may still deliver).
    pub fn wait_with(
        &self,
        timeout: Duration,
        mut filter: impl FnMut(usize) -> bool,
        mut progress: impl FnMut(),
        before_sleep: impl FnOnce(),
    ) -> bool {
        let start = Instant::now();
        let spin = SPIN.min(timeout);
        loop {
            progress();
            if self.queued.load(Ordering::Acquire) > 0
                && self.queue.lock().iter().any(|n| filter(n.backend))
            {
                return true;
            }
            if start.elapsed() >= spin {
                break;
            }
            // Yield rather than spin: on a small machine the thread that will deliver the
            // notification (a backend's reader) needs this core.
            std::thread::yield_now();
        }
        before_sleep();
        let deadline = start.checked_add(timeout);
        let mut q = self.queue.lock();
        loop {
            if q.iter().any(|n| filter(n.backend)) {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.cond.wait_until(&mut q, d).timed_out() {
                        return q.iter().any(|n| filter(n.backend));
                    }
                }
                None => self.cond.wait(&mut q),
            }
        }
    }

    /// Number of notifications ever pushed (for tests and telemetry).
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Acquire)
    }
}

/// The handle a backend uses to deliver notifications to its agent.
#[derive(Clone, Debug)]
pub struct NotifSender {
    queue: Arc<NotifQueue>,
    backend: usize,
}

impl NotifSender {
    /// Delivers `msg` from agent `from`.
    pub fn deliver(&self, from: &str, msg: &[u8]) {
        self.queue.push(Notification {
            from: from.to_owned(),
            msg: msg.to_vec(),
            backend: self.backend,
        });
    }
}
