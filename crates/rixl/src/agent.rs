//! The agent: backends, the listener calls, notifications and teardown. Registration lives in
//! `registration`, publishing and loading metadata in `metadata`, requests in `xfer`.
//!
//! Locking: `backends`, `regs` and `remotes` are independent `RwLock`s taken in that order when
//! more than one is needed; none is held across a backend's transfer. The hot path (make a
//! request from a prepared list, post it, wait) takes no agent-wide lock at all: requests keep
//! `Arc`s to what they use and check two atomics (remote entry validity, registration epoch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use rixl_backend::{AgentHooks, Backend, BackendContext, BackendFactory};
use rixl_core::{
    Capabilities, Desc, Error, ErrorKind, MemType, NotifQueue, Notification, Params, RegDescList,
    Result,
};

use crate::config::AgentConfig;
use crate::listener::{self, Kind, Listener};
use crate::registration::LocalRegs;
use crate::registry;
use crate::remote::RemoteEntry;
use std::net::SocketAddr;

/// The name NIXL uses for "the local side" in `prep_xfer_dlist` (`NIXL_INIT_AGENT`).
pub const INIT_AGENT: &str = "";
/// The spelled-out form NIXL's Python layer also accepts for the local side.
pub const INIT_AGENT_NAME: &str = "NIXL_INIT_AGENT";

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

pub(crate) struct AgentInner {
    pub name: String,
    pub config: AgentConfig,
    pub alive: AtomicBool,
    pub backends: RwLock<Vec<BackendSlot>>,
    pub regs: RwLock<LocalRegs>,
    pub next_reg_id: AtomicU64,
    pub remotes: RwLock<HashMap<String, Arc<RemoteEntry>>>,
    pub notifs: Arc<NotifQueue>,
    listener: parking_lot::Mutex<Option<Listener>>,
}

impl std::fmt::Debug for AgentInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.name)
            .field("backends", &self.backends.read().len())
            .finish_non_exhaustive()
    }
}

impl AgentHooks for AgentInner {
    fn peer_lost(&self, peer: &str, reason: &Error) {
        tracing::warn!(agent = %self.name, peer, "peer lost: {reason}; invalidating its metadata");
        self.invalidate_remote(peer);
    }
}

/// A RIXL agent: one per process, usually, named uniquely by the application.
///
/// `Agent` is `Send + Sync` and every method takes `&self`: share it between threads with an
/// `Arc`. Dropping it releases everything: remote metadata is unloaded, remaining registrations
/// are deregistered and backends are destroyed; requests and prepared lists that outlive it
/// fail with `NotFound`.
#[derive(Debug)]
pub struct Agent {
    pub(crate) inner: Arc<AgentInner>,
}

impl Agent {
    /// Creates an agent named `name` (non-empty) and the backends listed in `config`.
    pub fn new(name: &str, config: AgentConfig) -> Result<Agent> {
        if name.is_empty() {
            return Err(Error::invalid_param("the agent name must not be empty"));
        }
        if name.len() > rixl_core::metadata::MAX_AGENT_NAME {
            return Err(Error::invalid_param(
                "the agent name is longer than 1024 bytes",
            ));
        }
        let config = config.with_env();
        let backends = config.backends.clone();
        let agent = Agent {
            inner: Arc::new(AgentInner {
                name: name.to_owned(),
                config,
                alive: AtomicBool::new(true),
                backends: RwLock::new(Vec::new()),
                regs: RwLock::new(LocalRegs::default()),
                next_reg_id: AtomicU64::new(1),
                remotes: RwLock::new(HashMap::new()),
                notifs: NotifQueue::new(),
                listener: parking_lot::Mutex::new(None),
            }),
        };
        if agent.inner.config.listen {
            let ip = agent
                .inner
                .config
                .listen_addr
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            let l = Listener::start(
                Arc::downgrade(&agent.inner),
                SocketAddr::new(ip, agent.inner.config.listen_port),
                agent.inner.config.shared_secret.clone(),
            )?;
            *agent.inner.listener.lock() = Some(l);
        }
        for (b, params) in &backends {
            agent.create_backend(b, params)?;
        }
        Ok(agent)
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether per-request telemetry is recorded.
    pub fn telemetry_enabled(&self) -> bool {
        self.inner.config.capture_telemetry
    }

    // ---------------------------------------------------------------- backends

    /// Names of the backends this process can create: the built-in ones, then those added
    /// with [`registry::add_factory`] (NIXL's `getAvailPlugins`).
    pub fn available_backends() -> Vec<&'static str> {
        registry::available()
    }

