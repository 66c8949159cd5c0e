//! # rixl-shm: the same-host backend
//!
//! `SHM` moves DRAM between agents in different processes of one host with one copy and no CPU
//! on the target: the initiator calls `process_vm_writev` / `process_vm_readv` straight between
//! its registered memory and the peer's published registrations, batching up to 1024 segments per
//! system call. Small posts complete inline; large ones are split across a few worker threads.
//!
//! Control traffic goes over one Unix-domain stream socket per direction and peer pair: the
//! initiator connects to the target's socket (path in the connection info), says who it is, and
//! sends each transfer's notification right after the data is in place, so the target learns of
//! it without polling anything. The same sockets are the liveness signal: when a peer process
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
//! of the same user (or root), checked with `SO_PEERCRED`.

mod cma;
mod host;
mod pool;
pub mod wire;

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rixl_core::{
    Backend, BackendContext, BackendFactory, BackendXfer, Capabilities, CompletionHandle,
    CostEstimate, CostMethod, Desc, Error, ErrorKind, LocalRegion, MemType, Params, PostOutcome,
    RegDesc, Result, Segment, SegmentVec, XferOp, XferSpec,
};

pub use host::{ConnInfo, HostIdentity};

/// The backend's name.
pub const NAME: &str = "SHM";

/// Registry entry.
pub const FACTORY: BackendFactory = BackendFactory {
    name: NAME,
    mems: &[MemType::Dram],
    default_params: &[
        ("inline_max_bytes", "262144"),
        ("workers", "0"),
        ("socket_dir", ""),
    ],
    create,
};

