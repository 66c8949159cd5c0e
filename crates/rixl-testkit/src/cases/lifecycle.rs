//! Request lifecycle, peer death, threads, async waiting, and the optional operations.

use std::sync::Arc;

use rixl::{CostMethod, ErrorKind, XferOp, XferOptions};

use super::*;
use crate::{block_on, pattern, Rng};

/// `cancel` on a completed request is a no-op that keeps `Done`; the request can be posted
/// again; `release` succeeds.
pub fn cancel_completed_is_noop(h: &dyn Harness) {
    for mode in modes_or_skip(h, "cancel_completed_is_noop") {
        let src = TestBuffer::with_pattern(4096, 81);
        let dst = tmem(h, 4096);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let req = p.create(
            XferOp::Write,
            vec![src.whole()],
            vec![dst.whole()],
            &XferOptions::default(),
        );
        run_ok(h, &req, "first post");
        req.cancel().expect("cancel of a completed request");
        assert_eq!(
            req.status().expect("status"),
            XferStatus::Done,
            "{mode}: cancel kept Done"
        );
        assert_eq!(req.wait(None).expect("wait"), XferStatus::Done);
        run_ok(h, &req, "post after the no-op cancel");
        dst.assert_range(0, &pattern(81, 0, 4096), "data");
        req.release().expect("release");
    }
}

/// A request or prepared list that outlives its agent fails with `NotFound` instead of touching
/// memory, and drops quietly.
pub fn request_outlives_agent(h: &dyn Harness) {
    for mode in modes_or_skip(h, "request_outlives_agent") {
        let mut src = TestBuffer::with_pattern(4096, 82);
        let dst = tmem(h, 4096);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let req = p.create(
            XferOp::Write,
            vec![src.whole()],
            vec![dst.whole()],
            &XferOptions::default(),
        );
        let lp = p.prep_local(vec![src.whole()]);
        run_ok(h, &req, "before the agent goes");
        drop(p);
        src.fill_pattern(83);
        expect_err(
            run(h, &req),
            ErrorKind::NotFound,
            &format!("{mode}: post after the agent was dropped"),
        );
        expect_err(
            req.estimate_cost(),
            ErrorKind::NotFound,
            "estimate_cost after the agent was dropped",
        );
        dst.assert_range(
            0,
            &pattern(82, 0, 4096),
            "nothing moved after the agent was dropped",
        );
        drop(lp);
        req.release().expect("release after the agent was dropped");
    }
}

/// What a dead target leaves behind in the initiator: the next post reports
/// `RemoteDisconnect` (not a hang, not a panic), the entry is invalidated, the request is then
/// stale (`NotFound`), nothing is written, and the initiator keeps working.
fn peer_death(h: &dyn Harness, lingering: bool) {
    let mut src = TestBuffer::with_pattern(8192, 84);
    let dst = tmem(h, 8192);
    let own = TestBuffer::new(8192);
    let p = Pair::setup(h, Mode::TwoAgents, &[&src], &[&dst]);
    let Pair { a, b, tmem } = p;
    let b = b.expect("two agents");
    let bn = b.name().to_owned();
    let d = XferOptions::default();
    let lp = a
        .prep_xfer_dlist(rixl::INIT_AGENT, &xlist(pages(&src, 4096, 0..2)), &[])
        .expect("prep local");
    let rp = a
        .prep_xfer_dlist(&bn, &xlist_of(tmem, pages(&dst, 4096, 0..2)), &[])
        .expect("prep remote");
    let req = a
        .make_xfer_req(XferOp::Write, &lp, &[0, 1], &rp, &[0, 1], &d)
        .expect("make");
    run_ok(h, &req, "before the peer dies");
    // Handles of the dying agent itself that outlive it.
    let mut kept = Vec::new();
    if lingering {
        reg(b.as_ref(), &[&own]);
        match b.as_local() {
            Some(local) => kept.push(
                local
                    .prep_xfer_dlist(rixl::INIT_AGENT, &xlist(vec![own.whole()]), &[])
                    .expect("the peer's own prepared list"),
            ),
            // A process's handles die with it; its registration is what lingers.
            None => skip(
                h,
                "peer_death_with_lingering_handles (the dead agent's own handles)",
                "handles of a target in another process cannot outlive it",
            ),
        }
    }
    // In a peer process this is SIGKILL: the target dies without a goodbye.
    drop(b);
    src.fill_pattern(85);
    let first = expect_err_in(
        run(h, &req),
        &[ErrorKind::RemoteDisconnect, ErrorKind::NotFound],
        "post to a dead peer",
    );
    if first.kind() == ErrorKind::RemoteDisconnect {
        expect_err(
            req.status(),
            ErrorKind::RemoteDisconnect,
            "status after the failed post",
        );
    }
    assert!(
        !a.check_remote_metadata(&bn, None),
        "the dead peer's entry is invalidated"
    );
    expect_err(
        run(h, &req),
        ErrorKind::NotFound,
        "post again: the request is stale",
    );
    expect_err(
        a.make_xfer_req(XferOp::Write, &lp, &[0], &rp, &[0], &d),
        ErrorKind::NotFound,
        "make from a list prepared for the dead peer",
    );
    expect_err(
        a.prep_xfer_dlist(&bn, &xlist_of(tmem, vec![dst.whole()]), &[]),
        ErrorKind::NotFound,
        "prep for the dead peer",
    );
    dst.assert_range(
        0,
        &pattern(84, 0, 8192),
        "nothing was written after the peer died",
    );
    drop(kept);
    smoke(h, &a);
}

