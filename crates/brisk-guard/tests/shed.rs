//! Load shedding under paused time: the fixed limit and its queue, deadlines in the queue, and
//! the adaptive limit against a simulated service whose latency grows past its knee.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use brisk_core::deadline;
use brisk_guard::shed::{AdaptiveLimit, ConcurrencyLimitLayer};
use brisk_guard::{BoxError, BuildError, HttpResponses, Refusal};
use brisk_metrics::catalog::{SHED_LIMIT, SHED_REQUESTS};
use brisk_metrics::testing::Capture;
use http::{Request, Response, StatusCode};
use tokio::time::{Instant, sleep};
use tower::{Service, ServiceBuilder, ServiceExt};

fn overloaded(error: &BoxError) -> &brisk_guard::Overloaded {
    match error.downcast_ref::<Refusal>() {
        Some(Refusal::Overloaded(o)) => o,
        _ => panic!("not shed: {error}"),
    }
}

#[tokio::test(start_paused = true)]
async fn past_the_limit_and_the_queue_requests_are_shed_at_once() {
    let capture = Capture::new();
    let layer = capture.run(|| {
        ConcurrencyLimitLayer::builder()
            .name("api")
            .max_in_flight(2)
            .queue(1)
            .queue_timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|work: Duration| async move {
            sleep(work).await;
            Ok::<_, BoxError>(())
        });
    let call = |work| {
        let mut svc = svc.clone();
        tokio::spawn(async move { svc.ready().await?.call(work).await })
    };
    let running = [
        call(Duration::from_millis(100)),
        call(Duration::from_millis(100)),
    ];
    tokio::task::yield_now().await;
    let queued = call(Duration::from_millis(10));
    tokio::task::yield_now().await;
    let started = Instant::now();
    let shed = call(Duration::ZERO).await.unwrap().unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO, "shed without waiting");
    assert_eq!(overloaded(&shed).limit(), 2);
    assert_eq!(overloaded(&shed).waited(), None);
    for task in running {
        task.await.unwrap().unwrap();
    }
    queued.await.unwrap().unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(110),
        "the queued one ran after a slot freed"
    );
    let count = |outcome| {
        capture.counter(
            SHED_REQUESTS.name,
            &[("layer", "api"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (count("admitted"), count("queued"), count("shed")),
        (2, 1, 1)
    );
    assert_eq!(
        capture.gauge(SHED_LIMIT.name, &[("layer", "api")]),
        Some(2.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_leaves_when_its_deadline_or_the_queue_timeout_comes() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(4)
        .queue_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: ()| async {
            sleep(Duration::from_secs(10)).await;
            Ok::<_, BoxError>(())
        });
    let mut busy = svc.clone();
    let _busy = tokio::spawn(async move { busy.ready().await?.call(()).await });
    tokio::task::yield_now().await;

    let mut svc2 = svc.clone();
    let started = Instant::now();
    let error = svc2.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(200),
        "the queue timeout"
    );
    assert_eq!(
        overloaded(&error).waited(),
        Some(Duration::from_millis(200))
    );

    let started = Instant::now();
    let mut svc3 = svc.clone();
    let error = deadline::scope(started + Duration::from_millis(30), async move {
        svc3.ready().await.unwrap().call(()).await.unwrap_err()
    })
    .await;
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(30),
        "the deadline, sooner"
    );
    assert!(error.to_string().contains("waited 30ms"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_gives_back_its_slot_and_its_place_in_the_queue() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(1)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: ()| async {
            sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(())
        });
    for _ in 0..3 {
        let mut a = svc.clone();
        let mut b = svc.clone();
        let running = a.ready().await.unwrap().call(());
        let waiting = b.ready().await.unwrap().call(());
        drop((running, waiting)); // cancelled before completing
    }
    let mut c = svc.clone();
    c.ready().await.unwrap().call(()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn with_http_responses_a_shed_request_is_a_503() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(0)
        .build()
        .unwrap()
        .respond(HttpResponses::new());
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: Request<()>| async {
            sleep(Duration::from_secs(1)).await;
            Ok::<_, std::convert::Infallible>(Response::new(()))
        });
    let mut a = svc.clone();
    let _held = a.ready().await.unwrap().call(Request::new(()));
    let mut b = svc.clone();
    let response = b
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn bad_settings_are_refused() {
    let builder = ConcurrencyLimitLayer::builder;
    for (bad, setting) in [
        (builder().max_in_flight(0), "max_in_flight"),
        (builder().max_in_flight(2_000_000), "max_in_flight"),
        (builder().queue(200_000), "queue"),
        (
            builder().queue(1).queue_timeout(Duration::ZERO),
            "queue_timeout",
        ),
        (builder().queue_timeout(Duration::MAX), "queue_timeout"),
        (
            builder().adaptive(AdaptiveLimit::new(0, 4)),
            "adaptive limit",
        ),
        (
            builder().adaptive(AdaptiveLimit::new(1, 2_000_000)),
            "adaptive limit",
        ),
    ] {
        match bad.build() {
            Err(BuildError::Setting { setting: s, .. }) => assert_eq!(s, setting),
            other => panic!("{setting}: {other:?}"),
        }
    }
    assert!(
        builder()
            .queue(0)
            .queue_timeout(Duration::ZERO)
            .build()
            .is_ok(),
        "no queue, no wait"
    );
}

/// A service that serves `knee` requests at once in `base`; past that, its latency grows with
/// the load (processor sharing), and during a spike it is five times slower.
#[derive(Clone)]
struct Simulated {
    in_flight: Arc<AtomicUsize>,
    spike: Arc<AtomicBool>,
    knee: usize,
    base: Duration,
}

impl Simulated {
    fn latency(&self, in_flight: usize) -> Duration {
        let load = (in_flight as f64 / self.knee as f64).max(1.0);
        let spike = if self.spike.load(Ordering::Relaxed) {
            5.0
        } else {
            1.0
        };
        self.base.mul_f64(load * spike)
    }
}

/// Closed-loop clients (three times the knee) hammer the service through an adaptive limit for
/// `secs` simulated seconds; returns the limit sampled every 100 ms.
async fn run(
    sim: &Simulated,
    layer: &ConcurrencyLimitLayer,
    secs: u64,
    spike_at: Option<u64>,
) -> Vec<usize> {
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn({
        let sim = sim.clone();
        move |_: ()| {
            let sim = sim.clone();
            async move {
                let n = sim.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                sleep(sim.latency(n)).await;
                sim.in_flight.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, BoxError>(())
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(secs);
    let clients: Vec<_> = (0..sim.knee * 3)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                while Instant::now() < end {
                    if svc.ready().await.unwrap().call(()).await.is_err() {
                        sleep(Duration::from_millis(2)).await; // shed: back off a little
                    }
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut tick = 0;
    while Instant::now() < end {
        sleep(Duration::from_millis(100)).await;
        tick += 1;
        if let Some(at) = spike_at {
            sim.spike
                .store(tick * 100 >= at && tick * 100 < at + 150, Ordering::Relaxed);
        }
        samples.push(layer.limit());
    }
    for client in clients {
        client.await.unwrap();
    }
    samples
}

fn simulated(knee: usize) -> Simulated {
    Simulated {
        in_flight: Arc::default(),
        spike: Arc::default(),
        knee,
        base: Duration::from_millis(20),
    }
}

#[tokio::test(start_paused = true)]
async fn the_adaptive_limit_settles_near_the_knee_from_below_and_from_the_knee() {
    for initial in [4, 20] {
        let sim = simulated(20);
        let layer = ConcurrencyLimitLayer::builder()
            .adaptive(AdaptiveLimit::new(1, 200).initial(initial).tolerance(1.3))
            .queue(0)
            .build()
            .unwrap();
        let samples = run(&sim, &layer, 60, None).await;
        let settled = &samples[samples.len() / 2..];
        let mean = settled.iter().sum::<usize>() as f64 / settled.len() as f64;
        let (lo, hi) = (settled.iter().min().unwrap(), settled.iter().max().unwrap());
        assert!(
            (14.0..=30.0).contains(&mean) && *lo >= 10 && *hi <= 40,
            "from {initial}: mean {mean:.1}, range {lo}..={hi}, samples {samples:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_short_latency_spike_does_not_collapse_the_adaptive_limit() {
    let sim = simulated(20);
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(1, 200).initial(20).tolerance(1.3))
        .queue(0)
        .build()
        .unwrap();
    let samples = run(&sim, &layer, 40, Some(20_000)).await;
    let before = samples[150..195].iter().min().copied().unwrap();
    let through = samples[195..260].iter().min().copied().unwrap();
    assert!(
        through >= before / 2 && through >= 8,
        "before the spike ≥ {before}, through it ≥ {through}: {samples:?}"
    );
    let after = samples[samples.len() - 50..].iter().sum::<usize>() / 50;
    assert!(after >= 14, "recovered to {after}");
}
