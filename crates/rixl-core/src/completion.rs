//! The completion cell: how a request learns that its post finished, without polling.
//!
//! Each request owns one [`Completion`] for its whole life. A post bumps its sequence number and
//! marks it in progress; the backend gets a [`CompletionHandle`] stamped with that sequence and
//! calls [`CompletionHandle::complete`] from whatever thread finishes the work. `status()` is one
//! atomic load; `wait(timeout)` spins for a few microseconds (small transfers finish in that time)
//! and then sleeps on a condition variable; async callers register a `Waker`. A completion from
//! an older post (one that was cancelled or timed out) carries an old sequence number and is
//! ignored, which is what makes cancellation fenced at this level.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// How long `wait` busy-spins before yielding.
const SPIN: Duration = Duration::from_micros(20);
/// How long `wait` keeps checking (yielding the CPU) before it sleeps.
const YIELD: Duration = Duration::from_micros(200);

const ST_IDLE: u64 = 0;
const ST_PROC: u64 = 1;
const ST_DONE: u64 = 2;
const ST_FAILED: u64 = 3;
const ST_MASK: u64 = 3;

/// What a post or a status query reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XferStatus {
    /// Still running (`NIXL_IN_PROG`, `"PROC"`).
    InProgress,
    /// Finished successfully (`NIXL_SUCCESS`, `"DONE"`).
    Done,
}

/// Monotonic microseconds since the first call in this process (for telemetry timestamps).
pub fn monotonic_micros() -> u64 {
    monotonic_nanos() / 1000
}

/// Monotonic nanoseconds since the first call in this process; never 0.
pub fn monotonic_nanos() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| Instant::now() - Duration::from_micros(1));
    base.elapsed().as_nanos() as u64
}

/// Runs once at the end of every post, whichever way it ends; see [`Completion::with_on_end`].
pub type OnEnd = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct EndHook(Option<OnEnd>);

impl std::fmt::Debug for EndHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// The per-request completion cell. See the module documentation.
#[derive(Debug, Default)]
pub struct Completion {
    /// `seq << 2 | status`.
    state: AtomicU64,
    /// Called once per post, right after it left the in-progress state (the agent releases the
    /// post's hold on its registered regions here).
    on_end: EndHook,
    /// A post ended by [`Completion::abort_holding`] whose backend could not promise to stop:
    /// its `on_end` runs only when the backend reports it finished after all (0: none).
    orphan: AtomicU64,
    /// Nanoseconds ([`monotonic_nanos`]) at which the current post completed.
    done_at: AtomicU64,
    waiters: AtomicUsize,
    slow: Mutex<Slow>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct Slow {
    /// The failure of post `seq`, if it failed.
    error: Option<(u64, Error)>,
    wakers: Vec<Waker>,
}

/// What a backend holds to report the end of one post.
#[derive(Clone, Debug)]
pub struct CompletionHandle {
    cell: Arc<Completion>,
    seq: u64,
}

impl Completion {
    /// A cell that has never been posted.
    pub fn new() -> Arc<Completion> {
        Arc::new(Completion::default())
    }

    /// A cell that runs `on_end` exactly once for every post that began, when it completes,
    /// fails or is aborted, before any waiter is woken. The hook must not block.
    pub fn with_on_end(on_end: OnEnd) -> Arc<Completion> {
        Arc::new(Completion {
            on_end: EndHook(Some(on_end)),
            ..Completion::default()
        })
    }

    /// Starts a new post: fails with `RepostActive` if one is still in progress.
    pub fn begin(self: &Arc<Self>) -> Result<CompletionHandle> {
        let cur = self.state.load(Ordering::Acquire);
        if cur & ST_MASK == ST_PROC {
            return Err(Error::repost_active(
                "the previous post of this request is still in progress",
            ));
        }
        let seq = (cur >> 2) + 1;
        let next = (seq << 2) | ST_PROC;
        self.state
            .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| {
                Error::repost_active("another thread posted this request at the same time")
            })?;
        Ok(CompletionHandle {
            cell: self.clone(),
            seq,
        })
    }

    /// Current status: `Err(NotPosted)` before the first post, the failure of the last post if
    /// it failed.
    #[inline]
    pub fn status(&self) -> Result<XferStatus> {
        let cur = self.state.load(Ordering::Acquire);
        match cur & ST_MASK {
            ST_PROC => Ok(XferStatus::InProgress),
            ST_DONE => Ok(XferStatus::Done),
            ST_IDLE => Err(Error::not_posted("the request was never posted")),
            _ => Err(self.error_of(cur >> 2)),
        }
    }

    /// True while a post is in progress.
    pub fn in_progress(&self) -> bool {
        self.state.load(Ordering::Acquire) & ST_MASK == ST_PROC
    }

    /// When the last post completed ([`monotonic_nanos`]), 0 if it has not.
    pub fn done_at_nanos(&self) -> u64 {
        self.done_at.load(Ordering::Acquire)
    }

