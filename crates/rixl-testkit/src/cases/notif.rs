//! Notifications: per-post stickiness, empty and cleared notifications, sender names, timing
//! relative to the data, ordering, standalone notifications and the queue (NIXL-API §3.1, §2.5
//! "Notifications").

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rixl::{ErrorKind, XferOp, XferOptions};

use super::*;
use crate::pattern;

fn needs_notif(h: &dyn Harness, case: &str) -> Vec<Mode> {
    if !h.notif() {
        skip(h, case, "no notification support");
        return Vec::new();
    }
    modes_or_skip(h, case)
}

/// Asserts that exactly the given messages arrive at the target, from `from`, in order.
#[track_caller]
fn expect_msgs(h: &dyn Harness, target: &dyn TargetAgent, from: &str, msgs: &[&[u8]], what: &str) {
    let got = collect_notifs(h, target, msgs.len());
    let want: Vec<(String, String)> = msgs
        .iter()
        .map(|m| (from.to_owned(), String::from_utf8_lossy(m).into_owned()))
        .collect();
    assert_eq!(summary(&got), want, "{what}");
}

/// A notification given at creation goes with every post; a post naming another one replaces
/// it for that post and all later ones (NIXL-API §3.1), for created and made requests; a
/// request without one sends none.
pub fn notif_sticky_per_post(h: &dyn Harness) {
    for mode in needs_notif(h, "notif_sticky_per_post") {
        let src = TestBuffer::with_pattern(8192, 41);
        let dst = tmem(h, 8192);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let (t, me) = (p.target(), p.a.name().to_owned());
        let created = p.create(
            XferOp::Write,
            vec![src.desc(0, 4096)],
            vec![dst.desc(0, 4096)],
            &XferOptions::with_notif("tag1"),
        );
        run_ok(h, &created, "post with the creation notification");
        expect_msgs(h, t, &me, &[b"tag1"], &format!("{mode}: first post"));
        run_ok_notif(h, &created, b"tag2", "post with tag2");
        expect_msgs(h, t, &me, &[b"tag2"], &format!("{mode}: post naming tag2"));
        run_ok(h, &created, "post without a notification argument");
        expect_msgs(h, t, &me, &[b"tag2"], &format!("{mode}: tag2 sticks"));

        let lp = p.prep_local(vec![src.desc(4096, 4096)]);
        let rp = p.prep_target(vec![dst.desc(4096, 4096)]);
        let made =
            p.a.make_xfer_req(
                XferOp::Write,
                &lp,
                &[0],
                &rp,
                &[0],
                &XferOptions::with_notif("m1"),
            )
            .expect("make_xfer_req with a notification");
        run_ok(h, &made, "made request");
        expect_msgs(h, t, &me, &[b"m1"], &format!("{mode}: made request"));
        run_ok_notif(h, &made, b"m2", "made request with m2");
        run_ok(h, &made, "made request again");
        expect_msgs(h, t, &me, &[b"m2", b"m2"], &format!("{mode}: m2 sticks"));

        // A request without a notification sends none: the marker posted after it is the only
        // message (notifications from one initiator arrive in order).
        let plain = p.create(
            XferOp::Write,
            vec![src.desc(0, 4096)],
            vec![dst.desc(0, 4096)],
            &XferOptions::default(),
        );
        run_ok(h, &plain, "request without a notification");
        run_ok_notif(h, &created, b"marker", "marker");
        expect_msgs(
            h,
            t,
            &me,
            &[b"marker"],
            &format!("{mode}: nothing before the marker"),
        );
        dst.assert_range(0, &pattern(41, 0, 8192), "data");
    }
}

