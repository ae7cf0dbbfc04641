//! Metrics benches: brisk beside its peers in the same run (DESIGN §5).
//!
//! - `metrics/emit`: one counter increment plus one histogram record per iteration, through
//!   brisk's catalog handles (`brisk`) and through raw handles of the `metrics` crate (`metrics`),
//!   both into the same Prometheus recorder.
//! - `metrics/http_layer`: one request through a trivial service, bare (`bare`), with brisk's
//!   HTTP metrics layer (`brisk`) and with axum-prometheus's layer (`axum_prometheus`), all into
//!   one global Prometheus recorder. axum-prometheus wraps the response body to time its end;
//!   the bench drops the response unread, which ends that body at once. The futures are ready at once, so they are polled with a
//!   no-op waker: what is timed is the layer, not a runtime.
//!
//! Histogram samples are folded into buckets between timed batches (`run_upkeep`), outside the
//! timing, as a scrape would.

use std::future::{Future, ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body;
use brisk_metrics::catalog::{CACHE_REQUESTS, SECONDS_BUCKETS};
use brisk_metrics::http::{HttpMetricsLayer, RouteTemplate};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::{Layer, Service, service_fn};

fn emit(c: &mut Criterion) {
    let recorder = brisk_metrics::prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let labels = [("cache", "users"), ("tier", "local"), ("outcome", "hit")];
    let (brisk_counter, brisk_histogram, raw_counter, raw_histogram) = metrics::with_local_recorder(
        &recorder,
        || {
            (
                CACHE_REQUESTS.counter(&labels),
                brisk_metrics::catalog::POOL_WAIT_TIME
                    .histogram(&[("db_client_connection_pool_name", "main")]),
                metrics::counter!("raw_requests_total", "cache" => "users", "tier" => "local", "outcome" => "hit"),
                metrics::histogram!("raw_wait_seconds", "pool" => "main"),
            )
        },
    );

    let mut group = c.benchmark_group("metrics/emit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("brisk", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                brisk_counter.increment(1);
                brisk_histogram.record(black_box(SECONDS_BUCKETS[(i % 16) as usize]));
            }
            let took = start.elapsed();
            handle.run_upkeep();
            took
        });
    });
    group.bench_function("metrics", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                raw_counter.increment(1);
                raw_histogram.record(black_box(SECONDS_BUCKETS[(i % 16) as usize]));
            }
            let took = start.elapsed();
            handle.run_upkeep();
            took
        });
    });
    group.finish();
}

/// Calls `svc` once with a fresh request and polls the (immediately ready) response future.
fn one_request<S, B>(svc: &mut S, cx: &mut Context<'_>)
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    assert!(svc.poll_ready(cx).is_ready());
    let mut req = Request::get("/users/7").body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(RouteTemplate::new("/users/{id}"));
    let fut = pin!(svc.call(req));
    match fut.poll(cx) {
        Poll::Ready(res) => drop(black_box(res.unwrap())),
        Poll::Pending => panic!("the bench service answers at once"),
    }
}

fn time_requests<S, B>(svc: &mut S, iters: u64, handle: &PrometheusHandle) -> Duration
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let start = Instant::now();
    for _ in 0..iters {
        one_request(svc, &mut cx);
    }
    let took = start.elapsed();
    handle.run_upkeep();
    took
}

fn http_layer(c: &mut Criterion) {
    // axum-prometheus installs the global Prometheus recorder; brisk's layer registers its
    // handles with the same recorder, so both pay for the same storage. It also spawns an
    // upkeep task, so it needs a runtime; this one is never driven, the bench runs upkeep.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = rt.enter();
    let (axum_layer, handle) = axum_prometheus::PrometheusMetricLayer::pair();
    let app = || {
        service_fn(|_req: Request<Body>| {
            ready(Ok::<_, std::convert::Infallible>(Response::new(
                Body::empty(),
            )))
        })
    };

    let mut group = c.benchmark_group("metrics/http_layer");
    group.throughput(Throughput::Elements(1));
    let mut bare = app();
    group.bench_function("bare", |b| {
        b.iter_custom(|iters| time_requests(&mut bare, iters, &handle));
    });
    let mut brisk = HttpMetricsLayer::new().layer(app());
    group.bench_function("brisk", |b| {
        b.iter_custom(|iters| time_requests(&mut brisk, iters, &handle));
    });
    let mut peer = axum_layer.layer(app());
    group.bench_function("axum_prometheus", |b| {
        b.iter_custom(|iters| time_requests(&mut peer, iters, &handle));
    });
    group.finish();
}

criterion_group!(benches, emit, http_layer);
criterion_main!(benches);
