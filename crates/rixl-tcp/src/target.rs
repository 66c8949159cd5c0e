//! The target side: the listener, one server thread per inbound connection, and the table of
//! this agent's registrations that every incoming range is checked against.
//!
//! A peer is never trusted. Each WRITE or READ names a region token, an address and a length;
//! the server looks the token up in *its own* table, checks that the range lies inside that
//! live region, and only then receives into (WRITE) or sends from (READ) that memory, straight
//! between the socket and the registered bytes. A range outside any live registration is
//! refused with an `Err` frame and nothing is written (a refused WRITE's payload is read into a
//! scratch buffer and dropped, so the stream stays framed and the connection keeps serving).
//! A frame that does not parse ends the connection.
//!
//! Deregistration is fenced: a region being served counts as in use, and `deregister` marks it
//! dead and waits until no server is inside it, so no byte lands after `deregister` returns.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use rixl_core::Error;

use crate::sock;
use crate::wire::{self, ErrCode, Header, Hello, Kind, HEADER_LEN};
use crate::Shared;

/// Most inbound connections served at once (each has a thread).
const MAX_INBOUND: usize = 1024;
/// Most notifications of one session waiting for their parts.
const MAX_PENDING_POSTS: usize = 4096;
/// Most bytes of notifications one session may keep waiting for their parts.
const MAX_PENDING_BYTES: usize = 16 << 20;

/// One local registration, as the servers see it.
#[derive(Debug)]
pub struct Region {
    addr: u64,
    len: u64,
    /// `(live, servers inside)`.
    state: Mutex<(bool, usize)>,
    idle: Condvar,
}

/// The registrations the servers check requests against.
#[derive(Debug, Default)]
pub struct Regions {
    map: RwLock<HashMap<u64, Arc<Region>>>,
}

/// A region held by a server while it moves bytes in or out of it.
struct InUse(Arc<Region>);

impl Drop for InUse {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.1 -= 1;
        if st.1 == 0 && !st.0 {
            self.0.idle.notify_all();
        }
    }
}

impl Regions {
    /// Adds a region.
    pub fn insert(&self, token: u64, addr: u64, len: u64) {
        let r = Arc::new(Region {
            addr,
            len,
            state: Mutex::new((true, 0)),
            idle: Condvar::new(),
        });
        self.map.write().insert(token, r);
    }

    /// Removes a region and waits until no server is inside it.
    pub fn remove(&self, token: u64) -> bool {
        let Some(r) = self.map.write().remove(&token) else {
            return false;
        };
        let mut st = r.state.lock();
        st.0 = false;
        while st.1 > 0 {
            r.idle.wait(&mut st);
        }
        true
    }

    /// The live region `token` if `[addr, addr + len)` lies inside it.
    fn acquire(&self, token: u64, addr: u64, len: u64) -> Result<InUse, String> {
        let r = self
            .map
            .read()
            .get(&token)
            .cloned()
            .ok_or_else(|| format!("region token {token} is not registered here"))?;
        let end = addr.checked_add(len).ok_or("range overflows")?;
        if addr < r.addr || end > r.addr + r.len {
            return Err(format!(
                "range {addr:#x}+{len} is outside registration {:#x}+{}",
                r.addr, r.len
            ));
        }
        let mut st = r.state.lock();
        if !st.0 {
            return Err(format!("region token {token} was deregistered"));
        }
        st.1 += 1;
        drop(st);
        Ok(InUse(r))
    }
}

/// One initiator incarnation (agent name + its backend's nonce), shared by its connections:
/// notifications of striped posts wait here until every part has been served.
#[derive(Debug)]
pub struct Session {
    name: String,
    nonce: u64,
    posts: Mutex<HashMap<u64, PendingPost>>,
}

#[derive(Debug, Default)]
struct PendingPost {
    served: u64,
    notif: Option<(u64, Vec<u8>)>,
}

impl Session {
    fn part_served(&self, shared: &Shared, post: u64) {
        let mut posts = self.posts.lock();
        let p = posts.entry(post).or_default();
        p.served += 1;
        if p.notif.as_ref().is_some_and(|(want, _)| p.served >= *want) {
            if let Some(p) = posts.remove(&post) {
                let (_, msg) = p.notif.unwrap_or_default();
                shared.ctx.notifs.deliver(&self.name, &msg);
            }
        }
        Self::bound(&mut posts);
    }

