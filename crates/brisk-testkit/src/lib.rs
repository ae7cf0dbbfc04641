//! Real servers for brisk's tests: a private `redis-server`, a three-master Redis Cluster and a
//! throwaway PostgreSQL, each stopped and removed when dropped, with fault injection.
//!
//! ```no_run
//! use brisk_testkit::RedisServer;
//!
//! let mut redis = RedisServer::builder().private().start()?;
//! let url = redis.url(); // redis://127.0.0.1:PORT
//! # let _ = url;
//! redis.pause()?;   // SIGSTOP: connections stay open, nothing answers
//! redis.resume()?;  // SIGCONT
//! redis.kill()?;    // SIGKILL
//! redis.restart()?; // the same address again
//! # Ok::<(), brisk_testkit::Error>(())
//! ```
//!
//! # Where the binaries come from
//!
//! `redis-server` is looked up on `PATH`; `initdb`, `postgres` and `createdb` on `PATH` or under
//! `/usr/lib/postgresql/*/bin` (the newest version wins). A missing binary is an
//! [`Error::MissingBinary`] that names the Debian package to install — never a silent skip.
//! `scripts/test` installs both on a fresh Debian machine.
//!
//! # Using a server you already run
//!
//! `REDIS_URL` and `DATABASE_URL` make [`RedisServer::start`] and [`Postgres::start`] hand out
//! that server instead of starting one. Fault injection on such a server is refused with
//! [`Error::External`]; tests that kill or pause call `.private()` on the builder and always get
//! their own process.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When the tests run as root (as CI does), the cluster's
//! directory is handed to the `postgres` system user and `initdb` and `postgres` run as that user.
//!
//! Starting a server blocks for the few hundred milliseconds it takes to answer; call it before
//! the async part of a test, or from `spawn_blocking`.

mod cluster;
mod handle;
mod postgres;
mod process;
mod redis;
mod resp;
mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub use cluster::RedisCluster;
pub use postgres::{Postgres, PostgresBuilder};
pub use redis::{RedisServer, RedisServerBuilder};

/// Everything that can go wrong starting or steering a test server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server binary is not installed.
    #[error(
        "`{binary}` was not found on PATH{searched}; install it with `apt-get install {package}` (or run scripts/test as root, which does)"
    )]
    MissingBinary {
        /// The binary looked for.
        binary: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
        /// Other places searched, as text for the message.
        searched: &'static str,
    },
    /// The server did not become ready in time; `log` holds the end of its log.
    #[error("{what} was not ready after {waited:?}:\n{log}")]
    NotReady {
        /// Which server.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// The last lines the server logged.
        log: String,
    },
    /// A setup command (`initdb`, `createdb`, a cluster command) failed.
    #[error("{what} failed:\n{output}")]
    Setup {
        /// The command.
        what: String,
        /// What it printed.
        output: String,
    },
    /// Fault injection was asked of a server this kit did not start (`REDIS_URL` / `DATABASE_URL`).
    #[error(
        "cannot {action} {url}: it is an external server from the environment; build the server with .private() to inject faults"
    )]
    External {
        /// What was asked (`kill`, `pause`, …).
        action: &'static str,
        /// The server's address.
        url: String,
    },
    /// The server process is not running (it was killed and not restarted).
    #[error("cannot {action}: the server is not running; call restart() first")]
    NotRunning {
        /// What was asked.
        action: &'static str,
    },
    /// An operating-system call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Finds `binary` on PATH, then in `extra` directories.
pub(crate) fn find_binary(binary: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (and, with `bus`, so was `port + 10000`,
/// which Redis Cluster uses for its bus). Callers retry if it is taken before they bind it.
pub(crate) fn free_port(bus: bool) -> Result<u16> {
    for _ in 0..100 {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io_error("binding a probe port"))?;
        let port = listener
            .local_addr()
            .map_err(io_error("reading a probe port"))?
            .port();
        if !bus {
            return Ok(port);
        }
        if let Some(bus_port) = port.checked_add(10_000)
            && std::net::TcpListener::bind(("127.0.0.1", bus_port)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(Error::Io {
        context: "finding a free port".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no free port found in 100 tries",
        ),
    })
}

/// Runs a setup command to completion; a failure carries what it printed.
pub(crate) fn run(command: &mut Command, what: &str) -> Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io_error(format!("running {what}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Setup {
            what: format!("{what} ({})", output.status),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `ready` every few milliseconds until it says yes, the process dies, or `limit` passes.
pub(crate) fn wait_until(
    limit: Duration,
    mut alive: impl FnMut() -> bool,
    mut ready: impl FnMut() -> bool,
) -> Result<(), Duration> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    while start.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        if !alive() {
            return Err(start.elapsed());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Err(start.elapsed())
}
