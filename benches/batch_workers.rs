//! `batch/workers`: how large batches get when requests run on several single-threaded runtimes
//! (Actix's model: one current-thread runtime per worker thread), with one loader shared by all
//! workers or one loader per worker, beside one multi-thread runtime (Axum's model).
//!
//! Each worker serves `REQUESTS` requests, `CONCURRENT` at a time; a request loads three random
//! keys one after another, as a handler that awaits between lookups. The batch function answers
//! from memory and counts batches. Prints, per setup: batches, the share of single-key batches,
//! the mean batch size and the wall time. Not a criterion group: what it measures is batch
//! shape, which `docs/batching.md` quotes.
//!
//! Run: `cargo bench --bench batch_workers --features batch`
#![allow(clippy::print_stdout)] // a benchmark report

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use brisk::batch::{BatchFn, Loader};

const WORKERS: usize = 2;
const REQUESTS: u64 = 20_000;
const CONCURRENT: usize = 64;
const KEYS: u64 = 100_000;

#[derive(Default)]
struct Counts {
    batches: AtomicU64,
    singletons: AtomicU64,
    keys: AtomicU64,
}

#[derive(Clone)]
struct Counted(Arc<Counts>);

impl BatchFn<u64, u64> for Counted {
    type Error = std::convert::Infallible;
    async fn load(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        let counts = &self.0;
        counts.batches.fetch_add(1, Ordering::Relaxed);
        counts.keys.fetch_add(keys.len() as u64, Ordering::Relaxed);
        if keys.len() == 1 {
            counts.singletons.fetch_add(1, Ordering::Relaxed);
        }
        Ok(keys.iter().map(|k| (*k, k * 2)).collect())
    }
}

/// A seeded key for request `request`, lookup `step` of worker `worker`.
fn key(worker: usize, request: u64, step: u64) -> u64 {
    let mut x = ((worker as u64 + 1) * 0x9E37_79B9_7F4A_7C15) ^ (request * 3 + step);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x % KEYS
}

/// One worker's share of the requests, `CONCURRENT` at a time, on the current runtime.
async fn serve(worker: usize, loader: Loader<u64, u64, Counted>) {
    let mut next = 0;
    let mut running = tokio::task::JoinSet::new();
    while next < REQUESTS || !running.is_empty() {
        while next < REQUESTS && running.len() < CONCURRENT {
            let loader = loader.clone();
            let request = next;
            running.spawn(async move {
                for step in 0..3 {
                    let k = key(worker, request, step);
                    assert_eq!(loader.load(k).await.unwrap(), Some(k * 2));
                }
            });
            next += 1;
        }
        running
            .join_next()
            .await
            .expect("a request")
            .expect("no panic");
    }
}

fn report(setup: &str, counts: &Counts, took: Duration) {
    let batches = counts.batches.load(Ordering::Relaxed);
    let singletons = counts.singletons.load(Ordering::Relaxed);
    let keys = counts.keys.load(Ordering::Relaxed);
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let (share, mean) = (
        100.0 * singletons as f64 / batches as f64,
        keys as f64 / batches as f64,
    );
    println!(
        "{setup:<40} batches {batches:>7}  single-key {share:>5.1}%  mean size {mean:>5.1}  {took:>8.1?}"
    );
}

fn current_thread_workers(shared: bool) {
    let counts = Arc::new(Counts::default());
    let shared_loader = Loader::new(Counted(Arc::clone(&counts)));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..WORKERS {
            let loader = if shared {
                shared_loader.clone()
            } else {
                Loader::new(Counted(Arc::clone(&counts)))
            };
            scope.spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("runtime")
                    .block_on(serve(worker, loader));
            });
        }
    });
    let setup = if shared {
        "current-thread ×2, one shared loader"
    } else {
        "current-thread ×2, a loader per worker"
    };
    report(setup, &counts, start.elapsed());
}

fn multi_thread_shared() {
    let counts = Arc::new(Counts::default());
    let loader = Loader::new(Counted(Arc::clone(&counts)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_time()
        .build()
        .expect("runtime");
    let start = Instant::now();
    runtime.block_on(async {
        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| tokio::spawn(serve(worker, loader.clone())))
            .collect();
        for worker in workers {
            worker.await.expect("worker");
        }
    });
    report(
        "multi-thread ×2, one shared loader",
        &counts,
        start.elapsed(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and runs it as well.
    for _ in 0..2 {
        current_thread_workers(true);
        current_thread_workers(false);
        multi_thread_shared();
    }
}
