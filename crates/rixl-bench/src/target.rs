//! Target mode: the target of a two-process run (`SHM`, `TCP`): this binary re-executed with
//! `RIXL_BENCH_ROLE=target` (and `RIXL_BENCH_TARGET_INDEX=k` for target `k` of onetomany) and
//! the initiator's arguments, or started by hand with `--listen ADDR:PORT` (the initiator then
//! runs with `--target_addr HOST:PORT`).
//!
//! It registers one buffer (0xaa) of the size the initiator computed from the same options
//! (every initiator's slots for manytoone), runs the metadata listener (re-executed: on
//! 127.0.0.1, port chosen by the OS), says `LISTEN <port>`, counts the "0xBEEF" notifications on
//! a second thread (in latency mode it also answers each with the same message, blocking in
//! `Agent::wait_notif` between them rather than polling), and answers one-line commands (on
//! stdin, or on the connection accepted on `PORT+1`):
//!
//! - `HELLO <backend> <slots> <slot stride> ...`: same options on both sides? → `OK` or `ERR ...`
//! - `FILL <block> <batch>`: every slot's descriptors and holes become 0xaa → `OK`
//! - `VERIFY <block> <batch> <byte>`: do the descriptors hold `byte` and the holes still 0xaa?
//!   → `OK` or `BAD <offset> <value>`
//! - `DONE <expected>`: wait (at most 10 s) for that many notifications → `NOTIFS <count>`, exit
//!
//! The initiator sends FILL and VERIFY only between rows, when no transfer is in flight, which is
//! what `Agent::register_mem` requires of the program touching registered memory.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rixl::{Agent, AgentConfig, MemType, RegDesc, RegDescList};

use crate::buffer::Buffer;
use crate::cli::Config;
use crate::layout::SlotLayout;
use crate::notif::answer_notifs;
use crate::protocol::{hello, target_name, INDEX_ENV};

/// How the initiator reaches the target's command channel.
#[derive(Clone, Copy, Debug)]
pub enum Control {
    /// Re-executed by the initiator: commands on stdin, answers on stdout, metadata listener on
    /// 127.0.0.1 with a port the OS chooses.
    Stdio,
    /// Started by hand (`--listen ADDR:PORT`): metadata listener on `ADDR:PORT`, commands over
    /// one TCP connection accepted on `ADDR:PORT+1`.
    Tcp(SocketAddr),
}

pub fn serve(cfg: &Config, control: Control) -> Result<(), String> {
    let mut buf = Buffer::new(cfg.target_bytes() as usize, 0xaa);
    let index: u64 = match control {
        Control::Stdio => std::env::var(INDEX_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        Control::Tcp(_) => 0,
    };
    let meta_addr = match control {
        Control::Stdio => SocketAddr::from(([127, 0, 0, 1], 0)),
        Control::Tcp(a) => a,
    };
    let mut conf = AgentConfig::default()
        .backend(cfg.backend.name())
        .listen_on(meta_addr.port());
    conf.listen_addr = Some(meta_addr.ip());
    let agent = Agent::new(&target_name(index), conf)
        .map_err(|e| format!("target: cannot create the agent: {e}"))?;
    let regs = RegDescList::from_descs(
        MemType::Dram,
        vec![RegDesc::new(buf.addr(), buf.len() as u64, 0)],
    );
    // SAFETY: `buf` outlives the agent (the agent is dropped at the end of this function,
    // before `buf`), and the program touches it only on FILL and VERIFY, which the initiator
    // sends only while none of its transfers is in flight.
    unsafe { agent.register_mem(&regs, &[]) }
        .map_err(|e| format!("target: cannot register the buffer: {e}"))?;
    let port = agent
        .listen_addr()
        .ok_or("target: the metadata listener is not running")?
        .port();
    let (input, mut out): (Box<dyn BufRead>, Box<dyn Write>) = match control {
        Control::Stdio => {
            let mut out = std::io::stdout().lock();
            say(&mut out, &format!("LISTEN {port}"))?;
            (Box::new(std::io::stdin().lock()), Box::new(out))
        }
        Control::Tcp(a) => {
            let cport = a.port().checked_add(1).ok_or("--listen: port too high")?;
            let caddr = SocketAddr::new(a.ip(), cport);
            let l = TcpListener::bind(caddr)
                .map_err(|e| format!("--listen: cannot listen on {caddr}: {e}"))?;
            eprintln!(
                "rixl-bench target: {} metadata on {a}, commands on {caddr}; waiting for the \
                 initiator (--target_addr HOST:{})",
                cfg.backend.name(),
                a.port()
            );
            let (stream, peer) = l
                .accept()
                .map_err(|e| format!("accepting the initiator: {e}"))?;
            eprintln!("rixl-bench target: initiator connected from {peer}");
            let reader = stream
                .try_clone()
                .map_err(|e| format!("control connection: {e}"))?;
            let mut out: Box<dyn Write> = Box::new(stream);
            say(&mut out, &format!("LISTEN {port}"))?;
            (Box::new(BufReader::new(reader)), out)
        }
    };

    let count = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| answer_notifs(&agent, cfg, &stop, &count));
        let r = commands(cfg, &mut buf, &count, input, &mut out);
        stop.store(true, Ordering::Release);
        r
    });
    drop(agent);
    drop(buf);
    result
}

