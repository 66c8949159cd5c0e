//! Registration handles, and registration without `unsafe` for memory the agent can own.
//!
//! [`Agent::register_mem`] is `unsafe` for a reason that no API can wish away: a backend reads
//! and writes registered memory by address, from its own threads and on behalf of peers, so
//! registering memory is a promise that it stays allocated, and untouched by references, for as
//! long as any backend may use it. Safe code cannot make that promise about memory it does not
//! own. What it can do is hand the memory over:
//!
//! - [`Agent::register_owned`] takes a buffer *by value* (a `Vec<u8>`, a `Box<[u8]>`, with the
//!   `mmap` feature a `memmap2::MmapMut`: anything implementing [`RegisterableBuffer`], whose
//!   bytes do not move when the value does) and returns an [`OwnedRegion`] that owns it for as
//!   long as it is registered. The program reaches the bytes only through copies
//!   ([`OwnedRegion::read`], [`OwnedRegion::write`]), never through a reference that a backend
//!   could write behind, and gets the buffer back with [`OwnedRegion::into_inner`].
//! - Deregistration is fenced (see `fence`): the handle closes its regions to new posts, waits
//!   for the posts in flight that use them, then tells the backends. Only when every backend has
//!   released every region and no post uses any of them is the buffer freed or given back, so
//!   "drop, then free" is sound. When that cannot be established (a post still runs after
//!   `AgentConfig::deregister_timeout`, a backend fails to release a region) the buffer is
//!   leaked, never freed: a leak is a bug, memory freed under a backend's feet is corruption.
//! - [`Agent::register_storage`] registers FILE, BLK and OBJ lists, whose addresses are offsets
//!   in files, volumes and objects, not memory of this process, so there is nothing to promise.
//! - [`Agent::register`] is `register_mem` with a [`Registration`] handle (RAII): still
//!   `unsafe`, for memory the program manages itself (pools, pinned or device memory), but the
//!   handle deregisters exactly its own registrations when dropped.
//!
//! Regions registered through a handle are deregistered by that handle only:
//! [`Agent::deregister_mem`] refuses them (`InvalidParam`), so no other code can end a
//! registration a handle still counts on, or make a handle remove someone else's registration
//! of the same range. Dropping the agent deregisters them like every other region; handles that
//! outlive it only wait, if need be, for the posts that still use their regions.
//!
//! Limit: the target side of a remote post is fenced by the target backend where it takes part
//! (TCP's servers, LOOPBACK's region table). An SHM peer writes with `process_vm_writev`, which
//! the local agent cannot stop (issue 22): a same-host peer that keeps using stale metadata
//! after a deregistration writes into whatever the memory became. That peer, of the same user,
//! could already write anywhere in this process, so this is a trust boundary, not something a
//! Rust type can enforce.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rixl_core::{Desc, Error, ErrorKind, MemType, RegDesc, RegDescList, Result};

use crate::agent::{Agent, AgentInner};
use crate::fence::{self, Released};
use crate::registration::HeldRegion;

impl Agent {
    /// Registers `list` like [`Agent::register_mem`] and returns a handle that deregisters it,
    /// and only it, when dropped or with [`Registration::deregister`].
    ///
    /// # Safety
    ///
    /// [`Agent::register_mem`]'s contract, for as long as the registration lasts: for DRAM and
    /// VRAM, every range must be memory of this process that stays allocated, and that the
    /// program does not read or write while a transfer into or out of it may run. The
    /// registration ends, and the memory may be freed, when
    ///
    /// - [`Registration::deregister`] returns `Ok(())`;
    /// - or the handle is dropped while no post that uses the regions is in flight (every
    ///   request using them waited for or cancelled): dropping then deregisters at once. With
    ///   posts still in flight, dropping waits for them up to
    ///   [`AgentConfig::deregister_timeout`](crate::AgentConfig::deregister_timeout) and, if
    ///   they outlast it, leaves the regions registered until the agent is dropped (a warning
    ///   is logged);
    /// - or the agent is dropped and no post that uses the regions is in flight any more.
    ///
    /// When a backend fails to release a region (an error from `deregister` without the
    /// handle, a warning from drop) nobody knows whether it still uses the memory: keep that
    /// memory allocated. Storage types (FILE, BLK, OBJ) carry no obligation; use
    /// [`Agent::register_storage`] for them.
    pub unsafe fn register(&self, list: &RegDescList, backends: &[&str]) -> Result<Registration> {
        let held = self.inner.register(list, backends, true)?;
        Ok(Registration::new(&self.inner, list.clone(), held))
    }

