//! Unit tests that drive the backend directly (without an agent): engines, chunking, errors,
//! fencing, the io_uring fallback. Agent-level tests live in `crates/rixl/tests/posix.rs`.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rixl_core::{Completion, ErrorKind, Segment, SegmentVec, XferStatus};

use super::*;

/// `auto` is io_uring for O_DIRECT files, the thread pool for buffered ones, and runs small
/// buffered posts in the posting thread.
const ENGINES: [&str; 3] = ["io_uring", "threads", "auto"];

fn backend_with(kv: &[(&str, &str)]) -> Posix {
    let p: Params = kv
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Posix::new(&p).unwrap()
}

fn backend(engine: &str) -> Posix {
    let b = backend_with(&[("engine", engine)]);
    let expect = if engine == "auto" { AUTO_LABEL } else { engine };
    assert_eq!(b.params()["engine"].as_str(), expect);
    b
}

/// A file in the temporary directory, removed on drop.
struct TmpFile(PathBuf);

impl TmpFile {
    fn new(tag: &str) -> TmpFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        TmpFile(
            std::env::temp_dir().join(format!("rixl-posix-unit-{}-{tag}-{n}", std::process::id())),
        )
    }

    fn meta(&self, mode: &str) -> Vec<u8> {
        format!("{mode}:{}", self.0.display()).into_bytes()
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A heap buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Registers a DRAM buffer. Every caller passes a buffer that it keeps alive, untouched by
/// anything but the backend, until its transfers have ended.
fn dram(b: &Posix, addr: u64, len: u64) -> u64 {
    // SAFETY: see above; the tests play the agent and uphold `Backend::register`'s contract.
    unsafe { b.register(MemType::Dram, &RegDesc::new(addr, len, 0)) }
        .unwrap()
        .token
}

/// Registers a file: storage, which carries no memory obligation.
fn storage(b: &Posix, mem: MemType, desc: &RegDesc) -> Result<LocalRegion> {
    // SAFETY: FILE (and the refused VRAM probe) name no memory of this process that the
    // backend could touch: `Backend::register`'s obligation applies to memory types only,
    // and a VRAM registration is refused before anything is touched.
    unsafe { b.register(mem, desc) }
}

fn file(b: &Posix, f: &TmpFile, mode: &str) -> u64 {
    storage(b, MemType::File, &RegDesc::with_meta(0, 0, 1, f.meta(mode)))
        .unwrap()
        .token
}

/// `(buffer address, file offset, length)` triples into a plan.
fn plan(b: &Posix, op: XferOp, dtok: u64, ftok: u64, segs: &[(u64, u64, u64)]) -> Result<Plan> {
    let local: SegmentVec = segs
        .iter()
        .map(|&(a, _, l)| Segment {
            addr: a,
            len: l,
            dev: 0,
            token: dtok,
        })
        .collect();
    let remote: SegmentVec = segs
        .iter()
        .map(|&(_, o, l)| Segment {
            addr: o,
            len: l,
            dev: 1,
            token: ftok,
        })
        .collect();
    b.build_plan(&XferSpec {
        op,
        peer: "me",
        loopback: true,
        local_mem: MemType::Dram,
        remote_mem: MemType::File,
        local,
        remote,
        ext: None,
    })
}

fn xfer(b: &Posix, op: XferOp, dtok: u64, ftok: u64, segs: &[(u64, u64, u64)]) -> PosixXfer {
    b.xfer_for(plan(b, op, dtok, ftok, segs).unwrap())
}

/// Posts and returns the completion cell without waiting. A post that finished before `post`
/// returned (inline, under `engine=auto`) or failed there is completed as the agent does.
fn start(x: &PosixXfer) -> Arc<Completion> {
    let c = Completion::new();
    let h = c.begin().unwrap();
    match x.post(None, h.clone()) {
        Ok(PostOutcome::InProgress) => {}
        Ok(PostOutcome::Done) => {
            h.complete(Ok(()));
        }
        Err(e) => {
            h.complete(Err(e));
        }
    }
    c
}

fn run(x: &PosixXfer) -> Result<XferStatus> {
    start(x).wait(Some(Duration::from_secs(120)))
}

#[test]
fn write_then_read_back_on_both_engines() {
    for engine in ENGINES {
        let b = backend(engine);
        let f = TmpFile::new("rt");
        let src = pattern(300_000, 7);
        let mut dst = vec![0u8; src.len()];
        let s = dram(&b, src.as_ptr() as u64, src.len() as u64);
        let d = dram(&b, dst.as_mut_ptr() as u64, dst.len() as u64);
        let ft = file(&b, &f, "rw,create");
        let a = src.as_ptr() as u64;
        // Unaligned sizes and offsets, out of order, with a hole in the file.
        let segs = [
            (a + 1000, 77, 99_999),
            (a, 500_001, 1000),
            (a + 100_999, 200_000, 199_001),
        ];
        let w = xfer(&b, XferOp::Write, s, ft, &segs);
        assert_eq!(run(&w).unwrap(), XferStatus::Done, "{engine}");
        // A second post moves the same bytes again.
        assert_eq!(run(&w).unwrap(), XferStatus::Done, "{engine}");
        let on_disk = std::fs::read(&f.0).unwrap();
        assert_eq!(on_disk.len(), 501_001);
        assert_eq!(&on_disk[77..77 + 99_999], &src[1000..100_999]);
        assert_eq!(&on_disk[500_001..], &src[..1000]);
        assert!(on_disk[100_076..200_000].iter().all(|&x| x == 0), "hole");
        let da = dst.as_mut_ptr() as u64;
        let rsegs = [
            (da + 1000, 77, 99_999),
            (da, 500_001, 1000),
            (da + 100_999, 200_000, 199_001),
        ];
        let r = xfer(&b, XferOp::Read, d, ft, &rsegs);
        assert_eq!(run(&r).unwrap(), XferStatus::Done, "{engine}");
        drop(r);
        assert_eq!(dst, src, "{engine}");
    }
}

#[test]
fn segments_are_split_at_max_io_size() {
    for engine in ENGINES {
        let b = backend_with(&[("engine", engine), ("max_io_size", "4096")]);
        let f = TmpFile::new("split");
        let src = pattern(100 * 1024 + 1, 3);
        let s = dram(&b, src.as_ptr() as u64, src.len() as u64);
        let ft = file(&b, &f, "rw,create");
        let p = plan(
            &b,
            XferOp::Write,
            s,
            ft,
            &[(src.as_ptr() as u64, 5, src.len() as u64)],
        )
        .unwrap();
        assert_eq!(p.chunks.len(), 26);
        assert!(p.chunks.iter().all(|c| c.len <= 4096));
        let w = xfer(
            &b,
            XferOp::Write,
            s,
            ft,
            &[(src.as_ptr() as u64, 5, src.len() as u64)],
        );
        run(&w).unwrap();
        assert_eq!(&std::fs::read(&f.0).unwrap()[5..], &src[..], "{engine}");
    }
}

#[test]
fn read_past_end_of_file_is_a_clear_error() {
    for engine in ENGINES {
        let b = backend(engine);
        let f = TmpFile::new("eof");
        std::fs::write(&f.0, pattern(1000, 1)).unwrap();
        let mut dst = vec![0u8; 4096];
        let d = dram(&b, dst.as_mut_ptr() as u64, 4096);
        let ft = file(&b, &f, "ro");
        let r = xfer(
            &b,
            XferOp::Read,
            d,
            ft,
            &[(dst.as_mut_ptr() as u64, 0, 4096)],
        );
        let e = run(&r).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend, "{engine}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("read of 4096 bytes at offset 0 of")
                && msg.contains("returned 1000: end of file"),
            "{engine}: {msg}"
        );
        assert!(msg.contains(&f.0.display().to_string()), "{msg}");
        // Entirely beyond the end.
        let r = xfer(
            &b,
            XferOp::Read,
            d,
            ft,
            &[(dst.as_mut_ptr() as u64, 8192, 10)],
        );
        let msg = run(&r).unwrap_err().to_string();
        assert!(msg.contains("returned 0: end of file"), "{engine}: {msg}");
        // The bytes that did exist arrived; the backend still works.
        assert_eq!(&dst[..1000], &pattern(1000, 1)[..]);
        let r = xfer(
            &b,
            XferOp::Read,
            d,
            ft,
            &[(dst.as_mut_ptr() as u64, 0, 1000)],
        );
        assert_eq!(run(&r).unwrap(), XferStatus::Done);
    }
}

