//! `SHM` across two real processes: the test binary re-executes itself as the peer
//! (`rixl_testkit::peer`). Covers what an in-process pair cannot: separate address spaces, a
//! peer that is killed (SIGKILL) with and without a transfer in flight, and garbage on the
//! control socket.

#![cfg(feature = "shm")]

use std::time::{Duration, Instant};

use rixl::{Agent, AgentConfig, Desc, ErrorKind, XferOp, XferOptions};
use rixl_testkit::peer::{checksum, hex, PeerProcess};
use rixl_testkit::{pattern, unique_name, TestBuffer};

const ENTRY: &str = "peer_process";

#[test]
#[ignore = "entry point of the peer process that the two-process tests spawn"]
fn peer_process() {
    rixl_testkit::peer::peer_main();
}

fn initiator(buf: &TestBuffer) -> Agent {
    let a = Agent::new(
        &unique_name("shm-ini"),
        AgentConfig::default().backend("SHM"),
    )
    .unwrap();
    // SAFETY: every buffer passed here is created before its agent and outlives it.
    unsafe { a.register_mem(&buf.reg_list(), &[]).unwrap() };
    a
}

use rixl_testkit::dram_list as list;

use rixl_testkit::eventually;

#[test]
fn write_read_and_notify_across_processes() {
    const LEN: usize = 32 << 20;
    let local = TestBuffer::with_pattern(LEN, 11);
    let back = TestBuffer::new(LEN);
    let a = initiator(&local);
    // SAFETY: `back` outlives `a`.
    unsafe { a.register_mem(&back.reg_list(), &[]).unwrap() };
    let mut peer = PeerProcess::spawn(ENTRY, &unique_name("shm-tgt"), "SHM", LEN, 5);
    assert_eq!(a.load_remote_metadata(&peer.metadata).unwrap(), peer.name);
    let ok = peer.cmd(&format!("LOAD {}", hex(&a.local_metadata().unwrap())));
    assert!(ok.starts_with("OK"), "{ok}");

    // 512 scattered 4 KiB pages, WRITE with a notification.
    let pages: Vec<usize> = (0..512).map(|i| (i * 37) % 4096).collect();
    let l = list(pages.iter().map(|&p| local.desc(p * 4096, 4096)).collect());
    let r = list(
        pages
            .iter()
            .map(|&p| Desc::new(peer.base + (p * 4096) as u64, 4096, 0))
            .collect(),
    );
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &l,
            &r,
            &peer.name,
            &XferOptions::with_notif("w1"),
        )
        .unwrap();
    assert_eq!(req.backend_name(), "SHM");
    req.post().unwrap();
    req.wait(Some(Duration::from_secs(10))).unwrap();
    let got = peer.cmd("WAIT_NOTIF 10000");
    assert_eq!(got, format!("NOTIF {}:{}", a.name(), hex(b"w1")));
    for &p in pages.iter().take(64) {
        assert_eq!(
            peer.sum((p * 4096) as u64, 4096),
            checksum(&pattern(11, (p * 4096) as u64, 4096)),
            "page {p}"
        );
    }
    // One large READ of the whole peer buffer (split across worker threads).
    let whole = a
        .create_xfer_req(
            XferOp::Read,
            &list(vec![back.whole()]),
            &list(vec![Desc::new(peer.base, LEN as u64, 0)]),
            &peer.name,
            &XferOptions::default(),
        )
        .unwrap();
    whole.post().unwrap();
    whole.wait(Some(Duration::from_secs(30))).unwrap();
    let mut expected = pattern(5, 0, LEN);
    for &p in &pages {
        expected[p * 4096..(p + 1) * 4096].copy_from_slice(&pattern(11, (p * 4096) as u64, 4096));
    }
    back.assert_range(0, &expected, "the peer's buffer read back");
    // A notification from the peer arrives under its name.
    assert_eq!(
        peer.cmd(&format!("SEND_NOTIF {} {}", a.name(), hex(b"hi"))),
        "OK"
    );
    assert!(a.wait_notif(Duration::from_secs(10)));
    let n = a.get_notifs(&[]).unwrap();
    assert_eq!(
        (n[0].from.as_str(), n[0].msg.as_slice()),
        (peer.name.as_str(), &b"hi"[..])
    );
    peer.exit();
}

