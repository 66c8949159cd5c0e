//! Local registrations: the per-(memory type, backend) indexes and the register / deregister
//! paths of the agent.
//!
//! Both calls check everything before touching any backend (a refused call changes nothing),
//! and registration rolls back a backend's part if one of its regions fails. Deregistration
//! bumps the registration epoch, which is how requests built earlier notice (cheaply, on their
//! next post) that a region they use may be gone.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use rixl_core::{Desc, Error, MemType, RegDescList, RegIndex, Result};

use crate::agent::{AgentInner, BackendSlot};

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
    /// Ids of live registrations.
    pub live: HashSet<u64>,
}

impl LocalRegs {
    pub fn section(&self, mem: MemType, backend: usize) -> Option<&LocalSection> {
        self.sections
            .iter()
            .find(|s| s.mem == mem && s.backend == backend)
    }
}

impl AgentInner {
    pub(crate) fn register(&self, list: &RegDescList, names: &[&str]) -> Result<()> {
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
        for slot in &slots {
            let mut done: Vec<(rixl_core::Desc, LocalReg)> = Vec::with_capacity(list.len());
            let mut failed = None;
            for d in list.descs() {
                let r = slot.backend.register(mem, d).and_then(|region| {
                    let target_token = slot.backend.local_target_token(mem, region.token)?;
                    Ok(LocalReg {
                        id: self.next_reg_id.fetch_add(1, Ordering::Relaxed),
                        token: region.token,
                        target_token,
                        public: region.public,
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
            let LocalRegs { sections, live } = &mut *regs;
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
                live.insert(reg.id);
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
        Ok(())
    }

    pub(crate) fn deregister(&self, list: &RegDescList, names: &[&str]) -> Result<()> {
        let mem = list.mem();
        let filter = self.backend_filter(names)?;
        let slots = self.backends.read().clone();
        let mut regs = self.regs.write();
        // Check everything first: a refused call changes nothing.
        let mut plan: Vec<(usize, Desc)> = Vec::new();
        for (i, d) in list.descs().iter().enumerate() {
            let mut found = false;
            for (si, sec) in regs.sections.iter().enumerate() {
                if sec.mem == mem
                    && filter.allows(sec.backend)
                    && sec.index.find_exact(&d.desc).is_some()
                {
                    if plan.iter().any(|(s, pd)| *s == si && *pd == d.desc) {
                        continue;
                    }
                    plan.push((si, d.desc));
                    found = true;
                }
            }
            if !found {
                return Err(Error::not_found(format!(
                    "deregistration {i} (addr {:#x}, len {}, dev {}) does not match a registration exactly",
                    d.desc.addr, d.desc.len, d.desc.dev
                ))
                .with_mem(mem));
            }
        }
        let mut first_err = None;
        for (si, desc) in plan {
            let backend = regs.sections[si].backend;
            let reg = regs.sections[si]
                .index
                .remove_exact(&desc)
                .expect("checked above under the same lock");
            regs.live.remove(&reg.id);
            if let Err(e) = slots[backend].backend.deregister(mem, reg.token) {
                first_err.get_or_insert(e.with_backend(&slots[backend].name));
            }
        }
        regs.sections.retain(|s| !s.index.is_empty());
        drop(regs);
        self.reg_epoch.fetch_add(1, Ordering::AcqRel);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
