//! The `POSIX` backend through `rixl::Agent`: DRAM ↔ FILE/BLK transfers targeting the agent
//! itself, on both engines (io_uring and the thread pool), with the errors a storage user meets
//! (end of file, read-only files, O_DIRECT alignment, a full disk). The shared conformance
//! suite runs on POSIX too, with FILE and BLK target memory (the `conformance*` modules at the
//! end); the tests here cover what is POSIX's own.
//!
//! Every DRAM registration below follows `Agent::register_mem`'s contract: the buffers outlive
//! their agent (they are declared first, so they are dropped last) and are only read or written
//! by the test while no transfer is in flight.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rixl::{
    Agent, AgentConfig, Desc, ErrorKind, MemType, Params, RegDesc, RegDescList, XferDescList,
    XferOp, XferOptions, XferStatus,
};

/// `auto` runs O_DIRECT files on io_uring and buffered ones on the thread pool, small buffered
/// posts in the posting thread.
const ENGINES: [&str; 3] = ["io_uring", "threads", "auto"];
/// Linux's errno for a full file system.
const ENOSPC: i32 = 28;
/// Only a bound so that a broken backend fails instead of hanging; not a performance target.
const TIMEOUT: Duration = Duration::from_secs(300);

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn agent_with(params: &[(&str, &str)]) -> Agent {
    let p: Params = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Agent::new(
        &unique("posix"),
        AgentConfig::default().backend_with("POSIX", p),
    )
    .expect("agent with POSIX")
}

fn agent(engine: &str) -> Agent {
    let a = agent_with(&[("engine", engine)]);
    let expect = if engine == "auto" {
        "io_uring+threads"
    } else {
        engine
    };
    assert_eq!(a.backend_params("POSIX").unwrap()["engine"], expect);
    a
}

/// A scratch directory, removed with its contents on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("rixl-posix-test-{}", unique(tag)));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A zeroed heap buffer aligned to 4096 bytes, for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: `len` is non-zero in every use below.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Registers DRAM ranges `(addr, len)`.
fn reg_dram(a: &Agent, ranges: &[(u64, usize)]) {
    let list = RegDescList::from_descs(
        MemType::Dram,
        ranges
            .iter()
            .map(|&(p, l)| RegDesc::new(p, l as u64, 0))
            .collect(),
    );
    // SAFETY: see the module documentation: every buffer outlives the agent and is untouched
    // while transfers run.
    unsafe { a.register_mem(&list, &[]) }.expect("register DRAM");
}

fn file_reg(mem: MemType, dev: u64, len: u64, meta: &str) -> RegDescList {
    RegDescList::from_descs(mem, vec![RegDesc::with_meta(0, len, dev, meta)])
}

/// Registers a FILE in path mode as `dev`, unbounded.
fn reg_path(a: &Agent, dev: u64, mode: &str, path: &Path) {
    let meta = format!("{mode}:{}", path.display());
    // SAFETY: storage registrations carry no memory obligation.
    unsafe { a.register_mem(&file_reg(MemType::File, dev, 0, &meta), &[]) }.expect("register FILE");
}

fn dlist(mem: MemType, descs: Vec<Desc>) -> XferDescList {
    XferDescList::from_descs(mem, descs)
}

/// `(dram addr, file offset, len)` triples against file key `dev`, posted and waited for.
fn run(a: &Agent, op: XferOp, dev: u64, segs: &[(u64, u64, u64)]) -> rixl::Result<XferStatus> {
    run_mem(a, op, MemType::File, dev, segs)
}

fn run_mem(
    a: &Agent,
    op: XferOp,
    mem: MemType,
    dev: u64,
    segs: &[(u64, u64, u64)],
) -> rixl::Result<XferStatus> {
    let local = dlist(
        MemType::Dram,
        segs.iter().map(|&(p, _, l)| Desc::new(p, l, 0)).collect(),
    );
    let remote = dlist(
        mem,
        segs.iter().map(|&(_, o, l)| Desc::new(o, l, dev)).collect(),
    );
    let req = a.create_xfer_req(op, &local, &remote, a.name(), &XferOptions::default())?;
    assert_eq!(req.backend_name(), "POSIX");
    req.post()?;
    req.wait(Some(TIMEOUT))
}

