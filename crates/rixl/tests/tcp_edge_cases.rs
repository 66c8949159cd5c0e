//! `TCP`-only cases on top of the conformance suite (which `conformance_tcp.rs` runs in one
//! process and across two, including peers killed mid-transfer and while idle): a malicious
//! initiator that crafts raw frames against the target's port to read or write outside a
//! registration, garbage frames, the wrong target instance, a frozen target and its deadline,
//! cancel of a striped write, and loss reports for the right instance only. Then the ways a
//! connection is read: by its backend thread, by threads waiting for their posts, by threads
//! polling `status()`, and on the target by threads waiting for notifications, all at once on
//! the same connections; a peer dying while a waiting thread reads; a stalled peer that must
//! not hold a notification waiter. Paced (large) and unpaced posts alternating on the same
//! connections.

#![cfg(feature = "tcp")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, ErrorKind, MemType, RegDesc, RegDescList, XferOp, XferOptions,
    XferRequest, XferStatus,
};
use rixl_tcp::wire::{self, ErrCode, Header, Hello, Kind, HEADER_LEN};
use rixl_testkit::peer::checksum;
use rixl_testkit::{block_on, pattern, unique_name, Rng, TestBuffer};

fn agent(prefix: &str) -> Agent {
    Agent::new(&unique_name(prefix), AgentConfig::default().backend("TCP")).unwrap()
}

fn initiator(buf: &TestBuffer) -> Agent {
    let a = agent("tcp-ini");
    // SAFETY: every buffer passed here is created before its agent and outlives it.
    unsafe { a.register_mem(&buf.reg_list(), &[]).unwrap() };
    a
}

use rixl_testkit::dram_list as list;

use rixl_testkit::eventually;

/// A target agent with one registered page in the middle of a three-page buffer (the pages
/// around it are guards that must never change), and what a raw client needs to talk to it.
struct Target {
    agent: Agent,
    info: rixl_tcp::ConnInfo,
    /// The target's own token for the registered page (published in its metadata).
    token: u64,
    page: u64,
}

fn target(buf: &TestBuffer) -> Target {
    let agent = agent("tcp-victim");
    let page = buf.addr() + 4096;
    let regs = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(page, 4096, 0)]);
    // SAFETY: `buf` outlives the agent (callers declare it first).
    unsafe { agent.register_mem(&regs, &[]).unwrap() };
    let md = rixl::core::AgentMetadata::decode(&agent.local_metadata().unwrap()).unwrap();
    let conn = md.conn.iter().find(|c| c.backend == "TCP").unwrap();
    let info = rixl_tcp::ConnInfo::decode(&conn.info).unwrap();
    let sec = md.sections.iter().find(|s| s.backend == "TCP").unwrap();
    let token = u64::from_le_bytes(sec.regions[0].public[..].try_into().unwrap());
    Target {
        agent,
        info,
        token,
        page,
    }
}

/// A raw client that passed the hello as agent `from`.
fn raw_client(t: &Target, from: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", t.info.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Hello {
        version: wire::VERSION,
        from: from.into(),
        from_nonce: 1,
        to: t.agent.name().into(),
        to_nonce: t.info.nonce,
        conn: 0,
    }
    .encode();
    let mut h = Header::new(Kind::Hello);
    h.len = hello.len() as u32;
    s.write_all(&h.encode()).unwrap();
    s.write_all(&hello).unwrap();
    let ack = read_frame(&mut s).expect("hello answer");
    assert_eq!((ack.0.kind, ack.0.size), (Kind::HelloAck, 0));
    s
}

/// Reads one response frame and its payload; `None` when the target closed the connection.
fn read_frame(s: &mut TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).ok()?;
    let h = Header::parse(&hb).expect("the target sends valid frames");
    let mut body = vec![0u8; h.len as usize];
    s.read_exact(&mut body).ok()?;
    Some((h, body))
}

fn write_frame(s: &mut TcpStream, id: u64, token: u64, addr: u64, data: &[u8]) {
    let mut h = Header::new(Kind::Write);
    h.id = id;
    h.token = token;
    h.addr = addr;
    h.len = data.len() as u32;
    s.write_all(&h.encode()).unwrap();
    s.write_all(data).unwrap();
}

fn read_req(s: &mut TcpStream, id: u64, token: u64, addr: u64, len: u64) {
    let mut h = Header::new(Kind::Read);
    h.id = id;
    h.token = token;
    h.addr = addr;
    h.size = len;
    s.write_all(&h.encode()).unwrap();
}

fn expect_refused(s: &mut TcpStream, id: u64, what: &str) {
    let (h, msg) = read_frame(s).unwrap_or_else(|| panic!("{what}: connection closed"));
    assert_eq!(h.kind, Kind::Err, "{what}: {h:?}");
    assert_eq!(h.id, id, "{what}");
    assert_eq!(ErrCode::from_u64(h.size), ErrCode::NotFound, "{what}");
    eprintln!("{what}: refused: {}", String::from_utf8_lossy(&msg));
}