    fn notif(&self, shared: &Shared, post: u64, want: u64, msg: Vec<u8>) {
        let mut posts = self.posts.lock();
        let served = posts.get(&post).map_or(0, |p| p.served);
        if served >= want {
            posts.remove(&post);
            shared.ctx.notifs.deliver(&self.name, &msg);
        } else {
            posts.entry(post).or_default().notif = Some((want, msg));
        }
        Self::bound(&mut posts);
    }

    /// Posts that were cancelled part-way leave entries behind; keep the newest ones only.
    fn bound(posts: &mut HashMap<u64, PendingPost>) {
        let bytes = |posts: &HashMap<u64, PendingPost>| -> usize {
            posts
                .values()
                .filter_map(|p| p.notif.as_ref().map(|(_, m)| m.len()))
                .sum()
        };
        while posts.len() > MAX_PENDING_POSTS
            || (posts.len() > 1 && bytes(posts) > MAX_PENDING_BYTES)
        {
            let Some(&oldest) = posts.keys().min() else {
                break;
            };
            tracing::warn!("TCP: dropping the notification state of abandoned post {oldest}");
            posts.remove(&oldest);
        }
    }
}

/// The inbound side of the backend.
#[derive(Debug, Default)]
pub struct Inbound {
    streams: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    sessions: Mutex<HashMap<(u64, String), Weak<Session>>>,
}

impl Inbound {
    /// Closes every inbound connection and waits for their servers to stop.
    pub fn close_all(&self) {
        for s in self.streams.lock().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        crate::join_others(threads);
    }

    /// Forgets a connection whose server is ending (before its descriptor is closed).
    fn forget(&self, stream: &TcpStream) {
        use std::os::fd::AsRawFd;
        // Our clone has another descriptor number; compare the sockets' identities instead.
        let me = socket_id(stream.as_raw_fd());
        let mut streams = self.streams.lock();
        streams.retain(|s| me.is_none() || socket_id(s.as_raw_fd()) != me);
    }

    fn session(&self, name: &str, nonce: u64) -> Arc<Session> {
        let mut m = self.sessions.lock();
        m.retain(|_, w| w.strong_count() > 0);
        let key = (nonce, name.to_owned());
        if let Some(s) = m.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(Session {
            name: name.to_owned(),
            nonce,
            posts: Mutex::new(HashMap::new()),
        });
        m.insert(key, Arc::downgrade(&s));
        s
    }
}

/// The inode of a socket: equal for descriptors of the same socket.
fn socket_id(fd: i32) -> Option<u64> {
    // SAFETY: `st` is plain data that fstat fills; `fd` is an open descriptor of ours.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fstat writes only into `st`.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

/// Accepts connections until the backend stops.
pub fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning on accept.
                tracing::warn!("TCP: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if let Err(e) = sock::configure(&conn, shared.keepalive_secs, shared.deadline) {
            tracing::warn!("TCP: cannot configure an inbound connection: {e}");
            continue;
        }
        let mut streams = shared.inbound.streams.lock();
        streams.retain(sock::alive);
        if streams.len() >= MAX_INBOUND {
            tracing::warn!("TCP: refusing a connection: {MAX_INBOUND} already open");
            continue;
        }
        if let Ok(c) = conn.try_clone() {
            streams.push(c);
        }
        drop(streams);
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("rixl-tcp-serve".into())
            .spawn(move || serve(&s, conn));
        match spawned {
            Ok(t) => {
                let mut threads = shared.inbound.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
            Err(e) => tracing::warn!("TCP: cannot start a server thread: {e}"),
        }
    }
}

/// How long a frame of `len` bytes may take to arrive once it has started.
fn frame_deadline(shared: &Shared, len: u64) -> Instant {
    // The configured deadline plus 10 MB/s: generous for real links, finite for a trickler.
    Instant::now() + shared.deadline + Duration::from_micros(len / 10)
}

fn send_err(stream: &TcpStream, id: u64, code: ErrCode, msg: &str) -> std::io::Result<()> {
    let msg = &msg.as_bytes()[..msg.len().min(wire::MAX_ERR as usize)];
    let mut h = Header::new(Kind::Err);
    h.id = id;
    h.size = code as u64;
    h.len = msg.len() as u32;
    let hb = h.encode();
    let mut iov = [
        libc::iovec {
            iov_base: hb.as_ptr() as *mut libc::c_void,
            iov_len: hb.len(),
        },
        libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        },
    ];
    // SAFETY: both iovecs point into live local buffers that writev only reads.
    unsafe { sock::writev_all(stream, &mut iov) }
}

fn send_ack(stream: &TcpStream, id: u64) -> std::io::Result<()> {
    let mut h = Header::new(Kind::Ack);
    h.id = id;
    sock::write_all(stream, &h.encode())
}

