//! Backend parameters: RIXL's own names and NIXL's, and how they map onto the engines.

use rixl_backend::{ParamKind, ParamSpec};
use rixl_core::{Error, Params, Result};

const fn int(min: u64, max: u64) -> ParamKind {
    ParamKind::Int { min, max }
}

/// The parameters, declared once: `get_plugin_params("POSIX")` reports the defaults, the agent
/// validates each value's form against it, the crate docs carry its table (checked by a test),
/// and [`Config::from_params`] adds the checks across parameters. The report-only entries are
/// what `params()` adds (the engines actually chosen), accepted back so that a backend's
/// effective parameters can create a new backend unchanged.
pub(crate) const PARAMS: &[ParamSpec] = &[
    ParamSpec::new("engine", ParamKind::Choice(&["auto", "io_uring", "uring", "threads", "thread_pool", crate::AUTO_LABEL]), "auto",
        "`auto`: O_DIRECT on io_uring, buffered on the thread pool, small buffered posts inline; all on the thread pool without io_uring. `io_uring`: everything on io_uring, or a creation error. `threads`: everything on the thread pool. (`io_uring+threads`, what `params()` reports for `auto`, means `auto`.)"),
    ParamSpec::new("use_uring", ParamKind::Bool, "false", "NIXL's name: same as `engine=io_uring`."),
    ParamSpec::new("use_aio", ParamKind::Bool, "false", "NIXL's libaio queue, which is asynchronous for O_DIRECT and copies inside `io_submit` for buffered files; `engine=auto` does the same with io_uring and inline posts."),
    ParamSpec::new("use_posix_aio", ParamKind::Bool, "false", "NIXL's POSIX AIO queue; glibc implements it with threads doing pread/pwrite, so this means `engine=threads`."),
    ParamSpec::new("ios_pool_size", int(1, 1 << 32), "65536", "Most I/O operations one post may need (as NIXL's I/O pool, a larger request is refused with `InvalidParam`)."),
    ParamSpec::new("kernel_queue_size", int(1, MAX_QUEUE as u64), "256", "io_uring: data operations in flight (the ring is sized from it)."),
    ParamSpec::new("num_threads", int(0, 1024), "0", "Workers of the thread-pool engine; 0 = auto: 2 per core, 4–32."),
    ParamSpec::new("max_io_size", int(4096, 1 << 30), "16777216", "Largest single read or write (a multiple of 4096); larger segments are split."),
    ParamSpec::new("inline_max_bytes", int(0, 1 << 30), "524288", "`engine=auto`: buffered posts of at most this many bytes, and at most one operation per 4 KiB of it (128), start in the posting thread; 0 turns that off."),
    ParamSpec::new("file_inflight_bytes", int(0, 1 << 40), "268435456", "io_uring: most bytes of O_DIRECT operations in flight per registered file (one operation always may start, so a larger one still runs); 0 = no limit. Other files' posts go ahead while one file is at its budget."),
    ParamSpec::new("engine_fallback_reason", ParamKind::ReportOnly, "", "Why `auto` fell back to the thread pool, when it did."),
    ParamSpec::new("engine_direct", ParamKind::ReportOnly, "", "The engine running O_DIRECT posts."),
    ParamSpec::new("engine_buffered", ParamKind::ReportOnly, "", "The engine running buffered posts."),
];

/// Which engine the caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EngineChoice {
    /// O_DIRECT files on io_uring, buffered files on the thread pool (small posts inline);
    /// everything on the thread pool when io_uring cannot be set up.
    Auto,
    /// io_uring or a creation error.
    Uring,
    /// The pread/pwrite thread pool.
    Threads,
}

/// Parsed, validated parameters.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub choice: EngineChoice,
    /// io_uring ring depth and maximum operations in flight on the ring.
    pub queue_depth: u32,
    /// Maximum I/O operations one post may need.
    pub ios_pool_size: usize,
    /// Worker threads of the thread-pool engine.
    pub threads: usize,
    /// Largest single read or write; larger segments are split.
    pub max_io: u32,
    /// `engine=auto`: buffered posts of at most this many bytes start in the posting thread.
    pub inline_max: u64,
    /// io_uring: most bytes of O_DIRECT operations in flight per file (one operation always
    /// may go); `u64::MAX` for no limit.
    pub file_inflight: u64,
}

/// Largest ring NIXL's `kernel_queue_size` may ask for (the kernel's own limit).
const MAX_QUEUE: u32 = 32768;

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    // NIXL's boolean syntax (NIXL-API §3.11).
    match v.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "on" | "1" | "true" | "enable" => Ok(true),
        "n" | "no" | "off" | "0" | "false" | "disable" => Ok(false),
        _ => Err(Error::invalid_param(format!(
            "POSIX parameter {key}={v:?} is not a boolean (use true/false, yes/no, on/off, 1/0)"
        ))),
    }
}

fn parse_num(key: &str, v: &str, min: u64, max: u64) -> Result<u64> {
    let n: u64 = v.trim().parse().map_err(|_| {
        Error::invalid_param(format!(
            "POSIX parameter {key}={v:?} is not a non-negative integer"
        ))
    })?;
    if n < min || n > max {
        return Err(Error::invalid_param(format!(
            "POSIX parameter {key}={n} is out of range ({min}..={max})"
        )));
    }
    Ok(n)
}

/// The thread count `num_threads=0` stands for: enough workers to keep a few O_DIRECT requests
/// in flight per core, since each worker has exactly one I/O outstanding.
pub(crate) fn auto_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 2).clamp(4, 32)
}

