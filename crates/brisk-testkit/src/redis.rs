//! A private `redis-server`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::handle::{Handle, Owned};
use crate::process::Process;
use crate::resp::{self, Listen};
use crate::tls::Certificates;
use crate::{Error, Result, free_port, io_error, log_tail, wait_until};

const READY_WITHIN: Duration = Duration::from_secs(10);
const START_TRIES: usize = 5;

/// A Redis server for one test: private (started here, stopped on drop) or external
/// (`REDIS_URL`). See the [crate docs](crate).
#[derive(Debug)]
pub struct RedisServer {
    inner: Handle<Private>,
}

#[derive(Debug)]
struct Private {
    binary: PathBuf,
    listen: Listen,
    tls: Option<Tls>,
    args: Vec<String>,
    process: Process,
    // Dropped last: the process is stopped before its directory goes.
    dir: TempDir,
}

/// A TLS listener beside the plain one (which the kit's own probes use).
#[derive(Debug)]
struct Tls {
    port: u16,
    certificates: Certificates,
}

impl Tls {
    fn args(&self) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        vec![
            "--tls-port".into(),
            self.port.to_string(),
            "--tls-cert-file".into(),
            path(&self.certificates.cert),
            "--tls-key-file".into(),
            path(&self.certificates.key),
            "--tls-ca-cert-file".into(),
            path(&self.certificates.ca),
            // Clients prove nothing: the tests check server authentication and encryption.
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }
}

/// Options for [`RedisServer`]. Every setter consumes and returns the builder.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RedisServerBuilder {
    private: bool,
    unix_socket: bool,
    port: Option<u16>,
    tls: bool,
    args: Vec<String>,
}

impl RedisServerBuilder {
    /// Always start a private server, even when `REDIS_URL` is set (needed for fault injection).
    pub fn private(mut self) -> Self {
        self.private = true;
        self
    }

    /// Listen on a unix socket in the server's temp dir instead of a TCP port. Implies private.
    pub fn unix_socket(mut self) -> Self {
        self.unix_socket = true;
        self.private = true;
        self
    }

