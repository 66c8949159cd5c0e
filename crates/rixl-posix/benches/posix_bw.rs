//! `POSIX` backend bandwidth and IOPS through `rixl::Agent`, in the shape of the NIXL
//! comparison script `bench/nixl_posix_compare.py`:
//!
//! - sequential WRITE then READ of `TOTAL` bytes (1 GiB) in 1 MiB and 16 MiB blocks, buffered
//!   and O_DIRECT. One request holds every block (1024 × 1 MiB or 64 × 16 MiB); blocks go to the
//!   file in reverse order so that the agent cannot merge them into one large segment (NIXL's
//!   `initialize_xfer` never merges either). Buffered READs run right after the WRITEs, while
//!   the page cache still holds the file (this VM evicts idle file pages within a minute).
//! - 4 KiB random READs, 128 per post (16 prepared requests of 128 random block-aligned offsets,
//!   posted round-robin, one post in flight), O_DIRECT and buffered, reported as IOPS.
//!
//! Run: `cargo bench -p rixl-posix --bench posix_bw`. Environment: `RIXL_BENCH_DIR` (default
//! the temp dir), `RIXL_BENCH_TOTAL_MIB` (1024), `RIXL_BENCH_ITERS` (3 timed passes per row),
//! `RIXL_BENCH_ENGINES` (`io_uring,threads`), `RIXL_BENCH_RAND_POSTS` (4000).
//!
//! Bandwidth is decimal GB/s (10^9 bytes per second), as nixlbench prints it. Buffered WRITE
//! numbers measure copying into the page cache (no fsync), as for NIXL and fio without
//! `end_fsync`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rixl::{
    Agent, AgentConfig, Desc, MemType, Params, RegDesc, RegDescList, XferDescList, XferOp,
    XferOptions, XferRequest,
};

const MIB: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(600);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A page-aligned heap buffer (O_DIRECT needs aligned addresses).
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: `len` is non-zero.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        let mut a = Aligned { ptr, layout };
        // Touch every page so that first-fault costs are not measured.
        for (i, b) in a.bytes_mut().iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(13) ^ (i >> 12) as u8;
        }
        a
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` bytes owned by `self`; `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn post_wait(r: &XferRequest) {
    r.post().expect("post");
    r.wait(Some(TIMEOUT)).expect("transfer");
}

fn request(a: &Agent, op: XferOp, dev: u64, segs: &[(u64, u64, u64)]) -> XferRequest {
    let local = XferDescList::from_descs(
        MemType::Dram,
        segs.iter().map(|&(p, _, l)| Desc::new(p, l, 0)).collect(),
    );
    let remote = XferDescList::from_descs(
        MemType::File,
        segs.iter().map(|&(_, o, l)| Desc::new(o, l, dev)).collect(),
    );
    a.create_xfer_req(op, &local, &remote, a.name(), &XferOptions::default())
        .expect("create_xfer_req")
}

fn file_list(dev: u64, meta: &str) -> RegDescList {
    RegDescList::from_descs(MemType::File, vec![RegDesc::with_meta(0, 0, dev, meta)])
}

