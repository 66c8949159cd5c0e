//! `LOOPBACK`: moves DRAM inside one process with a memory copy.
//!
//! It serves two purposes. A transfer whose target is the agent itself (NIXL's loopback) is a
//! plain copy between two of its registrations. And agents living in the same process can reach
//! each other through it: the connection info names the process and the backend instance, so
//! the whole remote path (metadata exchange, generations, notifications, peer loss when the other
//! agent is dropped) runs end to end without a network. A peer in another process is simply
//! unreachable through `LOOPBACK`, and selection moves on to another backend.
//!
//! Posts complete inline: the copy is done and the notification delivered before `post` returns.
//!
//! Like a networked target, the target side never trusts the initiator's cached metadata: each
//! region publishes the target's own token, and a post checks that every target range lies in a
//! region the target still has registered, holding the target's region table while it copies, so
//! that no byte lands in (or is read from) memory after its owner deregistered it or dropped its
//! agent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, RwLock};
use rixl_backend::{
    AgentHooks, Backend, BackendContext, BackendFactory, BackendXfer, LocalRegion, Notifications,
    PostOutcome, RemotePeers, XferSpec,
};
use rixl_core::codec::{Reader, Writer};
use rixl_core::{
    Capabilities, CompletionHandle, CostEstimate, CostMethod, Desc, Error, MemType, NotifSender,
    Params, RegDesc, Result, SegmentVec, XferOp,
};

/// The backend's name.
pub const NAME: &str = "LOOPBACK";

/// Registry entry.
pub(crate) const FACTORY: BackendFactory = BackendFactory::new(NAME, &[], capabilities, create);

/// What LOOPBACK does, stated once (the factory and every instance report it).
fn capabilities() -> Capabilities {
    Capabilities::new(&[MemType::Dram])
        .moving(MemType::Dram, MemType::Dram)
        .local()
        .remote()
        .estimates_cost()
        .target_fences_deregistration()
}

/// Rough in-process copy rate used by the cost estimate (bytes per microsecond).
const COPY_BYTES_PER_US: u64 = 6_000;

fn create(ctx: BackendContext) -> Result<Arc<dyn Backend>> {
    let shared = Arc::new(Endpoint {
        agent: ctx.agent_name().to_owned(),
        notifs: ctx.notifs().clone(),
        regions: RwLock::new(HashMap::new()),
        closed: AtomicBool::new(false),
        peers: Mutex::new(HashMap::new()),
        hooks: ctx.hooks().clone(),
    });
    let instance = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    instances()
        .write()
        .insert(instance, Arc::downgrade(&shared));
    Ok(Arc::new(Loopback {
        instance,
        endpoint: shared,
        next_token: AtomicU64::new(1),
        params: ctx.params().values().clone(),
    }))
}

/// What other in-process agents need to reach this one.
#[derive(Debug)]
struct Endpoint {
    agent: String,
    notifs: NotifSender,
    /// The regions currently registered with this instance, by token: `(addr, len)`. Posts
    /// targeting them hold the read lock while copying; deregistration takes the write lock.
    regions: RwLock<HashMap<u64, (u64, u64)>>,
    /// Set when the owning agent is dropped.
    closed: AtomicBool,
    /// Peer agent name → its backend instance in this process. Here rather than in
    /// [`Loopback`] so that a dying instance can find the agents that know it.
    peers: Mutex<HashMap<String, u64>>,
    /// The owning agent, told when a peer it knows is dropped.
    hooks: Weak<dyn AgentHooks>,
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

fn instances() -> &'static RwLock<HashMap<u64, Weak<Endpoint>>> {
    static MAP: OnceLock<RwLock<HashMap<u64, Weak<Endpoint>>>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

fn lookup(instance: u64) -> Option<Arc<Endpoint>> {
    instances().read().get(&instance).and_then(Weak::upgrade)
}

/// The `LOOPBACK` backend.
#[derive(Debug)]
pub(crate) struct Loopback {
    instance: u64,
    endpoint: Arc<Endpoint>,
    next_token: AtomicU64,
    params: Params,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        instances().write().remove(&self.instance);
    }
}

fn encode_conn(instance: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&std::process::id().to_le_bytes());
    v.extend_from_slice(&instance.to_le_bytes());
    v
}

fn decode_conn(info: &[u8]) -> Result<(u32, u64)> {
    if info.len() != 12 {
        return Err(Error::mismatch(format!(
            "LOOPBACK connection info must be 12 bytes, got {}",
            info.len()
        )));
    }
    let pid = u32::from_le_bytes(info[..4].try_into().expect("4 bytes"));
    let inst = u64::from_le_bytes(info[4..].try_into().expect("8 bytes"));
    Ok((pid, inst))
}

impl Loopback {
    fn peer_endpoint(&self, peer: &str) -> Result<Arc<Endpoint>> {
        let inst = *self.endpoint.peers.lock().get(peer).ok_or_else(|| {
            Error::not_found(format!("no LOOPBACK connection info for agent {peer:?}"))
        })?;
        lookup(inst).ok_or_else(|| {
            Error::remote_disconnect(format!("agent {peer:?} no longer exists in this process"))
        })
    }
}

impl Backend for Loopback {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    unsafe fn register(&self, mem: MemType, desc: &RegDesc) -> Result<LocalRegion> {
        if mem != MemType::Dram {
            return Err(Error::not_supported(format!(
                "LOOPBACK cannot register {mem} memory"
            )));
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.endpoint
            .regions
            .write()
            .insert(token, (desc.desc.addr, desc.desc.len));
        Ok(LocalRegion {
            token,
            // Peers name the region by our token, so that we can check it is still registered
            // (and so that distinct regions never share a token, which would let the agent merge
            // descriptors across them).
            public: {
                let mut w = Writer::with_capacity(10);
                w.varint(token);
                w.finish()
            },
        })
    }

