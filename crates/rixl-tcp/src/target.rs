//! The target side: the listener, one server thread per inbound connection, the threads
//! waiting for notifications that serve connections too, and the table of this agent's
//! registrations that every incoming range is checked against.
//!
//! A peer is never trusted. Each WRITE or READ names a region token, an address and a length;
//! the server looks the token up in *its own* table, checks that the range lies inside that
//! live region, and only then receives into (WRITE) or sends from (READ) that memory, straight
//! between the socket and the registered bytes. A range outside any live registration is
//! refused with an `Err` frame and nothing is written (a refused WRITE's payload is read into a
//! scratch buffer and dropped, so the stream stays framed and the connection keeps serving).
//! A frame that does not parse ends the connection.
//!
//! Deregistration is fenced: a region being served counts as in use, and `deregister` marks it
//! dead and waits until no server is inside it, so no byte lands after `deregister` returns.
//!
//! ## Who serves a connection, and why
//!
//! A thread blocked in the kernel takes ~5 us to wake on the small VMs this is built on (much
//! more when its core was idle): for a 4 KiB WRITE that is a third of the round trip, and a
//! notification handed from a server thread to a waiting application thread pays it twice.
//! So:
//!
//! - after serving, a server thread keeps looking for the next request for `SERVER_SPIN`
//!   (yielding between looks, at most `max_spinners` servers at once) before it sleeps in
//!   `epoll_wait`: back-to-back requests then find it awake. Idle connections cost nothing.
//! - a thread in `Agent::wait_notif` (or `get_notifs`) serves the inbound connections itself
//!   ([`Inbound::serve_ready`], through `Backend::poll_notifs`), and while any does, arriving
//!   requests do not wake the server threads ([`Inbound::attend`]), nor do servers spin. The
//!   notification is delivered on the thread that wants it.
//!
//! The request stream's state (`Serving`) sits under a mutex held by whoever serves, so a
//! header begun by one is finished by the other. A waiting thread never blocks on the socket,
//! whatever the peer does: it serves only requests whose payload has fully arrived and that
//! move at most `WAITER_MAX_FRAME` bytes into memory (no READs, whose answers could block on
//! a peer that does not read), writes answers only as far as the socket takes them at once,
//! and leaves the rest (a pending request, unsent answers) to the server thread, which it
//! wakes through an eventfd.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use rixl_core::Error;

use crate::sock;
use crate::wire::{self, ErrCode, Header, Hello, Kind, HEADER_LEN};
use crate::Shared;

/// Most inbound connections served at once (each has a thread).
const MAX_INBOUND: usize = 1024;
/// Most notifications of one session waiting for their parts.
const MAX_PENDING_POSTS: usize = 4096;
/// Most bytes of notifications one session may keep waiting for their parts.
const MAX_PENDING_BYTES: usize = 16 << 20;

/// One local registration, as the servers see it.
#[derive(Debug)]
pub(crate) struct Region {
    addr: u64,
    len: u64,
    /// `(live, servers inside)`.
    state: Mutex<(bool, usize)>,
    idle: Condvar,
}

/// The registrations the servers check requests against.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    map: RwLock<HashMap<u64, Arc<Region>>>,
}

/// A region held by a server while it moves bytes in or out of it.
struct InUse(Arc<Region>);

impl Drop for InUse {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.1 -= 1;
        if st.1 == 0 && !st.0 {
            self.0.idle.notify_all();
        }
    }
}

impl Regions {
    /// Adds a region.
    pub(crate) fn insert(&self, token: u64, addr: u64, len: u64) {
        let r = Arc::new(Region {
            addr,
            len,
            state: Mutex::new((true, 0)),
            idle: Condvar::new(),
        });
        self.map.write().insert(token, r);
    }

    /// Removes a region and waits until no server is inside it.
    pub(crate) fn remove(&self, token: u64) -> bool {
        let Some(r) = self.map.write().remove(&token) else {
            return false;
        };
        let mut st = r.state.lock();
        st.0 = false;
        while st.1 > 0 {
            r.idle.wait(&mut st);
        }
        true
    }

    /// The live region `token` if `[addr, addr + len)` lies inside it.
    fn acquire(&self, token: u64, addr: u64, len: u64) -> Result<InUse, String> {
        let r = self
            .map
            .read()
            .get(&token)
            .cloned()
            .ok_or_else(|| format!("region token {token} is not registered here"))?;
        let end = addr.checked_add(len).ok_or("range overflows")?;
        if addr < r.addr || end > r.addr + r.len {
            return Err(format!(
                "range {addr:#x}+{len} is outside registration {:#x}+{}",
                r.addr, r.len
            ));
        }
        let mut st = r.state.lock();
        if !st.0 {
            return Err(format!("region token {token} was deregistered"));
        }
        st.1 += 1;
        drop(st);
        Ok(InUse(r))
    }
}