#[track_caller]
fn expect_kind<T: std::fmt::Debug>(r: rixl::Result<T>, kind: ErrorKind) -> rixl::Error {
    match r {
        Ok(v) => panic!("expected {kind}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            e
        }
    }
}

#[test]
fn path_mode_write_then_read_back() {
    for engine in ENGINES {
        let src = pattern(1 << 20, 1);
        let mut dst = vec![0u8; 1 << 20];
        let dir = Scratch::new("path");
        let f = dir.path("kv.bin");
        let a = agent(engine);
        reg_dram(
            &a,
            &[
                (src.as_ptr() as u64, src.len()),
                (dst.as_mut_ptr() as u64, dst.len()),
            ],
        );
        reg_path(&a, 7, "rw,create", &f);
        let s = src.as_ptr() as u64;
        // The first half of the buffer goes after the second half in the file.
        let half = 1u64 << 19;
        assert_eq!(
            run(
                &a,
                XferOp::Write,
                7,
                &[(s, half + 4096, half), (s + half, 0, half)]
            )
            .unwrap(),
            XferStatus::Done
        );
        let on_disk = std::fs::read(&f).unwrap();
        assert_eq!(on_disk.len() as u64, 2 * half + 4096);
        assert!(
            on_disk[(half + 4096) as usize..] == src[..half as usize],
            "{engine}"
        );
        assert!(on_disk[..half as usize] == src[half as usize..], "{engine}");
        let d = dst.as_mut_ptr() as u64;
        run(
            &a,
            XferOp::Read,
            7,
            &[(d, half + 4096, half), (d + half, 0, half)],
        )
        .unwrap();
        drop(a);
        assert!(dst == src, "{engine}: data read back differs");
    }
}

#[test]
fn fd_mode_write_then_read_back() {
    for engine in ENGINES {
        let src = pattern(200_003, 2);
        let mut dst = vec![0u8; 200_003];
        let dir = Scratch::new("fd");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path("fd.bin"))
            .unwrap();
        let fd = file.as_raw_fd() as u64;
        let a = agent(engine);
        reg_dram(
            &a,
            &[
                (src.as_ptr() as u64, src.len()),
                (dst.as_mut_ptr() as u64, dst.len()),
            ],
        );
        // NIXL's form: (offset 0, len 0 = whole file, dev = fd, meta "").
        // SAFETY: storage registrations carry no memory obligation.
        unsafe { a.register_mem(&file_reg(MemType::File, fd, 0, ""), &[]) }.unwrap();
        run(&a, XferOp::Write, fd, &[(src.as_ptr() as u64, 13, 200_003)]).unwrap();
        run(
            &a,
            XferOp::Read,
            fd,
            &[(dst.as_mut_ptr() as u64, 13, 200_003)],
        )
        .unwrap();
        a.deregister_mem(&file_reg(MemType::File, fd, 0, ""), &[])
            .unwrap();
        drop(a);
        assert!(dst == src, "{engine}");
        // The caller's fd is still open after deregistration: the backend only borrowed it.
        assert_eq!(file.metadata().unwrap().len(), 200_016);
    }
}

