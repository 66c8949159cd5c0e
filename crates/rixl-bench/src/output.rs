//! Results: the nixlbench table, JSON lines, and a hand-written SVG plot.

use std::fmt::Write as _;

/// One row of results (one block size, one batch size).
#[derive(Clone, Debug)]
pub struct Row {
    pub block: u64,
    pub batch: u64,
    /// Timed iterations over all threads.
    pub iterations: u64,
    /// Wall time of the timed loop, seconds.
    pub seconds: f64,
    /// Decimal GB/s.
    pub bw_gbs: f64,
    /// Microseconds per descriptor.
    pub avg_lat_us: f64,
    pub prep: Stat,
    pub post: Stat,
    pub tx: Stat,
}

/// Average and 99th percentile, microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stat {
    pub avg: f64,
    pub p99: f64,
}

impl Stat {
    /// From samples in nanoseconds.
    pub fn from_ns(mut v: Vec<u64>) -> Stat {
        if v.is_empty() {
            return Stat::default();
        }
        v.sort_unstable();
        let sum: u128 = v.iter().map(|&x| u128::from(x)).sum();
        let idx = (v.len() * 99).div_ceil(100).saturating_sub(1);
        Stat {
            avg: sum as f64 / v.len() as f64 / 1e3,
            p99: v[idx.min(v.len() - 1)] as f64 / 1e3,
        }
    }
}

/// Reads one plotted value from a row.
type Metric = fn(&Row) -> f64;

pub const HEADERS: [&str; 10] = [
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

const WIDTHS: [usize; 10] = [16, 12, 14, 15, 15, 15, 15, 15, 13, 13];

pub fn table_header() -> String {
    let mut s = String::new();
    for (h, w) in HEADERS.iter().zip(WIDTHS) {
        let _ = write!(s, "{h:<w$}");
    }
    let s = s.trim_end().to_owned();
    let width = WIDTHS.iter().sum::<usize>();
    format!("{s}\n{}", "-".repeat(width))
}

pub fn table_row(r: &Row) -> String {
    let cells = [
        r.block.to_string(),
        r.batch.to_string(),
        format!("{:.6}", r.bw_gbs),
        format!("{:.1}", r.avg_lat_us),
        format!("{:.1}", r.prep.avg),
        format!("{:.1}", r.prep.p99),
        format!("{:.1}", r.post.avg),
        format!("{:.1}", r.post.p99),
        format!("{:.1}", r.tx.avg),
        format!("{:.1}", r.tx.p99),
    ];
    let mut s = String::new();
    for (c, w) in cells.iter().zip(WIDTHS) {
        let _ = write!(s, "{c:<w$}");
    }
    s.trim_end().to_owned()
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".to_owned()
    }
}

/// What a bandwidth row was measured with, for its JSON line.
pub struct RunInfo<'a> {
    pub backend: &'a str,
    pub op: &'a str,
    pub threads: u64,
    pub depth: u64,
    pub scheme: &'a str,
    /// Initiator-target pairs running at once (1 for pairwise).
    pub streams: u64,
    pub layout: &'a str,
}

/// One JSON object per row (hand-written: only numbers and fixed ASCII strings).
pub fn json_row(r: &Row, info: &RunInfo<'_>) -> String {
    format!(
        "{{\"backend\":\"{}\",\"op_type\":\"{}\",\"scheme\":\"{}\",\"streams\":{},\
         \"layout\":\"{}\",\"block_size\":{},\"batch_size\":{},\
         \"num_threads\":{},\"pipeline_depth\":{},\"iterations\":{},\
         \"seconds\":{},\"bw_gbps\":{},\"avg_lat_us\":{},\"avg_prep_us\":{},\"p99_prep_us\":{},\
         \"avg_post_us\":{},\"p99_post_us\":{},\"avg_tx_us\":{},\"p99_tx_us\":{}}}",
        info.backend,
        info.op,
        info.scheme,
        info.streams,
        info.layout,
        r.block,
        r.batch,
        info.threads,
        info.depth,
        r.iterations,
        num(r.seconds),
        num(r.bw_gbs),
        num(r.avg_lat_us),
        num(r.prep.avg),
        num(r.prep.p99),
        num(r.post.avg),
        num(r.post.p99),
        num(r.tx.avg),
        num(r.tx.p99),
    )
}

