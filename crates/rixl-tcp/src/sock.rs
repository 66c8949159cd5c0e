//! Socket helpers: options, vectored I/O on raw memory ranges, liveness, local addresses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Most iovecs handed to one `readv`/`writev` (the kernel's IOV_MAX is 1024).
pub const IOV_BATCH: usize = 512;

/// Applies the liveness settings to a connected socket: no Nagle (small frames go out at once),
/// keepalive after `keepalive_secs` idle with 1 s probes (3 probes), `TCP_USER_TIMEOUT` so
/// unacknowledged data to a partitioned peer fails after `deadline`, and send/receive timeouts
/// so that no blocking call waits longer than `deadline` without progress.
pub fn configure(s: &TcpStream, keepalive_secs: u32, deadline: Duration) -> io::Result<()> {
    s.set_nodelay(true)?;
    let fd = s.as_raw_fd();
    let set = |level: i32, opt: i32, v: i32| -> io::Result<()> {
        // SAFETY: `v` is a valid c_int for the duration of the call; `fd` is our open socket.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        keepalive_secs.clamp(1, 32767) as i32,
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    let ms = deadline.as_millis().clamp(1, i32::MAX as u128) as i32;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    // Larger buffers keep striped streams busy on fast paths; the kernel clamps them.
    let _ = set(libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
    let _ = set(libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    s.set_write_timeout(Some(deadline))?;
    s.set_read_timeout(Some(deadline))?;
    Ok(())
}

/// True unless the peer has closed or reset the connection (one non-blocking `poll`).
pub fn alive(s: &TcpStream) -> bool {
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

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes every byte described by `iov` (consumed in place).
///
/// # Safety
/// Every iovec must describe memory readable for its length for the duration of the call.
pub unsafe fn writev_all(s: &TcpStream, iov: &mut [libc::iovec]) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { writev_until(s, iov, None) }
}

/// [`writev_all`] with an overall deadline, so that a peer reading one byte at a time cannot
/// hold the sender (and the registered memory it reads from) for long.
///
/// # Safety
/// Every iovec must describe memory readable for its length for the duration of the call.
pub unsafe fn writev_until(
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
pub unsafe fn readv_exact(
    s: &TcpStream,
    iov: &mut [libc::iovec],
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut start = advance(iov, 0, 0);
    while start < iov.len() {
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
        start = advance(iov, start, n as usize);
        if start < iov.len() && deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not send a whole frame in time",
            ));
        }
    }
    Ok(())
}

/// What [`read_header`] does while a connection is idle.
pub enum Idle {
    /// Keep waiting.
    Wait,
    /// Stop: return `Ok(false)` as for an end of stream.
    Stop,
}

/// Reads a frame header in as few system calls as possible (one, usually): waits without limit
/// for its first bytes (an idle connection is fine; `on_idle` runs at every receive timeout and
/// may stop the wait or fail it), then at most `deadline` for the rest. `Ok(false)` on a clean
/// end of stream before any byte.
pub fn read_header(
    s: &TcpStream,
    buf: &mut [u8],
    deadline: Duration,
    mut on_idle: impl FnMut() -> io::Result<Idle>,
) -> io::Result<bool> {
    use std::io::Read;
    let n = loop {
        match (&*s).read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {
                if let Idle::Stop = on_idle()? {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    };
    if n < buf.len() {
        read_exact(s, &mut buf[n..], Some(Instant::now() + deadline))?;
    }
    Ok(true)
}

/// Reads exactly `buf` from the socket (bounded by `deadline`).
pub fn read_exact(s: &TcpStream, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<()> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, which we borrow mutably for the call.
    unsafe { readv_exact(s, &mut iov, deadline) }
}

/// Writes all of `buf`.
pub fn write_all(s: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, borrowed for the call; writev only reads it.
    unsafe { writev_all(s, &mut iov) }
}

/// The addresses to publish for a listener bound to `ip`: the address itself, or for an
/// unspecified bind every non-loopback IPv4 address of this host followed by 127.0.0.1.
pub fn publish_addrs(ip: IpAddr) -> Vec<IpAddr> {
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