    /// Registers a FILE, BLK or OBJ list (see [`Agent::register_mem`]) and returns its handle.
    /// Safe: storage addresses are offsets in files, volumes and objects, not memory of this
    /// process. DRAM and VRAM lists are refused with `InvalidParam`: register memory with
    /// [`Agent::register_owned`], or with the `unsafe` [`Agent::register`].
    pub fn register_storage(&self, list: &RegDescList, backends: &[&str]) -> Result<Registration> {
        let mem = list.mem();
        if !mem.is_storage() {
            return Err(Error::invalid_param(format!(
                "register_storage takes FILE, BLK and OBJ lists, not {mem}: {mem} is memory, \
                 which must be handed over (Agent::register_owned) or registered under \
                 Agent::register's safety contract"
            ))
            .with_mem(mem));
        }
        // A FILE or BLK registration without a path names an open file descriptor by number
        // (`dev`). The agent cannot know it stays open: once closed, the number may be reused
        // by another file, a socket or a memfd backing someone's mapping, and transfers would
        // go there. Only path registrations are safe to take here.
        if matches!(mem, MemType::File | MemType::Blk) {
            if let Some(i) = list.descs().iter().position(|d| d.meta.is_empty()) {
                return Err(Error::invalid_param(format!(
                    "register_storage: registration {i} names {mem} by file descriptor (no path \
                     in its meta); the agent cannot know the descriptor stays open, so register \
                     it by path, or with Agent::register under its safety contract"
                ))
                .with_mem(mem));
            }
        }
        // SAFETY: storage addresses are offsets in files, volumes and objects, not memory of
        // this process; `register`'s contract asks nothing of them (see `register_mem`), and a
        // path registration opens its own descriptor.
        unsafe { self.register(list, backends) }
    }

    /// Registers a DRAM buffer that the returned handle owns until it is deregistered: no
    /// `unsafe`, since nothing but the handle can free or reach the buffer meanwhile. The
    /// whole buffer is one region ([`OwnedRegion::desc`]), registered with the named backends
    /// or every backend that takes DRAM. If registration fails, the buffer is dropped.
    pub fn register_owned<B: RegisterableBuffer>(
        &self,
        buf: B,
        backends: &[&str],
    ) -> Result<OwnedRegion<B>> {
        // Boxed, so that the value itself stays put as well as its bytes: a pointer taken from
        // a `Box<[u8]>` must not outlive a move of that box under Rust's aliasing rules.
        let mut buf = Box::new(buf);
        let (ptr, len) = buf.raw_parts_mut();
        let list =
            RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(ptr as u64, len as u64, 0)]);
        // SAFETY: the range is the bytes of `buf` (RegisterableBuffer's contract: memory `buf`
        // owns alone, valid for reads and writes, not moved by moving `buf`), and the handle
        // returned owns `buf` from here on. It frees or gives it back only once every backend
        // has released the region and no post uses it, and leaks it otherwise (`end`). The
        // program reaches the bytes only through raw-pointer copies (`read`, `write`), never
        // through a reference, so a transfer running meanwhile can at worst make such a copy
        // see or leave torn bytes. If registration fails nothing stays registered, and `buf`
        // is dropped.
        let reg = unsafe { self.register(&list, backends) }?;
        Ok(OwnedRegion {
            reg,
            buf: Some(buf),
            ptr,
            len,
        })
    }
}

// ------------------------------------------------------------------------------ Registration

