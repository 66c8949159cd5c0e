//! The conformance suite across two real processes.
//!
//! In-process pairs cannot show what only a process boundary shows: separate address spaces,
//! memory the kernel protects, sockets that close when a process dies. So the suite's target
//! agent can also live in a peer process. Cases talk to the target through [`TargetAgent`], the
//! part of the agent API a target needs (registration, metadata, notifications); an in-process
//! [`Agent`] implements it directly and a [`RemoteAgent`] forwards each call over the peer's
//! stdin/stdout.
//!
//! The cases keep describing target memory with the test process's
//! [`TestBuffer`](crate::TestBuffer)s and keep checking their bytes in place: the buffers come
//! from a shared arena that the peer maps at the same addresses (see `arena`), so the peer's agent
//! registers, and its backend serves, exactly the memory the case then inspects.
//!
//! A backend crate runs the whole suite both ways with two macros:
//!
//! ```ignore
//! rixl_testkit::conformance_tests!(harness());                 // both agents in this process
//! mod cross_process {
//!     rixl_testkit::cross_process_conformance_tests!(super::harness());
//! }
//! ```
//!
//! The second expands into one `#[test]` per case with a [`CrossProcess`] harness, plus the
//! ignored test that is the peer's entry point (the binary re-executes itself to run only it).
//! Dropping a [`RemoteAgent`] kills its process with `SIGKILL`: in the peer-death cases the
//! target really dies, without a goodbye.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rixl::{
    Agent, AgentConfig, Error, ErrorKind, MemType, Notification, Params, RegDesc, RegDescList,
    Result,
};

use crate::arena;
use crate::child::ChildLine;
use crate::peer::{hex, unhex};
use crate::Harness;

/// The part of the agent API that the target of a conformance case uses.
///
/// Implemented by [`Agent`] (target in this process) and [`RemoteAgent`] (target in a peer
/// process). Methods mirror the agent's; registration is `unsafe` as `Agent::register_mem` is
/// (the suite only registers [`TestBuffer`](crate::TestBuffer) memory and storage
/// ([`TestFile`](crate::TestFile)) under the rules of the crate documentation).
pub trait TargetAgent: Send + Sync {
    /// The agent's name.
    fn name(&self) -> &str;
    /// Registers `list` with the named backends (all if empty).
    ///
    /// # Safety
    ///
    /// As [`Agent::register_mem`]: DRAM ranges must stay valid (and untouched while transfers
    /// may run) until deregistered or the agent is gone; for a target in a peer process, the
    /// ranges must lie in the shared test arena (`TestBuffer`), which the peer maps.
    unsafe fn register(&self, list: &RegDescList, backends: &[&str]) -> Result<()>;
    /// Deregisters `list`.
    fn deregister(&self, list: &RegDescList, backends: &[&str]) -> Result<()>;
    /// The full metadata blob.
    fn local_metadata(&self) -> Result<Vec<u8>>;
    /// A partial metadata blob.
    fn local_partial_metadata(
        &self,
        list: &RegDescList,
        include_conn: bool,
        backends: &[&str],
    ) -> Result<Vec<u8>>;
    /// Loads a peer's metadata; returns the peer's name.
    fn load_remote_metadata(&self, blob: &[u8]) -> Result<String>;
    /// Forgets a peer.
    fn invalidate_remote_metadata(&self, agent: &str);
    /// Sends a standalone notification.
    fn send_notif(&self, agent: &str, msg: &[u8], backend: Option<&str>) -> Result<()>;
    /// Drains the notification queue.
    fn get_notifs(&self, backends: &[&str]) -> Result<Vec<Notification>>;
    /// Drains the queue, grouped by sender.
    fn get_notifs_by_agent(&self, backends: &[&str]) -> Result<HashMap<String, Vec<Vec<u8>>>>;
    /// Waits up to `timeout` for a notification without consuming it.
    fn wait_notif(&self, timeout: Duration) -> bool;
    /// The agent itself when it lives in this process.
    fn as_local(&self) -> Option<&Agent>;
}

