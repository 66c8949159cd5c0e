//! The cache of other agents' metadata, with generations.
//!
//! Each loaded agent has one [`RemoteEntry`]. Prepared lists and requests keep an `Arc` to the
//! entry they were built against; invalidation clears the entry's `valid` flag and removes it
//! from the cache, so every later use of those handles fails with `NotFound` after one atomic
//! load, and a reload creates a fresh entry with a new generation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;
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
}

impl RemoteEntry {
    pub fn new(name: &str) -> RemoteEntry {
        RemoteEntry {
            name: name.to_owned(),
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            valid: AtomicBool::new(true),
            state: RwLock::new(RemoteState::default()),
        }
    }

    #[inline]
    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    pub fn invalidate(&self) {
        self.valid.store(false, Ordering::Release);
    }
}
