//! `redis/get`: GET of a 100-byte value on a private redis-server, at concurrency 1 and 256:
//! brisk's default source (`brisk`, one multiplexed connection) and with 2 and 4 connections
//! (`brisk_x2`, `brisk_x4`), one raw redis-rs multiplexed connection (`redis`), a deadpool-redis
//! pool (`deadpool`) and a bb8-redis pool (`bb8`), both with their default sizes. After the
//! group, `redis-benchmark` GET on the same server, with and without `-P 16`: the physical limit.
//!
//! Run: `cargo bench --bench redis`.
#![allow(clippy::print_stdout)] // the physical-limit report

use std::sync::Arc;

use brisk_pool::redis_source::{Multiplexed, RedisSource};
use criterion::{BenchmarkId, Criterion, Throughput};

#[path = "support/redis_benchmark.rs"]
mod redis_benchmark;
#[path = "support/spread.rs"]
mod spread;

use spread::spread;

const KEY: &str = "bench:value";

async fn get_via<S: RedisSource>(source: &S) {
    let mut conn = source.connection().await.expect("connection");
    get_on(&mut conn).await;
}

/// One GET of the 100-byte value on any connection.
async fn get_on<C: redis::aio::ConnectionLike + Send>(conn: &mut C) {
    let value: Vec<u8> = redis::cmd("GET")
        .arg(KEY)
        .query_async(conn)
        .await
        .expect("GET");
    assert_eq!(value.len(), 100);
}

fn get(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let brisk = |n| {
        rt.block_on(Multiplexed::builder(url).connections(n).connect())
            .map(Arc::new)
            .expect("connect")
    };
    let sources = [
        ("brisk", brisk(1)),
        ("brisk_x2", brisk(2)),
        ("brisk_x4", brisk(4)),
    ];
    let client = redis::Client::open(url).expect("url");
    let raw = rt
        .block_on(client.get_multiplexed_async_connection())
        .expect("connect");
    let deadpool = Arc::new(
        brisk_pool::Instrumented::builder(
            deadpool_redis::Config::from_url(url)
                .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                .expect("pool"),
        )
        .build()
        .expect("valid"),
    );
    let bb8 = rt.block_on(async {
        let manager = bb8_redis::RedisConnectionManager::new(url).expect("url");
        bb8::Pool::builder().build(manager).await.expect("pool")
    });

    let mut group = c.benchmark_group("redis/get");
    group.throughput(Throughput::Elements(1));
    for concurrency in [1_u64, 256] {
        for (name, source) in &sources {
            let source = source.clone();
            group.bench_function(BenchmarkId::new(*name, concurrency), |b| {
                b.to_async(rt).iter_custom(|iters| {
                    let source = source.clone();
                    spread(iters, concurrency, move || {
                        let source = source.clone();
                        async move { get_via(&*source).await }
                    })
                });
            });
        }
        group.bench_function(BenchmarkId::new("redis", concurrency), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let conn = raw.clone();
                spread(iters, concurrency, move || {
                    let mut conn = conn.clone();
                    async move {
                        get_on(&mut conn).await;
                    }
                })
            });
        });
        group.bench_function(BenchmarkId::new("deadpool", concurrency), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let pool = deadpool.clone();
                spread(iters, concurrency, move || {
                    let pool = pool.clone();
                    async move {
                        let mut conn = pool.get_ref().get().await.expect("checkout");
                        get_on(&mut conn).await;
                    }
                })
            });
        });
        group.bench_function(BenchmarkId::new("bb8", concurrency), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let pool = bb8.clone();
                spread(iters, concurrency, move || {
                    let pool = pool.clone();
                    async move {
                        let mut conn = pool.get().await.expect("checkout");
                        get_on(&mut *conn).await;
                    }
                })
            });
        });
    }
    group.finish();
}

/// redis-benchmark's GET figures on the same server.
fn physical_limit(port: u16) {
    for (clients, pipeline) in [("1", "1"), ("256", "1"), ("256", "16")] {
        let args = [
            "-d", "100", "-n", "200000", "-c", clients, "-P", pipeline, "-q",
        ];
        match redis_benchmark::get(port, &args) {
            Ok(text) => {
                let last = text
                    .split('\r')
                    .rfind(|line| !line.trim().is_empty())
                    .unwrap_or("");
                println!(
                    "redis-benchmark -c {clients} -P {pipeline}: {}",
                    last.trim()
                );
            }
            Err(why) => println!("{why}"),
        }
    }
}

fn main() {
    let (server, rt) = redis_benchmark::server_and_runtime();
    let url = server.url();
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let _: () = redis::cmd("SET")
            .arg(KEY)
            .arg(vec![b'x'; 100])
            .query_async(&mut conn)
            .await
            .expect("SET");
    });
    let mut criterion = Criterion::default().configure_from_args();
    get(&mut criterion, &rt, &url);
    criterion.final_summary();
    physical_limit(server.port().expect("TCP"));
}
