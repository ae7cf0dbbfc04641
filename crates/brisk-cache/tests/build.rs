//! Every setting `build()` cannot honour is a clear error; nothing is clamped.

mod common;

use std::time::Duration;

use brisk_cache::{BreakerConfig, BuildError, Cache, CacheBuilder, Error, KeyError, LocalTier};

fn builder() -> CacheBuilder<u64, String> {
    Cache::builder("t")
}

fn refused(builder: CacheBuilder<u64, String>) -> BuildError {
    builder.build().expect_err("refused")
}

#[test]
fn names_must_be_short_and_plain() {
    for name in [
        "",
        "has:colon",
        "has space",
        "ünïcode",
        &"x".repeat(65),
        "brace{tag}",
    ] {
        let err = refused(Cache::builder(name));
        assert_eq!(err, BuildError::Name(name.to_owned()));
        assert!(err.to_string().contains("1 to 64 characters"), "{err}");
    }
    for name in ["users", "users.v2", "a-b_c", &"x".repeat(64)] {
        assert!(
            Cache::<u64, String>::builder(name).build().is_ok(),
            "{name}"
        );
    }
}

#[test]
fn zero_durations_are_refused() {
    assert_eq!(
        refused(builder().ttl(Duration::ZERO)),
        BuildError::Zero("ttl")
    );
    assert_eq!(
        refused(builder().hard_timeout(Duration::ZERO)),
        BuildError::Zero("hard_timeout")
    );
    assert_eq!(
        refused(builder().remote_timeout(Duration::ZERO)),
        BuildError::Zero("remote_timeout")
    );
    assert_eq!(
        refused(builder().soft_timeout(Duration::ZERO)),
        BuildError::Zero("soft_timeout")
    );
    let no_open = BreakerConfig {
        failures: 3,
        open_for: Duration::ZERO,
    };
    assert_eq!(
        refused(builder().breaker(no_open)),
        BuildError::Zero("breaker open_for")
    );
    let never = BreakerConfig {
        failures: 0,
        open_for: Duration::from_secs(1),
    };
    assert_eq!(
        refused(builder().breaker(never)),
        BuildError::Zero("breaker failures")
    );
}

#[test]
fn zero_sizes_are_refused() {
    assert_eq!(
        refused(builder().local(LocalTier::entries(0))),
        BuildError::Zero("local tier capacity")
    );
    assert_eq!(
        refused(builder().local(LocalTier::weighted(0, |_, v: &String| v.len() as u64))),
        BuildError::Zero("local tier capacity")
    );
    assert_eq!(
        refused(builder().max_value_size(0)),
        BuildError::Zero("max_value_size")
    );
    assert_eq!(
        refused(builder().max_key_len(0)),
        BuildError::Zero("max_key_len")
    );
    assert_eq!(
        refused(builder().in_memory(0)),
        BuildError::Zero("in_memory max_bytes")
    );
    assert_eq!(
        refused(builder().local(LocalTier::entries(1).ttl(Duration::ZERO))),
        BuildError::Zero("local tier ttl")
    );
}

#[test]
fn jitter_must_be_a_fraction() {
    for jitter in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
        let err = refused(builder().ttl_jitter(jitter));
        assert!(matches!(err, BuildError::Jitter(_)), "{jitter}: {err}");
        assert!(err.to_string().contains("[0, 1)"), "{err}");
    }
    assert!(builder().ttl_jitter(0.0).build().is_ok());
    assert!(builder().ttl_jitter(0.99).build().is_ok());
}

#[test]
fn the_soft_timeout_must_be_below_the_hard_one() {
    let err = refused(
        builder()
            .soft_timeout(Duration::from_secs(5))
            .hard_timeout(Duration::from_secs(5)),
    );
    assert_eq!(
        err,
        BuildError::SoftAboveHard {
            soft: Duration::from_secs(5),
            hard: Duration::from_secs(5)
        }
    );
    assert!(
        refused(builder().soft_timeout(Duration::from_secs(11)))
            .to_string()
            .contains("below the hard timeout")
    );
}

#[test]
fn ttls_must_not_exceed_the_cache_ttl() {
    let ttl = Duration::from_secs(10);
    let err = refused(builder().ttl(ttl).negative_ttl(Duration::from_secs(11)));
    assert!(
        matches!(
            err,
            BuildError::AboveTtl {
                setting: "negative_ttl",
                ..
            }
        ),
        "{err}"
    );
    let err = refused(
        builder()
            .ttl(ttl)
            .local(LocalTier::entries(10).ttl(Duration::from_secs(11))),
    );
    assert!(
        matches!(
            err,
            BuildError::AboveTtl {
                setting: "local tier ttl",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn huge_durations_are_refused_not_clamped() {
    for (err, setting) in [
        (refused(builder().ttl(Duration::MAX)), "ttl"),
        (refused(builder().stale_for(Duration::MAX)), "stale_for"),
        (
            refused(builder().hard_timeout(Duration::MAX)),
            "hard_timeout",
        ),
        (
            refused(builder().remote_timeout(Duration::MAX)),
            "remote_timeout",
        ),
    ] {
        assert!(
            matches!(err, BuildError::TooLong { setting: s, .. } if s == setting),
            "{err}"
        );
    }
}

#[tokio::test]
async fn keys_too_long_are_errors() {
    let cache: Cache<String, String> = Cache::builder("t").max_key_len(10).build().unwrap();
    let long = "x".repeat(9); // "s:" + 9 bytes
    let err = cache.set(&long, "v".into()).await.unwrap_err();
    assert!(
        matches!(err, Error::Key(KeyError::TooLong { len: 11, max: 10 })),
        "{err}"
    );
    let err = cache
        .get_or_load(&long, async { Ok::<_, std::io::Error>(Some("v".into())) })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Key(_)), "{err}");
    assert!(matches!(cache.get(&long).await, Err(Error::Key(_))));
    assert!(matches!(cache.invalidate(&long).await, Err(Error::Key(_))));
    let ran = std::sync::atomic::AtomicBool::new(false);
    let err = cache
        .write_through(&long, "v".into(), async {
            ran.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Key(_)), "{err}");
    assert!(
        !ran.into_inner(),
        "the source is not written for a key the cache refuses"
    );
}

#[tokio::test]
async fn debug_never_shows_the_password() {
    let server = brisk_testkit::RedisServer::builder()
        .private()
        .arg("--requirepass")
        .arg("s3cret-pw")
        .start()
        .unwrap();
    let url = server.url().replace("redis://", "redis://:s3cret-pw@");
    let redis = brisk_pool::redis_source::Multiplexed::connect(&url)
        .await
        .unwrap();
    let builder = Cache::<u64, String>::builder("t").redis(redis);
    let shown = format!("{builder:?}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    let cache = builder.build().unwrap();
    cache.set(&1, "v".into()).await.unwrap();
    let shown = format!("{cache:?}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(
        shown.contains("Multiplexed") && shown.contains("\"t\""),
        "{shown}"
    );
}
