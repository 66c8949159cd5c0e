//! What every initiator mode starts from: the agents, the target(s) and the buffers of a run
//! ([`open`] makes a [`Session`]), plus the between-row operations on the targets (fill, verify,
//! count notifications, finish).
//!
//! The modes measure different things over the same setup, so the setup lives here once: the
//! target is a second agent in this process (LOOPBACK), one or more target processes (SHM, TCP:
//! [`crate::target_proc`]), or files (POSIX: [`crate::target_files`]), and each mode sees only
//! the agents, the streams and the initiator's buffer.

use std::time::Duration;

use rixl::{Agent, AgentConfig, MemType, RegDesc, RegDescList};

use crate::buffer::Buffer;
use crate::cli::{Backend, Config, Scheme};
use crate::layout::SlotLayout;
use crate::notif::NOTIF;
use crate::protocol::target_name;
use crate::target_files::{FileCleanup, TargetFiles};
use crate::target_proc::TargetProcess;

/// Test hook: flip one byte of the moved data before the consistency check (in-process
/// buffers only), to prove that the check catches it.
pub const CORRUPT_ENV: &str = "RIXL_BENCH_CORRUPT_FOR_TESTS";

/// The other side of the transfers.
enum Target {
    /// A second agent in this process.
    Loopback { agent: Agent, buf: Buffer },
    /// A target process, re-executed or started by hand with `--listen`.
    Process(TargetProcess),
    /// Files registered with the initiator's own agent.
    Files(TargetFiles),
}

impl Target {
    /// Resets every target slot's descriptors and holes to 0xaa.
    fn fill(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        match self {
            Target::Loopback { buf, .. } => {
                SlotLayout::new(cfg, block, batch, true).fill(
                    buf.bytes_mut(),
                    cfg.target_slots(),
                    0xaa,
                );
                Ok(())
            }
            Target::Process(p) => p.fill(block, batch),
            Target::Files(f) => f.fill(cfg, block, batch),
        }
    }

    /// Checks that every target slot's descriptors hold 0xbb (and its holes still 0xaa).
    fn verify(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        let mismatch = match self {
            Target::Loopback { buf, .. } => {
                let lay = SlotLayout::new(cfg, block, batch, true);
                lay.mismatch(buf.bytes(), cfg.target_slots(), 0xbb, 0xaa)
            }
            Target::Process(p) => p.verify(block, batch)?,
            Target::Files(f) => return f.verify(cfg, block, batch),
        };
        match mismatch {
            None => Ok(()),
            Some((off, v)) => Err(format!(
                "consistency check failed: target byte at offset {off} is {v:#04x}"
            )),
        }
    }
}

/// One initiator-target pair of a run.
pub struct Stream {
    /// Index into [`Session::agents`] and [`Session::targets`].
    pub agent: usize,
    pub target: usize,
    /// The target agent's name.
    pub peer: String,
    /// The stream's first slot in the initiator's buffer and in the target's.
    pub lbase: u64,
    pub rbase: u64,
}

/// Agents, targets and buffers of a run. Fields drop in declaration order: the agents go
/// before the buffers they registered.
pub struct Session {
    /// One initiator agent, or one per initiator of manytoone.
    pub agents: Vec<Agent>,
    /// One target, or one per target of onetomany.
    targets: Vec<Target>,
    pub streams: Vec<Stream>,
    _files: Option<FileCleanup>,
    pub lbuf: Buffer,
}

impl Session {
    /// See [`CORRUPT_ENV`]: flips the last byte of the last slot's span on the side that
    /// received the data, when that side is in this process. Runs between rows only.
    pub fn corrupt(&mut self, cfg: &Config, lay: &SlotLayout) {
        if !cfg.write {
            let at = ((cfg.initiator_slots() - 1) * cfg.slot_stride + lay.span - 1) as usize;
            self.lbuf.bytes_mut()[at] ^= 0xff;
        } else if let Some(Target::Loopback { buf, .. }) = self.targets.first_mut() {
            let at = ((cfg.target_slots() - 1) * cfg.slot_stride + lay.span - 1) as usize;
            buf.bytes_mut()[at] ^= 0xff;
        }
    }

    /// Ends a run with target processes: target `k` must have seen `posts[k]` notifications.
    pub fn finish(&mut self, posts: &[u64]) -> Result<(), String> {
        for (k, t) in self.targets.iter_mut().enumerate() {
            if let Target::Process(p) = t {
                p.done(k, posts.get(k).copied().unwrap_or(0))?;
            }
        }
        Ok(())
    }

