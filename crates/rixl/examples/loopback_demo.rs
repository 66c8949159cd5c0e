//! The RIXL loopback demo: two agents in one process move a KV-cache-shaped set of pages with
//! one request, exchange metadata, notify, and report what moved and how fast.
//!
//! `cargo run --release -p rixl --example loopback_demo`
//!
//! It prints: the KV transfer (8192 random 16 KiB pages out of 16384, WRITE with notification,
//! every byte verified) with prepare / make / post-to-complete times and bandwidth; the latency
//! of a 4 KiB post-to-complete (p50 / p99); metadata bytes per published registration; and the
//! CPU the agents use while idle.

use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, MemType, RegDesc, RegDescList, XferDescList, XferOp, XferOptions,
};

const PAGE: usize = 16 * 1024;
const PAGES: usize = 16 * 1024;
const MOVED: usize = 8 * 1024;

fn main() -> rixl::Result<()> {
    let prefill = Agent::new("prefill", AgentConfig::default().backend("LOOPBACK"))?;
    let decode = Agent::new("decode", AgentConfig::default().backend("LOOPBACK"))?;

    // Each worker owns a KV cache of PAGES pages.
    let mut src: Vec<u8> = (0..PAGES * PAGE)
        .map(|i| (i * 7 + i / PAGE) as u8)
        .collect();
    let mut dst = vec![0u8; PAGES * PAGE];
    register(&prefill, &mut src)?;
    register(&decode, &mut dst)?;

    // Metadata travels out of band (here: a function call).
    let blob = decode.local_metadata()?;
    let peer = prefill.load_remote_metadata(&blob)?;
    println!(
        "decode's metadata: {} bytes, loaded by prefill as {peer:?}",
        blob.len()
    );

    // Choose MOVED random pages and random destinations.
    let src_pages = sample(PAGES, MOVED, 1);
    let dst_pages = sample(PAGES, MOVED, 2);
    let t = Instant::now();
    let local = prefill.prep_xfer_dlist("", &page_list(src.as_ptr() as u64), &[])?;
    let remote = prefill.prep_xfer_dlist("decode", &page_list(dst.as_ptr() as u64), &[])?;
    let prep = t.elapsed();
    let t = Instant::now();
    let req = prefill.make_xfer_req(
        XferOp::Write,
        &local,
        &src_pages,
        &remote,
        &dst_pages,
        &XferOptions::with_notif("kv-ready"),
    )?;
    let make = t.elapsed();
    let t = Instant::now();
    req.post()?;
    req.wait(Some(Duration::from_secs(10)))?;
    let xfer = t.elapsed();
    let got = decode.get_notifs_by_agent(&[])?;
    assert_eq!(got.get("prefill"), Some(&vec![b"kv-ready".to_vec()]));
    for (s, d) in src_pages.iter().zip(&dst_pages) {
        assert_eq!(src[s * PAGE..(s + 1) * PAGE], dst[d * PAGE..(d + 1) * PAGE]);
    }
    let bytes = (MOVED * PAGE) as f64;
    println!(
        "KV transfer: {MOVED} pages x {} KiB via {} ({} segments), every byte verified",
        PAGE / 1024,
        req.backend_name(),
        req.segment_count()
    );
    println!(
        "  prepare 2 x {PAGES} descriptors: {:.2} ms ({:.1} ns/descriptor)",
        ms(prep),
        prep.as_nanos() as f64 / (2 * PAGES) as f64
    );
    println!(
        "  make from {MOVED} indices:     {:.3} ms ({:.1} ns/descriptor)",
        ms(make),
        make.as_nanos() as f64 / MOVED as f64
    );
    println!(
        "  post to complete:            {:.2} ms, {:.2} GB/s; notification \"kv-ready\" received",
        ms(xfer),
        bytes / xfer.as_secs_f64() / 1e9
    );

    // Small-message latency: one 4 KiB page, post until complete.
    let one_l =
        XferDescList::from_descs(MemType::Dram, vec![Desc::new(src.as_ptr() as u64, 4096, 0)]);
    let one_r =
        XferDescList::from_descs(MemType::Dram, vec![Desc::new(dst.as_ptr() as u64, 4096, 0)]);
    let small = prefill.create_xfer_req(
        XferOp::Write,
        &one_l,
        &one_r,
        "decode",
        &XferOptions::default(),
    )?;
    let mut lat = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let t = Instant::now();
        small.post()?;
        small.wait(None)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    println!(
        "4 KiB post-to-complete: p50 {} ns, p99 {} ns (100000 iterations)",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    // Metadata cost per registration: publish 1000 separate 4 KiB regions.
    let meta_agent = Agent::new("meta", AgentConfig::default().backend("LOOPBACK"))?;
    let before = meta_agent.local_partial_metadata(&RegDescList::new(MemType::Dram), true, &[])?;
    let mut pages4k = vec![0u8; 1000 * 8192];
    let regs = RegDescList::from_descs(
        MemType::Dram,
        (0..1000)
            .map(|i| RegDesc::new(pages4k.as_mut_ptr() as u64 + i * 8192, 4096, 0))
            .collect(),
    );
    // SAFETY: `pages4k` outlives `meta_agent` (dropped first below) and is not accessed.
    unsafe { meta_agent.register_mem(&regs, &[])? };
    let full = meta_agent.local_metadata()?;
    println!(
        "metadata: {:.1} bytes per published DRAM registration (1000 registrations, {} bytes in all)",
        (full.len() - before.len()) as f64 / 1000.0,
        full.len()
    );
    drop(meta_agent);

    // Idle agents burn nothing: measure this process's CPU time over one idle second.
    let cpu0 = process_cpu();
    std::thread::sleep(Duration::from_secs(1));
    let idle = process_cpu().saturating_sub(cpu0);
    println!(
        "idle: {:.1} ms of CPU over 1 s with two agents alive ({} threads in the process)",
        idle.as_secs_f64() * 1e3,
        std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(0)
    );
    drop(req);
    drop(small);
    drop(prefill);
    drop(decode);
    Ok(())
}

fn register(agent: &Agent, buf: &mut [u8]) -> rixl::Result<()> {
    let regs = RegDescList::from_descs(
        MemType::Dram,
        vec![RegDesc::new(buf.as_mut_ptr() as u64, buf.len() as u64, 0)],
    );
    // SAFETY: the buffers live until the end of `main`, after the agents are dropped, and the
    // program only reads them after the transfer completed.
    unsafe { agent.register_mem(&regs, &[]) }
}

fn page_list(base: u64) -> XferDescList {
    XferDescList::from_descs(
        MemType::Dram,
        (0..PAGES as u64)
            .map(|i| Desc::new(base + i * PAGE as u64, PAGE as u64, 0))
            .collect(),
    )
}

/// `k` distinct pages out of `n`, in random order (xorshift, fixed seed).
fn sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = 0x2545_F491_4F6C_DD1D_u64 ^ seed;
    for i in 0..k {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = i + (x % (n - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(k);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// User + system CPU time of this process, from /proc/self/stat (clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields after the command: state is not numeric, so utime/stime are at 11 and 12 here.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}
