//! Adversarial tests of brisk-guard, written from its documentation and public API only.
//!
//! Each test names what it expects; where the docs do not promise a behaviour but a serious
//! user would expect it, the test says so in a comment ("EXPECTATION").

#![allow(clippy::all, clippy::pedantic, unused_must_use, dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use brisk_core::deadline;
use brisk_guard::ratelimit::{
    ClientIp, Global, Header, KeyFn, Outcome, Quota, RateLimitLayer, RateLimiter, Route, Tier,
};
use brisk_guard::shed::{AdaptiveLimit, ConcurrencyLimitLayer};
use brisk_guard::timeout::{BudgetFn, BudgetHeader, TimeoutLayer};
use brisk_guard::{BoxError, HttpResponses, Refusal, TimeoutCause};
use brisk_metrics::testing::Capture;
use futures_util::FutureExt;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

// ------------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------------

fn limiter(q: Quota) -> RateLimiter {
    RateLimiter::builder("t").quota(q).build().unwrap()
}

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    f.poll(&mut cx)
}

fn refusal(e: &BoxError) -> &Refusal {
    e.downcast_ref::<Refusal>()
        .unwrap_or_else(|| panic!("not a Refusal: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn req(peer: Option<&str>, xff: &[&str]) -> Request<()> {
    let mut b = Request::builder().uri("/");
    for v in xff {
        b = b.header("x-forwarded-for", *v);
    }
    let mut r = b.body(()).unwrap();
    if let Some(p) = peer {
        r.extensions_mut().insert(SocketAddr::new(ip(p), 4444));
    }
    r
}

fn ok_unit() -> impl Service<
    (),
    Response = (),
    Error = BoxError,
    Future = impl Future<Output = Result<(), BoxError>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(|_: ()| async { Ok::<_, BoxError>(()) })
}

fn ok_http() -> impl Service<
    Request<()>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<String>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::from("ok"))) })
}

fn header<'a>(r: &'a Response<String>, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Parses `"name";k=v;k=v, "name2";...` into (name, [(k, v)]) items (enough of RFC 8941 for
/// these headers). Returns None if it does not parse.
fn parse_sf_list(s: &str) -> Option<Vec<(String, Vec<(String, String)>)>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() || b[i] != b'"' {
            return None;
        }
        i += 1;
        let mut name = String::new();
        loop {
            if i >= b.len() {
                return None;
            }
            match b[i] {
                b'\\' => {
                    if i + 1 >= b.len() || !(b[i + 1] == b'"' || b[i + 1] == b'\\') {
                        return None;
                    }
                    name.push(b[i + 1] as char);
                    i += 2;
                }
                b'"' => {
                    i += 1;
                    break;
                }
                c if (0x20..0x7f).contains(&c) => {
                    name.push(c as char);
                    i += 1;
                }
                _ => return None,
            }
        }
        let mut params = Vec::new();
        while i < b.len() && b[i] == b';' {
            i += 1;
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_lowercase()
                    || b[i].is_ascii_digit()
                    || b[i] == b'_'
                    || b[i] == b'-'
                    || b[i] == b'*'
                    || b[i] == b'.')
            {
                i += 1;
            }
            let k = std::str::from_utf8(&b[start..i]).ok()?.to_owned();
            if k.is_empty() {
                return None;
            }
            let mut v = String::new();
            if i < b.len() && b[i] == b'=' {
                i += 1;
                let start = i;
                while i < b.len() && b[i] != b';' && b[i] != b',' {
                    i += 1;
                }
                v = std::str::from_utf8(&b[start..i]).ok()?.trim().to_owned();
            }
            params.push((k, v));
        }
        out.push((name, params));
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() {
            return Some(out);
        }
        if b[i] != b',' {
            return None;
        }
        i += 1;
    }
}

