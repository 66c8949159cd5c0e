//! Prepared descriptor lists and transfer requests.
//!
//! A [`PreparedList`] is a transfer list validated once and resolved, for every backend that
//! covers all of it, to that backend's region tokens. Requests are then made from index arrays
//! in one tight loop (bounds check, length check, merge with the previous descriptor when both
//! sides continue contiguously inside the same regions) without touching any agent lock.
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
use rixl_backend::{BackendXfer, PostOutcome, RequestExt, XferSpec};
use rixl_core::completion::{monotonic_micros, monotonic_nanos};
use rixl_core::{
    Completion, CostEstimate, Desc, Error, MemType, RegIndex, Result, Segment, SegmentVec,
    XferDescList, XferOp, XferStatus,
};

use crate::agent::{Agent, AgentInner, BackendSlot, INIT_AGENT, INIT_AGENT_NAME};
use crate::fence::{Fences, PostPins, RegionFence};
use crate::future::XferFuture;
use crate::registration::LocalReg;
use crate::remote::{RemoteEntry, RemoteRegion};

/// Which side a prepared list describes.
#[derive(Clone, Debug)]
enum Side {
    /// The initiator's own memory.
    Local,
    /// This agent as its own target (loopback, storage).
    SelfTarget,
    /// A remote agent's memory, as of the entry it was resolved against.
    Remote(Arc<RemoteEntry>),
}

/// One backend's resolution of a prepared list.
#[derive(Debug)]
struct Resolution {
    backend: BackendSlot,
    /// Per descriptor: the descriptor with the backend's token for its covering region, in one
    /// array so that making a request touches one cache line per index.
    entries: SegmentVec,
    /// Fences of the distinct local registrations used (empty for remote lists).
    fences: Fences,
}

#[derive(Debug)]
struct PrepInner {
    agent: Arc<AgentInner>,
    side: Side,
    mem: MemType,
    len: usize,
    resolutions: Vec<Resolution>,
}

/// A descriptor list validated and resolved once, to build requests from by index.
/// Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct PreparedList {
    inner: Arc<PrepInner>,
}

impl PreparedList {
    /// Number of descriptors (valid indices are `0..len()`).
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Always false: empty lists cannot be prepared.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The memory type.
    pub fn mem(&self) -> MemType {
        self.inner.mem
    }

    /// The target agent's name for remote lists, this agent's name for self-target lists,
    /// `None` for the local side.
    pub fn agent(&self) -> Option<&str> {
        match &self.inner.side {
            Side::Local => None,
            Side::SelfTarget => Some(&self.inner.agent.name),
            Side::Remote(e) => Some(&e.name),
        }
    }

    /// Names of the backends that cover every descriptor, in preference order.
    pub fn backends(&self) -> Vec<String> {
        self.inner
            .resolutions
            .iter()
            .map(|r| r.backend.name.to_string())
            .collect()
    }

    /// Fails with `NotFound` if the agent is gone, or the remote side was invalidated since.
    fn check_fresh(&self) -> Result<()> {
        if !self.inner.agent.alive.load(Ordering::Acquire) {
            return Err(Error::not_found(
                "the agent of this prepared list was dropped",
            ));
        }
        if let Side::Remote(e) = &self.inner.side {
            if !e.is_valid() {
                return Err(Error::not_found(format!(
                    "the metadata of agent {:?} was invalidated after this list was prepared",
                    e.name
                ))
                .with_peer(&e.name));
            }
        }
        Ok(())
    }
}

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

