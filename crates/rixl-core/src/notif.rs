//! The agent's notification queue.
//!
//! Backends push notifications (from the sender named by the connection they arrived on) into
//! one queue per agent; the application drains it, optionally filtered by backend, or blocks on
//! it with a timeout, or awaits it (the agent's notification stream). Nobody polls: a push wakes
//! the sleepers and the registered wakers.
//!
//! Async consumers take one notification at a time with [`NotifQueue::pop_or_register`], which
//! looks at the queue and, if it is empty, registers the task's waker under the same lock that
//! a push takes: a notification pushed after the look finds the waker, one pushed before is
//! found by the look, so no wake-up is lost. A push takes every registered waker (each
//! consumer registers again when it next finds the queue empty). [`NotifQueue::close`] (the
//! agent is gone) wakes them for the last time and makes every later look report the end.
//!
//! Peers decide how much arrives, the application how fast it drains: the queue is bounded
//! ([`NotifLimits`]: a number of notifications and of bytes). A notification that would exceed
//! either bound is dropped and counted ([`NotifQueue::dropped`]), and the first drop from each
//! sender is logged with the limit's name, so that a flooding or runaway peer costs a counter,
//! not the process's memory.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;
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

/// Bounds on the notifications an agent holds before the application drains them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifLimits {
    /// Most notifications queued (`max_queued_notifs`).
    pub max_queued: usize,
    /// Most bytes of messages and sender names queued (`max_queued_notif_bytes`).
    pub max_queued_bytes: usize,
}

impl Default for NotifLimits {
    /// One million notifications or 256 MiB: far above what a KV-cache pipeline keeps in
    /// flight (one notification per request), far below what would hurt the host.
    fn default() -> NotifLimits {
        NotifLimits {
            max_queued: 1 << 20,
            max_queued_bytes: 256 << 20,
        }
    }
}

/// The per-agent queue. Backends get a [`NotifSender`] bound to their index.
#[derive(Debug, Default)]
pub struct NotifQueue {
    queue: Mutex<Queue>,
    limits: NotifLimits,
    /// Notifications dropped because a limit was reached.
    dropped: AtomicU64,
    cond: Condvar,
    pushed: AtomicU64,
    /// Notifications queued right now (read without the lock by spinning waiters).
    queued: AtomicUsize,
    /// Source of async consumer ids.
    consumers: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Notification>,
    /// Bytes of messages and sender names in `items`.
    bytes: usize,
    /// Senders a drop was already logged for.
    dropped_from: HashSet<String>,
    /// Wakers of async consumers that found the queue empty, by consumer id.
    wakers: Vec<(u64, Waker)>,
    /// Set once the agent is gone: async consumers end.
    closed: bool,
}

/// What [`NotifQueue::pop_or_register`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    /// The oldest notification, now removed from the queue.
    Item(Notification),
    /// The queue was empty; the waker is registered and will be woken by the next push.
    Empty,
    /// The queue was closed (the agent is gone).
    Closed,
}

/// How long a waiter spins before sleeping: a notification round trip on one host takes tens of
/// microseconds, and a sleeping thread adds a wake-up (several microseconds here) to each leg.
const SPIN: Duration = Duration::from_micros(50);

impl NotifQueue {
    /// An empty queue.
    pub fn new() -> Arc<NotifQueue> {
        Arc::new(NotifQueue::default())
    }

    /// An empty queue with the given bounds.
    pub fn with_limits(limits: NotifLimits) -> Arc<NotifQueue> {
        Arc::new(NotifQueue {
            limits,
            ..NotifQueue::default()
        })
    }

    /// Notifications dropped so far because a limit was reached.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A sender that tags what it pushes with backend index `backend`.
    pub fn sender(self: &Arc<Self>, backend: usize) -> NotifSender {
        NotifSender {
            queue: self.clone(),
            backend,
        }
    }

