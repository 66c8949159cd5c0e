//! Staleness: invalidated peers, restarted peers, and deregistered memory under existing
//! requests (NIXL-API §3.5, §4 #17).

use rixl::{ErrorKind, XferOp, XferOptions};

use super::*;
use crate::pattern;

/// After `invalidate_remote_metadata`, prepared lists and requests built against the peer fail
/// with `NotFound` on make, post and `estimate_cost`; release still works; a reload gives a new,
/// larger generation whose handles work while the old ones stay stale.
pub fn invalidation_makes_handles_stale(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "invalidation_makes_handles_stale", "not remote-capable");
    }
    if no_target(h, "invalidation_makes_handles_stale") {
        return;
    }
    let mut src = TestBuffer::with_pattern(8192, 71);
    let dst = tmem(h, 8192);
    let p = Pair::setup(h, Mode::TwoAgents, &[&src], &[&dst]);
    let (a, bn) = (&p.a, p.target_name());
    let lp = p.prep_local(pages(&src, 4096, 0..2));
    let rp = p.prep_target(pages(&dst, 4096, 0..2));
    let made = a
        .make_xfer_req(
            XferOp::Write,
            &lp,
            &[0, 1],
            &rp,
            &[0, 1],
            &XferOptions::default(),
        )
        .expect("make");
    let created = p.create(
        XferOp::Write,
        vec![src.whole()],
        vec![dst.whole()],
        &XferOptions::default(),
    );
    run_ok(h, &made, "before invalidation");
    let g1 = a.remote_generation(&bn).expect("generation");

    a.invalidate_remote_metadata(&bn);
    src.fill_pattern(72);
    assert!(!a.check_remote_metadata(&bn, None), "invalidated");
    assert_eq!(a.remote_generation(&bn), None);
    let d = XferOptions::default();
    expect_err(
        a.make_xfer_req(XferOp::Write, &lp, &[0], &rp, &[0], &d),
        ErrorKind::NotFound,
        "make from a stale prepared list",
    );
    expect_err(
        run(h, &made),
        ErrorKind::NotFound,
        "post of a stale made request",
    );
    expect_err(
        run(h, &created),
        ErrorKind::NotFound,
        "post of a stale created request",
    );
    expect_err(
        made.estimate_cost(),
        ErrorKind::NotFound,
        "estimate_cost of a stale request",
    );
    expect_err(
        a.prep_xfer_dlist(&bn, &p.tlist(vec![dst.whole()]), &[]),
        ErrorKind::NotFound,
        "prep for an invalidated agent",
    );
    expect_err(
        p.try_create(XferOp::Write, vec![src.whole()], vec![dst.whole()], &bn, &d),
        ErrorKind::NotFound,
        "create for an invalidated agent",
    );
    expect_err(
        a.make_connection(&bn, &[]),
        ErrorKind::NotFound,
        "make_connection",
    );
    dst.assert_range(0, &pattern(71, 0, 8192), "no data moved after invalidation");
    a.invalidate_remote_metadata(&bn);
    a.invalidate_remote_metadata("no-such-agent");
    a.invalidate_remote_metadata(a.name());

    p.publish();
    let g2 = a.remote_generation(&bn).expect("generation after reload");
    assert!(
        g2 > g1,
        "a reload gets a new, larger generation ({g1} then {g2})"
    );
    expect_err(
        run(h, &made),
        ErrorKind::NotFound,
        "old request after the reload",
    );
    expect_err(
        a.make_xfer_req(XferOp::Write, &lp, &[0], &rp, &[0], &d),
        ErrorKind::NotFound,
        "old prepared list after the reload",
    );
    let rp2 = p.prep_target(pages(&dst, 4096, 0..2));
    let fresh = a
        .make_xfer_req(XferOp::Write, &lp, &[0, 1], &rp2, &[0, 1], &d)
        .expect("make after the reload");
    run_ok(h, &fresh, "after the reload");
    dst.assert_range(0, &pattern(72, 0, 8192), "data after the reload");
    made.release().expect("release of a stale request");
    drop(created);
    drop(rp);
}