    /// Listen on this TCP port instead of a free one. Implies private.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self.private = true;
        self
    }

    /// Also listen for TLS on a second free port, with a certificate for `127.0.0.1` and
    /// `localhost` signed by a throwaway CA ([`RedisServer::ca_certificate`]); [`RedisServer::url`]
    /// then gives the `rediss://` address. Needs the `openssl` command. Implies private.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self.private = true;
        self
    }

    /// An extra `redis-server` argument, such as `--maxmemory` then `1mb`. Implies private.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self.private = true;
        self
    }

    /// Starts the server and waits until it answers PING.
    ///
    /// # Errors
    /// [`Error::MissingBinary`] without `redis-server`; [`Error::NotReady`] (with the server's
    /// log) if it does not answer within 10 s.
    pub fn start(self) -> Result<RedisServer> {
        if !self.private
            && let Ok(url) = std::env::var("REDIS_URL")
        {
            return Ok(RedisServer {
                inner: Handle::External(url),
            });
        }
        let binary = crate::find_binary("redis-server", &[]).ok_or(Error::MissingBinary {
            binary: "redis-server",
            package: "redis-server",
            searched: "",
        })?;
        let dir = tempfile::Builder::new()
            .prefix("brisk-redis-")
            .tempdir()
            .map_err(io_error("creating a temp dir for redis-server"))?;
        let certificates = if self.tls {
            Some(Certificates::generate(dir.path())?)
        } else {
            None
        };
        let mut last = None;
        // A free port can be taken between choosing and binding it; choose again.
        for _ in 0..START_TRIES {
            let listen = if self.unix_socket {
                Listen::Unix(dir.path().join("redis.sock"))
            } else {
                Listen::Tcp(self.port.map_or_else(|| free_port(false), Ok)?)
            };
            let tls = match &certificates {
                Some(certificates) => Some(Tls {
                    port: free_port(false)?,
                    certificates: certificates.clone(),
                }),
                None => None,
            };
            let mut args = tls.as_ref().map(Tls::args).unwrap_or_default();
            args.extend(self.args.iter().cloned());
            match spawn(&binary, dir.path(), &listen, &args) {
                Ok(process) => {
                    return Ok(RedisServer {
                        inner: Handle::Private(Private {
                            binary,
                            listen,
                            tls,
                            args,
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

fn spawn(binary: &Path, dir: &Path, listen: &Listen, args: &[String]) -> Result<Process> {
    let log = dir.join("redis.log");
    let mut command = Command::new(binary);
    command
        .arg("--bind")
        .arg("127.0.0.1")
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log);
    match listen {
        Listen::Tcp(port) => command.arg("--port").arg(port.to_string()),
        Listen::Unix(path) => command
            .args(["--port", "0", "--unixsocketperm", "700", "--unixsocket"])
            .arg(path),
    };
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut process = Process::spawn("redis-server", &mut command)?;
    let probe = Duration::from_millis(250);
    let outcome = wait_until(
        READY_WITHIN,
        || process.alive(),
        || resp::ping(listen, probe),
    );
    match outcome {
        Ok(()) => Ok(process),
        Err(waited) => {
            let _ = process.kill();
            Err(Error::NotReady {
                what: format!("redis-server on {}", describe(listen)),
                waited,
                log: log_tail(&log, 20),
            })
        }
    }
}

fn describe(listen: &Listen) -> String {
    match listen {
        Listen::Tcp(port) => format!("redis://127.0.0.1:{port}"),
        Listen::Unix(path) => format!("redis+unix://{}", path.display()),
    }
}

impl RedisServer {
    /// A server from `REDIS_URL`, or a private one on a free TCP port.
    ///
    /// # Errors
    /// As [`RedisServerBuilder::start`].
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// A handle on a server someone else runs: nothing is started or stopped, and fault
    /// injection is refused with [`Error::External`]. `start()` uses this for `REDIS_URL`.
    #[must_use]
    pub fn external(url: impl Into<String>) -> Self {
        Self {
            inner: Handle::External(url.into()),
        }
    }

    /// Options: private, unix socket, extra arguments.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// The URL to connect to: `redis://127.0.0.1:PORT`, `redis+unix:///…/redis.sock`,
    /// `rediss://127.0.0.1:PORT` for a [TLS](RedisServerBuilder::tls) server, or `REDIS_URL` as
    /// given.
    #[must_use]
    pub fn url(&self) -> String {
        self.inner.url(|private| match &private.tls {
            Some(tls) => format!("rediss://127.0.0.1:{}", tls.port),
            None => describe(&private.listen),
        })
    }

    /// The CA certificate (PEM) that signed a [TLS](RedisServerBuilder::tls) server's
    /// certificate: what clients must trust to connect.
    #[must_use]
    pub fn ca_certificate(&self) -> Option<&Path> {
        match &self.inner {
            Handle::Private(Private { tls: Some(tls), .. }) => Some(&tls.certificates.ca),
            _ => None,
        }
    }

    /// The TCP port of a private server on TCP.
    #[must_use]
    pub fn port(&self) -> Option<u16> {
        match &self.inner {
            Handle::Private(Private {
                listen: Listen::Tcp(port),
                ..
            }) => Some(*port),
            _ => None,
        }
    }

    /// The process id of a running private server.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }

    /// True for a server this kit started.
    #[must_use]
    pub fn is_private(&self) -> bool {
        self.inner.is_private()
    }

    /// Stops the server at once (SIGKILL). Clients see their connections reset.
    ///
    /// # Errors
    /// [`Error::External`] for a server from `REDIS_URL`; [`Error::NotRunning`] if already killed.
    pub fn kill(&mut self) -> Result<()> {
        self.inner.kill()
    }

    /// Freezes the server (SIGSTOP): connections stay open and no command is answered.
    ///
    /// # Errors
    /// As [`RedisServer::kill`].
    pub fn pause(&mut self) -> Result<()> {
        self.inner.pause()
    }

    /// Thaws a paused server (SIGCONT); queued commands are answered.
    ///
    /// # Errors
    /// As [`RedisServer::kill`].
    pub fn resume(&mut self) -> Result<()> {
        self.inner.resume()
    }

    /// Starts the server again on the same address (killing it first if it runs), with an empty
    /// data set, and waits until it answers.
    ///
    /// # Errors
    /// [`Error::External`]; [`Error::NotReady`] if the address was taken meanwhile.
    pub fn restart(&mut self) -> Result<()> {
        let private = self.inner.private("restart")?;
        if private.process.pid().is_some() {
            private.process.kill()?;
        }
        private.process = spawn(
            &private.binary,
            private.dir.path(),
            &private.listen,
            &private.args,
        )?;
        Ok(())
    }

    /// Sends a command with the kit's own minimal client (for setup in tests that have no
    /// Redis client at hand); returns the reply as text.
    ///
    /// # Errors
    /// [`Error::Io`] if the server does not answer within a second or answers with an error.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        let listen = match &self.inner {
            Handle::Private(private) => private.listen.clone(),
            Handle::External(url) => {
                return Err(Error::External {
                    action: "send a raw command to",
                    url: url.clone(),
                });
            }
        };
        resp::command(&listen, args, Duration::from_secs(1)).map_err(io_error(format!(
            "{} on {}",
            args.join(" "),
            self.url()
        )))
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
