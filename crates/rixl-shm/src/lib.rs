//! # rixl-shm: the same-host backend
//!
//! `SHM` moves DRAM between agents in different processes of one host with one copy and no CPU
//! on the target: the initiator calls `process_vm_writev` / `process_vm_readv` straight between
//! its registered memory and the peer's published registrations, batching up to 1024 segments per
//! system call. Small posts complete inline; large ones are split across a few worker threads.
//!
//! Control traffic goes over one Unix-domain stream socket per direction and peer pair: the
//! initiator connects to the target's socket (path in the connection info), says who it is, and
//! offers a notification ring in shared memory (`ring`). Each transfer's notification is
//! appended to the ring right after the data is in place: a thread of the target waiting for
//! notifications sees it with one atomic load, and when nobody waits, a doorbell frame on the
//! socket wakes the target's reader thread, so the target learns of it without polling
//! anything. (A socket round trip costs 8–9 µs here; a notification through the ring, about 1.) The same sockets are the liveness signal: when a peer process
//! dies, the kernel closes its ends, the blocked reader thread sees end-of-stream without a
//! goodbye frame, and the agent invalidates the peer's metadata; in-flight and later posts fail
//! with `RemoteDisconnect` (or `NotFound` once invalidated), never hang.
//!
//! Same-host detection compares the kernel boot id and the pid namespace, not the hostname.
//! A peer elsewhere is "not reachable through SHM" (`NotSupported` from
//! `load_remote_conn_info`), so the agent picks another backend. If the kernel refuses
//! cross-process access (different users, Yama ptrace scope 3, container seccomp), the first
//! region load says so and how to fix it.
//!
//! Trust: anyone allowed to `process_vm_writev` into a process can already do anything to it, so
//! the target does not re-check what a same-host initiator writes; the socket only accepts peers
//! of the same user (or root), checked with `SO_PEERCRED`. Between two agents of *one* process
//! that argument does not hold (stale or forged metadata would let safe code write into memory
//! its owner freed), so there every target range is checked against the peer instance's live
//! registrations, held while the copy runs (`live`), and the peer's deregistration waits for it.
//!
//! Registration asks the kernel, from a background thread, to back large DRAM regions with
//! transparent huge pages (`thp`): the peer's `process_vm_*` calls pin this process's pages one
//! by one, and on 4 KiB pages that doubles the cost of a 1 MiB copy.
//!
//! ## Its own agent
//!
//! An agent is its own target too (NIXL's loopback, which local KV tiering relies on), so an
//! SHM-only agent needs no other backend for that: a transfer between two of its own
//! registrations is a copy inside this process with `rixl_copy::copy_bytes`, which avoids the
//! 4K-aliasing cliff of glibc's `memmove` (`process_vm_writev` on our own pid hits that cliff
//! too, and is ~4× slower without it; figures in `rixl-copy`). Posts are cut as a peer's are:
//! up to `inline_max_bytes` copied by the posting thread, larger ones split across the workers
//! with the posting thread copying the first share, cancellable between pieces of at most 8 MiB;
//! a post whose two sides overlap is not split (its pieces would race) and is copied in order
//! by the posting thread. Its notification, and a standalone one sent to the agent's own name,
//! go straight into the agent's own queue once the data has landed.
//!
//! ## Parameters
//!
//! | Parameter | Default | Values | What it does |
//! |---|---|---|---|
//! | `inline_max_bytes` | `4194304` | an integer ≥ 0 | Posts of at most this many bytes are copied by the posting thread; larger ones are split across the workers. |
//! | `workers` | `0` | an integer in 0..=64 | Copy threads for large posts; 0 picks the number of cores, at most 4. |
//! | `socket_dir` | (empty) | any text | Directory of the control socket; empty uses `RIXL_SHM_DIR`, then `XDG_RUNTIME_DIR`, then /tmp. |
//! | `huge_pages` | `collapse` | one of collapse, off | Whether registered regions are moved onto transparent huge pages in the background. |

#![warn(unreachable_pub)]

