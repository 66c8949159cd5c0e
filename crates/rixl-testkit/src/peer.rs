//! Peer processes for cross-process tests.
//!
//! The conformance suite runs its agents inside the test process. Backends whose point is to
//! cross process boundaries (SHM, TCP) also need tests with a real second process: one that can
//! die, whose memory the kernel protects, whose socket closes when it exits. A test binary
//! re-executes itself as that peer: declare the entry point once,
//!
//! ```ignore
//! #[test]
//! #[ignore = "entry point of the peer process that the two-process tests spawn"]
//! fn peer_process() {
//!     rixl_testkit::peer::peer_main();
//! }
//! ```
//!
//! and spawn it with [`PeerProcess::spawn`]. The peer creates an agent with the backend under
//! test, registers one pattern-filled buffer, prints its metadata, and then answers line-based
//! commands on stdin (load metadata, checksum a range, wait for / send / echo notifications,
//! exit). Replies are stdout lines prefixed with `@rixl ` so that libtest's own output is ignored.

use std::io::{BufRead, Write};
use std::time::Duration;

use rixl::{Agent, AgentConfig, MemType, RegDesc, RegDescList};

use crate::buffer::TestBuffer;
use crate::child::ChildLine;

/// Environment variable that turns the entry point into a peer and carries its settings.
pub const PEER_ENV: &str = "RIXL_TESTKIT_PEER";
const PREFIX: &str = "@rixl ";

/// FNV-1a of `bytes`: what `SUM` replies, so that the parent can check ranges cheaply.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The peer's side: runs only when [`PEER_ENV`] is set (`name,backend,len,seed`), else returns.
pub fn peer_main() {
    let Ok(spec) = std::env::var(PEER_ENV) else {
        eprintln!(
            "peer_process: {PEER_ENV} is not set; this entry point only runs as a spawned peer"
        );
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let [name, backend, len, seed] = parts[..] else {
        panic!("bad {PEER_ENV}={spec:?}: expected name,backend,len,seed");
    };
    let len: usize = len.parse().expect("buffer length");
    let seed: u64 = seed.parse().expect("seed");
    let buf = TestBuffer::with_pattern(len, seed);
    let agent = Agent::new(name, AgentConfig::default().backend(backend)).expect("peer agent");
    let regs =
        RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(buf.addr(), len as u64, 0)]);
    // SAFETY: `buf` outlives `agent` (declared before it) and is only read between transfers,
    // when the parent asks for a checksum.
    unsafe { agent.register_mem(&regs, &[]).expect("peer registration") };
    let md = agent.local_metadata().expect("peer metadata");
    let out = std::io::stdout();
    let say = |line: String| {
        let mut o = out.lock();
        let _ = writeln!(o, "{PREFIX}{line}");
        let _ = o.flush();
    };
    say(format!("READY {} {} {}", buf.addr(), len, hex(&md)));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["LOAD", blob] => match unhex(blob).map(|b| agent.load_remote_metadata(&b)) {
                Some(Ok(n)) => say(format!("OK {n}")),
                Some(Err(e)) => say(format!("ERR {:?} {e}", e.kind())),
                None => say("ERR bad hex".into()),
            },
            ["SUM", off, n] => {
                let (off, n): (usize, usize) = (off.parse().unwrap_or(0), n.parse().unwrap_or(0));
                match buf.as_slice().get(off..off.saturating_add(n)) {
                    Some(s) => say(format!("SUM {}", checksum(s))),
                    None => say("ERR range".into()),
                }
            }
            ["WAIT_NOTIF", ms] => {
                let ms: u64 = ms.parse().unwrap_or(1000);
                if agent.wait_notif(Duration::from_millis(ms)) {
                    let n = agent.get_notifs(&[]).unwrap_or_default();
                    let list: Vec<String> = n
                        .iter()
                        .map(|n| format!("{}:{}", n.from, hex(&n.msg)))
                        .collect();
                    say(format!("NOTIF {}", list.join(" ")));
                } else {
                    say("TIMEOUT".into());
                }
            }
            ["SEND_NOTIF", to, msg] => {
                match agent.send_notif(to, &unhex(msg).unwrap_or_default(), None) {
                    Ok(()) => say("OK".into()),
                    Err(e) => say(format!("ERR {:?} {e}", e.kind())),
                }
            }
            ["ECHO", count] => {
                // Reply to each of `count` notifications with the same message: the target side
                // of a ping-pong latency test.
                let count: usize = count.parse().unwrap_or(0);
                let mut seen = 0;
                while seen < count {
                    if !agent.wait_notif(Duration::from_secs(10)) {
                        break;
                    }
                    for n in agent.get_notifs(&[]).unwrap_or_default() {
                        let _ = agent.send_notif(&n.from, &n.msg, None);
                        seen += 1;
                    }
                }
                say(format!("ECHOED {seen}"));
            }
            ["EXIT"] => {
                say("BYE".into());
                drop(agent);
                std::process::exit(0);
            }
            _ => say(format!("ERR unknown command {line:?}")),
        }
    }
}

