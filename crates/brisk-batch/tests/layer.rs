//! The tower batch layer.
#![cfg(feature = "tower")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_batch::LoadError;
use brisk_batch::layer::{BatchLayer, BatchLayerBuilder};
use brisk_core::deadline;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

type Calls = Arc<Mutex<Vec<Vec<u32>>>>;

/// A bulk service that doubles every request and records each call.
fn doubler(
    calls: &Calls,
) -> impl Service<Vec<u32>, Response = Vec<u32>, Error = String, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    let calls = calls.clone();
    service_fn(move |batch: Vec<u32>| {
        calls.lock().unwrap().push(batch.clone());
        async move { Ok::<_, String>(batch.iter().map(|x| x * 2).collect()) }
    })
}

#[tokio::test]
async fn concurrent_requests_share_one_call_and_get_their_own_response() {
    let calls = Calls::default();
    let svc = BatchLayer::new().layer(doubler(&calls));
    let results = futures_util::future::join_all((1..=5).map(|x| svc.clone().oneshot(x))).await;
    let results: Vec<u32> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(results, [2, 4, 6, 8, 10]);
    assert_eq!(*calls.lock().unwrap(), vec![vec![1, 2, 3, 4, 5]]);
}

#[tokio::test]
async fn max_batch_size_splits_calls() {
    let calls = Calls::default();
    let layer = BatchLayerBuilder::new().max_batch_size(2).build().unwrap();
    let svc = layer.layer(doubler(&calls));
    let results = futures_util::future::join_all((1..=5).map(|x| svc.clone().oneshot(x))).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        *calls.lock().unwrap(),
        vec![vec![1, 2], vec![3, 4], vec![5]]
    );
}

#[tokio::test]
async fn a_wrong_length_response_fails_the_batch_clearly() {
    let short =
        service_fn(|batch: Vec<u32>| async move { Ok::<_, String>(vec![0; batch.len() - 1]) });
    let svc = BatchLayer::new().layer(short);
    let (a, b) = tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2));
    for err in [a.unwrap_err(), b.unwrap_err()] {
        assert!(
            matches!(
                err,
                LoadError::WrongLength {
                    expected: 2,
                    got: 1
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "the batched service answered 2 requests with 1 responses"
        );
    }
}

#[tokio::test]
async fn a_service_error_reaches_every_request_as_one_arc() {
    let failing = service_fn(|_: Vec<u32>| async { Err::<Vec<u32>, _>("db down".to_owned()) });
    let svc = BatchLayer::new().layer(failing);
    let (a, b) = tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2));
    match (a.unwrap_err(), b.unwrap_err()) {
        (LoadError::Batch(a), LoadError::Batch(b)) => {
            assert!(Arc::ptr_eq(&a, &b));
            assert_eq!(*a, "db down");
        }
        other => panic!("expected service errors, got {other:?}"),
    }
}

#[tokio::test]
async fn a_panicking_service_fails_its_batch_and_the_next_works() {
    let svc = BatchLayer::new().layer(service_fn(|batch: Vec<u32>| async move {
        assert!(!batch.contains(&13), "unlucky");
        Ok::<_, String>(batch)
    }));
    assert!(matches!(
        svc.clone().oneshot(13).await,
        Err(LoadError::Panicked { .. })
    ));
    assert_eq!(svc.clone().oneshot(12).await.unwrap(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_batches_bounds_calls_in_flight() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let slow = {
        let (running, most) = (running.clone(), most.clone());
        service_fn(move |batch: Vec<u32>| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, String>(batch)
            }
        })
    };
    let layer = BatchLayerBuilder::new()
        .max_batch_size(1)
        .max_concurrent_batches(2)
        .build()
        .unwrap();
    let svc = layer.layer(slow);
    let results = futures_util::future::join_all((0..20).map(|x| svc.clone().oneshot(x))).await;
    assert!(results.iter().all(Result::is_ok));
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "{} calls at once",
        most.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn past_the_queue_bound_calls_are_overloaded() {
    let never = service_fn(|_: Vec<u32>| std::future::pending::<Result<Vec<u32>, String>>());
    let layer = BatchLayerBuilder::new()
        .max_batch_size(1)
        .max_concurrent_batches(1)
        .max_queued_batches(1)
        .build()
        .unwrap();
    let mut svc = layer.layer(never);
    let running = svc.call(1);
    let queued = svc.call(2);
    // Let the batches' tasks run: the first takes the slot, the second waits for it.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let refused = svc.call(3).await;
    assert!(matches!(refused, Err(LoadError::Overloaded)), "{refused:?}");
    drop((running, queued));
}

#[tokio::test(start_paused = true)]
async fn a_request_past_its_deadline_gets_a_deadline_error() {
    let never = service_fn(|_: Vec<u32>| std::future::pending::<Result<Vec<u32>, String>>());
    let svc = BatchLayer::new().layer(never);
    let start = Instant::now();
    let err = deadline::scope(start + Duration::from_millis(30), svc.oneshot(1))
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::Deadline(_)), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(30));
}

#[test]
fn bad_settings_are_build_errors() {
    let err = BatchLayerBuilder::new()
        .max_batch_size(0)
        .build::<u32>()
        .unwrap_err();
    assert!(err.to_string().contains("max_batch_size"), "{err}");
    assert!(
        BatchLayerBuilder::new()
            .max_concurrent_batches(0)
            .build::<u32>()
            .is_err()
    );
    assert!(
        BatchLayerBuilder::new()
            .window(Duration::ZERO)
            .build::<u32>()
            .is_err()
    );
}
