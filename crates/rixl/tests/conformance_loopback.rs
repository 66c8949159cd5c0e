//! The RIXL conformance suite (`rixl-testkit`) run on the built-in `LOOPBACK` backend.
//!
//! `LOOPBACK` is local-capable (an agent targeting itself copies in-process) and
//! remote-capable (agents of this process reach each other through it), carries
//! notifications, completes every post inline, estimates costs analytically and has no
//! `query_mem`. Every case of the suite runs as its own test.

rixl_testkit::conformance_tests!(rixl_testkit::BackendHarness::new("LOOPBACK"));