/// A registration of a descriptor list, deregistered when the handle is dropped.
///
/// Made by [`Agent::register`] (memory, `unsafe`), [`Agent::register_storage`] (files, volumes,
/// objects) or, inside an [`OwnedRegion`], by [`Agent::register_owned`]. It deregisters exactly
/// the registrations it made; [`Agent::deregister_mem`] refuses them. It holds the agent
/// weakly: once the agent is dropped (which deregisters everything) the handle has nothing left
/// to do but, if posts still use its regions, wait for them.
///
/// Deregistration is fenced: new posts on the regions fail with `NotFound`, posts in flight are
/// waited for up to [`AgentConfig::deregister_timeout`](crate::AgentConfig::deregister_timeout).
/// [`Registration::deregister`] reports the outcome; dropping logs a failure with
/// `tracing::warn!` (the regions then stay registered until the agent is dropped).
pub struct Registration {
    agent: Weak<AgentInner>,
    agent_name: String,
    list: RegDescList,
    backends: Vec<String>,
    /// One per descriptor and backend; emptied once the registration has ended.
    held: Vec<HeldRegion>,
    timeout: Duration,
}

/// Why [`Registration::end`] failed.
struct EndError {
    error: Error,
    /// The regions are still registered (or still in use) and another attempt may succeed.
    retryable: bool,
}

impl Registration {
    fn new(inner: &Arc<AgentInner>, list: RegDescList, held: Vec<HeldRegion>) -> Registration {
        let mut backends: Vec<String> = Vec::new();
        for h in &held {
            if !backends.iter().any(|b| **b == *h.backend_name) {
                backends.push(h.backend_name.to_string());
            }
        }
        Registration {
            agent: Arc::downgrade(inner),
            agent_name: inner.name().to_owned(),
            list,
            backends,
            held,
            timeout: inner.config().deregister_timeout,
        }
    }

    /// The registered list.
    pub fn list(&self) -> &RegDescList {
        &self.list
    }

    /// The registered descriptors.
    pub fn descs(&self) -> &[RegDesc] {
        self.list.descs()
    }

    /// The memory type of the list.
    pub fn mem(&self) -> MemType {
        self.list.mem()
    }

    /// The backends that accepted the registration (a subset of those asked for, or of those
    /// that take the memory type: registration succeeds if one accepts), in preference order.
    pub fn backends(&self) -> &[String] {
        &self.backends
    }

    /// The name of the agent the list is registered with.
    pub fn agent_name(&self) -> &str {
        &self.agent_name
    }

    /// True while the registration lasts: not deregistered, and the agent not dropped.
    pub fn is_registered(&self) -> bool {
        !self.held.is_empty()
            && self.held.iter().all(|h| h.fence.released().is_none())
            && self.agent.upgrade().is_some_and(|a| a.is_alive())
    }

    /// Deregisters the list now and reports how it went.
    ///
    /// On `Timeout` (posts in flight still used the regions after the agent's
    /// `deregister_timeout`) nothing was deregistered: the error gives the handle back
    /// ([`DeregisterError::into_handle`]) to try again once the requests are done. Any other
    /// error (a backend failed to release a region) ends the registration without a handle:
    /// the agent no longer has the regions, but whether that backend still uses the memory is
    /// unknown. Once the agent is dropped this waits only for the posts that may still use the
    /// regions, and returns `Ok` when there are none.
    pub fn deregister(mut self) -> Result<(), DeregisterError<Registration>> {
        match self.end() {
            Ok(()) => Ok(()),
            Err(e) => Err(DeregisterError {
                error: e.error,
                handle: if e.retryable {
                    Some(Box::new(self))
                } else {
                    None
                },
            }),
        }
    }

