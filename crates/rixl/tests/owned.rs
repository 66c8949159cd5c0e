//! Registration handles: `Agent::register_owned` (safe, the agent owns the buffer),
//! `Agent::register` (`unsafe`, RAII) and `Agent::register_storage` (safe, FILE/BLK/OBJ), with
//! `LOOPBACK` for memory and `POSIX` for a file.
//!
//! Every `unsafe` registration below follows `Agent::register`'s contract: the buffer is
//! declared before the agent (so it outlives it), and is not touched while registered.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rixl::{
    Agent, AgentConfig, Desc, ErrorKind, MemType, OwnedRegion, RegDesc, RegDescList,
    RegisterableBuffer, XferDescList, XferOp, XferOptions, XferRequest, XferStatus,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn loopback_agent() -> Agent {
    Agent::new(&unique("owned"), AgentConfig::default().backend("LOOPBACK")).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn dram(descs: Vec<Desc>) -> XferDescList {
    XferDescList::from_descs(MemType::Dram, descs)
}

/// A request writing `src` over `dst`, both regions of agent `a`.
fn write_req<S: RegisterableBuffer, D: RegisterableBuffer>(
    a: &Agent,
    src: &OwnedRegion<S>,
    dst: &OwnedRegion<D>,
) -> XferRequest {
    a.create_xfer_req(
        XferOp::Write,
        &dram(vec![src.desc()]),
        &dram(vec![dst.desc()]),
        a.name(),
        &XferOptions::default(),
    )
    .unwrap()
}

fn post_and_wait(req: &XferRequest) -> rixl::Result<XferStatus> {
    req.post()?;
    req.wait(Some(TIMEOUT))
}

fn read_all<B: RegisterableBuffer>(r: &OwnedRegion<B>) -> Vec<u8> {
    let mut out = vec![0u8; r.len()];
    r.read(0, &mut out).unwrap();
    out
}

#[track_caller]
fn expect_kind<T>(r: rixl::Result<T>, kind: ErrorKind) -> rixl::Error {
    match r {
        Ok(_) => panic!("expected {kind}, got Ok"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            e
        }
    }
}

fn one(mem: MemType, d: RegDesc) -> RegDescList {
    RegDescList::from_descs(mem, vec![d])
}

#[test]
fn owned_vec_and_box_move_bytes_and_come_back() {
    let a = loopback_agent();
    let data = pattern(64 << 10, 3);
    let mut src = a.register_owned(data.clone(), &[]).unwrap();
    let dst = a
        .register_owned(vec![0u8; 64 << 10].into_boxed_slice(), &[])
        .unwrap();
    assert_eq!(src.len(), data.len());
    assert_eq!(src.registration().backends(), ["LOOPBACK"]);
    assert_eq!(src.reg_desc().desc, src.desc());
    assert!(src.registration().is_registered());
    // A write through the handle lands in the registered bytes and travels with them.
    src.write(100, b"rixl").unwrap();
    let mut expect = data.clone();
    expect[100..104].copy_from_slice(b"rixl");

    let req = write_req(&a, &src, &dst);
    assert_eq!(post_and_wait(&req).unwrap(), XferStatus::Done);
    assert!(read_all(&dst) == expect, "the WRITE moved the bytes");

    // A sub-range: the first 4 KiB of dst back over the tail of src.
    let back = a
        .create_xfer_req(
            XferOp::Write,
            &dram(vec![dst.desc_range(0, 4096).unwrap()]),
            &dram(vec![src.desc_range(60 << 10, 4096).unwrap()]),
            a.name(),
            &XferOptions::default(),
        )
        .unwrap();
    assert_eq!(post_and_wait(&back).unwrap(), XferStatus::Done);
    let mut tail = vec![0u8; 4096];
    src.read(60 << 10, &mut tail).unwrap();
    assert!(tail == expect[..4096]);
    let dst_expect = expect.clone();
    let head = expect[..4096].to_vec();
    expect[60 << 10..].copy_from_slice(&head);

    let dst_buf: Box<[u8]> = dst.into_inner().unwrap();
    assert!(
        dst_buf[..] == dst_expect[..],
        "dst came back with the transferred bytes"
    );
    let src_buf: Vec<u8> = src.into_inner().unwrap();
    assert!(
        src_buf == expect,
        "src came back with its own writes and the write-back"
    );
    // Given back means deregistered: the old requests now fail.
    expect_kind(post_and_wait(&req), ErrorKind::NotFound);
}

#[test]
fn dropping_an_owned_region_deregisters_it() {
    let a = loopback_agent();
    let src = a.register_owned(pattern(8192, 1), &[]).unwrap();
    let dst = a.register_owned(vec![0u8; 8192], &[]).unwrap();
    let req = write_req(&a, &src, &dst);
    assert_eq!(post_and_wait(&req).unwrap(), XferStatus::Done);
    let dst_desc = dst.desc();
    drop(dst);
    let e = expect_kind(post_and_wait(&req), ErrorKind::NotFound);
    assert!(e.message().contains("deregistered"), "{e}");
    // And no new request can target the range.
    expect_kind(
        a.create_xfer_req(
            XferOp::Write,
            &dram(vec![src.desc()]),
            &dram(vec![dst_desc]),
            a.name(),
            &XferOptions::default(),
        ),
        ErrorKind::NotFound,
    );
}

#[test]
fn registration_handles_deregister_on_drop_and_explicitly() {
    let mut buf = vec![0u8; 16 << 10];
    let a = loopback_agent();
    let list = one(
        MemType::Dram,
        RegDesc::new(buf.as_mut_ptr() as u64, buf.len() as u64, 0),
    );
    // SAFETY: see the module documentation.
    let reg = unsafe { a.register(&list, &[]) }.unwrap();
    assert_eq!(reg.mem(), MemType::Dram);
    assert_eq!(reg.descs(), list.descs());
    assert_eq!(reg.backends(), ["LOOPBACK"]);
    assert!(reg.is_registered());
    // The range is taken while the handle lives...
    // SAFETY: see the module documentation.
    expect_kind(unsafe { a.register(&list, &[]) }, ErrorKind::InvalidParam);
    // SAFETY: see the module documentation.
    expect_kind(
        unsafe { a.register_mem(&list, &[]) },
        ErrorKind::InvalidParam,
    );
    // ... and only the handle deregisters it.
    let e = expect_kind(a.deregister_mem(&list, &[]), ErrorKind::InvalidParam);
    assert!(e.message().contains("handle"), "{e}");
    drop(reg);
    // Free again: dropping deregistered it.
    // SAFETY: see the module documentation.
    let reg = unsafe { a.register(&list, &[]) }.unwrap();
    reg.deregister().unwrap();
    // Free again after an explicit deregistration; a plain registration works too.
    // SAFETY: see the module documentation.
    unsafe { a.register_mem(&list, &[]) }.unwrap();
    a.deregister_mem(&list, &[]).unwrap();
    drop(a);
    drop(buf);
}

#[test]
fn a_handle_deregisters_only_its_own_registration() {
    let mut buf = vec![0u8; 4096];
    let a = Agent::new(
        &unique("overlap"),
        AgentConfig {
            allow_overlapping_registrations: true,
            ..AgentConfig::default().backend("LOOPBACK")
        },
    )
    .unwrap();
    let list = one(
        MemType::Dram,
        RegDesc::new(buf.as_mut_ptr() as u64, buf.len() as u64, 0),
    );
    // The same range twice: once by a handle, once plainly.
    // SAFETY: see the module documentation.
    let reg = unsafe { a.register(&list, &[]) }.unwrap();
    // SAFETY: see the module documentation.
    unsafe { a.register_mem(&list, &[]) }.unwrap();
    // `deregister_mem` takes the plain one, never the handle's ...
    a.deregister_mem(&list, &[]).unwrap();
    assert!(reg.is_registered());
    expect_kind(a.deregister_mem(&list, &[]), ErrorKind::InvalidParam);
    // ... and the handle its own.
    reg.deregister().unwrap();
    expect_kind(a.deregister_mem(&list, &[]), ErrorKind::NotFound);
    drop(a);
    drop(buf);
}

/// A scratch directory, removed with its contents on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("rixl-owned-test-{}", unique(tag)));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn register_storage_refuses_memory_and_registers_a_file() {
    let dir = Scratch::new("storage");
    let path = dir.0.join("kv.bin");
    let a = Agent::new(&unique("posix"), AgentConfig::default().backend("POSIX")).unwrap();
    for mem in [MemType::Dram, MemType::Vram] {
        let e = expect_kind(
            a.register_storage(&one(mem, RegDesc::new(0x1000, 4096, 0)), &[]),
            ErrorKind::InvalidParam,
        );
        assert!(e.message().contains("register_owned"), "{e}");
        assert!(e.message().contains(&mem.to_string()), "{e}");
    }

    let file = one(
        MemType::File,
        RegDesc::with_meta(0, 0, 7, format!("rw,create:{}", path.display())),
    );
    let reg = a.register_storage(&file, &[]).unwrap();
    assert_eq!(reg.mem(), MemType::File);
    assert_eq!(reg.backends(), ["POSIX"]);
    let data = pattern(8192, 9);
    let src = a.register_owned(data.clone(), &["POSIX"]).unwrap();
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &dram(vec![src.desc()]),
            &XferDescList::from_descs(MemType::File, vec![Desc::new(4096, 8192, 7)]),
            a.name(),
            &XferOptions::default(),
        )
        .unwrap();
    assert_eq!(post_and_wait(&req).unwrap(), XferStatus::Done);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len(), 4096 + 8192);
    assert_eq!(on_disk[4096..], data[..]);
    // The file registration is the handle's: dropping it ends it.
    drop(reg);
    expect_kind(post_and_wait(&req), ErrorKind::NotFound);
    assert_eq!(src.into_inner().unwrap(), data);
}

