//! Transfers: `ShmXfer` copies a prepared list of segments with `process_vm_*` (`cma`), or with a
//! plain copy when the agent is its own target ([`Target::Own`]), inline in the posting thread or
//! split across the worker pool (`pool`), sends the post's notification once the data is in
//! place, and answers cancel and cost estimates.
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
use crate::{cma, live, pool, Shared, NAME};

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

/// Where a transfer goes.
#[derive(Clone)]
pub(crate) enum Target {
    /// Another agent's process, reached with `process_vm_*` (`cma`).
    Peer(Arc<Peer>),
    /// This agent itself: a copy between two of its own registrations (`copy_own`), whose
    /// notification goes straight to the agent's own queue.
    Own,
}

impl Target {
    /// The target agent's name.
    fn name<'a>(&'a self, shared: &'a Shared) -> &'a str {
        match self {
            Target::Peer(p) => &p.name,
            Target::Own => shared.ctx.agent_name(),
        }
    }

    /// Checks, before a post, that the target can be reached (for a peer, its control
    /// connection is also the liveness check).
    fn ready(&self, shared: &Arc<Shared>) -> Result<()> {
        match self {
            Target::Peer(peer) => {
                connect_peer(shared, peer).map_err(|e| self.fail(shared, e))?;
                if !peer_alive(peer) {
                    return Err(self.fail(
                        shared,
                        Error::remote_disconnect(format!("agent {:?} is gone", peer.name)),
                    ));
                }
                Ok(())
            }
            Target::Own if shared.stopping.load(Ordering::SeqCst) => {
                Err(Error::not_found("the SHM backend was shut down"))
            }
            Target::Own => Ok(()),
        }
    }

    /// Moves `local[..]` ↔ `remote[..]`, consulting `keep_going` on the way (cancellation).
    ///
    /// # Safety
    ///
    /// `local` and `remote` are the segments of a [`ShmXfer`] made for this target (under the
    /// contract of [`ShmXfer::new`]), or pieces of them (`split`), and a post of that transfer
    /// is running, so every range of this agent lies in a live registration (for
    /// [`Target::Own`], both sides). No other part of the post running meanwhile writes a byte
    /// these read or write (see [`sides_disjoint`]).
    unsafe fn copy(
        &self,
        op: XferOp,
        local: &[Segment],
        remote: &[Segment],
        keep_going: impl FnMut() -> bool,
    ) -> Result<()> {
        match self {
            Target::Peer(peer) if peer.info.pid == std::process::id() => {
                // A peer in this process: its ranges are checked against its live
                // registrations, which stay live while `_live` is held (see `live`).
                let regions = live::instance(&peer.info.socket).ok_or_else(|| {
                    Error::remote_disconnect(format!(
                        "agent {:?} no longer exists in this process",
                        peer.name
                    ))
                })?;
                let _live = regions.check(&peer.name, remote)?;
                cma::transfer(peer.info.pid, op, local, remote, keep_going)
            }
            Target::Peer(peer) => cma::transfer(peer.info.pid, op, local, remote, keep_going),
            // SAFETY: forwarded from this function's contract.
            Target::Own => unsafe { copy_own(op, local, remote, keep_going) },
        }
    }

    /// Delivers a post's notification, once its data has landed.
    fn notify(&self, shared: &Arc<Shared>, msg: &[u8]) -> Result<()> {
        match self {
            Target::Peer(peer) => send_notif_to(shared, peer, msg, true),
            Target::Own => {
                shared.ctx.notifs().deliver(shared.ctx.agent_name(), msg);
                Ok(())
            }
        }
    }

    /// Adds the peer to an error, and tells the agent when it shows the peer is gone.
    fn fail(&self, shared: &Shared, e: Error) -> Error {
        match self {
            Target::Peer(peer) => {
                let e = e.with_peer(&peer.name);
                if e.kind() == ErrorKind::RemoteDisconnect {
                    shared.lost(peer, &e);
                }
                e
            }
            Target::Own => e,
        }
    }
}

