//! Target memory: what a case's requests write to and read from.
//!
//! The suite's initiator always moves host memory ([`TestBuffer`], DRAM). The other side of a
//! request, the *target memory*, is of the type the backend moves DRAM to, chosen from its
//! declared [`Capabilities::moves`] by [`target_mem_type`]: DRAM when the backend moves DRAM to
//! DRAM (LOOPBACK, SHM, TCP), else the first `(DRAM, X)` pair whose `X` the suite can make:
//! FILE or BLK, both backed by a [`TestFile`] (POSIX). A harness can name another supported
//! pair with [`BackendHarness::target_mem`](crate::BackendHarness::target_mem).
//!
//! [`TargetMem`] is that memory for one case: a [`TestBuffer`] for DRAM, a [`TestFile`] for a
//! storage type. Cases describe and inspect it through [`TestMem`], the interface that
//! [`TestBuffer`] and [`TestFile`] share: descriptors (`addr` = address for DRAM, file offset
//! for storage; `dev` = 0 for DRAM, the registration's key for storage), registration
//! descriptors, and reading, filling and asserting byte ranges. A case written against
//! `TestMem` runs unchanged on every target type.
//!
//! Storage registrations carry no memory obligation, so the suite's registration rule (buffers
//! outlive their agents) concerns DRAM only; a [`TestFile`] removes its file when dropped, which
//! is harmless even while a backend still holds it open.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rixl::{Capabilities, Desc, MemType, RegDesc, RegDescList};

use crate::{assert_bytes_eq, pattern, TestBuffer};

/// Target memory types the suite can make, in the order [`target_mem_type`] prefers them.
pub const SUPPORTED_TARGETS: [MemType; 3] = [MemType::Dram, MemType::File, MemType::Blk];

/// The target memory type of a backend that declares `caps`: DRAM when it moves DRAM to DRAM,
/// else the target side of the first `(DRAM, X)` pair of `caps.moves` with `X` in
/// [`SUPPORTED_TARGETS`]. `None` when the backend moves DRAM to nothing the suite can make
/// (then every case that moves data is skipped, saying so).
pub fn target_mem_type(caps: &Capabilities) -> Option<MemType> {
    if caps.can_move(MemType::Dram, MemType::Dram) {
        return Some(MemType::Dram);
    }
    caps.moves
        .iter()
        .find(|(l, t)| *l == MemType::Dram && SUPPORTED_TARGETS.contains(t))
        .map(|&(_, t)| t)
}

/// Memory a case describes in requests and inspects afterwards: host memory
/// ([`TestBuffer`]), a file ([`TestFile`]), or either ([`TargetMem`]).
///
/// Reads and asserts go through the memory's owner (the buffer's bytes, the file's contents);
/// as with [`TestBuffer::as_slice`], use them only while no transfer into the memory is in
/// flight.
pub trait TestMem: Sync + fmt::Debug {
    /// The memory type of its descriptors and registrations.
    fn mem(&self) -> MemType;

    /// Length in bytes.
    fn len(&self) -> usize;

    /// Always false: test memory is never empty.
    fn is_empty(&self) -> bool {
        false
    }

    /// The descriptor of `len` bytes at `offset`, without checking that they lie inside
    /// (for descriptors that run past a registration on purpose).
    fn desc_unchecked(&self, offset: usize, len: usize) -> Desc;

