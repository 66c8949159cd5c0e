//! The RIXL conformance suite run on the `TCP` backend, with both agents in this process talking
//! over loopback TCP (the same listener, server threads, wire format and range checks as two
//! hosts), and once more with every case's target in a peer process (`cross_process`).
//! `tcp_edge_cases.rs` adds TCP-only cases (hostile raw frames, frozen targets, striped cancel).
//!
//! TCP declares `target_fences_deregistration`: the target serves every byte itself and checks
//! each range against its own live registrations, so a write into memory it deregistered is
//! refused (`NotFound`) instead of landing.

#![cfg(feature = "tcp")]

fn harness() -> rixl_testkit::BackendHarness {
    rixl_testkit::BackendHarness::new("TCP")
}

rixl_testkit::conformance_tests!(harness());

/// Every case again with its target agent in a peer process talking over loopback TCP.
mod cross_process {
    rixl_testkit::cross_process_conformance_tests!(super::harness());
}

/// Every transfer striped: four connections, 4 KiB chunks and no minimum size, so that even
/// one-page posts take the multi-connection path with counted parts and notifications that
/// wait for all of them.
fn striped() -> rixl_testkit::BackendHarness {
    harness()
        .param("connections", "4")
        .param("stripe_min_bytes", "0")
        .param("chunk_bytes", "4096")
}

mod striped {
    rixl_testkit::conformance_tests!(super::striped());
}

/// Striped, with the target in a peer process.
mod striped_cross_process {
    rixl_testkit::cross_process_conformance_tests!(super::striped());
}

/// The single-stream path.
mod one_connection {
    rixl_testkit::conformance_tests!(super::harness().param("connections", "1"));
}