#[test]
fn killed_peer_fails_in_flight_and_later_posts_without_hanging() {
    const LEN: usize = 256 << 20;
    let local = TestBuffer::with_pattern(LEN, 3);
    let a = initiator(&local);
    let mut peer = PeerProcess::spawn(ENTRY, &unique_name("shm-victim"), "SHM", LEN, 1);
    a.load_remote_metadata(&peer.metadata).unwrap();
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![local.whole()]),
            &list(vec![Desc::new(peer.base, LEN as u64, 0)]),
            &peer.name,
            &XferOptions::default(),
        )
        .unwrap();
    req.post().unwrap();
    peer.kill();
    // The post either finished before the kill or fails; it never hangs.
    match req.wait(Some(Duration::from_secs(20))) {
        Ok(_) => {}
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::RemoteDisconnect | ErrorKind::NotFound),
            "in-flight post after the kill: {e}"
        ),
    }
    let e = req
        .post()
        .and_then(|_| req.wait(Some(Duration::from_secs(20))))
        .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::RemoteDisconnect | ErrorKind::NotFound),
        "post after the kill: {e}"
    );
    assert!(
        eventually(Duration::from_secs(2), || !a
            .check_remote_metadata(&peer.name, None)),
        "the dead peer's metadata was not invalidated within 2 s"
    );
    // The survivor still works: a fresh peer.
    let mut p2 = PeerProcess::spawn(ENTRY, &unique_name("shm-next"), "SHM", 4096, 2);
    a.load_remote_metadata(&p2.metadata).unwrap();
    let r = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![local.desc(0, 4096)]),
            &list(vec![Desc::new(p2.base, 4096, 0)]),
            &p2.name,
            &XferOptions::default(),
        )
        .unwrap();
    r.post().unwrap();
    r.wait(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(p2.sum(0, 4096), checksum(&pattern(3, 0, 4096)));
    p2.exit();
}

#[test]
fn idle_peer_death_is_detected_by_its_socket() {
    let local = TestBuffer::new(4096);
    let a = initiator(&local);
    let mut peer = PeerProcess::spawn(ENTRY, &unique_name("shm-idle"), "SHM", 4096, 1);
    a.load_remote_metadata(&peer.metadata).unwrap();
    a.make_connection(&peer.name, &[]).unwrap();
    let name = peer.name.clone();
    let killed = Instant::now();
    peer.kill();
    assert!(
        eventually(Duration::from_secs(2), || !a
            .check_remote_metadata(&name, None)),
        "an idle connection's peer death was not noticed within 2 s"
    );
    eprintln!("peer death noticed after {:?}", killed.elapsed());
}

#[test]
fn garbage_on_the_control_socket_is_harmless() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(unique_name("shm-sock"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut params = rixl::Params::new();
    params.insert("socket_dir".into(), dir.to_string_lossy().into_owned());
    let buf = TestBuffer::new(8192);
    let target = Agent::new(
        &unique_name("shm-t"),
        AgentConfig::default().backend_with("SHM", params),
    )
    .unwrap();
    // SAFETY: `buf` outlives `target`.
    unsafe { target.register_mem(&buf.reg_list(), &[]).unwrap() };
    let sock = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let garbage: [&[u8]; 4] = [
        b"\xff\xff\xff\xff\x02",             // huge length
        b"\x05\x00\x00\x00\x07hello",        // unknown kind
        b"\x03\x00\x00\x00\x01\xc3\x28\x00", // hello with invalid UTF-8
        b"\x01\x00\x00\x00\x02x",            // notification before hello
    ];
    for g in garbage {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(g);
    }
    // Still serving: a real initiator moves data and a notification.
    let src = TestBuffer::with_pattern(4096, 9);
    let a = initiator(&src);
    a.load_remote_metadata(&target.local_metadata().unwrap())
        .unwrap();
    let r = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![src.whole()]),
            &list(vec![buf.desc(0, 4096)]),
            target.name(),
            &XferOptions::with_notif("ok"),
        )
        .unwrap();
    r.post().unwrap();
    r.wait(Some(Duration::from_secs(10))).unwrap();
    assert!(target.wait_notif(Duration::from_secs(10)));
    let n = target.get_notifs(&[]).unwrap();
    assert_eq!(n.len(), 1, "garbage frames produced notifications: {n:?}");
    assert_eq!(n[0].msg, b"ok");
    buf.assert_range(0, &pattern(9, 0, 4096), "data after garbage");
    drop(a);
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_host_is_not_reachable_through_shm() {
    // Forge a peer blob whose SHM connection info names another boot id.
    let other = Agent::new(
        &unique_name("shm-far"),
        AgentConfig::default().backend("SHM"),
    )
    .unwrap();
    let mut md = rixl::core::AgentMetadata::decode(&other.local_metadata().unwrap()).unwrap();
    let mut info = rixl_shm::ConnInfo::decode(&md.conn[0].info).unwrap();
    info.host.boot_id = "00000000-0000-0000-0000-000000000000".into();
    md.conn[0].info = info.encode();
    md.agent = unique_name("shm-elsewhere");
    let buf = TestBuffer::new(64);
    let a = initiator(&buf);
    let e = a.load_remote_metadata(&md.encode()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(
        e.to_string().contains("no backend of this agent can reach"),
        "{e}"
    );
}
