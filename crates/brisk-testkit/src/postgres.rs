//! A throwaway PostgreSQL cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::handle::{Handle, Owned};
use crate::process::Process;
use crate::{Error, Result, free_port, io_error, log_tail, wait_until};

const READY_WITHIN: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);
const START_TRIES: usize = 5;
/// The database every private cluster creates.
const DATABASE: &str = "brisk_test";

/// A PostgreSQL server for one test: private (`initdb` + `postgres` on a free port in a temp
/// dir, stopped and removed on drop) or external (`DATABASE_URL`). See the [crate docs](crate).
///
/// ```no_run
/// let pg = brisk_testkit::Postgres::start()?;
/// let url = pg.url(); // postgres://postgres@127.0.0.1:PORT/brisk_test
/// # let _ = url;
/// # Ok::<(), brisk_testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct Postgres {
    inner: Handle<Private>,
}

#[derive(Debug)]
struct Private {
    bin: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    process: Process,
    // Dropped last: the server is stopped before its directory goes.
    dir: TempDir,
}

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// Options for [`Postgres`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct PostgresBuilder {
    private: bool,
    settings: Vec<(String, String)>,
}

impl PostgresBuilder {
    /// Always start a private server, even when `DATABASE_URL` is set (needed for fault injection).
    pub fn private(mut self) -> Self {
        self.private = true;
        self
    }

    /// A server setting (`-c name=value`), such as `max_connections` = `20`. Implies private.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self.private = true;
        self
    }

    /// Creates the cluster, starts the server, creates the `brisk_test` database.
    ///
    /// # Errors
    /// [`Error::MissingBinary`] without the PostgreSQL server binaries; [`Error::Setup`] if
    /// `initdb` or `createdb` fails; [`Error::NotReady`] (with the server's log) after 30 s.
    pub fn start(self) -> Result<Postgres> {
        if !self.private
            && let Ok(url) = std::env::var("DATABASE_URL")
        {
            return Ok(Postgres {
                inner: Handle::External(url),
            });
        }
        let bin = bin_dir()?;
        let run_as = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("brisk-pg-")
            .tempdir()
            .map_err(io_error("creating a temp dir for PostgreSQL"))?;
        if let Some(user) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))
                .map_err(io_error("handing the PostgreSQL dir to the postgres user"))?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        run(&mut initdb, run_as, "initdb")?;
        let conf = self
            .settings
            .iter()
            .map(|(name, value)| format!("{name} = '{value}'\n"))
            .collect::<String>();
        std::fs::write(data.join("postgresql.auto.conf"), conf)
            .map_err(io_error("writing postgresql.auto.conf"))?;

        let mut last = None;
        for _ in 0..START_TRIES {
            let port = free_port(false)?;
            match spawn(&bin, dir.path(), port, run_as) {
                Ok(process) => {
                    let mut createdb = Command::new(bin.join("createdb"));
                    createdb
                        .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
                        .arg(port.to_string())
                        .arg(DATABASE);
                    run(&mut createdb, None, "createdb")?;
                    return Ok(Postgres {
                        inner: Handle::Private(Private {
                            bin,
                            port,
                            run_as,
                            process,
                            dir,
                        }),
                    });
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("START_TRIES is at least one"))
    }
}

/// The directory holding `initdb` and `postgres`: PATH first, then the newest
/// `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf> {
    let mut installed: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .collect();
    // Newest first: compare versions as numbers, so 16 comes before 9.6.
    installed.sort_by_key(|path| {
        let version = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str());
        std::cmp::Reverse(version.and_then(|v| v.split('.').next()?.parse::<u32>().ok()))
    });
    let initdb = crate::find_binary("initdb", &installed).ok_or(Error::MissingBinary {
        binary: "initdb",
        package: "postgresql",
        searched: " or under /usr/lib/postgresql/*/bin",
    })?;
    // A PATH entry is often a symlink into the real bin dir, where `postgres` lives beside it.
    let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    let bin = real.parent().map(Path::to_path_buf).unwrap_or_default();
    for binary in ["postgres", "createdb"] {
        if !bin.join(binary).exists() {
            return Err(Error::MissingBinary {
                binary,
                package: "postgresql",
                searched: " beside initdb",
            });
        }
    }
    Ok(bin)
}

/// `Some(postgres user)` when we are root, since PostgreSQL refuses to run as root.
fn run_as() -> Result<Option<RunAs>> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or(Error::MissingBinary {
            binary: "postgres (the system user, needed to run PostgreSQL as root)",
            package: "postgresql",
            searched: "",
        })?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

