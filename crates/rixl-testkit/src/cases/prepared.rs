//! Prepared lists, requests by index, descriptor merging and telemetry (NIXL-API §3.3, §3.10).

use rixl::{ErrorKind, MemType, StridedDesc, XferDescList, XferOp, XferOptions};

use super::*;
use crate::pattern;

const P: usize = 4096;

/// 64 contiguous 4 KiB indices on both sides become one descriptor: `segment_count() == 1`
/// and telemetry `desc_count == 1`.
pub fn make_merges_contiguous_indices(h: &dyn Harness) {
    for mode in modes_or_skip(h, "make_merges_contiguous_indices") {
        let src = TestBuffer::with_pattern(64 * P, 31);
        let dst = tmem(h, 64 * P);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let lp = p.prep_local(pages(&src, P, 0..64));
        let rp = p.prep_target(pages(&dst, P, 0..64));
        assert_eq!(lp.len(), 64);
        assert_eq!(lp.mem(), MemType::Dram);
        assert_eq!(lp.agent(), None, "a local prepared list names no agent");
        assert_eq!(rp.agent(), Some(p.target_name().as_str()));
        assert_eq!(rp.backends(), vec![h.backend().to_owned()]);
        let idx: Vec<usize> = (0..64).collect();
        let req =
            p.a.make_xfer_req(XferOp::Write, &lp, &idx, &rp, &idx, &XferOptions::default())
                .expect("make_xfer_req");
        assert_eq!(req.segment_count(), 1, "{mode}: 64 contiguous pages merge");
        assert_eq!(req.desc_count(), 1);
        assert_eq!(req.total_bytes(), (64 * P) as u64);
        run_ok(h, &req, &format!("{mode}: merged WRITE"));
        let t = req.telemetry().expect("telemetry");
        assert_eq!(t.desc_count, 1, "{mode}: telemetry desc_count");
        assert_eq!(t.total_bytes, (64 * P) as u64);
        dst.assert_range(
            0,
            &pattern(31, 0, 64 * P),
            &format!("{mode}: merged WRITE data"),
        );
    }
}

/// `[0,1,2,10,11,5] -> [0,1,2,10,11,6]` merges into three descriptors, and moves exactly those
/// pages.
pub fn make_merges_runs(h: &dyn Harness) {
    for mode in modes_or_skip(h, "make_merges_runs") {
        let src = TestBuffer::with_pattern(16 * P, 32);
        let dst = tmem(h, 16 * P);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let lp = p.prep_local(pages(&src, P, 0..16));
        let rp = p.prep_target(pages(&dst, P, 0..16));
        let li = [0, 1, 2, 10, 11, 5];
        let ri = [0, 1, 2, 10, 11, 6];
        let req =
            p.a.make_xfer_req(XferOp::Write, &lp, &li, &rp, &ri, &XferOptions::default())
                .expect("make_xfer_req");
        assert_eq!(req.segment_count(), 3, "{mode}: segments");
        assert_eq!(req.desc_count(), 3, "{mode}: desc_count");
        run_ok(h, &req, &format!("{mode}: runs"));
        assert_eq!(req.telemetry().expect("telemetry").desc_count, 3);
        let src_bytes = pattern(32, 0, 16 * P);
        let mut expected = vec![0u8; 16 * P];
        for (&l, &r) in li.iter().zip(&ri) {
            expected[r * P..(r + 1) * P].copy_from_slice(&src_bytes[l * P..(l + 1) * P]);
        }
        assert_bytes_eq(&dst.contents(), &expected, &format!("{mode}: runs data"));
    }
}

/// `skip_desc_merge` keeps every index as its own descriptor.
pub fn skip_desc_merge_keeps_every_descriptor(h: &dyn Harness) {
    for mode in modes_or_skip(h, "skip_desc_merge_keeps_every_descriptor") {
        let src = TestBuffer::with_pattern(64 * P, 33);
        let dst = tmem(h, 64 * P);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let lp = p.prep_local(pages(&src, P, 0..64));
        let rp = p.prep_target(pages(&dst, P, 0..64));
        let idx: Vec<usize> = (0..64).collect();
        let opts = XferOptions {
            skip_desc_merge: true,
            ..XferOptions::default()
        };
        let req =
            p.a.make_xfer_req(XferOp::Write, &lp, &idx, &rp, &idx, &opts)
                .expect("make_xfer_req");
        assert_eq!(req.segment_count(), 64, "{mode}: skip_desc_merge");
        assert_eq!(req.desc_count(), 64);
        run_ok(h, &req, &format!("{mode}: unmerged WRITE"));
        assert_eq!(req.telemetry().expect("telemetry").desc_count, 64);
        dst.assert_range(
            0,
            &pattern(33, 0, 64 * P),
            &format!("{mode}: unmerged data"),
        );
    }
}

