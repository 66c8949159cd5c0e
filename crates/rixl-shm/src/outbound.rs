//! Our side of each peer's control connection: connecting and saying who we are, offering the
//! notification ring, watching the connection for the peer's death, and sending notifications.
//!
//! Separate from `inbound`, which serves the connections peers make to us: the two directions
//! share the frame format (`wire`) but no state, and on this one the peer only ever answers the
//! ring offer. Posts use it too, since the connection is also every post's liveness check.

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rixl_core::{Error, ErrorKind, Result};

use crate::peer::{check_alive, Peer};
use crate::{ring, wire, Shared};

/// How recent the peer's last look at its notification ring must be for a standalone
/// notification to skip the socket's liveness check. Killing and reaping a process takes far
/// longer, so a peer seen this recently was alive when the caller decided to send.
const SEEN_FRESH_NS: u64 = 20_000;

/// Makes the control connection to `peer` unless there is one: the hello, the ring offer and
/// the thread that watches for the peer's death.
pub(crate) fn connect_peer(shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<()> {
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

/// Sends a notification. `after_data`: it belongs to a post whose data just reached the peer,
/// which proves the peer alive a moment ago, so the socket need not be asked again.
pub(crate) fn send_notif_to(
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
