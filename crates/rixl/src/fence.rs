//! Region fences: deregistration waits for the posts that use a region.
//!
//! `Agent::register_mem` asks the application to keep a region valid until it is deregistered;
//! the agent in turn must not let a backend touch the region after `deregister_mem` returns,
//! or "deregister, then free" would be a use-after-free. Every local registration therefore
//! has a [`RegionFence`]: a count of posts in flight that use the region and a `closed` flag.
//!
//! - A post pins every region its request uses (`fetch_add`, then checks `closed`) before the
//!   backend sees it, and unpins them when the post ends: completed, failed, or cancelled with
//!   the backend's promise that no byte of it lands any more. The unpinning runs from the
//!   request's completion cell, so it happens exactly once per post whoever ends it.
//! - Deregistration closes the fences first (new posts then fail with `NotFound`), waits,
//!   outside every agent lock, until their counts reach zero, and only then removes the regions
//!   and tells the backends. If posts still hold a region when the agent's
//!   `deregister_timeout` passes, it reopens the fences and fails with `Timeout`: the regions
//!   stay registered and usable, and the caller knows not to free them.
//!
//! The pin and the close are each a sequentially consistent store followed by a load of the
//! other's variable, so a post and a deregistration racing each other cannot both miss the
//! other: either the post sees `closed` and backs off, or the deregistration sees its pin and
//! waits. Cost per post: two atomic read-modify-writes per distinct region used (one pin, one
//! unpin) and a load; a request over one region pays about 20 ns, a KV-cache request whose
//! prepared lists span 64 regions about 1–2 µs on a post that moves megabytes.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The in-flight count and closed flag of one local registration.
#[derive(Debug)]
pub(crate) struct RegionFence {
    /// The registration's agent-wide id, for error messages.
    pub id: u64,
    inflight: AtomicU64,
    closed: AtomicBool,
    /// What the backend said when it was told to deregister the region: one of `RELEASE_*`.
    /// Handles (`owned`) read it to know whether the memory may be freed, also when the
    /// agent's teardown, not the handle, deregistered the region.
    release: AtomicU8,
}

const RELEASE_PENDING: u8 = 0;
const RELEASE_OK: u8 = 1;
const RELEASE_FAILED: u8 = 2;

impl RegionFence {
    pub fn new(id: u64) -> Arc<RegionFence> {
        Arc::new(RegionFence {
            id,
            inflight: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            release: AtomicU8::new(RELEASE_PENDING),
        })
    }

    /// Counts one more post in flight; fails (and counts nothing) if the region is closed.
    fn pin(&self) -> bool {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.unpin();
            return false;
        }
        true
    }

    fn unpin(&self) {
        let before = self.inflight.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "unpinned a region fence more often than pinned");
    }

    /// True while the region is registered and not being deregistered.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Closes the fence to new posts. Returns false if it was closed already (another
    /// deregistration holds it).
    pub fn close(&self) -> bool {
        self.closed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Opens a fence closed by [`RegionFence::close`] again (a deregistration that gave up).
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }

    /// Posts in flight that use the region.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Records that the backend's `deregister` returned for the region (`ok`: successfully).
    /// Called after the region left the agent's index, with its fence closed for good.
    pub fn mark_released(&self, ok: bool) {
        let v = if ok { RELEASE_OK } else { RELEASE_FAILED };
        self.release.store(v, Ordering::Release);
    }

    /// `None` while the region is registered; then whether the backend released it without
    /// error.
    pub fn released(&self) -> Option<bool> {
        match self.release.load(Ordering::Acquire) {
            RELEASE_PENDING => None,
            v => Some(v == RELEASE_OK),
        }
    }
}

