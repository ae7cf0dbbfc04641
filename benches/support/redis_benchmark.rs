//! `redis-benchmark` GET on a bench's own server: the physical limit printed beside a group.

use std::process::Command;

/// What `redis-benchmark -t get` printed against the server on `port` with `args`, or why it
/// did not run.
pub(crate) fn get(port: u16, args: &[&str]) -> Result<String, String> {
    Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "get"])
        .args(args)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .map_err(|err| format!("redis-benchmark not run: {err}"))
}
