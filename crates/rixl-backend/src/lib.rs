//! # rixl-backend
//!
//! The backend contract: the [`Backend`] trait a transport or storage engine implements, what
//! the agent hands it ([`BackendContext`], [`XferSpec`]) and what it gives back
//! ([`LocalRegion`], [`BackendXfer`], [`PostOutcome`]).
//!
//! It is a crate of its own, between `rixl-core` and the backends, because two of its calls
//! take addresses the backend will touch ([`Backend::register`], [`Backend::prepare_xfer`]) and
//! are therefore `unsafe fn`s, whose contract (the agent's resolved-segment invariant) only the
//! agent can uphold; `rixl-core` forbids `unsafe` outright. This crate contains no unsafe
//! operation: `unsafe_code` is denied here and allowed only on those two declarations.
//!
//! ## The model
//!
//! The agent does all bookkeeping (registration index, remote metadata cache, generations,
//! descriptor validation, merging, handles, deregistration fences) and hands a backend only
//! what it must act on: one region to register, one peer's connection info, and transfers whose
//! descriptors are already validated, merged and resolved to the backend's own region tokens.
//! A backend is, in the spirit of `object_store`, one small object-safe trait plus data:
//!
//! - **What it is, before any instance exists**: a [`BackendFactory`] (name, parameter table,
//!   capabilities, constructor). `get_plugin_list`, `get_plugin_params` and
//!   `get_plugin_mem_types` read it; `Agent::add_backend` (one agent) or
//!   `rixl::registry::add_factory` (the whole process) adds one from outside RIXL.
//! - **What it can do**: one [`Capabilities`] value, stated once in the backend, read by the
//!   agent (selection), the conformance suite (which cases apply) and `rixl-bench`.
//! - **Its parameters**: one `&'static [ParamSpec]` table; defaults, validation with messages
//!   that name the valid names and forms, typed access ([`ParsedParams`]) and the crate docs'
//!   table ([`docs_match`]) all come from it.
//! - **The required part** ([`Backend`]): register and deregister regions, prepare transfers.
//! - **Optional parts**: [`RemotePeers`] for backends that reach other agents, and
//!   [`Notifications`] for those that carry notifications, reached through
//!   [`Backend::remote`] and [`Backend::notifications`]. The agent checks at creation that the
//!   parts offered match the capabilities declared.
//! - **Per request**: [`XferSpec::ext`] carries the application's [`RequestExt`] (NIXL's
//!   `customParam`, or a typed value such as a CUDA stream) to the backend that moves it.
//! - **Errors**: `rixl_core::Error` kinds (NIXL's statuses) plus context; keep the lower-level
//!   cause with `Error::with_source`. Return `NotSupported` from the constructor when the
//!   backend cannot run here (no GPU, no library): the agent passes it on unchanged.
//!
//! `docs/WRITING-A-BACKEND.md` walks through `examples/custom-backend`, a backend written
//! against the public API only.
//!
//! Target-side backends that serve requests from the network must still check every incoming
//! range against their own registrations: the agent validated the initiator's view, not the
//! bytes a peer actually sends.

#![deny(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rixl_core::{
    Capabilities, CompletionHandle, CostEstimate, Desc, Error, MemType, NotifSender, Params,
    RegDesc, Result, SegmentVec, XferOp,
};

mod params;

pub use params::{
    defaults, docs_match, markdown_table, parse_bool, validate, ParamKind, ParamSpec, ParsedParams,
};

/// How the agent is told about events a backend detects on its own.
pub trait AgentHooks: Send + Sync {
    /// The backend lost `peer` (process died, link cut): the agent invalidates its metadata.
    fn peer_lost(&self, peer: &str, reason: &Error);
}

/// Everything a backend receives at creation.
#[derive(Clone)]
pub struct BackendContext {
    agent_name: String,
    index: usize,
    params: ParsedParams,
    notifs: NotifSender,
    progress_thread: bool,
    hooks: Weak<dyn AgentHooks>,
}

impl fmt::Debug for BackendContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendContext")
            .field("agent_name", &self.agent_name)
            .field("index", &self.index)
            .field("params", self.params.values())
            .finish_non_exhaustive()
    }
}

impl BackendContext {
    /// What the agent hands a backend it creates: its own name, the backend's position in
    /// creation order, the validated parameters, where notifications go, whether the
    /// application allowed progress threads, and the agent's hooks (weak: backends never keep
    /// the agent alive).
    pub fn new(
        agent_name: &str,
        index: usize,
        params: ParsedParams,
        notifs: NotifSender,
        progress_thread: bool,
        hooks: Weak<dyn AgentHooks>,
    ) -> BackendContext {
        BackendContext {
            agent_name: agent_name.to_owned(),
            index,
            params,
            notifs,
            progress_thread,
            hooks,
        }
    }

