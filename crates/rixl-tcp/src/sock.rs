//! Socket helpers: options, vectored I/O on raw memory ranges, liveness, local addresses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Most iovecs handed to one `readv`/`writev` (the kernel's IOV_MAX is 1024).
pub(crate) const IOV_BATCH: usize = 512;

/// Applies the liveness settings to a connected socket: no Nagle (small frames go out at once),
/// keepalive probes once a second after `keepalive_secs` without hearing from the peer, and
/// `TCP_USER_TIMEOUT` so that the kernel aborts the connection once data or probes stay
/// unacknowledged for `unreachable` (a crashed host or a cut link; a live peer's kernel answers
/// probes even when its process is frozen). Send/receive timeouts bound every blocking call by
/// `deadline` without progress.
pub(crate) fn configure(
    s: &TcpStream,
    keepalive_secs: u32,
    unreachable: Duration,
    deadline: Duration,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    let set = |level: i32, opt: i32, v: i32| set_int(s, level, opt, v);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        keepalive_secs.clamp(1, 32767) as i32,
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    let ms = unreachable.as_millis().clamp(1, i32::MAX as u128) as i32;
    // With TCP_USER_TIMEOUT set, the kernel ends a keepalive-probed connection by that time
    // rather than by the probe count; the count only matters if a kernel ignores it.
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        (ms / 1000).clamp(1, 127),
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    // Larger buffers keep striped streams busy on fast paths; the kernel clamps them.
    let _ = set(libc::SOL_SOCKET, libc::SO_SNDBUF, SEND_BUFFER);
    let _ = set(libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    s.set_write_timeout(Some(deadline))?;
    s.set_read_timeout(Some(deadline))?;
    Ok(())
}

/// True unless the peer has closed or reset the connection (one non-blocking `poll`).
pub(crate) fn alive(s: &TcpStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket we own; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    !(n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Drops the first `n` bytes of a list of iovecs in place; returns the first non-empty index.
fn advance(iov: &mut [libc::iovec], mut start: usize, mut n: usize) -> usize {
    while n > 0 && start < iov.len() {
        let l = iov[start].iov_len;
        if n >= l {
            n -= l;
            start += 1;
        } else {
            iov[start].iov_len -= n;
            // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
            iov[start].iov_base = unsafe { (iov[start].iov_base as *mut u8).add(n) }.cast();
            n = 0;
        }
    }
    while start < iov.len() && iov[start].iov_len == 0 {
        start += 1;
    }
    start
}

/// A blocking call that hit the socket's send or receive timeout (`EAGAIN`). Not `ETIMEDOUT`:
/// that is the kernel giving up on an unreachable peer, which ends the connection.
fn timed_out(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Writes every byte described by `iov` (consumed in place).
///
/// # Safety
/// Every iovec must describe memory readable for its length for the duration of the call.
pub(crate) unsafe fn writev_all(s: &TcpStream, iov: &mut [libc::iovec]) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { writev_until(s, iov, None) }
}

/// How many of our bytes the peer's kernel has acknowledged on `s` (`TCP_INFO`'s
/// `tcpi_bytes_acked`); `None` when the kernel does not report it. A slow link drains megabytes
/// of socket buffer after the last `write` returned: acknowledgements are the progress a
/// response deadline must see then.
pub(crate) fn bytes_acked(s: &TcpStream) -> Option<u64> {
    let (info, len) = tcp_info(s)?;
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    (len >= needed).then_some(info.tcpi_bytes_acked)
}

/// How long the peer's kernel has acknowledged nothing on `s` while a keepalive probe of ours
/// went unanswered; `None` while it answers (or nothing was probed yet). This is what tells a
/// crashed host or a cut link from a slow peer while we wait for an answer with nothing of ours
/// unacknowledged: the kernel itself only gives up at its next probe.
pub(crate) fn unanswered_for(s: &TcpStream) -> Option<Duration> {
    let (info, _) = tcp_info(s)?;
    (info.tcpi_probes > 0).then(|| Duration::from_millis(info.tcpi_last_ack_recv.into()))
}

/// A connection's send buffer outside paced streams (the kernel doubles the value for its
/// bookkeeping and clamps it to `net.core.wmem_max`): large, so that a burst of frames or a
/// large frame goes into the socket in one call and the writer never sleeps mid-burst.
pub(crate) const SEND_BUFFER: i32 = 4 << 20;
/// The smallest send buffer of a paced stream (see [`pace`]).
const PACE_MIN_BUFFER: u64 = 128 << 10;
/// A paced send buffer holds this many bytes per microsecond of the path's minimum round trip
/// (8 GB/s per connection), so that pacing never caps a long path.
const PACE_BYTES_PER_RTT_US: u64 = 8 << 10;

/// Shrinks the send buffer of `s` for a long stream of data (`on`), or restores
/// [`SEND_BUFFER`]. Returns whether the buffer was changed.
///
/// Why: between two processes on one machine (loopback, or a veth pair between namespaces)
/// a transfer costs two copies per byte, into the socket and out of it, and the second copy is
/// cheap only while the bytes are still in cache. When source and destination are larger than
/// the caches, a 4 MiB buffer lets the writer run megabytes ahead of the reader, whose copy
/// then reads data that left the cache; a buffer of a few hundred KiB keeps the writer just
/// ahead, and the reader copies what was just written. Measured on this project's 2-core VM
/// (medians of 3 interleaved rounds): WRITE 16 × 4 MiB 4.1 → 6.4 GB/s, 16 × 16 MiB 3.5 →
/// 7.1, READ 16 × 16 MiB 3.6 → 7.2; across a veth pair, WRITE 16 × 16 MiB 3.4 → 4.6.
///
/// A long path needs its bandwidth-delay product in flight, so the paced buffer is the path's
/// minimum round trip (`TCP_INFO`'s `tcpi_min_rtt`, which queueing does not inflate) times
/// 8 GB/s, at least 128 KiB; where that reaches [`SEND_BUFFER`] (a round trip of 0.5 ms or
/// more, or an unknown one) pacing leaves the buffer alone.
pub(crate) fn pace(s: &TcpStream, on: bool) -> bool {
    let bytes = if on {
        match paced_buffer(s) {
            Some(b) => b,
            None => return false,
        }
    } else {
        SEND_BUFFER
    };
    set_int(s, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes).is_ok()
}

/// The send buffer [`pace`] would use on `s`, or `None` when pacing would not shrink it.
pub(crate) fn paced_buffer(s: &TcpStream) -> Option<i32> {
    let (info, len) = tcp_info(s)?;
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt) + 4;
    if len < needed {
        return None;
    }
    paced_size(info.tcpi_min_rtt)
}

/// The paced send buffer for a path whose minimum round trip is `min_rtt_us`.
fn paced_size(min_rtt_us: u32) -> Option<i32> {
    // An unmeasured minimum reads as u32::MAX, which lands above SEND_BUFFER.
    let bytes = (u64::from(min_rtt_us) * PACE_BYTES_PER_RTT_US).max(PACE_MIN_BUFFER);
    (bytes < SEND_BUFFER as u64).then_some(bytes as i32)
}

/// Payloads from this size on are acknowledged at once when received (see [`quickack`]).
pub(crate) const QUICKACK_PAYLOAD: usize = 16 << 10;

/// Asks the kernel to acknowledge what `s` has received now and to leave delayed-ACK mode.
/// Requests one way and data the other make a connection look interactive to Linux, which
/// then holds ACKs back (tens of milliseconds) hoping to piggyback them on data; a peer sending
/// a burst of large frames stalls on its congestion window meanwhile. Seen across a veth link
/// with a 1500-byte MTU: READ of 16 × 64 KiB at p99 11 ms and 0.7 GB/s, against 1.2 ms and
/// 2 GB/s with this after each payload. The mode comes back with the next request, so callers
/// ask again after every large payload. Best effort: a failure only costs the delay.
pub(crate) fn quickack(s: &TcpStream) {
    let _ = set_int(s, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
}

/// Sets an integer socket option on `s`.
fn set_int(s: &TcpStream, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: `v` is a valid c_int for the duration of the call; `s` is our open socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How long ago the peer's kernel last acknowledged anything on `s`.
pub(crate) fn silent_for(s: &TcpStream) -> Option<Duration> {
    tcp_info(s).map(|(info, _)| Duration::from_millis(info.tcpi_last_ack_recv.into()))
}

/// The kernel's `TCP_INFO` for `s` and how many bytes of it the kernel filled.
fn tcp_info(s: &TcpStream) -> Option<(libc::tcp_info, usize)> {
    // SAFETY: tcp_info is plain old data, for which all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable tcp_info of `len` bytes, which the kernel fills (and
    // `len` says how much); `s` is our open socket.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len as usize))
}

/// [`writev_all`] with an overall deadline, so that a peer reading one byte at a time cannot
/// hold the sender (and the registered memory it reads from) for long.
///
/// # Safety
/// Every iovec must describe memory readable for its length for the duration of the call.
pub(crate) unsafe fn writev_until(
    s: &TcpStream,
    iov: &mut [libc::iovec],
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut start = advance(iov, 0, 0);
    while start < iov.len() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not take a whole frame in time",
            ));
        }
        let cnt = (iov.len() - start).min(IOV_BATCH);
        // SAFETY: the caller guarantees the iovecs are readable; `start + cnt <= len`.
        let n = unsafe { libc::writev(s.as_raw_fd(), iov.as_ptr().add(start), cnt as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        start = advance(iov, start, n as usize);
    }
    Ok(())
}

/// Reads exactly the bytes described by `iov` (consumed in place). `deadline` bounds the whole
/// call, so a peer trickling bytes cannot hold a reader (and the memory it fills) forever.
///
/// # Safety
/// Every iovec must describe memory writable for its length for the duration of the call, and
/// not otherwise accessed meanwhile.
pub(crate) unsafe fn readv_exact(
    s: &TcpStream,
    iov: &mut [libc::iovec],
    deadline: Option<Instant>,
) -> io::Result<()> {
    let all = iov.iter().map(|v| v.iov_len).sum();
    // SAFETY: forwarded from the caller.
    unsafe { readv_min(s, iov, all, deadline) }.map(drop)
}

/// Reads at least `min` bytes into `iov` (consumed in place), and whatever more of `iov` the
/// same calls deliver; returns the bytes read. A reader that knows what comes next (the next
/// frame's header after a payload) gets it in the same system call when it is already there.
/// `deadline` bounds the whole call, as for [`readv_exact`].
///
/// # Safety
/// Every iovec must describe memory writable for its length for the duration of the call, and
/// not otherwise accessed meanwhile.
pub(crate) unsafe fn readv_min(
    s: &TcpStream,
    iov: &mut [libc::iovec],
    min: usize,
    deadline: Option<Instant>,
) -> io::Result<usize> {
    let mut got = 0;
    let mut start = advance(iov, 0, 0);
    while got < min && start < iov.len() {
        let cnt = (iov.len() - start).min(IOV_BATCH);
        // SAFETY: the caller guarantees the iovecs are writable; `start + cnt <= len`.
        let n = unsafe { libc::readv(s.as_raw_fd(), iov.as_ptr().add(start), cnt as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                _ if timed_out(&e) && deadline.is_none_or(|d| Instant::now() < d) => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n as usize;
        start = advance(iov, start, n as usize);
        if got < min && deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not send a whole frame in time",
            ));
        }
    }
    Ok(got)
}

/// How long [`readv_flowing`] polls without receiving a byte before it sleeps in the kernel.
const FLOW_GAP: Duration = Duration::from_micros(20);

/// [`readv_min`] for a payload that is streaming in: while bytes keep arriving it polls the
/// socket (yielding between looks) instead of sleeping in the kernel between pieces, which
/// costs a wake-up per piece; once nothing has come for [`FLOW_GAP`] (the sender stalled) it
/// sleeps in the kernel until the next piece, and polls again from there. A yield that takes
/// longer than that means other threads hold the cores: then it sleeps between pieces for
/// the rest of the payload (a sleeping thread is run as soon as data wake it, a yielding one
/// only after the others' time slices).
///
/// # Safety
/// As for [`readv_min`].
pub(crate) unsafe fn readv_flowing(
    s: &TcpStream,
    iov: &mut [libc::iovec],
    min: usize,
    deadline: Option<Instant>,
) -> io::Result<usize> {
    let mut got = 0;
    let mut start = advance(iov, 0, 0);
    let mut last = Instant::now();
    // Set once a yield took long: other threads want the cores, and a polling reader would
    // only get its turn after them; sleep between pieces for the rest of the payload.
    let mut patient = false;
    while got < min && start < iov.len() {
        let sleep = patient || last.elapsed() >= FLOW_GAP;
        // SAFETY: forwarded from the caller; `start < len`.
        let r = unsafe { recv_some(s, &mut iov[start..], !sleep) };
        match r {
            Ok(Some(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Some(n)) => {
                got += n;
                start = advance(iov, start, n);
                last = Instant::now();
                continue;
            }
            Ok(None) => {}
            // A blocking read that hit the socket's receive timeout.
            Err(e) if sleep && timed_out(&e) => {}
            Err(e) => return Err(e),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not send a whole frame in time",
            ));
        }
        if !sleep {
            let t = Instant::now();
            std::thread::yield_now();
            patient = t.elapsed() >= FLOW_GAP;
        }
    }
    Ok(got)
}

