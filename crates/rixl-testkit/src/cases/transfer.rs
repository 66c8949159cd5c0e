//! Data movement: WRITE and READ move exactly the described bytes, self-target and between two
//! agents, for one descriptor, thousands of scattered pages, and odd sizes at odd offsets.

use rixl::{XferOp, XferOptions};

use super::*;
use crate::{pattern, Rng};

fn write_read_single(h: &dyn Harness, mode: Mode) {
    const LEN: usize = 64 * 1024;
    let src = TestBuffer::with_pattern(LEN, 1);
    let dst = tmem(h, LEN);
    let back = TestBuffer::new(LEN);
    let p = Pair::setup(h, mode, &[&src, &back], &[&dst]);
    let w = p.create(
        XferOp::Write,
        vec![src.whole()],
        vec![dst.whole()],
        &XferOptions::default(),
    );
    assert_eq!(w.backend_name(), h.backend(), "query_xfer_backend");
    assert_eq!(w.op(), XferOp::Write);
    assert_eq!(w.peer(), p.target_name());
    assert_eq!(w.total_bytes(), LEN as u64);
    assert_eq!(w.desc_count(), 1);
    run_ok(h, &w, &format!("{mode}: WRITE"));
    dst.assert_range(0, &pattern(1, 0, LEN), &format!("{mode}: WRITE target"));
    let r = p.create(
        XferOp::Read,
        vec![back.whole()],
        vec![dst.whole()],
        &XferOptions::default(),
    );
    assert_eq!(r.op(), XferOp::Read);
    run_ok(h, &r, &format!("{mode}: READ"));
    back.assert_range(0, &pattern(1, 0, LEN), &format!("{mode}: READ destination"));
    src.assert_range(0, &pattern(1, 0, LEN), "the WRITE source is untouched");
    assert_eq!(
        r.wait(Some(h.timeout())).expect("wait after completion"),
        XferStatus::Done,
        "wait on a completed post returns its status"
    );
}

/// One WRITE and one READ of a single 64 KiB descriptor, the agent targeting itself.
pub fn self_write_read_single(h: &dyn Harness) {
    if !h.local() {
        return skip(h, "self_write_read_single", "not local-capable");
    }
    if no_target(h, "self_write_read_single") {
        return;
    }
    write_read_single(h, Mode::SelfTarget);
}

/// One WRITE and one READ of a single 64 KiB descriptor between two agents.
pub fn remote_write_read_single(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "remote_write_read_single", "not remote-capable");
    }
    if no_target(h, "remote_write_read_single") {
        return;
    }
    write_read_single(h, Mode::TwoAgents);
}

fn scattered_pages(h: &dyn Harness, mode: Mode) {
    const N: usize = 4096;
    const P: usize = 4096;
    let src = TestBuffer::with_pattern(N * P, 11);
    let dst = tmem(h, N * P);
    let back = TestBuffer::new(N * P);
    let p = Pair::setup(h, mode, &[&src, &back], &[&dst]);
    let mut rng = Rng::new(42);
    let perm = rng.permutation(N);

    // WRITE through create_xfer_req: local page i lands on target page perm[i].
    let w = p.create(
        XferOp::Write,
        pages(&src, P, 0..N),
        pages(&dst, P, perm.iter().copied()),
        &XferOptions::default(),
    );
    assert_eq!(
        w.desc_count(),
        N as u64,
        "create_xfer_req counts the caller's descriptors"
    );
    run_ok(h, &w, &format!("{mode}: scattered WRITE"));
    let src_bytes = pattern(11, 0, N * P);
    let mut expected = vec![0u8; N * P];
    for (i, &to) in perm.iter().enumerate() {
        expected[to * P..(to + 1) * P].copy_from_slice(&src_bytes[i * P..(i + 1) * P]);
    }
    assert_bytes_eq(
        &dst.contents(),
        &expected,
        &format!("{mode}: scattered WRITE target"),
    );

    // READ through prepared lists with shuffled index pairs: back page q[k] <- dst page
    // perm[q[k]], i.e. back ends up equal to src.
    let lp = p.prep_local(pages(&back, P, 0..N));
    let rp = p.prep_target(pages(&dst, P, 0..N));
    let q = rng.permutation(N);
    let li: Vec<usize> = q.clone();
    let ri: Vec<usize> = q.iter().map(|&k| perm[k]).collect();
    let r =
        p.a.make_xfer_req(XferOp::Read, &lp, &li, &rp, &ri, &XferOptions::default())
            .expect("make_xfer_req");
    assert!(r.segment_count() <= N);
    run_ok(h, &r, &format!("{mode}: scattered READ"));
    assert_bytes_eq(
        back.as_slice(),
        &src_bytes,
        &format!("{mode}: scattered READ"),
    );
}

