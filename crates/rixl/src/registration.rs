//! Local registrations: the table of this agent's registered regions, per (memory type,
//! backend), and the register / deregister paths of the agent.
//!
//! Both calls check everything before touching any backend (a refused call changes nothing),
//! and registration rolls back a backend's part if one of its regions fails. Deregistration is
//! fenced (see `fence`): it closes the regions to new posts, waits for the posts in flight that
//! use them, and only then tells the backends, so no byte moves into or out of a region after
//! `deregister_mem` returned. Requests built earlier see the closed fence on their next post.
//!
//! Regions registered through a handle (`owned`: `Registration`, `OwnedRegion`) are marked
//! `held`: only their handle (or the agent's teardown) deregisters them, so `deregister_mem`
//! refuses them and a handle never removes a registration that is not its own.
//!
//! The regions live in a [`LocalTable`], a part of the agent of its own so that what is done
//! under its lock is decided here, next to the fences, and nowhere else: registration checks
//! overlaps, has the backends register and inserts under one write lock (so the check still
//! holds when it inserts); deregistration closes the fences of its plan under the read lock,
//! waits with no lock at all, then removes and tells the backends under the write lock;
//! prepared lists, requests and metadata only read, through [`LocalTable::visit`], which lends
//! the [`LocalRegs`] view (the sections, a registration's public data, resolution of a
//! descriptor list against one section) for lookups that must see one state; the teardown
//! takes every fence, then releases every region.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use rixl_core::{
    Desc, Error, MemType, PublishedRegion, RegDescList, RegIndex, Result, Segment, SegmentVec,
};

use crate::agent::AgentInner;
use crate::backends::{BackendFilter, BackendSlot};
use crate::fence::{self, Fences, RegionFence};

/// One local registration in one backend.
#[derive(Clone, Debug)]
struct LocalReg {
    /// The backend's token for the region.
    token: u64,
    /// Token to use when this agent is its own target.
    target_token: u64,
    public: Vec<u8>,
    /// Posts in flight that use the region; deregistration waits for them.
    fence: Arc<RegionFence>,
    /// Registered through a handle, which alone deregisters it (not `deregister_mem`).
    held: bool,
}

/// A region a handle holds: enough to find exactly that registration again.
#[derive(Clone, Debug)]
pub(crate) struct HeldRegion {
    /// The backend's index in the agent.
    pub backend: usize,
    /// The backend's name, for messages.
    pub backend_name: Arc<str>,
    pub desc: Desc,
    /// Identifies the registration (with `desc`) and tells whether it was released.
    pub fence: Arc<RegionFence>,
}

/// The regions of one memory type registered with one backend.
#[derive(Debug)]
pub(crate) struct LocalSection {
    mem: MemType,
    backend: usize,
    index: RegIndex<LocalReg>,
}

impl LocalSection {
    /// The memory type of the section.
    pub fn mem(&self) -> MemType {
        self.mem
    }

    /// The index of the backend holding the section.
    pub fn backend(&self) -> usize {
        self.backend
    }

    /// The regions as metadata publishes them, in address order.
    pub fn published(&self) -> impl Iterator<Item = PublishedRegion> + '_ {
        self.index.entries().iter().map(|e| PublishedRegion {
            desc: e.desc,
            public: e.value.public.clone(),
        })
    }
}

/// The registered regions, as [`LocalTable::visit`] lends them.
#[derive(Debug, Default)]
pub(crate) struct LocalRegs {
    sections: Vec<LocalSection>,
}

impl LocalRegs {
    fn section(&self, mem: MemType, backend: usize) -> Option<&LocalSection> {
        self.sections
            .iter()
            .find(|s| s.mem == mem && s.backend == backend)
    }

    /// The sections, in the order they were first registered.
    pub fn sections(&self) -> impl Iterator<Item = &LocalSection> {
        self.sections.iter()
    }

    /// The public data of the registration that is exactly `desc` in `backend`'s `mem`
    /// section, if there is one.
    pub fn public_of(&self, mem: MemType, backend: usize, desc: &Desc) -> Option<&[u8]> {
        let sec = self.section(mem, backend)?;
        let pos = sec.index.find_exact(desc)?;
        Some(&sec.index.entries()[pos].value.public)
    }

