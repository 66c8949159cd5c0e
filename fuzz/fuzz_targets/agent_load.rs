//! An agent loading arbitrary bytes as a peer's metadata: never panics, and the agent keeps
//! working (its own metadata still round-trips through another agent).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rixl::{Agent, AgentConfig};

fn agents() -> &'static (Agent, Agent) {
    static A: OnceLock<(Agent, Agent)> = OnceLock::new();
    A.get_or_init(|| {
        let cfg = || AgentConfig::default().backend("LOOPBACK");
        (Agent::new("fuzz-a", cfg()).unwrap(), Agent::new("fuzz-b", cfg()).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let (a, b) = agents();
    if let Ok(name) = a.load_remote_metadata(data) {
        a.invalidate_remote_metadata(&name);
    }
    let blob = b.local_metadata().expect("metadata");
    assert_eq!(a.load_remote_metadata(&blob).expect("valid blob loads"), "fuzz-b");
    a.invalidate_remote_metadata("fuzz-b");
});