/// Bytes waiting in the receive queue (0 on error).
fn pending_input(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `n`; the fd is our open socket.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Serves one inbound connection: a hello, then requests until goodbye or end of stream.
fn serve(shared: &Arc<Shared>, stream: TcpStream) {
    let mut hb = [0u8; HEADER_LEN];
    let hello = match handshake(shared, &stream, &mut hb) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("TCP: dropped an inbound connection: {e}");
            let _ = stream.shutdown(std::net::Shutdown::Both);
            shared.inbound.forget(&stream);
            return;
        }
    };
    let session = shared.inbound.session(&hello.from, hello.from_nonce);
    let mut clean = false;
    let outcome = serve_requests(shared, &stream, &session, &mut hb, &mut clean);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    shared.inbound.forget(&stream);
    if let Err(e) = &outcome {
        tracing::debug!("TCP: connection from {:?} ended: {e}", hello.from);
    }
    if !clean && !shared.stopping.load(Ordering::SeqCst) {
        // Only a connection whose hello matches the initiator's published instance may make us
        // drop that agent: a self-declared name alone is not enough.
        let peer = shared.peers.lock().get(&hello.from).cloned();
        if let Some(p) = peer.filter(|p| p.info.nonce == session.nonce) {
            let err = Error::remote_disconnect(format!(
                "agent {:?} closed its TCP connection without a goodbye",
                hello.from
            ));
            shared.lost(&p, &err);
        }
    }
}

fn handshake(
    shared: &Shared,
    stream: &TcpStream,
    hb: &mut [u8; HEADER_LEN],
) -> Result<Hello, String> {
    let deadline = Some(Instant::now() + shared.deadline);
    sock::read_exact(stream, hb, deadline).map_err(|e| format!("no hello: {e}"))?;
    let h = Header::parse(hb).map_err(|e| e.to_string())?;
    if h.kind != Kind::Hello {
        return Err(format!("first frame is {:?}, not a hello", h.kind));
    }
    let mut body = vec![0u8; h.len as usize];
    sock::read_exact(stream, &mut body, deadline).map_err(|e| format!("truncated hello: {e}"))?;
    let hello = Hello::decode(&body).map_err(|e| e.to_string())?;
    let refuse = if hello.version != wire::VERSION {
        Some(format!(
            "protocol version {} not supported (this agent speaks {})",
            hello.version,
            wire::VERSION
        ))
    } else if hello.to != shared.ctx.agent_name || hello.to_nonce != shared.nonce {
        Some(format!(
            "this is agent {:?} (instance {:x}), not {:?} (instance {:x})",
            shared.ctx.agent_name, shared.nonce, hello.to, hello.to_nonce
        ))
    } else {
        None
    };
    let mut ack = Header::new(Kind::HelloAck);
    if let Some(msg) = &refuse {
        ack.size = ErrCode::Mismatch as u64;
        ack.len = msg.len().min(wire::MAX_ERR as usize) as u32;
        let mut out = ack.encode().to_vec();
        out.extend_from_slice(&msg.as_bytes()[..ack.len as usize]);
        let _ = sock::write_all(stream, &out);
        return Err(msg.clone());
    }
    sock::write_all(stream, &ack.encode()).map_err(|e| e.to_string())?;
    Ok(hello)
}