/// A spawned peer, seen from the test.
#[derive(Debug)]
pub struct PeerProcess {
    io: ChildLine,
    /// The peer agent's name.
    pub name: String,
    /// Its metadata blob.
    pub metadata: Vec<u8>,
    /// Address of its registered buffer (in its address space).
    pub base: u64,
    /// Length of that buffer.
    pub len: u64,
}

impl PeerProcess {
    /// Re-executes this test binary running only `entry` (the test that calls [`peer_main`]),
    /// as agent `name` with `backend`, and a buffer of `len` bytes filled with pattern `seed`.
    pub fn spawn(entry: &str, name: &str, backend: &str, len: usize, seed: u64) -> PeerProcess {
        PeerProcess::spawn_via(&[], entry, name, backend, len, seed)
    }

    /// [`PeerProcess::spawn`] through `launcher` (a program and its arguments run with the
    /// test binary appended, such as `["ip", "netns", "exec", ns]` for a peer on another
    /// network "host"); empty runs the binary directly.
    pub fn spawn_via(
        launcher: &[&str],
        entry: &str,
        name: &str,
        backend: &str,
        len: usize,
        seed: u64,
    ) -> PeerProcess {
        let spec = format!("{name},{backend},{len},{seed}");
        let io = ChildLine::spawn(launcher, entry, &[(PEER_ENV, &spec)], PREFIX)
            .expect("spawn peer process");
        let mut p = PeerProcess {
            io,
            name: name.to_owned(),
            metadata: Vec::new(),
            base: 0,
            len: 0,
        };
        let ready = p.read_reply();
        let w: Vec<&str> = ready.split_whitespace().collect();
        match w.as_slice() {
            ["READY", base, len, md] => {
                p.base = base.parse().expect("base");
                p.len = len.parse().expect("len");
                p.metadata = unhex(md).expect("metadata hex");
            }
            _ => panic!("peer did not start: {ready:?}"),
        }
        p
    }

    /// Sends one command line and returns the reply (without the prefix).
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.read_reply()
    }

    /// Sends a command without waiting for the reply (read it later with [`PeerProcess::reply`]).
    pub fn send(&mut self, line: &str) {
        self.io.send(line).expect("write to peer");
    }

    /// Reads the next reply.
    pub fn reply(&mut self) -> String {
        self.read_reply()
    }

    fn read_reply(&mut self) -> String {
        let reply = self.io.reply().expect("read from peer");
        reply.unwrap_or_else(|| panic!("peer {} exited unexpectedly", self.name))
    }

    /// Checksum of `len` bytes at `off` of the peer's buffer.
    pub fn sum(&mut self, off: u64, len: u64) -> u64 {
        let r = self.cmd(&format!("SUM {off} {len}"));
        r.strip_prefix("SUM ")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad SUM reply {r:?}"))
    }

    /// Kills the peer (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.io.kill();
        let _ = self.io.wait();
    }

    /// Asks the peer to exit and waits for it.
    pub fn exit(mut self) {
        let _ = self.cmd("EXIT");
        let _ = self.io.wait();
    }
}