/// Pieces a large post is cut into are at least this big.
const MIN_PART: u64 = 256 << 10;
/// Segments are cut so that one system call moves at most this much (cancellation latency).
const MAX_CHUNK: u64 = 8 << 20;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// Control sockets of the SHM instances alive in this process. A peer in our own process
/// never "dies" for the kernel (its memory stays mapped), so its teardown is looked up here.
static LOCAL_INSTANCES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn create(ctx: BackendContext) -> Result<Arc<dyn Backend>> {
    for k in ctx.params.keys() {
        if !FACTORY.default_params.iter().any(|(d, _)| d == k) {
            return Err(Error::invalid_param(format!("SHM has no parameter {k:?}")));
        }
    }
    let inline_max: u64 = ctx.param("inline_max_bytes")?.unwrap_or(256 << 10);
    let mut workers: usize = ctx.param("workers")?.unwrap_or(0);
    if workers == 0 {
        workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(4);
    }
    let dir = ctx
        .params
        .get("socket_dir")
        .filter(|d| !d.is_empty())
        .cloned()
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
    LOCAL_INSTANCES.lock().push(path.clone());
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        peers: Mutex::new(HashMap::new()),
        inbound: Mutex::new(Vec::new()),
        stopping: AtomicBool::new(false),
    });
    let listener_fd = listener.as_raw_fd();
    let s2 = shared.clone();
    let accept_thread = std::thread::Builder::new()
        .name("rixl-shm-accept".into())
        .spawn(move || accept_loop(&s2, listener))
        .map_err(|e| Error::from_io(ErrorKind::Backend, "SHM cannot start its thread", &e))?;
    let mut params = ctx.params.clone();
    params.insert("inline_max_bytes".into(), inline_max.to_string());
    params.insert("workers".into(), workers.to_string());
    params.insert("socket_dir".into(), dir);
    Ok(Arc::new(Shm {
        me,
        host,
        shared,
        listener_fd,
        accept_thread: Mutex::new(Some(accept_thread)),
        pool: Mutex::new(None),
        workers,
        inline_max,
        next_token: AtomicU64::new(1),
        params,
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
}

/// One peer we can reach.
#[derive(Debug)]
struct Peer {
    name: String,
    info: ConnInfo,
    alive: AtomicBool,
    /// We are closing on purpose: end-of-stream is not a failure.
    closing: AtomicBool,
    access_checked: AtomicBool,
    /// Outbound control connection, made on first need.
    conn: Mutex<Option<UnixStream>>,
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
    next_token: AtomicU64,
    params: Params,
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
        LOCAL_INSTANCES.lock().retain(|p| *p != self.me.socket);
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
            let _ = c.conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is a live socket.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        match peer_uid(&conn) {
            Some(uid) if uid == me || uid == 0 => {}
            other => {
                tracing::warn!("SHM: refused a connection from uid {other:?} (we are uid {me})");
                continue;
            }
        }
        if let Err(e) = conn.set_nonblocking(true) {
            tracing::warn!("SHM: cannot make an accepted socket non-blocking: {e}");
            continue;
        }
        let inbound = Arc::new(Inbound {
            conn,
            state: Mutex::new(InState::default()),
        });
        shared.inbound.lock().push(inbound.clone());
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("rixl-shm-peer".into())
            .spawn(move || serve_inbound(&s, &inbound));
        if let Err(e) = spawned {
            tracing::warn!("SHM: cannot start a reader thread: {e}");
        }
    }
}

/// One accepted connection and what has been read from it so far.
struct Inbound {
    /// Non-blocking; readers wait for input with `poll`.
    conn: UnixStream,
    state: Mutex<InState>,
}

#[derive(Default)]
struct InState {
    /// The sender, once its hello arrived.
    name: Option<String>,
    /// Bytes of frames not complete yet.
    buf: Vec<u8>,
    /// Why the connection is over, once it is.
    end: Option<End>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The sender said goodbye: not a failure.
    Bye,
    /// End of stream without a goodbye: the sender is gone.
    Lost,
    /// The sender broke the protocol; the connection is dropped.
    Bad,
}

/// Reads whatever is available without blocking and delivers complete notifications. Returns
/// why the connection ended, if it did.
fn drain(shared: &Shared, conn: &UnixStream, st: &mut InState) -> Option<End> {
    let mut eof = false;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match std::io::Read::read(&mut &*conn, &mut chunk) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                st.buf.extend_from_slice(&chunk[..n]);
                if st.buf.len() > wire::MAX_PAYLOAD + 5 {
                    break; // Parse (and probably refuse) before reading more.
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                eof = true;
                break;
            }
        }
    }
    let mut off = 0;
    let end = loop {
        match wire::parse(&st.buf[off..]) {
            Ok(None) => break None,
            Err(e) => {
                tracing::warn!("SHM: dropped a connection sending a bad frame: {e}");
                break Some(End::Bad);
            }
            Ok(Some((kind, start, stop))) => {
                let payload = &st.buf[off + start..off + stop];
                off += stop;
                match (kind, &st.name) {
                    (wire::Kind::Hello, None) => match std::str::from_utf8(payload) {
                        Ok(n) if !n.is_empty() => st.name = Some(n.to_owned()),
                        _ => {
                            tracing::warn!("SHM: dropped a connection with an invalid agent name");
                            break Some(End::Bad);
                        }
                    },
                    (wire::Kind::Notif, Some(name)) => shared.ctx.notifs.deliver(name, payload),
                    (wire::Kind::Bye, _) => break Some(End::Bye),
                    (kind, name) => {
                        tracing::warn!(
                            "SHM: dropped a connection: unexpected {kind:?} from {name:?}"
                        );
                        break Some(End::Bad);
                    }
                }
            }
        }
    };
    st.buf.drain(..off.min(st.buf.len()));
    end.or(eof.then_some(End::Lost))
}

/// Blocks until `conn` has input (or end of stream).
fn wait_readable(conn: &UnixStream) {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket the caller owns; blocks until it is readable.
    unsafe { libc::poll(&mut pfd, 1, -1) };
}

