//! Plain data shared by the agent and the backends: backend parameters, capabilities, resolved
//! transfer segments and cost estimates. The backend contract itself (the `Backend` trait and
//! what it is handed) lives in the `rixl-backend` crate, because its address-taking calls are
//! `unsafe fn`s and this crate forbids `unsafe` altogether.

use std::collections::BTreeMap;

use crate::mem::MemType;

/// Backend parameters: string keys to string values, as NIXL's `nixl_b_params_t`.
pub type Params = BTreeMap<String, String>;

/// What a backend can do, as data: the one statement of it that the agent (selection,
/// `get_plugin_mem_types`), the conformance suite (which cases apply) and `rixl-bench` (which
/// modes make sense) all read. Build one with [`Capabilities::new`] and the builder methods;
/// fields may be added, so it cannot be built as a struct literal outside this crate.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Memory types it can register.
    pub mems: Vec<MemType>,
    /// The (initiator side, target side) memory-type pairs it moves. A storage backend
    /// registers DRAM as the source of its I/O but does not move DRAM to DRAM.
    pub moves: Vec<(MemType, MemType)>,
    /// Can move data within its own agent (loopback, storage).
    pub local: bool,
    /// Can move data to and from other agents (then it must also carry notifications).
    pub remote: bool,
    /// Can deliver notifications.
    pub notif: bool,
    /// Answers `query_mem` (files, objects).
    pub query_mem: bool,
    /// Estimates transfer costs.
    pub estimates_cost: bool,
    /// The target side of a remote transfer takes part in it and refuses (or waits for) ranges
    /// its agent deregistered. False for one-sided backends (SHM's `process_vm_writev`, RDMA),
    /// whose targets cannot fence a peer's writes.
    pub target_fences_deregistration: bool,
}

impl Capabilities {
    /// A backend that registers `mems` and moves nothing yet: add what it does with the
    /// builder methods.
    pub fn new(mems: &[MemType]) -> Capabilities {
        Capabilities {
            mems: mems.to_vec(),
            moves: Vec::new(),
            local: false,
            remote: false,
            notif: false,
            query_mem: false,
            estimates_cost: false,
            target_fences_deregistration: false,
        }
    }

    /// Moves `local` memory to and from `target` memory.
    pub fn moving(mut self, local: MemType, target: MemType) -> Capabilities {
        if !self.moves.contains(&(local, target)) {
            self.moves.push((local, target));
        }
        self
    }

    /// Moves data within its own agent.
    pub fn local(mut self) -> Capabilities {
        self.local = true;
        self
    }

    /// Moves data to and from other agents and carries notifications.
    pub fn remote(mut self) -> Capabilities {
        self.remote = true;
        self.notif = true;
        self
    }

    /// Carries notifications.
    pub fn notifications(mut self) -> Capabilities {
        self.notif = true;
        self
    }

    /// Answers `query_mem`.
    pub fn query_mem(mut self) -> Capabilities {
        self.query_mem = true;
        self
    }

    /// Estimates transfer costs.
    pub fn estimates_cost(mut self) -> Capabilities {
        self.estimates_cost = true;
        self
    }

    /// Its target side fences deregistration (see the field).
    pub fn target_fences_deregistration(mut self) -> Capabilities {
        self.target_fences_deregistration = true;
        self
    }

    /// True when `mem` is among the supported memory types.
    pub fn supports(&self, mem: MemType) -> bool {
        self.mems.contains(&mem)
    }

    /// True when it moves `local` memory to and from `target` memory.
    pub fn can_move(&self, local: MemType, target: MemType) -> bool {
        self.moves.contains(&(local, target))
    }
}

/// One resolved, validated piece of a transfer: `len` bytes at `addr` inside the region the
/// backend knows as `token`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Segment {
    /// Address or offset.
    pub addr: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Device id.
    pub dev: u64,
    /// The backend's token for the covering region (local or remote).
    pub token: u64,
}

/// How a cost estimate was produced (NIXL's `nixl_cost_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostMethod {
    /// A model of the backend (size ÷ rate + latency).
    AnalyticalBackend,
    /// Unknown.
    Unknown,
}

/// An estimate of a transfer's duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostEstimate {
    /// Expected duration in microseconds.
    pub duration_us: u64,
    /// Error margin in microseconds.
    pub margin_us: u64,
    /// How the numbers were obtained.
    pub method: CostMethod,
}