    /// Resolves `descs` against `backend`'s `mem` registrations (`None` if it has none): per
    /// descriptor, its segment with the covering region's token (the target token with
    /// `self_target`), and the fences of the distinct regions used; on a miss (no region
    /// covers a descriptor, or the covering one is being deregistered) its position.
    pub fn resolve(
        &self,
        mem: MemType,
        backend: usize,
        descs: &[Desc],
        self_target: bool,
    ) -> Option<std::result::Result<(SegmentVec, Fences), usize>> {
        let sec = self.section(mem, backend)?;
        Some(resolve_local(&sec.index, descs, self_target))
    }
}

/// This agent's registrations (see the module documentation).
#[derive(Debug)]
pub(crate) struct LocalTable {
    regs: RwLock<LocalRegs>,
    /// Source of the agent-wide registration ids.
    next_id: AtomicU64,
    /// `AgentConfig::allow_overlapping_registrations`.
    allow_overlap: bool,
}

impl LocalTable {
    pub fn new(allow_overlap: bool) -> LocalTable {
        LocalTable {
            regs: RwLock::new(LocalRegs::default()),
            next_id: AtomicU64::new(1),
            allow_overlap,
        }
    }

    /// Runs `f` on the registrations under the read lock: for lookups that must agree with
    /// each other (one list resolved for several backends, both sides of one request, one
    /// metadata blob). `f` must not call into a backend nor wait.
    pub fn visit<R>(&self, f: impl FnOnce(&LocalRegs) -> R) -> R {
        f(&self.regs.read())
    }

    /// The fences of every registered region (the agent's teardown closes them all).
    pub fn fences(&self) -> Vec<Arc<RegionFence>> {
        self.regs
            .read()
            .sections
            .iter()
            .flat_map(|s| s.index.entries().iter().map(|e| e.value.fence.clone()))
            .collect()
    }

    /// Removes every region and tells its backend (from `slots`, the agent's backends), at
    /// the agent's teardown; each region's fence records the backend's answer.
    pub fn release_all(&self, slots: &[BackendSlot]) {
        let mut regs = self.regs.write();
        for section in regs.sections.iter_mut() {
            let backend = &slots[section.backend].backend;
            for e in section.index.drain() {
                if e.value.fence.inflight() > 0 {
                    // A post still uses it (the agent gave up waiting): telling the backend
                    // would break `prepare_xfer`'s contract, so the region stays in the backend,
                    // which is shut down next and serves nothing new. The agent lets go of it:
                    // a handle owning the memory frees it once the last post has ended
                    // (`wait_released` also waits for the pins), not before.
                    e.value.fence.mark_released(true);
                    continue;
                }
                let r = backend.deregister(section.mem, e.value.token);
                e.value.fence.mark_released(r.is_ok());
                if let Err(err) = r {
                    tracing::warn!("deregistration at agent teardown failed: {err}");
                }
            }
        }
    }

    fn new_index(&self) -> RegIndex<LocalReg> {
        if self.allow_overlap {
            RegIndex::allowing_overlap()
        } else {
            RegIndex::new()
        }
    }
}

/// What [`LocalTable::register`] did.
struct Registered {
    /// The regions made, one per descriptor and accepting backend, if they are held.
    held: Vec<HeldRegion>,
    /// How many backends accepted the whole list.
    accepted: usize,
    /// Why the last backend that refused did.
    last_err: Option<Error>,
}

