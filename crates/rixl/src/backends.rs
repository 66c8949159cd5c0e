//! The agent's backends: the table of created backends, in creation (= preference) order.
//!
//! Separate from the agent because every other part reads it — registration, metadata,
//! prepared lists, requests, notifications — and none of them should hold its lock while it
//! calls into a backend. So the table hands out what each caller needs instead of the lock:
//!
//! - [`BackendTable::slot`] and [`BackendTable::index`] find one backend by name, and
//!   [`BackendTable::filter`] turns a caller's list of names into a [`BackendFilter`];
//! - [`BackendTable::snapshot`] is the list as it is now, an `Arc` clone, for paths that call
//!   into backends after looking them up (never under the lock);
//! - [`BackendTable::visit`] lends the list under the read lock without cloning anything, for
//!   the notification poll (`get_notifs`, the notification stream), which a NIXL-style loop
//!   calls millions of times and whose `poll_notifs` never blocks;
//! - [`BackendTable::add`] creates a backend with the duplicate-name check and the
//!   consistency check of its parts (`check_parts`) under the write lock, so two concurrent
//!   creations cannot both take a name or an index; [`BackendTable::clear`] empties the table
//!   at teardown.
//!
//! The list itself is copy-on-write (`Arc<[BackendSlot]>`): a backend is added a handful of
//! times in an agent's life, and looked up on every call.

use std::sync::Arc;

use parking_lot::RwLock;
use rixl_backend::Backend;
use rixl_core::{Capabilities, Error, MemType, Result};

/// A created backend as the agent keeps it.
#[derive(Clone, Debug)]
pub(crate) struct BackendSlot {
    pub name: Arc<str>,
    pub backend: Arc<dyn Backend>,
    pub caps: Capabilities,
    pub index: usize,
}

impl BackendSlot {
    /// Sends through the notification part (which creation checked matches `caps.notif`).
    pub fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        match self.backend.notifications() {
            Some(n) => n.send_notif(peer, msg),
            None => Err(Error::backend(format!(
                "backend {} cannot carry notifications",
                self.name
            ))),
        }
    }

    /// Connects the remote part to `peer`.
    pub fn connect(&self, peer: &str) -> Result<()> {
        match self.backend.remote() {
            Some(r) => r.connect(peer),
            None => Err(Error::not_supported(format!(
                "backend {} cannot reach other agents",
                self.name
            ))),
        }
    }

    /// Drops the remote part's state about `peer`.
    pub fn disconnect(&self, peer: &str) {
        if let Some(r) = self.backend.remote() {
            r.disconnect(peer);
        }
    }

    /// Forgets one region `peer` published.
    pub fn unload_remote_region(&self, peer: &str, mem: MemType, token: u64) {
        if let Some(r) = self.backend.remote() {
            r.unload_remote_region(peer, mem, token);
        }
    }
}

/// Lets every notification backend of `slots` deliver what already arrived (never blocks).
pub(crate) fn poll_notifs(slots: &[BackendSlot]) {
    for n in slots.iter().filter_map(|s| s.backend.notifications()) {
        n.poll_notifs();
    }
}

/// Which backends (by index) a call may use.
pub(crate) struct BackendFilter(Option<Vec<usize>>);

impl BackendFilter {
    /// Every backend, for a call that names none.
    const ALL: BackendFilter = BackendFilter(None);

    /// The backends `names` name among `slots`; every backend if `names` is empty. Fails with
    /// `NotFound` on the first name that is not a created backend.
    pub fn among(slots: &[BackendSlot], names: &[&str]) -> Result<BackendFilter> {
        if names.is_empty() {
            return Ok(BackendFilter::ALL);
        }
        let mut v = Vec::with_capacity(names.len());
        for n in names {
            v.push(find(slots, n)?.index);
        }
        Ok(BackendFilter(Some(v)))
    }

    pub fn allows(&self, index: usize) -> bool {
        self.0.as_ref().is_none_or(|v| v.contains(&index))
    }
}

fn find<'a>(slots: &'a [BackendSlot], name: &str) -> Result<&'a BackendSlot> {
    slots.iter().find(|b| &*b.name == name).ok_or_else(|| {
        Error::not_found(format!("backend {name} was not created on this agent")).with_backend(name)
    })
}

/// The created backends (see the module documentation).
#[derive(Debug)]
pub(crate) struct BackendTable {
    slots: RwLock<Arc<[BackendSlot]>>,
}

impl BackendTable {
    pub fn new() -> BackendTable {
        BackendTable {
            slots: RwLock::new(no_slots()),
        }
    }

