//! The initiator: sets up the target(s) (in-process agent, re-executed processes, or files),
//! runs every (block size, batch size) row and reports it.
//!
//! Memory layout, on both sides: `threads × pipeline_depth` slots per stream of `max_block ×
//! max_batch` bytes (twice that with `--layout scattered`); the request at pipeline position `k`
//! of thread `t` of stream `i` uses slot `i × threads × depth + t × depth + k` of the initiator's
//! buffer. On the target it uses the same slot for manytoone (one target buffer holding every
//! initiator's slots) and slot `t × depth + k` of target `i`'s buffer otherwise. The `batch`
//! descriptors of a request lie in its slot at [`desc_offsets`]: back to back, or scattered
//! (file targets: the same offsets, descriptor `j` in file `j mod num_files`).
//!
//! Columns (NIXL-API §6): B/W = `block × batch × I` bytes over the wall time of the timed loop
//! (from the first thread's start to the last thread's end, after warm-up, over every stream:
//! the aggregate of a manytoone or onetomany run), decimal GB/s; Avg Lat. = that time over
//! `(I / (threads × streams)) × batch`, per descriptor; Prep = creating (or making) a request,
//! plus registering the slot with `--reregister_mem`; Post = time inside `post`; Tx = from the
//! start of `post` until the completion is seen (`post` returned `Done`, or `wait` returned).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, MemType, PreparedList, RegDesc, RegDescList, XferDescList, XferOp,
    XferOptions, XferRequest, XferStatus,
};

use crate::cli::{Backend, Config, Scheme};
use crate::output::{self, Row, Stat};

/// The notification every network transfer carries, as in nixlbench.
pub const NOTIF: &[u8] = b"0xBEEF";
/// Test hook: flip one byte of the moved data before the consistency check (in-process
/// buffers only), to prove that the check catches it.
const CORRUPT_ENV: &str = "RIXL_BENCH_CORRUPT_FOR_TESTS";
/// Only a bound so that a broken peer fails the run instead of hanging it.
const WAIT: Duration = Duration::from_secs(120);

/// A heap buffer whose usable part starts on a 4096-byte boundary (O_DIRECT needs it).
#[derive(Debug)]
pub struct Buffer {
    data: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buffer {
    pub fn new(len: usize, fill: u8) -> Buffer {
        let data = vec![fill; len + 4096];
        let off = (4096 - data.as_ptr() as usize % 4096) % 4096;
        Buffer { data, off, len }
    }
    pub fn addr(&self) -> u64 {
        self.data[self.off..].as_ptr() as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.off..self.off + self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.off..self.off + self.len]
    }
}

/// Offsets, from a slot's start, of the `batch` descriptors of one side of a request.
///
/// Contiguous: back to back (RIXL merges them into one range). Scattered: descriptor `j` at
/// block position `2 × p(j)` for a shuffle `p` of `0..batch`, a different shuffle on each side:
/// list neighbours are not memory neighbours and a hole of one block separates any two
/// descriptors, so that no merging can collapse them. The shuffle depends only on `batch` and
/// the side, so the target process computes the same offsets from the same options.
pub fn desc_offsets(scattered: bool, block: u64, batch: u64, remote: bool) -> Vec<u64> {
    if !scattered {
        return (0..batch).map(|j| j * block).collect();
    }
    let side = if remote { 0xD1B5_4A32_D192_ED03 } else { 0 };
    // (Xorshift needs a non-zero state.)
    let mut rng = crate::kv::Xorshift((0x9E37_79B9_7F4A_7C15 ^ batch.rotate_left(17) ^ side) | 1);
    rng.sample(batch, batch)
        .into_iter()
        .map(|p| 2 * p * block)
        .collect()
}

/// Where a row's descriptors lie in every slot of one side, to fill and check it.
#[derive(Clone, Debug)]
pub struct SlotLayout {
    pub stride: u64,
    pub block: u64,
    /// Descriptor offsets in a slot, sorted.
    sorted: Vec<u64>,
    /// Bytes from the slot's start to the end of the last descriptor.
    pub span: u64,
}