    /// The owning agent's name.
    pub fn agent_name(&self) -> &str {
        &self.agent_name
    }

    /// Position of this backend in the agent's creation order.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The validated parameters: the table's defaults overridden by the caller's.
    pub fn params(&self) -> &ParsedParams {
        &self.params
    }

    /// Where to deliver received notifications.
    pub fn notifs(&self) -> &NotifSender {
        &self.notifs
    }

    /// Whether the application allowed progress threads (RIXL backends may use their own
    /// anyway).
    pub fn progress_thread(&self) -> bool {
        self.progress_thread
    }

    /// The owning agent's hooks.
    pub fn hooks(&self) -> &Weak<dyn AgentHooks> {
        &self.hooks
    }

    /// Reports a lost peer to the agent, if it is still alive.
    pub fn report_peer_lost(&self, peer: &str, reason: &Error) {
        if let Some(h) = self.hooks.upgrade() {
            h.peer_lost(peer, reason);
        }
    }
}

/// How to create a backend, and what it is before any instance exists: its name, its
/// declared parameters and its capabilities. This is what `get_plugin_list`,
/// `get_plugin_params` and `get_plugin_mem_types` report, for the built-in backends and for
/// one added at run time with `Agent::add_backend`.
#[derive(Clone, Copy)]
pub struct BackendFactory {
    name: &'static str,
    params: &'static [ParamSpec],
    capabilities: fn() -> Capabilities,
    create: fn(BackendContext) -> Result<Arc<dyn Backend>>,
}

impl fmt::Debug for BackendFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendFactory")
            .field("name", &self.name)
            .field("capabilities", &(self.capabilities)())
            .finish_non_exhaustive()
    }
}

impl BackendFactory {
    /// A factory. `capabilities` must describe what every instance can do (an instance may
    /// report less, e.g. no VRAM without a GPU); `create` receives parameters already
    /// validated against `params`.
    pub const fn new(
        name: &'static str,
        params: &'static [ParamSpec],
        capabilities: fn() -> Capabilities,
        create: fn(BackendContext) -> Result<Arc<dyn Backend>>,
    ) -> BackendFactory {
        BackendFactory {
            name,
            params,
            capabilities,
            create,
        }
    }

    /// The backend's name, e.g. `"POSIX"`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The declared parameters.
    pub fn params(&self) -> &'static [ParamSpec] {
        self.params
    }

    /// The defaults, as `get_plugin_params` reports them.
    pub fn default_params(&self) -> Params {
        defaults(self.params)
    }

    /// What instances can do.
    pub fn capabilities(&self) -> Capabilities {
        (self.capabilities)()
    }

    /// Validates `given` against the declared parameters (see [`validate`]).
    pub fn validate(&self, given: &Params) -> Result<ParsedParams> {
        validate(self.name, self.params, given)
    }

    /// Creates an instance.
    pub fn create(&self, ctx: BackendContext) -> Result<Arc<dyn Backend>> {
        (self.create)(ctx)
    }
}

/// A backend's private handle for one local registration, and the bytes it publishes for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalRegion {
    /// Opaque to the agent; given back in [`Segment::token`](rixl_core::Segment::token) and
    /// [`Backend::deregister`].
    pub token: u64,
    /// Published in metadata for remote peers (e.g. a remote key); often empty.
    pub public: Vec<u8>,
}

/// A transfer as the backend receives it: validated, merged, resolved.
#[derive(Debug)]
pub struct XferSpec<'a> {
    /// READ or WRITE, seen from the initiator.
    pub op: XferOp,
    /// The target agent (this agent's own name for loopback and storage).
    pub peer: &'a str,
    /// True when the target is this agent.
    pub loopback: bool,
    /// Memory type of the local side.
    pub local_mem: MemType,
    /// Memory type of the target side.
    pub remote_mem: MemType,
    /// Local segments.
    pub local: SegmentVec,
    /// Target segments, position by position the same lengths as `local`.
    pub remote: SegmentVec,
    /// The request's backend extension, if the application gave one (NIXL's `customParam`:
    /// a UCX worker id, a CUDA stream). Backends that take none ignore it, as NIXL's do.
    pub ext: Option<&'a RequestExt>,
}

