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

mod cli;
mod kv;
mod latency;
mod output;
mod run;
mod target;

use std::process::ExitCode;

/// Environment variable that makes the process the target of a two-process run.
pub(crate) const ROLE_ENV: &str = "RIXL_BENCH_ROLE";

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
    let result = if let Some(addr) = cfg.listen {
        target::serve(&cfg, target::Control::Tcp(addr))
    } else if std::env::var(ROLE_ENV).as_deref() == Ok("target") {
        target::serve(&cfg, target::Control::Stdio)
    } else {
        run::run(&cfg)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rixl-bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn bad_input(bad: &cli::BadInput) -> ExitCode {
    eprintln!("rixl-bench: error: {}", bad.0);
    ExitCode::from(2)
}
