//! Metadata: loading, refusing bad blobs, partial metadata and `check_remote_metadata`
//! (NIXL-API §2.5 "Metadata", §3.6).

use rixl::{ErrorKind, MemType, RegDescList, XferDescList, XferOp, XferOptions};

use super::*;
use crate::{pattern, Rng};

fn needs_remote(h: &dyn Harness, case: &str) -> bool {
    if !h.remote() {
        skip(h, case, "not remote-capable");
        return false;
    }
    !no_target(h, case)
}

/// Writes `src` to `dst` at `target` through a fresh request and verifies it.
#[track_caller]
fn write_verify(
    h: &dyn Harness,
    a: &Agent,
    target: &str,
    src: &TestBuffer,
    dst: &TargetMem,
    seed: u64,
) {
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &xlist(vec![src.whole()]),
            &xlist_of(dst.mem(), vec![dst.whole()]),
            target,
            &XferOptions::default(),
        )
        .unwrap_or_else(|e| panic!("request to {target}: {e}"));
    run_ok(h, &req, "write");
    dst.assert_range(0, &pattern(seed, 0, src.len()), "written data");
}

/// Loading your own metadata is `InvalidParam`; an agent never has an entry for itself.
pub fn load_own_metadata_invalid_param(h: &dyn Harness) {
    let a = agent(h, "own");
    if !h.remote() {
        expect_err(
            a.local_metadata(),
            ErrorKind::InvalidParam,
            "local_metadata without a remote-capable backend",
        );
        return skip(
            h,
            "load_own_metadata_invalid_param (loading own blobs)",
            "not remote-capable: there is no blob to load",
        );
    }
    let blob = a.local_metadata().expect("local_metadata");
    expect_err(
        a.load_remote_metadata(&blob),
        ErrorKind::InvalidParam,
        "own full blob",
    );
    let partial = a
        .local_partial_metadata(&RegDescList::new(MemType::Dram), false, &[])
        .expect("connection-only blob");
    expect_err(
        a.load_remote_metadata(&partial),
        ErrorKind::InvalidParam,
        "own connection-only blob",
    );
    assert!(!a.check_remote_metadata(a.name(), None));
    smoke(h, &a);
}

/// Empty, garbage, truncated (every prefix), over-long, wrong-version and NIXL blobs are
/// `Mismatch` and leave the cache untouched; the real blob loads afterwards.
pub fn garbage_metadata_mismatch(h: &dyn Harness) {
    if !needs_remote(h, "garbage_metadata_mismatch") {
        return;
    }
    let src = TestBuffer::with_pattern(4096, 61);
    let dst = tmem(h, 4096);
    let a = agent(h, "garbage-a");
    let b = target(h, "garbage-b");
    reg(&a, &[&src]);
    reg(&b, &[&dst]);
    let blob = b.local_metadata().expect("metadata");
    let mismatch = |bytes: &[u8], what: &str| {
        expect_err(a.load_remote_metadata(bytes), ErrorKind::Mismatch, what);
    };
    mismatch(&[], "an empty blob");
    mismatch(b"nixlSerDes|agent|....", "a NIXL blob");
    let mut rng = Rng::new(0xBAD);
    for i in 0..300 {
        let n = 1 + rng.below(512);
        let mut g = rng.bytes(n);
        g[0] = 0xFF; // never a valid magic
        mismatch(&g, &format!("random blob {i}"));
    }
    for cut in 0..blob.len() {
        mismatch(
            &blob[..cut],
            &format!("blob truncated to {cut} of {} bytes", blob.len()),
        );
    }
    let mut long = blob.clone();
    long.push(0);
    mismatch(&long, "a blob with a trailing byte");
    let magic = rixl::core::metadata::MAGIC.len();
    let mut version = blob.clone();
    version[magic] = version[magic].wrapping_add(1);
    mismatch(&version, "a blob of another version");
    assert!(
        !a.check_remote_metadata(b.name(), None),
        "nothing was cached"
    );
    assert_eq!(a.remote_generation(b.name()), None);
    assert_eq!(
        a.load_remote_metadata(&blob).expect("the real blob"),
        b.name()
    );
    write_verify(h, &a, b.name(), &src, &dst, 61);
}