/// One initiator incarnation (agent name + its backend's nonce), shared by its connections:
/// notifications of striped posts wait here until every part has been served.
#[derive(Debug)]
pub(crate) struct Session {
    name: String,
    nonce: u64,
    posts: Mutex<HashMap<u64, PendingPost>>,
}

#[derive(Debug, Default)]
struct PendingPost {
    served: u64,
    notif: Option<(u64, Vec<u8>)>,
}

impl Session {
    fn part_served(&self, shared: &Shared, post: u64) {
        let mut posts = self.posts.lock();
        let p = posts.entry(post).or_default();
        p.served += 1;
        if p.notif.as_ref().is_some_and(|(want, _)| p.served >= *want) {
            if let Some(p) = posts.remove(&post) {
                let (_, msg) = p.notif.unwrap_or_default();
                shared.ctx.notifs().deliver(&self.name, &msg);
            }
        }
        Self::bound(&mut posts);
    }

    fn notif(&self, shared: &Shared, post: u64, want: u64, msg: Vec<u8>) {
        let mut posts = self.posts.lock();
        let served = posts.get(&post).map_or(0, |p| p.served);
        if served >= want {
            posts.remove(&post);
            shared.ctx.notifs().deliver(&self.name, &msg);
        } else {
            posts.entry(post).or_default().notif = Some((want, msg));
        }
        Self::bound(&mut posts);
    }

    /// Posts that were cancelled part-way leave entries behind; keep the newest ones only.
    fn bound(posts: &mut HashMap<u64, PendingPost>) {
        let bytes = |posts: &HashMap<u64, PendingPost>| -> usize {
            posts
                .values()
                .filter_map(|p| p.notif.as_ref().map(|(_, m)| m.len()))
                .sum()
        };
        while posts.len() > MAX_PENDING_POSTS
            || (posts.len() > 1 && bytes(posts) > MAX_PENDING_BYTES)
        {
            let Some(&oldest) = posts.keys().min() else {
                break;
            };
            tracing::warn!("TCP: dropping the notification state of abandoned post {oldest}");
            posts.remove(&oldest);
        }
    }
}

/// The inbound side of the backend.
#[derive(Debug, Default)]
pub(crate) struct Inbound {
    /// Every accepted socket (clones), so that teardown can close them even mid-handshake.
    streams: Mutex<Vec<TcpStream>>,
    live: Mutex<Live>,
    /// `live.attending`, readable without the lock by spinning servers.
    attending: AtomicUsize,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    sessions: Mutex<HashMap<(u64, String), Weak<Session>>>,
}

impl Inbound {
    /// Closes every inbound connection and waits for their servers to stop.
    pub(crate) fn close_all(&self) {
        for s in self.streams.lock().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        crate::join_others(threads);
    }

    /// Forgets a connection whose server is ending (before its descriptor is closed).
    fn forget(&self, stream: &TcpStream) {
        use std::os::fd::AsRawFd;
        // Our clone has another descriptor number; compare the sockets' identities instead.
        let me = socket_id(stream.as_raw_fd());
        let mut streams = self.streams.lock();
        streams.retain(|s| me.is_none() || socket_id(s.as_raw_fd()) != me);
    }

    fn session(&self, name: &str, nonce: u64) -> Arc<Session> {
        let mut m = self.sessions.lock();
        m.retain(|_, w| w.strong_count() > 0);
        let key = (nonce, name.to_owned());
        if let Some(s) = m.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(Session {
            name: name.to_owned(),
            nonce,
            posts: Mutex::new(HashMap::new()),
        });
        m.insert(key, Arc::downgrade(&s));
        s
    }
}

