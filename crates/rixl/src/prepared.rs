//! Prepared descriptor lists: a transfer list validated once and resolved, for every backend
//! that covers all of it, to that backend's region tokens (and, for local regions, their
//! deregistration fences). Requests are then made from index arrays (`xfer`) without touching
//! any agent lock.

use std::sync::Arc;

use rixl_core::{Desc, Error, MemType, RegIndex, Result, Segment, SegmentVec, XferDescList};

use crate::agent::{Agent, AgentInner, INIT_AGENT, INIT_AGENT_NAME};
use crate::backends::BackendSlot;
use crate::fence::Fences;
use crate::remote::{RemoteEntry, RemoteRegion};

/// Which side a prepared list describes.
#[derive(Clone, Debug)]
pub(crate) enum Side {
    /// The initiator's own memory.
    Local,
    /// This agent as its own target (loopback, storage).
    SelfTarget,
    /// A remote agent's memory, as of the entry it was resolved against.
    Remote(Arc<RemoteEntry>),
}

/// One backend's resolution of a prepared list.
#[derive(Debug)]
pub(crate) struct Resolution {
    pub(crate) backend: BackendSlot,
    /// Per descriptor: the descriptor with the backend's token for its covering region, in one
    /// array so that making a request touches one cache line per index.
    pub(crate) entries: SegmentVec,
    /// Fences of the distinct local registrations used (empty for remote lists).
    pub(crate) fences: Fences,
}

#[derive(Debug)]
pub(crate) struct PrepInner {
    pub(crate) agent: Arc<AgentInner>,
    pub(crate) side: Side,
    pub(crate) mem: MemType,
    pub(crate) len: usize,
    pub(crate) resolutions: Vec<Resolution>,
}

/// A descriptor list validated and resolved once, to build requests from by index.
/// Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct PreparedList {
    pub(crate) inner: Arc<PrepInner>,
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
            Side::SelfTarget => Some(self.inner.agent.name()),
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
    pub(crate) fn check_fresh(&self) -> Result<()> {
        if !self.inner.agent.is_alive() {
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
        let filter = inner.backends().filter(backends)?;
        let mem = list.mem();
        let descs = list.descs();
        let side = if agent == INIT_AGENT || agent == INIT_AGENT_NAME {
            Side::Local
        } else if agent == inner.name() {
            Side::SelfTarget
        } else {
            Side::Remote(inner.remote(agent)?)
        };
        for (i, d) in descs.iter().enumerate() {
            d.check_xfer(i)?;
        }
        let slots = inner.backends().snapshot();
        let mut resolutions = Vec::new();
        let mut first_miss: Option<(usize, String)> = None;
        match &side {
            Side::Local | Side::SelfTarget => inner.regs().visit(|regs| {
                let self_target = matches!(side, Side::SelfTarget);
                for slot in slots.iter().filter(|s| filter.allows(s.index)) {
                    if self_target && !slot.caps.local {
                        continue;
                    }
                    let Some(resolved) = regs.resolve(mem, slot.index, descs, self_target) else {
                        continue;
                    };
                    match resolved {
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
            }),
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
}

/// Resolves every descriptor against a remote index; on a miss returns its position.
pub(crate) fn resolve_remote(
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
