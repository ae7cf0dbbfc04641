//! The HTTP RED layer, observed through a private capture recorder.
#![cfg(all(feature = "http", feature = "testing"))]

use std::convert::Infallible;
use std::future::pending;

use brisk_metrics::Error;
use brisk_metrics::catalog::{HTTP_SERVER_ACTIVE_REQUESTS, HTTP_SERVER_REQUEST_DURATION};
use brisk_metrics::http::{HttpMetrics, HttpMetricsLayer, RouteTemplate};
use brisk_metrics::testing::Capture;
use http::{Method, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt, service_fn};

const DURATION: &str = HTTP_SERVER_REQUEST_DURATION.name;
const ACTIVE: &str = HTTP_SERVER_ACTIVE_REQUESTS.name;

/// Answers with the status given in the `x-status` header (200 by default).
async fn echo_status(req: Request<()>) -> Result<Response<()>, Infallible> {
    let status = req
        .headers()
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(200);
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(res)
}

fn request(method: &str, route: Option<&'static str>, status: u16) -> Request<()> {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri("/raw/path/42")
        .header("x-status", status)
        .body(())
        .unwrap();
    if let Some(route) = route {
        req.extensions_mut().insert(RouteTemplate::new(route));
    }
    req
}

async fn send<S>(svc: &mut S, req: Request<()>)
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(req).await.unwrap();
}

fn labels<'a>(method: &'a str, route: &'a str, status: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("http_request_method", method),
        ("http_route", route),
        ("http_response_status_code", status),
    ]
}

#[tokio::test]
async fn records_duration_by_method_route_and_status() {
    let capture = Capture::new();
    capture
        .scope(async {
            let mut svc = HttpMetricsLayer::new().layer(service_fn(echo_status));
            send(&mut svc, request("GET", Some("/users/{id}"), 200)).await;
            send(&mut svc, request("GET", Some("/users/{id}"), 200)).await;
            send(&mut svc, request("POST", Some("/users"), 201)).await;
        })
        .await;
    let get = capture.histogram(DURATION, &labels("GET", "/users/{id}", "200"));
    assert_eq!(get.len(), 2);
    assert!(get.iter().all(|s| (0.0..1.0).contains(s)), "{get:?}");
    assert_eq!(
        capture
            .histogram(DURATION, &labels("POST", "/users", "201"))
            .len(),
        1
    );
    let active = [
        ("http_request_method", "GET"),
        ("http_route", "/users/{id}"),
    ];
    assert_eq!(
        capture.gauge(ACTIVE, &active),
        Some(0.0),
        "in-flight returns to zero"
    );
}

#[tokio::test]
async fn never_uses_the_raw_path() {
    let capture = Capture::new();
    capture
        .scope(async {
            let mut svc = HttpMetricsLayer::new().layer(service_fn(echo_status));
            send(&mut svc, request("GET", None, 404)).await;
        })
        .await;
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "unmatched", "404"))
            .len(),
        1
    );
    assert_eq!(capture.series_count(DURATION), 1);
}

#[tokio::test]
async fn unknown_methods_become_other() {
    let capture = Capture::new();
    capture
        .scope(async {
            let mut svc = HttpMetricsLayer::new().layer(service_fn(echo_status));
            for method in ["PURGE", "BREW", "X-RANDOM-1", "X-RANDOM-2"] {
                send(&mut svc, request(method, Some("/"), 200)).await;
            }
        })
        .await;
    assert_eq!(
        capture
            .histogram(DURATION, &labels("_OTHER", "/", "200"))
            .len(),
        4
    );
    assert_eq!(capture.series_count(DURATION), 1);
}

#[tokio::test]
async fn routes_past_the_cap_share_overflow() {
    let capture = Capture::new();
    capture
        .scope(async {
            let layer = HttpMetricsLayer::builder().max_routes(2).build().unwrap();
            let mut svc = layer.layer(service_fn(echo_status));
            for route in ["/a", "/b", "/c", "/d", "/a"] {
                send(&mut svc, request("GET", Some(route), 200)).await;
            }
        })
        .await;
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/a", "200"))
            .len(),
        2
    );
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/b", "200"))
            .len(),
        1
    );
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "_overflow", "200"))
            .len(),
        2
    );
    assert_eq!(capture.series_count(DURATION), 3);
}

