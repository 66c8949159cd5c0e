//! Transfer requests: post, status, wait, cancel, telemetry.
//!
//! An [`XferRequest`] owns its backend transfer and its completion cell. `post` checks that
//! the peer's metadata is still valid, pins the local regions it uses (see `fence`: a
//! deregistration waits for pinned regions, and a region being deregistered refuses the pin),
//! starts a post on the completion cell (which enforces one active post and unpins when the
//! post ends), and hands the data to the backend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rixl_backend::{BackendXfer, PostOutcome};
use rixl_core::completion::{monotonic_micros, monotonic_nanos};
use rixl_core::{Completion, CostEstimate, Error, Result, XferOp, XferStatus};

use crate::agent::{Agent, AgentInner};
use crate::backends::BackendSlot;
use crate::fence::PostPins;
use crate::future::XferFuture;
use crate::prepared::PreparedList;
use crate::remote::RemoteEntry;

/// Per-request telemetry of the last post (NIXL's `nixlXferTelemetry`); durations in whole
/// microseconds, rounded up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XferTelemetry {
    /// Monotonic microseconds at the start of the last post.
    pub start_time_us: u64,
    /// Time spent inside the post call.
    pub post_duration_us: u64,
    /// Time from the start of the post until the data had moved.
    pub xfer_duration_us: u64,
    /// Bytes per post.
    pub total_bytes: u64,
    /// Descriptors per post, as NIXL counts them.
    pub desc_count: u64,
}

#[derive(Debug)]
pub(crate) struct ReqInner {
    agent: Arc<AgentInner>,
    op: XferOp,
    backend: BackendSlot,
    pub(crate) peer: Option<Arc<RemoteEntry>>,
    xfer: Box<dyn BackendXfer>,
    pub(crate) completion: Arc<Completion>,
    /// The notification attached to posts. Its lock is also the post lock: held from the
    /// start of a post until the backend's `post` call returns, and by every cancel, so that a
    /// cancel never runs while a backend is still inside `post` (where it may be copying with
    /// nothing recorded to stop yet) and never ends a post that began after it looked.
    notif: Mutex<Option<Vec<u8>>>,
    /// Registrations used on this agent's side(s), pinned by every post.
    pins: Arc<PostPins>,
    total_bytes: u64,
    desc_count: u64,
    segments: usize,
    timeout: Option<Duration>,
    post_start_ns: AtomicU64,
    post_duration_ns: AtomicU64,
}

/// A transfer request: post it, wait for it, repost it; dropping it releases it (cancelling a
/// post in flight).
#[derive(Debug)]
pub struct XferRequest {
    inner: Arc<ReqInner>,
}

impl XferRequest {
    /// A request around a backend transfer just prepared; `pins` are the local regions its
    /// posts use, unpinned by the completion cell whenever a post ends.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        agent: Arc<AgentInner>,
        op: XferOp,
        backend: BackendSlot,
        peer: Option<Arc<RemoteEntry>>,
        xfer: Box<dyn BackendXfer>,
        pins: Arc<PostPins>,
        notif: Option<Vec<u8>>,
        shape: RequestShape,
        timeout: Option<Duration>,
    ) -> XferRequest {
        let unpin = pins.clone();
        XferRequest {
            inner: Arc::new(ReqInner {
                agent,
                op,
                backend,
                peer,
                xfer,
                completion: Completion::with_on_end(Box::new(move || unpin.unpin())),
                notif: Mutex::new(notif),
                pins,
                total_bytes: shape.total_bytes,
                desc_count: shape.desc_count,
                segments: shape.segments,
                timeout,
                post_start_ns: AtomicU64::new(0),
                post_duration_ns: AtomicU64::new(0),
            }),
        }
    }
}

/// Sizes of a request, fixed when it is built.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestShape {
    /// Bytes per post.
    pub total_bytes: u64,
    /// Descriptors per post, as NIXL counts them.
    pub desc_count: u64,
    /// Descriptors the backend receives after merging.
    pub segments: usize,
}

impl XferRequest {
    /// Posts the request with its current notification. Returns `Done` if the data moved
    /// before the call returned, `InProgress` otherwise.
    pub fn post(&self) -> Result<XferStatus> {
        self.post_inner(None)
    }

