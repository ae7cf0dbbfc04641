//! A throwaway PostgreSQL cluster.

mod common;

use std::time::Duration;

use brisk_testkit::{Error, Postgres};
use tokio_postgres::NoTls;

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn select_one(url: &str) -> i32 {
    let client = connect(url).await.unwrap();
    client.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn answers_select_1_and_leaves_nothing_running() {
    let pg = Postgres::builder().private().start().unwrap();
    assert!(pg.url().ends_with("/brisk_test"), "{}", pg.url());
    assert_eq!(select_one(&pg.url()).await, 1);

    let postmaster = pg.pid().unwrap();
    let mut pids = common::children(postmaster);
    assert!(
        !pids.is_empty(),
        "a running postmaster has background workers"
    );
    pids.push(postmaster);
    drop(pg);
    for pid in pids {
        assert!(
            common::exited(pid),
            "PostgreSQL process {pid} still running after drop"
        );
    }
}

#[tokio::test]
async fn settings_reach_the_server() {
    let pg = Postgres::builder()
        .setting("max_connections", "17")
        .start()
        .unwrap();
    let client = connect(&pg.url()).await.unwrap();
    let row = client.query_one("SHOW max_connections", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "17");
}

#[tokio::test]
async fn a_paused_server_hangs_queries_until_resumed() {
    let mut pg = Postgres::builder().private().start().unwrap();
    let client = connect(&pg.url()).await.unwrap();
    pg.pause().unwrap();
    let stuck = tokio::time::timeout(
        Duration::from_millis(300),
        client.query_one("SELECT 1", &[]),
    )
    .await;
    assert!(stuck.is_err(), "a paused server must not answer");
    pg.resume().unwrap();
    let row = tokio::time::timeout(Duration::from_secs(5), client.query_one("SELECT 2", &[]))
        .await
        .expect("answers after resume")
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}

#[tokio::test]
async fn kill_then_restart_keeps_the_address_and_the_data() {
    let mut pg = Postgres::builder().private().start().unwrap();
    let url = pg.url();
    let client = connect(&url).await.unwrap();
    client
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42);")
        .await
        .unwrap();

    pg.kill().unwrap();
    assert!(
        client.query_one("SELECT 1", &[]).await.is_err(),
        "the old connection is broken"
    );
    assert!(connect(&url).await.is_err(), "nothing listens while killed");
    assert!(matches!(
        pg.pause(),
        Err(Error::NotRunning { action: "pause" })
    ));

    pg.restart().unwrap();
    assert_eq!(pg.url(), url);
    let client = connect(&url).await.unwrap();
    let row = client.query_one("SELECT v FROM t", &[]).await.unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        42,
        "committed data survives the crash"
    );
}

#[test]
fn an_external_server_refuses_fault_injection() {
    let mut pg = Postgres::external("postgres://user:secret@10.9.9.9/db");
    assert!(!pg.is_private());
    assert!(matches!(
        pg.kill(),
        Err(Error::External { action: "kill", .. })
    ));
    assert!(matches!(
        pg.restart(),
        Err(Error::External {
            action: "restart",
            ..
        })
    ));
}
