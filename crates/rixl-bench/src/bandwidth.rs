//! Bandwidth mode (the default): runs every (block size, batch size) row of the sweep over the
//! session's streams and reports it (table, JSON lines, SVG plot).
//!
//! Each stream runs `--num_threads` worker threads, each keeping `--pipeline_depth` requests in
//! flight on its own slots ([`crate::layout`]); between rows the data is reset and, with
//! `--check_consistency`, checked.
//!
//! Columns (NIXL-API §6): B/W = `block × batch × I` bytes over the wall time of the timed loop
//! (from the first thread's start to the last thread's end, after warm-up, over every stream:
//! the aggregate of a manytoone or onetomany run), decimal GB/s; Avg Lat. = that time over
//! `(I / (threads × streams)) × batch`, per descriptor; Prep = creating (or making) a request,
//! plus registering the slot with `--reregister_mem`; Post = time inside `post`; Tx = from the
//! start of `post` until the completion is seen (`post` returned `Done`, or `wait` returned).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use rixl::{
    Agent, Desc, MemType, PreparedList, RegDesc, RegDescList, XferDescList, XferOp, XferOptions,
    XferRequest, XferStatus,
};

use crate::cli::{Backend, Config, Scheme};
use crate::layout::{desc_offsets, file_pos, SlotLayout};
use crate::notif::NOTIF;
use crate::output::{self, Row, Stat};
use crate::session::{open, CORRUPT_ENV};

/// Only a bound so that a broken peer fails the run instead of hanging it.
const WAIT: Duration = Duration::from_secs(120);

/// What the worker threads of one stream share for one row.
struct RowCtx<'a> {
    cfg: &'a Config,
    agent: &'a Agent,
    peer: &'a str,
    /// The stream's first slot in the initiator's buffer and in the target's.
    lbase: u64,
    rbase: u64,
    block: u64,
    batch: u64,
    /// Descriptor offsets in a slot (see [`desc_offsets`]).
    loffs: &'a [u64],
    roffs: &'a [u64],
    op: XferOp,
    opts: XferOptions,
    progress: &'a AtomicU64,
}

impl RowCtx<'_> {
    fn local_descs(&self, slot: u64) -> impl Iterator<Item = Desc> + '_ {
        let base = self.lbase + slot * self.cfg.slot_stride;
        self.loffs
            .iter()
            .map(move |&o| Desc::new(base + o, self.block, 0))
    }

    fn remote_list(&self, slots: impl Iterator<Item = u64>) -> XferDescList {
        let mut v = Vec::new();
        for s in slots {
            for (j, &o) in self.roffs.iter().enumerate() {
                v.push(if self.cfg.backend == Backend::Posix {
                    let (f, off) = file_pos(self.cfg, s, j as u64, o);
                    Desc::new(off, self.block, f as u64 + 1)
                } else {
                    Desc::new(self.rbase + s * self.cfg.slot_stride + o, self.block, 0)
                });
            }
        }
        let mem = if self.cfg.backend == Backend::Posix {
            MemType::File
        } else {
            MemType::Dram
        };
        XferDescList::from_descs(mem, v)
    }

    fn local_list(&self, slots: impl Iterator<Item = u64>) -> XferDescList {
        XferDescList::from_descs(
            MemType::Dram,
            slots.flat_map(|s| self.local_descs(s)).collect(),
        )
    }

    fn slot_reg(&self, slot: u64) -> RegDescList {
        RegDescList::from_descs(
            MemType::Dram,
            vec![RegDesc::new(
                self.lbase + slot * self.cfg.slot_stride,
                self.cfg.span(self.block, self.batch),
                0,
            )],
        )
    }
}

