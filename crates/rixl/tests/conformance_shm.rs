//! The RIXL conformance suite run on the `SHM` backend twice: with both agents in this process
//! (process_vm_* on our own pid, same-process peers), and with every case's target agent in a
//! peer process (`cross_process`), where separate address spaces, kernel permission checks and
//! a target killed with SIGKILL are real. `shm_edge_cases.rs` adds SHM-only cases (garbage on
//! the control socket, another host).

#![cfg(feature = "shm")]

fn harness() -> rixl_testkit::BackendHarness {
    rixl_testkit::BackendHarness::new("SHM")
}

rixl_testkit::conformance_tests!(harness());

mod cross_process {
    rixl_testkit::cross_process_conformance_tests!(super::harness());
}
