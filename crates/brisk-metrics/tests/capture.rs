//! The test capture: private per test, even with tests running in parallel threads.
#![cfg(feature = "testing")]

use std::sync::{Arc, Barrier};

use brisk_metrics::catalog::{BATCH_SIZE, CACHE_REQUESTS, POOL_MAX};
use brisk_metrics::testing::Capture;

const HIT: [(&str, &str); 3] = [("cache", "c"), ("tier", "local"), ("outcome", "hit")];

#[test]
fn parallel_captures_do_not_see_each_other() {
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (1..=4u64)
        .map(|n| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let capture = Capture::new();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(capture.scope(async {
                    barrier.wait();
                    for _ in 0..n * 100 {
                        CACHE_REQUESTS.counter(&HIT).increment(1);
                        tokio::task::yield_now().await;
                    }
                }));
                assert_eq!(capture.counter(CACHE_REQUESTS.name, &HIT), n * 100);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[tokio::test]
async fn nothing_leaks_outside_the_scope() {
    let capture = Capture::new();
    CACHE_REQUESTS.counter(&HIT).increment(1); // no recorder here: a no-op
    capture.run(|| CACHE_REQUESTS.counter(&HIT).increment(2));
    assert_eq!(capture.counter(CACHE_REQUESTS.name, &HIT), 2);
    assert_eq!(capture.names(), vec![CACHE_REQUESTS.name.to_owned()]);
}

#[tokio::test]
async fn handles_made_in_scope_keep_recording_from_spawned_tasks() {
    let capture = Capture::new();
    let histogram = capture.run(|| BATCH_SIZE.histogram(&[("loader", "l")]));
    tokio::spawn(async move { histogram.record(3.0) })
        .await
        .unwrap();
    assert_eq!(
        capture.histogram(BATCH_SIZE.name, &[("loader", "l")]),
        vec![3.0]
    );
    assert_eq!(
        capture.histogram(BATCH_SIZE.name, &[("loader", "l")]),
        vec![3.0],
        "reads do not drain"
    );
    assert_eq!(
        capture.histogram(BATCH_SIZE.name, &[("loader", "other")]),
        Vec::<f64>::new()
    );
    assert_eq!(capture.gauge("absent", &[]), None);
}

#[test]
fn handles_made_before_any_recorder_register_on_first_use_with_one() {
    let histogram = BATCH_SIZE.histogram(&[("loader", "late")]);
    let gauge = POOL_MAX.gauge(&[("db_client_connection_pool_name", "late")]);
    histogram.record(1.0); // no recorder: nothing to record into
    let capture = Capture::new();
    capture.run(|| {
        histogram.record(2.0);
        gauge.set(4.0);
    });
    histogram.record(3.0); // registered now: records into the capture from anywhere
    assert_eq!(
        capture.histogram(BATCH_SIZE.name, &[("loader", "late")]),
        vec![2.0, 3.0]
    );
    assert_eq!(
        capture.gauge(POOL_MAX.name, &[("db_client_connection_pool_name", "late")]),
        Some(4.0)
    );
}