fn serve_requests(
    shared: &Shared,
    stream: &TcpStream,
    session: &Session,
    hb: &mut [u8; HEADER_LEN],
    clean: &mut bool,
) -> Result<(), String> {
    let mut scratch = Vec::new();
    // The last request served whose acknowledgement has not been sent: acks are cumulative
    // and sent when the receive queue is empty, so a burst of small writes costs one ack.
    let mut unacked: Option<u64> = None;
    loop {
        if let Some(id) = unacked {
            if pending_input(stream) < HEADER_LEN {
                send_ack(stream, id).map_err(|e| e.to_string())?;
            }
        }
        let more = sock::read_header(stream, hb, shared.deadline, || {
            Ok(if shared.stopping.load(Ordering::SeqCst) {
                sock::Idle::Stop
            } else {
                sock::Idle::Wait
            })
        })
        .map_err(|e| e.to_string())?;
        if !more {
            return Ok(());
        }
        let h = Header::parse(hb).map_err(|e| e.to_string())?;
        let counted = h.flags & wire::F_COUNTED != 0;
        match h.kind {
            Kind::Write => {
                let len = u64::from(h.len);
                let deadline = Some(frame_deadline(shared, len));
                match shared.regions.acquire(h.token, h.addr, len) {
                    Ok(region) => {
                        let mut iov = [libc::iovec {
                            iov_base: h.addr as *mut libc::c_void,
                            iov_len: h.len as usize,
                        }];
                        // SAFETY: `[addr, addr+len)` lies inside a live registration of this
                        // agent (checked above) and stays registered while `region` is held
                        // (deregistration waits for it); the application promised that
                        // registered memory is valid and not accessed during transfers.
                        unsafe { sock::readv_exact(stream, &mut iov, deadline) }
                            .map_err(|e| format!("receiving WRITE data: {e}"))?;
                        drop(region);
                        if counted {
                            session.part_served(shared, h.post);
                        }
                        unacked = Some(h.id);
                    }
                    Err(msg) => {
                        // Keep the stream framed: read the payload into scratch and drop it.
                        let mut left = h.len as usize;
                        scratch.resize(left.min(1 << 20), 0);
                        while left > 0 {
                            let n = left.min(scratch.len());
                            sock::read_exact(stream, &mut scratch[..n], deadline)
                                .map_err(|e| e.to_string())?;
                            left -= n;
                        }
                        tracing::warn!("TCP: refused a WRITE from {:?}: {msg}", session.name);
                        unacked = None;
                        send_err(stream, h.id, ErrCode::NotFound, &msg)
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Kind::Read => match shared.regions.acquire(h.token, h.addr, h.size) {
                Ok(region) => {
                    let mut d = Header::new(Kind::Data);
                    d.id = h.id;
                    d.len = h.size as u32;
                    let db = d.encode();
                    let mut iov = [
                        libc::iovec {
                            iov_base: db.as_ptr() as *mut libc::c_void,
                            iov_len: db.len(),
                        },
                        libc::iovec {
                            iov_base: h.addr as *mut libc::c_void,
                            iov_len: h.size as usize,
                        },
                    ];
                    let deadline = Some(frame_deadline(shared, h.size));
                    // SAFETY: the data range lies inside a live registration (checked) that
                    // stays registered while `region` is held; writev only reads it.
                    unsafe { sock::writev_until(stream, &mut iov, deadline) }
                        .map_err(|e| format!("sending READ data: {e}"))?;
                    drop(region);
                    unacked = None;
                    if counted {
                        session.part_served(shared, h.post);
                    }
                }
                Err(msg) => {
                    tracing::warn!("TCP: refused a READ from {:?}: {msg}", session.name);
                    unacked = None;
                    send_err(stream, h.id, ErrCode::NotFound, &msg).map_err(|e| e.to_string())?;
                }
            },
            Kind::Notif => {
                let mut msg = vec![0u8; h.len as usize];
                sock::read_exact(stream, &mut msg, Some(frame_deadline(shared, h.len.into())))
                    .map_err(|e| e.to_string())?;
                if h.size == 0 {
                    shared.ctx.notifs.deliver(&session.name, &msg);
                } else {
                    session.notif(shared, h.post, h.size, msg);
                }
                unacked = Some(h.id);
            }
            Kind::Bye => {
                *clean = true;
                return Ok(());
            }
            other => return Err(format!("unexpected {other:?} frame from an initiator")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn ranges_are_checked_against_live_regions() {
        let r = Regions::default();
        r.insert(7, 0x1000, 0x1000);
        assert!(r.acquire(7, 0x1000, 0x1000).is_ok());
        assert!(r.acquire(7, 0x1800, 0x800).is_ok());
        assert!(r.acquire(7, 0x1800, 0x801).is_err(), "past the end");
        assert!(r.acquire(7, 0xfff, 2).is_err(), "before the start");
        assert!(r.acquire(7, u64::MAX, 2).is_err(), "overflow");
        assert!(r.acquire(8, 0x1000, 1).is_err(), "unknown token");
        assert!(r.remove(7));
        assert!(r.acquire(7, 0x1000, 1).is_err(), "deregistered");
        assert!(!r.remove(7));
    }

    #[test]
    fn deregistration_waits_for_servers_inside_the_region() {
        let r = Arc::new(Regions::default());
        r.insert(1, 0x1000, 0x1000);
        let held = r.acquire(1, 0x1000, 16).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let (r2, rel2) = (r.clone(), released.clone());
        let t = std::thread::spawn(move || {
            r2.remove(1);
            // `remove` returned: the server must have left the region before.
            assert!(rel2.load(Ordering::SeqCst), "deregistration did not wait");
        });
        std::thread::sleep(Duration::from_millis(50));
        released.store(true, Ordering::SeqCst);
        drop(held);
        t.join().unwrap();
        assert!(r.acquire(1, 0x1000, 1).is_err());
    }
}
