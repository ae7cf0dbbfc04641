//! `pool/contention_tail`: 1,000 tasks share 50 connections, each holding one for 1 ms; the wait
//! of every checkout is recorded and p50 / p99 / p99.9 printed per contender: brisk over
//! deadpool, brisk over bb8, and the bare pools. A fair pool hands connections out in arrival
//! order, so its p99 stays within a small multiple of its p50.
//!
//! Percentiles are what this measures, so it prints them instead of going through criterion.
//! Run: `cargo bench --bench pool_tail`.
#![allow(clippy::print_stdout)] // a benchmark report

use std::time::{Duration, Instant};

use brisk_pool::{Instrumented, Pool};

const TASKS: usize = 1_000;
const CONNECTIONS: usize = 50;
const HOLD: Duration = Duration::from_millis(1);
const ROUNDS: usize = 5;

#[path = "support/noop.rs"]
mod noop;

use noop::Noop;

/// Every checkout's wait over `ROUNDS` rounds of `TASKS` tasks; `get` checks out and holds.
async fn waits<F, Fut>(get: F) -> Vec<Duration>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Duration> + Send + 'static,
{
    let mut all = Vec::with_capacity(TASKS * ROUNDS);
    for _ in 0..ROUNDS {
        let tasks: Vec<_> = (0..TASKS).map(|_| tokio::spawn((get.clone())())).collect();
        for task in tasks {
            all.push(task.await.expect("task"));
        }
    }
    all.sort_unstable();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn report(name: &str, sorted: &[Duration]) {
    let (p50, p99, p999) = (
        percentile(sorted, 0.50),
        percentile(sorted, 0.99),
        percentile(sorted, 0.999),
    );
    println!(
        "pool/contention_tail/{name:<16} p50 {p50:>10.3?}  p99 {p99:>10.3?}  p99.9 {p999:>10.3?}  p99/p50 {:.2}",
        p99.as_secs_f64() / p50.as_secs_f64().max(1e-9)
    );
}

/// Waits for `checkout`, holds what it gives for `HOLD`, and returns how long the wait took.
async fn hold<C>(checkout: impl Future<Output = C>) -> Duration {
    let started = Instant::now();
    let connection = checkout.await;
    let waited = started.elapsed();
    tokio::time::sleep(HOLD).await;
    drop(connection);
    waited
}

/// Checks out through `Instrumented`.
async fn through_brisk<P: Pool>(pool: Instrumented<P>) -> Vec<Duration> {
    waits(move || {
        let pool = pool.clone();
        async move { hold(async { pool.get().await.expect("checkout") }).await }
    })
    .await
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let deadpool = || {
            deadpool::managed::Pool::<Noop>::builder(Noop)
                .max_size(CONNECTIONS)
                .build()
                .expect("pool")
        };
        let bb8 = || async {
            bb8::Pool::builder()
                .max_size(u32::try_from(CONNECTIONS).expect("small"))
                .connection_timeout(Duration::from_secs(60))
                .build(Noop)
                .await
                .expect("pool")
        };
        let over_deadpool = Instrumented::builder(deadpool())
            .wait_timeout(Duration::from_secs(60))
            .build()
            .expect("valid");
        report("brisk_deadpool", &through_brisk(over_deadpool).await);
        let over_bb8 = Instrumented::builder(bb8().await)
            .wait_timeout(Duration::from_secs(60))
            .build()
            .expect("valid");
        report("brisk_bb8", &through_brisk(over_bb8).await);

        let raw = deadpool();
        let deadpool_waits = waits(move || {
            let pool = raw.clone();
            async move { hold(async { pool.get().await.expect("checkout") }).await }
        });
        report("deadpool", &deadpool_waits.await);
        let raw = bb8().await;
        let bb8_waits = waits(move || {
            let pool = raw.clone();
            async move { hold(async { pool.get_owned().await.expect("checkout") }).await }
        });
        report("bb8", &bb8_waits.await);
    });
}
