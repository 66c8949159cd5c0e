//! # rixl-testkit: the conformance suite every RIXL backend runs
//!
//! RIXL promises NIXL's observable behaviour (see `NIXL-API.md`) whatever backend moves the
//! bytes: the same error kinds for the same mistakes, the same notification semantics, the same
//! metadata and invalidation rules, and correct data for every descriptor. Most of that is
//! implemented once, in the agent, but each backend can still break it: by merging across
//! regions, by sending a notification before the data has landed, by hanging instead of
//! reporting a dead peer, by writing into memory its owner has deregistered. Unit tests of one
//! backend do not catch these; one shared suite, run against every backend, does.
//!
//! ## How a backend crate uses it
//!
//! Describe the backend with a [`Harness`] (usually a [`BackendHarness`]) and expand the suite
//! in an integration test. Every case becomes its own `#[test]`, so a failure is reported by
//! name:
//!
//! ```ignore
//! // crates/rixl-mybackend/tests/conformance.rs
//! rixl_testkit::conformance_tests!(
//!     rixl_testkit::BackendHarness::new("MYBACKEND")
//!         .remote(true)
//!         .local(true)
//!         .notif(true)
//! );
//! ```
//!
//! A harness declares what the backend can do; cases that need a missing capability (two agents,
//! a self-target, notifications) print why they are skipped and pass. The
//! `capabilities_match_harness` case checks the declaration against what the backend reports,
//! so a harness cannot silently skip half of the suite. [`run_all`] runs every case in one test
//! instead, and [`CASES`] lists them for other drivers.
//!
//! A storage backend runs the same suite: its cases write to and read from storage instead of
//! host memory (see "What the suite assumes"). POSIX, for example, runs it with FILE target
//! memory (the default choice from its capabilities) and with BLK:
//!
//! ```ignore
//! mod conformance {
//!     rixl_testkit::conformance_tests!(rixl_testkit::BackendHarness::new("POSIX"));
//! }
//! mod conformance_blk {
//!     rixl_testkit::conformance_tests!(
//!         rixl_testkit::BackendHarness::new("POSIX").target_mem(rixl::MemType::Blk)
//!     );
//! }
//! ```
//!
//! ## What the suite assumes
//!
//! - DRAM on the initiator, the backend's own memory type on the target. Every case's
//!   initiator moves host memory ([`TestBuffer`]). What its requests write to and read from,
//!   the *target memory* ([`TargetMem`], module [`target_mem`]), is of the type the backend
//!   moves DRAM to ([`Harness::target_mem`]): the first `(DRAM, X)` pair of its declared
//!   [`Capabilities::moves`] whose `X` the suite can make, DRAM→DRAM first when the backend
//!   has it. LOOPBACK, SHM and TCP get a [`TestBuffer`], exactly as before; POSIX gets a
//!   [`TestFile`] for DRAM→FILE (or DRAM→BLK): a temporary file registered by path, whose
//!   transfer descriptors carry the file offset as `addr` and the file's key as `dev`. Cases
//!   describe and check target memory through [`TestMem`] (descriptors, registrations,
//!   reading and asserting byte ranges), so each runs unchanged on every type; the
//!   registration cases check DRAM and, when it differs, the target type; the "agent still
//!   works" check after the error cases copies over the backend's own pair. A backend whose
//!   moves the suite cannot make memory for yet (DRAM↔OBJ; VRAM↔FILE, whose initiator side is
//!   not DRAM) gets the cases that move no data, and every other case prints why it is
//!   skipped; supporting it means a new [`TargetMem`] variant.
//! - Two modes. One agent targeting itself (NIXL's loopback; local backends: LOOPBACK, SHM,
//!   TCP and the storage backends), and an initiator talking to a target through the backend's
//!   remote path. The target lives in the test process, or, with
//!   [`cross_process_conformance_tests!`], in a peer process that maps the test buffers at the
//!   same addresses (see [`remote`]) and opens test files by path; there, "the peer dies" means
//!   SIGKILL. Cases that need two agents or notifications print why they are skipped on a
//!   backend without them (POSIX is local-only, without notifications). Behaviour particular to
//!   one kind of memory (end of file, read-only files, O_DIRECT alignment) belongs to the
//!   backend's own tests.
//! - No timing. Nothing asserts how long anything takes; waits are bounded by
//!   [`Harness::timeout`] only so that a broken backend fails instead of hanging.
//! - RIXL's default configuration. `NIXL_TELEMETRY_ENABLE` (telemetry cases; agent creation
//!   panics if it overrides the suite's setting) and `RIXL_ALLOW_OVERLAPPING_REGISTRATIONS`
//!   (overlap cases) must be unset.
//! - Exact error kinds. Each error case checks the [`ErrorKind`](rixl::ErrorKind) that
//!   NIXL-API §2.5/§3 prescribes, and that the agent still works afterwards.
//!
//! Cases follow one rule that makes their `unsafe` registrations sound: buffers are created
//! before the agents that register them, so agents (whose drop deregisters everything) go first,
//! and buffer contents are only read or written while no transfer is in flight. (Storage
//! registrations carry no memory obligation; test files follow the same order anyway.)

