//! A child server process we can signal together with the workers it forks.
//!
//! Signals go to the leader and to each of its children found in `/proc`, not to a process
//! group: PostgreSQL's backends call `setsid()` and leave the postmaster's group.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::{Error, Result, io_error};

#[derive(Debug)]
pub(crate) struct Process {
    child: Option<Child>,
    name: String,
}

impl Process {
    /// Starts `command` in a process group of its own, so signals reach its workers too.
    pub(crate) fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        // Workers orphaned by a killed leader come to us instead of to init, which may never
        // reap them (as in some containers); `kill` reaps them.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .map_err(io_error(format!("starting {name}")))?;
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub(crate) fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    fn leader(&self, action: &'static str) -> Result<Pid> {
        let pid = self.pid().ok_or(Error::NotRunning { action })?;
        Ok(Pid::from_raw(i32::try_from(pid).expect("pids fit in i32")))
    }

    /// Sends `signal` to the leader and to every child it has.
    ///
    /// Children are listed both before and after the leader is signalled: a killed leader's
    /// children are re-parented at once, and a running one may fork a new child meanwhile.
    fn signal_all(&self, action: &'static str, signal: Signal) -> Result<Vec<Pid>> {
        let leader = self.leader(action)?;
        let mut workers = children(leader);
        kill(leader, signal).map_err(|errno| Error::Io {
            context: format!("sending {signal} to {}", self.name),
            source: errno.into(),
        })?;
        workers.extend(children(leader));
        workers.sort_unstable();
        workers.dedup();
        for &worker in &workers {
            // A worker may exit between listing and signalling; that is fine.
            let _ = kill(worker, signal);
        }
        Ok(workers)
    }

    /// SIGSTOP to the leader and its workers: connections stay open and nothing answers.
    pub(crate) fn pause(&self) -> Result<()> {
        self.signal_all("pause", Signal::SIGSTOP).map(drop)
    }

    /// SIGCONT to the leader and its workers.
    pub(crate) fn resume(&self) -> Result<()> {
        self.signal_all("resume", Signal::SIGCONT).map(drop)
    }

    /// SIGKILL to the leader and its workers, then reaps them all.
    pub(crate) fn kill(&mut self) -> Result<()> {
        // Stopped first, the leader cannot fork a worker we would miss.
        let result = self
            .signal_all("kill", Signal::SIGSTOP)
            .and_then(|_| self.signal_all("kill", Signal::SIGKILL));
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        // The workers were re-parented to us (see `spawn`); reap them so no zombie is left.
        for worker in result.as_deref().unwrap_or_default() {
            let _ = waitpid(*worker, None);
        }
        result.map(drop)
    }

    /// Asks the leader to stop with `signal`, waits up to `grace`, then kills the group.
    pub(crate) fn stop(&mut self, signal: Signal, grace: Duration) {
        let Some(pid) = self.pid() else { return };
        let pid = Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
        let _ = self.resume();
        let _ = kill(pid, signal);
        let start = Instant::now();
        while self.alive() && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.kill();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The processes whose parent is `parent`, read from `/proc`.
fn children(parent: Pid) -> Vec<Pid> {
    let parent = parent.as_raw().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .and_then(|rest| rest.split_whitespace().nth(1))
                    == Some(parent.as_str())
            })
        })
        .map(Pid::from_raw)
        .collect()
}
