//! The request: a prepared transfer ([`TcpXfer`]), its frames built once at `prepare_xfer`
//! (segments cut into chunks and, when large, dealt round-robin to every connection), then
//! posted, progressed on the caller's thread, cancelled, and costed.
//!
//! Separate because this is what the agent holds (`BackendXfer`), and it decides only where
//! a post's frames go, which thread writes each share and how the caller waits; the writing,
//! the parsing and the liveness underneath are shared with standalone notifications and the
//! reader threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rixl_backend::{BackendXfer, PostOutcome};
use rixl_core::{CompletionHandle, CostEstimate, CostMethod, Error, Result, XferOp};

use super::dial::conns;
use super::liveness::end;
use super::response::pump;
use super::send::{send_frames, NotifSpec};
use super::{Job, Peer, PostState};
use crate::wire::{self, HEADER_LEN};
use crate::Shared;

/// Striped transfers are not cut into pieces smaller than this (unless `chunk_bytes` is).
const MIN_STRIPE_CHUNK: u64 = 64 << 10;
/// A striped post's share of at most this many bytes is written by the posting thread itself
/// (READ requests; a WRITE share of this size is not worth a sender thread's wake-up).
const INLINE_SHARE: u64 = 64 << 10;
/// The posting thread writes a striped post's first share itself up to this many bytes (about
/// what the socket buffers absorb at once, so `post` returns within a few milliseconds); a
/// larger first share goes to its sender thread like the others.
const FIRST_SHARE_MAX: u64 = 8 << 20;
/// How long a waiting thread reads its post's connection itself before leaving it to the
/// reader thread (and sleeping on the completion after its own short spin).
pub(super) const WAITER_SPIN: Duration = Duration::from_micros(200);

/// One frame of a prepared transfer: `len` bytes between local `local` and the target's
/// `addr` in its region `token`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Frame {
    pub(super) local: u64,
    pub(super) token: u64,
    pub(super) addr: u64,
    pub(super) len: u64,
}

/// A prepared transfer.
pub(crate) struct TcpXfer {
    inner: Arc<XferInner>,
}

/// What a prepared transfer holds, shared with the sender threads that write its shares.
pub(super) struct XferInner {
    pub(super) op: XferOp,
    pub(super) peer: Arc<Peer>,
    shared: Arc<Shared>,
    /// One list per connection when striped, else a single list.
    pub(super) lists: Vec<Vec<Frame>>,
    /// Bytes each list writes to its socket.
    sends: Vec<u64>,
    /// Whether each list's data stream is paced (the `pace_min_bytes` parameter).
    pub(super) paced: Vec<bool>,
    frames: usize,
    total: u64,
    current: Mutex<Option<Arc<PostState>>>,
}

impl std::fmt::Debug for TcpXfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpXfer")
            .field("op", &self.inner.op)
            .field("peer", &self.inner.peer.name)
            .field("frames", &self.inner.frames)
            .field("bytes", &self.inner.total)
            .finish()
    }
}