impl TargetAgent for Agent {
    fn name(&self) -> &str {
        Agent::name(self)
    }
    unsafe fn register(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        // SAFETY: passed on to our caller (this method's own contract).
        unsafe { self.register_mem(list, backends) }
    }
    fn deregister(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        self.deregister_mem(list, backends)
    }
    fn local_metadata(&self) -> Result<Vec<u8>> {
        Agent::local_metadata(self)
    }
    fn local_partial_metadata(
        &self,
        list: &RegDescList,
        include_conn: bool,
        backends: &[&str],
    ) -> Result<Vec<u8>> {
        Agent::local_partial_metadata(self, list, include_conn, backends)
    }
    fn load_remote_metadata(&self, blob: &[u8]) -> Result<String> {
        Agent::load_remote_metadata(self, blob)
    }
    fn invalidate_remote_metadata(&self, agent: &str) {
        Agent::invalidate_remote_metadata(self, agent)
    }
    fn send_notif(&self, agent: &str, msg: &[u8], backend: Option<&str>) -> Result<()> {
        Agent::send_notif(self, agent, msg, backend)
    }
    fn get_notifs(&self, backends: &[&str]) -> Result<Vec<Notification>> {
        Agent::get_notifs(self, backends)
    }
    fn get_notifs_by_agent(&self, backends: &[&str]) -> Result<HashMap<String, Vec<Vec<u8>>>> {
        Agent::get_notifs_by_agent(self, backends)
    }
    fn wait_notif(&self, timeout: Duration) -> bool {
        Agent::wait_notif(self, timeout)
    }
    fn as_local(&self) -> Option<&Agent> {
        Some(self)
    }
}

/// So that `&Box<dyn TargetAgent>` works wherever `&dyn TargetAgent` is expected.
impl TargetAgent for Box<dyn TargetAgent> {
    fn name(&self) -> &str {
        (**self).name()
    }
    unsafe fn register(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        // SAFETY: passed on to our caller (this method's own contract).
        unsafe { (**self).register(list, backends) }
    }
    fn deregister(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        (**self).deregister(list, backends)
    }
    fn local_metadata(&self) -> Result<Vec<u8>> {
        (**self).local_metadata()
    }
    fn local_partial_metadata(
        &self,
        list: &RegDescList,
        include_conn: bool,
        backends: &[&str],
    ) -> Result<Vec<u8>> {
        (**self).local_partial_metadata(list, include_conn, backends)
    }
    fn load_remote_metadata(&self, blob: &[u8]) -> Result<String> {
        (**self).load_remote_metadata(blob)
    }
    fn invalidate_remote_metadata(&self, agent: &str) {
        (**self).invalidate_remote_metadata(agent)
    }
    fn send_notif(&self, agent: &str, msg: &[u8], backend: Option<&str>) -> Result<()> {
        (**self).send_notif(agent, msg, backend)
    }
    fn get_notifs(&self, backends: &[&str]) -> Result<Vec<Notification>> {
        (**self).get_notifs(backends)
    }
    fn get_notifs_by_agent(&self, backends: &[&str]) -> Result<HashMap<String, Vec<Vec<u8>>>> {
        (**self).get_notifs_by_agent(backends)
    }
    fn wait_notif(&self, timeout: Duration) -> bool {
        (**self).wait_notif(timeout)
    }
    fn as_local(&self) -> Option<&Agent> {
        (**self).as_local()
    }
}

/// Environment variable that makes the entry point serve as a remote target: `name,telemetry`.
const REMOTE_ENV: &str = "RIXL_TESTKIT_REMOTE";
/// Prefix of the peer's reply lines (libtest prints its own lines on the same stdout).
const PREFIX: &str = "@rixl-remote ";