/// Dropping the target agent makes the initiator's next post `RemoteDisconnect` and
/// invalidates the entry.
pub fn peer_death_remote_disconnect(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "peer_death_remote_disconnect", "not remote-capable");
    }
    if no_target(h, "peer_death_remote_disconnect") {
        return;
    }
    peer_death(h, false);
}

/// As `peer_death_remote_disconnect`, while handles of the dead agent itself are still alive:
/// a dropped agent must stop serving peers even if its own handles outlive it.
pub fn peer_death_with_lingering_handles(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "peer_death_with_lingering_handles", "not remote-capable");
    }
    if no_target(h, "peer_death_with_lingering_handles") {
        return;
    }
    peer_death(h, true);
}

/// A target that dies while a large WRITE or READ is in flight: the post ends (done before the
/// death, or `RemoteDisconnect` / `NotFound`) instead of hanging, later posts fail, the entry is
/// invalidated, and the initiator keeps working. Under a cross-process harness the target is
/// killed with SIGKILL in the middle of the copy.
pub fn peer_death_mid_transfer(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "peer_death_mid_transfer", "not remote-capable");
    }
    if no_target(h, "peer_death_mid_transfer") {
        return;
    }
    const LEN: usize = 64 << 20;
    let src = TestBuffer::with_pattern(LEN, 88);
    let dst = tmem(h, LEN);
    for op in [XferOp::Write, XferOp::Read] {
        let p = Pair::setup(h, Mode::TwoAgents, &[&src], &[&dst]);
        let Pair { a, b, tmem } = p;
        let b = b.expect("two agents");
        let bn = b.name().to_owned();
        let req = a
            .create_xfer_req(
                op,
                &xlist(vec![src.whole()]),
                &xlist_of(tmem, vec![dst.whole()]),
                &bn,
                &XferOptions::default(),
            )
            .expect("create");
        let first = req.post();
        drop(b);
        let ended = first.and_then(|s| match s {
            XferStatus::Done => Ok(XferStatus::Done),
            XferStatus::InProgress => req.wait(Some(h.timeout())),
        });
        if let Err(e) = ended {
            assert!(
                matches!(e.kind(), ErrorKind::RemoteDisconnect | ErrorKind::NotFound),
                "{op} in flight when the peer died: {e}"
            );
        }
        expect_err_in(
            run(h, &req),
            &[ErrorKind::RemoteDisconnect, ErrorKind::NotFound],
            &format!("{op} posted after the peer died"),
        );
        assert!(
            crate::eventually(h.timeout(), || !a.check_remote_metadata(&bn, None)),
            "{op}: the dead peer's entry was not invalidated"
        );
        drop(req);
        smoke(h, &a);
    }
}

