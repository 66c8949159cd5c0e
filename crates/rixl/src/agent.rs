//! The agent: its parts, the listener calls, notifications and teardown. Registration lives in
//! `registration`, publishing and loading metadata in `metadata`, requests in `xfer`.
//!
//! The agent's state is three parts, each behind a narrow interface in its own module, so
//! that what may be done under each lock is decided in one place: the created backends
//! ([`BackendTable`], `backends`), this agent's registrations ([`LocalTable`],
//! `registration`) and the cache of peers' metadata ([`RemoteTable`], `remote`). The fields of
//! [`AgentInner`] are private to this module; other modules reach the parts through accessors.
//!
//! Locking: the backends, the registrations and the remote cache are each behind their own
//! `RwLock`, taken in that order when more than one is needed (a remote entry's own state lock
//! comes after all three); none is held across a backend's transfer. The backends' lock is
//! held across a call into a backend only to create one (`BackendTable::add`) and for the
//! notification poll, which never blocks; other paths call backends on a snapshot. The hot
//! path (make a request from a prepared list, post it, wait) takes no agent-wide lock at all:
//! requests keep `Arc`s to what they use and check two atomics (remote entry validity,
//! registration epoch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rixl_backend::{AgentHooks, BackendContext, BackendFactory};
use rixl_core::{
    Capabilities, Desc, Error, ErrorKind, MemType, NotifQueue, Notification, Params, RegDescList,
    Result,
};

use crate::backends::{self, BackendFilter, BackendSlot, BackendTable};
use crate::config::AgentConfig;
use crate::listener::{self, Kind, Listener};
use crate::registration::LocalTable;
use crate::registry;
use crate::remote::{RemoteEntry, RemoteTable};
use std::net::SocketAddr;

/// The name NIXL uses for "the local side" in `prep_xfer_dlist` (`NIXL_INIT_AGENT`).
pub const INIT_AGENT: &str = "";
/// The spelled-out form NIXL's Python layer also accepts for the local side.
pub const INIT_AGENT_NAME: &str = "NIXL_INIT_AGENT";

pub(crate) struct AgentInner {
    name: String,
    config: AgentConfig,
    alive: AtomicBool,
    backends: BackendTable,
    regs: LocalTable,
    remotes: RemoteTable,
    notifs: Arc<NotifQueue>,
    listener: parking_lot::Mutex<Option<Listener>>,
}