#[test]
fn malicious_initiator_cannot_touch_memory_outside_registrations() {
    let mut buf = TestBuffer::new(3 * 4096);
    buf.fill(0x5a);
    let t = target(&buf);
    let mut s = raw_client(&t, "mallory");
    let evil = [0xeeu8; 8192];
    // WRITEs that straddle the end, start before, cover guard pages, use an unknown token,
    // overflow the address space: each refused, the connection keeps serving.
    let cases: [(u64, u64, usize, &str); 6] = [
        (t.token, t.page + 4000, 200, "write across the end"),
        (t.token, t.page - 8, 16, "write across the start"),
        (t.token, t.page + 4096, 4096, "write into the next page"),
        (t.token, t.page - 4096, 4096, "write into the previous page"),
        (t.token + 1000, t.page, 64, "write with an unknown token"),
        (t.token, u64::MAX - 8, 64, "write with an overflowing range"),
    ];
    for (i, (token, addr, len, what)) in cases.iter().enumerate() {
        write_frame(&mut s, i as u64 + 1, *token, *addr, &evil[..*len]);
        expect_refused(&mut s, i as u64 + 1, what);
    }
    buf.assert_filled(0, 3 * 4096, 0x5a, "nothing was written");
    // READs outside the registration leak nothing.
    read_req(&mut s, 10, t.token, t.page + 4095, 2);
    expect_refused(&mut s, 10, "read across the end");
    read_req(&mut s, 11, t.token, t.page - 4096, 4096);
    expect_refused(&mut s, 11, "read of the previous page");
    // The same connection still serves legitimate requests inside the registration.
    write_frame(&mut s, 12, t.token, t.page + 100, b"legit");
    let (h, _) = read_frame(&mut s).expect("ack");
    assert_eq!((h.kind, h.id), (Kind::Ack, 12));
    buf.assert_range(4096 + 100, b"legit", "a legitimate write landed");
    read_req(&mut s, 13, t.token, t.page + 100, 5);
    let (h, data) = read_frame(&mut s).expect("data");
    assert_eq!(
        (h.kind, h.id, data.as_slice()),
        (Kind::Data, 13, &b"legit"[..])
    );
    // After deregistration, the token is dead: refused, nothing written.
    let regs = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(t.page, 4096, 0)]);
    t.agent.deregister_mem(&regs, &[]).unwrap();
    write_frame(&mut s, 14, t.token, t.page, &evil[..64]);
    expect_refused(&mut s, 14, "write after deregistration");
    buf.assert_filled(4096, 100, 0x5a, "nothing was written after deregistration");
    buf.assert_filled(0, 4096, 0x5a, "guard page");
    buf.assert_filled(2 * 4096, 4096, 0x5a, "guard page");
    drop(t);
}

#[test]
fn garbage_frames_close_the_connection_and_the_target_keeps_serving() {
    let mut buf = TestBuffer::new(3 * 4096);
    buf.fill(0x11);
    let t = target(&buf);
    let mut huge = Header::new(Kind::Write);
    huge.len = u32::MAX;
    huge.token = t.token;
    huge.addr = t.page;
    let mut huge_read = Header::new(Kind::Read);
    huge_read.token = t.token;
    huge_read.addr = t.page;
    huge_read.size = u64::MAX;
    let mut bad_hello = Header::new(Kind::Hello);
    bad_hello.len = 10;
    let mut wrong_dir = Header::new(Kind::Ack);
    wrong_dir.id = 1;
    let mut truncated = Header::new(Kind::Write);
    truncated.token = t.token;
    truncated.addr = t.page;
    truncated.len = 4096;
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut noise = vec![0u8; 4096];
    for b in noise.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }
    // Before the hello.
    let before: Vec<Vec<u8>> = vec![
        noise.clone(),
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        huge.encode().to_vec(),
        [bad_hello.encode().to_vec(), vec![0xff; 10]].concat(),
        vec![wire::MAGIC],
    ];
    for g in &before {
        let mut s = TcpStream::connect(("127.0.0.1", t.info.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(g);
        if g.len() > 1 {
            // The target closes on garbage (a lone byte waits for the hello deadline instead).
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        }
    }
    // After a valid hello.
    let after: Vec<Vec<u8>> = vec![
        noise.clone(),
        huge.encode().to_vec(),
        huge_read.encode().to_vec(),
        wrong_dir.encode().to_vec(),
        [truncated.encode().to_vec(), vec![0xee; 100]].concat(),
    ];
    for (i, g) in after.iter().enumerate() {
        let mut s = raw_client(&t, &format!("garbage-{i}"));
        s.write_all(g).unwrap();
        if i == after.len() - 1 {
            // A truncated frame: the sender goes away mid-frame.
            drop(s);
            continue;
        }
        assert!(
            read_frame(&mut s).is_none(),
            "garbage {i} did not close the connection"
        );
    }
    // Nothing landed, except possibly the truncated WRITE's 100 bytes: that frame named a valid
    // range, and the target writes a frame's bytes as they arrive.
    buf.assert_filled(0, 4096, 0x11, "guard page");
    buf.assert_filled(
        4096 + 100,
        4096 - 100,
        0x11,
        "registered page past the truncation",
    );
    buf.assert_filled(2 * 4096, 4096, 0x11, "guard page");
    // A real initiator still moves data and a notification. It writes past the truncated
    // frame's 100 bytes: the target may still be handling that dropped connection, and its
    // bytes, which named a valid range, may land at any time.
    const SKIP: usize = 128;
    let src = TestBuffer::with_pattern(4096 - SKIP, 9);
    let a = initiator(&src);
    a.load_remote_metadata(&t.agent.local_metadata().unwrap())
        .unwrap();
    let r = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![src.whole()]),
            &list(vec![Desc::new(
                t.page + SKIP as u64,
                (4096 - SKIP) as u64,
                0,
            )]),
            t.agent.name(),
            &XferOptions::with_notif("ok"),
        )
        .unwrap();
    r.post().unwrap();
    r.wait(Some(Duration::from_secs(10))).unwrap();
    assert!(t.agent.wait_notif(Duration::from_secs(10)));
    let n = t.agent.get_notifs(&[]).unwrap();
    assert_eq!(n.len(), 1, "garbage frames produced notifications: {n:?}");
    assert_eq!(n[0].msg, b"ok");
    buf.assert_range(
        4096 + SKIP,
        &pattern(9, 0, 4096 - SKIP),
        "data after garbage",
    );
    drop(a);
    drop(t);
}