/// `create_xfer_req` reports the caller's descriptor count in `desc_count` and telemetry, even
/// when it merges contiguous descriptors for the backend.
pub fn create_counts_callers_descriptors(h: &dyn Harness) {
    for mode in modes_or_skip(h, "create_counts_callers_descriptors") {
        let src = TestBuffer::with_pattern(64 * P, 34);
        let dst = tmem(h, 64 * P);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        for n in [2usize, 64] {
            let req = p.create(
                XferOp::Write,
                pages(&src, P, 0..n),
                pages(&dst, P, 0..n),
                &XferOptions::default(),
            );
            assert_eq!(req.desc_count(), n as u64, "{mode}: create desc_count");
            assert!(req.segment_count() <= n);
            run_ok(h, &req, &format!("{mode}: {n} contiguous descriptors"));
            let t = req.telemetry().expect("telemetry");
            assert_eq!(t.desc_count, n as u64, "{mode}: telemetry desc_count");
            assert_eq!(t.total_bytes, (n * P) as u64);
            dst.assert_range(0, &pattern(34, 0, n * P), &format!("{mode}: data"));
        }
    }
}

/// Strided lists: rows expand in order across rows; dense adjacent rows merge to at most one
/// descriptor per row; sparse pages move exactly their bytes.
pub fn strided_lists(h: &dyn Harness) {
    for mode in modes_or_skip(h, "strided_lists") {
        let src = TestBuffer::with_pattern(64 * 1024, 35);
        let dst = tmem(h, 64 * 1024);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        // Rows start at `off` of `b`: an address for DRAM, a file offset (dev = the file's key)
        // for storage.
        let row = |b: &dyn TestMem, off: usize, len: u64, stride: u64, count: u64| {
            let start = b.desc_unchecked(off, len as usize);
            StridedDesc {
                addr: start.addr,
                len,
                dev: start.dev,
                stride,
                count,
            }
        };
        let strided = |mem: MemType, rows: &[StridedDesc]| {
            XferDescList::from_strided(mem, rows).expect("from_strided")
        };
        let prep = |agent: &str, l: &XferDescList| {
            p.a.prep_xfer_dlist(agent, l, &[])
                .unwrap_or_else(|e| panic!("{mode}: prep of a strided list: {e}"))
        };
        // Two adjacent dense rows of four 4 KiB pages on both sides.
        let ll = strided(
            MemType::Dram,
            &[row(&src, 0, 4096, 4096, 4), row(&src, 16384, 4096, 4096, 4)],
        );
        assert_eq!(ll.len(), 8);
        assert_eq!(ll[4], src.desc(16384, 4096), "rows expand in order");
        let rl = strided(
            p.tmem,
            &[row(&dst, 0, 4096, 4096, 4), row(&dst, 16384, 4096, 4096, 4)],
        );
        let lp = prep(rixl::INIT_AGENT, &ll);
        let rp = prep(&p.target_name(), &rl);
        let idx: Vec<usize> = (0..8).collect();
        let req =
            p.a.make_xfer_req(XferOp::Write, &lp, &idx, &rp, &idx, &XferOptions::default())
                .expect("make_xfer_req");
        assert!(
            req.desc_count() <= 2,
            "{mode}: two dense rows give at most 2 descriptors, got {}",
            req.desc_count()
        );
        run_ok(h, &req, &format!("{mode}: dense strided WRITE"));
        dst.assert_range(
            0,
            &pattern(35, 0, 32768),
            &format!("{mode}: dense strided data"),
        );
        // Sparse local pages (1 KiB every 4 KiB) into dense target pages.
        let ll = strided(MemType::Dram, &[row(&src, 32768, 1024, 4096, 4)]);
        let rl = strided(p.tmem, &[row(&dst, 32768, 1024, 1024, 4)]);
        let lp = prep(rixl::INIT_AGENT, &ll);
        let rp = prep(&p.target_name(), &rl);
        let req =
            p.a.make_xfer_req(
                XferOp::Write,
                &lp,
                &[0, 1, 2, 3],
                &rp,
                &[0, 1, 2, 3],
                &XferOptions::default(),
            )
            .expect("make_xfer_req");
        assert_eq!(req.segment_count(), 4, "{mode}: sparse pages cannot merge");
        run_ok(h, &req, &format!("{mode}: sparse strided WRITE"));
        let src_bytes = pattern(35, 0, 64 * 1024);
        for k in 0..4 {
            let from = 32768 + k * 4096;
            dst.assert_range(
                32768 + k * 1024,
                &src_bytes[from..from + 1024],
                &format!("{mode}: sparse page {k}"),
            );
        }
        dst.assert_filled(
            36864,
            64 * 1024 - 36864,
            0,
            &format!("{mode}: beyond the pages"),
        );
    }
}

