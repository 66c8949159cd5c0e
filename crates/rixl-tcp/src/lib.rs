//! # rixl-tcp: the any-host backend
//!
//! `TCP` moves DRAM between agents on any hosts with one-sided READ and WRITE. Unlike SHM, the
//! target's CPU takes part: each agent runs a listener and one server thread per inbound
//! connection, and the servers move bytes directly between the socket and registered memory
//! (`readv` into the target's buffer for a WRITE, `writev` from it for a READ; no staging copy).
//! Because the target serves every byte, it also checks every byte: each request names a region
//! token, address and length, and is served only if the range lies inside a *live* registration
//! of the target's own (see [`target`]); a peer is never trusted. Deregistration is therefore
//! enforced on the target side, unlike SHM.
//!
//! The initiator opens `connections` TCP connections per peer on first use (or on `connect`).
//! Small posts go out on one of them in a single `writev` (up to 128 frames per call), with the
//! notification right behind the data on the same ordered stream, so the target delivers it
//! only once the data has landed. Posts larger than `stripe_min_bytes` are cut into pieces of
//! at most `chunk_bytes` (smaller when that gives every connection a share) dealt round-robin
//! to every connection; the posting thread writes the first share (up to 8 MiB) and any share
//! that puts little on the wire, per-connection sender threads write the others in parallel. Their notification carries the number of parts, and the target
//! delivers it when all of them were served. Frames are built once at `prepare_xfer`; a post
//! allocates only its small completion state.
//!
//! ## Latency: nobody sleeps on the hot path
//!
//! On the small VMs this is built on, waking a thread blocked in the kernel costs ~5 us (more
//! from an idle core), and a naive design pays it three times per small transfer: the target's
//! server, the initiator's reader thread, the waiting application thread. Instead, whoever is
//! awake does the work: a thread waiting for its post reads the connection's responses itself
//! while the reader thread sleeps through them (see the `initiator` module), a server thread
//! keeps looking for the next request for a few tens of microseconds after serving one, and a
//! thread waiting for notifications serves the inbound connections itself ([`target`]). Every
//! spin follows activity and is bounded, so idle agents use no CPU; the backend threads still
//! complete whatever nobody waits for. Standalone notifications are not acknowledged (one
//! segment and one wake-up less per notification).
//!
//! ## Bandwidth: keep the bytes in cache
//!
//! Between processes on one machine every byte is copied twice, into the socket and out of
//! it, and when the data outgrow the caches the second copy's cost depends on whether the
//! bytes it reads are still cached. A connection therefore has two send-buffer sizes: 4 MiB
//! normally (a burst goes into the socket in one call), and a small one while it streams a
//! share of `pace_min_bytes` (2 MiB) or more, so that the writer stays just ahead of the
//! reader (for a READ the request carries a flag and the target paces its answers). The small
//! size is the path's minimum round trip times 8 GB/s, at least 128 KiB, so a long path is
//! never slowed. This took batched 16 × 4-16 MiB transfers on loopback from 3.9-4.9 to
//! 6.7-7.5 GB/s.
//!
//! ## Liveness
//!
//! Liveness has three cases, told apart by what the peer's kernel still does:
//! - A killed peer's sockets are closed by its kernel, so the reader thread blocked on the
//!   connection sees end-of-stream at once and the agent invalidates the peer (milliseconds).
//! - A crashed host or a cut link acknowledges nothing. `unreachable_ms` (1.5 s) bounds that
//!   silence whatever the connection is doing: `TCP_USER_TIMEOUT` for our unacknowledged data,
//!   keepalive probes once a second after `keepalive_secs` (1 s) of quiet, and the reader thread
//!   looking for an unanswered probe as soon as the silence could reach the limit (the kernel
//!   itself would wait for its next probe). The connection fails with `RemoteDisconnect` and
//!   the agent invalidates the peer, about 1.5 s after the last acknowledgement, whether or not
//!   a request was waiting. This does not fail slow transfers: a slow link still acknowledges.
//! - A frozen or stuck peer process, whose kernel still acknowledges, is caught by the response
//!   deadline (`deadline_ms`, 5 s): requests outstanding and for that long no byte received, nor
//!   any of ours acknowledged, fail the connection with `Timeout` (a WRITE taking longer than
//!   that to upload is not failed while its bytes flow). If its receive buffer fills, the
//!   kernel's zero-window limit (`unreachable_ms` again) ends the connection sooner.
//!
//! Every blocking socket call has a timeout, so nothing waits forever.
//!
//! The wire format ([`wire`]) is versioned in the hello and bounds-checked per frame; garbage,
//! truncated frames and frames claiming huge lengths close the connection without writing
//! anything, and the backend keeps serving other connections.
//!
//! ## Its own agent
//!
//! An agent is its own target too (NIXL's loopback, which local KV tiering relies on), so a
//! TCP-only agent needs no other backend for that. No socket is involved: a post copies between
//! the two sides of the agent's own registrations in the posting thread with
//! `rixl_copy::copy_bytes` (glibc's `memmove` has a 4K-aliasing cliff; figures in `rixl-copy`),
//! puts its notification straight into the agent's own queue, and completes before `post`
//! returns, as LOOPBACK's do: a large self-copy holds the posting thread for its whole length
//! (see `own`). `send_notif` to the agent's own name goes into the same queue.
//!
//! ## Semantics worth knowing
//!
//! - A WRITE's notification is delivered after every byte of the post is in the target's
//!   memory. A READ's notification is delivered once the target has *sent* every byte (its
//!   memory is no longer needed, which is what a READ notification tells the target); the
//!   initiator's request completes when the bytes have landed locally. A post completes only
//!   after the target acknowledged its notification, so notifications of posts waited for one
//!   after the other arrive in posting order even when they travel on different connections.
//! - `cancel` stops sending at once and waits until the target has answered every frame already
//!   sent (those are served: a frame on the wire cannot be recalled), so no byte lands after it
//!   returns. A target that does not answer within twice `deadline_ms` gets its connections
//!   closed.
//! - Target-side `deregister` waits for a server moving bytes in or out of that region (bounded
//!   by the frame deadline: `deadline_ms` plus 10 MB/s of payload), then refuses the token.
//! - Identity: the hello carries the initiator's name and instance nonce and the target's
//!   expected name and nonce; a restarted agent at the same address is refused. Notifications
//!   are attributed to the hello's name; an inbound connection can make the target drop an
//!   agent's metadata only if its nonce matches that agent's published connection info (and
//!   only the load current when it said hello: a connection dying of an old partition cannot
//!   undo a reload). There is no encryption or authentication of the data stream (as with
//!   NIXL's UCX over TCP).
//!
//! ## Parameters
//!
//! | Parameter | Default | Values | What it does |
//! |---|---|---|---|
//! | `listen_addr` | `0.0.0.0:0` | an IP:port address | Where the backend accepts connections (the port is published in the metadata). |
//! | `connections` | `2` | an integer in 1..=64 | Connections per peer. |
//! | `stripe_min_bytes` | `262144` | an integer ≥ 0 | Posts larger than this are striped over every connection. |
//! | `chunk_bytes` | `1048576` | an integer in 1..=67108864 | Largest piece of a striped post. |
//! | `pace_min_bytes` | `2097152` | an integer ≥ 0 | A connection's share of a post this large or larger is paced through a small send buffer (0: never). |
//! | `keepalive_secs` | `1` | an integer in 1..=4294967295 | Quiet time before keepalive probes start (then one per second). |
//! | `unreachable_ms` | `1500` | an integer in 1..=2147483647 | Silence of the peer's kernel after which its host counts as gone (`RemoteDisconnect`). |
//! | `deadline_ms` | `5000` | an integer ≥ 1 | Silence of a reachable peer after which requests fail (`Timeout`). |