    fn deregister(&self, _mem: MemType, token: u64) -> Result<()> {
        // Waits for posts copying into or out of the region: none touches it after this.
        self.endpoint.regions.write().remove(&token);
        Ok(())
    }

    fn remote(&self) -> Option<&dyn RemotePeers> {
        Some(self)
    }

    fn notifications(&self) -> Option<&dyn Notifications> {
        Some(self)
    }

    fn shutdown(&self) {
        self.endpoint.closed.store(true, Ordering::Release);
        instances().write().remove(&self.instance);
        // Tell the agents that know this one, as a socket's end-of-stream tells SHM and TCP
        // peers: their entries are invalidated now, not at their next post. Collected first,
        // because the hook calls back into their `disconnect`.
        let survivors: Vec<Arc<Endpoint>> = instances()
            .read()
            .values()
            .filter_map(Weak::upgrade)
            .filter(|e| e.peers.lock().get(&self.endpoint.agent) == Some(&self.instance))
            .collect();
        let gone = Error::remote_disconnect(format!("agent {:?} was dropped", self.endpoint.agent))
            .with_backend(NAME);
        for e in survivors {
            if let Some(agent) = e.hooks.upgrade() {
                agent.peer_lost(&self.endpoint.agent, &gone);
            }
        }
    }

    unsafe fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>> {
        if spec.local_mem != MemType::Dram || spec.remote_mem != MemType::Dram {
            return Err(Error::not_supported("LOOPBACK moves DRAM only"));
        }
        let target = if spec.loopback {
            Arc::downgrade(&self.endpoint)
        } else {
            Arc::downgrade(&self.peer_endpoint(spec.peer)?)
        };
        Ok(Box::new(LoopbackXfer {
            op: spec.op,
            local: spec.local,
            remote: spec.remote,
            from: self.endpoint.agent.clone(),
            target,
        }))
    }
}

impl RemotePeers for Loopback {
    fn conn_info(&self) -> Vec<u8> {
        encode_conn(self.instance)
    }
    fn load_remote_conn_info(&self, peer: &str, info: &[u8]) -> Result<()> {
        let (pid, inst) = decode_conn(info)?;
        if pid != std::process::id() {
            return Err(Error::not_supported(format!(
                "agent {peer:?} lives in process {pid}; LOOPBACK only reaches agents in this process"
            )));
        }
        self.endpoint.peers.lock().insert(peer.to_owned(), inst);
        Ok(())
    }
    fn load_remote_region(
        &self,
        peer: &str,
        _mem: MemType,
        _desc: &Desc,
        public: &[u8],
    ) -> Result<u64> {
        let mut r = Reader::new(public, "LOOPBACK region data");
        let token = r.varint().and_then(|t| r.finish().map(|()| t));
        token.map_err(|e| e.with_peer(peer))
    }
    fn connect(&self, peer: &str) -> Result<()> {
        self.peer_endpoint(peer).map(drop)
    }
    fn disconnect(&self, peer: &str) {
        self.endpoint.peers.lock().remove(peer);
    }
}

impl Notifications for Loopback {
    fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        let target = if peer == self.endpoint.agent {
            self.endpoint.clone()
        } else {
            self.peer_endpoint(peer)?
        };
        target.notifs.deliver(&self.endpoint.agent, msg);
        Ok(())
    }
}

#[derive(Debug)]
struct LoopbackXfer {
    op: XferOp,
    local: SegmentVec,
    remote: SegmentVec,
    from: String,
    target: Weak<Endpoint>,
}

impl BackendXfer for LoopbackXfer {
    fn post(&self, notif: Option<&[u8]>, _done: CompletionHandle) -> Result<PostOutcome> {
        let gone = || Error::remote_disconnect("the target agent no longer exists in this process");
        let target = self.target.upgrade().ok_or_else(gone)?;
        if target.closed.load(Ordering::Acquire) {
            return Err(gone());
        }
        // Never trust the initiator's view: every target range must lie inside a region the
        // target still has registered.
        let live = target.regions.read();
        let mut region = None;
        for r in &self.remote {
            if region.is_none_or(|(t, _, _)| t != r.token) {
                region = live.get(&r.token).map(|&(a, l)| (r.token, a, l));
            }
            let inside = region.is_some_and(|(_, a, l)| {
                a <= r.addr && r.addr.checked_add(r.len).is_some_and(|e| e <= a + l)
            });
            if !inside {
                return Err(Error::not_found(format!(
                    "agent {:?} has no registered region covering {:#x}+{} (deregistered?)",
                    target.agent, r.addr, r.len
                )));
            }
        }
        // SAFETY: both sides were validated by the agent against DRAM registrations of this
        // process (the target's published ones, or our own for loopback); the target ranges
        // were just checked to lie inside regions it still has registered, and `live` keeps
        // them so until the copy ends. Whoever registered them promised, per
        // `Agent::register_mem`, that they stay valid and are not accessed concurrently while
        // registered.
        unsafe { rixl_copy::copy_segments(self.op, &self.local, &self.remote, || true) };
        drop(live);
        if let Some(msg) = notif {
            target.notifs.deliver(&self.from, msg);
        }
        Ok(PostOutcome::Done)
    }

    fn estimate_cost(&self) -> Result<CostEstimate> {
        let bytes: u64 = self.local.iter().map(|s| s.len).sum();
        let duration_us = 1 + bytes / COPY_BYTES_PER_US;
        Ok(CostEstimate {
            duration_us,
            margin_us: duration_us / 2,
            method: CostMethod::AnalyticalBackend,
        })
    }
}
