//! What the JavaScript suite cannot test: cancellation, panics, concurrency limits, deadlines,
//! bad settings, and metrics.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use brisk_batch::{Abandoned, BatchFn, LoadError, Loader};
use brisk_core::deadline;
use brisk_metrics::catalog::{BATCH_BATCHES, BATCH_KEYS, BATCH_SINGLETONS, BATCH_SIZE};
use brisk_metrics::testing::Capture;
use common::{Boom, Echo, Gated, taken, until};
use tokio::time::Instant;

#[tokio::test]
async fn dropping_the_first_caller_mid_batch_leaves_the_others_served() {
    let gated = Gated::new();
    let loader = Loader::new(gated.clone());
    let first = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(1).await }
    });
    let second = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(2).await }
    });
    let third = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(1).await }
    });
    until(|| !gated.batches.lock().unwrap().is_empty()).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    gated.gate.add_permits(1);
    assert_eq!(second.await.unwrap().unwrap(), Some(4));
    assert_eq!(third.await.unwrap().unwrap(), Some(2));
    assert_eq!(taken(&gated.batches), vec![vec![1, 2]]);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_first_caller_while_collecting_leaves_the_batch_to_the_others() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo)
        .window(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut creator = Box::pin(loader.load(1));
    // Poll once: the first caller starts the batch and its hour-long window.
    assert!(common::poll_once(creator.as_mut()).await.is_pending());
    let mut other = Box::pin(loader.load(2));
    assert!(common::poll_once(other.as_mut()).await.is_pending());
    drop(creator);
    assert_eq!(other.await.unwrap().as_deref(), Some("2"));
    assert_eq!(taken(&batches), vec![vec![1, 2]]);
}

#[tokio::test]
async fn a_batch_every_caller_left_is_cancelled_and_forgotten() {
    let gated = Gated::new();
    let loader = Loader::new(gated.clone());
    let lone = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(7).await }
    });
    until(|| !gated.batches.lock().unwrap().is_empty()).await;
    lone.abort();
    let _ = lone.await;
    gated.gate.add_permits(1);
    // The key is not stuck in flight: a new load starts a new batch and is answered.
    assert_eq!(loader.load(7).await.unwrap(), Some(14));
    assert_eq!(taken(&gated.batches), vec![vec![7], vec![7]]);
    assert_eq!(
        gated.finished.load(Ordering::SeqCst),
        1,
        "the abandoned batch was cancelled"
    );
}

#[tokio::test]
async fn an_abandoned_batch_can_finish_in_the_background() {
    let gated = Gated::new();
    let loader = Loader::builder(gated.clone())
        .abandoned(Abandoned::Finish)
        .cache(10)
        .build()
        .unwrap();
    let lone = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(7).await }
    });
    until(|| !gated.batches.lock().unwrap().is_empty()).await;
    lone.abort();
    let _ = lone.await;
    gated.gate.add_permits(1);
    until(|| gated.finished.load(Ordering::SeqCst) == 1).await;
    assert_eq!(
        loader.load(7).await.unwrap(),
        Some(14),
        "its result reached the cache"
    );
    assert_eq!(taken(&gated.batches), vec![vec![7]]);
}

/// Panics on key 13.
struct Unlucky;

impl BatchFn<u32, u32> for Unlucky {
    type Error = Boom;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, Boom> {
        assert!(!keys.contains(&13), "unlucky batch");
        Ok(keys.iter().map(|k| (*k, *k)).collect())
    }
}

#[tokio::test]
async fn a_panicking_batch_fails_its_waiters_and_the_loader_goes_on() {
    let loader = Loader::new(Unlucky);
    let (a, b) = tokio::join!(loader.load(12), loader.load(13));
    for result in [a, b] {
        match result {
            Err(LoadError::Panicked { message }) => {
                assert!(message.contains("unlucky batch"), "{message}");
            }
            other => panic!("expected a panic error, got {other:?}"),
        }
    }
    assert_eq!(loader.load(12).await.unwrap(), Some(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_loads_of_one_key_make_one_batch_of_one_key() {
    let gated = Gated::new();
    let capture = Capture::new();
    let loader = capture.run(|| Loader::new(gated.clone()));
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let loader = loader.clone();
            tokio::spawn(async move { loader.load(5).await })
        })
        .collect();
    // Every task has asked before the batch is let go.
    let requested = [("loader", "loader"), ("kind", "requested")];
    until(|| capture.counter(BATCH_KEYS.name, &requested) == 1_000).await;
    gated.gate.add_permits(1);
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Some(10));
    }
    assert_eq!(taken(&gated.batches), vec![vec![5]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_batches_one_never_runs_two() {
    // On a worker thread, as a server runs its handlers (the test's own body is not on one).
    tokio::spawn(async {
        let gated = Gated::new();
        let loader = Loader::builder(gated.clone())
            .max_batch_size(2)
            .max_concurrent_batches(1)
            .build()
            .unwrap();
        gated.gate.add_permits(1_000);
        let many = loader.load_many(0..40).await;
        assert!(many.iter().all(Result::is_ok));
        assert_eq!(many.len(), 40);
        let batches = gated.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 20, "{batches:?}");
        assert_eq!(gated.most_running.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_huge_load_many_is_split_at_the_cap() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo).max_batch_size(1_000).build().unwrap();
    let many = loader.load_many(0..10_000).await;
    assert!(many.iter().all(|r| r.as_ref().unwrap().is_some()));
    assert_eq!(many.len(), 10_000);
    let sizes: Vec<usize> = taken(&batches).iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![1_000; 10]);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_past_its_deadline_fails_alone() {
    let gated = Gated::new();
    let loader = Loader::new(gated.clone());
    let patient = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(1).await }
    });
    let start = Instant::now();
    let hurried = deadline::scope(start + Duration::from_millis(50), loader.load(2)).await;
    match hurried {
        Err(LoadError::Deadline(elapsed)) => assert!(elapsed.is_deadline()),
        other => panic!("expected a deadline error, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    gated.gate.add_permits(1);
    assert_eq!(
        patient.await.unwrap().unwrap(),
        Some(2),
        "the other waiter is unaffected"
    );
}

#[tokio::test(start_paused = true)]
async fn a_near_deadline_dispatches_a_windowed_batch_early() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo)
        .window(Duration::from_secs(1))
        .build()
        .unwrap();
    let start = Instant::now();
    let value = deadline::scope(start + Duration::from_millis(100), loader.load(1)).await;
    assert_eq!(value.unwrap().as_deref(), Some("1"));
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "did not sit out the window"
    );
    assert_eq!(taken(&batches), vec![vec![1]]);
}

