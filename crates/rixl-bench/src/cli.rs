//! Command line: nixlbench's option names and defaults (NIXL-API §6) where they apply, an
//! optional TOML file of the same options (the command line wins), and the checks that turn
//! impossible combinations into a one-line error naming the option (exit status 2).

use clap::builder::BoolishValueParser;
use clap::Parser;

/// A bad option: printed as one line, exit status 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl BadInput {
    pub fn new(option: &str, msg: impl std::fmt::Display) -> BadInput {
        BadInput(format!("{option}: {msg}"))
    }
}

/// nixlbench-style benchmark of RIXL transfers.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "rixl-bench",
    version,
    rename_all = "snake_case",
    args_override_self = true,
    about = "nixlbench-style benchmark for RIXL: sweeps block and batch sizes and prints \
             bandwidth, latency, prepare/post/transfer times"
)]
pub struct Args {
    /// Backend: LOOPBACK (one process, two agents), SHM or TCP (two processes), POSIX (files).
    #[arg(long, default_value = "SHM")]
    pub backend: String,
    /// READ or WRITE.
    #[arg(long, default_value = "WRITE")]
    pub op_type: String,
    /// Initiator memory: DRAM (VRAM needs a GPU).
    #[arg(long, default_value = "DRAM")]
    pub initiator_seg_type: String,
    /// Target memory: DRAM (VRAM needs a GPU); POSIX always targets FILE.
    #[arg(long, default_value = "DRAM")]
    pub target_seg_type: String,
    /// pairwise (one initiator, one target), manytoone (--num_initiator_dev initiators, one
    /// target) or onetomany (one initiator, --num_target_dev targets); SHM and TCP only for the
    /// last two. tp is not supported.
    #[arg(long, default_value = "pairwise")]
    pub scheme: String,
    /// manytoone: number of initiators (agents of this process, each with its own thread(s),
    /// connections and region of the target buffer).
    #[arg(long, default_value_t = 1)]
    pub num_initiator_dev: u64,
    /// onetomany: number of target processes.
    #[arg(long, default_value_t = 1)]
    pub num_target_dev: u64,
    /// Descriptor placement in the bandwidth sweep: contiguous (back to back, which RIXL
    /// merges into one range) or scattered (every other block-sized hole, in shuffled order,
    /// so that nothing merges).
    #[arg(long, default_value = "contiguous")]
    pub layout: String,
    /// Latency mode instead of the bandwidth sweep: xfer (one --latency_size transfer of
    /// --op_type carrying a notification; the round trip ends when the target's answer arrives)
    /// or pingpong (standalone notifications both ways).
    #[arg(long)]
    pub latency: Option<String>,
    /// Latency mode: bytes moved per transfer (xfer) or per notification (pingpong).
    #[arg(long, default_value_t = 64)]
    pub latency_size: u64,
    /// First block size in bytes (doubled up to --max_block_size).
    #[arg(long, default_value_t = 4096)]
    pub start_block_size: u64,
    /// Last block size in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_block_size: u64,
    /// First batch size: descriptors per request (doubled up to --max_batch_size).
    #[arg(long, default_value_t = 1)]
    pub start_batch_size: u64,
    /// Last batch size.
    #[arg(long, default_value_t = 1)]
    pub max_batch_size: u64,
    /// Timed iterations per row (divided by --large_blk_iter_ftr for blocks over 1 MiB).
    #[arg(long, default_value_t = 1000)]
    pub num_iter: u64,
    /// Warm-up iterations per row (divided by --large_blk_iter_ftr for blocks over 1 MiB).
    #[arg(long, default_value_t = 100)]
    pub warmup_iter: u64,
    /// Divisor of the iteration counts for blocks over 1 MiB.
    #[arg(long, default_value_t = 16)]
    pub large_blk_iter_ftr: u64,
    /// Worker threads; --num_iter must divide evenly.
    #[arg(long, default_value_t = 1)]
    pub num_threads: u64,
    /// Requests in flight per thread.
    #[arg(long, default_value_t = 1)]
    pub pipeline_depth: u64,
    /// Recreate the request every iteration.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub recreate_xfer: bool,
    /// Register and deregister the initiator's memory every iteration (implies recreating).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub reregister_mem: bool,
    /// Prepare descriptor lists and make requests by index instead of creating them.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub prepared_xfer: bool,
    /// Verify every byte moved (initiator buffers 0xbb, target 0xaa).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub check_consistency: bool,
    /// Upper bound of the memory used per process, in bytes.
    #[arg(long, default_value_t = 8 << 30)]
    pub total_buffer_size: u64,
    /// POSIX: directory for the target files (default: the system's temporary directory).
    #[arg(long, default_value = "")]
    pub filepath: String,
    /// POSIX: number of target files; descriptors go round-robin over them.
    #[arg(long, default_value_t = 1)]
    pub num_files: u64,
    /// POSIX: open the files with O_DIRECT (block sizes must be multiples of 4096).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub storage_enable_direct: bool,
    /// Print JSON lines (one object per row) to stdout instead of the table.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Write an SVG plot of bandwidth and latency against block size to this file.
    #[arg(long)]
    pub plot: Option<String>,
    /// Show no progress bar (it is shown only when stderr is a terminal anyway).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_progress: bool,
    /// Run only the target of a SHM/TCP run, by hand: metadata listener on ADDR:PORT, commands
    /// on ADDR:PORT+1 (start the initiator with --target_addr and the same options).
    #[arg(long)]
    pub listen: Option<String>,
    /// Run only the initiator of a SHM/TCP run against a target started with --listen.
    #[arg(long)]
    pub target_addr: Option<String>,
    /// KV-cache mode instead of the block sweep: llama3-8b, llama70b-tp8 or deepseek-mla.
    #[arg(long)]
    pub kv_preset: Option<String>,
    /// KV-cache mode: tokens per request (pages are drawn at random from a pool twice as large).
    #[arg(long, default_value_t = 1024)]
    pub kv_tokens: u64,
    /// TOML file of options (top-level keys = option names); the command line wins.
    #[arg(long)]
    pub config_file: Option<String>,
}