impl SlotLayout {
    pub fn new(cfg: &Config, block: u64, batch: u64, remote: bool) -> SlotLayout {
        let mut sorted = desc_offsets(cfg.scattered, block, batch, remote);
        sorted.sort_unstable();
        SlotLayout {
            stride: cfg.slot_stride,
            block,
            sorted,
            span: cfg.span(block, batch),
        }
    }

    /// Sets the first `span` bytes (descriptors and holes) of the first `slots` slots to
    /// `byte`.
    pub fn fill(&self, buf: &mut [u8], slots: u64, byte: u8) {
        for s in 0..slots {
            let a = ((s * self.stride) as usize).min(buf.len());
            let b = (a + self.span as usize).min(buf.len());
            buf[a..b].fill(byte);
        }
    }

    /// The first wrong byte among the first `span` bytes of the first `slots` slots: bytes of
    /// descriptors must be `inside`, the holes between them `outside` (so that a transfer that
    /// landed at the wrong offset is caught too). Returns (offset in `buf`, value).
    pub fn mismatch(&self, buf: &[u8], slots: u64, inside: u8, outside: u8) -> Option<(u64, u8)> {
        let check = |a: usize, b: usize, want: u8| -> Option<(u64, u8)> {
            let (a, b) = (a.min(buf.len()), b.min(buf.len()));
            buf[a..b]
                .iter()
                .position(|&x| x != want)
                .map(|i| ((a + i) as u64, buf[a + i]))
        };
        for s in 0..slots {
            let base = (s * self.stride) as usize;
            let mut cursor = base;
            for &off in &self.sorted {
                let start = base + off as usize;
                let end = start + self.block as usize;
                if let Some(bad) = check(cursor, start, outside) {
                    return Some(bad);
                }
                if let Some(bad) = check(start, end, inside) {
                    return Some(bad);
                }
                cursor = end;
            }
            if let Some(bad) = check(cursor, base + self.span as usize, outside) {
                return Some(bad);
            }
        }
        None
    }
}

/// Reaps the target process however the run ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The other side of the transfers.
enum Target {
    /// A second agent in this process.
    Loopback { agent: Agent, buf: Buffer },
    /// The target process: commands on its stdin (or the control connection), answers on its
    /// stdout (or the same connection). Fields drop in order: the command channel closes first,
    /// which ends the target, then a re-executed target is reaped.
    Process {
        stdin: Box<dyn Write>,
        stdout: BufReader<Box<dyn Read>>,
        #[allow(dead_code)]
        child: Option<ChildGuard>,
    },
    /// Files registered with the initiator's own agent (path mode, keys 1..=num_files).
    Files { paths: Vec<PathBuf> },
}

