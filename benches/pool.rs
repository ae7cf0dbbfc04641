//! Pool benches: brisk's `Instrumented` beside the pools it wraps, in the same run (DESIGN §5).
//!
//! - `pool/checkout`: get + drop of a no-op connection, with one task, and with 64 tasks over 16
//!   connections (each task doing `CHECKOUTS / 64` checkouts): `brisk` (Instrumented over
//!   deadpool, one global Prometheus-free recorder: no recorder, as a library sees by default),
//!   `deadpool` and `bb8` bare, and `deadpool_timeout`: deadpool with its own wait timeout set
//!   to brisk's bound, so that both arm a timer when a checkout has to wait — the fair peer for
//!   a wrapper that bounds every wait.

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};

#[path = "support/noop.rs"]
mod noop;
#[path = "support/spread.rs"]
mod spread;

use noop::Noop;
use spread::spread;

const CONNECTIONS: usize = 16;
const TASKS: u64 = 64;
/// The wait bound of `brisk` and `deadpool_timeout` alike (`Instrumented`'s default).
const WAIT: Duration = Duration::from_secs(5);

fn deadpool_pool(wait: Option<Duration>) -> deadpool::managed::Pool<Noop> {
    deadpool::managed::Pool::builder(Noop)
        .max_size(CONNECTIONS)
        .wait_timeout(wait)
        .runtime(deadpool::Runtime::Tokio1)
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

/// Measures `checkout(pool)` spread over `tasks` tasks, as the contender `name`.
fn contender<T, F, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    (name, label, tasks): (&str, &str, u64),
    pool: &T,
    checkout: F,
) where
    T: Clone + Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    group.bench_function(BenchmarkId::new(name, label), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (pool, checkout) = (pool.clone(), checkout.clone());
            spread(iters, tasks, move || checkout(pool.clone()))
        });
    });
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
        let brisk = brisk_pool::Instrumented::builder(deadpool_pool(None))
            .name("bench")
            .wait_timeout(WAIT)
            .build()
            .expect("valid");
        contender(
            &mut group,
            &rt,
            ("brisk", label, tasks),
            &brisk,
            |pool| async move {
                drop(pool.get().await.expect("checkout"));
            },
        );
        for (name, wait) in [("deadpool", None), ("deadpool_timeout", Some(WAIT))] {
            contender(
                &mut group,
                &rt,
                (name, label, tasks),
                &deadpool_pool(wait),
                |pool| async move {
                    drop(pool.get().await.expect("checkout"));
                },
            );
        }
        let bb8 = rt.block_on(bb8_pool());
        contender(
            &mut group,
            &rt,
            ("bb8", label, tasks),
            &bb8,
            |pool| async move {
                drop(pool.get_owned().await.expect("checkout"));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, checkout);
criterion_main!(benches);