fn say(out: &mut dyn Write, s: &str) -> Result<(), String> {
    writeln!(out, "{s}")
        .and_then(|_| out.flush())
        .map_err(|e| format!("target: cannot answer the initiator: {e}"))
}

fn commands(
    cfg: &Config,
    buf: &mut Buffer,
    count: &AtomicU64,
    input: Box<dyn BufRead + '_>,
    out: &mut dyn Write,
) -> Result<(), String> {
    for line in input.lines() {
        let line = line.map_err(|e| format!("target: reading commands: {e}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("target: bad command {line:?}"))
        };
        // A row's layout, if it fits in a slot (the command channel may be a TCP connection:
        // numbers are not trusted to be sane).
        let layout = |block: u64, batch: u64| -> Result<SlotLayout, String> {
            match block.checked_mul(batch).and_then(|b| b.checked_mul(2)) {
                Some(_) if cfg.span(block, batch) <= cfg.slot_stride => {
                    Ok(SlotLayout::new(cfg, block, batch, true))
                }
                _ => Err(format!(
                    "target: block {block} x batch {batch} does not fit a slot"
                )),
            }
        };
        match words.first().copied() {
            Some("HELLO") => {
                let mine = hello(cfg);
                if line == mine {
                    say(out, "OK")?;
                } else {
                    say(
                        out,
                        &format!("ERR the target runs with different options ({mine})"),
                    )?;
                    return Err(format!(
                        "the initiator runs with different options ({line}, mine: {mine})"
                    ));
                }
            }
            Some("FILL") => {
                layout(n(1)?, n(2)?)?.fill(buf.bytes_mut(), cfg.target_slots(), 0xaa);
                say(out, "OK")?;
            }
            Some("VERIFY") => {
                let byte = n(3)? as u8;
                let lay = layout(n(1)?, n(2)?)?;
                match lay.mismatch(buf.bytes(), cfg.target_slots(), byte, 0xaa) {
                    None => say(out, "OK")?,
                    Some((off, v)) => say(out, &format!("BAD {off} {v}"))?,
                }
            }
            Some("DONE") => {
                let want = n(1)?;
                let t = Instant::now();
                while count.load(Ordering::Acquire) < want && t.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                say(out, &format!("NOTIFS {}", count.load(Ordering::Acquire)))?;
                return Ok(());
            }
            _ => return Err(format!("target: unknown command {line:?}")),
        }
    }
    Ok(())
}