impl Config {
    /// Parses the merged parameters (defaults overridden by the caller's). Unknown keys are
    /// refused so that a misspelt tuning knob does not silently do nothing.
    pub(crate) fn from_params(given: &Params) -> Result<Config> {
        let parsed = rixl_backend::validate(crate::NAME, PARAMS, given)?;
        let p = parsed.values();
        let get = |k: &str| -> &str { p.get(k).map_or("", String::as_str) };
        let use_uring = parse_bool("use_uring", get("use_uring"))?;
        let use_aio = parse_bool("use_aio", get("use_aio"))?;
        let use_posix_aio = parse_bool("use_posix_aio", get("use_posix_aio"))?;
        let picked = [use_uring, use_aio, use_posix_aio]
            .iter()
            .filter(|b| **b)
            .count();
        if picked > 1 {
            return Err(Error::invalid_param(
                "POSIX: at most one of use_uring, use_aio and use_posix_aio may be true",
            ));
        }
        // NIXL's queue choice. RIXL has no libaio engine: `use_aio` asks for kernel asynchronous
        // I/O, which io_uring provides (with the thread pool as the fallback, as for the
        // default). glibc's POSIX AIO is itself a pool of threads doing pread/pwrite, which is
        // exactly the thread-pool engine.
        let nixl = if use_uring {
            Some(EngineChoice::Uring)
        } else if use_aio {
            Some(EngineChoice::Auto)
        } else if use_posix_aio {
            Some(EngineChoice::Threads)
        } else {
            None
        };
        let engine = get("engine");
        let rixl = match engine.trim().to_ascii_lowercase().as_str() {
            // `io_uring+threads` is what `params()` reports for `auto`.
            "auto" | "" | crate::AUTO_LABEL => None,
            "io_uring" | "uring" => Some(EngineChoice::Uring),
            "threads" | "thread_pool" => Some(EngineChoice::Threads),
            other => {
                return Err(Error::invalid_param(format!(
                    "POSIX parameter engine={other:?} is not one of auto, io_uring, threads"
                )))
            }
        };
        let choice = match (rixl, nixl) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::invalid_param(format!(
                    "POSIX parameter engine={engine} contradicts use_uring/use_aio/use_posix_aio"
                )))
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => EngineChoice::Auto,
        };
        let queue_depth = parse_num(
            "kernel_queue_size",
            get("kernel_queue_size"),
            1,
            MAX_QUEUE.into(),
        )? as u32;
        let ios_pool_size = parse_num("ios_pool_size", get("ios_pool_size"), 1, 1 << 32)? as usize;
        let threads = match parse_num("num_threads", get("num_threads"), 0, 1024)? {
            0 => auto_threads(),
            n => n as usize,
        };
        let max_io = parse_num("max_io_size", get("max_io_size"), 4096, 1 << 30)?;
        if !max_io.is_multiple_of(4096) {
            // Splits must keep O_DIRECT alignment, whatever the device's block size.
            return Err(Error::invalid_param(format!(
                "POSIX parameter max_io_size={max_io} must be a multiple of 4096"
            )));
        }
        let inline_max = parse_num("inline_max_bytes", get("inline_max_bytes"), 0, 1 << 30)?;
        let file_inflight = match parse_num(
            "file_inflight_bytes",
            get("file_inflight_bytes"),
            0,
            1 << 40,
        )? {
            0 => u64::MAX,
            n => n,
        };
        Ok(Config {
            file_inflight,
            choice,
            queue_depth,
            ios_pool_size,
            threads,
            max_io: max_io as u32,
            inline_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kv: &[(&str, &str)]) -> Result<Config> {
        let p: Params = kv
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_params(&p)
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.choice, EngineChoice::Auto);
        assert_eq!(c.queue_depth, 256);
        assert_eq!(c.ios_pool_size, 65536);
        assert_eq!(c.max_io, 16 << 20);
        assert_eq!(c.inline_max, 512 << 10);
        assert_eq!(c.file_inflight, 256 << 20);
        assert_eq!(
            cfg(&[("file_inflight_bytes", "0")]).unwrap().file_inflight,
            u64::MAX
        );
        assert!(c.threads >= 4);
    }

    #[test]
    fn nixl_names_map_onto_engines() {
        assert_eq!(
            cfg(&[("use_uring", "true")]).unwrap().choice,
            EngineChoice::Uring
        );
        assert_eq!(
            cfg(&[("use_aio", "yes")]).unwrap().choice,
            EngineChoice::Auto
        );
        assert_eq!(
            cfg(&[("use_posix_aio", "1")]).unwrap().choice,
            EngineChoice::Threads
        );
        assert_eq!(
            cfg(&[("engine", "threads")]).unwrap().choice,
            EngineChoice::Threads
        );
        assert_eq!(
            cfg(&[("engine", "io_uring+threads"), ("use_aio", "true")])
                .unwrap()
                .choice,
            EngineChoice::Auto
        );
        assert_eq!(
            cfg(&[("engine", "io_uring"), ("use_uring", "true")])
                .unwrap()
                .choice,
            EngineChoice::Uring
        );
    }

    #[test]
    fn bad_values_are_invalid_param() {
        for kv in [
            &[("use_uring", "true"), ("use_aio", "true")][..],
            &[("engine", "threads"), ("use_uring", "true")],
            &[("engine", "spdk")],
            &[("kernel_queue_size", "0")],
            &[("kernel_queue_size", "-1")],
            &[("max_io_size", "5000")],
            &[("inline_max_bytes", "-1")],
            &[("inline_max_bytes", "2147483648")],
            &[("file_inflight_bytes", "-1")],
            &[("file_inflight_bytes", "2199023255553")],
            &[("use_uring", "maybe")],
            &[("no_such_knob", "1")],
        ] {
            let e = cfg(kv).unwrap_err();
            assert_eq!(e.kind(), rixl_core::ErrorKind::InvalidParam, "{kv:?}: {e}");
        }
    }
}
