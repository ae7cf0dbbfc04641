//! Pool benches: brisk's `Instrumented` beside the pools it wraps, in the same run (DESIGN §5).
//!
//! - `pool/checkout`: get + drop of a no-op connection, with one task, and with 64 tasks over 16
//!   connections (each task doing `CHECKOUTS / 64` checkouts): `brisk` (Instrumented over
//!   deadpool, one global Prometheus-free recorder: no recorder, as a library sees by default),
//!   `deadpool` and `bb8` bare.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

#[path = "support/noop.rs"]
mod noop;
#[path = "support/spread.rs"]
mod spread;

use noop::Noop;
use spread::spread;

const CONNECTIONS: usize = 16;
const TASKS: u64 = 64;

fn deadpool_pool() -> deadpool::managed::Pool<Noop> {
    deadpool::managed::Pool::builder(Noop)
        .max_size(CONNECTIONS)
        .build()
        .expect("pool")
}

async fn bb8_pool() -> bb8::Pool<Noop> {
    bb8::Pool::builder()
        .max_size(u32::try_from(CONNECTIONS).expect("small"))
        .build(Noop)
        .await
        .expect("pool")
}

fn checkout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("pool/checkout");
    group.throughput(Throughput::Elements(1));
    for (label, tasks) in [("1_task", 1), ("64_tasks_16_connections", TASKS)] {
        let brisk = brisk_pool::Instrumented::builder(deadpool_pool())
            .name("bench")
            .build()
            .expect("valid");
        group.bench_function(BenchmarkId::new("brisk", label), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let pool = brisk.clone();
                spread(iters, tasks, move || {
                    let pool = pool.clone();
                    async move { drop(pool.get().await.expect("checkout")) }
                })
            });
        });
        let deadpool = deadpool_pool();
        group.bench_function(BenchmarkId::new("deadpool", label), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let pool = deadpool.clone();
                spread(iters, tasks, move || {
                    let pool = pool.clone();
                    async move { drop(pool.get().await.expect("checkout")) }
                })
            });
        });
        let bb8 = rt.block_on(bb8_pool());
        group.bench_function(BenchmarkId::new("bb8", label), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let pool = bb8.clone();
                spread(iters, tasks, move || {
                    let pool = pool.clone();
                    async move { drop(pool.get_owned().await.expect("checkout")) }
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, checkout);
criterion_main!(benches);
