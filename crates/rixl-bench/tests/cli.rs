//! Runs the built `rixl-bench` binary with tiny sizes: table and JSON output, consistency
//! checks on every backend of this build, the two-process runs, POSIX files, the plot, the
//! configuration file, and the one-line exit-2 errors for impossible options. No timing is
//! asserted: only that the numbers are there, well formed and positive.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_rixl-bench");

const HEADERS: [&str; 10] = [
    "Block Size (B)",
    "Batch Size",
    "B/W (GB/Sec)",
    "Avg Lat. (us)",
    "Avg Prep (us)",
    "P99 Prep (us)",
    "Avg Post (us)",
    "P99 Post (us)",
    "Avg Tx (us)",
    "P99 Tx (us)",
];

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--no_progress")
        .output()
        .expect("run rixl-bench")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "rixl-bench {args:?} failed ({:?}):\n{}\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "rixl-bench-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One parsed table row: the ten columns as text.
fn table_rows(stdout: &str) -> Vec<Vec<String>> {
    let mut lines = stdout.lines();
    let header = lines
        .by_ref()
        .find(|l| l.starts_with("Block Size (B)"))
        .unwrap_or_else(|| panic!("no table header in:\n{stdout}"));
    let mut pos = 0;
    for h in HEADERS {
        let at = header[pos..]
            .find(h)
            .unwrap_or_else(|| panic!("header {h:?} missing or out of order in {header:?}"));
        pos += at + h.len();
    }
    let dashes = lines.next().expect("line under the header");
    assert!(dashes.chars().all(|c| c == '-'), "{dashes:?}");
    lines
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Checks a row's formats (integers, 6 decimals for B/W, 1 for the rest) and positivity.
#[track_caller]
fn check_row(row: &[String], block: u64, batch: u64) {
    assert_eq!(row.len(), 10, "{row:?}");
    assert_eq!(row[0].parse::<u64>().unwrap(), block, "{row:?}");
    assert_eq!(row[1].parse::<u64>().unwrap(), batch, "{row:?}");
    for (i, cell) in row.iter().enumerate().skip(2) {
        let decimals = cell.split_once('.').map(|(_, d)| d.len());
        assert_eq!(
            decimals,
            Some(if i == 2 { 6 } else { 1 }),
            "column {} of {row:?}",
            HEADERS[i]
        );
        let v: f64 = cell.parse().unwrap();
        assert!(v.is_finite() && v >= 0.0, "{row:?}");
    }
    let bw: f64 = row[2].parse().unwrap();
    let lat: f64 = row[3].parse().unwrap();
    assert!(
        bw > 0.0 && lat > 0.0,
        "bandwidth and latency must be positive: {row:?}"
    );
}

const TINY: [&str; 8] = [
    "--start_block_size",
    "1024",
    "--max_block_size",
    "4096",
    "--num_iter",
    "20",
    "--warmup_iter",
    "2",
];

fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TINY.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn loopback_table_has_a_row_per_block_and_batch() {
    let out = ok(&with(&["--backend", "LOOPBACK", "--max_batch_size", "2"]));
    assert!(out.contains("Backend                 : LOOPBACK"), "{out}");
    assert!(out.contains("Num iter                : 20"), "{out}");
    let rows = table_rows(&out);
    let expect = [
        (1024, 1),
        (1024, 2),
        (2048, 1),
        (2048, 2),
        (4096, 1),
        (4096, 2),
    ];
    assert_eq!(rows.len(), expect.len(), "{out}");
    for (row, (block, batch)) in rows.iter().zip(expect) {
        check_row(row, block, batch);
    }
}

#[test]
fn json_lines_parse() {
    let o = run(&with(&[
        "--backend",
        "LOOPBACK",
        "--max_batch_size",
        "2",
        "--json",
    ]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    // The configuration goes to stderr so that stdout is JSON only.
    assert!(text(&o.stderr).contains("Backend"), "{}", text(&o.stderr));
    let mut seen = Vec::new();
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["backend"], "LOOPBACK");
        assert_eq!(v["op_type"], "WRITE");
        assert_eq!(v["iterations"], 20);
        assert!(v["bw_gbps"].as_f64().unwrap() > 0.0, "{l}");
        for k in [
            "avg_lat_us",
            "avg_prep_us",
            "p99_prep_us",
            "avg_post_us",
            "p99_post_us",
            "avg_tx_us",
            "p99_tx_us",
            "seconds",
        ] {
            assert!(v[k].as_f64().unwrap() >= 0.0, "{k} in {l}");
        }
        seen.push((
            v["block_size"].as_u64().unwrap(),
            v["batch_size"].as_u64().unwrap(),
        ));
    }
    assert_eq!(
        seen,
        [
            (1024, 1),
            (1024, 2),
            (2048, 1),
            (2048, 2),
            (4096, 1),
            (4096, 2)
        ]
    );
}

#[test]
fn loopback_consistency_in_every_mode() {
    let modes: [&[&str]; 5] = [
        &[],
        &["--num_threads", "2", "--pipeline_depth", "2"],
        &["--recreate_xfer"],
        &["--prepared_xfer", "--pipeline_depth", "3"],
        &[
            "--reregister_mem",
            "--prepared_xfer=true",
            "--num_threads",
            "2",
        ],
    ];
    for op in ["WRITE", "READ"] {
        for m in modes {
            let mut args = with(&[
                "--backend",
                "LOOPBACK",
                "--op_type",
                op,
                "--max_batch_size",
                "4",
                "--check_consistency",
            ]);
            args.extend_from_slice(m);
            let out = ok(&args);
            assert!(out.contains("Check consistency       : true"), "{out}");
            assert_eq!(table_rows(&out).len(), 9, "{args:?}\n{out}");
        }
    }
}

/// Two-process runs (the target re-executes this binary) for a backend; READ and WRITE with the
/// consistency check, which the target verifies on its side for WRITE, and the notification
/// count, which the target reports at the end.
fn two_process(backend: &str) {
    for op in ["WRITE", "READ"] {
        let out = ok(&with(&[
            "--backend",
            backend,
            "--op_type",
            op,
            "--max_batch_size",
            "2",
            "--num_threads",
            "2",
            "--pipeline_depth",
            "2",
            "--check_consistency",
        ]));
        assert!(out.contains("two processes"), "{out}");
        let rows = table_rows(&out);
        assert_eq!(rows.len(), 6, "{out}");
        check_row(&rows[5], 4096, 2);
    }
}

#[test]
fn shm_two_processes() {
    two_process("SHM");
}

#[test]
fn tcp_two_processes_when_built_in() {
    let o = run(&with(&["--backend", "TCP"]));
    if o.status.code() == Some(2) && text(&o.stderr).contains("not available in this build") {
        eprintln!("skipped: TCP is not in this build");
        return;
    }
    two_process("TCP");
}

#[test]
fn posix_files_in_a_temp_dir() {
    let dir = Scratch::new("posix");
    for op in ["WRITE", "READ"] {
        let out = ok(&with(&[
            "--backend",
            "POSIX",
            "--op_type",
            op,
            "--filepath",
            dir.path(),
            "--num_files",
            "3",
            "--max_batch_size",
            "4",
            "--pipeline_depth",
            "2",
            "--check_consistency",
        ]));
        assert!(out.contains("Target seg type         : FILE"), "{out}");
        assert_eq!(table_rows(&out).len(), 9, "{out}");
    }
    // O_DIRECT needs 4 KiB multiples.
    let out = ok(&[
        "--backend",
        "POSIX",
        "--filepath",
        dir.path(),
        "--start_block_size",
        "4096",
        "--max_block_size",
        "8192",
        "--num_iter",
        "10",
        "--warmup_iter",
        "1",
        "--storage_enable_direct",
        "--check_consistency",
    ]);
    assert_eq!(table_rows(&out).len(), 2, "{out}");
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(left.is_empty(), "benchmark files left behind: {left:?}");
}

#[test]
fn plot_writes_an_svg() {
    let dir = Scratch::new("plot");
    let svg = dir.0.join("bw.svg");
    ok(&with(&[
        "--backend",
        "LOOPBACK",
        "--max_batch_size",
        "2",
        "--plot",
        svg.to_str().unwrap(),
    ]));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("<svg"), "{s}");
    assert!(s.trim_end().ends_with("</svg>"));
    assert_eq!(
        s.matches("<polyline").count(),
        4,
        "two batch sizes x two panels"
    );
    assert!(s.contains("B/W (GB/Sec)") && s.contains("Avg Lat. (us)"));
}

