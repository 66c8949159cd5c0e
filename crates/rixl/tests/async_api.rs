//! The async API: `XferRequest::completion()` (an `XferFuture`) and `Agent::notifications()`
//! (a `NotifStream`), driven by a small executor written here, with every wait bounded.
//!
//! The cases where a post must stay in flight use a `TCP` peer whose connection info points at
//! a silent listener of this process: it accepts the connection and answers the hello, then
//! never answers a request until the test releases it (or its own safety limit passes).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use rixl::{Agent, AgentConfig, ErrorKind, XferOp, XferOptions, XferStatus};
use rixl_testkit::{dram_list as list, pattern, unique_name, TestBuffer};

/// Unparks the polling thread and counts the wake-ups (spurious returns from `park` are not
/// wake-ups, so the count says what woke the task).
struct Unpark(Arc<AtomicUsize>, Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1.unpark();
    }
}

/// Runs `fut` on this thread, parking between polls; `None` if it is not ready within `limit`.
/// `wakes` counts the wake-ups it received.
fn run_for<F: Future>(fut: F, limit: Duration, wakes: &Arc<AtomicUsize>) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(Unpark(wakes.clone(), thread::current())));
    let mut cx = Context::from_waker(&waker);
    let start = Instant::now();
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let left = limit.checked_sub(start.elapsed())?;
        thread::park_timeout(left);
    }
}

fn bounded<F: Future>(fut: F, limit: Duration) -> Option<F::Output> {
    run_for(fut, limit, &Arc::new(AtomicUsize::new(0)))
}

/// The bound of every wait that is expected to end.
const LIMIT: Duration = Duration::from_secs(20);
/// How long a wait that is expected *not* to end is given.
const QUIET: Duration = Duration::from_millis(30);

fn loopback_agent(prefix: &str) -> Agent {
    Agent::new(
        &unique_name(prefix),
        AgentConfig::default().backend("LOOPBACK"),
    )
    .unwrap()
}

#[test]
fn a_loopback_self_transfer_future_resolves_done() {
    let src = TestBuffer::with_pattern(64 * 1024, 5);
    let dst = TestBuffer::new(64 * 1024);
    let a = loopback_agent("async-self");
    // SAFETY: both buffers are declared before the agent and outlive it; nothing touches them
    // while a transfer runs.
    unsafe {
        a.register_mem(&src.reg_list(), &[]).unwrap();
        a.register_mem(&dst.reg_list(), &[]).unwrap();
    }
    // A deadline that never passes: the timer must not disturb a post that completes.
    let opts = XferOptions {
        timeout: Some(Duration::from_secs(3600)),
        ..XferOptions::default()
    };
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![src.whole()]),
            &list(vec![dst.whole()]),
            a.name(),
            &opts,
        )
        .unwrap();
    let before = bounded(req.completion(), LIMIT).expect("the future resolves at once");
    assert_eq!(before.unwrap_err().kind(), ErrorKind::NotPosted);
    for round in 0..3 {
        req.post().unwrap();
        let status = bounded(req.completion(), LIMIT).expect("the future resolves");
        assert_eq!(status.unwrap(), XferStatus::Done, "round {round}");
        dst.assert_range(0, &pattern(5, 0, 64 * 1024), "data after the future");
        assert_eq!(req.status().unwrap(), XferStatus::Done);
    }
    // A future polled on another thread while the request stays here.
    req.post().unwrap();
    let fut = req.completion();
    let status = thread::spawn(move || bounded(fut, LIMIT))
        .join()
        .unwrap()
        .expect("resolves on another thread");
    assert_eq!(status.unwrap(), XferStatus::Done);
}