/// A transfer to the agent itself: copies every segment pair inside this process with
/// [`rixl_copy::copy_bytes`] (SSE2 where glibc's `memmove` would hit its 4K-aliasing cliff;
/// `process_vm_writev` on our own pid hits it too and is ~4× slower anyway: see `rixl-copy`).
/// `keep_going` is consulted before every pair; pieces of split posts are at most
/// [`MAX_CHUNK`] long.
///
/// # Safety
///
/// As [`Target::copy`]: both sides lie in live registrations of this agent, which nothing
/// else writes (or reads, for the destination) while this runs.
unsafe fn copy_own(
    op: XferOp,
    local: &[Segment],
    remote: &[Segment],
    keep_going: impl FnMut() -> bool,
) -> Result<()> {
    // SAFETY: per this function's contract, both sides lie in memory of this process that the
    // agent registered (its `register_mem` caller promised it stays valid and untouched by the
    // program while registered) and keeps registered until the post ends, and no other thread
    // writes either side meanwhile.
    if unsafe { rixl_copy::copy_segments(op, local, remote, keep_going) } {
        Ok(())
    } else {
        Err(Error::canceled("the transfer was cancelled"))
    }
}

/// True when no byte that a transfer writes is also read or written by another of its segment
/// pairs or by its own source: the destination ranges are disjoint from each other and from
/// every source range. A transfer to the agent itself is split across threads only then; one
/// whose sides overlap is copied pair after pair by the posting thread, as a single
/// `memmove`-like pass would.
pub(crate) fn sides_disjoint(op: XferOp, local: &[Segment], remote: &[Segment]) -> bool {
    let (src, dst) = match op {
        XferOp::Write => (local, remote),
        XferOp::Read => (remote, local),
    };
    let mut ranges: Vec<(u64, u64, bool)> = src
        .iter()
        .map(|s| (s.addr, s.addr.saturating_add(s.len), false))
        .chain(
            dst.iter()
                .map(|s| (s.addr, s.addr.saturating_add(s.len), true)),
        )
        .collect();
    ranges.sort_unstable_by_key(|&(start, _, _)| start);
    // Sweeping by start: a range overlaps some earlier one iff it starts before the furthest end
    // seen so far (of any range, for a destination; of a destination, for a source).
    let (mut end_any, mut end_dst) = (0u64, 0u64);
    for (start, end, is_dst) in ranges {
        if start < if is_dst { end_any } else { end_dst } {
            return false;
        }
        end_any = end_any.max(end);
        if is_dst {
            end_dst = end_dst.max(end);
        }
    }
    true
}

/// A prepared transfer to one peer, or to the agent itself.
pub(crate) struct ShmXfer {
    op: XferOp,
    target: Target,
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
            .field("peer", &self.target.name(&self.shared))
            .field("segments", &self.local.len())
            .field("bytes", &self.total)
            .finish()
    }
}