    /// Takes (and counts) the in-process target's "0xBEEF" notifications; `None` when the
    /// target is not in this process.
    pub fn loopback_notifs(&self) -> Result<Option<u64>, String> {
        match self.targets.first() {
            Some(Target::Loopback { agent, .. }) => Ok(Some(
                agent
                    .get_notifs(&[])
                    .map_err(|e| format!("target notifications: {e}"))?
                    .iter()
                    .filter(|n| n.msg == NOTIF)
                    .count() as u64,
            )),
            _ => Ok(None),
        }
    }

    /// The target agent when it lives in this process (LOOPBACK).
    pub fn loopback_target(&self) -> Option<&Agent> {
        match self.targets.first() {
            Some(Target::Loopback { agent, .. }) => Some(agent),
            _ => None,
        }
    }

    /// How many targets the run has (one per target of onetomany, else one).
    pub fn num_targets(&self) -> usize {
        self.targets.len()
    }

    /// Resets every slot's descriptors and holes to 0xaa on every target, before a row.
    pub fn fill_targets(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        for t in &mut self.targets {
            t.fill(cfg, block, batch)?;
        }
        Ok(())
    }

    /// Checks, after a row of WRITEs, that every target slot's descriptors hold 0xbb (and its
    /// holes still 0xaa).
    pub fn verify_targets(&mut self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        for t in &mut self.targets {
            t.verify(cfg, block, batch)?;
        }
        Ok(())
    }
}

/// The name of initiator agent `i` (the first keeps the pairwise name).
fn initiator_name(i: u64) -> String {
    if i == 0 {
        "rixl-bench-initiator".to_owned()
    } else {
        format!("rixl-bench-initiator-{i}")
    }
}

