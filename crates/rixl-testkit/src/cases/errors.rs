//! Argument errors of backend creation, prep, make and create (NIXL-API §2.5 "Transfers",
//! §3.2), with the exact kinds, and the agent still working afterwards.

use std::time::Duration;

use rixl::{
    Agent, AgentConfig, ErrorKind, Params, XferOp, XferOptions, INIT_AGENT, INIT_AGENT_NAME,
};

use super::*;
use crate::{block_on, pattern};

/// Unknown backend → `NotFound`, duplicate → `InvalidParam`, in `create_backend` and in the
/// constructor; an empty agent name → `InvalidParam`.
pub fn create_backend_errors(h: &dyn Harness) {
    let a = agent(h, "cb");
    expect_err(
        a.create_backend("NO_SUCH_BACKEND", &Params::new()),
        ErrorKind::NotFound,
        "create_backend of an unknown backend",
    );
    expect_err(
        a.create_backend(h.backend(), &h.params()),
        ErrorKind::InvalidParam,
        "create_backend of a backend already created",
    );
    assert_eq!(
        a.backends(),
        vec![h.backend().to_owned()],
        "failed creations add nothing"
    );
    expect_err(
        Agent::new("", h.config()),
        ErrorKind::InvalidParam,
        "an empty agent name",
    );
    expect_err(
        Agent::new(
            &crate::unique_name("cb-unknown"),
            AgentConfig::default().backend("NO_SUCH_BACKEND"),
        ),
        ErrorKind::NotFound,
        "a constructor naming an unknown backend",
    );
    let bare = bare_agent("cb-bare");
    // Bad parameters are refused at creation, with the valid names or the expected form.
    let advertised = Agent::plugin_params(h.backend()).expect("plugin_params");
    let mut unknown = h.params();
    unknown.insert("no_such_parameter".into(), "1".into());
    let e = expect_err(
        bare.create_backend(h.backend(), &unknown),
        ErrorKind::InvalidParam,
        "create_backend with an unknown parameter",
    );
    let m = e.to_string();
    assert!(
        m.contains("no_such_parameter"),
        "the message names the parameter: {m}"
    );
    for name in advertised.keys() {
        assert!(
            m.contains(name.as_str()),
            "the message lists the valid name {name}: {m}"
        );
    }
    let spec = rixl::BackendFactory::params(
        &rixl::registry::factory(h.backend()).expect("the backend's factory"),
    );
    if let Some(p) = spec
        .iter()
        .find(|p| matches!(p.kind, rixl::backend::ParamKind::Int { .. }))
    {
        let mut bad = h.params();
        bad.insert(p.name.to_owned(), "not-a-number".into());
        let e = expect_err(
            bare.create_backend(h.backend(), &bad),
            ErrorKind::InvalidParam,
            "create_backend with a malformed integer",
        );
        let m = e.to_string();
        assert!(
            m.contains(p.name) && m.contains("integer"),
            "the message names the parameter and the expected form: {m}"
        );
    }
    assert!(bare.backends().is_empty(), "refused creations add nothing");
    assert_eq!(
        bare.create_backend(h.backend(), &h.params())
            .expect("create"),
        0
    );
    expect_err(
        bare.create_backend(h.backend(), &h.params()),
        ErrorKind::InvalidParam,
        "second creation on a bare agent",
    );
    smoke(h, &a);
}