/// One `recvmsg` into `iov` (at most [`IOV_BATCH`] entries), without blocking when `nonblocking`.
/// `Ok(None)`: nothing to read right now; `Ok(Some(0))`: end of stream. The socket's own
/// blocking mode is left alone (the writer shares the open file), so non-blocking reads use
/// `MSG_DONTWAIT`; blocking ones are bounded by the socket's receive timeout.
///
/// # Safety
/// Every iovec must describe memory writable for its length for the duration of the call, and
/// not otherwise accessed meanwhile.
pub(crate) unsafe fn recv_some(
    s: &TcpStream,
    iov: &mut [libc::iovec],
    nonblocking: bool,
) -> io::Result<Option<usize>> {
    // SAFETY: msghdr is plain data; every field we do not set is a null pointer or zero.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len().min(IOV_BATCH) as _;
    let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    loop {
        // SAFETY: `msg` points at `iov`, which the caller guarantees is writable.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if nonblocking => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// True when a read would not block right now: data, end of stream or an error are waiting
/// (one non-blocking peek; nothing is consumed).
pub(crate) fn readable_now(s: &TcpStream) -> bool {
    let mut b = 0u8;
    // SAFETY: one writable byte; MSG_PEEK leaves the queue as it is.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
}

/// Bytes waiting in the socket's receive queue (0 if the kernel will not say).
pub(crate) fn queued_input(s: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `n`; the descriptor is our open socket.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Sends as much of `buf` as the socket takes without blocking; how much that was.
pub(crate) fn send_now(s: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is readable for its length during the call.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// [`recv_some`] into one plain buffer, without blocking.
pub(crate) fn recv_now(s: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, which we borrow mutably for the call.
    unsafe { recv_some(s, &mut iov, true) }
}

/// A readiness watch on one socket (an epoll instance of its own), for a thread that sleeps
/// until the socket has something to read. Its interest can be changed from other threads at
/// any time: [`Poller::watch_data`]`(false)` keeps the sleeper asleep when data arrive (only
/// hang-up and errors wake it), which is how a thread that reads the socket itself while it
/// spins avoids a pointless wake-up of the sleeper per message. Re-enabling data while data are
/// already queued wakes the sleeper at once (epoll re-checks readiness on modification), so no
/// arrival is missed.
#[derive(Debug)]
pub(crate) struct Poller {
    ep: std::os::fd::OwnedFd,
    fd: i32,
}

impl Poller {
    /// Watches `s` for data and hang-up.
    pub(crate) fn new(s: &TcpStream) -> io::Result<Poller> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain system call; the result is checked before use.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        let p = Poller {
            // SAFETY: `ep` is a fresh descriptor that nothing else owns.
            ep: unsafe { std::os::fd::OwnedFd::from_raw_fd(ep) },
            fd: s.as_raw_fd(),
        };
        p.ctl(libc::EPOLL_CTL_ADD, true)?;
        Ok(p)
    }

    fn ctl(&self, op: i32, data: bool) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLRDHUP | if data { libc::EPOLLIN } else { 0 }) as u32,
            u64: 0,
        };
        // SAFETY: `ev` is valid for the call; both descriptors are open (the socket is owned by
        // the connection that owns this poller).
        let rc = unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, self.fd, &mut ev) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Also wakes the sleeper when `fd` (an [`EventFd`]) is signalled.
    pub(crate) fn add_wake(&self, fd: &EventFd) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 1,
        };
        // SAFETY: `ev` is valid for the call; both descriptors are open.
        let rc = unsafe {
            libc::epoll_ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.0.as_raw_fd(),
                &mut ev,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether arriving data wake the sleeper (hang-up and errors always do).
    pub(crate) fn watch_data(&self, data: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, data)
    }

    /// Sleeps until the socket is ready (as watched) or `timeout` passes; true when ready.
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        use std::os::fd::AsRawFd as _;
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one writable event slot; the epoll descriptor is ours.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), &mut ev, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0)
    }
}

