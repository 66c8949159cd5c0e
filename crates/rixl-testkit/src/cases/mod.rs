//! The conformance cases. Each is a `pub fn(&dyn Harness)` that panics on failure; see
//! [`CASES`](crate::CASES) for the list and [`conformance_tests!`](crate::conformance_tests) to
//! run them as individual tests.
//!
//! Most cases run once per available *mode*: the initiator targeting itself (when the backend is
//! local-capable) and the initiator targeting a second agent in this process (when it is
//! remote-capable). The initiator's memory is DRAM ([`TestBuffer`]); the target's is the
//! harness's target memory type ([`TargetMem`], see [`target_mem`](crate::target_mem)). A case
//! whose requirements the harness does not declare prints a line saying so and returns.

mod errors;
mod lifecycle;
mod metadata;
mod notif;
mod prepared;
mod registration;
mod stale;
mod transfer;

pub use errors::*;
pub use lifecycle::*;
pub use metadata::*;
pub use notif::*;
pub use prepared::*;
pub use registration::*;
pub use stale::*;
pub use transfer::*;

use std::fmt;
use std::time::Instant;

use rixl::{
    Agent, AgentConfig, Desc, Error, ErrorKind, MemType, Notification, RegDescList, Result,
    XferDescList, XferOp, XferOptions, XferRequest, XferStatus,
};

use crate::{assert_bytes_eq, unique_name, Harness, TargetAgent, TargetMem, TestBuffer, TestMem};

/// Where the initiator's requests go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The initiator is its own target (NIXL's loopback).
    SelfTarget,
    /// A second agent in this process is the target.
    TwoAgents,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::SelfTarget => "self-target",
            Mode::TwoAgents => "two agents",
        })
    }
}

/// The modes the harness supports.
pub(crate) fn modes(h: &dyn Harness) -> Vec<Mode> {
    let mut v = Vec::new();
    if h.local() {
        v.push(Mode::SelfTarget);
    }
    if h.remote() {
        v.push(Mode::TwoAgents);
    }
    v
}

/// Prints why a case (or part of it) does not run.
pub(crate) fn skip(h: &dyn Harness, case: &str, why: &str) {
    eprintln!(
        "rixl-testkit: {case}: skipped for backend {}: {why}",
        h.backend()
    );
}

/// True (after printing why) when the harness has no target memory type, so that a case
/// that moves data cannot run.
pub(crate) fn no_target(h: &dyn Harness, case: &str) -> bool {
    if h.target_mem().is_some() {
        return false;
    }
    let moves: Vec<String> = h
        .capabilities()
        .moves
        .iter()
        .map(|(l, t)| format!("{l}->{t}"))
        .collect();
    skip(
        h,
        case,
        &format!(
            "the backend moves DRAM to no memory type the suite can make ({:?}); it moves [{}]",
            crate::target_mem::SUPPORTED_TARGETS,
            moves.join(", ")
        ),
    );
    true
}

/// Modes, or a skip message when there is none (or no target memory to move data to).
pub(crate) fn modes_or_skip(h: &dyn Harness, case: &str) -> Vec<Mode> {
    let m = modes(h);
    if m.is_empty() {
        skip(h, case, "the backend is neither local- nor remote-capable");
        return m;
    }
    if no_target(h, case) {
        return Vec::new();
    }
    m
}

/// The memory types whose registrations the registration cases check: DRAM (what every
/// initiator registers), and the target memory type when it is another one.
pub(crate) fn reg_mems(h: &dyn Harness) -> Vec<MemType> {
    let mut v = vec![MemType::Dram];
    if let Some(t) = h.target_mem() {
        if t != MemType::Dram {
            v.push(t);
        }
    }
    v
}

/// `len` zeroed bytes of target memory for the harness.
pub(crate) fn tmem(h: &dyn Harness, len: usize) -> TargetMem {
    TargetMem::new(h, len)
}