/// The backend, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Loopback,
    Shm,
    Tcp,
    Posix,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Loopback => "LOOPBACK",
            Backend::Shm => "SHM",
            Backend::Tcp => "TCP",
            Backend::Posix => "POSIX",
        }
    }

    /// Carries notifications (every such transfer carries "0xBEEF"), as the backend itself
    /// declares. The variants of this enum only choose how the benchmark is laid out (an
    /// in-process target, a target process, files); what a backend can do comes from its
    /// capabilities.
    pub fn notifies(self) -> bool {
        rixl::Agent::plugin_capabilities(self.name()).is_ok_and(|c| c.notif)
    }
}

/// How initiators and targets pair up (nixlbench's `--scheme`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Pairwise,
    /// `--num_initiator_dev` initiators, one target.
    ManyToOne,
    /// One initiator, `--num_target_dev` targets.
    OneToMany,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Pairwise => "pairwise",
            Scheme::ManyToOne => "manytoone",
            Scheme::OneToMany => "onetomany",
        }
    }
}

/// `--latency`: what one round trip is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Latency {
    /// A transfer carrying a notification; the target answers with a notification.
    Xfer,
    /// A standalone notification; the target answers with one.
    PingPong,
}

impl Latency {
    pub fn name(self) -> &'static str {
        match self {
            Latency::Xfer => "xfer",
            Latency::PingPong => "pingpong",
        }
    }
}

/// Everything the benchmark needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub args: Args,
    pub backend: Backend,
    pub write: bool,
    pub scheme: Scheme,
    /// Initiator-target pairs that run at once: 1 (pairwise), the initiators of manytoone or
    /// the targets of onetomany. Stream `i` uses the `i`-th group of `slots` slots of the
    /// initiator's buffer and, for manytoone, of the target's.
    pub streams: u64,
    /// `--layout scattered`: descriptors at every other block position, shuffled.
    pub scattered: bool,
    /// `--latency`: latency mode.
    pub latency: Option<Latency>,
    /// Distance between the slots of (thread, pipeline position): max block × max batch
    /// (twice that when scattered).
    pub slot_stride: u64,
    /// Slots per stream: threads × pipeline depth.
    pub slots: u64,
    /// Bytes of one stream's slots (the buffer of a pairwise run, of each target of a
    /// onetomany run).
    pub buffer_bytes: u64,
    pub block_sizes: Vec<u64>,
    pub batch_sizes: Vec<u64>,
    pub filepath: std::path::PathBuf,
    /// `--kv_preset`: the KV-cache layout.
    pub kv: Option<KvLayout>,
    /// `--listen`: this process is a target started by hand.
    pub listen: Option<std::net::SocketAddr>,
    /// `--target_addr`: the target's metadata listener (commands on the next port).
    pub target_addr: Option<std::net::SocketAddr>,
}