#[test]
fn the_notification_stream_yields_in_order_and_ends_when_the_agent_is_dropped() {
    // Declared before the agents: the buffers outlive their registrations.
    let src = TestBuffer::with_pattern(4096, 9);
    let dst = TestBuffer::new(4096);
    let a = loopback_agent("async-sender");
    let b = loopback_agent("async-receiver");
    // SAFETY: the buffers outlive both agents and are not touched while a transfer runs.
    unsafe {
        a.register_mem(&src.reg_list(), &[]).unwrap();
        b.register_mem(&dst.reg_list(), &[]).unwrap();
    }
    a.load_remote_metadata(&b.local_metadata().unwrap())
        .unwrap();
    b.load_remote_metadata(&a.local_metadata().unwrap())
        .unwrap();

    let mut stream = b.notifications();
    assert!(
        bounded(stream.next(), QUIET).is_none(),
        "with nothing queued the stream is pending, not ended"
    );
    for i in 0..10u8 {
        a.send_notif(b.name(), &[i], None).unwrap();
    }
    for i in 0..10u8 {
        let n = bounded(stream.next(), LIMIT)
            .expect("queued notifications are yielded")
            .expect("the stream has not ended");
        assert_eq!((n.from.as_str(), &n.msg[..]), (a.name(), &[i][..]), "#{i}");
    }

    // A transfer's notification comes through the same stream, after the data.
    let req = a
        .create_xfer_req(
            XferOp::Write,
            &list(vec![src.whole()]),
            &list(vec![dst.whole()]),
            b.name(),
            &XferOptions::with_notif("page ready"),
        )
        .unwrap();
    req.post().unwrap();
    let status = bounded(req.completion(), LIMIT).expect("the write's future resolves");
    assert_eq!(status.unwrap(), XferStatus::Done);
    let n = bounded(stream.next(), LIMIT).unwrap().unwrap();
    assert_eq!(
        (n.from.as_str(), &n.msg[..]),
        (a.name(), &b"page ready"[..])
    );
    dst.assert_range(0, &pattern(9, 0, 4096), "data before its notification");

    // The stream and `get_notifs` take from one queue: each notification goes to one of them.
    a.send_notif(b.name(), b"for get_notifs", None).unwrap();
    let got = b.get_notifs(&[]).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, b"for get_notifs");
    assert!(bounded(stream.next(), QUIET).is_none());

    // A delivery from another thread wakes a pending stream.
    let b_name = b.name().to_owned();
    let wakes = Arc::new(AtomicUsize::new(0));
    let n = thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(30));
            a.send_notif(&b_name, b"late", None).unwrap();
        });
        run_for(stream.next(), LIMIT, &wakes)
    });
    assert_eq!(n.expect("woken by the delivery").unwrap().msg, b"late");

    // Dropping the agent ends a pending stream (which never kept the agent alive).
    let waiter = thread::spawn(move || {
        let r = bounded(stream.next(), LIMIT);
        let after = bounded(stream.next(), LIMIT);
        (r, after)
    });
    thread::sleep(QUIET);
    drop(req);
    drop(b);
    let (r, after) = waiter.join().unwrap();
    assert_eq!(r.expect("the stream ends within the limit"), None);
    assert_eq!(after.expect("and stays ended"), None);
    // A stream of a dropped agent, created before the drop, ends at once as well.
    let c = loopback_agent("async-short-lived");
    let mut orphan = c.notifications();
    drop(c);
    assert_eq!(bounded(orphan.next(), LIMIT).expect("ends at once"), None);
    drop(a);
}

#[cfg(feature = "tcp")]
mod tcp {
    //! Posts that stay in flight: a TCP peer that never answers.

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;

    use rixl::{Desc, MemType, RegDescList, XferRequest};
    use rixl_tcp::wire::{Header, Kind, HEADER_LEN};

