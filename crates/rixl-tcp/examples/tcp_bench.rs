//! Two-process TCP benchmark: RIXL's `TCP` backend against a plain Rust socket loop on the same
//! path (loopback by default).
//!
//! `cargo run --release -p rixl-tcp --example tcp_bench [-- --quick] [-- --connections N]
//! [-- --only bw|lat] [-- --rows WRITE/16/1048576,READ/1/65536,KV] [-- --rounds N]
//! [-- --case wait|status|notif|raw|spin]`
//!
//! Backend parameters can also be set with `RIXL_TCP_BENCH_PARAMS=key=value,key=value`.
//! Across hosts: `RIXL_TCP_BENCH_NETNS=<namespace>` starts the target process in that network
//! namespace and `RIXL_TCP_BENCH_ADDR=<its address>` is where the initiator reaches it
//! (`crates/rixl-tcp/bench/netns_compare.sh` sets up both, with NIXL alongside).
//!
//! The program re-executes itself as the target process, which registers a 256 MiB buffer with
//! a `TCP` agent (metadata exchanged through the agents' listeners), answers every notification
//! it receives with the same message, and also runs a plain socket server. Figures:
//!
//! - bandwidth of WRITE and READ requests of one descriptor and of 16 descriptors (not
//!   contiguous, so the agent cannot merge them) of 64 KiB .. 16 MiB each, posted and waited for
//!   back to back for about 0.5 s (GB/s, decimal), next to the plain socket loop doing the same
//!   (16 blocks written, then 16 acks read; or 16 requests sent, then 16 blocks read);
//! - post-to-complete latency of a 4 KiB WRITE (the completion needs the target's ack, so this
//!   is one round trip) with `wait()` and with `status()` polling, median and 99th percentile;
//! - the round trip of a 64 B WRITE carrying a notification, answered by the target with a
//!   notification (post, wait for the request to complete, then for the answer, as
//!   `rixl-bench --latency xfer` does; both sides wait with `wait_notif`);
//! - the floors of the path, measured in the same run: a plain blocking socket doing the same
//!   exchange (write a block, read a 1-byte ack; or send a 17-byte request and read the block;
//!   one connection, `TCP_NODELAY`, buffers received straight into place, the blocks of one
//!   request at distinct places on both sides as RIXL's descriptors are), and the same
//!   exchange with both ends spin-polling non-blocking sockets (no thread ever sleeps: the
//!   fastest the kernel's TCP path can go here).
//!
//! Each bandwidth row ends with the cores both processes used (RIXL/plain loop), the CPU ns per
//! KiB moved, and `stolen`: cores' worth of time the hypervisor gave to other guests during the
//! row (rows with a visible share are not this machine's figures).
//!
//! `--rounds N` repeats the latency section N times and prints each round (interleaved A/B runs
//! on a shared machine need several samples).

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, MemType, Params, RegDesc, RegDescList, XferDescList, XferOp,
    XferOptions,
};

const ROLE_ENV: &str = "RIXL_TCP_BENCH_ROLE";
const BUF: usize = 256 << 20;
const BLOCKS: [usize; 5] = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];
/// Descriptors per request in the batched rows.
const BATCH: usize = 16;

fn main() -> rixl::Result<()> {
    if std::env::var(ROLE_ENV).as_deref() == Ok("target") {
        return target();
    }
    initiator()
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn params() -> Params {
    let mut p = Params::new();
    if let Some(c) = arg("--connections") {
        p.insert("connections".into(), c);
    }
    if let Ok(c) = std::env::var("RIXL_TCP_BENCH_CONNECTIONS") {
        p.insert("connections".into(), c);
    }
    // Any backend parameter: RIXL_TCP_BENCH_PARAMS=chunk_bytes=4194304,stripe_min_bytes=0
    for kv in std::env::var("RIXL_TCP_BENCH_PARAMS")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((k, v)) = kv.split_once('=') {
            p.insert(k.trim().into(), v.trim().into());
        }
    }
    p
}

fn register(agent: &Agent, buf: &mut [u8]) -> rixl::Result<()> {
    let regs = RegDescList::from_descs(
        MemType::Dram,
        vec![RegDesc::new(buf.as_mut_ptr() as u64, buf.len() as u64, 0)],
    );
    // SAFETY: the buffer lives until the process exits, after the agent is dropped.
    unsafe { agent.register_mem(&regs, &[]) }
}

