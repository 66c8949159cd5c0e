//! The "0xBEEF" notification: what every transfer carries, and the target's loop that counts
//! (and in latency mode answers) them.
//!
//! Counting on the target side is how a run checks that every post produced exactly one
//! notification. The loop runs in a target process ([`crate::target`]) and, for LOOPBACK latency
//! runs, on a thread of the initiator's process for the in-process target agent, so it lives
//! here rather than in either mode.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rixl::Agent;

use crate::cli::Config;

/// The notification every network transfer carries, as in nixlbench.
pub const NOTIF: &[u8] = b"0xBEEF";

/// Counts the "0xBEEF" notifications `agent` receives until `stop`; in latency mode also
/// answers each with the same message. Blocks in `wait_notif` (a short yield, then a condvar
/// sleep) rather than polling; its bound only lets the loop see `stop`.
pub fn answer_notifs(agent: &Agent, cfg: &Config, stop: &AtomicBool, count: &AtomicU64) {
    let answer = cfg.latency.is_some();
    let mut failed = false;
    while !stop.load(Ordering::Acquire) {
        if !agent.wait_notif(Duration::from_millis(100)) {
            continue;
        }
        let Ok(ns) = agent.get_notifs(&[]) else {
            continue;
        };
        for n in ns.iter().filter(|n| n.msg.starts_with(NOTIF)) {
            if answer {
                if let Err(e) = agent.send_notif(&n.from, &n.msg, Some(cfg.backend.name())) {
                    // Once: the initiator times out and reports the run as failed.
                    if !failed {
                        eprintln!("rixl-bench target: cannot answer {}: {e}", n.from);
                        failed = true;
                    }
                }
            }
            count.fetch_add(1, Ordering::AcqRel);
        }
    }
}