fn param(item: &(String, Vec<(String, String)>), k: &str) -> u64 {
    item.1
        .iter()
        .find(|(kk, _)| kk == k)
        .unwrap_or_else(|| panic!("no {k} in {item:?}"))
        .1
        .parse()
        .unwrap()
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// ------------------------------------------------------------------------------------------------
// GCRA exactness, local store, paused time
// ------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn gcra_doc_example_remaining_and_reset() {
    let l = limiter(Quota::per_minute(5));
    for i in 0..5u64 {
        let d = l.check("alice").await;
        assert_eq!(d.outcome(), Outcome::Allowed);
        assert_eq!(d.retry_after(), Duration::ZERO);
        assert_eq!(d.quotas()[0].remaining(), 4 - i);
        assert_eq!(d.quotas()[0].reset(), Duration::from_secs(12 * (i + 1)));
    }
    let r = l.check("alice").await;
    assert_eq!(r.outcome(), Outcome::Rejected);
    assert!(!r.is_allowed());
    assert_eq!(r.retry_after(), Duration::from_secs(12));
    assert_eq!(r.quotas()[0].remaining(), 0);
    assert_eq!(r.quotas()[0].reset(), Duration::from_secs(60));
    // Another key is untouched.
    assert!(l.check("bob").await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn gcra_retry_after_is_exact_for_many_shapes() {
    let shapes = [
        Quota::per_minute(5),
        Quota::per_second(20).burst(5),
        Quota::new(7, Duration::from_secs(1)),
        Quota::new(3, Duration::from_secs(10)).burst(1),
        Quota::per_hour(3600).burst(2),
        Quota::per_day(1000).burst(3),
        Quota::per_second(1).burst(10),
    ];
    for q in shapes {
        let l = limiter(q.clone());
        for round in 0..8 {
            let mut n = 0;
            let refused = loop {
                let d = l.check("k").await;
                if !d.is_allowed() {
                    break d;
                }
                n += 1;
                assert!(n < 100, "{q:?}: never refused");
            };
            let ra = refused.retry_after();
            assert!(ra > Duration::ZERO, "{q:?}: a refusal with retry_after 0");
            if ra > Duration::from_micros(1) {
                tokio::time::advance(ra - Duration::from_micros(1)).await;
                let early = l.check("k").await;
                assert!(
                    !early.is_allowed(),
                    "{q:?} round {round}: admitted 1 µs before retry_after {ra:?}"
                );
                tokio::time::advance(Duration::from_micros(1)).await;
            } else {
                tokio::time::advance(ra).await;
            }
            let d = l.check("k").await;
            assert!(
                d.is_allowed(),
                "{q:?} round {round}: refused exactly retry_after ({ra:?}) later"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn gcra_burst_then_steady_rate() {
    // "Quota::per_second(20).burst(40) admits 40 at once, then 20 a second."
    let l = limiter(Quota::per_second(20).burst(40));
    for _ in 0..40 {
        assert!(l.check_now("k").unwrap().is_allowed());
    }
    assert!(!l.check_now("k").unwrap().is_allowed());
    let mut admitted = 0;
    for _ in 0..1000 {
        tokio::time::advance(Duration::from_millis(1)).await;
        while l.check_now("k").unwrap().is_allowed() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 20, "one unit every 50 ms over one second");
}

#[test]
fn gcra_fractional_interval_rate_is_refused_at_build() {
    // 400,000 per second is one unit every 2.5 µs; times are whole microseconds, so it would be
    // enforced as 500,000/s. Such a quota is refused rather than enforced 25% too loose.
    let err = RateLimiter::builder("t")
        .quota(Quota::per_second(400_000).burst(1))
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("whole number of microseconds"),
        "{err}"
    );
    // 500,000/s (2 µs exactly) and 4,000/s (250 µs) are fine.
    assert!(
        RateLimiter::builder("t")
            .quota(Quota::per_second(500_000))
            .build()
            .is_ok()
    );
    assert!(
        RateLimiter::builder("t")
            .quota(Quota::per_second(4_000))
            .build()
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn gcra_idle_key_refills_only_to_burst() {
    let l = limiter(Quota::per_second(10).burst(3));
    tokio::time::advance(Duration::from_secs(3600)).await;
    let mut n = 0;
    while l.check_now("k").unwrap().is_allowed() {
        n += 1;
        assert!(n < 100);
    }
    assert_eq!(n, 3);
}

#[tokio::test(start_paused = true)]
async fn tier_refused_request_counts_against_no_quota() {
    let l = RateLimiter::builder("t")
        .quota(Quota::per_hour(10).named("a"))
        .quota(Quota::per_minute(3).named("b"))
        .build()
        .unwrap();
    for _ in 0..3 {
        assert!(l.check("k").await.is_allowed());
    }
    for _ in 0..5 {
        let d = l.check("k").await;
        assert_eq!(d.outcome(), Outcome::Rejected);
        assert_eq!(d.quotas().len(), 2);
        assert_eq!(d.quotas()[1].remaining(), 0, "the refusing quota has r=0");
    }
    // b gets one unit back in 20 s; a (one unit per 6 min) gets none.
    tokio::time::advance(Duration::from_secs(20)).await;
    let d = l.check("k").await;
    assert!(d.is_allowed());
    assert_eq!(
        d.quotas()[0].remaining(),
        6,
        "refusals must not count against quota a"
    );
}

#[tokio::test(start_paused = true)]
async fn tier_retry_after_is_the_longest_and_exact() {
    let l = RateLimiter::builder("t")
        .quota(Quota::per_second(2).named("s"))
        .quota(Quota::per_minute(3).named("m"))
        .build()
        .unwrap();
    assert!(l.check("k").await.is_allowed());
    assert!(l.check("k").await.is_allowed());
    let r = l.check("k").await;
    assert_eq!(r.retry_after(), Duration::from_millis(500));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(l.check("k").await.is_allowed());
    let r = l.check("k").await;
    assert!(!r.is_allowed());
    // m: three units at 0, 0, 0.5 s; each refills in 20 s from a full quota: back at 20 s.
    assert_eq!(r.retry_after(), Duration::from_millis(19_500));
    tokio::time::advance(r.retry_after()).await;
    assert!(l.check("k").await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn tiers_are_separate_and_unknown_is_default() {
    let l = RateLimiter::builder("t")
        .tier(Tier::new("free").quota(Quota::per_hour(1)))
        .tier(Tier::new("pro").quota(Quota::per_hour(3)))
        .build()
        .unwrap();
    assert!(l.check("k").await.is_allowed());
    assert!(!l.check("k").await.is_allowed());
    assert!(
        !l.check_tier("nope", "k").await.is_allowed(),
        "unknown tier is the default tier"
    );
    assert!(!l.check_tier("", "k").await.is_allowed());
    for _ in 0..3 {
        assert!(l.check_tier("pro", "k").await.is_allowed());
    }
    assert!(!l.check_tier("pro", "k").await.is_allowed());

    let l = RateLimiter::builder("t")
        .tier(Tier::new("free").quota(Quota::per_hour(1)))
        .tier(Tier::new("pro").quota(Quota::per_hour(3)))
        .default_tier("pro")
        .build()
        .unwrap();
    for _ in 0..3 {
        assert!(l.check("k").await.is_allowed());
    }
    assert!(!l.check("k").await.is_allowed());
}

#[tokio::test(start_paused = true)]
async fn check_future_and_check_now_count_once() {
    let l = limiter(Quota::per_hour(3));
    // A check future built and dropped: the local decision "is made before this returns".
    let fut = l.check("k");
    drop(fut);
    let d = l.check_now("k").unwrap();
    assert!(d.quotas()[0].remaining() <= 1);
}

// ------------------------------------------------------------------------------------------------
// Shadow mode
// ------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn shadow_rejected_requests_do_not_consume() {
    // "decides and counts exactly as an enforcing limiter would": an enforcing limiter does not
    // count a refused request against the quota, so a shadow refusal must not either.
    let l = RateLimiter::builder("t")
        .quota(Quota::per_second(2))
        .shadow(true)
        .build()
        .unwrap();
    assert!(l.is_shadow());
    assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
    assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
    for _ in 0..10 {
        let d = l.check("k").await;
        assert_eq!(d.outcome(), Outcome::ShadowRejected);
        assert!(d.is_allowed());
        assert!(
            d.retry_after() > Duration::ZERO,
            "would have been admitted later"
        );
    }
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
    assert_eq!(l.check("k").await.outcome(), Outcome::ShadowRejected);
}

#[tokio::test(start_paused = true)]
async fn decision_metrics_are_counted() {
    let cap = Capture::new();
    cap.scope(async {
        let l = RateLimiter::builder("metrics-a")
            .quota(Quota::per_hour(2))
            .build()
            .unwrap();
        let s = RateLimiter::builder("metrics-b")
            .quota(Quota::per_hour(2))
            .shadow(true)
            .build()
            .unwrap();
        for _ in 0..5 {
            l.check("k").await;
            s.check("k").await;
        }
    })
    .await;
    let c = |lim: &str, d: &str| {
        cap.counter(
            "brisk_ratelimit_decisions_total",
            &[("limiter", lim), ("decision", d)],
        )
    };
    assert_eq!(c("metrics-a", "allowed"), 2);
    assert_eq!(c("metrics-a", "rejected"), 3);
    assert_eq!(c("metrics-b", "allowed"), 2);
    assert_eq!(c("metrics-b", "shadow_rejected"), 3);
    assert_eq!(c("metrics-b", "rejected"), 0);
}

// ------------------------------------------------------------------------------------------------
// Bad configuration
// ------------------------------------------------------------------------------------------------

fn build_one(q: Quota) -> Result<RateLimiter, brisk_guard::BuildError> {
    RateLimiter::builder("t").quota(q).build()
}

#[test]
fn refuses_documented_bad_quotas() {
    assert!(build_one(Quota::per_second(0)).is_err(), "zero limit");
    assert!(
        build_one(Quota::per_second(5).burst(0)).is_err(),
        "zero burst"
    );
    assert!(
        build_one(Quota::new(5, Duration::ZERO)).is_err(),
        "zero period"
    );
    assert!(
        build_one(Quota::new(2_000_000, Duration::from_secs(1))).is_err(),
        "finer than 1/µs"
    );
    assert!(
        build_one(Quota::per_second(u32::MAX)).is_err(),
        "finer than 1/µs"
    );
    assert!(
        build_one(Quota::new(1_000_000, Duration::from_secs(1))).is_ok(),
        "exactly 1/µs"
    );
    assert!(RateLimiter::builder("t").build().is_err(), "no tier");
    assert!(
        RateLimiter::builder("t")
            .tier(Tier::new("x"))
            .build()
            .is_err(),
        "empty tier"
    );
    let five = (0..5).fold(Tier::new("x"), |t, i| t.quota(Quota::per_second(i + 1)));
    assert!(
        RateLimiter::builder("t").tier(five).build().is_err(),
        "five quotas"
    );
    let four = (0..4).fold(Tier::new("x"), |t, i| t.quota(Quota::per_second(i + 1)));
    assert!(
        RateLimiter::builder("t").tier(four).build().is_ok(),
        "four quotas"
    );
    assert!(
        RateLimiter::builder("t")
            .tier(Tier::new("x").quota(Quota::per_second(1)))
            .tier(Tier::new("x").quota(Quota::per_second(2)))
            .build()
            .is_err(),
        "two tiers with one name"
    );
    assert!(
        RateLimiter::builder("t")
            .quota(Quota::per_second(1).named("a"))
            .quota(Quota::per_minute(1).named("a"))
            .build()
            .is_err(),
        "two quotas with one name"
    );
    assert!(
        RateLimiter::builder("t")
            .quota(Quota::per_second(1))
            .default_tier("nope")
            .build()
            .is_err(),
        "unknown default tier"
    );
    for name in ["", "a b", "{x", "x}", "{}"] {
        assert!(
            RateLimiter::builder(name)
                .quota(Quota::per_second(1))
                .build()
                .is_err(),
            "limiter name {name:?}"
        );
    }
    assert!(
        RateLimiter::builder("t")
            .quota(Quota::per_second(1))
            .max_keys(15)
            .build()
            .is_err()
    );
    assert!(
        RateLimiter::builder("t")
            .quota(Quota::per_second(1))
            .max_keys(16)
            .build()
            .is_ok()
    );
    assert!(
        RateLimiter::builder("t")
            .quota(Quota::per_second(1))
            .max_keys(0)
            .build()
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn huge_periods_and_bursts_do_not_panic_or_wrap() {
    // Huge but representable settings must either be refused or work; never panic, and never
    // wrap into a quota that admits more than it should.
    let quotas = [
        Quota::new(1, Duration::MAX),
        Quota::new(u32::MAX, Duration::MAX),
        Quota::new(1, Duration::from_secs(u64::MAX)),
        Quota::new(1, Duration::from_secs(100 * 365 * 86_400)),
        Quota::per_second(10).burst(u32::MAX),
        Quota::per_day(3).burst(u32::MAX),
        Quota::per_second(1_000_000).burst(u32::MAX),
    ];
    for q in quotas {
        let built = std::panic::catch_unwind(AssertUnwindSafe(|| build_one(q.clone())));
        let Ok(built) = built else {
            panic!("build panicked for {q:?}")
        };
        let Ok(l) = built else { continue };
        let checked = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let first = l.check_now("k").unwrap();
            let second = l.check_now("k").unwrap();
            (first, second)
        }));
        let Ok((first, second)) = checked else {
            panic!("check panicked for {q:?}")
        };
        assert!(first.is_allowed(), "{q:?}: first request refused");
        let _ = second;
    }
}

#[tokio::test(start_paused = true)]
async fn one_per_huge_period_still_admits_only_one() {
    // A quota of one request per (practically) forever must admit one request, or be refused at
    // build; it must not saturate into "unlimited".
    for q in [
        Quota::new(1, Duration::from_secs(100 * 365 * 86_400)),
        Quota::new(1, Duration::from_secs(u64::MAX)),
        Quota::new(1, Duration::MAX),
    ] {
        let Ok(l) = build_one(q.clone()) else {
            continue;
        };
        assert!(l.check_now("k").unwrap().is_allowed());
        let second = l.check_now("k").unwrap();
        assert!(
            !second.is_allowed(),
            "{q:?}: admitted a second request: {second:?}"
        );
    }
}

#[test]
fn huge_max_keys_does_not_allocate_up_front() {
    // EXPECTATION: max_keys is a bound, not a preallocation; a large bound must not abort.
    let l = RateLimiter::builder("t")
        .quota(Quota::per_second(1))
        .max_keys(usize::MAX)
        .build();
    if let Ok(l) = l {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(l.check("k").await.is_allowed());
            assert!(!l.check("k").await.is_allowed());
        });
    }
}

#[tokio::test(start_paused = true)]
async fn odd_quota_names_do_not_panic() {
    for name in [
        "a\"b",
        "back\\slash",
        "naïve",
        "tab\there",
        "new\nline",
        "",
        " ",
        "a,b;c=d",
    ] {
        let r = std::panic::catch_unwind(|| {
            RateLimiter::builder("t")
                .quota(Quota::per_second(1).named(name))
                .build()
        });
        assert!(r.is_ok(), "build panicked for quota name {name:?}");
        let r = std::panic::catch_unwind(|| {
            RateLimiter::builder("t")
                .tier(Tier::new(name).quota(Quota::per_second(1)))
                .build()
        });
        assert!(r.is_ok(), "build panicked for tier name {name:?}");
    }
}

// ------------------------------------------------------------------------------------------------
// Local store bound
// ------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn key_flood_keeps_entries_at_bound() {
    let l = RateLimiter::builder("t")
        .quota(Quota::per_hour(5))
        .max_keys(1000)
        .build()
        .unwrap();
    for i in 0..200_000u32 {
        l.check_now(&format!("k{i}")).unwrap();
        if i % 997 == 0 {
            assert!(
                l.local_entries() <= 1000,
                "{} entries at {i}",
                l.local_entries()
            );
        }
    }
    assert!(l.local_entries() <= 1000, "{} entries", l.local_entries());
    assert!(l.local_entries() > 0);
}

#[tokio::test(start_paused = true)]
async fn key_flood_with_multi_quota_tier_keeps_bound() {
    let l = RateLimiter::builder("t")
        .quota(Quota::per_hour(5).named("h"))
        .quota(Quota::per_day(50).named("d"))
        .max_keys(1000)
        .build()
        .unwrap();
    for i in 0..100_000u32 {
        l.check_now(&format!("k{i}")).unwrap();
    }
    assert!(l.local_entries() <= 1000, "{} entries", l.local_entries());
}

#[tokio::test(start_paused = true)]
async fn active_key_keeps_state_under_flood_of_fresh_keys() {
    // "a key in active use keeps its state"
    let l = RateLimiter::builder("t")
        .quota(Quota::per_hour(5))
        .max_keys(1000)
        .build()
        .unwrap();
    for _ in 0..5 {
        assert!(l.check_now("hot").unwrap().is_allowed());
    }
    for i in 0..100_000u32 {
        l.check_now(&format!("k{i}")).unwrap();
        if i % 100 == 0 {
            assert!(
                !l.check_now("hot").unwrap().is_allowed(),
                "hot key forgot its state at {i}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn active_key_keeps_state_under_flood_of_exhausted_keys() {
    // "a key in active use keeps its state": the hot key is checked every few hundred flood
    // checks. The flood keys are each exhausted too (an abuser rotating through keys, then
    // coming back to its own). Time moves on a little during the flood.
    let l = RateLimiter::builder("t")
        .quota(Quota::per_hour(5))
        .max_keys(1000)
        .build()
        .unwrap();
    for _ in 0..5 {
        assert!(l.check_now("hot").unwrap().is_allowed());
    }
    for i in 0..60_000u32 {
        let k = format!("k{i}");
        for _ in 0..5 {
            l.check_now(&k).unwrap();
        }
        if i % 10 == 0 {
            tokio::time::advance(Duration::from_micros(200)).await;
            assert!(
                !l.check_now("hot").unwrap().is_allowed(),
                "hot key forgot its state at {i}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Multi-thread runtimes: exact counts
// ------------------------------------------------------------------------------------------------

fn exact_count_mt(l: RateLimiter, key: &'static str, tasks: usize, per_task: usize) -> usize {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let allowed = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(tokio::sync::Barrier::new(tasks));
        let mut hs = Vec::new();
        for _ in 0..tasks {
            let l = l.clone();
            let allowed = allowed.clone();
            let start = start.clone();
            hs.push(tokio::spawn(async move {
                start.wait().await;
                for _ in 0..per_task {
                    if l.check(key).await.is_allowed() {
                        allowed.fetch_add(1, SeqCst);
                    }
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        allowed.load(SeqCst)
    })
}

#[test]
fn multithread_single_quota_exact() {
    let l = limiter(Quota::per_day(1000));
    assert_eq!(exact_count_mt(l, "k", 8, 500), 1000);
}

#[test]
fn multithread_global_key_exact() {
    let l = limiter(Quota::per_day(1000));
    assert_eq!(exact_count_mt(l, "", 8, 500), 1000);
}

#[test]
fn multithread_multi_quota_exact() {
    let l = RateLimiter::builder("t")
        .quota(Quota::per_day(1000).named("a"))
        .quota(Quota::per_day(500).named("b"))
        .build()
        .unwrap();
    assert_eq!(exact_count_mt(l.clone(), "k", 8, 500), 500);
    let d = l.check_now("k").unwrap();
    assert_eq!(
        d.quotas()[0].remaining(),
        500,
        "quota a counted exactly the 500 admitted"
    );
}

// ------------------------------------------------------------------------------------------------
// RateLimitLayer: poll_ready, clones, keys, tiers, panics, cancellation
// ------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn layer_poll_ready_does_not_consume_quota() {
    let l = limiter(Quota::per_hour(2));
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(l.clone(), Global))
        .service(ok_unit());
    for _ in 0..100 {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    }
    svc.call(()).await.unwrap();
    svc.ready().await.unwrap().call(()).await.unwrap();
    let e = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(matches!(refusal(&e), Refusal::RateLimited(_)));
}

#[tokio::test(start_paused = true)]
async fn layer_clones_and_layers_share_one_limit() {
    let l = limiter(Quota::per_hour(3));
    let layer = RateLimitLayer::new(l.clone(), Global);
    let a = ServiceBuilder::new()
        .layer(layer.clone())
        .service(ok_unit());
    let b = ServiceBuilder::new().layer(layer).service(ok_unit());
    let c = ServiceBuilder::new()
        .layer(RateLimitLayer::new(l.clone(), Global))
        .service(ok_unit());
    let mut ok = 0;
    for _ in 0..4 {
        for s in [a.clone(), b.clone(), c.clone()] {
            if s.oneshot(()).await.is_ok() {
                ok += 1;
            }
        }
    }
    assert_eq!(ok, 3);
}

#[tokio::test(start_paused = true)]
async fn layer_requests_without_key_share_one_key() {
    let l = limiter(Quota::per_hour(2));
    let key = |r: &u32| {
        if *r >= 100 {
            None
        } else {
            Some(format!("user{r}"))
        }
    };
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(l, key))
        .service(service_fn(|_: u32| async { Ok::<_, BoxError>(()) }));
    assert!(svc.clone().oneshot(100).await.is_ok());
    assert!(svc.clone().oneshot(101).await.is_ok());
    assert!(
        svc.clone().oneshot(102).await.is_err(),
        "keyless requests share one quota"
    );
    assert!(
        svc.clone().oneshot(1).await.is_ok(),
        "keyed requests are separate"
    );
}

#[tokio::test(start_paused = true)]
async fn layer_key_closure_panic_leaves_limiter_usable() {
    let l = limiter(Quota::per_hour(2));
    let key = |r: &u32| {
        if *r == 666 {
            panic!("key closure blew up");
        }
        Some(String::from("k"))
    };
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(l.clone(), key))
        .service(service_fn(|_: u32| async { Ok::<_, BoxError>(()) }));
    for _ in 0..3 {
        svc.ready().await.unwrap();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _ = svc.call(666);
        }));
        assert!(r.is_err());
    }
    assert!(svc.ready().await.unwrap().call(1).await.is_ok());
    assert!(svc.ready().await.unwrap().call(1).await.is_ok());
    assert!(
        svc.ready().await.unwrap().call(1).await.is_err(),
        "the panics counted nothing; the third is refused"
    );
}

fn tiered() -> RateLimiter {
    RateLimiter::builder("t")
        .tier(Tier::new("free").quota(Quota::per_hour(1)))
        .tier(Tier::new("pro").quota(Quota::per_hour(3)))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn layer_tier_resolver_picks_tier() {
    let l = tiered();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(l, |_: &&'static str| Some(String::from("k"))).tiers(
                |r: &&'static str| {
                    let t = *r;
                    async move { (!t.is_empty()).then_some(t) }
                },
            ),
        )
        .service(service_fn(|_: &'static str| async {
            Ok::<_, BoxError>(())
        }));
    for _ in 0..3 {
        assert!(svc.clone().oneshot("pro").await.is_ok());
    }
    assert!(svc.clone().oneshot("pro").await.is_err());
    assert!(svc.clone().oneshot("free").await.is_ok());
    assert!(svc.clone().oneshot("free").await.is_err());
    assert!(
        svc.clone().oneshot("gold").await.is_err(),
        "unknown tier is the default (free)"
    );
    let e = svc.clone().oneshot("").await.unwrap_err();
    match refusal(&e) {
        Refusal::RateLimited(r) => {
            assert_eq!(r.tier(), "free");
            assert_eq!(r.retry_after(), Duration::from_secs(3600));
            assert!(!r.decision().is_allowed());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn layer_resolver_that_never_completes_holds_nothing() {
    let l = limiter(Quota::per_hour(2));
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(l.clone(), Global)
                .tiers(|_: &()| std::future::pending::<Option<&'static str>>()),
        )
        .service(ok_unit());
    for _ in 0..1000 {
        let mut s = svc.clone();
        s.ready().await.unwrap();
        let mut f = Box::pin(s.call(()));
        assert!(poll_once(f.as_mut()).is_pending());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(poll_once(f.as_mut()).is_pending());
        drop(f);
    }
    let d = l.check_now("").unwrap();
    assert!(d.is_allowed());
    assert_eq!(
        d.quotas()[0].remaining(),
        1,
        "pending resolvers counted nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn layer_slow_resolver_under_timeout_counts_nothing() {
    let l = limiter(Quota::per_hour(1));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .layer(
            RateLimitLayer::new(l.clone(), Global).tiers(|_: &()| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                None::<&'static str>
            }),
        )
        .service(ok_unit());
    let e = svc.oneshot(()).await.unwrap_err();
    assert!(matches!(refusal(&e), Refusal::TimedOut(_)));
    assert!(
        l.check_now("").unwrap().is_allowed(),
        "timed out before the check: nothing counted"
    );
}

#[test]
fn layer_resolver_panic_leaves_limiter_usable() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = limiter(Quota::per_hour(2));
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(l.clone(), Global).tiers(|r: &u32| {
                let r = *r;
                async move {
                    if r == 666 {
                        panic!("resolver blew up");
                    }
                    None::<&'static str>
                }
            }))
            .service(service_fn(|_: u32| async { Ok::<_, BoxError>(()) }));
        for _ in 0..3 {
            let s = svc.clone();
            let j = AssertUnwindSafe(s.oneshot(666)).catch_unwind().await;
            assert!(j.is_err());
        }
        assert!(svc.clone().oneshot(1).await.is_ok());
        assert!(svc.clone().oneshot(1).await.is_ok());
        assert!(svc.clone().oneshot(1).await.is_err());
    });
}

#[test]
fn layer_inner_panic_leaves_limiter_usable() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = limiter(Quota::per_hour(3));
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(l.clone(), Global))
            .service(service_fn(|r: u32| async move {
                if r == 666 {
                    panic!("inner blew up");
                }
                Ok::<_, BoxError>(())
            }));
        let s = svc.clone();
        assert!(
            AssertUnwindSafe(s.oneshot(666))
                .catch_unwind()
                .await
                .is_err()
        );
        assert!(svc.clone().oneshot(1).await.is_ok());
        assert!(svc.clone().oneshot(1).await.is_ok());
        assert!(
            svc.clone().oneshot(1).await.is_err(),
            "the panicking request was counted"
        );
    });
}

/// A service that records calls made on a clone that was not readied (tower's contract).
struct Strict {
    ready: bool,
    violations: Arc<AtomicUsize>,
}
impl Clone for Strict {
    fn clone(&self) -> Self {
        Self {
            ready: false,
            violations: self.violations.clone(),
        }
    }
}
impl Service<()> for Strict {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: ()) -> Self::Future {
        if !self.ready {
            self.violations.fetch_add(1, SeqCst);
        }
        self.ready = false;
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn layer_calls_only_readied_inner_services() {
    let violations = Arc::new(AtomicUsize::new(0));
    let inner = Strict {
        ready: false,
        violations: violations.clone(),
    };
    let l = limiter(Quota::per_hour(100));
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(l.clone(), Global).tiers(|_: &()| async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                None::<&'static str>
            }),
        )
        .service(inner.clone());
    let mut plain = ServiceBuilder::new()
        .layer(RateLimitLayer::new(l, Global))
        .service(inner);
    for _ in 0..5 {
        svc.ready().await.unwrap().call(()).await.unwrap();
        plain.ready().await.unwrap().call(()).await.unwrap();
    }
    assert_eq!(violations.load(SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn layer_passes_inner_errors_through() {
    #[derive(Debug)]
    struct Mine;
    impl std::fmt::Display for Mine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("mine")
        }
    }
    impl std::error::Error for Mine {}
    let l = limiter(Quota::per_hour(100));
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(l, Global))
        .service(service_fn(|_: ()| async { Err::<(), _>(Mine) }));
    let e = svc.oneshot(()).await.unwrap_err();
    assert!(e.downcast_ref::<Mine>().is_some(), "inner error kept: {e}");
    assert!(e.downcast_ref::<Refusal>().is_none());
}