#[test]
fn wrong_target_instance_is_refused() {
    let buf = TestBuffer::new(3 * 4096);
    let t = target(&buf);
    let mut s = TcpStream::connect(("127.0.0.1", t.info.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Hello {
        version: wire::VERSION,
        from: "x".into(),
        from_nonce: 1,
        to: t.agent.name().into(),
        to_nonce: t.info.nonce ^ 1,
        conn: 0,
    }
    .encode();
    let mut h = Header::new(Kind::Hello);
    h.len = hello.len() as u32;
    s.write_all(&[h.encode().to_vec(), hello].concat()).unwrap();
    let (ack, msg) = read_frame(&mut s).expect("a refusal");
    assert_eq!(ack.kind, Kind::HelloAck);
    assert_eq!(ErrCode::from_u64(ack.size), ErrCode::Mismatch);
    assert!(
        String::from_utf8_lossy(&msg).contains("instance"),
        "{msg:?}"
    );
    assert!(read_frame(&mut s).is_none(), "the connection is closed");
}

fn agent_with(prefix: &str, params: &[(&str, &str)]) -> Agent {
    let p: rixl::Params = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Agent::new(
        &unique_name(prefix),
        AgentConfig::default().backend_with("TCP", p),
    )
    .unwrap()
}

/// A peer whose process is alive (its kernel accepts and acknowledges bytes) but which never
/// answers: the response deadline turns it into an error instead of a hang.
#[test]
fn frozen_target_times_out_within_the_deadline() {
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = fake.local_addr().unwrap().port();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..2 {
            let Ok((mut s, _)) = fake.accept() else {
                return;
            };
            let mut hb = [0u8; HEADER_LEN];
            s.read_exact(&mut hb).unwrap();
            let h = Header::parse(&hb).unwrap();
            let mut body = vec![0u8; h.len as usize];
            s.read_exact(&mut body).unwrap();
            s.write_all(&Header::new(Kind::HelloAck).encode()).unwrap();
            held.push(s); // and never read again
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    // Real metadata whose TCP connection info points at the silent listener.
    let buf = TestBuffer::new(3 * 4096);
    let t = target(&buf);
    let mut md = rixl::core::AgentMetadata::decode(&t.agent.local_metadata().unwrap()).unwrap();
    md.agent = unique_name("tcp-frozen");
    for c in md.conn.iter_mut().filter(|c| c.backend == "TCP") {
        c.info = rixl_tcp::ConnInfo {
            nonce: t.info.nonce,
            port,
            addrs: vec!["127.0.0.1".parse().unwrap()],
        }
        .encode();
    }
    let src = TestBuffer::with_pattern(4096, 1);
    let (a, req) = write_request(
        &[("deadline_ms", "500"), ("keepalive_secs", "1")],
        &src,
        &md,
        Desc::new(t.page, 4096, 0),
    );
    let posted = Instant::now();
    req.post().unwrap();
    let e = req.wait(Some(Duration::from_secs(30))).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::RemoteDisconnect),
        "{e}"
    );
    eprintln!("frozen target reported after {:?}: {e}", posted.elapsed());
    assert!(
        eventually(Duration::from_secs(5), || !a
            .check_remote_metadata(&md.agent, None)),
        "the frozen peer was not invalidated"
    );
    drop(holder);
}

/// `cancel` of a large striped WRITE is fenced: once it returns, the target's memory no longer
/// changes, the status is `Canceled`, and a repost moves everything.
#[test]
fn cancel_of_a_striped_write_is_fenced() {
    const LEN: usize = 64 << 20;
    let src = TestBuffer::with_pattern(LEN, 21);
    let dst = TestBuffer::new(LEN);
    let a = agent("tcp-cancel-a");
    let b = agent("tcp-cancel-b");
    // SAFETY: both buffers outlive both agents.
    unsafe {
        a.register_mem(&src.reg_list(), &[]).unwrap();
        b.register_mem(&dst.reg_list(), &[]).unwrap();
    }
    a.load_remote_metadata(&b.local_metadata().unwrap())
        .unwrap();
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![src.whole()]),
            &list(vec![dst.whole()]),
            b.name(),
            &XferOptions::with_notif("never"),
        )
        .unwrap();
    for _ in 0..3 {
        req.post().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        req.cancel().unwrap();
        let before = checksum(dst.as_slice());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            checksum(dst.as_slice()),
            before,
            "bytes landed after cancel returned"
        );
        match req.status() {
            Ok(s) => eprintln!("the post finished before the cancel: {s:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Canceled, "{e}"),
        }
    }
    req.post().unwrap();
    req.wait(Some(Duration::from_secs(60))).unwrap();
    dst.assert_range(0, &pattern(21, 0, LEN), "data after the repost");
    assert!(b.wait_notif(Duration::from_secs(10)));
    let n = b.get_notifs(&[]).unwrap();
    let msgs: Vec<&[u8]> = n.iter().map(|n| n.msg.as_slice()).collect();
    // Only the completed post notifies (a post cancelled after all its parts were served may
    // have notified too, which is indistinguishable from finishing first).
    assert!(!msgs.is_empty() && msgs.len() <= 4, "{msgs:?}");
    drop(a);
    drop(b);
}