#![warn(unreachable_pub)]

mod initiator;
mod own;
mod sock;
mod target;
/// The wire format, public only with the `internals` feature (fuzz targets and raw-socket
/// tests build frames with it); not a stable API.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod wire;
#[cfg(not(feature = "internals"))]
#[allow(unreachable_pub)] // `pub` for the `internals` build
mod wire;

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rixl_backend::{
    Backend, BackendContext, BackendFactory, BackendXfer, LocalRegion, Notifications, ParamKind,
    ParamSpec, RemotePeers, XferSpec,
};
use rixl_core::{Capabilities, Desc, Error, ErrorKind, MemType, Params, RegDesc, Result};

use initiator::Peer;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub use wire::ConnInfo;
#[cfg(not(feature = "internals"))]
use wire::ConnInfo;

/// The backend's name.
pub const NAME: &str = "TCP";

/// Registry entry: how the agent creates `TCP`.
pub const FACTORY: BackendFactory = BackendFactory::new(NAME, PARAMS, capabilities, create);

const fn int(min: u64, max: u64) -> ParamKind {
    ParamKind::Int { min, max }
}

/// The parameters, declared once (defaults, validation, `get_plugin_params` and the table in
/// the crate docs all come from here).
const PARAMS: &[ParamSpec] = &[
    ParamSpec::new("listen_addr", ParamKind::SocketAddr, "0.0.0.0:0", "Where the backend accepts connections (the port is published in the metadata)."),
    ParamSpec::new("connections", int(1, 64), "2", "Connections per peer."),
    ParamSpec::new("stripe_min_bytes", int(0, u64::MAX), "262144", "Posts larger than this are striped over every connection."),
    ParamSpec::new("chunk_bytes", int(1, wire::MAX_DATA), "1048576", "Largest piece of a striped post."),
    // The default of `pace_min_bytes` (2 MiB): a connection's share of a post of at least this many bytes
    // is paced (`sock::pace`): a WRITE share goes out through a small send buffer, a READ share
    // asks the target to answer through one. Pacing pays when the data outgrow the caches (see
    // `sock::pace`), and costs when a share would otherwise go into the socket in one call: the
    // writer then sleeps mid-share. Measured on loopback (medians of 3 interleaved rounds):
    // shares of 512 KiB lose (WRITE 1 × 1 MiB: 7.5 → 4.3 GB/s); shares of 2 MiB gain (WRITE 1 ×
    // 4 MiB 7.1 → 10.5, WRITE 16 × 256 KiB 6.5 → 9.7, READ 16 × 256 KiB 4.6 → 6.1), as do larger
    // ones. Across a veth pair the 2 MiB READ rows gain too (2.9 → 4.0 GB/s) and the WRITE rows
    // swing between rounds by 2-3x whether paced or not.
    ParamSpec::new("pace_min_bytes", int(0, u64::MAX), "2097152", "A connection's share of a post this large or larger is paced through a small send buffer (0: never)."),
    ParamSpec::new("keepalive_secs", int(1, u32::MAX as u64), "1", "Quiet time before keepalive probes start (then one per second)."),
    ParamSpec::new("unreachable_ms", int(1, i32::MAX as u64), "1500", "Silence of the peer's kernel after which its host counts as gone (`RemoteDisconnect`)."),
    ParamSpec::new("deadline_ms", int(1, u64::MAX), "5000", "Silence of a reachable peer after which requests fail (`Timeout`)."),
];

