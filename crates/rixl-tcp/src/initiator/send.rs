//! Writing requests: a post's frames batched into `writev` calls (the headers, and WRITE data
//! straight from the local segments), the notification right behind them, the pacing of
//! large shares, and standalone notifications.
//!
//! Separate from the transfer ([`xfer`](super::xfer)), which decides which share goes on
//! which connection and which thread writes it: only this module writes requests on a
//! connection (through its [`Writer`]; the hello is [`dial`](super::dial)'s, the goodbye
//! [`Peer::close`]'s), and it queues every frame it writes for its answer, so what it must
//! uphold is in one place: each frame resolved exactly once, by its answer or here when it is
//! never sent, and the frames of one post in order on their stream.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rixl_core::{Error, ErrorKind, Result, XferOp};

use super::dial::conns;
use super::liveness::check_alive;
use super::xfer::XferInner;
use super::{Conn, Entry, Peer, PostState};
use crate::sock;
use crate::wire::{self, Header, Kind, HEADER_LEN};
use crate::Shared;

/// Frames written per `writev` batch.
const BATCH: usize = 128;

/// Send-able iovec storage, reused by the writer (holds pointers only during a call).
struct IoVecs(Vec<libc::iovec>);
// SAFETY: the vector is cleared after every use, so it never carries pointers across threads.
unsafe impl Send for IoVecs {}

/// The writing side of a connection, held per batch (see [`send_frames`]).
pub(super) struct Writer {
    pub(super) stream: TcpStream,
    hdrs: Vec<[u8; HEADER_LEN]>,
    iov: IoVecs,
    /// Whether the socket's send buffer is the paced one (see the `pace_min_bytes` parameter).
    paced: bool,
}

impl Writer {
    /// Room for one batch, and the normal (unpaced) send buffer.
    pub(super) fn new(stream: TcpStream) -> Writer {
        Writer {
            stream,
            hdrs: Vec::with_capacity(BATCH + 1),
            iov: IoVecs(Vec::with_capacity(2 * BATCH + 2)),
            paced: false,
        }
    }
}

/// What follows the data frames of one connection's share of a post.
#[derive(Clone, Copy)]
pub(super) struct NotifSpec<'a> {
    pub(super) msg: &'a [u8],
    /// Parts the target must serve first (0: the data is ahead on this stream).
    pub(super) want: u64,
}

/// Writes share `k` of transfer `x` (and the notification) on `conn`, resolving each frame
/// exactly once: by the reader when answered, here when it is never sent.
pub(super) fn send_frames(
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
