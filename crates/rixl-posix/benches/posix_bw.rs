//! `POSIX` backend bandwidth and IOPS through `rixl::Agent`, measured exactly as the NIXL
//! comparison script `bench/nixl_posix_compare.py` measures NIXL (which runs this bench in the
//! same session, on the same files, in interleaved rounds):
//!
//! - sequential WRITE then READ of `TOTAL` bytes (1 GiB) in 1 MiB and 16 MiB blocks, buffered
//!   and O_DIRECT. One request holds every block (1024 × 1 MiB or 64 × 16 MiB); blocks go to the
//!   file in reverse order so that the agent cannot merge them into one large segment (NIXL's
//!   `initialize_xfer` never merges either).
//! - per (mode, block) row: one untimed warm-up WRITE (allocates the file's blocks and puts
//!   every page in the page cache), then `fdatasync` (untimed), so that every implementation
//!   starts from a clean page cache holding the whole file and no writeback in progress; then
//!   `ITERS` timed WRITE posts (into the page cache: no fsync, as for fio without `end_fsync`),
//!   then `ITERS` timed READ posts right away (this VM evicts idle page cache within a minute).
//! - 4 KiB random READs, 128 per post (16 prepared requests of 128 random block-aligned offsets,
//!   posted round-robin, one post in flight), O_DIRECT and buffered (after one full read of the
//!   file, so "hot"), reported as IOPS.
//!
//! Run: `cargo bench -p rixl-posix --bench posix_bw`. Environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `RIXL_BENCH_DIR` | temp dir | where the files live |
//! | `RIXL_BENCH_FILE` | `rixl_posix_bw` | files are `<dir>/<file>_<mode>.bin` (the NIXL script passes the name it uses itself) |
//! | `RIXL_BENCH_KEEP` | `0` | `1`: keep the files at the end |
//! | `RIXL_BENCH_TOTAL_MIB` | 1024 | bytes per pass |
//! | `RIXL_BENCH_ITERS` | 3 | timed passes per row |
//! | `RIXL_BENCH_ENGINES` | `auto,io_uring,threads` | `engine` parameter values to run, in this order (repeats allowed, for interleaved A/B in one process); an entry may add parameters of its own: `auto/inline_max_bytes=0` |
//! | `RIXL_BENCH_MODES` | `buffered,direct` | |
//! | `RIXL_BENCH_BLOCKS_MIB` | `1,16` | |
//! | `RIXL_BENCH_RAND_POSTS` | 4000 | random-read posts per row; 0 skips the random rows |
//! | `RIXL_BENCH_PARAMS` | none | extra backend parameters, `k=v,k=v` |
//! | `RIXL_BENCH_LAT_POSTS` | 0 | > 0: also time this many small buffered posts (4 KiB × 1, 16, 128, hot cache) and print their median latency |
//!
//! Bandwidth is decimal GB/s (10^9 bytes per second), as nixlbench prints it.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
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

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
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

/// Writes back the file's dirty pages (untimed), so every implementation measured on it starts
/// from the same state: the whole file in the page cache, clean, no writeback running.
fn fdatasync(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for fdatasync");
    // SAFETY: fdatasync on an open descriptor; no memory arguments.
    let r = unsafe { libc::fdatasync(f.as_raw_fd()) };
    assert_eq!(r, 0, "fdatasync: {}", std::io::Error::last_os_error());
}

/// Median latency of small buffered posts (post to completion seen by `wait`), hot cache.
fn latency_rows(a: &Agent, label: &str, base: u64, path: &Path, posts: usize, dev: &mut u64) {
    for op in [XferOp::Read, XferOp::Write] {
        let meta = format!("rw:{}", path.display());
        *dev += 1;
        // SAFETY: storage registrations carry no memory obligation.
        unsafe { a.register_mem(&file_list(*dev, &meta), &[]) }.expect("register FILE");
        for n in [1u64, 16, 128] {
            // Every other 4 KiB block, so that nothing merges.
            let segs: Vec<(u64, u64, u64)> =
                (0..n).map(|i| (base + i * 8192, i * 8192, 4096)).collect();
            let r = request(a, op, *dev, &segs);
            for _ in 0..100 {
                post_wait(&r);
            }
            let mut lat: Vec<Duration> = (0..posts)
                .map(|_| {
                    let t = Instant::now();
                    post_wait(&r);
                    t.elapsed()
                })
                .collect();
            lat.sort();
            let op_name = if op == XferOp::Read { "LATRD" } else { "LATWR" };
            println!(
                "{label:<12} {:<9} {op_name:<6} {:>8} {:>12.3} {:>12}",
                "buffered",
                format!("4Ki×{n}"),
                lat[lat.len() / 2].as_secs_f64() * 1e6,
                "us"
            );
        }
        a.deregister_mem(&file_list(*dev, &meta), &[])
            .expect("deregister");
    }
}

