//! Batching benches: brisk's `Loader` beside the `dataloader` crate and async-graphql's
//! `DataLoader`, in the same run (DESIGN §5).
//!
//! - `batch/load_storm`: 10,000 concurrent loads — one spawned task each, for every contender —
//!   over 1,000 distinct keys (a seeded shuffle of each key ten times), on a two-worker runtime;
//!   the batch function answers from memory. Each iteration builds a fresh loader, so no
//!   contender answers from a previous iteration's cache. Default settings for every contender
//!   (`async_graphql_delay0`: async-graphql with its 1 ms delay set to zero). `bare` spawns the
//!   same tasks answering without a loader: the floor every contender stands on.
//! - `batch/join_storm`: the same 10,000 loads joined inside one task (`join_all`), as a
//!   GraphQL executor resolves a list: no task per load, so what is measured is the loader's
//!   own cost. The task is spawned on the two-worker runtime, as a server runs a request.
//!   `bare` joins the same 10,000 futures answering without a loader; `bare_wait_once` makes
//!   each of them wait once (a yield) before answering: the floor of any loader, whose every
//!   load waits for its batch once and is woken.
//! - `batch/single_load_latency`: one load, from call to result, with an instant batch
//!   function, on a current-thread runtime. `dataloader` is its non-cached loader.
//! - `batch/layer`: 1,000 concurrent requests to a bulk service whose every call costs a fixed
//!   50 µs of CPU whatever its size: through `BatchLayer` (`brisk`), and called once per
//!   request (`unbatched`).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const LOADS: usize = 10_000;
const KEYS: u64 = 1_000;

/// The keys of one storm: every key ten times, in a seeded random order.
fn storm_keys() -> Arc<Vec<u64>> {
    let mut keys: Vec<u64> = (0..LOADS as u64).map(|i| i % KEYS).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    for i in (1..keys.len()).rev() {
        // xorshift64: seeded, reproducible, no dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = usize::try_from(state % (i as u64 + 1)).expect("below the vector's length");
        keys.swap(i, j);
    }
    Arc::new(keys)
}

fn value(key: u64) -> u64 {
    key.wrapping_mul(31)
}

struct BriskFn;

impl brisk_batch::BatchFn<u64, u64> for BriskFn {
    type Error = std::convert::Infallible;
    async fn load(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        Ok(keys.iter().map(|k| (*k, value(*k))).collect())
    }
}

struct DataloaderFn;

impl dataloader::BatchFn<u64, u64> for DataloaderFn {
    async fn load(&mut self, keys: &[u64]) -> HashMap<u64, u64> {
        keys.iter().map(|k| (*k, value(*k))).collect()
    }
}

struct GraphqlFn;

impl async_graphql::dataloader::Loader<u64> for GraphqlFn {
    type Value = u64;
    type Error = Arc<std::io::Error>;
    async fn load(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        Ok(keys.iter().map(|k| (*k, value(*k))).collect())
    }
}

fn graphql_loader(delay: Option<Duration>) -> async_graphql::dataloader::DataLoader<GraphqlFn> {
    let loader = async_graphql::dataloader::DataLoader::new(GraphqlFn, tokio::spawn);
    match delay {
        Some(delay) => loader.delay(delay),
        None => loader,
    }
}

/// Runs one storm: spawns a task per key, each loading through `load`, and waits for all.
async fn storm<L, F, Fut>(keys: &Arc<Vec<u64>>, loader: Arc<L>, load: F)
where
    L: Send + Sync + 'static,
    F: Fn(Arc<L>, u64) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = u64> + Send + 'static,
{
    let tasks: Vec<_> = keys
        .iter()
        .map(|&key| tokio::spawn(load(loader.clone(), key)))
        .collect();
    for (task, &key) in tasks.into_iter().zip(keys.iter()) {
        assert_eq!(task.await.expect("load task"), value(key));
    }
}

fn load_storm(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    let keys = storm_keys();
    let mut group = c.benchmark_group("batch/load_storm");
    group.throughput(Throughput::Elements(LOADS as u64));
    group.sample_size(30);

    // The floor: the same spawned tasks answering without any loader.
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| async {
            storm(&keys, Arc::new(()), |_, k| async move { value(k) }).await;
        });
    });
    group.bench_function("brisk", |b| {
        b.to_async(&rt).iter(|| async {
            let loader = Arc::new(brisk_batch::Loader::new(BriskFn));
            storm(&keys, loader, |l, k| async move {
                l.load(k).await.unwrap().unwrap()
            })
            .await;
        });
    });
    group.bench_function("dataloader", |b| {
        b.to_async(&rt).iter(|| async {
            let loader = Arc::new(dataloader::cached::Loader::new(DataloaderFn));
            storm(&keys, loader, |l, k| async move { l.load(k).await }).await;
        });
    });
    for (id, delay) in [
        ("async_graphql", None),
        ("async_graphql_delay0", Some(Duration::ZERO)),
    ] {
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.to_async(&rt).iter(|| async {
                let loader = Arc::new(graphql_loader(delay));
                storm(&keys, loader, |l, k| async move {
                    l.load_one(k).await.unwrap().unwrap()
                })
                .await;
            });
        });
    }
    group.finish();
}