/// A KV cache as vLLM lays it out: per layer (and per K and V), a pool of pages of
/// `page_tokens` tokens; one request moves `blocks` pages of every layer (and of K and V).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub preset: &'static str,
    pub layers: u64,
    /// 2 for separate K and V, 1 for a joint latent (MLA).
    pub kvs: u64,
    pub page_tokens: u64,
    pub page_bytes: u64,
    /// Pages per layer (and K/V) one request moves.
    pub blocks: u64,
    /// Pages per layer (and K/V) in the pool.
    pub pool_blocks: u64,
}

impl KvLayout {
    fn new(preset: &str, tokens: u64) -> Option<KvLayout> {
        // (name, layers, K+V, tokens per page, bytes per token per layer and K/V, bf16)
        let (preset, layers, kvs, page_tokens, per_token) = match preset {
            // 32 layers, 8 KV heads x 128 dims.
            "llama3-8b" => ("llama3-8b", 32, 2, 16, 8 * 128 * 2),
            // 80 layers, 8 KV heads split over 8 ranks: 1 head x 128 dims per rank.
            "llama70b-tp8" => ("llama70b-tp8", 80, 2, 16, 128 * 2),
            // 61 layers, one latent of 512 + 64 (RoPE) dims, 64-token pages.
            "deepseek-mla" => ("deepseek-mla", 61, 1, 64, 576 * 2),
            _ => return None,
        };
        let blocks = tokens.div_ceil(page_tokens).max(1);
        Some(KvLayout {
            preset,
            layers,
            kvs,
            page_tokens,
            page_bytes: page_tokens * per_token,
            blocks,
            pool_blocks: 2 * blocks,
        })
    }

    /// Descriptors per request.
    pub fn descs(&self) -> u64 {
        self.layers * self.kvs * self.blocks
    }

    /// Bytes of the pool on each side.
    pub fn pool_bytes(&self) -> Option<u64> {
        (self.layers * self.kvs)
            .checked_mul(self.pool_blocks)?
            .checked_mul(self.page_bytes)
    }
}

/// Backend names NIXL has that this build does not.
const NIXL_ONLY: &[&str] = &[
    "UCX",
    "LIBFABRIC",
    "GDS",
    "GDS_MT",
    "GPUNETIO",
    "MOONCAKE",
    "HF3FS",
    "OBJ",
    "GUSLI",
    "UCCL",
    "AZURE_BLOB",
    "INFINIA",
];

fn doubling(start: u64, max: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut x = start;
    while x <= max {
        v.push(x);
        match x.checked_mul(2) {
            Some(n) => x = n,
            None => break,
        }
    }
    v
}

/// Parses the process arguments (plus `--config_file`). `Err(Ok(code))` means clap already
/// printed help or version; `Err(Err(bad))` is bad input.
pub fn parse(argv: Vec<String>) -> Result<Args, Result<i32, BadInput>> {
    let mut full = argv.clone();
    if let Some(path) = config_file_arg(&argv) {
        let extra = config_file_args(&path).map_err(Err)?;
        full = std::iter::once(argv[0].clone())
            .chain(extra)
            .chain(argv.into_iter().skip(1))
            .collect();
    }
    match Args::try_parse_from(full) {
        Ok(a) => Ok(a),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                let _ = e.print();
                Err(Ok(0))
            }
            _ => {
                let text = e.render().to_string();
                let line = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
                    .to_owned();
                Err(Err(BadInput(line)))
            }
        },
    }
}

fn config_file_arg(argv: &[String]) -> Option<String> {
    let mut it = argv.iter().skip(1);
    let mut found = None;
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--config_file=") {
            found = Some(v.to_owned());
        } else if a == "--config_file" {
            found = it.next().cloned();
        }
    }
    found
}

/// Top-level keys of the TOML file as `--key=value` arguments.
fn config_file_args(path: &str) -> Result<Vec<String>, BadInput> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput::new("--config_file", format!("cannot read {path}: {e}")))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let msg = e.message().to_owned();
        BadInput::new("--config_file", format!("{path} is not valid TOML: {msg}"))
    })?;
    let mut out = Vec::new();
    for (k, v) in table {
        if k == "config_file" {
            return Err(BadInput::new(
                "--config_file",
                "a configuration file cannot name another one",
            ));
        }
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                return Err(BadInput::new(
                    "--config_file",
                    format!("key {k} in {path} has an unsupported value {other}"),
                ))
            }
        };
        out.push(format!("--{k}={value}"));
    }
    Ok(out)
}