/// What TCP does, stated once: DRAM between agents on any hosts, and within its own agent. Its
/// target serves every request itself, so it refuses ranges its agent deregistered and
/// deregistration waits for the servers that use them.
fn capabilities() -> Capabilities {
    Capabilities::new(&[MemType::Dram])
        .moving(MemType::Dram, MemType::Dram)
        .local()
        .remote()
        .estimates_cost()
        .target_fences_deregistration()
}

fn create(ctx: BackendContext) -> Result<Arc<dyn Backend>> {
    // Ranges were checked against `PARAMS` by the agent.
    let p = ctx.params();
    let listen = p.socket_addr("listen_addr");
    let connections = p.int("connections") as usize;
    let keepalive_secs = p.int("keepalive_secs") as u32;
    let unreachable_ms = p.int("unreachable_ms");
    let deadline_ms = p.int("deadline_ms");
    let stripe_min = p.int("stripe_min_bytes");
    let chunk = p.int("chunk_bytes");
    let pace_min = p.int("pace_min_bytes");
    let listener = TcpListener::bind(listen).map_err(|e| {
        Error::from_io(
            ErrorKind::Backend,
            format!("TCP cannot listen on {listen}"),
            &e,
        )
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP listener address", &e))?;
    let me = ConnInfo {
        nonce: random_nonce(),
        port: bound.port(),
        addrs: sock::publish_addrs(bound.ip()),
    };
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        nonce: me.nonce,
        peers: Mutex::new(HashMap::new()),
        inbound: target::Inbound::default(),
        readers: Mutex::new(Vec::new()),
        regions: target::Regions::default(),
        stopping: AtomicBool::new(false),
        keepalive_secs,
        unreachable: Duration::from_millis(unreachable_ms),
        deadline: Duration::from_millis(deadline_ms),
        connections,
        stripe_min,
        chunk,
        pace_min,
        spinners: AtomicUsize::new(0),
        // At most half the cores: the rest run the threads that produce the requests.
        max_spinners: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
    });
    let listener_fd = listener.as_raw_fd();
    let s2 = shared.clone();
    let accept_thread = std::thread::Builder::new()
        .name("rixl-tcp-accept".into())
        .spawn(move || target::accept_loop(&s2, listener))
        .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP cannot start its thread", &e))?;
    let mut params = ctx.params().values().clone();
    for (k, v) in [
        ("listen_addr", bound.to_string()),
        ("connections", connections.to_string()),
        ("keepalive_secs", keepalive_secs.to_string()),
        ("unreachable_ms", unreachable_ms.to_string()),
        ("deadline_ms", deadline_ms.to_string()),
        ("stripe_min_bytes", stripe_min.to_string()),
        ("chunk_bytes", chunk.to_string()),
        ("pace_min_bytes", pace_min.to_string()),
    ] {
        params.insert(k.into(), v);
    }
    Ok(Arc::new(Tcp {
        me,
        shared,
        listener_fd,
        accept_thread: Mutex::new(Some(accept_thread)),
        next_token: AtomicU64::new(1),
        params,
    }))
}