/// An inbound connection that ends without a goodbye makes the target drop the initiator's
/// metadata only if its hello matches that initiator's published instance (a stranger using
/// someone else's name cannot get them invalidated), and only the load it said hello to.
#[test]
fn only_the_real_instance_can_be_reported_lost() {
    let buf = TestBuffer::new(3 * 4096);
    let t = target(&buf);
    let victim = agent("tcp-victim-name");
    t.agent
        .load_remote_metadata(&victim.local_metadata().unwrap())
        .unwrap();
    let md = rixl::core::AgentMetadata::decode(&victim.local_metadata().unwrap()).unwrap();
    let c = md.conn.iter().find(|c| c.backend == "TCP").unwrap();
    let victim_nonce = rixl_tcp::ConnInfo::decode(&c.info).unwrap().nonce;
    let connect_as = |nonce: u64| {
        let mut s = TcpStream::connect(("127.0.0.1", t.info.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = Hello {
            version: wire::VERSION,
            from: victim.name().into(),
            from_nonce: nonce,
            to: t.agent.name().into(),
            to_nonce: t.info.nonce,
            conn: 0,
        }
        .encode();
        let mut h = Header::new(Kind::Hello);
        h.len = hello.len() as u32;
        s.write_all(&[h.encode().to_vec(), hello].concat()).unwrap();
        let (ack, _) = read_frame(&mut s).expect("hello answer");
        assert_eq!((ack.kind, ack.size), (Kind::HelloAck, 0));
        s
    };
    // A stranger with the victim's name but another instance nonce disconnects abruptly...
    drop(connect_as(victim_nonce ^ 0x5555));
    // ...give a wrong report time to happen (a slow machine can only hide a regression here,
    // never fail a correct backend), and check the target still serves.
    std::thread::sleep(Duration::from_millis(300));
    let mut probe = raw_client(&t, "probe");
    read_req(&mut probe, 1, t.token, t.page, 1);
    assert_eq!(read_frame(&mut probe).expect("data").0.kind, Kind::Data);
    assert!(
        t.agent.check_remote_metadata(victim.name(), None),
        "a stranger's disconnect invalidated the victim"
    );
    // A connection older than the application's latest load of the victim (say, one that
    // dies of a partition after the network healed and the victim was loaded again) cannot
    // drop that load.
    let old = connect_as(victim_nonce);
    t.agent.invalidate_remote_metadata(victim.name());
    t.agent
        .load_remote_metadata(&victim.local_metadata().unwrap())
        .unwrap();
    drop(old);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        t.agent.check_remote_metadata(victim.name(), None),
        "a connection from before the reload invalidated it"
    );
    // The matching instance disconnecting without a goodbye does count as the peer's loss.
    drop(connect_as(victim_nonce));
    assert!(
        eventually(Duration::from_secs(5), || !t
            .agent
            .check_remote_metadata(victim.name(), None)),
        "the real instance's abrupt disconnect was not noticed"
    );
}

/// Posts `req` and sees it complete in one of four ways: `wait` (the waiting thread reads the
/// connection), `status()` polling (each poll reads it once), nobody driving it (the backend's
/// reader thread completes it), or one poll and then nobody (the reader thread must take over
/// once the poller is gone).
fn complete(req: &XferRequest, how: usize) {
    const LIMIT: Duration = Duration::from_secs(20);
    if req.post().unwrap() == XferStatus::Done {
        return;
    }
    match how % 4 {
        0 => {
            req.wait(Some(LIMIT)).unwrap();
        }
        1 => {
            let start = Instant::now();
            while req.status().unwrap() != XferStatus::Done {
                assert!(
                    start.elapsed() < LIMIT,
                    "status() polling never saw the end"
                );
                std::thread::yield_now();
            }
        }
        2 => {
            block_on(req.completion()).unwrap();
        }
        _ => {
            let _ = req.status().unwrap();
            block_on(req.completion()).unwrap();
        }
    }
    assert_eq!(req.status().unwrap(), XferStatus::Done);
}

/// Threads waiting for their posts, threads polling `status()`, posts nobody drives (completed
/// by the reader threads), and on the target a thread waiting for notifications (which serves
/// the inbound connections itself while it spins) next to the server threads, all on the same
/// connections at once: every request completes with the right bytes, and every notification
/// arrives exactly once. Sizes above and below what a waiting thread serves itself.
#[test]
fn waiters_pollers_and_backend_threads_share_connections() {
    for conns in ["1", "2"] {
        share_connections(conns);
    }
}

fn share_connections(conns: &str) {
    const THREADS: usize = 4;
    const ITERS: usize = 100;
    const SLOT: usize = 1 << 20;
    const SIZES: [usize; 4] = [64, 4096, 100 << 10, 1 << 20];
    let a = agent_with("tcp-share-a", &[("connections", conns)]);
    let b = agent_with("tcp-share-b", &[("connections", conns)]);
    let dst = TestBuffer::new(THREADS * SLOT);
    let mut srcs: Vec<TestBuffer> = (0..THREADS).map(|_| TestBuffer::new(SLOT)).collect();
    let backs: Vec<TestBuffer> = (0..THREADS).map(|_| TestBuffer::new(SLOT)).collect();
    // SAFETY: every buffer outlives both agents, which are dropped explicitly at the end.
    unsafe {
        for buf in srcs.iter().chain(&backs) {
            a.register_mem(&buf.reg_list(), &[]).unwrap();
        }
        b.register_mem(&dst.reg_list(), &[]).unwrap();
    }
    a.load_remote_metadata(&b.local_metadata().unwrap())
        .unwrap();
    let peer = b.name().to_owned();
    let got = std::thread::scope(|s| {
        let b = &b;
        let collector = s.spawn(move || {
            let mut got: Vec<String> = Vec::new();
            while got.len() < THREADS * ITERS {
                if !b.wait_notif(Duration::from_secs(20)) {
                    break;
                }
                for n in b.get_notifs(&[]).unwrap() {
                    got.push(String::from_utf8(n.msg).unwrap());
                }
            }
            got
        });
        let workers: Vec<_> = srcs
            .iter_mut()
            .zip(&backs)
            .enumerate()
            .map(|(t, (src, back))| {
                let (a, peer, dst) = (&a, peer.as_str(), &dst);
                s.spawn(move || {
                    let mut rng = Rng::new(t as u64 + 7);
                    for i in 0..ITERS {
                        let len = SIZES[rng.below(SIZES.len())];
                        let seed = (t * 10_000 + i) as u64;
                        src.write(0, &pattern(seed, 0, len));
                        let remote = list(vec![Desc::new(
                            dst.addr() + (t * SLOT) as u64,
                            len as u64,
                            0,
                        )]);
                        let w = a
                            .create_xfer_req(
                                XferOp::Write,
                                &list(vec![src.desc(0, len)]),
                                &remote,
                                peer,
                                &XferOptions::with_notif(format!("{t}-{i}")),
                            )
                            .unwrap();
                        complete(&w, i + t);
                        let r = a
                            .create_xfer_req(
                                XferOp::Read,
                                &list(vec![back.desc(0, len)]),
                                &remote,
                                peer,
                                &XferOptions::default(),
                            )
                            .unwrap();
                        complete(&r, i + t + 1);
                        back.assert_range(0, &pattern(seed, 0, len), "bytes read back");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        collector.join().unwrap()
    });
    let mut got = got;
    got.sort();
    let mut want: Vec<String> = (0..THREADS)
        .flat_map(|t| (0..ITERS).map(move |i| format!("{t}-{i}")))
        .collect();
    want.sort();
    assert_eq!(
        got, want,
        "each notification exactly once ({conns} connections)"
    );
    drop(a);
    drop(b);
}

/// Agent metadata like `t`'s but under another name, its TCP connection info pointing at
/// `port` on loopback (a fake target).
fn metadata_pointing_at(t: &Agent, prefix: &str, port: u16) -> rixl::core::AgentMetadata {
    let mut md = rixl::core::AgentMetadata::decode(&t.local_metadata().unwrap()).unwrap();
    md.agent = unique_name(prefix);
    for c in md.conn.iter_mut().filter(|c| c.backend == "TCP") {
        let nonce = rixl_tcp::ConnInfo::decode(&c.info).unwrap().nonce;
        c.info = rixl_tcp::ConnInfo {
            nonce,
            port,
            addrs: vec!["127.0.0.1".parse().unwrap()],
        }
        .encode();
    }
    md
}

/// An initiator (TCP parameters `params`) with `src` registered that knows `md`, and its
/// WRITE of all of `src` to `remote` at `md`'s agent. The caller keeps `src` alive longer than
/// the agent (declared first, it is dropped last).
fn write_request(
    params: &[(&str, &str)],
    src: &TestBuffer,
    md: &rixl::core::AgentMetadata,
    remote: Desc,
) -> (Agent, XferRequest) {
    let a = agent_with("tcp-ini", params);
    // SAFETY: the caller keeps `src` alive longer than the returned agent.
    unsafe { a.register_mem(&src.reg_list(), &[]).unwrap() };
    a.load_remote_metadata(&md.encode()).unwrap();
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![src.whole()]),
            &list(vec![remote]),
            &md.agent,
            &XferOptions::default(),
        )
        .unwrap();
    (a, req)
}

/// A peer that dies (closes its connection without answering) while the initiator's thread is
/// the one reading the connection (in `wait`, or polling `status()`): the thread sees the end
/// itself, the request fails with `RemoteDisconnect`, and the peer is invalidated.
#[test]
fn a_peer_dying_while_a_waiting_thread_reads_is_noticed() {
    for polling in [false, true] {
        let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = fake.local_addr().unwrap().port();
        let dier = std::thread::spawn(move || {
            let (mut s, _) = fake.accept().unwrap();
            let mut hb = [0u8; HEADER_LEN];
            s.read_exact(&mut hb).unwrap();
            let h = Header::parse(&hb).unwrap();
            let mut body = vec![0u8; h.len as usize];
            s.read_exact(&mut body).unwrap();
            s.write_all(&Header::new(Kind::HelloAck).encode()).unwrap();
            // Take the request, let the initiator start waiting, then die without a word.
            s.read_exact(&mut hb).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        });
        let buf = TestBuffer::new(3 * 4096);
        let t = target(&buf);
        let md = metadata_pointing_at(&t.agent, "tcp-dier", port);
        let src = TestBuffer::with_pattern(64, 3);
        let (a, req) = write_request(&[("connections", "1")], &src, &md, Desc::new(t.page, 64, 0));
        req.post().unwrap();
        let e = if polling {
            let start = Instant::now();
            loop {
                match req.status() {
                    Ok(XferStatus::InProgress) => {
                        assert!(start.elapsed() < Duration::from_secs(20), "no end seen");
                        std::thread::yield_now();
                    }
                    Ok(s) => panic!("a write to a dead peer reported {s:?}"),
                    Err(e) => break e,
                }
            }
        } else {
            req.wait(Some(Duration::from_secs(20))).unwrap_err()
        };
        assert!(
            matches!(e.kind(), ErrorKind::RemoteDisconnect | ErrorKind::NotFound),
            "{e}"
        );
        assert!(
            eventually(Duration::from_secs(5), || !a
                .check_remote_metadata(&md.agent, None)),
            "the dead peer was not invalidated"
        );
        dier.join().unwrap();
    }
}

/// A peer that sends part of a request and stalls cannot hold a thread of the target that
/// waits for notifications (such threads serve the connections themselves, but only requests
/// that have fully arrived): `wait_notif` and `get_notifs` keep returning on time, and the
/// request is served by the connection's server thread once it is complete.
#[test]
fn a_stalled_peer_cannot_hold_a_notification_waiter() {
    let mut buf = TestBuffer::new(3 * 4096);
    buf.fill(0x22);
    let t = target(&buf);
    let mut s = raw_client(&t, "staller");
    let data = pattern(9, 0, 4000);
    let mut h = Header::new(Kind::Write);
    h.id = 1;
    h.token = t.token;
    h.addr = t.page;
    h.len = data.len() as u32;
    s.write_all(&h.encode()).unwrap();
    s.write_all(&data[..100]).unwrap();
    for _ in 0..5 {
        let start = Instant::now();
        assert!(!t.agent.wait_notif(Duration::from_millis(50)));
        assert!(t.agent.get_notifs(&[]).unwrap().is_empty());
        // The frame deadline (5 s by default) would show here if the waiter had blocked.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a notification waiter was held by a stalled request for {:?}",
            start.elapsed()
        );
    }
    s.write_all(&data[100..]).unwrap();
    let mut n = Header::new(Kind::Notif);
    n.id = 2;
    n.flags = wire::F_NOACK;
    n.len = 5;
    s.write_all(&n.encode()).unwrap();
    s.write_all(b"after").unwrap();
    assert!(t.agent.wait_notif(Duration::from_secs(10)));
    let got = t.agent.get_notifs(&[]).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].from.as_str(), got[0].msg.as_slice()),
        ("staller", &b"after"[..])
    );
    buf.assert_range(4096, &data, "the completed write landed");
    let (ack, _) = read_frame(&mut s).expect("ack");
    assert_eq!(
        (ack.kind, ack.id),
        (Kind::Ack, 1),
        "standalone notifications are not acked"
    );
}