/// The inode of a socket: equal for descriptors of the same socket.
fn socket_id(fd: i32) -> Option<u64> {
    // SAFETY: `st` is plain data that fstat fills; `fd` is an open descriptor of ours.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fstat writes only into `st`.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

/// Accepts connections until the backend stops.
pub(crate) fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning on accept.
                tracing::warn!("TCP: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if let Err(e) = sock::configure(
            &conn,
            shared.keepalive_secs,
            shared.unreachable,
            shared.deadline,
        ) {
            tracing::warn!("TCP: cannot configure an inbound connection: {e}");
            continue;
        }
        let mut streams = shared.inbound.streams.lock();
        streams.retain(sock::alive);
        if streams.len() >= MAX_INBOUND {
            tracing::warn!("TCP: refusing a connection: {MAX_INBOUND} already open");
            continue;
        }
        if let Ok(c) = conn.try_clone() {
            streams.push(c);
        }
        drop(streams);
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("rixl-tcp-serve".into())
            .spawn(move || serve(&s, conn));
        match spawned {
            Ok(t) => {
                let mut threads = shared.inbound.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
            Err(e) => tracing::warn!("TCP: cannot start a server thread: {e}"),
        }
    }
}

/// How long a frame of `len` bytes may take to arrive once it has started.
fn frame_deadline(shared: &Shared, len: u64) -> Instant {
    // The configured deadline plus 10 MB/s: generous for real links, finite for a trickler.
    Instant::now() + shared.deadline + Duration::from_micros(len / 10)
}

/// Queues an `Err` answer to request `id`.
fn queue_err(st: &mut Serving, id: u64, code: ErrCode, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(wire::MAX_ERR as usize)];
    let mut h = Header::new(Kind::Err);
    h.id = id;
    h.size = code as u64;
    h.len = msg.len() as u32;
    st.out.extend_from_slice(&h.encode());
    st.out.extend_from_slice(msg);
}

/// Writes the queued answers: on the server thread all of them (bounded by the deadline), on
/// a waiting thread whatever the socket takes without blocking (the rest is the server's).
fn flush(shared: &Shared, c: &InConn, st: &mut Serving, waiter: bool) -> Result<(), End> {
    if st.out.is_empty() {
        return Ok(());
    }
    if waiter {
        let n = sock::send_now(&c.stream, &st.out).map_err(|e| End::io("answering", e))?;
        st.out.drain(..n);
        return Ok(());
    }
    let mut iov = [libc::iovec {
        iov_base: st.out.as_ptr() as *mut libc::c_void,
        iov_len: st.out.len(),
    }];
    // SAFETY: the iovec covers `st.out`, borrowed for the call; writev only reads it.
    unsafe { sock::writev_until(&c.stream, &mut iov, Some(Instant::now() + shared.deadline)) }
        .map_err(|e| End::io("answering", e))?;
    st.out.clear();
    Ok(())
}

/// The server thread receives a payload at least this large by polling the socket while the
/// data keep coming (`sock::readv_flowing`) rather than sleeping in `readv`: the data arrive
/// in pieces (64 KiB segments on loopback), and a sleeping reader pays a wake-up per piece, a
/// quarter of the time the piece takes to copy on the small VMs this is built on. When the
/// flow stops, it sleeps; the frame deadline bounds the whole frame.
const POLLED_PAYLOAD: usize = 128 << 10;
/// After serving, a server keeps looking for the next request this long before it sleeps: a
/// sleeping thread costs a scheduler wake-up (~5 us on small VMs) per request, which is much
/// of a small transfer's round trip, and back-to-back requests (an initiator's next post, the
/// next leg of a ping-pong) usually arrive within this window. An idle connection costs
/// nothing: the spin only follows activity, and is skipped while a thread waiting for
/// notifications serves the connections itself.
const SERVER_SPIN: Duration = Duration::from_micros(50);
/// Threads waiting for notifications serve the inbound connections themselves, and keep the
/// servers asleep meanwhile, only up to this many connections (each costs a system call per
/// look, and one per change of who is woken).
const MAX_ATTENDED: usize = 16;
/// A waiting thread serves at most this many requests per look (a peer that keeps sending
/// must not keep it from its own notification and timeout).
const WAITER_MAX_FRAMES: usize = 32;
/// Requests moving more than this many bytes are left by waiting threads to the server
/// thread: a thread waiting for a notification should not spend milliseconds copying someone
/// else's data.
const WAITER_MAX_FRAME: u64 = 64 << 10;

/// One inbound connection past its hello: what its server thread and the threads waiting
/// for notifications (see [`Inbound::serve_ready`]) share.
pub(crate) struct InConn {
    stream: TcpStream,
    /// What the server thread sleeps on: the socket, and `handoff`.
    poller: sock::Poller,
    /// Signalled by a waiting thread that leaves a large request to the server thread.
    handoff: sock::EventFd,
    session: Arc<Session>,
    /// Held by whoever serves the connection.
    state: Mutex<Serving>,
}