fn main() {
    let dir = std::env::var("RIXL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let base_name = std::env::var("RIXL_BENCH_FILE").unwrap_or_else(|_| "rixl_posix_bw".into());
    let keep = env_or("RIXL_BENCH_KEEP", 0) != 0;
    let total = env_or("RIXL_BENCH_TOTAL_MIB", 1024) * MIB;
    let iters = env_or("RIXL_BENCH_ITERS", 3).max(1);
    let rand_posts = env_or("RIXL_BENCH_RAND_POSTS", 4000);
    let engines = env_list("RIXL_BENCH_ENGINES", "auto,io_uring,threads");
    let modes = env_list("RIXL_BENCH_MODES", "buffered,direct");
    let blocks: Vec<usize> = env_list("RIXL_BENCH_BLOCKS_MIB", "1,16")
        .iter()
        .map(|b| b.parse::<usize>().expect("RIXL_BENCH_BLOCKS_MIB") * MIB)
        .collect();
    let extra: Vec<(String, String)> = env_list("RIXL_BENCH_PARAMS", "")
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("RIXL_BENCH_PARAMS is k=v,k=v");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let path_of = |mode: &str| dir.join(format!("{base_name}_{mode}.bin"));
    println!(
        "rixl POSIX bench: dir {}, {} MiB per pass, {iters} timed passes per row",
        dir.display(),
        total / MIB
    );
    println!(
        "{:<12} {:<9} {:<6} {:>8} {:>12} {:>12}",
        "engine", "mode", "op", "block", "GB/s", "IOPS"
    );
    let buf = Aligned::new(total);
    let base = buf.addr();
    for spec in &engines {
        // An entry may add its own parameters: `auto/inline_max_bytes=0/num_threads=1`.
        let mut parts = spec.split('/');
        let engine = parts.next().unwrap_or("auto").to_owned();
        let mut params = Params::new();
        params.insert("engine".into(), engine.clone());
        params.extend(extra.iter().cloned());
        for kv in parts {
            let (k, v) = kv.split_once('=').expect("engine entry is engine/k=v/...");
            params.insert(k.to_owned(), v.to_owned());
        }
        let a = Agent::new(
            &format!("bench-{engine}"),
            AgentConfig::default().backend_with("POSIX", params),
        )
        .expect("agent");
        let label = a.backend_params("POSIX").expect("params")["engine"].clone();
        let label = if label == *spec {
            label
        } else {
            format!("{spec}:{label}")
        };
        let dram =
            RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(base, total as u64, 0)]);
        // SAFETY: `buf` outlives the agent (dropped at the end of this iteration, `buf` after
        // the loop) and is not touched while transfers run.
        unsafe { a.register_mem(&dram, &[]) }.expect("register DRAM");
        let mut dev = 1u64;
        for mode in &modes {
            let direct = mode == "direct";
            let path = path_of(mode);
            let meta = format!(
                "rw,create{}:{}",
                if direct { ",direct" } else { "" },
                path.display()
            );
            for &block in &blocks {
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
                post_wait(&w); // warm-up: allocates the file's blocks, fills the page cache
                fdatasync(&path);
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
                        "{label:<12} {mode:<9} {op:<6} {:>6}Mi {:>12.3} {:>12}",
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
        // 4 KiB random reads, 128 per post, over the O_DIRECT file (written above or by an
        // earlier run on the same files).
        let rand_path = path_of("direct");
        let rand_ok = std::fs::metadata(&rand_path).is_ok_and(|m| m.len() >= total as u64);
        for direct in [true, false] {
            if rand_posts == 0 || !rand_ok {
                break;
            }
            let mode = if direct { "direct" } else { "buffered" };
            let meta = format!(
                "ro{}:{}",
                if direct { ",direct" } else { "" },
                rand_path.display()
            );
            dev += 1;
            // SAFETY: storage registrations carry no memory obligation.
            unsafe { a.register_mem(&file_list(dev, &meta), &[]) }.expect("register FILE");
            let blocks = (total / 4096) as u64;
            let mut next = rng(0x5EED ^ u64::from(direct));
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
                "{label:<12} {mode:<9} {:<6} {:>8} {:>12.3} {:>12.0}",
                "RANDRD",
                "4Ki×128",
                gbps(ios * 4096, el),
                ios as f64 / el.as_secs_f64()
            );
            drop(reqs);
            a.deregister_mem(&file_list(dev, &meta), &[])
                .expect("deregister");
        }
        let lat_posts = env_or("RIXL_BENCH_LAT_POSTS", 0);
        if lat_posts > 0 && rand_ok {
            latency_rows(&a, &label, base, &rand_path, lat_posts, &mut dev);
        }
        drop(a);
    }
    if !keep {
        for mode in ["buffered", "direct"] {
            let _ = std::fs::remove_file(path_of(mode));
        }
    }
}