#[test]
fn many_small_descriptors_4096_by_4k() {
    const N: u64 = 4096;
    const PAGE: u64 = 4096;
    for engine in ENGINES {
        let src = pattern((N * PAGE) as usize, 3);
        let mut dst = vec![0u8; (N * PAGE) as usize];
        let dir = Scratch::new("many");
        let a = agent(engine);
        reg_dram(
            &a,
            &[
                (src.as_ptr() as u64, src.len()),
                (dst.as_mut_ptr() as u64, dst.len()),
            ],
        );
        reg_path(&a, 1, "rw,create", &dir.path("pages.bin"));
        // Page i of the buffer goes to file slot perm(i): nothing is contiguous, so every
        // descriptor stays its own I/O.
        let perm = |i: u64| (i * 2909 + 17) % N;
        let s = src.as_ptr() as u64;
        let local = a
            .prep_xfer_dlist(
                "",
                &dlist(
                    MemType::Dram,
                    (0..N).map(|i| Desc::new(s + i * PAGE, PAGE, 0)).collect(),
                ),
                &[],
            )
            .unwrap();
        let target = a
            .prep_xfer_dlist(
                a.name(),
                &dlist(
                    MemType::File,
                    (0..N).map(|i| Desc::new(i * PAGE, PAGE, 1)).collect(),
                ),
                &[],
            )
            .unwrap();
        let li: Vec<usize> = (0..N as usize).collect();
        let ri: Vec<usize> = (0..N).map(|i| perm(i) as usize).collect();
        let w = a
            .make_xfer_req(
                XferOp::Write,
                &local,
                &li,
                &target,
                &ri,
                &XferOptions::default(),
            )
            .unwrap();
        assert_eq!(w.segment_count(), N as usize);
        w.post().unwrap();
        assert_eq!(w.wait(Some(TIMEOUT)).unwrap(), XferStatus::Done);
        // Read everything back in file order with one contiguous descriptor per page.
        let d = dst.as_mut_ptr() as u64;
        let segs: Vec<_> = (0..N).map(|i| (d + i * PAGE, i * PAGE, PAGE)).collect();
        run(&a, XferOp::Read, 1, &segs).unwrap();
        drop((w, local, target, a));
        for i in 0..N {
            let (from, to) = ((i * PAGE) as usize, (perm(i) * PAGE) as usize);
            assert!(
                dst[to..to + PAGE as usize] == src[from..from + PAGE as usize],
                "{engine}: page {i}"
            );
        }
    }
}

#[test]
fn large_and_unaligned_transfers() {
    for engine in ENGINES {
        let big = 64usize << 20;
        let src = pattern(big + 8192, 4);
        let mut dst = vec![0u8; big + 8192];
        let dir = Scratch::new("large");
        let a = agent(engine);
        reg_dram(
            &a,
            &[
                (src.as_ptr() as u64, src.len()),
                (dst.as_mut_ptr() as u64, dst.len()),
            ],
        );
        reg_path(&a, 2, "rw,create", &dir.path("big.bin"));
        let s = src.as_ptr() as u64;
        let d = dst.as_mut_ptr() as u64;
        // 64 MiB from an odd address to an odd offset, plus odd little pieces around it.
        let segs = |base: u64| {
            vec![
                (base + 3, 1001, big as u64),
                (base + big as u64 + 3, 0, 1),
                (base + big as u64 + 4, 7, 994),
                (base + big as u64 + 998, (big as u64) + 5000, 4095),
            ]
        };
        run(&a, XferOp::Write, 2, &segs(s)).unwrap();
        run(&a, XferOp::Read, 2, &segs(d)).unwrap();
        drop(a);
        let end = big + 998 + 4095;
        assert!(dst[3..end] == src[3..end], "{engine}");
    }
}

#[test]
fn read_only_registration_refuses_write_cleanly() {
    let src = pattern(4096, 5);
    let mut dst = vec![0u8; 4096];
    let dir = Scratch::new("ro");
    let f = dir.path("ro.bin");
    std::fs::write(&f, pattern(4096, 6)).unwrap();
    let a = agent_with(&[]);
    reg_dram(
        &a,
        &[(src.as_ptr() as u64, 4096), (dst.as_mut_ptr() as u64, 4096)],
    );
    reg_path(&a, 3, "ro", &f);
    let e = expect_kind(
        run(&a, XferOp::Write, 3, &[(src.as_ptr() as u64, 0, 4096)]),
        ErrorKind::NotAllowed,
    );
    assert!(e.to_string().contains("read-only"), "{e}");
    assert_eq!(
        std::fs::read(&f).unwrap(),
        pattern(4096, 6),
        "file untouched"
    );
    // The same registration still reads, and the agent still works.
    run(&a, XferOp::Read, 3, &[(dst.as_mut_ptr() as u64, 0, 4096)]).unwrap();
    drop(a);
    assert_eq!(dst, pattern(4096, 6));
}

