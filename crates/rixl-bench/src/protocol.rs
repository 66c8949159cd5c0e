//! What the initiator and a target process must agree on: how a target is started, the agents'
//! names, and the handshake line.
//!
//! Both sides of a SHM or TCP run are this binary. The initiator re-executes itself with
//! [`ROLE_ENV`] (and [`INDEX_ENV`]) set, or reaches a target started by hand with `--listen`; the
//! target ([`crate::target`]) then answers the commands that [`crate::target_proc`] sends. Both
//! sides derive the memory layout from their own options, so the handshake ([`hello`]) checks
//! that those options agree before any transfer.

use crate::cli::Config;

/// Environment variable that makes the process the target of a two-process run.
pub const ROLE_ENV: &str = "RIXL_BENCH_ROLE";

/// Environment variable with the index of a re-executed target (onetomany has several).
pub const INDEX_ENV: &str = "RIXL_BENCH_TARGET_INDEX";

/// The agent name of target `k` (the first keeps the pairwise name).
pub fn target_name(k: u64) -> String {
    if k == 0 {
        "rixl-bench-target".to_owned()
    } else {
        format!("rixl-bench-target-{k}")
    }
}

/// The handshake line: both sides must agree on the backend, the memory layout and what the
/// target does with notifications.
pub fn hello(cfg: &Config) -> String {
    format!(
        "HELLO {} {} {} {} {} {} {}",
        cfg.backend.name(),
        cfg.slots,
        cfg.slot_stride,
        cfg.scheme.name(),
        cfg.streams,
        if cfg.scattered {
            "scattered"
        } else {
            "contiguous"
        },
        cfg.latency.map_or("bandwidth", |l| l.name())
    )
}