/// A peer that dies while idle (connected, nothing in flight) is noticed by the backend on its
/// own, without a post: its entry is invalidated. Prints how long that took.
pub fn idle_peer_death_invalidates(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "idle_peer_death_invalidates", "not remote-capable");
    }
    let a = agent(h, "idle-a");
    let b = target(h, "idle-b");
    let bn = b.name().to_owned();
    a.load_remote_metadata(&b.local_metadata().expect("metadata"))
        .expect("load");
    a.make_connection(&bn, &[]).expect("make_connection");
    let died = Instant::now();
    drop(b);
    assert!(
        crate::eventually(h.timeout(), || !a.check_remote_metadata(&bn, None)),
        "the idle peer's death was not noticed within {:?}",
        h.timeout()
    );
    eprintln!(
        "rixl-testkit: idle_peer_death_invalidates: {} noticed the death after {:?}",
        h.backend(),
        died.elapsed()
    );
    smoke(h, &a);
}

/// `send_notif` and `make_connection` to a dead peer report `RemoteDisconnect` and invalidate
/// its entry (NIXL-API §2.2: the remote entry is invalidated automatically).
pub fn peer_death_send_notif(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "peer_death_send_notif", "not remote-capable");
    }
    let a = agent(h, "death-notif-a");
    let b = target(h, "death-notif-b");
    let c = target(h, "death-notif-c");
    let (bn, cn) = (b.name().to_owned(), c.name().to_owned());
    for peer in [&b, &c] {
        a.load_remote_metadata(&peer.local_metadata().expect("metadata"))
            .expect("load");
    }
    a.send_notif(&bn, b"alive", None)
        .expect("send_notif to a live peer");
    a.make_connection(&cn, &[])
        .expect("make_connection to a live peer");
    drop(b);
    drop(c);
    expect_err_in(
        a.send_notif(&bn, b"dead", None),
        &[ErrorKind::RemoteDisconnect, ErrorKind::NotFound],
        "send_notif to a dead peer",
    );
    assert!(
        !a.check_remote_metadata(&bn, None),
        "send_notif invalidated the dead peer"
    );
    expect_err(
        a.send_notif(&bn, b"dead", None),
        ErrorKind::NotFound,
        "send_notif again",
    );
    expect_err_in(
        a.make_connection(&cn, &[]),
        &[ErrorKind::RemoteDisconnect, ErrorKind::NotFound],
        "make_connection to a dead peer",
    );
    assert!(
        !a.check_remote_metadata(&cn, None),
        "make_connection invalidated the dead peer"
    );
    smoke(h, &a);
}

const THREADS: usize = 8;
const ITERS: usize = 16;
const PAGES: usize = 32;

/// Expected content of `dst` after page `i` of `src` (pattern `seed`) went to page `perm[i]`.
fn permuted(seed: u64, perm: &[usize]) -> Vec<u8> {
    let src = pattern(seed, 0, PAGES * 4096);
    let mut v = vec![0u8; PAGES * 4096];
    for (i, &to) in perm.iter().enumerate() {
        v[to * 4096..(to + 1) * 4096].copy_from_slice(&src[i * 4096..(i + 1) * 4096]);
    }
    v
}

/// Eight threads share one `Arc<Agent>`, each registering its own memory and making, posting
/// and verifying its own self-target requests, then deregistering.
pub fn many_threads_self(h: &dyn Harness) {
    if !h.local() {
        return skip(h, "many_threads_self", "not local-capable");
    }
    if no_target(h, "many_threads_self") {
        return;
    }
    let bufs: Vec<(TestBuffer, TargetMem)> = (0..THREADS)
        .map(|t| {
            (
                TestBuffer::with_pattern(PAGES * 4096, t as u64),
                tmem(h, PAGES * 4096),
            )
        })
        .collect();
    let a = Arc::new(agent(h, "threads"));
    std::thread::scope(|s| {
        for (t, (src, dst)) in bufs.iter().enumerate() {
            let a = Arc::clone(&a);
            s.spawn(move || {
                reg(&*a, &[src, dst]);
                let lp = a
                    .prep_xfer_dlist(rixl::INIT_AGENT, &xlist(pages(src, 4096, 0..PAGES)), &[])
                    .expect("prep local");
                let rp = a
                    .prep_xfer_dlist(a.name(), &tlist(h, pages(dst, 4096, 0..PAGES)), &[])
                    .expect("prep self-target");
                let idx: Vec<usize> = (0..PAGES).collect();
                for it in 0..ITERS {
                    let perm = Rng::new((t * 1000 + it + 1) as u64).permutation(PAGES);
                    let req = if it % 2 == 0 {
                        a.create_xfer_req(
                            XferOp::Write,
                            &xlist(pages(src, 4096, 0..PAGES)),
                            &tlist(h, pages(dst, 4096, perm.iter().copied())),
                            a.name(),
                            &XferOptions::default(),
                        )
                        .expect("create")
                    } else {
                        a.make_xfer_req(
                            XferOp::Write,
                            &lp,
                            &idx,
                            &rp,
                            &perm,
                            &XferOptions::default(),
                        )
                        .expect("make")
                    };
                    run_ok(h, &req, &format!("thread {t}, iteration {it}"));
                    assert_bytes_eq(
                        &dst.contents(),
                        &permuted(t as u64, &perm),
                        &format!("thread {t}, iteration {it}"),
                    );
                }
                drop((lp, rp));
                dereg(&*a, &[src, dst]);
            });
        }
    });
    smoke(h, &a);
}