impl LocalTable {
    /// Registers `list` with each of `slots` under the write lock: overlaps (with existing
    /// registrations and within the list) are refused before any backend is called, so that a
    /// refused call changes nothing; a backend that fails on one region has its other regions
    /// of the list deregistered again.
    fn register(
        &self,
        list: &RegDescList,
        slots: &[&BackendSlot],
        held: bool,
    ) -> Result<Registered> {
        let mem = list.mem();
        let mut regs = self.regs.write();
        // Refuse overlaps (with existing registrations and within the list) before touching any
        // backend, so that a refused call changes nothing.
        for slot in slots {
            let mut probe: RegIndex<()> = if self.allow_overlap {
                RegIndex::allowing_overlap()
            } else {
                RegIndex::new()
            };
            for (i, d) in list.descs().iter().enumerate() {
                if let Some(sec) = regs.section(mem, slot.index) {
                    sec.index.check_insert(&d.desc).map_err(|e| {
                        Error::invalid_param(format!("registration {i}: {}", e.message()))
                            .with_backend(&slot.name)
                            .with_mem(mem)
                    })?;
                }
                probe.insert(d.desc, ()).map_err(|e| {
                    Error::invalid_param(format!(
                        "registration {i} overlaps another entry of the same list: {}",
                        e.message()
                    ))
                    .with_mem(mem)
                })?;
            }
        }
        let mut accepted = 0usize;
        let mut last_err = None;
        let mut handle_regions = Vec::new();
        for slot in slots {
            let mut done: Vec<(rixl_core::Desc, LocalReg)> = Vec::with_capacity(list.len());
            let mut failed = None;
            for d in list.descs() {
                // SAFETY: the caller of `Agent::register_mem` or `Agent::register` (whose
                // contract is the same; `register_owned` and `register_storage` uphold it
                // themselves) promised that the range stays valid until it is deregistered (or
                // the agent dropped), and the agent calls the backend's `deregister` only after
                // every post using it has ended (`fence`).
                let region = unsafe { slot.backend.register(mem, d) };
                let r = region.and_then(|region| {
                    let target_token = slot.backend.local_target_token(mem, region.token)?;
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    Ok(LocalReg {
                        token: region.token,
                        target_token,
                        public: region.public,
                        fence: RegionFence::new(id),
                        held,
                    })
                });
                match r {
                    Ok(reg) => done.push((d.desc, reg)),
                    Err(e) => {
                        failed = Some(e.with_backend(&slot.name).with_mem(mem));
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                for (_, reg) in done {
                    let _ = slot.backend.deregister(mem, reg.token);
                }
                tracing::warn!("registration with {} failed: {e}", slot.name);
                last_err = Some(e);
                continue;
            }
            let sections = &mut regs.sections;
            let pos = match sections
                .iter()
                .position(|s| s.mem == mem && s.backend == slot.index)
            {
                Some(p) => p,
                None => {
                    sections.push(LocalSection {
                        mem,
                        backend: slot.index,
                        index: self.new_index(),
                    });
                    sections.len() - 1
                }
            };
            for (desc, reg) in done {
                if held {
                    handle_regions.push(HeldRegion {
                        backend: slot.index,
                        backend_name: slot.name.clone(),
                        desc,
                        fence: reg.fence.clone(),
                    });
                }
                sections[pos]
                    .index
                    .insert(desc, reg)
                    .expect("overlap was checked under the same lock");
            }
            accepted += 1;
        }
        Ok(Registered {
            held: handle_regions,
            accepted,
            last_err,
        })
    }
}

impl AgentInner {
    /// Registers `list`; with `held`, for a handle, whose regions are returned (one per
    /// descriptor and accepting backend).
    pub(crate) fn register(
        &self,
        list: &RegDescList,
        names: &[&str],
        held: bool,
    ) -> Result<Vec<HeldRegion>> {
        let mem = list.mem();
        for (i, d) in list.descs().iter().enumerate() {
            d.check(mem, i)?;
        }
        if list.is_empty() {
            return Err(Error::invalid_param("the registration list is empty"));
        }
        let filter = self.backends().filter(names)?;
        let all = self.backends().snapshot();
        let slots: Vec<&BackendSlot> = all
            .iter()
            .filter(|s| filter.allows(s.index) && s.caps.supports(mem))
            .collect();
        if slots.is_empty() {
            return Err(
                Error::not_found(format!("no created backend supports {mem} memory")).with_mem(mem),
            );
        }
        let done = self.regs().register(list, &slots, held)?;
        if done.accepted == 0 {
            let e = done.last_err.expect("at least one backend was tried");
            return Err(if e.kind() == rixl_core::ErrorKind::InvalidParam {
                e
            } else {
                let err = Error::backend(format!(
                    "every backend refused the registration: {}",
                    e.message()
                ))
                .with_mem(mem);
                match e.os_error() {
                    Some(errno) => err.with_os_error(errno),
                    None => err,
                }
            });
        }
        Ok(done.held)
    }

    pub(crate) fn deregister(&self, list: &RegDescList, names: &[&str]) -> Result<()> {
        let mem = list.mem();
        let filter = self.backends().filter(names)?;
        let slots = self.backends().snapshot();
        // 1. Under the lock: find every registration (a refused call changes nothing) and close
        //    its fence, so that no new post starts on it.
        let plan = self.regs().close_for_deregistration(list, &filter)?;
        // 2. Without any lock (posts in flight must be able to finish, and other calls to
        //    proceed): wait for the posts that still use the regions.
        let fences: Vec<Arc<RegionFence>> = plan.iter().map(|p| p.fence.clone()).collect();
        let timeout = self.config().deregister_timeout;
        let deadline = Instant::now() + timeout;
        let busy = fence::wait_idle(&fences, deadline);
        if !busy.is_empty() {
            for f in &fences {
                f.reopen();
            }
            let posts: u64 = busy.iter().map(|f| f.inflight()).sum();
            let first = plan
                .iter()
                .find(|p| Arc::ptr_eq(&p.fence, &busy[0]))
                .expect("busy fences come from the plan");
            return Err(Error::timeout(format!(
                "deregistration gave up after {:?}: {posts} post(s) in flight still use {} of the regions \
                 (first: addr {:#x}, len {}, dev {}); nothing was deregistered and the regions stay valid \
                 (wait for or cancel those requests, then deregister again)",
                timeout,
                busy.len(),
                first.desc.addr,
                first.desc.len,
                first.desc.dev
            ))
            .with_mem(mem)
            .with_backend(&slots[first.backend].name));
        }
        // 3. Remove the regions and tell the backends.
        self.regs().remove_planned(mem, plan, &slots)
    }

    /// Deregisters the regions of a handle, fenced like [`AgentInner::deregister`]: closes
    /// them, waits (up to `timeout`) for the posts that use them, then removes them and tells
    /// the backends, recording each backend's answer in the region's fence. All or nothing on
    /// `Timeout` (the regions stay registered, their fences open again). Regions the agent's
    /// teardown closed or removed are left to it: the caller waits for their release
    /// (`fence::wait_released`), which covers both cases.
    pub(crate) fn deregister_held(
        &self,
        mem: MemType,
        held: &[HeldRegion],
        timeout: Duration,
    ) -> Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        let slots = self.backends().snapshot();
        // 1. Close the fences of the regions still in the index. Only this handle and the
        //    teardown close a held region; if the teardown got there first it releases it.
        let closed = self.regs().close_held(mem, held);
        // 2. Wait, without any lock, for the posts in flight.
        let fences: Vec<Arc<RegionFence>> = closed.iter().map(|h| h.fence.clone()).collect();
        let busy = fence::wait_idle(&fences, Instant::now() + timeout);
        if !busy.is_empty() {
            if self.is_alive() {
                for f in &fences {
                    f.reopen();
                }
            }
            let posts: u64 = busy.iter().map(|f| f.inflight()).sum();
            let first = closed
                .iter()
                .find(|h| Arc::ptr_eq(&h.fence, &busy[0]))
                .expect("busy fences come from the closed regions");
            return Err(Error::timeout(format!(
                "deregistration gave up after {timeout:?}: {posts} post(s) in flight still use {} \
                 of the regions (first: addr {:#x}, len {}, dev {}); nothing was deregistered and \
                 the regions stay registered (wait for or cancel those requests, then deregister \
                 again)",
                busy.len(),
                first.desc.addr,
                first.desc.len,
                first.desc.dev
            ))
            .with_mem(mem)
            .with_backend(&first.backend_name));
        }
        // 3. Remove them and tell the backends.
        self.regs().remove_held(mem, closed, &slots)
    }
}

/// One registration a deregistration call will remove.
struct Planned {
    backend: usize,
    desc: Desc,
    token: u64,
    fence: Arc<RegionFence>,
}

impl LocalTable {
    /// The deregistration plan: finds, under the read lock, the registration of every
    /// descriptor of `list` in the allowed backends and closes their fences. Fails, with every
    /// fence as it was, if a descriptor matches no registration exactly, only registrations
    /// held by handles, or another deregistration is already under way for one.
    fn close_for_deregistration(
        &self,
        list: &RegDescList,
        filter: &BackendFilter,
    ) -> Result<Vec<Planned>> {
        let mem = list.mem();
        let regs = self.regs.read();
        let mut plan: Vec<Planned> = Vec::new();
        let mut refused = None;
        'descs: for (i, d) in list.descs().iter().enumerate() {
            let mut found = false;
            let mut held = false;
            for sec in regs.sections.iter() {
                if sec.mem != mem || !filter.allows(sec.backend) {
                    continue;
                }
                if sec.index.find_exact_where(&d.desc, |r| !r.held).is_none() {
                    held |= sec.index.find_exact(&d.desc).is_some();
                    continue;
                }
                found = true;
                if plan
                    .iter()
                    .any(|p| p.backend == sec.backend && p.desc == d.desc)
                {
                    continue;
                }
                // With overlaps allowed the same range may be registered twice: take one whose
                // fence is still open.
                let open = sec
                    .index
                    .find_exact_where(&d.desc, |r| !r.held && r.fence.is_open());
                let Some(reg) = open.map(|pos| &sec.index.entries()[pos].value) else {
                    refused = Some(Error::not_found(format!(
                        "deregistration {i} (addr {:#x}, len {}, dev {}) is already being deregistered by another call",
                        d.desc.addr, d.desc.len, d.desc.dev
                    )));
                    break 'descs;
                };
                if !reg.fence.close() {
                    refused = Some(Error::not_found(format!(
                        "deregistration {i} (addr {:#x}, len {}, dev {}) is already being deregistered by another call",
                        d.desc.addr, d.desc.len, d.desc.dev
                    )));
                    break 'descs;
                }
                plan.push(Planned {
                    backend: sec.backend,
                    desc: d.desc,
                    token: reg.token,
                    fence: reg.fence.clone(),
                });
            }
            if !found && held {
                refused = Some(Error::invalid_param(format!(
                    "deregistration {i} (addr {:#x}, len {}, dev {}) is held by a Registration or \
                     OwnedRegion handle: deregister or drop the handle instead",
                    d.desc.addr, d.desc.len, d.desc.dev
                )));
                break;
            }
            if !found {
                refused = Some(Error::not_found(format!(
                    "deregistration {i} (addr {:#x}, len {}, dev {}) does not match a registration exactly",
                    d.desc.addr, d.desc.len, d.desc.dev
                )));
                break;
            }
        }
        if let Some(e) = refused {
            for p in &plan {
                p.fence.reopen();
            }
            return Err(e.with_mem(mem));
        }
        Ok(plan)
    }

