//! Local registrations: the per-(memory type, backend) indexes and the register / deregister
//! paths of the agent.
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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rixl_core::{Desc, Error, MemType, RegDescList, RegIndex, Result};

use crate::agent::{AgentInner, BackendSlot};
use crate::fence::{self, RegionFence};

/// One local registration in one backend.
#[derive(Clone, Debug)]
pub(crate) struct LocalReg {
    /// Agent-wide unique id; requests remember the ids they use.
    pub id: u64,
    /// The backend's token for the region.
    pub token: u64,
    /// Token to use when this agent is its own target.
    pub target_token: u64,
    pub public: Vec<u8>,
    /// Posts in flight that use the region; deregistration waits for them.
    pub fence: Arc<RegionFence>,
    /// Registered through a handle, which alone deregisters it (not `deregister_mem`).
    pub held: bool,
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

#[derive(Debug)]
pub(crate) struct LocalSection {
    pub mem: MemType,
    pub backend: usize,
    pub index: RegIndex<LocalReg>,
}

#[derive(Debug, Default)]
pub(crate) struct LocalRegs {
    pub sections: Vec<LocalSection>,
}

impl LocalRegs {
    pub fn section(&self, mem: MemType, backend: usize) -> Option<&LocalSection> {
        self.sections
            .iter()
            .find(|s| s.mem == mem && s.backend == backend)
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
        let filter = self.backend_filter(names)?;
        let slots: Vec<BackendSlot> = self
            .backends
            .read()
            .iter()
            .filter(|s| filter.allows(s.index) && s.caps.supports(mem))
            .cloned()
            .collect();
        if slots.is_empty() {
            return Err(
                Error::not_found(format!("no created backend supports {mem} memory")).with_mem(mem),
            );
        }
        let mut regs = self.regs.write();
        // Refuse overlaps (with existing registrations and within the list) before touching any
        // backend, so that a refused call changes nothing.
        for slot in &slots {
            let mut probe: RegIndex<()> = if self.config.allow_overlapping_registrations {
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
        for slot in &slots {
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
                    let id = self.next_reg_id.fetch_add(1, Ordering::Relaxed);
                    Ok(LocalReg {
                        id,
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
            let allow = self.config.allow_overlapping_registrations;
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
                        index: if allow {
                            RegIndex::allowing_overlap()
                        } else {
                            RegIndex::new()
                        },
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
        if accepted == 0 {
            let e = last_err.expect("at least one backend was tried");
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
        Ok(handle_regions)
    }

    pub(crate) fn deregister(&self, list: &RegDescList, names: &[&str]) -> Result<()> {
        let mem = list.mem();
        let filter = self.backend_filter(names)?;
        let slots = self.backends.read().clone();
        // 1. Under the lock: find every registration (a refused call changes nothing) and close
        //    its fence, so that no new post starts on it.
        let plan = self.close_for_deregistration(list, &filter)?;
        // 2. Without any lock (posts in flight must be able to finish, and other calls to
        //    proceed): wait for the posts that still use the regions.
        let fences: Vec<Arc<RegionFence>> = plan.iter().map(|p| p.fence.clone()).collect();
        let deadline = Instant::now() + self.config.deregister_timeout;
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
                self.config.deregister_timeout,
                busy.len(),
                first.desc.addr,
                first.desc.len,
                first.desc.dev
            ))
            .with_mem(mem)
            .with_backend(&slots[first.backend].name));
        }
        // 3. Remove the regions and tell the backends. Nobody else removes a closed region,
        //    so every entry of the plan is still there.
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

    /// Finds the registration of every descriptor of `list` in the allowed backends and
    /// closes their fences. Fails, with every fence as it was, if a descriptor matches no
    /// registration exactly, only registrations held by handles, or another deregistration is
    /// already under way for one.
    fn close_for_deregistration(
        &self,
        list: &RegDescList,
        filter: &crate::agent::BackendFilter,
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
}

impl AgentInner {
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
        if !self.alive.load(Ordering::Acquire) {
            return Ok(());
        }
        let slots = self.backends.read().clone();
        // 1. Close the fences of the regions still in the index. Only this handle and the
        //    teardown close a held region; if the teardown got there first it releases it.
        let mut closed: Vec<&HeldRegion> = Vec::with_capacity(held.len());
        {
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
        }
        // 2. Wait, without any lock, for the posts in flight.
        let fences: Vec<Arc<RegionFence>> = closed.iter().map(|h| h.fence.clone()).collect();
        let busy = fence::wait_idle(&fences, Instant::now() + timeout);
        if !busy.is_empty() {
            if self.alive.load(Ordering::Acquire) {
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
        // 3. Remove them and tell the backends. A region missing now was drained by the
        //    teardown, which released it.
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

/// One registration a deregistration call will remove.
struct Planned {
    backend: usize,
    desc: Desc,
    token: u64,
    fence: Arc<RegionFence>,
}