impl Agent {
    /// Prepares `list` for requests by index. `agent` is `""` or `"NIXL_INIT_AGENT"` for the
    /// local (initiator) side, this agent's own name for a loopback / storage target, or a remote
    /// agent's name. The list is resolved for every allowed backend that covers all of it.
    pub fn prep_xfer_dlist(
        &self,
        agent: &str,
        list: &XferDescList,
        backends: &[&str],
    ) -> Result<PreparedList> {
        let inner = &self.inner;
        if list.is_empty() {
            return Err(Error::not_found("cannot prepare an empty descriptor list"));
        }
        let filter = inner.backend_filter(backends)?;
        let mem = list.mem();
        let descs = list.descs();
        let side = if agent == INIT_AGENT || agent == INIT_AGENT_NAME {
            Side::Local
        } else if agent == inner.name {
            Side::SelfTarget
        } else {
            Side::Remote(inner.remote(agent)?)
        };
        for (i, d) in descs.iter().enumerate() {
            d.check_xfer(i)?;
        }
        let slots = inner.backends.read().clone();
        let mut resolutions = Vec::new();
        let mut first_miss: Option<(usize, String)> = None;
        match &side {
            Side::Local | Side::SelfTarget => {
                let regs = inner.regs.read();
                for slot in slots.iter().filter(|s| filter.allows(s.index)) {
                    if matches!(side, Side::SelfTarget) && !slot.caps.local {
                        continue;
                    }
                    let Some(sec) = regs.section(mem, slot.index) else {
                        continue;
                    };
                    let self_target = matches!(side, Side::SelfTarget);
                    match resolve_local(&sec.index, descs, self_target) {
                        Ok((entries, fences)) => resolutions.push(Resolution {
                            backend: slot.clone(),
                            entries,
                            fences,
                        }),
                        Err(i) => {
                            first_miss.get_or_insert((i, slot.name.to_string()));
                        }
                    }
                }
            }
            Side::Remote(entry) => {
                let st = entry.state.read();
                for slot in slots.iter().filter(|s| filter.allows(s.index)) {
                    if !st.reachable(slot.index) {
                        continue;
                    }
                    let Some(sec) = st.section(mem, slot.index) else {
                        continue;
                    };
                    match resolve_remote(&sec.index, descs) {
                        Ok(entries) => resolutions.push(Resolution {
                            backend: slot.clone(),
                            entries,
                            fences: Arc::from(Vec::new()),
                        }),
                        Err(i) => {
                            first_miss.get_or_insert((i, slot.name.to_string()));
                        }
                    }
                }
            }
        }
        if resolutions.is_empty() {
            let whose = match &side {
                Side::Remote(e) => format!("agent {:?}", e.name),
                _ => "this agent".to_owned(),
            };
            let e = match first_miss {
                Some((i, b)) => Error::not_found(format!(
                    "descriptor {i} (addr {:#x}, len {}, dev {}) is not covered by one {mem} registration of {whose}",
                    descs[i].addr, descs[i].len, descs[i].dev
                ))
                .with_backend(&b),
                None => Error::not_found(format!(
                    "no backend holds {mem} registrations of {whose}"
                )),
            };
            return Err(e.with_mem(mem));
        }
        Ok(PreparedList {
            inner: Arc::new(PrepInner {
                agent: inner.clone(),
                side,
                mem,
                len: descs.len(),
                resolutions,
            }),
        })
    }

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
            .map(|n| self.inner.slot(n).map(|s| s.index))
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
        let loopback = remote_agent == inner.name;
        let entry = if loopback {
            None
        } else {
            Some(inner.remote(remote_agent)?)
        };
        let allowed =
            inner.backend_filter(&opts.backends.iter().map(String::as_str).collect::<Vec<_>>())?;
        let slots = inner.backends.read().clone();
        let regs = inner.regs.read();
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
            let Some(lsec) = regs.section(local.mem(), slot.index) else {
                continue;
            };
            let mut target_fences = None;
            let (lsegs, local_fences) = match resolve_local(&lsec.index, ld, false) {
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
                    let Some(rsec) = regs.section(remote.mem(), slot.index) else {
                        continue;
                    };
                    resolve_local(&rsec.index, rd, true).map(|(segs, fences)| {
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
            drop(remote_state);
            drop(regs);
            return self.finish_request(
                op,
                slot.clone(),
                entry,
                local.mem(),
                remote.mem(),
                local_segs,
                remote_segs,
                built,
                opts,
            );
        }
        Err(first_miss
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
            .with_peer(remote_agent))
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
        let peer_name = peer
            .as_ref()
            .map_or(self.inner.name.as_str(), |e| e.name.as_str());
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
        // resolved just now by this module from the agent's index of this backend's local
        // registrations (self-target segments carrying their `local_target_token`) or from the
        // peer's published regions this backend loaded, and checked to lie inside one of them
        // (`resolve_local`, `resolve_remote`; `gather_and_merge` and `merge_segments` only join
        // neighbours inside one region). Every local region is pinned by each post through
        // `pins` until the post ends, and deregistration waits for the pins (`fence`).
        let xfer = unsafe { backend.backend.prepare_xfer(spec) }.map_err(|e| {
            e.with_backend(&backend.name)
                .with_peer(peer_name)
                .with_op(op)
        })?;
        let pins = Arc::new(PostPins::new(built.fences));
        let unpin = pins.clone();
        Ok(XferRequest {
            inner: Arc::new(ReqInner {
                agent: self.inner.clone(),
                op,
                backend,
                peer,
                xfer,
                completion: Completion::with_on_end(Box::new(move || unpin.unpin())),
                notif: Mutex::new(opts.notif.clone()),
                pins,
                total_bytes: built.total,
                desc_count: built.desc_count,
                segments,
                timeout: opts.timeout,
                post_start_ns: AtomicU64::new(0),
                post_duration_ns: AtomicU64::new(0),
            }),
        })
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

/// True when `next` continues `seg` without a gap inside the same region.
#[inline]
/// The segments of a request made from index arrays: `lent[local_indices[k]]` paired with
/// `rent[remote_indices[k]]`, lengths checked, and (if `merge`) runs where both index sequences
/// step by one and both sides continue contiguously in one region merged into one pair. Also
/// returns the byte count.
///
/// Written as passes over arrays rather than one loop with everything in it: with 10^4 random
/// indices the prepared entries are mostly out of cache (the application just built the index
/// arrays), and a plain gather loop lets the CPU overlap many of those misses, where the
/// all-in-one loop waited for them one or two at a time (8192 random indices from a cold
/// cache: 0.45 ms before).
fn gather_and_merge(
    lent: &[Segment],
    local_indices: &[usize],
    rent: &[Segment],
    remote_indices: &[usize],
    merge: bool,
) -> Result<(SegmentVec, SegmentVec, u64)> {
    let (nl, nr) = (lent.len(), rent.len());
    let n = local_indices.len();
    // Validation first (sequential reads only), so the gathers below cannot fail.
    if let Some(k) = (0..n).find(|&k| local_indices[k] >= nl || remote_indices[k] >= nr) {
        let (a, b) = (local_indices[k], remote_indices[k]);
        return Err(Error::invalid_param(format!(
            "index pair {k} ({a}, {b}) is out of range (lists have {nl} and {nr} descriptors)"
        )));
    }
    let mut local_segs = SegmentVec::with_capacity(n);
    let mut remote_segs = SegmentVec::with_capacity(n);
    for &a in local_indices {
        local_segs.push(lent[a]);
    }
    for &b in remote_indices {
        remote_segs.push(rent[b]);
    }
    // Length check and merging, in place, over data that is now sequential.
    let mut total: u64 = 0;
    let mut w = 0usize;
    for k in 0..n {
        let (l, r) = (local_segs[k], remote_segs[k]);
        if l.len != r.len {
            return Err(Error::invalid_param(format!(
                "length mismatch at position {k}: local descriptor {} has {} bytes, remote descriptor {} has {}",
                local_indices[k], l.len, remote_indices[k], r.len
            )));
        }
        total = total.saturating_add(l.len);
        let extends = merge
            && k > 0
            && local_indices[k] == local_indices[k - 1].wrapping_add(1)
            && remote_indices[k] == remote_indices[k - 1].wrapping_add(1)
            && contiguous(&local_segs[w - 1], &l)
            && contiguous(&remote_segs[w - 1], &r);
        if extends {
            local_segs[w - 1].len += l.len;
            remote_segs[w - 1].len += l.len;
        } else {
            local_segs[w] = l;
            remote_segs[w] = r;
            w += 1;
        }
    }
    local_segs.truncate(w);
    remote_segs.truncate(w);
    Ok((local_segs, remote_segs, total))
}

fn contiguous(seg: &Segment, next: &Segment) -> bool {
    seg.token == next.token && seg.dev == next.dev && seg.addr + seg.len == next.addr
}

/// Resolves every descriptor against a local index, and collects the fences of the distinct
/// regions used. On a miss (no registration covers the descriptor, or the covering one is
/// being deregistered) returns its position.
fn resolve_local(
    index: &RegIndex<LocalReg>,
    descs: &[Desc],
    self_target: bool,
) -> std::result::Result<(SegmentVec, Fences), usize> {
    let mut out = SegmentVec::with_capacity(descs.len());
    let mut fences: Vec<Arc<RegionFence>> = Vec::new();
    let mut hint = 0usize;
    let mut last_id = u64::MAX;
    for (i, d) in descs.iter().enumerate() {
        let pos = index.find_covering_hinted(d, hint).ok_or(i)?;
        hint = pos;
        let reg = &index.entries()[pos].value;
        if reg.id != last_id {
            if !reg.fence.is_open() {
                return Err(i);
            }
            fences.push(reg.fence.clone());
            last_id = reg.id;
        }
        let token = if self_target {
            reg.target_token
        } else {
            reg.token
        };
        out.push(Segment {
            addr: d.addr,
            len: d.len,
            dev: d.dev,
            token,
        });
    }
    fences.sort_unstable_by_key(|f| f.id);
    fences.dedup_by_key(|f| f.id);
    Ok((out, fences.into()))
}

/// Resolves every descriptor against a remote index; on a miss returns its position.
fn resolve_remote(
    index: &RegIndex<RemoteRegion>,
    descs: &[Desc],
) -> std::result::Result<SegmentVec, usize> {
    let mut out = SegmentVec::with_capacity(descs.len());
    let mut hint = 0usize;
    for (i, d) in descs.iter().enumerate() {
        let pos = index.find_covering_hinted(d, hint).ok_or(i)?;
        hint = pos;
        let token = index.entries()[pos].value.token;
        out.push(Segment {
            addr: d.addr,
            len: d.len,
            dev: d.dev,
            token,
        });
    }
    Ok(out)
}

/// Pairs resolved descriptors position by position (in place), merging neighbours that
/// continue contiguously in the same regions on both sides.
fn merge_segments(mut ls: SegmentVec, mut rs: SegmentVec) -> (SegmentVec, SegmentVec) {
    let mut w = 0usize;
    for k in 0..ls.len() {
        if k > 0 && contiguous(&ls[w], &ls[k]) && contiguous(&rs[w], &rs[k]) {
            let add = ls[k].len;
            ls[w].len += add;
            rs[w].len += add;
        } else {
            if k > 0 {
                w += 1;
            }
            ls[w] = ls[k];
            rs[w] = rs[k];
        }
    }
    ls.truncate(w + 1);
    rs.truncate(w + 1);
    (ls, rs)
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
        if !r.agent.alive.load(Ordering::Acquire) {
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
        let telemetry = r.agent.config.capture_telemetry;
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
        let mut guard = r.notif.lock();
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
        if !r.agent.config.capture_telemetry {
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
            .map_or(self.inner.agent.name.as_str(), |p| p.name.as_str())
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
                        let _ = self.xfer.cancel();
                        self.completion.abort(self.decorate(e));
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
        let _ = self.xfer.cancel();
        let t = self.timeout.unwrap_or_default();
        self.completion.abort(self.decorate(Error::timeout(format!(
            "the transfer did not complete within {t:?}"
        ))));
        self.completion.status()
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