#[derive(Default)]
struct ThreadResult {
    start: Option<Instant>,
    end: Option<Instant>,
    prep: Vec<u64>,
    post: Vec<u64>,
    tx: Vec<u64>,
    posts: u64,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// One thread's warm-up and timed loop.
fn worker(
    ctx: &RowCtx<'_>,
    t: u64,
    warm: u64,
    iters: u64,
    barrier: &Barrier,
) -> Result<ThreadResult, String> {
    let cfg = ctx.cfg;
    let a = &cfg.args;
    let depth = a.pipeline_depth as usize;
    let slot_of = |k: usize| t * a.pipeline_depth + k as u64;
    let rerun = a.reregister_mem;
    let mut res = ThreadResult::default();
    // Prepared lists: the remote side once per row; the local side once per row too, unless it
    // is re-registered every iteration (then once per request, for that slot only).
    let mut remote_prep: Option<PreparedList> = None;
    let mut local_prep: Option<PreparedList> = None;
    let mut reqs: Vec<Option<XferRequest>> = (0..depth).map(|_| None).collect();
    let mut regs: Vec<Option<RegDescList>> = (0..depth).map(|_| None).collect();
    let mut inflight: Vec<Option<(Instant, bool)>> = vec![None; depth];
    let batch = ctx.batch as usize;
    let err = |what: &str, e: rixl::Error| format!("{what}: {e}");

    let complete =
        |req: &XferRequest, started: Instant, timed: bool, res: &mut ThreadResult| match req
            .wait(Some(WAIT))
        {
            Ok(XferStatus::Done) => {
                if timed {
                    res.tx.push(ns(started.elapsed()));
                }
                Ok(())
            }
            Ok(s) => Err(format!("transfer did not complete: {s:?}")),
            Err(e) => Err(format!("transfer failed: {e}")),
        };

    let total = warm + iters;
    for i in 0..total {
        let timed = i >= warm;
        if i == warm {
            // Warm-up done: drain, then start the clock together with the other threads.
            for k in 0..depth {
                if let (Some((st, tm)), Some(r)) = (inflight[k].take(), reqs[k].as_ref()) {
                    complete(r, st, tm, &mut res)?;
                }
            }
            barrier.wait();
            res.start = Some(Instant::now());
        }
        let k = (i % depth as u64) as usize;
        if depth > 1 && inflight[k].is_some() {
            // Note every request already complete, so that its Tx ends when it is first seen.
            for j in 0..depth {
                if let (Some((st, tm)), Some(r)) = (inflight[j], reqs[j].as_ref()) {
                    if matches!(r.status(), Ok(XferStatus::Done)) {
                        if tm {
                            res.tx.push(ns(st.elapsed()));
                        }
                        inflight[j] = None;
                    }
                }
            }
        }
        if let (Some((st, tm)), Some(r)) = (inflight[k].take(), reqs[k].as_ref()) {
            complete(r, st, tm, &mut res)?;
        }
        if reqs[k].is_none() || a.recreate_xfer || rerun {
            let slot = slot_of(k);
            let t0 = Instant::now();
            reqs[k] = None;
            if rerun {
                if let Some(old) = regs[k].take() {
                    ctx.agent
                        .deregister_mem(&old, &[])
                        .map_err(|e| err("--reregister_mem: deregistration failed", e))?;
                }
                let reg = ctx.slot_reg(slot);
                // SAFETY: the slot lies inside the initiator's buffer, which outlives the
                // agent (see `Session`), and the program does not touch it while transfers run.
                unsafe { ctx.agent.register_mem(&reg, &[]) }
                    .map_err(|e| err("--reregister_mem: registration failed", e))?;
                regs[k] = Some(reg);
            }
            let req = if a.prepared_xfer {
                if remote_prep.is_none() {
                    let slots = (0..depth).map(slot_of);
                    remote_prep = Some(
                        ctx.agent
                            .prep_xfer_dlist(ctx.peer, &ctx.remote_list(slots), &[])
                            .map_err(|e| err("preparing the target list", e))?,
                    );
                }
                let (lp, lidx): (PreparedList, Vec<usize>) = if rerun {
                    let l = ctx
                        .agent
                        .prep_xfer_dlist("", &ctx.local_list(std::iter::once(slot)), &[])
                        .map_err(|e| err("preparing the local list", e))?;
                    (l, (0..batch).collect())
                } else {
                    if local_prep.is_none() {
                        let slots = (0..depth).map(slot_of);
                        local_prep = Some(
                            ctx.agent
                                .prep_xfer_dlist("", &ctx.local_list(slots), &[])
                                .map_err(|e| err("preparing the local list", e))?,
                        );
                    }
                    let l = local_prep.clone().ok_or("internal: no local list")?;
                    (l, (k * batch..(k + 1) * batch).collect())
                };
                let ridx: Vec<usize> = (k * batch..(k + 1) * batch).collect();
                let r = remote_prep.as_ref().ok_or("internal: no remote list")?;
                ctx.agent
                    .make_xfer_req(ctx.op, &lp, &lidx, r, &ridx, &ctx.opts)
                    .map_err(|e| err("making the request", e))?
            } else {
                ctx.agent
                    .create_xfer_req(
                        ctx.op,
                        &ctx.local_list(std::iter::once(slot)),
                        &ctx.remote_list(std::iter::once(slot)),
                        ctx.peer,
                        &ctx.opts,
                    )
                    .map_err(|e| err("creating the request", e))?
            };
            // Counted in warm-up too: without --recreate_xfer a request is created only once.
            res.prep.push(ns(t0.elapsed()));
            reqs[k] = Some(req);
        }
        let req = reqs[k].as_ref().ok_or("internal: no request")?;
        let t0 = Instant::now();
        let st = req.post().map_err(|e| err("post failed", e))?;
        let t1 = Instant::now();
        res.posts += 1;
        if timed {
            res.post.push(ns(t1 - t0));
        }
        if st == XferStatus::Done {
            if timed {
                res.tx.push(ns(t1 - t0));
            }
        } else {
            inflight[k] = Some((t0, timed));
        }
        ctx.progress.fetch_add(1, Ordering::Relaxed);
    }
    if iters == 0 {
        barrier.wait();
        res.start = Some(Instant::now());
    }
    for k in 0..depth {
        if let (Some((st, tm)), Some(r)) = (inflight[k].take(), reqs[k].as_ref()) {
            complete(r, st, tm, &mut res)?;
        }
    }
    res.end = Some(Instant::now());
    drop(reqs);
    for reg in regs.into_iter().flatten() {
        ctx.agent
            .deregister_mem(&reg, &[])
            .map_err(|e| err("--reregister_mem: deregistration failed", e))?;
    }
    Ok(res)
}

/// Runs the sweep as the initiator and prints the results.
pub fn run(cfg: &Config) -> Result<(), String> {
    let a = &cfg.args;
    let show_progress = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());