/// A harness that puts every case's target agent in a peer process.
///
/// Wraps the backend's own harness `H` and forwards everything to it, except
/// [`Harness::new_target`], which spawns a peer running [`serve`] with the same harness. Use
/// [`cross_process_conformance_tests!`](crate::cross_process_conformance_tests) rather than
/// building one by hand: the peer needs an entry point in the same test binary.
pub struct CrossProcess<H> {
    inner: H,
    entry: String,
}

impl<H: Harness> std::fmt::Debug for CrossProcess<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossProcess")
            .field("backend", &self.inner.backend())
            .field("entry", &self.entry)
            .finish()
    }
}

impl<H: Harness> CrossProcess<H> {
    /// `inner` with targets in processes that run the test named `entry` (exact libtest name)
    /// of this binary. Installs the shared test-buffer arena.
    pub fn new(inner: H, entry: &str) -> CrossProcess<H> {
        arena::install();
        CrossProcess {
            inner,
            entry: entry.to_owned(),
        }
    }
}

impl<H: Harness> Harness for CrossProcess<H> {
    fn backend(&self) -> &str {
        self.inner.backend()
    }
    fn params(&self) -> Params {
        self.inner.params()
    }
    fn config(&self) -> AgentConfig {
        self.inner.config()
    }
    fn new_agent_with(&self, name: &str, telemetry: bool) -> Agent {
        self.inner.new_agent_with(name, telemetry)
    }
    fn new_target(&self, name: &str, telemetry: bool) -> Box<dyn TargetAgent> {
        Box::new(RemoteAgent::spawn(&self.entry, name, telemetry))
    }
    fn cross_process(&self) -> bool {
        true
    }
    fn capabilities(&self) -> rixl::Capabilities {
        self.inner.capabilities()
    }
    fn target_mem(&self) -> Option<MemType> {
        self.inner.target_mem()
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
}

/// A target agent in a peer process, driven over the peer's stdin and stdout.
///
/// Dropping it kills the peer with `SIGKILL` (see [`ChildLine`]): the peer-death cases want a
/// real death, and other cases are over when their target goes.
#[derive(Debug)]
pub struct RemoteAgent {
    name: String,
    io: Mutex<ChildLine>,
}

impl RemoteAgent {
    /// Re-executes this test binary running only `entry` (which must call [`serve`]), as agent
    /// `name` with telemetry on or off; returns once its agent exists.
    pub fn spawn(entry: &str, name: &str, telemetry: bool) -> RemoteAgent {
        let arena = arena::install();
        let spec = format!("{name},{}", u8::from(telemetry));
        let env = [
            (REMOTE_ENV, spec.as_str()),
            (arena::ARENA_ENV, &arena.env()),
        ];
        let io = ChildLine::spawn(&[], entry, &env, PREFIX).expect("spawn the target process");
        let r = RemoteAgent {
            name: name.to_owned(),
            io: Mutex::new(io),
        };
        let ready = r.reply(&mut r.io());
        assert_eq!(ready, "READY", "target process {name} did not start");
        r
    }

    fn io(&self) -> MutexGuard<'_, ChildLine> {
        self.io
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one command and returns the reply's words, or the peer's error.
    fn call(&self, words: &[&str]) -> Result<Vec<String>> {
        let mut io = self.io();
        let line = words.join(" ");
        io.send(&line)
            .unwrap_or_else(|e| panic!("target process {} is gone: {e}", self.name));
        let reply = self.reply(&mut io);
        let mut w = reply.split(' ').map(str::to_owned);
        match w.next().as_deref() {
            Some("OK") => Ok(w.collect()),
            Some("ERR") => {
                let code: i32 = w.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                let kind = ErrorKind::from_code(code).unwrap_or(ErrorKind::Unknown);
                let msg = w.next().and_then(|m| unhex(&m)).unwrap_or_default();
                Err(Error::new(
                    kind,
                    format!(
                        "{} [in target process {}]",
                        String::from_utf8_lossy(&msg),
                        self.name
                    ),
                ))
            }
            _ => panic!(
                "target process {}: bad reply {reply:?} to {line:?}",
                self.name
            ),
        }
    }

