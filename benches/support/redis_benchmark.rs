//! The Redis benches' server, runtime and physical limit: a private redis-server, the runtime
//! the groups run on, and `redis-benchmark` against that server, printed beside a group.

use std::process::Command;

use brisk_testkit::RedisServer;

/// A private redis-server and the two-worker runtime the Redis groups run on.
pub(crate) fn server_and_runtime() -> (RedisServer, tokio::runtime::Runtime) {
    let server = RedisServer::builder()
        .private()
        .start()
        .expect("redis-server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    (server, rt)
}

/// What `redis-benchmark -t get` printed against the server on `port` with `args`, or why it
/// did not run.
pub(crate) fn get(port: u16, args: &[&str]) -> Result<String, String> {
    run(port, &[&["-t", "get"], args].concat())
}

/// What `redis-benchmark` printed against the server on `port` with `args` (a test or a
/// command of its own after the options), or why it did not run.
pub(crate) fn run(port: u16, args: &[&str]) -> Result<String, String> {
    Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .map_err(|err| format!("redis-benchmark not run: {err}"))
}
