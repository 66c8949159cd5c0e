//! The connections peers make to us: the accept loop, one reader thread per connection, the
//! frames and notification rings they carry, doorbells and polling windows, and the detection
//! of a peer that died (end of stream without a goodbye).
//!
//! Everything on the receiving side of a notification lives here, apart from the connections we
//! make ourselves (`outbound`): the state of an accepted connection is touched only by its
//! reader thread and by threads polling for notifications, both through this module.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rixl_core::Error;

use crate::{ring, wire, Shared};

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

/// The accept thread: takes connections from peers of our user (or root) and starts a reader
/// thread for each, until the backend stops.
pub(crate) fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
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
pub(crate) struct Inbound {
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

impl Inbound {
    /// Closes the connection; its reader thread then finishes it.
    pub(crate) fn close(&self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
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
/// without waiting for the connections' reader threads to wake up.
pub(crate) fn poll_inbound(shared: &Shared) {
    // A thread inside `wait_notif` marks the rings attended; only other polls (NIXL-style
    // `get_notifs` loops) open polling windows.
    let attended = *shared.attending.lock() > 0;
    // The empty poll, which a NIXL-style loop makes millions of times, allocates nothing: the
    // list is walked under its lock and only connections with something to read are kept,
    // to be drained after the lock is released (draining may write an acknowledgement).
    let mut ready: Vec<(Arc<Inbound>, bool)> = Vec::new();
    // Read the clock once, and only for a ring (an agent whose peers use other backends
    // reads no clock here).
    let mut now = None;
    for inbound in shared.inbound.lock().iter() {
        // With a ring, waiting threads read only the ring (one atomic load when it is empty);
        // the socket then carries doorbells for the reader thread, and notifications too
        // large for the ring, which a stalled `SOCKET` record asks for.
        let ring_only = match inbound.ring.get() {
            Some(r) => {
                let now = *now.get_or_insert_with(ring::now_ns);
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

/// A thread of this agent starts (`on`) or stops watching for notifications in a polling loop
/// (`Notifications::attend_notifs`). While any thread watches, the rings are marked attended
/// and senders skip the doorbell; after the last one stops, what arrived meanwhile is delivered.
pub(crate) fn attend(shared: &Shared, on: bool) {
    let mut n = shared.attending.lock();
    let was = *n;
    *n = if on { was + 1 } else { was.saturating_sub(1) };
    if (was == 0) != (*n == 0) {
        let list: Vec<Arc<Inbound>> = shared.inbound.lock().clone();
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
                        st.end = drain(shared, inbound, &mut st, read_socket);
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
