//! The initiator side: connections to one peer, the per-connection queue of requests awaiting
//! a response, the reader thread that completes them, and prepared transfers.
//!
//! Each peer gets `connections` TCP connections, made on first use (or `connect`). Requests on
//! one connection are answered in order, so each connection keeps a FIFO of what it sent: an
//! `Ack(id)` completes every entry up to `id`, `Data(id)` carries a READ's bytes (received
//! straight into the local segment), `Err(id)` fails one entry. A post's frames are counted in
//! a [`PostState`]; when the last one resolves, the request completes.
//!
//! Small posts go out on one connection, written by the posting thread (one `writev` for many
//! frames), with the notification right behind the data on the same ordered stream. Large posts
//! are cut into chunks dealt round-robin to every connection and written by per-connection
//! sender threads; their notification names the post and the number of parts, and the target
//! delivers it once every part has been served (see `target::Session`).

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rixl_core::{
    BackendXfer, CompletionHandle, CostEstimate, CostMethod, Error, ErrorKind, PostOutcome, Result,
    XferOp,
};

use crate::sock;
use crate::wire::{self, ConnInfo, ErrCode, Header, Hello, Kind, HEADER_LEN};
use crate::{Shared, NAME};

/// Frames written per `writev` batch.
const BATCH: usize = 128;

/// One peer we can reach.
#[derive(Debug)]
pub struct Peer {
    pub name: String,
    pub info: ConnInfo,
    pub alive: AtomicBool,
    /// We are closing on purpose: end of stream is not a failure.
    pub closing: AtomicBool,
    conns: Mutex<Option<Arc<ConnSet>>>,
    next_id: AtomicU64,
    next_post: AtomicU64,
    rr: AtomicUsize,
    /// Our tokens for the peer's regions → the target's own tokens (published by it).
    pub regions: Mutex<std::collections::HashMap<u64, u64>>,
}