/// `prep_xfer_dlist`: empty list, unknown agent, uncovered descriptor, wrong device,
/// descriptor spanning two adjacent registrations or leaving one → `NotFound`; zero-length
/// descriptor → `InvalidParam` (RIXL: the list is malformed, not uncovered); local and target
/// side alike.
pub fn prep_errors(h: &dyn Harness) {
    for mode in modes_or_skip(h, "prep_errors") {
        let lbuf = TestBuffer::new(16 * 1024);
        let tbuf = tmem(h, 16 * 1024);
        let never_local = TestBuffer::new(4096);
        let never_target = tmem(h, 4096);
        let p = Pair::new(h, mode);
        let halves = |b: &dyn TestMem| reg_pieces(&[(b, 0, 8192), (b, 8192, 8192)]);
        try_reg(&p.a, &halves(&lbuf)).expect("local registrations");
        try_reg(p.target(), &halves(&tbuf)).expect("target registrations");
        p.publish();
        let target = p.target_name();
        let sides: [(&str, &str, &dyn TestMem, &dyn TestMem); 2] = [
            ("local", INIT_AGENT, &lbuf, &never_local),
            ("target", target.as_str(), &tbuf, &never_target),
        ];
        for (side, agent_name, buf, never) in sides {
            let prep = |descs| {
                p.a.prep_xfer_dlist(agent_name, &xlist_of(buf.mem(), descs), &[])
            };
            let what = |w: &str| format!("{mode}: {side} prep of {w}");
            expect_err(prep(vec![]), ErrorKind::NotFound, &what("an empty list"));
            expect_err(
                prep(vec![never.whole()]),
                ErrorKind::NotFound,
                &what("an unregistered range"),
            );
            expect_err(
                prep(vec![on_dev(buf.desc(0, 4096), 1)]),
                ErrorKind::NotFound,
                &what("a descriptor on another device"),
            );
            expect_err(
                prep(vec![buf.desc(4096, 8192)]),
                ErrorKind::NotFound,
                &what("a descriptor spanning two adjacent registrations"),
            );
            expect_err(
                prep(vec![buf.desc_unchecked(12288, 8192)]),
                ErrorKind::NotFound,
                &what("a descriptor running past its registration"),
            );
            expect_err(
                prep(vec![buf.desc(0, 4096), never.whole()]),
                ErrorKind::NotFound,
                &what("a list with one uncovered descriptor"),
            );
            expect_err(
                prep(vec![buf.desc(0, 0)]),
                ErrorKind::InvalidParam,
                &what("a zero-length descriptor"),
            );
            expect_err(
                p.a.prep_xfer_dlist(
                    agent_name,
                    &xlist_of(buf.mem(), vec![buf.desc(0, 4096)]),
                    &["NO_SUCH"],
                ),
                ErrorKind::NotFound,
                &what("a list for a backend not created"),
            );
            let ok = prep(vec![
                buf.desc(0, 8192),
                buf.desc(8192, 8192),
                buf.desc(100, 1),
            ])
            .unwrap_or_else(|e| panic!("{}: {e}", what("valid descriptors")));
            assert_eq!(ok.len(), 3);
        }
        let named =
            p.a.prep_xfer_dlist(INIT_AGENT_NAME, &xlist(vec![lbuf.desc(0, 4096)]), &[])
                .expect("\"NIXL_INIT_AGENT\" names the local side");
        assert_eq!(named.agent(), None);
        expect_err(
            p.a.prep_xfer_dlist("no-such-agent", &p.tlist(vec![tbuf.desc(0, 4096)]), &[]),
            ErrorKind::NotFound,
            "prep for an unknown agent",
        );
        let bare = bare_agent("prep-bare");
        expect_err(
            bare.prep_xfer_dlist(INIT_AGENT, &xlist(vec![lbuf.desc(0, 4096)]), &[]),
            ErrorKind::NotFound,
            "prep on an agent without backends",
        );
        smoke(h, &p.a);
    }
}

/// `make_xfer_req`: local list as remote or remote as local, no indices, count mismatch,
/// out-of-range index, length mismatch, a list of another agent → `InvalidParam`; an unknown
/// backend → `NotFound`.
pub fn make_xfer_req_errors(h: &dyn Harness) {
    for mode in modes_or_skip(h, "make_xfer_req_errors") {
        let src = TestBuffer::with_pattern(8192, 51);
        let dst = tmem(h, 8192);
        let other_buf = TestBuffer::new(4096);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let other = agent(h, "make-other");
        reg(&other, &[&other_buf]);
        let lp = p.prep_local(vec![src.desc(0, 4096), src.desc(4096, 2048)]);
        let rp = p.prep_target(pages(&dst, 4096, 0..2));
        let foreign = other
            .prep_xfer_dlist(INIT_AGENT, &xlist(vec![other_buf.whole()]), &[])
            .expect("prep on the other agent");
        let d = XferOptions::default();
        let w = XferOp::Write;
        let make = |l, li: &[usize], r, ri: &[usize]| p.a.make_xfer_req(w, l, li, r, ri, &d);
        let cases: Vec<(&str, rixl::Result<XferRequest>)> = vec![
            ("swapped lists", make(&rp, &[0], &lp, &[0])),
            ("a local list as remote", make(&lp, &[0], &lp, &[0])),
            ("a target list as local", make(&rp, &[0], &rp, &[0])),
            ("no indices", make(&lp, &[], &rp, &[])),
            ("count mismatch", make(&lp, &[0, 1], &rp, &[0])),
            ("local index out of range", make(&lp, &[2], &rp, &[0])),
            ("remote index out of range", make(&lp, &[0], &rp, &[2])),
            ("huge index", make(&lp, &[usize::MAX], &rp, &[0])),
            ("length mismatch", make(&lp, &[1], &rp, &[0])),
            ("a list of another agent", make(&foreign, &[0], &rp, &[0])),
        ];
        for (what, r) in cases {
            expect_err(
                r,
                ErrorKind::InvalidParam,
                &format!("{mode}: make with {what}"),
            );
        }
        let named = XferOptions {
            backends: vec!["NO_SUCH_BACKEND".to_owned()],
            ..XferOptions::default()
        };
        expect_err(
            p.a.make_xfer_req(w, &lp, &[0], &rp, &[0], &named),
            ErrorKind::NotFound,
            "make naming a backend not created",
        );
        let named = XferOptions {
            backends: vec![h.backend().to_owned()],
            ..XferOptions::default()
        };
        let req =
            p.a.make_xfer_req(w, &lp, &[0], &rp, &[1], &named)
                .expect("a valid make after the errors");
        run_ok(h, &req, "valid made request");
        dst.assert_range(4096, &pattern(51, 0, 4096), "valid made request data");
    }
}

