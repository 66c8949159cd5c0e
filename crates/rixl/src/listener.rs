//! The metadata listener: agents push, fetch and invalidate metadata over TCP.
//!
//! NIXL's listener splits frames on a text marker, reads fetch replies only on the fetching
//! agent's own listener (so a fetch without a listener never completes), and trusts anyone who
//! can reach port 8888. RIXL keeps the calls and their asynchronous semantics and fixes the rest:
//!
//! - typed, length-prefixed frames: `"RXLM"`, version, kind, `u32` LE payload length, payload,
//!   and with a shared secret an HMAC-SHA256 tag over all of it; unauthenticated, malformed or
//!   oversized frames are dropped with a log line and the connection closed;
//! - a fetch reads the reply on its own outbound connection: no listener needed to fetch;
//! - the bind address is configurable (all interfaces by default, as NIXL, with a warning when
//!   no secret is set);
//! - sends are retried with back-off for a bounded window and never raise.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rixl_core::{Error, ErrorKind, Result};
use sha2::Sha256;

use crate::agent::AgentInner;

/// NIXL's default listener port.
pub const DEFAULT_PORT: u16 = 8888;
/// Largest payload accepted (a blob with 10^6 registrations fits easily).
pub const MAX_PAYLOAD: usize = 256 << 20;
const MAGIC: &[u8; 4] = b"RXLM";
const VERSION: u8 = 1;
const TAG_LEN: usize = 32;
/// Bit of the kind byte saying an authentication tag follows the payload.
const TAGGED: u8 = 0x80;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long background sends keep retrying an unreachable peer.
const RETRY_WINDOW: Duration = Duration::from_secs(10);

/// Listener message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A metadata blob to load.
    Load = 1,
    /// Asks for the receiver's full metadata; payload: the name the sender expects (may be empty).
    Fetch = 2,
    /// The sender (payload: its name) withdrew its metadata.
    Invalidate = 3,
    /// A refusal: `[i32 LE status code][UTF-8 reason]`.
    Error = 4,
    /// The answer to `Load` and `Invalidate`: done (empty payload). The sender learns that the
    /// metadata is in (or out of) the receiver's cache before it sends anything that needs it.
    Done = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Load,
            2 => Kind::Fetch,
            3 => Kind::Invalidate,
            4 => Kind::Error,
            5 => Kind::Done,
            _ => return None,
        })
    }
}