/// A per-instance random number (no RNG dependency: time, pid and a stack address mixed).
fn random_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish().max(1)
}

/// Joins `threads`, except the calling one (teardown can run on a backend thread when it drops
/// the last reference to its agent).
fn join_others(threads: Vec<std::thread::JoinHandle<()>>) {
    let me = std::thread::current().id();
    for t in threads {
        if t.thread().id() != me {
            let _ = t.join();
        }
    }
}

/// State shared with the backend's threads.
#[derive(Debug)]
pub struct Shared {
    ctx: BackendContext,
    nonce: u64,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    inbound: target::Inbound,
    /// Reader threads of outbound connections: joined at teardown, so that no READ data lands
    /// in this agent's memory after its backend shut down.
    readers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    regions: target::Regions,
    stopping: AtomicBool,
    keepalive_secs: u32,
    /// How long a peer's kernel may acknowledge nothing (see [`sock::configure`]).
    unreachable: Duration,
    deadline: Duration,
    connections: usize,
    stripe_min: u64,
    chunk: u64,
    /// Shares of at least this many bytes are paced (0: never; see `sock::pace`).
    pace_min: u64,
    /// Server threads spinning for their next request right now, and how many may.
    spinners: AtomicUsize,
    max_spinners: usize,
}

impl Shared {
    fn peer(&self, name: &str) -> Result<Arc<Peer>> {
        self.peers.lock().get(name).cloned().ok_or_else(|| {
            Error::not_found(format!("no TCP connection info for agent {name:?}"))
                .with_backend(NAME)
        })
    }