/// 4096 × 4 KiB pages to a shuffled permutation and back, the agent targeting itself; every
/// byte verified.
pub fn self_scattered_pages(h: &dyn Harness) {
    if !h.local() {
        return skip(h, "self_scattered_pages", "not local-capable");
    }
    if no_target(h, "self_scattered_pages") {
        return;
    }
    scattered_pages(h, Mode::SelfTarget);
}

/// 4096 × 4 KiB pages to a shuffled permutation and back between two agents; every byte
/// verified.
pub fn remote_scattered_pages(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "remote_scattered_pages", "not remote-capable");
    }
    if no_target(h, "remote_scattered_pages") {
        return;
    }
    scattered_pages(h, Mode::TwoAgents);
}

fn unaligned_sizes(h: &dyn Harness, mode: Mode) {
    const LEN: usize = 256 * 1024;
    const SIZES: [usize; 7] = [1, 3, 4095, 65537, 7, 4097, 2];
    let src = TestBuffer::with_pattern(LEN, 21);
    let dst = tmem(h, LEN);
    let back = TestBuffer::new(LEN);
    let p = Pair::setup(h, mode, &[&src, &back], &[&dst]);
    let src_bytes = pattern(21, 0, LEN);
    // (local offset, target offset, back offset, size), all odd offsets with gaps between.
    let mut layout = Vec::new();
    let (mut lo, mut ro, mut bo) = (1usize, 3usize, 5usize);
    for s in SIZES {
        layout.push((lo, ro, bo, s));
        lo += s + 13;
        ro += s + 7;
        bo += s + 3;
    }
    // One WRITE per size.
    let mut expected = vec![0u8; LEN];
    for &(lo, ro, _, s) in &layout {
        let w = p.create(
            XferOp::Write,
            vec![src.desc(lo, s)],
            vec![dst.desc(ro, s)],
            &XferOptions::default(),
        );
        run_ok(
            h,
            &w,
            &format!("{mode}: WRITE of {s} bytes at {lo} -> {ro}"),
        );
        expected[ro..ro + s].copy_from_slice(&src_bytes[lo..lo + s]);
        assert_bytes_eq(
            &dst.contents(),
            &expected,
            &format!("{mode}: target after the {s}-byte WRITE (outside bytes must stay 0)"),
        );
    }
    // One READ of every range at once into other odd offsets.
    let r = p.create(
        XferOp::Read,
        layout
            .iter()
            .map(|&(_, _, bo, s)| back.desc(bo, s))
            .collect(),
        layout
            .iter()
            .map(|&(_, ro, _, s)| dst.desc(ro, s))
            .collect(),
        &XferOptions::default(),
    );
    run_ok(h, &r, &format!("{mode}: multi-descriptor unaligned READ"));
    let mut expected_back = vec![0u8; LEN];
    for &(lo, _, bo, s) in &layout {
        expected_back[bo..bo + s].copy_from_slice(&src_bytes[lo..lo + s]);
    }
    assert_bytes_eq(
        back.as_slice(),
        &expected_back,
        &format!("{mode}: unaligned READ destination (outside bytes must stay 0)"),
    );
}

/// Sizes 1, 2, 3, 7, 4095, 4097 and 65537 bytes at odd offsets, self-target: exact bytes land,
/// nothing around them changes.
pub fn self_unaligned_sizes(h: &dyn Harness) {
    if !h.local() {
        return skip(h, "self_unaligned_sizes", "not local-capable");
    }
    if no_target(h, "self_unaligned_sizes") {
        return;
    }
    unaligned_sizes(h, Mode::SelfTarget);
}

