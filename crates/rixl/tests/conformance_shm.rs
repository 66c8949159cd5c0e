//! The RIXL conformance suite run on the `SHM` backend, with both agents in this process
//! (process_vm_* on our own pid exercises the same system calls and control sockets as two
//! processes). `shm_two_process.rs` covers what needs a real second process.

#![cfg(feature = "shm")]

rixl_testkit::conformance_tests!(rixl_testkit::BackendHarness::new("SHM")
    .remote(true)
    .local(false)
    .notif(true)
    .estimates_cost(true)
    .query_mem(false)
    .target_checks_deregistration(false));
