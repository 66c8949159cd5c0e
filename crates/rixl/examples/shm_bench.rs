//! Two-process SHM bandwidth grid, the workload of issue 7's targets, for side-by-side runs
//! with `bench/nixl_shm_compare.py` (the same grid through NIXL 1.5.1 over UCX).
//!
//! `cargo run --release -p rixl --example shm_bench [-- --quick] [--param key=value ...]`
//!
//! The program re-executes itself as the target process, which registers one large buffer and
//! publishes its metadata through the listener. The initiator then runs, for READ and WRITE,
//! blocks of 4 KiB, 64 KiB, 1 MiB and 16 MiB, 1, 16 and 128 descriptors per request, contiguous
//! (consecutive blocks) and scattered (every other block, random order): each case repeats the
//! same prepared request until 0.3 s have passed and reports GB/s (decimal). Then the KV-cache
//! case: 8192 random 16 KiB pages out of 16,384 per request.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, MemType, RegDesc, RegDescList, XferDescList, XferOp, XferOptions,
};

const ROLE_ENV: &str = "RIXL_SHM_BENCH_ROLE";
const BUF: usize = 1 << 30;

fn main() -> rixl::Result<()> {
    if std::env::var(ROLE_ENV).as_deref() == Ok("target") {
        return target();
    }
    initiator()
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
        "bench-target",
        AgentConfig::default().backend("SHM").listen_on(0),
    )?;
    register(&agent, &mut buf)?;
    println!("LISTEN {}", agent.listen_addr().expect("listener").port());
    std::io::stdout().flush().ok();
    // Stay alive until the initiator closes our stdin.
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
    Ok(())
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Runs `req` repeatedly for about `secs`; returns bytes per second.
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

fn initiator() -> rixl::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 0.1 } else { 0.3 };
    let exe = std::env::current_exe().expect("own executable");
    let mut child = ChildGuard(
        Command::new(exe)
            .env(ROLE_ENV, "target")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the target process"),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port");
    let port: u16 = line
        .trim()
        .strip_prefix("LISTEN ")
        .and_then(|p| p.parse().ok())
        .expect("LISTEN <port>");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let mut buf = vec![2u8; BUF];
    // `--param key=value` (repeatable) sets SHM backend parameters of the initiator, e.g.
    // `--param inline_max_bytes=4194304`, to compare settings on the same machine.
    let mut params = rixl::Params::new();
    let args: Vec<String> = std::env::args().collect();
    for pair in args.windows(2).filter(|w| w[0] == "--param") {
        let (k, v) = pair[1].split_once('=').expect("--param takes key=value");
        params.insert(k.to_owned(), v.to_owned());
    }
    let agent = Agent::new(
        "bench-initiator",
        AgentConfig::default().backend_with("SHM", params),
    )?;
    register(&agent, &mut buf)?;
    let peer =
        agent.fetch_remote_metadata_blocking("bench-target", addr, Duration::from_secs(10))?;
    let rbase = agent.remote_regions(&peer, MemType::Dram)?[0].addr;
    let lbase = buf.as_ptr() as u64;
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);

    println!(
        "{:<6} {:>9} {:>6} {:>11} {:>10}",
        "op", "block", "batch", "layout", "GB/s"
    );
    for op in [XferOp::Write, XferOp::Read] {
        for block in [4usize << 10, 64 << 10, 1 << 20, 16 << 20] {
            for batch in [1usize, 16, 128] {
                for scattered in [false, true] {
                    let span = block * batch * if scattered { 2 } else { 1 };
                    if span > BUF {
                        println!(
                            "{:<6} {:>9} {:>6} {:>11} {:>10}",
                            op.name(),
                            block,
                            batch,
                            layout(scattered),
                            "skip (>1 GiB)"
                        );
                        continue;
                    }
                    let mut slots: Vec<usize> = (0..batch)
                        .map(|i| if scattered { 2 * i } else { i })
                        .collect();
                    if scattered {
                        rng.shuffle(&mut slots);
                    }
                    let mk = |base: u64| {
                        XferDescList::from_descs(
                            MemType::Dram,
                            slots
                                .iter()
                                .map(|&s| Desc::new(base + (s * block) as u64, block as u64, 0))
                                .collect(),
                        )
                    };
                    let req = agent.create_xfer_req(
                        op,
                        &mk(lbase),
                        &mk(rbase),
                        &peer,
                        &XferOptions::default(),
                    )?;
                    let bw = measure(&req, secs)?;
                    println!(
                        "{:<6} {:>9} {:>6} {:>11} {:>10.2}",
                        op.name(),
                        block,
                        batch,
                        layout(scattered),
                        bw / 1e9
                    );
                }
            }
        }
    }
    // KV-cache shaped: 8192 random 16 KiB pages out of 16384 on both sides.
    const PAGE: u64 = 16 << 10;
    let mut src: Vec<usize> = (0..16384).collect();
    let mut dst: Vec<usize> = (0..16384).collect();
    rng.shuffle(&mut src);
    rng.shuffle(&mut dst);
    let pages = |base: u64| {
        XferDescList::from_descs(
            MemType::Dram,
            (0..16384u64)
                .map(|i| Desc::new(base + i * PAGE, PAGE, 0))
                .collect(),
        )
    };
    let l = agent.prep_xfer_dlist("", &pages(lbase), &[])?;
    let r = agent.prep_xfer_dlist(&peer, &pages(rbase), &[])?;
    for op in [XferOp::Write, XferOp::Read] {
        let req = agent.make_xfer_req(
            op,
            &l,
            &src[..8192],
            &r,
            &dst[..8192],
            &XferOptions::default(),
        )?;
        println!(
            "KV 8192 x 16 KiB random of 16384, {}: {:.2} GB/s",
            op.name(),
            measure(&req, secs)? / 1e9
        );
    }
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

fn layout(scattered: bool) -> &'static str {
    if scattered {
        "scattered"
    } else {
        "contiguous"
    }
}