/// Waits until no post uses any of `fences`, or `deadline` passes. Returns the fences still in
/// use at the deadline (empty on success). Sleeps between looks, starting at a few
/// microseconds (a post usually ends within one) and backing off to a millisecond.
pub(crate) fn wait_idle(fences: &[Arc<RegionFence>], deadline: Instant) -> Vec<Arc<RegionFence>> {
    let mut pause = Duration::from_micros(2);
    loop {
        let busy: Vec<Arc<RegionFence>> = fences
            .iter()
            .filter(|f| f.inflight() > 0)
            .cloned()
            .collect();
        if busy.is_empty() || Instant::now() >= deadline {
            return busy;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// How [`wait_released`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Released {
    /// Every region was released by its backend and no post uses any of them.
    All,
    /// A backend failed to release this many of the regions (no post uses any of them).
    Failed(usize),
    /// At the deadline, this many regions were still registered or used by a post.
    Pending(usize),
}

/// Waits until the backend has released every region of `fences` and no post uses any of
/// them, or `deadline` passes: after that, nothing touches their memory any more. Polls like
/// [`wait_idle`].
pub(crate) fn wait_released(fences: &[Arc<RegionFence>], deadline: Instant) -> Released {
    let mut pause = Duration::from_micros(2);
    loop {
        let pending = fences
            .iter()
            .filter(|f| f.released().is_none() || f.inflight() > 0)
            .count();
        if pending == 0 {
            let failed = fences
                .iter()
                .filter(|f| f.released() == Some(false))
                .count();
            return if failed == 0 {
                Released::All
            } else {
                Released::Failed(failed)
            };
        }
        if Instant::now() >= deadline {
            return Released::Pending(pending);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// The fences of the distinct regions a list or request uses, shareable.
pub(crate) type Fences = Arc<[Arc<RegionFence>]>;

/// The regions a request uses, in groups shared with the prepared lists it was made from.
#[derive(Debug, Default)]
pub(crate) struct PostPins {
    groups: Vec<Fences>,
}

impl PostPins {
    pub fn new(groups: Vec<Fences>) -> PostPins {
        PostPins { groups }
    }

    fn all(&self) -> impl Iterator<Item = &Arc<RegionFence>> {
        self.groups.iter().flat_map(|g| g.iter())
    }

    /// Pins every region for one post. On failure nothing stays pinned and the closed
    /// region's id is returned.
    pub fn pin(&self) -> Result<(), u64> {
        for (pinned, f) in self.all().enumerate() {
            if !f.pin() {
                self.all().take(pinned).for_each(|f| f.unpin());
                return Err(f.id);
            }
        }
        Ok(())
    }

    /// Releases one post's pins.
    pub fn unpin(&self) {
        self.all().for_each(|f| f.unpin());
    }

    /// The id of a region that is closed, if any (a check without pinning).
    pub fn first_closed(&self) -> Option<u64> {
        self.all().find(|f| !f.is_open()).map(|f| f.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_fence_refuses_pins_and_a_failed_pin_leaves_nothing_pinned() {
        let (a, b) = (RegionFence::new(1), RegionFence::new(2));
        let pins = PostPins::new(vec![Arc::from(vec![a.clone(), b.clone()])]);
        pins.pin().unwrap();
        assert_eq!((a.inflight(), b.inflight()), (1, 1));
        assert!(b.close());
        assert!(!b.close(), "a second close is refused");
        assert_eq!(pins.pin(), Err(2));
        assert_eq!(
            (a.inflight(), b.inflight()),
            (1, 1),
            "the failed pin undid itself"
        );
        assert_eq!(pins.first_closed(), Some(2));
        let busy = wait_idle(std::slice::from_ref(&b), Instant::now());
        assert_eq!(busy.len(), 1, "the first post still holds b");
        pins.unpin();
        assert!(wait_idle(&[a.clone(), b.clone()], Instant::now()).is_empty());
        b.reopen();
        assert_eq!(pins.first_closed(), None);
    }

    #[test]
    fn wait_released_needs_every_region_released_and_idle() {
        let (a, b) = (RegionFence::new(1), RegionFence::new(2));
        let both = [a.clone(), b.clone()];
        assert_eq!(a.released(), None);
        assert_eq!(wait_released(&both, Instant::now()), Released::Pending(2));
        a.mark_released(true);
        assert_eq!(a.released(), Some(true));
        assert_eq!(wait_released(&both, Instant::now()), Released::Pending(1));
        let pins = PostPins::new(vec![Arc::from(vec![b.clone()])]);
        pins.pin().unwrap();
        b.mark_released(false);
        assert_eq!(
            wait_released(&both, Instant::now()),
            Released::Pending(1),
            "a region a post still uses is pending even once released"
        );
        pins.unpin();
        assert_eq!(wait_released(&both, Instant::now()), Released::Failed(1));
        assert_eq!(
            wait_released(std::slice::from_ref(&a), Instant::now()),
            Released::All
        );
    }

    #[test]
    fn wait_idle_returns_when_the_last_post_ends() {
        let f = RegionFence::new(7);
        let pins = Arc::new(PostPins::new(vec![Arc::from(vec![f.clone()])]));
        pins.pin().unwrap();
        assert!(f.close());
        let ender = {
            let pins = pins.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                pins.unpin();
            })
        };
        let busy = wait_idle(
            std::slice::from_ref(&f),
            Instant::now() + Duration::from_secs(30),
        );
        assert!(busy.is_empty());
        assert_eq!(f.inflight(), 0);
        ender.join().unwrap();
    }
}
