//! The Redis store against private redis-servers and a 3-master cluster: one round trip per
//! check, one limit shared by every instance, and the failure policy when Redis goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brisk_guard::ratelimit::{OnRedisError, Outcome, Quota, RateLimiter, Tier};
use brisk_pool::redis_source::Multiplexed;
use brisk_testkit::{RedisCluster, RedisServer};
use tokio::time::Instant;

const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// What a loaded 2-core machine may add to a bound (scheduling, not the limiter's logic).
const SLACK: Duration = Duration::from_millis(400);

fn redis() -> RedisServer {
    RedisServer::builder()
        .private()
        .start()
        .expect("redis-server starts")
}

async fn connect(server: &RedisServer) -> Multiplexed {
    Multiplexed::builder(&server.url())
        .response_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connects")
}

/// Calls of each command since the last `CONFIG RESETSTAT`, from `INFO commandstats`.
fn command_calls(server: &RedisServer) -> Vec<(String, u64)> {
    let info = server.command(&["INFO", "commandstats"]).unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            let calls = rest.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .filter(|(name, _)| name != "info" && name != "config|resetstat")
        .collect()
}

#[tokio::test]
async fn every_check_is_exactly_one_evalsha() {
    let server = redis();
    let limiter = RateLimiter::builder("one-trip")
        .tier(
            Tier::new("default")
                .quota(Quota::per_second(1_000))
                .quota(Quota::per_day(1_000_000)),
        )
        .redis(connect(&server).await)
        .build()
        .unwrap();
    assert!(limiter.check("warm").await.is_allowed(), "loads the script");
    server.command(&["CONFIG", "RESETSTAT"]).unwrap();
    for i in 0..100 {
        assert_eq!(
            limiter.check(&format!("k{}", i % 7)).await.outcome(),
            Outcome::Allowed
        );
    }
    // commandstats also counts the commands a script runs: a GET and a SET per quota.
    let mut calls = command_calls(&server);
    calls.sort();
    let expected = [("evalsha", 100), ("get", 200), ("set", 200)].map(|(c, n)| (c.to_owned(), n));
    assert_eq!(calls, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_hammering_one_key_admit_the_quota_plus_burst() {
    let server = redis();
    let (rate, burst) = (100.0, 10.0);
    let mut limiters = Vec::new();
    for _ in 0..4 {
        // Separate connections: four processes, as far as Redis can tell.
        limiters.push(
            RateLimiter::builder("shared")
                .quota(Quota::per_second(100).burst(10))
                .redis(connect(&server).await)
                .build()
                .unwrap(),
        );
    }
    let admitted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(2);
    let tasks: Vec<_> = limiters
        .iter()
        .flat_map(|limiter| (0..4).map(move |_| limiter.clone()))
        .map(|limiter| {
            let admitted = admitted.clone();
            tokio::spawn(async move {
                let mut last = Instant::now();
                while started.elapsed() < run_for {
                    let decision = limiter.check("hot").await;
                    assert!(!matches!(
                        decision.outcome(),
                        Outcome::FailedOpen | Outcome::FailedClosed
                    ));
                    if decision.is_allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        last = Instant::now();
                    }
                }
                last
            })
        })
        .collect();
    let mut last = started;
    for task in tasks {
        last = last.max(task.await.unwrap());
    }
    // GCRA admits the burst at once, then one every 10 ms until the last admission.
    let expected = burst + rate * last.duration_since(started).as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    assert!(
        (admitted - expected).abs() <= 0.02 * (burst + rate * run_for.as_secs_f64()),
        "admitted {admitted}, expected {expected:.1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_fails_open_or_closed_within_the_timeout() {
    let mut server = redis();
    let quota = Quota::per_second(1);
    let open = RateLimiter::builder("open")
        .quota(quota.clone())
        .redis_with(connect(&server).await, REDIS_TIMEOUT, OnRedisError::Allow)
        .build()
        .unwrap();
    let closed = RateLimiter::builder("closed")
        .quota(quota)
        .redis_with(connect(&server).await, REDIS_TIMEOUT, OnRedisError::Refuse)
        .build()
        .unwrap();
    assert_eq!(open.check("k").await.outcome(), Outcome::Allowed);
    assert_eq!(open.check("k").await.outcome(), Outcome::Rejected);
    server.kill().unwrap();
    for _ in 0..5 {
        let started = Instant::now();
        let decision = open.check("k").await;
        assert!(
            started.elapsed() < REDIS_TIMEOUT + SLACK,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(decision.outcome(), Outcome::FailedOpen);
        assert!(decision.is_allowed());

        let started = Instant::now();
        let decision = closed.check("k").await;
        assert!(
            started.elapsed() < REDIS_TIMEOUT + SLACK,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(decision.outcome(), Outcome::FailedClosed);
        assert!(!decision.is_allowed());
        assert_eq!(decision.retry_after(), Duration::from_secs(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_answers_within_the_timeout_and_is_used_again_after() {
    let mut server = redis();
    let limiter = RateLimiter::builder("paused")
        .quota(Quota::per_minute(1))
        .redis_with(connect(&server).await, REDIS_TIMEOUT, OnRedisError::Allow)
        .build()
        .unwrap();
    assert_eq!(limiter.check("k").await.outcome(), Outcome::Allowed);
    server.pause().unwrap();
    let started = Instant::now();
    assert_eq!(limiter.check("k").await.outcome(), Outcome::FailedOpen);
    assert!(started.elapsed() < REDIS_TIMEOUT + SLACK);
    server.resume().unwrap();
    let mut outcome = Outcome::FailedOpen;
    for _ in 0..50 {
        outcome = limiter.check("k").await.outcome();
        if outcome != Outcome::FailedOpen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        outcome,
        Outcome::Rejected,
        "the state from before the pause still holds"
    );
}

#[tokio::test]
async fn the_deadline_in_scope_bounds_a_check() {
    let mut server = redis();
    let limiter = RateLimiter::builder("deadline")
        .quota(Quota::per_second(1))
        .redis_with(
            connect(&server).await,
            Duration::from_secs(10),
            OnRedisError::Refuse,
        )
        .build()
        .unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let decision =
        brisk_core::deadline::scope(started + Duration::from_millis(50), limiter.check("k")).await;
    assert_eq!(decision.outcome(), Outcome::FailedClosed);
    assert!(started.elapsed() < Duration::from_millis(50) + SLACK);
    server.resume().unwrap();
}

#[tokio::test]
async fn a_corrupt_or_foreign_value_in_redis_counts_as_a_full_quota() {
    let server = redis();
    let limiter = RateLimiter::builder("corrupt")
        .quota(Quota::per_minute(2))
        .redis(connect(&server).await)
        .build()
        .unwrap();
    server
        .command(&["SET", "brisk:rl:{corrupt:default:k}:0", "not a number"])
        .unwrap();
    assert_eq!(limiter.check("k").await.outcome(), Outcome::Allowed);
    assert_eq!(limiter.check("k").await.outcome(), Outcome::Allowed);
    assert_eq!(limiter.check("k").await.outcome(), Outcome::Rejected);
    let ttl: i64 = server
        .command(&["PTTL", "brisk:rl:{corrupt:default:k}:0"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (1..=60_001).contains(&ttl),
        "a key lives until its quota is full again: {ttl}"
    );
}

#[tokio::test]
async fn on_a_cluster_checks_of_many_keys_and_tiers_share_one_limit() {
    let cluster = RedisCluster::start().unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let limiter = |conn| {
        RateLimiter::builder("cluster")
            .tier(
                Tier::new("two")
                    .quota(Quota::per_minute(3))
                    .quota(Quota::per_hour(100)),
            )
            .redis(conn)
            .build()
            .unwrap()
    };
    let a = limiter(client.get_async_connection().await.unwrap());
    let b = limiter(client.get_async_connection().await.unwrap());
    // Keys spread over every slot range; each check's keys share one hash tag.
    for i in 0..30 {
        let key = format!("user:{i}");
        let outcomes = [
            a.check(&key).await.outcome(),
            b.check(&key).await.outcome(),
            a.check(&key).await.outcome(),
            b.check(&key).await.outcome(),
        ];
        assert_eq!(
            outcomes,
            [
                Outcome::Allowed,
                Outcome::Allowed,
                Outcome::Allowed,
                Outcome::Rejected
            ],
            "{key}"
        );
    }
}
