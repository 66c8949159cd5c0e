//! RIXL's main demo: two processes on one host, a prefill worker and a decode worker, move
//! KV-cache pages with the `SHM` backend and report what moved and how fast.
//!
//! `cargo run --release -p rixl --example two_process_demo`
//!
//! The program starts its own peer: it re-executes itself as the decode worker, which listens
//! for metadata on an OS-chosen port and tells the parent which one. The prefill worker then
//! fetches the decode worker's metadata over that listener (the reply comes back on the same
//! connection), writes 8192 random 16 KiB pages out of 16384 into the decode worker's KV cache
//! with one request and a notification, and the decode worker, woken by the notification,
//! checksums the pages it received and answers with another notification. After that come
//! latency figures (64 B write + notification round trip, notification ping-pong, 4 KiB
//! post-to-complete), a 128 MiB transfer, and the CPU both processes use while idle.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, MemType, RegDesc, RegDescList, XferDescList, XferOp, XferOptions,
};

const PAGE: usize = 16 * 1024;
const PAGES: usize = 16 * 1024;
const MOVED: usize = 8 * 1024;
const BIG: usize = 128 << 20;
const ROLE_ENV: &str = "RIXL_DEMO_ROLE";

fn main() -> rixl::Result<()> {
    if std::env::var(ROLE_ENV).as_deref() == Ok("decode") {
        return decode_worker();
    }
    prefill_worker()
}