    /// Posts with `notif`, which replaces the request's notification for this post and all
    /// later ones (NIXL's stickiness). An empty message is sent as an empty notification.
    pub fn post_with_notif(&self, notif: &[u8]) -> Result<XferStatus> {
        self.post_inner(Some(notif))
    }

    /// Replaces (or clears, with `None`) the notification attached to later posts.
    pub fn set_notif(&self, notif: Option<Vec<u8>>) {
        *self.inner.notif.lock() = notif;
    }

    fn check_usable(&self) -> Result<()> {
        let r = &*self.inner;
        if !r.agent.is_alive() {
            return Err(Error::not_found("the agent of this request was dropped"));
        }
        if let Some(p) = &r.peer {
            if !p.is_valid() {
                return Err(Error::not_found(format!(
                    "the metadata of agent {:?} was invalidated after this request was made",
                    p.name
                ))
                .with_peer(&p.name));
            }
        }
        Ok(())
    }

    fn deregistered(id: u64) -> Error {
        Error::not_found(format!(
            "a registration this request uses was deregistered (region id {id})"
        ))
    }

    fn post_inner(&self, notif: Option<&[u8]>) -> Result<XferStatus> {
        let r = &*self.inner;
        self.check_usable()
            .map_err(|e| e.with_backend(&r.backend.name).with_op(r.op))?;
        let telemetry = r.agent.config().capture_telemetry;
        // The deadline counts from here, so the start is recorded for timed requests too, and
        // before the post begins: a concurrent `status()` or future of this request must never
        // judge the new post by the previous post's start.
        let timed = telemetry || r.timeout.is_some();
        let start = if timed { monotonic_nanos() } else { 0 };
        if notif.is_some() && !r.backend.caps.notif {
            return Err(Error::backend(format!(
                "a notification was given but backend {} cannot carry notifications",
                r.backend.name
            ))
            .with_backend(&r.backend.name)
            .with_op(r.op));
        }
        // Pin the regions before the post begins: from here until the completion cell ends
        // the post (and unpins), deregistration of any of them waits.
        r.pins.pin().map_err(|id| {
            Self::deregistered(id)
                .with_backend(&r.backend.name)
                .with_op(r.op)
        })?;
        let mut guard = r.notif.lock();
        let prev_start = if timed {
            r.post_start_ns.swap(start, Ordering::AcqRel)
        } else {
            0
        };
        let handle = match r.completion.begin() {
            Ok(h) => h,
            Err(e) => {
                r.pins.unpin();
                if timed {
                    // The post in progress keeps its own start.
                    let _ = r.post_start_ns.compare_exchange(
                        start,
                        prev_start,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                return Err(e);
            }
        };
        if let Some(n) = notif {
            *guard = Some(n.to_vec());
        }
        let result = r.xfer.post(guard.as_deref(), handle.clone());
        drop(guard);
        let status = match result {
            Ok(PostOutcome::Done) => {
                handle.complete(Ok(()));
                Ok(XferStatus::Done)
            }
            Ok(PostOutcome::InProgress) => Ok(XferStatus::InProgress),
            Err(e) => {
                let e = r.decorate(e);
                handle.complete(Err(e.clone()));
                r.on_error(&e);
                Err(e)
            }
        };
        if telemetry {
            r.post_duration_ns.store(
                monotonic_nanos().saturating_sub(start).max(1),
                Ordering::Release,
            );
        }
        status
    }

    /// The status of the last post: `InProgress`, `Done`, or its error. `NotPosted` before the
    /// first post. A post past its deadline is cancelled and reported as `Timeout`.
    pub fn status(&self) -> Result<XferStatus> {
        self.inner.settle(Duration::ZERO)
    }

    /// Blocks until the current post completes (or `timeout`, or the request's own deadline,
    /// passes). Without a post in progress it returns the last status at once. On `timeout`
    /// the post keeps running and `Timeout` is returned; at the request's deadline the post is
    /// cancelled.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<XferStatus> {
        let r = &*self.inner;
        let deadline_left = r
            .deadline_nanos()
            .map(|d| Duration::from_nanos(d.saturating_sub(monotonic_nanos())));
        let effective = match (timeout, deadline_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let started = Instant::now();
        // Let the backend drive the post on this thread first (TCP reads its connection here
        // instead of waking its reader thread); it returns when the post completed or after a
        // short spin of its own choosing, and the completion cell takes over from there.
        if r.completion.in_progress() {
            r.xfer.progress(effective.unwrap_or(Duration::MAX));
        }
        let effective = effective.map(|t| t.saturating_sub(started.elapsed()));
        match r.completion.wait(effective) {
            Err(e) if e.kind() == rixl_core::ErrorKind::Timeout => {
                if deadline_left.is_some_and(|d| started.elapsed() >= d) {
                    return r.expire();
                }
                Err(r.decorate(e))
            }
            Err(e) => {
                r.on_error(&e);
                Err(e)
            }
            ok => ok,
        }
    }

    /// A future resolving with what [`XferRequest::wait`] would return for the current post:
    /// `Done`, the post's error, `Timeout` once the request's deadline passes (the post is then
    /// cancelled, as `status()` does), or `NotFound` as soon as the peer's metadata is
    /// invalidated. Before any post it resolves at once with `NotPosted`. It needs no async
    /// runtime; see [`XferFuture`].
    pub fn completion(&self) -> XferFuture {
        XferFuture::new(self.inner.clone())
    }

    /// Cancels the post in progress, if any. When this returns no byte of it lands any more,
    /// and its status is `Canceled`. A request that already completed keeps its status.
    pub fn cancel(&self) -> Result<()> {
        let r = &*self.inner;
        // The post lock: not while `post` is still running, and no new post meanwhile.
        let _post = r.notif.lock();
        if !r.completion.in_progress() {
            return Ok(());
        }
        r.xfer.cancel().map_err(|e| r.decorate(e))?;
        r.completion
            .abort(r.decorate(Error::canceled("the transfer was cancelled")));
        Ok(())
    }

    /// Releases the request, cancelling a post in flight (same as dropping it, but reports a
    /// failed cancel).
    pub fn release(self) -> Result<()> {
        self.cancel()
    }

    /// Telemetry of the last post. `NoTelemetry` when telemetry is off; `NotPosted` before the
    /// first post.
    pub fn telemetry(&self) -> Result<XferTelemetry> {
        let r = &*self.inner;
        if !r.agent.config().capture_telemetry {
            return Err(Error::no_telemetry(
                "telemetry is disabled (enable it in AgentConfig or with NIXL_TELEMETRY_ENABLE=1)",
            ));
        }
        let start = r.post_start_ns.load(Ordering::Acquire);
        if start == 0 {
            return Err(Error::not_posted("the request was never posted"));
        }
        let up = |ns: u64| ns.div_ceil(1000).max(1);
        let post = up(r.post_duration_ns.load(Ordering::Acquire));
        let done = r.completion.done_at_nanos();
        let xfer = if r.completion.in_progress() || done < start {
            up(monotonic_nanos() - start)
        } else {
            up(done - start)
        };
        Ok(XferTelemetry {
            start_time_us: (start / 1000).max(1),
            post_duration_us: post,
            xfer_duration_us: xfer.max(post),
            total_bytes: r.total_bytes,
            desc_count: r.desc_count,
        })
    }

    /// Estimated duration of one post, from the backend.
    pub fn estimate_cost(&self) -> Result<CostEstimate> {
        self.check_usable()?;
        if let Some(id) = self.inner.pins.first_closed() {
            return Err(Self::deregistered(id));
        }
        self.inner
            .xfer
            .estimate_cost()
            .map_err(|e| self.inner.decorate(e))
    }

    /// The backend this request uses.
    pub fn backend_name(&self) -> &str {
        &self.inner.backend.name
    }

    /// READ or WRITE.
    pub fn op(&self) -> XferOp {
        self.inner.op
    }

    /// The target agent's name (this agent's own name for loopback).
    pub fn peer(&self) -> &str {
        self.inner
            .peer
            .as_ref()
            .map_or(self.inner.agent.name(), |p| p.name.as_str())
    }

    /// Bytes moved per post.
    pub fn total_bytes(&self) -> u64 {
        self.inner.total_bytes
    }

    /// Descriptors per post as NIXL counts them (see [`XferTelemetry::desc_count`]).
    pub fn desc_count(&self) -> u64 {
        self.inner.desc_count
    }

    /// Descriptors the backend actually receives after merging.
    pub fn segment_count(&self) -> usize {
        self.inner.segments
    }
}

/// The progress budget of a future's poll: one look at the backend's work, as a zero budget
/// would be, but without announcing more polls to come. With `Duration::ZERO` TCP leases the
/// connection to the poller for 500 us (its reader thread sleeps through data meanwhile, and
/// takes over in 1 ms steps), which made an awaited 4 KiB write over loopback take ~1.06 ms
/// instead of ~28 us (release build, 2-core VM).
pub(crate) const ONE_STEP: Duration = Duration::from_nanos(1);

impl ReqInner {
    pub(crate) fn decorate(&self, e: Error) -> Error {
        let e = e.with_backend(&self.backend.name).with_op(self.op);
        match &self.peer {
            Some(p) => e.with_peer(&p.name),
            None => e,
        }
    }

    fn on_error(&self, e: &Error) {
        if e.kind() == rixl_core::ErrorKind::RemoteDisconnect {
            if let Some(p) = &self.peer {
                self.agent.invalidate_remote(&p.name);
            }
        }
    }

    /// `status()`: one progress step with `budget` (see below), then the cell's status; a post
    /// in flight is ended here if its peer was invalidated (`NotFound`) or its deadline passed
    /// (`Timeout`). Shared by `XferRequest::status` and `XferFuture`, so that both report the
    /// same thing.
    ///
    /// `status()` passes a zero budget, which tells the backend that the caller polls in a
    /// loop (TCP then reads the connection itself and keeps its reader thread from being woken
    /// by data for a short lease). A future is polled again only when woken, so it passes
    /// [`ONE_STEP`]: one non-blocking attempt that promises no further polls.
    pub(crate) fn settle(&self, budget: Duration) -> Result<XferStatus> {
        if self.completion.in_progress() {
            // One non-blocking step of the backend's work on this thread (TCP reads its
            // connection), so that a caller polling in a loop sees the completion as soon as
            // it arrives rather than after a backend thread has been woken to handle it.
            self.xfer.progress(budget);
        }
        let s = self.completion.status();
        match &s {
            Ok(XferStatus::InProgress) => {
                if let Some(p) = &self.peer {
                    if !p.is_valid() {
                        let e = Error::not_found(format!(
                            "the metadata of agent {:?} was invalidated while this request was in flight",
                            p.name
                        ));
                        self.end_in_flight(self.decorate(e));
                        return self.completion.status();
                    }
                }
                if self.deadline_passed() {
                    return self.expire();
                }
            }
            Err(e) => self.on_error(e),
            _ => {}
        }
        s
    }

    /// When the current post's deadline passes, in [`monotonic_nanos`]; `None` without a
    /// deadline or before the first post.
    pub(crate) fn deadline_nanos(&self) -> Option<u64> {
        let t = self.timeout?;
        let start = self.post_start_ns.load(Ordering::Acquire);
        (start != 0).then(|| start.saturating_add(t.as_nanos().min(u64::MAX as u128) as u64))
    }

    fn deadline_passed(&self) -> bool {
        self.deadline_nanos().is_some_and(|d| monotonic_nanos() > d)
    }

    fn expire(&self) -> Result<XferStatus> {
        let t = self.timeout.unwrap_or_default();
        self.end_in_flight(self.decorate(Error::timeout(format!(
            "the transfer did not complete within {t:?}"
        ))));
        self.completion.status()
    }

    /// Ends the post in flight with `err` for the caller (deadline, invalidated peer). The
    /// post's memory is released only if the backend's cancel promised that nothing of it moves
    /// any more; otherwise the regions stay pinned until the backend reports the post finished
    /// (so a deregistration waits, or times out, rather than free memory still in use).
    fn end_in_flight(&self, err: Error) {
        let _post = self.notif.lock();
        if !self.completion.in_progress() {
            return;
        }
        match self.xfer.cancel() {
            Ok(()) => {
                self.completion.abort(err);
            }
            Err(cancel_err) => {
                tracing::warn!(
                    "{err}; the backend could not stop the post ({cancel_err}): its regions stay \
                     registered until it finishes"
                );
                self.completion.abort_holding(err);
            }
        }
    }
}

impl Drop for XferRequest {
    fn drop(&mut self) {
        if let Err(e) = self.cancel() {
            tracing::warn!("cancelling a request on release failed: {e}");
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Agent>();
    is::<XferRequest>();
    is::<PreparedList>();
    let _ = monotonic_micros;
}