/// Reads exactly `buf`, spinning on a non-blocking socket; after 2 ms without data it sleeps
/// in `poll` instead (so that an idle spin server does not take a core from the other
/// measurements).
fn spin_read(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut got = 0;
    let mut idle = Instant::now();
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                got += n;
                idle = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if idle.elapsed() > Duration::from_millis(2) {
                    let mut pfd = libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for a socket we own.
                    unsafe { libc::poll(&mut pfd, 1, -1) };
                    idle = Instant::now();
                } else {
                    std::hint::spin_loop();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf`, spinning on a non-blocking socket.
fn spin_write(s: &mut TcpStream, buf: &[u8]) -> std::io::Result<()> {
    let mut put = 0;
    while put < buf.len() {
        match s.write(&buf[put..]) {
            Ok(n) => put += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes of a plain-socket request header: op, length, offset.
const RAW_HDR: usize = 17;

/// The plain socket server: requests are 1 byte op + 8 bytes length + 8 bytes offset; `W` is
/// followed by the data, received at that offset of the server's buffer, and answered with one
/// byte; `R` is answered with the data at that offset. (Blocks of one request land at distinct
/// offsets, as RIXL's descriptors do: receiving every block into one small scratch area would
/// keep the destination in cache and flatter the loop.) `S` switches the connection to
/// spin-polling (non-blocking socket, never sleeps, until 2 ms without requests).
fn raw_server(mut s: TcpStream) {
    s.set_nodelay(true).ok();
    let mut space: Vec<u8> = Vec::new();
    let mut hdr = [0u8; RAW_HDR];
    let mut spin = false;
    loop {
        let r = if spin {
            spin_read(&mut s, &mut hdr)
        } else {
            s.read_exact(&mut hdr)
        };
        if r.is_err() {
            return;
        }
        let len = (u64::from_le_bytes(hdr[1..9].try_into().unwrap()) as usize).min(BUF);
        let off = (u64::from_le_bytes(hdr[9..17].try_into().unwrap()) as usize).min(BUF - len);
        if space.len() < off + len {
            space.resize(off + len, 3);
        }
        let at = &mut space[off..off + len];
        let ok = match (hdr[0], spin) {
            (b'S', _) => {
                spin = true;
                s.set_nonblocking(true)
            }
            (b'W', false) => s.read_exact(at).and_then(|_| s.write_all(b"k")),
            (b'W', true) => spin_read(&mut s, at).and_then(|_| spin_write(&mut s, b"k")),
            (_, false) => s.write_all(at),
            (_, true) => spin_write(&mut s, at),
        };
        if ok.is_err() {
            return;
        }
    }
}

/// A plain-socket request header.
fn raw_hdr(op: XferOp, len: usize, off: usize) -> [u8; RAW_HDR] {
    let mut hdr = [0u8; RAW_HDR];
    hdr[0] = if op == XferOp::Write { b'W' } else { b'R' };
    hdr[1..9].copy_from_slice(&(len as u64).to_le_bytes());
    hdr[9..17].copy_from_slice(&(off as u64).to_le_bytes());
    hdr
}

fn target() -> rixl::Result<()> {
    let mut buf = vec![1u8; BUF];
    let agent = Arc::new(Agent::new(
        "tcp-bench-target",
        AgentConfig::default()
            .backend_with("TCP", params())
            .listen_on(0),
    )?);
    register(&agent, &mut buf)?;
    let raw = TcpListener::bind((target_ip(), 0)).expect("raw listener");
    println!(
        "LISTEN {} {}",
        agent.listen_addr().expect("listener").port(),
        raw.local_addr().expect("raw addr").port()
    );
    std::io::stdout().flush().ok();
    std::thread::spawn(move || {
        for s in raw.incoming() {
            let Ok(s) = s else { return };
            std::thread::spawn(move || raw_server(s));
        }
    });
    // Answer every notification with the same message.
    let stop = Arc::new(AtomicBool::new(false));
    let (a2, stop2) = (agent.clone(), stop.clone());
    let answerer = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            if !a2.wait_notif(Duration::from_millis(100)) {
                continue;
            }
            for n in a2.get_notifs(&[]).unwrap_or_default() {
                if let Err(e) = a2.send_notif(&n.from, &n.msg, None) {
                    eprintln!("target: answering a notification failed: {e}");
                }
            }
        }
    });
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
    stop.store(true, Ordering::Relaxed);
    let _ = answerer.join();
    Ok(())
}

/// CPU time (ns, all threads, exact: from the scheduler's accounting) of process `pid`.
fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let st = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            total += st
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Clock ticks per second of `/proc/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// Time the hypervisor ran something else on this machine's CPUs (`/proc/stat` steal ticks,
/// all CPUs): rows measured while it grows are not this code's figures.
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next()?.split_whitespace().nth(8)?.parse().ok())
        .unwrap_or(0)
}

