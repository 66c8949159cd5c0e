//! Building requests: from two prepared lists and index arrays (`make_xfer_req`, the KV-cache
//! path: one tight loop over the indices, no agent lock), or straight from two descriptor
//! lists (`create_xfer_req`). Both end in `finish_request`, the one place that hands resolved
//! segments to a backend's `prepare_xfer`.

use std::sync::Arc;
use std::time::Duration;

use rixl_backend::{RequestExt, XferSpec};
use rixl_core::resolve::{gather_and_merge, merge_segments};
use rixl_core::{Desc, Error, MemType, Result, SegmentVec, XferDescList, XferOp};

use crate::agent::Agent;
use crate::backends::BackendSlot;
use crate::fence::{Fences, PostPins};
use crate::prepared::{resolve_remote, PreparedList, Resolution, Side};
use crate::remote::RemoteEntry;
use crate::request::{RequestShape, XferRequest};

/// Options for making or creating a request.
#[derive(Clone, Debug, Default)]
pub struct XferOptions {
    /// Notification attached to every post (until replaced by a post that names another).
    pub notif: Option<Vec<u8>>,
    /// Backends allowed, in order of preference; empty lets the agent choose.
    pub backends: Vec<String>,
    /// Keep every index as its own descriptor (NIXL's deprecated `skip_desc_merge`).
    pub skip_desc_merge: bool,
    /// A deadline for each post: once it passes, `status`/`wait` cancel the post and report
    /// `Timeout`.
    pub timeout: Option<Duration>,
    /// A per-request extension for the backend (NIXL's `customParam`; a typed value such as a
    /// CUDA stream for backends that take one). Built-in DRAM and file backends ignore it.
    pub ext: Option<RequestExt>,
}

impl XferOptions {
    /// Options carrying a notification.
    pub fn with_notif(msg: impl Into<Vec<u8>>) -> XferOptions {
        XferOptions {
            notif: Some(msg.into()),
            ..XferOptions::default()
        }
    }
}

impl Agent {
    /// Makes a request from two prepared lists and index arrays of equal length. Positions
    /// whose indices both continue contiguously inside the same regions are merged into one
    /// descriptor unless `opts.skip_desc_merge`.
    pub fn make_xfer_req(
        &self,
        op: XferOp,
        local: &PreparedList,
        local_indices: &[usize],
        remote: &PreparedList,
        remote_indices: &[usize],
        opts: &XferOptions,
    ) -> Result<XferRequest> {
        let (l, r) = (&*local.inner, &*remote.inner);
        if !matches!(l.side, Side::Local) {
            return Err(Error::invalid_param(
                "the local prepared list was prepared for a target, not for the local side",
            ));
        }
        if matches!(r.side, Side::Local) {
            return Err(Error::invalid_param(
                "the remote prepared list was prepared for the local side, not for a target",
            ));
        }
        if !Arc::ptr_eq(&l.agent, &self.inner) || !Arc::ptr_eq(&r.agent, &self.inner) {
            return Err(Error::invalid_param(
                "prepared list belongs to another agent",
            ));
        }
        if local_indices.is_empty() {
            return Err(Error::invalid_param("no indices given"));
        }
        if local_indices.len() != remote_indices.len() {
            return Err(Error::invalid_param(format!(
                "{} local indices but {} remote indices",
                local_indices.len(),
                remote_indices.len()
            )));
        }
        local.check_fresh()?;
        remote.check_fresh()?;
        let allowed: Vec<usize> = opts
            .backends
            .iter()
            .map(|n| self.inner.backends().index(n))
            .collect::<Result<_>>()?;
        let pick = |res: &[Resolution], b: usize| res.iter().position(|x| x.backend.index == b);
        let candidates: Vec<usize> = if allowed.is_empty() {
            l.resolutions.iter().map(|x| x.backend.index).collect()
        } else {
            allowed
        };
        let (li, ri) = candidates
            .iter()
            .find_map(|&b| {
                let (li, ri) = (pick(&l.resolutions, b)?, pick(&r.resolutions, b)?);
                l.resolutions[li]
                    .backend
                    .caps
                    .can_move(l.mem, r.mem)
                    .then_some((li, ri))
            })
            .ok_or_else(|| Error::invalid_param("no backend is common to both prepared lists"))?;
        let (lres, rres) = (&l.resolutions[li], &r.resolutions[ri]);
        let (lent, rent) = (&lres.entries[..], &rres.entries[..]);
        let (local_segs, remote_segs, total) = gather_and_merge(
            lent,
            local_indices,
            rent,
            remote_indices,
            !opts.skip_desc_merge,
        )?;
        let desc_count = local_segs.len() as u64;
        let backend = lres.backend.clone();
        let mut fences = vec![lres.fences.clone()];
        if matches!(r.side, Side::SelfTarget) {
            fences.push(rres.fences.clone());
        }
        let peer = match &r.side {
            Side::Remote(e) => Some(e.clone()),
            _ => None,
        };
        self.finish_request(
            op,
            backend,
            peer,
            l.mem,
            r.mem,
            local_segs,
            remote_segs,
            Built {
                fences,
                total,
                desc_count,
            },
            opts,
        )
    }