fn kv_mode(cfg: &Config, preset: &str) -> Result<KvLayout, BadInput> {
    let a = &cfg.args;
    let layout = KvLayout::new(preset, a.kv_tokens).ok_or_else(|| {
        BadInput::new(
            "--kv_preset",
            format!("unknown preset {preset:?} (use llama3-8b, llama70b-tp8 or deepseek-mla)"),
        )
    })?;
    if cfg.backend == Backend::Posix {
        return Err(BadInput::new(
            "--kv_preset",
            "needs a DRAM target (LOOPBACK, SHM or TCP), not POSIX",
        ));
    }
    if a.kv_tokens == 0 || a.kv_tokens > 1 << 24 {
        return Err(BadInput::new(
            "--kv_tokens",
            "must be between 1 and 16777216",
        ));
    }
    for (opt, on) in [
        ("--num_threads", a.num_threads > 1),
        ("--pipeline_depth", a.pipeline_depth > 1),
        ("--check_consistency", a.check_consistency),
        ("--reregister_mem", a.reregister_mem),
        ("--plot", a.plot.is_some()),
    ] {
        if on {
            return Err(BadInput::new(opt, "is not supported with --kv_preset yet"));
        }
    }
    Ok(layout)
}

fn addresses(
    args: &Args,
    backend: Backend,
) -> Result<(Option<std::net::SocketAddr>, Option<std::net::SocketAddr>), BadInput> {
    use std::net::ToSocketAddrs;
    let check = |opt: &str, v: &str| -> Result<std::net::SocketAddr, BadInput> {
        if !matches!(backend, Backend::Shm | Backend::Tcp) {
            return Err(BadInput::new(
                opt,
                format!("only SHM and TCP run two processes, not {}", backend.name()),
            ));
        }
        let a = v
            .to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| BadInput::new(opt, format!("{v:?} is not HOST:PORT")))?;
        if a.port() == 0 || a.port() == u16::MAX {
            return Err(BadInput::new(
                opt,
                format!(
                    "port {} cannot be used (PORT and PORT+1 are needed)",
                    a.port()
                ),
            ));
        }
        Ok(a)
    };
    match (&args.listen, &args.target_addr) {
        (Some(_), Some(_)) => Err(BadInput::new(
            "--listen",
            "a process is either the target (--listen) or the initiator (--target_addr)",
        )),
        (Some(l), None) => Ok((Some(check("--listen", l)?), None)),
        (None, Some(t)) => Ok((None, Some(check("--target_addr", t)?))),
        (None, None) => Ok((None, None)),
    }
}

/// The number of streams of `scheme`, checking the device counts.
fn streams(args: &Args, backend: Backend, scheme: Scheme) -> Result<u64, BadInput> {
    const MAX: u64 = 64;
    for (opt, v) in [
        ("--num_initiator_dev", args.num_initiator_dev),
        ("--num_target_dev", args.num_target_dev),
    ] {
        if v > MAX {
            return Err(BadInput::new(opt, format!("at most {MAX}")));
        }
    }
    // RIXL has no multi-GPU (MG) mode: a device count above 1 only means "several initiators"
    // or "several targets" of the scheme that has them.
    let (streams, fixed) = match scheme {
        Scheme::Pairwise => {
            for (opt, v) in [
                ("--num_initiator_dev", args.num_initiator_dev),
                ("--num_target_dev", args.num_target_dev),
            ] {
                if v > 1 {
                    return Err(BadInput::new(
                        opt,
                        "more than 1 needs --scheme manytoone (initiators) or onetomany \
                         (targets); RIXL has no multi-device MG mode",
                    ));
                }
            }
            return Ok(1);
        }
        Scheme::ManyToOne => (
            args.num_initiator_dev,
            ("--num_target_dev", args.num_target_dev),
        ),
        Scheme::OneToMany => (
            args.num_target_dev,
            ("--num_initiator_dev", args.num_initiator_dev),
        ),
    };
    if fixed.1 != 1 {
        return Err(BadInput::new(
            fixed.0,
            format!("--scheme {} has exactly 1", scheme.name()),
        ));
    }
    if !matches!(backend, Backend::Shm | Backend::Tcp) {
        return Err(BadInput::new(
            "--scheme",
            format!(
                "{} needs a two-process backend (SHM or TCP), not {}",
                scheme.name(),
                backend.name()
            ),
        ));
    }
    for (opt, on) in [
        ("--kv_preset", args.kv_preset.is_some()),
        ("--latency", args.latency.is_some()),
    ] {
        if on {
            return Err(BadInput::new(
                opt,
                format!("only with --scheme pairwise, not {}", scheme.name()),
            ));
        }
    }
    Ok(streams)
}

