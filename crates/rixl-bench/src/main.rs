//! `rixl-bench`: a nixlbench-style benchmark for RIXL.
//!
//! It sweeps block sizes and batch sizes (doubling), runs warm-up and timed iterations of READ or
//! WRITE requests on one or more threads with one or more requests in flight per thread, and
//! prints nixlbench's table (NIXL-API §6), JSON lines, or an SVG plot.
//!
//! Also: a KV-cache mode (`--kv_preset`), a latency mode (`--latency xfer|pingpong`: one small
//! transfer or notification at a time, answered by the target, min/p50/avg/p99/max), the
//! manytoone and onetomany schemes, and a scattered descriptor layout (`--layout`).
//!
//! Process model: `LOOPBACK` runs two agents in one process; `SHM` and `TCP` re-execute this
//! binary as the target process (one per target of onetomany), which publishes its metadata
//! through its listener on 127.0.0.1 and answers fill / verify / notification-count requests on
//! its stdin; `POSIX` runs one process against files. `--listen` / `--target_addr` run the two roles of a SHM or
//! TCP run by hand (on two hosts for TCP). Exit status: 0 success, 1 run-time failure (including a
//! failed consistency check), 2 bad input (a one-line error naming the option).
//!
//! Modules: one per mode ([`bandwidth`], [`kv`], [`latency`], [`target`]), which [`run`] picks
//! from the parsed [`cli::Config`]. A mode never calls another mode, only the shared modules:
//! [`session`] (agents, targets and buffers of an initiator run), [`target_proc`] and
//! [`target_files`] (the initiator's handle on a target process or on the POSIX files),
//! [`protocol`] (what initiator and target process agree on), [`notif`] (the "0xBEEF"
//! notification and the target's loop answering it), [`layout`] (where descriptors lie),
//! [`buffer`], [`rng`], [`cli`] and [`output`].

// Modes.
mod bandwidth;
mod kv;
mod latency;
mod target;

// What the modes share.
mod buffer;
mod cli;
mod layout;
mod notif;
mod output;
mod protocol;
mod rng;
mod session;
mod target_files;
mod target_proc;

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let args = match cli::parse(argv) {
        Ok(a) => a,
        Err(Ok(code)) => return ExitCode::from(code as u8),
        Err(Err(bad)) => return bad_input(&bad),
    };
    let cfg = match cli::Config::validate(args) {
        Ok(c) => c,
        Err(bad) => return bad_input(&bad),
    };
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rixl-bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the mode `cfg` asks for: the target of a two-process run (started by hand with
/// `--listen`, or re-executed by an initiator), or, as the initiator, the KV-cache, latency or
/// bandwidth mode. An initiator prints its configuration first (to stderr with `--json`, so that
/// stdout holds only JSON lines).
fn run(cfg: &cli::Config) -> Result<(), String> {
    if let Some(addr) = cfg.listen {
        return target::serve(cfg, target::Control::Tcp(addr));
    }
    if std::env::var(protocol::ROLE_ENV).as_deref() == Ok("target") {
        return target::serve(cfg, target::Control::Stdio);
    }
    if cfg.args.json {
        eprint!("{}", cfg.dump());
    } else {
        print!("{}", cfg.dump());
    }
    if let Some(kv) = &cfg.kv {
        kv::run(cfg, kv)
    } else if let Some(l) = cfg.latency {
        latency::run(cfg, l)
    } else {
        bandwidth::run(cfg)
    }
}

fn bad_input(bad: &cli::BadInput) -> ExitCode {
    eprintln!("rixl-bench: error: {}", bad.0);
    ExitCode::from(2)
}