/// A peer restarted under the same name (different connection info) is refused with
/// `NotAllowed`, leaving the old entry; after invalidation it loads and works.
pub fn restarted_peer_not_allowed_until_invalidated(h: &dyn Harness) {
    if !h.remote() {
        return skip(
            h,
            "restarted_peer_not_allowed_until_invalidated",
            "not remote-capable",
        );
    }
    if no_target(h, "restarted_peer_not_allowed_until_invalidated") {
        return;
    }
    let src = TestBuffer::with_pattern(4096, 73);
    let t1 = tmem(h, 4096);
    let t2 = tmem(h, 4096);
    let a = agent(h, "restart-a");
    reg(&a, &[&src]);
    let name = crate::unique_name("restart-b");
    let b1 = h.new_target(&name, true);
    reg(&b1, &[&t1]);
    a.load_remote_metadata(&b1.local_metadata().expect("metadata"))
        .expect("load the first incarnation");
    let g1 = a.remote_generation(&name).expect("generation");
    // The first incarnation stays alive: backends notice a dead peer on their own (and then
    // drop its entry), so a restart after a death would race with that. The rule tested here
    // is about the entry: new connection info under a known name is refused.
    let b2 = h.new_target(&name, true);
    reg(&b2, &[&t2]);
    let blob2 = b2.local_metadata().expect("metadata");
    expect_err(
        a.load_remote_metadata(&blob2),
        ErrorKind::NotAllowed,
        "loading a restarted peer over the old entry",
    );
    assert_eq!(
        a.remote_generation(&name),
        Some(g1),
        "the refused load changed nothing"
    );
    assert!(
        !a.check_remote_metadata(&name, Some(&tlist(h, vec![t2.whole()]))),
        "the refused load added no region"
    );
    a.invalidate_remote_metadata(&name);
    assert_eq!(
        a.load_remote_metadata(&blob2)
            .expect("load after invalidation"),
        name
    );
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &xlist(vec![src.whole()]),
            &tlist(h, vec![t2.whole()]),
            &name,
            &XferOptions::default(),
        )
        .expect("request to the new incarnation");
    run_ok(h, &req, "write to the restarted peer");
    t2.assert_range(0, &pattern(73, 0, 4096), "restarted peer's data");
    t1.assert_filled(0, 4096, 0, "the old incarnation's memory");
    drop(b1);
}

/// Deregistering memory a request uses makes its next post `NotFound` (requests created or made
/// before, and requests made after from lists prepared before); an unrelated deregistration
/// does not; re-registering the same range does not revive old requests.
pub fn local_deregistration_makes_requests_stale(h: &dyn Harness) {
    for mode in modes_or_skip(h, "local_deregistration_makes_requests_stale") {
        let mut src = TestBuffer::with_pattern(8192, 74);
        let unrelated = TestBuffer::new(4096);
        let dst = tmem(h, 8192);
        let p = Pair::setup(h, mode, &[&src, &unrelated], &[&dst]);
        let d = XferOptions::default();
        let lp = p.prep_local(pages(&src, 4096, 0..2));
        let rp = p.prep_target(pages(&dst, 4096, 0..2));
        let created = p.create(XferOp::Write, vec![src.whole()], vec![dst.whole()], &d);
        let made =
            p.a.make_xfer_req(XferOp::Write, &lp, &[0, 1], &rp, &[0, 1], &d)
                .expect("make");
        run_ok(h, &created, "created, before deregistration");
        dereg(&p.a, &[&unrelated]);
        run_ok(
            h,
            &created,
            &format!("{mode}: created, after an unrelated deregistration"),
        );
        run_ok(
            h,
            &made,
            &format!("{mode}: made, after an unrelated deregistration"),
        );

        dereg(&p.a, &[&src]);
        src.fill_pattern(75);
        expect_err(
            run(h, &created),
            ErrorKind::NotFound,
            &format!("{mode}: created request"),
        );
        expect_err(
            run(h, &made),
            ErrorKind::NotFound,
            &format!("{mode}: made request"),
        );
        match p
            .a
            .make_xfer_req(XferOp::Write, &lp, &[0, 1], &rp, &[0, 1], &d)
        {
            Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{mode}: make: {e}"),
            Ok(late) => {
                expect_err(
                    run(h, &late),
                    ErrorKind::NotFound,
                    &format!(
                        "{mode}: request made after deregistration from a list prepared before"
                    ),
                );
            }
        }
        expect_err(
            p.try_create(
                XferOp::Write,
                vec![src.whole()],
                vec![dst.whole()],
                &p.target_name(),
                &d,
            ),
            ErrorKind::NotFound,
            "create from deregistered memory",
        );
        dst.assert_range(
            0,
            &pattern(74, 0, 8192),
            &format!("{mode}: nothing moved from deregistered memory"),
        );

        reg(&p.a, &[&src]);
        expect_err(
            run(h, &created),
            ErrorKind::NotFound,
            &format!("{mode}: old request after re-registration"),
        );
        let again = p.create(XferOp::Write, vec![src.whole()], vec![dst.whole()], &d);
        run_ok(
            h,
            &again,
            &format!("{mode}: new request after re-registration"),
        );
        dst.assert_range(
            0,
            &pattern(75, 0, 8192),
            &format!("{mode}: data after re-registration"),
        );
    }
}