/// Strided rows with `count == 0`, `stride < len`, or no rows at all are `NotFound`
/// (NIXL-API §2.6).
pub fn strided_list_errors(_h: &dyn Harness) {
    let row = |stride, count| StridedDesc {
        addr: 0x10_0000,
        len: 4096,
        dev: 0,
        stride,
        count,
    };
    expect_err(
        XferDescList::from_strided(MemType::Dram, &[]),
        ErrorKind::NotFound,
        "no rows",
    );
    expect_err(
        XferDescList::from_strided(MemType::Dram, &[row(4096, 0)]),
        ErrorKind::NotFound,
        "count 0",
    );
    expect_err(
        XferDescList::from_strided(MemType::Dram, &[row(4096, 2), row(2048, 2)]),
        ErrorKind::NotFound,
        "stride smaller than length",
    );
}

/// Telemetry after a post: positive start time and durations, transfer duration at least the
/// post duration, the bytes and descriptors of the post; a repost updates the start time.
pub fn telemetry_fields(h: &dyn Harness) {
    for mode in modes_or_skip(h, "telemetry_fields") {
        let src = TestBuffer::with_pattern(8192, 36);
        let dst = tmem(h, 8192);
        let p = Pair::setup(h, mode, &[&src], &[&dst]);
        let req = p.create(
            XferOp::Write,
            pages(&src, P, 0..2),
            pages(&dst, P, 0..2),
            &XferOptions::default(),
        );
        expect_err(
            req.telemetry(),
            ErrorKind::NotPosted,
            "telemetry before the first post",
        );
        run_ok(h, &req, &format!("{mode}: telemetry"));
        let t = req.telemetry().expect("telemetry");
        assert!(t.start_time_us > 0, "{mode}: start time {t:?}");
        assert!(t.post_duration_us > 0, "{mode}: durations round up: {t:?}");
        assert!(t.xfer_duration_us > 0, "{mode}: {t:?}");
        assert!(t.xfer_duration_us >= t.post_duration_us, "{mode}: {t:?}");
        assert_eq!(t.total_bytes, 8192);
        assert_eq!(t.desc_count, 2);
        run_ok(h, &req, &format!("{mode}: telemetry repost"));
        let t2 = req.telemetry().expect("telemetry");
        assert!(
            t2.start_time_us >= t.start_time_us,
            "a monotonic clock: {t:?} then {t2:?}"
        );
        assert_eq!(t2.total_bytes, 8192);
    }
}

/// With telemetry off, telemetry is `NoTelemetry` (before and after posting); with it on,
/// `NotPosted` before the first post.
pub fn telemetry_off_and_not_posted(h: &dyn Harness) {
    for mode in modes_or_skip(h, "telemetry_off_and_not_posted") {
        let src = TestBuffer::with_pattern(4096, 37);
        let dst = tmem(h, 4096);
        let p = Pair::with_telemetry(h, mode, false);
        reg(&p.a, &[&src]);
        reg(p.target(), &[&dst]);
        p.publish();
        let req = p.create(
            XferOp::Write,
            vec![src.whole()],
            vec![dst.whole()],
            &XferOptions::default(),
        );
        expect_err(
            req.telemetry(),
            ErrorKind::NoTelemetry,
            "telemetry off, never posted",
        );
        run_ok(h, &req, &format!("{mode}: transfer without telemetry"));
        expect_err(
            req.telemetry(),
            ErrorKind::NoTelemetry,
            "telemetry off, posted",
        );
        dst.assert_range(0, &pattern(37, 0, 4096), "data without telemetry");
    }
}
