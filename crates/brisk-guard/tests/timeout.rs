//! The timeout layer under paused time: its own bound, budgets from headers, deadlines in scope
//! and the deadline it hands to everything the handler awaits.

use std::time::Duration;

use brisk_core::deadline::{self, Bound};
use brisk_guard::timeout::{BudgetHeader, TimeoutLayer};
use brisk_guard::{BoxError, HttpResponses, Refusal, TimeoutCause};
use brisk_metrics::catalog::{BUDGET_HEADERS, TIMEOUTS};
use brisk_metrics::testing::Capture;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

/// A handler that takes `work` and reports the budget it was given.
async fn handler(work: Duration) -> Result<Option<Duration>, BoxError> {
    let budget = deadline::remaining();
    tokio::time::sleep(work).await;
    Ok(budget)
}

fn timed_out(error: &BoxError) -> (Duration, TimeoutCause) {
    match error.downcast_ref::<Refusal>() {
        Some(Refusal::TimedOut(t)) => (t.after(), t.cause()),
        _ => panic!("not a timeout: {error}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_request_is_cut_at_the_timeout_and_a_fast_one_sees_its_budget() {
    let mut svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service_fn(handler);
    let started = Instant::now();
    let budget = svc
        .ready()
        .await
        .unwrap()
        .call(Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(budget, Some(Duration::from_millis(100)));
    let error = svc
        .ready()
        .await
        .unwrap()
        .call(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(110),
        "cut at 100 ms, not 5 s"
    );
    assert_eq!(
        timed_out(&error),
        (Duration::from_millis(100), TimeoutCause::Timeout)
    );
    assert!(error.to_string().contains("100ms"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn the_deadline_reaches_a_bounded_brisk_call_inside_the_handler() {
    let mut svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(50)))
        .service_fn(|_: ()| async {
            // What brisk's cache, pool and limiter do around each wait.
            let err = deadline::bounded(Duration::from_secs(10), std::future::pending::<()>())
                .await
                .unwrap_err();
            Ok::<_, BoxError>(err.bound())
        });
    // The bounded call gives up at the deadline, just before the layer itself would.
    let started = Instant::now();
    let outcome = svc.ready().await.unwrap().call(()).await;
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    match outcome {
        Ok(bound) => assert_eq!(bound, Bound::Deadline),
        Err(error) => assert_eq!(timed_out(&error).1, TimeoutCause::Timeout),
    }
}

#[tokio::test(start_paused = true)]
async fn an_inner_timeout_shortens_an_outer_one_and_never_extends_it() {
    let mut svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service_fn(handler);
    let budget = svc
        .ready()
        .await
        .unwrap()
        .call(Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        budget,
        Some(Duration::from_millis(100)),
        "the outer deadline wins"
    );
    let error = svc
        .ready()
        .await
        .unwrap()
        .call(Duration::from_secs(1))
        .await
        .unwrap_err();
    let (after, cause) = timed_out(&error);
    assert_eq!(after, Duration::from_millis(100));
    assert!(
        matches!(cause, TimeoutCause::Timeout | TimeoutCause::Deadline),
        "{cause:?}"
    );
}

fn request(headers: &[(&str, &str)]) -> Request<Duration> {
    let mut req = Request::new(Duration::ZERO);
    for (name, value) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    req
}

#[tokio::test(start_paused = true)]
async fn budget_headers_are_used_clamped_or_ignored_when_malformed() {
    let capture = Capture::new();
    let layer = capture.run(|| {
        TimeoutLayer::new(Duration::from_secs(1))
            .name("api")
            .budget(BudgetHeader::grpc_timeout().or_millis("x-request-timeout-ms"))
    });
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: Request<Duration>| async { Ok::<_, BoxError>(deadline::remaining()) });
    let mut budget = async |headers: &[(&str, &str)]| {
        svc.ready()
            .await
            .unwrap()
            .call(request(headers))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(
        budget(&[("grpc-timeout", "250m")]).await,
        Duration::from_millis(250)
    );
    assert_eq!(
        budget(&[("x-request-timeout-ms", "40")]).await,
        Duration::from_millis(40)
    );
    assert_eq!(
        budget(&[("grpc-timeout", "2S"), ("x-request-timeout-ms", "40")]).await,
        Duration::from_secs(1),
        "the first header present wins, clamped to the timeout"
    );
    for bad in ["", "soon", "-5m", "123456789m", "1.5S", "10"] {
        assert_eq!(
            budget(&[("grpc-timeout", bad)]).await,
            Duration::from_secs(1),
            "{bad:?}"
        );
    }
    assert_eq!(
        budget(&[("x-request-timeout-ms", "1e3")]).await,
        Duration::from_secs(1)
    );
    let count = |outcome| {
        capture.counter(
            BUDGET_HEADERS.name,
            &[("layer", "api"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (count("used"), count("clamped"), count("malformed")),
        (2, 1, 7)
    );
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_times_out_as_the_budget_and_is_counted() {
    let capture = Capture::new();
    let layer = capture.run(|| {
        TimeoutLayer::new(Duration::from_secs(1))
            .budget(BudgetHeader::millis("x-request-timeout-ms"))
            .respond(HttpResponses::new())
    });
    let mut svc =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(|req: Request<Duration>| async move {
                tokio::time::sleep(*req.body()).await;
                Ok::<_, std::convert::Infallible>(Response::new(()))
            });
    let mut req = request(&[("x-request-timeout-ms", "0")]);
    *req.body_mut() = Duration::from_millis(1);
    let response = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        capture.counter(TIMEOUTS.name, &[("layer", "default"), ("cause", "budget")]),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn with_http_responses_a_timeout_is_a_504_or_the_status_chosen() {
    for (respond, status) in [
        (HttpResponses::new(), StatusCode::GATEWAY_TIMEOUT),
        (
            HttpResponses::new().timeout_status(StatusCode::SERVICE_UNAVAILABLE),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ] {
        let mut svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_millis(10)).respond(respond))
            .service_fn(|_: Request<()>| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, std::convert::Infallible>(Response::new(String::from("late")))
            });
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        assert!(response.body().is_empty());
    }
}

#[tokio::test(start_paused = true)]
async fn an_expired_outer_deadline_times_out_at_once_as_the_deadline() {
    let mut svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service_fn(handler);
    let outer = Instant::now() + Duration::from_millis(5);
    let error = deadline::scope(outer, async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        svc.ready()
            .await
            .unwrap()
            .call(Duration::from_millis(1))
            .await
            .unwrap_err()
    })
    .await;
    assert_eq!(timed_out(&error), (Duration::ZERO, TimeoutCause::Deadline));
}