    /// Ends the registration: returns `Ok` once no backend holds any of the regions and no
    /// post uses them, i.e. once their memory may be freed. Idempotent.
    fn end(&mut self) -> Result<(), EndError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let mem = self.list.mem();
        if let Some(inner) = self.agent.upgrade() {
            if let Err(error) = inner.deregister_held(mem, &self.held, self.timeout) {
                let retryable = error.kind() == ErrorKind::Timeout;
                if !retryable {
                    self.held.clear();
                }
                return Err(EndError { error, retryable });
            }
        }
        // Deregistered by the call above, or by the agent's teardown (which may be running
        // right now, on another thread, and may have had to deregister regions that posts still
        // used): wait until every region is released and idle.
        let fences: Vec<_> = self.held.iter().map(|h| h.fence.clone()).collect();
        match fence::wait_released(&fences, Instant::now() + self.timeout) {
            Released::All => {
                self.held.clear();
                Ok(())
            }
            Released::Failed(n) => {
                self.held.clear();
                Err(EndError {
                    error: Error::backend(format!(
                        "{n} of {} region(s) could not be released by their backend when agent \
                         {:?} was dropped",
                        fences.len(),
                        self.agent_name
                    ))
                    .with_mem(mem),
                    retryable: false,
                })
            }
            Released::Pending(n) => Err(EndError {
                error: Error::timeout(format!(
                    "{n} of {} region(s) were still in use after {:?} (agent {:?} is being \
                     dropped, or was dropped while posts still used them)",
                    fences.len(),
                    self.timeout,
                    self.agent_name
                ))
                .with_mem(mem),
                retryable: true,
            }),
        }
    }

    /// Gives up on the regions without deregistering them (the agent's teardown will), for a
    /// caller that leaks their memory instead.
    fn abandon(&mut self) {
        self.held.clear();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            if e.retryable {
                tracing::warn!(
                    agent = %self.agent_name,
                    "dropping a Registration of {} {} region(s): {}; they stay registered until \
                     the agent is dropped (Registration::deregister reports this instead)",
                    self.list.len(),
                    self.list.mem(),
                    e.error
                );
            } else {
                tracing::warn!(
                    agent = %self.agent_name,
                    "dropping a Registration of {} {} region(s): {}",
                    self.list.len(),
                    self.list.mem(),
                    e.error
                );
            }
        }
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("agent", &self.agent_name)
            .field("mem", &self.list.mem())
            .field("descs", &self.list.len())
            .field("backends", &self.backends)
            .field("registered", &self.is_registered())
            .finish()
    }
}

// ----------------------------------------------------------------------------- DeregisterError

/// A failed deregistration through a handle: the error, and the handle itself when the
/// registration is still in place (`Timeout`: posts in flight still used it), so that the
/// caller can retry instead of losing it.
///
/// Converting it into an [`Error`] (as `?` does) drops the handle, which tries to deregister
/// once more (see [`Registration`]'s and [`OwnedRegion`]'s `Drop`).
pub struct DeregisterError<T> {
    error: Error,
    /// Boxed: the error stays two words wide whatever the handle.
    handle: Option<Box<T>>,
}

impl<T> DeregisterError<T> {
    /// What went wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The kind of [`DeregisterError::error`].
    pub fn kind(&self) -> ErrorKind {
        self.error.kind()
    }

    /// The handle, if the registration is still in place.
    pub fn handle(&self) -> Option<&T> {
        self.handle.as_deref()
    }

    /// Takes the handle back (if the registration is still in place), to retry later.
    pub fn into_handle(self) -> Option<T> {
        self.handle.map(|h| *h)
    }

    /// The error and the handle.
    pub fn into_parts(self) -> (Error, Option<T>) {
        (self.error, self.handle.map(|h| *h))
    }
}

impl<T> fmt::Debug for DeregisterError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeregisterError")
            .field("error", &self.error)
            .field("handle_returned", &self.handle.is_some())
            .finish()
    }
}

impl<T> fmt::Display for DeregisterError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<T> std::error::Error for DeregisterError<T> {}

impl<T> From<DeregisterError<T>> for Error {
    fn from(e: DeregisterError<T>) -> Error {
        e.error
    }
}

// -------------------------------------------------------------------------- RegisterableBuffer

