//! A private redis-server: starts, answers, and takes faults.

mod common;

use std::time::Duration;

use brisk_testkit::{Error, RedisServer};
use redis::Commands;

fn client(server: &RedisServer) -> redis::Connection {
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    conn
}

#[test]
fn starts_answers_and_stops_on_drop() {
    let server = RedisServer::builder().private().start().unwrap();
    assert!(server.is_private());
    assert!(
        server.url().starts_with("redis://127.0.0.1:"),
        "{}",
        server.url()
    );
    let mut conn = client(&server);
    let _: () = conn.set("k", "v").unwrap();
    assert_eq!(conn.get::<_, String>("k").unwrap(), "v");
    let pid = server.pid().unwrap();
    drop(server);
    assert!(
        common::exited(pid),
        "redis-server {pid} still running after drop"
    );
}

#[test]
fn runs_without_persistence() {
    let server = RedisServer::builder().private().start().unwrap();
    let mut conn = client(&server);
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query(&mut conn)
        .unwrap();
    assert_eq!(save, ["save", ""]);
    let aof: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query(&mut conn)
        .unwrap();
    assert_eq!(aof, ["appendonly", "no"]);
}

#[test]
fn listens_on_a_unix_socket() {
    let server = RedisServer::builder().unix_socket().start().unwrap();
    assert!(
        server.url().starts_with("redis+unix:///"),
        "{}",
        server.url()
    );
    assert_eq!(server.port(), None);
    let mut conn = client(&server);
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut conn).unwrap(),
        "PONG"
    );
}

#[test]
fn extra_arguments_reach_the_server() {
    let server = RedisServer::builder()
        .arg("--maxmemory")
        .arg("1mb")
        .start()
        .unwrap();
    let mut conn = client(&server);
    let max: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query(&mut conn)
        .unwrap();
    assert_eq!(max, ["maxmemory", "1048576"]);
}

#[test]
fn a_paused_server_times_commands_out_and_answers_after_resume() {
    let mut server = RedisServer::builder().private().start().unwrap();
    let mut conn = client(&server);
    let _: () = conn.set("k", "before").unwrap();

    server.pause().unwrap();
    let err = conn.get::<_, String>("k").unwrap_err();
    assert!(err.is_timeout(), "expected a timeout, got {err:?}");

    server.resume().unwrap();
    let mut fresh = client(&server);
    assert_eq!(fresh.get::<_, String>("k").unwrap(), "before");
}

#[test]
fn kill_then_restart_keeps_the_address() {
    let mut server = RedisServer::builder().private().start().unwrap();
    let url = server.url();
    let old_pid = server.pid().unwrap();

    server.kill().unwrap();
    assert!(common::exited(old_pid));
    assert_eq!(server.pid(), None);
    assert!(
        redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .is_err()
    );
    assert!(matches!(
        server.kill(),
        Err(Error::NotRunning { action: "kill" })
    ));

    server.restart().unwrap();
    assert_eq!(server.url(), url);
    let mut conn = client(&server);
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut conn).unwrap(),
        "PONG"
    );

    // Restarting a running server replaces it.
    let pid = server.pid().unwrap();
    server.restart().unwrap();
    assert_ne!(server.pid(), Some(pid));
    assert!(common::exited(pid));
}

#[test]
fn an_external_server_refuses_fault_injection() {
    let mut server = RedisServer::external("redis://:secret@10.9.9.9:6379");
    assert!(!server.is_private());
    assert_eq!(server.pid(), None);
    let err = server.kill().unwrap_err();
    assert!(
        matches!(err, Error::External { action: "kill", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(".private()"), "{err}");
    assert!(matches!(
        server.pause(),
        Err(Error::External {
            action: "pause",
            ..
        })
    ));
    assert!(matches!(
        server.resume(),
        Err(Error::External {
            action: "resume",
            ..
        })
    ));
    assert!(matches!(
        server.restart(),
        Err(Error::External {
            action: "restart",
            ..
        })
    ));
}

#[test]
fn missing_binary_error_names_the_package() {
    let err = Error::MissingBinary {
        binary: "redis-server",
        package: "redis-server",
        searched: "",
    };
    assert_eq!(
        err.to_string(),
        "`redis-server` was not found on PATH; install it with `apt-get install redis-server` \
         (or run scripts/test as root, which does)"
    );
}
