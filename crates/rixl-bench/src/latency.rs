//! Latency mode (`--latency xfer|pingpong`): one request or notification in flight at a time,
//! timed until the target's answer arrives.
//!
//! - `xfer`: a `--latency_size`-byte `--op_type` transfer (one descriptor, one request reposted
//!   every iteration) carrying the "0xBEEF" notification; the target answers every such
//!   notification with the same message. Two measures per iteration: `complete` (post → the
//!   initiator sees its request done) and `roundtrip` (post → the answer has arrived).
//! - `pingpong`: a standalone notification of `--latency_size` bytes (at least the 6 bytes of
//!   "0xBEEF", which it starts with) and the target's answer, as large: `roundtrip` only.
//!
//! Both sides wait with `Agent::wait_notif` (a short yield, then a condvar sleep) instead of
//! polling. The target is the re-executed process (`notif::answer_notifs`) or, for LOOPBACK, a
//! thread of this process running the same loop on the in-process target agent.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rixl::{Agent, Desc, MemType, XferDescList, XferOp, XferOptions, XferRequest, XferStatus};

use crate::cli::{Config, Latency};
use crate::layout::SlotLayout;
use crate::notif::{answer_notifs, NOTIF};
use crate::output::{self, Dist, LatRow};
use crate::session;

/// Only a bound so that a lost answer fails the run instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// The notification of one round trip.
fn message(l: Latency, size: u64) -> Vec<u8> {
    let mut m = NOTIF.to_vec();
    if l == Latency::PingPong && size as usize > m.len() {
        m.resize(size as usize, b'.');
    }
    m
}

/// Blocks until `peer` has answered with `msg`.
fn wait_answer(agent: &Agent, peer: &str, msg: &[u8]) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !agent.wait_notif(left) {
            return Err(format!(
                "the target did not answer within {} s",
                WAIT.as_secs()
            ));
        }
        let got = agent
            .get_notifs(&[])
            .map_err(|e| format!("reading notifications: {e}"))?;
        if got.iter().any(|n| n.from == peer && n.msg == msg) {
            return Ok(());
        }
    }
}

pub fn run(cfg: &Config, l: Latency) -> Result<(), String> {
    let a = &cfg.args;
    let mut sess = session::open(cfg)?;
    let bname = cfg.backend.name();
    let size = a.latency_size;
    let (iters, warm) = cfg.iterations(size);
    let iters = iters.max(1);
    let local_layout = SlotLayout::new(cfg, size, 1, false);
    if a.check_consistency {
        local_layout.fill(sess.lbuf.bytes_mut(), 1, 0xbb);
        sess.fill_targets(cfg, size, 1)?;
    }
    let agent = &sess.agents[0];
    let stream = &sess.streams[0];
    let peer = stream.peer.as_str();
    let err = |what: &str, e: rixl::Error| format!("{what}: {e}");
    let msg = message(l, size);
    let op = if cfg.write {
        XferOp::Write
    } else {
        XferOp::Read
    };
    let req: Option<XferRequest> = match l {
        Latency::PingPong => None,
        Latency::Xfer => {
            let opts = XferOptions {
                notif: Some(msg.clone()),
                backends: vec![bname.to_owned()],
                ..XferOptions::default()
            };
            let local =
                XferDescList::from_descs(MemType::Dram, vec![Desc::new(stream.lbase, size, 0)]);
            let remote =
                XferDescList::from_descs(MemType::Dram, vec![Desc::new(stream.rbase, size, 0)]);
            Some(if a.prepared_xfer {
                let lp = agent
                    .prep_xfer_dlist("", &local, &[])
                    .map_err(|e| err("preparing the local list", e))?;
                let rp = agent
                    .prep_xfer_dlist(peer, &remote, &[])
                    .map_err(|e| err("preparing the target list", e))?;
                agent
                    .make_xfer_req(op, &lp, &[0], &rp, &[0], &opts)
                    .map_err(|e| err("making the request", e))?
            } else {
                agent
                    .create_xfer_req(op, &local, &remote, peer, &opts)
                    .map_err(|e| err("creating the request", e))?
            })
        }
    };
    // LOOPBACK: the target agent lives here; it needs our metadata to answer.
    let local_target = sess.loopback_target();
    if let Some(t) = local_target {
        let md = agent
            .local_metadata()
            .map_err(|e| err("initiator metadata", e))?;
        t.load_remote_metadata(&md)
            .map_err(|e| err("loading the initiator's metadata into the target", e))?;
    }
    let stop = AtomicBool::new(false);
    let answered = AtomicU64::new(0);
    let measured = std::thread::scope(|s| {
        if let Some(t) = local_target {
            let (stop, answered) = (&stop, &answered);
            s.spawn(move || answer_notifs(t, cfg, stop, answered));
        }
        let r = (|| -> Result<(Vec<u64>, Vec<u64>), String> {
            let mut roundtrip = Vec::with_capacity(iters as usize);
            let mut complete = Vec::with_capacity(iters as usize);
            for i in 0..warm + iters {
                let t0 = Instant::now();
                let t1 = match &req {
                    Some(r) => {
                        let st = r.post().map_err(|e| err("post failed", e))?;
                        if st != XferStatus::Done {
                            match r.wait(Some(WAIT)) {
                                Ok(XferStatus::Done) => {}
                                Ok(s) => return Err(format!("transfer did not complete: {s:?}")),
                                Err(e) => return Err(err("transfer failed", e)),
                            }
                        }
                        Instant::now()
                    }
                    None => {
                        agent
                            .send_notif(peer, &msg, Some(bname))
                            .map_err(|e| err("sending the notification", e))?;
                        t0
                    }
                };
                wait_answer(agent, peer, &msg)?;
                let t2 = Instant::now();
                if i >= warm {
                    roundtrip.push(ns(t2 - t0));
                    complete.push(ns(t1 - t0));
                }
            }
            Ok((roundtrip, complete))
        })();
        stop.store(true, Ordering::Release);
        r
    });
    let (roundtrip, complete) = measured?;
    drop(req);
    let posts = warm + iters;
    if local_target.is_some() && answered.load(Ordering::Acquire) != posts {
        return Err(format!(
            "the target answered {} of {posts} notifications",
            answered.load(Ordering::Acquire)
        ));
    }
    if a.check_consistency {
        if cfg.write {
            sess.verify_targets(cfg, size, 1)?;
        } else if let Some((o, v)) = local_layout.mismatch(sess.lbuf.bytes(), 1, 0xaa, 0xbb) {
            return Err(format!(
                "consistency check failed: initiator byte at offset {o} is {v:#04x}"
            ));
        }
    }
    sess.finish(&[posts])?;
    drop(sess);

    let opname = match (l, cfg.write) {
        (Latency::PingPong, _) => "NOTIF",
        (Latency::Xfer, true) => "WRITE",
        (Latency::Xfer, false) => "READ",
    };
    let mut rows = Vec::new();
    if l == Latency::Xfer {
        rows.push(LatRow {
            test: l.name(),
            op: opname,
            size,
            measure: "complete",
            iterations: iters,
            dist: Dist::from_ns(complete),
        });
    }
    rows.push(LatRow {
        test: l.name(),
        op: opname,
        size,
        measure: "roundtrip",
        iterations: iters,
        dist: Dist::from_ns(roundtrip),
    });
    if a.json {
        for r in &rows {
            println!("{}", output::latency_json(r, bname));
        }
    } else {
        println!("{}", output::latency_header());
        for r in &rows {
            println!("{}", output::latency_row(r));
        }
    }
    let _ = std::io::stdout().flush();
    Ok(())
}