#[test]
fn config_file_sets_options_and_the_command_line_wins() {
    let dir = Scratch::new("cfg");
    let f = dir.0.join("bench.toml");
    std::fs::write(
        &f,
        "# rixl-bench options\nbackend = \"LOOPBACK\"\nstart_block_size = 2048\n\
         max_block_size = 4096\nnum_iter = 30\nwarmup_iter = 1\ncheck_consistency = true\n",
    )
    .unwrap();
    let out = ok(&["--config_file", f.to_str().unwrap(), "--num_iter", "10"]);
    assert!(out.contains("Backend                 : LOOPBACK"), "{out}");
    assert!(out.contains("Num iter                : 10"), "{out}");
    assert!(out.contains("Check consistency       : true"), "{out}");
    let rows = table_rows(&out);
    assert_eq!(rows.len(), 2, "{out}");
    check_row(&rows[0], 2048, 1);

    std::fs::write(&f, "backend = [1, 2]\n").unwrap();
    let o = run(&["--config_file", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("--config_file"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn bad_input_exits_2_with_one_line_naming_the_option() {
    let cases: &[(&[&str], &str)] = &[
        (&["--backend", "NOPE"], "--backend"),
        (&["--backend", "UCX"], "--backend"),
        (&["--op_type", "COPY"], "--op_type"),
        (&["--initiator_seg_type", "VRAM"], "--initiator_seg_type"),
        (&["--target_seg_type", "VRAM"], "--target_seg_type"),
        (&["--initiator_seg_type", "HBM"], "--initiator_seg_type"),
        (&["--scheme", "tp"], "--scheme"),
        (&["--scheme", "ring"], "--scheme"),
        (
            &["--scheme", "manytoone", "--backend", "LOOPBACK"],
            "--scheme",
        ),
        (&["--scheme", "onetomany", "--backend", "POSIX"], "--scheme"),
        (&["--num_initiator_dev", "2"], "--num_initiator_dev"),
        (&["--num_target_dev", "2"], "--num_target_dev"),
        (
            &["--scheme", "manytoone", "--num_target_dev", "2"],
            "--num_target_dev",
        ),
        (
            &["--scheme", "onetomany", "--num_initiator_dev", "2"],
            "--num_initiator_dev",
        ),
        (
            &["--scheme", "manytoone", "--num_initiator_dev", "0"],
            "--num_initiator_dev",
        ),
        (
            &["--scheme", "manytoone", "--num_initiator_dev", "65"],
            "--num_initiator_dev",
        ),
        (
            &[
                "--scheme",
                "onetomany",
                "--num_target_dev",
                "2",
                "--target_addr",
                "127.0.0.1:5000",
            ],
            "--target_addr",
        ),
        (
            &[
                "--scheme",
                "manytoone",
                "--num_initiator_dev",
                "4",
                "--max_block_size",
                "1048576",
                "--total_buffer_size",
                "2097152",
            ],
            "--total_buffer_size",
        ),
        (
            &["--scheme", "manytoone", "--kv_preset", "llama3-8b"],
            "--kv_preset",
        ),
        (&["--layout", "zigzag"], "--layout"),
        (
            &["--layout", "scattered", "--kv_preset", "llama3-8b"],
            "--layout",
        ),
        (
            &[
                "--layout",
                "scattered",
                "--max_block_size",
                "1048576",
                "--total_buffer_size",
                "1048576",
            ],
            "--total_buffer_size",
        ),
        (&["--latency", "bounce"], "--latency"),
        (&["--latency", "xfer", "--backend", "POSIX"], "--latency"),
        (
            &["--latency", "xfer", "--num_threads", "2"],
            "--num_threads",
        ),
        (
            &["--latency", "xfer", "--pipeline_depth", "2"],
            "--pipeline_depth",
        ),
        (
            &["--latency", "xfer", "--max_batch_size", "2"],
            "--max_batch_size",
        ),
        (&["--latency", "xfer", "--layout", "scattered"], "--layout"),
        (
            &["--latency", "xfer", "--kv_preset", "llama3-8b"],
            "--latency",
        ),
        (
            &["--latency", "pingpong", "--scheme", "manytoone"],
            "--latency",
        ),
        (
            &["--latency", "pingpong", "--check_consistency"],
            "--check_consistency",
        ),
        (
            &["--latency", "xfer", "--latency_size", "0"],
            "--latency_size",
        ),
        (
            &[
                "--max_block_size",
                "1048576",
                "--max_batch_size",
                "8",
                "--total_buffer_size",
                "1048576",
            ],
            "--total_buffer_size",
        ),
        (
            &["--start_block_size", "8192", "--max_block_size", "4096"],
            "--start_block_size",
        ),
        (
            &["--start_batch_size", "4", "--max_batch_size", "2"],
            "--start_batch_size",
        ),
        (&["--num_iter", "10", "--num_threads", "3"], "--num_threads"),
        (&["--num_iter", "ten"], "--num_iter"),
        (&["--pipeline_depth", "0"], "--pipeline_depth"),
        (
            &["--backend", "POSIX", "--filepath", "/nonexistent/rixl"],
            "--filepath",
        ),
        (
            &[
                "--backend",
                "POSIX",
                "--storage_enable_direct",
                "--start_block_size",
                "512",
            ],
            "--storage_enable_direct",
        ),
        (&["--no_such_option"], "--no_such_option"),
        (
            &["--config_file", "/nonexistent/rixl.toml"],
            "--config_file",
        ),
    ];
    for (args, option) in cases {
        let o = run(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(option), "{args:?} should name {option}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(text(&o.stdout).is_empty(), "{args:?} printed results");
    }
    let o = run(&["--initiator_seg_type", "VRAM"]);
    assert!(text(&o.stderr).contains("VRAM needs a GPU; none is available"));
    let o = run(&["--scheme", "tp"]);
    assert!(text(&o.stderr).contains("not supported"));
}

/// A port `p` such that `p` and `p + 1` were both free a moment ago.
fn two_free_ports() -> u16 {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX - 1 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}

#[test]
fn roles_started_by_hand_with_listen_and_target_addr() {
    let port = two_free_ports();
    let addr = format!("127.0.0.1:{port}");
    let opts = with(&[
        "--backend",
        "SHM",
        "--max_batch_size",
        "2",
        "--check_consistency",
    ]);
    let target = Command::new(BIN)
        .args(&opts)
        .args(["--listen", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut args = opts.clone();
    args.extend_from_slice(&["--target_addr", &addr]);
    let o = run(&args);
    let t = target.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "initiator: {}\ntarget: {}",
        text(&o.stderr),
        text(&t.stderr)
    );
    assert!(t.status.success(), "target: {}", text(&t.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains(&format!("Target address          : {addr}")),
        "{out}"
    );
    assert_eq!(table_rows(&out).len(), 6, "{out}");

    // Different options on the two sides are refused by the handshake.
    let port = two_free_ports();
    let addr = format!("127.0.0.1:{port}");
    let mut target = Command::new(BIN)
        .args([
            "--backend",
            "SHM",
            "--max_block_size",
            "8192",
            "--listen",
            &addr,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let o = run(&[
        "--backend",
        "SHM",
        "--max_block_size",
        "16384",
        "--target_addr",
        &addr,
    ]);
    let _ = target.wait();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("different options"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn kv_cache_presets() {
    // (preset, descriptors for 64 tokens, bytes per page)
    let presets = [
        ("llama3-8b", 32 * 2 * 4, 16 * 8 * 128 * 2),
        ("llama70b-tp8", 80 * 2 * 4, 16 * 128 * 2),
        ("deepseek-mla", 61, 64 * 576 * 2),
    ];
    for (preset, descs, page) in presets {
        let out = ok(&[
            "--backend",
            "LOOPBACK",
            "--kv_preset",
            preset,
            "--kv_tokens",
            "64",
            "--num_iter",
            "16",
            "--warmup_iter",
            "0",
        ]);
        assert!(
            out.contains(&format!("KV preset               : {preset}")),
            "{out}"
        );
        let mut lines = out.lines().skip_while(|l| !l.starts_with("Preset"));
        let header = lines
            .next()
            .unwrap_or_else(|| panic!("no KV table:\n{out}"));
        for h in [
            "Prepare (us)",
            "Avg Make (us)",
            "Avg Post (us)",
            "B/W (GB/Sec)",
        ] {
            assert!(header.contains(h), "{header}");
        }
        let row: Vec<&str> = lines.nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row.len(), 12, "{row:?}");
        assert_eq!(row[0], preset);
        assert_eq!(row[1], "64");
        assert_eq!(row[2].parse::<u64>().unwrap(), descs, "{row:?}");
        assert_eq!(row[3].parse::<u64>().unwrap(), descs * page, "{row:?}");
        assert!(row[11].parse::<f64>().unwrap() > 0.0, "{row:?}");
    }
    // Two processes, JSON, READ.
    let o = run(&[
        "--backend",
        "SHM",
        "--op_type",
        "READ",
        "--kv_preset",
        "llama70b-tp8",
        "--kv_tokens",
        "32",
        "--num_iter",
        "32",
        "--warmup_iter",
        "16",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(v["kv_preset"], "llama70b-tp8");
    assert_eq!(v["op_type"], "READ");
    assert_eq!(v["descriptors"], 80 * 2 * 2);
    assert_eq!(v["iterations"], 2, "large requests: 32 / 16 iterations");
    assert!(v["bw_gbps"].as_f64().unwrap() > 0.0);
    assert!(v["prepare_us"].as_f64().unwrap() > 0.0);

    let bad: &[(&[&str], &str)] = &[
        (&["--kv_preset", "gpt-5"], "--kv_preset"),
        (
            &["--backend", "POSIX", "--kv_preset", "llama3-8b"],
            "--kv_preset",
        ),
        (
            &["--kv_preset", "llama3-8b", "--kv_tokens", "0"],
            "--kv_tokens",
        ),
        (
            &["--kv_preset", "llama3-8b", "--total_buffer_size", "4096"],
            "--total_buffer_size",
        ),
        (
            &["--kv_preset", "llama3-8b", "--check_consistency"],
            "--check_consistency",
        ),
    ];
    for (args, option) in bad {
        let o = run(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(option), "{args:?} should name {option}: {err}");
    }
}

#[test]
fn consistency_check_catches_a_wrong_byte() {
    for op in ["WRITE", "READ"] {
        let o = Command::new(BIN)
            .args(with(&[
                "--backend",
                "LOOPBACK",
                "--op_type",
                op,
                "--num_threads",
                "2",
                "--check_consistency",
            ]))
            .env("RIXL_BENCH_CORRUPT_FOR_TESTS", "1")
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{op}: {err}");
        assert!(err.contains("consistency check failed"), "{op}: {err}");
        // The flipped byte is the last one the second thread moved in the first row.
        let side = if op == "WRITE" { "target" } else { "initiator" };
        assert!(
            err.contains(&format!("{side} byte at offset {}", 4096 + 1023)),
            "{op}: {err}"
        );
    }
}

/// Whether this build has the TCP backend (it is a cargo feature of `rixl`).
fn tcp_built_in() -> bool {
    let o = run(&[
        "--backend",
        "TCP",
        "--latency",
        "pingpong",
        "--num_iter",
        "1",
    ]);
    !(o.status.code() == Some(2) && text(&o.stderr).contains("not available in this build"))
}

/// The rows of the latency table: the ten columns as text.
fn latency_rows(stdout: &str) -> Vec<Vec<String>> {
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("Test"));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no latency table in:\n{stdout}"));
    for h in [
        "Op",
        "Size (B)",
        "Measure",
        "Iterations",
        "Min (us)",
        "P50 (us)",
        "Avg (us)",
        "P99 (us)",
        "Max (us)",
    ] {
        assert!(header.contains(h), "{h} missing from {header:?}");
    }
    let dashes = lines.next().expect("line under the header");
    assert!(dashes.chars().all(|c| c == '-'), "{dashes:?}");
    lines
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// min <= p50 <= p99 <= max, p50 > 0, avg within [min, max].
#[track_caller]
fn check_dist(min: f64, p50: f64, avg: f64, p99: f64, max: f64) {
    assert!(p50 > 0.0, "p50 must be positive");
    assert!(
        min <= p50 && p50 <= p99 && p99 <= max,
        "{min} {p50} {p99} {max}"
    );
    assert!(min <= avg && avg <= max, "{min} {avg} {max}");
}

#[test]
fn latency_mode_reports_percentiles() {
    let mut backends = vec!["LOOPBACK", "SHM"];
    if tcp_built_in() {
        backends.push("TCP");
    }
    for backend in backends {
        // xfer: a 64-byte WRITE + notification; two measures.
        let out = ok(&[
            "--backend",
            backend,
            "--latency",
            "xfer",
            "--num_iter",
            "50",
            "--warmup_iter",
            "5",
            "--check_consistency",
        ]);
        assert!(
            out.contains("Latency test            : xfer: WRITE of 64 B"),
            "{out}"
        );
        let rows = latency_rows(&out);
        assert_eq!(rows.len(), 2, "{out}");
        for (row, measure) in rows.iter().zip(["complete", "roundtrip"]) {
            assert_eq!(row.len(), 10, "{row:?}");
            assert_eq!(&row[..5], ["xfer", "WRITE", "64", measure, "50"], "{row:?}");
            let v: Vec<f64> = row[5..].iter().map(|c| c.parse().unwrap()).collect();
            check_dist(v[0], v[1], v[2], v[3], v[4]);
        }
        // The round trip includes the local completion.
        let p50 = |r: &Vec<String>| r[6].parse::<f64>().unwrap();
        assert!(p50(&rows[1]) >= p50(&rows[0]) - 0.1, "{out}");

        // pingpong, JSON lines.
        let o = run(&[
            "--backend",
            backend,
            "--latency",
            "pingpong",
            "--latency_size",
            "200",
            "--num_iter",
            "40",
            "--warmup_iter",
            "0",
            "--json",
        ]);
        assert!(o.status.success(), "{backend}: {}", text(&o.stderr));
        let out = text(&o.stdout);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["backend"], backend);
        assert_eq!(v["latency"], "pingpong");
        assert_eq!(v["op_type"], "NOTIF");
        assert_eq!(v["measure"], "roundtrip");
        assert_eq!(v["size"], 200);
        assert_eq!(v["iterations"], 40);
        let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {out}"));
        check_dist(
            f("min_us"),
            f("p50_us"),
            f("avg_us"),
            f("p99_us"),
            f("max_us"),
        );
    }
    // READ of 4 KiB from prepared lists, with the consistency check (on the initiator).
    let out = ok(&[
        "--backend",
        "SHM",
        "--latency",
        "xfer",
        "--op_type",
        "READ",
        "--latency_size",
        "4096",
        "--prepared_xfer",
        "--num_iter",
        "20",
        "--warmup_iter",
        "2",
        "--check_consistency",
    ]);
    let rows = latency_rows(&out);
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(&rows[1][..4], ["xfer", "READ", "4096", "roundtrip"]);
}

/// manytoone and onetomany with 3 streams on a two-process backend: READ and WRITE with the
/// consistency check (the target verifies every initiator's region for WRITE), threads and
/// pipelining, and the per-target notification counts checked at the end.
fn schemes(backend: &str) {
    for (scheme, dev, what) in [
        (
            "manytoone",
            "--num_initiator_dev",
            "manytoone (3 initiators -> 1 target)",
        ),
        (
            "onetomany",
            "--num_target_dev",
            "onetomany (1 initiator -> 3 targets)",
        ),
    ] {
        for op in ["WRITE", "READ"] {
            let out = ok(&with(&[
                "--backend",
                backend,
                "--scheme",
                scheme,
                dev,
                "3",
                "--op_type",
                op,
                "--max_batch_size",
                "2",
                "--num_threads",
                "2",
                "--pipeline_depth",
                "2",
                "--check_consistency",
            ]));
            assert!(out.contains(what), "{out}");
            let rows = table_rows(&out);
            assert_eq!(rows.len(), 6, "{out}");
            for (row, (block, batch)) in rows.iter().zip([
                (1024, 1),
                (1024, 2),
                (2048, 1),
                (2048, 2),
                (4096, 1),
                (4096, 2),
            ]) {
                check_row(row, block, batch);
            }
        }
    }
    // JSON: the scheme, the streams, and iterations counted over all of them.
    let o = run(&with(&[
        "--backend",
        backend,
        "--scheme",
        "manytoone",
        "--num_initiator_dev",
        "2",
        "--json",
    ]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["scheme"], "manytoone");
        assert_eq!(v["streams"], 2);
        assert_eq!(v["iterations"], 40, "20 per initiator");
    }
}

#[test]
fn many_to_one_and_one_to_many_on_shm() {
    schemes("SHM");
}

#[test]
fn many_to_one_and_one_to_many_on_tcp_when_built_in() {
    if !tcp_built_in() {
        eprintln!("skipped: TCP is not in this build");
        return;
    }
    schemes("TCP");
}

#[test]
fn scattered_layout_moves_and_checks_every_descriptor() {
    let modes: [&[&str]; 4] = [
        &["--backend", "LOOPBACK"],
        &[
            "--backend",
            "LOOPBACK",
            "--prepared_xfer",
            "--pipeline_depth",
            "2",
        ],
        &[
            "--backend",
            "LOOPBACK",
            "--reregister_mem",
            "--num_threads",
            "2",
        ],
        &["--backend", "SHM", "--num_threads", "2"],
    ];
    for op in ["WRITE", "READ"] {
        for m in modes {
            let mut args = with(&[
                "--layout",
                "scattered",
                "--op_type",
                op,
                "--max_batch_size",
                "8",
                "--check_consistency",
                "--json",
            ]);
            args.extend_from_slice(m);
            let o = run(&args);
            assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
            assert!(text(&o.stderr).contains("scattered (every other block position, shuffled)"));
            let out = text(&o.stdout);
            assert_eq!(out.lines().count(), 12, "{out}");
            for l in out.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["layout"], "scattered");
                assert!(v["bw_gbps"].as_f64().unwrap() > 0.0, "{l}");
            }
        }
    }
    let dir = Scratch::new("scattered");
    let out = ok(&with(&[
        "--backend",
        "POSIX",
        "--filepath",
        dir.path(),
        "--num_files",
        "2",
        "--layout",
        "scattered",
        "--max_batch_size",
        "4",
        "--check_consistency",
    ]));
    assert_eq!(table_rows(&out).len(), 9, "{out}");
    // A flipped byte (in a hole here: a write that landed where no descriptor points) fails.
    let o = Command::new(BIN)
        .args(with(&[
            "--backend",
            "LOOPBACK",
            "--layout",
            "scattered",
            "--max_batch_size",
            "4",
            "--check_consistency",
        ]))
        .env("RIXL_BENCH_CORRUPT_FOR_TESTS", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("consistency check failed"));
}
