//! The metadata listener: push, fetch (reply on the same connection, no listener needed on the
//! fetching side), invalidate, shared-secret authentication, and garbage on the port.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rixl::{Agent, AgentConfig, ErrorKind};
use rixl_testkit::unique_name;

const T: Duration = Duration::from_secs(5);

fn listening(prefix: &str, secret: Option<&str>) -> (Agent, SocketAddr) {
    let mut cfg = AgentConfig::default().backend("LOOPBACK").listen_on(0);
    cfg.listen_addr = Some(std::net::Ipv4Addr::LOCALHOST.into());
    if let Some(s) = secret {
        cfg = cfg.secret(s);
    }
    let a = Agent::new(&unique_name(prefix), cfg).unwrap();
    let addr = a.listen_addr().expect("listener address");
    assert_ne!(addr.port(), 0);
    (a, addr)
}

fn plain(prefix: &str, secret: Option<&str>) -> Agent {
    let mut cfg = AgentConfig::default().backend("LOOPBACK");
    if let Some(s) = secret {
        cfg = cfg.secret(s);
    }
    Agent::new(&unique_name(prefix), cfg).unwrap()
}

fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < T {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn fetch_push_and_invalidate() {
    let (server, addr) = listening("lsn-server", None);
    let client = plain("lsn-client", None);
    // Fetch without a listener of our own: the reply comes back on the same connection.
    assert_eq!(
        client
            .fetch_remote_metadata_blocking(server.name(), addr, T)
            .unwrap(),
        server.name()
    );
    assert!(client.check_remote_metadata(server.name(), None));
    // Asking for the wrong name is refused with a clear error.
    let e = client
        .fetch_remote_metadata_blocking("somebody-else", addr, T)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // Push ours, then withdraw it: the blocking forms return once the server has done it.
    client.send_local_metadata_blocking(addr, T).unwrap();
    assert!(
        server.check_remote_metadata(client.name(), None),
        "send_local_metadata_blocking returned before the server loaded the blob"
    );
    // A second agent under the same name (a restarted peer) is refused, and the sender hears
    // why: NIXL's rule, reported instead of logged on the far side.
    let twin = Agent::new(client.name(), AgentConfig::default().backend("LOOPBACK")).unwrap();
    let e = twin.send_local_metadata_blocking(addr, T).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
    client.invalidate_local_metadata_blocking(addr, T).unwrap();
    assert!(
        !server.check_remote_metadata(client.name(), None),
        "invalidate_local_metadata_blocking returned before the server dropped the entry"
    );
    // The asynchronous forms.
    let other = plain("lsn-async", None);
    other.send_local_metadata(addr).unwrap();
    assert!(eventually(
        || server.check_remote_metadata(other.name(), None)
    ));
    other.fetch_remote_metadata(server.name(), addr);
    assert!(eventually(
        || other.check_remote_metadata(server.name(), None)
    ));
    other.invalidate_local_metadata(addr);
    assert!(eventually(
        || !server.check_remote_metadata(other.name(), None)
    ));
}

#[test]
fn shared_secret_rejects_unauthenticated_peers() {
    let (server, addr) = listening("lsn-secret", Some("open sesame"));
    let stranger = plain("lsn-stranger", None);
    // The listener drops unauthenticated frames without an answer: the sender gets an error.
    stranger.send_local_metadata_blocking(addr, T).unwrap_err();
    let wrong = plain("lsn-wrong", Some("guess"));
    wrong.send_local_metadata_blocking(addr, T).unwrap_err();
    let e = stranger
        .fetch_remote_metadata_blocking(server.name(), addr, T)
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Mismatch), "{e}");
    let friend = plain("lsn-friend", Some("open sesame"));
    friend.send_local_metadata_blocking(addr, T).unwrap();
    assert!(eventually(
        || server.check_remote_metadata(friend.name(), None)
    ));
    assert!(
        !server.check_remote_metadata(stranger.name(), None),
        "unauthenticated LOAD was accepted"
    );
    assert!(
        !server.check_remote_metadata(wrong.name(), None),
        "LOAD with the wrong secret was accepted"
    );
    assert_eq!(
        friend
            .fetch_remote_metadata_blocking(server.name(), addr, T)
            .unwrap(),
        server.name()
    );
}

#[test]
fn garbage_on_the_port_is_dropped_and_the_listener_keeps_serving() {
    let (server, addr) = listening("lsn-garbage", None);
    let junk: [&[u8]; 5] = [
        b"NIXLCOMM:LOAD hello",
        b"RXLM\x01\x01\xff\xff\xff\xff",
        b"RXLM\x09\x01\x00\x00\x00\x00",
        b"RXLM\x01\x01\x10\x00\x00\x00short",
        b"RXLM\x01\x01\x05\x00\x00\x00RIXLM",
    ];
    for j in junk {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(j);
    }
    let client = plain("lsn-after", None);
    assert_eq!(
        client
            .fetch_remote_metadata_blocking(server.name(), addr, T)
            .unwrap(),
        server.name()
    );
}

#[test]
fn a_taken_port_fails_agent_creation_and_unreachable_sends_do_not_raise() {
    let (_server, addr) = listening("lsn-first", None);
    let mut cfg = AgentConfig::default().listen_on(addr.port());
    cfg.listen_addr = Some(std::net::Ipv4Addr::LOCALHOST.into());
    let e = Agent::new(&unique_name("lsn-second"), cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("cannot bind"), "{e}");
    // Nobody listens on this port: the background send retries, logs and gives up quietly.
    let lonely = plain("lsn-lonely", None);
    let closed: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    lonely.send_local_metadata(closed).unwrap();
    let e = lonely
        .send_local_metadata_blocking(closed, Duration::from_millis(200))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