impl TcpXfer {
    /// Builds the frames of a transfer once: segments cut at `chunk` bytes, dealt round-robin
    /// to the connections when the transfer is large enough to stripe.
    pub(crate) fn new(
        shared: Arc<Shared>,
        peer: Arc<Peer>,
        op: XferOp,
        pairs: impl Iterator<Item = (u64, u64, u64, u64)>,
        total: u64,
    ) -> TcpXfer {
        let n = shared.connections;
        let striped = n > 1 && total > shared.stripe_min;
        // Striped, every connection gets a share even of a transfer of a few chunks (a 1 MiB
        // write goes out as two halves in parallel, not as one chunk on one connection), but
        // no piece is cut smaller than MIN_STRIPE_CHUNK unless `chunk_bytes` says so.
        let chunk = if striped {
            shared
                .chunk
                .min(total.div_ceil(n as u64).max(MIN_STRIPE_CHUNK))
        } else {
            shared.chunk
        };
        let mut lists: Vec<Vec<Frame>> = vec![Vec::new(); if striped { n } else { 1 }];
        let mut k = 0usize;
        let mut frames = 0;
        for (local, token, addr, len) in pairs {
            let mut off = 0;
            while off < len {
                let take = (len - off).min(chunk);
                lists[k].push(Frame {
                    local: local + off,
                    token,
                    addr: addr + off,
                    len: take,
                });
                frames += 1;
                off += take;
                if striped {
                    k = (k + 1) % n;
                }
            }
        }
        lists.retain(|l| !l.is_empty());
        // What each connection's share puts on the wire: READ requests are headers only.
        let sends = lists
            .iter()
            .map(|l| match op {
                XferOp::Write => l.iter().map(|f| f.len).sum(),
                XferOp::Read => (l.len() * HEADER_LEN) as u64,
            })
            .collect();
        let paced = lists
            .iter()
            .map(|l| shared.pace_min > 0 && l.iter().map(|f| f.len).sum::<u64>() >= shared.pace_min)
            .collect();
        TcpXfer {
            inner: Arc::new(XferInner {
                op,
                peer,
                shared,
                lists,
                sends,
                paced,
                frames,
                total,
                current: Mutex::new(None),
            }),
        }
    }
}