/// Once the target deregisters memory, requests that write to it fail with `NotFound` and the
/// memory is not written, whether the target is the initiator itself or another agent (whose
/// deregistered memory the initiator's cached metadata still lists).
pub fn target_deregistration_is_not_written(h: &dyn Harness) {
    for mode in modes_or_skip(h, "target_deregistration_is_not_written") {
        if matches!(mode, Mode::TwoAgents) && !h.target_checks_deregistration() {
            skip(
                h,
                "target_deregistration_is_not_written (two agents)",
                "the target takes no part in one-sided transfers, so it cannot refuse writes \
                 into memory it deregistered; the application must not deregister memory a \
                 peer may still write",
            );
            continue;
        }
        let mut src = TestBuffer::with_pattern(8192, 76);
        let dst = tmem(h, 8192);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let d = XferOptions::default();
        let lp = p.prep_local(pages(&src, 4096, 0..2));
        let rp = p.prep_target(pages(&dst, 4096, 0..2));
        let created = p.create(XferOp::Write, vec![src.whole()], vec![dst.whole()], &d);
        let made =
            p.a.make_xfer_req(XferOp::Write, &lp, &[0, 1], &rp, &[0, 1], &d)
                .expect("make");
        run_ok(h, &created, "before the target deregisters");
        dereg(p.target(), &[&dst]);
        src.fill_pattern(77);
        expect_err(
            run(h, &created),
            ErrorKind::NotFound,
            &format!("{mode}: created request"),
        );
        expect_err(
            run(h, &made),
            ErrorKind::NotFound,
            &format!("{mode}: made request"),
        );
        dst.assert_range(
            0,
            &pattern(76, 0, 8192),
            &format!("{mode}: deregistered target memory was written"),
        );
        smoke(h, &p.a);
    }
}

/// `deregister_mem` during a large post waits for the post (or, past the agent's
/// `deregister_timeout`, fails and leaves the region registered): when it returns, the post is
/// no longer in progress and no byte moves any more. Covers the initiator's source region in
/// every mode, the self-target's destination, and a peer's destination when the target side
/// checks deregistration.
pub fn deregistration_waits_for_posts_in_flight(h: &dyn Harness) {
    const LEN: usize = 16 << 20;
    const PIECE: usize = 32 << 10;
    for mode in modes_or_skip(h, "deregistration_waits_for_posts_in_flight") {
        let sides: &[&str] = match mode {
            Mode::SelfTarget => &["source", "destination"],
            Mode::TwoAgents if h.target_checks_deregistration() => &["source", "destination"],
            Mode::TwoAgents => {
                skip(
                    h,
                    "deregistration_waits_for_posts_in_flight (two agents, destination)",
                    "the target takes no part in one-sided transfers, so only the initiator's \
                     deregistration is fenced",
                );
                &["source"]
            }
        };
        for &side in sides {
            let what = format!("{mode}, deregistering the {side}");
            let src = TestBuffer::with_pattern(LEN, 78);
            let dst = tmem(h, LEN);
            let p = Pair::setup(h, mode, &[&src], &[&dst]);
            let pieces = LEN / PIECE;
            // Every other piece of the destination, in reverse order: nothing merges, so the
            // post takes a while on every backend.
            let local: Vec<Desc> = (0..pieces).map(|i| src.desc(i * PIECE, PIECE)).collect();
            let remote: Vec<Desc> = (0..pieces)
                .rev()
                .map(|i| dst.desc(i * PIECE, PIECE))
                .collect();
            let req = p.create(XferOp::Write, local, remote, &XferOptions::default());
            let posted = req.post();
            let in_flight = matches!(posted, Ok(XferStatus::InProgress));
            let deregistered = if side == "source" {
                p.a.deregister_mem(&reg_list(&[&src]), &[])
            } else {
                p.target().deregister(&reg_list(&[&dst]), &[])
            };
            // Whatever landed, landed before deregistration returned: nothing changes now.
            let before = dst.read(0, LEN);
            let peer_side = side == "destination" && matches!(mode, Mode::TwoAgents);
            let status = if peer_side {
                // The target fenced its own side; the initiator learns how the post ended
                // from the target's answers, which may still be on their way.
                req.wait(Some(h.timeout()))
            } else {
                req.status()
            };
            assert!(
                !matches!(status, Ok(XferStatus::InProgress)),
                "{what}: deregistration returned ({deregistered:?}) while the post was still in \
                 progress (posted in flight: {in_flight})"
            );
            match &deregistered {
                Ok(()) => {}
                Err(e) => assert_eq!(
                    e.kind(),
                    ErrorKind::Timeout,
                    "{what}: deregistration failed with something else than Timeout: {e}"
                ),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(
                dst.read(0, LEN) == before,
                "{what}: the destination changed after deregistration returned"
            );
            if matches!(status, Ok(XferStatus::Done)) {
                let source = src.read(0, LEN);
                let expected: Vec<u8> = source.chunks(PIECE).rev().flatten().copied().collect();
                dst.assert_range(0, &expected, &format!("{what}: data of the post"));
            }
            if deregistered.is_ok() {
                expect_err(
                    run(h, &req),
                    ErrorKind::NotFound,
                    &format!("{what}: repost after deregistration"),
                );
            }
        }
    }
}