/// The response deadline measures silence, not duration: a WRITE whose bytes take several
/// deadlines to reach a slow peer is answered only at its end, and must not be failed while
/// they flow, neither while `write` calls return nor while the socket buffers drain after the
/// last one. (It was: the deadline counted only bytes received, so a 1 GiB WRITE over a
/// 1 Gbit/s link failed under the default 5 s deadline.) The peer here is a raw target that
/// takes 64 KiB every 4 ms (16 MB/s per connection) and acknowledges each connection's share
/// at its end.
#[test]
fn a_write_to_a_slow_peer_outlasting_the_deadline_succeeds() {
    // More than the socket buffers hold, so the sender blocks in `write` too.
    const LEN: usize = 24 << 20;
    let slow = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = slow.local_addr().unwrap().port();
    // A small receive buffer (inherited by accepted connections): the peer's kernel then
    // acknowledges about as fast as the slow reader takes bytes, as over a slow link, instead
    // of swallowing megabytes the reader takes seconds to consume.
    let small: libc::c_int = 64 << 10;
    // SAFETY: sets one int option on a listening socket we own; `small` outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&slow),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF");
    std::thread::spawn(move || {
        for conn in slow.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut hb = [0u8; HEADER_LEN];
                if s.read_exact(&mut hb).is_err() {
                    return;
                }
                let h = Header::parse(&hb).unwrap();
                let mut body = vec![0u8; h.len as usize];
                s.read_exact(&mut body).unwrap();
                s.write_all(&Header::new(Kind::HelloAck).encode()).unwrap();
                let mut chunk = vec![0u8; 64 << 10];
                let mut got = 0usize;
                while s.read_exact(&mut hb).is_ok() {
                    let h = Header::parse(&hb).unwrap();
                    let mut left = if h.kind == Kind::Write {
                        h.len as usize
                    } else {
                        0
                    };
                    got += left;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        s.read_exact(&mut chunk[..n]).unwrap();
                        left -= n;
                        std::thread::sleep(Duration::from_millis(4));
                    }
                    // Like the real target, one acknowledgement per post (its share on this
                    // connection: half of LEN), so nothing comes back while the bytes flow.
                    if h.kind == Kind::Write && got.is_multiple_of(LEN / 2) {
                        let mut ack = Header::new(Kind::Ack);
                        ack.id = h.id;
                        s.write_all(&ack.encode()).unwrap();
                    }
                }
            });
        }
    });
    // Real metadata (its registration) whose TCP connection info points at the slow target.
    let buf = TestBuffer::new(LEN);
    let t = agent_with("tcp-tgt", &[]);
    // SAFETY: `buf` outlives `t`.
    unsafe { t.register_mem(&buf.reg_list(), &[]).unwrap() };
    let md = metadata_pointing_at(&t, "tcp-slow", port);
    let src = TestBuffer::with_pattern(LEN, 3);
    let (_a, req) = write_request(&[("deadline_ms", "100")], &src, &md, buf.whole());
    let t0 = Instant::now();
    req.post().unwrap();
    req.wait(Some(Duration::from_secs(30)))
        .expect("a WRITE whose bytes keep flowing to a slow peer");
    let took = t0.elapsed();
    assert!(
        took > Duration::from_millis(200),
        "the slow peer took only {took:?}: the case did not outlast the deadline"
    );
}