/// A buffer whose bytes the agent can own while they are registered
/// ([`Agent::register_owned`]).
///
/// Implemented for `Vec<u8>` (its first `len()` bytes), `Box<[u8]>` and, with the `mmap`
/// feature, `memmap2::MmapMut`. Not for arrays or anything else that stores its bytes inline:
/// their bytes move with the value.
///
/// `Send` because the handle may be dropped, and the buffer freed, on any thread; `'static`
/// because a handle can be leaked in safe code (`std::mem::forget`), which must not end a
/// borrow of memory that stays registered.
///
/// # Safety
///
/// An implementation promises, for every value `b` of the type, that
/// [`raw_parts_mut`](RegisterableBuffer::raw_parts_mut) returns `(ptr, len)` such that:
///
/// - `ptr .. ptr + len` is initialised memory, valid for reads and writes, that `b` owns: no
///   other value can reach it (no shared ownership such as `Arc<[u8]>`, no borrowed slices),
///   and nothing reachable from `b` accesses it on its own (no background writer);
/// - it stays valid, at the same address, for as long as `b` lives and no method of `b` other
///   than `raw_parts_mut` is called, however `b` is moved: moving `b` moves no byte (heap
///   allocations and mappings qualify, inline storage does not). Dropping `b` may free it.
pub unsafe trait RegisterableBuffer: Send + 'static {
    /// The start and length of the bytes. Called once, before the bytes are registered; the
    /// agent calls no other method of the buffer until it is deregistered.
    fn raw_parts_mut(&mut self) -> (*mut u8, usize);
}

// SAFETY: a `Vec`'s elements live in a heap allocation the `Vec` owns alone; moving the `Vec`
// moves its pointer, not the allocation, which only `&mut self` methods (never called while
// registered) and drop reallocate or free. Its first `len()` bytes are initialised, and
// `as_mut_ptr` materialises no reference to them.
unsafe impl RegisterableBuffer for Vec<u8> {
    fn raw_parts_mut(&mut self) -> (*mut u8, usize) {
        (self.as_mut_ptr(), self.len())
    }
}

// SAFETY: a boxed slice lives in a heap allocation the box owns alone, freed only when the box
// is dropped; moving the box moves its pointer, not the bytes, which are all initialised.
unsafe impl RegisterableBuffer for Box<[u8]> {
    fn raw_parts_mut(&mut self) -> (*mut u8, usize) {
        (self.as_mut_ptr(), self.len())
    }
}

// SAFETY: a mapping lives at a fixed address from creation until the `MmapMut` is dropped
// (unmapped); moving the value moves only its pointer. An anonymous mapping is this value's
// alone; a file mapping may change when the file does, but `MmapMut::map_mut` is `unsafe`
// precisely because whoever created it must rule that out.
#[cfg(feature = "mmap")]
unsafe impl RegisterableBuffer for memmap2::MmapMut {
    fn raw_parts_mut(&mut self) -> (*mut u8, usize) {
        (self.as_mut_ptr(), self.len())
    }
}

// -------------------------------------------------------------------------------- OwnedRegion

