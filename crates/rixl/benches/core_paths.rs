//! Benchmarks of the paths whose per-descriptor cost users feel with 10^4–10^5 KV pages:
//! building descriptor lists, preparing lists and making requests from indices, creating
//! requests directly, and posting a small loopback request to completion.
//!
//! Run with `cargo bench -p rixl --bench core_paths`. Per-descriptor figures are the reported
//! time divided by the descriptor count in the benchmark's name.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rixl::{
    Agent, AgentConfig, Desc, MemType, RegDesc, RegDescList, XferDescList, XferOp, XferOptions,
};

const PAGES: usize = 65_536;
const PAGE: u64 = 4096;

/// A deterministic permutation, so that no two neighbouring indices merge.
fn shuffled(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

struct Setup {
    agent: Agent,
    _src: Vec<u8>,
    _dst: Vec<u8>,
    src_base: u64,
    dst_base: u64,
}

fn setup(bytes: usize) -> Setup {
    let agent = Agent::new("bench", AgentConfig::default().backend("LOOPBACK")).unwrap();
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let (src_base, dst_base) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    let regs = RegDescList::from_descs(
        MemType::Dram,
        vec![
            RegDesc::new(src_base, bytes as u64, 0),
            RegDesc::new(dst_base, bytes as u64, 0),
        ],
    );
    // SAFETY: both vectors live in the returned Setup for as long as the agent, and the
    // benchmark never touches them while transfers run.
    unsafe { agent.register_mem(&regs, &[]).unwrap() };
    Setup {
        agent,
        _src: src,
        _dst: dst,
        src_base,
        dst_base,
    }
}

fn pages(base: u64, n: usize) -> XferDescList {
    let descs = (0..n as u64)
        .map(|i| Desc::new(base + i * PAGE, PAGE, 0))
        .collect();
    XferDescList::from_descs(MemType::Dram, descs)
}

fn bench_lists(c: &mut Criterion) {
    let mut g = c.benchmark_group("descriptor_lists");
    g.throughput(Throughput::Elements(PAGES as u64));
    g.bench_function("build_xfer_list_65536", |b| {
        b.iter(|| black_box(pages(black_box(0x7f00_0000_0000), PAGES)))
    });
    g.finish();
}

fn bench_prepared(c: &mut Criterion) {
    let s = setup(PAGES * PAGE as usize);
    let name = s.agent.name().to_owned();
    let local = pages(s.src_base, PAGES);
    let remote = pages(s.dst_base, PAGES);
    let idx_l = shuffled(PAGES);
    let idx_r = shuffled(PAGES);
    let opts = XferOptions::default();
    let mut g = c.benchmark_group("prepared");
    g.throughput(Throughput::Elements(PAGES as u64));
    g.sample_size(30);
    g.bench_function("prep_both_sides_65536", |b| {
        b.iter(|| {
            let l = s.agent.prep_xfer_dlist("", &local, &[]).unwrap();
            let r = s.agent.prep_xfer_dlist(&name, &remote, &[]).unwrap();
            black_box((l, r))
        })
    });
    let pl = s.agent.prep_xfer_dlist("", &local, &[]).unwrap();
    let pr = s.agent.prep_xfer_dlist(&name, &remote, &[]).unwrap();
    g.bench_function("make_from_indices_65536_scattered", |b| {
        b.iter(|| {
            black_box(
                s.agent
                    .make_xfer_req(XferOp::Write, &pl, &idx_l, &pr, &idx_r, &opts)
                    .unwrap(),
            )
        })
    });
    g.bench_function("prep_and_make_65536_scattered", |b| {
        b.iter(|| {
            let l = s.agent.prep_xfer_dlist("", &local, &[]).unwrap();
            let r = s.agent.prep_xfer_dlist(&name, &remote, &[]).unwrap();
            black_box(
                s.agent
                    .make_xfer_req(XferOp::Write, &l, &idx_l, &r, &idx_r, &opts)
                    .unwrap(),
            )
        })
    });
    let seq: Vec<usize> = (0..PAGES).collect();
    g.bench_function("make_from_indices_65536_contiguous", |b| {
        b.iter(|| {
            black_box(
                s.agent
                    .make_xfer_req(XferOp::Write, &pl, &seq, &pr, &seq, &opts)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

fn bench_create(c: &mut Criterion) {
    let s = setup(PAGES * PAGE as usize);
    let name = s.agent.name().to_owned();
    let perm = shuffled(PAGES);
    let local = pages(s.src_base, PAGES);
    let remote = XferDescList::from_descs(
        MemType::Dram,
        perm.iter()
            .map(|&i| Desc::new(s.dst_base + i as u64 * PAGE, PAGE, 0))
            .collect(),
    );
    let opts = XferOptions::default();
    let mut g = c.benchmark_group("create");
    g.throughput(Throughput::Elements(PAGES as u64));
    g.sample_size(30);
    g.bench_function("create_xfer_req_65536_scattered", |b| {
        b.iter(|| {
            black_box(
                s.agent
                    .create_xfer_req(XferOp::Write, &local, &remote, &name, &opts)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

fn bench_post(c: &mut Criterion) {
    let s = setup(1 << 20);
    let name = s.agent.name().to_owned();
    let local = pages(s.src_base, 1);
    let remote = pages(s.dst_base, 1);
    let mut g = c.benchmark_group("post");
    g.throughput(Throughput::Bytes(PAGE));
    for (label, opts) in [
        ("post_complete_4k_loopback", XferOptions::default()),
        (
            "post_complete_4k_loopback_notif",
            XferOptions::with_notif("n"),
        ),
    ] {
        let req = s
            .agent
            .create_xfer_req(XferOp::Write, &local, &remote, &name, &opts)
            .unwrap();
        let notif = opts.notif.is_some();
        g.bench_function(label, |b| {
            b.iter(|| {
                req.post().unwrap();
                black_box(req.wait(None).unwrap());
                if notif {
                    black_box(s.agent.get_notifs(&[]).unwrap());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_lists,
    bench_prepared,
    bench_create,
    bench_post
);
criterion_main!(benches);