    /// Reads the next reply line from `io` (this agent's peer, locked by the caller).
    fn reply(&self, io: &mut ChildLine) -> String {
        let name = &self.name;
        io.reply()
            .unwrap_or_else(|e| panic!("reading from target process {name}: {e}"))
            .unwrap_or_else(|| panic!("target process {name} exited unexpectedly"))
    }

    fn call_ok(&self, words: &[&str]) -> Vec<String> {
        self.call(words)
            .unwrap_or_else(|e| panic!("target process {}: {words:?} failed: {e}", self.name))
    }
}

fn opt_hex(b: &[u8]) -> String {
    if b.is_empty() {
        "-".to_owned()
    } else {
        hex(b)
    }
}

fn from_opt_hex(s: &str) -> Option<Vec<u8>> {
    if s == "-" {
        Some(Vec::new())
    } else {
        unhex(s)
    }
}

fn enc_backends(b: &[&str]) -> String {
    opt_hex(b.join(",").as_bytes())
}

fn dec_backends(s: &str) -> Vec<String> {
    let joined = String::from_utf8(from_opt_hex(s).unwrap_or_default()).unwrap_or_default();
    joined
        .split(',')
        .filter(|b| !b.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `MEM/addr:len:dev:meta,...` with meta in hex (`-` when empty).
fn enc_list(list: &RegDescList) -> String {
    let descs: Vec<String> = list
        .descs()
        .iter()
        .map(|d| {
            format!(
                "{}:{}:{}:{}",
                d.desc.addr,
                d.desc.len,
                d.desc.dev,
                opt_hex(&d.meta)
            )
        })
        .collect();
    format!("{}/{}", list.mem(), descs.join(","))
}

fn dec_list(s: &str) -> Option<RegDescList> {
    let (mem, rest) = s.split_once('/')?;
    let mem: MemType = mem.parse().ok()?;
    let mut descs = Vec::new();
    for d in rest.split(',').filter(|d| !d.is_empty()) {
        let f: Vec<&str> = d.split(':').collect();
        let [addr, len, dev, meta] = f[..] else {
            return None;
        };
        descs.push(RegDesc::with_meta(
            addr.parse().ok()?,
            len.parse().ok()?,
            dev.parse().ok()?,
            from_opt_hex(meta)?,
        ));
    }
    Some(RegDescList::from_descs(mem, descs))
}

fn enc_notifs(n: &[Notification]) -> Vec<String> {
    n.iter()
        .map(|n| {
            format!(
                "{}:{}:{}",
                hex(n.from.as_bytes()),
                opt_hex(&n.msg),
                n.backend
            )
        })
        .collect()
}

fn dec_notif(s: &str) -> Option<Notification> {
    let f: Vec<&str> = s.split(':').collect();
    let [from, msg, backend] = f[..] else {
        return None;
    };
    Some(Notification {
        from: String::from_utf8(unhex(from)?).ok()?,
        msg: from_opt_hex(msg)?,
        backend: backend.parse().ok()?,
    })
}

impl TargetAgent for RemoteAgent {
    fn name(&self) -> &str {
        &self.name
    }
    unsafe fn register(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        self.call(&["REG", &enc_list(list), &enc_backends(backends)])
            .map(drop)
    }
    fn deregister(&self, list: &RegDescList, backends: &[&str]) -> Result<()> {
        self.call(&["DEREG", &enc_list(list), &enc_backends(backends)])
            .map(drop)
    }
    fn local_metadata(&self) -> Result<Vec<u8>> {
        let w = self.call(&["MD"])?;
        Ok(unhex(&w[0]).expect("metadata hex"))
    }
    fn local_partial_metadata(
        &self,
        list: &RegDescList,
        include_conn: bool,
        backends: &[&str],
    ) -> Result<Vec<u8>> {
        let conn = if include_conn { "1" } else { "0" };
        let w = self.call(&["PMD", &enc_list(list), conn, &enc_backends(backends)])?;
        Ok(unhex(&w[0]).expect("metadata hex"))
    }
    fn load_remote_metadata(&self, blob: &[u8]) -> Result<String> {
        let w = self.call(&["LOAD", &opt_hex(blob)])?;
        Ok(String::from_utf8(unhex(&w[0]).expect("name hex")).expect("utf-8 name"))
    }
    fn invalidate_remote_metadata(&self, agent: &str) {
        self.call_ok(&["INVAL", &hex(agent.as_bytes())]);
    }
    fn send_notif(&self, agent: &str, msg: &[u8], backend: Option<&str>) -> Result<()> {
        let backend = backend.map(|b| hex(b.as_bytes()));
        self.call(&[
            "SEND",
            &hex(agent.as_bytes()),
            &opt_hex(msg),
            backend.as_deref().unwrap_or("-"),
        ])
        .map(drop)
    }
    fn get_notifs(&self, backends: &[&str]) -> Result<Vec<Notification>> {
        let w = self.call(&["NOTIFS", &enc_backends(backends)])?;
        Ok(w.iter()
            .map(|n| dec_notif(n).expect("notification"))
            .collect())
    }
    fn get_notifs_by_agent(&self, backends: &[&str]) -> Result<HashMap<String, Vec<Vec<u8>>>> {
        let w = self.call(&["NOTIFS_BY_AGENT", &enc_backends(backends)])?;
        let mut out: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for n in w.iter().map(|n| dec_notif(n).expect("notification")) {
            out.entry(n.from).or_default().push(n.msg);
        }
        Ok(out)
    }
    fn wait_notif(&self, timeout: Duration) -> bool {
        self.call_ok(&["WAIT", &timeout.as_micros().to_string()])[0] == "1"
    }
    fn as_local(&self) -> Option<&Agent> {
        None
    }
}

/// The peer's side: when this process was spawned by [`RemoteAgent::spawn`], creates the
/// target agent with `h` and answers commands until stdin closes; otherwise returns at once.
pub fn serve(h: &dyn Harness) {
    let Ok(spec) = std::env::var(REMOTE_ENV) else {
        eprintln!("this entry point only runs as a target process spawned by rixl-testkit");
        return;
    };
    let (name, telemetry) = spec
        .rsplit_once(',')
        .unwrap_or_else(|| panic!("bad {REMOTE_ENV}={spec:?}"));
    match arena::attach_from_env() {
        Ok(true) => {}
        Ok(false) => panic!("the target process needs the parent's arena"),
        Err(e) => panic!("{e}"),
    }
    let agent = h.new_agent_with(name, telemetry == "1");
    let out = std::io::stdout();
    let say = |line: &str| {
        let mut o = out.lock();
        let _ = writeln!(o, "{PREFIX}{line}");
        let _ = o.flush();
    };
    say("READY");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = match answer(&agent, &line) {
            Ok(words) if words.is_empty() => "OK".to_owned(),
            Ok(words) => format!("OK {}", words.join(" ")),
            Err(e) => {
                let text = e.to_string();
                let msg = text
                    .strip_prefix(e.kind().status_name())
                    .map(|m| m.trim_start_matches(": "))
                    .unwrap_or(&text);
                format!("ERR {} {}", e.kind().code(), opt_hex(msg.as_bytes()))
            }
        };
        say(&reply);
    }
    // stdin closed: the test process is gone.
    std::process::exit(0);
}

/// Executes one command line on `agent`.
fn answer(agent: &Agent, line: &str) -> Result<Vec<String>> {
    let bad = || Error::invalid_param(format!("bad command {line:?}"));
    let w: Vec<&str> = line.split(' ').collect();
    let backends = |s: &str| dec_backends(s);
    match w.as_slice() {
        ["REG", list, b] | ["DEREG", list, b] => {
            let list = dec_list(list).ok_or_else(bad)?;
            let b = backends(b);
            let b: Vec<&str> = b.iter().map(String::as_str).collect();
            if w[0] == "REG" {
                crate::cases::try_reg_with(agent, &list, &b)?;
            } else {
                agent.deregister_mem(&list, &b)?;
            }
            Ok(vec![])
        }
        ["MD"] => Ok(vec![hex(&agent.local_metadata()?)]),
        ["PMD", list, conn, b] => {
            let list = dec_list(list).ok_or_else(bad)?;
            let b = backends(b);
            let b: Vec<&str> = b.iter().map(String::as_str).collect();
            Ok(vec![hex(&agent.local_partial_metadata(
                &list,
                *conn == "1",
                &b,
            )?)])
        }
        ["LOAD", blob] => {
            let blob = from_opt_hex(blob).ok_or_else(bad)?;
            Ok(vec![hex(agent.load_remote_metadata(&blob)?.as_bytes())])
        }
        ["INVAL", who] => {
            let who = String::from_utf8(unhex(who).ok_or_else(bad)?).map_err(|_| bad())?;
            agent.invalidate_remote_metadata(&who);
            Ok(vec![])
        }
        ["SEND", to, msg, backend] => {
            let to = String::from_utf8(unhex(to).ok_or_else(bad)?).map_err(|_| bad())?;
            let msg = from_opt_hex(msg).ok_or_else(bad)?;
            let backend = match *backend {
                "-" => None,
                b => Some(String::from_utf8(unhex(b).ok_or_else(bad)?).map_err(|_| bad())?),
            };
            agent.send_notif(&to, &msg, backend.as_deref())?;
            Ok(vec![])
        }
        ["NOTIFS", b] => {
            let b = backends(b);
            let b: Vec<&str> = b.iter().map(String::as_str).collect();
            Ok(enc_notifs(&agent.get_notifs(&b)?))
        }
        ["NOTIFS_BY_AGENT", b] => {
            let b = backends(b);
            let b: Vec<&str> = b.iter().map(String::as_str).collect();
            let grouped = agent.get_notifs_by_agent(&b)?;
            let flat: Vec<Notification> = grouped
                .into_iter()
                .flat_map(|(from, msgs)| {
                    msgs.into_iter().map(move |msg| Notification {
                        from: from.clone(),
                        msg,
                        backend: 0,
                    })
                })
                .collect();
            Ok(enc_notifs(&flat))
        }
        ["WAIT", micros] => {
            let micros: u64 = micros.parse().map_err(|_| bad())?;
            let got = agent.wait_notif(Duration::from_micros(micros));
            Ok(vec![if got { "1" } else { "0" }.to_owned()])
        }
        _ => Err(bad()),
    }
}

/// Expands into one `#[test]` per conformance case, each running with its target agent in a
/// peer process (a [`CrossProcess`] around the given harness), plus the ignored test that is the
/// peer's entry point. Invoke it once per test module (the entry point's name is derived from
/// the module path).
#[macro_export]
macro_rules! cross_process_conformance_tests {
    ($($harness:tt)*) => {
        #[test]
        #[ignore = "entry point of the target processes that the cross-process cases spawn"]
        fn __rixl_remote_target() {
            $crate::remote::serve(&$($harness)*);
        }

        /// The libtest name of the entry point above.
        fn __rixl_remote_entry() -> String {
            let path = module_path!();
            match path.split_once("::") {
                Some((_, rest)) => format!("{rest}::__rixl_remote_target"),
                None => "__rixl_remote_target".to_owned(),
            }
        }

        $crate::__with_cases!(__case_tests [
            $crate::remote::CrossProcess::new($($harness)*, &__rixl_remote_entry())
        ]);
    };
}