/// `create_xfer_req`: count or length mismatch, zero-length descriptor → `InvalidParam`; empty
/// lists, unknown agent, uncovered descriptors on either side (wrong device, spanning two
/// registrations included), unknown backend → `NotFound`.
pub fn create_xfer_req_errors(h: &dyn Harness) {
    for mode in modes_or_skip(h, "create_xfer_req_errors") {
        let src = TestBuffer::with_pattern(16 * 1024, 52);
        let dst = tmem(h, 16 * 1024);
        let never = TestBuffer::new(4096);
        let never_target = tmem(h, 4096);
        let p = Pair::new(h, mode);
        reg(&p.a, &[&src]);
        try_reg(
            p.target(),
            &reg_pieces(&[(&dst, 0, 8192), (&dst, 8192, 8192)]),
        )
        .expect("target registrations");
        p.publish();
        let target = p.target_name();
        let d = XferOptions::default();
        let create = |l: Vec<Desc>, r: Vec<Desc>, to: &str, o: &XferOptions| {
            p.try_create(XferOp::Write, l, r, to, o)
        };
        let (s0, t0) = (src.desc(0, 4096), dst.desc(0, 4096));
        let invalid = [
            ("count mismatch", vec![s0], vec![t0, dst.desc(4096, 4096)]),
            ("length mismatch", vec![s0], vec![dst.desc(0, 2048)]),
            (
                "a zero-length descriptor",
                vec![src.desc(0, 0)],
                vec![dst.desc(0, 0)],
            ),
        ];
        for (what, l, r) in invalid {
            expect_err(
                create(l, r, &target, &d),
                ErrorKind::InvalidParam,
                &format!("{mode}: create with {what}"),
            );
        }
        let not_found = [
            ("an empty local list", vec![], vec![t0]),
            ("an empty remote list", vec![s0], vec![]),
            ("empty lists", vec![], vec![]),
            (
                "an uncovered local descriptor",
                vec![never.whole()],
                vec![t0],
            ),
            (
                "an uncovered remote descriptor",
                vec![s0],
                vec![never_target.whole()],
            ),
            (
                "a local descriptor on another device",
                vec![on_dev(s0, 1)],
                vec![t0],
            ),
            (
                "a remote descriptor on another device",
                vec![s0],
                vec![on_dev(t0, 1)],
            ),
            (
                "a remote descriptor spanning two registrations",
                vec![src.desc(0, 8192)],
                vec![dst.desc(4096, 8192)],
            ),
        ];
        for (what, l, r) in not_found {
            expect_err(
                create(l, r, &target, &d),
                ErrorKind::NotFound,
                &format!("{mode}: create with {what}"),
            );
        }
        expect_err(
            create(vec![s0], vec![t0], "no-such-agent", &d),
            ErrorKind::NotFound,
            "create for an unknown agent",
        );
        let named = XferOptions {
            backends: vec!["NO_SUCH_BACKEND".to_owned()],
            ..XferOptions::default()
        };
        expect_err(
            create(vec![s0], vec![t0], &target, &named),
            ErrorKind::NotFound,
            "create naming a backend not created",
        );
        let req = create(vec![s0], vec![t0], &target, &d).expect("a valid create after the errors");
        run_ok(h, &req, "valid created request");
        dst.assert_range(0, &pattern(52, 0, 4096), "valid created request data");
    }
}

/// Before the first post, `status`, `wait`, `telemetry` and the completion future report
/// `NotPosted`; `cancel` is a no-op that keeps it so.
pub fn status_before_post_not_posted(h: &dyn Harness) {
    for mode in modes_or_skip(h, "status_before_post_not_posted") {
        let src = TestBuffer::with_pattern(4096, 53);
        let dst = tmem(h, 4096);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let req = p.create(
            XferOp::Write,
            vec![src.whole()],
            vec![dst.whole()],
            &XferOptions::default(),
        );
        expect_err(req.status(), ErrorKind::NotPosted, "status before post");
        expect_err(
            req.wait(Some(Duration::ZERO)),
            ErrorKind::NotPosted,
            "wait before post",
        );
        expect_err(
            req.telemetry(),
            ErrorKind::NotPosted,
            "telemetry before post",
        );
        expect_err(
            block_on(req.completion()),
            ErrorKind::NotPosted,
            "completion future before post",
        );
        req.cancel().expect("cancel before post");
        expect_err(
            req.status(),
            ErrorKind::NotPosted,
            "status after a no-op cancel",
        );
        run_ok(h, &req, "first post");
        dst.assert_range(0, &pattern(53, 0, 4096), "data");
    }
}