/// Distribution of latency samples, microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dist {
    pub min: f64,
    pub p50: f64,
    pub avg: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    /// From samples in nanoseconds (nearest-rank percentiles).
    pub fn from_ns(mut v: Vec<u64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_unstable();
        let rank = |p: usize| {
            v[((v.len() * p).div_ceil(100))
                .saturating_sub(1)
                .min(v.len() - 1)]
        };
        let sum: u128 = v.iter().map(|&x| u128::from(x)).sum();
        Dist {
            min: v[0] as f64 / 1e3,
            p50: rank(50) as f64 / 1e3,
            avg: sum as f64 / v.len() as f64 / 1e3,
            p99: rank(99) as f64 / 1e3,
            max: v[v.len() - 1] as f64 / 1e3,
        }
    }
}

/// One row of latency mode: what was timed, and its distribution.
#[derive(Clone, Debug)]
pub struct LatRow {
    /// `xfer` or `pingpong`.
    pub test: &'static str,
    /// WRITE, READ or NOTIF.
    pub op: &'static str,
    pub size: u64,
    /// `roundtrip` (until the target's answer arrives) or `complete` (until the initiator sees
    /// its own transfer complete).
    pub measure: &'static str,
    pub iterations: u64,
    pub dist: Dist,
}

const LAT_HEADERS: [(&str, usize); 10] = [
    ("Test", 10),
    ("Op", 7),
    ("Size (B)", 10),
    ("Measure", 11),
    ("Iterations", 12),
    ("Min (us)", 10),
    ("P50 (us)", 10),
    ("Avg (us)", 10),
    ("P99 (us)", 10),
    ("Max (us)", 10),
];

pub fn latency_header() -> String {
    let mut s = String::new();
    for (h, w) in LAT_HEADERS {
        let _ = write!(s, "{h:<w$}");
    }
    let width: usize = LAT_HEADERS.iter().map(|(_, w)| w).sum();
    format!("{}\n{}", s.trim_end(), "-".repeat(width))
}

pub fn latency_row(r: &LatRow) -> String {
    let d = &r.dist;
    let cells = [
        r.test.to_owned(),
        r.op.to_owned(),
        r.size.to_string(),
        r.measure.to_owned(),
        r.iterations.to_string(),
        format!("{:.1}", d.min),
        format!("{:.1}", d.p50),
        format!("{:.1}", d.avg),
        format!("{:.1}", d.p99),
        format!("{:.1}", d.max),
    ];
    let mut s = String::new();
    for (c, (_, w)) in cells.iter().zip(LAT_HEADERS) {
        let _ = write!(s, "{c:<w$}");
    }
    s.trim_end().to_owned()
}