    /// Carries out a plan whose posts are done: under the write lock, removes each region and
    /// tells its backend (from `slots`), recording the answer in the fence. Nobody else
    /// removes a closed region, so every entry of the plan is still there. Returns the first
    /// backend error.
    fn remove_planned(
        &self,
        mem: MemType,
        plan: Vec<Planned>,
        slots: &[BackendSlot],
    ) -> Result<()> {
        let mut regs = self.regs.write();
        let mut first_err = None;
        for p in plan {
            // Looked up again: another deregistration may have dropped an emptied section
            // since, which moves the positions.
            let index = &mut regs
                .sections
                .iter_mut()
                .find(|s| s.mem == mem && s.backend == p.backend)
                .expect("the section holds a region that only this call removes")
                .index;
            let pos = index
                .find_exact_where(&p.desc, |r| Arc::ptr_eq(&r.fence, &p.fence))
                .expect("a closed region is removed only by the call that closed it");
            index.remove_at(pos);
            let backend = &slots[p.backend];
            let r = backend.backend.deregister(mem, p.token);
            p.fence.mark_released(r.is_ok());
            if let Err(e) = r {
                first_err.get_or_insert(e.with_backend(&backend.name));
            }
        }
        regs.sections.retain(|s| !s.index.is_empty());
        drop(regs);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Closes, under the read lock, the fences of the `held` regions still in the table and
    /// returns those it closed. Regions already released, or closed by the teardown, are left
    /// out.
    fn close_held<'h>(&self, mem: MemType, held: &'h [HeldRegion]) -> Vec<&'h HeldRegion> {
        let mut closed: Vec<&HeldRegion> = Vec::with_capacity(held.len());
        let regs = self.regs.read();
        for h in held {
            if h.fence.released().is_some() {
                continue;
            }
            let present = regs.section(mem, h.backend).is_some_and(|sec| {
                sec.index
                    .find_exact_where(&h.desc, |r| Arc::ptr_eq(&r.fence, &h.fence))
                    .is_some()
            });
            if present && h.fence.close() {
                closed.push(h);
            }
        }
        closed
    }

    /// Removes the `closed` held regions under the write lock and tells their backends (from
    /// `slots`), recording each answer in the region's fence. A region missing now was drained
    /// by the teardown, which released it. Returns the first backend error.
    fn remove_held(
        &self,
        mem: MemType,
        closed: Vec<&HeldRegion>,
        slots: &[BackendSlot],
    ) -> Result<()> {
        let mut regs = self.regs.write();
        let mut first_err = None;
        for h in closed {
            let Some(sec) = regs
                .sections
                .iter_mut()
                .find(|s| s.mem == mem && s.backend == h.backend)
            else {
                continue;
            };
            let Some(pos) = sec
                .index
                .find_exact_where(&h.desc, |r| Arc::ptr_eq(&r.fence, &h.fence))
            else {
                continue;
            };
            let reg = sec.index.remove_at(pos);
            let r = match slots.get(h.backend) {
                Some(slot) => slot
                    .backend
                    .deregister(mem, reg.token)
                    .map_err(|e| e.with_backend(&slot.name)),
                None => Err(Error::unknown("the backend of a held region is gone")),
            };
            h.fence.mark_released(r.is_ok());
            if let Err(e) = r {
                first_err.get_or_insert(e.with_mem(mem));
            }
        }
        regs.sections.retain(|s| !s.index.is_empty());
        drop(regs);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Resolves every descriptor against a local index, and collects the fences of the distinct
/// regions used. On a miss (no registration covers the descriptor, or the covering one is
/// being deregistered) returns its position.
///
/// Two loops: the outer one looks a region up (binary search) and checks its fence; the inner
/// one takes every following descriptor that the same region covers, which is what a KV
/// cache's page list is made of. Measured (`core_paths`, prep_both_sides_65536): the single
/// loop with the region bookkeeping in it spilled registers and cost 6–7 ns per descriptor
/// against 5 before the fences; see the commit that split it.
fn resolve_local(
    index: &RegIndex<LocalReg>,
    descs: &[Desc],
    self_target: bool,
) -> std::result::Result<(SegmentVec, Fences), usize> {
    let mut out = SegmentVec::with_capacity(descs.len());
    let mut fences: Vec<Arc<RegionFence>> = Vec::new();
    let entries = index.entries();
    let mut i = 0usize;
    let mut hint = 0usize;
    while i < descs.len() {
        let pos = index.find_covering_hinted(&descs[i], hint).ok_or(i)?;
        hint = pos;
        let entry = &entries[pos];
        let reg = &entry.value;
        if !reg.fence.is_open() {
            return Err(i);
        }
        if fences.last().is_none_or(|f| !Arc::ptr_eq(f, &reg.fence)) {
            fences.push(reg.fence.clone());
        }
        let token = if self_target {
            reg.target_token
        } else {
            reg.token
        };
        // The run of descriptors this region covers.
        let run = descs[i..]
            .iter()
            .position(|d| !entry.covers(d))
            .unwrap_or(descs.len() - i);
        for d in &descs[i..i + run] {
            out.push(Segment {
                addr: d.addr,
                len: d.len,
                dev: d.dev,
                token,
            });
        }
        i += run;
    }
    fences.sort_unstable_by_key(|f| f.id);
    fences.dedup_by_key(|f| f.id);
    Ok((out, fences.into()))
}
