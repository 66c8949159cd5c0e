//! The live registrations of the SHM instances in this process, for peers in this process.
//!
//! SHM's target takes no part in a transfer: the initiator writes with `process_vm_writev`,
//! and the kernel only checks that the pages exist. Across processes that is the documented
//! trust model (a same-user process could write there anyway). Between two agents of *one*
//! process it is not: a stale or forged metadata blob would let safe code make the initiator
//! write into memory its owner freed (an audit showed it, with a `Vec` reused by the
//! allocator). So each instance keeps its live regions here, and a post to a peer in this
//! process checks every target range against them and holds the read lock while it copies,
//! as LOOPBACK does; the target's deregistration takes the write lock, so it waits for such a
//! copy and no byte lands after it returns.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use rixl_core::{Error, Result, Segment};

/// One instance's registered regions: token → `(addr, len)`.
#[derive(Debug, Default)]
pub(crate) struct LiveRegions {
    regions: RwLock<HashMap<u64, (u64, u64)>>,
}

impl LiveRegions {
    pub(crate) fn insert(&self, token: u64, addr: u64, len: u64) {
        self.regions.write().insert(token, (addr, len));
    }

    /// Removes a region, waiting for copies into or out of it (they hold the read lock).
    pub(crate) fn remove(&self, token: u64) {
        self.regions.write().remove(&token);
    }

    /// Checks that every range of `segs` lies inside one live region and returns the read
    /// guard that keeps them live: hold it for the whole copy.
    pub(crate) fn check<'a>(
        &'a self,
        peer: &str,
        segs: &[Segment],
    ) -> Result<RwLockReadGuard<'a, HashMap<u64, (u64, u64)>>> {
        let live = self.regions.read();
        for s in segs {
            let inside = live.values().any(|&(a, l)| {
                a <= s.addr && s.addr.checked_add(s.len).is_some_and(|e| e <= a + l)
            });
            if !inside {
                return Err(Error::not_found(format!(
                    "agent {peer:?} (in this process) has no registered region covering {:#x}+{} \
                     (deregistered, or never registered)",
                    s.addr, s.len
                )));
            }
        }
        Ok(live)
    }
}

/// Socket path of each SHM instance alive in this process → its live regions. A peer in our
/// own process never "dies" for the kernel (its memory stays mapped), so its teardown is also
/// looked up here.
static LOCAL_INSTANCES: Mutex<Option<HashMap<String, Arc<LiveRegions>>>> = Mutex::new(None);

pub(crate) fn add_instance(socket: &str, live: Arc<LiveRegions>) {
    LOCAL_INSTANCES
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(socket.to_owned(), live);
}

pub(crate) fn remove_instance(socket: &str) {
    if let Some(m) = LOCAL_INSTANCES.lock().as_mut() {
        m.remove(socket);
    }
}

/// The live regions of the instance at `socket`, if it is alive in this process.
pub(crate) fn instance(socket: &str) -> Option<Arc<LiveRegions>> {
    LOCAL_INSTANCES.lock().as_ref()?.get(socket).cloned()
}
