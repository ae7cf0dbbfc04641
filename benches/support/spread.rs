//! Spreads a benchmark's iterations over concurrent tasks.

use std::time::{Duration, Instant};

/// Runs `op` `iters` times spread over `tasks` spawned tasks and returns the elapsed time.
pub(crate) async fn spread<F, Fut>(iters: u64, tasks: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    // Even one task is spawned: services run their requests on the runtime's workers, and a
    // caller outside them (criterion's `block_on` thread) would pay a cross-thread wake-up on
    // every operation that no service pays.
    let per_task = iters.div_ceil(tasks);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    op().await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("task");
    }
    start.elapsed()
}