// ------------------------------------------------------------------------------------------------
// Keys: ClientIp, Header, Route, pairs
// ------------------------------------------------------------------------------------------------

#[test]
fn client_ip_peer_from_socketaddr_and_ipaddr() {
    let k = ClientIp::peer();
    let a = k.key(&req(Some("1.2.3.4"), &[]));
    assert!(a.is_some());
    let mut r = Request::builder().body(()).unwrap();
    r.extensions_mut().insert(ip("1.2.3.4"));
    assert_eq!(k.key(&r), a, "IpAddr extension is read too");
    assert_eq!(k.key(&req(None, &[])), None, "no peer is no key");
    // The port is not part of the key.
    let mut r = Request::builder().body(()).unwrap();
    r.extensions_mut()
        .insert(SocketAddr::new(ip("1.2.3.4"), 9999));
    assert_eq!(k.key(&r), a);
    assert_ne!(k.key(&req(Some("1.2.3.5"), &[])), a);
    // peer() ignores X-Forwarded-For entirely.
    assert_eq!(k.key(&req(Some("1.2.3.4"), &["9.9.9.9"])), a);
}

#[test]
fn client_ip_ipv6_keyed_by_64() {
    let k = ClientIp::peer();
    let a = k.key(&req(Some("2001:db8:1:2::1"), &[]));
    assert_eq!(
        k.key(&req(Some("2001:db8:1:2:ffff:ffff:ffff:ffff"), &[])),
        a
    );
    assert_ne!(k.key(&req(Some("2001:db8:1:3::1"), &[])), a);
    let k128 = ClientIp::peer().ipv6_prefix(128);
    assert_ne!(
        k128.key(&req(Some("2001:db8:1:2::1"), &[])),
        k128.key(&req(Some("2001:db8:1:2::2"), &[]))
    );
}

#[test]
fn client_ip_ipv4_mapped_ipv6_peers_are_distinct_clients() {
    // EXPECTATION: a dual-stack listener ([::]) reports IPv4 clients as ::ffff:a.b.c.d. Keying
    // those by their /64 would put every IPv4 client on the internet under one key.
    let k = ClientIp::peer();
    let a = k.key(&req(Some("::ffff:1.2.3.4"), &[]));
    let b = k.key(&req(Some("::ffff:5.6.7.8"), &[]));
    assert_ne!(
        a, b,
        "two IPv4 clients seen through a dual-stack socket share one key"
    );
    assert_eq!(
        a,
        k.key(&req(Some("1.2.3.4"), &[])),
        "::ffff:1.2.3.4 is the client 1.2.3.4"
    );
}

#[test]
fn client_ip_ipv6_prefix_extremes_do_not_panic() {
    for bits in [0u8, 1, 63, 64, 65, 127, 128, 129, 200, 255] {
        let k = ClientIp::peer().ipv6_prefix(bits);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            (
                k.key(&req(Some("2001:db8::1"), &[])),
                k.key(&req(Some("2001:db9::1"), &[])),
                k.key(&req(Some("1.2.3.4"), &[])),
            )
        }));
        let Ok((a, b, v4)) = r else {
            panic!("ipv6_prefix({bits}) panicked")
        };
        assert!(a.is_some() && b.is_some() && v4.is_some());
        if bits == 0 {
            assert_eq!(a, b, "a /0 prefix keys every IPv6 client alike");
        }
        if bits >= 32 {
            assert_ne!(a, b);
        }
    }
}

fn behind() -> ClientIp {
    ClientIp::behind(["10.0.0.0/8", "2001:db8:ffff::/48"]).unwrap()
}

#[test]
fn client_ip_behind_rightmost_untrusted_wins() {
    let k = behind();
    let client = k.key(&req(Some("10.0.0.1"), &["1.2.3.4"]));
    assert!(client.is_some());
    assert_eq!(
        k.key(&req(Some("10.0.0.1"), &["6.6.6.6, 1.2.3.4"])),
        client,
        "spoofed left part ignored"
    );
    assert_eq!(k.key(&req(Some("10.0.0.1"), &["7.7.7.7,1.2.3.4"])), client);
    assert_eq!(
        k.key(&req(Some("10.0.0.1"), &["1.2.3.4, 10.0.0.7"])),
        client,
        "trusted hops skipped"
    );
    assert_eq!(
        k.key(&req(Some("10.0.0.1"), &["1.2.3.4", "10.0.0.7"])),
        client,
        "several header lines"
    );
    assert_eq!(
        k.key(&req(Some("10.0.0.1"), &["6.6.6.6", "1.2.3.4"])),
        client,
        "several header lines"
    );
    assert_eq!(
        k.key(&req(Some("10.0.0.1"), &["  6.6.6.6 ,\t1.2.3.4  "])),
        client,
        "whitespace"
    );
    assert_eq!(
        k.key(&req(Some("10.0.0.1"), &["garbage, 1.2.3.4"])),
        client,
        "garbage left of the client"
    );
    assert_ne!(k.key(&req(Some("10.0.0.1"), &["1.2.3.5"])), client);
    // The same client connecting directly is the same key.
    assert_eq!(k.key(&req(Some("1.2.3.4"), &[])), client);
}

#[test]
fn client_ip_behind_untrusted_peer_ignores_header() {
    let k = behind();
    let a = k.key(&req(Some("8.8.8.8"), &["1.2.3.4"]));
    assert_eq!(a, k.key(&req(Some("8.8.8.8"), &["9.9.9.9"])));
    assert_eq!(a, k.key(&req(Some("8.8.8.8"), &[])));
    assert_ne!(a, k.key(&req(Some("10.0.0.1"), &["1.2.3.4"])));
}

#[test]
fn client_ip_behind_unparseable_hop_is_the_proxy() {
    // "A hop that does not parse stops the walk: the key is the proxy that vouched for it."
    let k = behind();
    let proxy = k.key(&req(Some("10.0.0.1"), &[]));
    for bad in [
        "1.2.3.4, garbage",
        "5.6.7.8, garbage",
        "1.2.3.4, ",
        "1.2.3.4, unknown",
        "1.2.3.4, fe80::1%eth0",
    ] {
        let got = k.key(&req(Some("10.0.0.1"), &[bad]));
        assert_eq!(got, proxy, "xff {bad:?}");
    }
    // Nothing a client writes may choose its key: the left of a bad hop is never read.
    for (bad, spoof) in [
        ("6.6.6.6, 1.2.3.4:80", "6.6.6.6"),
        ("6.6.6.6, [2001:db8::1]:443", "6.6.6.6"),
    ] {
        let got = k.key(&req(Some("10.0.0.1"), &[bad]));
        assert_ne!(
            got,
            k.key(&req(Some(spoof), &[])),
            "xff {bad:?} let the client choose"
        );
    }
}

#[test]
fn client_ip_behind_ipv6_forwarded_keyed_by_64() {
    let k = behind();
    let a = k.key(&req(Some("10.0.0.1"), &["2001:db8:1:2::1"]));
    assert_eq!(a, k.key(&req(Some("10.0.0.1"), &["2001:db8:1:2::99"])));
    assert_ne!(a, k.key(&req(Some("10.0.0.1"), &["2001:db8:1:3::1"])));
    // An IPv6 trusted proxy range.
    assert_eq!(
        a,
        k.key(&req(Some("2001:db8:ffff::1"), &["2001:db8:1:2::5"]))
    );
}

#[test]
fn client_ip_behind_huge_headers_are_cheap_and_safe() {
    let k = behind();
    let hops: Vec<String> = (0..20_000)
        .map(|i| format!("11.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let joined = hops.join(", ");
    let start = std::time::Instant::now();
    let got = k.key(&req(Some("10.0.0.1"), &[joined.as_str()]));
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(got, k.key(&req(Some(hops.last().unwrap()), &[])));
    let lines: Vec<&str> = hops.iter().map(String::as_str).collect();
    let start = std::time::Instant::now();
    let got = k.key(&req(Some("10.0.0.1"), &lines));
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(got, k.key(&req(Some(hops.last().unwrap()), &[])));
    // Bytes that are not UTF-8.
    let mut r = req(Some("10.0.0.1"), &[]);
    r.headers_mut().append(
        "x-forwarded-for",
        HeaderValue::from_bytes(b"1.2.3.4, \xff\xfe").unwrap(),
    );
    assert!(k.key(&r).is_some());
    let mut r = req(Some("10.0.0.1"), &[]);
    r.headers_mut()
        .append("x-forwarded-for", HeaderValue::from_static(""));
    assert!(k.key(&r).is_some());
}

#[test]
fn client_ip_behind_validates_entries() {
    for bad in [
        "10.0.0.0/33",
        "::/129",
        "garbage",
        "",
        "10.0.0.0/",
        "/8",
        "10.0.0.0/-1",
        "10.0.0.0/8/8",
        "300.1.1.1",
    ] {
        assert!(ClientIp::behind([bad]).is_err(), "{bad:?} accepted");
    }
    for good in [
        "10.0.0.1",
        "::1",
        "2001:db8::/32",
        "0.0.0.0/0",
        "127.0.0.1/32",
        "::/0",
    ] {
        assert!(ClientIp::behind([good]).is_ok(), "{good:?} refused");
    }
}

#[test]
fn client_ip_behind_custom_header() {
    let k = ClientIp::behind(["10.0.0.0/8"])
        .unwrap()
        .header(HeaderName::from_static("x-real-ip"));
    let mut r = req(Some("10.0.0.1"), &["6.6.6.6"]);
    r.headers_mut()
        .insert("x-real-ip", HeaderValue::from_static("1.2.3.4"));
    assert_eq!(k.key(&r), k.key(&req(Some("1.2.3.4"), &[])));
}

#[test]
fn header_and_route_keys() {
    let h = Header::new(HeaderName::from_static("x-api-key"));
    let mut r = Request::builder().body(()).unwrap();
    assert_eq!(h.key(&r), None);
    r.headers_mut()
        .insert("x-api-key", HeaderValue::from_static(""));
    assert_eq!(h.key(&r), None, "empty is no key");
    r.headers_mut().insert(
        "x-api-key",
        HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
    );
    assert_eq!(h.key(&r), None, "not visible ASCII is no key");
    r.headers_mut()
        .insert("x-api-key", HeaderValue::from_static("abc"));
    assert_eq!(h.key(&r).as_deref(), Some("abc"));

    let route = Route::template();
    let mut r = Request::builder().body(()).unwrap();
    assert_eq!(route.key(&r), None);
    r.extensions_mut()
        .insert(brisk_metrics::http::RouteTemplate::new("/users/{id}"));
    assert_eq!(route.key(&r).as_deref(), Some("/users/{id}"));
}

#[test]
fn pair_keys_are_injective() {
    // EXPECTATION: a pair (a, b) keys "by both"; two different pairs must not share a key. Key
    // closures are user code and may return any string (a query parameter, say).
    let p1 = (
        |_: &()| Some(String::from("a\u{1f}b")),
        |_: &()| Some(String::from("c")),
    );
    let p2 = (
        |_: &()| Some(String::from("a")),
        |_: &()| Some(String::from("b\u{1f}c")),
    );
    assert_ne!(p1.key(&()), p2.key(&()));
}

#[test]
fn pair_with_missing_part_is_the_shared_no_key() {
    let p = (|_: &()| Some(String::from("a")), |_: &()| None::<String>);
    assert_eq!(p.key(&()), None);
}

#[tokio::test(start_paused = true)]
async fn huge_header_key_works_and_is_bounded() {
    let l = RateLimiter::builder("t")
        .quota(Quota::per_hour(1))
        .build()
        .unwrap();
    let big = "x".repeat(1 << 20);
    let big2 = format!("{}y", "x".repeat((1 << 20) - 1));
    assert!(l.check(&big).await.is_allowed());
    assert!(!l.check(&big).await.is_allowed());
    assert!(
        l.check(&big2).await.is_allowed(),
        "keys differing in the last byte are distinct"
    );
}

// ------------------------------------------------------------------------------------------------
// HTTP responses and headers
// ------------------------------------------------------------------------------------------------

fn http_limited(
    l: RateLimiter,
    respond: HttpResponses,
) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> + Clone {
    ServiceBuilder::new()
        .layer(RateLimitLayer::new(l, Global).respond(respond))
        .service(ok_http())
}

#[tokio::test(start_paused = true)]
async fn http_429_headers_agree() {
    let l = RateLimiter::builder("api")
        .quota(Quota::per_second(2).named("burst"))
        .quota(Quota::per_day(1000).named("daily"))
        .build()
        .unwrap();
    let svc = http_limited(l, HttpResponses::new());
    for _ in 0..2 {
        let r = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers().get("ratelimit").is_none(),
            "not on admitted responses by default"
        );
    }
    let r = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.body().is_empty());
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert_eq!(retry, 1, "500 ms rounded up");
    let policy = parse_sf_list(header(&r, "ratelimit-policy").unwrap()).expect("policy parses");
    let state = parse_sf_list(header(&r, "ratelimit").unwrap()).expect("ratelimit parses");
    assert_eq!(policy.len(), 2);
    assert_eq!(state.len(), 2);
    assert_eq!(policy[0].0, "burst");
    assert_eq!(policy[1].0, "daily");
    assert_eq!(state[0].0, "burst");
    assert_eq!(state[1].0, "daily");
    assert_eq!(param(&policy[0], "q"), 2);
    assert_eq!(param(&policy[0], "w"), 1);
    assert_eq!(param(&policy[1], "q"), 1000);
    assert_eq!(param(&policy[1], "w"), 86_400);
    assert_eq!(param(&state[0], "r"), 0, "the refusing quota has r=0");
    assert_eq!(param(&state[0], "t"), 1);
    assert_eq!(param(&state[1], "r"), 998, "two counted, the refusal not");
    assert_eq!(param(&state[1], "t"), 173, "2 × 86.4 s rounded up");
    assert!(param(&state[0], "t") >= retry);
}

#[tokio::test(start_paused = true)]
async fn http_default_quota_names_and_windows() {
    let l = RateLimiter::builder("api")
        .quota(Quota::per_minute(5))
        .build()
        .unwrap();
    let svc = http_limited(l, HttpResponses::new());
    for _ in 0..5 {
        svc.clone().oneshot(Request::new(())).await.unwrap();
    }
    let r = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), Some("12"));
    let policy = parse_sf_list(header(&r, "ratelimit-policy").unwrap()).unwrap();
    assert_eq!(policy[0].0, "default-5-per-60s");
    assert_eq!(param(&policy[0], "q"), 5);
    assert_eq!(param(&policy[0], "w"), 60);
    let state = parse_sf_list(header(&r, "ratelimit").unwrap()).unwrap();
    assert_eq!(state[0].0, policy[0].0);
    assert_eq!(param(&state[0], "t"), 60);
}

