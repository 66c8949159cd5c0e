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
//! of the same user (or root), checked with `SO_PEERCRED`.
//!
//! Registration asks the kernel, from a background thread, to back large DRAM regions with
//! transparent huge pages (`thp`): the peer's `process_vm_*` calls pin this process's pages one
//! by one, and on 4 KiB pages that doubles the cost of a 1 MiB copy.
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

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rixl_backend::{
    Backend, BackendContext, BackendFactory, BackendXfer, LocalRegion, Notifications, ParamKind,
    ParamSpec, PostOutcome, RemotePeers, XferSpec,
};
use rixl_core::{
    Capabilities, CompletionHandle, CostEstimate, CostMethod, Desc, Error, ErrorKind, MemType,
    Params, RegDesc, Result, Segment, SegmentVec, XferOp,
};

#[cfg(feature = "internals")]
#[doc(hidden)]
pub use host::ConnInfo;
#[cfg(not(feature = "internals"))]
use host::ConnInfo;
use host::HostIdentity;

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

/// What SHM does, stated once: DRAM between processes of one host. One-sided: the target
/// takes no part in a transfer, so it cannot fence a peer's writes into memory it
/// deregisters.
fn capabilities() -> Capabilities {
    Capabilities::new(&[MemType::Dram])
        .moving(MemType::Dram, MemType::Dram)
        .remote()
        .estimates_cost()
}

/// Pieces a large post is cut into are at least this big.
const MIN_PART: u64 = 256 << 10;
/// Segments are cut so that one system call moves at most this much (cancellation latency).
const MAX_CHUNK: u64 = 8 << 20;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// Control sockets of the SHM instances alive in this process. A peer in our own process
/// never "dies" for the kernel (its memory stays mapped), so its teardown is looked up here.
static LOCAL_INSTANCES: Mutex<Vec<String>> = Mutex::new(Vec::new());

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
    LOCAL_INSTANCES.lock().push(path.clone());
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
        .spawn(move || accept_loop(&s2, listener))
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

/// One peer we can reach.
#[derive(Debug)]
struct Peer {
    name: String,
    info: ConnInfo,
    alive: AtomicBool,
    /// We are closing on purpose: end-of-stream is not a failure.
    closing: AtomicBool,
    access_checked: AtomicBool,
    /// The peer is an agent of this very process. Decided once at load: `std::process::id()`
    /// is a real `getpid` system call (glibc stopped caching it), about 0.15 us, which a 4 KiB
    /// post used to pay on every liveness check.
    in_this_process: bool,
    /// When the control socket last showed the peer alive (`monotonic_nanos`), so that posts
    /// poll it at most once per [`LIVENESS_RECHECK_NS`].
    alive_checked_ns: AtomicU64,
    /// Outbound control connection, made on first need.
    conn: Mutex<Option<UnixStream>>,
    /// Our notification ring to the peer, if it mapped one; written under `conn`'s lock so
    /// that ring records and socket frames keep their order.
    ring: Mutex<Option<ring::Ring>>,
}

/// How long a liveness check of the control socket stays good for posts. A dead peer's pid is
/// handed out again only after the kernel's pid counter wraps (`pid_max`, at least 32768
/// creations later); no machine creates that many processes in a millisecond, so within this
/// window `process_vm_*` cannot reach a process that inherited the pid. The reader thread also
/// clears `alive` as soon as it sees the socket close, whatever the window.
const LIVENESS_RECHECK_NS: u64 = 1_000_000;

/// How recent the peer's last look at its notification ring must be for a standalone
/// notification to skip the socket's liveness check. Killing and reaping a process takes far
/// longer, so a peer seen this recently was alive when the caller decided to send.
const SEEN_FRESH_NS: u64 = 20_000;

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

/// The connected process's `(pid, uid)`.
fn peer_cred(s: &UnixStream) -> Option<(u32, u32)> {
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
    (rc == 0).then_some((cred.pid as u32, cred.uid))
}

fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let pid = match peer_cred(&conn) {
            Some((pid, uid)) if uid == me || uid == 0 => pid,
            other => {
                tracing::warn!("SHM: refused a connection from {other:?} (we are uid {me})");
                continue;
            }
        };
        if let Err(e) = conn.set_nonblocking(true) {
            tracing::warn!("SHM: cannot make an accepted socket non-blocking: {e}");
            continue;
        }
        // SAFETY: eventfd has no memory preconditions; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            tracing::warn!(
                "SHM: cannot create an eventfd: {}",
                std::io::Error::last_os_error()
            );
            continue;
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let poke = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) };
        let inbound = Arc::new(Inbound {
            conn,
            pid,
            poke,
            untimed: AtomicBool::new(false),
            ring: std::sync::OnceLock::new(),
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
    /// The sender's process (`SO_PEERCRED`), whose ring we open.
    pid: u32,
    /// The sender's notification ring, once mapped.
    ring: std::sync::OnceLock<ring::Ring>,
    /// An eventfd that wakes the reader thread when a poll opens a new polling window.
    poke: std::os::fd::OwnedFd,
    /// The reader thread sleeps without a deadline (then a new polling window must poke it).
    untimed: AtomicBool,
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
    /// Socket notifications waiting for their `SOCKET` record in the ring.
    pending: std::collections::VecDeque<Vec<u8>>,
    /// The ring is stopped at a `SOCKET` record whose notification has not arrived yet.
    awaiting_socket: bool,
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

/// Reads whatever the socket has without blocking (if `read_socket`), handles its frames, then
/// delivers what waits in the notification ring. Returns why the connection ended, if it did.
fn drain(shared: &Shared, inbound: &Inbound, st: &mut InState, read_socket: bool) -> Option<End> {
    let mut eof = false;
    if read_socket {
        eof = read_available(&inbound.conn, st);
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
                    (wire::Kind::Ring, Some(_)) if inbound.ring.get().is_none() => {
                        attach_ring(shared, inbound, payload);
                    }
                    // With a ring, a socket notification waits for its place in the ring.
                    (wire::Kind::Notif, Some(name)) => match inbound.ring.get() {
                        Some(_) => st.pending.push_back(payload.to_vec()),
                        None => shared.ctx.notifs().deliver(name, payload),
                    },
                    (wire::Kind::Doorbell, Some(_)) => {}
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
    let end = end.or_else(|| drain_ring(shared, inbound, st));
    end.or(eof.then_some(End::Lost))
}

/// Appends what the non-blocking socket has to `st.buf`; returns true at end of stream.
fn read_available(conn: &UnixStream, st: &mut InState) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match std::io::Read::read(&mut &*conn, &mut chunk) {
            Ok(0) => return true,
            Ok(n) => {
                st.buf.extend_from_slice(&chunk[..n]);
                if st.buf.len() > wire::MAX_PAYLOAD + 5 {
                    return false; // Parse (and probably refuse) before reading more.
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Maps the sender's ring and answers whether it did. A ring we cannot use is not fatal: the
/// sender then keeps notifications on the socket.
fn attach_ring(shared: &Shared, inbound: &Inbound, payload: &[u8]) {
    let mapped = match payload {
        [f0, f1, f2, f3, c @ ..] if c.len() == 8 => {
            let fd = u32::from_le_bytes([*f0, *f1, *f2, *f3]);
            let cap = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            ring::Ring::open(inbound.pid, fd, cap).map_err(|e| e.to_string())
        }
        _ => Err("malformed ring frame".to_owned()),
    };
    let ok = match mapped {
        Ok(r) => {
            // Under the attendance lock, so that a waiter starting or stopping right now
            // cannot leave this ring marked wrongly.
            let attending = shared.attending.lock();
            r.set_attending(*attending > 0);
            let _ = inbound.ring.set(r);
            drop(attending);
            true
        }
        Err(e) => {
            tracing::warn!(
                "SHM: notifications from pid {} stay on the socket: {e}",
                inbound.pid
            );
            false
        }
    };
    let mut ack = Vec::with_capacity(6);
    let _ = wire::write_frame(&mut ack, wire::Kind::RingAck, &[u8::from(ok)]);
    // Six bytes into an empty send buffer: a non-blocking write takes them whole.
    let _ = std::io::Write::write_all(&mut &inbound.conn, &ack);
}

/// Delivers the ring's records in order; a `SOCKET` record takes the next socket notification,
/// or stops the drain until it has arrived.
fn drain_ring(shared: &Shared, inbound: &Inbound, st: &mut InState) -> Option<End> {
    let (Some(ring), Some(name)) = (inbound.ring.get(), st.name.as_deref()) else {
        return None;
    };
    ring.clear_bell();
    let pending = &mut st.pending;
    let mut stalled = false;
    let res = ring.drain(|rec| match rec {
        ring::Record::Msg(m) => {
            shared.ctx.notifs().deliver(name, &m);
            true
        }
        ring::Record::Socket => match pending.pop_front() {
            Some(m) => {
                shared.ctx.notifs().deliver(name, &m);
                true
            }
            None => {
                stalled = true;
                false
            }
        },
    });
    st.awaiting_socket = stalled;
    match res {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!("SHM: dropped a connection from {name:?}: {e}");
            Some(End::Bad)
        }
    }
}

/// How long a non-blocking poll of the notification rings lets senders skip the doorbell (the
/// reader thread then wakes at the end of the window to take what arrived unannounced).
const POLL_WINDOW_NS: u64 = 500_000;

/// Blocks until `inbound`'s socket has input (or end of stream), its poke fires, or the ring's
/// polling window ends.
fn wait_readable(inbound: &Inbound) {
    let window = |r: &ring::Ring| {
        let (until, now) = (r.polled_until(), ring::now_ns());
        // A little past the deadline, so that the sender's clock has passed it too.
        (until > now).then(|| libc::timespec {
            tv_sec: ((until - now + 20_000) / 1_000_000_000) as libc::time_t,
            tv_nsec: ((until - now + 20_000) % 1_000_000_000) as libc::c_long,
        })
    };
    let mut timeout = inbound.ring.get().and_then(window);
    if timeout.is_none() {
        // About to sleep without a deadline: say so, then look again, so that a poll opening
        // a window either is seen here or sees the flag and pokes (both sides SeqCst).
        inbound.untimed.store(true, Ordering::SeqCst);
        timeout = inbound.ring.get().and_then(window);
        if timeout.is_some() {
            inbound.untimed.store(false, Ordering::SeqCst);
        }
    }
    let mut pfd = [
        libc::pollfd {
            fd: inbound.conn.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: inbound.poke.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = timeout
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: two valid pollfds for descriptors `inbound` owns, an optional timespec that
    // outlives the call, no signal mask.
    unsafe { libc::ppoll(pfd.as_mut_ptr(), 2, ts, std::ptr::null()) };
    inbound.untimed.store(false, Ordering::SeqCst);
    if pfd[1].revents & libc::POLLIN != 0 {
        let mut v = 0u64;
        // SAFETY: reads the 8-byte eventfd counter into `v` (non-blocking descriptor).
        unsafe { libc::read(inbound.poke.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Makes the reader thread of `inbound` look at its ring's polling window again.
fn poke(inbound: &Inbound) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from `one` to an eventfd `inbound` owns.
    unsafe { libc::write(inbound.poke.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// The reader thread of one accepted connection: waits for input (frames, doorbells) and
/// drains it, until the connection ends.
fn serve_inbound(shared: &Shared, inbound: &Arc<Inbound>) {
    let end = loop {
        wait_readable(inbound);
        let mut st = inbound.state.lock();
        if st.end.is_none() {
            st.end = drain(shared, inbound, &mut st, true);
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
    // A thread inside `wait_notif` marks the rings attended; only other polls (NIXL-style
    // `get_notifs` loops) open polling windows.
    let attended = *shared.attending.lock() > 0;
    // The empty poll, which a NIXL-style loop makes millions of times, allocates nothing: the
    // list is walked under its lock and only connections with something to read are kept,
    // to be drained after the lock is released (draining may write an acknowledgement).
    let mut ready: Vec<(Arc<Inbound>, bool)> = Vec::new();
    let now = ring::now_ns();
    for inbound in shared.inbound.lock().iter() {
        // With a ring, waiting threads read only the ring (one atomic load when it is empty);
        // the socket then carries doorbells for the reader thread, and notifications too
        // large for the ring, which a stalled `SOCKET` record asks for.
        let ring_only = match inbound.ring.get() {
            Some(r) => {
                r.note_seen(now);
                if !attended
                    && r.note_polled(now, POLL_WINDOW_NS)
                    && inbound.untimed.load(Ordering::SeqCst)
                {
                    poke(inbound);
                }
                if !r.has_data() {
                    continue;
                }
                true
            }
            None => false,
        };
        ready.push((inbound.clone(), ring_only));
    }
    for (inbound, ring_only) in ready {
        let Some(mut st) = inbound.state.try_lock() else {
            continue;
        };
        if st.end.is_none() {
            let read_socket = !ring_only || st.awaiting_socket;
            st.end = drain(shared, &inbound, &mut st, read_socket);
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
        shared.ctx.agent_name().as_bytes(),
    )
    .map_err(|e| {
        Error::from_io(ErrorKind::RemoteDisconnect, "SHM hello failed", &e).with_peer(&peer.name)
    })?;
    *peer.ring.lock() = offer_ring(&mut conn, &peer.name)?;
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

/// Offers the peer a notification ring right after the hello and waits for its answer (the one
/// frame a receiver ever sends back). `None`: notifications stay on the socket, because the ring
/// could not be made or the peer could not map it.
fn offer_ring(conn: &mut UnixStream, peer: &str) -> Result<Option<ring::Ring>> {
    let r = match ring::Ring::create(ring::DEFAULT_CAP) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                "SHM: no notification ring to {peer:?} (notifications use the socket): {e}"
            );
            return Ok(None);
        }
    };
    let mut offer = [0u8; 12];
    offer[..4].copy_from_slice(&r.raw_fd().to_le_bytes());
    offer[4..].copy_from_slice(&r.cap().to_le_bytes());
    let lost = |what: &str, e: &std::io::Error| {
        Error::from_io(ErrorKind::RemoteDisconnect, format!("SHM {what}"), e).with_peer(peer)
    };
    wire::write_frame(conn, wire::Kind::Ring, &offer).map_err(|e| lost("ring offer failed", &e))?;
    conn.set_read_timeout(Some(RING_ACK_TIMEOUT))
        .map_err(|e| lost("socket setup failed", &e))?;
    let mut ack = [0u8; 6];
    std::io::Read::read_exact(conn, &mut ack)
        .map_err(|e| lost("peer did not answer the ring offer", &e))?;
    let _ = conn.set_read_timeout(None);
    match wire::parse(&ack) {
        Ok(Some((wire::Kind::RingAck, 5, 6))) if ack[5] == 1 => Ok(Some(r)),
        Ok(Some((wire::Kind::RingAck, 5, 6))) => Ok(None),
        _ => Err(Error::remote_disconnect(format!(
            "agent {peer:?} answered the ring offer with garbage"
        ))
        .with_peer(peer)),
    }
}

/// How long a connecting initiator waits for the peer's answer to its ring offer.
const RING_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
/// process's sockets before its pid can be reused, so a `poll` that finds the socket open
/// guarantees that `process_vm_*` does not reach a different process that inherited the pid;
/// one poll serves the posts of the next [`LIVENESS_RECHECK_NS`] (a system call per 4 KiB post
/// was a fifth of its cost).
fn peer_alive(peer: &Peer) -> bool {
    check_alive(peer, false)
}

/// [`peer_alive`], always asking the socket (`fresh`) or trusting a check younger than
/// [`LIVENESS_RECHECK_NS`]. Notifications and explicit connects ask fresh: a notification
/// written into the shared-memory ring of a dead peer would otherwise vanish without an error.
fn check_alive(peer: &Peer, fresh: bool) -> bool {
    if !peer.alive.load(Ordering::SeqCst) {
        return false;
    }
    if peer.in_this_process {
        return LOCAL_INSTANCES.lock().contains(&peer.info.socket);
    }
    let now = rixl_core::completion::monotonic_nanos();
    if !fresh
        && now.saturating_sub(peer.alive_checked_ns.load(Ordering::Relaxed)) < LIVENESS_RECHECK_NS
    {
        return true;
    }
    let alive = socket_open(peer);
    if alive {
        peer.alive_checked_ns.store(now, Ordering::Relaxed);
    }
    alive
}

/// One zero-timeout `poll` of the outbound control socket: false once the peer closed it.
fn socket_open(peer: &Peer) -> bool {
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

/// Sends a notification. `after_data`: it belongs to a post whose data just reached the peer,
/// which proves the peer alive a moment ago, so the socket need not be asked again.
fn send_notif_to(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    msg: &[u8],
    after_data: bool,
) -> Result<()> {
    // A standalone notification asks the socket whether the peer lives (a `poll`, about 0.5 us
    // here, a third of a ping-pong), unless the peer's receiving thread looked at its ring a
    // moment ago, which proves the same.
    let fresh = !after_data
        && !peer
            .ring
            .lock()
            .as_ref()
            .is_some_and(|r| r.seen_within(SEEN_FRESH_NS));
    if !check_alive(peer, fresh) {
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
    let ring = peer.ring.lock();
    let sent = match ring.as_ref() {
        None => wire::write_frame(conn, wire::Kind::Notif, msg),
        Some(r) => {
            let on_socket = r.too_large(msg.len());
            let mut res = Ok(());
            if on_socket {
                res = wire::write_frame(conn, wire::Kind::Notif, msg);
            }
            res.and_then(|()| r.push((!on_socket).then_some(msg)))
                .and_then(|bell| match bell {
                    true => wire::write_frame(conn, wire::Kind::Doorbell, &[]),
                    false => Ok(()),
                })
        }
    };
    drop(ring);
    sent.map_err(|e| {
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
        Ok(LocalRegion {
            token: self.next_token.fetch_add(1, Ordering::Relaxed),
            public: Vec::new(),
        })
    }

    fn deregister(&self, _mem: MemType, _token: u64) -> Result<()> {
        Ok(())
    }

    fn shutdown(&self) {
        self.teardown();
    }

    unsafe fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>> {
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
        let in_this_process = info.pid == std::process::id();
        let p = Arc::new(Peer {
            name: peer.to_owned(),
            info,
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            access_checked: AtomicBool::new(false),
            in_this_process,
            alive_checked_ns: AtomicU64::new(0),
            conn: Mutex::new(None),
            ring: Mutex::new(None),
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
        let p = self.shared.peer(peer)?;
        send_notif_to(&self.shared, &p, msg, false)
    }

    fn poll_notifs(&self) {
        poll_inbound(&self.shared);
    }

    fn attend_notifs(&self, on: bool) {
        let mut n = self.shared.attending.lock();
        let was = *n;
        *n = if on { was + 1 } else { was.saturating_sub(1) };
        if (was == 0) != (*n == 0) {
            let list: Vec<Arc<Inbound>> = self.shared.inbound.lock().clone();
            for inbound in &list {
                if let Some(r) = inbound.ring.get() {
                    r.set_attending(*n > 0);
                    if !on {
                        // Polls made while spinning opened a window; this thread is going
                        // to sleep, so senders should ring again from now on.
                        r.expire_polled();
                    }
                }
            }
            drop(n);
            if !on {
                // A sender that saw us attending skipped the doorbell: take what it left,
                // waiting for a reader thread that holds the connection, not skipping it.
                for inbound in &list {
                    if inbound.ring.get().is_some_and(ring::Ring::has_data) {
                        let mut st = inbound.state.lock();
                        if st.end.is_none() {
                            let read_socket = st.awaiting_socket;
                            st.end = drain(&self.shared, inbound, &mut st, read_socket);
                            if st.end.is_some() {
                                // The reader thread reports the end; wake it up.
                                let _ = inbound.conn.shutdown(std::net::Shutdown::Read);
                            }
                        }
                    }
                }
            }
        }
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
                send_notif_to(&self.shared, &self.peer, msg, true)?;
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
        let mut pieces = pieces.into_iter();
        let first = pieces.next();
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
                run_part(&st, op, &peer, &shared, &done, notif.as_deref(), &l, &r)
            }));
        }
        // The posting thread copies the first share itself, while the workers copy theirs: on
        // a small machine a spare core is rarer than a thread that would only wait (and whose
        // spinning would slow the workers down).
        if let Some((l, r)) = first {
            run_part(
                &state,
                self.op,
                &self.peer,
                &self.shared,
                &done,
                notif.as_deref(),
                &l,
                &r,
            );
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

/// Copies one share of a split post, unless the post was cancelled, and counts it done.
#[allow(clippy::too_many_arguments)]
fn run_part(
    st: &PostState,
    op: XferOp,
    peer: &Arc<Peer>,
    shared: &Arc<Shared>,
    done: &CompletionHandle,
    notif: Option<&[u8]>,
    l: &[Segment],
    r: &[Segment],
) {
    {
        let mut a = st.active.lock();
        if st.cancelled.load(Ordering::SeqCst) {
            drop(a);
            finish_part(st, shared, peer, done, notif);
            return;
        }
        *a += 1;
    }
    let res = cma::transfer(peer.info.pid, op, l, r, || {
        !st.cancelled.load(Ordering::SeqCst)
    });
    if let Err(e) = res {
        st.error.lock().get_or_insert(e.with_peer(&peer.name));
    }
    {
        let mut a = st.active.lock();
        *a -= 1;
        st.idle.notify_all();
    }
    finish_part(st, shared, peer, done, notif);
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
            Some(msg) => send_notif_to(shared, peer, msg, true),
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

#[cfg(test)]
mod params_doc_tests {
    /// The parameter table in the crate docs is the one the code declares.
    #[test]
    fn crate_docs_list_the_declared_parameters() {
        if let Err(e) = rixl_backend::docs_match(super::PARAMS, include_str!("lib.rs")) {
            panic!("{e}");
        }
    }
}