impl BackendXfer for TcpXfer {
    fn post(&self, notif: Option<&[u8]>, done: CompletionHandle) -> Result<PostOutcome> {
        let x = &self.inner;
        let peer = &x.peer;
        if x.shared.stopping.load(Ordering::SeqCst) {
            return Err(Error::not_found("the TCP backend was shut down"));
        }
        if let Some(m) = notif {
            if m.len() > wire::MAX_NOTIF as usize {
                return Err(Error::invalid_param(format!(
                    "a notification of {} bytes exceeds the TCP limit of {}",
                    m.len(),
                    wire::MAX_NOTIF
                )));
            }
        }
        let set = conns(&x.shared, peer).inspect_err(|e| x.shared.lost_if(peer, e))?;
        // A post on one connection takes the least busy one, the first when all are idle:
        // back-to-back posts then stay on one connection, whose target server is still
        // spinning from the previous one (see `target`), instead of waking another.
        let single = (x.lists.len() == 1).then(|| {
            let mut best = &set.conns[0];
            for c in &set.conns[1..] {
                if best.backlog() == 0 {
                    break;
                }
                if c.backlog() < best.backlog() {
                    best = c;
                }
            }
            best.clone()
        });
        let st = Arc::new(PostState {
            conn: single.clone(),
            remaining: AtomicUsize::new(x.frames + usize::from(notif.is_some())),
            error: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            done,
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        if let Some(conn) = &single {
            // Checked before the post state exists: an early return leaves nothing to resolve.
            // No poll here (it would cost a system call per post): a connection that died
            // since its reader last looked fails the frames through that reader.
            if let Some(e) = conn.dead() {
                x.shared.lost_if(peer, &e);
                return Err(e);
            }
            *x.current.lock() = Some(st.clone());
            let spec = notif.map(|msg| NotifSpec { msg, want: 0 });
            send_frames(x, 0, conn, &st, spec, 0);
            return Ok(PostOutcome::InProgress);
        }
        let post_id = if notif.is_some() {
            peer.next_post.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        *x.current.lock() = Some(st.clone());
        let notif: Option<Arc<[u8]>> = notif.map(Arc::from);
        let frames = x.frames as u64;
        let spec = |k: usize, notif: &Option<Arc<[u8]>>| -> Option<(Arc<[u8]>, u64)> {
            notif.clone().filter(|_| k == 0).map(|m| (m, frames))
        };
        // The posting thread writes the first share itself (it would only wait otherwise, and
        // a hand-off costs a thread wake-up), unless that would hold `post` for long, and any
        // share that puts little on the wire (READ requests): those are written after the
        // large ones were handed to their connections' sender threads, so that the shares go
        // out in parallel.
        let inline =
            |k: usize| (k == 0 && x.sends[0] <= FIRST_SHARE_MAX) || x.sends[k] <= INLINE_SHARE;
        for (k, conn) in set.conns.iter().enumerate().take(x.lists.len()) {
            if inline(k) {
                continue;
            }
            let (xi, c, st, spec) = (x.clone(), conn.clone(), st.clone(), spec(k, &notif));
            let job: Job = Box::new(move || {
                let spec = spec
                    .as_ref()
                    .map(|(msg, want)| NotifSpec { msg, want: *want });
                send_frames(&xi, k, &c, &st, spec, post_id);
            });
            if let Err(mpsc::SendError(job)) = conn.jobs.lock().send(job) {
                // The sender thread is gone (connection closed): run it here; it fails fast.
                job();
            }
        }
        for (k, conn) in set.conns.iter().enumerate().take(x.lists.len()) {
            if inline(k) {
                let spec = spec(k, &notif);
                let spec = spec
                    .as_ref()
                    .map(|(msg, want)| NotifSpec { msg, want: *want });
                send_frames(x, k, conn, &st, spec, post_id);
            }
        }
        Ok(PostOutcome::InProgress)
    }

    fn cancel(&self) -> Result<()> {
        let x = &self.inner;
        let Some(st) = x.current.lock().clone() else {
            return Ok(());
        };
        st.cancelled.store(true, Ordering::SeqCst);
        // Frames already sent are answered by the target; unsent ones are skipped. Once all
        // resolved, nothing of this post can land any more.
        if !st.wait_resolved(x.shared.deadline * 2) {
            tracing::warn!(
                "TCP: agent {:?} did not answer a cancelled post in time; closing its connections",
                x.peer.name
            );
            x.peer.kill();
            if !st.wait_resolved(x.shared.deadline) {
                return Err(Error::repost_active(
                    "the cancelled TCP transfer could not be stopped",
                ));
            }
        }
        Ok(())
    }

    /// Reads the post's connection on the waiting thread, for up to [`WAITER_SPIN`]: the
    /// answer is handled the moment it arrives, without waking the connection's reader thread
    /// (which sleeps through data while anyone watches) and then this thread. Striped posts
    /// are left to the reader threads, which receive their parts in parallel.
    fn progress(&self, budget: Duration) {
        let x = &self.inner;
        let Some(st) = x.current.lock().clone() else {
            return;
        };
        let Some(conn) = st.conn.clone() else {
            return;
        };
        let step = || {
            if let Some(mut rx) = conn.rx.try_lock() {
                if rx.ended {
                    return false;
                }
                if let Err(e) = pump(&x.shared, &x.peer, &conn, &mut rx, false, &|| st.resolved()) {
                    end(&x.shared, &x.peer, &conn, &mut rx, e);
                    return false;
                }
            }
            !st.resolved()
        };
        if st.resolved() {
            return;
        }
        if budget.is_zero() {
            // A `status()` poll: the reader thread sleeps through data while the caller keeps
            // polling, as for a waiter.
            if step() {
                conn.lease();
            } else {
                conn.unlease();
            }
            return;
        }
        let spin = budget.min(WAITER_SPIN);
        conn.watch(true);
        let start = Instant::now();
        while step() {
            if start.elapsed() >= spin {
                break;
            }
            // Yield rather than spin: on a small machine the target (or whoever answers) may
            // need this core; with nothing else to run, this returns at once.
            std::thread::yield_now();
        }
        conn.watch(false);
    }

    fn estimate_cost(&self) -> Result<CostEstimate> {
        // A simple model: ~50 us per post plus ~1 GB/s (loopback on this class of machine).
        let duration_us = 50 + self.inner.total / 1_000;
        Ok(CostEstimate {
            duration_us,
            margin_us: duration_us / 2,
            method: CostMethod::AnalyticalBackend,
        })
    }
}

impl Drop for TcpXfer {
    fn drop(&mut self) {
        let _ = self.cancel();
    }
}