    /// Reports `peer` lost once (unless we are closing it on purpose).
    fn lost(&self, peer: &Peer, err: &Error) {
        if peer.closing.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if peer.alive.swap(false, Ordering::SeqCst) {
            self.ctx.report_peer_lost(&peer.name, err);
        }
    }

    /// How long the peer's kernel may stay silent, with a keepalive probe of ours out, before
    /// its host counts as gone: `unreachable_ms`, but never less than the quiet that starts the
    /// probes plus some time to answer one (a probe is not unanswered the moment it leaves).
    fn silence_limit(&self) -> Duration {
        let grace = (self.unreachable / 3).min(Duration::from_millis(500));
        self.unreachable
            .max(Duration::from_secs(self.keepalive_secs.into()) + grace)
    }

    fn lost_if(&self, peer: &Peer, err: &Error) {
        if err.kind() == ErrorKind::RemoteDisconnect {
            self.lost(peer, err);
        }
    }
}

/// The `TCP` backend.
pub struct Tcp {
    me: ConnInfo,
    shared: Arc<Shared>,
    listener_fd: i32,
    accept_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    next_token: AtomicU64,
    params: Params,
}

impl std::fmt::Debug for Tcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tcp")
            .field("port", &self.me.port)
            .field("peers", &self.shared.peers.lock().len())
            .finish_non_exhaustive()
    }
}

impl Tcp {
    /// Stops serving: closes the listener, every inbound and outbound connection. Idempotent.
    fn teardown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: shutting down our own listening socket wakes the thread blocked in accept();
        // the fd stays open (owned by that thread) until it returns, so it cannot be reused.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.lock().take() {
            let _ = t.join();
        }
        self.shared.inbound.close_all();
        let peers: Vec<Arc<Peer>> = self.shared.peers.lock().drain().map(|(_, p)| p).collect();
        for p in peers {
            p.close();
        }
        // Closed sockets end every reader's read at once.
        let readers: Vec<_> = self.shared.readers.lock().drain(..).collect();
        join_others(readers);
    }

    /// The connection info this backend publishes (decoded).
    pub fn conn_info_decoded(&self) -> &ConnInfo {
        &self.me
    }
}

impl Drop for Tcp {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Backend for Tcp {
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
                "TCP cannot register {mem} memory"
            )));
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.shared
            .regions
            .insert(token, desc.desc.addr, desc.desc.len);
        // Peers name the region by this token in every request; the target checks it.
        Ok(LocalRegion {
            token,
            public: token.to_le_bytes().to_vec(),
        })
    }

    fn deregister(&self, _mem: MemType, token: u64) -> Result<()> {
        // Waits until no server is moving bytes in or out of the region.
        if self.shared.regions.remove(token) {
            Ok(())
        } else {
            Err(Error::not_found(format!("TCP has no region {token}")))
        }
    }

    fn shutdown(&self) {
        self.teardown();
    }

    unsafe fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>> {
        if spec.local_mem != MemType::Dram || spec.remote_mem != MemType::Dram {
            return Err(Error::not_supported("TCP moves DRAM only"));
        }
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(Error::not_found("the TCP backend was shut down"));
        }
        if spec.loopback {
            // SAFETY: both sides of a self-target `spec` lie in this backend's own
            // registrations, kept registered while a post runs: this call's own contract.
            let xfer =
                unsafe { own::OwnXfer::new(spec.op, spec.local, spec.remote, self.shared.clone()) };
            return Ok(Box::new(xfer));
        }
        let peer = self.shared.peer(spec.peer)?;
        let mut pairs = Vec::with_capacity(spec.local.len());
        {
            let regions = peer.regions.lock();
            let mut last: Option<(u64, u64)> = None;
            for (l, r) in spec.local.iter().zip(spec.remote.iter()) {
                let remote_token = match last {
                    Some((ours, theirs)) if ours == r.token => theirs,
                    _ => {
                        let t = *regions.get(&r.token).ok_or_else(|| {
                            Error::not_found(format!(
                                "TCP has no region {} of agent {:?}",
                                r.token, spec.peer
                            ))
                        })?;
                        last = Some((r.token, t));
                        t
                    }
                };
                pairs.push((l.addr, remote_token, r.addr, l.len));
            }
        }
        let total = spec.local.iter().map(|s| s.len).sum();
        Ok(Box::new(initiator::TcpXfer::new(
            self.shared.clone(),
            peer,
            spec.op,
            pairs.into_iter(),
            total,
        )))
    }

    fn remote(&self) -> Option<&dyn RemotePeers> {
        Some(self)
    }

    fn notifications(&self) -> Option<&dyn Notifications> {
        Some(self)
    }
}

