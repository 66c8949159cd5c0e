//! A test binary re-run as a peer process, driven line by line.
//!
//! Cross-process tests need a second process that runs code of the same test binary: the
//! binary re-executes itself to run only one ignored test, the peer's entry point, which reads
//! commands from stdin and prints replies on stdout. [`PeerProcess`](crate::peer::PeerProcess),
//! [`RemoteAgent`](crate::RemoteAgent) and tests with peers of their own (in another network
//! namespace, say) all do this, so this is the one place that knows how: which libtest
//! arguments select the entry point, that libtest's own output shares the peer's stdout (so
//! replies carry a prefix and may follow libtest's text on the same line), and that a peer must
//! not outlive its test (it is killed and reaped on drop).
//!
//! [`ChildLine`] only moves lines; it reports I/O errors and an exited peer to its caller, which
//! decides how to fail, since each caller's messages name its own kind of peer.

use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};

/// A peer process running one ignored test of this test binary, with piped stdin and stdout.
///
/// Dropping it kills the peer with `SIGKILL` and reaps it: never a polite exit, because the
/// peer-death tests want a real death and every other test is over when its peer goes.
#[derive(Debug)]
pub struct ChildLine {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    prefix: &'static str,
}

impl ChildLine {
    /// Re-executes this test binary running only the test named `entry` (exact libtest name),
    /// with `env` added to the environment.
    ///
    /// `launcher` (a program and its arguments, such as `["ip", "netns", "exec", ns]`) is run
    /// instead with the binary and its arguments appended; empty runs the binary directly.
    /// Replies are the stdout lines that contain `prefix`, taken from after it.
    ///
    /// Panics if this binary cannot be found; errors if the process does not start.
    pub fn spawn(
        launcher: &[&str],
        entry: &str,
        env: &[(&str, &str)],
        prefix: &'static str,
    ) -> io::Result<ChildLine> {
        let exe = std::env::current_exe().expect("test executable");
        let mut cmd = match launcher {
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(exe);
                c
            }
            [] => Command::new(exe),
        };
        let mut child = cmd
            .args([
                entry,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("peer stdin");
        let stdout = BufReader::new(child.stdout.take().expect("peer stdout"));
        Ok(ChildLine {
            child,
            stdin,
            stdout,
            prefix,
        })
    }

    /// Writes one line to the peer's stdin.
    pub fn send(&mut self, line: &str) -> io::Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()
    }

    /// Reads the next reply (without the prefix and trailing whitespace), skipping other
    /// output; `None` once the peer has closed its stdout (it exited).
    pub fn reply(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            // libtest may print "test <entry> ... " on the same line first.
            if let Some(i) = line.find(self.prefix) {
                return Ok(Some(line[i + self.prefix.len()..].trim_end().to_owned()));
            }
        }
    }

    /// Sends `SIGKILL` to the peer without reaping it.
    pub fn kill(&mut self) -> io::Result<()> {
        self.child.kill()
    }

    /// Waits for the peer to exit and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait()
    }
}

impl Drop for ChildLine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