    /// The descriptor of `len` bytes at `offset`; panics if out of bounds.
    fn desc(&self, offset: usize, len: usize) -> Desc {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len()),
            "descriptor {offset}+{len} outside {} bytes of {}",
            self.len(),
            self.mem()
        );
        self.desc_unchecked(offset, len)
    }

    /// A descriptor for the whole memory.
    fn whole(&self) -> Desc {
        self.desc_unchecked(0, self.len())
    }

    /// A registration descriptor for `len` bytes at `offset`, with the meta its memory type
    /// needs (a file's path).
    fn reg_range(&self, offset: usize, len: usize) -> RegDesc;

    /// A registration descriptor for the whole memory.
    fn reg_desc(&self) -> RegDesc {
        self.reg_range(0, self.len())
    }

    /// A one-entry registration list for the whole memory.
    fn reg_list(&self) -> RegDescList {
        RegDescList::from_descs(self.mem(), vec![self.reg_desc()])
    }

    /// A copy of `len` bytes at `offset`.
    fn read(&self, offset: usize, len: usize) -> Vec<u8>;

    /// Every byte: borrowed for host memory, read for storage.
    fn contents(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.read(0, self.len()))
    }

    /// Asserts that the bytes at `offset` equal `expected`.
    #[track_caller]
    fn assert_range(&self, offset: usize, expected: &[u8], what: &str) {
        assert_bytes_eq(&self.read(offset, expected.len()), expected, what);
    }

    /// Asserts that `len` bytes at `offset` are all `b`.
    #[track_caller]
    fn assert_filled(&self, offset: usize, len: usize, b: u8, what: &str) {
        let s = self.read(offset, len);
        if let Some(p) = s.iter().position(|&x| x != b) {
            panic!(
                "{what}: byte at offset {} is {:#04x}, expected {b:#04x}",
                offset + p,
                s[p]
            );
        }
    }
}

/// The host-memory implementation: the buffer's own methods, under the shared names.
impl TestMem for TestBuffer {
    fn mem(&self) -> MemType {
        MemType::Dram
    }
    fn len(&self) -> usize {
        TestBuffer::len(self)
    }
    fn desc_unchecked(&self, offset: usize, len: usize) -> Desc {
        Desc::new(self.addr() + offset as u64, len as u64, 0)
    }
    fn desc(&self, offset: usize, len: usize) -> Desc {
        TestBuffer::desc(self, offset, len)
    }
    fn whole(&self) -> Desc {
        TestBuffer::whole(self)
    }
    fn reg_range(&self, offset: usize, len: usize) -> RegDesc {
        RegDesc::new(self.addr() + offset as u64, len as u64, 0)
    }
    fn reg_desc(&self) -> RegDesc {
        TestBuffer::reg_desc(self)
    }
    fn reg_list(&self) -> RegDescList {
        TestBuffer::reg_list(self)
    }
    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        TestBuffer::read(self, offset, len)
    }
    fn contents(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_slice())
    }
    #[track_caller]
    fn assert_range(&self, offset: usize, expected: &[u8], what: &str) {
        TestBuffer::assert_range(self, offset, expected, what);
    }
    #[track_caller]
    fn assert_filled(&self, offset: usize, len: usize, b: u8, what: &str) {
        TestBuffer::assert_filled(self, offset, len, b, what);
    }
}

/// A zeroed temporary file of fixed length, as FILE or BLK target memory (POSIX accepts a
/// regular file as a block device).
///
/// It is registered in POSIX's path mode: the registration descriptor covers `[0, len)` on the
/// file's own `dev` key, with meta `"rw:<path>"`, so the registering agent (in this process or a
/// peer process) opens the file itself; transfer descriptors address file offsets on that
/// key. Keys are unique in the process, so any number of test files can be registered with one
/// agent. The file is removed on drop.
pub struct TestFile {
    mem: MemType,
    path: PathBuf,
    file: File,
    dev: u64,
    len: usize,
}

