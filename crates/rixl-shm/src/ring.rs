//! The notification ring: notifications from one peer to another through shared memory.
//!
//! A Unix socket round trip costs 8–9 µs on the machines RIXL is measured on, most of it the
//! wake-up of a thread blocked in `poll`. Notification ping-pong and "write, then tell the peer"
//! should cost about what the copy costs. So each outbound control connection gets a ring in a
//! sealed `memfd` that its sender creates and its receiver maps (via `/proc/<pid>/fd`): the
//! sender appends records and the receiver's waiting threads pick them up with one atomic load,
//! no system call and no thread switch on either side.
//!
//! Nobody polls an idle ring. The receiver publishes in the ring's header whether a thread is
//! watching it right now: `attending` while `wait_notif` spins, and `polled_until`, a deadline
//! on the shared monotonic clock that every non-blocking poll (`get_notifs` in a loop, NIXL's
//! Python style) pushes a little further. When nobody watches, the sender rings a doorbell, a
//! small frame on the socket, which wakes the receiver's reader thread as before, at most one
//! doorbell per wake-up (`bell`). A sender that skipped the doorbell because of `polled_until`
//! relies on the reader thread waking up at that deadline, so the receiver sleeps no longer than
//! it (and pokes its reader thread when a poll opens a new window). The usual
//! store-then-load on both sides (SeqCst) makes sure a record is never left behind with nobody
//! told.
//!
//! Records: `[u32 len][u32 kind][payload, padded to 8]`. A record never straddles the end of
//! the data area: a `WRAP` record sends the reader to the start. A notification too large for
//! the ring goes on the socket, and a `SOCKET` record tells the receiver to take the next
//! socket notification at that point, so order is kept. Everything the receiver reads from the
//! ring is untrusted and bounds-checked; the memfd is sealed against shrinking, so the mapping
//! cannot turn into SIGBUS under the receiver.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes of ring data per connection.
pub(crate) const DEFAULT_CAP: u64 = 256 * 1024;
const HEADER: u64 = 256;
const TAIL_OFF: usize = 0;
const HEAD_OFF: usize = 64;
const ATTEND_OFF: usize = 128;
const BELL_OFF: usize = 192;
const POLLED_OFF: usize = 224;
/// When a receiving thread last looked at the ring (`now_ns`): a sender that finds it recent
/// knows the receiver was alive a moment ago without asking the socket (see `seen_within`).
const SEEN_OFF: usize = 232;

const KIND_MSG: u32 = 1;
const KIND_WRAP: u32 = 2;
const KIND_SOCKET: u32 = 3;

/// How long a sender waits for room before it gives up on a receiver that does not drain.
const FULL_TIMEOUT: Duration = Duration::from_secs(10);

/// A mapped ring, either side.
pub(crate) struct Ring {
    base: *mut u8,
    cap: u64,
    /// Keeps the memfd open (the receiver opens it by path through `/proc/<pid>/fd/<fd>`).
    fd: OwnedFd,
}

// SAFETY: the mapping is process-wide memory whose shared words are accessed only through
// atomics; record bytes are written by the one sender (under its connection's lock) and read
// by the one receiver (under its connection state's lock).
unsafe impl Send for Ring {}
// SAFETY: see `Send`.
unsafe impl Sync for Ring {}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.fd.as_raw_fd())
            .field("cap", &self.cap)
            .finish()
    }
}

/// What the receiver found in the ring.
pub(crate) enum Record {
    /// A notification.
    Msg(Vec<u8>),
    /// The next notification is on the socket.
    Socket,
}

impl Ring {
    /// A new ring for a sender: a sealed memfd of `cap` data bytes (a power of two ≥ 4096).
    pub(crate) fn create(cap: u64) -> std::io::Result<Ring> {
        assert!(cap.is_power_of_two() && cap >= 4096);
        // SAFETY: memfd_create reads the NUL-terminated name only.
        let fd = unsafe {
            libc::memfd_create(
                c"rixl-shm-notif-ring".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(fd);
        file.set_len(HEADER + cap)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own descriptor.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ring::map(OwnedFd::from(file), cap)
    }

    /// Maps the ring that process `pid` created as its descriptor `fd`, checking that it is a
    /// sealed memfd of the announced size.
    pub(crate) fn open(pid: u32, fd: u32, cap: u64) -> std::io::Result<Ring> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
        if !cap.is_power_of_two() || !(4096..=(16 << 20)).contains(&cap) {
            return Err(bad(
                "ring size must be a power of two between 4 KiB and 16 MiB",
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/{fd}"))?;
        if file.metadata()?.len() != HEADER + cap {
            return Err(bad("ring file has the wrong size"));
        }
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad("ring file is not sealed against shrinking"));
        }
        Ring::map(OwnedFd::from(file), cap)
    }

    fn map(fd: OwnedFd, cap: u64) -> std::io::Result<Ring> {
        // SAFETY: a new shared mapping of the whole file, whose size is fixed by its seals.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (HEADER + cap) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Ring {
            base: p.cast(),
            cap,
            fd,
        })
    }