#[test]
fn o_direct_aligned_ok_misaligned_invalid_param() {
    for engine in ENGINES {
        let mut buf = Aligned::new(4 << 20);
        buf.bytes_mut().copy_from_slice(&pattern(4 << 20, 7));
        let back = Aligned::new(4 << 20);
        let dir = Scratch::new("direct");
        let a = agent(engine);
        reg_dram(&a, &[(buf.addr(), 4 << 20), (back.addr(), 4 << 20)]);
        reg_path(&a, 4, "rw,direct,create", &dir.path("direct.bin"));
        let b = buf.addr();
        for (seg, what) in [
            ((b + 512 + 1, 0, 4096), "buffer address"),
            ((b, 4096 + 100, 4096), "file offset"),
            ((b, 0, 4096 + 1), "length"),
        ] {
            let e = expect_kind(run(&a, XferOp::Write, 4, &[seg]), ErrorKind::InvalidParam);
            let m = e.to_string();
            assert!(m.contains("O_DIRECT") && m.contains(what), "{engine}: {m}");
        }
        run(&a, XferOp::Write, 4, &[(b, 0, 4 << 20)]).unwrap();
        run(&a, XferOp::Read, 4, &[(back.addr(), 0, 4 << 20)]).unwrap();
        drop(a);
        assert!(back.bytes() == buf.bytes(), "{engine}");
    }
}

#[test]
fn short_read_at_end_of_file_is_a_clear_error() {
    for engine in ENGINES {
        let mut dst = vec![0u8; 8192];
        let dir = Scratch::new("eof");
        let f = dir.path("short.bin");
        std::fs::write(&f, pattern(5000, 8)).unwrap();
        let a = agent(engine);
        reg_dram(&a, &[(dst.as_mut_ptr() as u64, 8192)]);
        reg_path(&a, 5, "ro", &f);
        let e = expect_kind(
            run(
                &a,
                XferOp::Read,
                5,
                &[(dst.as_mut_ptr() as u64, 1000, 8192)],
            ),
            ErrorKind::Backend,
        );
        let m = e.to_string();
        assert!(
            m.contains("read of 8192 bytes at offset 1000 of")
                && m.contains("returned 4000: end of file")
                && m.contains("short.bin")
                && m.contains("backend POSIX"),
            "{engine}: {m}"
        );
        // Still usable.
        run(&a, XferOp::Read, 5, &[(dst.as_mut_ptr() as u64, 0, 5000)]).unwrap();
        drop(a);
        assert_eq!(&dst[..5000], &pattern(5000, 8)[..]);
    }
}

#[test]
fn descriptor_outside_bounded_registration_is_not_found() {
    let src = pattern(8192, 9);
    let dir = Scratch::new("bounded");
    let f = dir.path("bounded.bin");
    let a = agent_with(&[]);
    reg_dram(&a, &[(src.as_ptr() as u64, 8192)]);
    let meta = format!("rw,create:{}", f.display());
    // SAFETY: storage registrations carry no memory obligation.
    unsafe { a.register_mem(&file_reg(MemType::File, 6, 4096, &meta), &[]) }.unwrap();
    let s = src.as_ptr() as u64;
    expect_kind(
        run(&a, XferOp::Write, 6, &[(s, 4000, 200)]),
        ErrorKind::NotFound,
    );
    expect_kind(
        run(&a, XferOp::Write, 6, &[(s, 0, 4097)]),
        ErrorKind::NotFound,
    );
    expect_kind(
        run(&a, XferOp::Write, 9, &[(s, 0, 16)]),
        ErrorKind::NotFound,
    );
    run(&a, XferOp::Write, 6, &[(s, 0, 4096)]).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), &src[..4096]);
}

#[test]
fn query_mem_through_the_agent() {
    let dir = Scratch::new("query");
    let f = dir.path("q.bin");
    std::fs::write(&f, vec![1u8; 777]).unwrap();
    let a = agent_with(&[]);
    let list = RegDescList::from_descs(
        MemType::File,
        vec![
            RegDesc::with_meta(0, 0, 0, f.display().to_string()),
            RegDesc::with_meta(0, 0, 0, format!("ro,direct:{}", f.display())),
            RegDesc::with_meta(0, 0, 0, dir.path("missing").display().to_string()),
        ],
    );
    let q = a.query_mem(&list, "POSIX").unwrap();
    assert_eq!(q.len(), 3);
    let st = std::fs::metadata(&f).unwrap();
    use std::os::unix::fs::MetadataExt;
    for e in &q[..2] {
        let e = e.as_ref().expect("exists");
        assert_eq!(e["size"], "777");
        assert_eq!(e["mode"], st.mode().to_string());
        assert_eq!(e["mtime"], st.mtime().to_string());
    }
    assert!(q[2].is_none());
}