/// Eight threads share an initiator and a target: each registers memory on both, loads the
/// target's partial metadata concurrently, and posts verified WRITEs with notifications that
/// arrive per thread in order.
pub fn many_threads_remote(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "many_threads_remote", "not remote-capable");
    }
    if no_target(h, "many_threads_remote") {
        return;
    }
    let bufs: Vec<(TestBuffer, TargetMem)> = (0..THREADS)
        .map(|t| {
            (
                TestBuffer::with_pattern(PAGES * 4096, 100 + t as u64),
                tmem(h, PAGES * 4096),
            )
        })
        .collect();
    let a = Arc::new(agent(h, "threads-a"));
    let b = Arc::new(agent(h, "threads-b"));
    // A first connection so that every thread merges into one entry.
    let conn = b
        .local_partial_metadata(&rixl::RegDescList::new(rixl::MemType::Dram), false, &[])
        .expect("conn-only");
    a.load_remote_metadata(&conn).expect("load conn-only");
    let g = a.remote_generation(b.name());
    std::thread::scope(|s| {
        for (t, (src, dst)) in bufs.iter().enumerate() {
            let (a, b) = (Arc::clone(&a), Arc::clone(&b));
            s.spawn(move || {
                reg(&*a, &[src]);
                reg(&*b, &[dst]);
                let blob = b
                    .local_partial_metadata(&dst.reg_list(), true, &[])
                    .expect("partial metadata");
                a.load_remote_metadata(&blob)
                    .expect("concurrent partial load");
                let notif = h.notif();
                for it in 0..ITERS {
                    let perm = Rng::new((t * 1000 + it + 7) as u64).permutation(PAGES);
                    let opts = if notif {
                        XferOptions::with_notif(format!("t{t}-{it}"))
                    } else {
                        XferOptions::default()
                    };
                    let req = a
                        .create_xfer_req(
                            XferOp::Write,
                            &xlist(pages(src, 4096, 0..PAGES)),
                            &tlist(h, pages(dst, 4096, perm.iter().copied())),
                            b.name(),
                            &opts,
                        )
                        .expect("create");
                    run_ok(h, &req, &format!("thread {t}, iteration {it}"));
                    assert_bytes_eq(
                        &dst.contents(),
                        &permuted(100 + t as u64, &perm),
                        &format!("thread {t}, iteration {it}"),
                    );
                }
                dereg(&*a, &[src]);
            });
        }
    });
    assert_eq!(
        a.remote_generation(b.name()),
        g,
        "partial loads kept the generation"
    );
    if h.notif() {
        let got = collect_notifs(h, &*b, THREADS * ITERS);
        for t in 0..THREADS {
            let mine: Vec<String> = got
                .iter()
                .filter(|n| n.from == a.name())
                .map(|n| String::from_utf8_lossy(&n.msg).into_owned())
                .filter(|m| m.starts_with(&format!("t{t}-")))
                .collect();
            let want: Vec<String> = (0..ITERS).map(|it| format!("t{t}-{it}")).collect();
            assert_eq!(mine, want, "notifications of thread {t} in posting order");
        }
    }
}