#[tokio::test(start_paused = true)]
async fn http_sub_second_window_is_not_zero() {
    // `w` is a window in seconds; a 500 ms quota must not advertise a window of 0 (a client
    // would divide by it), and two quotas must not get one name.
    let l = RateLimiter::builder("api")
        .quota(Quota::new(5, Duration::from_millis(500)))
        .quota(Quota::new(5, Duration::from_millis(800)))
        .build();
    let Ok(l) = l else { return };
    let svc = http_limited(l, HttpResponses::new());
    let mut last = None;
    for _ in 0..6 {
        last = Some(svc.clone().oneshot(Request::new(())).await.unwrap());
    }
    let r = last.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let policy = parse_sf_list(header(&r, "ratelimit-policy").unwrap()).unwrap();
    for item in &policy {
        assert!(param(item, "w") >= 1, "{item:?}");
    }
    assert_ne!(policy[0].0, policy[1].0, "distinct names");
    assert!(header(&r, "retry-after").unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test(start_paused = true)]
async fn http_admitted_headers_when_enabled() {
    let l = RateLimiter::builder("api")
        .quota(Quota::per_minute(3).named("m"))
        .build()
        .unwrap();
    let svc = http_limited(l, HttpResponses::new().headers_when_admitted(true));
    for left in [2u64, 1, 0] {
        let r = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let state = parse_sf_list(header(&r, "ratelimit").expect("RateLimit on admitted")).unwrap();
        assert_eq!(param(&state[0], "r"), left);
        assert_eq!(param(&state[0], "t"), 20 * (3 - left));
        assert!(header(&r, "ratelimit-policy").is_some());
        assert!(header(&r, "retry-after").is_none());
    }
    let r = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(start_paused = true)]
async fn http_shadow_sends_no_headers_and_never_refuses() {
    let cap = Capture::new();
    let l = cap.run(|| {
        RateLimiter::builder("shadowed")
            .quota(Quota::per_minute(1))
            .shadow(true)
            .build()
            .unwrap()
    });
    let svc = http_limited(l, HttpResponses::new().headers_when_admitted(true));
    cap.scope(async {
        for _ in 0..5 {
            let r = svc.clone().oneshot(Request::new(())).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.headers().get("ratelimit").is_none());
            assert!(r.headers().get("ratelimit-policy").is_none());
            assert!(r.headers().get("retry-after").is_none());
        }
    })
    .await;
    let c = |d: &str| {
        cap.counter(
            "brisk_ratelimit_decisions_total",
            &[("limiter", "shadowed"), ("decision", d)],
        )
    };
    assert_eq!(c("allowed"), 1);
    assert_eq!(c("shadow_rejected"), 4);
}

#[tokio::test(start_paused = true)]
async fn http_quota_names_are_valid_structured_strings() {
    for name in ["a\"b", "back\\slash", "naïve", "tab\there", "a,b;c=d"] {
        let Ok(l) = RateLimiter::builder("api")
            .quota(Quota::per_minute(1).named(name))
            .build()
        else {
            continue; // refusing it at build is fine
        };
        let svc = http_limited(l, HttpResponses::new());
        svc.clone().oneshot(Request::new(())).await.unwrap();
        let r = std::panic::AssertUnwindSafe(svc.clone().oneshot(Request::new(())))
            .catch_unwind()
            .await;
        let Ok(Ok(r)) = r else {
            panic!("refusing with quota name {name:?} panicked")
        };
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let policy = r
            .headers()
            .get("ratelimit-policy")
            .expect("policy")
            .to_str()
            .map(str::to_owned);
        let policy = policy.unwrap_or_default();
        let parsed = parse_sf_list(&policy);
        assert!(
            parsed
                .as_ref()
                .is_some_and(|p| p.len() == 1 && p[0].0 == name),
            "quota name {name:?} rendered as {policy:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn http_retry_after_rounds_up_and_matches_decision() {
    for q in [
        Quota::per_second(20).burst(1),
        Quota::new(3, Duration::from_secs(10)),
        Quota::per_hour(7),
    ] {
        let l = RateLimiter::builder("api")
            .quota(q.clone())
            .build()
            .unwrap();
        let svc = http_limited(l.clone(), HttpResponses::new());
        let r = loop {
            let r = svc.clone().oneshot(Request::new(())).await.unwrap();
            if r.status() != StatusCode::OK {
                break r;
            }
        };
        let d = l.check_now("").unwrap();
        assert!(!d.is_allowed());
        let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
        assert_eq!(retry, ceil_secs(d.retry_after()), "{q:?}");
        assert!(retry >= 1);
        let state = parse_sf_list(header(&r, "ratelimit").unwrap()).unwrap();
        assert_eq!(
            param(&state[0], "t"),
            ceil_secs(d.quotas()[0].reset()),
            "{q:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn http_axum_route_template_keys() {
    use axum::Router;
    use axum::extract::MatchedPath;
    use axum::routing::get;
    let l = RateLimiter::builder("api")
        .quota(Quota::per_hour(2))
        .build()
        .unwrap();
    let app: Router = Router::new()
        .route("/users/{id}", get(|| async { "u" }))
        .route("/other", get(|| async { "o" }))
        .layer(
            RateLimitLayer::new(
                l,
                Route::using(|ext| ext.get::<MatchedPath>().map(MatchedPath::as_str)),
            )
            .respond(HttpResponses::new()),
        );
    let call = |path: &str| {
        let app = app.clone();
        let r = Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        async move { app.oneshot(r).await.unwrap().status() }
    };
    assert_eq!(call("/users/1").await, StatusCode::OK);
    assert_eq!(call("/users/2").await, StatusCode::OK);
    assert_eq!(
        call("/users/3").await,
        StatusCode::TOO_MANY_REQUESTS,
        "one template, one quota"
    );
    assert_eq!(call("/other").await, StatusCode::OK);
}

// ------------------------------------------------------------------------------------------------
// TimeoutLayer
// ------------------------------------------------------------------------------------------------

fn timed_out(e: &BoxError) -> (Duration, TimeoutCause) {
    match refusal(e) {
        Refusal::TimedOut(t) => (t.after(), t.cause()),
        other => panic!("not TimedOut: {other:?}"),
    }
}

/// A handler that records the budget it saw and then sleeps `sleep`.
fn sleepy(
    sleep: Duration,
    seen: Arc<std::sync::Mutex<Option<Option<Duration>>>>,
) -> impl Service<
    Request<()>,
    Response = (),
    Error = BoxError,
    Future = impl Future<Output = Result<(), BoxError>> + Send,
> + Clone {
    service_fn(move |_: Request<()>| {
        let seen = seen.clone();
        async move {
            *seen.lock().unwrap() = Some(deadline::remaining());
            tokio::time::sleep(sleep).await;
            Ok::<_, BoxError>(())
        }
    })
}

fn budget_req(name: &str, value: &str) -> Request<()> {
    Request::builder().header(name, value).body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn timeout_fires_exactly_and_scopes_the_handler() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(sleepy(Duration::from_secs(1), seen.clone()));
    let t0 = Instant::now();
    let e = svc.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(100));
    assert_eq!(
        timed_out(&e),
        (Duration::from_millis(100), TimeoutCause::Timeout)
    );
    assert_eq!(
        *seen.lock().unwrap(),
        Some(Some(Duration::from_millis(100)))
    );
    assert!(!e.to_string().is_empty());
}

#[tokio::test(start_paused = true)]
async fn timeout_fast_handler_passes() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(sleepy(Duration::from_millis(99), seen));
    svc.oneshot(Request::new(())).await.unwrap();
}

#[test]
fn budget_grpc_timeout_parsing() {
    let b = BudgetHeader::grpc_timeout();
    let p = |v: &str| b.budget(&budget_req("grpc-timeout", v));
    assert_eq!(b.budget(&Request::new(())), None);
    assert_eq!(p("250m"), Some(Ok(Duration::from_millis(250))));
    assert_eq!(p("2S"), Some(Ok(Duration::from_secs(2))));
    assert_eq!(p("1M"), Some(Ok(Duration::from_secs(60))));
    assert_eq!(p("1H"), Some(Ok(Duration::from_secs(3600))));
    assert_eq!(p("100u"), Some(Ok(Duration::from_micros(100))));
    assert_eq!(p("100n"), Some(Ok(Duration::from_nanos(100))));
    assert_eq!(p("0m"), Some(Ok(Duration::ZERO)));
    assert_eq!(p("12345678m"), Some(Ok(Duration::from_millis(12_345_678))));
    assert_eq!(
        p("99999999H"),
        Some(Ok(Duration::from_secs(99_999_999 * 3600)))
    );
    for bad in [
        "123456789m",
        "",
        "m",
        "5",
        "-1m",
        "+1m",
        "1x",
        "1 m",
        "1.5S",
        "1ms",
        "1s",
        "1h",
        "٣m",
        "1mm",
    ] {
        assert_eq!(p(bad), Some(Err(())), "grpc-timeout {bad:?}");
    }
    let mut r = Request::new(());
    r.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_bytes(b"1\xffm").unwrap());
    assert_eq!(b.budget(&r), Some(Err(())));
}

#[test]
fn budget_millis_parsing_and_chain() {
    let b = BudgetHeader::millis("x-request-timeout-ms");
    let p = |v: &str| b.budget(&budget_req("x-request-timeout-ms", v));
    assert_eq!(p("250"), Some(Ok(Duration::from_millis(250))));
    assert_eq!(p("0"), Some(Ok(Duration::ZERO)));
    // u64::MAX ms: malformed or huge, both leave only the layer's timeout; never a panic.
    let _ = p("18446744073709551615");
    for bad in ["", "abc", "-5", "1.5", "250ms", "1e3", "0x10"] {
        assert_eq!(p(bad), Some(Err(())), "millis {bad:?}");
    }
    // A number too large for u64 is either malformed or a huge budget; never a panic.
    let _ = p("99999999999999999999999999");

    let chain = BudgetHeader::grpc_timeout().or_millis("x-request-timeout-ms");
    let mut r = budget_req("x-request-timeout-ms", "70");
    assert_eq!(chain.budget(&r), Some(Ok(Duration::from_millis(70))));
    r.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("20m"));
    assert_eq!(
        chain.budget(&r),
        Some(Ok(Duration::from_millis(20))),
        "the first present wins"
    );
    let chain = BudgetHeader::millis("a").or_millis("b").or_grpc_timeout();
    assert_eq!(
        chain.budget(&budget_req("grpc-timeout", "3S")),
        Some(Ok(Duration::from_secs(3)))
    );
    assert_eq!(
        chain.budget(&budget_req("b", "4")),
        Some(Ok(Duration::from_millis(4)))
    );
    assert_eq!(chain.budget(&Request::new(())), None);
}

#[tokio::test(start_paused = true)]
async fn timeout_budget_shorter_wins_longer_is_clamped() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)).budget(BudgetHeader::grpc_timeout()))
        .service(sleepy(Duration::from_secs(10), seen.clone()));
    let t0 = Instant::now();
    let e = svc
        .clone()
        .oneshot(budget_req("grpc-timeout", "50m"))
        .await
        .unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(50));
    assert_eq!(
        timed_out(&e),
        (Duration::from_millis(50), TimeoutCause::Budget)
    );
    assert_eq!(*seen.lock().unwrap(), Some(Some(Duration::from_millis(50))));

    let t0 = Instant::now();
    let e = svc
        .clone()
        .oneshot(budget_req("grpc-timeout", "1H"))
        .await
        .unwrap_err();
    assert_eq!(
        Instant::now() - t0,
        Duration::from_secs(1),
        "a caller cannot buy more time"
    );
    assert_eq!(timed_out(&e).0, Duration::from_secs(1));
    assert_eq!(*seen.lock().unwrap(), Some(Some(Duration::from_secs(1))));

    let t0 = Instant::now();
    let e = svc
        .clone()
        .oneshot(budget_req("grpc-timeout", "bogus"))
        .await
        .unwrap_err();
    assert_eq!(
        Instant::now() - t0,
        Duration::from_secs(1),
        "a malformed budget is ignored"
    );
    assert_eq!(
        timed_out(&e),
        (Duration::from_secs(1), TimeoutCause::Timeout)
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_zero_budget_times_out_at_once() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)).budget(BudgetHeader::millis("x-ms")))
        .service(sleepy(Duration::from_secs(10), seen));
    let t0 = Instant::now();
    let e = svc.oneshot(budget_req("x-ms", "0")).await.unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::ZERO);
    assert_eq!(timed_out(&e), (Duration::ZERO, TimeoutCause::Budget));
}

#[tokio::test(start_paused = true)]
async fn timeout_duration_max_leaves_only_budget_and_deadline() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::MAX).budget(BudgetHeader::grpc_timeout()))
        .service(sleepy(Duration::from_secs(86_400 * 1000), seen.clone()));
    // No budget, no deadline: no bound at all.
    svc.clone().oneshot(Request::new(())).await.unwrap();
    let t0 = Instant::now();
    let e = svc
        .clone()
        .oneshot(budget_req("grpc-timeout", "50m"))
        .await
        .unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(50));
    assert_eq!(
        timed_out(&e),
        (Duration::from_millis(50), TimeoutCause::Budget)
    );
    // A huge budget under a Duration::MAX timeout.
    let svc2 = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::MAX).budget(BudgetHeader::grpc_timeout()))
        .service(sleepy(Duration::from_secs(1), seen.clone()));
    svc2.oneshot(budget_req("grpc-timeout", "99999999H"))
        .await
        .unwrap();
    // A deadline in scope.
    let t0 = Instant::now();
    let e = deadline::scope(
        Instant::now() + Duration::from_millis(30),
        svc.clone().oneshot(Request::new(())),
    )
    .await
    .unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(30));
    assert_eq!(
        timed_out(&e),
        (Duration::from_millis(30), TimeoutCause::Deadline)
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_near_max_durations_do_not_panic() {
    // EXPECTATION: only Duration::MAX is documented, but Duration::from_secs(u64::MAX) (or a
    // millis budget of u64::MAX under it) is "no timeout" to a user; it must not panic on
    // Instant overflow.
    let seen = Arc::new(std::sync::Mutex::new(None));
    for t in [
        Duration::from_secs(u64::MAX),
        Duration::from_secs(u64::MAX / 2),
        Duration::MAX - Duration::from_nanos(1),
    ] {
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(t).budget(BudgetHeader::millis("x-ms")))
            .service(sleepy(Duration::from_millis(10), seen.clone()));
        let r = AssertUnwindSafe(svc.clone().oneshot(Request::new(())))
            .catch_unwind()
            .await;
        assert!(
            matches!(r, Ok(Ok(()))),
            "TimeoutLayer::new({t:?}) panicked or failed"
        );
    }
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::MAX).budget(BudgetHeader::millis("x-ms")))
        .service(sleepy(Duration::from_millis(10), seen.clone()));
    let r = AssertUnwindSafe(svc.oneshot(budget_req("x-ms", "18446744073709551615")))
        .catch_unwind()
        .await;
    assert!(
        matches!(r, Ok(Ok(()))),
        "a u64::MAX ms budget panicked or failed"
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_nested_inner_cannot_extend() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(sleepy(Duration::from_secs(10), seen.clone()));
    let t0 = Instant::now();
    let e = svc.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(100));
    assert_eq!(timed_out(&e).0, Duration::from_millis(100));
    assert_eq!(
        *seen.lock().unwrap(),
        Some(Some(Duration::from_millis(100)))
    );

    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(sleepy(Duration::from_secs(10), seen.clone()));
    let t0 = Instant::now();
    let e = svc.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(100));
    assert_eq!(
        timed_out(&e),
        (Duration::from_millis(100), TimeoutCause::Timeout)
    );
    assert_eq!(
        *seen.lock().unwrap(),
        Some(Some(Duration::from_millis(100)))
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_deadline_in_scope_wins() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(sleepy(Duration::from_secs(10), seen.clone()));
    let t0 = Instant::now();
    let e = deadline::scope(
        t0 + Duration::from_millis(30),
        svc.clone().oneshot(Request::new(())),
    )
    .await
    .unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(30));
    assert_eq!(
        timed_out(&e),
        (Duration::from_millis(30), TimeoutCause::Deadline)
    );
    assert_eq!(*seen.lock().unwrap(), Some(Some(Duration::from_millis(30))));
}