fn tag(secret: &[u8], head: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(head);
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

/// Writes one frame.
pub fn write_frame(
    w: &mut impl Write,
    kind: Kind,
    payload: &[u8],
    secret: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut head = [0u8; 10];
    head[..4].copy_from_slice(MAGIC);
    head[4] = VERSION;
    head[5] = kind as u8 | if secret.is_some() { TAGGED } else { 0 };
    head[6..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    if let Some(s) = secret {
        w.write_all(&tag(s, &head, payload))?;
    }
    w.flush()
}

/// Reads and checks one frame from an untrusted peer.
pub fn read_frame(r: &mut impl Read, secret: Option<&[u8]>) -> Result<(Kind, Vec<u8>)> {
    let mut head = [0u8; 10];
    r.read_exact(&mut head)
        .map_err(|e| Error::from_io(ErrorKind::Mismatch, "listener frame header", &e))?;
    if &head[..4] != MAGIC {
        return Err(Error::mismatch(
            "not a RIXL listener frame (bad magic; NIXL peers are not supported)",
        ));
    }
    if head[4] != VERSION {
        return Err(Error::mismatch(format!(
            "listener frame version {} not supported",
            head[4]
        )));
    }
    let tagged = head[5] & TAGGED != 0;
    let kind = Kind::from_u8(head[5] & !TAGGED)
        .ok_or_else(|| Error::mismatch(format!("unknown listener frame kind {}", head[5])))?;
    if secret.is_some() && !tagged {
        return Err(Error::not_allowed(
            "unauthenticated listener frame (this agent requires the shared secret)",
        ));
    }
    let len = u32::from_le_bytes([head[6], head[7], head[8], head[9]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::mismatch(format!(
            "listener frame of {len} bytes exceeds {MAX_PAYLOAD}"
        )));
    }
    let mut payload = Vec::new();
    r.take(len as u64)
        .read_to_end(&mut payload)
        .map_err(|e| Error::from_io(ErrorKind::Mismatch, "listener frame body", &e))?;
    if payload.len() != len {
        return Err(Error::mismatch("listener frame truncated"));
    }
    if tagged && secret.is_none() {
        // We do not check tags; skip it.
        let mut skip = [0u8; TAG_LEN];
        r.read_exact(&mut skip)
            .map_err(|e| Error::from_io(ErrorKind::Mismatch, "listener frame tag", &e))?;
    }
    if let Some(s) = secret {
        let mut got = [0u8; TAG_LEN];
        r.read_exact(&mut got)
            .map_err(|_| Error::not_allowed("listener frame without authentication tag"))?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(s).expect("HMAC takes any key length");
        mac.update(&head);
        mac.update(&payload);
        mac.verify_slice(&got).map_err(|_| {
            Error::not_allowed("listener frame failed authentication (wrong shared secret?)")
        })?;
    }
    Ok((kind, payload))
}

/// The running listener of one agent.
#[derive(Debug)]
pub(crate) struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    pub fn start(
        agent: Weak<AgentInner>,
        bind: SocketAddr,
        secret: Option<Vec<u8>>,
    ) -> Result<Listener> {
        let sock = TcpListener::bind(bind).map_err(|e| {
            Error::from_io(
                ErrorKind::Backend,
                format!("the metadata listener cannot bind {bind}"),
                &e,
            )
        })?;
        let addr = sock
            .local_addr()
            .map_err(|e| Error::from_io(ErrorKind::Backend, "listener address", &e))?;
        if secret.is_none() && bind.ip().is_unspecified() {
            tracing::warn!(
                "metadata listener on {addr} accepts anyone who can reach it: set RIXL_SHARED_SECRET \
                 (on every agent) to authenticate peers, or RIXL_LISTEN_ADDR to bind one interface"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rixl-listener".into())
            .spawn(move || accept_loop(&sock, &agent, secret.as_deref(), &st))
            .map_err(|e| {
                Error::from_io(ErrorKind::Backend, "cannot start the listener thread", &e)
            })?;
        Ok(Listener {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept() with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, CONNECT_TIMEOUT);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Most connections served at once; more wait in the kernel's backlog.
const MAX_CONCURRENT: usize = 64;

fn accept_loop(
    sock: &TcpListener,
    agent: &Weak<AgentInner>,
    secret: Option<&[u8]>,
    stop: &AtomicBool,
) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let secret: Option<Arc<[u8]>> = secret.map(Arc::from);
    for conn in sock.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let Some(inner) = agent.upgrade() else { return };
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
        // One short-lived thread per connection, bounded: a slow or silent peer holds only its
        // own thread (for at most the I/O timeout), never the listener.
        while active.load(Ordering::SeqCst) >= MAX_CONCURRENT {
            std::thread::sleep(Duration::from_millis(5));
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (active2, secret2) = (active.clone(), secret.clone());
        let spawned = std::thread::Builder::new().name("rixl-listener-conn".into()).spawn(move || {
            if let Err(e) = serve(&inner, &mut conn, secret2.as_deref()) {
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::warn!(agent = %inner.name(), "dropped a listener message from {peer}: {e}");
            }
            active2.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve(inner: &Arc<AgentInner>, conn: &mut TcpStream, secret: Option<&[u8]>) -> Result<()> {
    loop {
        let (kind, payload) = match read_frame(conn, secret) {
            Ok(f) => f,
            // A clean close after the last frame is normal.
            Err(e) if e.kind() == ErrorKind::Mismatch && e.message().contains("header") => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let reply = |r: Result<()>, conn: &mut TcpStream| {
            let sent = match r {
                Ok(()) => write_frame(conn, Kind::Done, &[], secret),
                Err(e) => write_frame(conn, Kind::Error, &error_payload(&e), secret),
            };
            sent.map_err(|e| Error::from_io(ErrorKind::Backend, "listener reply", &e))
        };
        match kind {
            Kind::Load => {
                let loaded = inner.load_remote(&payload).map(drop);
                if let Err(e) = &loaded {
                    tracing::warn!(agent = %inner.name(), "metadata pushed to the listener was not loaded: {e}");
                }
                reply(loaded, conn)?;
            }
            Kind::Fetch => {
                let wanted = String::from_utf8_lossy(&payload);
                let reply_blob = if !wanted.is_empty() && wanted != inner.name() {
                    Err(Error::not_found(format!(
                        "this listener serves agent {:?}, not {wanted:?}",
                        inner.name()
                    )))
                } else {
                    inner.full_metadata()
                };
                match reply_blob {
                    Ok(blob) => write_frame(conn, Kind::Load, &blob, secret)
                        .map_err(|e| Error::from_io(ErrorKind::Backend, "listener reply", &e))?,
                    Err(e) => reply(Err(e), conn)?,
                }
            }
            Kind::Invalidate => {
                let name = String::from_utf8_lossy(&payload).into_owned();
                inner.invalidate_remote(&name);
                reply(Ok(()), conn)?;
            }
            Kind::Error | Kind::Done => {}
        }
    }
}

/// Connects with a timeout, retrying with back-off until `window` passes.
fn connect_retrying(addr: SocketAddr, window: Duration) -> std::io::Result<TcpStream> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                return Ok(s);
            }
            Err(e) if start.elapsed() + delay >= window => return Err(e),
            Err(_) => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// `[i32 LE status code][message]` of an `Error` frame.
fn error_payload(e: &Error) -> Vec<u8> {
    let mut v = e.kind().code().to_le_bytes().to_vec();
    v.extend_from_slice(e.message().as_bytes());
    v
}

/// The error an `Error` frame from `addr` carries (its kind, or `Unknown` if garbled).
fn remote_error(addr: SocketAddr, payload: &[u8]) -> Error {
    let (kind, msg) = match payload {
        [a, b, c, d, rest @ ..] => (
            ErrorKind::from_code(i32::from_le_bytes([*a, *b, *c, *d]))
                .unwrap_or(ErrorKind::Unknown),
            rest,
        ),
        _ => (ErrorKind::Unknown, payload),
    };
    Error::new(
        kind,
        format!(
            "the listener at {addr} refused: {}",
            String::from_utf8_lossy(msg)
        ),
    )
}

/// Sends one frame and reads the answer on the same connection: the blob for a fetch, `Done`
/// (or the receiver's error) for a load or an invalidation.
pub(crate) fn exchange(
    addr: SocketAddr,
    kind: Kind,
    payload: &[u8],
    secret: Option<&[u8]>,
    window: Duration,
) -> Result<Option<Vec<u8>>> {
    let mut s = connect_retrying(addr, window).map_err(|e| {
        Error::from_io(
            ErrorKind::Backend,
            format!("cannot reach the listener at {addr}"),
            &e,
        )
    })?;
    write_frame(&mut s, kind, payload, secret)
        .map_err(|e| Error::from_io(ErrorKind::Backend, format!("sending to {addr}"), &e))?;
    match (kind, read_frame(&mut s, secret)?) {
        (Kind::Fetch, (Kind::Load, blob)) => Ok(Some(blob)),
        (Kind::Load | Kind::Invalidate, (Kind::Done, _)) => Ok(None),
        (_, (Kind::Error, why)) => Err(remote_error(addr, &why)),
        (_, (k, _)) => Err(Error::mismatch(format!(
            "unexpected {k:?} reply from {addr}"
        ))),
    }
}

/// Runs `exchange` in the background, logging failures (NIXL's fire-and-forget semantics).
pub(crate) fn exchange_in_background(
    agent: Weak<AgentInner>,
    addr: SocketAddr,
    kind: Kind,
    payload: Vec<u8>,
    secret: Option<Vec<u8>>,
) {
    let spawned = std::thread::Builder::new()
        .name("rixl-md-send".into())
        .spawn(
            move || match exchange(addr, kind, &payload, secret.as_deref(), RETRY_WINDOW) {
                Ok(Some(blob)) => {
                    if let Some(inner) = agent.upgrade() {
                        if let Err(e) = inner.load_remote(&blob) {
                            tracing::warn!("metadata fetched from {addr} was not loaded: {e}");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("metadata {kind:?} to {addr} failed: {e}"),
            },
        );
    if let Err(e) = spawned {
        tracing::warn!("cannot start a metadata sender thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_and_without_secret() {
        for secret in [None, Some(&b"s3cret"[..])] {
            let mut v = Vec::new();
            write_frame(&mut v, Kind::Load, b"blob", secret).unwrap();
            let (k, p) = read_frame(&mut &v[..], secret).unwrap();
            assert_eq!((k, p.as_slice()), (Kind::Load, &b"blob"[..]));
        }
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Invalidate, b"a", Some(b"one")).unwrap();
        let e = read_frame(&mut &v[..], Some(b"two")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed);
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Invalidate, b"a", None).unwrap();
        assert!(
            read_frame(&mut &v[..], Some(b"two")).is_err(),
            "untagged frame accepted"
        );
        assert!(read_frame(&mut &b"NIXLCOMM:LOAD"[..], None).is_err());
        let mut huge = b"RXLM\x01\x01".to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &huge[..], None)
            .unwrap_err()
            .to_string()
            .contains("exceeds"));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x1234_5678;
        for n in 0..2000usize {
            let mut b = Vec::with_capacity(n % 64);
            for _ in 0..(n % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(x as u8);
            }
            if n % 3 == 0 && b.len() >= 6 {
                b[..4].copy_from_slice(MAGIC);
                b[4] = VERSION;
            }
            let _ = read_frame(&mut &b[..], if n % 2 == 0 { None } else { Some(b"k") });
        }
    }
}
