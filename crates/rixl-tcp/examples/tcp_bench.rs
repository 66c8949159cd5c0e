//! Two-process TCP benchmark: RIXL's `TCP` backend against a plain Rust socket loop on the same
//! path (loopback by default).
//!
//! `cargo run --release -p rixl-tcp --example tcp_bench [-- --quick] [-- --connections N]`
//!
//! The program re-executes itself as the target process, which registers a 256 MiB buffer with
//! a `TCP` agent (metadata fetched through the agent's listener) and also runs a plain socket
//! server. Figures:
//!
//! - bandwidth of one-descriptor WRITE and READ requests of 64 KiB .. 16 MiB, each posted and
//!   waited for back to back for about 0.5 s (GB/s, decimal);
//! - post-to-complete latency of a 4 KiB WRITE (the completion needs the target's ack, so this
//!   is one round trip), median and 99th percentile of 2000 posts;
//! - the same through a plain blocking socket: write a block and read a 1-byte ack (WRITE), or
//!   send an 8-byte request and read the block (READ), one connection, `TCP_NODELAY`, no
//!   striping, buffers received straight into place.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, MemType, Params, RegDesc, RegDescList, XferDescList, XferOp,
    XferOptions,
};

const ROLE_ENV: &str = "RIXL_TCP_BENCH_ROLE";
const BUF: usize = 256 << 20;
const BLOCKS: [usize; 5] = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];

fn main() -> rixl::Result<()> {
    if std::env::var(ROLE_ENV).as_deref() == Ok("target") {
        return target();
    }
    initiator()
}

fn params() -> Params {
    let mut p = Params::new();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--connections") {
        p.insert("connections".into(), args[i + 1].clone());
    }
    if let Ok(c) = std::env::var("RIXL_TCP_BENCH_CONNECTIONS") {
        p.insert("connections".into(), c);
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

fn target() -> rixl::Result<()> {
    let mut buf = vec![1u8; BUF];
    let agent = Agent::new(
        "tcp-bench-target",
        AgentConfig::default()
            .backend_with("TCP", params())
            .listen_on(0),
    )?;
    register(&agent, &mut buf)?;
    let raw = TcpListener::bind("127.0.0.1:0").expect("raw listener");
    println!(
        "LISTEN {} {}",
        agent.listen_addr().expect("listener").port(),
        raw.local_addr().expect("raw addr").port()
    );
    std::io::stdout().flush().ok();
    std::thread::spawn(move || {
        let mut scratch = vec![3u8; 16 << 20];
        for s in raw.incoming() {
            let Ok(mut s) = s else { return };
            s.set_nodelay(true).ok();
            // Requests: 1 byte op ('W'/'R') + 8 bytes length; W is followed by the data.
            let mut hdr = [0u8; 9];
            while s.read_exact(&mut hdr).is_ok() {
                let len = u64::from_le_bytes(hdr[1..9].try_into().unwrap()) as usize;
                let ok = match hdr[0] {
                    b'W' => s
                        .read_exact(&mut scratch[..len])
                        .and_then(|_| s.write_all(b"k")),
                    _ => s.write_all(&scratch[..len]),
                };
                if ok.is_err() {
                    break;
                }
            }
        }
    });
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
    Ok(())
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

fn raw_once(s: &mut TcpStream, op: XferOp, buf: &mut [u8]) {
    let mut hdr = [0u8; 9];
    hdr[0] = if op == XferOp::Write { b'W' } else { b'R' };
    hdr[1..].copy_from_slice(&(buf.len() as u64).to_le_bytes());
    s.write_all(&hdr).unwrap();
    if op == XferOp::Write {
        s.write_all(buf).unwrap();
        let mut k = [0u8; 1];
        s.read_exact(&mut k).unwrap();
    } else {
        s.read_exact(buf).unwrap();
    }
}

fn raw_measure(s: &mut TcpStream, op: XferOp, buf: &mut [u8], secs: f64) -> f64 {
    for _ in 0..3 {
        raw_once(s, op, buf);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs || n < 5 {
        raw_once(s, op, buf);
        n += 1;
    }
    n as f64 * buf.len() as f64 / start.elapsed().as_secs_f64()
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn initiator() -> rixl::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 0.2 } else { 0.5 };
    let exe = std::env::current_exe().expect("own executable");
    let mut child = ChildGuard(
        Command::new(exe)
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
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let mut buf = vec![2u8; BUF];
    let agent = Agent::new(
        "tcp-bench-initiator",
        AgentConfig::default().backend_with("TCP", params()),
    )?;
    register(&agent, &mut buf)?;
    println!("TCP params: {:?}", agent.backend_params("TCP")?);
    let peer =
        agent.fetch_remote_metadata_blocking("tcp-bench-target", addr, Duration::from_secs(10))?;
    let rbase = agent.remote_regions(&peer, MemType::Dram)?[0].addr;
    let lbase = buf.as_ptr() as u64;
    let mut raw = TcpStream::connect(("127.0.0.1", ports[1])).expect("raw connect");
    raw.set_nodelay(true).ok();
    let one = |base: u64, len: usize| {
        XferDescList::from_descs(MemType::Dram, vec![Desc::new(base, len as u64, 0)])
    };
    println!(
        "{:<6} {:>9} {:>12} {:>14}",
        "op", "block", "RIXL GB/s", "raw sock GB/s"
    );
    let mut rawbuf = vec![5u8; 16 << 20];
    for op in [XferOp::Write, XferOp::Read] {
        for block in BLOCKS {
            let req = agent.create_xfer_req(
                op,
                &one(lbase, block),
                &one(rbase, block),
                &peer,
                &XferOptions::default(),
            )?;
            let bw = measure(&req, secs)?;
            let rbw = raw_measure(&mut raw, op, &mut rawbuf[..block], secs);
            println!(
                "{:<6} {:>9} {:>12.2} {:>14.2}",
                op.name(),
                block,
                bw / 1e9,
                rbw / 1e9
            );
        }
    }
    // KV-cache shaped: 8192 random 16 KiB pages out of 16384 on both sides (128 MiB per post).
    const PAGE: u64 = 16 << 10;
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
    for op in [XferOp::Write, XferOp::Read] {
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
    // 4 KiB post-to-complete latency.
    let n = if quick { 500 } else { 2000 };
    let req = agent.create_xfer_req(
        XferOp::Write,
        &one(lbase, 4096),
        &one(rbase, 4096),
        &peer,
        &XferOptions::default(),
    )?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let t = Instant::now();
        req.post()?;
        req.wait(Some(Duration::from_secs(10)))?;
        if i >= 50 {
            lat.push(t.elapsed());
        }
    }
    let (p50, p99) = percentiles(lat);
    // The same, polling `status()` like NIXL programs poll `check_xfer_state`.
    let mut polled = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let t = Instant::now();
        req.post()?;
        while req.status()? != rixl::XferStatus::Done {
            std::hint::spin_loop();
        }
        if i >= 50 {
            polled.push(t.elapsed());
        }
    }
    let (q50, q99) = percentiles(polled);
    let mut rl = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let t = Instant::now();
        raw_once(&mut raw, XferOp::Write, &mut rawbuf[..4096]);
        if i >= 50 {
            rl.push(t.elapsed());
        }
    }
    let (r50, r99) = percentiles(rl);
    println!(
        "4 KiB WRITE post-to-complete: RIXL wait() p50 {p50:?} p99 {p99:?}; RIXL status() polling \
         p50 {q50:?} p99 {q99:?}; raw socket p50 {r50:?} p99 {r99:?}"
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