/// The completion future resolves `NotPosted` before the first post and `Done` after a post,
/// on this thread and on another one.
pub fn async_completion(h: &dyn Harness) {
    for mode in modes_or_skip(h, "async_completion") {
        let mut src = TestBuffer::with_pattern(64 * 1024, 86);
        let dst = tmem(h, 64 * 1024);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let req = p.create(
            XferOp::Write,
            pages(&src, 4096, 0..16),
            pages(&dst, 4096, 0..16),
            &XferOptions::default(),
        );
        expect_err(
            block_on(req.completion()),
            ErrorKind::NotPosted,
            "future before a post",
        );
        req.post().expect("post");
        assert_eq!(
            block_on(req.completion()).expect("future"),
            XferStatus::Done
        );
        dst.assert_range(
            0,
            &pattern(86, 0, 64 * 1024),
            &format!("{mode}: data after the future"),
        );
        src.fill_pattern(87);
        req.post().expect("repost");
        let fut = req.completion();
        let status = std::thread::spawn(move || block_on(fut))
            .join()
            .expect("thread");
        assert_eq!(status.expect("future on another thread"), XferStatus::Done);
        dst.assert_range(
            0,
            &pattern(87, 0, 64 * 1024),
            &format!("{mode}: data after the repost"),
        );
    }
}

/// `estimate_cost` gives an analytical estimate that does not shrink with size when the
/// backend estimates, and `NotSupported` otherwise; it needs no post.
pub fn estimate_cost(h: &dyn Harness) {
    for mode in modes_or_skip(h, "estimate_cost") {
        let src = TestBuffer::new(1 << 20);
        let dst = tmem(h, 1 << 20);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let small = p.create(
            XferOp::Write,
            vec![src.desc(0, 4096)],
            vec![dst.desc(0, 4096)],
            &XferOptions::default(),
        );
        let big = p.create(
            XferOp::Read,
            vec![src.whole()],
            vec![dst.whole()],
            &XferOptions::default(),
        );
        if h.estimates_cost() {
            let s = small.estimate_cost().expect("estimate");
            let b = big.estimate_cost().expect("estimate");
            assert_eq!(s.method, CostMethod::AnalyticalBackend, "{mode}: {s:?}");
            assert_eq!(b.method, CostMethod::AnalyticalBackend, "{mode}: {b:?}");
            assert!(
                b.duration_us >= s.duration_us,
                "{mode}: 1 MiB {b:?} vs 4 KiB {s:?}"
            );
        } else {
            expect_err(
                small.estimate_cost(),
                ErrorKind::NotSupported,
                "estimate_cost",
            );
        }
    }
}

/// `query_mem` is `NotSupported` on backends without it, `NotFound` for a backend not created;
/// a backend with it answers one entry per descriptor. DRAM, and the target memory type when it
/// is another one.
pub fn query_mem(h: &dyn Harness) {
    for mem in reg_mems(h) {
        let buf = TargetMem::of(mem, 4096);
        let a = agent(h, "query");
        reg(&a, &[&buf]);
        expect_err(
            a.query_mem(&buf.reg_list(), "NO_SUCH_BACKEND"),
            ErrorKind::NotFound,
            &format!("{mem}: query_mem of a backend not created"),
        );
        if h.query_mem() {
            let r = a
                .query_mem(&buf.reg_list(), h.backend())
                .unwrap_or_else(|e| panic!("{mem}: query_mem: {e}"));
            assert_eq!(r.len(), 1, "{mem}: one entry per descriptor");
        } else {
            expect_err(
                a.query_mem(&buf.reg_list(), h.backend()),
                ErrorKind::NotSupported,
                &format!("{mem}: query_mem"),
            );
        }
    }
}

/// `make_connection` to an unknown agent or your own name is `NotFound`; to a loaded peer it
/// succeeds (repeatedly, with the backend named too); an unknown backend is `NotFound`.
pub fn make_connection(h: &dyn Harness) {
    let a = agent(h, "conn-a");
    expect_err(
        a.make_connection("no-such-agent", &[]),
        ErrorKind::NotFound,
        "unknown agent",
    );
    expect_err(
        a.make_connection(a.name(), &[]),
        ErrorKind::NotFound,
        "own name",
    );
    if !h.remote() {
        return skip(h, "make_connection (peer part)", "not remote-capable");
    }
    let b = target(h, "conn-b");
    a.load_remote_metadata(&b.local_metadata().expect("metadata"))
        .expect("load");
    a.make_connection(b.name(), &[]).expect("make_connection");
    a.make_connection(b.name(), &[h.backend()])
        .expect("make_connection naming the backend");
    expect_err(
        a.make_connection(b.name(), &["NO_SUCH_BACKEND"]),
        ErrorKind::NotFound,
        "make_connection naming a backend not created",
    );
    smoke(h, &a);
}