/// Creates the agents, starts or reaches the target(s), registers the buffers.
pub fn open(cfg: &Config) -> Result<Session, String> {
    let lbuf = Buffer::new(cfg.initiator_bytes() as usize, 0xbb);
    let a = &cfg.args;
    let bname = cfg.backend.name();
    let mk = |name: &str, c: AgentConfig| {
        Agent::new(name, c).map_err(|e| format!("cannot create agent {name} with {bname}: {e}"))
    };
    let stream_bytes = cfg.slots * cfg.slot_stride;
    let mut _files_cleanup = None;
    let (agents, targets, streams) = match cfg.backend {
        Backend::Loopback => {
            let tbuf = Buffer::new(cfg.target_bytes() as usize, 0xaa);
            let tagent = mk("rixl-bench-target", AgentConfig::default().backend(bname))?;
            let regs = RegDescList::from_descs(
                MemType::Dram,
                vec![RegDesc::new(tbuf.addr(), tbuf.len() as u64, 0)],
            );
            // SAFETY: `tbuf` moves into `Target::Loopback` together with its agent, which is
            // declared after it there, so the agent is dropped first; the program touches the
            // buffer only between rows, when no transfer is in flight.
            unsafe { tagent.register_mem(&regs, &[]) }
                .map_err(|e| format!("cannot register the target buffer: {e}"))?;
            let agent = mk(&initiator_name(0), AgentConfig::default().backend(bname))?;
            let md = tagent
                .local_metadata()
                .map_err(|e| format!("target metadata: {e}"))?;
            let peer = agent
                .load_remote_metadata(&md)
                .map_err(|e| format!("loading the target's metadata: {e}"))?;
            let stream = Stream {
                agent: 0,
                target: 0,
                peer,
                lbase: lbuf.addr(),
                rbase: tbuf.addr(),
            };
            (
                vec![agent],
                vec![Target::Loopback {
                    agent: tagent,
                    buf: tbuf,
                }],
                vec![stream],
            )
        }
        Backend::Shm | Backend::Tcp => {
            let ntargets = if cfg.scheme == Scheme::OneToMany {
                cfg.streams
            } else {
                1
            };
            let mut targets = Vec::new();
            let mut addrs = Vec::new();
            match cfg.target_addr {
                None => {
                    // Start every target first, then wait for them: they set up in parallel.
                    let mut started = Vec::new();
                    for k in 0..ntargets {
                        started.push(TargetProcess::spawn(k)?);
                    }
                    for t in started {
                        let (t, addr) = t.greet(cfg, std::net::Ipv4Addr::LOCALHOST.into())?;
                        targets.push(Target::Process(t));
                        addrs.push(addr);
                    }
                }
                Some(at) => {
                    let (t, addr) = TargetProcess::connect(cfg, at)?;
                    targets.push(Target::Process(t));
                    addrs.push(addr);
                }
            }
            let nagents = if cfg.scheme == Scheme::ManyToOne {
                cfg.streams
            } else {
                1
            };
            let mut agents = Vec::new();
            // (peer name, buffer address) of every target, as the first agent sees them.
            let mut remote = Vec::new();
            for i in 0..nagents {
                let agent = mk(&initiator_name(i), AgentConfig::default().backend(bname))?;
                for (k, &addr) in addrs.iter().enumerate() {
                    let name = target_name(k as u64);
                    let peer = agent
                        .fetch_remote_metadata_blocking(&name, addr, Duration::from_secs(30))
                        .map_err(|e| format!("fetching the target's metadata from {addr}: {e}"))?;
                    // The target needs ours too for notifications on some backends (and to
                    // answer them in latency mode). The listener acknowledges a push only once
                    // the metadata is loaded, so the target knows us when this returns.
                    agent
                        .send_local_metadata_blocking(addr, Duration::from_secs(30))
                        .map_err(|e| format!("sending metadata to the target at {addr}: {e}"))?;
                    let regions = agent
                        .remote_regions(&peer, MemType::Dram)
                        .map_err(|e| format!("the target's regions: {e}"))?;
                    let rbase = regions
                        .iter()
                        .find(|d| d.len == cfg.target_bytes())
                        .map(|d| d.addr)
                        .ok_or("the target did not publish its buffer")?;
                    agent
                        .make_connection(&peer, &[])
                        .map_err(|e| format!("connecting to the target: {e}"))?;
                    if i == 0 {
                        remote.push((peer, rbase));
                    }
                }
                agents.push(agent);
            }
            let streams = (0..cfg.streams)
                .map(|i| {
                    let (agent, target, roff) = match cfg.scheme {
                        Scheme::Pairwise => (0, 0, 0),
                        Scheme::ManyToOne => (i as usize, 0, i * stream_bytes),
                        Scheme::OneToMany => (0, i as usize, 0),
                    };
                    let (peer, rbase) = &remote[target];
                    Stream {
                        agent,
                        target,
                        peer: peer.clone(),
                        lbase: lbuf.addr() + i * stream_bytes,
                        rbase: rbase + roff,
                    }
                })
                .collect();
            (agents, targets, streams)
        }
        Backend::Posix => {
            let mut params = rixl::Params::new();
            params.insert("engine".into(), "auto".into());
            let agent = mk(
                &initiator_name(0),
                AgentConfig::default().backend_with(bname, params),
            )?;
            let files = TargetFiles::new(cfg);
            _files_cleanup = Some(files.cleanup());
            files.create(cfg)?;
            let mode = if a.storage_enable_direct {
                "rw,direct"
            } else {
                "rw"
            };
            let regs = RegDescList::from_descs(
                MemType::File,
                files
                    .paths()
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        RegDesc::with_meta(0, 0, i as u64 + 1, format!("{mode}:{}", p.display()))
                    })
                    .collect(),
            );
            // SAFETY: storage registrations address file offsets, not memory.
            unsafe { agent.register_mem(&regs, &[]) }
                .map_err(|e| format!("registering the files: {e}"))?;
            let stream = Stream {
                agent: 0,
                target: 0,
                peer: agent.name().to_owned(),
                lbase: lbuf.addr(),
                rbase: 0,
            };
            (vec![agent], vec![Target::Files(files)], vec![stream])
        }
    };
    if !a.reregister_mem {
        // Each agent registers the slots of its own streams.
        for (i, agent) in agents.iter().enumerate() {
            let (base, len) = if agents.len() > 1 {
                (lbuf.addr() + i as u64 * stream_bytes, stream_bytes)
            } else {
                (lbuf.addr(), lbuf.len() as u64)
            };
            let regs = RegDescList::from_descs(MemType::Dram, vec![RegDesc::new(base, len, 0)]);
            // SAFETY: `lbuf` moves into the session, whose field order drops the agents first;
            // the program touches it only between rows, when no transfer is in flight.
            unsafe { agent.register_mem(&regs, &[]) }
                .map_err(|e| format!("cannot register the initiator buffer: {e}"))?;
        }
    }

    Ok(Session {
        agents,
        targets,
        streams,
        _files: _files_cleanup,
        lbuf,
    })
}
