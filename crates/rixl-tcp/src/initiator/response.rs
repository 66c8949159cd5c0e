//! Parsing responses: the framing state of a connection's response stream ([`Rx`]), payloads
//! received in place ([`Body`]: READ data straight into the local segment, or the target's
//! error message), and resolving the requests that each `Ack`, `Data` or `Err` answers.
//!
//! Separate because several threads run it (the reader thread, a thread waiting for its post,
//! a thread polling `status()`; see "Who reads the responses" in the [`initiator`](super)
//! docs): it owns no thread and decides nothing about who reads, only how the bytes on the
//! socket become resolved requests, whoever reads them.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rixl_core::{Error, ErrorKind, Result};

use super::{Conn, Entry, Peer, PostState};
use crate::sock;
use crate::wire::{ErrCode, Header, Kind, HEADER_LEN};
use crate::Shared;

/// The reader thread polls for payloads at least this large instead of sleeping in `readv`.
const POLLED_PAYLOAD: usize = 128 << 10;
/// Payload bytes a waiting thread receives per look at the connection.
const WAITER_PUMP_BYTES: usize = 1 << 20;

/// The state of the response stream between reads: a header in the making or the payload of
/// the frame being received. Whoever holds it may read the socket, so a frame started by one
/// thread is finished by another without losing framing.
pub(super) struct Rx {
    hb: [u8; HEADER_LEN],
    /// Header bytes received so far.
    have: usize,
    pub(super) body: Option<Body>,
    /// The connection ended (failed or closed): nobody reads it any more.
    pub(super) ended: bool,
}

impl Rx {
    /// Nothing received yet.
    pub(super) fn new() -> Rx {
        Rx {
            hb: [0; HEADER_LEN],
            have: 0,
            body: None,
            ended: false,
        }
    }
}

/// The payload of a response frame being received.
pub(super) struct Body {
    pub(super) post: Option<Arc<PostState>>,
    /// `Some(code)`: the target refused the request and the payload is its message, read
    /// into `msg`. `None`: READ data, received straight into the local segment at `addr`.
    err: Option<u64>,
    msg: Vec<u8>,
    addr: u64,
    len: usize,
    got: usize,
    /// The payload must be complete by then (a trickling peer cannot hold the memory).
    pub(super) until: Instant,
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
/// An error means the connection must end ([`end`](super::liveness::end)).
pub(super) fn pump(
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