#[test]
fn out_of_range_access_is_refused() {
    let a = loopback_agent();
    let mut r = a.register_owned(vec![7u8; 100], &[]).unwrap();
    let mut out = [0u8; 10];
    expect_kind(r.read(91, &mut out), ErrorKind::InvalidParam);
    expect_kind(r.read(usize::MAX, &mut out), ErrorKind::InvalidParam);
    expect_kind(r.write(95, &[1u8; 6]), ErrorKind::InvalidParam);
    expect_kind(r.write(usize::MAX - 2, &[1u8; 6]), ErrorKind::InvalidParam);
    expect_kind(r.desc_range(50, 51), ErrorKind::InvalidParam);
    // Nothing was written by the refused calls; in-range calls work up to the last byte.
    r.write(90, &[1u8; 10]).unwrap();
    r.read(90, &mut out).unwrap();
    assert_eq!(out, [1u8; 10]);
    r.read(100, &mut []).unwrap();
    let buf = r.into_inner().unwrap();
    assert_eq!(buf[..90], [7u8; 90]);
    assert_eq!(buf[90..], [1u8; 10]);
}

#[test]
fn registering_an_empty_buffer_is_refused() {
    let a = loopback_agent();
    expect_kind(a.register_owned(Vec::new(), &[]), ErrorKind::InvalidParam);
    expect_kind(
        a.register_owned(vec![1u8; 8], &["NO_SUCH_BACKEND"]),
        ErrorKind::NotFound,
    );
}