/// The reader thread of one accepted connection: waits for input and drains it, until the
/// connection ends.
fn serve_inbound(shared: &Shared, inbound: &Arc<Inbound>) {
    let end = loop {
        wait_readable(&inbound.conn);
        let mut st = inbound.state.lock();
        if st.end.is_none() {
            st.end = drain(shared, &inbound.conn, &mut st);
        }
        if let Some(end) = st.end {
            break (end, st.name.clone());
        }
    };
    shared.inbound.lock().retain(|i| !Arc::ptr_eq(i, inbound));
    let _ = inbound.conn.shutdown(std::net::Shutdown::Both);
    if let (End::Lost, Some(name)) = end {
        if !shared.stopping.load(Ordering::SeqCst) {
            let err = Error::remote_disconnect(format!(
                "agent {name:?} closed its SHM connection without a goodbye"
            ));
            if let Some(p) = shared.peers.lock().get(&name) {
                p.alive.store(false, Ordering::SeqCst);
            }
            shared.ctx.report_peer_lost(&name, &err);
        }
    }
}

/// Delivers notifications that already arrived on any connection, without blocking and
/// without waiting for the connections' reader threads to wake up. Returns whether it found a
/// connection to drain.
fn poll_inbound(shared: &Shared) {
    let list: Vec<Arc<Inbound>> = shared.inbound.lock().clone();
    for inbound in list {
        let Some(mut st) = inbound.state.try_lock() else {
            continue;
        };
        if st.end.is_none() {
            st.end = drain(shared, &inbound.conn, &mut st);
            if st.end.is_some() {
                // Make sure the reader thread wakes up to finish the connection.
                let _ = inbound.conn.shutdown(std::net::Shutdown::Read);
            }
        }
    }
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

fn connect_peer(shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<()> {
    let mut slot = peer.conn.lock();
    if slot.is_some() {
        return Ok(());
    }
    let mut conn = UnixStream::connect(&peer.info.socket).map_err(|e| {
        let kind = if matches!(
            e.raw_os_error(),
            Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
        ) {
            ErrorKind::RemoteDisconnect
        } else {
            ErrorKind::Backend
        };
        Error::from_io(
            kind,
            format!("cannot reach agent {:?} at {}", peer.name, peer.info.socket),
            &e,
        )
        .with_peer(&peer.name)
    })?;
    wire::write_frame(
        &mut conn,
        wire::Kind::Hello,
        shared.ctx.agent_name.as_bytes(),
    )
    .map_err(|e| {
        Error::from_io(ErrorKind::RemoteDisconnect, "SHM hello failed", &e).with_peer(&peer.name)
    })?;
    let _ = conn.set_nodelay_unix();
    // Watch the connection: the peer never writes on it, so end-of-stream means it died.
    let watch = conn
        .try_clone()
        .map_err(|e| Error::from_io(ErrorKind::Backend, "SHM socket clone", &e))?;
    let (s, p) = (shared.clone(), peer.clone());
    std::thread::Builder::new()
        .name("rixl-shm-watch".into())
        .spawn(move || {
            let mut watch = watch;
            let mut b = [0u8; 64];
            loop {
                match std::io::Read::read(&mut watch, &mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            if !p.closing.load(Ordering::SeqCst) && !s.stopping.load(Ordering::SeqCst) {
                let err = Error::remote_disconnect(format!("agent {:?} went away", p.name));
                s.lost(&p, &err);
            }
        })
        .map_err(|e| Error::from_io(ErrorKind::Backend, "SHM cannot start its thread", &e))?;
    *slot = Some(conn);
    Ok(())
}

/// Small extension so the hello/notify writes go out at once (Unix sockets have no Nagle; this
/// is a no-op kept for symmetry with TCP and documents the intent).
trait NoDelay {
    fn set_nodelay_unix(&self) -> std::io::Result<()>;
}

impl NoDelay for UnixStream {
    fn set_nodelay_unix(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// True unless the peer's end of our control connection is closed. The kernel closes a dead
/// process's sockets before its pid can be reused, so this one `poll` per post also guarantees
/// that `process_vm_*` never reaches a different process that inherited the pid.
fn peer_alive(peer: &Peer) -> bool {
    if !peer.alive.load(Ordering::SeqCst) {
        return false;
    }
    if peer.info.pid == std::process::id() && !LOCAL_INSTANCES.lock().contains(&peer.info.socket) {
        return false;
    }
    let slot = peer.conn.lock();
    let Some(conn) = slot.as_ref() else {
        return true;
    };
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for a socket we own (kept open by the lock guard);
    // a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    !(n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

fn send_notif_to(shared: &Arc<Shared>, peer: &Arc<Peer>, msg: &[u8]) -> Result<()> {
    if !peer_alive(peer) {
        return Err(
            Error::remote_disconnect(format!("agent {:?} is gone", peer.name))
                .with_peer(&peer.name),
        );
    }
    connect_peer(shared, peer)?;
    let mut slot = peer.conn.lock();
    let conn = slot
        .as_mut()
        .ok_or_else(|| Error::remote_disconnect("SHM connection closed"))?;
    wire::write_frame(conn, wire::Kind::Notif, msg).map_err(|e| {
        let err = Error::from_io(
            ErrorKind::RemoteDisconnect,
            format!("sending a notification to {:?} failed", peer.name),
            &e,
        )
        .with_peer(&peer.name);
        drop(slot);
        shared.lost(peer, &err);
        err
    })
}

impl Shm {
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

    /// Checks once per peer that the kernel lets us access it, with a 1-byte read.
    fn check_access(&self, peer: &Peer, desc: &Desc) -> Result<()> {
        if peer.access_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        let l = [Segment {
            addr: byte.as_mut_ptr() as u64,
            len: 1,
            dev: 0,
            token: 0,
        }];
        let r = [Segment {
            addr: desc.addr,
            len: 1,
            dev: 0,
            token: 0,
        }];
        match cma::transfer(peer.info.pid, XferOp::Read, &l, &r, || true) {
            Ok(()) => {
                peer.access_checked.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.with_peer(&peer.name).with_backend(NAME)),
        }
    }
}

impl Backend for Shm {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            remote: true,
            local: false,
            notif: true,
            mems: vec![MemType::Dram],
        }
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn register(&self, mem: MemType, _desc: &RegDesc) -> Result<LocalRegion> {
        if mem != MemType::Dram {
            return Err(Error::not_supported(format!(
                "SHM cannot register {mem} memory"
            )));
        }
        Ok(LocalRegion {
            token: self.next_token.fetch_add(1, Ordering::Relaxed),
            public: Vec::new(),
        })
    }

    fn deregister(&self, _mem: MemType, _token: u64) -> Result<()> {
        Ok(())
    }

    fn conn_info(&self) -> Option<Vec<u8>> {
        Some(self.me.encode())
    }

    fn load_remote_conn_info(&self, peer: &str, info: &[u8]) -> Result<()> {
        let info = ConnInfo::decode(info)?;
        if info.host != self.host {
            return Err(Error::not_supported(format!(
                "agent {peer:?} is on another host or pid namespace; SHM only reaches agents on this one"
            )));
        }
        let p = Arc::new(Peer {
            name: peer.to_owned(),
            info,
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            access_checked: AtomicBool::new(false),
            conn: Mutex::new(None),
        });
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
        self.check_access(&p, desc)?;
        // Distinct tokens per region: the agent only merges descriptors within one token.
        Ok(self.next_token.fetch_add(1, Ordering::Relaxed))
    }

    fn connect(&self, peer: &str) -> Result<()> {
        let p = self.shared.peer(peer)?;
        connect_peer(&self.shared, &p)?;
        if !peer_alive(&p) {
            let e = Error::remote_disconnect(format!("agent {peer:?} is gone")).with_peer(peer);
            self.shared.lost(&p, &e);
            return Err(e);
        }
        Ok(())
    }

    fn shutdown(&self) {
        self.teardown();
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

    fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>> {
        if spec.local_mem != MemType::Dram || spec.remote_mem != MemType::Dram {
            return Err(Error::not_supported("SHM moves DRAM only"));
        }
        if spec.loopback {
            return Err(Error::not_supported(
                "SHM does not serve transfers to the agent itself",
            ));
        }
        let peer = self.shared.peer(spec.peer)?;
        // The control connection is also the liveness check of every post: make it now.
        connect_peer(&self.shared, &peer)?;
        let total = spec.local.iter().map(|s| s.len).sum();
        let pool = if total > self.inline_max {
            Some(self.pool()?)
        } else {
            None
        };
        Ok(Box::new(ShmXfer {
            op: spec.op,
            peer,
            shared: self.shared.clone(),
            local: Arc::new(spec.local),
            remote: Arc::new(spec.remote),
            total,
            pool,
            current: Mutex::new(None),
        }))
    }

    fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        let p = self.shared.peer(peer)?;
        send_notif_to(&self.shared, &p, msg)
    }

    fn poll_notifs(&self) {
        poll_inbound(&self.shared);
    }
}

/// The state of one post split across workers.
struct PostState {
    /// Parts not finished yet.
    remaining: Mutex<usize>,
    /// Workers inside a copy right now.
    active: Mutex<usize>,
    idle: Condvar,
    cancelled: AtomicBool,
    error: Mutex<Option<Error>>,
}

struct ShmXfer {
    op: XferOp,
    peer: Arc<Peer>,
    shared: Arc<Shared>,
    local: Arc<SegmentVec>,
    remote: Arc<SegmentVec>,
    total: u64,
    pool: Option<Arc<pool::Pool>>,
    current: Mutex<Option<Arc<PostState>>>,
}

impl std::fmt::Debug for ShmXfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmXfer")
            .field("op", &self.op)
            .field("peer", &self.peer.name)
            .field("segments", &self.local.len())
            .field("bytes", &self.total)
            .finish()
    }
}

impl ShmXfer {
    fn fail(&self, e: Error) -> Error {
        let e = e.with_peer(&self.peer.name);
        if e.kind() == ErrorKind::RemoteDisconnect {
            self.shared.lost(&self.peer, &e);
        }
        e
    }
}

/// Cuts `[local, remote]` into about `parts` pieces of similar size, splitting segments where
/// needed and keeping every piece's single system calls under `MAX_CHUNK`.
fn split(
    local: &[Segment],
    remote: &[Segment],
    parts: usize,
    total: u64,
) -> Vec<(Vec<Segment>, Vec<Segment>)> {
    let target = total.div_ceil(parts as u64).max(1);
    let mut out = Vec::with_capacity(parts);
    let (mut cl, mut cr): (Vec<Segment>, Vec<Segment>) = (Vec::new(), Vec::new());
    let mut filled = 0u64;
    for (l, r) in local.iter().zip(remote) {
        let mut off = 0u64;
        while off < l.len {
            let take = (l.len - off).min(target - filled).min(MAX_CHUNK);
            cl.push(Segment {
                addr: l.addr + off,
                len: take,
                ..*l
            });
            cr.push(Segment {
                addr: r.addr + off,
                len: take,
                ..*r
            });
            off += take;
            filled += take;
            if filled == target {
                out.push((std::mem::take(&mut cl), std::mem::take(&mut cr)));
                filled = 0;
            }
        }
    }
    if !cl.is_empty() {
        out.push((cl, cr));
    }
    out
}

impl BackendXfer for ShmXfer {
    fn post(&self, notif: Option<&[u8]>, done: CompletionHandle) -> Result<PostOutcome> {
        connect_peer(&self.shared, &self.peer).map_err(|e| self.fail(e))?;
        if !peer_alive(&self.peer) {
            return Err(self.fail(Error::remote_disconnect(format!(
                "agent {:?} is gone",
                self.peer.name
            ))));
        }
        let pid = self.peer.info.pid;
        let Some(pool) = &self.pool else {
            cma::transfer(pid, self.op, &self.local, &self.remote, || true)
                .map_err(|e| self.fail(e))?;
            if let Some(msg) = notif {
                send_notif_to(&self.shared, &self.peer, msg)?;
            }
            return Ok(PostOutcome::Done);
        };
        let parts_wanted = (self.total / MIN_PART).clamp(1, pool.size() as u64) as usize;
        let pieces = split(&self.local, &self.remote, parts_wanted, self.total);
        let state = Arc::new(PostState {
            remaining: Mutex::new(pieces.len()),
            active: Mutex::new(0),
            idle: Condvar::new(),
            cancelled: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        *self.current.lock() = Some(state.clone());
        let notif: Option<Arc<[u8]>> = notif.map(Arc::from);
        for (l, r) in pieces {
            let (st, op, peer, shared, done, notif) = (
                state.clone(),
                self.op,
                self.peer.clone(),
                self.shared.clone(),
                done.clone(),
                notif.clone(),
            );
            pool.spawn(Box::new(move || {
                {
                    let mut a = st.active.lock();
                    if st.cancelled.load(Ordering::SeqCst) {
                        drop(a);
                        finish_part(&st, &shared, &peer, &done, notif.as_deref());
                        return;
                    }
                    *a += 1;
                }
                let r = cma::transfer(peer.info.pid, op, &l, &r, || {
                    !st.cancelled.load(Ordering::SeqCst)
                });
                if let Err(e) = r {
                    st.error.lock().get_or_insert(e.with_peer(&peer.name));
                }
                {
                    let mut a = st.active.lock();
                    *a -= 1;
                    st.idle.notify_all();
                }
                finish_part(&st, &shared, &peer, &done, notif.as_deref());
            }));
        }
        Ok(PostOutcome::InProgress)
    }

    fn cancel(&self) -> Result<()> {
        let Some(st) = self.current.lock().clone() else {
            return Ok(());
        };
        let mut a = st.active.lock();
        st.cancelled.store(true, Ordering::SeqCst);
        while *a > 0 {
            st.idle.wait(&mut a);
        }
        Ok(())
    }

    fn estimate_cost(&self) -> Result<CostEstimate> {
        // Measured here: ~1.5 us per post plus ~5 GB/s.
        let duration_us = 2 + self.total / 5_000;
        Ok(CostEstimate {
            duration_us,
            margin_us: duration_us / 2,
            method: CostMethod::AnalyticalBackend,
        })
    }
}

impl Drop for ShmXfer {
    fn drop(&mut self) {
        let _ = self.cancel();
    }
}

fn finish_part(
    st: &PostState,
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    done: &CompletionHandle,
    notif: Option<&[u8]>,
) {
    let last = {
        let mut r = st.remaining.lock();
        *r -= 1;
        *r == 0
    };
    if !last {
        return;
    }
    if st.cancelled.load(Ordering::SeqCst) {
        return; // The canceller reports the outcome.
    }
    let result = match st.error.lock().take() {
        Some(e) => {
            if e.kind() == ErrorKind::RemoteDisconnect {
                shared.lost(peer, &e);
            }
            Err(e.with_backend(NAME))
        }
        None => match notif {
            Some(msg) => send_notif_to(shared, peer, msg),
            None => Ok(()),
        },
    };
    done.complete(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_balances_and_covers() {
        let l = [
            Segment {
                addr: 0,
                len: 10 << 20,
                dev: 0,
                token: 1,
            },
            Segment {
                addr: 100 << 20,
                len: 3 << 20,
                dev: 0,
                token: 1,
            },
        ];
        let r = [
            Segment {
                addr: 1 << 30,
                len: 10 << 20,
                dev: 0,
                token: 2,
            },
            Segment {
                addr: 2 << 30,
                len: 3 << 20,
                dev: 0,
                token: 2,
            },
        ];
        let pieces = split(&l, &r, 2, 13 << 20);
        assert_eq!(pieces.len(), 2);
        let sum: u64 = pieces
            .iter()
            .flat_map(|(l, _)| l.iter())
            .map(|s| s.len)
            .sum();
        assert_eq!(sum, 13 << 20);
        for (pl, pr) in &pieces {
            for (a, b) in pl.iter().zip(pr) {
                assert_eq!(a.len, b.len);
                assert!(a.len <= MAX_CHUNK);
                // The same offset into the original segment on both sides.
                let k = l
                    .iter()
                    .position(|o| o.addr <= a.addr && a.addr < o.addr + o.len)
                    .unwrap();
                assert_eq!(b.addr - r[k].addr, a.addr - l[k].addr);
            }
        }
    }
}
