//! Making a peer's connections: dialling its published addresses, the hello that binds each
//! connection to the peer's current instance, and starting each connection's reader and
//! sender threads. Also `connect`, which does this ahead of the first transfer.
//!
//! Separate because it runs once per peer (on first use or `connect`, under the peer's
//! connection slot) and blocks on the network, while nothing on the request path depends on
//! how a connection was made, only on the [`ConnSet`] it leaves behind.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use parking_lot::Mutex;
use rixl_core::{Error, ErrorKind, Result};

use super::liveness::check_alive;
use super::reader::{reader, Watch};
use super::response::Rx;
use super::send::Writer;
use super::{Conn, ConnSet, Fifo, Job, Peer};
use crate::sock;
use crate::wire::{self, Header, Hello, Kind, HEADER_LEN};
use crate::{Shared, NAME};

/// Connects to `peer` if not connected yet.
pub(super) fn conns(shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<Arc<ConnSet>> {
    let mut slot = peer.conns.lock();
    if let Some(s) = &*slot {
        return Ok(s.clone());
    }
    if peer.closing.load(Ordering::SeqCst) || !peer.alive.load(Ordering::SeqCst) {
        return Err(peer.gone());
    }
    let n = shared.connections;
    let mut streams = Vec::with_capacity(n);
    let mut last_err = None;
    let mut chosen: Option<SocketAddr> = None;
    for ip in &peer.info.addrs {
        let addr = SocketAddr::new(*ip, peer.info.port);
        match dial(shared, peer, addr, 0) {
            Ok(s) => {
                streams.push(s);
                chosen = Some(addr);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(addr) = chosen else {
        let e = last_err.unwrap_or_else(|| Error::remote_disconnect("no address to try"));
        return Err(e.with_peer(&peer.name).with_backend(NAME));
    };
    for i in 1..n {
        streams.push(dial(shared, peer, addr, i)?);
    }
    let mut set = Vec::with_capacity(n);
    for (idx, stream) in streams.into_iter().enumerate() {
        let clone = |s: &TcpStream| {
            s.try_clone()
                .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP socket clone", &e))
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let poller = sock::Poller::new(&stream)
            .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP cannot watch a socket", &e))?;
        let conn = Arc::new(Conn {
            idx,
            writer: Mutex::new(Writer::new(clone(&stream)?)),
            stream,
            fifo: Mutex::new(Fifo {
                q: VecDeque::new(),
                dead: None,
                progress: Instant::now(),
            }),
            jobs: Mutex::new(tx),
            rx: Mutex::new(Rx::new()),
            poller,
            watch: Mutex::new(Watch::new()),
            lease_until: AtomicU64::new(0),
            acked_seen: AtomicU64::new(0),
        });
        let (s2, p2, c2) = (shared.clone(), peer.clone(), conn.clone());
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| Error::from_io(ErrorKind::Backend, "TCP cannot start a thread", &e))
        };
        let r = spawn("rixl-tcp-read", Box::new(move || reader(&s2, &p2, &c2)))?;
        {
            let mut readers = shared.readers.lock();
            readers.retain(|t| !t.is_finished());
            readers.push(r);
        }
        spawn(
            "rixl-tcp-send",
            Box::new(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            }),
        )?;
        set.push(conn);
    }
    let set = Arc::new(ConnSet { conns: set });
    *slot = Some(set.clone());
    Ok(set)
}

/// Opens connection `idx` to `addr` and says hello.
fn dial(shared: &Shared, peer: &Peer, addr: SocketAddr, idx: usize) -> Result<TcpStream> {
    // A host that does not answer a SYN within `unreachable` counts as unreachable.
    let per_try = shared.deadline.min(shared.unreachable);
    let fail = |kind: ErrorKind, what: &str, e: &std::io::Error| {
        Error::from_io(kind, format!("{what} agent {:?} at {addr}", peer.name), e)
            .with_peer(&peer.name)
            .with_backend(NAME)
    };
    let s = TcpStream::connect_timeout(&addr, per_try)
        .map_err(|e| fail(ErrorKind::RemoteDisconnect, "cannot connect to", &e))?;
    sock::configure(
        &s,
        shared.keepalive_secs,
        shared.unreachable,
        shared.deadline,
    )
    .map_err(|e| fail(ErrorKind::Backend, "cannot configure the connection to", &e))?;
    let hello = Hello {
        version: wire::VERSION,
        from: shared.ctx.agent_name().to_owned(),
        from_nonce: shared.nonce,
        to: peer.name.clone(),
        to_nonce: peer.info.nonce,
        conn: idx as u32,
    }
    .encode();
    let mut h = Header::new(Kind::Hello);
    h.len = hello.len() as u32;
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&hello);
    sock::write_all(&s, &out).map_err(|e| fail(ErrorKind::RemoteDisconnect, "hello to", &e))?;
    let deadline = Some(Instant::now() + shared.deadline);
    let mut hb = [0u8; HEADER_LEN];
    sock::read_exact(&s, &mut hb, deadline)
        .map_err(|e| fail(ErrorKind::RemoteDisconnect, "no hello answer from", &e))?;
    let ack = Header::parse(&hb).map_err(|e| {
        Error::mismatch(format!("{addr} does not speak RIXL TCP: {e}")).with_peer(&peer.name)
    })?;
    if ack.kind != Kind::HelloAck {
        return Err(Error::mismatch(format!(
            "{addr} answered the hello with {:?}",
            ack.kind
        )));
    }
    if ack.size != 0 {
        let mut msg = vec![0u8; ack.len as usize];
        let _ = sock::read_exact(&s, &mut msg, deadline);
        // The agent at that address is not the instance whose metadata we hold (restarted).
        return Err(Error::remote_disconnect(format!(
            "agent {:?} at {addr} refused the connection: {}",
            peer.name,
            String::from_utf8_lossy(&msg)
        ))
        .with_peer(&peer.name)
        .with_backend(NAME));
    }
    Ok(s)
}

/// Connects ahead of the first transfer and checks that every connection is alive.
pub(crate) fn connect(shared: &Arc<Shared>, peer: &Arc<Peer>) -> Result<()> {
    let set = conns(shared, peer).inspect_err(|e| shared.lost_if(peer, e))?;
    for c in &set.conns {
        check_alive(shared, peer, c)?;
    }
    Ok(())
}