#[tokio::test]
async fn an_attack_of_random_routes_keeps_the_series_bounded() {
    let capture = Capture::new();
    capture
        .scope(async {
            let layer = HttpMetricsLayer::builder().max_routes(10).build().unwrap();
            let mut svc = layer.layer(service_fn(echo_status));
            for i in 0..1_000 {
                let route: &'static str = Box::leak(format!("/r/{i}").into_boxed_str());
                send(&mut svc, request("GET", Some(route), 200)).await;
            }
        })
        .await;
    assert_eq!(
        capture.series_count(DURATION),
        11,
        "10 routes and the overflow"
    );
}

#[tokio::test]
async fn status_codes_past_the_cap_share_overflow() {
    let capture = Capture::new();
    capture
        .scope(async {
            let layer = HttpMetricsLayer::builder()
                .max_status_codes(2)
                .build()
                .unwrap();
            let mut svc = layer.layer(service_fn(echo_status));
            for status in [200, 404, 500, 503, 200] {
                send(&mut svc, request("GET", Some("/"), status)).await;
            }
        })
        .await;
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/", "200"))
            .len(),
        2
    );
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/", "404"))
            .len(),
        1
    );
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/", "_overflow"))
            .len(),
        2
    );
}

#[tokio::test]
async fn service_errors_are_labelled_error() {
    let capture = Capture::new();
    capture
        .scope(async {
            let failing = service_fn(|_: Request<()>| async { Err::<Response<()>, _>("boom") });
            let mut svc = HttpMetrics::new(failing);
            let err = svc
                .ready()
                .await
                .unwrap()
                .call(request("GET", Some("/"), 200))
                .await;
            assert_eq!(
                err.unwrap_err(),
                "boom",
                "the error passes through untouched"
            );
        })
        .await;
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/", "error"))
            .len(),
        1
    );
}

#[tokio::test]
async fn in_flight_counts_running_requests_and_dropped_ones_leave() {
    let capture = Capture::new();
    let active = [("http_request_method", "GET"), ("http_route", "/slow")];
    capture
        .scope(async {
            let stuck = service_fn(|_: Request<()>| pending::<Result<Response<()>, Infallible>>());
            let mut svc = HttpMetricsLayer::new().layer(stuck);
            let first = svc
                .ready()
                .await
                .unwrap()
                .call(request("GET", Some("/slow"), 200));
            let second = svc
                .ready()
                .await
                .unwrap()
                .call(request("GET", Some("/slow"), 200));
            assert_eq!(capture.gauge(ACTIVE, &active), Some(2.0));
            drop(first);
            assert_eq!(capture.gauge(ACTIVE, &active), Some(1.0));
            drop(second);
        })
        .await;
    assert_eq!(capture.gauge(ACTIVE, &active), Some(0.0));
    assert_eq!(
        capture.series_count(DURATION),
        0,
        "a dropped request records no duration"
    );
}

#[tokio::test]
async fn clones_of_a_layer_share_one_cap() {
    let capture = Capture::new();
    capture
        .scope(async {
            let layer = HttpMetricsLayer::builder().max_routes(1).build().unwrap();
            let mut one = layer.clone().layer(service_fn(echo_status));
            let mut two = layer.layer(service_fn(echo_status));
            send(&mut one, request("GET", Some("/one"), 200)).await;
            send(&mut two, request("GET", Some("/two"), 200)).await;
        })
        .await;
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/two", "200"))
            .len(),
        0
    );
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "_overflow", "200"))
            .len(),
        1
    );
}

/// A framework's own route type, as axum's `MatchedPath` is.
#[derive(Clone)]
struct Matched(&'static str);

#[tokio::test]
async fn route_can_come_from_any_extension() {
    let capture = Capture::new();
    capture
        .scope(async {
            let layer = HttpMetricsLayer::builder()
                .route_from(|ext| ext.get::<Matched>().map(|m| m.0))
                .build()
                .unwrap();
            let mut svc = layer.layer(service_fn(echo_status));
            let mut req = request("GET", None, 200);
            req.extensions_mut().insert(Matched("/items/{id}"));
            send(&mut svc, req).await;
        })
        .await;
    assert_eq!(
        capture
            .histogram(DURATION, &labels("GET", "/items/{id}", "200"))
            .len(),
        1
    );
}

#[test]
fn zero_caps_are_build_errors() {
    let err = HttpMetricsLayer::builder()
        .max_routes(0)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)));
    assert_eq!(
        err.to_string(),
        "invalid metrics configuration: max_routes must be at least 1"
    );
    let err = HttpMetricsLayer::builder()
        .max_status_codes(0)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max_status_codes"), "{err}");
}