    /// Advertised parameters and defaults of a backend this process can create.
    pub fn plugin_params(backend: &str) -> Result<Params> {
        registry::factory(backend)
            .map(|f| f.default_params())
            .ok_or_else(|| unknown_plugin(backend))
    }

    /// Memory types a backend this process can create handles.
    pub fn plugin_mem_types(backend: &str) -> Result<Vec<MemType>> {
        Self::plugin_capabilities(backend).map(|c| c.mems)
    }

    /// Everything a backend this process can create declares it can do.
    pub fn plugin_capabilities(backend: &str) -> Result<Capabilities> {
        registry::factory(backend)
            .map(|f| f.capabilities())
            .ok_or_else(|| unknown_plugin(backend))
    }

    /// Creates backend `name` with `params` (merged over its defaults). Creation order is the
    /// preference order for transfers. Returns the backend's index.
    ///
    /// Unknown parameter names and malformed values are refused with `InvalidParam`, naming
    /// the valid names or the expected form; a backend that cannot run here (no GPU, no
    /// library) fails with its own `NotSupported`; other failures are `Backend` errors whose
    /// [`std::error::Error::source`] is the backend's own error.
    pub fn create_backend(&self, name: &str, params: &Params) -> Result<usize> {
        let factory = registry::factory(name).ok_or_else(|| unknown_plugin(name))?;
        self.add_backend(&factory, params)
    }

    /// Creates a backend from `factory`, which may come from a crate outside this workspace
    /// (see `examples/custom_backend.rs`), as [`Agent::create_backend`] does for built-in
    /// ones. To make it creatable by name (from Python or NIXL-style configuration), register
    /// the factory process-wide with [`registry::add_factory`] instead.
    pub fn add_backend(&self, factory: &BackendFactory, params: &Params) -> Result<usize> {
        let name = factory.name();
        let parsed = factory.validate(params).map_err(|e| e.with_backend(name))?;
        let mut backends = self.inner.backends.write();
        if backends.iter().any(|b| &*b.name == name) {
            return Err(
                Error::invalid_param(format!("backend {name} was already created"))
                    .with_backend(name),
            );
        }
        let index = backends.len();
        let hooks: Weak<AgentInner> = Arc::downgrade(&self.inner);
        let ctx = BackendContext::new(
            &self.inner.name,
            index,
            parsed,
            self.inner.notifs.sender(index),
            self.inner.config.progress_thread,
            hooks,
        );
        let backend = factory.create(ctx).map_err(|e| {
            let e = match e.kind() {
                ErrorKind::InvalidParam | ErrorKind::NotSupported => e,
                _ => Error::backend(format!(
                    "backend {name} failed to initialise: {}",
                    e.message()
                ))
                .with_source(e),
            };
            e.with_backend(name)
        })?;
        let caps = backend.capabilities();
        check_parts(name, &caps, &factory.capabilities(), backend.as_ref())?;
        backends.push(BackendSlot {
            name: Arc::from(name),
            backend,
            caps,
            index,
        });
        Ok(index)
    }

    /// Names of the created backends, in preference order.
    pub fn backends(&self) -> Vec<String> {
        self.inner
            .backends
            .read()
            .iter()
            .map(|b| b.name.to_string())
            .collect()
    }

    /// Effective parameters of a created backend (defaults merged with what was passed).
    pub fn backend_params(&self, name: &str) -> Result<Params> {
        Ok(self.inner.slot(name)?.backend.params())
    }

    /// Capabilities of a created backend.
    pub fn backend_capabilities(&self, name: &str) -> Result<Capabilities> {
        Ok(self.inner.slot(name)?.caps)
    }