/// Thousands of mutated blobs (bit flips, byte changes, insertions, deletions, random tails)
/// never panic; a failed load leaves the peer's entry as it was; the agent works afterwards.
pub fn mutated_metadata_never_panics(h: &dyn Harness) {
    if !needs_remote(h, "mutated_metadata_never_panics") {
        return;
    }
    let src = TestBuffer::with_pattern(4096, 62);
    let dst = tmem(h, 4096);
    let dst2 = tmem(h, 8192);
    let a = agent(h, "mutate-a");
    let b = target(h, "mutate-b");
    reg(&a, &[&src]);
    reg(&b, &[&dst, &dst2]);
    let blob = b.local_metadata().expect("metadata");
    a.load_remote_metadata(&blob).expect("load");
    let mut rng = Rng::new(0x5EED_F00D);
    for _ in 0..3000 {
        let mut m = blob.clone();
        match rng.below(5) {
            0 => {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(m.len());
                m[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(m.len() + 1);
                m.insert(i, rng.next_u64() as u8);
            }
            3 => {
                let i = rng.below(m.len());
                m.remove(i);
            }
            _ => {
                let keep = rng.below(m.len());
                m.truncate(keep);
                let n = rng.below(64);
                let tail = rng.bytes(n);
                m.extend(tail);
            }
        }
        let before = a.remote_generation(b.name());
        if a.load_remote_metadata(&m).is_err() {
            assert_eq!(
                a.remote_generation(b.name()),
                before,
                "a failed load changed the peer's entry"
            );
        }
        if a.remote_generation(b.name()).is_none() {
            a.load_remote_metadata(&blob).expect("reload");
        }
    }
    a.invalidate_remote_metadata(b.name());
    a.load_remote_metadata(&blob)
        .expect("the real blob after mutations");
    write_verify(h, &a, b.name(), &src, &dst, 62);
}

/// Loading the identical blob again (full or connection-only) succeeds, returns the name,
/// keeps the generation, and existing handles keep working.
pub fn identical_reload_idempotent(h: &dyn Harness) {
    if !needs_remote(h, "identical_reload_idempotent") {
        return;
    }
    let src = TestBuffer::with_pattern(8192, 63);
    let dst = tmem(h, 8192);
    let p = Pair::setup(h, Mode::TwoAgents, &[&src], &[&dst]);
    let b = p.target();
    let g = p.a.remote_generation(b.name()).expect("generation");
    let lp = p.prep_local(pages(&src, 4096, 0..2));
    let rp = p.prep_target(pages(&dst, 4096, 0..2));
    let req = p.create(
        XferOp::Write,
        vec![src.whole()],
        vec![dst.whole()],
        &XferOptions::default(),
    );
    let blob = b.local_metadata().expect("metadata");
    let conn = b
        .local_partial_metadata(&RegDescList::new(MemType::Dram), false, &[])
        .expect("conn-only");
    for i in 0..3 {
        assert_eq!(p.a.load_remote_metadata(&blob).expect("reload"), b.name());
        assert_eq!(
            p.a.load_remote_metadata(&conn).expect("reload conn"),
            b.name()
        );
        assert_eq!(
            p.a.remote_generation(b.name()),
            Some(g),
            "reload {i} kept the generation"
        );
    }
    run_ok(h, &req, "request made before the reloads");
    let made =
        p.a.make_xfer_req(
            XferOp::Write,
            &lp,
            &[0, 1],
            &rp,
            &[1, 0],
            &XferOptions::default(),
        )
        .expect("lists prepared before the reloads");
    run_ok(h, &made, "made request");
    dst.assert_range(4096, &pattern(63, 0, 4096), "made request data");
}

/// `local_metadata` needs a remote-capable backend: an agent without one gets `InvalidParam`
/// for full and partial blobs. With one, an agent without registrations still publishes.
pub fn metadata_without_remote_backend(h: &dyn Harness) {
    let bare = bare_agent("md-bare");
    expect_err(
        bare.local_metadata(),
        ErrorKind::InvalidParam,
        "full blob, no backend",
    );
    expect_err(
        bare.local_partial_metadata(&RegDescList::new(MemType::Dram), false, &[]),
        ErrorKind::InvalidParam,
        "partial blob, no backend",
    );
    let a = agent(h, "md");
    if !h.remote() {
        expect_err(
            a.local_metadata(),
            ErrorKind::InvalidParam,
            "full blob without a remote-capable backend",
        );
        return;
    }
    let blob = a.local_metadata().expect("a blob without registrations");
    let c = agent(h, "md-loader");
    assert_eq!(c.load_remote_metadata(&blob).expect("load"), a.name());
    assert!(c.check_remote_metadata(a.name(), None));
    expect_err(
        a.local_partial_metadata(&RegDescList::new(MemType::Dram), true, &["NO_SUCH_BACKEND"]),
        ErrorKind::NotFound,
        "partial blob for a backend not created",
    );
}

/// The partial flow of NIXL-API §3.6: a connection-only blob, then blobs for some
/// registrations; `check_remote_metadata` and prep agree at each step; partial loads keep the
/// generation and existing handles.
pub fn partial_metadata_flow(h: &dyn Harness) {
    if !needs_remote(h, "partial_metadata_flow") {
        return;
    }
    let src = TestBuffer::with_pattern(3 * 4096, 64);
    let t1 = tmem(h, 4096);
    let t2 = tmem(h, 4096);
    let t3 = tmem(h, 4096);
    let a = agent(h, "partial-a");
    let b = target(h, "partial-b");
    reg(&a, &[&src]);
    reg(&b, &[&t1, &t2, &t3]);
    let bn = b.name();
    let l1 = tlist(h, vec![t1.whole()]);
    let l2 = tlist(h, vec![t2.whole()]);
    let l12 = tlist(h, vec![t1.whole(), t2.whole()]);
    let agree = |l: &XferDescList, want: bool, what: &str| {
        assert_eq!(
            a.check_remote_metadata(bn, Some(l)),
            want,
            "check_remote_metadata: {what}"
        );
        assert_eq!(
            a.prep_xfer_dlist(bn, l, &[]).is_ok(),
            want,
            "prep_xfer_dlist must agree with check_remote_metadata: {what}"
        );
    };

    let conn = b
        .local_partial_metadata(&RegDescList::new(MemType::Dram), false, &[])
        .expect("conn-only blob");
    assert_eq!(a.load_remote_metadata(&conn).expect("load conn-only"), bn);
    assert!(
        a.check_remote_metadata(bn, None),
        "a connection-only entry counts"
    );
    let g = a.remote_generation(bn).expect("generation");
    agree(&l1, false, "before any region");
    expect_err(
        a.prep_xfer_dlist(bn, &l1, &[]),
        ErrorKind::NotFound,
        "prep before the region is loaded",
    );

    let p1 = b
        .local_partial_metadata(&t1.reg_list(), false, &[])
        .expect("partial t1");
    a.load_remote_metadata(&p1).expect("load t1");
    assert_eq!(
        a.remote_generation(bn),
        Some(g),
        "partial loads keep the generation"
    );
    agree(&l1, true, "t1 loaded");
    agree(&l2, false, "t2 not loaded");
    agree(&l12, false, "t1 and t2, only t1 loaded");

    let lp = a
        .prep_xfer_dlist(rixl::INIT_AGENT, &xlist(pages(&src, 4096, 0..3)), &[])
        .expect("local prep");
    let rp1 = a.prep_xfer_dlist(bn, &l1, &[]).expect("prep t1");
    let req1 = a
        .make_xfer_req(
            XferOp::Write,
            &lp,
            &[0],
            &rp1,
            &[0],
            &XferOptions::default(),
        )
        .expect("request to t1");

    let p23 = b
        .local_partial_metadata(&reg_list(&[&t2, &t3]), true, &[])
        .expect("partial t2, t3 with connection info");
    a.load_remote_metadata(&p23).expect("load t2, t3");
    a.load_remote_metadata(&p1).expect("t1 again");
    assert_eq!(
        a.remote_generation(bn),
        Some(g),
        "still the same generation"
    );
    agree(&l12, true, "t1 and t2 loaded");
    run_ok(h, &req1, "request made before the later partial loads");
    t1.assert_range(0, &pattern(64, 0, 4096), "t1");
    let rp1 = a.prep_xfer_dlist(bn, &l1, &[]).expect("prep t1 again");
    let rp23 = a
        .prep_xfer_dlist(bn, &tlist(h, vec![t2.whole(), t3.whole()]), &[])
        .expect("prep t2, t3");
    let req = a
        .make_xfer_req(
            XferOp::Write,
            &lp,
            &[1, 2],
            &rp23,
            &[0, 1],
            &XferOptions::default(),
        )
        .expect("request to t2, t3");
    run_ok(h, &req, "request to the later regions");
    t2.assert_range(0, &pattern(64, 4096, 4096), "t2");
    t3.assert_range(0, &pattern(64, 8192, 4096), "t3");
    drop(rp1);
}

/// Region blobs for an agent whose connection info is not loaded are `NotFound` and cache
/// nothing; after a connection-only blob they load.
pub fn partial_descs_before_conn_not_found(h: &dyn Harness) {
    if !needs_remote(h, "partial_descs_before_conn_not_found") {
        return;
    }
    let t = tmem(h, 4096);
    let b = target(h, "noconn-b");
    let c = agent(h, "noconn-c");
    reg(&b, &[&t]);
    let regions = b
        .local_partial_metadata(&t.reg_list(), false, &[])
        .expect("partial without connection info");
    expect_err(
        c.load_remote_metadata(&regions),
        ErrorKind::NotFound,
        "regions before connection info",
    );
    assert!(
        !c.check_remote_metadata(b.name(), None),
        "a failed load caches nothing"
    );
    assert_eq!(c.remote_generation(b.name()), None);
    let conn = b
        .local_partial_metadata(&RegDescList::new(MemType::Dram), false, &[])
        .expect("conn-only");
    c.load_remote_metadata(&conn).expect("conn-only");
    c.load_remote_metadata(&regions)
        .expect("regions after connection info");
    assert!(c.check_remote_metadata(b.name(), Some(&tlist(h, vec![t.whole()]))));
    let with_conn = b
        .local_partial_metadata(&t.reg_list(), true, &[])
        .expect("partial with connection info");
    let d = agent(h, "noconn-d");
    d.load_remote_metadata(&with_conn)
        .expect("a partial blob with connection info loads into a fresh agent");
    assert!(d.check_remote_metadata(b.name(), Some(&tlist(h, vec![t.whole()]))));
}

/// `local_partial_metadata` needs exact registrations: a sub-range, an unregistered range or a
/// list holding one of them is `NotFound`.
pub fn partial_sub_range_not_found(h: &dyn Harness) {
    if !needs_remote(h, "partial_sub_range_not_found") {
        return;
    }
    let t = tmem(h, 8192);
    let never = tmem(h, 4096);
    let b = target(h, "subrange");
    reg(&b, &[&t]);
    let sub = reg_pieces(&[(&t, 0, 4096)]);
    for inc in [false, true] {
        expect_err(
            b.local_partial_metadata(&sub, inc, &[]),
            ErrorKind::NotFound,
            "a sub-range",
        );
        expect_err(
            b.local_partial_metadata(&never.reg_list(), inc, &[]),
            ErrorKind::NotFound,
            "an unregistered range",
        );
        expect_err(
            b.local_partial_metadata(&reg_list(&[&t, &never]), inc, &[]),
            ErrorKind::NotFound,
            "a list with an unregistered range",
        );
        b.local_partial_metadata(&t.reg_list(), inc, &[])
            .expect("the exact registration");
    }
}

/// `check_remote_metadata` never fails: unknown agents and your own name are false; with a
/// loaded entry it is true for covered lists and false for uncovered, other-device, spanning
/// and zero-length descriptors, always agreeing with prep.
pub fn check_remote_metadata_never_fails(h: &dyn Harness) {
    if !needs_remote(h, "check_remote_metadata_never_fails") {
        return;
    }
    let t = tmem(h, 16 * 1024);
    let never = tmem(h, 4096);
    let a = agent(h, "check-a");
    let b = target(h, "check-b");
    try_reg(&b, &reg_pieces(&[(&t, 0, 8192), (&t, 8192, 8192)])).expect("registrations");
    assert!(!a.check_remote_metadata("no-such-agent", None));
    assert!(!a.check_remote_metadata(a.name(), None));
    assert!(!a.check_remote_metadata(b.name(), Some(&tlist(h, vec![t.desc(0, 64)]))));
    a.load_remote_metadata(&b.local_metadata().expect("metadata"))
        .expect("load");
    assert!(a.check_remote_metadata(b.name(), None));
    assert!(a.check_remote_metadata(b.name(), Some(&XferDescList::new(t.mem()))));
    let probes: Vec<(&str, Vec<Desc>, bool)> = vec![
        ("covered", vec![t.desc(0, 8192), t.desc(8192, 100)], true),
        ("uncovered", vec![never.whole()], false),
        ("other device", vec![on_dev(t.desc(0, 64), 3)], false),
        ("spanning", vec![t.desc(4096, 8192)], false),
        ("zero-length", vec![t.desc(0, 0)], false),
        ("partly covered", vec![t.desc(0, 64), never.whole()], false),
    ];
    for (what, descs, want) in probes {
        let l = tlist(h, descs);
        assert_eq!(a.check_remote_metadata(b.name(), Some(&l)), want, "{what}");
        assert_eq!(
            a.prep_xfer_dlist(b.name(), &l, &[]).is_ok(),
            want,
            "prep agrees: {what}"
        );
    }
    let vram = XferDescList::from_descs(MemType::Vram, vec![Desc::new(0x1000, 64, 0)]);
    assert!(
        !a.check_remote_metadata(b.name(), Some(&vram)),
        "another memory type"
    );
}