/// Checks the options of latency mode: one request, one descriptor, one thread.
fn latency_mode(
    args: &Args,
    backend: Backend,
    scheme: Scheme,
    scattered: bool,
    l: Latency,
) -> Result<(), BadInput> {
    if !backend.notifies() {
        return Err(BadInput::new(
            "--latency",
            format!(
                "{} has no notifications (use LOOPBACK, SHM or TCP)",
                backend.name()
            ),
        ));
    }
    if scheme != Scheme::Pairwise {
        return Err(BadInput::new(
            "--latency",
            format!("only with --scheme pairwise, not {}", scheme.name()),
        ));
    }
    if args.kv_preset.is_some() {
        return Err(BadInput::new(
            "--latency",
            "choose either --latency or --kv_preset",
        ));
    }
    for (opt, on) in [
        ("--num_threads", args.num_threads > 1),
        ("--pipeline_depth", args.pipeline_depth > 1),
        ("--start_batch_size", args.start_batch_size > 1),
        ("--max_batch_size", args.max_batch_size > 1),
        ("--recreate_xfer", args.recreate_xfer),
        ("--reregister_mem", args.reregister_mem),
        ("--plot", args.plot.is_some()),
        ("--layout", scattered),
    ] {
        if on {
            return Err(BadInput::new(
                opt,
                "is not supported with --latency (one request of one descriptor in flight)",
            ));
        }
    }
    if l == Latency::PingPong && args.check_consistency {
        return Err(BadInput::new(
            "--check_consistency",
            "--latency pingpong moves no data to check",
        ));
    }
    Ok(())
}

