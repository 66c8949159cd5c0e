//! The initiator's handle on a target process (SHM, TCP): starting it or reaching it, the
//! handshake, and the one-line commands of [`crate::target`]'s channel.
//!
//! A re-executed target talks over its stdin and stdout; one started by hand with `--listen`
//! over a TCP connection to the port after its metadata port. Either way the initiator sends a
//! command and reads one answer line, and sends them only between rows, when no transfer is in
//! flight (the target touches its registered buffer on FILL and VERIFY).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::Config;
use crate::protocol::{hello, INDEX_ENV, ROLE_ENV};

/// Reaps the target process however the run ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The target process: commands on its stdin (or the control connection), answers on its
/// stdout (or the same connection). Fields drop in order: the command channel closes first,
/// which ends the target, then a re-executed target is reaped.
pub struct TargetProcess {
    stdin: Box<dyn Write>,
    stdout: BufReader<Box<dyn Read>>,
    #[allow(dead_code)]
    child: Option<ChildGuard>,
}

impl TargetProcess {
    /// Starts target process `k` (this binary again, with the same arguments); [`greet`] it
    /// next.
    ///
    /// [`greet`]: TargetProcess::greet
    pub fn spawn(k: u64) -> Result<TargetProcess, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
        let mut child = Command::new(exe)
            .args(std::env::args().skip(1))
            .env(ROLE_ENV, "target")
            .env(INDEX_ENV, k.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the target process: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin for the target")?;
        let stdout = child.stdout.take().ok_or("no stdout for the target")?;
        Ok(TargetProcess {
            stdin: Box::new(stdin),
            stdout: BufReader::new(Box::new(stdout)),
            child: Some(ChildGuard(child)),
        })
    }

    /// Connects to a target started by hand with `--listen`.
    pub fn connect(cfg: &Config, addr: SocketAddr) -> Result<(TargetProcess, SocketAddr), String> {
        let caddr = SocketAddr::new(addr.ip(), addr.port() + 1);
        // The target may still be starting: retry for a while.
        let t = Instant::now();
        let stream = loop {
            match std::net::TcpStream::connect_timeout(&caddr, Duration::from_secs(10)) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(10) => {
                    return Err(format!(
                        "--target_addr: cannot reach the target's commands at {caddr}: {e}"
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let reader = stream
            .try_clone()
            .map_err(|e| format!("--target_addr: {e}"))?;
        let target = TargetProcess {
            stdin: Box::new(stream),
            stdout: BufReader::new(Box::new(reader)),
            child: None,
        };
        target.greet(cfg, addr.ip())
    }

    /// Reads `LISTEN <port>` and checks that both sides run the same layout.
    pub fn greet(
        mut self,
        cfg: &Config,
        ip: std::net::IpAddr,
    ) -> Result<(TargetProcess, SocketAddr), String> {
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        let port: u16 = line
            .trim()
            .strip_prefix("LISTEN ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                format!(
                    "the {} target did not start (it said {:?})",
                    cfg.backend.name(),
                    line.trim()
                )
            })?;
        let answer = self.ask(&hello(cfg))?;
        if answer != "OK" {
            return Err(format!("the target refused: {answer}"));
        }
        Ok((self, SocketAddr::new(ip, port)))
    }

    fn ask(&mut self, cmd: &str) -> Result<String, String> {
        writeln!(self.stdin, "{cmd}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("the target process is gone ({e})"))?;
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) | Err(_) => Err(format!(
                "the target process did not answer {:?}",
                cmd.split(' ').next().unwrap_or("")
            )),
            Ok(_) => Ok(line.trim().to_owned()),
        }
    }

    /// Resets every target slot's descriptors and holes to 0xaa.
    pub fn fill(&mut self, block: u64, batch: u64) -> Result<(), String> {
        match self.ask(&format!("FILL {block} {batch}"))?.as_str() {
            "OK" => Ok(()),
            other => Err(format!("the target process answered {other:?} to FILL")),
        }
    }

    /// The first target byte that is not 0xbb in a descriptor (or not 0xaa in a hole), as
    /// (offset, value); `None` when all are right.
    pub fn verify(&mut self, block: u64, batch: u64) -> Result<Option<(u64, u8)>, String> {
        let a = self.ask(&format!("VERIFY {block} {batch} {}", 0xbb))?;
        if a == "OK" {
            return Ok(None);
        }
        let w: Vec<u64> = a
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        match w.as_slice() {
            [o, v] => Ok(Some((*o, *v as u8))),
            _ => Err(format!("the target process answered {a:?} to VERIFY")),
        }
    }

    /// Ends the run of target `k`: it must have seen `want` notifications.
    pub fn done(&mut self, k: usize, want: u64) -> Result<(), String> {
        let a = self.ask(&format!("DONE {want}"))?;
        let got: Option<u64> = a.strip_prefix("NOTIFS ").and_then(|n| n.parse().ok());
        match got {
            Some(n) if n == want => Ok(()),
            Some(n) => Err(format!(
                "target {k} received {n} \"0xBEEF\" notifications for {want} transfers"
            )),
            None => Err(format!("target {k} answered {a:?} to DONE")),
        }
    }
}
