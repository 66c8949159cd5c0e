//! KV-cache mode (`--kv_preset`): what a disaggregated-serving connector does per request.
//!
//! Both sides hold a vLLM-style KV pool: for every layer (and K and V, unless the model uses
//! one joint latent), `pool_blocks` pages of `page_bytes`. Both pools are prepared once
//! (`prep_xfer_dlist` over every page). Each iteration picks `blocks` distinct random pages on
//! each side (the same page ids in every layer, as vLLM's block tables do), makes a request from
//! the index arrays, posts it with the "0xBEEF" notification and waits.
//!
//! Reported: the one-time preparation of both pools, make / post / transfer times (average and
//! P99), and bandwidth = bytes per request × timed iterations over the timed loop's wall time
//! (which includes making the requests). Iterations follow nixlbench's rule: requests are larger
//! than 1 MiB, so `--num_iter` and `--warmup_iter` are divided by `--large_blk_iter_ftr`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rixl::{Desc, MemType, XferDescList, XferOp, XferOptions, XferStatus};

use crate::cli::{Config, KvLayout};
use crate::notif::NOTIF;
use crate::output::Stat;
use crate::rng::Xorshift;
use crate::session;

const WAIT: Duration = Duration::from_secs(120);

const HEADERS: [(&str, usize); 12] = [
    ("Preset", 14),
    ("Tokens", 8),
    ("Descriptors", 13),
    ("Bytes", 12),
    ("Prepare (us)", 14),
    ("Avg Make (us)", 15),
    ("P99 Make (us)", 15),
    ("Avg Post (us)", 15),
    ("P99 Post (us)", 15),
    ("Avg Tx (us)", 13),
    ("P99 Tx (us)", 13),
    ("B/W (GB/Sec)", 12),
];

fn pool_list(kv: &KvLayout, base: u64) -> XferDescList {
    let n = kv.layers * kv.kvs * kv.pool_blocks;
    XferDescList::from_descs(
        MemType::Dram,
        (0..n)
            .map(|i| Desc::new(base + i * kv.page_bytes, kv.page_bytes, 0))
            .collect(),
    )
}

