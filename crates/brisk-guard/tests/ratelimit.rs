//! The local limiter and its layer under paused time: GCRA exactness, tiers, shadow mode, keys,
//! the memory bound and the settings refused at build.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brisk_guard::ratelimit::{
    Global, MAX_QUOTAS, Outcome, Quota, RateLimitLayer, RateLimiter, Tier,
};
use brisk_guard::{BoxError, BuildError, Refusal};
use brisk_metrics::catalog::RATELIMIT_DECISIONS;
use brisk_metrics::testing::Capture;
use futures_util::FutureExt;
use tokio::time::advance;
use tower::{Service, ServiceBuilder, ServiceExt};

fn check(limiter: &RateLimiter, key: &str) -> brisk_guard::ratelimit::Decision {
    limiter
        .check(key)
        .now_or_never()
        .expect("the local store decides at once")
}

fn admitted(limiter: &RateLimiter, key: &str, n: usize) -> usize {
    (0..n).filter(|_| check(limiter, key).is_allowed()).count()
}

#[tokio::test(start_paused = true)]
async fn a_burst_passes_then_one_per_interval_with_exact_retry_after() {
    let limiter = RateLimiter::builder("t")
        .quota(Quota::per_second(10).burst(5))
        .build()
        .unwrap();
    assert_eq!(admitted(&limiter, "k", 100), 5, "the burst, at one instant");
    let refused = check(&limiter, "k");
    assert_eq!(refused.outcome(), Outcome::Rejected);
    assert_eq!(refused.retry_after(), Duration::from_millis(100));
    assert_eq!(refused.quotas()[0].remaining(), 0);
    assert_eq!(refused.quotas()[0].reset(), Duration::from_millis(500));

    advance(Duration::from_millis(99)).await;
    assert!(!check(&limiter, "k").is_allowed(), "1 ms too early");
    assert_eq!(check(&limiter, "k").retry_after(), Duration::from_millis(1));
    advance(Duration::from_millis(1)).await;
    assert!(
        check(&limiter, "k").is_allowed(),
        "one unit back after 100 ms"
    );

    // Steady rate: over 10 s at 1 ms steps, exactly 10/s more.
    let mut passed = 0;
    for _ in 0..10_000 {
        advance(Duration::from_millis(1)).await;
        passed += admitted(&limiter, "k", 3);
    }
    assert_eq!(passed, 100);
    assert_eq!(admitted(&limiter, "other", 100), 5, "keys are apart");
}