    /// How many backends were created.
    pub fn len(&self) -> usize {
        self.slots.read().len()
    }

    /// Names of the created backends, in preference order.
    pub fn names(&self) -> Vec<String> {
        self.slots
            .read()
            .iter()
            .map(|b| b.name.to_string())
            .collect()
    }

    /// The backend named `name`; `NotFound` if it was not created.
    pub fn slot(&self, name: &str) -> Result<BackendSlot> {
        find(&self.slots.read(), name).cloned()
    }

    /// The index of the backend named `name`; `NotFound` if it was not created.
    pub fn index(&self, name: &str) -> Result<usize> {
        find(&self.slots.read(), name).map(|s| s.index)
    }

    /// The backends a call naming `names` may use (all of them for an empty list, without
    /// taking the lock).
    pub fn filter(&self, names: &[&str]) -> Result<BackendFilter> {
        if names.is_empty() {
            return Ok(BackendFilter::ALL);
        }
        BackendFilter::among(&self.slots.read(), names)
    }

    /// The backends as they are now, for a caller that will call into them: a clone of an
    /// `Arc`, taken under the read lock and used after it is released. Indexable by
    /// `BackendSlot::index`.
    pub fn snapshot(&self) -> Arc<[BackendSlot]> {
        self.slots.read().clone()
    }

    /// Runs `f` on the backends under the read lock, without cloning anything. `f` must not
    /// block nor take another agent lock: it is meant for the notification poll.
    pub fn visit<R>(&self, f: impl FnOnce(&[BackendSlot]) -> R) -> R {
        f(&self.slots.read())
    }

    /// Adds backend `name`: refuses a name already taken, then, under the same write lock,
    /// calls `create` with the index the backend will have, checks what it returned against
    /// the capabilities its factory `declared` (`check_parts`), and appends it. Returns its
    /// index.
    pub fn add(
        &self,
        name: &str,
        declared: &Capabilities,
        create: impl FnOnce(usize) -> Result<Arc<dyn Backend>>,
    ) -> Result<usize> {
        let mut slots = self.slots.write();
        if slots.iter().any(|b| &*b.name == name) {
            return Err(
                Error::invalid_param(format!("backend {name} was already created"))
                    .with_backend(name),
            );
        }
        let index = slots.len();
        let backend = create(index)?;
        let caps = backend.capabilities();
        check_parts(name, &caps, declared, backend.as_ref())?;
        let mut next = Vec::with_capacity(index + 1);
        next.extend(slots.iter().cloned());
        next.push(BackendSlot {
            name: Arc::from(name),
            backend,
            caps,
            index,
        });
        *slots = next.into();
        Ok(index)
    }

    /// Empties the table (the agent's teardown). The backends are dropped here, under the
    /// write lock, unless a snapshot still holds them.
    pub fn clear(&self) {
        *self.slots.write() = no_slots();
    }
}

fn no_slots() -> Arc<[BackendSlot]> {
    Arc::new([])
}

/// Checks at creation that a backend's optional parts and capabilities agree, and that the
/// instance claims nothing its factory does not declare: the agent trusts `caps` from then on.
fn check_parts(
    name: &str,
    caps: &Capabilities,
    declared: &Capabilities,
    backend: &dyn Backend,
) -> Result<()> {
    let refuse =
        |why: String| Err(Error::backend(format!("backend {name} {why}")).with_backend(name));
    if backend.name() != name {
        return refuse(format!("reports its name as {:?}", backend.name()));
    }
    if caps.remote && !caps.notif {
        return refuse("is remote-capable but cannot carry notifications".into());
    }
    if caps.remote != backend.remote().is_some() {
        return refuse(format!(
            "declares remote={} but {} a remote part",
            caps.remote,
            if caps.remote { "lacks" } else { "has" }
        ));
    }
    if caps.notif != backend.notifications().is_some() {
        return refuse(format!(
            "declares notif={} but {} a notification part",
            caps.notif,
            if caps.notif { "lacks" } else { "has" }
        ));
    }
    let beyond = caps.mems.iter().find(|m| !declared.mems.contains(m));
    let moves_beyond = caps.moves.iter().find(|m| !declared.moves.contains(m));
    if let Some(m) = beyond {
        return refuse(format!(
            "registers {m} memory, which its factory does not declare"
        ));
    }
    if let Some((l, t)) = moves_beyond {
        return refuse(format!(
            "moves {l} to {t}, which its factory does not declare"
        ));
    }
    if caps
        .moves
        .iter()
        .any(|(l, t)| !caps.supports(*l) || !caps.supports(*t))
    {
        return refuse("moves a memory type it cannot register".into());
    }
    Ok(())
}