impl Config {
    /// Checks the options; every error names the option at fault.
    pub fn validate(args: Args) -> Result<Config, BadInput> {
        let backend = match args.backend.to_ascii_uppercase().as_str() {
            "LOOPBACK" => Backend::Loopback,
            "SHM" => Backend::Shm,
            "TCP" => Backend::Tcp,
            "POSIX" => Backend::Posix,
            other if NIXL_ONLY.contains(&other) => {
                return Err(BadInput::new(
                    "--backend",
                    format!(
                        "{} is a NIXL backend that RIXL does not have (use LOOPBACK, SHM, TCP or POSIX)",
                        args.backend
                    ),
                ))
            }
            _ => {
                return Err(BadInput::new(
                    "--backend",
                    format!(
                        "unknown backend {:?} (use LOOPBACK, SHM, TCP or POSIX)",
                        args.backend
                    ),
                ))
            }
        };
        if !rixl::Agent::available_backends().contains(&backend.name()) {
            return Err(BadInput::new(
                "--backend",
                format!(
                    "backend {} is not available in this build (available: {})",
                    backend.name(),
                    rixl::Agent::available_backends().join(", ")
                ),
            ));
        }
        let write = match args.op_type.to_ascii_uppercase().as_str() {
            "WRITE" => true,
            "READ" => false,
            _ => {
                return Err(BadInput::new(
                    "--op_type",
                    format!("unknown operation {:?} (use READ or WRITE)", args.op_type),
                ))
            }
        };
        // Every backend of this build reads and writes; a backend that cannot READ would be
        // refused here.
        for (opt, v) in [
            ("--initiator_seg_type", &args.initiator_seg_type),
            ("--target_seg_type", &args.target_seg_type),
        ] {
            match v.to_ascii_uppercase().as_str() {
                "DRAM" => {}
                "VRAM" => return Err(BadInput::new(opt, "VRAM needs a GPU; none is available")),
                _ => {
                    return Err(BadInput::new(
                        opt,
                        format!("unknown segment type {v:?} (use DRAM or VRAM)"),
                    ))
                }
            }
        }
        let scheme =
            match args.scheme.to_ascii_lowercase().as_str() {
                "pairwise" => Scheme::Pairwise,
                "manytoone" => Scheme::ManyToOne,
                "onetomany" => Scheme::OneToMany,
                "tp" => return Err(BadInput::new(
                    "--scheme",
                    "tp (tensor-parallel) is not supported (use pairwise, manytoone or onetomany)",
                )),
                _ => {
                    return Err(BadInput::new(
                        "--scheme",
                        format!(
                            "unknown scheme {:?} (use pairwise, manytoone or onetomany)",
                            args.scheme
                        ),
                    ))
                }
            };
        let scattered = match args.layout.to_ascii_lowercase().as_str() {
            "contiguous" => false,
            "scattered" => true,
            _ => {
                return Err(BadInput::new(
                    "--layout",
                    format!(
                        "unknown layout {:?} (use contiguous or scattered)",
                        args.layout
                    ),
                ))
            }
        };
        let latency = match args.latency.as_deref().map(str::to_ascii_lowercase) {
            None => None,
            Some(l) if l == "xfer" => Some(Latency::Xfer),
            Some(l) if l == "pingpong" => Some(Latency::PingPong),
            Some(l) => {
                return Err(BadInput::new(
                    "--latency",
                    format!("unknown latency test {l:?} (use xfer or pingpong)"),
                ))
            }
        };
        let positive = [
            ("--start_block_size", args.start_block_size),
            ("--max_block_size", args.max_block_size),
            ("--start_batch_size", args.start_batch_size),
            ("--max_batch_size", args.max_batch_size),
            ("--num_iter", args.num_iter),
            ("--large_blk_iter_ftr", args.large_blk_iter_ftr),
            ("--num_threads", args.num_threads),
            ("--pipeline_depth", args.pipeline_depth),
            ("--num_files", args.num_files),
            ("--total_buffer_size", args.total_buffer_size),
            ("--num_initiator_dev", args.num_initiator_dev),
            ("--num_target_dev", args.num_target_dev),
            ("--latency_size", args.latency_size),
        ];
        for (opt, v) in positive {
            if v == 0 {
                return Err(BadInput::new(opt, "must be at least 1"));
            }
        }
        let streams = streams(&args, backend, scheme)?;
        if let Some(l) = latency {
            latency_mode(&args, backend, scheme, scattered, l)?;
        }
        if scattered && args.kv_preset.is_some() {
            return Err(BadInput::new(
                "--layout",
                "the KV-cache mode (--kv_preset) already places its pages at random",
            ));
        }
        if args.start_block_size > args.max_block_size {
            return Err(BadInput::new(
                "--start_block_size",
                format!(
                    "{} is larger than --max_block_size {}",
                    args.start_block_size, args.max_block_size
                ),
            ));
        }
        if args.start_batch_size > args.max_batch_size {
            return Err(BadInput::new(
                "--start_batch_size",
                format!(
                    "{} is larger than --max_batch_size {}",
                    args.start_batch_size, args.max_batch_size
                ),
            ));
        }
        if !args.num_iter.is_multiple_of(args.num_threads) {
            return Err(BadInput::new(
                "--num_threads",
                format!(
                    "--num_iter {} does not divide evenly over {} threads",
                    args.num_iter, args.num_threads
                ),
            ));
        }
        if args.num_threads > 1024 {
            return Err(BadInput::new("--num_threads", "at most 1024 threads"));
        }
        if args.pipeline_depth > 4096 {
            return Err(BadInput::new("--pipeline_depth", "at most 4096"));
        }
        let (block_sizes, batch_sizes) = if latency.is_some() {
            // One descriptor of --latency_size bytes; the sweep options do not apply.
            (vec![args.latency_size], vec![1])
        } else {
            (
                doubling(args.start_block_size, args.max_block_size),
                doubling(args.start_batch_size, args.max_batch_size),
            )
        };
        let max_block = *block_sizes.last().unwrap_or(&args.start_block_size);
        let max_batch = *batch_sizes.last().unwrap_or(&args.start_batch_size);
        let slots = args.num_threads * args.pipeline_depth;
        let too_big = || {
            let mut what = format!(
                "batch {max_batch} x block {max_block} x {} threads x pipeline depth {}",
                args.num_threads, args.pipeline_depth
            );
            if scattered {
                what.push_str(" x 2 (--layout scattered)");
            }
            if streams > 1 {
                what.push_str(&format!(" x {streams} ({})", scheme.name()));
            }
            BadInput::new(
                "--total_buffer_size",
                format!("{} bytes cannot hold {what}", args.total_buffer_size),
            )
        };
        let slot_stride = max_block
            .checked_mul(max_batch)
            .and_then(|b| b.checked_mul(if scattered { 2 } else { 1 }))
            .ok_or_else(too_big)?;
        let buffer_bytes = slot_stride.checked_mul(slots).ok_or_else(too_big)?;
        // The largest buffer of any process: every stream's slots on the initiator (and on
        // the target of manytoone).
        let per_process = buffer_bytes.checked_mul(streams).ok_or_else(too_big)?;
        // (The KV-cache mode sizes its pool instead; checked below.)
        if args.kv_preset.is_none()
            && (per_process > args.total_buffer_size || per_process > isize::MAX as u64 / 2)
        {
            return Err(too_big());
        }
        let mut filepath = std::path::PathBuf::new();
        if backend == Backend::Posix {
            filepath = if args.filepath.is_empty() {
                std::env::temp_dir()
            } else {
                std::path::PathBuf::from(&args.filepath)
            };
            if !filepath.is_dir() {
                return Err(BadInput::new(
                    "--filepath",
                    format!("{} is not a directory", filepath.display()),
                ));
            }
            if args.storage_enable_direct {
                if let Some(b) = block_sizes.iter().find(|b| !b.is_multiple_of(4096)) {
                    return Err(BadInput::new(
                        "--storage_enable_direct",
                        format!("O_DIRECT needs block sizes that are multiples of 4096, not {b}"),
                    ));
                }
            }
        } else if args.storage_enable_direct {
            return Err(BadInput::new(
                "--storage_enable_direct",
                format!("only applies to POSIX, not {}", backend.name()),
            ));
        }
        let (listen, target_addr) = addresses(&args, backend)?;
        if scheme == Scheme::OneToMany && (listen.is_some() || target_addr.is_some()) {
            let opt = if listen.is_some() {
                "--listen"
            } else {
                "--target_addr"
            };
            return Err(BadInput::new(
                opt,
                "--scheme onetomany starts its own targets (one address cannot name several)",
            ));
        }
        let mut cfg = Config {
            listen,
            target_addr,
            args,
            backend,
            write,
            scheme,
            streams,
            scattered,
            latency,
            slot_stride,
            slots,
            buffer_bytes,
            block_sizes,
            batch_sizes,
            filepath,
            kv: None,
        };
        if let Some(p) = &cfg.args.kv_preset {
            cfg.kv = Some(kv_mode(&cfg, p)?);
            let pool = cfg.kv.as_ref().and_then(KvLayout::pool_bytes);
            match pool {
                Some(b) if b <= cfg.args.total_buffer_size && b <= isize::MAX as u64 / 2 => {
                    cfg.slots = 1;
                    cfg.slot_stride = b;
                    cfg.buffer_bytes = b;
                }
                _ => {
                    return Err(BadInput::new(
                        "--total_buffer_size",
                        format!(
                        "{} bytes cannot hold the KV pool of --kv_preset {p} with --kv_tokens {}",
                        cfg.args.total_buffer_size, cfg.args.kv_tokens
                    ),
                    ))
                }
            }
        }
        Ok(cfg)
    }