    // ---------------------------------------------------------------- memory

    /// Registers every descriptor of `list` with the named backends, or with every backend that
    /// supports the list's memory type. Succeeds if at least one backend accepts all of them.
    ///
    /// # Safety
    ///
    /// For DRAM (and VRAM), every range must be memory of this process that stays allocated
    /// until it is deregistered or the agent is dropped, and that is not read or written by the
    /// program while a transfer into or out of it may be running: backends read and write it by
    /// address, from other threads and, for remote peers, on behalf of other processes. Storage
    /// types (FILE, BLK, OBJ) address offsets, not memory, and carry no such obligation.
    pub unsafe fn register_mem(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        self.inner.register(list, backends, false).map(drop)
    }

    /// Deregisters descriptors that equal registrations exactly, from the named backends or from
    /// every backend holding them. Requests and prepared lists that use them become stale.
    /// Registrations held by a [`Registration`](crate::Registration) or
    /// [`OwnedRegion`](crate::OwnedRegion) are refused (`InvalidParam`): their handle
    /// deregisters them.
    pub fn deregister_mem(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        self.inner.deregister(list, backends)
    }

    /// Asks `backend` about registrations that may not exist yet (files, objects).
    pub fn query_mem(&self, list: &RegDescList, backend: &str) -> Result<Vec<Option<Params>>> {
        let slot = self.inner.slot(backend)?;
        slot.backend
            .query_mem(list.mem(), list.descs())
            .map_err(|e| e.with_backend(backend))
    }

    // ---------------------------------------------------------------- metadata

    /// The full metadata blob: connection info of every remote-capable backend and every
    /// registration they hold.
    pub fn local_metadata(&self) -> Result<Vec<u8>> {
        self.inner.local_metadata(None, true, &[])
    }

    /// A partial blob: the listed registrations (which must match exactly), plus connection info
    /// if `include_conn`. An empty list gives connection info only.
    pub fn local_partial_metadata(
        &self,
        list: &RegDescList,
        include_conn: bool,
        backends: &[&str],
    ) -> Result<Vec<u8>> {
        if list.is_empty() {
            return self.inner.local_metadata(Some(list), true, backends);
        }
        self.inner
            .local_metadata(Some(list), include_conn, backends)
    }

    /// Loads a peer's blob (full or partial) and returns the peer's name. Loading does not
    /// connect. The load is atomic: on error the cache is exactly as before.
    pub fn load_remote_metadata(&self, blob: &[u8]) -> Result<String> {
        self.inner.load_remote(blob)
    }

    /// Drops everything known about `agent` and disconnects the common backends. Prepared lists
    /// and requests built against it become stale. Unknown names are ignored.
    pub fn invalidate_remote_metadata(&self, agent: &str) {
        self.inner.invalidate_remote(agent);
    }

    /// True if metadata for `agent` is loaded and, when `descs` is given and non-empty, one
    /// common backend covers all of them. Never fails.
    pub fn check_remote_metadata(
        &self,
        agent: &str,
        descs: Option<&rixl_core::XferDescList>,
    ) -> bool {
        self.inner.check_remote(agent, descs)
    }

    /// The generation of the loaded metadata of `agent`: a new number each time its entry is
    /// created from scratch (after invalidation), unchanged by partial loads.
    pub fn remote_generation(&self, agent: &str) -> Option<u64> {
        self.inner.remotes.read().get(agent).map(|e| e.generation)
    }