/// A DRAM buffer owned by the agent's registration: made by [`Agent::register_owned`].
///
/// Use [`OwnedRegion::desc`] (or [`OwnedRegion::desc_range`]) in transfer lists, and
/// [`OwnedRegion::read`] / [`OwnedRegion::write`] to reach the bytes: no reference to
/// registered memory is ever handed out. As with any buffer a NIC or a peer writes by DMA, a
/// transfer that runs while the program reads or writes the same bytes leaves them unspecified
/// (a copy may see some bytes old and some new): order the two with the request's completion
/// or a notification.
///
/// [`OwnedRegion::into_inner`] deregisters (fenced, see [`Registration`]) and gives the buffer
/// back; dropping deregisters, then drops the buffer. If deregistration fails, the buffer is
/// not given back (the error says why) and is never freed: it is leaked, since a backend or a
/// post may still write it. After the agent is dropped the buffer stays readable and writable,
/// and `into_inner` gives it back once no post uses it.
pub struct OwnedRegion<B: RegisterableBuffer> {
    reg: Registration,
    /// Boxed so that it never moves while registered; `None` once given back or leaked.
    buf: Option<Box<B>>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `ptr` addresses the bytes of the buffer in `buf`, which goes wherever the handle goes
// (`B: Send`); the handle accesses them only through `read`/`write` copies. Everything else in
// it (`Registration`) is `Send`.
unsafe impl<B: RegisterableBuffer> Send for OwnedRegion<B> {}

// SAFETY: through `&OwnedRegion` one can only copy the bytes out (`read`; concurrent reads do
// not race), get descriptors and the `Registration` (which is `Sync`); writing needs `&mut`, and
// no reference to the buffer or its bytes is handed out.
unsafe impl<B: RegisterableBuffer + Sync> Sync for OwnedRegion<B> {}

impl<B: RegisterableBuffer> OwnedRegion<B> {
    /// The whole buffer as a transfer descriptor (DRAM, device 0).
    pub fn desc(&self) -> Desc {
        Desc::new(self.ptr as u64, self.len as u64, 0)
    }

    /// `len` bytes at `offset` as a transfer descriptor; `InvalidParam` if they are not all
    /// inside the buffer.
    pub fn desc_range(&self, offset: usize, len: usize) -> Result<Desc> {
        self.check_range(offset, len, "descriptor")?;
        Ok(Desc::new(self.ptr as u64 + offset as u64, len as u64, 0))
    }

    /// The registration descriptor (the whole buffer).
    pub fn reg_desc(&self) -> RegDesc {
        self.reg.descs()[0].clone()
    }

    /// The registration: backends, list (for partial metadata), state.
    pub fn registration(&self) -> &Registration {
        &self.reg
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty buffer cannot be registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check_range(&self, offset: usize, len: usize, what: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::invalid_param(format!(
                "{what} of {len} byte(s) at offset {offset} is outside the {}-byte region",
                self.len
            ))
            .with_mem(MemType::Dram)),
        }
    }

    /// Copies `out.len()` bytes at `offset` into `out`; `InvalidParam` if they are not all
    /// inside the buffer. A transfer writing the same bytes meanwhile leaves the copy
    /// unspecified (see the type's documentation).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_range(offset, out.len(), "read")?;
        // SAFETY: `ptr .. ptr + len` is the buffer this handle owns (RegisterableBuffer's
        // contract: initialised, valid, not moved; `buf` lives as long as `self`) and the range
        // was checked to lie inside it. `out` cannot overlap it: no reference to the buffer's
        // bytes is ever created. Peers and backends write these bytes only through raw
        // pointers and system calls, like DMA: a concurrent transfer can make the copy see
        // torn bytes, nothing worse.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into the buffer at `offset`; `InvalidParam` if it does not fit. Takes
    /// `&mut self` so that two threads cannot write through the handle at once; a transfer
    /// reading or writing the same bytes meanwhile sees or leaves them unspecified (see the
    /// type's documentation).
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len(), "write")?;
        // SAFETY: as in `read`: the checked range lies inside the buffer this handle owns,
        // `data` cannot overlap it, and `&mut self` excludes every other access through the
        // handle; backends and peers access the bytes only through raw pointers.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        Ok(())
    }

    /// Deregisters (fenced) and gives the buffer back.
    ///
    /// On `Timeout` (posts in flight still used the region) nothing changed and the error
    /// holds the handle ([`DeregisterError::into_handle`]) to try again. On any other error (a
    /// backend failed to release the region) the buffer is leaked, not returned: that backend
    /// may still write it.
    pub fn into_inner(mut self) -> Result<B, DeregisterError<OwnedRegion<B>>> {
        match self.reg.end() {
            Ok(()) => Ok(*self
                .buf
                .take()
                .expect("the buffer is there until into_inner or drop")),
            Err(e) if e.retryable => Err(DeregisterError {
                error: e.error,
                handle: Some(Box::new(self)),
            }),
            Err(e) => {
                self.leak();
                Err(DeregisterError {
                    error: e.error,
                    handle: None,
                })
            }
        }
    }

    /// Leaks the buffer: never freed, since something may still write it.
    fn leak(&mut self) {
        self.reg.abandon();
        if let Some(buf) = self.buf.take() {
            std::mem::forget(buf);
        }
    }
}