/// The liveness parameters: defaults reported, nonsense refused with a message naming it.
#[test]
fn liveness_parameters_are_reported_and_validated() {
    let a = agent("tcp-params");
    let p = a.backend_params("TCP").unwrap();
    assert_eq!(p["unreachable_ms"], "1500");
    assert_eq!(p["keepalive_secs"], "1");
    assert_eq!(p["deadline_ms"], "5000");
    assert_eq!(p["pace_min_bytes"], "2097152");
    for (k, v) in [
        ("unreachable_ms", "0"),
        ("unreachable_ms", "soon"),
        ("unreachable_ms", "4294967296"),
        ("keepalive_secs", "0"),
        ("pace_min_bytes", "-1"),
    ] {
        let params: rixl::Params = [(k.to_owned(), v.to_owned())].into_iter().collect();
        let e = Agent::new(
            &unique_name("tcp-bad-param"),
            AgentConfig::default().backend_with("TCP", params),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParam, "{k}={v}: {e}");
        assert!(e.message().contains(k), "{k}={v}: {e}");
    }
}

/// A live peer that is merely quiet is never taken for an unreachable one: over several
/// `unreachable_ms` of silence its kernel answers the keepalive probes, both agents keep each
/// other loaded, the connections carry a WRITE and a notification afterwards, and the backend
/// threads mostly slept meanwhile. Also with probes starting later than `unreachable_ms`
/// (a silence past the limit with no probe out is no verdict, nor a reason to spin).
#[test]
fn a_quiet_live_peer_is_kept() {
    quiet_live_peer(&[]);
}