impl std::fmt::Debug for InConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InConn")
            .field("from", &self.session.name)
            .finish_non_exhaustive()
    }
}

/// The request stream between reads: a header in the making, or a request handed over by a
/// waiting thread (`pending`), and the answers not written yet. A request is served to the
/// end by one thread (its payload is on the way: bounded by the frame deadline on the server
/// thread, already arrived for a waiting thread).
struct Serving {
    hb: [u8; HEADER_LEN],
    /// Header bytes received so far.
    have: usize,
    /// When the first bytes of an incomplete header arrived: the rest must follow within the
    /// deadline.
    since: Option<Instant>,
    /// The last request served whose acknowledgement has not been sent: acks are cumulative
    /// and sent when the receive queue runs dry, so a burst of small writes costs one ack.
    unacked: Option<u64>,
    scratch: Vec<u8>,
    /// A request whose header a waiting thread read but which it cannot serve without
    /// blocking or without moving much data (see [`serve_ready`]): the server thread serves
    /// it next.
    pending: Option<Header>,
    /// Answers not written yet (a waiting thread leaves what the socket did not take at once;
    /// the server thread writes it before anything else).
    out: Vec<u8>,
    /// `handoff` has been signalled and not cleared yet.
    signalled: bool,
    /// Set once the connection is over (by whoever found out).
    end: Option<End>,
    /// Whether the socket's send buffer is the paced one ([`wire::F_PACED`]).
    paced: bool,
}

impl Serving {
    /// Has the server thread take over what a waiting thread left (`pending`, `out`).
    fn hand_off(&mut self, c: &InConn) {
        if !std::mem::replace(&mut self.signalled, true) {
            c.handoff.signal();
        }
    }
}

/// How a connection ended.
#[derive(Clone, Debug)]
enum End {
    /// The initiator said goodbye.
    Clean,
    /// End of stream without a goodbye, a broken frame, an I/O error, or the backend stopping.
    Broken(String),
}

impl End {
    fn io(what: &str, e: impl std::fmt::Display) -> End {
        End::Broken(format!("{what}: {e}"))
    }
}

/// The connections being served right now, and the threads attending them.
#[derive(Debug, Default)]
struct Live {
    /// Copied on change, so that a waiting thread can walk it without holding the lock.
    conns: Arc<Vec<Arc<InConn>>>,
    /// Threads waiting for notifications (serving the connections themselves).
    attending: usize,
    /// Requests do not wake the server threads (set while anyone attends, unless there are
    /// too many connections).
    quiet: bool,
}

impl Inbound {
    fn add(&self, c: Arc<InConn>) {
        let mut l = self.live.lock();
        let mut v = Vec::clone(&l.conns);
        v.push(c.clone());
        if l.quiet && v.len() <= MAX_ATTENDED {
            let _ = c.poller.watch_data(false);
        }
        l.conns = Arc::new(v);
    }

    fn remove(&self, c: &Arc<InConn>) {
        let mut l = self.live.lock();
        let v: Vec<_> = l
            .conns
            .iter()
            .filter(|x| !Arc::ptr_eq(x, c))
            .cloned()
            .collect();
        l.conns = Arc::new(v);
    }

    /// A thread starts (`true`) or stops (`false`) waiting for notifications, serving the
    /// inbound connections itself ([`Inbound::serve_ready`]) while it spins. While anyone does,
    /// requests do not wake the server threads (only hang-ups do) and servers do not spin; the
    /// last one to stop lets requests wake them again, which wakes them at once for anything
    /// that arrived meanwhile.
    pub(crate) fn attend(&self, on: bool) {
        let mut l = self.live.lock();
        l.attending = if on {
            l.attending + 1
        } else {
            l.attending.saturating_sub(1)
        };
        self.attending.store(l.attending, Ordering::Release);
        let quiet = l.attending > 0 && (l.quiet || l.conns.len() <= MAX_ATTENDED);
        if quiet != l.quiet {
            l.quiet = quiet;
            for c in l.conns.iter() {
                if let Err(e) = c.poller.watch_data(!quiet) {
                    tracing::debug!("TCP: cannot change what wakes a server: {e}");
                }
            }
        }
    }