mod cma;
#[allow(unreachable_pub)] // `ConnInfo` is `pub` for the `internals` build
mod host;
mod inbound;
mod live;
mod outbound;
mod peer;
mod pool;
mod ring;
mod thp;
/// The control-socket frames, public only with the `internals` feature (fuzz targets build
/// frames with it); not a stable API.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod wire;
#[cfg(not(feature = "internals"))]
#[allow(unreachable_pub)] // `pub` for the `internals` build
mod wire;
mod xfer;

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rixl_backend::{
    Backend, BackendContext, BackendFactory, BackendXfer, LocalRegion, Notifications, ParamKind,
    ParamSpec, RemotePeers, XferSpec,
};
use rixl_core::{Capabilities, Desc, Error, ErrorKind, MemType, Params, RegDesc, Result};

#[cfg(feature = "internals")]
#[doc(hidden)]
pub use host::ConnInfo;
#[cfg(not(feature = "internals"))]
use host::ConnInfo;
use host::HostIdentity;
use inbound::Inbound;
use outbound::{connect_peer, send_notif_to};
use peer::{check_alive, Peer};
use xfer::{ShmXfer, Target};

/// The backend's name.
pub const NAME: &str = "SHM";

/// Registry entry: how the agent creates `SHM`.
pub const FACTORY: BackendFactory = BackendFactory::new(NAME, PARAMS, capabilities, create);

/// The parameters, declared once (defaults, validation, `get_plugin_params` and the table in
/// the crate docs all come from here).
const PARAMS: &[ParamSpec] = &[
    ParamSpec::new(
        "inline_max_bytes",
        ParamKind::Int { min: 0, max: u64::MAX },
        "4194304",
        "Posts of at most this many bytes are copied by the posting thread; larger ones are split across the workers.",
    ),
    ParamSpec::new(
        "workers",
        ParamKind::Int { min: 0, max: 64 },
        "0",
        "Copy threads for large posts; 0 picks the number of cores, at most 4.",
    ),
    ParamSpec::new(
        "socket_dir",
        ParamKind::Text,
        "",
        "Directory of the control socket; empty uses `RIXL_SHM_DIR`, then `XDG_RUNTIME_DIR`, then /tmp.",
    ),
    ParamSpec::new(
        "huge_pages",
        ParamKind::Choice(&["collapse", "off"]),
        "collapse",
        "Whether registered regions are moved onto transparent huge pages in the background.",
    ),
];

/// What SHM does, stated once: DRAM between processes of one host, and within its own agent.
/// One-sided: the target takes no part in a transfer, so it cannot fence a peer's writes into
/// memory it deregisters (the agent fences its own regions for a self-target).
fn capabilities() -> Capabilities {
    Capabilities::new(&[MemType::Dram])
        .moving(MemType::Dram, MemType::Dram)
        .local()
        .remote()
        .estimates_cost()
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

fn create(ctx: BackendContext) -> Result<Arc<dyn Backend>> {
    let p = ctx.params();
    let inline_max = p.int("inline_max_bytes");
    let mut workers = p.int("workers") as usize;
    if workers == 0 {
        workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(4);
    }
    let collapse = p.text("huge_pages") == "collapse";
    let dir = Some(p.text("socket_dir").to_owned())
        .filter(|d| !d.is_empty())
        .or_else(|| std::env::var("RIXL_SHM_DIR").ok())
        .or_else(|| std::env::var("XDG_RUNTIME_DIR").ok())
        .unwrap_or_else(|| "/tmp".to_owned());
    let host = HostIdentity::current()?;
    let path = format!(
        "{dir}/rixl-shm-{}-{}.sock",
        std::process::id(),
        NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
    );
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| {
        Error::from_io(
            ErrorKind::Backend,
            format!("SHM cannot listen on {path}"),
            &e,
        )
    })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let me = ConnInfo {
        host: host.clone(),
        pid: std::process::id(),
        socket: path.clone(),
    };
    let live = Arc::new(live::LiveRegions::default());
    live::add_instance(&path, live.clone());
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        peers: Mutex::new(HashMap::new()),
        inbound: Mutex::new(Vec::new()),
        stopping: AtomicBool::new(false),
        attending: Mutex::new(0),
    });
    let listener_fd = listener.as_raw_fd();
    let s2 = shared.clone();
    let accept_thread = std::thread::Builder::new()
        .name("rixl-shm-accept".into())
        .spawn(move || inbound::accept_loop(&s2, listener))
        .map_err(|e| Error::from_io(ErrorKind::Backend, "SHM cannot start its thread", &e))?;
    let mut params = ctx.params().values().clone();
    params.insert("inline_max_bytes".into(), inline_max.to_string());
    params.insert("workers".into(), workers.to_string());
    params.insert("socket_dir".into(), dir);
    params.insert(
        "huge_pages".into(),
        if collapse { "collapse" } else { "off" }.into(),
    );
    Ok(Arc::new(Shm {
        me,
        host,
        shared,
        listener_fd,
        accept_thread: Mutex::new(Some(accept_thread)),
        pool: Mutex::new(None),
        workers,
        inline_max,
        collapse,
        next_token: AtomicU64::new(1),
        params,
        live,
    }))
}

