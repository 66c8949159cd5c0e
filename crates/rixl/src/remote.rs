//! The cache of other agents' metadata, with generations.
//!
//! [`RemoteTable`] maps a peer's name to its current [`RemoteEntry`]. It is its own part of the
//! agent because the cache has one rule the rest of the agent must not be able to break: a
//! load is atomic (a failed load leaves the cache exactly as it was, and no two loads or a load
//! and an invalidation interleave). So the table offers lookups ([`RemoteTable::get`],
//! [`RemoteTable::names`]), removal for invalidation ([`RemoteTable::remove`]), and a load
//! ([`RemoteTable::begin_load`]) that holds the write lock from validation to commit and
//! changes the map only in [`PendingLoad::commit`]: dropping the pending load on an error path
//! is the rollback. The phases of a load themselves (what is validated, what backends are told)
//! are the agent's, in `metadata`.
//!
//! Each loaded agent has one [`RemoteEntry`]. Prepared lists and requests keep an `Arc` to the
//! entry they were built against; invalidation clears the entry's `valid` flag and removes it
//! from the cache, so every later use of those handles fails with `NotFound` after one atomic
//! load, and a reload creates a fresh entry with a new generation.
//!
//! Invalidation also has to reach requests that are being awaited. `status()` notices a stale
//! entry when it is called, but an `XferFuture` is only polled when something wakes it, and the
//! backend may never complete a post to a peer that died (or whose metadata the application
//! dropped). So each entry keeps the wakers of the futures awaiting posts to that peer, and
//! [`RemoteEntry::invalidate`] wakes them after clearing `valid`; their next poll sees the entry
//! invalid and ends the post with `NotFound`, the same way `status()` does. Watching is
//! registered before validity is checked, and invalidation clears the flag before it takes the
//! wakers, under the same lock, so a future either sees the flag or is woken: never neither.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Waker;

use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use rixl_core::{MemType, RegIndex};

/// Source of generation numbers: global and monotonic, so a reloaded agent never reuses one.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// One region a peer published, as loaded into one of our backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RemoteRegion {
    pub public: Vec<u8>,
    pub token: u64,
}

/// The regions one of our backends loaded for one memory type of the peer.
#[derive(Debug)]
pub(crate) struct RemoteSection {
    pub mem: MemType,
    pub backend: usize,
    pub index: RegIndex<RemoteRegion>,
}

/// What we know about one peer.
#[derive(Debug, Default)]
pub(crate) struct RemoteState {
    /// Connection info accepted by our backend at that index.
    pub conn: Vec<(usize, Vec<u8>)>,
    /// Connection info offered for backends that could not reach the peer (kept to detect a
    /// restarted peer with different info).
    pub unreachable: Vec<(usize, Vec<u8>)>,
    pub sections: Vec<RemoteSection>,
}

impl RemoteState {
    pub fn conn_of(&self, backend: usize) -> Option<&[u8]> {
        self.conn
            .iter()
            .chain(&self.unreachable)
            .find(|(b, _)| *b == backend)
            .map(|(_, i)| i.as_slice())
    }

    pub fn reachable(&self, backend: usize) -> bool {
        self.conn.iter().any(|(b, _)| *b == backend)
    }

    pub fn section(&self, mem: MemType, backend: usize) -> Option<&RemoteSection> {
        self.sections
            .iter()
            .find(|s| s.mem == mem && s.backend == backend)
    }
}

/// A peer's cache entry.
#[derive(Debug)]
pub(crate) struct RemoteEntry {
    pub name: String,
    pub generation: u64,
    valid: AtomicBool,
    pub state: RwLock<RemoteState>,
    /// Wakers of the futures awaiting posts to this peer, woken by `invalidate`.
    watchers: Mutex<Watchers>,
}

#[derive(Debug, Default)]
struct Watchers {
    next_id: u64,
    wakers: HashMap<u64, Waker>,
    /// Set by `invalidate`: later watches are refused.
    closed: bool,
}

impl RemoteEntry {
    pub fn new(name: &str) -> RemoteEntry {
        RemoteEntry {
            name: name.to_owned(),
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            valid: AtomicBool::new(true),
            state: RwLock::new(RemoteState::default()),
            watchers: Mutex::new(Watchers::default()),
        }
    }

    #[inline]
    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    /// Marks the entry stale and wakes every watcher (see the module documentation).
    pub fn invalidate(&self) {
        self.valid.store(false, Ordering::Release);
        let wakers = {
            let mut w = self.watchers.lock();
            w.closed = true;
            std::mem::take(&mut w.wakers)
        };
        wakers.into_values().for_each(Waker::wake);
    }