impl std::fmt::Debug for AgentInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.name)
            .field("backends", &self.backends.len())
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
        let notif_limits = config.notif_limits;
        let agent = Agent {
            inner: Arc::new(AgentInner {
                name: name.to_owned(),
                regs: LocalTable::new(config.allow_overlapping_registrations),
                config,
                alive: AtomicBool::new(true),
                backends: BackendTable::new(),
                remotes: RemoteTable::default(),
                notifs: NotifQueue::with_limits(notif_limits),
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
        let inner = &self.inner;
        inner.backends.add(name, &factory.capabilities(), |index| {
            let hooks: Weak<AgentInner> = Arc::downgrade(inner);
            let ctx = BackendContext::new(
                &inner.name,
                index,
                parsed,
                inner.notifs.sender(index),
                inner.config.progress_thread,
                hooks,
            );
            factory.create(ctx).map_err(|e| {
                let e = match e.kind() {
                    ErrorKind::InvalidParam | ErrorKind::NotSupported => e,
                    _ => Error::backend(format!(
                        "backend {name} failed to initialise: {}",
                        e.message()
                    ))
                    .with_source(e),
                };
                e.with_backend(name)
            })
        })
    }

    /// Names of the created backends, in preference order.
    pub fn backends(&self) -> Vec<String> {
        self.inner.backends.names()
    }

    /// Effective parameters of a created backend (defaults merged with what was passed).
    pub fn backend_params(&self, name: &str) -> Result<Params> {
        Ok(self.inner.backends.slot(name)?.backend.params())
    }

    /// Capabilities of a created backend.
    pub fn backend_capabilities(&self, name: &str) -> Result<Capabilities> {
        Ok(self.inner.backends.slot(name)?.caps)
    }

    // ---------------------------------------------------------------- memory

    /// Registers every descriptor of `list` with the named backends, or with every backend that
    /// supports the list's memory type. Succeeds if at least one backend accepts all of them.
    ///
    /// # Safety
    ///
    /// For DRAM (and VRAM), every range must be memory of this process that stays allocated
    /// until it is deregistered (`deregister_mem` returned `Ok`) or the agent is dropped and
    /// no post that uses it is in flight any more, and that is not read or written by the
    /// program while a transfer into or out of it may be running: backends read and write it by
    /// address, from other threads and, for remote peers, on behalf of other processes. Storage
    /// types (FILE, BLK, OBJ) address offsets, not memory; but a FILE or BLK registration
    /// without a path names an open file descriptor by number (`dev`), which must stay open
    /// for as long. [`Agent::register_owned`] and [`Agent::register_storage`] need no `unsafe`.
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
        let slot = self.inner.backends.slot(backend)?;
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
        self.inner.remotes.get(agent).map(|e| e.generation)
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
        let filter = self.inner.backends.filter(backends)?;
        let slots = self.inner.backends.snapshot();
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
        let slots = self.inner.backends.snapshot();
        let named = backend.map(|b| self.inner.backends.index(b)).transpose()?;
        let candidates = slots
            .iter()
            .filter(|s| named.is_none_or(|n| n == s.index))
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
        let notifs = &self.inner.notifs;
        // Take what already arrived (SHM's ring: one atomic load per peer when empty), so
        // that a caller polling in a loop does not wait for a backend thread to wake up. Not
        // when something is queued already (the usual `wait_notif`, then `get_notifs`): the
        // caller gets that now, and a poll would only tell backends to expect more polls.
        // Polls under the read lock rather than on a snapshot, and checks the names under the
        // same lock: a NIXL-style polling loop calls this millions of times, and with nothing
        // queued it costs one read lock and the backends' polls (`poll_notifs` never blocks).
        let filter = self.inner.backends.visit(|slots| {
            if !slots.iter().any(|s| s.caps.notif) {
                return Err(Error::backend(
                    "no notification-capable backend was created",
                ));
            }
            let filter = BackendFilter::among(slots, backends)?;
            if notifs.is_empty() {
                backends::poll_notifs(slots);
            }
            Ok(filter)
        })?;
        if notifs.is_empty() {
            return Ok(Vec::new());
        }
        Ok(notifs.drain(|b| filter.allows(b)))
    }

    /// Blocks until a notification is available or `timeout` passes, without consuming it.
    /// Returns whether one is available.
    pub fn wait_notif(&self, timeout: Duration) -> bool {
        let slots = self.inner.backends.snapshot();
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

    /// Notifications dropped because the queue was full ([`AgentConfig::notif_limits`]).
    pub fn dropped_notifs(&self) -> u64 {
        self.inner.notifs.dropped()
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
        for n in inner.remotes.names() {
            inner.invalidate_remote(&n);
        }
        let slots = inner.backends.snapshot();
        // Fence every region as `deregister_mem` does: close them to new posts and wait
        // (bounded) for the posts in flight, so that nothing moves after the agent is gone.
        let fences = inner.regs.fences();
        fences.iter().for_each(|f| {
            f.close();
        });
        let deadline = std::time::Instant::now() + inner.config.deregister_timeout;
        let busy = crate::fence::wait_idle(&fences, deadline);
        if !busy.is_empty() {
            tracing::error!(
                agent = %inner.name,
                "dropping the agent: {} region(s) are still used by posts in flight after {:?}; \
                 they stay registered with their backends (memory registered with register_mem \
                 must not be freed while such a post runs)",
                busy.len(),
                inner.config.deregister_timeout
            );
        }
        inner.regs.release_all(&slots);
        // Handles that outlive the agent keep backend objects alive: tell them to stop serving.
        for slot in slots.iter() {
            slot.backend.shutdown();
        }
        inner.backends.clear();
    }
}

fn unknown_plugin(name: &str) -> Error {
    Error::not_found(format!(
        "no backend named {name:?} in this build (available: {})",
        registry::available().join(", ")
    ))
}

impl AgentInner {
    /// The agent's name.
    #[inline]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's configuration (with the environment applied).
    #[inline]
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// False once the agent is being dropped: prepared lists, requests and handles that
    /// outlive it check this.
    #[inline]
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// The created backends.
    #[inline]
    pub fn backends(&self) -> &BackendTable {
        &self.backends
    }

    /// This agent's registrations.
    #[inline]
    pub fn regs(&self) -> &LocalTable {
        &self.regs
    }

    /// The cache of peers' metadata.
    #[inline]
    pub fn remotes(&self) -> &RemoteTable {
        &self.remotes
    }

    /// The queue received notifications land in.
    #[inline]
    pub fn notifs(&self) -> &Arc<NotifQueue> {
        &self.notifs
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
        self.remotes.get(agent).ok_or_else(|| {
            Error::not_found(format!("no metadata loaded for agent {agent:?}")).with_peer(agent)
        })
    }
}