/// A new agent with the backend under test, telemetry on, and a unique name.
pub(crate) fn agent(h: &dyn Harness, prefix: &str) -> Agent {
    h.new_agent(&unique_name(prefix))
}

/// A new agent to send requests to, telemetry on, with a unique name: in this process, or in a
/// peer process under a cross-process harness.
pub(crate) fn target(h: &dyn Harness, prefix: &str) -> Box<dyn TargetAgent> {
    h.new_target(&unique_name(prefix), true)
}

/// An agent without any backend.
pub(crate) fn bare_agent(prefix: &str) -> Agent {
    Agent::new(&unique_name(prefix), AgentConfig::default()).expect("agent without backends")
}

/// Registers `list` with the named backends (all if empty).
pub(crate) fn try_reg_with(agent: &Agent, list: &RegDescList, backends: &[&str]) -> Result<()> {
    // SAFETY: the suite's convention (see the crate documentation): every DRAM range a case
    // registers lies in a TestBuffer created before the agent, so the buffer outlives the
    // registration (dropping the agent deregisters it), or the case deregisters it before the
    // buffer goes; buffer contents are only accessed while no transfer is in flight. Ranges
    // that are not in a TestBuffer (null, wrapping, zero-length) are registered only to check
    // that they are refused, and are never used in a transfer. Storage registrations (a
    // TestFile's path) carry no memory obligation.
    unsafe { agent.register_mem(list, backends) }
}

/// Registers `list` with every backend of `agent`, in this process or a peer process.
pub(crate) fn try_reg(agent: &dyn TargetAgent, list: &RegDescList) -> Result<()> {
    // SAFETY: the suite's convention, as in `try_reg_with` above.
    unsafe { agent.register(list, &[]) }
}

/// A registration list of whole buffers, all of one memory type.
pub(crate) fn reg_list(bufs: &[&dyn TestMem]) -> RegDescList {
    let mem = bufs.first().map_or(MemType::Dram, |b| b.mem());
    assert!(
        bufs.iter().all(|b| b.mem() == mem),
        "a registration list holds one memory type"
    );
    RegDescList::from_descs(mem, bufs.iter().map(|b| b.reg_desc()).collect())
}

/// A registration list of `(memory, offset, len)` pieces, all of one memory type.
pub(crate) fn reg_pieces(pieces: &[(&dyn TestMem, usize, usize)]) -> RegDescList {
    let mem = pieces.first().map_or(MemType::Dram, |p| p.0.mem());
    assert!(
        pieces.iter().all(|p| p.0.mem() == mem),
        "a registration list holds one memory type"
    );
    RegDescList::from_descs(
        mem,
        pieces.iter().map(|(b, o, l)| b.reg_range(*o, *l)).collect(),
    )
}

/// `bufs` as registration lists, one per memory type in order of first appearance (one list
/// when all are of one type).
fn lists_by_mem(bufs: &[&dyn TestMem]) -> Vec<RegDescList> {
    let mut mems: Vec<MemType> = Vec::new();
    for b in bufs {
        if !mems.contains(&b.mem()) {
            mems.push(b.mem());
        }
    }
    mems.into_iter()
        .map(|m| {
            let of: Vec<&dyn TestMem> = bufs.iter().copied().filter(|b| b.mem() == m).collect();
            reg_list(&of)
        })
        .collect()
}

/// Registers whole buffers (one call per memory type); panics on failure.
#[track_caller]
pub(crate) fn reg(agent: &dyn TargetAgent, bufs: &[&dyn TestMem]) {
    for list in lists_by_mem(bufs) {
        if let Err(e) = try_reg(agent, &list) {
            panic!(
                "registering {} {} buffer(s) failed: {e}",
                list.len(),
                list.mem()
            );
        }
    }
}

/// Deregisters whole buffers (one call per memory type); panics on failure.
#[track_caller]
pub(crate) fn dereg(agent: &dyn TargetAgent, bufs: &[&dyn TestMem]) {
    for list in lists_by_mem(bufs) {
        if let Err(e) = agent.deregister(&list, &[]) {
            panic!(
                "deregistering {} {} buffer(s) failed: {e}",
                list.len(),
                list.mem()
            );
        }
    }
}