    fn push(&self, n: Notification) {
        let size = n.msg.len() + n.from.len();
        let mut q = self.queue.lock();
        let over = if q.items.len() >= self.limits.max_queued {
            Some(("max_queued_notifs", self.limits.max_queued))
        } else if q.bytes + size > self.limits.max_queued_bytes {
            Some(("max_queued_notif_bytes", self.limits.max_queued_bytes))
        } else {
            None
        };
        if let Some((limit, value)) = over {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if q.dropped_from.insert(n.from.clone()) {
                let held = (q.items.len(), q.bytes);
                drop(q);
                tracing::warn!(
                    from = %n.from,
                    "notification dropped: {limit}={value} reached ({} notifications, {} bytes \
                     queued); later drops from this agent are only counted",
                    held.0,
                    held.1
                );
            }
            return;
        }
        q.bytes += size;
        q.items.push_back(n);
        self.queued.store(q.items.len(), Ordering::Release);
        let wakers = if q.wakers.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut q.wakers)
        };
        drop(q);
        self.pushed.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
    }

    /// A new id for an async consumer (see [`NotifQueue::pop_or_register`]).
    pub fn new_consumer(&self) -> u64 {
        self.consumers.fetch_add(1, Ordering::Relaxed)
    }

    /// For async consumers: removes and returns the oldest notification (from any backend); if
    /// there is none, registers `waker` under `consumer` (replacing that consumer's previous
    /// one) to be woken by the next push. Returns [`Popped::Closed`] once the queue is closed.
    pub fn pop_or_register(&self, consumer: u64, waker: &Waker) -> Popped {
        let mut q = self.queue.lock();
        if q.closed {
            return Popped::Closed;
        }
        if let Some(n) = q.items.pop_front() {
            q.bytes -= n.msg.len() + n.from.len();
            self.queued.store(q.items.len(), Ordering::Release);
            return Popped::Item(n);
        }
        match q.wakers.iter_mut().find(|(id, _)| *id == consumer) {
            Some((_, w)) => w.clone_from(waker),
            None => q.wakers.push((consumer, waker.clone())),
        }
        Popped::Empty
    }

    /// Forgets the waker of `consumer` (it was dropped).
    pub fn unregister(&self, consumer: u64) {
        self.queue.lock().wakers.retain(|(id, _)| *id != consumer);
    }

    /// Ends async consumption: wakes the registered wakers, and every later
    /// [`NotifQueue::pop_or_register`] returns [`Popped::Closed`]. Pushes and the blocking
    /// calls keep working.
    pub fn close(&self) {
        let wakers = {
            let mut q = self.queue.lock();
            q.closed = true;
            std::mem::take(&mut q.wakers)
        };
        for (_, w) in wakers {
            w.wake();
        }
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
        if q.items.iter().all(|n| filter(n.backend)) {
            out.extend(q.items.drain(..));
            q.bytes = 0;
        } else {
            q.items.retain(|n| {
                if filter(n.backend) {
                    out.push(n.clone());
                    false
                } else {
                    true
                }
            });
        }
        if !out.is_empty() {
            let taken: usize = out.iter().map(|n| n.msg.len() + n.from.len()).sum();
            q.bytes = q.bytes.saturating_sub(taken);
        }
        self.queued.store(q.items.len(), Ordering::Release);
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
                && self.queue.lock().items.iter().any(|n| filter(n.backend))
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
            if q.items.iter().any(|n| filter(n.backend)) {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.cond.wait_until(&mut q, d).timed_out() {
                        return q.items.iter().any(|n| filter(n.backend));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_and_takes_again_once_drained() {
        let q = NotifQueue::with_limits(NotifLimits {
            max_queued: 3,
            max_queued_bytes: 1 << 20,
        });
        let tx = q.sender(0);
        for i in 0..5u8 {
            tx.deliver("peer", &[i]);
        }
        assert_eq!(q.dropped(), 2, "two over the count limit");
        let got = q.drain(|_| true);
        assert_eq!(
            got.iter().map(|n| n.msg[0]).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        tx.deliver("peer", b"again");
        assert_eq!(q.drain(|_| true).len(), 1, "room again after draining");
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn the_byte_limit_counts_messages_and_names_and_frees_on_every_removal() {
        // "p" (1 byte) + 9-byte messages: 10 bytes each, 30 allowed.
        let q = NotifQueue::with_limits(NotifLimits {
            max_queued: 100,
            max_queued_bytes: 30,
        });
        let tx = q.sender(0);
        for _ in 0..4 {
            tx.deliver("p", &[7; 9]);
        }
        assert_eq!(q.dropped(), 1);
        // Removal through the async path frees bytes too.
        let (_c, w) = counter();
        let id = q.new_consumer();
        assert!(matches!(q.pop_or_register(id, &w), Popped::Item(_)));
        tx.deliver("p", &[7; 9]);
        assert_eq!(q.dropped(), 1, "one taken, one more fits");
        // A filtered drain frees what it takes.
        let other = q.sender(1);
        q.drain(|b| b == 0);
        other.deliver("p", &[7; 9]);
        other.deliver("p", &[7; 9]);
        other.deliver("p", &[7; 9]);
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.drain(|_| true).len(), 3);
    }
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn pop_or_register_yields_in_order_and_a_push_wakes_the_registered() {
        let q = NotifQueue::new();
        let tx = q.sender(2);
        let (a, b) = (q.new_consumer(), q.new_consumer());
        assert_ne!(a, b);
        let (ca, wa) = counter();
        let (cb, wb) = counter();
        assert_eq!(q.pop_or_register(a, &wa), Popped::Empty);
        assert_eq!(
            q.pop_or_register(a, &wa),
            Popped::Empty,
            "registering twice"
        );
        assert_eq!(q.pop_or_register(b, &wb), Popped::Empty);
        q.unregister(b);
        tx.deliver("x", b"1");
        tx.deliver("x", b"2");
        assert_eq!(
            ca.0.load(Ordering::SeqCst),
            1,
            "one wake for the registered consumer"
        );
        assert_eq!(
            cb.0.load(Ordering::SeqCst),
            0,
            "unregistered consumers are not woken"
        );
        for m in [b"1", b"2"] {
            match q.pop_or_register(a, &wa) {
                Popped::Item(n) => {
                    assert_eq!((n.from.as_str(), &n.msg[..], n.backend), ("x", &m[..], 2))
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(q.is_empty());
        assert_eq!(q.pop_or_register(a, &wa), Popped::Empty);
        q.close();
        assert_eq!(ca.0.load(Ordering::SeqCst), 2, "close wakes the registered");
        assert_eq!(q.pop_or_register(a, &wa), Popped::Closed);
        tx.deliver("x", b"3");
        assert_eq!(q.drain(|_| true).len(), 1, "the blocking API keeps working");
    }

    #[test]
    fn no_wakeup_is_lost_between_the_look_and_the_registration() {
        // A consumer that finds the queue empty either sees a concurrent push or is woken by it.
        for _ in 0..200 {
            let q = NotifQueue::new();
            let tx = q.sender(0);
            let id = q.new_consumer();
            let (c, w) = counter();
            let pusher = std::thread::spawn(move || tx.deliver("p", b""));
            let got = q.pop_or_register(id, &w);
            pusher.join().unwrap();
            match got {
                Popped::Item(_) => {}
                Popped::Empty => assert_eq!(c.0.load(Ordering::SeqCst), 1, "lost wake-up"),
                Popped::Closed => panic!("not closed"),
            }
        }
    }
}