#![warn(missing_docs)]

mod arena;
mod buffer;
pub mod cases;
pub mod child;
pub mod peer;
pub mod remote;
mod support;
pub mod target_mem;

use std::time::Duration;

use rixl::{Agent, AgentConfig, Capabilities, MemType, Params};

pub use buffer::{assert_bytes_eq, pattern, pattern_byte, TestBuffer};
pub use remote::{CrossProcess, RemoteAgent, TargetAgent};
pub use support::{block_on, dram_list, eventually, unique_name, Rng};
pub use target_mem::{target_mem_type, TargetMem, TestFile, TestMem};

/// How to make agents for the backend under test, and what the backend can do.
///
/// Only [`Harness::backend`] and the three capability flags are required; the defaults create
/// agents with the backend (and its [`Harness::params`]) as their only backend. Harnesses are
/// `Sync` because several cases share them with worker threads.
pub trait Harness: Sync {
    /// The backend's name, as given to `create_backend`.
    fn backend(&self) -> &str;

    /// Parameters passed when the backend is created.
    fn params(&self) -> Params {
        Params::new()
    }

    /// The configuration of every agent the suite creates, before telemetry is set.
    fn config(&self) -> AgentConfig {
        AgentConfig::default().backend_with(self.backend(), self.params())
    }

    /// A new agent named `name` with the backend under test and telemetry on.
    fn new_agent(&self, name: &str) -> Agent {
        self.new_agent_with(name, true)
    }

    /// A new agent named `name`, with telemetry on or off.
    ///
    /// Panics if the agent cannot be created, or if `NIXL_TELEMETRY_ENABLE` overrides the
    /// requested telemetry setting (unset it to run the suite).
    fn new_agent_with(&self, name: &str, telemetry: bool) -> Agent {
        let agent = Agent::new(name, self.config().telemetry(telemetry)).unwrap_or_else(|e| {
            panic!(
                "cannot create agent {name:?} with backend {}: {e}",
                self.backend()
            )
        });
        assert_eq!(
            agent.telemetry_enabled(),
            telemetry,
            "NIXL_TELEMETRY_ENABLE overrides the suite's telemetry setting; unset it"
        );
        agent
    }

    /// A new agent to be the target of a case's requests. By default an agent in this process
    /// ([`Harness::new_agent_with`]); [`CrossProcess`] puts it in a peer process.
    fn new_target(&self, name: &str, telemetry: bool) -> Box<dyn TargetAgent> {
        Box::new(self.new_agent_with(name, telemetry))
    }

    /// Targets made by [`Harness::new_target`] live in another process.
    fn cross_process(&self) -> bool {
        false
    }