#[tokio::test(start_paused = true)]
async fn remaining_counts_down_and_a_full_quota_resets_to_zero() {
    let limiter = RateLimiter::builder("t")
        .quota(Quota::per_minute(3))
        .build()
        .unwrap();
    let remaining: Vec<u64> = (0..3)
        .map(|_| check(&limiter, "k").quotas()[0].remaining())
        .collect();
    assert_eq!(remaining, [2, 1, 0]);
    assert_eq!(check(&limiter, "k").retry_after(), Duration::from_secs(20));
    advance(Duration::from_secs(60)).await;
    let fresh = check(&limiter, "k");
    assert_eq!(fresh.quotas()[0].remaining(), 2);
    assert_eq!(fresh.quotas()[0].reset(), Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn a_tier_checks_every_quota_in_one_step_and_counts_only_when_all_pass() {
    let limiter = RateLimiter::builder("t")
        .tier(Tier::new("free").quota(Quota::per_second(2)))
        .tier(
            Tier::new("premium")
                .quota(Quota::per_second(5).named("burst"))
                .quota(Quota::per_minute(8).named("minute")),
        )
        .build()
        .unwrap();
    let premium = |key| limiter.check_tier("premium", key).now_or_never().unwrap();
    assert_eq!((0..20).filter(|_| premium("k").is_allowed()).count(), 5);
    advance(Duration::from_secs(1)).await;
    // The per-second quota has room for 5 again, the minute quota for only 3.
    let passed = (0..20).filter(|_| premium("k").is_allowed()).count();
    assert_eq!(passed, 3);
    let refused = premium("k");
    assert_eq!(refused.quotas().len(), 2);
    assert!(
        refused.quotas()[0].remaining() > 0,
        "the second-quota refusal took nothing from the first"
    );
    assert_eq!(refused.quotas()[1].remaining(), 0);
    // The free tier of the same key is a separate state; an unknown tier is the default (free).
    assert_eq!(admitted(&limiter, "k", 10), 2);
    assert!(
        !limiter
            .check_tier("gold", "k")
            .now_or_never()
            .unwrap()
            .is_allowed()
    );
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_lets_everything_through_and_counts_what_it_would_refuse() {
    let capture = Capture::new();
    let limiter = capture.run(|| {
        RateLimiter::builder("shadowed")
            .quota(Quota::per_second(2))
            .shadow(true)
            .build()
            .unwrap()
    });
    assert_eq!(admitted(&limiter, "k", 5), 5);
    let count = |decision| {
        capture.counter(
            RATELIMIT_DECISIONS.name,
            &[("limiter", "shadowed"), ("decision", decision)],
        )
    };
    assert_eq!(count("allowed"), 2);
    assert_eq!(count("shadow_rejected"), 3);
    assert_eq!(count("rejected"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_a_million_keys_stays_within_the_bound() {
    let limiter = RateLimiter::builder("t")
        .quota(Quota::per_hour(10))
        .max_keys(10_000)
        .build()
        .unwrap();
    let mut key = String::new();
    for i in 0..1_000_000_u32 {
        key.clear();
        key.push_str(&i.to_string());
        check(&limiter, &key);
        if i % 50_000 == 0 {
            assert!(
                limiter.local_entries() <= 10_000,
                "{}",
                limiter.local_entries()
            );
        }
    }
    assert!(limiter.local_entries() <= 10_000);
    // A key in active use through the flood is still limited.
    let hot = RateLimiter::builder("t")
        .quota(Quota::per_hour(10))
        .max_keys(1_000)
        .build()
        .unwrap();
    let mut hot_passed = 0;
    for i in 0..100_000_u32 {
        check(&hot, &i.to_string());
        hot_passed += usize::from(check(&hot, "abuser").is_allowed());
    }
    assert!(hot_passed <= 20, "the abuser got {hot_passed} of its 10");
}

#[test]
fn bad_settings_are_refused_at_build_with_the_reason() {
    let build = |b: brisk_guard::ratelimit::RateLimiterBuilder| b.build().unwrap_err();
    let quota = |q| build(RateLimiter::builder("t").quota(q));
    assert!(matches!(
        quota(Quota::per_second(0)),
        BuildError::Quota { .. }
    ));
    assert!(matches!(
        quota(Quota::per_second(5).burst(0)),
        BuildError::Quota { .. }
    ));
    assert!(matches!(
        quota(Quota::new(5, Duration::ZERO)),
        BuildError::Quota { .. }
    ));
    assert!(matches!(
        quota(Quota::per_second(5_000_000)),
        BuildError::Quota { .. }
    ));
    let text = quota(Quota::per_second(0)).to_string();
    assert!(text.contains("0 per 1s") && text.contains("zero"), "{text}");

    assert!(matches!(
        build(RateLimiter::builder("t")),
        BuildError::Setting { .. }
    ));
    for name in ["", "a b", "{x}"] {
        let err = build(RateLimiter::builder(name).quota(Quota::per_second(1)));
        assert!(
            matches!(
                err,
                BuildError::Setting {
                    setting: "limiter name",
                    ..
                }
            ),
            "{name:?}"
        );
    }
    let mut crowded = Tier::new("crowded");
    for n in 1..=MAX_QUOTAS + 1 {
        crowded = crowded.quota(Quota::per_second(u32::try_from(n).unwrap()));
    }
    assert!(
        build(RateLimiter::builder("t").tier(crowded))
            .to_string()
            .contains("1 to 4")
    );
    assert!(
        build(RateLimiter::builder("t").tier(Tier::new("empty")))
            .to_string()
            .contains("0 quotas")
    );
    let twice = RateLimiter::builder("t")
        .tier(Tier::new("a").quota(Quota::per_second(1)))
        .tier(Tier::new("a").quota(Quota::per_second(2)));
    assert!(build(twice).to_string().contains("two tiers"));
    let same_quota = Tier::new("a")
        .quota(Quota::per_second(1).named("x"))
        .quota(Quota::per_minute(9).named("x"));
    assert!(
        build(RateLimiter::builder("t").tier(same_quota))
            .to_string()
            .contains("two quotas")
    );
    let unknown = RateLimiter::builder("t")
        .quota(Quota::per_second(1))
        .default_tier("gold");
    assert!(build(unknown).to_string().contains("gold"));
    let tiny = RateLimiter::builder("t")
        .quota(Quota::per_second(1))
        .max_keys(3);
    assert!(matches!(
        build(tiny),
        BuildError::Setting {
            setting: "max_keys",
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn the_layer_admits_in_call_and_clones_share_one_limit() {
    let limiter = RateLimiter::builder("t")
        .quota(Quota::per_minute(4))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, Global))
        .service_fn(move |_: ()| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, BoxError>(()) }
        });
    // Readiness takes no unit: ready many times, call a few.
    let mut first = svc.clone();
    for _ in 0..10 {
        first.ready().await.unwrap();
    }
    let mut outcomes = Vec::new();
    for i in 0..8 {
        let mut svc = if i % 2 == 0 {
            first.clone()
        } else {
            svc.clone()
        };
        outcomes.push(svc.ready().await.unwrap().call(()).await.is_ok());
    }
    assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 4, "{outcomes:?}");
    assert_eq!(
        calls.load(Ordering::Relaxed),
        4,
        "a refused request never reaches the service"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_a_typed_error_with_the_retry_time_and_tier() {
    let limiter = RateLimiter::builder("t")
        .tier(Tier::new("anonymous").quota(Quota::per_second(1)))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, |key: &&str| {
            Some((*key).to_owned())
        }))
        .service_fn(|_: &str| async { Ok::<_, BoxError>(()) });
    svc.ready().await.unwrap().call("a").await.unwrap();
    let error = svc.ready().await.unwrap().call("a").await.unwrap_err();
    let Some(Refusal::RateLimited(limited)) = error.downcast_ref::<Refusal>() else {
        panic!("{error}");
    };
    assert_eq!(limited.retry_after(), Duration::from_secs(1));
    assert_eq!(limited.tier(), "anonymous");
    assert!(error.to_string().contains("retry after 1s"), "{error}");
    // An inner error passes through unchanged.
    let mut failing = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            RateLimiter::builder("t")
                .quota(Quota::per_second(9))
                .build()
                .unwrap(),
            Global,
        ))
        .service_fn(|_: ()| async { Err::<(), BoxError>("boom".into()) });
    let error = failing.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(error.to_string(), "boom");
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_share_one_key_and_cannot_escape_the_limit() {
    let limiter = RateLimiter::builder("t")
        .quota(Quota::per_second(2))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, |key: &Option<&str>| {
            key.map(str::to_owned)
        }))
        .service_fn(|_: Option<&str>| async { Ok::<_, BoxError>(()) });
    let mut passed = 0;
    for _ in 0..5 {
        passed += usize::from(svc.ready().await.unwrap().call(None).await.is_ok());
    }
    assert_eq!(passed, 2);
    assert!(
        svc.ready().await.unwrap().call(Some("")).await.is_ok(),
        "a real key, even empty, is apart"
    );
}

#[tokio::test(start_paused = true)]
async fn an_async_tier_resolver_picks_the_quota_and_unknown_tiers_fall_back() {
    let limiter = RateLimiter::builder("t")
        .tier(Tier::new("anonymous").quota(Quota::per_second(1)))
        .tier(Tier::new("premium").quota(Quota::per_second(3)))
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(limiter, |req: &(&str, &str)| Some(req.0.to_owned())).tiers(
        |req: &(&str, &str)| {
            let plan = req.1.to_owned();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await; // a lookup
                (plan != "none").then_some(plan)
            }
        },
    );
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: (&str, &str)| async { Ok::<_, BoxError>(()) });
    let passed = |req| {
        let mut svc = svc.clone();
        async move {
            let mut n = 0;
            for _ in 0..5 {
                n += usize::from(svc.ready().await.unwrap().call(req).await.is_ok());
            }
            n
        }
    };
    assert_eq!(passed(("a", "premium")).await, 3);
    assert_eq!(passed(("b", "none")).await, 1);
    assert_eq!(
        passed(("c", "platinum")).await,
        1,
        "an unknown tier is the default"
    );
    let _ = svc.ready().await.unwrap();
}

#[test]
fn two_threads_on_one_limiter_admit_exactly_the_quota() {
    let limiter = RateLimiter::builder("t")
        .quota(Quota::per_hour(1_000))
        .build()
        .unwrap();
    let passed = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..5_000 {
                    if check(&limiter, "shared").is_allowed() {
                        passed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    // Real time: at 1,000/h, a second of test time refills at most one unit.
    let passed = passed.load(Ordering::Relaxed);
    assert!((1_000..=1_002).contains(&passed), "{passed}");
}