/// A DRAM transfer list.
pub(crate) fn xlist(descs: Vec<Desc>) -> XferDescList {
    XferDescList::from_descs(MemType::Dram, descs)
}

/// A transfer list of memory type `mem`.
pub(crate) fn xlist_of(mem: MemType, descs: Vec<Desc>) -> XferDescList {
    XferDescList::from_descs(mem, descs)
}

/// A transfer list of the harness's target memory type.
pub(crate) fn tlist(h: &dyn Harness, descs: Vec<Desc>) -> XferDescList {
    xlist_of(
        h.target_mem()
            .expect("cases that move data check for a target memory type"),
        descs,
    )
}

/// `len`-byte pages of `buf` at the given page indices, in that order.
pub(crate) fn pages(
    buf: &dyn TestMem,
    page: usize,
    idx: impl IntoIterator<Item = usize>,
) -> Vec<Desc> {
    idx.into_iter().map(|i| buf.desc(i * page, page)).collect()
}

/// The same descriptor on another device id.
pub(crate) fn on_dev(d: Desc, dev: u64) -> Desc {
    Desc::new(d.addr, d.len, dev)
}

/// Posts (with `notif` replacing the request's notification if given) and waits for the post
/// to finish, within the harness's timeout. Returns the first error of either step.
pub(crate) fn run_notif(
    h: &dyn Harness,
    req: &XferRequest,
    notif: Option<&[u8]>,
) -> Result<XferStatus> {
    let s = match notif {
        Some(n) => req.post_with_notif(n)?,
        None => req.post()?,
    };
    match s {
        XferStatus::Done => Ok(XferStatus::Done),
        XferStatus::InProgress => req.wait(Some(h.timeout())),
    }
}

/// [`run_notif`] without a notification override.
pub(crate) fn run(h: &dyn Harness, req: &XferRequest) -> Result<XferStatus> {
    run_notif(h, req, None)
}

/// Runs a post to completion and checks that it and the request's status report `Done`.
#[track_caller]
pub(crate) fn run_ok(h: &dyn Harness, req: &XferRequest, what: &str) {
    match run(h, req) {
        Ok(XferStatus::Done) => {}
        Ok(s) => panic!("{what}: the post ended as {s:?}, expected Done"),
        Err(e) => panic!("{what}: the transfer failed: {e}"),
    }
    match req.status() {
        Ok(XferStatus::Done) => {}
        other => panic!("{what}: status after completion is {other:?}, expected Done"),
    }
}

/// [`run_ok`] with a notification override.
#[track_caller]
pub(crate) fn run_ok_notif(h: &dyn Harness, req: &XferRequest, notif: &[u8], what: &str) {
    match run_notif(h, req, Some(notif)) {
        Ok(XferStatus::Done) => {}
        other => panic!("{what}: the post ended as {other:?}, expected Done"),
    }
}

/// Asserts that `r` failed with `kind` and returns the error.
#[track_caller]
/// Like [`expect_err`], accepting any of `kinds`: a peer's death may be noticed by the call
/// itself (`RemoteDisconnect`) or, a moment earlier, by the backend's own threads, which
/// invalidate the peer so that the call finds nothing (`NotFound`).
pub(crate) fn expect_err_in<T>(r: Result<T>, kinds: &[ErrorKind], what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: succeeded, expected one of {kinds:?}"),
        Err(e) if kinds.contains(&e.kind()) => {
            assert!(
                e.to_string().starts_with(e.kind().status_name()),
                "{what}: message {e} does not start with {}",
                e.kind().status_name()
            );
            e
        }
        Err(e) => panic!(
            "{what}: failed with {}, expected one of {kinds:?}: {e}",
            e.kind()
        ),
    }
}