impl TestFile {
    /// A zeroed file of `len` (> 0) bytes, registered as `mem` (FILE or BLK).
    pub fn new(mem: MemType, len: usize) -> TestFile {
        assert!(len > 0, "a TestFile must not be empty");
        assert!(
            matches!(mem, MemType::File | MemType::Blk),
            "a TestFile stands for FILE or BLK memory, not {mem}"
        );
        // Keys far from small numbers, so that no test descriptor on "another device" (dev 1)
        // and no fd-mode registration of a small fd can hit one.
        static NEXT_DEV: AtomicU64 = AtomicU64::new(0x7E57_0000);
        let path =
            std::env::temp_dir().join(format!("{}.bin", crate::unique_name("rixl-testkit-file")));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot create the test file {}: {e}", path.display()));
        file.set_len(len as u64)
            .unwrap_or_else(|e| panic!("cannot size the test file {}: {e}", path.display()));
        TestFile {
            mem,
            path,
            file,
            dev: NEXT_DEV.fetch_add(1, Ordering::Relaxed),
            len,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key its registrations and descriptors carry as `dev`.
    pub fn dev(&self) -> u64 {
        self.dev
    }

    /// The registration meta: POSIX's path mode, read-write.
    pub fn meta(&self) -> String {
        format!("rw:{}", self.path.display())
    }

    /// Copies `bytes` to `offset`.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.len,
            "write outside the test file"
        );
        self.file
            .write_all_at(bytes, offset as u64)
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.path.display()));
    }

    /// Sets every byte to `b`.
    pub fn fill(&mut self, b: u8) {
        let v = vec![b; self.len];
        self.write(0, &v);
    }

    /// Fills the file with `pattern(seed, 0, len)`.
    pub fn fill_pattern(&mut self, seed: u64) {
        let p = pattern(seed, 0, self.len);
        self.write(0, &p);
    }
}

impl TestMem for TestFile {
    fn mem(&self) -> MemType {
        self.mem
    }
    fn len(&self) -> usize {
        self.len
    }
    fn desc_unchecked(&self, offset: usize, len: usize) -> Desc {
        Desc::new(offset as u64, len as u64, self.dev)
    }
    fn reg_range(&self, offset: usize, len: usize) -> RegDesc {
        RegDesc::with_meta(offset as u64, len as u64, self.dev, self.meta())
    }
    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len, "read outside the test file");
        let mut v = vec![0u8; len];
        self.file
            .read_exact_at(&mut v, offset as u64)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()));
        v
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl fmt::Debug for TestFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestFile")
            .field("mem", &self.mem)
            .field("path", &self.path)
            .field("dev", &self.dev)
            .field("len", &self.len)
            .finish()
    }
}

/// Target memory of one memory type: what a case's requests write to and read from (see the
/// module documentation). Zeroed when made.
#[derive(Debug)]
pub enum TargetMem {
    /// Host memory.
    Dram(TestBuffer),
    /// A file standing for FILE or BLK memory.
    File(TestFile),
}

impl TargetMem {
    /// `len` zeroed bytes of type `mem`; panics for a type the suite cannot make (see
    /// [`SUPPORTED_TARGETS`]).
    pub fn of(mem: MemType, len: usize) -> TargetMem {
        match mem {
            MemType::Dram => TargetMem::Dram(TestBuffer::new(len)),
            MemType::File | MemType::Blk => TargetMem::File(TestFile::new(mem, len)),
            other => panic!("the suite cannot make {other} target memory"),
        }
    }

    /// `len` zeroed bytes of the harness's target memory type ([`Harness::target_mem`]).
    ///
    /// [`Harness::target_mem`]: crate::Harness::target_mem
    pub fn new(h: &dyn crate::Harness, len: usize) -> TargetMem {
        let mem = h.target_mem().unwrap_or_else(|| {
            panic!(
                "backend {} moves DRAM to no memory type the suite can make",
                h.backend()
            )
        });
        TargetMem::of(mem, len)
    }

    /// Memory of type `mem` holding `pattern(seed, 0, len)`.
    pub fn with_pattern(mem: MemType, len: usize, seed: u64) -> TargetMem {
        let mut t = TargetMem::of(mem, len);
        t.fill_pattern(seed);
        t
    }

    fn as_mem(&self) -> &dyn TestMem {
        match self {
            TargetMem::Dram(b) => b,
            TargetMem::File(f) => f,
        }
    }

