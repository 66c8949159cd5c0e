//! Transfers to the agent itself (NIXL's loopback, which local KV tiering relies on): no socket
//! is involved. A post copies every segment pair between the agent's own registrations in the
//! posting thread, then puts its notification straight into the agent's own queue, and
//! completes before `post` returns, as LOOPBACK's posts do. This is a choice: a large self-copy
//! holds the posting thread for its whole length (at memory speed; 4 MiB in cache takes about
//! 0.1 ms), because TCP has no copy threads of its own, and handing the copy to a sender thread
//! would add a wake-up without freeing a core on the small machines this runs on.
//!
//! The copy is `rixl_copy::copy_bytes`, not a plain `std::ptr::copy`: glibc's `memmove` is
//! 12–16× slower for 4 KiB pages whose destination lies a few bytes past the source modulo
//! 4096 (4 MiB of them: 1.2–1.6 ms instead of 0.1), which `copy_bytes` copies in 110 µs (see
//! `rixl-copy` for the measurement).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rixl_backend::{BackendXfer, PostOutcome};
use rixl_core::{CompletionHandle, CostEstimate, CostMethod, Error, Result, SegmentVec, XferOp};

use crate::Shared;

/// A prepared transfer between two sides of the agent's own registrations.
pub(crate) struct OwnXfer {
    op: XferOp,
    local: SegmentVec,
    remote: SegmentVec,
    total: u64,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for OwnXfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnXfer")
            .field("op", &self.op)
            .field("segments", &self.local.len())
            .field("bytes", &self.total)
            .finish()
    }
}

impl OwnXfer {
    /// A transfer of `local` ↔ `remote`, position by position.
    ///
    /// # Safety
    ///
    /// `local` and `remote` come from a `spec` of [`Backend::prepare_xfer`] with
    /// `spec.loopback`, whose contract the caller upholds: every segment lies inside one of this
    /// backend's own registrations, kept registered while a post runs.
    ///
    /// [`Backend::prepare_xfer`]: rixl_backend::Backend::prepare_xfer
    pub(crate) unsafe fn new(
        op: XferOp,
        local: SegmentVec,
        remote: SegmentVec,
        shared: Arc<Shared>,
    ) -> OwnXfer {
        let total = local.iter().map(|s| s.len).sum();
        OwnXfer {
            op,
            local,
            remote,
            total,
            shared,
        }
    }
}

impl BackendXfer for OwnXfer {
    fn post(&self, notif: Option<&[u8]>, _done: CompletionHandle) -> Result<PostOutcome> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(Error::not_found("the TCP backend was shut down"));
        }
        // SAFETY: both sides lie in DRAM registrations of this agent (`OwnXfer::new`'s
        // contract, from `prepare_xfer`'s), which the agent keeps registered until this post
        // ends, and whose `register_mem` caller promised they stay valid and untouched by the
        // program while a transfer may run. The pairs are copied one after the other on this
        // thread.
        unsafe { rixl_copy::copy_segments(self.op, &self.local, &self.remote, || true) };
        if let Some(msg) = notif {
            let ctx = &self.shared.ctx;
            ctx.notifs().deliver(ctx.agent_name(), msg);
        }
        Ok(PostOutcome::Done)
    }

    fn estimate_cost(&self) -> Result<CostEstimate> {
        // A copy in this process: LOOPBACK's figure.
        let duration_us = 1 + self.total / 6_000;
        Ok(CostEstimate {
            duration_us,
            margin_us: duration_us / 2,
            method: CostMethod::AnalyticalBackend,
        })
    }
}