    /// Creates a request directly from two transfer lists (NIXL's `createXferReq`): the first
    /// backend, in preference order, that holds the local list and covers the remote one wins.
    /// Contiguous descriptors are merged for the backend; telemetry still counts the caller's
    /// descriptors, as NIXL does.
    pub fn create_xfer_req(
        &self,
        op: XferOp,
        local: &XferDescList,
        remote: &XferDescList,
        remote_agent: &str,
        opts: &XferOptions,
    ) -> Result<XferRequest> {
        let inner = &self.inner;
        if local.is_empty() || remote.is_empty() {
            return Err(Error::not_found(
                "cannot create a request from an empty descriptor list",
            ));
        }
        if local.len() != remote.len() {
            return Err(Error::invalid_param(format!(
                "{} local descriptors but {} remote descriptors",
                local.len(),
                remote.len()
            )));
        }
        let (ld, rd) = (local.descs(), remote.descs());
        for (k, (a, b)) in ld.iter().zip(rd).enumerate() {
            a.check_xfer(k)?;
            b.check_xfer(k)?;
            if a.len != b.len {
                return Err(Error::invalid_param(format!(
                    "length mismatch at position {k}: local {} bytes, remote {} bytes",
                    a.len, b.len
                )));
            }
        }
        let loopback = remote_agent == inner.name();
        let entry = if loopback {
            None
        } else {
            Some(inner.remote(remote_agent)?)
        };
        let allowed = inner
            .backends()
            .filter(&opts.backends.iter().map(String::as_str).collect::<Vec<_>>())?;
        let slots = inner.backends().snapshot();
        // Both sides are resolved against one state of the registrations (and of the peer's
        // entry); the backend is called only once both locks are released.
        // A backend that would move this pair but carries no notifications, when one was
        // asked for: NIXL reports that as a backend error, not as missing memory.
        let silent = opts
            .notif
            .as_ref()
            .and_then(|_| {
                slots
                    .iter()
                    .filter(|s| allowed.allows(s.index))
                    .find(|s| !s.caps.notif && s.caps.can_move(local.mem(), remote.mem()))
            })
            .cloned();
        let picked = inner.regs().visit(|regs| {
            let remote_state = entry.as_ref().map(|e| e.state.read());
            let mut first_miss: Option<Error> = None;
            for slot in slots.iter().filter(|s| allowed.allows(s.index)) {
                if opts.notif.is_some() && !slot.caps.notif {
                    continue;
                }
                if !slot.caps.supports(local.mem())
                    || !slot.caps.supports(remote.mem())
                    || !slot.caps.can_move(local.mem(), remote.mem())
                {
                    continue;
                }
                let Some(resolved) = regs.resolve(local.mem(), slot.index, ld, false) else {
                    continue;
                };
                let mut target_fences = None;
                let (lsegs, local_fences) = match resolved {
                    Ok(t) => t,
                    Err(i) => {
                        first_miss.get_or_insert_with(|| miss(i, &ld[i], "local", &slot.name));
                        continue;
                    }
                };
                let rsegs = match &remote_state {
                    None => {
                        if !slot.caps.local {
                            continue;
                        }
                        let Some(resolved) = regs.resolve(remote.mem(), slot.index, rd, true)
                        else {
                            continue;
                        };
                        resolved.map(|(segs, fences)| {
                            target_fences = Some(fences);
                            segs
                        })
                    }
                    Some(st) => {
                        if !st.reachable(slot.index) {
                            continue;
                        }
                        let Some(rsec) = st.section(remote.mem(), slot.index) else {
                            continue;
                        };
                        resolve_remote(&rsec.index, rd)
                    }
                };
                let rsegs = match rsegs {
                    Ok(t) => t,
                    Err(i) => {
                        first_miss.get_or_insert_with(|| miss(i, &rd[i], "remote", &slot.name));
                        continue;
                    }
                };
                let (local_segs, remote_segs) = merge_segments(lsegs, rsegs);
                let mut fences = vec![local_fences];
                fences.extend(target_fences);
                let built = Built {
                    fences,
                    total: local.total_bytes(),
                    desc_count: ld.len() as u64,
                };
                return Ok((slot, local_segs, remote_segs, built));
            }
            Err(first_miss)
        });
        match picked {
            Ok((slot, local_segs, remote_segs, built)) => self.finish_request(
                op,
                slot.clone(),
                entry,
                local.mem(),
                remote.mem(),
                local_segs,
                remote_segs,
                built,
                opts,
            ),
            Err(None) if silent.is_some() => {
                let slot = silent.expect("checked");
                Err(Error::backend(format!(
                    "a notification was requested, but backend {} (the one that moves {} to {}) \
                     cannot carry notifications",
                    slot.name,
                    local.mem(),
                    remote.mem()
                ))
                .with_backend(&slot.name)
                .with_peer(remote_agent))
            }
            Err(first_miss) => Err(first_miss
                .unwrap_or_else(|| {
                    Error::not_found(format!(
                        "no backend holds {} locally and {} at agent {remote_agent:?}{}",
                        local.mem(),
                        remote.mem(),
                        if opts.notif.is_some() {
                            " with notification support"
                        } else {
                            ""
                        }
                    ))
                })
                .with_peer(remote_agent)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_request(
        &self,
        op: XferOp,
        backend: BackendSlot,
        peer: Option<Arc<RemoteEntry>>,
        local_mem: MemType,
        remote_mem: MemType,
        local: SegmentVec,
        remote: SegmentVec,
        built: Built,
        opts: &XferOptions,
    ) -> Result<XferRequest> {
        if opts.notif.is_some() && !backend.caps.notif {
            return Err(Error::backend(format!(
                "a notification was requested but backend {} cannot carry notifications",
                backend.name
            ))
            .with_backend(&backend.name));
        }
        let peer_name = peer.as_ref().map_or(self.inner.name(), |e| e.name.as_str());
        let segments = local.len();
        let spec = XferSpec {
            op,
            peer: peer_name,
            loopback: peer.is_none(),
            local_mem,
            remote_mem,
            local,
            remote,
            ext: opts.ext.as_ref(),
        };
        // SAFETY: the resolved-segment invariant of `Backend::prepare_xfer`: every segment was
        // resolved just now from the agent's index of this backend's local registrations
        // (self-target segments carrying their `local_target_token`) or from the peer's
        // published regions this backend loaded, and checked to lie inside one of them
        // (`LocalRegs::resolve` in `registration`, `resolve_remote` in `prepared`;
        // `gather_and_merge` and `merge_segments` only join neighbours inside one region). Every local region is pinned by each post through
        // `pins` until the post ends, and deregistration waits for the pins (`fence`).
        let xfer = unsafe { backend.backend.prepare_xfer(spec) }.map_err(|e| {
            e.with_backend(&backend.name)
                .with_peer(peer_name)
                .with_op(op)
        })?;
        let pins = Arc::new(PostPins::new(built.fences));
        Ok(XferRequest::new(
            self.inner.clone(),
            op,
            backend,
            peer,
            xfer,
            pins,
            opts.notif.clone(),
            RequestShape {
                total_bytes: built.total,
                desc_count: built.desc_count,
                segments,
            },
            opts.timeout,
        ))
    }
}

struct Built {
    fences: Vec<Fences>,
    total: u64,
    desc_count: u64,
}

fn miss(i: usize, d: &Desc, side: &str, backend: &str) -> Error {
    Error::not_found(format!(
        "{side} descriptor {i} (addr {:#x}, len {}, dev {}) is not covered by one registration",
        d.addr, d.len, d.dev
    ))
    .with_backend(backend)
}