#[test]
fn regular_file_standing_in_for_a_block_device() {
    for engine in ENGINES {
        let src = pattern(65536, 10);
        let mut dst = vec![0u8; 65536];
        let dir = Scratch::new("blkfile");
        let f = dir.path("volume.img");
        let a = agent(engine);
        reg_dram(
            &a,
            &[
                (src.as_ptr() as u64, 65536),
                (dst.as_mut_ptr() as u64, 65536),
            ],
        );
        let meta = format!("rw,create:{}", f.display());
        // SAFETY: storage registrations carry no memory obligation.
        unsafe { a.register_mem(&file_reg(MemType::Blk, 0, 0, &meta), &[]) }.unwrap();
        run_mem(
            &a,
            XferOp::Write,
            MemType::Blk,
            0,
            &[(src.as_ptr() as u64, 1 << 20, 65536)],
        )
        .unwrap();
        run_mem(
            &a,
            XferOp::Read,
            MemType::Blk,
            0,
            &[(dst.as_mut_ptr() as u64, 1 << 20, 65536)],
        )
        .unwrap();
        drop(a);
        assert!(dst == src, "{engine}");
    }
}

/// A real block device (a loop device with 4096-byte sectors): O_DIRECT alignment comes from
/// `BLKSSZGET`. Needs root and `losetup`; skipped with a message otherwise.
#[test]
fn loop_block_device_with_4k_sectors() {
    let dir = Scratch::new("loop");
    let img = dir.path("loop.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let out = std::process::Command::new("losetup")
        .args([
            "--find",
            "--show",
            "--sector-size",
            "4096",
            "--direct-io=on",
        ])
        .arg(&img)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => {
            eprintln!(
                "SKIP: loop_block_device_with_4k_sectors: losetup failed ({}) because {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP: loop_block_device_with_4k_sectors: cannot run losetup because {e}");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(dev.clone());
    for engine in ENGINES {
        let mut buf = Aligned::new(1 << 20);
        buf.bytes_mut().copy_from_slice(&pattern(1 << 20, 11));
        let back = Aligned::new(1 << 20);
        let a = agent(engine);
        reg_dram(&a, &[(buf.addr(), 1 << 20), (back.addr(), 1 << 20)]);
        let meta = format!("rw,direct:{dev}");
        // SAFETY: storage registrations carry no memory obligation.
        unsafe { a.register_mem(&file_reg(MemType::Blk, 0, 0, &meta), &[]) }.unwrap();
        let e = expect_kind(
            run_mem(
                &a,
                XferOp::Write,
                MemType::Blk,
                0,
                &[(buf.addr(), 512, 4096)],
            ),
            ErrorKind::InvalidParam,
        );
        assert!(
            e.to_string().contains("4096 bytes") && e.to_string().contains("BLKSSZGET"),
            "{e}"
        );
        run_mem(
            &a,
            XferOp::Write,
            MemType::Blk,
            0,
            &[(buf.addr(), 4096, 1 << 20)],
        )
        .unwrap();
        run_mem(
            &a,
            XferOp::Read,
            MemType::Blk,
            0,
            &[(back.addr(), 4096, 1 << 20)],
        )
        .unwrap();
        assert!(
            back.bytes() == buf.bytes(),
            "{engine}: data read back differs"
        );
        // The device ends at 8 MiB: a read across the end is an end-of-file error.
        let e = expect_kind(
            run_mem(
                &a,
                XferOp::Read,
                MemType::Blk,
                0,
                &[(back.addr(), (8 << 20) - 4096, 8192)],
            ),
            ErrorKind::Backend,
        );
        assert!(e.to_string().contains("end of file"), "{e}");
        let q = a
            .query_mem(
                &RegDescList::from_descs(
                    MemType::Blk,
                    vec![RegDesc::with_meta(0, 0, 0, dev.clone())],
                ),
                "POSIX",
            )
            .unwrap();
        assert_eq!(q[0].as_ref().unwrap()["size"], (8u64 << 20).to_string());
    }
}

/// A full disk: a 1 MiB tmpfs. The write past its end fails with ENOSPC, naming the file and
/// offset; what was written before is intact; the backend and agent keep working.
#[test]
fn full_disk_reports_enospc() {
    let dir = Scratch::new("enospc");
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIP: full_disk_reports_enospc: cannot mount a 1 MiB tmpfs on {} because {}",
                mnt.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP: full_disk_reports_enospc: cannot run mount because {e}");
            return;
        }
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // Lazy unmount: never blocks, even if something still holds a file open.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    for engine in ENGINES {
        let first = pattern(512 << 10, 12);
        let more = pattern(1 << 20, 13);
        let mut back = vec![0u8; 512 << 10];
        let f = mnt.join(format!("full-{engine}.bin"));
        let a = agent(engine);
        reg_dram(
            &a,
            &[
                (first.as_ptr() as u64, first.len()),
                (more.as_ptr() as u64, more.len()),
                (back.as_mut_ptr() as u64, back.len()),
            ],
        );
        reg_path(&a, 8, "rw,create", &f);
        run(
            &a,
            XferOp::Write,
            8,
            &[(first.as_ptr() as u64, 0, 512 << 10)],
        )
        .unwrap();
        let e = expect_kind(
            run(
                &a,
                XferOp::Write,
                8,
                &[(more.as_ptr() as u64, 512 << 10, 1 << 20)],
            ),
            ErrorKind::Backend,
        );
        assert_eq!(e.os_error(), Some(ENOSPC), "{engine}: {e}");
        let m = e.to_string();
        assert!(
            m.contains(&format!("full-{engine}.bin")) && m.contains("offset 524288"),
            "{engine}: {m}"
        );
        // A small write into the full file system (run in the posting thread under `auto`)
        // fails the same way.
        let e = expect_kind(
            run(
                &a,
                XferOp::Write,
                8,
                &[(more.as_ptr() as u64, 4 << 20, 4096)],
            ),
            ErrorKind::Backend,
        );
        assert_eq!(e.os_error(), Some(ENOSPC), "{engine}: {e}");
        assert!(e.to_string().contains("offset 4194304"), "{engine}: {e}");
        // Earlier data intact, agent usable: overwrite existing pages and read back.
        run(
            &a,
            XferOp::Read,
            8,
            &[(back.as_mut_ptr() as u64, 0, 512 << 10)],
        )
        .unwrap();
        assert!(back == first, "{engine}: earlier data changed");
        run(&a, XferOp::Write, 8, &[(more.as_ptr() as u64, 0, 4096)]).unwrap();
        run(&a, XferOp::Read, 8, &[(back.as_mut_ptr() as u64, 0, 4096)]).unwrap();
        drop(a);
        assert!(back[..4096] == more[..4096], "{engine}");
        std::fs::remove_file(&f).unwrap();
    }
    // Dropping the agents closed every file (io_uring's registered-file table included): a
    // plain unmount, which fails while anything holds a file, succeeds.
    let st = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "the tmpfs is still busy after the agents were dropped"
    );
}