    fn error_of(&self, seq: u64) -> Error {
        match &self.slow.lock().error {
            Some((s, e)) if *s == seq => e.clone(),
            _ => Error::unknown("the request failed but its error was lost"),
        }
    }

    /// Blocks until the current post is no longer in progress, or `timeout` passes
    /// (`None` waits forever). Returns the status; on timeout the post keeps running and
    /// `Err(Timeout)` is returned.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<XferStatus> {
        let start = Instant::now();
        // Small transfers finish within microseconds: spin briefly, then keep checking while
        // yielding the CPU (the thread that completes the post may need it; a network round
        // trip takes tens of microseconds), and only then sleep. Nothing spins while idle: this
        // runs only while a caller waits for a post in flight.
        let limit = timeout.unwrap_or(Duration::MAX);
        let (spin, yield_until) = (SPIN.min(limit), YIELD.min(limit));
        loop {
            if !self.in_progress() {
                return self.status();
            }
            let waited = start.elapsed();
            if waited >= yield_until {
                break;
            }
            if waited < spin {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let deadline = timeout.and_then(|t| start.checked_add(t));
        let mut slow = self.slow.lock();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            if self.state.load(Ordering::SeqCst) & ST_MASK != ST_PROC {
                break None;
            }
            match deadline {
                Some(d) => {
                    if self.cond.wait_until(&mut slow, d).timed_out() && self.in_progress() {
                        break Some(Error::timeout(format!(
                            "the transfer did not complete within {:?}",
                            timeout.unwrap_or_default()
                        )));
                    }
                }
                None => self.cond.wait(&mut slow),
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        drop(slow);
        match result {
            Some(e) => Err(e),
            None => self.status(),
        }
    }

    /// Polls for completion from async code (see [`CompletionFuture`]).
    pub fn poll_done(&self, cx: &mut Context<'_>) -> Poll<Result<XferStatus>> {
        if !self.in_progress() {
            return Poll::Ready(self.status());
        }
        {
            let mut slow = self.slow.lock();
            if !slow.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                slow.wakers.push(cx.waker().clone());
                // Each registered waker counts as a waiter until `finish` takes it.
                self.waiters.fetch_add(1, Ordering::SeqCst);
            }
        }
        if self.in_progress_seqcst() {
            Poll::Pending
        } else {
            Poll::Ready(self.status())
        }
    }

    /// Fails the post in progress, if any, with `err` (cancellation, deadline, peer death),
    /// after the backend promised that no byte of it moves any more. Returns whether a post was
    /// ended.
    pub fn abort(&self, err: Error) -> bool {
        let cur = self.state.load(Ordering::Acquire);
        cur & ST_MASK == ST_PROC && self.finish(cur >> 2, Err(err), true)
    }

    /// Fails the post in progress with `err` although the backend could not stop it (its
    /// cancel failed): the caller learns the outcome now, but the end hook (which releases the
    /// post's hold on its memory) runs only when the backend later reports the post finished.
    pub fn abort_holding(&self, err: Error) -> bool {
        let cur = self.state.load(Ordering::Acquire);
        if cur & ST_MASK != ST_PROC {
            return false;
        }
        let seq = cur >> 2;
        if !self.finish(seq, Err(err), false) {
            return false;
        }
        self.orphan.store(seq, Ordering::SeqCst);
        true
    }

    /// Runs the end hook of post `seq` if it was ended by [`Completion::abort_holding`] and its
    /// backend now reports it finished.
    fn release_orphan(&self, seq: u64) {
        if self
            .orphan
            .compare_exchange(seq, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            if let Some(hook) = &self.on_end.0 {
                hook();
            }
        }
    }

    fn in_progress_seqcst(&self) -> bool {
        self.state.load(Ordering::SeqCst) & ST_MASK == ST_PROC
    }

    /// Ends post `seq` if it is still the current, in-progress one, running the end hook if
    /// `release`. Returns whether it did.
    fn finish(&self, seq: u64, result: Result<()>, release: bool) -> bool {
        let from = (seq << 2) | ST_PROC;
        match result {
            Ok(()) => {
                if self
                    .state
                    .compare_exchange(
                        from,
                        (seq << 2) | ST_DONE,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_err()
                {
                    return false;
                }
            }
            Err(e) => {
                let mut slow = self.slow.lock();
                if self.state.load(Ordering::SeqCst) != from {
                    return false;
                }
                slow.error = Some((seq, e));
                self.state.store((seq << 2) | ST_FAILED, Ordering::SeqCst);
            }
        }
        self.done_at.store(monotonic_nanos(), Ordering::Release);
        if release {
            if let Some(hook) = &self.on_end.0 {
                hook();
            }
        }
        // The SeqCst state change above and the SeqCst increment in `wait`/`poll_done` order
        // each other: either the waiter sees the new state or we see the waiter.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let wakers = {
                let mut slow = self.slow.lock();
                self.cond.notify_all();
                let w = std::mem::take(&mut slow.wakers);
                self.waiters.fetch_sub(w.len(), Ordering::SeqCst);
                w
            };
            for w in wakers {
                w.wake();
            }
        }
        true
    }
}