    /// Serves, on the calling thread and without blocking, whatever requests have fully
    /// arrived on connections no other thread is serving right now (see the module docs for
    /// what is left to the server threads). This delivers notifications without waiting for a
    /// server thread to be scheduled.
    pub(crate) fn serve_ready(&self, shared: &Shared) {
        let conns = self.live.lock().conns.clone();
        if conns.len() > MAX_ATTENDED {
            return;
        }
        for c in conns.iter() {
            if let Some(mut st) = c.state.try_lock() {
                if st.end.is_none() && st.pending.is_none() && st.out.is_empty() {
                    if let Err(e) = serve_ready(shared, c, &mut st, true) {
                        st.end = Some(e);
                        // Wakes the server thread, which finishes the connection.
                        let _ = c.stream.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        }
    }
}

/// Looks for the next request for up to [`SERVER_SPIN`], yielding between looks; true when
/// something arrived (or the connection ended). Skipped while notification waiters serve the
/// connections, and when `max_spinners` servers of this backend spin already (on a small
/// machine, spinners compete with the threads that produce the requests).
fn spin_for_input(shared: &Shared, c: &InConn) -> bool {
    if shared.inbound.attending.load(Ordering::Acquire) > 0 {
        return false;
    }
    if shared.spinners.fetch_add(1, Ordering::AcqRel) >= shared.max_spinners {
        shared.spinners.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    let start = Instant::now();
    let found = loop {
        if start.elapsed() >= SERVER_SPIN
            || shared.stopping.load(Ordering::Relaxed)
            || shared.inbound.attending.load(Ordering::Acquire) > 0
        {
            break false;
        }
        // Yield rather than spin: on a small machine the thread that sends the next request
        // (or a thread of another process) may need this core.
        std::thread::yield_now();
        if sock::readable_now(&c.stream) {
            break true;
        }
    };
    shared.spinners.fetch_sub(1, Ordering::AcqRel);
    found
}

/// Serves one inbound connection: a hello, then requests until goodbye or end of stream.
fn serve(shared: &Arc<Shared>, stream: TcpStream) {
    let mut hb = [0u8; HEADER_LEN];
    let (hello, known) = match handshake(shared, &stream, &mut hb) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("TCP: dropped an inbound connection: {e}");
            let _ = stream.shutdown(std::net::Shutdown::Both);
            shared.inbound.forget(&stream);
            return;
        }
    };
    let watch = sock::Poller::new(&stream).and_then(|p| {
        let e = sock::EventFd::new()?;
        p.add_wake(&e)?;
        Ok((p, e))
    });
    let (poller, handoff) = match watch {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("TCP: cannot watch an inbound connection: {e}");
            let _ = stream.shutdown(std::net::Shutdown::Both);
            shared.inbound.forget(&stream);
            return;
        }
    };
    let session = shared.inbound.session(&hello.from, hello.from_nonce);
    let c = Arc::new(InConn {
        stream,
        poller,
        handoff,
        session: session.clone(),
        state: Mutex::new(Serving {
            hb: [0; HEADER_LEN],
            have: 0,
            since: None,
            unacked: None,
            scratch: Vec::new(),
            pending: None,
            out: Vec::new(),
            signalled: false,
            end: None,
            paced: false,
        }),
    });
    shared.inbound.add(c.clone());
    let end = run(shared, &c);
    let _ = c.stream.shutdown(std::net::Shutdown::Both);
    shared.inbound.remove(&c);
    shared.inbound.forget(&c.stream);
    if let End::Broken(e) = &end {
        tracing::debug!("TCP: connection from {:?} ended: {e}", hello.from);
    }
    if !matches!(end, End::Clean) && !shared.stopping.load(Ordering::SeqCst) {
        // Only a connection whose hello matches the initiator's published instance may make us
        // drop that agent: a self-declared name alone is not enough. And only the metadata
        // loaded when it said hello: a connection that dies of a partition after the
        // application loaded the agent again (the network healed) must not drop the new load.
        let peer = shared.peers.lock().get(&hello.from).cloned();
        let current = |p: &Arc<crate::Peer>| match &known {
            Some(k) => std::ptr::eq(k.as_ptr(), Arc::as_ptr(p)),
            None => p.info.nonce == session.nonce,
        };
        if let Some(p) = peer.filter(current) {
            let err = Error::remote_disconnect(format!(
                "agent {:?} closed its TCP connection without a goodbye",
                hello.from
            ));
            shared.lost(&p, &err);
        }
    }
}

fn handshake(
    shared: &Shared,
    stream: &TcpStream,
    hb: &mut [u8; HEADER_LEN],
) -> Result<(Hello, Option<Weak<crate::Peer>>), String> {
    let deadline = Some(Instant::now() + shared.deadline);
    sock::read_exact(stream, hb, deadline).map_err(|e| format!("no hello: {e}"))?;
    let h = Header::parse(hb).map_err(|e| e.to_string())?;
    if h.kind != Kind::Hello {
        return Err(format!("first frame is {:?}, not a hello", h.kind));
    }
    let mut body = vec![0u8; h.len as usize];
    sock::read_exact(stream, &mut body, deadline).map_err(|e| format!("truncated hello: {e}"))?;
    let hello = Hello::decode(&body).map_err(|e| e.to_string())?;
    let refuse = if hello.version != wire::VERSION {
        Some(format!(
            "protocol version {} not supported (this agent speaks {})",
            hello.version,
            wire::VERSION
        ))
    } else if hello.to != shared.ctx.agent_name() || hello.to_nonce != shared.nonce {
        Some(format!(
            "this is agent {:?} (instance {:x}), not {:?} (instance {:x})",
            shared.ctx.agent_name(),
            shared.nonce,
            hello.to,
            hello.to_nonce
        ))
    } else {
        None
    };
    let mut ack = Header::new(Kind::HelloAck);
    if let Some(msg) = &refuse {
        ack.size = ErrCode::Mismatch as u64;
        ack.len = msg.len().min(wire::MAX_ERR as usize) as u32;
        let mut out = ack.encode().to_vec();
        out.extend_from_slice(&msg.as_bytes()[..ack.len as usize]);
        let _ = sock::write_all(stream, &out);
        return Err(msg.clone());
    }
    // The initiator's metadata as loaded now, if it is the instance saying hello: the only
    // metadata this connection's end may drop (see `serve`). Taken before the answer, so that
    // whatever the initiator does after hearing it happens after this.
    let known = shared
        .peers
        .lock()
        .get(&hello.from)
        .filter(|p| p.info.nonce == hello.from_nonce)
        .map(Arc::downgrade);
    sock::write_all(stream, &ack.encode()).map_err(|e| e.to_string())?;
    Ok((hello, known))
}

/// The server thread's loop: sleep until a request arrives (unless a notification waiter is
/// serving the connection), serve what is there, look for more for a moment, repeat.
fn run(shared: &Shared, c: &InConn) -> End {
    // Requests may have followed the hello at once.
    let mut ready = true;
    let mut timeout = shared.deadline;
    loop {
        if !ready {
            if let Err(e) = c.poller.wait(timeout) {
                return End::io("cannot wait for the socket", e);
            }
        }
        let mut st = c.state.lock();
        if let Some(e) = &st.end {
            return e.clone();
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return End::Broken("the backend is stopping".into());
        }
        let r = serve_ready(shared, c, &mut st, false).and_then(|_| match st.since {
            None => Ok(shared.deadline),
            Some(t) => shared
                .deadline
                .checked_sub(t.elapsed())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| End::Broken("a frame header was not completed in time".into())),
        });
        match r {
            Ok(t) => timeout = t,
            Err(e) => {
                st.end = Some(e.clone());
                return e;
            }
        }
        drop(st);
        ready = spin_for_input(shared, c);
    }
}