#[test]
fn a_quiet_live_peer_is_kept_with_late_probes() {
    quiet_live_peer(&[("keepalive_secs", "3")]);
}

/// Voluntary context switches so far of every thread of this process, by thread id.
fn context_switches() -> std::collections::HashMap<String, u64> {
    let mut by_thread = std::collections::HashMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let n = status
            .lines()
            // Voluntary ones only: a thread that wakes to look is one; preemption on a busy
            // machine is not this code's doing.
            .filter(|l| l.starts_with("voluntary_ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
        by_thread.insert(t.file_name().to_string_lossy().into_owned(), n);
    }
    by_thread
}

/// Context switches since `before` of the threads that lived through the whole interval
/// (other tests of this binary start and end threads meanwhile).
fn context_switches_since(before: &std::collections::HashMap<String, u64>) -> u64 {
    context_switches()
        .iter()
        .filter_map(|(tid, n)| Some(n.saturating_sub(*before.get(tid)?)))
        .sum()
}

fn quiet_live_peer(params: &[(&str, &str)]) {
    let dst = TestBuffer::new(4096);
    let src = TestBuffer::with_pattern(4096, 9);
    let t = agent_with("tcp-quiet-target", params);
    let a = agent_with("tcp-quiet-initiator", params);
    // SAFETY: both buffers outlive the agents (declared first).
    unsafe {
        t.register_mem(&dst.reg_list(), &[]).unwrap();
        a.register_mem(&src.reg_list(), &[]).unwrap();
    }
    a.load_remote_metadata(&t.local_metadata().unwrap())
        .unwrap();
    t.load_remote_metadata(&a.local_metadata().unwrap())
        .unwrap();
    a.make_connection(t.name(), &[]).unwrap();
    t.send_notif(a.name(), b"hi", None).unwrap();
    assert!(a.wait_notif(Duration::from_secs(5)));
    let before = context_switches();
    // Well past `unreachable_ms` and past the first keepalive probes.
    std::thread::sleep(Duration::from_millis(4500));
    let switches = context_switches_since(&before);
    eprintln!("{params:?}: {switches} context switches over 4.5 s of quiet");
    // A reader thread re-checking every few milliseconds would make hundreds per connection.
    assert!(switches < 200, "{switches} context switches while quiet");
    assert!(a.check_remote_metadata(t.name(), None));
    assert!(t.check_remote_metadata(a.name(), None));
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![src.whole()]),
            &list(vec![dst.whole()]),
            t.name(),
            &XferOptions::with_notif("after the quiet"),
        )
        .unwrap();
    req.post().unwrap();
    req.wait(Some(Duration::from_secs(10))).unwrap();
    dst.assert_range(0, &pattern(9, 0, 4096), "written after the quiet");
}