pub(crate) fn expect_err<T>(r: Result<T>, kind: ErrorKind, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: succeeded, expected {kind}"),
        Err(e) if e.kind() == kind => {
            assert!(
                e.to_string().starts_with(kind.status_name()),
                "{what}: message {e} does not start with {}",
                kind.status_name()
            );
            e
        }
        Err(e) => panic!("{what}: failed with {}, expected {kind}: {e}", e.kind()),
    }
}

/// Collects exactly `n` notifications on `agent`, waiting up to the harness's timeout, and
/// checks that no more than `n` have arrived.
#[track_caller]
pub(crate) fn collect_notifs(
    h: &dyn Harness,
    agent: &dyn TargetAgent,
    n: usize,
) -> Vec<Notification> {
    let deadline = Instant::now() + h.timeout();
    let mut got: Vec<Notification> = Vec::new();
    loop {
        got.extend(agent.get_notifs(&[]).expect("get_notifs"));
        if got.len() >= n {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!(
                "expected {n} notification(s) on {}, got {} within {:?}: {:?}",
                agent.name(),
                got.len(),
                h.timeout(),
                summary(&got)
            );
        }
        agent.wait_notif(left);
    }
    assert_eq!(
        got.len(),
        n,
        "more notifications than expected on {}: {:?}",
        agent.name(),
        summary(&got)
    );
    got
}

/// `(sender, message)` pairs, for comparisons and messages.
pub(crate) fn summary(n: &[Notification]) -> Vec<(String, String)> {
    n.iter()
        .map(|n| (n.from.clone(), String::from_utf8_lossy(&n.msg).into_owned()))
        .collect()
}

/// An initiator `a` and, in two-agent mode, a target `b` that `a` has metadata for. `b` lives in
/// a peer process when the harness is [`CrossProcess`](crate::CrossProcess). Requests go from
/// the initiator's DRAM to target memory of type `tmem`.
pub(crate) struct Pair {
    pub a: Agent,
    pub b: Option<Box<dyn TargetAgent>>,
    /// The target side's memory type ([`Harness::target_mem`]).
    pub tmem: MemType,
}

impl Pair {
    /// Agents for `mode`, telemetry on.
    pub fn new(h: &dyn Harness, mode: Mode) -> Pair {
        Pair::with_telemetry(h, mode, true)
    }

    /// Agents for `mode` with telemetry on or off.
    pub fn with_telemetry(h: &dyn Harness, mode: Mode, telemetry: bool) -> Pair {
        let tmem = h
            .target_mem()
            .expect("cases that move data check for a target memory type");
        let a = h.new_agent_with(&unique_name("init"), telemetry);
        let b = match mode {
            Mode::SelfTarget => None,
            Mode::TwoAgents => Some(h.new_target(&unique_name("target"), telemetry)),
        };
        Pair { a, b, tmem }
    }

    /// Agents for `mode` with `local` buffers registered on the initiator and `target`
    /// memory on the target, and the target's metadata loaded.
    pub fn setup(
        h: &dyn Harness,
        mode: Mode,
        local: &[&dyn TestMem],
        target: &[&dyn TestMem],
    ) -> Pair {
        let p = Pair::new(h, mode);
        if !local.is_empty() {
            reg(&p.a, local);
        }
        if !target.is_empty() {
            reg(p.target(), target);
        }
        p.publish();
        p
    }

    /// The agent requests go to.
    pub fn target(&self) -> &dyn TargetAgent {
        match &self.b {
            Some(b) => b.as_ref(),
            None => &self.a,
        }
    }

    /// The target's name as requests name it.
    pub fn target_name(&self) -> String {
        self.target().name().to_owned()
    }

    /// A target-side transfer list.
    pub fn tlist(&self, descs: Vec<Desc>) -> XferDescList {
        xlist_of(self.tmem, descs)
    }