/// `post_with_notif(b"")` sends an empty notification, which then sticks (RIXL, NIXL-API §4
/// #5); `set_notif(None)` clears it, so the next post sends nothing.
pub fn notif_empty_and_cleared(h: &dyn Harness) {
    for mode in needs_notif(h, "notif_empty_and_cleared") {
        let src = TestBuffer::with_pattern(4096, 42);
        let dst = tmem(h, 4096);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let (t, me) = (p.target(), p.a.name().to_owned());
        let req = p.create(
            XferOp::Write,
            vec![src.whole()],
            vec![dst.whole()],
            &XferOptions::with_notif("x"),
        );
        run_ok_notif(h, &req, b"", "post with an empty notification");
        expect_msgs(h, t, &me, &[b""], &format!("{mode}: empty notification"));
        run_ok(h, &req, "post after the empty notification");
        expect_msgs(
            h,
            t,
            &me,
            &[b""],
            &format!("{mode}: the empty notification sticks"),
        );
        req.set_notif(None);
        run_ok(h, &req, "post after clearing");
        req.set_notif(Some(b"end".to_vec()));
        run_ok(h, &req, "post with end");
        expect_msgs(
            h,
            t,
            &me,
            &[b"end"],
            &format!("{mode}: the cleared post sent nothing"),
        );
    }
}

/// Transfer notifications arrive under the initiator's name, for several initiators writing to
/// one target, and to itself.
pub fn notif_arrives_under_initiator_name(h: &dyn Harness) {
    for mode in needs_notif(h, "notif_arrives_under_initiator_name") {
        let src = TestBuffer::with_pattern(4096, 43);
        let src2 = TestBuffer::with_pattern(4096, 44);
        let dst = tmem(h, 8192);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let req = p.create(
            XferOp::Write,
            vec![src.whole()],
            vec![dst.desc(0, 4096)],
            &XferOptions::with_notif("from-a"),
        );
        run_ok(h, &req, "first initiator");
        expect_msgs(
            h,
            p.target(),
            p.a.name(),
            &[b"from-a"],
            &format!("{mode}: sender"),
        );
        if mode == Mode::TwoAgents {
            let c = agent(h, "second-init");
            reg(&c, &[&src2]);
            c.load_remote_metadata(&p.target().local_metadata().expect("metadata"))
                .expect("load");
            let rc = c
                .create_xfer_req(
                    XferOp::Write,
                    &xlist(vec![src2.whole()]),
                    &p.tlist(vec![dst.desc(4096, 4096)]),
                    &p.target_name(),
                    &XferOptions::with_notif("from-c"),
                )
                .expect("second initiator's request");
            run_ok(h, &rc, "second initiator");
            run_ok(h, &req, "first initiator again");
            let got = collect_notifs(h, p.target(), 2);
            let mut got = summary(&got);
            got.sort();
            let mut want = vec![
                (p.a.name().to_owned(), "from-a".to_owned()),
                (c.name().to_owned(), "from-c".to_owned()),
            ];
            want.sort();
            assert_eq!(got, want, "each notification names its initiator");
            dst.assert_range(4096, &pattern(44, 0, 4096), "second initiator's data");
        }
    }
}

/// The notification of a post arrives only after all of its data has landed: the target sees
/// the data as soon as it sees the notification, before the initiator waits.
pub fn notif_after_data_landed(h: &dyn Harness) {
    const LEN: usize = 1 << 20;
    for mode in needs_notif(h, "notif_after_data_landed") {
        let mut src = TestBuffer::with_pattern(LEN, 0);
        let dst = tmem(h, LEN);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let req = p.create(
            XferOp::Write,
            pages(&src, 4096, 0..LEN / 4096),
            pages(&dst, 4096, (0..LEN / 4096).rev()),
            &XferOptions::with_notif("landed"),
        );
        for round in 1..=8u64 {
            src.fill_pattern(round);
            let status = req.post().expect("post");
            let got = collect_notifs(h, p.target(), 1);
            assert_eq!(got[0].msg, b"landed");
            let bytes = pattern(round, 0, LEN);
            let n = LEN / 4096;
            for k in 0..n {
                let to = (n - 1 - k) * 4096;
                dst.assert_range(
                    to,
                    &bytes[k * 4096..(k + 1) * 4096],
                    &format!("{mode}: round {round}: page {k} had not landed at notification"),
                );
            }
            if status == XferStatus::InProgress {
                req.wait(Some(h.timeout())).expect("wait");
            }
            assert_eq!(req.status().expect("status"), XferStatus::Done);
        }
    }
}