impl RemotePeers for Tcp {
    fn conn_info(&self) -> Vec<u8> {
        self.me.encode()
    }

    fn load_remote_conn_info(&self, peer: &str, info: &[u8]) -> Result<()> {
        let info = ConnInfo::decode(info)?;
        let mut peers = self.shared.peers.lock();
        if peers
            .get(peer)
            .is_some_and(|p| p.info == info && !p.closing.load(Ordering::SeqCst))
        {
            return Ok(()); // the same instance again: keep its connections and regions
        }
        let old = peers.insert(peer.to_owned(), Arc::new(Peer::new(peer, info)));
        drop(peers);
        if let Some(old) = old {
            old.close();
        }
        Ok(())
    }

    fn load_remote_region(
        &self,
        peer: &str,
        mem: MemType,
        _desc: &Desc,
        public: &[u8],
    ) -> Result<u64> {
        if mem != MemType::Dram {
            return Err(Error::not_supported(format!(
                "TCP cannot reach {mem} memory"
            )));
        }
        let remote: [u8; 8] = public.try_into().map_err(|_| {
            Error::mismatch(format!(
                "TCP region data of agent {peer:?} has {} bytes, expected 8",
                public.len()
            ))
        })?;
        let p = self.shared.peer(peer)?;
        // Distinct tokens per region on our side too: the agent merges only within one token.
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        p.regions.lock().insert(token, u64::from_le_bytes(remote));
        Ok(token)
    }

    fn unload_remote_region(&self, peer: &str, _mem: MemType, token: u64) {
        if let Ok(p) = self.shared.peer(peer) {
            p.regions.lock().remove(&token);
        }
    }

    fn connect(&self, peer: &str) -> Result<()> {
        let p = self.shared.peer(peer)?;
        initiator::connect(&self.shared, &p)
    }

    fn disconnect(&self, peer: &str) {
        let p = self.shared.peers.lock().remove(peer);
        if let Some(p) = p {
            p.close();
        }
    }
}

impl Notifications for Tcp {
    fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(Error::not_found("the TCP backend was shut down"));
        }
        if peer == self.shared.ctx.agent_name() {
            // To the agent itself: straight into its own queue.
            self.shared.ctx.notifs().deliver(peer, msg);
            return Ok(());
        }
        let p = self.shared.peer(peer)?;
        initiator::send_notif(&self.shared, &p, msg)
    }
    /// Serves the inbound connections on the calling thread (see [`target::Inbound::serve_ready`]):
    /// a thread waiting for a notification receives it without waiting for a server thread to
    /// be woken and scheduled.
    fn poll_notifs(&self) {
        if !self.shared.stopping.load(Ordering::Relaxed) {
            self.shared.inbound.serve_ready(&self.shared);
        }
    }

    fn attend_notifs(&self, on: bool) {
        self.shared.inbound.attend(on);
    }
}

// The parameter table in the crate docs is the one the code declares.
rixl_backend::params_doc_test!(PARAMS);