/// A counter another thread signals to wake a [`Poller`]'s sleeper explicitly.
#[derive(Debug)]
pub(crate) struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    /// A non-blocking event counter.
    pub(crate) fn new() -> io::Result<EventFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Signals it (wakes a poller watching it until [`EventFd::clear`]).
    pub(crate) fn signal(&self) {
        use std::os::fd::AsRawFd as _;
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one`; a full counter (never, here) only fails the call.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets it.
    pub(crate) fn clear(&self) {
        use std::os::fd::AsRawFd as _;
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v`; non-blocking, so an unsignalled counter just fails.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Reads exactly `buf` from the socket (bounded by `deadline`).
pub(crate) fn read_exact(
    s: &TcpStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, which we borrow mutably for the call.
    unsafe { readv_exact(s, &mut iov, deadline) }
}

/// Writes all of `buf`.
pub(crate) fn write_all(s: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, borrowed for the call; writev only reads it.
    unsafe { writev_all(s, &mut iov) }
}

/// The addresses to publish for a listener bound to `ip`: the address itself, or for an
/// unspecified bind every non-loopback IPv4 address of this host followed by 127.0.0.1.
pub(crate) fn publish_addrs(ip: IpAddr) -> Vec<IpAddr> {
    if !ip.is_unspecified() {
        return vec![ip];
    }
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } == 0 {
        let mut p = ifap;
        while !p.is_null() {
            // SAFETY: `p` is a node of the list returned by getifaddrs, valid until freed.
            let ifa = unsafe { &*p };
            if !ifa.ifa_addr.is_null() {
                // SAFETY: ifa_addr is non-null and points to a sockaddr of the family it names.
                let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
                if fam == libc::AF_INET {
                    // SAFETY: the family is AF_INET, so the sockaddr is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    let a = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !a.is_loopback() && !a.is_unspecified() && !out.contains(&IpAddr::V4(a)) {
                        out.push(IpAddr::V4(a));
                    }
                }
            }
            p = ifa.ifa_next;
        }
        // SAFETY: `ifap` came from a successful getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(ifap) };
    }
    out.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_handles_partial_and_empty_iovecs() {
        let a = [1u8; 10];
        let b = [2u8; 5];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut _,
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: 0,
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: 5,
            },
        ];
        assert_eq!(advance(&mut iov, 0, 3), 0);
        assert_eq!(iov[0].iov_len, 7);
        assert_eq!(advance(&mut iov, 0, 7), 2);
        assert_eq!(advance(&mut iov, 2, 5), 3);
    }

    fn send_buffer(s: &TcpStream) -> i32 {
        let mut v = 0i32;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: `v` is a writable c_int of `len` bytes; `s` is an open socket.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut v as *mut i32).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        v
    }

    #[test]
    fn the_paced_buffer_follows_the_round_trip() {
        // Loopback and veth (3-16 us): the floor.
        assert_eq!(paced_size(3), Some(128 << 10));
        assert_eq!(paced_size(16), Some(128 << 10));
        // A datacenter path keeps 8 GB/s of bandwidth-delay product in flight.
        assert_eq!(paced_size(100), Some(800 << 10));
        // Long or unmeasured paths are not paced at all.
        assert_eq!(paced_size(512), None);
        assert_eq!(paced_size(u32::MAX), None);
    }

    #[test]
    fn pacing_shrinks_the_send_buffer_on_loopback_and_restores_it() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let t = Duration::from_secs(5);
        configure(&c, 1, t, t).unwrap();
        // A few round trips, so that the minimum round trip is the path's and not the
        // handshake's (which may include a scheduler delay).
        for _ in 0..20 {
            (&c).write_all(b"p").unwrap();
            let mut one = [0u8; 1];
            s.read_exact(&mut one).unwrap();
            s.write_all(&one).unwrap();
            (&c).read_exact(&mut one).unwrap();
        }
        let large = send_buffer(&c);
        // Loopback's round trip is microseconds: a small paced buffer.
        let paced = paced_buffer(&c).expect("a short path is paced");
        assert!(
            (PACE_MIN_BUFFER as i32..=1 << 20).contains(&paced),
            "{paced}"
        );
        assert!(pace(&c, true));
        // The kernel clamps the value to net.core.wmem_max and reports twice what it kept.
        let max = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<i32>().ok());
        if let Some(max) = max {
            assert_eq!(send_buffer(&c), 2 * paced.min(max));
        }
        assert!(send_buffer(&c) <= large, "{large}");
        // Data still flow through the small buffer, in order.
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        (&c).write_all(&data).unwrap();
        assert!(pace(&c, false));
        assert_eq!(send_buffer(&c), large);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(reader.join().unwrap() == data, "bytes changed on the way");
    }

    #[test]
    fn publishes_loopback_last() {
        let v = publish_addrs("0.0.0.0".parse().unwrap());
        assert_eq!(*v.last().unwrap(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(
            publish_addrs("10.0.0.1".parse().unwrap()),
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }
}