#[test]
fn handles_outliving_the_agent() {
    let mut raw = vec![0u8; 4096];
    let a = loopback_agent();
    let kept = a.register_owned(pattern(4096, 5), &[]).unwrap();
    let dropped = a.register_owned(vec![1u8; 4096], &[]).unwrap();
    let list = one(
        MemType::Dram,
        RegDesc::new(raw.as_mut_ptr() as u64, raw.len() as u64, 0),
    );
    // SAFETY: see the module documentation.
    let reg = unsafe { a.register(&list, &[]) }.unwrap();
    let req = write_req(&a, &kept, &dropped);
    drop(a);
    assert!(!kept.registration().is_registered());
    assert!(!reg.is_registered());
    // The request holds the agent's internals alive, but the agent is gone all the same.
    expect_kind(post_and_wait(&req), ErrorKind::NotFound);
    drop(dropped);
    drop(reg);
    // Still readable, and given back once the agent's teardown released it.
    assert_eq!(read_all(&kept), pattern(4096, 5));
    assert_eq!(kept.into_inner().unwrap(), pattern(4096, 5));
    drop(req);
    drop(raw);
}

#[test]
fn explicit_deregistration_after_the_agent_is_gone() {
    let mut raw = vec![0u8; 4096];
    let a = loopback_agent();
    let list = one(
        MemType::Dram,
        RegDesc::new(raw.as_mut_ptr() as u64, raw.len() as u64, 0),
    );
    // SAFETY: see the module documentation.
    let reg = unsafe { a.register(&list, &[]) }.unwrap();
    let owned = a.register_owned(vec![2u8; 512], &[]).unwrap();
    drop(a);
    reg.deregister().unwrap();
    drop(owned);
    drop(raw);
}

#[test]
fn handles_move_between_threads() {
    let a = loopback_agent();
    let src = a.register_owned(pattern(4096, 7), &[]).unwrap();
    let dst = a.register_owned(vec![0u8; 4096], &[]).unwrap();
    let req = write_req(&a, &src, &dst);
    let dst = std::thread::spawn(move || {
        assert_eq!(post_and_wait(&req).unwrap(), XferStatus::Done);
        dst
    })
    .join()
    .unwrap();
    let src = std::thread::spawn(move || src.into_inner().unwrap())
        .join()
        .unwrap();
    assert_eq!(read_all(&dst), src);
}

#[cfg(feature = "mmap")]
#[test]
fn an_anonymous_mapping_registers_and_moves_bytes() {
    let a = loopback_agent();
    let mut map = memmap2::MmapMut::map_anon(8192).unwrap();
    map.copy_from_slice(&pattern(8192, 11));
    let src = a.register_owned(map, &[]).unwrap();
    let dst = a.register_owned(vec![0u8; 8192], &[]).unwrap();
    assert_eq!(
        post_and_wait(&write_req(&a, &src, &dst)).unwrap(),
        XferStatus::Done
    );
    assert_eq!(read_all(&dst), pattern(8192, 11));
    let map = src.into_inner().unwrap();
    assert_eq!(map[..], pattern(8192, 11)[..]);
}