    /// The regions `agent` published for memory type `mem` (across backends, deduplicated, in
    /// address order): what a program needs to address a peer's buffers it only knows by
    /// metadata.
    pub fn remote_regions(&self, agent: &str, mem: MemType) -> Result<Vec<Desc>> {
        let entry = self.inner.remote(agent)?;
        let st = entry.state.read();
        let mut out: Vec<Desc> = st
            .sections
            .iter()
            .filter(|s| s.mem == mem)
            .flat_map(|s| s.index.entries().iter().map(|e| e.desc))
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Connects every common backend (or the named ones) to `agent` ahead of the first transfer.
    pub fn make_connection(&self, agent: &str, backends: &[&str]) -> Result<()> {
        let entry = self.inner.remote(agent)?;
        let filter = self.inner.backend_filter(backends)?;
        let slots = self.inner.backends.read().clone();
        let state = entry.state.read();
        let reachable: Vec<&BackendSlot> = slots
            .iter()
            .filter(|s| filter.allows(s.index) && state.reachable(s.index))
            .collect();
        drop(state);
        for slot in &reachable {
            slot.connect(agent)
                .map_err(|e| self.inner.on_peer_error(agent, e.with_backend(&slot.name)))?;
        }
        if reachable.is_empty() {
            return Err(
                Error::backend(format!("no backend in common with agent {agent:?}"))
                    .with_peer(agent),
            );
        }
        Ok(())
    }

    // ---------------------------------------------------------------- listener

    /// Where the metadata listener accepts connections, if it runs.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.inner.listener.lock().as_ref().map(Listener::addr)
    }

    fn secret(&self) -> Option<Vec<u8>> {
        self.inner.config.shared_secret.clone()
    }

    /// Pushes this agent's full metadata to the listener at `addr`, in the background: returns
    /// at once; connection failures are retried for a while, then logged.
    pub fn send_local_metadata(&self, addr: SocketAddr) -> Result<()> {
        let blob = self.local_metadata()?;
        listener::exchange_in_background(
            Arc::downgrade(&self.inner),
            addr,
            Kind::Load,
            blob,
            self.secret(),
        );
        Ok(())
    }

    /// Pushes a partial blob (see [`Agent::local_partial_metadata`]) in the background.
    pub fn send_partial_metadata(
        &self,
        list: &RegDescList,
        include_conn: bool,
        backends: &[&str],
        addr: SocketAddr,
    ) -> Result<()> {
        let blob = self.local_partial_metadata(list, include_conn, backends)?;
        listener::exchange_in_background(
            Arc::downgrade(&self.inner),
            addr,
            Kind::Load,
            blob,
            self.secret(),
        );
        Ok(())
    }

    /// Asks the listener at `addr` for agent `name`'s metadata, in the background; the reply
    /// comes back on the same connection (no local listener needed) and lands in the cache:
    /// poll [`Agent::check_remote_metadata`].
    pub fn fetch_remote_metadata(&self, name: &str, addr: SocketAddr) {
        listener::exchange_in_background(
            Arc::downgrade(&self.inner),
            addr,
            Kind::Fetch,
            name.as_bytes().to_vec(),
            self.secret(),
        );
    }

    /// Tells the listener at `addr` to drop this agent's metadata, in the background.
    pub fn invalidate_local_metadata(&self, addr: SocketAddr) {
        listener::exchange_in_background(
            Arc::downgrade(&self.inner),
            addr,
            Kind::Invalidate,
            self.inner.name.as_bytes().to_vec(),
            self.secret(),
        );
    }

