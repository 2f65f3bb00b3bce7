//! A child process that is SIGKILLed and reaped when dropped, so nothing is left behind, and
//! signals sent by pid with `kill -SIG` (no libc: the crates forbid unsafe code).

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// The last `lines` lines of a file, or a note saying why it could not be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!(
                "---- {} (last {} lines) ----\n{}\n----",
                path.display(),
                all.len() - start,
                all[start..].join("\n")
            )
        }
        Err(error) => format!("---- {}: unreadable: {error} ----", path.display()),
    }
}

/// Opens a file to append to, creating it.
pub fn append(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Sends a signal by name (`STOP`, `CONT`, `TERM`, …) to a pid; true when it was delivered.
pub fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// A child process, SIGKILLed and reaped when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `program args…` with stdin closed, stdout appended to `stdout` and stderr to
    /// `stderr` (the same file for both is fine).
    pub fn spawn(
        program: &Path,
        args: &[String],
        stdout: &Path,
        stderr: &Path,
    ) -> std::io::Result<Proc> {
        Self::spawn_env(program, args, &[], stdout, stderr)
    }

    /// Like [`Proc::spawn`], with these variables added to the environment.
    pub fn spawn_env(
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        stdout: &Path,
        stderr: &Path,
    ) -> std::io::Result<Proc> {
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(append(stdout)?)
            .stderr(append(stderr)?)
            .spawn()?;
        Ok(Proc { child })
    }

    /// Wraps a child started elsewhere.
    pub fn from_child(child: Child) -> Proc {
        Proc { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Polls until the process exits; `None` if it still runs at the deadline.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        crate::poll::until(within, crate::POLL, || std::future::ready(self.try_exit())).await
    }

    /// Sends a signal by name to this process.
    pub fn signal(&self, name: &str) -> bool {
        signal(self.pid(), name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // `Child::kill` sends SIGKILL to this pid, and does nothing if the child was reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