#[test]
fn cancel_and_drop_in_flight() {
    for engine in ENGINES {
        let len = 64usize << 20;
        let src = pattern(len, 14);
        let dir = Scratch::new("cancel");
        let f = dir.path("c.bin");
        let a = agent_with(&[("engine", engine), ("max_io_size", "65536")]);
        reg_dram(&a, &[(src.as_ptr() as u64, len)]);
        reg_path(&a, 9, "rw,create", &f);
        let mk = || {
            a.create_xfer_req(
                XferOp::Write,
                &dlist(
                    MemType::Dram,
                    vec![Desc::new(src.as_ptr() as u64, len as u64, 0)],
                ),
                &dlist(MemType::File, vec![Desc::new(0, len as u64, 9)]),
                a.name(),
                &XferOptions::default(),
            )
            .unwrap()
        };
        let req = mk();
        req.post().unwrap();
        req.cancel().unwrap();
        match req.status() {
            Ok(XferStatus::Done) => {} // it finished before the cancel
            Err(e) => assert_eq!(e.kind(), ErrorKind::Canceled, "{engine}: {e}"),
            other => panic!("{engine}: status after cancel: {other:?}"),
        }
        // Fenced: nothing of it is written after cancel returned.
        let size_then = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        let then = std::fs::read(&f).unwrap_or_default();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0),
            size_then
        );
        assert!(std::fs::read(&f).unwrap_or_default() == then, "{engine}");
        // Repost after cancel runs to completion.
        req.post().unwrap();
        assert_eq!(req.wait(Some(TIMEOUT)).unwrap(), XferStatus::Done);
        // Dropping (releasing) a request in flight fences as well.
        let req2 = mk();
        req2.post().unwrap();
        drop(req2);
        drop(req);
        assert!(std::fs::read(&f).unwrap() == src, "{engine}");
    }
}

