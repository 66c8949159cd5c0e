//! Transfers: `ShmXfer` copies a prepared list of segments with `process_vm_*` (`cma`), inline in
//! the posting thread or split across the worker pool (`pool`), sends the post's notification
//! once the data is in place, and answers cancel and cost estimates.
//!
//! The data path is kept apart from the control connections: it needs only the peer's liveness
//! (`peer`) and the notification send (`outbound`), and none of their internals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rixl_backend::{BackendXfer, PostOutcome};
use rixl_core::{
    CompletionHandle, CostEstimate, CostMethod, Error, ErrorKind, Result, Segment, SegmentVec,
    XferOp,
};

use crate::outbound::{connect_peer, send_notif_to};
use crate::peer::{peer_alive, Peer};
use crate::{cma, pool, Shared, NAME};

/// Pieces a large post is cut into are at least this big.
const MIN_PART: u64 = 256 << 10;
/// Segments are cut so that one system call moves at most this much (cancellation latency).
const MAX_CHUNK: u64 = 8 << 20;

/// The state of one post split across workers.
struct PostState {
    /// Parts not finished yet.
    remaining: Mutex<usize>,
    /// Workers inside a copy right now.
    active: Mutex<usize>,
    idle: Condvar,
    cancelled: AtomicBool,
    error: Mutex<Option<Error>>,
}

/// A prepared transfer to one peer.
pub(crate) struct ShmXfer {
    op: XferOp,
    peer: Arc<Peer>,
    shared: Arc<Shared>,
    local: Arc<SegmentVec>,
    remote: Arc<SegmentVec>,
    total: u64,
    pool: Option<Arc<pool::Pool>>,
    current: Mutex<Option<Arc<PostState>>>,
}

impl std::fmt::Debug for ShmXfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmXfer")
            .field("op", &self.op)
            .field("peer", &self.peer.name)
            .field("segments", &self.local.len())
            .field("bytes", &self.total)
            .finish()
    }
}

impl ShmXfer {
    /// `total` is the byte count of `local`; `pool` is given when posts are to be split
    /// across the workers.
    pub(crate) fn new(
        op: XferOp,
        peer: Arc<Peer>,
        shared: Arc<Shared>,
        local: SegmentVec,
        remote: SegmentVec,
        total: u64,
        pool: Option<Arc<pool::Pool>>,
    ) -> ShmXfer {
        ShmXfer {
            op,
            peer,
            shared,
            local: Arc::new(local),
            remote: Arc::new(remote),
            total,
            pool,
            current: Mutex::new(None),
        }
    }

    fn fail(&self, e: Error) -> Error {
        let e = e.with_peer(&self.peer.name);
        if e.kind() == ErrorKind::RemoteDisconnect {
            self.shared.lost(&self.peer, &e);
        }
        e
    }
}

/// Cuts `[local, remote]` into about `parts` pieces of similar size, splitting segments where
/// needed and keeping every piece's single system calls under `MAX_CHUNK`.
fn split(
    local: &[Segment],
    remote: &[Segment],
    parts: usize,
    total: u64,
) -> Vec<(Vec<Segment>, Vec<Segment>)> {
    let target = total.div_ceil(parts as u64).max(1);
    let mut out = Vec::with_capacity(parts);
    let (mut cl, mut cr): (Vec<Segment>, Vec<Segment>) = (Vec::new(), Vec::new());
    let mut filled = 0u64;
    for (l, r) in local.iter().zip(remote) {
        let mut off = 0u64;
        while off < l.len {
            let take = (l.len - off).min(target - filled).min(MAX_CHUNK);
            cl.push(Segment {
                addr: l.addr + off,
                len: take,
                ..*l
            });
            cr.push(Segment {
                addr: r.addr + off,
                len: take,
                ..*r
            });
            off += take;
            filled += take;
            if filled == target {
                out.push((std::mem::take(&mut cl), std::mem::take(&mut cr)));
                filled = 0;
            }
        }
    }
    if !cl.is_empty() {
        out.push((cl, cr));
    }
    out
}

