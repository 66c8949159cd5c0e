//! Liveness of outbound connections: whether one is lost or stuck (its peer's kernel silent
//! with a probe of ours unanswered, read from `TCP_INFO`; a payload past its deadline;
//! requests unanswered for a whole `deadline`), and ending it, once, when it is.
//!
//! Separate because these verdicts are the backend's liveness policy (the three cases in the
//! crate docs) and read best side by side: the reader thread asks for them after every
//! wake-up, and the request path checks a connection with them before using it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rixl_core::{Error, Result};

use super::response::Rx;
use super::{Conn, Peer};
use crate::sock;
use crate::{Shared, NAME};

/// Whether the connection is lost or stuck: the peer's kernel silent for `unreachable` with a
/// probe of ours unanswered, a payload not complete by its deadline, or requests outstanding
/// and no byte received from the peer, nor acknowledged by its kernel, for a whole `deadline`
/// (a WRITE whose upload outlasts the deadline is answered only at its end). Otherwise, how
/// long the reader thread may sleep before looking again.
pub(super) fn overdue(shared: &Shared, peer: &Peer, conn: &Conn, rx: &Rx) -> Result<Duration> {
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
pub(super) fn end(shared: &Shared, peer: &Peer, conn: &Conn, rx: &mut Rx, err: Error) {
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

/// Whether `conn` can be used: not failed, and not closed by the peer (one `poll`). A peer
/// found gone is reported lost.
pub(super) fn check_alive(shared: &Shared, peer: &Peer, conn: &Conn) -> Result<()> {
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