impl<B: RegisterableBuffer> Drop for OwnedRegion<B> {
    fn drop(&mut self) {
        if self.buf.is_none() {
            return;
        }
        match self.reg.end() {
            Ok(()) => drop(self.buf.take()),
            Err(e) => {
                tracing::warn!(
                    agent = %self.reg.agent_name,
                    "dropping an OwnedRegion of {} bytes at {:#x}: {}; leaking the buffer, which \
                     a backend may still use",
                    self.len,
                    self.ptr as usize,
                    e.error
                );
                self.leak();
            }
        }
    }
}

impl<B: RegisterableBuffer> fmt::Debug for OwnedRegion<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedRegion")
            .field("buffer", &std::any::type_name::<B>())
            .field("addr", &format_args!("{:#x}", self.ptr as usize))
            .field("len", &self.len)
            .field("registration", &self.reg)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::PostPins;
    use crate::AgentConfig;

    /// A post in flight on every region of `reg`, as the request path pins them.
    fn pin(reg: &Registration) -> PostPins {
        let fences: Vec<_> = reg.held.iter().map(|h| h.fence.clone()).collect();
        let pins = PostPins::new(vec![Arc::from(fences)]);
        pins.pin().expect("the regions are open");
        pins
    }

    fn agent(name: &str) -> Agent {
        let config = AgentConfig::default()
            .backend("LOOPBACK")
            .deregister_timeout(Duration::from_millis(20));
        Agent::new(name, config).unwrap()
    }

    #[test]
    fn a_timed_out_deregistration_gives_the_handle_back_still_registered() {
        let a = agent("owned-unit-timeout");
        let region = a.register_owned(vec![5u8; 256], &[]).unwrap();
        let pins = pin(region.registration());
        let err = region.into_inner().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        let region = err.into_handle().expect("a timeout gives the handle back");
        assert!(region.registration().is_registered());
        // The fence was opened again: posts are not refused meanwhile.
        assert_eq!(pins.first_closed(), None);
        pins.unpin();
        let buf = region.into_inner().unwrap();
        assert_eq!(buf, vec![5u8; 256]);
    }

    #[test]
    fn dropping_a_region_in_use_leaves_it_registered_and_leaks_the_buffer() {
        let a = agent("owned-unit-leak");
        let region = a.register_owned(vec![9u8; 128], &[]).unwrap();
        let list = region.registration().list().clone();
        let pins = pin(region.registration());
        drop(region);
        // Still registered (the range is taken, and still the handle's), so the buffer was not
        // freed: it is leaked.
        let e = a.deregister_mem(&list, &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParam, "{e}");
        assert_eq!(pins.first_closed(), None);
        pins.unpin();
    }

    #[test]
    fn a_registration_outliving_its_agent_waits_for_the_posts_still_in_flight() {
        let a = agent("owned-unit-teardown");
        let mut buf = vec![0u8; 64];
        let list = RegDescList::from_descs(
            MemType::Dram,
            vec![RegDesc::new(buf.as_mut_ptr() as u64, 64, 0)],
        );
        // SAFETY: `buf` outlives the registration (checked below before it is dropped) and is
        // not touched while registered.
        let reg = unsafe { a.register(&list, &[]) }.unwrap();
        let pins = pin(&reg);
        // The teardown waits for the post, gives up and lets go of the region without telling
        // the backend (logged); the handle still waits for the post.
        drop(a);
        assert!(!reg.is_registered());
        let err = reg.deregister().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{}", err.error());
        let reg = err.into_handle().unwrap();
        pins.unpin();
        reg.deregister().unwrap();
        drop(buf);
    }
}