/// A per-request extension for the backend that moves it (NIXL's `customParam`): a string
/// for NIXL compatibility, and a typed value for Rust callers (a backend downcasts it).
#[derive(Clone, Default)]
pub struct RequestExt {
    /// NIXL's `customParam` string, passed through unchanged.
    pub custom_param: Option<String>,
    /// A typed value for the backend (e.g. a CUDA stream handle), which it downcasts.
    pub value: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl fmt::Debug for RequestExt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestExt")
            .field("custom_param", &self.custom_param)
            .field("value", &self.value.as_ref().map(|_| "<typed value>"))
            .finish()
    }
}

impl RequestExt {
    /// An extension carrying NIXL's `customParam` string.
    pub fn custom_param(param: impl Into<String>) -> RequestExt {
        RequestExt {
            custom_param: Some(param.into()),
            value: None,
        }
    }

    /// An extension carrying a typed value.
    pub fn value<T: std::any::Any + Send + Sync>(value: T) -> RequestExt {
        RequestExt {
            custom_param: None,
            value: Some(Arc::new(value)),
        }
    }

    /// The typed value, if it is a `T`.
    pub fn downcast<T: std::any::Any>(&self) -> Option<&T> {
        self.value.as_deref().and_then(|v| v.downcast_ref())
    }
}

/// What a post reports right away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostOutcome {
    /// All data moved (and the notification, if any, was delivered) before `post` returned.
    Done,
    /// Still running; the backend will call [`CompletionHandle::complete`].
    InProgress,
}

/// A backend's prepared transfer: posted any number of times, one post at a time.
pub trait BackendXfer: Send + Sync + fmt::Debug {
    /// Starts moving the data. `notif` is delivered to the target after all data has landed.
    /// On [`PostOutcome::InProgress`] the backend must eventually call `done.complete(..)`.
    fn post(&self, notif: Option<&[u8]>, done: CompletionHandle) -> Result<PostOutcome>;

    /// Stops the current post. When this returns, no byte of it lands any more.
    fn cancel(&self) -> Result<()> {
        Ok(())
    }

    /// A thread is about to wait for the current post: it may drive the post itself for up to
    /// `budget` (for example read the responses off the backend's connection instead of having
    /// a backend thread woken to do it, which costs a scheduler wake-up per hop), and returns as
    /// soon as the post completed or the budget ran out. A zero budget asks for one
    /// non-blocking attempt. The backend's own threads must still complete posts that nobody
    /// waits for. Default: returns at once.
    fn progress(&self, _budget: Duration) {}

    /// Estimated duration of one post.
    fn estimate_cost(&self) -> Result<CostEstimate> {
        Err(Error::not_supported(
            "this backend does not estimate transfer costs",
        ))
    }
}

/// A transport or storage engine. See the crate documentation.
///
/// The required part is what every backend does: register regions and move data between
/// them. What only some do is an optional part, reached through [`Backend::remote`] and
/// [`Backend::notifications`], instead of a dozen defaulted methods a storage backend would
/// have to know to leave alone. The agent checks at creation that the parts a backend offers
/// match its [`Capabilities`].
pub trait Backend: Send + Sync + fmt::Debug {
    /// The backend's name, e.g. `"LOOPBACK"`.
    fn name(&self) -> &str;

    /// What this instance can do (at most what its factory declares).
    fn capabilities(&self) -> Capabilities;

    /// Effective parameters (defaults merged with overrides, plus anything chosen at run time,
    /// such as the I/O engine actually in use).
    fn params(&self) -> Params;

    /// Registers one region. The agent has already checked the descriptor and refused overlaps.
    ///
    /// # Safety
    ///
    /// For memory types that are memory (DRAM, VRAM), `desc` must describe memory of this
    /// process that stays valid until [`Backend::deregister`] returns for the token this call
    /// gives back: the backend may read, write, pin or remap it by address. The agent upholds
    /// this for its callers: `Agent::register_mem` passes the obligation on to the application,
    /// and the agent deregisters only after every post that uses the region has ended. Storage
    /// types (FILE, BLK, OBJ) address offsets, not memory, and carry no such obligation.
    #[allow(unsafe_code)] // a contract, not an unsafe operation: see the crate docs
    unsafe fn register(&self, mem: MemType, desc: &RegDesc) -> Result<LocalRegion>;

    /// Releases a region registered by [`Backend::register`]. The agent calls it only once no
    /// post uses the region any more; a target-side backend must also stop serving peers'
    /// requests for it before returning.
    fn deregister(&self, mem: MemType, token: u64) -> Result<()>;

    /// The token identifying a local region when this agent is its own target (NIXL's
    /// `loadLocalMD`). Default: the registration token itself.
    fn local_target_token(&self, _mem: MemType, token: u64) -> Result<u64> {
        Ok(token)
    }

