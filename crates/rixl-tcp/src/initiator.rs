//! The initiator side: connections to one peer, the per-connection queue of requests awaiting
//! a response, who reads the responses, and prepared transfers.
//!
//! Each peer gets `connections` TCP connections, made on first use (or `connect`). Requests on
//! one connection are answered in order, so each connection keeps a FIFO of what it sent: an
//! `Ack(id)` completes every entry up to `id`, `Data(id)` carries a READ's bytes (received
//! straight into the local segment), `Err(id)` fails one entry. A post's frames are counted in
//! a [`PostState`]; when the last one resolves, the request completes.
//!
//! Small posts go out on one connection (the least busy, the first when all are idle, so that
//! back-to-back posts find the target's server still spinning), written by the posting thread
//! (one `writev` for many frames), with the notification right behind the data on the same
//! ordered stream. Large posts are cut into chunks dealt round-robin to every connection;
//! the posting thread writes the first share (and shares that put little on the wire), and
//! per-connection sender threads write the other large shares at the same time. Their notification names the post and the number of parts,
//! and the target delivers it once every part has been served (see `target::Session`).
//! Standalone notifications are not acknowledged ([`wire::F_NOACK`]).
//!
//! ## Who reads the responses
//!
//! On a machine like the 2-core VMs this is built on, a thread blocked in the kernel takes
//! ~5 us to wake (far more when the core was idle), which is most of a small transfer's round
//! trip. Handing each response from a reader thread to the application thread costs two such
//! wake-ups. So the responses of a connection are read by whoever is there first:
//!
//! - a thread in `wait()` for a post sent on one connection reads that connection itself
//!   ([`TcpXfer::progress`], up to [`WAITER_SPIN`]); meanwhile arriving data do not wake the
//!   connection's reader thread (its epoll interest drops `EPOLLIN`, keeping hang-ups);
//! - a thread polling `status()` reads it once per poll, and holds a short lease with the
//!   same effect while it keeps polling ([`STATUS_LEASE`]; the reader thread then sleeps in
//!   1 ms steps so that it takes over in time if the polling stops);
//! - otherwise the reader thread, which sleeps in `epoll_wait` until data arrive. It also
//!   catches end of stream and the response deadline, whatever the other readers do.
//!
//! The parsing state ([`Rx`]: a header in the making, the payload being received) sits under a
//! mutex that a reader holds while it reads, so a frame started by one reader is finished by
//! another and every frame is resolved exactly once. Waiting threads never block on the
//! socket (a peer cannot hold them); the reader thread blocks only for a payload whose header
//! has arrived, bounded by the frame deadline. Striped posts are left to the reader threads,
//! which receive their parts in parallel.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rixl_backend::{BackendXfer, PostOutcome};
use rixl_core::completion::monotonic_nanos;
use rixl_core::{CompletionHandle, CostEstimate, CostMethod, Error, ErrorKind, Result, XferOp};

use crate::sock;
use crate::wire::{self, ConnInfo, ErrCode, Header, Hello, Kind, HEADER_LEN};
use crate::{Shared, NAME};

/// Frames written per `writev` batch.
const BATCH: usize = 128;
/// Striped transfers are not cut into pieces smaller than this (unless `chunk_bytes` is).
const MIN_STRIPE_CHUNK: u64 = 64 << 10;
/// A striped post's share of at most this many bytes is written by the posting thread itself
/// (READ requests; a WRITE share of this size is not worth a sender thread's wake-up).
const INLINE_SHARE: u64 = 64 << 10;
/// The posting thread writes a striped post's first share itself up to this many bytes (about
/// what the socket buffers absorb at once, so `post` returns within a few milliseconds); a
/// larger first share goes to its sender thread like the others.
const FIRST_SHARE_MAX: u64 = 8 << 20;
/// How long a `status()` poll keeps the reader thread from being woken by data: the caller is
/// expected to poll again well within this.
const STATUS_LEASE: Duration = Duration::from_micros(500);
/// After the last `status()` poll, how long the reader thread keeps sleeping in short steps.
const POLLED_RECENTLY: Duration = Duration::from_millis(20);
/// The reader thread polls for payloads at least this large instead of sleeping in `readv`.
const POLLED_PAYLOAD: usize = 128 << 10;
/// Payload bytes a waiting thread receives per look at the connection.
const WAITER_PUMP_BYTES: usize = 1 << 20;
/// How long a waiting thread reads its post's connection itself before leaving it to the
/// reader thread (and sleeping on the completion after its own short spin).
const WAITER_SPIN: Duration = Duration::from_micros(200);

/// One peer we can reach.
#[derive(Debug)]
pub(crate) struct Peer {
    pub name: String,
    pub info: ConnInfo,
    pub alive: AtomicBool,
    /// We are closing on purpose: end of stream is not a failure.
    pub closing: AtomicBool,
    conns: Mutex<Option<Arc<ConnSet>>>,
    next_id: AtomicU64,
    next_post: AtomicU64,
    /// Our tokens for the peer's regions → the target's own tokens (published by it).
    pub regions: Mutex<std::collections::HashMap<u64, u64>>,
}