    let mut sess = open(cfg)?;
    let bname = cfg.backend.name();
    let op = if cfg.write {
        XferOp::Write
    } else {
        XferOp::Read
    };
    let opts = XferOptions {
        notif: cfg.backend.notifies().then(|| NOTIF.to_vec()),
        backends: vec![bname.to_owned()],
        ..XferOptions::default()
    };
    if !a.json {
        println!("{}", output::table_header());
    }
    let mut rows = Vec::new();
    // Posts (each carrying "0xBEEF") per target, checked by the targets at the end.
    let mut posts_per_target = vec![0u64; sess.num_targets()];
    let nrows = cfg.block_sizes.len() * cfg.batch_sizes.len();
    let nthreads = a.num_threads * cfg.streams;
    let mut row_no = 0;
    for &block in &cfg.block_sizes {
        for &batch in &cfg.batch_sizes {
            let loffs = desc_offsets(cfg.scattered, block, batch, false);
            let roffs = desc_offsets(cfg.scattered, block, batch, true);
            let local_layout = SlotLayout::new(cfg, block, batch, false);
            if a.check_consistency {
                local_layout.fill(sess.lbuf.bytes_mut(), cfg.initiator_slots(), 0xbb);
                sess.fill_targets(cfg, block, batch)?;
            }
            let (iters_all, warm_all) = cfg.iterations(block);
            let per_thread = (iters_all / a.num_threads).max(1);
            let warm_pt = warm_all / a.num_threads;
            let progress = AtomicU64::new(0);
            let ctxs: Vec<RowCtx<'_>> = sess
                .streams
                .iter()
                .map(|st| RowCtx {
                    cfg,
                    agent: &sess.agents[st.agent],
                    peer: &st.peer,
                    lbase: st.lbase,
                    rbase: st.rbase,
                    block,
                    batch,
                    loffs: &loffs,
                    roffs: &roffs,
                    op,
                    opts: opts.clone(),
                    progress: &progress,
                })
                .collect();
            // One barrier for every thread of every stream: the timed loops start together.
            let barrier = Barrier::new(nthreads as usize);
            let total_posts = (per_thread + warm_pt) * nthreads;
            let results: Vec<Result<(usize, ThreadResult), String>> = std::thread::scope(|s| {
                let mut hs = Vec::new();
                for (i, ctx) in ctxs.iter().enumerate() {
                    for t in 0..a.num_threads {
                        let barrier = &barrier;
                        hs.push(s.spawn(move || {
                            worker(ctx, t, warm_pt, per_thread, barrier).map(|r| (i, r))
                        }));
                    }
                }
                if show_progress {
                    while hs.iter().any(|h| !h.is_finished()) {
                        output::progress_line(
                            row_no,
                            nrows,
                            block,
                            batch,
                            progress.load(Ordering::Relaxed),
                            total_posts,
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    output::progress_clear();
                }
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("a worker thread panicked".into()))
                    })
                    .collect()
            });
            let results: Vec<(usize, ThreadResult)> =
                results.into_iter().collect::<Result<_, _>>()?;
            drop(ctxs);
            row_no += 1;
            let start = results.iter().filter_map(|(_, r)| r.start).min();
            let end = results.iter().filter_map(|(_, r)| r.end).max();
            let secs = match (start, end) {
                (Some(s), Some(e)) => (e - s).as_secs_f64(),
                _ => 0.0,
            };
            let iterations = per_thread * nthreads;
            let bytes = (block * batch * iterations) as f64;
            let mut prep = Vec::new();
            let mut post = Vec::new();
            let mut tx = Vec::new();
            for (i, r) in results {
                prep.extend(r.prep);
                post.extend(r.post);
                tx.extend(r.tx);
                posts_per_target[sess.streams[i].target] += r.posts;
            }
            let row = Row {
                block,
                batch,
                iterations,
                seconds: secs,
                bw_gbs: if secs > 0.0 { bytes / secs / 1e9 } else { 0.0 },
                avg_lat_us: secs * 1e6 / (per_thread * batch) as f64,
                prep: Stat::from_ns(prep),
                post: Stat::from_ns(post),
                tx: Stat::from_ns(tx),
            };
            if a.check_consistency {
                if std::env::var_os(CORRUPT_ENV).is_some() {
                    sess.corrupt(cfg, &local_layout);
                }
                if cfg.write {
                    sess.verify_targets(cfg, block, batch)?;
                } else if let Some((o, v)) =
                    local_layout.mismatch(sess.lbuf.bytes(), cfg.initiator_slots(), 0xaa, 0xbb)
                {
                    return Err(format!(
                        "consistency check failed: initiator byte at offset {o} is {v:#04x}"
                    ));
                }
            }
            if let Some(got) = sess.loopback_notifs()? {
                if got != total_posts {
                    return Err(format!(
                        "the target received {got} \"0xBEEF\" notifications for {total_posts} transfers"
                    ));
                }
            }
            if a.json {
                println!(
                    "{}",
                    output::json_row(
                        &row,
                        &output::RunInfo {
                            backend: bname,
                            op: if cfg.write { "WRITE" } else { "READ" },
                            threads: a.num_threads,
                            depth: a.pipeline_depth,
                            scheme: cfg.scheme.name(),
                            streams: cfg.streams,
                            layout: if cfg.scattered {
                                "scattered"
                            } else {
                                "contiguous"
                            },
                        }
                    )
                );
            } else {
                println!("{}", output::table_row(&row));
            }
            let _ = std::io::stdout().flush();
            rows.push(row);
        }
    }
    sess.finish(&posts_per_target)?;
    if let Some(path) = &a.plot {
        let mut title = format!(
            "rixl-bench {} {} (threads {}, depth {}",
            bname,
            if cfg.write { "WRITE" } else { "READ" },
            a.num_threads,
            a.pipeline_depth
        );
        if cfg.scheme != Scheme::Pairwise {
            title.push_str(&format!(", {} x{}", cfg.scheme.name(), cfg.streams));
        }
        if cfg.scattered {
            title.push_str(", scattered");
        }
        title.push(')');
        std::fs::write(path, output::svg(&rows, &title))
            .map_err(|e| format!("--plot: cannot write {path}: {e}"))?;
    }
    drop(sess);
    Ok(())
}
