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
//! Standalone notifications are not acknowledged ([`wire::F_NOACK`](crate::wire::F_NOACK)).
//!
//! ## Who reads the responses
//!
//! On a machine like the 2-core VMs this is built on, a thread blocked in the kernel takes
//! ~5 us to wake (far more when the core was idle), which is most of a small transfer's round
//! trip. Handing each response from a reader thread to the application thread costs two such
//! wake-ups. So the responses of a connection are read by whoever is there first:
//!
//! - a thread in `wait()` for a post sent on one connection reads that connection itself
//!   ([`TcpXfer::progress`](xfer::TcpXfer#method.progress), up to
//!   [`WAITER_SPIN`](xfer::WAITER_SPIN)); meanwhile arriving data do not wake the
//!   connection's reader thread (its epoll interest drops `EPOLLIN`, keeping hang-ups);
//! - a thread polling `status()` reads it once per poll, and holds a short lease with the
//!   same effect while it keeps polling ([`STATUS_LEASE`](reader::STATUS_LEASE); the reader
//!   thread then sleeps in 1 ms steps so that it takes over in time if the polling stops);
//! - otherwise the reader thread, which sleeps in `epoll_wait` until data arrive. It also
//!   catches end of stream and the response deadline, whatever the other readers do.
//!
//! The parsing state ([`Rx`]: a header in the making, the payload being received) sits under a
//! mutex that a reader holds while it reads, so a frame started by one reader is finished by
//! another and every frame is resolved exactly once. Waiting threads never block on the
//! socket (a peer cannot hold them); the reader thread blocks only for a payload whose header
//! has arrived, bounded by the frame deadline. Striped posts are left to the reader threads,
//! which receive their parts in parallel.
//!
//! ## Where things are
//!
//! This module holds what the others share: the [`Peer`], its connections ([`Conn`], each
//! with the queue of what it sent and awaits an answer for) and the progress of a post
//! ([`PostState`]). The rest is one room per module:
//!
//! - [`dial`]: making a peer's connections (the hello, each connection's threads);
//! - [`send`]: writing requests and notifications on a connection;
//! - [`response`]: parsing responses and resolving the requests they answer;
//! - [`reader`]: the reader thread, and how waiting and polling threads take its place;
//! - [`liveness`]: when a connection counts as lost or stuck, and ending it;
//! - [`xfer`]: the prepared transfer ([`TcpXfer`]): post, progress, cancel, cost.

mod dial;
mod liveness;
mod reader;
mod response;
mod send;
mod xfer;

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rixl_core::{CompletionHandle, Error, Result};

use crate::sock;
use crate::wire::{ConnInfo, Header, Kind};
use crate::NAME;

pub(crate) use dial::connect;
use reader::Watch;
use response::Rx;
pub(crate) use send::send_notif;
use send::Writer;
pub(crate) use xfer::TcpXfer;

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
    /// waiting for one of this connection's posts (see
    /// [`TcpXfer::progress`](xfer::TcpXfer#method.progress)).
    rx: Mutex<Rx>,
    /// What the reader thread sleeps on.
    poller: sock::Poller,
    /// Who reads this connection besides the reader thread. While anyone does, arriving data
    /// do not wake the reader thread (only hang-up and errors do).
    watch: Mutex<Watch>,
    /// `tcpi_bytes_acked` when [`overdue`](liveness::overdue) last found the connection idle.
    acked_seen: AtomicU64,
    /// Until when (`monotonic_nanos`) a thread polling `status()` counts as reading the
    /// connection (see [`Watch::leased`]).
    lease_until: AtomicU64,
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
}

/// The progress of one post.
struct PostState {
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