/// CPU ns of both processes (tasks that ended meanwhile are not counted).
fn cpu_both(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ns(*p)).sum()
}

fn measure(req: &rixl::XferRequest, secs: f64) -> rixl::Result<f64> {
    for _ in 0..3 {
        req.post()?;
        req.wait(Some(Duration::from_secs(30)))?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs || n < 5 {
        req.post()?;
        req.wait(Some(Duration::from_secs(30)))?;
        n += 1;
    }
    Ok(n as f64 * req.total_bytes() as f64 / start.elapsed().as_secs_f64())
}

/// One plain-socket request of `count` blocks of `block` bytes each.
fn raw_once(s: &mut TcpStream, op: XferOp, buf: &mut [u8], block: usize, count: usize) {
    if op == XferOp::Write {
        for i in 0..count {
            s.write_all(&raw_hdr(op, block, i * block)).unwrap();
            s.write_all(&buf[i * block..(i + 1) * block]).unwrap();
        }
        let mut k = [0u8; BATCH];
        s.read_exact(&mut k[..count]).unwrap();
    } else {
        for i in 0..count {
            s.write_all(&raw_hdr(op, block, i * block)).unwrap();
        }
        for i in 0..count {
            s.read_exact(&mut buf[i * block..(i + 1) * block]).unwrap();
        }
    }
}

/// The same in spin-polling mode (non-blocking socket, 1 block).
fn raw_spin_once(s: &mut TcpStream, op: XferOp, buf: &mut [u8]) {
    spin_write(s, &raw_hdr(op, buf.len(), 0)).unwrap();
    if op == XferOp::Write {
        spin_write(s, buf).unwrap();
        let mut k = [0u8; 1];
        spin_read(s, &mut k).unwrap();
    } else {
        spin_read(s, buf).unwrap();
    }
}

fn raw_measure(
    s: &mut TcpStream,
    op: XferOp,
    buf: &mut [u8],
    block: usize,
    count: usize,
    secs: f64,
) -> f64 {
    for _ in 0..3 {
        raw_once(s, op, buf, block, count);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs || n < 5 {
        raw_once(s, op, buf, block, count);
        n += 1;
    }
    (n * (block * count) as u64) as f64 / start.elapsed().as_secs_f64()
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Times `n` runs of `f` after 50 warm-up runs; (p50, p99).
fn timed(n: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let t = Instant::now();
        f();
        if i >= 50 {
            v.push(t.elapsed());
        }
    }
    percentiles(v)
}

/// Context switches (all threads) and CPU time (user + system, clock ticks) of process `pid`.
fn usage(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for l in st.lines() {
                if l.contains("ctxt_switches:") {
                    switches += l
                        .split_whitespace()
                        .last()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime and stime are 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    (switches, ticks)
}

/// Per-thread context switches of process `pid`: (tid, name) -> (voluntary, involuntary).
fn thread_switches(pid: u32) -> std::collections::BTreeMap<(String, String), (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let field = |k: &str| {
                st.lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().last())
                    .unwrap_or("0")
                    .to_owned()
            };
            let tid = t.file_name().to_string_lossy().into_owned();
            out.insert(
                (format!("{pid}"), format!("{tid}:{}", field("Name:"))),
                (
                    field("voluntary_ctxt_switches:").parse().unwrap_or(0),
                    field("nonvoluntary_ctxt_switches:").parse().unwrap_or(0),
                ),
            );
        }
    }
    out
}

/// What both processes spent on a measured section: context switches and CPU microseconds per
/// operation (one clock tick is 10 ms here, so only long sections give meaningful CPU figures).
struct Usage(Vec<u32>, Vec<(u64, u64)>);

impl Usage {
    fn start(pids: &[u32]) -> Usage {
        Usage(pids.to_vec(), pids.iter().map(|p| usage(*p)).collect())
    }

    fn per_op(&self, ops: usize) -> String {
        let (mut cs, mut ticks) = (0, 0);
        for (p, (c0, t0)) in self.0.iter().zip(&self.1) {
            let (c1, t1) = usage(*p);
            cs += c1.saturating_sub(*c0);
            ticks += t1.saturating_sub(*t0);
        }
        let hz = 100.0;
        format!(
            "{:.2} context switches/op, {:.1} us CPU/op",
            cs as f64 / ops as f64,
            ticks as f64 / hz * 1e6 / ops as f64
        )
    }
}

/// Where the target process is reached: loopback unless `RIXL_TCP_BENCH_ADDR` says otherwise.
fn target_ip() -> std::net::IpAddr {
    std::env::var("RIXL_TCP_BENCH_ADDR")
        .ok()
        .map(|a| a.parse().expect("RIXL_TCP_BENCH_ADDR is an IP address"))
        .unwrap_or([127, 0, 0, 1].into())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn initiator() -> rixl::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let only = arg("--only");
    let rounds: usize = arg("--rounds").and_then(|r| r.parse().ok()).unwrap_or(1);
    let secs = if quick { 0.2 } else { 0.5 };
    let exe = std::env::current_exe().expect("own executable");
    // In another network namespace if asked: `ip netns exec <ns> <this program> ...`.
    let mut target_cmd = match std::env::var("RIXL_TCP_BENCH_NETNS") {
        Ok(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns]).arg(exe);
            c
        }
        Err(_) => Command::new(exe),
    };
    let mut child = ChildGuard(
        target_cmd
            .args(std::env::args().skip(1))
            .env(ROLE_ENV, "target")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the target process"),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ports");
    let ports: Vec<u16> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.parse().ok())
        .collect();
    let addr = SocketAddr::new(target_ip(), ports[0]);
    println!("target at {}", addr.ip());
    let mut buf = vec![2u8; BUF];
    let agent = Agent::new(
        "tcp-bench-initiator",
        AgentConfig::default().backend_with("TCP", params()),
    )?;
    register(&agent, &mut buf)?;
    println!("TCP params: {:?}", agent.backend_params("TCP")?);
    let peer =
        agent.fetch_remote_metadata_blocking("tcp-bench-target", addr, Duration::from_secs(10))?;
    // The target answers notifications, so it needs our metadata too.
    agent.send_local_metadata_blocking(addr, Duration::from_secs(10))?;
    let rbase = agent.remote_regions(&peer, MemType::Dram)?[0].addr;
    let lbase = buf.as_ptr() as u64;
    let mut raw = TcpStream::connect((addr.ip(), ports[1])).expect("raw connect");
    raw.set_nodelay(true).ok();
    let one = |base: u64, len: usize| {
        XferDescList::from_descs(MemType::Dram, vec![Desc::new(base, len as u64, 0)])
    };
    // 16 blocks; the target side in reverse order so that no two neighbours can be merged.
    let many = |base: u64, len: usize, reverse: bool| {
        XferDescList::from_descs(
            MemType::Dram,
            (0..BATCH)
                .map(|i| {
                    let k = if reverse { BATCH - 1 - i } else { i };
                    Desc::new(base + (k * len) as u64, len as u64, 0)
                })
                .collect(),
        )
    };
    let mut rawbuf = vec![5u8; BUF];
    if only.as_deref() != Some("lat") && arg("--case").is_none() {
        println!("load {}", load());
        println!(
            "{:<6} {:>5} {:>9} {:>10} {:>14} {:>7}",
            "op", "descs", "block", "RIXL GB/s", "raw sock GB/s", "ratio"
        );
        for count in [1, BATCH] {
            for op in [XferOp::Write, XferOp::Read] {
                for block in BLOCKS {
                    if block * count > BUF {
                        continue;
                    }
                    // `--rows WRITE/16/1048576,READ/1/65536`: only those rows.
                    let row = format!("{}/{count}/{block}", op.name());
                    if arg("--rows").is_some_and(|r| !r.split(',').any(|x| x == row)) {
                        continue;
                    }
                    let (l, r) = if count == 1 {
                        (one(lbase, block), one(rbase, block))
                    } else {
                        (many(lbase, block, false), many(rbase, block, true))
                    };
                    let req = agent.create_xfer_req(op, &l, &r, &peer, &XferOptions::default())?;
                    let pids = [std::process::id(), child.0.id()];
                    let s0 = steal_ticks();
                    let c0 = cpu_both(&pids);
                    let t0 = Instant::now();
                    let bw = measure(&req, secs)?;
                    // CPU seconds (both processes) per second of transfer: how much of the
                    // 2 cores the transfer used, and ns of CPU per KiB moved.
                    let (cpu, el) = ((cpu_both(&pids) - c0) as f64, t0.elapsed().as_secs_f64());
                    let c1 = cpu_both(&pids);
                    let t1 = Instant::now();
                    let rbw = raw_measure(&mut raw, op, &mut rawbuf, block, count, secs);
                    let (rcpu, rel) = ((cpu_both(&pids) - c1) as f64, t1.elapsed().as_secs_f64());
                    let stolen = (steal_ticks() - s0) as f64 / TICKS_PER_SEC / (el + rel);
                    println!(
                        "{:<6} {:>5} {:>9} {:>10.2} {:>14.2} {:>7.2}   cores {:.2}/{:.2}, CPU ns/KiB {:.0}/{:.0}, stolen {:.2}",
                        op.name(),
                        count,
                        block,
                        bw / 1e9,
                        rbw / 1e9,
                        bw / rbw,
                        cpu / 1e9 / el,
                        rcpu / 1e9 / rel,
                        cpu / (bw * el / 1024.0),
                        rcpu / (rbw * rel / 1024.0),
                        stolen,
                    );
                }
            }
        }
        // KV-cache shaped: 8192 random 16 KiB pages out of 16384 on both sides (128 MiB per post).
        const PAGE: u64 = 16 << 10;
        let kv = arg("--rows").is_none_or(|r| r.split(',').any(|x| x == "KV"));
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut shuffled = || {
            let mut v: Vec<usize> = (0..16384).collect();
            for i in (1..v.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                v.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            v
        };
        let (src, dst) = (shuffled(), shuffled());
        let pages = |base: u64| {
            XferDescList::from_descs(
                MemType::Dram,
                (0..16384u64)
                    .map(|i| Desc::new(base + i * PAGE, PAGE, 0))
                    .collect(),
            )
        };
        let lp = agent.prep_xfer_dlist("", &pages(lbase), &[])?;
        let rp = agent.prep_xfer_dlist(&peer, &pages(rbase), &[])?;
        for op in [XferOp::Write, XferOp::Read].into_iter().filter(|_| kv) {
            let req = agent.make_xfer_req(
                op,
                &lp,
                &src[..8192],
                &rp,
                &dst[..8192],
                &XferOptions::default(),
            )?;
            println!(
                "KV 8192 x 16 KiB random of 16384, {}: {:.2} GB/s",
                op.name(),
                measure(&req, secs)? / 1e9
            );
        }
        println!("load {}", load());
    }
    if only.as_deref() == Some("bw") {
        return Ok(());
    }
    let n = if quick { 1000 } else { 5000 };
    let req = agent.create_xfer_req(
        XferOp::Write,
        &one(lbase, 4096),
        &one(rbase, 4096),
        &peer,
        &XferOptions::default(),
    )?;
    let small = agent.create_xfer_req(
        XferOp::Write,
        &one(lbase, 64),
        &one(rbase, 64),
        &peer,
        &XferOptions::default(),
    )?;
    let mut spin = TcpStream::connect((addr.ip(), ports[1])).expect("raw connect");
    spin.set_nodelay(true).ok();
    let mut on = [0u8; RAW_HDR];
    on[0] = b'S';
    spin.write_all(&on).expect("spin mode");
    spin.set_nonblocking(true).expect("non-blocking");
    let answer = |msg: &[u8]| -> rixl::Result<()> {
        loop {
            if !agent.wait_notif(Duration::from_secs(10)) {
                return Err(rixl::Error::timeout("no answer from the target"));
            }
            if agent
                .get_notifs(&[])?
                .iter()
                .any(|n| n.from == peer && n.msg == msg)
            {
                return Ok(());
            }
        }
    };
    if let Some(case) = arg("--case") {
        // One measure only (for `perf stat` and the like): wait | status | notif | raw | spin.
        let msg = b"ping-0123456789";
        let n = n * 4;
        let pids = [std::process::id(), child.0.id()];
        let u = Usage::start(&pids);
        let detail = std::env::var_os("RIXL_TCP_BENCH_THREADS").is_some();
        let before: Vec<_> = pids.iter().map(|p| thread_switches(*p)).collect();
        let t0 = Instant::now();
        let (p50, p99) = timed(n, || match case.as_str() {
            "wait" => {
                req.post().unwrap();
                req.wait(Some(Duration::from_secs(10))).unwrap();
            }
            "status" => {
                req.post().unwrap();
                while req.status().unwrap() != rixl::XferStatus::Done {
                    std::hint::spin_loop();
                }
            }
            "notif" => {
                small.post_with_notif(msg).unwrap();
                small.wait(Some(Duration::from_secs(10))).unwrap();
                answer(msg).unwrap();
            }
            "raw" => raw_once(&mut raw, XferOp::Write, &mut rawbuf, 4096, 1),
            _ => raw_spin_once(&mut spin, XferOp::Write, &mut rawbuf[..4096]),
        });
        if detail {
            for (p, b) in pids.iter().zip(&before) {
                for (k, (v1, n1)) in thread_switches(*p) {
                    let (v0, n0) = b.get(&k).copied().unwrap_or((0, 0));
                    let (dv, dn) = (v1 - v0, n1 - n0);
                    if dv + dn > (n / 100) as u64 {
                        println!(
                            "  {} {}: {:.2} voluntary, {:.2} involuntary switches/op",
                            k.0,
                            k.1,
                            dv as f64 / n as f64,
                            dn as f64 / n as f64
                        );
                    }
                }
            }
        }
        println!(
            "{case}: p50 {:.1} us p99 {:.1} us mean {:.1} us ({n} runs; {}; load {})",
            us(p50),
            us(p99),
            us(t0.elapsed()) / (n + 50) as f64,
            u.per_op(n + 50),
            load()
        );
        return Ok(());
    }
    for round in 0..rounds {
        let l0 = load();
        let (p50, p99) = timed(n, || {
            req.post().unwrap();
            req.wait(Some(Duration::from_secs(10))).unwrap();
        });
        // The same, polling `status()` like NIXL programs poll `check_xfer_state`.
        let (q50, q99) = timed(n, || {
            req.post().unwrap();
            while req.status().unwrap() != rixl::XferStatus::Done {
                std::hint::spin_loop();
            }
        });
        let (r50, r99) = timed(n, || {
            raw_once(&mut raw, XferOp::Write, &mut rawbuf, 4096, 1);
        });
        let (s50, s99) = timed(n, || {
            raw_spin_once(&mut spin, XferOp::Write, &mut rawbuf[..4096]);
        });
        let msg = b"ping-0123456789";
        let mut failed = None;
        let (n50, n99) = timed(n / 2, || {
            if failed.is_some() {
                return;
            }
            let r = small
                .post_with_notif(msg)
                .and_then(|_| small.wait(Some(Duration::from_secs(10))))
                .and_then(|_| answer(msg));
            if let Err(e) = r {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let (b50, b99) = timed(n, || {
            raw_once(&mut raw, XferOp::Write, &mut rawbuf, 64, 1);
        });
        let (c50, c99) = timed(n, || {
            raw_spin_once(&mut spin, XferOp::Write, &mut rawbuf[..64]);
        });
        println!(
            "round {round} (load {l0} -> {}), p50/p99 us:\n  4 KiB WRITE post-to-complete: RIXL wait() \
             {:.1}/{:.1}; RIXL status() polling {:.1}/{:.1}; raw blocking socket {:.1}/{:.1}; raw \
             spin-polled socket {:.1}/{:.1}\n  64 B WRITE + notification, answered by a \
             notification: RIXL {:.1}/{:.1}; raw 64 B write + 1 B answer: blocking {:.1}/{:.1}, \
             spin-polled {:.1}/{:.1}",
            load(),
            us(p50),
            us(p99),
            us(q50),
            us(q99),
            us(r50),
            us(r99),
            us(s50),
            us(s99),
            us(n50),
            us(n99),
            us(b50),
            us(b99),
            us(c50),
            us(c99),
        );
    }
    // Idle: both agents connected, nothing posted. Their threads must sleep.
    let pids = [std::process::id(), child.0.id()];
    std::thread::sleep(Duration::from_millis(100));
    let idle = if quick { 1.0 } else { 3.0 };
    let before: Vec<(u64, u64)> = pids.iter().map(|p| usage(*p)).collect();
    std::thread::sleep(Duration::from_secs_f64(idle));
    let (mut cs, mut ticks) = (0, 0);
    for (p, (c0, t0)) in pids.iter().zip(before) {
        let (c1, t1) = usage(*p);
        cs += c1 - c0;
        ticks += t1 - t0;
    }
    println!(
        "idle for {idle} s after the runs: {:.1}% of a core, {} context switches (both processes)",
        ticks as f64 / (idle * 100.0) * 100.0,
        cs
    );
    drop(child.0.stdin.take());
    let _ = child.0.wait();
    Ok(())
}

/// Reaps the target process however the benchmark ends (closing its stdin ends it).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}