/// Transfer notifications from one initiator arrive in posting order, across several requests.
pub fn notif_order_from_one_initiator(h: &dyn Harness) {
    for mode in needs_notif(h, "notif_order_from_one_initiator") {
        let src = TestBuffer::with_pattern(4 * 4096, 45);
        let dst = tmem(h, 4 * 4096);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let reqs: Vec<_> = (0..4)
            .map(|k| {
                p.create(
                    XferOp::Write,
                    vec![src.desc(k * 4096, 4096)],
                    vec![dst.desc(k * 4096, 4096)],
                    &XferOptions::default(),
                )
            })
            .collect();
        const N: usize = 100;
        for i in 0..N {
            run_ok_notif(
                h,
                &reqs[i % 4],
                format!("ord-{i}").as_bytes(),
                "ordered post",
            );
        }
        let got = collect_notifs(h, p.target(), N);
        for (i, n) in got.iter().enumerate() {
            assert_eq!(n.from, p.a.name(), "sender");
            assert_eq!(
                String::from_utf8_lossy(&n.msg),
                format!("ord-{i}"),
                "{mode}: notification {i} out of order: {:?}",
                summary(&got)
            );
        }
    }
}

/// `send_notif` to yourself arrives under your own name; to a peer under yours; through a named
/// backend too; empty messages are delivered; unknown agents and backends are `NotFound`.
pub fn send_notif_self_and_peer(h: &dyn Harness) {
    if !h.notif() {
        return skip(h, "send_notif_self_and_peer", "no notification support");
    }
    let a = agent(h, "notif-a");
    if h.local() {
        a.send_notif(a.name(), b"to-self", None)
            .expect("send_notif to self");
        a.send_notif(a.name(), b"to-self-named", Some(h.backend()))
            .expect("send_notif to self through the named backend");
        let mut got = summary(&collect_notifs(h, &a, 2));
        got.sort();
        let me = a.name().to_owned();
        assert_eq!(
            got,
            vec![
                (me.clone(), "to-self".to_owned()),
                (me, "to-self-named".to_owned())
            ]
        );
    }
    if h.remote() {
        let b = target(h, "notif-b");
        a.load_remote_metadata(&b.local_metadata().expect("metadata"))
            .expect("load");
        a.send_notif(b.name(), b"hello", None).expect("send_notif");
        a.send_notif(b.name(), b"", Some(h.backend()))
            .expect("empty send_notif through the named backend");
        let mut got = summary(&collect_notifs(h, &b, 2));
        got.sort();
        let me = a.name().to_owned();
        assert_eq!(
            got,
            vec![(me.clone(), String::new()), (me, "hello".to_owned())]
        );
        expect_err(
            a.send_notif(b.name(), b"x", Some("NO_SUCH_BACKEND")),
            ErrorKind::NotFound,
            "send_notif through a backend not created",
        );
    }
    expect_err(
        a.send_notif("no-such-agent", b"x", None),
        ErrorKind::NotFound,
        "send_notif to an unknown agent",
    );
}

