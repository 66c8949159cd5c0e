//! `SHM`-only cases on top of the conformance suite (which `conformance_shm.rs` runs in one
//! process and across two, including peers killed mid-transfer and while idle): garbage on the
//! control socket, and connection info from another host.

#![cfg(feature = "shm")]

use std::time::Duration;

use rixl::{Agent, AgentConfig, ErrorKind, XferOp, XferOptions};
use rixl_testkit::{pattern, unique_name, TestBuffer};

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

#[test]
fn huge_pages_parameter_is_checked_and_reported() {
    let with = |v: &str| {
        let mut p = rixl::Params::new();
        p.insert("huge_pages".into(), v.into());
        Agent::new(
            &unique_name("shm-thp"),
            AgentConfig::default().backend_with("SHM", p),
        )
    };
    let e = with("sometimes").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
    assert!(e.to_string().contains("huge_pages"), "{e}");
    let off = with("off").unwrap();
    assert_eq!(off.backend_params("SHM").unwrap()["huge_pages"], "off");
    let default = initiator(&TestBuffer::new(64));
    assert_eq!(
        default.backend_params("SHM").unwrap()["huge_pages"],
        "collapse"
    );
}

/// Posts one `op` of `local` ↔ `remote` from `a` to `target` and waits for it.
fn move_one(a: &Agent, op: XferOp, local: rixl::Desc, remote: rixl::Desc, target: &Agent) {
    let r = a
        .create_xfer_req(
            op,
            &list(vec![local]),
            &list(vec![remote]),
            target.name(),
            &XferOptions::default(),
        )
        .unwrap();
    r.post().unwrap();
    r.wait(Some(Duration::from_secs(10))).unwrap();
}

#[test]
fn transfers_cross_huge_page_boundaries_of_collapsed_regions() {
    // Registering 8 MiB queues its aligned interior for collapsing into 2 MiB pages (where the
    // kernel can), in the background and so possibly while these transfers run: writes and
    // reads straddling those page boundaries must land byte-exact either way.
    const LEN: usize = 8 << 20;
    let mut remote = TestBuffer::new(LEN);
    remote.fill(0);
    let target = initiator(&remote);
    let src = TestBuffer::with_pattern(LEN, 5);
    let a = initiator(&src);
    a.load_remote_metadata(&target.local_metadata().unwrap())
        .unwrap();
    let (off, len): (usize, usize) = ((2 << 20) - 4093, (4 << 20) + 8191);
    move_one(
        &a,
        XferOp::Write,
        src.desc(off, len),
        remote.desc(off, len),
        &target,
    );
    remote.assert_range(off, &pattern(5, off as u64, len), "written range");
    remote.assert_range(0, &vec![0; off], "bytes before the range");
    let mut back = TestBuffer::new(LEN);
    back.fill(0);
    let b = initiator(&back);
    b.load_remote_metadata(&target.local_metadata().unwrap())
        .unwrap();
    move_one(
        &b,
        XferOp::Read,
        back.desc(0, len),
        remote.desc(off, len),
        &target,
    );
    back.assert_range(0, &pattern(5, off as u64, len), "read back");
}

/// An SHM-only agent is its own target. A self-copy larger than `inline_max_bytes` is split
/// across the copy workers when its sides are apart, and copied in order by the posting thread
/// when they overlap (parts would race): both land byte-exact, the second like `memmove`, and
/// each notification arrives in the agent's own queue after its data.
#[test]
fn large_self_copies_split_unless_their_sides_overlap() {
    const MIB: usize = 1 << 20;
    let buf = TestBuffer::with_pattern(32 * MIB, 21);
    let a = initiator(&buf);
    let me = a.name().to_owned();
    let post = |local: rixl::Desc, remote: rixl::Desc, msg: &[u8]| {
        let r = a
            .create_xfer_req(
                XferOp::Write,
                &list(vec![local]),
                &list(vec![remote]),
                &me,
                &XferOptions::with_notif(msg),
            )
            .unwrap();
        r.post().unwrap();
        r.wait(Some(Duration::from_secs(30))).unwrap();
        let n = a.get_notifs(&[]).unwrap();
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(
            (n[0].from.as_str(), n[0].msg.as_slice()),
            (me.as_str(), msg)
        );
    };
    // Apart: 12 MiB to 5 bytes past 16 MiB (4K-aliased, and split across the workers).
    post(
        buf.desc(0, 12 * MIB),
        buf.desc(16 * MIB + 5, 12 * MIB),
        b"apart",
    );
    buf.assert_range(16 * MIB + 5, &pattern(21, 0, 12 * MIB), "apart");
    // Overlapping: the same 12 MiB moved up by 1 MiB + 5 bytes.
    post(
        buf.desc(0, 12 * MIB),
        buf.desc(MIB + 5, 12 * MIB),
        b"overlap",
    );
    buf.assert_range(MIB + 5, &pattern(21, 0, 12 * MIB), "overlap");
    buf.assert_range(0, &pattern(21, 0, MIB + 5), "bytes before the overlap");
}
