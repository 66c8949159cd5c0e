//! The peers we can reach, and whether each is still alive and reachable.
//!
//! `process_vm_*` addresses a peer by pid alone, so before touching its memory a post must know
//! that the pid still belongs to the agent whose connection info we loaded. The answer comes
//! from our control connection to it (`outbound`): the kernel closes a dead process's sockets
//! before its pid can be reused. These rules are separate from the connection code because
//! posts, notifications and explicit connects all rely on them, each with its own freshness.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use rixl_core::{Desc, Result, Segment, XferOp};

use crate::host::ConnInfo;
use crate::{cma, live, ring, NAME};

/// One peer we can reach.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) name: String,
    pub(crate) info: ConnInfo,
    pub(crate) alive: AtomicBool,
    /// We are closing on purpose: end-of-stream is not a failure.
    pub(crate) closing: AtomicBool,
    access_checked: AtomicBool,
    /// The peer is an agent of this very process. Decided once at load: `std::process::id()`
    /// is a real `getpid` system call (glibc stopped caching it), about 0.15 us, which a 4 KiB
    /// post used to pay on every liveness check.
    in_this_process: bool,
    /// When the control socket last showed the peer alive (`monotonic_nanos`), so that posts
    /// poll it at most once per [`LIVENESS_RECHECK_NS`].
    alive_checked_ns: AtomicU64,
    /// Outbound control connection, made on first need.
    pub(crate) conn: Mutex<Option<UnixStream>>,
    /// Our notification ring to the peer, if it mapped one; written under `conn`'s lock so
    /// that ring records and socket frames keep their order.
    pub(crate) ring: Mutex<Option<ring::Ring>>,
}

impl Peer {
    /// A peer as loaded from its connection info: alive until shown otherwise, not connected.
    pub(crate) fn new(name: &str, info: ConnInfo) -> Peer {
        let in_this_process = info.pid == std::process::id();
        Peer {
            name: name.to_owned(),
            info,
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            access_checked: AtomicBool::new(false),
            in_this_process,
            alive_checked_ns: AtomicU64::new(0),
            conn: Mutex::new(None),
            ring: Mutex::new(None),
        }
    }

    /// Checks once per peer that the kernel lets us access it, with a 1-byte read.
    pub(crate) fn check_access(&self, desc: &Desc) -> Result<()> {
        if self.access_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        let l = [Segment {
            addr: byte.as_mut_ptr() as u64,
            len: 1,
            dev: 0,
            token: 0,
        }];
        let r = [Segment {
            addr: desc.addr,
            len: 1,
            dev: 0,
            token: 0,
        }];
        match cma::transfer(self.info.pid, XferOp::Read, &l, &r, || true) {
            Ok(()) => {
                self.access_checked.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.with_peer(&self.name).with_backend(NAME)),
        }
    }
}

/// How long a liveness check of the control socket stays good for posts. A dead peer's pid is
/// handed out again only after the kernel's pid counter wraps (`pid_max`, at least 32768
/// creations later); no machine creates that many processes in a millisecond, so within this
/// window `process_vm_*` cannot reach a process that inherited the pid. The reader thread also
/// clears `alive` as soon as it sees the socket close, whatever the window.
const LIVENESS_RECHECK_NS: u64 = 1_000_000;

/// True unless the peer's end of our control connection is closed. The kernel closes a dead
/// process's sockets before its pid can be reused, so a `poll` that finds the socket open
/// guarantees that `process_vm_*` does not reach a different process that inherited the pid;
/// one poll serves the posts of the next [`LIVENESS_RECHECK_NS`] (a system call per 4 KiB post
/// was a fifth of its cost).
pub(crate) fn peer_alive(peer: &Peer) -> bool {
    check_alive(peer, false)
}

/// [`peer_alive`], always asking the socket (`fresh`) or trusting a check younger than
/// [`LIVENESS_RECHECK_NS`]. Notifications and explicit connects ask fresh: a notification
/// written into the shared-memory ring of a dead peer would otherwise vanish without an error.
pub(crate) fn check_alive(peer: &Peer, fresh: bool) -> bool {
    if !peer.alive.load(Ordering::SeqCst) {
        return false;
    }
    if peer.in_this_process {
        return live::instance(&peer.info.socket).is_some();
    }
    let now = rixl_core::completion::monotonic_nanos();
    if !fresh
        && now.saturating_sub(peer.alive_checked_ns.load(Ordering::Relaxed)) < LIVENESS_RECHECK_NS
    {
        return true;
    }
    let alive = socket_open(peer);
    if alive {
        peer.alive_checked_ns.store(now, Ordering::Relaxed);
    }
    alive
}

/// One zero-timeout `poll` of the outbound control socket: false once the peer closed it.
fn socket_open(peer: &Peer) -> bool {
    let slot = peer.conn.lock();
    let Some(conn) = slot.as_ref() else {
        return true;
    };
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for a socket we own (kept open by the lock guard);
    // a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    !(n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}