/// `get_notifs` drains (a second call returns nothing new), `get_notifs_by_agent` groups by
/// sender, a backend filter works, an unknown backend is `NotFound`, and an agent without a
/// notification backend gets `Backend`.
pub fn get_notifs_drains_and_groups(h: &dyn Harness) {
    if !h.notif() {
        return skip(h, "get_notifs_drains_and_groups", "no notification support");
    }
    for mode in modes_or_skip(h, "get_notifs_drains_and_groups") {
        let p = Pair::new(h, mode);
        p.publish();
        let c = agent(h, "notif-c");
        let target = p.target();
        let mut senders: Vec<&Agent> = vec![&p.a];
        if mode == Mode::TwoAgents {
            c.load_remote_metadata(&target.local_metadata().expect("metadata"))
                .expect("load");
            senders.push(&c);
        }
        for s in &senders {
            for i in 0..3 {
                s.send_notif(target.name(), format!("m{i}").as_bytes(), None)
                    .expect("send_notif");
            }
        }
        let got = collect_notifs(h, target, 3 * senders.len());
        assert_eq!(got.len(), 3 * senders.len());
        assert!(
            target.get_notifs(&[]).expect("get_notifs").is_empty(),
            "{mode}: get_notifs drains"
        );
        for s in &senders {
            for i in 0..2 {
                s.send_notif(target.name(), format!("g{i}").as_bytes(), None)
                    .expect("send_notif");
            }
        }
        let deadline = Instant::now() + h.timeout();
        let mut grouped: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        while grouped.values().map(Vec::len).sum::<usize>() < 2 * senders.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{mode}: notifications did not arrive: {grouped:?}"
            );
            target.wait_notif(left);
            for (k, v) in target
                .get_notifs_by_agent(&[h.backend()])
                .expect("get_notifs_by_agent")
            {
                grouped.entry(k).or_default().extend(v);
            }
        }
        assert_eq!(grouped.len(), senders.len(), "{mode}: one key per sender");
        for s in &senders {
            let mut v = grouped.get(s.name()).cloned().unwrap_or_default();
            v.sort();
            assert_eq!(
                v,
                vec![b"g0".to_vec(), b"g1".to_vec()],
                "{mode}: from {}",
                s.name()
            );
        }
        expect_err(
            target.get_notifs(&["NO_SUCH_BACKEND"]),
            ErrorKind::NotFound,
            "get_notifs of a backend not created",
        );
    }
    let bare = bare_agent("notif-bare");
    expect_err(
        bare.get_notifs(&[]),
        ErrorKind::Backend,
        "get_notifs without a notification backend",
    );
}

/// `wait_notif` returns false when nothing was sent, blocks until a notification sent from
/// another thread arrives, and does not consume it.
pub fn wait_notif_blocks_until_arrival(h: &dyn Harness) {
    if !h.notif() {
        return skip(
            h,
            "wait_notif_blocks_until_arrival",
            "no notification support",
        );
    }
    for mode in modes_or_skip(h, "wait_notif_blocks_until_arrival") {
        let p = Pair::new(h, mode);
        p.publish();
        let target = p.target();
        assert!(
            !target.wait_notif(Duration::from_millis(10)),
            "{mode}: nothing was sent"
        );
        std::thread::scope(|s| {
            let (a, name) = (&p.a, target.name().to_owned());
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                a.send_notif(&name, b"wake", None).expect("send_notif");
            });
            assert!(
                target.wait_notif(h.timeout()),
                "{mode}: wait_notif returned without a notification"
            );
        });
        let got = collect_notifs(h, target, 1);
        assert_eq!(
            summary(&got),
            vec![(p.a.name().to_owned(), "wake".to_owned())]
        );
    }
}

/// Without notification support, a request with a notification can be neither made nor
/// created (`Backend`, as NIXL reports it), and the queue is `Backend`.
pub fn notif_unsupported_errors(h: &dyn Harness) {
    if h.notif() {
        return skip(
            h,
            "notif_unsupported_errors",
            "the backend carries notifications",
        );
    }
    for mode in modes_or_skip(h, "notif_unsupported_errors") {
        let src = TestBuffer::with_pattern(4096, 46);
        let dst = tmem(h, 4096);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        expect_err(
            p.try_create(
                XferOp::Write,
                vec![src.whole()],
                vec![dst.whole()],
                &p.target_name(),
                &XferOptions::with_notif("n"),
            ),
            ErrorKind::Backend,
            "create_xfer_req with a notification",
        );
        let lp = p.prep_local(vec![src.whole()]);
        let rp = p.prep_target(vec![dst.whole()]);
        expect_err(
            p.a.make_xfer_req(
                XferOp::Write,
                &lp,
                &[0],
                &rp,
                &[0],
                &XferOptions::with_notif("n"),
            ),
            ErrorKind::Backend,
            "make_xfer_req with a notification",
        );
        expect_err(p.a.get_notifs(&[]), ErrorKind::Backend, "get_notifs");
    }
}