/// FNV-1a over pages `idx` of `buf`.
fn pages_checksum(buf: &[u8], idx: impl Iterator<Item = usize>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in idx {
        for &b in &buf[p * PAGE..(p + 1) * PAGE] {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

fn register(agent: &Agent, buf: &mut [u8]) -> rixl::Result<()> {
    let regs = RegDescList::from_descs(
        MemType::Dram,
        vec![RegDesc::new(buf.as_mut_ptr() as u64, buf.len() as u64, 0)],
    );
    // SAFETY: every buffer registered here lives until its process exits, after its agent is
    // dropped, and is only read by the program after the transfer into it completed.
    unsafe { agent.register_mem(&regs, &[]) }
}

fn decode_worker() -> rixl::Result<()> {
    let mut kv = vec![0u8; PAGES * PAGE];
    let mut big = vec![0u8; BIG];
    let agent = Agent::new("decode", AgentConfig::default().backend("SHM").listen_on(0))?;
    register(&agent, &mut kv)?;
    register(&agent, &mut big)?;
    let addr = agent.listen_addr().expect("listener runs");
    println!("LISTEN {}", addr.port());
    std::io::stdout().flush().ok();
    loop {
        if !agent.wait_notif(Duration::from_secs(60)) {
            eprintln!("decode: no notification for 60 s, exiting");
            return Ok(());
        }
        for n in agent.get_notifs(&[])? {
            if let Some(list) = n.msg.strip_prefix(b"kv:") {
                let idx = list
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize);
                let sum = pages_checksum(&kv, idx);
                agent.send_notif(&n.from, format!("sum:{sum}").as_bytes(), None)?;
            } else if n.msg == b"idle" {
                let t0 = cpu_time();
                std::thread::sleep(Duration::from_secs(1));
                let used = cpu_time().saturating_sub(t0);
                agent.send_notif(
                    &n.from,
                    format!("idle:{}", used.as_micros()).as_bytes(),
                    None,
                )?;
            } else if n.msg == b"exit" {
                return Ok(());
            } else {
                agent.send_notif(&n.from, &n.msg, None)?;
            }
        }
    }
}

fn wait_reply(agent: &Agent) -> rixl::Result<Vec<u8>> {
    loop {
        if !agent.wait_notif(Duration::from_secs(10)) {
            return Err(rixl::Error::timeout(
                "the decode worker did not answer within 10 s",
            ));
        }
        if let Some(n) = agent.get_notifs(&[])?.into_iter().next() {
            return Ok(n.msg);
        }
    }
}

/// Median time of one bare `process_vm_writev` of `len` bytes from `src` to `dst` in process
/// `pid`: the floor under any post-to-complete latency of SHM, printed next to it.
fn bare_write_latency(pid: u32, src: *const u8, dst: u64, len: usize) -> u64 {
    let local = libc::iovec {
        iov_base: src as *mut libc::c_void,
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: dst as usize as *mut libc::c_void,
        iov_len: len,
    };
    let mut lat = Vec::with_capacity(20000);
    for i in 0..21000 {
        let t = Instant::now();
        // SAFETY: reads `len` bytes of our own buffer at `src` (the caller's live KV cache) and
        // writes the decode worker's registered KV cache, which it is not reading right now.
        let n = unsafe { libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n != len as isize {
            return 0;
        }
        if i >= 1000 {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    percentiles(lat).0
}

fn percentiles(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn prefill_worker() -> rixl::Result<()> {
    let exe = std::env::current_exe().expect("own executable");
    let mut child = ChildGuard(
        Command::new(exe)
            .env(ROLE_ENV, "decode")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the decode worker"),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().expect("child stdout"))
        .read_line(&mut line)
        .expect("read the decode worker's port");
    let port: u16 = line
        .trim()
        .strip_prefix("LISTEN ")
        .and_then(|p| p.parse().ok())
        .expect("LISTEN <port>");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let mut kv: Vec<u8> = (0..PAGES * PAGE)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let mut big = vec![0x5au8; BIG];
    let agent = Agent::new("prefill", AgentConfig::default().backend("SHM"))?;
    register(&agent, &mut kv)?;
    register(&agent, &mut big)?;

    let t = Instant::now();
    let peer = agent.fetch_remote_metadata_blocking("decode", addr, Duration::from_secs(10))?;
    println!(
        "fetched {peer:?}'s metadata from {addr} in {:.2} ms (no listener on this side)",
        ms(t.elapsed())
    );
    // The decode worker answers with notifications, so it needs our metadata too.
    agent.send_local_metadata_blocking(addr, Duration::from_secs(10))?;
    let peer_md = agent_remote_base(&agent, &peer)?;
    agent.make_connection(&peer, &[])?;

    // The KV transfer: MOVED random source pages into MOVED random destination pages.
    let src_idx = sample(PAGES, MOVED, 1);
    let dst_idx = sample(PAGES, MOVED, 2);
    let page_list = |base: u64| {
        XferDescList::from_descs(
            MemType::Dram,
            (0..PAGES as u64)
                .map(|i| Desc::new(base + i * PAGE as u64, PAGE as u64, 0))
                .collect(),
        )
    };
    let t = Instant::now();
    let local = agent.prep_xfer_dlist("", &page_list(kv.as_ptr() as u64), &[])?;
    let remote = agent.prep_xfer_dlist(&peer, &page_list(peer_md.0), &[])?;
    let prep = t.elapsed();
    let mut msg = b"kv:".to_vec();
    for &d in &dst_idx {
        msg.extend_from_slice(&(d as u32).to_le_bytes());
    }
    let t = Instant::now();
    let req = agent.make_xfer_req(
        XferOp::Write,
        &local,
        &src_idx,
        &remote,
        &dst_idx,
        &XferOptions::with_notif(msg),
    )?;
    let make = t.elapsed();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        req.post()?;
        req.wait(Some(Duration::from_secs(10)))?;
        best = best.min(t.elapsed());
        let reply = wait_reply(&agent)?;
        let expect = format!("sum:{}", pages_checksum(&kv, src_idx.iter().copied()));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            expect,
            "decode worker saw different bytes"
        );
    }
    println!(
        "KV transfer: {MOVED} random 16 KiB pages of {PAGES} via {} ({} segments after merging), verified by the decode worker",
        req.backend_name(),
        req.segment_count()
    );
    println!(
        "  prepare 2 x {PAGES} descriptors {:.2} ms, make from {MOVED} indices {:.3} ms",
        ms(prep),
        ms(make)
    );
    println!(
        "  post to complete: {:.2} ms = {:.2} GB/s (best of 5)",
        ms(best),
        (MOVED * PAGE) as f64 / best.as_secs_f64() / 1e9
    );

    // Large contiguous transfer.
    let one = |base: u64, len: usize| {
        XferDescList::from_descs(MemType::Dram, vec![Desc::new(base, len as u64, 0)])
    };
    for op in [XferOp::Write, XferOp::Read] {
        let r = agent.create_xfer_req(
            op,
            &one(big.as_ptr() as u64, BIG),
            &one(peer_md.1, BIG),
            &peer,
            &XferOptions::default(),
        )?;
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            r.post()?;
            r.wait(Some(Duration::from_secs(10)))?;
            best = best.min(t.elapsed());
        }
        println!(
            "128 MiB {op}: {:.2} GB/s (best of 5)",
            BIG as f64 / best.as_secs_f64() / 1e9
        );
    }

    // Latency: 64 B write with notification until the reply notification arrives.
    let small = agent.create_xfer_req(
        XferOp::Write,
        &one(kv.as_ptr() as u64, 64),
        &one(peer_md.0, 64),
        &peer,
        &XferOptions::with_notif("ping"),
    )?;
    let mut lat = Vec::new();
    for i in 0..5000 {
        let t = Instant::now();
        small.post()?;
        small.wait(None)?;
        wait_reply(&agent)?;
        if i >= 500 {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    let (p50, p99) = percentiles(lat);
    println!(
        "64 B WRITE + notification, until the reply notification: p50 {:.1} us, p99 {:.1} us",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3
    );
    let mut lat = Vec::new();
    for i in 0..5000 {
        let t = Instant::now();
        agent.send_notif(&peer, b"pp", None)?;
        wait_reply(&agent)?;
        if i >= 500 {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    let (p50, p99) = percentiles(lat);
    println!(
        "notification ping-pong: p50 {:.1} us, p99 {:.1} us",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3
    );
    let four = agent.create_xfer_req(
        XferOp::Write,
        &one(kv.as_ptr() as u64, 4096),
        &one(peer_md.0, 4096),
        &peer,
        &XferOptions::default(),
    )?;
    let mut lat = Vec::new();
    for i in 0..20000 {
        let t = Instant::now();
        four.post()?;
        four.wait(None)?;
        if i >= 1000 {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    let (p50, p99) = percentiles(lat);
    println!(
        "4 KiB post-to-complete: p50 {:.2} us, p99 {:.2} us",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3
    );
    let floor = bare_write_latency(child.0.id(), kv.as_ptr(), peer_md.0, 4096);
    println!(
        "  (the same 4 KiB by one bare process_vm_writev, no RIXL: p50 {:.2} us)",
        floor as f64 / 1e3
    );

    // Idle CPU on both sides.
    agent.send_notif(&peer, b"idle", None)?;
    let t0 = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let mine = cpu_time().saturating_sub(t0);
    let theirs = String::from_utf8_lossy(&wait_reply(&agent)?).into_owned();
    println!(
        "idle for 1 s: prefill used {:.1} ms CPU, decode used {:.1} ms CPU",
        mine.as_secs_f64() * 1e3,
        theirs
            .strip_prefix("idle:")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1e3
    );
    agent.send_notif(&peer, b"exit", None)?;
    let _ = child.0.wait();
    drop((req, small, four, local, remote));
    drop(agent);
    Ok(())
}

/// Kills and reaps the decode worker if the demo ends early.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The decode worker's two registered buffers (KV cache, big buffer), from its metadata as
/// loaded: the regions are published in address order, so pick them by size.
fn agent_remote_base(agent: &Agent, peer: &str) -> rixl::Result<(u64, u64)> {
    let regions = agent.remote_regions(peer, MemType::Dram)?;
    let kv = regions
        .iter()
        .find(|d| d.len == (PAGES * PAGE) as u64)
        .map(|d| d.addr);
    let big = regions.iter().find(|d| d.len == BIG as u64).map(|d| d.addr);
    match (kv, big) {
        (Some(k), Some(b)) => Ok((k, b)),
        _ => Err(rixl::Error::not_found(
            "the decode worker did not publish its buffers",
        )),
    }
}

/// `k` distinct indices out of `n` in random order (xorshift, fixed seed).
fn sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = 0x2545_F491_4F6C_DD1D_u64 ^ seed;
    for i in 0..k {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, i + (x % (n - i) as u64) as usize);
    }
    v.truncate(k);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// User + system CPU time of this process (from /proc/self/stat, in 10 ms ticks).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Duration::from_millis((f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)) * 10)
}
