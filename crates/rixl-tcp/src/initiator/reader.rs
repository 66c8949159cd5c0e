//! The reader thread of a connection, and how waiting and polling threads take its place:
//! the [`Watch`] on who else reads the connection, the lease of a thread polling `status()`,
//! and the epoll interest that lets the reader thread sleep through data meanwhile (see "Who
//! reads the responses" in the [`initiator`](super) docs).
//!
//! Separate from the parsing ([`response`](super::response)), which every reader runs the
//! same way, and from the verdicts on a quiet connection ([`liveness`](super::liveness)),
//! which the reader thread asks for after every wake-up: this module decides only when the
//! reader thread sleeps and what wakes it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rixl_core::completion::monotonic_nanos;
use rixl_core::{Error, ErrorKind};

use super::liveness::{end, overdue};
use super::response::pump;
use super::{Conn, Peer};
use crate::Shared;

/// How long a `status()` poll keeps the reader thread from being woken by data: the caller is
/// expected to poll again well within this.
pub(super) const STATUS_LEASE: Duration = Duration::from_micros(500);
/// After the last `status()` poll, how long the reader thread keeps sleeping in short steps.
const POLLED_RECENTLY: Duration = Duration::from_millis(20);

#[derive(Default)]
pub(super) struct Watch {
    /// Threads reading the connection while they wait
    /// ([`TcpXfer::progress`](super::xfer::TcpXfer#method.progress) with a budget).
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

impl Watch {
    /// Data wake the reader thread (nobody else reads the connection yet).
    pub(super) fn new() -> Watch {
        Watch {
            armed: true,
            ..Watch::default()
        }
    }
}

impl Conn {
    /// A thread starts (`true`) or stops reading this connection while it waits. While any
    /// thread does, arriving data do not wake the reader thread; once none does, they wake it
    /// again (at once if data are queued).
    pub(super) fn watch(&self, on: bool) {
        let mut w = self.watch.lock();
        w.waiters = if on {
            w.waiters + 1
        } else {
            w.waiters.saturating_sub(1)
        };
        self.rearm(&mut w);
    }

    /// A thread polling `status()` reads this connection for the next [`STATUS_LEASE`].
    pub(super) fn lease(&self) {
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
    pub(super) fn unlease(&self) {
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

/// The reader thread of one connection: sleeps until the socket has something to read (data
/// do not wake it while a waiting thread reads the socket itself), handles whatever arrived,
/// and ends the connection on end of stream, a protocol violation, or no answer in time.
pub(super) fn reader(shared: &Arc<Shared>, peer: &Arc<Peer>, conn: &Arc<Conn>) {
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