/// Serves every request that can be read now and acknowledges them when the queue runs dry.
/// Returns how many were served; an error ends the connection.
///
/// A waiting thread (`waiter`) never blocks on the socket, whatever the peer does: it serves a
/// request only if the request's whole payload has arrived and moves at most
/// [`WAITER_MAX_FRAME`] bytes into memory (READs, whose answers could block on a peer that
/// does not read, are always left to the server thread), writes answers only as far as the
/// socket takes them at once, and hands anything else to the server thread (`pending`, `out`,
/// then a signal on `handoff`).
fn serve_ready(shared: &Shared, c: &InConn, st: &mut Serving, waiter: bool) -> Result<usize, End> {
    let mut served = 0;
    if !waiter {
        if std::mem::take(&mut st.signalled) {
            c.handoff.clear();
        }
        flush(shared, c, st, false)?;
        if let Some(h) = st.pending.take() {
            if !serve_frame(shared, c, st, h, false)? {
                return Err(End::Clean);
            }
            served += 1;
        }
    }
    // Payload bytes known to be queued on the socket (waiters only; asked once, lazily).
    let mut queued: Option<usize> = None;
    loop {
        let have = st.have;
        // A whole header may be here already (read with the previous payload).
        let got = if have == HEADER_LEN {
            Some(0)
        } else {
            match sock::recv_now(&c.stream, &mut st.hb[have..])
                .map_err(|e| End::io("receiving", e))?
            {
                Some(0) => return Err(End::Broken("end of stream without a goodbye".into())),
                got => got,
            }
        };
        match got {
            Some(n) => st.have += n,
            None => {
                if let Some(id) = st.unacked.take() {
                    let mut h = Header::new(Kind::Ack);
                    h.id = id;
                    st.out.extend_from_slice(&h.encode());
                }
                flush(shared, c, st, waiter)?;
                if !st.out.is_empty() {
                    st.hand_off(c);
                }
                return Ok(served);
            }
        }
        if st.have < HEADER_LEN {
            st.since.get_or_insert_with(Instant::now);
            continue;
        }
        st.have = 0;
        st.since = None;
        let h = Header::parse(&st.hb).map_err(|e| End::Broken(e.to_string()))?;
        if waiter {
            let payload = match h.kind {
                Kind::Write | Kind::Notif => Some(h.len as usize),
                Kind::Bye => Some(0),
                _ => None,
            };
            let ready = payload
                .filter(|&n| n as u64 <= WAITER_MAX_FRAME)
                .is_some_and(|n| {
                    if n == 0 {
                        return true;
                    }
                    let q = *queued.get_or_insert_with(|| sock::queued_input(&c.stream));
                    if q < n {
                        return false;
                    }
                    queued = Some(q - n);
                    true
                });
            if !ready {
                st.pending = Some(h);
                st.hand_off(c);
                return Ok(served);
            }
        }
        if !serve_frame(shared, c, st, h, waiter)? {
            return Err(End::Clean);
        }
        served += 1;
        if waiter && (h.kind == Kind::Notif || served >= WAITER_MAX_FRAMES) {
            // Back to the caller, which may be waiting for just this notification, or has a
            // timeout to keep; answer what was served (early answers are always right).
            if let Some(id) = st.unacked.take() {
                let mut a = Header::new(Kind::Ack);
                a.id = id;
                st.out.extend_from_slice(&a.encode());
            }
            flush(shared, c, st, true)?;
        }
        if !st.out.is_empty() {
            // Answers the socket did not take (a waiter's): the server writes them, in order.
            st.hand_off(c);
            return Ok(served);
        }
        if waiter && (h.kind == Kind::Notif || served >= WAITER_MAX_FRAMES) {
            return Ok(served);
        }
    }
}