impl Peer {
    pub fn new(name: &str, info: ConnInfo) -> Peer {
        Peer {
            name: name.to_owned(),
            info,
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            conns: Mutex::new(None),
            next_id: AtomicU64::new(1),
            next_post: AtomicU64::new(1),
            rr: AtomicUsize::new(0),
            regions: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Closes every connection (with a goodbye when it can be sent at once).
    pub fn close(&self) {
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
}

/// The progress of one post.
pub struct PostState {
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
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
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

    fn resolve_n(&self, n: usize, err: &Error) {
        for _ in 0..n {
            self.resolve(Err(err.clone()));
        }
    }

    /// Waits until every frame resolved; false if `limit` passed first.
    fn wait_resolved(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        let mut g = self.lock.lock();
        while self.remaining.load(Ordering::Acquire) > 0 {
            if self.cv.wait_until(&mut g, until).timed_out() {
                return self.remaining.load(Ordering::Acquire) == 0;
            }
        }
        true
    }
}

/// One frame of a prepared transfer: `len` bytes between local `local` and the target's
/// `addr` in its region `token`.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
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
        let conn = Arc::new(Conn {
            idx,
            writer: Mutex::new(Writer {
                stream: clone(&stream)?,
                hdrs: Vec::with_capacity(BATCH + 1),
                iov: IoVecs(Vec::with_capacity(2 * BATCH + 2)),
            }),
            stream,
            fifo: Mutex::new(Fifo {
                q: VecDeque::new(),
                dead: None,
                progress: Instant::now(),
            }),
            jobs: Mutex::new(tx),
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
    let per_try = shared.deadline.min(Duration::from_secs(2));
    let fail = |kind: ErrorKind, what: &str, e: &std::io::Error| {
        Error::from_io(kind, format!("{what} agent {:?} at {addr}", peer.name), e)
            .with_peer(&peer.name)
            .with_backend(NAME)
    };
    let s = TcpStream::connect_timeout(&addr, per_try)
        .map_err(|e| fail(ErrorKind::RemoteDisconnect, "cannot connect to", &e))?;
    sock::configure(&s, shared.keepalive_secs, shared.deadline)
        .map_err(|e| fail(ErrorKind::Backend, "cannot configure the connection to", &e))?;
    let hello = Hello {
        version: wire::VERSION,
        from: shared.ctx.agent_name.clone(),
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

/// Reads responses on one connection until it ends.
fn reader(shared: &Arc<Shared>, peer: &Arc<Peer>, conn: &Arc<Conn>) {
    let err = match read_responses(shared, peer, conn) {
        Ok(()) => Error::remote_disconnect(format!("agent {:?} closed the connection", peer.name)),
        Err(e) => e,
    };
    let err = err.with_peer(&peer.name).with_backend(NAME);
    let on_purpose = peer.closing.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst);
    if on_purpose {
        conn.fail(peer.gone());
    } else {
        // Whatever ended the connection (death, partition, a protocol violation), the peer
        // cannot be used through it any more: fail its requests and have the agent drop it.
        conn.fail(err.clone());
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

fn read_responses(shared: &Shared, peer: &Peer, conn: &Conn) -> Result<()> {
    let mut hb = [0u8; HEADER_LEN];
    let io = |e: std::io::Error| {
        Error::from_io(
            ErrorKind::RemoteDisconnect,
            format!("connection to agent {:?} failed", peer.name),
            &e,
        )
    };
    loop {
        // Wait for the next response; with requests outstanding, no byte for a whole
        // deadline means the peer is stuck or partitioned.
        let mut stuck = false;
        let more = sock::read_header(&conn.stream, &mut hb, shared.deadline, || {
            let f = conn.fifo.lock();
            if !f.q.is_empty() && f.progress.elapsed() >= shared.deadline {
                stuck = true;
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            Ok(sock::Idle::Wait)
        });
        match more {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(_) if stuck => {
                return Err(Error::timeout(format!(
                    "agent {:?} did not answer within {:?}",
                    peer.name, shared.deadline
                )))
            }
            Err(e) => return Err(io(e)),
        }
        let h = Header::parse(&hb).map_err(|e| proto(peer, e))?;
        match h.kind {
            Kind::Ack => {
                pop_before(peer, conn, h.id, true)?;
            }
            Kind::Err => {
                let mut msg = vec![0u8; h.len as usize];
                sock::read_exact(
                    &conn.stream,
                    &mut msg,
                    Some(Instant::now() + shared.deadline),
                )
                .map_err(io)?;
                let e = pop_before(peer, conn, h.id, false)?
                    .ok_or_else(|| proto(peer, format!("error for unknown request {}", h.id)))?;
                let err = ErrCode::from_u64(h.size)
                    .to_error(&String::from_utf8_lossy(&msg))
                    .with_peer(&peer.name);
                if let Some(p) = e.post {
                    p.resolve(Err(err));
                }
            }
            Kind::Data => {
                let e = pop_before(peer, conn, h.id, false)?
                    .ok_or_else(|| proto(peer, format!("data for unknown request {}", h.id)))?;
                let Some((addr, len)) = e.read.filter(|(_, l)| *l == u64::from(h.len)) else {
                    // Put nothing anywhere: the connection is failed below.
                    if let Some(p) = &e.post {
                        p.resolve(Err(proto(peer, "unexpected data")));
                    }
                    return Err(proto(peer, format!("data of the wrong size for {}", h.id)));
                };
                let mut iov = [libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len as usize,
                }];
                let deadline = Instant::now() + shared.deadline + Duration::from_micros(len / 10);
                // SAFETY: `[addr, addr+len)` is a local segment the agent validated against our
                // registrations when the request was made; the request (and its post, which
                // `e` keeps) is in flight, and cancel waits for this entry to resolve, so the
                // memory is registered and not otherwise accessed meanwhile.
                let r = unsafe { sock::readv_exact(&conn.stream, &mut iov, Some(deadline)) };
                if let Err(err) = r {
                    let err = io(err);
                    if let Some(p) = &e.post {
                        p.resolve(Err(err.clone()));
                    }
                    return Err(err);
                }
                if let Some(p) = e.post {
                    p.resolve(Ok(()));
                }
            }
            other => return Err(proto(peer, format!("unexpected {other:?} frame"))),
        }
        conn.fifo.lock().progress = Instant::now();
    }
}

/// What follows the data frames of one connection's share of a post.
#[derive(Clone, Copy)]
struct NotifSpec<'a> {
    msg: &'a [u8],
    /// Parts the target must serve first (0: the data is ahead on this stream).
    want: u64,
}

/// Writes `frames` (and the notification) on `conn`, resolving each frame exactly once: by the
/// reader when answered, here when it is never sent.
fn send_frames(
    op: XferOp,
    peer: &Peer,
    conn: &Conn,
    st: &Arc<PostState>,
    frames: &[Frame],
    notif: Option<NotifSpec<'_>>,
    post_id: u64,
) {
    let counted = if post_id != 0 { wire::F_COUNTED } else { 0 };
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
                h.flags = counted;
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
pub struct TcpXfer {
    inner: Arc<XferInner>,
}

struct XferInner {
    op: XferOp,
    peer: Arc<Peer>,
    shared: Arc<Shared>,
    /// One list per connection when striped, else a single list.
    lists: Vec<Vec<Frame>>,
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
    pub fn new(
        shared: Arc<Shared>,
        peer: Arc<Peer>,
        op: XferOp,
        pairs: impl Iterator<Item = (u64, u64, u64, u64)>,
        total: u64,
    ) -> TcpXfer {
        let n = shared.connections;
        let striped = n > 1 && total > shared.stripe_min;
        let mut lists: Vec<Vec<Frame>> = vec![Vec::new(); if striped { n } else { 1 }];
        let mut k = 0usize;
        let mut frames = 0;
        for (local, token, addr, len) in pairs {
            let mut off = 0;
            while off < len {
                let take = (len - off).min(shared.chunk);
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
        TcpXfer {
            inner: Arc::new(XferInner {
                op,
                peer,
                shared,
                lists,
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
        let st = Arc::new(PostState {
            remaining: AtomicUsize::new(x.frames + usize::from(notif.is_some())),
            error: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            done,
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        if x.lists.len() == 1 {
            let i = peer.rr.fetch_add(1, Ordering::Relaxed) % set.conns.len();
            let conn = &set.conns[i];
            // Checked before the post state exists: an early return leaves nothing to resolve.
            // No poll here (it would cost a system call per post): a connection that died
            // since its reader last looked fails the frames through that reader.
            if let Some(e) = conn.dead() {
                x.shared.lost_if(peer, &e);
                return Err(e);
            }
            *x.current.lock() = Some(st.clone());
            let spec = notif.map(|msg| NotifSpec { msg, want: 0 });
            send_frames(x.op, peer, conn, &st, &x.lists[0], spec, 0);
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
        for (k, conn) in set.conns.iter().enumerate().take(x.lists.len()) {
            let (xi, c, st, notif) = (x.clone(), conn.clone(), st.clone(), notif.clone());
            let job: Job = Box::new(move || {
                let spec = notif
                    .as_deref()
                    .filter(|_| k == 0)
                    .map(|msg| NotifSpec { msg, want: frames });
                send_frames(xi.op, &xi.peer, &c, &st, &xi.lists[k], spec, post_id);
            });
            if let Err(mpsc::SendError(job)) = conn.jobs.lock().send(job) {
                // The sender thread is gone (connection closed): run it here; it fails fast.
                job();
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
pub fn send_notif(shared: &Arc<Shared>, peer: &Arc<Peer>, msg: &[u8]) -> Result<()> {
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
    let id = peer.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut f = conn.fifo.lock();
        if let Some(e) = f.dead.clone() {
            drop(f);
            shared.lost_if(peer, &e);
            return Err(e);
        }
        f.push(Entry {
            id,
            post: None,
            read: None,
        });
    }
    let mut h = Header::new(Kind::Notif);
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
pub fn connect(shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<()> {
    let set = conns(shared, peer).inspect_err(|e| shared.lost_if(peer, e))?;
    for c in &set.conns {
        check_alive(shared, peer, c)?;
    }
    Ok(())
}
