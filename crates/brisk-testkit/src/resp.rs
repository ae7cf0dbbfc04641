//! Just enough of the Redis protocol to check readiness and set up a cluster, so the kit itself
//! needs no Redis client.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Where a Redis server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    Tcp(u16),
    Unix(std::path::PathBuf),
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn connect(listen: &Listen, timeout: Duration) -> io::Result<Box<dyn Stream>> {
    Ok(match listen {
        Listen::Tcp(port) => {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], *port));
            let stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            Box::new(stream)
        }
        Listen::Unix(path) => {
            let stream = UnixStream::connect(Path::new(path))?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            Box::new(stream)
        }
    })
}

/// Sends one command and returns its reply as text: simple strings, bulk strings and integers
/// come back as they are; an error reply is an `io::Error`.
pub(crate) fn command(listen: &Listen, args: &[&str], timeout: Duration) -> io::Result<String> {
    let mut stream = connect(listen, timeout)?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end();
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Err(io::Error::other(rest.to_owned())),
        "$" => {
            let len: i64 = rest.parse().map_err(io::Error::other)?;
            let Ok(len) = usize::try_from(len) else {
                return Ok(String::new()); // $-1: nil
            };
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            body.truncate(len);
            String::from_utf8(body).map_err(io::Error::other)
        }
        _ => Err(io::Error::other(format!("unexpected reply `{line}`"))),
    }
}

/// True if the server answers PING within `timeout`: with PONG, or, when it wants a password
/// (`--requirepass`), with NOAUTH — either way it is up.
pub(crate) fn ping(listen: &Listen, timeout: Duration) -> bool {
    match command(listen, &["PING"], timeout) {
        Ok(reply) => reply == "PONG",
        Err(err) => err.to_string().starts_with("NOAUTH"),
    }
}