impl Peer {
    pub(crate) fn new(name: &str, info: ConnInfo) -> Peer {
        Peer {
            name: name.to_owned(),
            info,
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            conns: Mutex::new(None),
            next_id: AtomicU64::new(1),
            next_post: AtomicU64::new(1),
            regions: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Closes every connection (with a goodbye when it can be sent at once).
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let set = self.conns.lock().take();
        if let Some(set) = set {
            for c in &set.conns {
                if let Some(w) = c.writer.try_lock() {
                    let _ = sock::write_all(&w.stream, &Header::new(Kind::Bye).encode());
                }
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Breaks every connection (a cancel that the target did not answer in time).
    fn kill(&self) {
        if let Some(set) = self.conns.lock().as_ref() {
            for c in &set.conns {
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn gone(&self) -> Error {
        if self.closing.load(Ordering::SeqCst) {
            Error::not_found(format!("agent {:?} was disconnected", self.name))
        } else {
            Error::remote_disconnect(format!("agent {:?} is gone", self.name))
        }
        .with_peer(&self.name)
        .with_backend(NAME)
    }
}

#[derive(Debug)]
struct ConnSet {
    conns: Vec<Arc<Conn>>,
}

/// Send-able iovec storage, reused by the writer (holds pointers only during a call).
struct IoVecs(Vec<libc::iovec>);
// SAFETY: the vector is cleared after every use, so it never carries pointers across threads.
unsafe impl Send for IoVecs {}

struct Writer {
    stream: TcpStream,
    hdrs: Vec<[u8; HEADER_LEN]>,
    iov: IoVecs,
    /// Whether the socket's send buffer is the paced one (see the `pace_min_bytes` parameter).
    paced: bool,
}

struct Entry {
    id: u64,
    post: Option<Arc<PostState>>,
    /// For a READ: where its data goes.
    read: Option<(u64, u64)>,
}

struct Fifo {
    q: VecDeque<Entry>,
    dead: Option<Error>,
    /// When a response last arrived, or the queue last became non-empty: the response
    /// deadline counts from here.
    progress: Instant,
}

impl Fifo {
    fn push(&mut self, e: Entry) {
        if self.q.is_empty() {
            self.progress = Instant::now();
        }
        self.q.push_back(e);
    }
}

type Job = Box<dyn FnOnce() + Send>;

struct Conn {
    idx: usize,
    stream: TcpStream,
    writer: Mutex<Writer>,
    fifo: Mutex<Fifo>,
    /// Jobs for this connection's sender thread (large posts).
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Response parsing, held by whoever reads the socket: the reader thread, or a thread
    /// waiting for one of this connection's posts (see [`TcpXfer::progress`]).
    rx: Mutex<Rx>,
    /// What the reader thread sleeps on.
    poller: sock::Poller,
    /// Who reads this connection besides the reader thread. While anyone does, arriving data
    /// do not wake the reader thread (only hang-up and errors do).
    watch: Mutex<Watch>,
    /// `tcpi_bytes_acked` when [`overdue`] last found the connection idle.
    acked_seen: AtomicU64,
    /// Until when (`monotonic_nanos`) a thread polling `status()` counts as reading the
    /// connection (see [`Watch::leased`]).
    lease_until: AtomicU64,
}

#[derive(Default)]
struct Watch {
    /// Threads reading the connection while they wait ([`TcpXfer::progress`] with a budget).
    waiters: usize,
    /// A thread polls `status()` (which reads the connection once per call): renewed by every
    /// poll, ended by the poll that completes its post, or by the reader thread once
    /// `lease_until` passed without a poll (a caller that stopped polling). Only taken while
    /// the reader thread is `ticking`, so that it notices the expiry in time.
    leased: bool,
    /// The reader thread sleeps at most a millisecond at a time (it saw `status()` polls in
    /// the last [`POLLED_RECENTLY`]).
    ticking: bool,
    /// What the poller is set to: data wake the reader thread.
    armed: bool,
}

/// The state of the response stream between reads: a header in the making or the payload of
/// the frame being received. Whoever holds it may read the socket, so a frame started by one
/// thread is finished by another without losing framing.
struct Rx {
    hb: [u8; HEADER_LEN],
    /// Header bytes received so far.
    have: usize,
    body: Option<Body>,
    /// The connection ended (failed or closed): nobody reads it any more.
    ended: bool,
}

/// The payload of a response frame being received.
struct Body {
    post: Option<Arc<PostState>>,
    /// `Some(code)`: the target refused the request and the payload is its message, read
    /// into `msg`. `None`: READ data, received straight into the local segment at `addr`.
    err: Option<u64>,
    msg: Vec<u8>,
    addr: u64,
    len: usize,
    got: usize,
    /// The payload must be complete by then (a trickling peer cannot hold the memory).
    until: Instant,
}

impl Body {
    /// Receives more of the payload (without blocking: at most `allowance` bytes, which it
    /// counts down); true once it is complete.
    fn read(
        &mut self,
        s: &TcpStream,
        blocking: bool,
        allowance: &mut usize,
    ) -> std::io::Result<bool> {
        while self.got < self.len {
            if !blocking && *allowance == 0 {
                return Ok(false);
            }
            let base = match self.err {
                Some(_) => self.msg.as_mut_ptr(),
                None => self.addr as *mut u8,
            };
            let mut iov = [libc::iovec {
                // `got < len`, so this stays inside the destination.
                iov_base: base.wrapping_add(self.got).cast(),
                iov_len: if blocking {
                    self.len - self.got
                } else {
                    (self.len - self.got).min(*allowance)
                },
            }];
            if blocking {
                let left = self.len - self.got;
                // Large payloads arrive in pieces: poll for them while they flow rather than
                // pay a wake-up per piece (see `target::POLLED_PAYLOAD`).
                if left >= POLLED_PAYLOAD {
                    // SAFETY: as below.
                    unsafe { sock::readv_flowing(s, &mut iov, left, Some(self.until)) }?;
                } else {
                    // SAFETY: the iovec lies inside `msg` (ours) or inside a local segment the
                    // agent validated against our registrations when the request was made;
                    // the request's post is in flight (this body holds its state) and cancel
                    // waits for it to resolve, so the memory is registered and not otherwise
                    // accessed.
                    unsafe { sock::readv_exact(s, &mut iov, Some(self.until)) }?;
                }
                self.got = self.len;
                break;
            }
            // SAFETY: as above.
            match unsafe { sock::recv_some(s, &mut iov, true) }? {
                None if Instant::now() >= self.until => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the peer did not send a whole frame in time",
                    ))
                }
                None => return Ok(false),
                Some(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Some(n) => {
                    self.got += n;
                    *allowance -= n;
                }
            }
        }
        Ok(true)
    }

    /// Resolves the request whose payload this was.
    fn finish(self, peer: &Peer) {
        let r = match self.err {
            None => Ok(()),
            Some(code) => Err(ErrCode::from_u64(code)
                .to_error(&String::from_utf8_lossy(&self.msg))
                .with_peer(&peer.name)),
        };
        if let Some(p) = self.post {
            p.resolve(r);
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("idx", &self.idx).finish()
    }
}

impl Conn {
    /// Marks the connection dead and fails everything it was waiting for.
    fn fail(&self, err: Error) {
        let drained: Vec<Entry> = {
            let mut f = self.fifo.lock();
            if f.dead.is_none() {
                f.dead = Some(err.clone());
            }
            f.q.drain(..).collect()
        };
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        for e in drained {
            if let Some(p) = e.post {
                p.resolve(Err(err.clone()));
            }
        }
    }

    fn dead(&self) -> Option<Error> {
        self.fifo.lock().dead.clone()
    }

    /// Requests waiting for an answer (`usize::MAX` while another thread holds the queue).
    fn backlog(&self) -> usize {
        self.fifo.try_lock().map_or(usize::MAX, |f| f.q.len())
    }

    /// A thread starts (`true`) or stops reading this connection while it waits. While any
    /// thread does, arriving data do not wake the reader thread; once none does, they wake it
    /// again (at once if data are queued).
    fn watch(&self, on: bool) {
        let mut w = self.watch.lock();
        w.waiters = if on {
            w.waiters + 1
        } else {
            w.waiters.saturating_sub(1)
        };
        self.rearm(&mut w);
    }

    /// A thread polling `status()` reads this connection for the next [`STATUS_LEASE`].
    fn lease(&self) {
        self.lease_until.store(
            monotonic_nanos() + STATUS_LEASE.as_nanos() as u64,
            Ordering::Relaxed,
        );
        let mut w = self.watch.lock();
        if w.ticking && !w.leased {
            w.leased = true;
            self.rearm(&mut w);
        }
    }

    /// Ends a `status()` lease (its post completed, or it expired).
    fn unlease(&self) {
        let mut w = self.watch.lock();
        if w.leased {
            w.leased = false;
            self.rearm(&mut w);
        }
    }

    /// Sets whether data wake the reader thread. If the interest cannot be changed, the reader
    /// thread simply keeps being woken.
    fn rearm(&self, w: &mut Watch) {
        let armed = w.waiters == 0 && !w.leased;
        if armed != w.armed {
            match self.poller.watch_data(armed) {
                Ok(()) => w.armed = armed,
                Err(e) => tracing::debug!("TCP: cannot change what wakes a reader thread: {e}"),
            }
        }
    }
}

/// The progress of one post.
pub(crate) struct PostState {
    /// The connection of a post sent on one connection (a waiter reads it); `None` for
    /// striped posts, whose parts the reader threads receive in parallel.
    conn: Option<Arc<Conn>>,
    remaining: AtomicUsize,
    error: Mutex<Option<Error>>,
    cancelled: AtomicBool,
    done: CompletionHandle,
    lock: Mutex<()>,
    cv: Condvar,
}

impl PostState {
    fn resolve(&self, r: Result<()>) {
        if let Err(e) = r {
            self.error.lock().get_or_insert(e);
        }
        let before = self.remaining.fetch_sub(1, Ordering::AcqRel);
        // Each frame is resolved exactly once (whoever pops it from its queue resolves it).
        debug_assert!(before > 0, "a TCP frame was resolved twice");
        if before != 1 {
            return;
        }
        if !self.cancelled.load(Ordering::SeqCst) {
            let result = match self.error.lock().take() {
                Some(e) => Err(e.with_backend(NAME)),
                None => Ok(()),
            };
            self.done.complete(result);
        }
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    fn resolved(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    fn resolve_n(&self, n: usize, err: &Error) {
        for _ in 0..n {
            self.resolve(Err(err.clone()));
        }
    }

    /// Waits until every frame resolved; false if `limit` passed first.
    fn wait_resolved(&self, limit: Duration) -> bool {
        let until = Instant::now().checked_add(limit);
        let mut g = self.lock.lock();
        while self.remaining.load(Ordering::Acquire) > 0 {
            match until {
                Some(t) => {
                    if self.cv.wait_until(&mut g, t).timed_out() {
                        return self.remaining.load(Ordering::Acquire) == 0;
                    }
                }
                None => self.cv.wait(&mut g),
            }
        }
        true
    }
}

/// One frame of a prepared transfer: `len` bytes between local `local` and the target's
/// `addr` in its region `token`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame {
    pub local: u64,
    pub token: u64,
    pub addr: u64,
    pub len: u64,
}

/// Connects to `peer` if not connected yet.
fn conns(shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<Arc<ConnSet>> {
    let mut slot = peer.conns.lock();
    if let Some(s) = &*slot {
        return Ok(s.clone());
    }
    if peer.closing.load(Ordering::SeqCst) || !peer.alive.load(Ordering::SeqCst) {
        return Err(peer.gone());
    }
    let n = shared.connections;
    let mut streams = Vec::with_capacity(n);
    let mut last_err = None;
    let mut chosen: Option<SocketAddr> = None;
    for ip in &peer.info.addrs {
        let addr = SocketAddr::new(*ip, peer.info.port);
        match dial(shared, peer, addr, 0) {
            Ok(s) => {
                streams.push(s);
                chosen = Some(addr);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(addr) = chosen else {
        let e = last_err.unwrap_or_else(|| Error::remote_disconnect("no address to try"));
        return Err(e.with_peer(&peer.name).with_backend(NAME));
    };
    for i in 1..n {
        streams.push(dial(shared, peer, addr, i)?);
    }
    let mut set = Vec::with_capacity(n);
    for (idx, stream) in streams.into_iter().enumerate() {
        let clone = |s: &TcpStream| {
            s.try_clone()
                .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP socket clone", &e))
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let poller = sock::Poller::new(&stream)
            .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP cannot watch a socket", &e))?;
        let conn = Arc::new(Conn {
            idx,
            writer: Mutex::new(Writer {
                stream: clone(&stream)?,
                hdrs: Vec::with_capacity(BATCH + 1),
                iov: IoVecs(Vec::with_capacity(2 * BATCH + 2)),
                paced: false,
            }),
            stream,
            fifo: Mutex::new(Fifo {
                q: VecDeque::new(),
                dead: None,
                progress: Instant::now(),
            }),
            jobs: Mutex::new(tx),
            rx: Mutex::new(Rx {
                hb: [0; HEADER_LEN],
                have: 0,
                body: None,
                ended: false,
            }),
            poller,
            watch: Mutex::new(Watch {
                armed: true,
                ..Watch::default()
            }),
            lease_until: AtomicU64::new(0),
            acked_seen: AtomicU64::new(0),
        });
        let (s2, p2, c2) = (shared.clone(), peer.clone(), conn.clone());
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP cannot start a thread", &e))
        };
        let r = spawn("rixl-tcp-read", Box::new(move || reader(&s2, &p2, &c2)))?;
        {
            let mut readers = shared.readers.lock();
            readers.retain(|t| !t.is_finished());
            readers.push(r);
        }
        spawn(
            "rixl-tcp-send",
            Box::new(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            }),
        )?;
        set.push(conn);
    }
    let set = Arc::new(ConnSet { conns: set });
    *slot = Some(set.clone());
    Ok(set)
}

/// Opens connection `idx` to `addr` and says hello.
fn dial(shared: &Shared, peer: &Peer, addr: SocketAddr, idx: usize) -> Result<TcpStream> {
    // A host that does not answer a SYN within `unreachable` counts as unreachable.
    let per_try = shared.deadline.min(shared.unreachable);
    let fail = |kind: ErrorKind, what: &str, e: &std::io::Error| {
        Error::from_io(kind, format!("{what} agent {:?} at {addr}", peer.name), e)
            .with_peer(&peer.name)
            .with_backend(NAME)
    };
    let s = TcpStream::connect_timeout(&addr, per_try)
        .map_err(|e| fail(ErrorKind::RemoteDisconnect, "cannot connect to", &e))?;
    sock::configure(
        &s,
        shared.keepalive_secs,
        shared.unreachable,
        shared.deadline,
    )
    .map_err(|e| fail(ErrorKind::Backend, "cannot configure the connection to", &e))?;
    let hello = Hello {
        version: wire::VERSION,
        from: shared.ctx.agent_name().to_owned(),
        from_nonce: shared.nonce,
        to: peer.name.clone(),
        to_nonce: peer.info.nonce,
        conn: idx as u32,
    }
    .encode();
    let mut h = Header::new(Kind::Hello);
    h.len = hello.len() as u32;
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&hello);
    sock::write_all(&s, &out).map_err(|e| fail(ErrorKind::RemoteDisconnect, "hello to", &e))?;
    let deadline = Some(Instant::now() + shared.deadline);
    let mut hb = [0u8; HEADER_LEN];
    sock::read_exact(&s, &mut hb, deadline)
        .map_err(|e| fail(ErrorKind::RemoteDisconnect, "no hello answer from", &e))?;
    let ack = Header::parse(&hb).map_err(|e| {
        Error::mismatch(format!("{addr} does not speak RIXL TCP: {e}")).with_peer(&peer.name)
    })?;
    if ack.kind != Kind::HelloAck {
        return Err(Error::mismatch(format!(
            "{addr} answered the hello with {:?}",
            ack.kind
        )));
    }
    if ack.size != 0 {
        let mut msg = vec![0u8; ack.len as usize];
        let _ = sock::read_exact(&s, &mut msg, deadline);
        // The agent at that address is not the instance whose metadata we hold (restarted).
        return Err(Error::remote_disconnect(format!(
            "agent {:?} at {addr} refused the connection: {}",
            peer.name,
            String::from_utf8_lossy(&msg)
        ))
        .with_peer(&peer.name)
        .with_backend(NAME));
    }
    Ok(s)
}

/// The reader thread of one connection: sleeps until the socket has something to read (data
/// do not wake it while a waiting thread reads the socket itself), handles whatever arrived,
/// and ends the connection on end of stream, a protocol violation, or no answer in time.
fn reader(shared: &Arc<Shared>, peer: &Arc<Peer>, conn: &Arc<Conn>) {
    // The first look at the peer's silence comes when it could first matter (see `overdue`).
    let mut timeout = shared.deadline.min(shared.silence_limit());
    loop {
        // While `status()` polls come in, sleep a millisecond at a time, so that a lease
        // whose poller stopped polling ends in time (its post must not be left to nobody).
        let now = monotonic_nanos();
        let polled = conn.lease_until.load(Ordering::Relaxed);
        let ticking = polled != 0 && now < polled + POLLED_RECENTLY.as_nanos() as u64;
        {
            let mut w = conn.watch.lock();
            w.ticking = ticking;
            if w.leased && (!ticking || now >= polled) {
                w.leased = false;
                conn.rearm(&mut w);
            }
        }
        let woke = conn.poller.wait(if ticking {
            timeout.min(Duration::from_millis(1))
        } else {
            timeout
        });
        let mut rx = conn.rx.lock();
        if rx.ended {
            return;
        }
        let r = match woke {
            Err(e) => Err(Error::from_io(
                ErrorKind::Backend,
                "TCP cannot wait for its socket",
                &e,
            )),
            // Bodies are read with blocking calls here: once a header is in, its payload
            // is on the way, and this thread has nothing else to do.
            Ok(_) => pump(shared, peer, conn, &mut rx, true, &|| false)
                .and_then(|()| overdue(shared, peer, conn, &rx)),
        };
        match r {
            Ok(t) => timeout = t,
            Err(e) => {
                end(shared, peer, conn, &mut rx, e);
                return;
            }
        }
    }
}

/// Whether the connection is lost or stuck: the peer's kernel silent for `unreachable` with a
/// probe of ours unanswered, a payload not complete by its deadline, or requests outstanding
/// and no byte received from the peer, nor acknowledged by its kernel, for a whole `deadline`
/// (a WRITE whose upload outlasts the deadline is answered only at its end). Otherwise, how
/// long the reader thread may sleep before looking again.
fn overdue(shared: &Shared, peer: &Peer, conn: &Conn, rx: &Rx) -> Result<Duration> {
    let now = Instant::now();
    // With nothing of ours unacknowledged, the kernel probes a quiet connection but gives up
    // on an unanswered probe only at its next one: look more often than that while something
    // is awaited, so that a crashed host fails it after `unreachable`.
    let look_again = (shared.unreachable / 4).max(Duration::from_millis(10));
    let limit = shared.silence_limit();
    let reachable = || match sock::unanswered_for(&conn.stream) {
        Some(silent) if silent >= limit => Err(Error::remote_disconnect(format!(
            "the host of agent {:?} acknowledged nothing for {silent:?} (unreachable_ms)",
            peer.name
        ))),
        _ => Ok(()),
    };
    if let Some(b) = &rx.body {
        reachable()?;
        return match b.until.checked_duration_since(now) {
            Some(left) if !left.is_zero() => Ok(left.min(shared.deadline).min(look_again)),
            _ => Err(Error::timeout(format!(
                "agent {:?} did not send a whole frame in time",
                peer.name
            ))),
        };
    }
    let mut f = conn.fifo.lock();
    reachable()?;
    if f.q.is_empty() {
        // Nobody waits, but a dead host should still be given up in bounded time: look again
        // when the silence could first reach the limit (the kernel probes after a second of
        // quiet by default, so a healthy idle connection brings this thread here about once a
        // second). Past the limit with no probe out, the kernel is retransmitting data of
        // ours instead, and `TCP_USER_TIMEOUT` ends that.
        let next = match sock::silent_for(&conn.stream) {
            Some(silent) if silent < limit => limit - silent + Duration::from_millis(5),
            Some(_) => look_again,
            None => shared.deadline,
        };
        return Ok(next.min(shared.deadline));
    }
    let idle = now.saturating_duration_since(f.progress);
    if idle >= shared.deadline {
        // Bytes of ours the peer's kernel acknowledged since the last look are progress too:
        // a slow link keeps draining megabytes of socket buffer after the last write, and the
        // answer comes only at the end. (The first look may count acknowledgements older than
        // the silence, so a frozen peer gets one more deadline at most.)
        if let Some(acked) = sock::bytes_acked(&conn.stream) {
            if acked > conn.acked_seen.swap(acked, Ordering::Relaxed) {
                f.progress = now;
                return Ok(shared.deadline.min(look_again));
            }
        }
        return Err(Error::timeout(format!(
            "agent {:?} did not answer within {:?}",
            peer.name, shared.deadline
        )));
    }
    Ok((shared.deadline - idle).min(look_again))
}

/// Ends the connection after `err`, once, by whoever holds its `rx` when it happens: fails
/// every request it was waiting for and, unless we are closing on purpose, reports the peer
/// lost (whatever ended the connection, the peer cannot be used through it any more).
fn end(shared: &Shared, peer: &Peer, conn: &Conn, rx: &mut Rx, err: Error) {
    if std::mem::replace(&mut rx.ended, true) {
        return;
    }
    let on_purpose = peer.closing.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst);
    let err = if on_purpose {
        peer.gone()
    } else {
        err.with_peer(&peer.name).with_backend(NAME)
    };
    if let Some(p) = rx.body.take().and_then(|b| b.post) {
        p.resolve(Err(err.clone()));
    }
    // Also wakes the reader thread (hang-up), which sees `ended` and stops.
    conn.fail(err.clone());
    if !on_purpose {
        shared.lost(peer, &err);
    }
}

fn proto(peer: &Peer, msg: impl std::fmt::Display) -> Error {
    Error::backend(format!(
        "agent {:?} broke the TCP protocol: {msg}",
        peer.name
    ))
}

/// Pops entries answered implicitly (ids before `id`): they succeeded.
fn pop_before(peer: &Peer, conn: &Conn, id: u64, upto: bool) -> Result<Option<Entry>> {
    let mut done = Vec::new();
    let mut hit = None;
    {
        let mut f = conn.fifo.lock();
        f.progress = Instant::now();
        while let Some(e) = f.q.front() {
            if e.id < id || (upto && e.id == id) {
                if e.read.is_some() {
                    return Err(proto(
                        peer,
                        format!("READ {} acknowledged without data", e.id),
                    ));
                }
                done.extend(f.q.pop_front());
            } else {
                if e.id == id {
                    hit = f.q.pop_front();
                }
                break;
            }
        }
    }
    for e in done {
        if let Some(p) = e.post {
            p.resolve(Ok(()));
        }
    }
    Ok(hit)
}

/// Handles every response that can be read now, leaving a partly received frame in `rx` for
/// whoever reads next. `blocking`: once a frame's header is in, wait for its payload (the
/// reader thread does; a waiting thread does not). Stops between frames once `enough()`.
/// An error means the connection must end ([`end`]).
fn pump(
    shared: &Shared,
    peer: &Peer,
    conn: &Conn,
    rx: &mut Rx,
    blocking: bool,
    enough: &dyn Fn() -> bool,
) -> Result<()> {
    let io = |e: std::io::Error| {
        Error::from_io(
            ErrorKind::RemoteDisconnect,
            format!("connection to agent {:?} failed", peer.name),
            &e,
        )
    };
    // A waiting thread takes at most this much of other posts' payloads per call (data keep
    // coming on a busy connection; it must get back to its own post and its budget).
    let mut allowance = if blocking {
        usize::MAX
    } else {
        WAITER_PUMP_BYTES
    };
    loop {
        if let Some(body) = rx.body.as_mut() {
            if !body
                .read(&conn.stream, blocking, &mut allowance)
                .map_err(io)?
            {
                return Ok(());
            }
            if let Some(body) = rx.body.take() {
                // The peer is still sending answers to us: do not let our kernel sit on the
                // ACKs it needs (see `sock::quickack`). After the last answer there is
                // nothing to hold up, and the next request carries the ACK for free.
                if body.len >= sock::QUICKACK_PAYLOAD && !conn.fifo.lock().q.is_empty() {
                    sock::quickack(&conn.stream);
                }
                body.finish(peer);
            }
            continue;
        }
        if enough() {
            return Ok(());
        }
        let have = rx.have;
        match sock::recv_now(&conn.stream, &mut rx.hb[have..]).map_err(io)? {
            None => return Ok(()),
            Some(0) => {
                return Err(Error::remote_disconnect(format!(
                    "agent {:?} closed the connection",
                    peer.name
                )))
            }
            Some(n) => rx.have += n,
        }
        if rx.have < HEADER_LEN {
            continue;
        }
        rx.have = 0;
        let h = Header::parse(&rx.hb).map_err(|e| proto(peer, e))?;
        match h.kind {
            Kind::Ack => {
                pop_before(peer, conn, h.id, true)?;
            }
            Kind::Err => {
                let e = pop_before(peer, conn, h.id, false)?
                    .ok_or_else(|| proto(peer, format!("error for unknown request {}", h.id)))?;
                rx.body = Some(Body {
                    post: e.post,
                    err: Some(h.size),
                    msg: vec![0; h.len as usize],
                    addr: 0,
                    len: h.len as usize,
                    got: 0,
                    until: Instant::now() + shared.deadline,
                });
            }
            Kind::Data => {
                let e = pop_before(peer, conn, h.id, false)?
                    .ok_or_else(|| proto(peer, format!("data for unknown request {}", h.id)))?;
                let Some((addr, len)) = e.read.filter(|(_, l)| *l == u64::from(h.len)) else {
                    // Put nothing anywhere: the connection is ended by the caller.
                    if let Some(p) = &e.post {
                        p.resolve(Err(proto(peer, "unexpected data")));
                    }
                    return Err(proto(peer, format!("data of the wrong size for {}", h.id)));
                };
                rx.body = Some(Body {
                    post: e.post,
                    err: None,
                    msg: Vec::new(),
                    addr,
                    len: len as usize,
                    got: 0,
                    until: Instant::now() + shared.deadline + Duration::from_micros(len / 10),
                });
            }
            other => return Err(proto(peer, format!("unexpected {other:?} frame"))),
        }
    }
}

/// What follows the data frames of one connection's share of a post.
#[derive(Clone, Copy)]
struct NotifSpec<'a> {
    msg: &'a [u8],
    /// Parts the target must serve first (0: the data is ahead on this stream).
    want: u64,
}

/// Writes share `k` of transfer `x` (and the notification) on `conn`, resolving each frame
/// exactly once: by the reader when answered, here when it is never sent.
fn send_frames(
    x: &XferInner,
    k: usize,
    conn: &Conn,
    st: &Arc<PostState>,
    notif: Option<NotifSpec<'_>>,
    post_id: u64,
) {
    let (op, peer, frames, pace) = (x.op, &*x.peer, &x.lists[k][..], x.paced[k]);
    let counted = if post_id != 0 { wire::F_COUNTED } else { 0 };
    let read_flags = if pace {
        counted | wire::F_PACED
    } else {
        counted
    };
    let total = frames.len() + usize::from(notif.is_some());
    let mut sent = 0usize;
    let mut chunks = frames.chunks(BATCH).peekable();
    while sent < total {
        // The connection is held per batch, not per post: a small post from another thread
        // waits for one batch of a large one, not for all of it. Order within this post is
        // kept (batches go out in order, each after the previous one).
        let mut guard = conn.writer.lock();
        let w = &mut *guard;
        let batch = chunks.next().unwrap_or(&[]);
        let with_notif = chunks.peek().is_none() && notif.is_some();
        let n = batch.len() + usize::from(with_notif);
        if st.cancelled.load(Ordering::SeqCst) {
            // Never sent: resolved here (the canceller is waiting for the count).
            for _ in sent..total {
                st.resolve(Ok(()));
            }
            return;
        }
        w.hdrs.clear();
        w.iov.0.clear();
        {
            let mut f = conn.fifo.lock();
            if let Some(e) = f.dead.clone() {
                drop(f);
                st.resolve_n(total - sent, &e);
                return;
            }
            let first = peer.next_id.fetch_add(n as u64, Ordering::Relaxed);
            for (i, fr) in batch.iter().enumerate() {
                let mut h = Header::new(if op == XferOp::Write {
                    Kind::Write
                } else {
                    Kind::Read
                });
                h.id = first + i as u64;
                h.flags = if op == XferOp::Read {
                    read_flags
                } else {
                    counted
                };
                h.token = fr.token;
                h.addr = fr.addr;
                h.post = post_id;
                if op == XferOp::Write {
                    h.len = fr.len as u32;
                } else {
                    h.size = fr.len;
                }
                w.hdrs.push(h.encode());
                f.push(Entry {
                    id: h.id,
                    post: Some(st.clone()),
                    read: (op == XferOp::Read).then_some((fr.local, fr.len)),
                });
            }
            if with_notif {
                let spec = notif.unwrap_or(NotifSpec { msg: &[], want: 0 });
                let mut h = Header::new(Kind::Notif);
                h.id = first + batch.len() as u64;
                h.len = spec.msg.len() as u32;
                h.size = spec.want;
                h.post = post_id;
                w.hdrs.push(h.encode());
                f.push(Entry {
                    id: h.id,
                    post: Some(st.clone()),
                    read: None,
                });
            }
        }
        for (i, hdr) in w.hdrs.iter().enumerate() {
            w.iov.0.push(libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: HEADER_LEN,
            });
            if let Some(fr) = batch.get(i) {
                if op == XferOp::Write {
                    w.iov.0.push(libc::iovec {
                        iov_base: fr.local as *mut libc::c_void,
                        iov_len: fr.len as usize,
                    });
                }
            } else if let Some(spec) = notif {
                w.iov.0.push(libc::iovec {
                    iov_base: spec.msg.as_ptr() as *mut libc::c_void,
                    iov_len: spec.msg.len(),
                });
            }
        }
        if op == XferOp::Write && w.paced != pace {
            sock::pace(&w.stream, pace);
            w.paced = pace;
        }
        // SAFETY: headers and the notification are live local buffers; WRITE data are local
        // segments the agent validated against our registrations, which the application keeps
        // valid while the request is in flight. writev only reads them.
        let r = unsafe { sock::writev_all(&w.stream, &mut w.iov.0) };
        w.iov.0.clear();
        sent += n;
        if let Err(e) = r {
            let err = Error::from_io(
                ErrorKind::RemoteDisconnect,
                format!("sending to agent {:?} failed", peer.name),
                &e,
            )
            .with_peer(&peer.name);
            // Entries already queued are failed by `fail`; the rest were never sent.
            conn.fail(err.clone());
            st.resolve_n(total - sent, &err);
            return;
        }
    }
}

/// A prepared transfer.
pub(crate) struct TcpXfer {
    inner: Arc<XferInner>,
}

struct XferInner {
    op: XferOp,
    peer: Arc<Peer>,
    shared: Arc<Shared>,
    /// One list per connection when striped, else a single list.
    lists: Vec<Vec<Frame>>,
    /// Bytes each list writes to its socket.
    sends: Vec<u64>,
    /// Whether each list's data stream is paced (the `pace_min_bytes` parameter).
    paced: Vec<bool>,
    frames: usize,
    total: u64,
    current: Mutex<Option<Arc<PostState>>>,
}

impl std::fmt::Debug for TcpXfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpXfer")
            .field("op", &self.inner.op)
            .field("peer", &self.inner.peer.name)
            .field("frames", &self.inner.frames)
            .field("bytes", &self.inner.total)
            .finish()
    }
}

impl TcpXfer {
    /// Builds the frames of a transfer once: segments cut at `chunk` bytes, dealt round-robin
    /// to the connections when the transfer is large enough to stripe.
    pub(crate) fn new(
        shared: Arc<Shared>,
        peer: Arc<Peer>,
        op: XferOp,
        pairs: impl Iterator<Item = (u64, u64, u64, u64)>,
        total: u64,
    ) -> TcpXfer {
        let n = shared.connections;
        let striped = n > 1 && total > shared.stripe_min;
        // Striped, every connection gets a share even of a transfer of a few chunks (a 1 MiB
        // write goes out as two halves in parallel, not as one chunk on one connection), but
        // no piece is cut smaller than MIN_STRIPE_CHUNK unless `chunk_bytes` says so.
        let chunk = if striped {
            shared
                .chunk
                .min(total.div_ceil(n as u64).max(MIN_STRIPE_CHUNK))
        } else {
            shared.chunk
        };
        let mut lists: Vec<Vec<Frame>> = vec![Vec::new(); if striped { n } else { 1 }];
        let mut k = 0usize;
        let mut frames = 0;
        for (local, token, addr, len) in pairs {
            let mut off = 0;
            while off < len {
                let take = (len - off).min(chunk);
                lists[k].push(Frame {
                    local: local + off,
                    token,
                    addr: addr + off,
                    len: take,
                });
                frames += 1;
                off += take;
                if striped {
                    k = (k + 1) % n;
                }
            }
        }
        lists.retain(|l| !l.is_empty());
        // What each connection's share puts on the wire: READ requests are headers only.
        let sends = lists
            .iter()
            .map(|l| match op {
                XferOp::Write => l.iter().map(|f| f.len).sum(),
                XferOp::Read => (l.len() * HEADER_LEN) as u64,
            })
            .collect();
        let paced = lists
            .iter()
            .map(|l| shared.pace_min > 0 && l.iter().map(|f| f.len).sum::<u64>() >= shared.pace_min)
            .collect();
        TcpXfer {
            inner: Arc::new(XferInner {
                op,
                peer,
                shared,
                lists,
                sends,
                paced,
                frames,
                total,
                current: Mutex::new(None),
            }),
        }
    }
}

impl BackendXfer for TcpXfer {
    fn post(&self, notif: Option<&[u8]>, done: CompletionHandle) -> Result<PostOutcome> {
        let x = &self.inner;
        let peer = &x.peer;
        if x.shared.stopping.load(Ordering::SeqCst) {
            return Err(Error::not_found("the TCP backend was shut down"));
        }
        if let Some(m) = notif {
            if m.len() > wire::MAX_NOTIF as usize {
                return Err(Error::invalid_param(format!(
                    "a notification of {} bytes exceeds the TCP limit of {}",
                    m.len(),
                    wire::MAX_NOTIF
                )));
            }
        }
        let set = conns(&x.shared, peer).inspect_err(|e| x.shared.lost_if(peer, e))?;
        // A post on one connection takes the least busy one, the first when all are idle:
        // back-to-back posts then stay on one connection, whose target server is still
        // spinning from the previous one (see `target`), instead of waking another.
        let single = (x.lists.len() == 1).then(|| {
            let mut best = &set.conns[0];
            for c in &set.conns[1..] {
                if best.backlog() == 0 {
                    break;
                }
                if c.backlog() < best.backlog() {
                    best = c;
                }
            }
            best.clone()
        });
        let st = Arc::new(PostState {
            conn: single.clone(),
            remaining: AtomicUsize::new(x.frames + usize::from(notif.is_some())),
            error: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            done,
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        if let Some(conn) = &single {
            // Checked before the post state exists: an early return leaves nothing to resolve.
            // No poll here (it would cost a system call per post): a connection that died
            // since its reader last looked fails the frames through that reader.
            if let Some(e) = conn.dead() {
                x.shared.lost_if(peer, &e);
                return Err(e);
            }
            *x.current.lock() = Some(st.clone());
            let spec = notif.map(|msg| NotifSpec { msg, want: 0 });
            send_frames(x, 0, conn, &st, spec, 0);
            return Ok(PostOutcome::InProgress);
        }
        let post_id = if notif.is_some() {
            peer.next_post.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        *x.current.lock() = Some(st.clone());
        let notif: Option<Arc<[u8]>> = notif.map(Arc::from);
        let frames = x.frames as u64;
        let spec = |k: usize, notif: &Option<Arc<[u8]>>| -> Option<(Arc<[u8]>, u64)> {
            notif.clone().filter(|_| k == 0).map(|m| (m, frames))
        };
        // The posting thread writes the first share itself (it would only wait otherwise, and
        // a hand-off costs a thread wake-up), unless that would hold `post` for long, and any
        // share that puts little on the wire (READ requests): those are written after the
        // large ones were handed to their connections' sender threads, so that the shares go
        // out in parallel.
        let inline =
            |k: usize| (k == 0 && x.sends[0] <= FIRST_SHARE_MAX) || x.sends[k] <= INLINE_SHARE;
        for (k, conn) in set.conns.iter().enumerate().take(x.lists.len()) {
            if inline(k) {
                continue;
            }
            let (xi, c, st, spec) = (x.clone(), conn.clone(), st.clone(), spec(k, &notif));
            let job: Job = Box::new(move || {
                let spec = spec
                    .as_ref()
                    .map(|(msg, want)| NotifSpec { msg, want: *want });
                send_frames(&xi, k, &c, &st, spec, post_id);
            });
            if let Err(mpsc::SendError(job)) = conn.jobs.lock().send(job) {
                // The sender thread is gone (connection closed): run it here; it fails fast.
                job();
            }
        }
        for (k, conn) in set.conns.iter().enumerate().take(x.lists.len()) {
            if inline(k) {
                let spec = spec(k, &notif);
                let spec = spec
                    .as_ref()
                    .map(|(msg, want)| NotifSpec { msg, want: *want });
                send_frames(x, k, conn, &st, spec, post_id);
            }
        }
        Ok(PostOutcome::InProgress)
    }

    fn cancel(&self) -> Result<()> {
        let x = &self.inner;
        let Some(st) = x.current.lock().clone() else {
            return Ok(());
        };
        st.cancelled.store(true, Ordering::SeqCst);
        // Frames already sent are answered by the target; unsent ones are skipped. Once all
        // resolved, nothing of this post can land any more.
        if !st.wait_resolved(x.shared.deadline * 2) {
            tracing::warn!(
                "TCP: agent {:?} did not answer a cancelled post in time; closing its connections",
                x.peer.name
            );
            x.peer.kill();
            if !st.wait_resolved(x.shared.deadline) {
                return Err(Error::repost_active(
                    "the cancelled TCP transfer could not be stopped",
                ));
            }
        }
        Ok(())
    }

    /// Reads the post's connection on the waiting thread, for up to [`WAITER_SPIN`]: the
    /// answer is handled the moment it arrives, without waking the connection's reader thread
    /// (which sleeps through data while anyone watches) and then this thread. Striped posts
    /// are left to the reader threads, which receive their parts in parallel.
    fn progress(&self, budget: Duration) {
        let x = &self.inner;
        let Some(st) = x.current.lock().clone() else {
            return;
        };
        let Some(conn) = st.conn.clone() else {
            return;
        };
        let step = || {
            if let Some(mut rx) = conn.rx.try_lock() {
                if rx.ended {
                    return false;
                }
                if let Err(e) = pump(&x.shared, &x.peer, &conn, &mut rx, false, &|| st.resolved()) {
                    end(&x.shared, &x.peer, &conn, &mut rx, e);
                    return false;
                }
            }
            !st.resolved()
        };
        if st.resolved() {
            return;
        }
        if budget.is_zero() {
            // A `status()` poll: the reader thread sleeps through data while the caller keeps
            // polling, as for a waiter.
            if step() {
                conn.lease();
            } else {
                conn.unlease();
            }
            return;
        }
        let spin = budget.min(WAITER_SPIN);
        conn.watch(true);
        let start = Instant::now();
        while step() {
            if start.elapsed() >= spin {
                break;
            }
            // Yield rather than spin: on a small machine the target (or whoever answers) may
            // need this core; with nothing else to run, this returns at once.
            std::thread::yield_now();
        }
        conn.watch(false);
    }

    fn estimate_cost(&self) -> Result<CostEstimate> {
        // A simple model: ~50 us per post plus ~1 GB/s (loopback on this class of machine).
        let duration_us = 50 + self.inner.total / 1_000;
        Ok(CostEstimate {
            duration_us,
            margin_us: duration_us / 2,
            method: CostMethod::AnalyticalBackend,
        })
    }
}

impl Drop for TcpXfer {
    fn drop(&mut self) {
        let _ = self.cancel();
    }
}

/// Sends a standalone notification to `peer`.
pub(crate) fn send_notif(shared: &Arc<Shared>, peer: &Arc<Peer>, msg: &[u8]) -> Result<()> {
    if msg.len() > wire::MAX_NOTIF as usize {
        return Err(Error::invalid_param(format!(
            "a notification of {} bytes exceeds the TCP limit of {}",
            msg.len(),
            wire::MAX_NOTIF
        )));
    }
    let set = conns(shared, peer).inspect_err(|e| shared.lost_if(peer, e))?;
    let conn = &set.conns[0];
    check_alive(shared, peer, conn)?;
    let w = conn.writer.lock();
    // Not acknowledged (F_NOACK), so not queued for an answer either.
    let id = peer.next_id.fetch_add(1, Ordering::Relaxed);
    if let Some(e) = conn.dead() {
        drop(w);
        shared.lost_if(peer, &e);
        return Err(e);
    }
    let mut h = Header::new(Kind::Notif);
    h.flags = wire::F_NOACK;
    h.id = id;
    h.len = msg.len() as u32;
    let hb = h.encode();
    let mut iov = [
        libc::iovec {
            iov_base: hb.as_ptr() as *mut libc::c_void,
            iov_len: HEADER_LEN,
        },
        libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        },
    ];
    // SAFETY: both iovecs point into live local buffers that writev only reads.
    let r = unsafe { sock::writev_all(&w.stream, &mut iov) };
    drop(w);
    r.map_err(|e| {
        let err = Error::from_io(
            ErrorKind::RemoteDisconnect,
            format!("sending a notification to {:?} failed", peer.name),
            &e,
        )
        .with_peer(&peer.name);
        conn.fail(err.clone());
        shared.lost(peer, &err);
        err
    })
}

fn check_alive(shared: &Shared, peer: &Peer, conn: &Conn) -> Result<()> {
    if let Some(e) = conn.dead() {
        shared.lost_if(peer, &e);
        return Err(e);
    }
    if !sock::alive(&conn.stream) {
        let e = Error::remote_disconnect(format!("agent {:?} is gone", peer.name))
            .with_peer(&peer.name);
        shared.lost(peer, &e);
        return Err(e);
    }
    Ok(())
}

/// Connects ahead of the first transfer and checks that every connection is alive.
pub(crate) fn connect(shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<()> {
    let set = conns(shared, peer).inspect_err(|e| shared.lost_if(peer, e))?;
    for c in &set.conns {
        check_alive(shared, peer, c)?;
    }
    Ok(())
}