#[tokio::test(start_paused = true)]
async fn a_window_collects_loads_across_turns() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo)
        .window(Duration::from_millis(5))
        .build()
        .unwrap();
    let start = Instant::now();
    let late = async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        loader.load(2).await
    };
    let (a, b) = tokio::join!(loader.load(1), late);
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(taken(&batches), vec![vec![1, 2]]);
    assert_eq!(start.elapsed(), Duration::from_millis(5));
}

#[tokio::test]
async fn flush_dispatches_now() {
    let (echo, batches) = Echo::new();
    let loader = Loader::builder(echo)
        .window(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut pending = Box::pin(loader.load(1));
    assert!(common::poll_once(pending.as_mut()).await.is_pending());
    loader.flush();
    assert_eq!(pending.await.unwrap().as_deref(), Some("1"));
    assert_eq!(taken(&batches), vec![vec![1]]);
}

#[tokio::test]
async fn too_many_queued_batches_is_overloaded() {
    let gated = Gated::new();
    let loader = Loader::builder(gated.clone())
        .max_batch_size(1)
        .max_concurrent_batches(1)
        .max_queued_batches(2)
        .build()
        .unwrap();
    let mut waits: Vec<_> = (0..3).map(|k| Box::pin(loader.load(k))).collect();
    for wait in &mut waits {
        assert!(common::poll_once(wait.as_mut()).await.is_pending());
        // Let the batch's task take the free slot, if there is one.
        until(|| gated.running.load(Ordering::SeqCst) == 1).await;
    }
    // And the other two block waiting for it: queued.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // One running, two queued: a fourth batch is refused, a duplicate key still joins.
    assert!(matches!(loader.load(99).await, Err(LoadError::Overloaded)));
    let mut dup = Box::pin(loader.load(2));
    assert!(common::poll_once(dup.as_mut()).await.is_pending());
    gated.gate.add_permits(10);
    for wait in waits {
        assert!(wait.await.is_ok());
    }
    assert_eq!(dup.await.unwrap(), Some(4));
}

#[test]
fn bad_settings_are_build_errors() {
    let (echo, _) = Echo::<u32>::new();
    let err = Loader::builder(echo)
        .max_batch_size(0)
        .build::<u32, String>()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid batch configuration: max_batch_size must be at least 1"
    );
    for (builder, what) in [
        (
            Loader::builder(Echo::<u32>::new().0).max_concurrent_batches(0),
            "max_concurrent_batches",
        ),
        (
            Loader::builder(Echo::<u32>::new().0).max_queued_batches(0),
            "max_queued_batches",
        ),
        (Loader::builder(Echo::<u32>::new().0).cache(0), "cache"),
        (
            Loader::builder(Echo::<u32>::new().0).window(Duration::ZERO),
            "window",
        ),
    ] {
        let err = builder.build::<u32, String>().unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[tokio::test]
async fn metrics_count_batches_sizes_and_keys() {
    let capture = Capture::new();
    let (echo, _) = Echo::new();
    capture
        .scope(async {
            let loader = Loader::builder(echo)
                .name("authors")
                .cache(10)
                .build()
                .unwrap();
            let _ = tokio::join!(loader.load(1), loader.load(2), loader.load(1));
            let _ = loader.load(1).await; // cached
            let _ = loader.load(3).await; // a batch of one
        })
        .await;
    let loader = [("loader", "authors")];
    assert_eq!(capture.counter(BATCH_BATCHES.name, &loader), 2);
    assert_eq!(capture.counter(BATCH_SINGLETONS.name, &loader), 1);
    assert_eq!(capture.histogram(BATCH_SIZE.name, &loader), vec![2.0, 1.0]);
    let keys = |kind| capture.counter(BATCH_KEYS.name, &[("loader", "authors"), ("kind", kind)]);
    assert_eq!(keys("requested"), 5);
    assert_eq!(keys("deduplicated"), 1);
    assert_eq!(keys("cached"), 1);
    assert_eq!(keys("missing"), 0);
}
