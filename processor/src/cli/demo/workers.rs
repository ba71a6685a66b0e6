//! The demo's worker processes: real `cmdproc run` processes, each logging to its own file,
//! and a guard that never leaves one running.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// One worker process.
#[derive(Debug)]
struct Worker {
    name: String,
    log: PathBuf,
    child: Child,
}

/// The running workers. Dropping this kills every worker still running (SIGKILL), so a
/// demo that fails or panics midway leaves no process behind; [`Workers::stop`] is the
/// graceful way.
#[derive(Debug)]
pub(in crate::cli) struct Workers {
    dir: PathBuf,
    running: Vec<Worker>,
    logs: Vec<PathBuf>,
}

impl Workers {
    /// No workers yet; their logs will go to `dir`.
    pub(in crate::cli) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            running: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// Starts `exe` with `args` and `envs` as worker `name`, stdout and stderr going to
    /// `<dir>/<name>.log`; returns the log's path.
    pub(in crate::cli) fn spawn(
        &mut self,
        exe: &Path,
        name: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<PathBuf> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        self.running.push(Worker {
            name: name.to_owned(),
            log: log.clone(),
            child,
        });
        self.logs.push(log.clone());
        Ok(log)
    }

    /// Fails if a worker has exited: the demo's workers only stop when told to.
    pub(in crate::cli) fn check_alive(&mut self) -> anyhow::Result<()> {
        for w in &mut self.running {
            if let Some(status) = w.child.try_wait()? {
                anyhow::bail!(
                    "{} exited unexpectedly ({}); see {}",
                    w.name,
                    describe(status),
                    w.log.display()
                );
            }
        }
        Ok(())
    }

    /// Asks every worker to stop (SIGTERM, so it drains and leaves the group), waits up to
    /// `grace` for all of them, then kills the rest. Returns each worker's name and how it
    /// ended.
    pub(in crate::cli) async fn stop(&mut self, grace: Duration) -> Vec<(String, String)> {
        for w in &self.running {
            if let Some(pid) = w.child.id() {
                // `kill` rather than a signal crate: the workspace has none, and `kill` is
                // on every machine this runs on. Failure means the process is already gone.
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut out = Vec::new();
        for mut w in self.running.drain(..) {
            let ended = match tokio::time::timeout_at(deadline, w.child.wait()).await {
                Ok(Ok(status)) => describe(status),
                Ok(Err(e)) => format!("cannot wait for it: {e}"),
                Err(_) => {
                    let _ = w.child.start_kill();
                    let _ = w.child.wait().await;
                    format!("killed after not stopping within {}s", grace.as_secs())
                }
            };
            out.push((w.name, ended));
        }
        out
    }

    /// The peak resident memory (`VmHWM` in `/proc/<pid>/status`, bytes) of each running
    /// worker, by name; `None` where the kernel does not say.
    pub(in crate::cli) fn peak_memory(&self) -> Vec<(String, Option<u64>)> {
        self.running
            .iter()
            .map(|w| {
                let peak = w.child.id().and_then(|pid| {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
                    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                    Some(kib * 1024)
                });
                (w.name.clone(), peak)
            })
            .collect()
    }

    /// The last `lines` lines of every worker's log, for error reports.
    pub(in crate::cli) fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for path in &self.logs {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!(
                "--- last {} lines of {}\n",
                tail.len(),
                path.display()
            ));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.running {
            // SIGKILL: there is no time to drain in a destructor. Tokio reaps the process.
            let _ = w.child.start_kill();
        }
    }
}

/// `exit 0`, `exit 1`, or the signal that ended the process.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}
