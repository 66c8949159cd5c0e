//! Metadata on the agent's side: publishing this agent's blob (full or partial) and loading,
//! invalidating and checking peers' blobs in the remote cache.
//!
//! A load is atomic: phase 1 validates the whole blob against the current entry without side
//! effects (NIXL's rules: own blob, restarted peer, changed public data, descriptors before
//! connection info), phase 2 hands the new parts to the backends and undoes them on failure,
//! phase 3 commits. A failed load leaves the cache exactly as it was: all three phases run
//! under the cache's write lock (`RemoteTable::begin_load`), and only phase 3 changes the
//! cache (`PendingLoad::commit`), so returning an error before it is the rollback.

use rixl_core::{
    AgentMetadata, ConnInfo, Desc, Error, MemType, MetadataSection, PublishedRegion, RegDescList,
    RegIndex, Result,
};

use crate::agent::AgentInner;
use crate::backends::BackendSlot;
use crate::remote::{RemoteRegion, RemoteSection, RemoteState};

impl AgentInner {
    pub fn full_metadata(&self) -> Result<Vec<u8>> {
        self.local_metadata(None, true, &[])
    }

    pub(crate) fn local_metadata(
        &self,
        only: Option<&RegDescList>,
        include_conn: bool,
        names: &[&str],
    ) -> Result<Vec<u8>> {
        let filter = self.backends().filter(names)?;
        let all = self.backends().snapshot();
        let slots: Vec<&BackendSlot> = all
            .iter()
            .filter(|s| s.caps.remote && filter.allows(s.index))
            .collect();
        if slots.is_empty() {
            return Err(Error::invalid_param(
                "no remote-capable backend: there is no metadata to publish",
            ));
        }
        let mut md = AgentMetadata {
            agent: self.name().to_owned(),
            ..AgentMetadata::default()
        };
        if include_conn {
            for s in &slots {
                if let Some(info) = s.backend.remote().map(|r| r.conn_info()) {
                    md.conn.push(ConnInfo {
                        backend: s.name.to_string(),
                        info,
                    });
                }
            }
        }
        // One state of the registrations for the whole blob.
        self.regs().visit(|regs| {
            match only {
                None => {
                    for sec in regs.sections() {
                        if let Some(s) = slots.iter().find(|s| s.index == sec.backend()) {
                            md.sections.push(MetadataSection {
                                backend: s.name.to_string(),
                                mem: sec.mem(),
                                regions: sec.published().collect(),
                            });
                        }
                    }
                }
                Some(list) => {
                    let mem = list.mem();
                    for (i, d) in list.descs().iter().enumerate() {
                        let mut found = false;
                        for s in &slots {
                            let Some(public) = regs.public_of(mem, s.index, &d.desc) else {
                                continue;
                            };
                            found = true;
                            let region = PublishedRegion {
                                desc: d.desc,
                                public: public.to_vec(),
                            };
                            match md
                                .sections
                                .iter_mut()
                                .find(|m| m.mem == mem && *m.backend == *s.name)
                            {
                                Some(m) if m.regions.iter().any(|r| r.desc == d.desc) => {}
                                Some(m) => m.regions.push(region),
                                None => md.sections.push(MetadataSection {
                                    backend: s.name.to_string(),
                                    mem,
                                    regions: vec![region],
                                }),
                            }
                        }
                        if !found {
                            return Err(Error::not_found(format!(
                                "descriptor {i} (addr {:#x}, len {}, dev {}) is not exactly a registration of a remote-capable backend",
                                d.desc.addr, d.desc.len, d.desc.dev
                            ))
                            .with_mem(mem));
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(md.encode())
    }

    pub fn load_remote(&self, blob: &[u8]) -> Result<String> {
        let md = AgentMetadata::decode(blob)?;
        let peer = md.agent.as_str();
        if peer == self.name() {
            return Err(Error::invalid_param(
                "this blob is the agent's own metadata; an agent cannot load itself",
            ));
        }
        let slots = self.backends().snapshot();
        let by_name = |n: &str| slots.iter().find(|s| &*s.name == n && s.caps.remote);
        // Holds the cache's write lock until the load is committed or dropped (on an error).
        let load = self.remotes().begin_load(peer);
        let existing = load.current();
        let old = existing.map(|e| e.state.read());

        // Phase 1: validate everything against the current entry without side effects.
        let mut new_conn: Vec<(&BackendSlot, &[u8])> = Vec::new();
        let mut offered_known = false;
        for c in &md.conn {
            let Some(slot) = by_name(&c.backend) else {
                continue;
            };
            offered_known = true;
            match old.as_ref().and_then(|o| o.conn_of(slot.index)) {
                Some(prev) if prev == c.info.as_slice() => {}
                Some(_) => {
                    return Err(Error::not_allowed(format!(
                        "agent {peer:?} is already loaded with different {} connection info \
                         (restarted?); invalidate it first",
                        c.backend
                    ))
                    .with_peer(peer)
                    .with_backend(&c.backend));
                }
                None => new_conn.push((slot, &c.info)),
            }
        }
        if !md.conn.is_empty() && !offered_known && old.is_none() {
            return Err(Error::backend(format!(
                "agent {peer:?} offers no backend this agent has (it has {})",
                md.conn
                    .iter()
                    .map(|c| c.backend.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .with_peer(peer));
        }
        let mut new_regions: Vec<(&BackendSlot, MemType, &PublishedRegion)> = Vec::new();
        for sec in &md.sections {
            let Some(slot) = by_name(&sec.backend) else {
                continue;
            };
            let conn_known = new_conn.iter().any(|(s, _)| s.index == slot.index)
                || old
                    .as_ref()
                    .is_some_and(|o| o.conn_of(slot.index).is_some());
            if !conn_known {
                return Err(Error::not_found(format!(
                    "metadata of agent {peer:?} has {} registrations but its {} connection info \
                     is not loaded yet; load a blob with connection info first",
                    sec.mem, sec.backend
                ))
                .with_peer(peer)
                .with_backend(&sec.backend));
            }
            let mut probe: RegIndex<()> = RegIndex::new();
            let current = old.as_ref().and_then(|o| o.section(sec.mem, slot.index));
            for r in &sec.regions {
                if let Some(cur) = current {
                    if let Some(pos) = cur.index.find_exact(&r.desc) {
                        if cur.index.entries()[pos].value.public != r.public {
                            return Err(Error::not_allowed(format!(
                                "agent {peer:?} republished region (addr {:#x}, len {}) with different public data",
                                r.desc.addr, r.desc.len
                            ))
                            .with_peer(peer)
                            .with_backend(&sec.backend));
                        }
                        continue;
                    }
                    if cur.index.check_insert(&r.desc).is_err() {
                        return Err(Error::not_allowed(format!(
                            "agent {peer:?} published region (addr {:#x}, len {}) overlapping one already loaded",
                            r.desc.addr, r.desc.len
                        ))
                        .with_peer(peer));
                    }
                }
                if probe.insert(r.desc, ()).is_err() {
                    return Err(Error::mismatch(format!(
                        "metadata of agent {peer:?} holds overlapping regions at {:#x}",
                        r.desc.addr
                    ))
                    .with_peer(peer));
                }
                new_regions.push((slot, sec.mem, r));
            }
        }
        drop(old);

        // Phase 2: hand the new parts to the backends, undoing on failure.
        let mut accepted_conn: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut unreachable: Vec<(usize, Vec<u8>)> = Vec::new();
        for (slot, info) in &new_conn {
            let loaded = match slot.backend.remote() {
                Some(r) => r.load_remote_conn_info(peer, info),
                None => Err(Error::not_supported("the backend has no remote part")),
            };
            match loaded {
                Ok(()) => accepted_conn.push((slot.index, info.to_vec())),
                Err(e) if e.kind() == rixl_core::ErrorKind::NotSupported => {
                    tracing::debug!("{} cannot reach {peer}: {e}", slot.name);
                    unreachable.push((slot.index, info.to_vec()));
                }
                Err(e) => {
                    for (b, _) in &accepted_conn {
                        slots[*b].disconnect(peer);
                    }
                    return Err(e.with_backend(&slot.name).with_peer(peer));
                }
            }
        }
        let reachable_before = existing.is_some_and(|e| !e.state.read().conn.is_empty());
        if !new_conn.is_empty() && accepted_conn.is_empty() && !reachable_before {
            return Err(Error::backend(format!(
                "no backend of this agent can reach agent {peer:?}"
            ))
            .with_peer(peer));
        }
        let reachable = |b: usize| {
            accepted_conn.iter().any(|(i, _)| *i == b)
                || existing.is_some_and(|e| e.state.read().reachable(b))
        };
        let mut loaded: Vec<(usize, MemType, Desc, RemoteRegion)> = Vec::new();
        for (slot, mem, r) in &new_regions {
            if !reachable(slot.index) {
                continue;
            }
            let region = match slot.backend.remote() {
                Some(remote) => remote.load_remote_region(peer, *mem, &r.desc, &r.public),
                None => Err(Error::not_supported("the backend has no remote part")),
            };
            match region {
                Ok(token) => loaded.push((
                    slot.index,
                    *mem,
                    r.desc,
                    RemoteRegion {
                        public: r.public.clone(),
                        token,
                    },
                )),
                Err(e) => {
                    for (b, m, _, rr) in &loaded {
                        slots[*b].unload_remote_region(peer, *m, rr.token);
                    }
                    for (b, _) in &accepted_conn {
                        slots[*b].disconnect(peer);
                    }
                    return Err(e.with_backend(&slot.name).with_peer(peer));
                }
            }
        }

        // Phase 3: commit.
        load.commit(|st| {
            let RemoteState {
                conn,
                unreachable: unr,
                sections,
            } = st;
            conn.extend(accepted_conn);
            unr.extend(unreachable);
            for (b, mem, desc, rr) in loaded {
                let pos = match sections.iter().position(|s| s.mem == mem && s.backend == b) {
                    Some(p) => p,
                    None => {
                        sections.push(RemoteSection {
                            mem,
                            backend: b,
                            index: RegIndex::new(),
                        });
                        sections.len() - 1
                    }
                };
                sections[pos]
                    .index
                    .insert(desc, rr)
                    .expect("overlap checked in phase 1");
            }
        });
        Ok(peer.to_owned())
    }

    pub fn invalidate_remote(&self, agent: &str) {
        let Some(entry) = self.remotes().remove(agent) else {
            return;
        };
        entry.invalidate();
        let slots = self.backends().snapshot();
        let st = entry.state.read();
        for sec in &st.sections {
            if let Some(slot) = slots.get(sec.backend) {
                for e in sec.index.entries() {
                    slot.unload_remote_region(agent, sec.mem, e.value.token);
                }
            }
        }
        for (b, _) in &st.conn {
            if let Some(slot) = slots.get(*b) {
                slot.disconnect(agent);
            }
        }
    }

    pub(crate) fn check_remote(
        &self,
        agent: &str,
        descs: Option<&rixl_core::XferDescList>,
    ) -> bool {
        let Some(entry) = self.remotes().get(agent) else {
            return false;
        };
        let Some(list) = descs.filter(|l| !l.is_empty()) else {
            return true;
        };
        let st = entry.state.read();
        st.sections.iter().any(|sec| {
            sec.mem == list.mem()
                && st.reachable(sec.backend)
                && list
                    .descs()
                    .iter()
                    .all(|d| d.check_xfer(0).is_ok() && sec.index.find_covering(d).is_some())
        })
    }
}