#[test]
fn notifications_and_dram_copies_are_not_posix_business() {
    let src = pattern(4096, 15);
    let mut dst = vec![0u8; 4096];
    let dir = Scratch::new("notif");
    let a = agent_with(&[]);
    reg_dram(
        &a,
        &[(src.as_ptr() as u64, 4096), (dst.as_mut_ptr() as u64, 4096)],
    );
    reg_path(&a, 1, "rw,create", &dir.path("n.bin"));
    let local = dlist(MemType::Dram, vec![Desc::new(src.as_ptr() as u64, 4096, 0)]);
    let file = dlist(MemType::File, vec![Desc::new(0, 4096, 1)]);
    // The only backend that moves DRAM to FILE cannot carry the notification: a backend
    // error, as in NIXL (not "no registration covers it").
    expect_kind(
        a.create_xfer_req(
            XferOp::Write,
            &local,
            &file,
            a.name(),
            &XferOptions::with_notif("x"),
        ),
        ErrorKind::Backend,
    );
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &local,
            &file,
            a.name(),
            &XferOptions::default(),
        )
        .unwrap();
    expect_kind(req.post_with_notif(b"late"), ErrorKind::Backend);
    // The refused message did not stick to the request: the next plain post works (below).
    // POSIX moves DRAM to and from storage only, so no backend of this agent moves DRAM→DRAM.
    let e = expect_kind(
        a.create_xfer_req(
            XferOp::Write,
            &local,
            &dlist(
                MemType::Dram,
                vec![Desc::new(dst.as_mut_ptr() as u64, 4096, 0)],
            ),
            a.name(),
            &XferOptions::default(),
        ),
        ErrorKind::NotFound,
    );
    assert!(e.to_string().contains("no backend holds DRAM"), "{e}");
    // Local-only: no metadata to publish.
    expect_kind(a.local_metadata(), ErrorKind::InvalidParam);
    req.post().unwrap();
    assert_eq!(req.wait(Some(TIMEOUT)).unwrap(), XferStatus::Done);
}

#[test]
fn deregistered_file_makes_requests_stale() {
    let src = pattern(4096, 16);
    let dir = Scratch::new("stale");
    let f = dir.path("s.bin");
    let a = agent_with(&[]);
    reg_dram(&a, &[(src.as_ptr() as u64, 4096)]);
    reg_path(&a, 2, "rw,create", &f);
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &dlist(MemType::Dram, vec![Desc::new(src.as_ptr() as u64, 4096, 0)]),
            &dlist(MemType::File, vec![Desc::new(0, 4096, 2)]),
            a.name(),
            &XferOptions::default(),
        )
        .unwrap();
    let meta = format!("rw,create:{}", f.display());
    a.deregister_mem(&file_reg(MemType::File, 2, 0, &meta), &[])
        .unwrap();
    expect_kind(req.post(), ErrorKind::NotFound);
    // Registering a path that cannot be opened fails with the path and the errno.
    let e = {
        let bad = format!("ro:{}", dir.path("no/such/file").display());
        // SAFETY: storage registrations carry no memory obligation.
        unsafe { a.register_mem(&file_reg(MemType::File, 3, 0, &bad), &[]) }.unwrap_err()
    };
    let m = e.to_string();
    assert!(
        m.contains("no/such/file") && m.contains("os error 2"),
        "{m}"
    );
}