    /// Has `waker` woken when the entry is invalidated: registers it under a new id, or
    /// replaces the waker of `id`. Returns the id, or `None` if the entry is invalid already
    /// (nothing is registered then).
    pub fn watch(&self, id: Option<u64>, waker: &Waker) -> Option<u64> {
        let mut w = self.watchers.lock();
        if w.closed {
            return None;
        }
        let id = id.unwrap_or_else(|| {
            w.next_id += 1;
            w.next_id
        });
        match w.wakers.get_mut(&id) {
            Some(old) => old.clone_from(waker),
            None => {
                w.wakers.insert(id, waker.clone());
            }
        }
        Some(id)
    }

    /// Removes watch `id` (a future that resolved or was dropped).
    pub fn unwatch(&self, id: u64) {
        self.watchers.lock().wakers.remove(&id);
    }
}

/// The loaded peers, by name (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct RemoteTable {
    entries: RwLock<HashMap<String, Arc<RemoteEntry>>>,
}

impl RemoteTable {
    /// The current entry of `agent`, if its metadata is loaded.
    pub fn get(&self, agent: &str) -> Option<Arc<RemoteEntry>> {
        self.entries.read().get(agent).cloned()
    }

    /// Names of the loaded peers.
    pub fn names(&self) -> Vec<String> {
        self.entries.read().keys().cloned().collect()
    }

    /// Takes `agent`'s entry out of the cache (the first step of an invalidation; the caller
    /// marks it stale and unloads it from the backends, outside the lock).
    pub fn remove(&self, agent: &str) -> Option<Arc<RemoteEntry>> {
        self.entries.write().remove(agent)
    }

    /// Starts loading metadata of `peer`: takes the write lock, held until the returned load
    /// is committed or dropped, so the entry it shows stays current throughout.
    pub fn begin_load<'a>(&'a self, peer: &'a str) -> PendingLoad<'a> {
        let entries = self.entries.write();
        let current = entries.get(peer).cloned();
        PendingLoad {
            peer,
            entries,
            current,
        }
    }
}

/// A load in progress, holding the cache's write lock. Dropping it changes nothing.
pub(crate) struct PendingLoad<'a> {
    peer: &'a str,
    entries: RwLockWriteGuard<'a, HashMap<String, Arc<RemoteEntry>>>,
    current: Option<Arc<RemoteEntry>>,
}

impl PendingLoad<'_> {
    /// The peer's entry as the load found it (`None` if the peer is not loaded).
    pub fn current(&self) -> Option<&Arc<RemoteEntry>> {
        self.current.as_ref()
    }

    /// Commits the load: `apply` adds the new parts to the peer's state (a fresh entry, with a
    /// new generation, if the peer was not loaded), then the entry is in the cache and the
    /// lock released.
    pub fn commit(mut self, apply: impl FnOnce(&mut RemoteState)) -> Arc<RemoteEntry> {
        let entry = match self.current.take() {
            Some(e) => e,
            None => {
                let e = Arc::new(RemoteEntry::new(self.peer));
                self.entries.insert(self.peer.to_owned(), e.clone());
                e
            }
        };
        apply(&mut entry.state.write());
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn invalidate_wakes_watchers_once_and_refuses_later_watches() {
        let e = RemoteEntry::new("peer");
        let (a, b, c) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let ia = e.watch(None, &Waker::from(a.clone())).unwrap();
        let ib = e.watch(None, &Waker::from(c.clone())).unwrap();
        assert_ne!(ia, ib);
        // Re-watching under the same id replaces the waker (the future moved to another task).
        assert_eq!(e.watch(Some(ib), &Waker::from(b.clone())), Some(ib));
        let ic = e.watch(None, &Waker::from(c.clone())).unwrap();
        e.unwatch(ic);
        assert!(e.is_valid());
        e.invalidate();
        assert!(!e.is_valid());
        assert_eq!(a.0.load(Ordering::SeqCst), 1);
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            c.0.load(Ordering::SeqCst),
            0,
            "replaced and unwatched wakers stay quiet"
        );
        assert_eq!(e.watch(None, &Waker::from(a.clone())), None);
        e.invalidate();
        assert_eq!(
            a.0.load(Ordering::SeqCst),
            1,
            "a second invalidation wakes nobody"
        );
    }
}
