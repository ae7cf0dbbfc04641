//! The Prometheus installer. One test, because a process has one global recorder.
#![cfg(feature = "prometheus")]

use brisk_metrics::Error;
use brisk_metrics::catalog::{BATCH_SIZE, CACHE_REQUESTS, HTTP_SERVER_REQUEST_DURATION};

#[test]
fn install_gives_real_histograms_and_refuses_a_second_recorder() {
    let exporter = brisk_metrics::prometheus::install().expect("first install");

    HTTP_SERVER_REQUEST_DURATION
        .histogram(&[
            ("http_request_method", "GET"),
            ("http_route", "/"),
            ("http_response_status_code", "200"),
        ])
        .record(0.003);
    BATCH_SIZE.histogram(&[("loader", "authors")]).record(7.0);
    CACHE_REQUESTS
        .counter(&[("cache", "users"), ("tier", "local"), ("outcome", "hit")])
        .increment(3);
    metrics::histogram!("app_own_duration_seconds").record(0.2);

    let text = exporter.render();
    assert!(
        !text.contains("quantile="),
        "summaries are never emitted:\n{text}"
    );
    for line in [
        "# TYPE http_server_request_duration_seconds histogram",
        r#"http_server_request_duration_seconds_bucket{http_request_method="GET",http_route="/",http_response_status_code="200",le="0.0001"} 0"#,
        r#"http_server_request_duration_seconds_bucket{http_request_method="GET",http_route="/",http_response_status_code="200",le="0.005"} 1"#,
        r#"http_server_request_duration_seconds_bucket{http_request_method="GET",http_route="/",http_response_status_code="200",le="10"} 1"#,
        r#"brisk_batch_size_bucket{loader="authors",le="5"} 0"#,
        r#"brisk_batch_size_bucket{loader="authors",le="10"} 1"#,
        r#"brisk_cache_requests_total{cache="users",tier="local",outcome="hit"} 3"#,
        "# HELP brisk_cache_requests_total Cache lookups per tier reached; outcome is hit, miss or error, and stale under the tier a stale value was served from.",
        r#"app_own_duration_seconds_bucket{le="0.25"} 1"#,
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }

    let second = brisk_metrics::prometheus::install().unwrap_err();
    assert!(
        matches!(second, Error::RecorderAlreadyInstalled),
        "{second:?}"
    );
    assert!(second.to_string().contains("already installed"));
}