fn as_user(command: &mut Command, run_as: Option<RunAs>) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if let Some(user) = run_as {
        // std drops supplementary groups when switching away from root.
        command.uid(user.uid).gid(user.gid).env("HOME", "/tmp");
    }
    command
}

fn run(command: &mut Command, run_as: Option<RunAs>, what: &str) -> Result<Output> {
    crate::run(as_user(command, run_as), what)
}

fn spawn(bin: &Path, dir: &Path, port: u16, run_as: Option<RunAs>) -> Result<Process> {
    let data = dir.join("data");
    let log_path = dir.join("postgres.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_error("opening the PostgreSQL log"))?;
    let log_err = log
        .try_clone()
        .map_err(io_error("opening the PostgreSQL log"))?;
    let mut command = Command::new(bin.join("postgres"));
    command
        .arg("-D")
        .arg(&data)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1"])
        // A test database need not survive a power cut, only a killed process (which keeps
        // the kernel's page cache, so commits still survive `kill()`).
        .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
        .stdout(log)
        .stderr(log_err);
    let mut process = Process::spawn("postgres", as_user(&mut command, run_as))?;
    let pid_file = data.join("postmaster.pid");
    let ready = || ready(&pid_file) && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    match wait_until(READY_WITHIN, || process.alive(), ready) {
        Ok(()) => Ok(process),
        Err(waited) => {
            let _ = process.kill();
            Err(Error::NotReady {
                what: format!("PostgreSQL on 127.0.0.1:{port}"),
                waited,
                log: log_tail(&log_path, 20),
            })
        }
    }
}

/// PostgreSQL 10+ writes its state as the eighth line of `postmaster.pid`.
fn ready(pid_file: &Path) -> bool {
    std::fs::read_to_string(pid_file).is_ok_and(|text| {
        text.lines()
            .nth(7)
            .is_some_and(|state| state.trim() == "ready")
    })
}

impl Postgres {
    /// A server from `DATABASE_URL`, or a private one.
    ///
    /// # Errors
    /// As [`PostgresBuilder::start`].
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// A handle on a server someone else runs: nothing is started or stopped, and fault
    /// injection is refused with [`Error::External`]. `start()` uses this for `DATABASE_URL`.
    #[must_use]
    pub fn external(url: impl Into<String>) -> Self {
        Self {
            inner: Handle::External(url.into()),
        }
    }

    /// Options: private, server settings.
    pub fn builder() -> PostgresBuilder {
        PostgresBuilder::default()
    }

    /// The URL to connect to: `postgres://postgres@127.0.0.1:PORT/brisk_test`, or
    /// `DATABASE_URL` as given.
    #[must_use]
    pub fn url(&self) -> String {
        self.inner
            .url(|private| format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", private.port))
    }

    /// The TCP port of a private server.
    #[must_use]
    pub fn port(&self) -> Option<u16> {
        match &self.inner {
            Handle::Private(private) => Some(private.port),
            Handle::External(_) => None,
        }
    }

    /// The process id of a running private server's postmaster.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }

    /// True for a server this kit started.
    #[must_use]
    pub fn is_private(&self) -> bool {
        self.inner.is_private()
    }

    /// Kills the postmaster and every backend at once (SIGKILL to the process group), as a
    /// crash would.
    ///
    /// # Errors
    /// [`Error::External`] for a server from `DATABASE_URL`; [`Error::NotRunning`] if already killed.
    pub fn kill(&mut self) -> Result<()> {
        self.inner.kill()
    }

    /// Freezes the postmaster and every backend (SIGSTOP): queries hang, connections stay open.
    ///
    /// # Errors
    /// As [`Postgres::kill`].
    pub fn pause(&mut self) -> Result<()> {
        self.inner.pause()
    }

    /// Thaws a paused server (SIGCONT).
    ///
    /// # Errors
    /// As [`Postgres::kill`].
    pub fn resume(&mut self) -> Result<()> {
        self.inner.resume()
    }

    /// Starts the server again on the same port and data (killing it first if it runs); it
    /// recovers from its WAL like after a crash. Existing connections are broken.
    ///
    /// # Errors
    /// [`Error::External`]; [`Error::NotReady`] if it does not come back within 30 s.
    pub fn restart(&mut self) -> Result<()> {
        let private = self.inner.private("restart")?;
        if private.process.pid().is_some() {
            private.process.kill()?;
        }
        private.process = spawn(
            &private.bin,
            private.dir.path(),
            private.port,
            private.run_as,
        )?;
        Ok(())
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        // Immediate shutdown (SIGQUIT) releases shared memory; SIGKILL follows if it lingers.
        self.process.stop(Signal::SIGQUIT, STOP_GRACE);
    }
}

impl Owned for Private {
    fn process(&self) -> &Process {
        &self.process
    }

    fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}