    /// Loads the target's full metadata into the initiator (again: partial merges keep the
    /// generation). Nothing to do in self-target mode.
    pub fn publish(&self) {
        if let Some(b) = &self.b {
            let blob = b.local_metadata().expect("target metadata");
            let name = self
                .a
                .load_remote_metadata(&blob)
                .expect("load target metadata");
            assert_eq!(
                name,
                b.name(),
                "load_remote_metadata returns the peer's name"
            );
        }
    }

    /// A request from a local (DRAM) and a target descriptor list to the target.
    #[track_caller]
    pub fn create(
        &self,
        op: XferOp,
        local: Vec<Desc>,
        remote: Vec<Desc>,
        opts: &XferOptions,
    ) -> XferRequest {
        self.try_create(op, local, remote, &self.target_name(), opts)
            .unwrap_or_else(|e| panic!("create_xfer_req failed: {e}"))
    }

    /// `create_xfer_req` from a local (DRAM) and a target descriptor list to agent `to`.
    pub fn try_create(
        &self,
        op: XferOp,
        local: Vec<Desc>,
        remote: Vec<Desc>,
        to: &str,
        opts: &XferOptions,
    ) -> Result<XferRequest> {
        self.a
            .create_xfer_req(op, &xlist(local), &self.tlist(remote), to, opts)
    }

    /// Prepares a local-side list.
    #[track_caller]
    pub fn prep_local(&self, descs: Vec<Desc>) -> rixl::PreparedList {
        self.a
            .prep_xfer_dlist(rixl::INIT_AGENT, &xlist(descs), &[])
            .unwrap_or_else(|e| panic!("prep_xfer_dlist (local) failed: {e}"))
    }

    /// Prepares a target-side list.
    #[track_caller]
    pub fn prep_target(&self, descs: Vec<Desc>) -> rixl::PreparedList {
        self.a
            .prep_xfer_dlist(&self.target_name(), &self.tlist(descs), &[])
            .unwrap_or_else(|e| panic!("prep_xfer_dlist (target) failed: {e}"))
    }
}

/// Checks that `agent` still moves data after an error: registers a fresh DRAM buffer and
/// fresh target memory of the backend's own pair, copies between them (to itself, or through a
/// fresh peer when the backend is remote-only), verifies and deregisters. Does nothing when the
/// harness has no target memory type (the cases that move data say so).
#[track_caller]
pub(crate) fn smoke(h: &dyn Harness, agent: &Agent) {
    let Some(tmem) = h.target_mem() else {
        return;
    };
    let src = TestBuffer::with_pattern(3 * 4096 + 5, 0x5EED);
    let dst = TargetMem::of(tmem, 3 * 4096 + 5);
    let len = src.len();
    if h.local() {
        reg(agent, &[&src, &dst]);
        let req = agent
            .create_xfer_req(
                XferOp::Write,
                &xlist(vec![src.whole()]),
                &xlist_of(tmem, vec![dst.whole()]),
                agent.name(),
                &XferOptions::default(),
            )
            .expect("smoke request");
        run_ok(h, &req, "smoke transfer");
        dst.assert_range(0, &crate::pattern(0x5EED, 0, len), "smoke transfer data");
        drop(req);
        dereg(agent, &[&src, &dst]);
    } else if h.remote() {
        let peer = crate::support::unique_name("smoke-peer");
        let peer = h.new_target(&peer, true);
        reg(agent, &[&src]);
        reg(&peer, &[&dst]);
        agent
            .load_remote_metadata(&peer.local_metadata().expect("peer metadata"))
            .expect("load peer metadata");
        let req = agent
            .create_xfer_req(
                XferOp::Write,
                &xlist(vec![src.whole()]),
                &xlist_of(tmem, vec![dst.whole()]),
                peer.name(),
                &XferOptions::default(),
            )
            .expect("smoke request");
        run_ok(h, &req, "smoke transfer");
        dst.assert_range(0, &crate::pattern(0x5EED, 0, len), "smoke transfer data");
        drop(req);
        dereg(agent, &[&src]);
        agent.invalidate_remote_metadata(peer.name());
    }
}