#[test]
fn plugin_and_backend_params() {
    let p = Agent::plugin_params("POSIX").unwrap();
    for k in [
        "use_uring",
        "use_aio",
        "use_posix_aio",
        "ios_pool_size",
        "kernel_queue_size",
    ] {
        assert!(p.contains_key(k), "{k} missing from {p:?}");
    }
    assert_eq!(p["ios_pool_size"], "65536");
    assert_eq!(p["kernel_queue_size"], "256");
    assert_eq!(
        Agent::plugin_mem_types("POSIX").unwrap(),
        vec![MemType::Dram, MemType::File, MemType::Blk]
    );
    let a = agent_with(&[("use_posix_aio", "true")]);
    let bp = a.backend_params("POSIX").unwrap();
    assert_eq!(bp["engine"], "threads");
    assert_eq!(bp["use_posix_aio"], "true");
    let caps = a.backend_capabilities("POSIX").unwrap();
    assert!(caps.local && !caps.remote && !caps.notif);
    // Bad parameters refuse creation with InvalidParam.
    let mut bad = Params::new();
    bad.insert("kernel_queue_size".into(), "lots".into());
    let e = Agent::new(
        &unique("bad"),
        AgentConfig::default().backend_with("POSIX", bad),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
}

/// The whole shared conformance suite (`rixl-testkit`) on POSIX. The suite reads POSIX's
/// capabilities: its initiator moves DRAM, and its target memory is the first memory type POSIX
/// moves DRAM to, FILE (a temporary file registered by path, descriptors addressing file
/// offsets). Every case that applies to a local-only storage backend runs against its own agent
/// (self-target); the cases that need two agents or notifications print why they are skipped.
mod conformance {
    rixl_testkit::conformance_tests!(rixl_testkit::BackendHarness::new("POSIX"));
}

/// The suite again on the thread-pool engine (the default `auto` runs small buffered posts in
/// the posting thread and larger ones on the pool, or O_DIRECT files on io_uring).
mod conformance_threads {
    rixl_testkit::conformance_tests!(
        rixl_testkit::BackendHarness::new("POSIX").param("engine", "threads")
    );
}

/// The suite again with every post on io_uring (under `auto`, buffered files never use it).
mod conformance_uring {
    rixl_testkit::conformance_tests!(
        rixl_testkit::BackendHarness::new("POSIX").param("engine", "io_uring")
    );
}

/// The suite with BLK target memory: POSIX's other pair (DRAM ↔ BLK), a regular file standing
/// in for a block device as in `regular_file_standing_in_for_a_block_device`.
mod conformance_blk {
    rixl_testkit::conformance_tests!(
        rixl_testkit::BackendHarness::new("POSIX").target_mem(rixl::MemType::Blk)
    );
}

#[test]
fn dram_to_dram_skips_posix_for_the_next_backend() {
    // POSIX is created first (preferred) and registers DRAM too, but only moves DRAM to and
    // from storage: a DRAM→DRAM loopback request must go to LOOPBACK.
    let src = pattern(4096, 21);
    let mut dst = vec![0u8; 4096];
    let a = Agent::new(
        &unique("posix-then-loopback"),
        AgentConfig::default().backend("POSIX").backend("LOOPBACK"),
    )
    .unwrap();
    reg_dram(
        &a,
        &[(src.as_ptr() as u64, 4096), (dst.as_mut_ptr() as u64, 4096)],
    );
    let local = dlist(MemType::Dram, vec![Desc::new(src.as_ptr() as u64, 4096, 0)]);
    let target = dlist(
        MemType::Dram,
        vec![Desc::new(dst.as_mut_ptr() as u64, 4096, 0)],
    );
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &local,
            &target,
            a.name(),
            &XferOptions::default(),
        )
        .unwrap();
    assert_eq!(req.backend_name(), "LOOPBACK");
    req.post().unwrap();
    req.wait(Some(TIMEOUT)).unwrap();
    let lp = a.prep_xfer_dlist("", &local, &[]).unwrap();
    let rp = a.prep_xfer_dlist(a.name(), &target, &[]).unwrap();
    let made = a
        .make_xfer_req(XferOp::Write, &lp, &[0], &rp, &[0], &XferOptions::default())
        .unwrap();
    assert_eq!(made.backend_name(), "LOOPBACK");
    drop((req, made, lp, rp, a));
    assert_eq!(dst, src);
}