impl ShmXfer {
    /// `total` is the byte count of `local`; `pool` is given when posts are to be split
    /// across the workers.
    ///
    /// # Safety
    ///
    /// `local` and `remote` are the segments of a `spec` given to `Shm::prepare_xfer`, under
    /// its contract (the agent's resolved-segment invariant): local segments lie inside this
    /// backend's registrations; target segments inside the peer's regions this backend loaded
    /// or, for [`Target::Own`], inside this backend's own registrations; and those of this
    /// agent stay registered while a post runs. For [`Target::Own`], `pool` is given only if
    /// [`sides_disjoint`] holds, so that no part of a split post writes what another touches.
    pub(crate) unsafe fn new(
        op: XferOp,
        target: Target,
        shared: Arc<Shared>,
        local: SegmentVec,
        remote: SegmentVec,
        total: u64,
        pool: Option<Arc<pool::Pool>>,
    ) -> ShmXfer {
        ShmXfer {
            op,
            target,
            shared,
            local: Arc::new(local),
            remote: Arc::new(remote),
            total,
            pool,
            current: Mutex::new(None),
        }
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
        self.target.ready(&self.shared)?;
        let Some(pool) = &self.pool else {
            // SAFETY: this transfer's own segments, during its post; nothing else of the post
            // runs meanwhile.
            unsafe {
                self.target
                    .copy(self.op, &self.local, &self.remote, || true)
                    .map_err(|e| self.target.fail(&self.shared, e))?;
            }
            if let Some(msg) = notif {
                self.target.notify(&self.shared, msg)?;
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
            let (st, op, target, shared, done, notif) = (
                state.clone(),
                self.op,
                self.target.clone(),
                self.shared.clone(),
                done.clone(),
                notif.clone(),
            );
            pool.spawn(Box::new(move || {
                run_part(&st, op, &target, &shared, &done, notif.as_deref(), &l, &r)
            }));
        }
        // The posting thread copies the first share itself, while the workers copy theirs: on
        // a small machine a spare core is rarer than a thread that would only wait (and whose
        // spinning would slow the workers down).
        if let Some((l, r)) = first {
            run_part(
                &state,
                self.op,
                &self.target,
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
        let duration_us = match self.target {
            // Measured here: ~1.5 us per post plus ~5 GB/s.
            Target::Peer(_) => 2 + self.total / 5_000,
            // A copy in this process: LOOPBACK's figure.
            Target::Own => 1 + self.total / 6_000,
        };
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

/// Copies one share of a split post, unless the post was cancelled, and counts it done. `l` and
/// `r` are a piece of the transfer's segments (`split`), given to no other part of the post.
#[allow(clippy::too_many_arguments)]
fn run_part(
    st: &PostState,
    op: XferOp,
    target: &Target,
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
            finish_part(st, shared, target, done, notif);
            return;
        }
        *a += 1;
    }
    // SAFETY: a piece of the posted transfer's segments, while its post runs (`remaining`
    // holds the post open until this part is counted); the other parts copy other pieces, and
    // a transfer to the agent itself is split only when its pieces share no written byte
    // (`sides_disjoint`).
    let res = unsafe { target.copy(op, l, r, || !st.cancelled.load(Ordering::SeqCst)) };
    if let Err(e) = res {
        let e = match target {
            Target::Peer(peer) => e.with_peer(&peer.name),
            Target::Own => e,
        };
        st.error.lock().get_or_insert(e);
    }
    {
        let mut a = st.active.lock();
        *a -= 1;
        st.idle.notify_all();
    }
    finish_part(st, shared, target, done, notif);
}

fn finish_part(
    st: &PostState,
    shared: &Arc<Shared>,
    target: &Target,
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
            if let (Target::Peer(peer), ErrorKind::RemoteDisconnect) = (target, e.kind()) {
                shared.lost(peer, &e);
            }
            Err(e.with_backend(NAME))
        }
        None => match notif {
            Some(msg) => target.notify(shared, msg),
            None => Ok(()),
        },
    };
    done.complete(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(ranges: &[(u64, u64)]) -> Vec<Segment> {
        ranges
            .iter()
            .map(|&(addr, len)| Segment {
                addr,
                len,
                dev: 0,
                token: 1,
            })
            .collect()
    }

    #[test]
    fn sides_disjoint_finds_every_written_overlap() {
        let w = XferOp::Write;
        // Separate sides, sources repeated: fine.
        let l = segs(&[(0, 100), (0, 100), (500, 10)]);
        let r = segs(&[(1000, 100), (2000, 100), (100, 10)]);
        assert!(sides_disjoint(w, &l, &r));
        // A destination touching (not overlapping) a source.
        assert!(sides_disjoint(w, &segs(&[(0, 100)]), &segs(&[(100, 100)])));
        // A destination overlapping its own source, another pair's source, another destination.
        assert!(!sides_disjoint(w, &segs(&[(0, 100)]), &segs(&[(50, 100)])));
        assert!(!sides_disjoint(
            w,
            &segs(&[(0, 10), (1000, 10)]),
            &segs(&[(500, 10), (1005, 10)])
        ));
        assert!(!sides_disjoint(
            w,
            &segs(&[(0, 10), (100, 10)]),
            &segs(&[(500, 10), (505, 10)])
        ));
        // A short range nested in a long earlier one.
        assert!(!sides_disjoint(
            w,
            &segs(&[(0, 1000), (5000, 10)]),
            &segs(&[(2000, 1000), (10, 10)])
        ));
        // READ: the local side is written.
        assert!(!sides_disjoint(
            XferOp::Read,
            &segs(&[(0, 10), (5, 10)]),
            &segs(&[(100, 10), (200, 10)])
        ));
        assert!(sides_disjoint(
            XferOp::Read,
            &segs(&[(100, 10), (200, 10)]),
            &segs(&[(0, 10), (5, 10)])
        ));
    }

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