impl Target {
    fn ask(&mut self, cmd: &str) -> Result<String, String> {
        let Target::Process { stdin, stdout, .. } = self else {
            return Err("internal: not a target process".into());
        };
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("the target process is gone ({e})"))?;
        let mut line = String::new();
        match stdout.read_line(&mut line) {
            Ok(0) | Err(_) => Err(format!(
                "the target process did not answer {:?}",
                cmd.split(' ').next().unwrap_or("")
            )),
            Ok(_) => Ok(line.trim().to_owned()),
        }
    }

    /// Resets every target slot's descriptors and holes to 0xaa.
    fn fill(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        match self {
            Target::Loopback { buf, .. } => {
                SlotLayout::new(cfg, block, batch, true).fill(
                    buf.bytes_mut(),
                    cfg.target_slots(),
                    0xaa,
                );
                Ok(())
            }
            Target::Process { .. } => match self.ask(&format!("FILL {block} {batch}"))?.as_str() {
                "OK" => Ok(()),
                other => Err(format!("the target process answered {other:?} to FILL")),
            },
            Target::Files { paths } => {
                use std::os::unix::fs::FileExt;
                let files = open_all(paths)?;
                let chunk = vec![0xaau8; block as usize];
                let offs = desc_offsets(cfg.scattered, block, batch, true);
                for s in 0..cfg.target_slots() {
                    for (j, &o) in offs.iter().enumerate() {
                        let (f, off) = file_pos(cfg, s, j as u64, o);
                        files[f]
                            .write_all_at(&chunk, off)
                            .map_err(|e| format!("filling {}: {e}", paths[f].display()))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Checks that every target slot's descriptors hold 0xbb (and its holes still 0xaa).
    fn verify(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        let bad = |off: u64, v: u8| {
            format!("consistency check failed: target byte at offset {off} is {v:#04x}")
        };
        match self {
            Target::Loopback { buf, .. } => {
                let lay = SlotLayout::new(cfg, block, batch, true);
                match lay.mismatch(buf.bytes(), cfg.target_slots(), 0xbb, 0xaa) {
                    None => Ok(()),
                    Some((o, v)) => Err(bad(o, v)),
                }
            }
            Target::Process { .. } => {
                let a = self.ask(&format!("VERIFY {block} {batch} {}", 0xbb))?;
                if a == "OK" {
                    return Ok(());
                }
                let w: Vec<u64> = a
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                match w.as_slice() {
                    [o, v] => Err(bad(*o, *v as u8)),
                    _ => Err(format!("the target process answered {a:?} to VERIFY")),
                }
            }
            Target::Files { paths } => {
                use std::os::unix::fs::FileExt;
                let files = open_all(paths)?;
                let mut chunk = vec![0u8; block as usize];
                let offs = desc_offsets(cfg.scattered, block, batch, true);
                for s in 0..cfg.target_slots() {
                    for (j, &o) in offs.iter().enumerate() {
                        let (f, off) = file_pos(cfg, s, j as u64, o);
                        files[f]
                            .read_exact_at(&mut chunk, off)
                            .map_err(|e| format!("reading back {}: {e}", paths[f].display()))?;
                        if let Some(i) = chunk.iter().position(|&x| x != 0xbb) {
                            return Err(format!(
                                "consistency check failed: {} byte at offset {} is {:#04x}, expected 0xbb",
                                paths[f].display(),
                                off + i as u64,
                                chunk[i]
                            ));
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

fn open_all(paths: &[PathBuf]) -> Result<Vec<std::fs::File>, String> {
    paths
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| format!("opening {}: {e}", p.display()))
        })
        .collect()
}

/// File index and offset of descriptor `j` of slot `s`, at offset `off` in its slot.
fn file_pos(cfg: &Config, s: u64, j: u64, off: u64) -> (usize, u64) {
    ((j % cfg.args.num_files) as usize, s * cfg.slot_stride + off)
}

/// Removes the benchmark's files at the end.
struct FileCleanup(Vec<PathBuf>);

impl Drop for FileCleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts target process `k` (this binary again, with the same arguments); [`greet`] it next.
fn spawn_target(k: u64) -> Result<Target, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let mut child = Command::new(exe)
        .args(std::env::args().skip(1))
        .env(crate::ROLE_ENV, "target")
        .env(crate::target::INDEX_ENV, k.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the target process: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin for the target")?;
    let stdout = child.stdout.take().ok_or("no stdout for the target")?;
    Ok(Target::Process {
        stdin: Box::new(stdin),
        stdout: BufReader::new(Box::new(stdout)),
        child: Some(ChildGuard(child)),
    })
}

/// Connects to a target started by hand with `--listen`.
fn connect_target(cfg: &Config, addr: SocketAddr) -> Result<(Target, SocketAddr), String> {
    let caddr = SocketAddr::new(addr.ip(), addr.port() + 1);
    // The target may still be starting: retry for a while.
    let t = Instant::now();
    let stream = loop {
        match std::net::TcpStream::connect_timeout(&caddr, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                return Err(format!(
                    "--target_addr: cannot reach the target's commands at {caddr}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let reader = stream
        .try_clone()
        .map_err(|e| format!("--target_addr: {e}"))?;
    let target = Target::Process {
        stdin: Box::new(stream),
        stdout: BufReader::new(Box::new(reader)),
        child: None,
    };
    greet(cfg, target, addr.ip())
}

/// Reads `LISTEN <port>` and checks that both sides run the same layout.
fn greet(
    cfg: &Config,
    mut target: Target,
    ip: std::net::IpAddr,
) -> Result<(Target, SocketAddr), String> {
    let Target::Process { stdout, .. } = &mut target else {
        return Err("internal: not a target process".into());
    };
    let mut line = String::new();
    let _ = stdout.read_line(&mut line);
    let port: u16 = line
        .trim()
        .strip_prefix("LISTEN ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            format!(
                "the {} target did not start (it said {:?})",
                cfg.backend.name(),
                line.trim()
            )
        })?;
    let answer = target.ask(&crate::target::hello(cfg))?;
    if answer != "OK" {
        return Err(format!("the target refused: {answer}"));
    }
    Ok((target, SocketAddr::new(ip, port)))
}

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
                // agent (see `run`), and the program does not touch it while transfers run.
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

/// Runs the benchmark as the initiator and prints the results.
pub fn run(cfg: &Config) -> Result<(), String> {
    let a = &cfg.args;
    let quiet_dump = a.json;
    if quiet_dump {
        eprint!("{}", cfg.dump());
    } else {
        print!("{}", cfg.dump());
    }
    if let Some(kv) = &cfg.kv {
        return crate::kv::run(cfg, kv);
    }
    if let Some(l) = cfg.latency {
        return crate::latency::run(cfg, l);
    }
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
    let mut posts_per_target = vec![0u64; sess.targets.len()];
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
                for t in &mut sess.targets {
                    t.fill(cfg, block, batch)?;
                }
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
                    for t in &mut sess.targets {
                        t.verify(cfg, block, batch)?;
                    }
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
        if cfg.scheme != crate::cli::Scheme::Pairwise {
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

/// One initiator-target pair of a run.
pub struct Stream {
    /// Index into [`Session::agents`] and [`Session::targets`].
    pub agent: usize,
    pub target: usize,
    /// The target agent's name.
    pub peer: String,
    /// The stream's first slot in the initiator's buffer and in the target's.
    pub lbase: u64,
    pub rbase: u64,
}

/// Agents, targets and buffers of a run. Fields drop in declaration order: the agents go
/// before the buffers they registered.
pub struct Session {
    /// One initiator agent, or one per initiator of manytoone.
    pub agents: Vec<Agent>,
    /// One target, or one per target of onetomany.
    targets: Vec<Target>,
    pub streams: Vec<Stream>,
    _files: Option<FileCleanup>,
    pub lbuf: Buffer,
}

impl Session {
    /// See [`CORRUPT_ENV`]: flips the last byte of the last slot's span on the side that
    /// received the data, when that side is in this process. Runs between rows only.
    fn corrupt(&mut self, cfg: &Config, lay: &SlotLayout) {
        if !cfg.write {
            let at = ((cfg.initiator_slots() - 1) * cfg.slot_stride + lay.span - 1) as usize;
            self.lbuf.bytes_mut()[at] ^= 0xff;
        } else if let Some(Target::Loopback { buf, .. }) = self.targets.first_mut() {
            let at = ((cfg.target_slots() - 1) * cfg.slot_stride + lay.span - 1) as usize;
            buf.bytes_mut()[at] ^= 0xff;
        }
    }

    /// Ends a run with target processes: target `k` must have seen `posts[k]` notifications.
    pub fn finish(&mut self, posts: &[u64]) -> Result<(), String> {
        for (k, t) in self.targets.iter_mut().enumerate() {
            if let Target::Process { .. } = t {
                let want = posts.get(k).copied().unwrap_or(0);
                let a = t.ask(&format!("DONE {want}"))?;
                let got: Option<u64> = a.strip_prefix("NOTIFS ").and_then(|n| n.parse().ok());
                match got {
                    Some(n) if n == want => {}
                    Some(n) => {
                        return Err(format!(
                            "target {k} received {n} \"0xBEEF\" notifications for {want} transfers"
                        ))
                    }
                    None => return Err(format!("target {k} answered {a:?} to DONE")),
                }
            }
        }
        Ok(())
    }

    /// Takes (and counts) the in-process target's "0xBEEF" notifications; `None` when the
    /// target is not in this process.
    pub fn loopback_notifs(&self) -> Result<Option<u64>, String> {
        match self.targets.first() {
            Some(Target::Loopback { agent, .. }) => Ok(Some(
                agent
                    .get_notifs(&[])
                    .map_err(|e| format!("target notifications: {e}"))?
                    .iter()
                    .filter(|n| n.msg == NOTIF)
                    .count() as u64,
            )),
            _ => Ok(None),
        }
    }

    /// The target agent when it lives in this process (LOOPBACK).
    pub fn loopback_target(&self) -> Option<&Agent> {
        match self.targets.first() {
            Some(Target::Loopback { agent, .. }) => Some(agent),
            _ => None,
        }
    }

    /// Fills and verifies the (only) target: for latency mode's consistency check.
    pub fn fill_target(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        for t in &mut self.targets {
            t.fill(cfg, block, batch)?;
        }
        Ok(())
    }

    pub fn verify_target(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        for t in &mut self.targets {
            t.verify(cfg, block, batch)?;
        }
        Ok(())
    }
}

/// The name of initiator agent `i` (the first keeps the pairwise name).
fn initiator_name(i: u64) -> String {
    if i == 0 {
        "rixl-bench-initiator".to_owned()
    } else {
        format!("rixl-bench-initiator-{i}")
    }
}

/// Creates the agents, starts or reaches the target(s), registers the buffers.
pub fn open(cfg: &Config) -> Result<Session, String> {
    let lbuf = Buffer::new(cfg.initiator_bytes() as usize, 0xbb);
    let a = &cfg.args;
    let bname = cfg.backend.name();
    let mk = |name: &str, c: AgentConfig| {
        Agent::new(name, c).map_err(|e| format!("cannot create agent {name} with {bname}: {e}"))
    };
    let stream_bytes = cfg.slots * cfg.slot_stride;
    let mut _files_cleanup = None;
    let (agents, targets, streams) = match cfg.backend {
        Backend::Loopback => {
            let tbuf = Buffer::new(cfg.target_bytes() as usize, 0xaa);
            let tagent = mk("rixl-bench-target", AgentConfig::default().backend(bname))?;
            let regs = RegDescList::from_descs(
                MemType::Dram,
                vec![RegDesc::new(tbuf.addr(), tbuf.len() as u64, 0)],
            );
            // SAFETY: `tbuf` moves into `Target::Loopback` together with its agent, which is
            // declared after it there, so the agent is dropped first; the program touches the
            // buffer only between rows, when no transfer is in flight.
            unsafe { tagent.register_mem(&regs, &[]) }
                .map_err(|e| format!("cannot register the target buffer: {e}"))?;
            let agent = mk(&initiator_name(0), AgentConfig::default().backend(bname))?;
            let md = tagent
                .local_metadata()
                .map_err(|e| format!("target metadata: {e}"))?;
            let peer = agent
                .load_remote_metadata(&md)
                .map_err(|e| format!("loading the target's metadata: {e}"))?;
            let stream = Stream {
                agent: 0,
                target: 0,
                peer,
                lbase: lbuf.addr(),
                rbase: tbuf.addr(),
            };
            (
                vec![agent],
                vec![Target::Loopback {
                    agent: tagent,
                    buf: tbuf,
                }],
                vec![stream],
            )
        }
        Backend::Shm | Backend::Tcp => {
            let ntargets = if cfg.scheme == Scheme::OneToMany {
                cfg.streams
            } else {
                1
            };
            let mut targets = Vec::new();
            let mut addrs = Vec::new();
            match cfg.target_addr {
                None => {
                    // Start every target first, then wait for them: they set up in parallel.
                    let mut started = Vec::new();
                    for k in 0..ntargets {
                        started.push(spawn_target(k)?);
                    }
                    for t in started {
                        let (t, addr) = greet(cfg, t, std::net::Ipv4Addr::LOCALHOST.into())?;
                        targets.push(t);
                        addrs.push(addr);
                    }
                }
                Some(at) => {
                    let (t, addr) = connect_target(cfg, at)?;
                    targets.push(t);
                    addrs.push(addr);
                }
            }
            let nagents = if cfg.scheme == Scheme::ManyToOne {
                cfg.streams
            } else {
                1
            };
            let mut agents = Vec::new();
            // (peer name, buffer address) of every target, as the first agent sees them.
            let mut remote = Vec::new();
            for i in 0..nagents {
                let agent = mk(&initiator_name(i), AgentConfig::default().backend(bname))?;
                for (k, &addr) in addrs.iter().enumerate() {
                    let name = crate::target::target_name(k as u64);
                    let peer = agent
                        .fetch_remote_metadata_blocking(&name, addr, Duration::from_secs(30))
                        .map_err(|e| format!("fetching the target's metadata from {addr}: {e}"))?;
                    // The target needs ours too for notifications on some backends (and to
                    // answer them in latency mode). The listener acknowledges a push only once
                    // the metadata is loaded, so the target knows us when this returns.
                    agent
                        .send_local_metadata_blocking(addr, Duration::from_secs(30))
                        .map_err(|e| format!("sending metadata to the target at {addr}: {e}"))?;
                    let regions = agent
                        .remote_regions(&peer, MemType::Dram)
                        .map_err(|e| format!("the target's regions: {e}"))?;
                    let rbase = regions
                        .iter()
                        .find(|d| d.len == cfg.target_bytes())
                        .map(|d| d.addr)
                        .ok_or("the target did not publish its buffer")?;
                    agent
                        .make_connection(&peer, &[])
                        .map_err(|e| format!("connecting to the target: {e}"))?;
                    if i == 0 {
                        remote.push((peer, rbase));
                    }
                }
                agents.push(agent);
            }
            let streams = (0..cfg.streams)
                .map(|i| {
                    let (agent, target, roff) = match cfg.scheme {
                        Scheme::Pairwise => (0, 0, 0),
                        Scheme::ManyToOne => (i as usize, 0, i * stream_bytes),
                        Scheme::OneToMany => (0, i as usize, 0),
                    };
                    let (peer, rbase) = &remote[target];
                    Stream {
                        agent,
                        target,
                        peer: peer.clone(),
                        lbase: lbuf.addr() + i * stream_bytes,
                        rbase: rbase + roff,
                    }
                })
                .collect();
            (agents, targets, streams)
        }
        Backend::Posix => {
            let mut params = rixl::Params::new();
            params.insert("engine".into(), "auto".into());
            let agent = mk(
                &initiator_name(0),
                AgentConfig::default().backend_with(bname, params),
            )?;
            let mut paths = Vec::new();
            for f in 0..a.num_files {
                paths.push(
                    cfg.filepath
                        .join(format!("rixl-bench-{}-{f}.dat", std::process::id())),
                );
            }
            _files_cleanup = Some(FileCleanup(paths.clone()));
            // Every file holds the whole layout, pre-filled with 0xaa (READs need data there).
            let size = cfg.target_bytes() as usize;
            let chunk = vec![0xaau8; (1 << 20).min(size)];
            for p in &paths {
                let mut f = std::fs::File::create(p)
                    .map_err(|e| format!("--filepath: cannot create {}: {e}", p.display()))?;
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len());
                    f.write_all(&chunk[..n])
                        .map_err(|e| format!("--filepath: writing {}: {e}", p.display()))?;
                    left -= n;
                }
                f.sync_all().ok();
            }
            let mode = if a.storage_enable_direct {
                "rw,direct"
            } else {
                "rw"
            };
            let regs = RegDescList::from_descs(
                MemType::File,
                paths
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        RegDesc::with_meta(0, 0, i as u64 + 1, format!("{mode}:{}", p.display()))
                    })
                    .collect(),
            );
            // SAFETY: storage registrations address file offsets, not memory.
            unsafe { agent.register_mem(&regs, &[]) }
                .map_err(|e| format!("registering the files: {e}"))?;
            let stream = Stream {
                agent: 0,
                target: 0,
                peer: agent.name().to_owned(),
                lbase: lbuf.addr(),
                rbase: 0,
            };
            (vec![agent], vec![Target::Files { paths }], vec![stream])
        }
    };
    if !a.reregister_mem {
        // Each agent registers the slots of its own streams.
        for (i, agent) in agents.iter().enumerate() {
            let (base, len) = if agents.len() > 1 {
                (lbuf.addr() + i as u64 * stream_bytes, stream_bytes)
            } else {
                (lbuf.addr(), lbuf.len() as u64)
            };
            let regs = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(base, len, 0)]);
            // SAFETY: `lbuf` moves into the session, whose field order drops the agents first;
            // the program touches it only between rows, when no transfer is in flight.
            unsafe { agent.register_mem(&regs, &[]) }
                .map_err(|e| format!("cannot register the initiator buffer: {e}"))?;
        }
    }

    Ok(Session {
        agents,
        targets,
        streams,
        _files: _files_cleanup,
        lbuf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_offsets_never_touch_and_are_shuffled() {
        for batch in [1u64, 2, 3, 16, 128] {
            for remote in [false, true] {
                let mut o = desc_offsets(true, 4096, batch, remote);
                o.sort_unstable();
                // Every other block position, each once: a one-block hole after each.
                assert_eq!(o, (0..batch).map(|j| 2 * j * 4096).collect::<Vec<_>>());
            }
        }
        let l = desc_offsets(true, 1, 128, false);
        let r = desc_offsets(true, 1, 128, true);
        assert_ne!(l, r, "each side has its own shuffle");
        assert!(l.windows(2).any(|w| w[0] > w[1]), "not in address order");
        assert_eq!(desc_offsets(true, 1, 128, false), l, "deterministic");
        assert_eq!(desc_offsets(false, 10, 3, true), [0, 10, 20]);
    }

    #[test]
    fn slots_are_filled_and_checked_with_their_holes() {
        // Slots of 10 bytes; descriptors of 2 bytes at 0 and 4; span 8.
        let lay = SlotLayout {
            stride: 10,
            block: 2,
            sorted: vec![0, 4],
            span: 8,
        };
        let mut b = vec![0u8; 40];
        lay.fill(&mut b, 4, 0xaa);
        assert_eq!(b.iter().filter(|&&x| x == 0xaa).count(), 32);
        for s in 0..4 {
            for o in [0, 1, 4, 5] {
                b[s * 10 + o] = 0xbb;
            }
        }
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), None);
        b[23] = 0xbb; // in a hole of slot 2: a write that landed at the wrong offset
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), Some((23, 0xbb)));
        b[23] = 0xaa;
        b[35] = 7;
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), Some((35, 7)));
        // Bytes past the span, and slots not asked for, are not looked at.
        b[35] = 0xbb;
        b[38] = 1;
        assert_eq!(lay.mismatch(&b, 4, 0xbb, 0xaa), None);
        b[5] = 0;
        assert_eq!(lay.mismatch(&b[10..], 3, 0xbb, 0xaa), None);
        let buf = Buffer::new(5000, 1);
        assert_eq!(buf.addr() % 4096, 0);
        assert_eq!(buf.bytes().len(), 5000);
    }
}