impl CompletionHandle {
    /// Reports the end of the post this handle belongs to. A handle of an older post (the
    /// request was cancelled, failed or reposted since) does nothing and returns `false`.
    pub fn complete(&self, result: Result<()>) -> bool {
        if self.cell.finish(self.seq, result, true) {
            return true;
        }
        // Too late for the caller, who was told at `abort_holding`; the memory the post used
        // is free from now on.
        self.cell.release_orphan(self.seq);
        false
    }

    /// True while this handle's post is the current one and still running. Backends check it
    /// to stop early after a cancel.
    pub fn is_current(&self) -> bool {
        self.cell.state.load(Ordering::Acquire) == (self.seq << 2) | ST_PROC
    }

    /// The post number this handle belongs to.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A future resolving when a request's current post completes, or fails, as reported to the
/// cell. It only watches the cell: the agent's `rixl::XferFuture`, which requests return,
/// builds on [`Completion::poll_done`] and also honours deadlines, peer invalidation and drives
/// backend progress.
#[derive(Debug)]
pub struct CompletionFuture {
    cell: Arc<Completion>,
}

impl CompletionFuture {
    /// A future over `cell`.
    pub fn new(cell: Arc<Completion>) -> CompletionFuture {
        CompletionFuture { cell }
    }
}

impl std::future::Future for CompletionFuture {
    type Output = Result<XferStatus>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.cell.poll_done(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn lifecycle() {
        let c = Completion::new();
        assert_eq!(c.status().unwrap_err().kind(), ErrorKind::NotPosted);
        let h = c.begin().unwrap();
        assert_eq!(c.status().unwrap(), XferStatus::InProgress);
        assert_eq!(c.begin().unwrap_err().kind(), ErrorKind::RepostActive);
        assert!(h.complete(Ok(())));
        assert!(!h.complete(Ok(())), "a second completion is ignored");
        assert_eq!(c.status().unwrap(), XferStatus::Done);
        let h2 = c.begin().unwrap();
        assert!(
            !h.complete(Err(Error::backend("late"))),
            "stale post is fenced"
        );
        assert!(h2.complete(Err(Error::remote_disconnect("peer gone"))));
        assert_eq!(c.status().unwrap_err().kind(), ErrorKind::RemoteDisconnect);
        assert_eq!(
            c.wait(Some(Duration::ZERO)).unwrap_err().kind(),
            ErrorKind::RemoteDisconnect
        );
    }

    #[test]
    fn on_end_runs_once_per_post_whichever_way_it_ends() {
        let ended = Arc::new(AtomicUsize::new(0));
        let count = ended.clone();
        let c = Completion::with_on_end(Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        }));
        let h = c.begin().unwrap();
        assert_eq!(ended.load(Ordering::SeqCst), 0);
        assert!(h.complete(Ok(())));
        assert!(!h.complete(Ok(())));
        assert_eq!(ended.load(Ordering::SeqCst), 1);
        let h2 = c.begin().unwrap();
        assert!(c.abort(Error::canceled("stop")));
        assert!(
            !h2.complete(Ok(())),
            "a completion after the abort is ignored"
        );
        assert_eq!(ended.load(Ordering::SeqCst), 2);
        let h3 = c.begin().unwrap();
        assert!(h3.complete(Err(Error::backend("failed"))));
        assert!(!c.abort(Error::canceled("too late")));
        assert_eq!(ended.load(Ordering::SeqCst), 3);
        // A post whose backend could not stop: reported at once, released when it finishes.
        let h4 = c.begin().unwrap();
        assert!(c.abort_holding(Error::timeout("deadline")));
        assert_eq!(c.status().unwrap_err().kind(), crate::ErrorKind::Timeout);
        assert_eq!(
            ended.load(Ordering::SeqCst),
            3,
            "held until the backend finishes"
        );
        assert!(!h4.complete(Ok(())), "the caller already has its answer");
        assert_eq!(ended.load(Ordering::SeqCst), 4);
        assert!(!h4.complete(Ok(())));
        assert_eq!(ended.load(Ordering::SeqCst), 4, "released once");
    }

    #[test]
    fn wait_blocks_until_completed_from_another_thread() {
        let c = Completion::new();
        let h = c.begin().unwrap();
        assert_eq!(
            c.wait(Some(Duration::from_millis(5))).unwrap_err().kind(),
            ErrorKind::Timeout
        );
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            h.complete(Ok(()))
        });
        assert_eq!(c.wait(None).unwrap(), XferStatus::Done);
        assert!(t.join().unwrap());
    }

    #[test]
    fn future_wakes() {
        use std::future::Future;
        use std::sync::atomic::AtomicBool;
        use std::task::Wake;
        struct Flag(AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let c = Completion::new();
        let h = c.begin().unwrap();
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = CompletionFuture::new(c.clone());
        assert!(std::pin::Pin::new(&mut fut).poll(&mut cx).is_pending());
        h.complete(Ok(()));
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(matches!(
            std::pin::Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Ok(XferStatus::Done))
        ));
    }
}