    /// The descriptor number the receiver opens through `/proc`.
    pub(crate) fn raw_fd(&self) -> u32 {
        self.fd.as_raw_fd() as u32
    }

    /// Data bytes.
    pub(crate) fn cap(&self) -> u64 {
        self.cap
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the 64-byte-aligned header words inside the mapping, which
        // lives as long as `self`; AtomicU64 has the alignment and size of u64.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as in `word64`.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    fn data(&self, pos: u64) -> *mut u8 {
        // SAFETY: `pos % cap < cap`, so the pointer stays inside the data area of the mapping.
        unsafe { self.base.add((HEADER + pos % self.cap) as usize) }
    }

    // ---- sender side ----

    /// Appends a notification, or a `SOCKET` record if `msg` is `None` (its bytes went on the
    /// socket just before). Returns whether the receiver needs a doorbell. Fails if the
    /// receiver corrupted the header or has not made room for a long time.
    pub(crate) fn push(&self, msg: Option<&[u8]>) -> std::io::Result<bool> {
        let len = msg.map_or(0, <[u8]>::len) as u64;
        let need = 8 + len.div_ceil(8) * 8;
        let tail = self.word64(TAIL_OFF).load(Ordering::Relaxed);
        let lap_left = self.cap - tail % self.cap;
        let total = if need > lap_left {
            need + lap_left
        } else {
            need
        };
        self.wait_room(tail, total)?;
        let mut at = tail;
        if need > lap_left {
            self.write_head(at, KIND_WRAP, 0);
            at += lap_left;
        }
        match msg {
            Some(m) => {
                self.write_head(at, KIND_MSG, m.len() as u32);
                // SAFETY: the record fits before the end of the data area (checked above), and
                // the receiver does not read past `tail`, which we publish only afterwards.
                unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), self.data(at + 8), m.len()) };
            }
            None => self.write_head(at, KIND_SOCKET, 0),
        }
        self.word64(TAIL_OFF).store(at + need, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.word64(ATTEND_OFF).load(Ordering::SeqCst) != 0
            || now_ns() < self.word64(POLLED_OFF).load(Ordering::SeqCst)
        {
            return Ok(false);
        }
        Ok(self.word32(BELL_OFF).swap(1, Ordering::SeqCst) == 0)
    }

    /// True when a notification of `len` bytes belongs on the socket instead.
    pub(crate) fn too_large(&self, len: usize) -> bool {
        len as u64 > self.cap / 4
    }

    fn write_head(&self, at: u64, kind: u32, len: u32) {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&len.to_le_bytes());
        h[4..].copy_from_slice(&kind.to_le_bytes());
        // SAFETY: records start 8-aligned and the data area is a multiple of 8, so 8 bytes fit.
        unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), self.data(at), 8) };
    }

    fn wait_room(&self, tail: u64, total: u64) -> std::io::Result<()> {
        let mut since: Option<Instant> = None;
        loop {
            let head = self.word64(HEAD_OFF).load(Ordering::Acquire);
            let used = tail.wrapping_sub(head);
            if used > self.cap {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the receiver corrupted the notification ring",
                ));
            }
            if self.cap - used >= total {
                return Ok(());
            }
            let start = *since.get_or_insert_with(Instant::now);
            if start.elapsed() > FULL_TIMEOUT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the receiver has not drained its notification ring for 10 s",
                ));
            }
            std::thread::yield_now();
        }
    }

    // ---- receiver side ----

    /// Whether a record is waiting (one atomic load).
    pub(crate) fn has_data(&self) -> bool {
        self.word64(TAIL_OFF).load(Ordering::Acquire)
            != self.word64(HEAD_OFF).load(Ordering::Relaxed)
    }

    /// Says whether a receiving thread is watching the ring (then senders skip the doorbell).
    pub(crate) fn set_attending(&self, on: bool) {
        self.word64(ATTEND_OFF)
            .store(u64::from(on), Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// A thread polled the ring without blocking at `now` (`now_ns`) and will probably poll
    /// again soon: senders may skip the doorbell until `window_ns` later. Returns true if the
    /// previous window had expired (then the reader thread must learn the new deadline).
    pub(crate) fn note_polled(&self, now: u64, window_ns: u64) -> bool {
        let prev = self
            .word64(POLLED_OFF)
            .swap(now + window_ns, Ordering::SeqCst);
        prev <= now
    }

    /// Records that a receiving thread is looking at the ring right now (a proof of life for
    /// the sender; one store to a line only the receiver writes).
    pub(crate) fn note_seen(&self, now: u64) {
        self.word64(SEEN_OFF).store(now, Ordering::Relaxed);
    }

    /// Sender side: whether a receiving thread looked at the ring within the last `ns`. A
    /// process that was polling that recently was alive then, which is all a system call on the
    /// socket would prove too (the peer may die right after either). The value is the peer's
    /// word, so a lying peer only fools the sender about that peer itself.
    pub(crate) fn seen_within(&self, ns: u64) -> bool {
        let seen = self.word64(SEEN_OFF).load(Ordering::Relaxed);
        now_ns().checked_sub(seen).is_some_and(|age| age < ns)
    }

    /// Until when senders may skip the doorbell because of polling (0: not at all).
    pub(crate) fn polled_until(&self) -> u64 {
        self.word64(POLLED_OFF).load(Ordering::SeqCst)
    }

    /// Ends the polling window now (a waiter is about to sleep).
    pub(crate) fn expire_polled(&self) {
        self.word64(POLLED_OFF).store(0, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// The reader thread woke up: the next record after this needs a new doorbell.
    pub(crate) fn clear_bell(&self) {
        self.word32(BELL_OFF).store(0, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Takes the records available now, calling `f` for each, until `f` returns false (the
    /// record is then left in the ring). Errors when the sender broke the format.
    pub(crate) fn drain(&self, mut f: impl FnMut(Record) -> bool) -> Result<(), String> {
        let head_w = self.word64(HEAD_OFF);
        let mut head = head_w.load(Ordering::Relaxed);
        let tail = self.word64(TAIL_OFF).load(Ordering::Acquire);
        let result = loop {
            let avail = tail.wrapping_sub(head);
            if avail == 0 {
                break Ok(());
            }
            if avail > self.cap || avail < 8 || !head.is_multiple_of(8) {
                break Err(format!(
                    "ring positions out of range (head {head}, tail {tail})"
                ));
            }
            let mut h = [0u8; 8];
            // SAFETY: `head % cap` is 8-aligned and the data area a multiple of 8: 8 bytes fit.
            unsafe { std::ptr::copy_nonoverlapping(self.data(head), h.as_mut_ptr(), 8) };
            let len = u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
            let kind = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let lap_left = self.cap - head % self.cap;
            let rec = 8 + len.div_ceil(8) * 8;
            let record = match kind {
                KIND_WRAP => {
                    if lap_left > avail {
                        break Err("wrap record beyond the tail".into());
                    }
                    head += lap_left;
                    continue;
                }
                KIND_SOCKET => Record::Socket,
                KIND_MSG if rec <= lap_left && rec <= avail => {
                    let mut v = vec![0u8; len as usize];
                    // SAFETY: the payload lies inside the data area (`rec <= lap_left`) and
                    // before `tail`; the sender does not write there until we move `head`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(self.data(head + 8), v.as_mut_ptr(), v.len())
                    };
                    Record::Msg(v)
                }
                _ => break Err(format!("bad ring record (kind {kind}, {len} bytes)")),
            };
            if !f(record) {
                break Ok(());
            }
            head += if kind == KIND_SOCKET { 8 } else { rec };
        };
        head_w.store(head, Ordering::Release);
        result
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the host, which both ends
/// of a ring compare `polled_until` against.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`; nothing borrows it any more
        // (every reference handed out is tied to `&self`).
        unsafe { libc::munmap(self.base.cast(), (HEADER + self.cap) as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_looks_are_seen_by_the_sender_only_while_recent() {
        let tx = Ring::create(4096).unwrap();
        let rx = Ring::open(std::process::id(), tx.raw_fd(), 4096).unwrap();
        assert!(!tx.seen_within(1_000_000_000), "never looked at");
        rx.note_seen(now_ns());
        assert!(tx.seen_within(1_000_000_000), "looked at just now");
        rx.note_seen(now_ns() - 50_000_000);
        assert!(!tx.seen_within(20_000), "looked at 50 ms ago");
        // A peer writing a time in the future proves nothing.
        rx.note_seen(now_ns() + 1_000_000_000);
        assert!(
            !tx.seen_within(1_000_000_000),
            "a future time is not a look"
        );
    }

    #[test]
    fn records_round_trip_across_laps_and_mappings() {
        let tx = Ring::create(4096).unwrap();
        let rx = Ring::open(std::process::id(), tx.raw_fd(), 4096).unwrap();
        assert!(!rx.has_data());
        let mut expect = Vec::new();
        for i in 0..2000u32 {
            let m: Vec<u8> = (0..(i % 300)).map(|k| (k ^ i) as u8).collect();
            let bell = tx.push(Some(&m)).unwrap();
            if i == 0 {
                assert!(bell, "first record with nobody attending rings");
            } else {
                assert!(!bell, "the bell is rung once until cleared");
            }
            expect.push(m);
            if i % 7 == 0 {
                let mut got = Vec::new();
                rx.drain(|r| {
                    match r {
                        Record::Msg(m) => got.push(m),
                        Record::Socket => panic!("no socket record pushed"),
                    }
                    true
                })
                .unwrap();
                assert_eq!(got, std::mem::take(&mut expect));
            }
        }
        rx.clear_bell();
        assert!(
            rx.note_polled(now_ns(), 10_000_000_000),
            "no window was open"
        );
        assert!(
            !rx.note_polled(now_ns(), 10_000_000_000),
            "the window was open"
        );
        assert!(
            !tx.push(Some(b"p")).unwrap(),
            "polled recently: no doorbell"
        );
        rx.expire_polled();
        rx.set_attending(true);
        assert!(!tx.push(None).unwrap(), "attended: no doorbell");
        rx.set_attending(false);
        assert!(tx.push(Some(b"q")).unwrap(), "nobody watches: doorbell");
        let mut n = 0;
        rx.drain(|r| {
            if let Record::Socket = r {
                n += 1;
            }
            true
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn corrupt_positions_and_records_are_errors_not_panics() {
        let tx = Ring::create(4096).unwrap();
        let rx = Ring::open(std::process::id(), tx.raw_fd(), 4096).unwrap();
        tx.push(Some(b"hello")).unwrap();
        // A hostile sender claims a huge record.
        tx.write_head(0, KIND_MSG, u32::MAX);
        assert!(rx.drain(|_| true).is_err());
        // Or a tail far beyond the head.
        tx.word64(TAIL_OFF).store(1 << 40, Ordering::SeqCst);
        assert!(rx.drain(|_| true).is_err());
        // And a receiver that moves head past tail makes the sender fail, not hang.
        rx.word64(HEAD_OFF)
            .store((1 << 40) + 4096 * 2, Ordering::SeqCst);
        assert!(tx.push(Some(b"x")).is_err());
    }

    #[test]
    fn a_full_ring_waits_for_the_receiver() {
        let tx = std::sync::Arc::new(Ring::create(4096).unwrap());
        let rx = Ring::open(std::process::id(), tx.raw_fd(), 4096).unwrap();
        let big = vec![7u8; 1000];
        for _ in 0..4 {
            tx.push(Some(&big)).unwrap();
        }
        let t = {
            let tx = tx.clone();
            std::thread::spawn(move || tx.push(Some(&[9u8; 1000])).unwrap())
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !t.is_finished(),
            "a fifth 1000-byte record does not fit in 4 KiB"
        );
        let mut got = 0;
        rx.drain(|_| {
            got += 1;
            true
        })
        .unwrap();
        t.join().unwrap();
        rx.drain(|_| {
            got += 1;
            true
        })
        .unwrap();
        assert_eq!(got, 5);
    }

    #[test]
    fn open_refuses_wrong_sizes_and_unsealed_files() {
        let tx = Ring::create(4096).unwrap();
        assert!(Ring::open(std::process::id(), tx.raw_fd(), 8192).is_err());
        assert!(Ring::open(std::process::id(), tx.raw_fd(), 3000).is_err());
        let f = tempfile_fd();
        assert!(Ring::open(std::process::id(), f.as_raw_fd() as u32, 4096).is_err());
    }

    fn tempfile_fd() -> File {
        // SAFETY: memfd_create reads the name only.
        let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nothing else.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(HEADER + 4096).unwrap();
        f
    }
}