/// State shared with the backend's threads.
struct Shared {
    ctx: BackendContext,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    /// Accepted connections: drained by their reader threads, or by a thread waiting for
    /// notifications (`poll_notifs`), whichever gets there first.
    inbound: Mutex<Vec<Arc<Inbound>>>,
    stopping: AtomicBool,
    /// Threads of this agent inside `wait_notif`'s spin phase, watching the inbound rings (see
    /// `ring`): while there are any, senders skip the doorbell.
    attending: Mutex<usize>,
}

impl Shared {
    fn peer(&self, name: &str) -> Result<Arc<Peer>> {
        self.peers.lock().get(name).cloned().ok_or_else(|| {
            Error::not_found(format!("no SHM connection info for agent {name:?}"))
                .with_backend(NAME)
        })
    }

    fn lost(&self, peer: &Peer, err: &Error) {
        if peer.alive.swap(false, Ordering::SeqCst) {
            self.ctx.report_peer_lost(&peer.name, err);
        }
    }
}

/// The `SHM` backend.
pub struct Shm {
    me: ConnInfo,
    host: HostIdentity,
    shared: Arc<Shared>,
    listener_fd: i32,
    accept_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pool: Mutex<Option<Arc<pool::Pool>>>,
    workers: usize,
    inline_max: u64,
    /// Back registered regions with huge pages (`thp`), parameter `huge_pages`.
    collapse: bool,
    next_token: AtomicU64,
    params: Params,
    /// Registered regions, checked by posts of SHM agents in this process (`live`).
    live: Arc<live::LiveRegions>,
}

impl std::fmt::Debug for Shm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shm")
            .field("socket", &self.me.socket)
            .field("peers", &self.shared.peers.lock().len())
            .finish_non_exhaustive()
    }
}

impl Shm {
    /// Stops serving: closes the listening socket and every connection. Idempotent.
    fn teardown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        live::remove_instance(&self.me.socket);
        // SAFETY: shutting down our own listening socket wakes the thread blocked in accept();
        // the fd stays open (owned by that thread) until it returns, so it cannot be reused.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.lock().take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.me.socket);
        let peers: Vec<Arc<Peer>> = self.shared.peers.lock().drain().map(|(_, p)| p).collect();
        for peer in peers {
            peer.closing.store(true, Ordering::SeqCst);
            let conn = peer.conn.lock().take();
            if let Some(c) = conn {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        for c in self.shared.inbound.lock().drain(..) {
            c.close();
        }
    }

    fn pool(&self) -> Result<Arc<pool::Pool>> {
        let mut p = self.pool.lock();
        if let Some(p) = &*p {
            return Ok(p.clone());
        }
        let pool = Arc::new(
            pool::Pool::new(self.workers, "rixl-shm-copy")
                .map_err(|e| Error::from_io(ErrorKind::Backend, "SHM cannot start workers", &e))?,
        );
        *p = Some(pool.clone());
        Ok(pool)
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Backend for Shm {
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
                "SHM cannot register {mem} memory"
            )));
        }
        if self.collapse {
            thp::collapse_later(desc.desc.addr, desc.desc.len);
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.live.insert(token, desc.desc.addr, desc.desc.len);
        Ok(LocalRegion {
            token,
            public: Vec::new(),
        })
    }

    fn deregister(&self, _mem: MemType, token: u64) -> Result<()> {
        // Waits for posts of agents in this process copying into or out of the region; peers
        // in other processes are not fenced (see the crate docs and issue 22).
        self.live.remove(token);
        Ok(())
    }

    fn shutdown(&self) {
        self.teardown();
    }

    unsafe fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>> {
        if spec.local_mem != MemType::Dram || spec.remote_mem != MemType::Dram {
            return Err(Error::not_supported("SHM moves DRAM only"));
        }
        let total = spec.local.iter().map(|s| s.len).sum();
        let target = if spec.loopback {
            // Both sides are this agent's own registrations: `ShmXfer` copies between them in
            // this process.
            if self.shared.stopping.load(Ordering::SeqCst) {
                return Err(Error::not_found("the SHM backend was shut down"));
            }
            Target::Own
        } else {
            let peer = self.shared.peer(spec.peer)?;
            // The control connection is also the liveness check of every post: make it now.
            connect_peer(&self.shared, &peer)?;
            Target::Peer(peer)
        };
        // A self-copy whose sides overlap is not split: its parts would race.
        let split = match target {
            Target::Peer(_) => true,
            Target::Own => xfer::sides_disjoint(spec.op, &spec.local, &spec.remote),
        };
        let pool = if total > self.inline_max && split {
            Some(self.pool()?)
        } else {
            None
        };
        // SAFETY: `spec`'s own segments, under this call's contract, which is `ShmXfer::new`'s
        // (a self-target's sides lie in this backend's own registrations, kept registered while
        // a post runs); a self-copy gets the pool only if `sides_disjoint`, checked just above.
        let xfer = unsafe {
            ShmXfer::new(
                spec.op,
                target,
                self.shared.clone(),
                spec.local,
                spec.remote,
                total,
                pool,
            )
        };
        Ok(Box::new(xfer))
    }

    fn remote(&self) -> Option<&dyn RemotePeers> {
        Some(self)
    }

    fn notifications(&self) -> Option<&dyn Notifications> {
        Some(self)
    }
}

