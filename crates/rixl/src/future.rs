//! [`XferFuture`]: awaiting a request without an async runtime, and without losing what
//! `status()` and `wait()` guarantee.
//!
//! A request's post can end in four ways, and the future must notice each without anybody
//! polling in a loop:
//!
//! - **The backend completes it.** The completion cell wakes the wakers registered with
//!   [`Completion::poll_done`](rixl_core::Completion::poll_done) (the primitive, in core).
//! - **Its deadline passes** (`XferOptions::timeout`). Nothing in the request happens at that
//!   moment, so the future registers the deadline with the process-wide timer thread (see
//!   `timer`); the wake-up makes the next poll cancel the post and resolve `Timeout`, exactly
//!   as `status()` does once the deadline passed.
//! - **The peer's metadata is invalidated** (by the application, by the listener, or by a
//!   backend that detected the peer's death). The future watches the peer's cache entry, whose
//!   `invalidate()` wakes it (see `remote`); the next poll ends the post with `NotFound`, as
//!   `status()` does. Without this a post to a dead peer could wait for a backend that never
//!   completes it.
//! - **The request is cancelled or dropped**: the cell is aborted, which wakes the future.
//!
//! Each poll registers the current task's waker with all three sources *before* it looks at
//! the request (so an event between the look and the `Pending` still wakes the task), then does
//! what `status()` does: one non-blocking progress step of the backend, the cell's status, the
//! validity and deadline checks. The progress step is made with a 1 ns budget rather than
//! `status()`'s zero: to TCP a zero budget means a caller polling in a loop, and it stops waking
//! its reader thread for data for a while, which a future (polled again only when woken) would
//! pay for with about a millisecond per awaited post. Registrations are refreshed only when the waker or the
//! deadline (a repost) changed, and are removed when the future resolves or is dropped, so a
//! finished future leaves nothing behind in the timer or the peer's entry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use rixl_core::completion::monotonic_nanos;
use rixl_core::{Result, XferStatus};

use crate::request::{ReqInner, ONE_STEP};
use crate::timer::TimerEntry;

/// The future returned by [`XferRequest::completion`](crate::XferRequest::completion): resolves
/// with what [`XferRequest::wait`](crate::XferRequest::wait) would return for the request's
/// current post, honouring the request's deadline and the peer's invalidation. See the module
/// documentation of `future` for how it is woken.
///
/// It works under any executor (or `rixl_testkit::block_on`), is `Send`, and does not borrow
/// the request: it may be moved to another thread. Dropping it does not cancel the post.
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct XferFuture {
    req: Arc<ReqInner>,
    /// The deadline ([`monotonic_nanos`]) the timer entry wakes for, and the entry's waker.
    timer: Option<(u64, TimerEntry, Waker)>,
    /// The watch on the peer's entry, and its waker.
    watch: Option<(u64, Waker)>,
}

impl XferFuture {
    pub(crate) fn new(req: Arc<ReqInner>) -> XferFuture {
        XferFuture {
            req,
            timer: None,
            watch: None,
        }
    }

    /// Registers `waker` with the peer's entry and the timer, unless it already is.
    fn arm(&mut self, waker: &Waker) {
        let r = &*self.req;
        if let Some(p) = &r.peer {
            let current = matches!(&self.watch, Some((_, w)) if w.will_wake(waker));
            if !current {
                let id = self.watch.as_ref().map(|(id, _)| *id);
                // `None`: already invalid; the checks after arming end the post.
                self.watch = p.watch(id, waker).map(|id| (id, waker.clone()));
            }
        }
        match r.deadline_nanos() {
            Some(d) => {
                let current =
                    matches!(&self.timer, Some((at, _, w)) if *at == d && w.will_wake(waker));
                if !current {
                    self.timer = None;
                    // Fire just past the deadline (the check is strict), by the same clock:
                    // `monotonic_nanos` counts `Instant`s.
                    let left = Duration::from_nanos(
                        d.saturating_sub(monotonic_nanos()).saturating_add(1_000),
                    );
                    let at = Instant::now().checked_add(left);
                    // A deadline beyond what `Instant` holds never fires.
                    self.timer =
                        at.map(|at| (d, TimerEntry::register(at, waker.clone()), waker.clone()));
                }
            }
            None => self.timer = None,
        }
    }

    /// Drops the registrations (the future resolved or is dropped).
    fn disarm(&mut self) {
        self.timer = None;
        if let (Some((id, _)), Some(p)) = (self.watch.take(), &self.req.peer) {
            p.unwatch(id);
        }
    }
}

impl Future for XferFuture {
    type Output = Result<XferStatus>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.req.completion.in_progress() {
            // Register first, look second: whatever ends the post after the look wakes us.
            let _ = this.req.completion.poll_done(cx);
            this.arm(cx.waker());
        }
        match this.req.settle(ONE_STEP) {
            Ok(XferStatus::InProgress) => Poll::Pending,
            done => {
                this.disarm();
                Poll::Ready(done)
            }
        }
    }
}

impl Drop for XferFuture {
    fn drop(&mut self) {
        self.disarm();
    }
}