    /// What the backend can do: by default what its factory declares
    /// ([`Agent::plugin_capabilities`]), the one statement the agent and `rixl-bench` read too.
    /// Cases that need a capability the backend lacks print why they are skipped.
    fn capabilities(&self) -> Capabilities {
        Agent::plugin_capabilities(self.backend()).unwrap_or_else(|e| {
            panic!(
                "backend {} is not available in this build: {e}",
                self.backend()
            )
        })
    }

    /// The backend reaches other agents (two-agent cases run).
    fn remote(&self) -> bool {
        self.capabilities().remote
    }

    /// The backend reaches its own agent (self-target cases run).
    fn local(&self) -> bool {
        self.capabilities().local
    }

    /// The backend carries notifications.
    fn notif(&self) -> bool {
        self.capabilities().notif
    }

    /// The memory type of the target side of the suite's transfers (the initiator side is
    /// always DRAM): by default chosen from the declared moves by [`target_mem_type`] (DRAM
    /// when the backend moves DRAM to DRAM, else FILE or BLK). `None` when the backend moves
    /// DRAM to nothing the suite can make: cases that move data then print why they are
    /// skipped.
    fn target_mem(&self) -> Option<MemType> {
        target_mem_type(&self.capabilities())
    }

    /// The backend estimates transfer costs (otherwise `estimate_cost` must be `NotSupported`).
    fn estimates_cost(&self) -> bool {
        self.capabilities().estimates_cost
    }

    /// The backend implements `query_mem` (otherwise it must be `NotSupported`).
    fn query_mem(&self) -> bool {
        self.capabilities().query_mem
    }

    /// The target side refuses transfers into memory it has deregistered. One-sided backends
    /// whose target takes no part in a transfer (SHM: the initiator writes with
    /// `process_vm_writev`) cannot know, so for them the application must not deregister
    /// memory a peer may still write, exactly as with NIXL.
    fn target_checks_deregistration(&self) -> bool {
        self.capabilities().target_fences_deregistration
    }

    /// Upper bound for any wait (a transfer, a notification). Not a performance target: a
    /// backend that needs it is broken, and the case fails instead of hanging.
    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// A [`Harness`] for a backend named by its name, with parameters: what the backend can do
/// comes from its declared [`Capabilities`], so a harness cannot claim more or less than the
/// backend itself.
#[derive(Clone, Debug)]
pub struct BackendHarness {
    name: String,
    params: Params,
    caps: std::sync::OnceLock<Capabilities>,
    target: Option<MemType>,
    timeout: Duration,
}

impl BackendHarness {
    /// A harness for backend `name`, created with no parameters.
    pub fn new(name: &str) -> BackendHarness {
        BackendHarness {
            name: name.to_owned(),
            params: Params::new(),
            caps: std::sync::OnceLock::new(),
            target: None,
            timeout: Duration::from_secs(30),
        }
    }

