//! With axum: the layers compose with a `Router`, keep its `Infallible` error, and produce
//! exactly these headers (golden tests); client IPs behind trusted proxies cannot be spoofed.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath};
use axum::routing::get;
use brisk_guard::HttpResponses;
use brisk_guard::ratelimit::{ClientIp, Header, Quota, RateLimitLayer, RateLimiter, Route, Tier};
use brisk_guard::shed::ConcurrencyLimitLayer;
use brisk_guard::timeout::{BudgetHeader, TimeoutLayer};
use http::{HeaderMap, Request, StatusCode};
use tower::{ServiceBuilder, ServiceExt};

fn peer(ext: &http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

fn request(path: &str, from: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::get(path).body(Body::empty()).unwrap();
    let ip: std::net::IpAddr = from.parse().unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(ip, 40_000)));
    for (name, value) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    req
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap) {
    let response = app.clone().oneshot(req).await.unwrap(); // Infallible: unwrap cannot fail
    (response.status(), response.headers().clone())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_429_carries_retry_after_and_the_ietf_fields_exactly() {
    let limiter = RateLimiter::builder("api")
        .tier(
            Tier::new("default")
                .quota(Quota::per_second(2).named("burst"))
                .quota(Quota::per_day(1_000).named("daily")),
        )
        .build()
        .unwrap();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter, ClientIp::peer().peer_from(peer))
            .respond(HttpResponses::new().headers_when_admitted(true)),
    );
    let (status, headers) = send(&app, request("/", "192.0.2.1", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header(&headers, "ratelimit-policy"),
        Some(r#""burst";q=2;w=1, "daily";q=1000;w=86400"#)
    );
    assert_eq!(
        header(&headers, "ratelimit"),
        Some(r#""burst";r=1;t=1, "daily";r=999;t=87"#)
    );
    assert_eq!(header(&headers, "retry-after"), None);

    send(&app, request("/", "192.0.2.1", &[])).await;
    let (status, headers) = send(&app, request("/", "192.0.2.1", &[])).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(
        header(&headers, "ratelimit-policy"),
        Some(r#""burst";q=2;w=1, "daily";q=1000;w=86400"#)
    );
    assert_eq!(
        header(&headers, "ratelimit"),
        Some(r#""burst";r=0;t=1, "daily";r=998;t=173"#)
    );

    let (status, _) = send(&app, request("/", "192.0.2.2", &[])).await;
    assert_eq!(status, StatusCode::OK, "another client has its own quota");
}

#[tokio::test(start_paused = true)]
async fn without_headers_when_admitted_only_refusals_carry_them_and_shadow_mode_never() {
    let limiter = |shadow| {
        RateLimiter::builder("api")
            .quota(Quota::per_minute(1))
            .shadow(shadow)
            .build()
            .unwrap()
    };
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter(false), ClientIp::peer().peer_from(peer))
            .respond(HttpResponses::new()),
    );
    let (_, headers) = send(&app, request("/", "192.0.2.1", &[])).await;
    assert_eq!(header(&headers, "ratelimit"), None);
    let (status, headers) = send(&app, request("/", "192.0.2.1", &[])).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&headers, "retry-after"), Some("60"));
    assert_eq!(
        header(&headers, "ratelimit"),
        Some(r#""default-1-per-60s";r=0;t=60"#)
    );

    let shadowed = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter(true), ClientIp::peer().peer_from(peer))
            .respond(HttpResponses::new().headers_when_admitted(true)),
    );
    for _ in 0..3 {
        let (status, headers) = send(&shadowed, request("/", "192.0.2.1", &[])).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            header(&headers, "ratelimit"),
            None,
            "shadow mode never shows"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_spoofed_forwarded_header_cannot_change_the_key() {
    let limiter = RateLimiter::builder("api")
        .quota(Quota::per_minute(1))
        .build()
        .unwrap();
    let key = ClientIp::behind(["10.0.0.0/8"]).unwrap().peer_from(peer);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(limiter, key).respond(HttpResponses::new()));
    let status = |from, xff: &[&str]| {
        let headers: Vec<_> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
        let req = request("/", from, &headers);
        let app = app.clone();
        async move { send(&app, req).await.0 }
    };
    // Straight from the internet: the peer is the key, whatever it claims.
    assert_eq!(status("203.0.113.9", &["1.1.1.1"]).await, StatusCode::OK);
    assert_eq!(
        status("203.0.113.9", &["2.2.2.2"]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Through our proxy: the right-most untrusted hop is the key; what the client prepends is
    // ignored, across one or several header lines.
    assert_eq!(
        status("10.0.0.5", &["6.6.6.6, 198.51.100.7"]).await,
        StatusCode::OK
    );
    assert_eq!(
        status("10.0.0.5", &["7.7.7.7", "198.51.100.7"]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        status("10.0.0.6", &["8.8.8.8, 198.51.100.7, 10.1.1.1"]).await,
        StatusCode::TOO_MANY_REQUESTS,
        "through two of our proxies"
    );
    // A malformed hop is not believed: the key is the proxy that vouched for it.
    assert_eq!(
        status("10.0.0.7", &["198.51.100.8, garbage"]).await,
        StatusCode::OK
    );
    assert_eq!(
        status("10.0.0.7", &["198.51.100.9, garbage"]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // IPv6 clients are keyed by their /64.
    assert_eq!(status("2001:db8:1:2::1", &[]).await, StatusCode::OK);
    assert_eq!(
        status("2001:db8:1:2::ffff", &[]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_peer_address_requests_share_one_key() {
    let limiter = RateLimiter::builder("api")
        .quota(Quota::per_minute(1))
        .build()
        .unwrap();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter, ClientIp::peer().peer_from(peer))
            .respond(HttpResponses::new()),
    );
    let bare = || Request::get("/").body(Body::empty()).unwrap();
    assert_eq!(send(&app, bare()).await.0, StatusCode::OK);
    assert_eq!(send(&app, bare()).await.0, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(start_paused = true)]
async fn per_route_keys_api_keys_and_the_whole_stack_compose_with_a_router() {
    let limiter = RateLimiter::builder("api")
        .quota(Quota::per_minute(1))
        .build()
        .unwrap();
    let route = Route::using(|ext| ext.get::<MatchedPath>().map(MatchedPath::as_str));
    let key = (
        Header::new(http::HeaderName::from_static("x-api-key")),
        route,
    );
    let app = Router::new()
        .route("/users/{id}", get(|| async { "user" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route_layer(RateLimitLayer::new(limiter, key).respond(HttpResponses::new()))
        .layer(
            ServiceBuilder::new()
                .layer(
                    TimeoutLayer::new(Duration::from_secs(1))
                        .budget(BudgetHeader::grpc_timeout())
                        .respond(HttpResponses::new()),
                )
                .layer(
                    ConcurrencyLimitLayer::builder()
                        .build()
                        .unwrap()
                        .respond(HttpResponses::new()),
                ),
        );
    let get_ = |path: &str, key: &str| request(path, "192.0.2.1", &[("x-api-key", key)]);
    assert_eq!(send(&app, get_("/users/1", "a")).await.0, StatusCode::OK);
    assert_eq!(
        send(&app, get_("/users/2", "a")).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "one route template, one key"
    );
    assert_eq!(send(&app, get_("/users/1", "b")).await.0, StatusCode::OK);
    assert_eq!(
        send(&app, get_("/slow", "a")).await.0,
        StatusCode::GATEWAY_TIMEOUT
    );
    let mut hurried = get_("/slow", "c");
    hurried
        .headers_mut()
        .insert("grpc-timeout", "10m".parse().unwrap());
    let started = tokio::time::Instant::now();
    assert_eq!(send(&app, hurried).await.0, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(started.elapsed(), Duration::from_millis(10));
}