    /// Timed and warm-up iterations for `block` (nixlbench's large-block factor).
    pub fn iterations(&self, block: u64) -> (u64, u64) {
        let a = &self.args;
        if block > 1 << 20 {
            (
                (a.num_iter / a.large_blk_iter_ftr).max(a.num_threads),
                a.warmup_iter / a.large_blk_iter_ftr,
            )
        } else {
            (a.num_iter, a.warmup_iter)
        }
    }

    /// Slots of the initiator's buffer: every stream's.
    pub fn initiator_slots(&self) -> u64 {
        self.streams * self.slots
    }

    /// Slots of each target's buffer: every initiator's for manytoone.
    pub fn target_slots(&self) -> u64 {
        if self.scheme == Scheme::ManyToOne {
            self.streams * self.slots
        } else {
            self.slots
        }
    }

    pub fn initiator_bytes(&self) -> u64 {
        self.initiator_slots() * self.slot_stride
    }

    pub fn target_bytes(&self) -> u64 {
        self.target_slots() * self.slot_stride
    }

    /// Bytes from a slot's start to the end of its last descriptor, holes included.
    pub fn span(&self, block: u64, batch: u64) -> u64 {
        block * batch * if self.scattered { 2 } else { 1 }
    }

    /// The configuration dump printed before the results.
    pub fn dump(&self) -> String {
        let a = &self.args;
        let mut s = String::new();
        let mut kv = |k: &str, v: String| s.push_str(&format!("{k:<24}: {v}\n"));
        kv("Backend", self.backend.name().to_owned());
        kv(
            "Op type",
            if self.write { "WRITE" } else { "READ" }.to_owned(),
        );
        kv(
            "Scheme",
            match self.scheme {
                Scheme::Pairwise => "pairwise".to_owned(),
                Scheme::ManyToOne => {
                    format!("manytoone ({} initiators -> 1 target)", self.streams)
                }
                Scheme::OneToMany => {
                    format!("onetomany (1 initiator -> {} targets)", self.streams)
                }
            },
        );
        kv("Num initiator dev", a.num_initiator_dev.to_string());
        kv("Num target dev", a.num_target_dev.to_string());
        kv("Initiator seg type", "DRAM".to_owned());
        kv(
            "Target seg type",
            if self.backend == Backend::Posix {
                "FILE"
            } else {
                "DRAM"
            }
            .to_owned(),
        );
        kv(
            "Process model",
            match self.backend {
                Backend::Loopback => "one process, two agents".to_owned(),
                Backend::Shm | Backend::Tcp => match (self.scheme, self.target_addr) {
                    (Scheme::Pairwise, None) => {
                        "two processes (target re-executed), 127.0.0.1".to_owned()
                    }
                    (Scheme::Pairwise, Some(_)) => {
                        "two processes (target started by hand)".to_owned()
                    }
                    (Scheme::ManyToOne, t) => format!(
                        "{} initiator agents in this process, one target process ({})",
                        self.streams,
                        if t.is_some() {
                            "started by hand"
                        } else {
                            "re-executed, 127.0.0.1"
                        }
                    ),
                    (Scheme::OneToMany, _) => format!(
                        "one initiator agent, {} target processes (re-executed), 127.0.0.1",
                        self.streams
                    ),
                },
                Backend::Posix => "one process, files".to_owned(),
            },
        );
        if let Some(l) = self.latency {
            kv(
                "Latency test",
                match l {
                    Latency::Xfer => format!(
                        "xfer: {} of {} B carrying a notification, answered by a notification",
                        if self.write { "WRITE" } else { "READ" },
                        a.latency_size
                    ),
                    Latency::PingPong => format!(
                        "pingpong: notification of {} B, answered by one as large",
                        a.latency_size
                    ),
                },
            );
        } else if self.kv.is_none() {
            kv(
                "Layout",
                if self.scattered {
                    "scattered (every other block position, shuffled)"
                } else {
                    "contiguous"
                }
                .to_owned(),
            );
            kv("Start block size", a.start_block_size.to_string());
            kv("Max block size", a.max_block_size.to_string());
            kv("Start batch size", a.start_batch_size.to_string());
            kv("Max batch size", a.max_batch_size.to_string());
        }
        kv("Num iter", a.num_iter.to_string());
        kv("Warmup iter", a.warmup_iter.to_string());
        kv("Large block iter factor", a.large_blk_iter_ftr.to_string());
        kv("Num threads", a.num_threads.to_string());
        kv("Pipeline depth", a.pipeline_depth.to_string());
        kv("Recreate xfer", a.recreate_xfer.to_string());
        kv("Reregister mem", a.reregister_mem.to_string());
        kv("Prepared xfer", a.prepared_xfer.to_string());
        kv("Check consistency", a.check_consistency.to_string());
        kv("Total buffer size", a.total_buffer_size.to_string());
        kv("Buffer allocated", self.initiator_bytes().to_string());
        if self.streams > 1 {
            kv("Target buffer", self.target_bytes().to_string());
        }
        kv(
            "Notification",
            if self.backend.notifies() {
                "\"0xBEEF\" on every transfer"
            } else {
                "none (backend has no notifications)"
            }
            .to_owned(),
        );
        if let Some(l) = &self.kv {
            kv("KV preset", l.preset.to_owned());
            kv(
                "KV layout",
                format!(
                    "{} layers x {} x {} pages of {} tokens, {} bytes per page",
                    l.layers,
                    if l.kvs == 2 { "K,V" } else { "latent" },
                    l.pool_blocks,
                    l.page_tokens,
                    l.page_bytes
                ),
            );
            kv(
                "KV request",
                format!(
                    "{} tokens = {} pages per layer, {} descriptors, {} bytes",
                    self.args.kv_tokens,
                    l.blocks,
                    l.descs(),
                    l.descs() * l.page_bytes
                ),
            );
        }
        if let Some(t) = self.target_addr {
            kv("Target address", t.to_string());
        }
        if self.backend == Backend::Posix {
            kv("File path", self.filepath.display().to_string());
            kv("Num files", a.num_files.to_string());
            kv("Storage enable direct", a.storage_enable_direct.to_string());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_double() {
        assert_eq!(doubling(4096, 65536), [4096, 8192, 16384, 32768, 65536]);
        assert_eq!(doubling(3, 20), [3, 6, 12]);
        assert_eq!(doubling(1, 1), [1]);
        assert_eq!(doubling(1 << 63, u64::MAX), [1 << 63]);
    }

    #[test]
    fn kv_presets() {
        let l = KvLayout::new("llama3-8b", 1000).unwrap();
        assert_eq!((l.blocks, l.pool_blocks, l.page_bytes), (63, 126, 32768));
        assert_eq!(l.descs(), 32 * 2 * 63);
        assert!(KvLayout::new("nope", 1).is_none());
    }
}