/// Sizes 1, 2, 3, 7, 4095, 4097 and 65537 bytes at odd offsets between two agents.
pub fn remote_unaligned_sizes(h: &dyn Harness) {
    if !h.remote() {
        return skip(h, "remote_unaligned_sizes", "not remote-capable");
    }
    if no_target(h, "remote_unaligned_sizes") {
        return;
    }
    unaligned_sizes(h, Mode::TwoAgents);
}

/// A request posted again after `Done` moves the (new) source bytes again, both for created
/// and for made requests.
pub fn repost_moves_data_again(h: &dyn Harness) {
    const LEN: usize = 32 * 1024;
    for mode in modes_or_skip(h, "repost_moves_data_again") {
        let mut src = TestBuffer::with_pattern(LEN, 100);
        let dst = tmem(h, LEN);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let created = p.create(
            XferOp::Write,
            vec![src.whole()],
            vec![dst.whole()],
            &XferOptions::default(),
        );
        let lp = p.prep_local(pages(&src, 4096, 0..8));
        let rp = p.prep_target(pages(&dst, 4096, 0..8));
        let made =
            p.a.make_xfer_req(
                XferOp::Write,
                &lp,
                &(0..8).collect::<Vec<_>>(),
                &rp,
                &(0..8).rev().collect::<Vec<_>>(),
                &XferOptions::default(),
            )
            .expect("make_xfer_req");
        for round in 0..6u64 {
            let seed = 100 + round;
            src.fill_pattern(seed);
            let bytes = pattern(seed, 0, LEN);
            if round % 2 == 0 {
                run_ok(h, &created, &format!("{mode}: repost {round}"));
                dst.assert_range(0, &bytes, &format!("{mode}: data of repost {round}"));
            } else {
                run_ok(h, &made, &format!("{mode}: repost {round} (made)"));
                for k in 0..8 {
                    dst.assert_range(
                        (7 - k) * 4096,
                        &bytes[k * 4096..(k + 1) * 4096],
                        &format!("{mode}: page {k} of repost {round}"),
                    );
                }
            }
        }
    }
}

/// Descriptors that are contiguous in memory but lie in two adjacent registrations are never
/// merged into one backend segment (a backend may hold per-region keys, and a target checks
/// each range against one registration), on either side.
pub fn adjacent_registrations_not_merged(h: &dyn Harness) {
    const HINT: &str = " (the agent merges neighbours whose region tokens are equal: give every \
                        region a distinct token in Backend::register and load_remote_region)";
    for mode in modes_or_skip(h, "adjacent_registrations_not_merged") {
        for split_local in [false, true] {
            let src = TestBuffer::with_pattern(8192, 7);
            let dst = tmem(h, 8192);
            let p = Pair::new(h, mode);
            let halves = |b: &dyn TestMem| reg_pieces(&[(b, 0, 4096), (b, 4096, 4096)]);
            if split_local {
                try_reg(&p.a, &halves(&src)).expect("two adjacent local registrations");
                reg(p.target(), &[&dst]);
            } else {
                reg(&p.a, &[&src]);
                try_reg(p.target(), &halves(&dst)).expect("two adjacent target registrations");
            }
            p.publish();
            let what = format!(
                "{mode}, {} side split",
                if split_local { "local" } else { "target" }
            );
            let c = p.create(
                XferOp::Write,
                pages(&src, 4096, 0..2),
                pages(&dst, 4096, 0..2),
                &XferOptions::default(),
            );
            assert_eq!(
                c.segment_count(),
                2,
                "{what}: create merged across registrations{HINT}"
            );
            run_ok(h, &c, &what);
            dst.assert_range(0, &pattern(7, 0, 8192), &what);
            let lp = p.prep_local(pages(&src, 4096, 0..2));
            let rp = p.prep_target(pages(&dst, 4096, 0..2));
            let m =
                p.a.make_xfer_req(
                    XferOp::Read,
                    &lp,
                    &[0, 1],
                    &rp,
                    &[0, 1],
                    &XferOptions::default(),
                )
                .expect("make_xfer_req");
            assert_eq!(
                m.segment_count(),
                2,
                "{what}: make merged across registrations{HINT}"
            );
            assert!(m.desc_count() <= 2, "{what}: desc_count {}", m.desc_count());
            run_ok(h, &m, &what);
            src.assert_range(0, &pattern(7, 0, 8192), &format!("{what}: READ back"));
        }
    }
}