    /// Adds a backend parameter.
    pub fn param(mut self, key: &str, value: &str) -> BackendHarness {
        self.params.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Runs the cases with `mem` as the target memory instead of the default choice (see
    /// [`Harness::target_mem`]): POSIX moves DRAM to FILE and to BLK, and runs the suite once
    /// for each. `capabilities_match_harness` checks that the backend moves DRAM to `mem`.
    pub fn target_mem(mut self, mem: MemType) -> BackendHarness {
        self.target = Some(mem);
        self
    }

    /// Sets the upper bound for waits (default 30 s).
    pub fn timeout(mut self, t: Duration) -> BackendHarness {
        self.timeout = t;
        self
    }
}

impl Harness for BackendHarness {
    fn backend(&self) -> &str {
        &self.name
    }
    fn params(&self) -> Params {
        self.params.clone()
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
            .get_or_init(|| {
                Agent::plugin_capabilities(&self.name).unwrap_or_else(|e| {
                    panic!("backend {} is not available in this build: {e}", self.name)
                })
            })
            .clone()
    }
    fn target_mem(&self) -> Option<MemType> {
        self.target
            .or_else(|| target_mem_type(&self.capabilities()))
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A conformance case: runs against the harness and panics on failure.
pub type Case = fn(&dyn Harness);

/// Calls `$callback!` with `[$($args)*]` followed by the name of every case. The single list
/// of cases: [`CASES`] and [`conformance_tests!`] are both generated from it.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cases {
    ($callback:ident [$($args:tt)*]) => {
        $crate::$callback! { [$($args)*]
            // capabilities and registration
            capabilities_match_harness,
            register_deregister_exact_match,
            deregister_sub_range_and_twice_not_found,
            overlapping_registration_invalid_param,
            invalid_dram_registrations,
            registration_argument_errors,
            // data movement
            self_write_read_single,
            remote_write_read_single,
            self_scattered_pages,
            remote_scattered_pages,
            self_unaligned_sizes,
            remote_unaligned_sizes,
            repost_moves_data_again,
            adjacent_registrations_not_merged,
            // prepared lists and merging
            make_merges_contiguous_indices,
            make_merges_runs,
            skip_desc_merge_keeps_every_descriptor,
            create_counts_callers_descriptors,
            strided_lists,
            strided_list_errors,
            telemetry_fields,
            telemetry_off_and_not_posted,
            // notifications
            notif_sticky_per_post,
            notif_empty_and_cleared,
            notif_arrives_under_initiator_name,
            notif_after_data_landed,
            notif_order_from_one_initiator,
            send_notif_self_and_peer,
            get_notifs_drains_and_groups,
            wait_notif_blocks_until_arrival,
            notif_unsupported_errors,
            // errors
            create_backend_errors,
            prep_errors,
            make_xfer_req_errors,
            create_xfer_req_errors,
            status_before_post_not_posted,
            // metadata
            load_own_metadata_invalid_param,
            garbage_metadata_mismatch,
            mutated_metadata_never_panics,
            identical_reload_idempotent,
            metadata_without_remote_backend,
            partial_metadata_flow,
            partial_descs_before_conn_not_found,
            partial_sub_range_not_found,
            check_remote_metadata_never_fails,
            // invalidation and staleness
            invalidation_makes_handles_stale,
            restarted_peer_not_allowed_until_invalidated,
            local_deregistration_makes_requests_stale,
            target_deregistration_is_not_written,
            deregistration_waits_for_posts_in_flight,
            // lifecycle
            cancel_completed_is_noop,
            request_outlives_agent,
            peer_death_remote_disconnect,
            peer_death_with_lingering_handles,
            peer_death_send_notif,
            peer_death_mid_transfer,
            idle_peer_death_invalidates,
            many_threads_self,
            many_threads_remote,
            async_completion,
            estimate_cost,
            query_mem,
            make_connection,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_array {
    ([] $($case:ident),* $(,)?) => {
        &[$((stringify!($case), $crate::cases::$case as $crate::Case)),*]
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_tests {
    ([$harness:expr] $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let harness = $harness;
                $crate::cases::$case(&harness);
            }
        )*
    };
}

/// Every case of the suite with its name, in suite order.
pub const CASES: &[(&str, Case)] = __with_cases!(__case_array []);

/// Expands into one `#[test]` per conformance case, each building the harness from the given
/// expression and running the case on it.
///
/// ```ignore
/// rixl_testkit::conformance_tests!(rixl_testkit::BackendHarness::new("LOOPBACK")
///     .remote(true).local(true).notif(true).estimates_cost(true));
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($($harness:tt)*) => {
        $crate::__with_cases!(__case_tests [$($harness)*]);
    };
}

/// Runs every case in order on `h`, stopping at the first failure (which panics).
pub fn run_all(h: &dyn Harness) {
    for (name, case) in CASES {
        eprintln!("rixl-testkit: {name}");
        case(h);
    }
}