    /// Fetches and loads agent `name`'s metadata from the listener at `addr`, waiting for the
    /// answer; returns the loaded agent's name.
    pub fn fetch_remote_metadata_blocking(
        &self,
        name: &str,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<String> {
        let blob = listener::exchange(
            addr,
            Kind::Fetch,
            name.as_bytes(),
            self.secret().as_deref(),
            timeout,
        )?
        .ok_or_else(|| Error::unknown("fetch returned no metadata"))?;
        self.load_remote_metadata(&blob)
    }

    /// Pushes this agent's full metadata to `addr` and waits until the receiver has loaded it
    /// (its error, if it refused, is returned): a notification sent right after finds it.
    pub fn send_local_metadata_blocking(
        &self,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<()> {
        let blob = self.local_metadata()?;
        listener::exchange(addr, Kind::Load, &blob, self.secret().as_deref(), timeout).map(drop)
    }

    /// Tells the listener at `addr` to drop this agent's metadata and waits until it has.
    pub fn invalidate_local_metadata_blocking(
        &self,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<()> {
        listener::exchange(
            addr,
            Kind::Invalidate,
            self.inner.name.as_bytes(),
            self.secret().as_deref(),
            timeout,
        )
        .map(drop)
    }

    // ---------------------------------------------------------------- notifications

    /// Sends a standalone notification to `agent` (your own name works too) through `backend`,
    /// or the first notification backend that reaches it.
    pub fn send_notif(&self, agent: &str, msg: &[u8], backend: Option<&str>) -> Result<()> {
        let slots = self.inner.backends.read().clone();
        let named = backend.map(|b| self.inner.slot(b)).transpose()?;
        let candidates = slots
            .iter()
            .filter(|s| named.as_ref().is_none_or(|n| n.index == s.index))
            .filter(|s| s.caps.notif);
        if agent == self.inner.name {
            let slot = candidates
                .into_iter()
                .find(|s| s.caps.local)
                .ok_or_else(|| Error::backend("no local notification-capable backend"))?;
            return slot
                .send_notif(agent, msg)
                .map_err(|e| e.with_backend(&slot.name));
        }
        let entry = self.inner.remote(agent)?;
        let state = entry.state.read();
        let slot = candidates
            .into_iter()
            .find(|s| state.reachable(s.index))
            .ok_or_else(|| {
                Error::backend(format!("no notification backend reaches agent {agent:?}"))
                    .with_peer(agent)
            })?;
        drop(state);
        slot.send_notif(agent, msg)
            .map_err(|e| self.inner.on_peer_error(agent, e.with_backend(&slot.name)))
    }

    /// Drains the notifications received so far (from every notification backend, or the named
    /// ones), in arrival order.
    pub fn get_notifs(&self, backends: &[&str]) -> Result<Vec<Notification>> {
        let filter = self.inner.notif_filter(backends)?;
        // Take what already arrived (SHM's ring: one atomic load per peer when empty), so
        // that a caller polling in a loop does not wait for a backend thread to wake up. Not
        // when something is queued already (the usual `wait_notif`, then `get_notifs`): the
        // caller gets that now, and a poll would only tell backends to expect more polls.
        // Polls under the read lock rather than on a cloned slot list: `poll_notifs` never
        // blocks, and a NIXL-style polling loop calls this millions of times.
        if self.inner.notifs.is_empty() {
            for s in self.inner.backends.read().iter() {
                if let Some(n) = s.backend.notifications() {
                    n.poll_notifs();
                }
            }
            if self.inner.notifs.is_empty() {
                return Ok(Vec::new());
            }
        }
        Ok(self.inner.notifs.drain(|b| filter.allows(b)))
    }

    fn notif_slots(&self) -> Vec<BackendSlot> {
        self.inner
            .backends
            .read()
            .iter()
            .filter(|s| s.caps.notif)
            .cloned()
            .collect()
    }

    /// Blocks until a notification is available or `timeout` passes, without consuming it.
    /// Returns whether one is available.
    pub fn wait_notif(&self, timeout: Duration) -> bool {
        let slots = self.notif_slots();
        // While this thread spins it watches the backends itself, so they need not wake
        // their own threads (SHM senders skip the doorbell); it stops watching before it
        // sleeps, or when it is done.
        let attending = std::cell::Cell::new(true);
        let stop_attending = || {
            if attending.replace(false) {
                for n in slots.iter().filter_map(|s| s.backend.notifications()) {
                    n.attend_notifs(false);
                }
            }
        };
        for n in slots.iter().filter_map(|s| s.backend.notifications()) {
            n.attend_notifs(true);
        }
        let got = self.inner.notifs.wait_with(
            timeout,
            |_| true,
            || {
                for n in slots.iter().filter_map(|s| s.backend.notifications()) {
                    n.poll_notifs();
                }
            },
            stop_attending,
        );
        stop_attending();
        got
    }

    /// Drains the notifications and groups them by sender (NIXL's `getNotifs` shape).
    pub fn get_notifs_by_agent(&self, backends: &[&str]) -> Result<HashMap<String, Vec<Vec<u8>>>> {
        let mut map: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for n in self.get_notifs(backends)? {
            map.entry(n.from).or_default().push(n.msg);
        }
        Ok(map)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let inner = &self.inner;
        // Stop the listener first: it may be loading metadata into this agent.
        drop(inner.listener.lock().take());
        inner.alive.store(false, Ordering::Release);
        // Ends the notification streams (they hold no strong reference to wake them otherwise).
        inner.notifs.close();
        let names: Vec<String> = inner.remotes.read().keys().cloned().collect();
        for n in names {
            inner.invalidate_remote(&n);
        }
        let slots = inner.backends.read().clone();
        // Fence every region as `deregister_mem` does: close them to new posts and wait
        // (bounded) for the posts in flight, so that nothing moves after the agent is gone.
        let fences: Vec<_> = {
            let regs = inner.regs.read();
            regs.sections
                .iter()
                .flat_map(|s| s.index.entries().iter().map(|e| e.value.fence.clone()))
                .collect()
        };
        fences.iter().for_each(|f| {
            f.close();
        });
        let deadline = std::time::Instant::now() + inner.config.deregister_timeout;
        let busy = crate::fence::wait_idle(&fences, deadline);
        if !busy.is_empty() {
            tracing::error!(
                agent = %inner.name,
                "dropping the agent: {} region(s) are still used by posts in flight after {:?}; \
                 deregistering them anyway",
                busy.len(),
                inner.config.deregister_timeout
            );
        }
        let mut regs = inner.regs.write();
        for section in regs.sections.iter_mut() {
            let backend = &slots[section.backend].backend;
            for e in section.index.drain() {
                let r = backend.deregister(section.mem, e.value.token);
                e.value.fence.mark_released(r.is_ok());
                if let Err(err) = r {
                    tracing::warn!("deregistration at agent teardown failed: {err}");
                }
            }
        }
        drop(regs);
        // Handles that outlive the agent keep backend objects alive: tell them to stop serving.
        for slot in &slots {
            slot.backend.shutdown();
        }
        inner.backends.write().clear();
    }
}

fn unknown_plugin(name: &str) -> Error {
    Error::not_found(format!(
        "no backend named {name:?} in this build (available: {})",
        registry::available().join(", ")
    ))
}

/// Which backends (by index) a call may use.
pub(crate) struct BackendFilter(Option<Vec<usize>>);

impl BackendFilter {
    pub fn allows(&self, index: usize) -> bool {
        self.0.as_ref().is_none_or(|v| v.contains(&index))
    }
}

impl AgentInner {
    pub fn slot(&self, name: &str) -> Result<BackendSlot> {
        self.backends
            .read()
            .iter()
            .find(|b| &*b.name == name)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!("backend {name} was not created on this agent"))
                    .with_backend(name)
            })
    }