    /// Copies `bytes` to `offset`.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        match self {
            TargetMem::Dram(b) => b.write(offset, bytes),
            TargetMem::File(f) => f.write(offset, bytes),
        }
    }

    /// Sets every byte to `b`.
    pub fn fill(&mut self, b: u8) {
        match self {
            TargetMem::Dram(buf) => buf.fill(b),
            TargetMem::File(f) => f.fill(b),
        }
    }

    /// Fills the memory with `pattern(seed, 0, len)`.
    pub fn fill_pattern(&mut self, seed: u64) {
        match self {
            TargetMem::Dram(b) => b.fill_pattern(seed),
            TargetMem::File(f) => f.fill_pattern(seed),
        }
    }
}

impl TestMem for TargetMem {
    fn mem(&self) -> MemType {
        self.as_mem().mem()
    }
    fn len(&self) -> usize {
        self.as_mem().len()
    }
    fn desc_unchecked(&self, offset: usize, len: usize) -> Desc {
        self.as_mem().desc_unchecked(offset, len)
    }
    fn desc(&self, offset: usize, len: usize) -> Desc {
        self.as_mem().desc(offset, len)
    }
    fn whole(&self) -> Desc {
        self.as_mem().whole()
    }
    fn reg_range(&self, offset: usize, len: usize) -> RegDesc {
        self.as_mem().reg_range(offset, len)
    }
    fn reg_desc(&self) -> RegDesc {
        self.as_mem().reg_desc()
    }
    fn reg_list(&self) -> RegDescList {
        self.as_mem().reg_list()
    }
    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        self.as_mem().read(offset, len)
    }
    fn contents(&self) -> Cow<'_, [u8]> {
        self.as_mem().contents()
    }
    #[track_caller]
    fn assert_range(&self, offset: usize, expected: &[u8], what: &str) {
        self.as_mem().assert_range(offset, expected, what);
    }
    #[track_caller]
    fn assert_filled(&self, offset: usize, len: usize, b: u8, what: &str) {
        self.as_mem().assert_filled(offset, len, b, what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_type_from_capabilities() {
        let dram = Capabilities::new(&[MemType::Dram]).moving(MemType::Dram, MemType::Dram);
        assert_eq!(target_mem_type(&dram), Some(MemType::Dram));
        let posix = Capabilities::new(&[MemType::Dram, MemType::File, MemType::Blk])
            .moving(MemType::Dram, MemType::File)
            .moving(MemType::Dram, MemType::Blk);
        assert_eq!(target_mem_type(&posix), Some(MemType::File));
        let both = posix.clone().moving(MemType::Dram, MemType::Dram);
        assert_eq!(target_mem_type(&both), Some(MemType::Dram), "DRAM first");
        let obj = Capabilities::new(&[MemType::Dram, MemType::Obj])
            .moving(MemType::Dram, MemType::Obj)
            .moving(MemType::Dram, MemType::Blk);
        assert_eq!(target_mem_type(&obj), Some(MemType::Blk), "OBJ is not made");
        let gds =
            Capabilities::new(&[MemType::Vram, MemType::File]).moving(MemType::Vram, MemType::File);
        assert_eq!(target_mem_type(&gds), None, "the initiator side is DRAM");
    }

    #[test]
    fn file_memory_reads_writes_and_describes_offsets() {
        let mut f = TargetMem::of(MemType::File, 10_000);
        f.assert_filled(0, 10_000, 0, "fresh file");
        f.fill_pattern(7);
        assert_eq!(f.read(3, 20), pattern(7, 3, 20));
        f.write(5, &[1, 2, 3]);
        f.assert_range(5, &[1, 2, 3], "write");
        let TargetMem::File(tf) = &f else {
            panic!("a file")
        };
        assert_eq!(f.desc(10, 20), Desc::new(10, 20, tf.dev()));
        let r = f.reg_desc();
        assert_eq!(r.desc, Desc::new(0, 10_000, tf.dev()));
        assert_eq!(r.meta, format!("rw:{}", tf.path().display()).into_bytes());
        let path = tf.path().to_owned();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000);
        drop(f);
        assert!(!path.exists(), "removed on drop");
    }
}
