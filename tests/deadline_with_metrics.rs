//! Cross-crate: a request whose budget runs out inside the handler is answered 504 and counted
//! as such by the HTTP metrics layer, without waiting past the budget.

use std::time::Duration;

use brisk::deadline;
use brisk::metrics::catalog::HTTP_SERVER_REQUEST_DURATION;
use brisk::metrics::http::{HttpMetricsLayer, RouteTemplate};
use brisk_metrics::testing::Capture;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

async fn handler(_: Request<()>) -> Result<Response<()>, std::convert::Infallible> {
    // A slow dependency: the handler allows it 5 s, the caller's budget is shorter.
    let slow = tokio::time::sleep(Duration::from_secs(5));
    let status = match deadline::bounded(Duration::from_secs(5), slow).await {
        Ok(()) => StatusCode::OK,
        Err(elapsed) if elapsed.is_deadline() => StatusCode::GATEWAY_TIMEOUT,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut res = Response::new(());
    *res.status_mut() = status;
    Ok(res)
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_budget_is_a_counted_504() {
    let capture = Capture::new();
    let start = Instant::now();
    let status = capture
        .scope(async {
            let mut svc = ServiceBuilder::new()
                .layer(HttpMetricsLayer::new())
                .service_fn(handler);
            let mut req = Request::get("/reports/9").body(()).unwrap();
            req.extensions_mut()
                .insert(RouteTemplate::new("/reports/{id}"));
            let call = svc.ready().await.unwrap().call(req);
            deadline::scope(start + Duration::from_millis(250), call)
                .await
                .unwrap()
                .status()
        })
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(250),
        "gave up exactly at the budget"
    );
    let labels = [
        ("http_request_method", "GET"),
        ("http_route", "/reports/{id}"),
        ("http_response_status_code", "504"),
    ];
    assert_eq!(
        capture
            .histogram(HTTP_SERVER_REQUEST_DURATION.name, &labels)
            .len(),
        1
    );
}