/// Indices into the prepared pool for page ids `ids` of every layer (and K/V).
fn indices(kv: &KvLayout, ids: &[u64]) -> Vec<usize> {
    let mut v = Vec::with_capacity((kv.layers * kv.kvs) as usize * ids.len());
    for lk in 0..kv.layers * kv.kvs {
        for &id in ids {
            v.push((lk * kv.pool_blocks + id) as usize);
        }
    }
    v
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

pub fn run(cfg: &Config, kv: &KvLayout) -> Result<(), String> {
    let a = &cfg.args;
    let mut sess = session::open(cfg)?;
    let bname = cfg.backend.name();
    let op = if cfg.write {
        XferOp::Write
    } else {
        XferOp::Read
    };
    let opts = XferOptions {
        notif: Some(NOTIF.to_vec()),
        backends: vec![bname.to_owned()],
        ..XferOptions::default()
    };
    let err = |what: &str, e: rixl::Error| format!("{what}: {e}");

    // The KV mode is pairwise: one agent, one stream.
    let (agent, stream) = (&sess.agents[0], &sess.streams[0]);
    let t = Instant::now();
    let local = agent
        .prep_xfer_dlist("", &pool_list(kv, stream.lbase), &[])
        .map_err(|e| err("preparing the local KV pool", e))?;
    let remote = agent
        .prep_xfer_dlist(&stream.peer, &pool_list(kv, stream.rbase), &[])
        .map_err(|e| err("preparing the target's KV pool", e))?;
    let prepare_us = t.elapsed().as_secs_f64() * 1e6;

    // A few request shapes, drawn before timing so that drawing is not measured.
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let shapes: Vec<(Vec<usize>, Vec<usize>)> = (0..8)
        .map(|_| {
            let s = rng.sample(kv.pool_blocks, kv.blocks);
            let d = rng.sample(kv.pool_blocks, kv.blocks);
            (indices(kv, &s), indices(kv, &d))
        })
        .collect();
    let bytes = kv.descs() * kv.page_bytes;
    let (iters, warm) = if bytes > 1 << 20 {
        (
            (a.num_iter / a.large_blk_iter_ftr).max(1),
            a.warmup_iter / a.large_blk_iter_ftr,
        )
    } else {
        (a.num_iter, a.warmup_iter)
    };
    let (mut make, mut post, mut tx) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = Instant::now();
    for i in 0..warm + iters {
        if i == warm {
            start = Instant::now();
        }
        let timed = i >= warm;
        let (li, ri) = &shapes[i as usize % shapes.len()];
        let t0 = Instant::now();
        let req = agent
            .make_xfer_req(op, &local, li, &remote, ri, &opts)
            .map_err(|e| err("making the KV request", e))?;
        let t1 = Instant::now();
        let st = req.post().map_err(|e| err("post failed", e))?;
        let t2 = Instant::now();
        if st != XferStatus::Done {
            match req.wait(Some(WAIT)) {
                Ok(XferStatus::Done) => {}
                Ok(s) => return Err(format!("transfer did not complete: {s:?}")),
                Err(e) => return Err(err("transfer failed", e)),
            }
        }
        if timed {
            make.push(ns(t1 - t0));
            post.push(ns(t2 - t1));
            tx.push(ns(t1.elapsed()));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let posts = warm + iters;
    if let Some(got) = sess.loopback_notifs()? {
        if got != posts {
            return Err(format!(
                "the target received {got} \"0xBEEF\" notifications for {posts} transfers"
            ));
        }
    }
    sess.finish(&[posts])?;
    drop(local);
    drop(remote);
    drop(sess);

    let (make, post, tx) = (Stat::from_ns(make), Stat::from_ns(post), Stat::from_ns(tx));
    let bw = if secs > 0.0 {
        (bytes * iters) as f64 / secs / 1e9
    } else {
        0.0
    };
    if a.json {
        println!(
            "{{\"backend\":\"{bname}\",\"op_type\":\"{}\",\"kv_preset\":\"{}\",\"tokens\":{},\
             \"descriptors\":{},\"bytes\":{bytes},\"iterations\":{iters},\"prepare_us\":{prepare_us},\
             \"avg_make_us\":{},\"p99_make_us\":{},\"avg_post_us\":{},\"p99_post_us\":{},\
             \"avg_tx_us\":{},\"p99_tx_us\":{},\"bw_gbps\":{bw}}}",
            if cfg.write { "WRITE" } else { "READ" },
            kv.preset,
            a.kv_tokens,
            kv.descs(),
            make.avg,
            make.p99,
            post.avg,
            post.p99,
            tx.avg,
            tx.p99
        );
    } else {
        let mut h = String::new();
        for (name, w) in HEADERS {
            let _ = write!(h, "{name:<w$}");
        }
        println!("{}", h.trim_end());
        println!("{}", "-".repeat(HEADERS.iter().map(|(_, w)| w).sum()));
        let cells = [
            kv.preset.to_owned(),
            a.kv_tokens.to_string(),
            kv.descs().to_string(),
            bytes.to_string(),
            format!("{prepare_us:.1}"),
            format!("{:.1}", make.avg),
            format!("{:.1}", make.p99),
            format!("{:.1}", post.avg),
            format!("{:.1}", post.p99),
            format!("{:.1}", tx.avg),
            format!("{:.1}", tx.p99),
            format!("{bw:.6}"),
        ];
        let mut r = String::new();
        for (c, (_, w)) in cells.iter().zip(HEADERS) {
            let _ = write!(r, "{c:<w$}");
        }
        println!("{}", r.trim_end());
    }
    Ok(())
}