#[tokio::test(start_paused = true)]
async fn timeout_expired_deadline_in_scope_fails_at_once() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(sleepy(Duration::from_secs(10), seen.clone()));
    let t0 = Instant::now();
    let e = deadline::scope(t0, svc.clone().oneshot(Request::new(())))
        .await
        .unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::ZERO);
    assert_eq!(timed_out(&e), (Duration::ZERO, TimeoutCause::Deadline));
}

#[tokio::test(start_paused = true)]
async fn timeout_http_responses() {
    let h = service_fn(|_: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, Infallible>(Response::new(String::from("late")))
    });
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(10)).respond(HttpResponses::new()))
        .service(h.clone());
    let r = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(r.body().is_empty());
    let svc = ServiceBuilder::new()
        .layer(
            TimeoutLayer::new(Duration::from_millis(10))
                .respond(HttpResponses::new().timeout_status(StatusCode::SERVICE_UNAVAILABLE)),
        )
        .service(h);
    assert_eq!(
        svc.oneshot(Request::new(())).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_metrics() {
    let cap = Capture::new();
    let seen = Arc::new(std::sync::Mutex::new(None));
    cap.scope(async {
        let svc = ServiceBuilder::new()
            .layer(
                TimeoutLayer::new(Duration::from_millis(100))
                    .name("tm")
                    .budget(BudgetHeader::millis("x-ms")),
            )
            .service(sleepy(Duration::from_secs(1), seen.clone()));
        svc.clone().oneshot(Request::new(())).await.unwrap_err();
        svc.clone()
            .oneshot(budget_req("x-ms", "10"))
            .await
            .unwrap_err();
        svc.clone()
            .oneshot(budget_req("x-ms", "10000"))
            .await
            .unwrap_err();
        svc.clone()
            .oneshot(budget_req("x-ms", "nope"))
            .await
            .unwrap_err();
        deadline::scope(
            Instant::now() + Duration::from_millis(5),
            svc.clone().oneshot(Request::new(())),
        )
        .await
        .unwrap_err();
    })
    .await;
    let t = |c: &str| cap.counter("brisk_timeouts_total", &[("layer", "tm"), ("cause", c)]);
    let b = |o: &str| {
        cap.counter(
            "brisk_budget_headers_total",
            &[("layer", "tm"), ("outcome", o)],
        )
    };
    assert_eq!(t("budget"), 1);
    assert_eq!(t("deadline"), 1);
    assert_eq!(
        t("timeout"),
        3,
        "plain, clamped and malformed fall to the layer's timeout"
    );
    assert_eq!(b("used"), 1);
    assert_eq!(b("clamped"), 1);
    assert_eq!(b("malformed"), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_dropped_future_is_harmless() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(sleepy(Duration::from_secs(1), seen));
    for polls in 0..3 {
        let mut f = Box::pin(svc.clone().oneshot(Request::new(())));
        for _ in 0..polls {
            assert!(poll_once(f.as_mut()).is_pending());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        drop(f);
    }
}

// ------------------------------------------------------------------------------------------------
// ConcurrencyLimitLayer
// ------------------------------------------------------------------------------------------------

/// A service whose requests finish when their `u32` id is released (or never, for u32::MAX),
/// counting how many are in flight at once.
#[derive(Clone)]
struct Gate {
    inflight: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}
impl Gate {
    fn new() -> Self {
        Self {
            inflight: Arc::new(AtomicUsize::new(0)),
            max: Arc::new(AtomicUsize::new(0)),
            release: Arc::new(tokio::sync::Notify::new()),
        }
    }
}
struct InflightGuard(Arc<AtomicUsize>);
impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}
impl Service<Duration> for Gate {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, d: Duration) -> Self::Future {
        let n = self.inflight.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        let g = InflightGuard(self.inflight.clone());
        Box::pin(async move {
            let _g = g;
            tokio::time::sleep(d).await;
            Ok(())
        })
    }
}

fn overloaded(e: &BoxError) -> (usize, Option<Duration>) {
    match refusal(e) {
        Refusal::Overloaded(o) => (o.limit(), o.waited()),
        other => panic!("not Overloaded: {other:?}"),
    }
}

const LONG: Duration = Duration::from_secs(3600);

#[test]
fn shed_build_validation() {
    let b = ConcurrencyLimitLayer::builder;
    assert!(b().build().is_ok());
    assert_eq!(b().build().unwrap().limit(), 64);
    assert!(b().max_in_flight(0).build().is_err());
    assert!(b().max_in_flight(1_000_000).build().is_ok());
    assert!(b().max_in_flight(1_000_001).build().is_err());
    assert!(b().max_in_flight(usize::MAX).build().is_err());
    assert!(b().queue(100_000).build().is_ok());
    assert!(b().queue(100_001).build().is_err());
    assert!(b().queue(0).queue_timeout(Duration::ZERO).build().is_ok());
    assert!(b().queue(1).queue_timeout(Duration::ZERO).build().is_err());
    assert!(b().queue_timeout(Duration::from_secs(60)).build().is_ok());
    assert!(b().queue_timeout(Duration::from_secs(61)).build().is_err());
    assert!(b().queue_timeout(Duration::MAX).build().is_err());
    let a = AdaptiveLimit::new;
    assert!(b().adaptive(a(4, 256)).build().is_ok());
    assert_eq!(
        b().adaptive(a(4, 256)).build().unwrap().limit(),
        4,
        "starts at min"
    );
    assert_eq!(
        b().adaptive(a(4, 256).initial(32)).build().unwrap().limit(),
        32
    );
    for bad in [
        a(0, 10),
        a(10, 5),
        a(1, 2_000_000),
        a(1, 10).initial(0),
        a(1, 10).initial(11),
        a(2, 10).initial(1),
        a(1, 10).tolerance(1.0),
        a(1, 10).tolerance(0.5),
        a(1, 10).tolerance(f64::NAN),
        a(1, 10).tolerance(-2.0),
        a(1, 10).backoff(0.0),
        a(1, 10).backoff(1.5),
        a(1, 10).backoff(-0.5),
        a(1, 10).backoff(f64::NAN),
    ] {
        assert!(
            b().adaptive(bad.clone()).build().is_err(),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn shed_adaptive_rejects_infinite_factors() {
    // EXPECTATION: an infinite tolerance disables cuts altogether and an infinite... neither is a
    // "factor above 1" a user would mean; a NaN is refused, infinity should be too.
    let b = ConcurrencyLimitLayer::builder;
    assert!(
        b().adaptive(AdaptiveLimit::new(1, 10).tolerance(f64::INFINITY))
            .build()
            .is_err()
    );
    assert!(
        b().adaptive(AdaptiveLimit::new(1, 10).backoff(f64::INFINITY))
            .build()
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn shed_limit_queue_and_shed() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(2)
        .queue(1)
        .queue_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    let a = tokio::spawn(svc.clone().oneshot(Duration::from_millis(50)));
    let b = tokio::spawn(svc.clone().oneshot(Duration::from_millis(50)));
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    let c = tokio::spawn(svc.clone().oneshot(Duration::from_millis(10)));
    tokio::task::yield_now().await;
    let e = svc.clone().oneshot(Duration::ZERO).await.unwrap_err();
    assert_eq!(overloaded(&e), (2, None), "queue full: shed at once");
    assert_eq!(Instant::now(), t0);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    c.await.unwrap().unwrap();
    assert_eq!(gate.max.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn shed_queue_timeout_exact() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(4)
        .queue_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    let _hold = tokio::spawn(svc.clone().oneshot(LONG));
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    let e = svc.clone().oneshot(Duration::ZERO).await.unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(100));
    assert_eq!(overloaded(&e), (1, Some(Duration::from_millis(100))));
}

#[tokio::test(start_paused = true)]
async fn shed_queue_leaves_at_deadline_in_scope() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(4)
        .queue_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    let _hold = tokio::spawn(svc.clone().oneshot(LONG));
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    let e = deadline::scope(
        t0 + Duration::from_millis(30),
        svc.clone().oneshot(Duration::ZERO),
    )
    .await
    .unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::from_millis(30));
    assert_eq!(overloaded(&e), (1, Some(Duration::from_millis(30))));
    // An expired deadline: out of the queue at once.
    let t0 = Instant::now();
    let e = deadline::scope(t0, svc.clone().oneshot(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(Instant::now() - t0, Duration::ZERO);
    assert!(matches!(refusal(&e), Refusal::Overloaded(_)));
}

#[tokio::test(start_paused = true)]
async fn shed_queue_leaves_at_deadline_of_the_poll_scope() {
    // The TimeoutLayer calls the inner service before it enters the deadline scope and polls its
    // future inside it ("tower services do theirs when polled"). A ConcurrencyLimit under a
    // TimeoutLayer (the order the guide recommends) sees the deadline only when polled: its
    // queued requests must still leave at that deadline, not at queue_timeout.
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(4)
        .queue_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    let _hold = tokio::spawn(svc.clone().oneshot(LONG));
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    svc.ready().await.unwrap();
    let fut = svc.call(Duration::ZERO); // outside the scope, as TimeoutLayer does
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        deadline::scope(t0 + Duration::from_millis(30), fut),
    )
    .await
    .unwrap();
    let e = r.unwrap_err();
    assert_eq!(
        overloaded(&e).1,
        Some(Duration::from_millis(30)),
        "left the queue at {:?}",
        Instant::now() - t0
    );
}

#[tokio::test(start_paused = true)]
async fn shed_under_timeout_layer_counts_expired() {
    // The guide's order: TimeoutLayer outermost, then ConcurrencyLimitLayer. A request waiting
    // in the queue when the deadline comes "leaves" the queue: counted as expired.
    let cap = Capture::new();
    let layer = cap.run(|| {
        ConcurrencyLimitLayer::builder()
            .name("shedm")
            .max_in_flight(1)
            .queue(4)
            .queue_timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    let gate = Gate::new();
    cap.scope(async {
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_millis(30)))
            .layer(layer)
            .service(gate.clone());
        let _hold = tokio::spawn(svc.clone().oneshot(LONG));
        tokio::task::yield_now().await;
        let e = svc.clone().oneshot(Duration::ZERO).await.unwrap_err();
        let _ = refusal(&e);
    })
    .await;
    let c = |o: &str| {
        cap.counter(
            "brisk_shed_requests_total",
            &[("layer", "shedm"), ("outcome", o)],
        )
    };
    assert_eq!(c("admitted"), 1);
    assert_eq!(c("expired"), 1, "the queued request left at the deadline");
}

#[tokio::test(start_paused = true)]
async fn shed_cancelled_queue_places_and_slots_are_returned() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(2)
        .queue(2)
        .queue_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    for round in 0..5 {
        // Fill slots and queue, polling each a different number of times, then drop all.
        let mut futs = Vec::new();
        for i in 0..4 {
            let mut s = svc.clone();
            s.ready().await.unwrap();
            let mut f = Box::pin(s.call(LONG));
            for _ in 0..(i + round) % 3 {
                let _ = poll_once(f.as_mut());
            }
            futs.push(f);
        }
        // Full: the next is shed at once.
        let e = svc.clone().oneshot(Duration::ZERO).await.unwrap_err();
        assert_eq!(overloaded(&e).1, None, "round {round}");
        tokio::time::advance(Duration::from_millis(1)).await;
        drop(futs);
        assert_eq!(gate.inflight.load(SeqCst), 0);
    }
    // Everything came back: two in flight and two queued again, and they all complete.
    let mut hs = Vec::new();
    for _ in 0..4 {
        hs.push(tokio::spawn(svc.clone().oneshot(Duration::from_millis(5))));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn shed_dropped_waiter_does_not_steal_a_slot() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(2)
        .queue_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    let hold = tokio::spawn(svc.clone().oneshot(Duration::from_millis(50)));
    tokio::task::yield_now().await;
    let mut s = svc.clone();
    s.ready().await.unwrap();
    let mut waiter = Box::pin(s.call(LONG));
    assert!(poll_once(waiter.as_mut()).is_pending());
    hold.await.unwrap().unwrap();
    // The waiter was woken and may have been handed the slot; drop it without polling again.
    drop(waiter);
    let t0 = Instant::now();
    svc.clone().oneshot(Duration::ZERO).await.unwrap();
    assert_eq!(
        Instant::now(),
        t0,
        "admitted at once: the dropped waiter gave its slot back"
    );
}

#[test]
fn shed_inner_panic_in_future_releases_slot() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(1)
            .queue(0)
            .queue_timeout(Duration::ZERO)
            .build()
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|p: bool| async move {
                if p {
                    panic!("inner future blew up");
                }
                Ok::<_, BoxError>(())
            }));
        for _ in 0..3 {
            let r = AssertUnwindSafe(svc.clone().oneshot(true))
                .catch_unwind()
                .await;
            assert!(r.is_err());
        }
        svc.clone()
            .oneshot(false)
            .await
            .expect("slot released after the panics");
    });
}

#[derive(Clone)]
struct PanicsInCall(Arc<AtomicUsize>);
impl Service<bool> for PanicsInCall {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, p: bool) -> Self::Future {
        self.0.fetch_add(1, SeqCst);
        if p {
            panic!("inner call blew up");
        }
        std::future::ready(Ok(()))
    }
}

#[test]
fn shed_inner_panic_in_call_releases_slot() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(1)
            .queue(0)
            .queue_timeout(Duration::ZERO)
            .build()
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(PanicsInCall(Arc::new(AtomicUsize::new(0))));
        for _ in 0..3 {
            let mut s = svc.clone();
            s.ready().await.unwrap();
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| s.call(true)));
            if let Ok(f) = r {
                // The call was deferred to the future: poll it.
                assert!(AssertUnwindSafe(f).catch_unwind().await.is_err());
            }
        }
        svc.clone()
            .oneshot(false)
            .await
            .expect("slot released after the panics");
    });
}

#[tokio::test(start_paused = true)]
async fn shed_queued_request_calls_a_readied_service() {
    let violations = Arc::new(AtomicUsize::new(0));
    let inner = Strict {
        ready: false,
        violations: violations.clone(),
    };
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(4)
        .queue_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut hs = Vec::new();
    for _ in 0..4 {
        hs.push(tokio::spawn(svc.clone().oneshot(())));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(
        violations.load(SeqCst),
        0,
        "a queued request called a clone that was never readied"
    );
}

#[tokio::test(start_paused = true)]
async fn shed_poll_ready_takes_no_slot() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    let mut others: Vec<_> = (0..10).map(|_| svc.clone()).collect();
    for o in &mut others {
        o.ready().await.unwrap();
    }
    svc.ready().await.unwrap();
    svc.call(Duration::ZERO).await.unwrap();
}