    /// A listener that completes the TCP backend's hello on every connection and then says
    /// nothing, until released (or `LIMIT` passes): then it closes everything and stops.
    struct Silent {
        port: u16,
        release: mpsc::Sender<()>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Silent {
        fn start() -> Silent {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            l.set_nonblocking(true).unwrap();
            let (release, released) = mpsc::channel::<()>();
            let thread = thread::spawn(move || {
                let start = Instant::now();
                let mut held: Vec<TcpStream> = Vec::new();
                loop {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(LIMIT)).unwrap();
                            let mut hb = [0u8; HEADER_LEN];
                            if s.read_exact(&mut hb).is_ok() {
                                let h = Header::parse(&hb).unwrap();
                                let mut body = vec![0u8; h.len as usize];
                                s.read_exact(&mut body).unwrap();
                                s.write_all(&Header::new(Kind::HelloAck).encode()).unwrap();
                                held.push(s); // and never read again
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            match released.recv_timeout(Duration::from_millis(5)) {
                                Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < LIMIT => {
                                }
                                _ => return, // released, or the safety limit: close all
                            }
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            });
            Silent {
                port,
                release,
                thread: Some(thread),
            }
        }

        /// Closes the held connections.
        fn release(&mut self) {
            let _ = self.release.send(());
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    impl Drop for Silent {
        fn drop(&mut self) {
            self.release();
        }
    }

    fn tcp_agent(prefix: &str, params: &[(&str, &str)]) -> Agent {
        let p: rixl::Params = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Agent::new(
            &unique_name(prefix),
            AgentConfig::default().backend_with("TCP", p),
        )
        .unwrap()
    }

    /// An initiator (with `src` registered) that loaded the metadata of a peer whose TCP
    /// connection info points at `silent`, and a WRITE of `src` to that peer with `opts`.
    /// `target_buf` stands for the peer's memory (a real agent publishes it; no byte is ever
    /// written to it).
    fn stuck_write(
        silent: &Silent,
        src: &TestBuffer,
        target_buf: &TestBuffer,
        opts: &XferOptions,
    ) -> (Agent, String, XferRequest) {
        let t = tcp_agent("async-target", &[]);
        let regs = RegDescList::from_descs(MemType::Dram, vec![target_buf.reg_desc()]);
        // SAFETY: `target_buf` outlives this agent, which is dropped at the end of this call.
        unsafe { t.register_mem(&regs, &[]).unwrap() };
        let mut md = rixl::core::AgentMetadata::decode(&t.local_metadata().unwrap()).unwrap();
        drop(t);
        md.agent = unique_name("async-silent");
        for c in md.conn.iter_mut().filter(|c| c.backend == "TCP") {
            let nonce = rixl_tcp::ConnInfo::decode(&c.info).unwrap().nonce;
            c.info = rixl_tcp::ConnInfo {
                nonce,
                port: silent.port,
                addrs: vec!["127.0.0.1".parse().unwrap()],
            }
            .encode();
        }
        // One connection, and a response deadline far beyond the test: only the request's own
        // deadline, or its peer's invalidation, can end the post early.
        let a = tcp_agent(
            "async-ini",
            &[("connections", "1"), ("deadline_ms", "60000")],
        );
        // SAFETY: the caller keeps `src` alive longer than the returned agent.
        unsafe { a.register_mem(&src.reg_list(), &[]).unwrap() };
        let peer = a.load_remote_metadata(&md.encode()).unwrap();
        let remote = Desc::new(target_buf.addr(), src.len() as u64, 0);
        let req = a
            .create_xfer_req(
                XferOp::Write,
                &list(vec![src.whole()]),
                &list(vec![remote]),
                &peer,
                opts,
            )
            .unwrap();
        assert_eq!(req.post().unwrap(), XferStatus::InProgress);
        (a, peer, req)
    }

    /// Waits (bounded) until `wakes` counts at least one wake-up.
    fn woken(wakes: &AtomicUsize) -> bool {
        rixl_testkit::eventually(LIMIT, || wakes.load(Ordering::SeqCst) > 0)
    }

    #[test]
    fn the_future_times_out_at_the_deadline_without_status_or_wait() {
        let src = TestBuffer::with_pattern(4096, 3);
        let target_buf = TestBuffer::new(4096);
        let mut silent = Silent::start();
        let opts = XferOptions {
            timeout: Some(Duration::from_millis(150)),
            ..XferOptions::default()
        };
        let (a, _peer, req) = stuck_write(&silent, &src, &target_buf, &opts);
        let fut = req.completion();
        let wakes = Arc::new(AtomicUsize::new(0));
        let runner = {
            let wakes = wakes.clone();
            thread::spawn(move || run_for(fut, LIMIT, &wakes))
        };
        // Nothing but the timer can wake the future: the peer never answers, nobody calls
        // `status` or `wait`, and the backend's own deadline is a minute away.
        assert!(woken(&wakes), "the deadline did not wake the future");
        // The poll after that wake-up cancels the post, and a TCP cancel waits until the
        // target has answered what was already sent: let the silent peer go now (the
        // cancellation is under way, so its departure no longer completes the post).
        thread::sleep(Duration::from_millis(100));
        silent.release();
        let result = runner
            .join()
            .unwrap()
            .expect("the future resolved within the limit");
        let e = result.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(
            e.to_string().contains("150ms"),
            "the request's deadline: {e}"
        );
        let e = req.status().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "status after the future: {e}");
        drop(req);
        drop(a);
    }

    /// The request's deadline is measured from the post even without telemetry (the start of
    /// a post used to be recorded only with telemetry on: `status()` then never expired a post,
    /// and `wait()` expired it at once). Here a helper lets the silent peer go two seconds after
    /// the post, well after the deadline, so that the cancellation the deadline starts ends.
    #[test]
    fn the_request_deadline_holds_for_status_and_wait_without_telemetry() {
        for use_wait in [false, true] {
            let src = TestBuffer::with_pattern(4096, 7);
            let target_buf = TestBuffer::new(4096);
            let mut silent = Silent::start();
            let opts = XferOptions {
                timeout: Some(Duration::from_millis(150)),
                ..XferOptions::default()
            };
            let posted = Instant::now();
            let (a, _peer, req) = stuck_write(&silent, &src, &target_buf, &opts);
            assert!(!a.telemetry_enabled());
            let result = thread::scope(|s| {
                s.spawn(|| {
                    thread::sleep(Duration::from_secs(2));
                    silent.release();
                });
                if use_wait {
                    req.wait(Some(LIMIT))
                } else {
                    loop {
                        match req.status() {
                            Ok(XferStatus::InProgress) => {
                                assert!(posted.elapsed() < LIMIT, "status() never expired");
                                thread::sleep(Duration::from_millis(1));
                            }
                            other => break other,
                        }
                    }
                }
            });
            let e = result.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Timeout, "wait: {use_wait}: {e}");
            assert!(
                e.to_string().contains("150ms"),
                "the request's deadline: {e}"
            );
            assert!(
                posted.elapsed() >= Duration::from_millis(150),
                "wait: {use_wait}: expired before the deadline"
            );
            assert_eq!(req.status().unwrap_err().kind(), ErrorKind::Timeout);
            drop(req);
            drop(a);
        }
    }

    #[test]
    fn invalidating_the_peer_wakes_a_pending_future_with_not_found() {
        let src = TestBuffer::with_pattern(4096, 4);
        let target_buf = TestBuffer::new(4096);
        let silent = Silent::start();
        let (a, peer, req) = stuck_write(&silent, &src, &target_buf, &XferOptions::default());
        let fut = req.completion();
        let wakes = Arc::new(AtomicUsize::new(0));
        let (polled_tx, polled) = mpsc::channel();
        let runner = {
            let wakes = wakes.clone();
            thread::spawn(move || {
                // Poll once here, then hand over to the executor: the future is pending and
                // registered before the invalidation below.
                let mut fut = Box::pin(fut);
                let waker = Waker::from(Arc::new(Unpark(wakes.clone(), thread::current())));
                let first = fut.as_mut().poll(&mut Context::from_waker(&waker));
                polled_tx.send(first.is_pending()).unwrap();
                run_for(fut, LIMIT, &wakes)
            })
        };
        assert!(
            polled.recv_timeout(LIMIT).unwrap(),
            "a post to a silent peer is pending"
        );
        assert_eq!(wakes.load(Ordering::SeqCst), 0, "nothing woke it yet");
        a.invalidate_remote_metadata(&peer);
        let result = runner
            .join()
            .unwrap()
            .expect("the invalidation ended the future within the limit");
        let e = result.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(wakes.load(Ordering::SeqCst) > 0);
        assert_eq!(req.status().unwrap_err().kind(), ErrorKind::NotFound);
        // The request refuses new posts: the peer is gone from the cache.
        assert_eq!(req.post().unwrap_err().kind(), ErrorKind::NotFound);
        drop(req);
        drop(a);
        drop(silent);
    }

    #[test]
    fn a_future_dropped_while_pending_leaves_the_request_usable() {
        let src = TestBuffer::with_pattern(4096, 6);
        let target_buf = TestBuffer::new(4096);
        let silent = Silent::start();
        let opts = XferOptions {
            timeout: Some(Duration::from_secs(3600)),
            ..XferOptions::default()
        };
        let (a, _peer, req) = stuck_write(&silent, &src, &target_buf, &opts);
        assert!(bounded(req.completion(), QUIET).is_none(), "pending");
        // Dropping the future cancels nothing.
        assert_eq!(req.status().unwrap(), XferStatus::InProgress);
        drop(silent); // the peer goes away: the post fails, the future reports it
        let r = bounded(req.completion(), LIMIT).expect("the peer's departure ends the post");
        let e = r.unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::RemoteDisconnect | ErrorKind::NotFound),
            "{e}"
        );
        drop(req);
        drop(a);
    }
}