    pub fn backend_filter(&self, names: &[&str]) -> Result<BackendFilter> {
        if names.is_empty() {
            return Ok(BackendFilter(None));
        }
        let mut v = Vec::with_capacity(names.len());
        for n in names {
            v.push(self.slot(n)?.index);
        }
        Ok(BackendFilter(Some(v)))
    }

    fn notif_filter(&self, names: &[&str]) -> Result<BackendFilter> {
        let slots = self.backends.read();
        if !slots.iter().any(|s| s.caps.notif) {
            return Err(Error::backend(
                "no notification-capable backend was created",
            ));
        }
        drop(slots);
        self.backend_filter(names)
    }

    /// Names the peer in `e` and, if the peer is gone (`RemoteDisconnect`), invalidates its
    /// metadata, as a failed transfer does.
    fn on_peer_error(&self, agent: &str, e: Error) -> Error {
        if e.kind() == ErrorKind::RemoteDisconnect {
            self.invalidate_remote(agent);
        }
        e.with_peer(agent)
    }

    pub fn remote(&self, agent: &str) -> Result<Arc<RemoteEntry>> {
        if agent == self.name {
            return Err(Error::not_found(format!(
                "{agent:?} is this agent's own name, not a remote agent"
            )));
        }
        self.remotes.read().get(agent).cloned().ok_or_else(|| {
            Error::not_found(format!("no metadata loaded for agent {agent:?}")).with_peer(agent)
        })
    }
}