pub fn latency_json(r: &LatRow, backend: &str) -> String {
    let d = &r.dist;
    format!(
        "{{\"backend\":\"{backend}\",\"latency\":\"{}\",\"op_type\":\"{}\",\"size\":{},\
         \"measure\":\"{}\",\"iterations\":{},\"min_us\":{},\"p50_us\":{},\"avg_us\":{},\
         \"p99_us\":{},\"max_us\":{}}}",
        r.test,
        r.op,
        r.size,
        r.measure,
        r.iterations,
        num(d.min),
        num(d.p50),
        num(d.avg),
        num(d.p99),
        num(d.max)
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Two panels (bandwidth, average latency per descriptor) against block size on a log2 axis,
/// one line per batch size.
pub fn svg(rows: &[Row], title: &str) -> String {
    let (w, h) = (900.0f64, 420.0f64);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(
        s,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"18\" \
         text-anchor=\"middle\" font-size=\"14\">{}</text>",
        w / 2.0,
        esc(title)
    );
    let mut batches: Vec<u64> = rows.iter().map(|r| r.batch).collect();
    batches.sort_unstable();
    batches.dedup();
    let panels: [(&str, Metric); 2] = [
        ("B/W (GB/Sec)", |r| r.bw_gbs),
        ("Avg Lat. (us)", |r| r.avg_lat_us),
    ];
    let (pw, ph, top) = (360.0f64, 300.0f64, 50.0f64);
    for (p, (label, get)) in panels.iter().enumerate() {
        let left = 70.0 + p as f64 * (pw + 90.0);
        let xs: Vec<f64> = rows.iter().map(|r| (r.block as f64).log2()).collect();
        let (xmin, xmax) = xs
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let ymax = rows
            .iter()
            .map(get)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let xspan = if xmax > xmin { xmax - xmin } else { 1.0 };
        let px = |x: f64| left + (x - xmin) / xspan * pw;
        let py = |y: f64| top + ph - y / ymax * ph;
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" \
             stroke=\"#444\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">Block Size (B)</text>",
            left + pw / 2.0,
            top - 8.0,
            esc(label),
            left + pw / 2.0,
            top + ph + 34.0
        );
        for i in 0..=4 {
            let y = ymax * i as f64 / 4.0;
            let (x0, yy, tx, ty) = (left - 4.0, py(y), left - 6.0, py(y) + 4.0);
            let _ = writeln!(
                s,
                "<line x1=\"{x0}\" y1=\"{yy}\" x2=\"{left}\" y2=\"{yy}\" stroke=\"#444\"/>\
                 <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{y:.3}</text>"
            );
        }
        let mut ticks: Vec<u64> = rows.iter().map(|r| r.block).collect();
        ticks.sort_unstable();
        ticks.dedup();
        let step = ticks.len().div_ceil(8).max(1);
        for b in ticks.iter().step_by(step) {
            let x = px((*b as f64).log2());
            let _ = writeln!(
                s,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#444\"/>\
                 <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                top + ph,
                top + ph + 4.0,
                top + ph + 16.0,
                human(*b)
            );
        }
        for (k, batch) in batches.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let pts: Vec<String> = rows
                .iter()
                .filter(|r| r.batch == *batch && get(r).is_finite())
                .map(|r| format!("{:.1},{:.1}", px((r.block as f64).log2()), py(get(r))))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            );
            for pt in &pts {
                let (x, y) = pt.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>"
                );
            }
            if p == 1 {
                let ly = top + 14.0 * k as f64 + 10.0;
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{ly}\" fill=\"{color}\">batch {batch}</text>",
                    left + pw + 6.0
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

fn human(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}G", b >> 30)
    } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

/// A progress bar on stderr, redrawn in place.
pub fn progress_line(row: usize, rows: usize, block: u64, batch: u64, done: u64, total: u64) {
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let width = 30;
    let filled = ((frac * width as f64) as usize).min(width);
    eprint!(
        "\r[{}{}] row {}/{} block {} batch {} {:>3}%   ",
        "#".repeat(filled),
        " ".repeat(width - filled),
        row + 1,
        rows,
        human(block),
        batch,
        (frac * 100.0) as u32
    );
}

pub fn progress_clear() {
    eprint!("\r{}\r", " ".repeat(78));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_average_and_p99() {
        let s = Stat::from_ns((1..=100).map(|x| x * 1000).collect());
        assert_eq!(s.avg, 50.5);
        assert_eq!(s.p99, 99.0);
        let one = Stat::from_ns(vec![2500]);
        assert_eq!((one.avg, one.p99), (2.5, 2.5));
        let none = Stat::from_ns(Vec::new());
        assert_eq!((none.avg, none.p99), (0.0, 0.0));
    }

    #[test]
    fn row_formats() {
        let r = Row {
            block: 4096,
            batch: 2,
            iterations: 10,
            seconds: 0.5,
            bw_gbs: 1.0 / 3.0,
            avg_lat_us: 12.345,
            prep: Stat { avg: 1.0, p99: 2.0 },
            post: Stat { avg: 3.0, p99: 4.0 },
            tx: Stat { avg: 5.0, p99: 6.0 },
        };
        let cells: Vec<String> = table_row(&r)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            cells,
            ["4096", "2", "0.333333", "12.3", "1.0", "2.0", "3.0", "4.0", "5.0", "6.0"]
        );
        let info = RunInfo {
            backend: "SHM",
            op: "READ",
            threads: 1,
            depth: 1,
            scheme: "pairwise",
            streams: 1,
            layout: "contiguous",
        };
        assert!(json_row(&r, &info).contains("\"bw_gbps\":0.333"));
    }

    #[test]
    fn latency_distribution_and_row() {
        let d = Dist::from_ns((1..=100).rev().map(|x| x * 1000).collect());
        assert_eq!(
            (d.min, d.p50, d.avg, d.p99, d.max),
            (1.0, 50.0, 50.5, 99.0, 100.0)
        );
        assert_eq!(Dist::from_ns(Vec::new()), Dist::default());
        let r = LatRow {
            test: "xfer",
            op: "WRITE",
            size: 64,
            measure: "roundtrip",
            iterations: 100,
            dist: d,
        };
        let cells: Vec<String> = latency_row(&r)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            cells,
            [
                "xfer",
                "WRITE",
                "64",
                "roundtrip",
                "100",
                "1.0",
                "50.0",
                "50.5",
                "99.0",
                "100.0"
            ]
        );
        assert!(latency_header().starts_with("Test"));
        assert!(latency_json(&r, "SHM").contains("\"p50_us\":50,"));
    }
}