/// Serves one request whose header has arrived; false on a goodbye.
fn serve_frame(
    shared: &Shared,
    c: &InConn,
    st: &mut Serving,
    h: Header,
    waiter: bool,
) -> Result<bool, End> {
    let (stream, session) = (&c.stream, &*c.session);
    let counted = h.flags & wire::F_COUNTED != 0;
    match h.kind {
        Kind::Write => {
            let len = u64::from(h.len);
            let deadline = Some(frame_deadline(shared, len));
            match shared.regions.acquire(h.token, h.addr, len) {
                Ok(region) => {
                    // The server thread also takes the next request's header if it is there
                    // already (one system call per request in a burst, not two). A waiting
                    // thread does not: it counts what it may read without blocking.
                    let next = if waiter { 0 } else { HEADER_LEN };
                    let mut iov = [
                        libc::iovec {
                            iov_base: h.addr as *mut libc::c_void,
                            iov_len: h.len as usize,
                        },
                        libc::iovec {
                            iov_base: st.hb.as_mut_ptr().cast(),
                            iov_len: next,
                        },
                    ];
                    // Both calls below write only into `iov`: `[addr, addr+len)` lies inside a
                    // live registration of this agent (checked above) and stays registered
                    // while `region` is held (deregistration waits for it), and the application
                    // promised that registered memory is valid and not accessed during
                    // transfers; the second iovec is `st.hb`, which holds no header bytes at
                    // this point (the current header was parsed into `h`) and is not touched
                    // during the call.
                    let got = if h.len as usize >= POLLED_PAYLOAD {
                        // SAFETY: see above.
                        unsafe { sock::readv_flowing(stream, &mut iov, h.len as usize, deadline) }
                    } else {
                        // SAFETY: see above.
                        unsafe { sock::readv_min(stream, &mut iov, h.len as usize, deadline) }
                    }
                    .map_err(|e| End::io("receiving WRITE data", e))?;
                    if h.len as usize >= sock::QUICKACK_PAYLOAD {
                        sock::quickack(stream);
                    }
                    st.have = got - h.len as usize;
                    if st.have > 0 {
                        st.since = Some(Instant::now());
                    }
                    drop(region);
                    if counted {
                        session.part_served(shared, h.post);
                    }
                    st.unacked = Some(h.id);
                }
                Err(msg) => {
                    // Keep the stream framed: read the payload into scratch and drop it.
                    let mut left = h.len as usize;
                    st.scratch.resize(left.min(1 << 20), 0);
                    while left > 0 {
                        let n = left.min(st.scratch.len());
                        sock::read_exact(stream, &mut st.scratch[..n], deadline)
                            .map_err(|e| End::io("receiving refused WRITE data", e))?;
                        left -= n;
                    }
                    tracing::warn!("TCP: refused a WRITE from {:?}: {msg}", session.name);
                    // The error answers every earlier request too.
                    st.unacked = None;
                    queue_err(st, h.id, ErrCode::NotFound, &msg);
                    flush(shared, c, st, waiter)?;
                }
            }
        }
        Kind::Read => match shared.regions.acquire(h.token, h.addr, h.size) {
            // Only the server thread serves READs (see `serve_ready`), so blocking is fine.
            Ok(region) => {
                flush(shared, c, st, false)?;
                let mut d = Header::new(Kind::Data);
                d.id = h.id;
                d.len = h.size as u32;
                let db = d.encode();
                let mut iov = [
                    libc::iovec {
                        iov_base: db.as_ptr() as *mut libc::c_void,
                        iov_len: db.len(),
                    },
                    libc::iovec {
                        iov_base: h.addr as *mut libc::c_void,
                        iov_len: h.size as usize,
                    },
                ];
                let deadline = Some(frame_deadline(shared, h.size));
                let pace = h.flags & wire::F_PACED != 0;
                if pace != st.paced {
                    sock::pace(stream, pace);
                    st.paced = pace;
                }
                // SAFETY: the data range lies inside a live registration (checked) that
                // stays registered while `region` is held; writev only reads it.
                unsafe { sock::writev_until(stream, &mut iov, deadline) }
                    .map_err(|e| End::io("sending READ data", e))?;
                drop(region);
                // The data answer every earlier request too.
                st.unacked = None;
                if counted {
                    session.part_served(shared, h.post);
                }
            }
            Err(msg) => {
                tracing::warn!("TCP: refused a READ from {:?}: {msg}", session.name);
                st.unacked = None;
                queue_err(st, h.id, ErrCode::NotFound, &msg);
                flush(shared, c, st, waiter)?;
            }
        },
        Kind::Notif => {
            let mut msg = vec![0u8; h.len as usize];
            sock::read_exact(stream, &mut msg, Some(frame_deadline(shared, h.len.into())))
                .map_err(|e| End::io("receiving a notification", e))?;
            if h.size == 0 {
                shared.ctx.notifs().deliver(&session.name, &msg);
            } else {
                session.notif(shared, h.post, h.size, msg);
            }
            if h.flags & wire::F_NOACK == 0 {
                st.unacked = Some(h.id);
            }
        }
        Kind::Bye => return Ok(false),
        other => {
            return Err(End::Broken(format!(
                "unexpected {other:?} frame from an initiator"
            )))
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn ranges_are_checked_against_live_regions() {
        let r = Regions::default();
        r.insert(7, 0x1000, 0x1000);
        assert!(r.acquire(7, 0x1000, 0x1000).is_ok());
        assert!(r.acquire(7, 0x1800, 0x800).is_ok());
        assert!(r.acquire(7, 0x1800, 0x801).is_err(), "past the end");
        assert!(r.acquire(7, 0xfff, 2).is_err(), "before the start");
        assert!(r.acquire(7, u64::MAX, 2).is_err(), "overflow");
        assert!(r.acquire(8, 0x1000, 1).is_err(), "unknown token");
        assert!(r.remove(7));
        assert!(r.acquire(7, 0x1000, 1).is_err(), "deregistered");
        assert!(!r.remove(7));
    }

    #[test]
    fn deregistration_waits_for_servers_inside_the_region() {
        let r = Arc::new(Regions::default());
        r.insert(1, 0x1000, 0x1000);
        let held = r.acquire(1, 0x1000, 16).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let (r2, rel2) = (r.clone(), released.clone());
        let t = std::thread::spawn(move || {
            r2.remove(1);
            // `remove` returned: the server must have left the region before.
            assert!(rel2.load(Ordering::SeqCst), "deregistration did not wait");
        });
        std::thread::sleep(Duration::from_millis(50));
        released.store(true, Ordering::SeqCst);
        drop(held);
        t.join().unwrap();
        assert!(r.acquire(1, 0x1000, 1).is_err());
    }
}
