//! Plain data shared by the agent and the backends: backend parameters, capabilities, resolved
//! transfer segments and cost estimates. The backend contract itself (the `Backend` trait and
//! what it is handed) lives in the `rixl-backend` crate, because its address-taking calls are
//! `unsafe fn`s and this crate forbids `unsafe` altogether.

use std::collections::BTreeMap;

use crate::mem::MemType;

/// Backend parameters: string keys to string values, as NIXL's `nixl_b_params_t`.
pub type Params = BTreeMap<String, String>;

/// What a backend can do, as data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Can move data to and from other agents (then it must also support notifications).
    pub remote: bool,
    /// Can move data within its own agent (loopback, storage).
    pub local: bool,
    /// Can deliver notifications.
    pub notif: bool,
    /// Memory types it can register.
    pub mems: Vec<MemType>,
}

impl Capabilities {
    /// True when `mem` is among the supported memory types.
    pub fn supports(&self, mem: MemType) -> bool {
        self.mems.contains(&mem)
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