#[test]
fn shed_multithread_never_exceeds_limit() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let gate = Gate::new();
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(3)
            .queue(5)
            .queue_timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
        let ok = Arc::new(AtomicUsize::new(0));
        let mut hs = Vec::new();
        for _ in 0..16 {
            let svc = svc.clone();
            let ok = ok.clone();
            hs.push(tokio::spawn(async move {
                for _ in 0..30 {
                    if svc
                        .clone()
                        .oneshot(Duration::from_micros(300))
                        .await
                        .is_ok()
                    {
                        ok.fetch_add(1, SeqCst);
                    }
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        assert!(
            gate.max.load(SeqCst) <= 3,
            "max in flight {}",
            gate.max.load(SeqCst)
        );
        assert!(ok.load(SeqCst) > 0);
        assert_eq!(gate.inflight.load(SeqCst), 0);
    });
}

#[tokio::test(start_paused = true)]
async fn shed_metrics_and_limit_gauge() {
    let cap = Capture::new();
    let layer = cap.run(|| {
        ConcurrencyLimitLayer::builder()
            .name("m2")
            .max_in_flight(1)
            .queue(1)
            .queue_timeout(Duration::from_millis(100))
            .build()
            .unwrap()
    });
    let gate = Gate::new();
    cap.scope(async {
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(gate.clone());
        let a = tokio::spawn(svc.clone().oneshot(Duration::from_millis(10)));
        tokio::task::yield_now().await;
        let b = tokio::spawn(svc.clone().oneshot(Duration::from_millis(10))); // queued, then admitted
        tokio::task::yield_now().await;
        svc.clone().oneshot(Duration::ZERO).await.unwrap_err(); // shed
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        let hold = tokio::spawn(svc.clone().oneshot(LONG));
        tokio::task::yield_now().await;
        svc.clone().oneshot(Duration::ZERO).await.unwrap_err(); // expired
        hold.abort();
    })
    .await;
    let c = |o: &str| {
        cap.counter(
            "brisk_shed_requests_total",
            &[("layer", "m2"), ("outcome", o)],
        )
    };
    assert_eq!(c("admitted"), 2);
    assert_eq!(c("queued"), 1);
    assert_eq!(c("shed"), 1);
    assert_eq!(c("expired"), 1);
    assert_eq!(cap.gauge("brisk_shed_limit", &[("layer", "m2")]), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn shed_http_503() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap()
        .respond(HttpResponses::new());
    let h = service_fn(|_: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let svc = ServiceBuilder::new().layer(layer).service(h);
    let _a = tokio::spawn(svc.clone().oneshot(Request::new(())));
    tokio::task::yield_now().await;
    let r = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body().is_empty());
}

/// Drives `clients` closed-loop clients through `svc` for `run` of simulated time, with the
/// service's latency given by `latency(in_flight)`. Returns the limits seen at each 100 ms.
async fn drive_adaptive(
    layer: ConcurrencyLimitLayer,
    clients: usize,
    run: Duration,
    latency: Arc<dyn Fn(usize, Duration) -> Duration + Send + Sync>,
) -> (Vec<usize>, usize) {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(drive_adaptive_inner(layer, clients, run, latency))
        .await
}

async fn drive_adaptive_inner(
    layer: ConcurrencyLimitLayer,
    clients: usize,
    run: Duration,
    latency: Arc<dyn Fn(usize, Duration) -> Duration + Send + Sync>,
) -> (Vec<usize>, usize) {
    let inflight = Arc::new(AtomicUsize::new(0));
    let max_over = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let lay = layer.clone();
    let svc = {
        let inflight = inflight.clone();
        let max_over = max_over.clone();
        ServiceBuilder::new()
            .layer(layer.clone())
            .service(service_fn(move |_: ()| {
                let inflight = inflight.clone();
                let max_over = max_over.clone();
                let latency = latency.clone();
                let lay = lay.clone();
                async move {
                    let n = inflight.fetch_add(1, SeqCst) + 1;
                    let over = n.saturating_sub(lay.limit());
                    max_over.fetch_max(over, SeqCst);
                    let g = InflightGuard(inflight.clone());
                    tokio::time::sleep(latency(n, Instant::now() - start)).await;
                    drop(g);
                    Ok::<_, BoxError>(())
                }
            }))
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hs = Vec::new();
    for _ in 0..clients {
        let svc = svc.clone();
        let stop = stop.clone();
        hs.push(tokio::task::spawn_local(async move {
            while !stop.load(SeqCst) {
                if svc.clone().oneshot(()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    let mut limits = Vec::new();
    while Instant::now() - start < run {
        tokio::time::sleep(Duration::from_millis(100)).await;
        limits.push(layer.limit());
    }
    stop.store(true, SeqCst);
    for h in hs {
        h.await.unwrap();
    }
    (limits, max_over.load(SeqCst))
}

#[tokio::test(start_paused = true)]
async fn adaptive_grows_to_max_under_constant_latency() {
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(2, 40))
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let (limits, _) = drive_adaptive(
        layer.clone(),
        60,
        Duration::from_secs(10),
        Arc::new(|_, _| Duration::from_millis(10)),
    )
    .await;
    assert!(limits.iter().all(|l| (2..=40).contains(l)), "{limits:?}");
    assert_eq!(
        *limits.last().unwrap(),
        40,
        "constant latency and full use: grows to max; {limits:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_stays_within_bounds_under_wild_latency() {
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(3, 30).initial(10).backoff(0.5))
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let lat: Arc<dyn Fn(usize, Duration) -> Duration + Send + Sync> = Arc::new(|n, t| {
        // alternating regimes of 1 ms and 500 ms, plus contention
        let slow = (t.as_millis() / 700) % 2 == 1;
        Duration::from_millis(if slow { 500 } else { 1 }) + Duration::from_micros(n as u64 * 50)
    });
    let (limits, _) = drive_adaptive(layer.clone(), 50, Duration::from_secs(10), lat).await;
    assert!(limits.iter().all(|l| (3..=30).contains(l)), "{limits:?}");
}

#[tokio::test(start_paused = true)]
async fn adaptive_settles_near_knee() {
    // The guide's claim: latency grows past a knee of 20 in flight; the limit settles in 14..=30.
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(4, 256))
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let lat: Arc<dyn Fn(usize, Duration) -> Duration + Send + Sync> =
        Arc::new(|n, _| Duration::from_millis(10) * (n.max(20) as u32) / 20);
    let (limits, _) = drive_adaptive(layer.clone(), 80, Duration::from_secs(20), lat).await;
    let tail = &limits[limits.len() - 50..];
    assert!(
        tail.iter().all(|l| (14..=30).contains(l)),
        "last 5 s of limits: {tail:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_cut_drains_in_flight_to_the_new_limit() {
    // After a cut, "fewer as slots are free or come back": once in-flight requests drain, the
    // number in flight must not exceed the limit.
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(2, 64).initial(64))
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let lat: Arc<dyn Fn(usize, Duration) -> Duration + Send + Sync> =
        Arc::new(|n, _| Duration::from_millis(2) * (n as u32)); // latency grows with load: cuts
    let gate_over = drive_adaptive(layer.clone(), 100, Duration::from_secs(10), lat).await;
    let (limits, _) = gate_over;
    assert!(
        *limits.last().unwrap() < 64,
        "latency proportional to load: the limit was cut; {limits:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shed_admitted_waiter_frees_its_queue_place() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(1)
        .queue_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    let a = tokio::spawn(svc.clone().oneshot(Duration::from_millis(10)));
    tokio::task::yield_now().await;
    let b = tokio::spawn(svc.clone().oneshot(Duration::from_secs(1))); // queued, then in flight
    tokio::task::yield_now().await;
    a.await.unwrap().unwrap();
    tokio::time::advance(Duration::from_millis(1)).await;
    tokio::task::yield_now().await;
    assert_eq!(gate.inflight.load(SeqCst), 1, "b admitted");
    // b left the queue: c can wait in it (not shed at once).
    let t0 = Instant::now();
    let c = svc.clone().oneshot(Duration::ZERO).await;
    assert!(c.is_ok(), "c: {:?}", c.err().map(|e| e.to_string()));
    assert!(Instant::now() > t0, "c waited for b");
    b.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn shed_slot_release_and_queue_timeout_at_same_instant_leak_nothing() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(1)
        .queue_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(gate.clone());
    for _ in 0..5 {
        let a = tokio::spawn(svc.clone().oneshot(Duration::from_millis(100)));
        tokio::task::yield_now().await;
        let b = tokio::spawn(svc.clone().oneshot(Duration::from_millis(1)));
        a.await.unwrap().unwrap();
        let _ = b.await.unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(gate.inflight.load(SeqCst), 0);
    }
    // Both the slot and the place are back.
    let a = tokio::spawn(svc.clone().oneshot(Duration::from_millis(10)));
    tokio::task::yield_now().await;
    let b = tokio::spawn(svc.clone().oneshot(Duration::from_millis(10)));
    tokio::task::yield_now().await;
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

// ------------------------------------------------------------------------------------------------
// Redis store (real servers; real time, bounded)
// ------------------------------------------------------------------------------------------------

use brisk_guard::ratelimit::OnRedisError;
use brisk_pool::redis_source::Multiplexed;
use brisk_testkit::RedisServer;

fn redis() -> RedisServer {
    RedisServer::builder()
        .private()
        .start()
        .expect("redis-server")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(url: &str) -> Multiplexed {
    Multiplexed::builder(url)
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap()
}

async fn keys_and_ttls(url: &str) -> Vec<(Vec<u8>, i64)> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        out.push((k, ttl));
    }
    out
}

#[test]
fn redis_shared_across_instances_and_exact() {
    let server = redis();
    rt().block_on(async {
        let a = RateLimiter::builder("shared")
            .quota(Quota::per_minute(5))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        let b = RateLimiter::builder("shared")
            .quota(Quota::per_minute(5))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        let other = RateLimiter::builder("other")
            .quota(Quota::per_minute(5))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        assert!(
            a.check_now("k").is_none(),
            "check_now never decides with Redis"
        );
        let mut left = Vec::new();
        for l in [&a, &b, &a, &b, &a] {
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::Allowed);
            left.push(d.quotas()[0].remaining());
        }
        assert_eq!(left, vec![4, 3, 2, 1, 0]);
        for l in [&a, &b] {
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::Rejected);
            let ra = d.retry_after();
            assert!(
                ra > Duration::from_millis(11_500) && ra <= Duration::from_secs(12),
                "{ra:?}"
            );
        }
        assert!(
            other.check("k").await.is_allowed(),
            "another limiter name is another limit"
        );
        assert!(a.check("k2").await.is_allowed());
        assert_eq!(a.local_entries(), 0);
    });
}

#[test]
fn redis_check_now_counts_nothing() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("cn")
            .quota(Quota::per_minute(5))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        for _ in 0..10 {
            assert!(l.check_now("k").is_none());
        }
        assert_eq!(l.check("k").await.quotas()[0].remaining(), 4);
    });
}

#[test]
fn redis_retry_after_is_honoured_in_real_time() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("ra")
            .quota(Quota::per_second(10).burst(1))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        for _ in 0..5 {
            assert!(l.check("k").await.is_allowed());
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::Rejected);
            let ra = d.retry_after();
            assert!(
                ra > Duration::ZERO && ra <= Duration::from_millis(100),
                "{ra:?}"
            );
            tokio::time::sleep(ra).await;
        }
    });
}

#[test]
fn redis_multi_quota_atomic() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("mq")
            .quota(Quota::per_hour(10).named("a"))
            .quota(Quota::per_minute(3).named("b"))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        for _ in 0..3 {
            assert!(l.check("k").await.is_allowed());
        }
        for _ in 0..5 {
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::Rejected);
            assert_eq!(d.quotas()[1].remaining(), 0);
        }
        // Compare with a fresh key: the refusals must not have counted against a.
        let local = RateLimiter::builder("mq")
            .quota(Quota::per_hour(10).named("a"))
            .quota(Quota::per_minute(3).named("b"))
            .build()
            .unwrap();
        for _ in 0..8 {
            local.check("k").await;
        }
        let dl = local.check("k").await;
        let dr = l.check("k").await;
        assert_eq!(
            dr.quotas()[0].remaining(),
            dl.quotas()[0].remaining(),
            "redis and local agree"
        );
    });
}

#[test]
fn redis_keys_expire_and_stay_small() {
    // EXPECTATION: state for a key is forgotten (a TTL) once it would be full again, so Redis
    // memory does not grow with every client ever seen; and a huge key is hashed.
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("ttl")
            .quota(Quota::per_minute(5).named("m"))
            .quota(Quota::per_hour(100).named("h"))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        assert!(l.check("small").await.is_allowed());
        let big = "k".repeat(100_000);
        assert!(l.check(&big).await.is_allowed());
        let weird = "ключ with spaces\nand newline";
        assert!(l.check(weird).await.is_allowed());
        assert!(l.check("ключ with spaces\nand newlinf").await.is_allowed());
        let keys = keys_and_ttls(&server.url()).await;
        assert!(!keys.is_empty());
        for (k, ttl) in &keys {
            let shown = String::from_utf8_lossy(&k[..k.len().min(80)]).into_owned();
            assert!(k.len() < 300, "a stored key of {} bytes: {shown}", k.len());
            assert!(*ttl > 0, "key {shown:?} has no TTL ({ttl})");
            assert!(
                *ttl <= 3_600_000 + 1000,
                "key {shown:?} TTL {ttl} ms beyond the time to full"
            );
        }
        // Distinct non-ASCII keys stay distinct after hashing.
        let l1 = RateLimiter::builder("distinct")
            .quota(Quota::per_hour(1))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        assert!(l1.check("ключ1").await.is_allowed());
        assert!(l1.check("ключ2").await.is_allowed());
        assert!(!l1.check("ключ1").await.is_allowed());
        assert!(l1.check(&format!("{big}1")).await.is_allowed());
        assert!(l1.check(&format!("{big}2")).await.is_allowed());
        assert!(!l1.check(&format!("{big}1")).await.is_allowed());
    });
}

#[test]
fn redis_key_with_hash_tag_characters() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("tags")
            .quota(Quota::per_hour(1).named("a"))
            .quota(Quota::per_hour(2).named("b"))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        for k in ["}", "{", "{}", "a}b{c", "}{", ":0", "x}:1"] {
            let d = l.check(k).await;
            assert_eq!(d.outcome(), Outcome::Allowed, "key {k:?}");
            assert_eq!(l.check(k).await.outcome(), Outcome::Rejected, "key {k:?}");
        }
    });
}

#[test]
fn redis_shadow_mode() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("sh")
            .quota(Quota::per_minute(2))
            .shadow(true)
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        for _ in 0..5 {
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::ShadowRejected);
            assert!(d.is_allowed());
        }
        // 30 s per unit: shadow refusals must not have pushed the state further out.
        let d = l.check("k").await;
        assert!(
            d.retry_after() <= Duration::from_secs(30),
            "{:?}",
            d.retry_after()
        );
    });
}

#[test]
fn redis_killed_fail_open_within_timeout() {
    let mut server = redis();
    let cap = Capture::new();
    rt().block_on(cap.scope(async {
        let l = RateLimiter::builder("fo")
            .quota(Quota::per_minute(1))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(50),
                OnRedisError::Allow,
            )
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        server.kill().unwrap();
        for i in 0..5 {
            let t0 = std::time::Instant::now();
            let d = l.check("k").await;
            let took = t0.elapsed();
            assert_eq!(d.outcome(), Outcome::FailedOpen, "check {i}");
            assert!(d.is_allowed());
            assert!(d.quotas().is_empty());
            assert!(
                took < Duration::from_millis(250),
                "check {i} took {took:?} (timeout 50 ms)"
            );
        }
    }));
    assert_eq!(
        cap.counter(
            "brisk_ratelimit_decisions_total",
            &[("limiter", "fo"), ("decision", "failed_open")]
        ),
        5
    );
}