/// Joins one load per key (`$load` with `$l` the loader and `$k` the key) inside one task spawned on `$rt`, with a
/// loader made by `$make` inside that task, and checks every answer. A macro, as the load
/// futures borrow the loader.
macro_rules! join_in_one_task {
    ($rt:expr, $keys:expr, $make:expr, |$l:ident, $k:ident| $load:expr) => {{
        let keys = Arc::clone($keys);
        let task = $rt.spawn(async move {
            let loader = $make;
            let $l = &loader;
            let answers = futures_util::future::join_all(keys.iter().map(|&$k| $load)).await;
            for (answer, &key) in answers.into_iter().zip(keys.iter()) {
                assert_eq!(answer, value(key));
            }
        });
        $rt.block_on(task).expect("join task");
    }};
}

fn join_storm(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    let keys = storm_keys();
    let mut group = c.benchmark_group("batch/join_storm");
    group.throughput(Throughput::Elements(LOADS as u64));
    group.sample_size(30);
    group.bench_function("bare", |b| {
        b.iter(|| join_in_one_task!(rt, &keys, (), |_l, k| async move { value(k) }));
    });
    // The floor of any loader here: every load must wait once and be woken, and `join_all`
    // charges for that whoever wakes it.
    group.bench_function("bare_wait_once", |b| {
        b.iter(|| {
            join_in_one_task!(rt, &keys, (), |_l, k| async move {
                tokio::task::yield_now().await;
                value(k)
            });
        });
    });
    group.bench_function("brisk", |b| {
        b.iter(|| {
            join_in_one_task!(
                rt,
                &keys,
                brisk_batch::Loader::new(BriskFn),
                |l, k| async move { l.load(k).await.unwrap().unwrap() }
            );
        });
    });
    group.bench_function("dataloader", |b| {
        b.iter(|| {
            join_in_one_task!(
                rt,
                &keys,
                dataloader::cached::Loader::new(DataloaderFn),
                |l, k| l.load(k)
            );
        });
    });
    for (id, delay) in [
        ("async_graphql", None),
        ("async_graphql_delay0", Some(Duration::ZERO)),
    ] {
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| {
                join_in_one_task!(rt, &keys, graphql_loader(delay), |l, k| async move {
                    l.load_one(k).await.unwrap().unwrap()
                });
            });
        });
    }
    group.finish();
}

fn single_load_latency(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("batch/single_load_latency");
    group.throughput(Throughput::Elements(1));

    let brisk = brisk_batch::Loader::new(BriskFn);
    group.bench_function("brisk", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(brisk.load(black_box(7)).await.unwrap()) });
    });
    let dataloader = dataloader::non_cached::Loader::new(DataloaderFn);
    group.bench_function("dataloader", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(dataloader.load(black_box(7)).await) });
    });
    let graphql0 = graphql_loader(Some(Duration::ZERO));
    group.bench_function("async_graphql_delay0", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(graphql0.load_one(black_box(7)).await.unwrap()) });
    });
    // The default 1 ms delay makes every sample long: fewer of them.
    let graphql = graphql_loader(None);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    group.bench_function("async_graphql", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(graphql.load_one(black_box(7)).await.unwrap());
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

/// A bulk service whose every call costs 50 µs, whatever the batch size.
fn fixed_cost_service()
-> impl tower::Service<Vec<u64>, Response = Vec<u64>, Error = std::convert::Infallible, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(|batch: Vec<u64>| async move {
        let end = Instant::now() + Duration::from_micros(50);
        while Instant::now() < end {
            std::hint::spin_loop();
        }
        Ok(batch.iter().map(|x| value(*x)).collect())
    })
}

fn layer(c: &mut Criterion) {
    use tower::{Layer, ServiceExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("batch/layer");
    group.throughput(Throughput::Elements(1_000));
    group.sample_size(20);

    let batched = brisk_batch::layer::BatchLayer::new().layer(fixed_cost_service());
    group.bench_function("brisk", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..1_000).map(|x| batched.clone().oneshot(x));
            let responses = futures_util::future::join_all(calls).await;
            assert!(responses.iter().all(Result::is_ok));
        });
    });
    let unbatched = fixed_cost_service();
    group.bench_function("unbatched", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..1_000).map(|x| unbatched.clone().oneshot(vec![x]));
            let responses = futures_util::future::join_all(calls).await;
            assert!(responses.iter().all(Result::is_ok));
        });
    });
    group.finish();
}

criterion_group!(benches, load_storm, join_storm, single_load_latency, layer);
criterion_main!(benches);