impl RemotePeers for Shm {
    fn conn_info(&self) -> Vec<u8> {
        self.me.encode()
    }

    fn load_remote_conn_info(&self, peer: &str, info: &[u8]) -> Result<()> {
        let info = ConnInfo::decode(info)?;
        if info.host != self.host {
            return Err(Error::not_supported(format!(
                "agent {peer:?} is on another host or pid namespace; SHM only reaches agents on this one"
            )));
        }
        let p = Arc::new(Peer::new(peer, info));
        if let Some(old) = self.shared.peers.lock().insert(peer.to_owned(), p) {
            old.closing.store(true, Ordering::SeqCst);
            if let Some(c) = old.conn.lock().take() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        Ok(())
    }

    fn load_remote_region(
        &self,
        peer: &str,
        mem: MemType,
        desc: &Desc,
        _public: &[u8],
    ) -> Result<u64> {
        if mem != MemType::Dram {
            return Err(Error::not_supported(format!(
                "SHM cannot reach {mem} memory"
            )));
        }
        let p = self.shared.peer(peer)?;
        p.check_access(desc)?;
        // Distinct tokens per region: the agent only merges descriptors within one token.
        Ok(self.next_token.fetch_add(1, Ordering::Relaxed))
    }

    fn connect(&self, peer: &str) -> Result<()> {
        let p = self.shared.peer(peer)?;
        connect_peer(&self.shared, &p)?;
        if !check_alive(&p, true) {
            let e = Error::remote_disconnect(format!("agent {peer:?} is gone")).with_peer(peer);
            self.shared.lost(&p, &e);
            return Err(e);
        }
        Ok(())
    }

    fn disconnect(&self, peer: &str) {
        let Some(p) = self.shared.peers.lock().remove(peer) else {
            return;
        };
        p.closing.store(true, Ordering::SeqCst);
        let conn = p.conn.lock().take();
        if let Some(mut c) = conn {
            let _ = wire::write_frame(&mut c, wire::Kind::Bye, b"");
            let _ = c.flush();
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Notifications for Shm {
    fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        if peer == self.shared.ctx.agent_name() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                return Err(Error::not_found("the SHM backend was shut down"));
            }
            self.shared.ctx.notifs().deliver(peer, msg);
            return Ok(());
        }
        let p = self.shared.peer(peer)?;
        send_notif_to(&self.shared, &p, msg, false)
    }

    fn poll_notifs(&self) {
        inbound::poll_inbound(&self.shared);
    }

    fn attend_notifs(&self, on: bool) {
        inbound::attend(&self.shared, on);
    }
}

// The parameter table in the crate docs is the one the code declares.
rixl_backend::params_doc_test!(PARAMS);