#[test]
fn redis_killed_fail_closed_within_timeout_and_as_429() {
    let mut server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("fc")
            .quota(Quota::per_minute(100).named("m"))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(50),
                OnRedisError::Refuse,
            )
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        server.kill().unwrap();
        for i in 0..3 {
            let t0 = std::time::Instant::now();
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::FailedClosed, "check {i}");
            assert!(!d.is_allowed());
            assert_eq!(d.retry_after(), Duration::from_secs(1));
            assert!(
                t0.elapsed() < Duration::from_millis(250),
                "took {:?}",
                t0.elapsed()
            );
        }
        let svc = ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(l.clone(), Global)
                    .respond(HttpResponses::new().headers_when_admitted(true)),
            )
            .service(ok_http());
        let r = AssertUnwindSafe(svc.clone().oneshot(Request::new(())))
            .catch_unwind()
            .await;
        let Ok(Ok(r)) = r else {
            panic!("fail-closed 429 panicked")
        };
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&r, "retry-after"), Some("1"));
        if let Some(v) = header(&r, "ratelimit") {
            assert!(
                parse_sf_list(v).is_some() || v.is_empty(),
                "RateLimit {v:?}"
            );
        }
        // Errors: the refusal carries the decision.
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(l.clone(), Global))
            .service(ok_unit());
        let e = svc.oneshot(()).await.unwrap_err();
        match refusal(&e) {
            Refusal::RateLimited(r) => assert_eq!(r.retry_after(), Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn redis_fail_open_admitted_response_does_not_panic() {
    let mut server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("foh")
            .quota(Quota::per_minute(100))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(50),
                OnRedisError::Allow,
            )
            .build()
            .unwrap();
        server.kill().unwrap();
        let svc = ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(l, Global)
                    .respond(HttpResponses::new().headers_when_admitted(true)),
            )
            .service(ok_http());
        let r = AssertUnwindSafe(svc.oneshot(Request::new(())))
            .catch_unwind()
            .await;
        let Ok(Ok(r)) = r else {
            panic!("fail-open response panicked")
        };
        assert_eq!(r.status(), StatusCode::OK);
    });
}

#[test]
fn redis_paused_bounded_by_timeout_then_recovers() {
    let mut server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("pause")
            .quota(Quota::per_minute(1000))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(40),
                OnRedisError::Allow,
            )
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        server.pause().unwrap();
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::FailedOpen);
            assert!(
                t0.elapsed() < Duration::from_millis(200),
                "took {:?}",
                t0.elapsed()
            );
        }
        server.resume().unwrap();
        let t0 = std::time::Instant::now();
        loop {
            if l.check("k").await.outcome() == Outcome::Allowed {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "never recovered after resume"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn redis_deadline_shorter_than_timeout_wins() {
    let mut server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("dl")
            .quota(Quota::per_minute(1000))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_secs(2),
                OnRedisError::Refuse,
            )
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        server.pause().unwrap();
        let t0 = std::time::Instant::now();
        let d = deadline::scope(Instant::now() + Duration::from_millis(20), l.check("k")).await;
        let took = t0.elapsed();
        server.resume().unwrap();
        assert_eq!(d.outcome(), Outcome::FailedClosed);
        assert!(
            took < Duration::from_millis(200),
            "took {took:?} with a 20 ms deadline"
        );
        // Through the layers: TimeoutLayer's deadline bounds the Redis check.
        server.pause().unwrap();
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_millis(30)))
            .layer(RateLimitLayer::new(l.clone(), Global))
            .service(ok_unit());
        let t0 = std::time::Instant::now();
        let r = svc.oneshot(()).await;
        let took = t0.elapsed();
        server.resume().unwrap();
        assert!(r.is_err());
        assert!(
            took < Duration::from_millis(250),
            "took {took:?} under a 30 ms TimeoutLayer"
        );
    });
}

#[test]
fn redis_works_again_after_restart() {
    let mut server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("rs")
            .quota(Quota::per_minute(3))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(100),
                OnRedisError::Allow,
            )
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        server.restart().unwrap();
        let t0 = std::time::Instant::now();
        let mut outcomes = Vec::new();
        loop {
            let o = l.check("fresh").await.outcome();
            outcomes.push(o);
            if o != Outcome::FailedOpen {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "still failing open 3 s after restart: {outcomes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*outcomes.last().unwrap(), Outcome::Allowed);
        assert!(l.check("fresh").await.is_allowed());
        assert!(l.check("fresh").await.is_allowed());
        assert_eq!(
            l.check("fresh").await.outcome(),
            Outcome::Rejected,
            "enforced again after restart"
        );
    });
}

#[test]
fn redis_script_flush_is_survived() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("flush")
            .quota(Quota::per_minute(3))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(200),
                OnRedisError::Allow,
            )
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        server.command(&["SCRIPT", "FLUSH"]).unwrap();
        assert_eq!(
            l.check("k").await.outcome(),
            Outcome::Allowed,
            "NOSCRIPT must reload, not fail open"
        );
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        assert_eq!(l.check("k").await.outcome(), Outcome::Rejected);
    });
}

#[test]
fn redis_multithread_exact() {
    let server = redis();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let allowed = rt.block_on(async {
        let l = RateLimiter::builder("mt")
            .quota(Quota::per_day(100))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_secs(1),
                OnRedisError::Refuse,
            )
            .build()
            .unwrap();
        let allowed = Arc::new(AtomicUsize::new(0));
        let mut hs = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            let allowed = allowed.clone();
            hs.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let d = l.check("k").await;
                    assert!(
                        matches!(d.outcome(), Outcome::Allowed | Outcome::Rejected),
                        "{d:?}"
                    );
                    if d.is_allowed() {
                        allowed.fetch_add(1, SeqCst);
                    }
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        allowed.load(SeqCst)
    });
    assert_eq!(allowed, 100);
}

#[test]
fn redis_cluster_multi_quota_keys_on_every_node() {
    let cluster = brisk_testkit::RedisCluster::start().expect("cluster");
    rt().block_on(async {
        let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
        let conn = client.get_async_connection().await.unwrap();
        let l = RateLimiter::builder("cl")
            .quota(Quota::per_hour(2).named("a"))
            .quota(Quota::per_day(5).named("b"))
            .redis_with(conn, Duration::from_secs(1), OnRedisError::Refuse)
            .build()
            .unwrap();
        for i in 0..30 {
            let k = format!("user-{i}-}}{{");
            let d = l.check(&k).await;
            assert_eq!(d.outcome(), Outcome::Allowed, "key {k:?}: {d:?}");
            assert!(l.check(&k).await.is_allowed());
            assert_eq!(l.check(&k).await.outcome(), Outcome::Rejected, "key {k:?}");
        }
    });
}

// ------------------------------------------------------------------------------------------------
// More: small stores, low load, defaults, clones
// ------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn tiny_store_with_four_quotas_still_decides_each_key() {
    let tier = Tier::new("t")
        .quota(Quota::per_hour(3).named("a"))
        .quota(Quota::per_hour(4).named("b"))
        .quota(Quota::per_day(5).named("c"))
        .quota(Quota::per_day(6).named("d"));
    let l = RateLimiter::builder("t")
        .tier(tier)
        .max_keys(16)
        .build()
        .unwrap();
    for i in 0..2000u32 {
        let k = format!("k{i}");
        for n in 0..3 {
            assert!(l.check_now(&k).unwrap().is_allowed(), "key {i} check {n}");
        }
        let d = l.check_now(&k).unwrap();
        assert!(
            !d.is_allowed(),
            "key {i}: a fourth request passed a quota of 3"
        );
        assert!(l.local_entries() <= 16, "{} entries", l.local_entries());
    }
}

#[tokio::test(start_paused = true)]
async fn default_bound_holds_under_a_big_flood() {
    let l = limiter(Quota::per_hour(10));
    for i in 0..300_000u32 {
        l.check_now(&i.to_string()).unwrap();
    }
    assert!(
        l.local_entries() <= 100_000,
        "{} entries",
        l.local_entries()
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_does_not_grow_when_not_in_use() {
    // "the limit grows by one while the mean latency stays within tolerance ... and the limit
    // is in use": one client never uses a limit of 4.
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(4, 256))
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let (limits, _) = drive_adaptive(
        layer.clone(),
        1,
        Duration::from_secs(10),
        Arc::new(|_, _| Duration::from_millis(10)),
    )
    .await;
    assert!(limits.iter().all(|l| *l == 4), "{limits:?}");
}

#[tokio::test(start_paused = true)]
async fn shed_clones_and_layer_uses_share_one_limit() {
    let gate = Gate::new();
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(2)
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let a = ServiceBuilder::new()
        .layer(layer.clone())
        .service(gate.clone());
    let b = ServiceBuilder::new()
        .layer(layer.clone())
        .service(gate.clone());
    let _x = tokio::spawn(a.clone().oneshot(LONG));
    let _y = tokio::spawn(b.clone().oneshot(LONG));
    tokio::task::yield_now().await;
    assert!(a.clone().oneshot(Duration::ZERO).await.is_err());
    assert!(b.clone().oneshot(Duration::ZERO).await.is_err());
    assert_eq!(gate.max.load(SeqCst), 2);
    assert_eq!(a.limit(), 2);
}

#[test]
fn redis_default_timeout_is_about_50ms() {
    let mut server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("def")
            .quota(Quota::per_minute(100))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        server.pause().unwrap();
        let t0 = std::time::Instant::now();
        let d = l.check("k").await;
        let took = t0.elapsed();
        server.resume().unwrap();
        assert_eq!(
            d.outcome(),
            Outcome::FailedOpen,
            "the default policy is Allow"
        );
        assert!(
            took >= Duration::from_millis(40) && took < Duration::from_millis(200),
            "took {took:?}"
        );
    });
}

#[test]
fn redis_dropped_checks_leave_connection_healthy() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("drop")
            .quota(Quota::per_minute(1000))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        for _ in 0..50 {
            let mut f = Box::pin(l.check("k"));
            let _ = poll_once(f.as_mut());
            drop(f);
        }
        for _ in 0..5 {
            assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
        }
        // Through the layer with a slow tier resolver cancelled by a timeout.
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_millis(5)))
            .layer(RateLimitLayer::new(l.clone(), Global))
            .service(service_fn(|_: ()| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, BoxError>(())
            }));
        for _ in 0..5 {
            assert!(svc.clone().oneshot(()).await.is_err());
        }
        assert_eq!(l.check("k").await.outcome(), Outcome::Allowed);
    });
}

#[test]
fn redis_tiers_are_separate() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("tiers")
            .tier(Tier::new("free").quota(Quota::per_hour(1)))
            .tier(Tier::new("pro").quota(Quota::per_hour(2)))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        assert!(l.check("k").await.is_allowed());
        assert!(!l.check("k").await.is_allowed());
        assert!(!l.check_tier("unknown", "k").await.is_allowed());
        assert!(l.check_tier("pro", "k").await.is_allowed());
        assert!(l.check_tier("pro", "k").await.is_allowed());
        assert!(!l.check_tier("pro", "k").await.is_allowed());
    });
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_matches_real_capacity_after_cuts_and_growth() {
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(2, 50).initial(10))
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let lat: Arc<dyn Fn(usize, Duration) -> Duration + Send + Sync> = Arc::new(|n, t| {
        let phase = (t.as_millis() / 1500) % 3;
        match phase {
            0 => Duration::from_millis(5),
            1 => Duration::from_millis(5) * (n as u32), // queueing: cuts
            _ => Duration::from_millis(60),             // slower service
        }
    });
    let (limits, _) = drive_adaptive(layer.clone(), 70, Duration::from_secs(9), lat).await;
    let moved = limits.windows(2).any(|w| w[0] != w[1]);
    assert!(moved, "the limit never moved: {limits:?}");
    // Quiet now: the limit should be the real capacity.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let limit = layer.limit();
    let gate = Gate::new();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(gate.clone());
    let mut holds = Vec::new();
    let mut admitted = 0;
    for _ in 0..limit + 5 {
        let mut s = svc.clone();
        s.ready().await.unwrap();
        let mut f = Box::pin(s.call(LONG));
        match poll_once(f.as_mut()) {
            Poll::Pending => {
                admitted += 1;
                holds.push(f);
            }
            Poll::Ready(r) => {
                assert!(matches!(refusal(&r.unwrap_err()), Refusal::Overloaded(_)));
            }
        }
    }
    assert_eq!(layer.limit(), limit, "limit moved without completions");
    assert_eq!(
        admitted,
        limit,
        "limit() says {limit} but {admitted} were admitted; limits {:?}",
        &limits[limits.len().saturating_sub(10)..]
    );
}

#[test]
fn local_limiter_works_without_a_runtime() {
    // "check_now ... for synchronous code": no tokio runtime around.
    let l = limiter(Quota::per_hour(2));
    let h = {
        let l = l.clone();
        std::thread::spawn(move || {
            let a = l.check_now("k").unwrap().is_allowed();
            let mut f = std::pin::pin!(l.check("k"));
            let b = match poll_once(f.as_mut()) {
                Poll::Ready(d) => d.is_allowed(),
                Poll::Pending => panic!("local check not ready on first poll"),
            };
            let c = l.check_now("k").unwrap().is_allowed();
            (a, b, c)
        })
    };
    assert_eq!(
        h.join().expect("panicked without a runtime"),
        (true, true, false)
    );
}