/// xorshift, for reproducible random offsets.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    let dir = std::env::var("RIXL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let total = env_or("RIXL_BENCH_TOTAL_MIB", 1024) * MIB;
    let iters = env_or("RIXL_BENCH_ITERS", 3).max(1);
    let rand_posts = env_or("RIXL_BENCH_RAND_POSTS", 4000).max(16);
    let engines = std::env::var("RIXL_BENCH_ENGINES").unwrap_or_else(|_| "io_uring,threads".into());
    println!(
        "rixl POSIX bench: dir {}, {} MiB per pass, {iters} timed passes per row",
        dir.display(),
        total / MIB
    );
    println!(
        "{:<9} {:<9} {:<6} {:>8} {:>12} {:>12}",
        "engine", "mode", "op", "block", "GB/s", "IOPS"
    );
    let buf = Aligned::new(total);
    let base = buf.addr();
    for engine in engines.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let mut params = Params::new();
        params.insert("engine".into(), engine.into());
        let a = Agent::new(
            &format!("bench-{engine}"),
            AgentConfig::default().backend_with("POSIX", params),
        )
        .expect("agent");
        let dram =
            RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(base, total as u64, 0)]);
        // SAFETY: `buf` outlives the agent (dropped at the end of this iteration, `buf` after
        // the loop) and is not touched while transfers run.
        unsafe { a.register_mem(&dram, &[]) }.expect("register DRAM");
        let mut dev = 1u64;
        for direct in [false, true] {
            let mode = if direct { "direct" } else { "buffered" };
            let path = dir.join(format!("rixl_posix_bw_{engine}_{mode}.bin"));
            let meta = format!(
                "rw,create{}:{}",
                if direct { ",direct" } else { "" },
                path.display()
            );
            for block in [MIB, 16 * MIB] {
                dev += 1;
                // SAFETY: storage registrations carry no memory obligation.
                unsafe { a.register_mem(&file_list(dev, &meta), &[]) }.expect("register FILE");
                let n = total / block;
                let segs: Vec<(u64, u64, u64)> = (0..n)
                    .map(|i| {
                        (
                            base + (i * block) as u64,
                            ((n - 1 - i) * block) as u64,
                            block as u64,
                        )
                    })
                    .collect();
                let w = request(&a, XferOp::Write, dev, &segs);
                let r = request(&a, XferOp::Read, dev, &segs);
                post_wait(&w); // warm-up: allocates the file's blocks
                let t = Instant::now();
                for _ in 0..iters {
                    post_wait(&w);
                }
                let tw = t.elapsed();
                let t = Instant::now();
                for _ in 0..iters {
                    post_wait(&r);
                }
                let tr = t.elapsed();
                for (op, el) in [("WRITE", tw), ("READ", tr)] {
                    println!(
                        "{engine:<9} {mode:<9} {op:<6} {:>6}Mi {:>12.3} {:>12}",
                        block / MIB,
                        gbps(total * iters, el),
                        "-"
                    );
                }
                drop((w, r));
                a.deregister_mem(&file_list(dev, &meta), &[])
                    .expect("deregister");
            }
        }
        // 4 KiB random reads, 128 per post, over the file the last pass wrote.
        for direct in [true, false] {
            let mode = if direct { "direct" } else { "buffered" };
            let path = dir.join(format!("rixl_posix_bw_{engine}_direct.bin"));
            let meta = format!(
                "ro{}:{}",
                if direct { ",direct" } else { "" },
                path.display()
            );
            dev += 1;
            // SAFETY: storage registrations carry no memory obligation.
            unsafe { a.register_mem(&file_list(dev, &meta), &[]) }.expect("register FILE");
            let blocks = (total / 4096) as u64;
            let mut next = rng(0x5EED ^ dev);
            let reqs: Vec<XferRequest> = (0..16u64)
                .map(|k| {
                    let segs: Vec<(u64, u64, u64)> = (0..128u64)
                        .map(|i| (base + (k * 128 + i) * 4096, (next() % blocks) * 4096, 4096))
                        .collect();
                    request(&a, XferOp::Read, dev, &segs)
                })
                .collect();
            if !direct {
                // Hot cache: read the whole file once right before.
                let segs: Vec<(u64, u64, u64)> = (0..(total / (16 * MIB)) as u64)
                    .map(|i| {
                        (
                            base + i * 16 * MIB as u64,
                            i * 16 * MIB as u64,
                            16 * MIB as u64,
                        )
                    })
                    .collect();
                post_wait(&request(&a, XferOp::Read, dev, &segs));
            }
            for r in &reqs {
                post_wait(r);
            }
            let t = Instant::now();
            for i in 0..rand_posts {
                post_wait(&reqs[i % reqs.len()]);
            }
            let el = t.elapsed();
            let ios = rand_posts * 128;
            println!(
                "{engine:<9} {mode:<9} {:<6} {:>8} {:>12.3} {:>12.0}",
                "RANDRD",
                "4Ki×128",
                gbps(ios * 4096, el),
                ios as f64 / el.as_secs_f64()
            );
            drop(reqs);
            a.deregister_mem(&file_list(dev, &meta), &[])
                .expect("deregister");
        }
        drop(a);
        for mode in ["buffered", "direct"] {
            let _ = std::fs::remove_file(dir.join(format!("rixl_posix_bw_{engine}_{mode}.bin")));
        }
    }
}