impl BackendXfer for ShmXfer {
    fn post(&self, notif: Option<&[u8]>, done: CompletionHandle) -> Result<PostOutcome> {
        connect_peer(&self.shared, &self.peer).map_err(|e| self.fail(e))?;
        if !peer_alive(&self.peer) {
            return Err(self.fail(Error::remote_disconnect(format!(
                "agent {:?} is gone",
                self.peer.name
            ))));
        }
        let pid = self.peer.info.pid;
        let Some(pool) = &self.pool else {
            cma::transfer(pid, self.op, &self.local, &self.remote, || true)
                .map_err(|e| self.fail(e))?;
            if let Some(msg) = notif {
                send_notif_to(&self.shared, &self.peer, msg, true)?;
            }
            return Ok(PostOutcome::Done);
        };
        let parts_wanted = (self.total / MIN_PART).clamp(1, pool.size() as u64) as usize;
        let pieces = split(&self.local, &self.remote, parts_wanted, self.total);
        let state = Arc::new(PostState {
            remaining: Mutex::new(pieces.len()),
            active: Mutex::new(0),
            idle: Condvar::new(),
            cancelled: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        *self.current.lock() = Some(state.clone());
        let notif: Option<Arc<[u8]>> = notif.map(Arc::from);
        let mut pieces = pieces.into_iter();
        let first = pieces.next();
        for (l, r) in pieces {
            let (st, op, peer, shared, done, notif) = (
                state.clone(),
                self.op,
                self.peer.clone(),
                self.shared.clone(),
                done.clone(),
                notif.clone(),
            );
            pool.spawn(Box::new(move || {
                run_part(&st, op, &peer, &shared, &done, notif.as_deref(), &l, &r)
            }));
        }
        // The posting thread copies the first share itself, while the workers copy theirs: on
        // a small machine a spare core is rarer than a thread that would only wait (and whose
        // spinning would slow the workers down).
        if let Some((l, r)) = first {
            run_part(
                &state,
                self.op,
                &self.peer,
                &self.shared,
                &done,
                notif.as_deref(),
                &l,
                &r,
            );
        }
        Ok(PostOutcome::InProgress)
    }

    fn cancel(&self) -> Result<()> {
        let Some(st) = self.current.lock().clone() else {
            return Ok(());
        };
        let mut a = st.active.lock();
        st.cancelled.store(true, Ordering::SeqCst);
        while *a > 0 {
            st.idle.wait(&mut a);
        }
        Ok(())
    }

    fn estimate_cost(&self) -> Result<CostEstimate> {
        // Measured here: ~1.5 us per post plus ~5 GB/s.
        let duration_us = 2 + self.total / 5_000;
        Ok(CostEstimate {
            duration_us,
            margin_us: duration_us / 2,
            method: CostMethod::AnalyticalBackend,
        })
    }
}

impl Drop for ShmXfer {
    fn drop(&mut self) {
        let _ = self.cancel();
    }
}

/// Copies one share of a split post, unless the post was cancelled, and counts it done.
#[allow(clippy::too_many_arguments)]
fn run_part(
    st: &PostState,
    op: XferOp,
    peer: &Arc<Peer>,
    shared: &Arc<Shared>,
    done: &CompletionHandle,
    notif: Option<&[u8]>,
    l: &[Segment],
    r: &[Segment],
) {
    {
        let mut a = st.active.lock();
        if st.cancelled.load(Ordering::SeqCst) {
            drop(a);
            finish_part(st, shared, peer, done, notif);
            return;
        }
        *a += 1;
    }
    let res = cma::transfer(peer.info.pid, op, l, r, || {
        !st.cancelled.load(Ordering::SeqCst)
    });
    if let Err(e) = res {
        st.error.lock().get_or_insert(e.with_peer(&peer.name));
    }
    {
        let mut a = st.active.lock();
        *a -= 1;
        st.idle.notify_all();
    }
    finish_part(st, shared, peer, done, notif);
}

fn finish_part(
    st: &PostState,
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    done: &CompletionHandle,
    notif: Option<&[u8]>,
) {
    let last = {
        let mut r = st.remaining.lock();
        *r -= 1;
        *r == 0
    };
    if !last {
        return;
    }
    if st.cancelled.load(Ordering::SeqCst) {
        return; // The canceller reports the outcome.
    }
    let result = match st.error.lock().take() {
        Some(e) => {
            if e.kind() == ErrorKind::RemoteDisconnect {
                shared.lost(peer, &e);
            }
            Err(e.with_backend(NAME))
        }
        None => match notif {
            Some(msg) => send_notif_to(shared, peer, msg, true),
            None => Ok(()),
        },
    };
    done.complete(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_balances_and_covers() {
        let l = [
            Segment {
                addr: 0,
                len: 10 << 20,
                dev: 0,
                token: 1,
            },
            Segment {
                addr: 100 << 20,
                len: 3 << 20,
                dev: 0,
                token: 1,
            },
        ];
        let r = [
            Segment {
                addr: 1 << 30,
                len: 10 << 20,
                dev: 0,
                token: 2,
            },
            Segment {
                addr: 2 << 30,
                len: 3 << 20,
                dev: 0,
                token: 2,
            },
        ];
        let pieces = split(&l, &r, 2, 13 << 20);
        assert_eq!(pieces.len(), 2);
        let sum: u64 = pieces
            .iter()
            .flat_map(|(l, _)| l.iter())
            .map(|s| s.len)
            .sum();
        assert_eq!(sum, 13 << 20);
        for (pl, pr) in &pieces {
            for (a, b) in pl.iter().zip(pr) {
                assert_eq!(a.len, b.len);
                assert!(a.len <= MAX_CHUNK);
                // The same offset into the original segment on both sides.
                let k = l
                    .iter()
                    .position(|o| o.addr <= a.addr && a.addr < o.addr + o.len)
                    .unwrap();
                assert_eq!(b.addr - r[k].addr, a.addr - l[k].addr);
            }
        }
    }
}