/// Large shares are paced (a small socket buffer: the initiator's for WRITE, the target's for
/// READ answers, asked for with a frame flag) and small ones are not. Posts of both kinds
/// alternate on the same connections here, with one connection and with two, and every byte
/// must land where it belongs: the flag must not disturb the framing, and a connection must
/// switch back and forth.
#[test]
fn paced_and_unpaced_posts_alternate_on_one_connection() {
    for conns in ["1", "2"] {
        const BLOCK: usize = 1 << 20;
        const N: usize = 16;
        let src = TestBuffer::with_pattern(N * BLOCK, 31);
        let back = TestBuffer::new(N * BLOCK);
        let dst = TestBuffer::new(N * BLOCK);
        let a = agent_with("tcp-pace-a", &[("connections", conns)]);
        let b = agent_with("tcp-pace-b", &[("connections", conns)]);
        // SAFETY: the buffers are declared before the agents and outlive them.
        unsafe {
            a.register_mem(&src.reg_list(), &[]).unwrap();
            a.register_mem(&back.reg_list(), &[]).unwrap();
            b.register_mem(&dst.reg_list(), &[]).unwrap();
        }
        a.load_remote_metadata(&b.local_metadata().unwrap())
            .unwrap();
        // 16 blocks, the remote side in reverse order (no merging): 8 or 16 MiB per share.
        let blocks = |buf: &TestBuffer, reverse: bool| {
            list(
                (0..N)
                    .map(|i| buf.desc(if reverse { N - 1 - i } else { i } * BLOCK, BLOCK))
                    .collect(),
            )
        };
        let run = |op, local: Desc, remote: Desc| {
            let req = a
                .create_xfer_req(
                    op,
                    &list(vec![local]),
                    &list(vec![remote]),
                    b.name(),
                    &XferOptions::default(),
                )
                .unwrap();
            req.post().unwrap();
            req.wait(Some(Duration::from_secs(30))).unwrap();
        };
        let big_write = a
            .create_xfer_req(
                XferOp::Write,
                &blocks(&src, false),
                &blocks(&dst, true),
                b.name(),
                &XferOptions::default(),
            )
            .unwrap();
        let big_read = a
            .create_xfer_req(
                XferOp::Read,
                &blocks(&back, false),
                &blocks(&dst, true),
                b.name(),
                &XferOptions::default(),
            )
            .unwrap();
        for round in 0..2 {
            big_write.post().unwrap();
            big_write.wait(Some(Duration::from_secs(30))).unwrap();
            for i in 0..N {
                dst.assert_range(
                    (N - 1 - i) * BLOCK,
                    &pattern(31, (i * BLOCK) as u64, BLOCK),
                    &format!("round {round}, {conns} connection(s): written block {i}"),
                );
            }
            // Small posts on the same connections: a 4 KiB WRITE over the first block, then a
            // 64 KiB READ of it.
            run(
                XferOp::Write,
                src.desc(N * BLOCK - 4096, 4096),
                dst.desc(0, 4096),
            );
            run(XferOp::Read, back.desc(0, 65536), dst.desc(0, 65536));
            let mut want = pattern(31, (N * BLOCK - 4096) as u64, 4096);
            want.extend(pattern(31, ((N - 1) * BLOCK + 4096) as u64, 65536 - 4096));
            back.assert_range(
                0,
                &want,
                &format!("round {round}: small READ after small WRITE"),
            );
            big_read.post().unwrap();
            big_read.wait(Some(Duration::from_secs(30))).unwrap();
            for i in 0..N {
                let mut want = pattern(31, (i * BLOCK) as u64, BLOCK);
                if i == N - 1 {
                    want[..4096].copy_from_slice(&pattern(31, (N * BLOCK - 4096) as u64, 4096));
                }
                back.assert_range(
                    i * BLOCK,
                    &want,
                    &format!("round {round}, {conns} connection(s): read block {i}"),
                );
            }
        }
        drop(a);
        drop(b);
    }
}

/// A TCP-only agent is its own target: a READ between two overlapping halves of one
/// registration (4K-aliased: the copy must not fall into `memmove`'s cliff, nor mangle
/// overlapping bytes) lands like `memmove`, and its notification and a standalone one arrive in
/// the agent's own queue, under its own name.
#[test]
fn self_target_read_with_overlapping_sides_and_notifications() {
    let buf = TestBuffer::with_pattern(1 << 20, 31);
    let a = initiator(&buf);
    let me = a.name().to_owned();
    let r = a
        .create_xfer_req(
            XferOp::Read,
            &list(vec![buf.desc(4096 + 3, 512 << 10)]),
            &list(vec![buf.desc(0, 512 << 10)]),
            &me,
            &XferOptions::with_notif(b"read".to_vec()),
        )
        .unwrap();
    r.post().unwrap();
    r.wait(Some(Duration::from_secs(10))).unwrap();
    buf.assert_range(4096 + 3, &pattern(31, 0, 512 << 10), "read onto itself");
    buf.assert_range(0, &pattern(31, 0, 4096 + 3), "bytes before the destination");
    a.send_notif(&me, b"standalone", None).unwrap();
    let got: Vec<(String, Vec<u8>)> = a
        .get_notifs(&[])
        .unwrap()
        .into_iter()
        .map(|n| (n.from, n.msg))
        .collect();
    assert_eq!(
        got,
        [(me.clone(), b"read".to_vec()), (me, b"standalone".to_vec())]
    );
}