    /// Builds a postable transfer.
    ///
    /// # Safety
    ///
    /// This is the agent's resolved-segment invariant, which the backend relies on whenever it
    /// touches memory by address:
    /// - every local [`Segment`](rixl_core::Segment) lies inside one region that this backend
    ///   registered ([`Backend::register`]) and whose token it carries; for a loopback or
    ///   storage target, every target segment likewise lies inside one of this backend's own
    ///   regions, named by its [`Backend::local_target_token`];
    /// - every remote segment lies inside a region the peer published and this backend loaded
    ///   ([`RemotePeers::load_remote_region`]), and carries that token;
    /// - none of those local regions is deregistered while a post of the returned transfer is
    ///   in flight: a post ends when its completion is reported, when it fails, or when
    ///   [`BackendXfer::cancel`] returns `Ok`.
    ///
    /// Only the agent can uphold this (it resolves descriptors against its registration index
    /// and fences deregistration with the posts in flight), which is why this call is `unsafe`.
    ///
    /// The regions are pinned by posts, not by the prepared transfer: `prepare_xfer` itself must
    /// not touch the memory (record the segments; move bytes only in `post`), since a region
    /// may be deregistered between preparation and the first post (which then fails).
    ///
    /// In return the backend owes the agent: [`BackendXfer::cancel`] returns `Ok` only when no
    /// byte of the post moves any more, and the completion is reported only once the backend
    /// no longer touches the post's memory. The agent never runs `cancel` while the same
    /// transfer's `post` call is still executing.
    #[allow(unsafe_code)] // a contract, not an unsafe operation: see the crate docs
    unsafe fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>>;

    /// Reports on registrations that may not exist yet (files, objects): one entry per
    /// descriptor, `None` where the target does not exist. Offered when
    /// [`Capabilities::query_mem`] says so.
    fn query_mem(&self, _mem: MemType, _descs: &[RegDesc]) -> Result<Vec<Option<Params>>> {
        Err(Error::not_supported(
            "this backend does not support query_mem",
        ))
    }

    /// The owning agent is being dropped; called once, after every region was deregistered.
    /// From now on the backend serves no peer: transfers and notifications targeting this agent
    /// fail with `RemoteDisconnect`, even while handles of the agent (which may keep the backend
    /// object alive) still exist. Default: nothing to do.
    fn shutdown(&self) {}

    /// The part that reaches other agents, if the backend is remote-capable.
    fn remote(&self) -> Option<&dyn RemotePeers> {
        None
    }

    /// The part that carries notifications, if the backend has one.
    fn notifications(&self) -> Option<&dyn Notifications> {
        None
    }
}

/// The optional part of a backend that reaches other agents: connection info out, peers'
/// connection info and published regions in.
pub trait RemotePeers: Send + Sync {
    /// Connection info published in metadata.
    fn conn_info(&self) -> Vec<u8>;

    /// Accepts a peer's connection info. `Err(NotSupported)` means the peer cannot be reached
    /// through this backend (for example, another host for a same-host backend).
    fn load_remote_conn_info(&self, peer: &str, info: &[u8]) -> Result<()>;

    /// Accepts one region a peer published; returns the token used in target segments. The
    /// bytes come from the peer: a malformed `public` is an error, never a panic.
    fn load_remote_region(
        &self,
        peer: &str,
        mem: MemType,
        desc: &Desc,
        public: &[u8],
    ) -> Result<u64>;

    /// Forgets a region loaded by [`RemotePeers::load_remote_region`].
    fn unload_remote_region(&self, _peer: &str, _mem: MemType, _token: u64) {}

    /// Connects to `peer` ahead of the first transfer.
    fn connect(&self, _peer: &str) -> Result<()> {
        Ok(())
    }

    /// Drops everything about `peer`: connections and its loaded state.
    fn disconnect(&self, peer: &str);
}

/// The optional part of a backend that carries notifications.
pub trait Notifications: Send + Sync {
    /// Sends a standalone notification (to this agent itself too, when the backend is
    /// local-capable).
    fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()>;

    /// Delivers notifications that have already arrived, without blocking. Threads waiting for
    /// a notification call this while they spin, so that delivery does not have to wait for a
    /// backend thread to be scheduled. Default: nothing (the backend delivers on its own).
    fn poll_notifs(&self) {}

    /// A thread starts (`true`) or stops (`false`) watching for notifications by calling
    /// [`Notifications::poll_notifs`] in a loop. Backends that can skip waking a thread of
    /// theirs while someone watches (SHM's notification ring) count these; after the last
    /// `false` they deliver whatever arrived meanwhile before returning. Calls come in pairs.
    fn attend_notifs(&self, _on: bool) {}
}