#[test]
fn multithread_refill_never_overshoots() {
    let l = limiter(Quota::per_second(1000).burst(10));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (allowed, elapsed) = rt.block_on(async {
        let allowed = Arc::new(AtomicUsize::new(0));
        let t0 = std::time::Instant::now();
        let mut hs = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            let allowed = allowed.clone();
            hs.push(tokio::spawn(async move {
                while t0.elapsed() < Duration::from_millis(300) {
                    for _ in 0..100 {
                        if l.check_now("k").unwrap().is_allowed() {
                            allowed.fetch_add(1, SeqCst);
                        }
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        (allowed.load(SeqCst), t0.elapsed())
    });
    let max = 10 + (elapsed.as_micros() as usize) / 1000 + 1;
    assert!(
        allowed <= max,
        "admitted {allowed} in {elapsed:?}; at most {max}"
    );
    assert!(allowed + 50 >= max, "admitted only {allowed} of {max}");
}

#[test]
fn client_ip_behind_with_dual_stack_peer() {
    // EXPECTATION: behind a dual-stack listener the proxy's address arrives as ::ffff:10.0.0.1;
    // a trusted "10.0.0.0/8" must still recognise it, or every client is keyed by the proxy.
    let k = behind();
    let direct = k.key(&req(Some("10.0.0.1"), &["1.2.3.4"]));
    let mapped = k.key(&req(Some("::ffff:10.0.0.1"), &["1.2.3.4"]));
    assert_eq!(mapped, direct);
    assert_ne!(k.key(&req(Some("::ffff:10.0.0.1"), &["5.6.7.8"])), mapped);
    // A mapped address in the header is the IPv4 client.
    assert_eq!(k.key(&req(Some("10.0.0.1"), &["::ffff:1.2.3.4"])), direct);
}

#[test]
fn client_ip_all_hops_trusted() {
    // Every hop is one of ours: some key, and not one the client wrote left of them.
    let k = behind();
    let a = k.key(&req(Some("10.0.0.1"), &["10.0.0.2, 10.0.0.3"]));
    assert!(a.is_some());
    let spoof = k.key(&req(Some("10.0.0.1"), &["6.6.6.6, 10.0.0.2"]));
    assert_eq!(
        spoof,
        k.key(&req(Some("6.6.6.6"), &[])),
        "6.6.6.6 is the right-most untrusted"
    );
}

#[test]
fn shed_queued_request_whose_inner_call_panics_releases_slot() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(1)
            .queue(1)
            .queue_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let gate = Gate::new();
        let hold_svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(gate.clone());
        let panicky = ServiceBuilder::new()
            .layer(layer.clone())
            .service(PanicsInCall(Arc::new(AtomicUsize::new(0))));
        for _ in 0..3 {
            let hold = tokio::spawn(hold_svc.clone().oneshot(Duration::from_millis(5)));
            tokio::task::yield_now().await;
            let mut s = panicky.clone();
            s.ready().await.unwrap();
            let f = s.call(true); // queued: the inner call happens when it is admitted
            let r = AssertUnwindSafe(f).catch_unwind().await;
            assert!(r.is_err(), "the queued inner call should have panicked");
            hold.await.unwrap().unwrap();
        }
        let t0 = std::time::Instant::now();
        panicky
            .clone()
            .oneshot(false)
            .await
            .expect("slot and place released after the panics");
        assert!(t0.elapsed() < Duration::from_millis(500));
    });
}

#[tokio::test(start_paused = true)]
async fn adaptive_learns_from_requests_cut_off_by_the_timeout() {
    // EXPECTATION: the guide's stack is TimeoutLayer -> ConcurrencyLimitLayer(adaptive). A
    // service that falls off a cliff past 30 in flight (1 s instead of 10 ms) makes every request
    // above the cliff time out. Those are the clearest sign of overload; if only requests that
    // complete teach the limit, it sees only fast ones and keeps growing.
    let layer = ConcurrencyLimitLayer::builder()
        .adaptive(AdaptiveLimit::new(4, 200))
        .queue(0)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let inflight = Arc::new(AtomicUsize::new(0));
    let svc = {
        let inflight = inflight.clone();
        ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_millis(100)))
            .layer(layer.clone())
            .service(service_fn(move |_: ()| {
                let inflight = inflight.clone();
                async move {
                    let n = inflight.fetch_add(1, SeqCst) + 1;
                    let _g = InflightGuard(inflight.clone());
                    let lat = if n > 30 {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_millis(10)
                    };
                    tokio::time::sleep(lat).await;
                    Ok::<_, BoxError>(())
                }
            }))
    };
    let local = tokio::task::LocalSet::new();
    let timeouts = Arc::new(AtomicUsize::new(0));
    let limits = local
        .run_until(async {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut hs = Vec::new();
            for _ in 0..150 {
                let svc = svc.clone();
                let stop = stop.clone();
                let timeouts = timeouts.clone();
                hs.push(tokio::task::spawn_local(async move {
                    while !stop.load(SeqCst) {
                        match svc.clone().oneshot(()).await {
                            Ok(()) => {}
                            Err(e) => {
                                if matches!(e.downcast_ref::<Refusal>(), Some(Refusal::TimedOut(_)))
                                {
                                    timeouts.fetch_add(1, SeqCst);
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }));
            }
            let mut limits = Vec::new();
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                limits.push(layer.limit());
            }
            stop.store(true, SeqCst);
            for h in hs {
                h.await.unwrap();
            }
            limits
        })
        .await;
    let last = *limits.last().unwrap();
    assert!(
        last <= 60,
        "limit {last} with a cliff at 30 ({} requests timed out); limits: {:?}",
        timeouts.load(SeqCst),
        limits.iter().step_by(10).collect::<Vec<_>>()
    );
}

#[test]
fn redis_one_evalsha_per_check() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("count")
            .quota(Quota::per_minute(100).named("a"))
            .quota(Quota::per_hour(1000).named("b"))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        l.check("warm").await;
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await
            .unwrap();
        for i in 0..20 {
            assert!(l.check(&format!("k{i}")).await.is_allowed());
        }
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        let calls = |cmd: &str| -> u64 {
            info.lines()
                .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
                .and_then(|l| l.split("calls=").nth(1))
                .and_then(|v| v.split(',').next())
                .map_or(0, |v| v.parse().unwrap())
        };
        assert_eq!(calls("evalsha"), 20, "{info}");
        assert_eq!(calls("eval"), 0, "{info}");
        assert_eq!(calls("script|load") + calls("script"), 0, "{info}");
    });
}

#[tokio::test(start_paused = true)]
async fn refusals_downcast_through_outer_layers() {
    let l = limiter(Quota::per_hour(1));
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .layer(ConcurrencyLimitLayer::builder().build().unwrap())
        .layer(RateLimitLayer::new(l, Global))
        .service(ok_unit());
    svc.clone().oneshot(()).await.unwrap();
    let e = svc.clone().oneshot(()).await.unwrap_err();
    assert!(matches!(refusal(&e), Refusal::RateLimited(_)), "{e}");
    // And an Overloaded through an outer TimeoutLayer.
    let gate = Gate::new();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .layer(
            ConcurrencyLimitLayer::builder()
                .max_in_flight(1)
                .queue(0)
                .queue_timeout(Duration::ZERO)
                .build()
                .unwrap(),
        )
        .service(gate);
    let _h = tokio::spawn(svc.clone().oneshot(LONG));
    tokio::task::yield_now().await;
    let e = svc.clone().oneshot(Duration::ZERO).await.unwrap_err();
    assert!(matches!(refusal(&e), Refusal::Overloaded(_)), "{e}");
}

#[tokio::test(start_paused = true)]
async fn huge_burst_admits_a_huge_burst() {
    // burst × interval overflows 64-bit microseconds for a daily quota with a burst of u32::MAX:
    // it must saturate (or be refused), never wrap into a tiny burst.
    for q in [
        Quota::per_day(1).burst(u32::MAX),
        Quota::per_hour(1).burst(u32::MAX),
        Quota::per_day(10).burst(3_000_000_000),
    ] {
        let Ok(l) = build_one(q.clone()) else {
            continue;
        };
        for i in 0..10_000 {
            assert!(
                l.check_now("k").unwrap().is_allowed(),
                "{q:?}: refused request {i} of a burst of billions"
            );
        }
    }
}

#[test]
fn redis_huge_quotas_still_limit() {
    let server = redis();
    rt().block_on(async {
        for (i, q) in [
            Quota::new(1, Duration::from_secs(10 * 365 * 86_400)),
            Quota::new(1, Duration::from_secs(100 * 365 * 86_400)),
            Quota::new(2, Duration::from_secs(1000 * 365 * 86_400)),
            Quota::per_day(1_000_000),
        ]
        .into_iter()
        .enumerate()
        {
            let Ok(l) = RateLimiter::builder(format!("huge{i}"))
                .quota(q.clone())
                .redis(connect(&server.url()).await)
                .build()
            else {
                continue;
            };
            let local = build_one(q.clone()).unwrap();
            for n in 0..3 {
                let d = l.check("k").await;
                let dl = local.check("k").await;
                assert_eq!(
                    d.outcome(),
                    dl.outcome(),
                    "{q:?} check {n}: redis {d:?} vs local {dl:?}"
                );
                if !d.is_allowed() {
                    let (a, b) = (
                        d.retry_after().as_secs_f64(),
                        dl.retry_after().as_secs_f64(),
                    );
                    assert!(
                        (a - b).abs() <= 1.0 + b * 1e-9,
                        "{q:?}: retry_after redis {a} vs local {b}"
                    );
                }
            }
        }
    });
}

#[test]
fn redis_state_written_under_a_larger_quota_is_read_consistently() {
    // A rolling deploy lowers a quota: old replicas (per_hour(1000)) and new ones
    // (per_minute(10)) share the limiter name, so the new ones read theoretical arrival times
    // further ahead than their own capacity (clock skew between replicas does the same). Whatever
    // a check decides, the decision must be coherent: a refusal has a retry_after > 0 and the
    // refusing quota r=0; an admission counts.
    let server = redis();
    rt().block_on(async {
        let old = RateLimiter::builder("cfg")
            .quota(Quota::per_hour(1000))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        for _ in 0..500 {
            assert!(old.check("k").await.is_allowed());
        }
        let new = RateLimiter::builder("cfg")
            .quota(Quota::per_minute(10))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        let d = new.check("k").await;
        assert!(
            matches!(d.outcome(), Outcome::Allowed | Outcome::Rejected),
            "{d:?}"
        );
        if d.outcome() == Outcome::Rejected {
            assert!(
                d.retry_after() > Duration::ZERO,
                "refused with retry_after 0: {d:?}"
            );
            assert_eq!(
                d.quotas()[0].remaining(),
                0,
                "refused with units left: {d:?}"
            );
            assert!(d.quotas()[0].reset() > Duration::ZERO, "{d:?}");
        } else {
            assert!(d.quotas()[0].remaining() < 10, "{d:?}");
        }
        // Through the HTTP layer: Retry-After and RateLimit agree.
        let svc = ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(new.clone(), |_: &Request<()>| Some(String::from("k")))
                    .respond(HttpResponses::new()),
            )
            .service(ok_http());
        let r = svc.oneshot(Request::new(())).await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
            assert!(retry >= 1, "Retry-After: {retry}");
            let state = parse_sf_list(header(&r, "ratelimit").unwrap()).unwrap();
            assert_eq!(
                param(&state[0], "r"),
                0,
                "429 with r={}",
                param(&state[0], "r")
            );
        }
    });
}

#[test]
fn redis_one_per_huge_period_refusal_is_coherent() {
    // As one_per_huge_period_still_admits_only_one, over Redis: the second request is refused
    // (it is), and the refusal must say when to come back.
    let server = redis();
    rt().block_on(async {
        for (i, q) in [
            Quota::new(1, Duration::MAX),
            Quota::new(1, Duration::from_secs(u64::MAX)),
        ]
        .into_iter()
        .enumerate()
        {
            let Ok(l) = RateLimiter::builder(format!("hp{i}"))
                .quota(q.clone())
                .redis(connect(&server.url()).await)
                .build()
            else {
                continue;
            };
            assert!(l.check("k").await.is_allowed());
            let d = l.check("k").await;
            assert_eq!(d.outcome(), Outcome::Rejected, "{q:?}");
            assert!(
                d.retry_after() > Duration::from_secs(86_400),
                "{q:?}: refused with retry_after {:?}",
                d.retry_after()
            );
            assert_eq!(
                d.quotas()[0].remaining(),
                0,
                "{q:?}: refused with units left: {d:?}"
            );
        }
    });
}

#[tokio::test(start_paused = true)]
async fn guide_stack_under_axum_behaves_as_documented() {
    use axum::Router;
    use axum::extract::ConnectInfo;
    use axum::routing::get;
    let limiter = RateLimiter::builder("api")
        .quota(Quota::per_second(2).burst(3))
        .build()
        .unwrap();
    let client = ClientIp::behind(["10.0.0.0/8"])
        .unwrap()
        .peer_from(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let app: Router = Router::new()
        .route(
            "/",
            get(move || {
                let seen = seen2.clone();
                async move {
                    seen.lock().unwrap().push(deadline::remaining());
                    "hello"
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(
                    TimeoutLayer::new(Duration::from_secs(2))
                        .budget(BudgetHeader::grpc_timeout().or_millis("x-request-timeout-ms"))
                        .respond(HttpResponses::new()),
                )
                .layer(
                    ConcurrencyLimitLayer::builder()
                        .max_in_flight(256)
                        .build()
                        .unwrap()
                        .respond(HttpResponses::new()),
                )
                .layer(RateLimitLayer::new(limiter, client).respond(HttpResponses::new())),
        );
    let call = |path: &str, peer: &str, xff: Option<&str>, budget: Option<&str>| {
        let mut b = Request::builder().uri(path);
        if let Some(x) = xff {
            b = b.header("x-forwarded-for", x);
        }
        if let Some(m) = budget {
            b = b.header("x-request-timeout-ms", m);
        }
        let mut r = b.body(axum::body::Body::empty()).unwrap();
        r.extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(ip(peer), 5555)));
        let app = app.clone();
        async move { app.oneshot(r).await.unwrap() }
    };
    for _ in 0..3 {
        assert_eq!(
            call("/", "10.0.0.1", Some("6.6.6.6, 1.2.3.4"), None)
                .await
                .status(),
            StatusCode::OK
        );
    }
    let r = call("/", "10.0.0.2", Some("7.7.7.7, 1.2.3.4"), None).await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "same client via another proxy, spoofed left part"
    );
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    assert_eq!(
        call("/", "10.0.0.1", Some("1.2.3.5"), None).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        call("/", "10.0.0.1", Some("1.2.3.6"), Some("250"))
            .await
            .status(),
        StatusCode::OK
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], Some(Duration::from_secs(2)));
    assert_eq!(*seen.last().unwrap(), Some(Duration::from_millis(250)));
    let t0 = Instant::now();
    let r = call("/slow", "10.0.0.1", Some("1.2.3.7"), Some("100")).await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(Instant::now() - t0, Duration::from_millis(100));
}

#[test]
fn redis_expired_deadline_fails_at_once_and_counts_nothing() {
    let server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("exp")
            .quota(Quota::per_minute(10))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(500),
                OnRedisError::Refuse,
            )
            .build()
            .unwrap();
        l.check("warm").await;
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            let d = deadline::scope(Instant::now(), l.check("k")).await;
            assert_eq!(d.outcome(), Outcome::FailedClosed);
            assert!(t0.elapsed() < Duration::from_millis(50));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let d = l.check("k").await;
        assert_eq!(
            d.quotas()[0].remaining(),
            9,
            "checks refused for an expired deadline were counted in Redis"
        );
    });
}

#[test]
fn redis_zero_timeout_is_refused_or_harmless() {
    let server = redis();
    rt().block_on(async {
        let Ok(l) = RateLimiter::builder("zero")
            .quota(Quota::per_minute(10))
            .redis_with(
                connect(&server.url()).await,
                Duration::ZERO,
                OnRedisError::Refuse,
            )
            .build()
        else {
            return;
        };
        for _ in 0..5 {
            l.check("k").await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ok = RateLimiter::builder("zero")
            .quota(Quota::per_minute(10))
            .redis(connect(&server.url()).await)
            .build()
            .unwrap();
        let d = ok.check("k").await;
        assert_eq!(d.outcome(), Outcome::Allowed);
        assert_eq!(
            d.quotas()[0].remaining(),
            9,
            "zero-timeout checks were refused but counted in Redis"
        );
    });
}

#[test]
fn redis_checks_that_timed_out_may_still_count_as_documented() {
    // A check that gave up on Redis had already sent its EVALSHA; a paused Redis runs it when it
    // resumes, and the script (given no TIME) cannot tell it is late. The docs say so: such a
    // check may still count. What must hold: each counts at most once, and checking works.
    let mut server = redis();
    rt().block_on(async {
        let l = RateLimiter::builder("late")
            .quota(Quota::per_minute(10))
            .redis_with(
                connect(&server.url()).await,
                Duration::from_millis(30),
                OnRedisError::Refuse,
            )
            .build()
            .unwrap();
        l.check("warm").await;
        server.pause().unwrap();
        for _ in 0..5 {
            assert_eq!(l.check("k").await.outcome(), Outcome::FailedClosed);
        }
        server.resume().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = std::time::Instant::now();
        let d = loop {
            let d = l.check("k").await;
            if d.outcome() != Outcome::FailedClosed || t0.elapsed() > Duration::from_secs(2) {
                break d;
            }
        };
        assert_eq!(d.outcome(), Outcome::Allowed);
        assert!(
            (4..=9).contains(&d.quotas()[0].remaining()),
            "each late check counts at most once: {:?}",
            d.quotas()[0].remaining()
        );
    });
}