#[test]
fn access_mode_is_enforced_at_prepare() {
    let b = backend("threads");
    let f = TmpFile::new("ro");
    std::fs::write(&f.0, b"x").unwrap();
    let src = [1u8; 16];
    let s = dram(&b, src.as_ptr() as u64, 16);
    let ft = file(&b, &f, "ro");
    let e = plan(&b, XferOp::Write, s, ft, &[(src.as_ptr() as u64, 0, 16)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    // fd mode: a write-only descriptor refuses READ.
    let wo = std::fs::OpenOptions::new().write(true).open(&f.0).unwrap();
    use std::os::fd::AsRawFd;
    let wt = storage(
        &b,
        MemType::File,
        &RegDesc::new(0, 0, wo.as_raw_fd() as u64),
    )
    .unwrap()
    .token;
    let e = plan(&b, XferOp::Read, s, wt, &[(src.as_ptr() as u64, 0, 16)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(plan(&b, XferOp::Write, s, wt, &[(src.as_ptr() as u64, 0, 16)]).is_ok());
    // O_APPEND would make every write land at the end of the file: refused, reads allowed.
    let ap = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(&f.0)
        .unwrap();
    let at = storage(
        &b,
        MemType::File,
        &RegDesc::new(0, 0, ap.as_raw_fd() as u64),
    )
    .unwrap()
    .token;
    let e = plan(&b, XferOp::Write, s, at, &[(src.as_ptr() as u64, 0, 16)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");
    assert!(e.to_string().contains("O_APPEND"), "{e}");
    assert!(plan(&b, XferOp::Read, s, at, &[(src.as_ptr() as u64, 0, 1)]).is_ok());
}

#[test]
fn o_direct_alignment_is_checked_at_prepare() {
    for engine in ENGINES {
        let b = backend(engine);
        let f = TmpFile::new("direct");
        let mut buf = Aligned::new(1 << 20);
        buf.slice_mut().copy_from_slice(&pattern(1 << 20, 9));
        let s = dram(&b, buf.addr(), 1 << 20);
        let ft = file(&b, &f, "rw,direct,create");
        let a = buf.addr();
        for (segs, what) in [
            ((a + 1, 0, 4096), "buffer address"),
            ((a, 100, 4096), "file offset 100"),
            ((a, 4096, 1000), "length 1000"),
        ] {
            let e = plan(&b, XferOp::Write, s, ft, &[segs]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
            let m = e.to_string();
            assert!(m.contains("O_DIRECT") && m.contains(what), "{m}");
        }
        let w = xfer(&b, XferOp::Write, s, ft, &[(a, 0, 1 << 20)]);
        run(&w).unwrap();
        let mut back = Aligned::new(1 << 20);
        let d = dram(&b, back.addr(), 1 << 20);
        let r = xfer(&b, XferOp::Read, d, ft, &[(back.addr(), 0, 1 << 20)]);
        run(&r).unwrap();
        assert!(back.slice() == buf.slice(), "{engine}");
        // An O_DIRECT read running into the end of the file reports it as such.
        let r = xfer(
            &b,
            XferOp::Read,
            d,
            ft,
            &[(back.addr(), (1 << 20) - 4096, 8192)],
        );
        let m = run(&r).unwrap_err().to_string();
        assert!(m.contains("returned 4096: end of file"), "{engine}: {m}");
        back.slice_mut()[0] = 0;
    }
}

#[test]
fn cancel_is_fenced() {
    for engine in ENGINES {
        for op in [XferOp::Write, XferOp::Read] {
            let b = backend_with(&[("engine", engine), ("max_io_size", "65536")]);
            let f = TmpFile::new("cancel");
            let len: usize = 64 << 20;
            std::fs::write(&f.0, vec![0xAAu8; len]).unwrap();
            let mut buf = vec![0x55u8; len];
            let d = dram(&b, buf.as_mut_ptr() as u64, len as u64);
            let ft = file(&b, &f, "rw");
            let x = xfer(&b, op, d, ft, &[(buf.as_mut_ptr() as u64, 0, len as u64)]);
            let c = start(&x);
            x.cancel().unwrap();
            // Fenced: every chunk of the post is accounted for when cancel returns.
            let post = x.current.lock().clone().unwrap();
            assert!(post.is_finished(), "{engine} {op}");
            match c.wait(Some(Duration::from_secs(60))) {
                Ok(XferStatus::Done) => {} // finished before the cancel arrived
                Err(e) => assert_eq!(e.kind(), ErrorKind::Canceled, "{engine} {op}: {e}"),
                other => panic!("{engine} {op}: {other:?}"),
            }
            // Nothing lands later: the file and the buffer stay as they were after cancel.
            let file_then = std::fs::read(&f.0).unwrap();
            let buf_then = buf.clone();
            std::thread::sleep(Duration::from_millis(50));
            assert!(std::fs::read(&f.0).unwrap() == file_then, "{engine} {op}");
            assert!(buf == buf_then, "{engine} {op}");
            // The request can be posted again and completes.
            assert_eq!(run(&x).unwrap(), XferStatus::Done);
        }
    }
}

#[test]
fn dropping_a_request_mid_post_is_fenced() {
    for engine in ENGINES {
        let b = backend_with(&[("engine", engine), ("max_io_size", "65536")]);
        let f = TmpFile::new("drop");
        let len: usize = 32 << 20;
        let src = vec![0x11u8; len];
        let s = dram(&b, src.as_ptr() as u64, len as u64);
        let ft = file(&b, &f, "rw,create");
        let x = xfer(
            &b,
            XferOp::Write,
            s,
            ft,
            &[(src.as_ptr() as u64, 0, len as u64)],
        );
        let c = start(&x);
        let post = x.current.lock().clone().unwrap();
        drop(x);
        assert!(post.is_finished(), "{engine}");
        let r = c.wait(Some(Duration::from_secs(60)));
        assert!(
            matches!(&r, Ok(XferStatus::Done))
                || matches!(&r, Err(e) if e.kind() == ErrorKind::Canceled),
            "{engine}: {r:?}"
        );
    }
}

#[test]
fn many_posts_from_many_threads() {
    for engine in ENGINES {
        let b = Arc::new(backend_with(&[
            ("engine", engine),
            ("kernel_queue_size", "8"),
        ]));
        let f = TmpFile::new("mt");
        let ft = file(&b, &f, "rw,create");
        std::thread::scope(|sc| {
            for t in 0..4u8 {
                let b = b.clone();
                sc.spawn(move || {
                    let src = pattern(64 * 1024, t);
                    let mut dst = vec![0u8; src.len()];
                    let s = dram(&b, src.as_ptr() as u64, src.len() as u64);
                    let d = dram(&b, dst.as_mut_ptr() as u64, dst.len() as u64);
                    let off = u64::from(t) * (1 << 20);
                    // 16 descriptors of 4 KiB each, more than the ring's 8 slots.
                    let segs: Vec<_> = (0..16u64)
                        .map(|i| (src.as_ptr() as u64 + i * 4096, off + i * 8192, 4096))
                        .collect();
                    let dsegs: Vec<_> = (0..16u64)
                        .map(|i| (dst.as_mut_ptr() as u64 + i * 4096, off + i * 8192, 4096))
                        .collect();
                    let w = xfer(&b, XferOp::Write, s, ft, &segs);
                    let r = xfer(&b, XferOp::Read, d, ft, &dsegs);
                    for _ in 0..20 {
                        run(&w).unwrap();
                        run(&r).unwrap();
                    }
                    drop(r);
                    assert_eq!(dst, src);
                });
            }
        });
    }
}

#[test]
fn unsupported_transfers_and_params() {
    let b = backend("threads");
    let v = [0u8; 64];
    let t = dram(&b, v.as_ptr() as u64, 64);
    let seg = |tok| {
        SegmentVec::from(vec![Segment {
            addr: v.as_ptr() as u64,
            len: 64,
            dev: 0,
            token: tok,
        }])
    };
    let e = b
        .build_plan(&XferSpec {
            op: XferOp::Write,
            peer: "me",
            loopback: true,
            local_mem: MemType::Dram,
            remote_mem: MemType::Dram,
            local: seg(t),
            remote: seg(t),
            ext: None,
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert_eq!(
        storage(&b, MemType::Vram, &RegDesc::new(1, 1, 0))
            .unwrap_err()
            .kind(),
        ErrorKind::NotSupported
    );
    // Too many operations for the pool.
    let b = backend_with(&[
        ("engine", "threads"),
        ("ios_pool_size", "2"),
        ("max_io_size", "4096"),
    ]);
    let f = TmpFile::new("pool");
    let big = vec![0u8; 3 * 4096];
    let s = dram(&b, big.as_ptr() as u64, big.len() as u64);
    let ft = file(&b, &f, "rw,create");
    let e = plan(
        &b,
        XferOp::Write,
        s,
        ft,
        &[(big.as_ptr() as u64, 0, 3 * 4096)],
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam);
    assert!(e.to_string().contains("ios_pool_size=2"), "{e}");
    assert!(plan(
        &b,
        XferOp::Write,
        s,
        ft,
        &[(big.as_ptr() as u64, 0, 2 * 4096)]
    )
    .is_ok());
    // Offsets past off_t.
    let e = plan(
        &b,
        XferOp::Write,
        s,
        ft,
        &[(big.as_ptr() as u64, u64::MAX - 10, 4)],
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidParam);
    // Unknown parameters and contradictions fail creation.
    let mut p = Params::new();
    p.insert("use_uring".into(), "true".into());
    p.insert("use_posix_aio".into(), "true".into());
    assert_eq!(Posix::new(&p).unwrap_err().kind(), ErrorKind::InvalidParam);
}

#[test]
fn params_report_the_engine_in_use() {
    let b = backend_with(&[]);
    let p = b.params();
    assert_eq!(p["engine"], b.params()["engine"].as_str());
    assert_eq!(p["ios_pool_size"], "65536");
    assert_eq!(p["kernel_queue_size"], "256");
    let b = backend_with(&[("use_posix_aio", "true")]);
    assert_eq!(b.params()["engine"], "threads");
    assert_eq!(b.params()["use_posix_aio"], "true");
    let b = backend_with(&[("use_uring", "true")]);
    assert_eq!(b.params()["engine"], "io_uring");
}

#[test]
fn deregistered_file_stays_open_for_live_requests() {
    let b = backend("io_uring");
    let f = TmpFile::new("dereg");
    let src = pattern(8192, 4);
    let s = dram(&b, src.as_ptr() as u64, 8192);
    let ft = file(&b, &f, "rw,create");
    let w = xfer(&b, XferOp::Write, s, ft, &[(src.as_ptr() as u64, 0, 8192)]);
    b.deregister(MemType::File, ft).unwrap();
    assert_eq!(
        b.deregister(MemType::File, ft).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // The plan still holds the file (the agent would refuse this post; the backend stays safe).
    run(&w).unwrap();
    assert_eq!(std::fs::read(&f.0).unwrap(), src);
    // A new request naming the old token is refused.
    assert_eq!(
        plan(&b, XferOp::Write, s, ft, &[(src.as_ptr() as u64, 0, 8192)])
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn query_mem_stats_paths() {
    let b = backend("threads");
    let f = TmpFile::new("query");
    std::fs::write(&f.0, vec![0u8; 1234]).unwrap();
    let descs = vec![
        RegDesc::with_meta(0, 0, 0, f.0.display().to_string()),
        RegDesc::with_meta(0, 0, 0, f.meta("rw,direct")),
        RegDesc::with_meta(0, 0, 0, "/no/such/file"),
        RegDesc::new(0, 0, 0),
    ];
    let q = b.query_mem(MemType::File, &descs).unwrap();
    assert_eq!(q.len(), 4);
    for e in &q[..2] {
        let e = e.as_ref().unwrap();
        assert_eq!(e["size"], "1234");
        let mode: u32 = e["mode"].parse().unwrap();
        assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
        let mtime: i64 = e["mtime"].parse().unwrap();
        assert!(mtime > 1_600_000_000);
    }
    assert!(q[2].is_none() && q[3].is_none());
}

/// Blocks `io_uring_setup` with a seccomp filter on a fresh thread (filters are per thread and
/// inherited by the threads it starts), as container runtimes do: `engine=auto` must fall back
/// to the thread pool and say why, and `engine=io_uring` must fail.
#[test]
fn falls_back_to_threads_when_io_uring_is_blocked() {
    let h = std::thread::spawn(|| {
        let filter = [
            libc::sock_filter {
                code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                jt: 0,
                jf: 0,
                k: 0, // offsetof(struct seccomp_data, nr)
            },
            libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: libc::SYS_io_uring_setup as u32,
            },
            libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            },
            libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ALLOW,
            },
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        assert_eq!(r, 0);
        // SAFETY: `prog` points at a valid filter program that outlives the call (the kernel
        // copies it); it only affects this thread and the threads it creates.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        };
        assert_eq!(r, 0, "seccomp: {}", std::io::Error::last_os_error());
        let b = backend_with(&[]);
        assert_eq!(b.params()["engine"].as_str(), "threads");
        let reason = &b.params()["engine_fallback_reason"];
        assert!(reason.contains("setup failed"), "{reason}");
        let e = Posix::new(&[("engine".to_owned(), "io_uring".to_owned())].into()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
        // The fallback engine moves data.
        let f = TmpFile::new("fallback");
        let src = pattern(10_000, 2);
        let s = dram(&b, src.as_ptr() as u64, src.len() as u64);
        let ft = file(&b, &f, "rw,create");
        run(&xfer(
            &b,
            XferOp::Write,
            s,
            ft,
            &[(src.as_ptr() as u64, 3, 10_000)],
        ))
        .unwrap();
        assert_eq!(&std::fs::read(&f.0).unwrap()[3..], &src[..]);
    });
    h.join().unwrap();
}

/// Registered-file slots come back at deregistration: more registrations than the table has
/// slots, one after the other, all get one.
#[test]
fn fixed_file_slots_are_recycled() {
    let b = backend("io_uring");
    let f = TmpFile::new("slots");
    std::fs::write(&f.0, b"x").unwrap();
    for i in 0..(uring::MAX_FIXED_FILES + 100) {
        let t = file(&b, &f, "ro");
        let has_slot = b.regions.read()[&t].fixed.is_some();
        if i == 0 && !has_slot {
            eprintln!(
                "SKIP: fixed_file_slots_are_recycled: this kernel or RLIMIT_NOFILE gives io_uring \
                 no registered-file table"
            );
            return;
        }
        assert!(has_slot, "a free slot for registration {i}");
        b.deregister(MemType::File, t).unwrap();
    }
}

/// `engine=auto`: O_DIRECT files go to io_uring, buffered ones to the thread pool, and small
/// buffered posts (except writes to O_SYNC files) start in the posting thread. The effective
/// parameters say so and create the same backend again.
#[test]
fn auto_routes_by_file_kind_and_size() {
    let b = backend("auto");
    let p = b.params();
    assert_eq!(p["engine"], AUTO_LABEL);
    assert_eq!(p["engine_direct"], "io_uring");
    assert_eq!(p["engine_buffered"], "threads");
    assert_eq!(p["inline_max_bytes"], "524288");
    let again = Posix::new(&p).unwrap();
    assert_eq!(again.params()["engine"].as_str(), AUTO_LABEL);
    let buf = Aligned::new(1 << 20);
    let s = dram(&b, buf.addr(), 1 << 20);
    let (fd, fb, fs) = (TmpFile::new("ad"), TmpFile::new("ab"), TmpFile::new("as"));
    let td = file(&b, &fd, "rw,direct,create");
    let tb = file(&b, &fb, "rw,create");
    let ts = file(&b, &fs, "rw,sync,create");
    let x = |op, tok, len| xfer(&b, op, s, tok, &[(buf.addr(), 0, len)]);
    for op in [XferOp::Write, XferOp::Read] {
        let d = x(op, td, 4096);
        assert_eq!((d.engine.name(), d.inline), ("io_uring", false), "{op}");
        let small = x(op, tb, 512 << 10);
        assert_eq!(
            (small.engine.name(), small.inline),
            ("threads", true),
            "{op}"
        );
        let big = x(op, tb, (512 << 10) + 4096);
        assert_eq!((big.engine.name(), big.inline), ("threads", false), "{op}");
        // Few bytes in too many pieces: 129 operations of 16 bytes.
        let pieces: Vec<_> = (0..129u64)
            .map(|i| (buf.addr() + i * 16, i * 32, 16))
            .collect();
        assert!(!xfer(&b, op, s, tb, &pieces).inline, "{op}");
        let pieces = &pieces[..128];
        assert!(xfer(&b, op, s, tb, pieces).inline, "{op}");
        // O_SYNC writes wait for the device: never inline; reads of such a file may be.
        let sync = x(op, ts, 4096);
        assert_eq!(sync.inline, op == XferOp::Read, "{op}");
    }
    // The explicit engines run everything themselves.
    for engine in ["io_uring", "threads"] {
        let e = backend(engine);
        assert_eq!(e.params()["engine_direct"], engine);
        assert_eq!(e.params()["engine_buffered"], engine);
        assert_eq!(e.params()["inline_max_bytes"], "0");
        let s = dram(&e, buf.addr(), 1 << 20);
        let t = file(&e, &fb, "rw");
        let w = xfer(&e, XferOp::Write, s, t, &[(buf.addr(), 0, 4096)]);
        assert_eq!((w.engine.name(), w.inline), (engine, false));
    }
    // inline_max_bytes=0 turns inline posts off.
    let b0 = backend_with(&[("inline_max_bytes", "0")]);
    let s0 = dram(&b0, buf.addr(), 1 << 20);
    let t0 = file(&b0, &fb, "rw");
    assert!(!xfer(&b0, XferOp::Write, s0, t0, &[(buf.addr(), 0, 4096)]).inline);
}

/// A small buffered post under `engine=auto` has moved its bytes when `post` returns.
#[test]
fn inline_posts_finish_before_post_returns() {
    let b = backend("auto");
    let f = TmpFile::new("inline");
    let src = pattern(20_000, 5);
    let mut dst = vec![0u8; src.len()];
    let s = dram(&b, src.as_ptr() as u64, src.len() as u64);
    let d = dram(&b, dst.as_mut_ptr() as u64, dst.len() as u64);
    let ft = file(&b, &f, "rw,create");
    let a = src.as_ptr() as u64;
    let segs = [(a + 10_000, 3, 10_000), (a, 50_000, 10_000)];
    let w = xfer(&b, XferOp::Write, s, ft, &segs);
    let c = Completion::new();
    assert_eq!(w.post(None, c.begin().unwrap()).unwrap(), PostOutcome::Done);
    let disk = std::fs::read(&f.0).unwrap();
    assert_eq!(&disk[3..10_003], &src[10_000..]);
    assert_eq!(&disk[50_000..], &src[..10_000]);
    let da = dst.as_mut_ptr() as u64;
    let r = xfer(
        &b,
        XferOp::Read,
        d,
        ft,
        &[(da + 10_000, 3, 10_000), (da, 50_000, 10_000)],
    );
    let c = Completion::new();
    assert_eq!(r.post(None, c.begin().unwrap()).unwrap(), PostOutcome::Done);
    // Cancelling or dropping an inline request has nothing to fence.
    r.cancel().unwrap();
    drop(r);
    assert_eq!(dst, src);
    // A read that runs into the end of the file is handed to the pool, which reports it.
    let short = TmpFile::new("inline-short");
    std::fs::write(&short.0, b"x").unwrap();
    let rt = file(&b, &short, "ro");
    let mut small = [0u8; 16];
    let st = dram(&b, small.as_mut_ptr() as u64, 16);
    let r = xfer(
        &b,
        XferOp::Read,
        st,
        rt,
        &[(small.as_mut_ptr() as u64, 0, 16)],
    );
    assert!(r.inline);
    let e = run(&r).unwrap_err();
    assert!(e.to_string().contains("returned 1: end of file"), "{e}");
}

/// An inline read stops at the first chunk whose data is not in the page cache and hands it
/// and the rest to the thread pool, which finishes the post.
#[test]
fn inline_read_hands_uncached_chunks_to_the_pool() {
    let b = backend_with(&[("max_io_size", "4096")]);
    let (fa, fb) = (TmpFile::new("hand-a"), TmpFile::new("hand-b"));
    std::fs::write(&fa.0, pattern(16384, 1)).unwrap();
    std::fs::write(&fb.0, pattern(16384, 2)).unwrap();
    let mut dst = vec![0u8; 32768];
    let d = dram(&b, dst.as_mut_ptr() as u64, dst.len() as u64);
    let ta = file(&b, &fa, "ro");
    let tb = file(&b, &fb, "ro");
    // As if file B's pages had been evicted (or its file system had no RWF_NOWAIT).
    b.regions.read()[&tb].nowait.store(false, Ordering::Relaxed);
    let da = dst.as_mut_ptr() as u64;
    let segs: Vec<SegmentPair> = vec![(da, 0, 16384, ta), (da + 16384, 0, 16384, tb)];
    let x = b.xfer_for(plan2(&b, XferOp::Read, d, &segs));
    assert!(x.inline);
    let c = Completion::new();
    let h = c.begin().unwrap();
    assert_eq!(x.post(None, h).unwrap(), PostOutcome::InProgress);
    assert_eq!(
        c.wait(Some(Duration::from_secs(60))).unwrap(),
        XferStatus::Done
    );
    let post = x.current.lock().clone().unwrap();
    assert_eq!(post.first, 4, "file A's four chunks ran inline");
    drop(x);
    assert_eq!(&dst[..16384], &pattern(16384, 1)[..]);
    assert_eq!(&dst[16384..], &pattern(16384, 2)[..]);
    // Really uncached data: dropped from the page cache, read back right.
    let f = TmpFile::new("hand-cold");
    std::fs::write(&f.0, pattern(32768, 3)).unwrap();
    let fh = std::fs::File::open(&f.0).unwrap();
    fh.sync_all().unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only advises the kernel about the open file's cache.
    unsafe { libc::posix_fadvise(fh.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    dst.fill(0);
    let t = file(&b, &f, "ro");
    let r = xfer(&b, XferOp::Read, d, t, &[(da, 0, 32768)]);
    assert_eq!(run(&r).unwrap(), XferStatus::Done);
    drop(r);
    assert_eq!(dst, pattern(32768, 3));
}

/// `(buffer address, file offset, length, file token)`.
type SegmentPair = (u64, u64, u64, u64);

/// A plan whose segments may name different files.
fn plan2(b: &Posix, op: XferOp, dtok: u64, segs: &[SegmentPair]) -> Plan {
    let local: SegmentVec = segs
        .iter()
        .map(|&(a, _, l, _)| Segment {
            addr: a,
            len: l,
            dev: 0,
            token: dtok,
        })
        .collect();
    let remote: SegmentVec = segs
        .iter()
        .map(|&(_, o, l, t)| Segment {
            addr: o,
            len: l,
            dev: 1,
            token: t,
        })
        .collect();
    b.build_plan(&XferSpec {
        op,
        peer: "me",
        loopback: true,
        local_mem: MemType::Dram,
        remote_mem: MemType::File,
        local,
        remote,
        ext: None,
    })
    .unwrap()
}

/// How the thread pool hands chunks to its workers: one O_DIRECT chunk per claim; a whole run
/// of buffered writes to one file per claim (the kernel serialises them anyway); byte-sized
/// batches of other buffered chunks (reads, O_SYNC writes).
#[test]
fn thread_pool_claims_follow_the_file_kind() {
    let b = backend_with(&[("engine", "threads"), ("max_io_size", "4096")]);
    let buf = Aligned::new(1 << 16);
    let s = dram(&b, buf.addr(), 1 << 16);
    let (fa, fb, fd, fs) = (
        TmpFile::new("cl-a"),
        TmpFile::new("cl-b"),
        TmpFile::new("cl-d"),
        TmpFile::new("cl-s"),
    );
    let ta = file(&b, &fa, "rw,create");
    let tb = file(&b, &fb, "rw,create");
    let td = file(&b, &fd, "rw,direct,create");
    let ts = file(&b, &fs, "rw,sync,create");
    let a = buf.addr();
    let claims = |op, segs: &[SegmentPair]| {
        let p = Arc::new(plan2(&b, op, s, segs));
        let c = Completion::new();
        threads::claims(Post::new(p, 0, c.begin().unwrap()), 8192)
    };
    // 2 × 4 chunks of 4 KiB on A, then 4 on B, then 4 on A again.
    let mixed = [
        (a, 0, 16384, ta),
        (a, 16384, 16384, ta),
        (a, 0, 16384, tb),
        (a, 32768, 16384, ta),
    ];
    assert_eq!(
        claims(XferOp::Write, &mixed),
        vec![(0, 8), (8, 12), (12, 16)]
    );
    assert_eq!(
        claims(XferOp::Read, &mixed),
        (0..8).map(|i| (2 * i, 2 * i + 2)).collect::<Vec<_>>()
    );
    for op in [XferOp::Write, XferOp::Read] {
        assert_eq!(
            claims(op, &[(a, 0, 16384, td)]),
            vec![(0, 1), (1, 2), (2, 3), (3, 4)],
            "{op}"
        );
        assert_eq!(
            claims(op, &[(a, 0, 16384, ts)]),
            vec![(0, 2), (2, 4)],
            "{op}"
        );
    }
    // And they move the right bytes.
    let src = pattern(1 << 16, 8);
    let s2 = dram(&b, src.as_ptr() as u64, 1 << 16);
    let p = src.as_ptr() as u64;
    let segs = [
        (p, 0, 16384, ta),
        (p + 16384, 0, 16384, tb),
        (p + 32768, 16384, 16384, ta),
        (p + 49152, 0, 16384, ts),
    ];
    let w = b.xfer_for(plan2(&b, XferOp::Write, s2, &segs));
    assert_eq!(run(&w).unwrap(), XferStatus::Done);
    let fa_data = std::fs::read(&fa.0).unwrap();
    assert_eq!(&fa_data[..16384], &src[..16384]);
    assert_eq!(&fa_data[16384..32768], &src[32768..49152]);
    assert_eq!(std::fs::read(&fb.0).unwrap(), &src[16384..32768]);
    assert_eq!(std::fs::read(&fs.0).unwrap(), &src[49152..]);
}

/// The per-file O_DIRECT budget of the io_uring engine: one operation always may start, more
/// only while the file's bytes in flight stay within the budget.
#[test]
fn in_flight_budget_admits() {
    let mib = 1u64 << 20;
    assert!(
        uring::admits(0, 256 * mib, 64 * mib),
        "one operation always goes"
    );
    assert!(uring::admits(48 * mib, 16 * mib, 64 * mib));
    assert!(!uring::admits(49 * mib, 16 * mib, 64 * mib));
    assert!(uring::admits(u64::MAX - 1, 16 * mib, u64::MAX), "no budget");
}

/// O_DIRECT posts under a small per-file budget: the bytes are right, a chunk larger than the
/// budget still runs, one file at its budget does not hold back another file's post, and the
/// budget is never exceeded by more than one operation.
#[test]
fn o_direct_budget_per_file_is_kept_and_posts_complete() {
    for engine in ["io_uring", "auto"] {
        let b = backend_with(&[
            ("engine", engine),
            ("max_io_size", "8192"),
            ("file_inflight_bytes", "16384"),
        ]);
        let len = 1 << 20;
        let mut src = Aligned::new(len);
        src.slice_mut().copy_from_slice(&pattern(len, 9));
        let dst = Aligned::new(len);
        let s = dram(&b, src.addr(), len as u64);
        let d = dram(&b, dst.addr(), len as u64);
        let (fa, fb) = (TmpFile::new("bud-a"), TmpFile::new("bud-b"));
        let ta = file(&b, &fa, "rw,direct,create");
        let tb = file(&b, &fb, "rw,direct,create");
        let half = (len / 2) as u64;
        // Reverse order on A, in order on B; two posts in flight at once.
        let wa: Vec<SegmentPair> = (0..16u64)
            .map(|i| (src.addr() + i * 32768, (15 - i) * 32768, 32768, ta))
            .collect();
        let wb: Vec<SegmentPair> = vec![(src.addr() + half, 0, half, tb)];
        let xa = b.xfer_for(plan2(&b, XferOp::Write, s, &wa));
        let xb = b.xfer_for(plan2(&b, XferOp::Write, s, &wb));
        let (ca, cb) = (start(&xa), start(&xb));
        let t = Some(Duration::from_secs(60));
        assert_eq!(ca.wait(t).unwrap(), XferStatus::Done, "{engine}");
        assert_eq!(cb.wait(t).unwrap(), XferStatus::Done, "{engine}");
        let ra: Vec<SegmentPair> = wa
            .iter()
            .map(|&(a, o, l, f)| (a - src.addr() + dst.addr(), o, l, f))
            .collect();
        let rb: Vec<SegmentPair> = vec![(dst.addr() + half, 0, half, tb)];
        let xa = b.xfer_for(plan2(&b, XferOp::Read, d, &ra));
        let xb = b.xfer_for(plan2(&b, XferOp::Read, d, &rb));
        let (ca, cb) = (start(&xa), start(&xb));
        assert_eq!(ca.wait(t).unwrap(), XferStatus::Done, "{engine}");
        assert_eq!(cb.wait(t).unwrap(), XferStatus::Done, "{engine}");
        drop((xa, xb));
        assert!(dst.slice() == src.slice(), "{engine}: read back differs");
        let regions = b.regions.read();
        for tok in [ta, tb] {
            let r = &regions[&tok];
            assert_eq!(
                r.ring_bytes.load(Ordering::Relaxed),
                0,
                "{engine}: all released"
            );
            let peak = r.ring_peak.load(Ordering::Relaxed);
            assert!(
                (8192..=16384).contains(&peak),
                "{engine}: {} had {peak} bytes in flight (budget 16384)",
                r.label
            );
        }
        drop(regions);
        // A single chunk larger than the budget still runs.
        let big = backend_with(&[("engine", engine), ("file_inflight_bytes", "4096")]);
        let s = dram(&big, src.addr(), len as u64);
        let t1 = file(&big, &fa, "rw,direct");
        let w = xfer(&big, XferOp::Write, s, t1, &[(src.addr(), 0, len as u64)]);
        assert_eq!(run(&w).unwrap(), XferStatus::Done, "{engine}");
        assert_eq!(std::fs::read(&fa.0).unwrap(), src.slice(), "{engine}");
    }
}

/// Overlapping buffered writes of one post to one file land in descriptor order, the last one
/// winning, on the engines that write a file's run of chunks with one worker (`threads`, and
/// `auto` both inline and on the pool). io_uring makes no such promise (nor does NIXL).
#[test]
fn overlapping_buffered_writes_land_in_descriptor_order() {
    for (engine, total) in [("threads", 2 << 20), ("auto", 2 << 20), ("auto", 256 << 10)] {
        let b = backend_with(&[("engine", engine), ("max_io_size", "4096")]);
        let f = TmpFile::new("order");
        let seg = total / 32;
        let src = pattern(total, 3);
        let s = dram(&b, src.as_ptr() as u64, total as u64);
        let t = file(&b, &f, "rw,create");
        // 32 segments of `seg` bytes, each starting a quarter segment after the previous one
        // and not 4 KiB aligned, so each overwrites three quarters of the one before.
        let segs: Vec<(u64, u64, u64)> = (0..32u64)
            .map(|i| {
                (
                    src.as_ptr() as u64 + i * seg as u64,
                    i * (seg as u64 / 4) + 7,
                    seg as u64,
                )
            })
            .collect();
        let w = xfer(&b, XferOp::Write, s, t, &segs);
        assert_eq!(w.inline, total <= 512 << 10, "{engine} {total}");
        assert_eq!(run(&w).unwrap(), XferStatus::Done, "{engine}");
        let mut expect = vec![0u8; 31 * (seg / 4) + 7 + seg];
        for &(a, o, l) in &segs {
            let from = (a - src.as_ptr() as u64) as usize;
            expect[o as usize..(o + l) as usize].copy_from_slice(&src[from..from + l as usize]);
        }
        assert!(
            std::fs::read(&f.0).unwrap() == expect,
            "{engine} {total}: overlapping writes out of order"
        );
    }
}
