//! Adversarial tests of brisk-pool's documented promises, written from its docs and public API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use brisk_core::deadline;
#[cfg(feature = "redis")]
use brisk_metrics::catalog::REDIS_RECONNECTS;
use brisk_metrics::catalog::{
    POOL_CONNECTIONS, POOL_ERRORS, POOL_NESTED, POOL_PENDING, POOL_TIMEOUTS,
};
use brisk_metrics::testing::Capture;
use brisk_pool::deadpool::managed;
use brisk_pool::{BuildError, IdleSince, Instrumented, Lifecycle, MAX_PERIOD, MAX_WAIT, PoolError};
use tokio::time::{Instant, sleep, timeout};

// ---------------------------------------------------------------------------------------------
// A trivial deadpool manager whose connections are numbers: lets pool behaviour be attacked in
// paused time. `fail` makes opening fail at once, `hang` makes it never finish.

#[derive(Debug)]
struct Down(String);
impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Down {}

#[derive(Default)]
struct Gate {
    fail: AtomicBool,
    hang: AtomicBool,
    attempts: AtomicUsize,
    next: AtomicUsize,
    delay_ms: std::sync::atomic::AtomicU64,
}

struct Numbers(Arc<Gate>);

impl managed::Manager for Numbers {
    type Type = usize;
    type Error = Down;
    async fn create(&self) -> Result<usize, Down> {
        self.0.attempts.fetch_add(1, SeqCst);
        let delay = self.0.delay_ms.load(SeqCst);
        if delay > 0 {
            sleep(Duration::from_millis(delay)).await;
        }
        if self.0.hang.load(SeqCst) {
            sleep(Duration::from_secs(100_000)).await;
        }
        if self.0.fail.load(SeqCst) {
            return Err(Down("connection refused (os error 111)".into()));
        }
        Ok(self.0.next.fetch_add(1, SeqCst))
    }
    async fn recycle(&self, _: &mut usize, _: &managed::Metrics) -> managed::RecycleResult<Down> {
        Ok(())
    }
}

fn numbers(max: usize) -> (Arc<Gate>, managed::Pool<Numbers>) {
    let gate = Arc::new(Gate::default());
    let pool = managed::Pool::builder(Numbers(gate.clone()))
        .max_size(max)
        .build()
        .unwrap();
    (gate, pool)
}

fn wrapped(max: usize, wait: Duration) -> (Arc<Gate>, Instrumented<managed::Pool<Numbers>>) {
    let (gate, pool) = numbers(max);
    let pool = Instrumented::builder(pool)
        .name("main")
        .wait_timeout(wait)
        .build()
        .unwrap();
    (gate, pool)
}

/// The same, with an `on_discard` hook counting its calls.
fn with_hook(
    max: usize,
) -> (
    Arc<Gate>,
    Arc<AtomicUsize>,
    Instrumented<managed::Pool<Numbers>>,
) {
    let (gate, pool) = numbers(max);
    let discarded = Arc::new(AtomicUsize::new(0));
    let pool = Instrumented::builder(pool)
        .name("main")
        .wait_timeout(Duration::from_secs(1))
        .on_discard({
            let discarded = discarded.clone();
            move |_: &mut managed::Object<Numbers>| {
                discarded.fetch_add(1, SeqCst);
            }
        })
        .build()
        .unwrap();
    (gate, discarded, pool)
}

const POOL: [(&str, &str); 1] = [("db_client_connection_pool_name", "main")];
const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Timeouts and which bound fired.

#[tokio::test]
async fn exhausted_says_the_pools_timeout_fired_and_names_the_state() {
    let (_, pool) = wrapped(1, Duration::from_millis(500));
    let _held = pool.get().await.unwrap();
    let started = Instant::now();
    let err = timeout(T, pool.get()).await.unwrap().map(drop).unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_millis(800),
        "{waited:?}"
    );
    let PoolError::Exhausted(why) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(why.pool, "main");
    assert_eq!(why.in_use, 1);
    assert_eq!(why.max_size, Some(1));
    assert_eq!(why.waiting, 1, "callers waiting, this one included");
    assert!(
        why.oldest_checkout
            .is_some_and(|d| d >= Duration::from_millis(500)),
        "{why:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("the pool's wait timeout fired: pool `main`: no connection after 50"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shorter_deadline_fires_as_the_deadline_and_a_longer_one_as_the_pool() {
    let (_, pool) = wrapped(1, Duration::from_millis(500));
    let _held = pool.get().await.unwrap();
    let started = Instant::now();
    let err = deadline::scope(started + Duration::from_millis(100), pool.get())
        .await
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, PoolError::Deadline { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(150));
    assert!(
        err.to_string()
            .starts_with("the request's deadline fired: the checkout was allowed"),
        "{err}"
    );
    let started = Instant::now();
    let err = deadline::scope(started + Duration::from_secs(3), pool.get())
        .await
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, PoolError::Exhausted(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(600));
}

#[tokio::test(start_paused = true)]
async fn nested_deadlines_the_nearest_wins_either_way() {
    let (_, pool) = wrapped(1, Duration::from_secs(5));
    let _held = pool.get().await.unwrap();
    for (outer, inner) in [(100, 3_000), (3_000, 100)] {
        let started = Instant::now();
        let err = deadline::scope(started + Duration::from_millis(outer), async {
            deadline::scope(started + Duration::from_millis(inner), pool.get()).await
        })
        .await
        .map(drop)
        .unwrap_err();
        assert!(matches!(err, PoolError::Deadline { .. }), "{err:?}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(150),
            "{outer}/{inner}: {took:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_tiny_deadline_with_a_connection_that_hangs_fails_within_it() {
    let (gate, pool) = wrapped(2, Duration::from_secs(5));
    gate.hang.store(true, SeqCst);
    let started = Instant::now();
    let err = timeout(
        T,
        deadline::scope(started + Duration::from_nanos(1), pool.get()),
    )
    .await
    .unwrap()
    .map(drop)
    .unwrap_err();
    assert!(matches!(err, PoolError::Deadline { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(10));
    assert_eq!(pool.status().in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_connect_that_hangs_fails_the_checkout_within_wait_timeout() {
    let (gate, pool) = wrapped(2, Duration::from_millis(300));
    gate.hang.store(true, SeqCst);
    let started = Instant::now();
    let err = timeout(T, pool.get()).await.unwrap().map(drop).unwrap_err();
    assert!(matches!(err, PoolError::Exhausted(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(text.contains("reachable but not answering"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Cut-off checkouts are closed, not returned.

#[tokio::test(start_paused = true)]
async fn a_checkout_dropped_after_its_deadline_is_closed() {
    let (_, discarded, pool) = with_hook(2);
    let started = Instant::now();
    deadline::scope(started + Duration::from_millis(100), async {
        let client = pool.get().await.unwrap();
        sleep(Duration::from_millis(200)).await;
        drop(client);
    })
    .await;
    let status = pool.status();
    assert_eq!((status.size, status.in_use()), (0, 0), "{status:?}");
    assert_eq!(discarded.load(SeqCst), 1, "on_discard ran");
}

#[tokio::test(start_paused = true)]
async fn a_checkout_dropped_in_time_is_returned_not_discarded() {
    let (_, discarded, pool) = with_hook(2);
    let started = Instant::now();
    deadline::scope(started + Duration::from_millis(100), async {
        let client = pool.get().await.unwrap();
        drop(client);
    })
    .await;
    let status = pool.status();
    assert_eq!((status.size, status.idle), (1, 1), "{status:?}");
    assert_eq!(discarded.load(SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_checkout_dropped_while_panicking_is_closed() {
    let (_, discarded, pool) = with_hook(2);
    let task = tokio::spawn({
        let pool = pool.clone();
        async move {
            let _client = pool.get().await.unwrap();
            panic!("handler bug");
        }
    });
    assert!(timeout(T, task).await.unwrap().is_err());
    let status = pool.status();
    assert_eq!((status.size, status.in_use()), (0, 0), "{status:?}");
    assert_eq!(discarded.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn discard_closes_and_runs_the_hook() {
    let (_, discarded, pool) = with_hook(2);
    let client = pool.get().await.unwrap();
    let first = **client;
    client.discard();
    assert_eq!(pool.status().size, 0);
    assert_eq!(discarded.load(SeqCst), 1);
    let again = pool.get().await.unwrap();
    assert_ne!(**again, first);
}

#[tokio::test(start_paused = true)]
async fn a_checkout_held_by_an_aborted_task_is_returned_and_gauges_settle() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(1, Duration::from_secs(1)));
    let (got, release) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            let _client = pool.get().await.unwrap();
            drop(got);
            std::future::pending::<()>().await;
        }
    });
    let _ = release.await;
    // A waiter, aborted too.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    while pool.status().waiting != Some(1) {
        tokio::task::yield_now().await;
    }
    holder.abort();
    waiter.abort();
    let _ = holder.await;
    let _ = waiter.await;
    sleep(Duration::from_secs(2)).await;
    let status = pool.status();
    assert_eq!(
        (status.in_use(), status.waiting),
        (0, Some(0)),
        "{status:?}"
    );
    // The next caller is served.
    let _c = capture
        .scope(timeout(T, pool.get()))
        .await
        .unwrap()
        .unwrap();
    drop(_c);
    sleep(Duration::from_secs(2)).await;
    let _ = capture.scope(pool.get()).await.unwrap();
    assert_eq!(capture.gauge(POOL_PENDING.name, &POOL), Some(0.0));
    assert_eq!(
        capture.counter(POOL_TIMEOUTS.name, &POOL),
        0,
        "a cancelled wait is no timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn a_get_dropped_while_connecting_does_not_hold_up_close() {
    let (gate, pool) = wrapped(2, Duration::from_secs(5));
    gate.hang.store(true, SeqCst);
    let connecting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(gate.attempts.load(SeqCst), 1, "it is connecting");
    connecting.abort();
    let _ = connecting.await;
    assert_eq!(pool.status().in_use(), 0);
    let started = Instant::now();
    let closed = timeout(T, pool.close(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(closed.is_ok(), "{closed:?}");
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// close()

#[tokio::test(start_paused = true)]
async fn close_with_duration_max_is_bounded_by_max_wait() {
    let (_, pool) = wrapped(1, Duration::from_secs(1));
    let _held = pool.get().await.unwrap();
    let started = Instant::now();
    let err = timeout(MAX_WAIT * 2, pool.close(Duration::MAX))
        .await
        .expect("close waited past MAX_WAIT")
        .unwrap_err();
    assert_eq!(err.in_use, 1);
    assert!(started.elapsed() <= MAX_WAIT + Duration::from_secs(1));
    assert!(err.waited <= MAX_WAIT + Duration::from_secs(1), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn close_with_zero_timeout() {
    let (_, pool) = wrapped(2, Duration::from_secs(1));
    let held = pool.get().await.unwrap();
    let err = timeout(T, pool.close(Duration::ZERO))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.in_use, 1, "{err:?}");
    assert!(err.to_string().contains("main"), "{err}");
    drop(held);
    assert!(
        timeout(T, pool.close(Duration::ZERO))
            .await
            .unwrap()
            .is_ok(),
        "closing twice, nothing out"
    );
}

#[tokio::test(start_paused = true)]
async fn after_close_checkouts_fail_at_once_counted_and_returns_are_closed() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(2, Duration::from_secs(1)));
    let held = pool.get().await.unwrap();
    let _idle = pool.get().await.unwrap();
    drop(_idle);
    assert_eq!(pool.status().size, 2);
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(5)).await }
    });
    tokio::task::yield_now().await;
    let started = Instant::now();
    let err = capture.scope(pool.get()).await.map(drop).unwrap_err();
    assert!(matches!(err, PoolError::Closed), "{err:?}");
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(err.to_string(), "the pool is closed");
    let closed = [
        ("db_client_connection_pool_name", "main"),
        ("reason", "closed"),
    ];
    assert_eq!(capture.counter(POOL_ERRORS.name, &closed), 1);
    // The connection out keeps working; returned, it is closed.
    assert_eq!(**held, **held);
    drop(held);
    assert!(timeout(T, closing).await.unwrap().unwrap().is_ok());
    assert_eq!(pool.status().size, 0, "{:?}", pool.status());
}

#[tokio::test(start_paused = true)]
async fn close_fails_a_waiting_caller_at_once_over_deadpool() {
    let (_, pool) = wrapped(1, Duration::from_secs(5));
    let held = pool.get().await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move {
            let started = Instant::now();
            (pool.get().await.map(drop), started.elapsed())
        }
    });
    while pool.status().waiting != Some(1) {
        tokio::task::yield_now().await;
    }
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(1)).await }
    });
    let (result, took) = timeout(T, waiter).await.unwrap().unwrap();
    assert!(matches!(result, Err(PoolError::Closed)), "{result:?}");
    assert!(took < Duration::from_millis(10), "{took:?}");
    drop(held);
    assert!(timeout(T, closing).await.unwrap().unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn close_waits_for_a_checkout_connecting_and_bounds_it() {
    let (gate, pool) = wrapped(2, Duration::from_secs(2));
    gate.hang.store(true, SeqCst);
    let connecting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let result = timeout(T, pool.close(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(
        result.is_ok(),
        "the connecting checkout gave up at its 2 s bound: {result:?}"
    );
    assert!(
        started.elapsed() <= Duration::from_millis(2100),
        "{:?}",
        started.elapsed()
    );
    assert!(connecting.is_finished());
}

// ---------------------------------------------------------------------------------------------
// Backoff while the database is down.

#[tokio::test]
async fn a_failure_makes_the_next_checkouts_fail_fast_naming_the_error() {
    let capture = Capture::new();
    let (gate, pool) = capture.run(|| wrapped(4, Duration::from_secs(1)));
    gate.fail.store(true, SeqCst);
    let err = capture.scope(pool.get()).await.map(drop).unwrap_err();
    assert!(matches!(err, PoolError::Backend(_)), "{err:?}");
    assert!(err.to_string().contains("connection refused"), "{err}");
    let err = capture.scope(pool.get()).await.map(drop).unwrap_err();
    let PoolError::Unavailable(why) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(why.pool, "main");
    assert_eq!(why.failures, 1);
    assert!(why.retry_in <= Duration::from_millis(50), "{why:?}");
    assert!(why.retry_in >= Duration::from_millis(1), "{why:?}");
    assert!(
        why.last_error
            .as_deref()
            .unwrap_or("")
            .contains("connection refused"),
        "{why:?}"
    );
    assert!(err.to_string().contains("connection refused"), "{err}");
    assert_eq!(gate.attempts.load(SeqCst), 1);
    let unavailable = [
        ("db_client_connection_pool_name", "main"),
        ("reason", "unavailable"),
    ];
    let backend = [
        ("db_client_connection_pool_name", "main"),
        ("reason", "backend"),
    ];
    assert_eq!(capture.counter(POOL_ERRORS.name, &unavailable), 1);
    assert_eq!(capture.counter(POOL_ERRORS.name, &backend), 1);
}

#[tokio::test]
async fn when_a_pause_ends_one_checkout_tries_not_a_storm() {
    let (gate, pool) = wrapped(64, Duration::from_secs(1));
    gate.fail.store(true, SeqCst);
    let _ = pool.get().await;
    assert_eq!(gate.attempts.load(SeqCst), 1);
    sleep(Duration::from_millis(60)).await; // the first pause (≤ 50 ms) is over
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get().await.map(drop) })
        })
        .collect();
    for caller in callers {
        let _ = timeout(T, caller).await.unwrap().unwrap();
    }
    assert_eq!(
        gate.attempts.load(SeqCst),
        2,
        "50 checkouts after the pause: one tried"
    );
}

#[tokio::test]
async fn when_a_pause_ends_one_hanging_attempt_does_not_let_others_through() {
    let (gate, pool) = wrapped(64, Duration::from_millis(500));
    gate.fail.store(true, SeqCst);
    let _ = pool.get().await;
    sleep(Duration::from_millis(60)).await;
    gate.hang.store(true, SeqCst);
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get().await.map(drop) })
        })
        .collect();
    for caller in callers {
        let _ = timeout(T, caller).await.unwrap().unwrap();
    }
    assert_eq!(
        gate.attempts.load(SeqCst),
        2,
        "one trying checkout, the rest failing fast"
    );
}

#[tokio::test]
async fn idle_connections_still_serve_while_backing_off() {
    let (gate, pool) = wrapped(2, Duration::from_secs(1));
    assert_eq!(pool.warm_up(1).await.unwrap(), 1);
    gate.fail.store(true, SeqCst);
    let held = pool.get().await.unwrap(); // the idle one
    let err = pool.get().await.map(drop).unwrap_err();
    assert!(matches!(err, PoolError::Backend(_)), "{err:?}");
    drop(held);
    let again = pool.get().await;
    assert!(
        again.is_ok(),
        "the idle connection serves: {:?}",
        again.map(drop)
    );
}

#[tokio::test]
async fn recovery_ends_the_backoff() {
    let (gate, pool) = wrapped(4, Duration::from_secs(1));
    gate.fail.store(true, SeqCst);
    for _ in 0..6 {
        let _ = pool.get().await;
        sleep(Duration::from_millis(300)).await;
    }
    gate.fail.store(false, SeqCst);
    // The longest pause is 2 s: by then one checkout tries and succeeds.
    sleep(Duration::from_millis(2_100)).await;
    let first = pool.get().await;
    assert!(first.is_ok(), "{:?}", first.map(drop));
    // With the first held, the next must open a new connection, and may.
    let second = pool.get().await;
    assert!(second.is_ok(), "the backoff ended: {:?}", second.map(drop));
}

#[tokio::test]
async fn a_custom_backoff_is_honoured() {
    let (gate, pool) = numbers(4);
    let pool = Instrumented::builder(pool)
        .connect_backoff(Duration::from_secs(1), Duration::from_secs(1))
        .build()
        .unwrap();
    gate.fail.store(true, SeqCst);
    let _ = pool.get().await;
    sleep(Duration::from_millis(400)).await;
    let err = pool.get().await.map(drop).unwrap_err();
    let PoolError::Unavailable(why) = &err else {
        panic!("a 1 s pause, cut by at most half: {err:?}")
    };
    assert!(why.retry_in <= Duration::from_millis(600), "{why:?}");
    sleep(Duration::from_millis(700)).await;
    let _ = pool.get().await;
    assert_eq!(gate.attempts.load(SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// Settings.

#[test]
fn every_builder_setting_is_checked() {
    let build = |f: &dyn Fn(
        brisk_pool::InstrumentedBuilder<managed::Pool<Numbers>>,
    ) -> brisk_pool::InstrumentedBuilder<managed::Pool<Numbers>>| {
        f(Instrumented::builder(numbers(2).1)).build().map(drop)
    };
    let s = Duration::from_secs;
    assert!(build(&|b| b.wait_timeout(MAX_WAIT)).is_ok());
    let err = build(&|b| b.wait_timeout(MAX_WAIT + Duration::from_nanos(1))).unwrap_err();
    assert!(err.to_string().contains("wait_timeout"), "{err}");
    assert!(build(&|b| b.wait_timeout(Duration::from_nanos(1))).is_ok());
    for (first, max) in [
        (Duration::ZERO, s(1)),
        (s(1), Duration::ZERO),
        (s(2), s(1)),
        (s(1), Duration::MAX),
        (Duration::MAX, Duration::MAX),
        (s(1), MAX_WAIT + Duration::from_nanos(1)),
    ] {
        let err = build(&|b| b.connect_backoff(first, max));
        let err = err.expect_err(&format!("connect_backoff({first:?}, {max:?})"));
        assert!(err.to_string().contains("backoff"), "{err}");
    }
    assert!(build(&|b| b.connect_backoff(s(1), s(1))).is_ok());
    assert!(build(&|b| b.connect_backoff(MAX_WAIT, MAX_WAIT)).is_ok());
    let err = build(&|b| b.recommend_every(Duration::from_millis(99))).unwrap_err();
    assert!(err.to_string().contains("recommend_every"), "{err}");
    assert!(build(&|b| b.recommend_every(Duration::from_millis(100))).is_ok());
    assert!(build(&|b| b.recommend_every(MAX_PERIOD)).is_ok());
    assert!(build(&|b| b.recommend_every(MAX_PERIOD + Duration::from_nanos(1))).is_err());
    assert!(build(&|b| b.recommend_every(Duration::ZERO)).is_err());
    assert!(build(&|b| b.name(" ")).is_ok() || build(&|b| b.name(" ")).is_err());
    assert!(matches!(
        build(&|b| b.name("")).unwrap_err(),
        BuildError::Invalid { .. } | BuildError::Zero { .. }
    ));
}

#[test]
fn lifecycle_validation_covers_every_field() {
    let s = Duration::from_secs;
    assert!(Lifecycle::default().validate().is_ok());
    let with = |f: &dyn Fn(&mut Lifecycle)| {
        let mut l = Lifecycle::default();
        f(&mut l);
        l.validate()
    };
    assert!(with(&|l| l.reap_every = Duration::ZERO).is_err());
    assert!(with(&|l| l.reap_every = Duration::MAX).is_err());
    assert!(with(&|l| l.max_lifetime = Some(Duration::ZERO)).is_err());
    assert!(with(&|l| l.max_lifetime = Some(Duration::MAX)).is_err());
    assert!(with(&|l| l.max_lifetime = Some(MAX_PERIOD + Duration::from_nanos(1))).is_err());
    assert!(with(&|l| l.idle_timeout = Some(Duration::ZERO)).is_err());
    assert!(with(&|l| l.idle_timeout = Some(Duration::MAX)).is_err());
    assert!(
        with(&|l| {
            l.max_lifetime = Some(s(60));
            l.jitter = s(60);
        })
        .is_err()
    );
    assert!(
        with(&|l| {
            l.max_lifetime = Some(s(60));
            l.jitter = s(59);
        })
        .is_ok()
    );
    assert!(
        with(&|l| {
            l.max_lifetime = None;
            l.idle_timeout = None;
        })
        .is_ok()
    );
    let err = with(&|l| l.reap_every = Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("reap_every"), "{err}");
}

#[test]
fn lifetimes_and_idle_time_as_documented() {
    let s = Duration::from_secs;
    let mut l = Lifecycle::default();
    l.max_lifetime = Some(s(60));
    l.jitter = s(30);
    l.idle_timeout = Some(s(10));
    let now = std::time::Instant::now();
    for i in 0..100 {
        let created = now - Duration::from_millis(i * 37);
        let life = l.lifetime_of(created).unwrap();
        assert!(life > s(30) && life <= s(60), "{life:?}");
        assert_eq!(l.lifetime_of(created), Some(life), "stable");
    }
    l.max_lifetime = None;
    assert_eq!(l.lifetime_of(now), None);
    assert!(l.keeps(now, s(9)));
    assert!(!l.keeps(now, s(11)));

    let mut idle = IdleSince::default();
    let created = now;
    assert_eq!(idle.idle_for(created, 1, now), Duration::ZERO);
    idle.end_round();
    assert_eq!(idle.idle_for(created, 1, now + s(5)), s(5));
    idle.end_round();
    assert_eq!(
        idle.idle_for(created, 2, now + s(6)),
        Duration::ZERO,
        "used since"
    );
    idle.end_round();
    idle.end_round(); // a round that did not see it: forgotten
    assert_eq!(idle.idle_for(created, 2, now + s(20)), Duration::ZERO);
}

#[test]
fn bb8_lifecycle_accepts_every_valid_setting() {
    let s = Duration::from_secs;
    for (life, jitter, idle, reap) in [
        (Some(MAX_PERIOD), s(0), Some(MAX_PERIOD), MAX_PERIOD),
        (None, s(100), None, Duration::from_nanos(1)),
        (
            Some(s(1)),
            Duration::from_nanos(999_999_999),
            Some(Duration::from_nanos(1)),
            s(1),
        ),
    ] {
        let mut l = Lifecycle::default();
        l.max_lifetime = life;
        l.jitter = jitter;
        l.idle_timeout = idle;
        l.reap_every = reap;
        assert!(l.validate().is_ok(), "{l:?}");
        let _ = l.bb8(brisk_pool::bb8::Pool::<bb8_redis::RedisConnectionManager>::builder());
    }
}

#[tokio::test(start_paused = true)]
async fn spawn_lifecycle_refuses_bad_settings_and_accepts_min_idle_at_max() {
    let (_, pool) = wrapped(3, Duration::from_secs(1));
    let mut l = Lifecycle::default();
    l.reap_every = Duration::ZERO;
    assert!(pool.spawn_lifecycle(l).is_err());
    let mut l = Lifecycle::default();
    l.min_idle = 4;
    assert!(pool.spawn_lifecycle(l).is_err());
    let mut l = Lifecycle::default();
    l.min_idle = 3;
    assert!(pool.spawn_lifecycle(l).is_ok());
    timeout(T, async {
        while pool.status().idle < 3 {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("warm at once");
}

#[tokio::test]
async fn idle_timeout_never_closes_a_connection_earlier_than_its_return_plus_timeout() {
    let (_, pool) = wrapped(2, Duration::from_secs(1));
    let mut l = Lifecycle::default();
    l.idle_timeout = Some(Duration::from_millis(1_000));
    l.reap_every = Duration::from_millis(200);
    l.min_idle = 0;
    let client = pool.get().await.unwrap();
    pool.spawn_lifecycle(l).unwrap();
    sleep(Duration::from_millis(1_500)).await; // held past the idle timeout
    drop(client);
    sleep(Duration::from_millis(700)).await;
    assert_eq!(
        pool.status().size,
        1,
        "closed before its idle timeout after return"
    );
    sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        pool.status().size,
        0,
        "not closed by idle_timeout + reap_every"
    );
}

#[tokio::test]
async fn the_lifecycle_stops_after_close() {
    let (gate, pool) = wrapped(2, Duration::from_secs(1));
    let mut l = Lifecycle::default();
    l.min_idle = 1;
    l.max_lifetime = Some(Duration::from_millis(300));
    l.jitter = Duration::ZERO;
    l.reap_every = Duration::from_millis(100);
    pool.spawn_lifecycle(l).unwrap();
    sleep(Duration::from_millis(150)).await;
    assert!(gate.attempts.load(SeqCst) >= 1);
    pool.close(Duration::from_secs(1)).await.unwrap();
    sleep(Duration::from_millis(50)).await;
    let after = gate.attempts.load(SeqCst);
    sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        gate.attempts.load(SeqCst),
        after,
        "no connection opened after close"
    );
}

// ---------------------------------------------------------------------------------------------
// warm_up

#[tokio::test(start_paused = true)]
async fn warm_up_extremes() {
    let (gate, pool) = wrapped(3, Duration::from_millis(500));
    assert_eq!(timeout(T, pool.warm_up(0)).await.unwrap().unwrap(), 0);
    assert_eq!(
        timeout(T, pool.warm_up(usize::MAX)).await.unwrap().unwrap(),
        3
    );
    assert_eq!(gate.attempts.load(SeqCst), 3);
    let (gate, pool) = wrapped(3, Duration::from_millis(500));
    gate.hang.store(true, SeqCst);
    let started = Instant::now();
    let result = timeout(T, pool.warm_up(2))
        .await
        .expect("warm_up is bounded");
    assert!(result.is_err());
    assert!(
        started.elapsed() <= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics

#[tokio::test(start_paused = true)]
async fn nested_checkouts_counted_only_in_one_task_of_one_pool() {
    let capture = Capture::new();
    let (_, a) = capture.run(|| wrapped(4, Duration::from_secs(1)));
    let b = capture.run(|| {
        Instrumented::builder(numbers(4).1)
            .name("other")
            .build()
            .unwrap()
    });
    capture
        .scope(async {
            let one = a.get().await.unwrap();
            let _other_pool = b.get().await.unwrap();
            let other_task = tokio::spawn({
                let a = a.clone();
                async move { a.get().await.map(drop) }
            });
            other_task.await.unwrap().unwrap();
            assert_eq!(capture.counter(POOL_NESTED.name, &POOL), 0);
            drop(one);
            let a = a.clone();
            tokio::spawn(async move {
                let one = a.get().await.unwrap();
                let two = a.clone().get().await.unwrap();
                drop((one, two));
                let _three = a.get().await.unwrap(); // nothing held now
            })
            .await
            .unwrap();
        })
        .await;
    assert_eq!(capture.counter(POOL_NESTED.name, &POOL), 1);
    let other = [("db_client_connection_pool_name", "other")];
    assert_eq!(capture.counter(POOL_NESTED.name, &other), 0);
}

#[tokio::test(start_paused = true)]
async fn used_gauge_counts_checkouts_out() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(4, Duration::from_secs(1)));
    let used = [
        ("db_client_connection_pool_name", "main"),
        ("db_client_connection_state", "used"),
    ];
    let (x, y) = capture
        .scope(async { (pool.get().await.unwrap(), pool.get().await.unwrap()) })
        .await;
    assert_eq!(capture.gauge(POOL_CONNECTIONS.name, &used), Some(2.0));
    x.discard();
    drop(y);
    assert_eq!(capture.gauge(POOL_CONNECTIONS.name, &used), Some(0.0));
}

// ---------------------------------------------------------------------------------------------
// More attacks: cancellation races, close, backoff accounting.

/// `deadline::scope` nested by building the inner scope before the outer one is polled (as in
/// `scope(a, scope(b, fut))`): brisk-core documents "if a budget is already set, the earlier
/// one wins"; the checkout is allowed the later, inner one instead.
#[tokio::test(start_paused = true)]
async fn eagerly_nested_deadline_scopes_let_the_earlier_win() {
    let (_, pool) = wrapped(1, Duration::from_secs(5));
    let _held = pool.get().await.unwrap();
    let started = Instant::now();
    let err = timeout(
        T,
        deadline::scope(
            started + Duration::from_millis(100),
            deadline::scope(started + Duration::from_secs(3), pool.get()),
        ),
    )
    .await
    .unwrap()
    .map(drop)
    .unwrap_err();
    assert!(matches!(err, PoolError::Deadline { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_aborted_as_a_connection_returns_leaks_nothing() {
    for _ in 0..20 {
        let (_, pool) = wrapped(1, Duration::from_secs(1));
        let held = pool.get().await.unwrap();
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get().await.map(drop) }
        });
        while pool.status().waiting != Some(1) {
            tokio::task::yield_now().await;
        }
        drop(held);
        waiter.abort();
        let _ = waiter.await;
        let status = pool.status();
        assert_eq!(
            (status.in_use(), status.waiting),
            (0, Some(0)),
            "{status:?}"
        );
        let next = timeout(T, pool.get()).await.unwrap();
        assert!(next.is_ok(), "{:?}", next.map(drop));
        drop(next);
        assert!(
            timeout(T, pool.close(Duration::from_millis(10)))
                .await
                .unwrap()
                .is_ok()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_close_polled_once_then_dropped_still_closes() {
    let (_, pool) = wrapped(2, Duration::from_secs(1));
    let held = pool.get().await.unwrap();
    let _ = timeout(Duration::ZERO, pool.close(Duration::from_secs(5))).await;
    let err = pool.get().await.map(drop).unwrap_err();
    assert!(
        matches!(err, PoolError::Closed),
        "closed to new checkouts either way: {err:?}"
    );
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn close_completes_when_the_last_checkout_is_discarded_or_cut_off() {
    let (_, pool) = wrapped(3, Duration::from_secs(1));
    let a = pool.get().await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cut = tokio::spawn({
        let pool = pool.clone();
        async move {
            deadline::scope(Instant::now() + Duration::from_millis(50), async move {
                let c = pool.get().await.unwrap();
                let _ = rx.await;
                drop(c);
            })
            .await;
        }
    });
    tokio::task::yield_now().await;
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(5)).await }
    });
    sleep(Duration::from_millis(100)).await;
    a.discard();
    let _ = tx.send(());
    cut.await.unwrap();
    let closed = timeout(T, closing).await.unwrap().unwrap();
    assert!(closed.is_ok(), "{closed:?}");
    assert_eq!(pool.status().size, 0, "{:?}", pool.status());
}

#[tokio::test(start_paused = true)]
async fn a_closed_pool_opens_no_connection_by_warm_up() {
    let (gate, pool) = wrapped(2, Duration::from_secs(1));
    pool.close(Duration::from_secs(1)).await.unwrap();
    let _ = timeout(T, pool.warm_up(2)).await.unwrap();
    assert_eq!(gate.attempts.load(SeqCst), 0, "no new ones are made");
    assert_eq!(pool.status().size, 0);
}

#[tokio::test]
async fn a_closed_pool_opens_no_connection_by_its_lifecycle() {
    let (gate, pool) = wrapped(2, Duration::from_secs(1));
    pool.close(Duration::from_secs(1)).await.unwrap();
    let mut l = Lifecycle::default();
    l.min_idle = 2;
    l.reap_every = Duration::from_millis(50);
    let _ = pool.spawn_lifecycle(l);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(gate.attempts.load(SeqCst), 0, "no new ones are made");
    assert_eq!(pool.status().size, 0);
}

#[tokio::test]
async fn a_retry_that_times_out_counts_as_one_more_failure() {
    let (gate, pool) = wrapped(4, Duration::from_millis(200));
    gate.fail.store(true, SeqCst);
    let _ = pool.get().await;
    sleep(Duration::from_millis(60)).await;
    gate.hang.store(true, SeqCst);
    let err = timeout(T, pool.get()).await.unwrap().map(drop).unwrap_err();
    assert!(matches!(err, PoolError::Exhausted(_)), "{err:?}");
    let err = pool.get().await.map(drop).unwrap_err();
    let PoolError::Unavailable(why) = &err else {
        panic!("backing off again: {err:?}")
    };
    assert_eq!(why.failures, 2, "{why:?}");
}

#[tokio::test]
async fn the_pause_never_exceeds_the_maximum() {
    let (gate, pool) = numbers(4);
    let pool = Instrumented::builder(pool)
        .connect_backoff(Duration::from_millis(5), Duration::from_millis(40))
        .build()
        .unwrap();
    gate.fail.store(true, SeqCst);
    let until = Instant::now() + Duration::from_millis(800);
    let mut most = 0;
    while Instant::now() < until {
        if let Err(PoolError::Unavailable(why)) = pool.get().await.map(drop) {
            assert!(why.retry_in <= Duration::from_millis(40), "{why:?}");
            most = most.max(why.failures);
        }
        sleep(Duration::from_millis(2)).await;
    }
    assert!(most >= 5, "failures in a row counted: {most}");
    let attempts = gate.attempts.load(SeqCst);
    assert!((10..=200).contains(&attempts), "{attempts}");
}

#[tokio::test(start_paused = true)]
async fn the_pending_gauge_counts_a_waiting_caller_then_drops() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(1, Duration::from_millis(500)));
    let _held = capture.scope(pool.get()).await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    while pool.status().waiting != Some(1) {
        tokio::task::yield_now().await;
    }
    assert_eq!(capture.gauge(POOL_PENDING.name, &POOL), Some(1.0));
    let _ = timeout(T, waiter).await.unwrap().unwrap();
    assert_eq!(capture.gauge(POOL_PENDING.name, &POOL), Some(0.0));
    assert_eq!(capture.counter(POOL_TIMEOUTS.name, &POOL), 1);
}

#[tokio::test]
async fn failing_fast_is_not_a_timeout() {
    let capture = Capture::new();
    let (gate, pool) = capture.run(|| wrapped(2, Duration::from_secs(1)));
    gate.fail.store(true, SeqCst);
    for _ in 0..5 {
        let _ = capture.scope(pool.get()).await;
    }
    assert_eq!(capture.counter(POOL_TIMEOUTS.name, &POOL), 0);
}

#[tokio::test(start_paused = true)]
async fn a_warm_up_in_progress_when_the_pool_closes_leaves_nothing_open() {
    let (gate, pool) = wrapped(2, Duration::from_secs(5));
    gate.delay_ms.store(1_000, SeqCst);
    let warming = tokio::spawn({
        let pool = pool.clone();
        async move { pool.warm_up(2).await }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(gate.attempts.load(SeqCst) >= 1, "warm-up is connecting");
    let closed = timeout(T, pool.close(Duration::from_secs(5)))
        .await
        .unwrap();
    let _ = timeout(T, warming).await.unwrap();
    sleep(Duration::from_secs(3)).await;
    assert!(closed.is_ok(), "{closed:?}");
    assert_eq!(
        pool.status().size,
        0,
        "no new ones are made after close: {:?}",
        pool.status()
    );
}

#[tokio::test(start_paused = true)]
async fn a_checkout_connecting_when_the_pool_closes_leaves_nothing_open() {
    let (gate, pool) = wrapped(2, Duration::from_secs(5));
    gate.delay_ms.store(1_000, SeqCst);
    let connecting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let closed = timeout(T, pool.close(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(closed.is_ok(), "{closed:?}");
    let result = timeout(T, connecting).await.unwrap().unwrap();
    assert!(matches!(result, Err(PoolError::Closed)), "{result:?}");
    assert_eq!(pool.status().size, 0, "{:?}", pool.status());
}

#[tokio::test]
async fn a_connection_past_its_lifetime_is_closed_soon_after_it_returns() {
    let (_, pool) = wrapped(2, Duration::from_secs(1));
    let mut l = Lifecycle::default();
    l.max_lifetime = Some(Duration::from_millis(300));
    l.jitter = Duration::ZERO;
    l.idle_timeout = None;
    l.reap_every = Duration::from_millis(100);
    let client = pool.get().await.unwrap();
    pool.spawn_lifecycle(l).unwrap();
    sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.status().size, 1, "not closed while out");
    drop(client);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.status().size, 0, "{:?}", pool.status());
}

#[tokio::test]
async fn the_idle_gauge_follows_a_warm_up_without_any_checkout() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(3, Duration::from_secs(1)));
    assert_eq!(capture.scope(pool.warm_up(2)).await.unwrap(), 2);
    sleep(Duration::from_millis(1_500)).await;
    let idle = [
        ("db_client_connection_pool_name", "main"),
        ("db_client_connection_state", "idle"),
    ];
    assert_eq!(
        capture.gauge(POOL_CONNECTIONS.name, &idle),
        Some(2.0),
        "refreshed every second without checkouts"
    );
}

#[tokio::test]
async fn the_lifecycle_task_ends_when_the_pool_is_dropped() {
    let (gate, pool) = wrapped(2, Duration::from_secs(1));
    let mut l = Lifecycle::default();
    l.min_idle = 1;
    l.max_lifetime = Some(Duration::from_millis(100));
    l.jitter = Duration::ZERO;
    l.reap_every = Duration::from_millis(50);
    pool.spawn_lifecycle(l).unwrap();
    sleep(Duration::from_millis(400)).await;
    let before = gate.attempts.load(SeqCst);
    assert!(before >= 2, "the lifecycle runs: {before}");
    drop(pool);
    sleep(Duration::from_millis(200)).await;
    let after = gate.attempts.load(SeqCst);
    sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gate.attempts.load(SeqCst),
        after,
        "still reaping and opening after the pool was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_checkout_outliving_its_pool_returns_without_harm() {
    let (_, discarded, pool) = with_hook(2);
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    drop(pool);
    drop(a);
    b.discard();
    assert_eq!(discarded.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_warm_up_dropped_midway_leaves_nothing_checked_out() {
    let (gate, pool) = wrapped(3, Duration::from_secs(5));
    assert_eq!(pool.warm_up(1).await.unwrap(), 1);
    gate.delay_ms.store(1_000, SeqCst);
    let _ = timeout(Duration::from_millis(100), pool.warm_up(3)).await;
    let status = pool.status();
    assert_eq!(status.in_use(), 0, "{status:?}");
    let got = timeout(Duration::from_millis(10), pool.get()).await;
    assert!(matches!(got, Ok(Ok(_))), "the idle one serves at once");
    drop(got);
    assert!(
        timeout(T, pool.close(Duration::from_millis(10)))
            .await
            .unwrap()
            .is_ok()
    );
}

/// "Warm-up is not a request: ... never waits for a connection in use, yields to waiting
/// callers": a warm-up whose connect hangs holds the idle connection for its whole bound, and the
/// caller who needs it waits out its own bound and fails.
#[tokio::test]
async fn a_caller_is_not_starved_by_a_warm_up_stuck_connecting() {
    let (gate, pool) = wrapped(2, Duration::from_secs(1));
    assert_eq!(pool.warm_up(1).await.unwrap(), 1);
    gate.hang.store(true, SeqCst);
    let warming = tokio::spawn({
        let pool = pool.clone();
        async move { pool.warm_up(2).await }
    });
    sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    let got = timeout(T, pool.get()).await.unwrap();
    let took = started.elapsed();
    assert!(got.is_ok(), "{} after {took:?}", got.map(drop).unwrap_err());
    assert!(
        took < Duration::from_millis(500),
        "waited {took:?} behind warm-up"
    );
    drop(got);
    let _ = timeout(T, warming).await;
}

/// "waiting: Callers waiting, this one included": a warm-up stuck connecting is no caller, and
/// the idle connection beside it is not in use (it read as in use, held by the warm-up, and a
/// diagnosis then showed a connection in use with no checkout out).
#[tokio::test]
async fn the_diagnosis_does_not_count_a_warm_up_as_a_waiting_caller() {
    let (gate, pool) = wrapped(2, Duration::from_millis(500));
    assert_eq!(pool.warm_up(1).await.unwrap(), 1);
    gate.hang.store(true, SeqCst);
    let warming = tokio::spawn({
        let pool = pool.clone();
        async move { pool.warm_up(2).await }
    });
    sleep(Duration::from_millis(20)).await;
    let status = pool.status();
    assert_eq!(
        (status.idle, status.in_use(), status.waiting),
        (1, 0, Some(0)),
        "only the warm-up is connecting: {status:?}"
    );
    let held = timeout(Duration::from_millis(100), pool.get())
        .await
        .expect("the idle connection serves at once")
        .unwrap();
    let err = timeout(
        T,
        deadline::scope(Instant::now() + Duration::from_millis(200), pool.get()),
    )
    .await
    .unwrap()
    .map(drop)
    .unwrap_err();
    let PoolError::Deadline { diagnosis, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(diagnosis.waiting, 1, "one caller waits: {err}");
    assert_eq!(diagnosis.in_use, 1, "one checkout is out: {err}");
    assert!(diagnosis.oldest_checkout.is_some(), "{err}");
    drop(held);
    let _ = timeout(T, warming).await;
}

/// The lifecycle's top-up ("beside requests ... never by waiting for a connection in use, and
/// not while callers wait") holds the idle connection while its own connect hangs.
#[tokio::test]
async fn a_caller_is_not_starved_by_a_lifecycle_top_up_stuck_connecting() {
    let (gate, pool) = wrapped(2, Duration::from_secs(1));
    let mut l = Lifecycle::default();
    l.min_idle = 2;
    l.reap_every = Duration::from_millis(100);
    pool.spawn_lifecycle(l).unwrap();
    timeout(T, async {
        while pool.status().idle < 2 {
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    gate.hang.store(true, SeqCst);
    pool.get().await.unwrap().discard(); // one idle left; the next round tops up
    sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let got = timeout(T, pool.get()).await.unwrap();
    let took = started.elapsed();
    assert!(got.is_ok(), "{} after {took:?}", got.map(drop).unwrap_err());
    assert!(
        took < Duration::from_millis(500),
        "waited {took:?} behind the top-up"
    );
}

#[tokio::test]
async fn a_warm_up_is_not_counted_as_waiting() {
    let capture = Capture::new();
    let (gate, pool) = capture.run(|| wrapped(2, Duration::from_secs(5)));
    gate.hang.store(true, SeqCst);
    let warming = tokio::spawn({
        let pool = pool.clone();
        async move { pool.warm_up(2).await }
    });
    sleep(Duration::from_millis(1_200)).await; // the idle gauge's refresh, at least every second
    let pending = capture.gauge(POOL_PENDING.name, &POOL).unwrap_or(0.0);
    assert_eq!(pending, 0.0, "warm-up stays out of the checkout metrics");
    assert_eq!(
        pool.status().waiting,
        Some(0),
        "no caller waits: {:?}",
        pool.status()
    );
    let _ = timeout(T, warming).await;
}

/// "while the database is down the backoff keeps it to a few a second": the lifecycle's top-up
/// is one more opener, and must not hammer a database that is down either.
#[tokio::test]
async fn the_lifecycle_top_up_does_not_hammer_a_database_that_is_down() {
    let (gate, pool) = wrapped(4, Duration::from_secs(1));
    gate.fail.store(true, SeqCst);
    let mut l = Lifecycle::default();
    l.min_idle = 2;
    l.reap_every = Duration::from_millis(10);
    pool.spawn_lifecycle(l).unwrap();
    sleep(Duration::from_secs(1)).await;
    let attempts = gate.attempts.load(SeqCst);
    assert!(attempts <= 12, "{attempts} connection attempts in 1 s");
}

/// `brisk_pool_nested_checkouts_total` counts "checkouts by a task already holding a
/// connection of the same pool": a task that handed its checkout to another task holds none.
#[tokio::test(start_paused = true)]
async fn a_checkout_handed_to_another_task_is_not_held_by_the_first() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(4, Duration::from_secs(1)));
    tokio::spawn({
        let pool = pool.clone();
        async move {
            let first = pool.get().await.unwrap();
            let worker = tokio::spawn(async move {
                sleep(Duration::from_secs(1)).await;
                drop(first);
            });
            let _second = pool.get().await.unwrap(); // this task holds nothing else
            worker.await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(capture.counter(POOL_NESTED.name, &POOL), 0);
}

/// The deadlock the count is for: a task holding the only connection asks for another, waits
/// out the bound, and returns the first: counted then.
#[tokio::test(start_paused = true)]
async fn a_nested_checkout_that_times_out_is_counted_when_the_task_returns_its_connection() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(1, Duration::from_millis(100)));
    tokio::spawn({
        let pool = pool.clone();
        async move {
            let first = pool.get().await.unwrap();
            let second = pool.get().await.map(drop);
            assert!(matches!(second, Err(PoolError::Exhausted(_))), "{second:?}");
            drop(first);
        }
    })
    .await
    .unwrap();
    assert_eq!(capture.counter(POOL_NESTED.name, &POOL), 1);
}

/// `Lifecycle`'s fields are public and `lifetime_of`, `keeps` and `Instrumented::reap` take one
/// as it is: a jitter above the lifetime (what `validate` refuses) must not panic them.
#[tokio::test]
async fn an_unvalidated_lifecycle_does_not_panic_the_reaper() {
    let mut l = Lifecycle::default();
    l.max_lifetime = Some(Duration::from_secs(1));
    l.jitter = Duration::from_secs(3_600);
    let now = std::time::Instant::now();
    let lifetimes = std::panic::catch_unwind(|| {
        (0..50)
            .map(|i| l.lifetime_of(now - Duration::from_millis(i * 13)))
            .collect::<Vec<_>>()
    });
    assert!(lifetimes.is_ok(), "lifetime_of panicked");
    let (_, pool) = wrapped(2, Duration::from_secs(1));
    assert_eq!(pool.warm_up(2).await.unwrap(), 2);
    let reaped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.reap(&l)));
    assert!(reaped.is_ok(), "reap panicked");
}

/// "every timeout is checked at build against `MAX_WAIT/MAX_PERIOD` (bb8 adds its reaper interval
/// to an Instant and panics on overflow)": through `Lifecycle::bb8` nothing is checked.
#[tokio::test]
async fn lifecycle_bb8_with_a_huge_period_does_not_panic_bb8() {
    let mut l = Lifecycle::default();
    l.reap_every = Duration::MAX;
    l.idle_timeout = Some(Duration::MAX);
    l.max_lifetime = Some(Duration::MAX);
    let manager = bb8_redis::RedisConnectionManager::new("redis://127.0.0.1:1").unwrap();
    let built = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        let pool = l
            .bb8(brisk_pool::bb8::Pool::builder())
            .build_unchecked(manager);
        sleep(Duration::from_millis(100)).await;
        pool
    }))
    .await;
    assert!(built.is_ok(), "bb8 panicked on the lifecycle's settings");
}

#[tokio::test(start_paused = true)]
async fn two_concurrent_closes_both_finish_and_waiters_count_as_closed() {
    let capture = Capture::new();
    let (_, pool) = capture.run(|| wrapped(1, Duration::from_secs(5)));
    let held = pool.get().await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    while pool.status().waiting != Some(1) {
        tokio::task::yield_now().await;
    }
    let closes: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.close(Duration::from_secs(5)).await })
        })
        .collect();
    let waited = timeout(T, waiter).await.unwrap().unwrap();
    assert!(matches!(waited, Err(PoolError::Closed)), "{waited:?}");
    sleep(Duration::from_millis(100)).await;
    drop(held);
    for close in closes {
        assert!(timeout(T, close).await.unwrap().unwrap().is_ok());
    }
    let closed = [
        ("db_client_connection_pool_name", "main"),
        ("reason", "closed"),
    ];
    assert_eq!(capture.counter(POOL_ERRORS.name, &closed), 1);
    assert_eq!(capture.counter(POOL_TIMEOUTS.name, &POOL), 0);
}

// ---------------------------------------------------------------------------------------------
// Credentials

#[cfg(feature = "redis")]
mod redis_attacks {
    use super::*;
    use brisk_pool::redis_source::{Multiplexed, RedactedUrl, RedisSource, SourceError};
    use brisk_testkit::RedisServer;

    const SECRET: &str = "hunter2";

    fn assert_hidden(url: &str) {
        let redacted = RedactedUrl::new(url);
        for shown in [
            redacted.as_str().to_owned(),
            redacted.to_string(),
            format!("{redacted:?}"),
            redacted.server(),
        ] {
            assert!(!shown.contains(SECRET), "{url:?} shows as {shown:?}");
            assert!(!shown.contains("hunt"), "{url:?} shows as {shown:?}");
        }
        assert!(
            !redacted.server().contains('?'),
            "{url} → {}",
            redacted.server()
        );
        assert!(
            !redacted.server().contains('@'),
            "{url} → {}",
            redacted.server()
        );
    }

    #[test]
    fn every_url_form_is_redacted() {
        for url in [
            "redis://:hunter2@host:6379",
            "redis://admin:hunter2@host:6379/0",
            "redis://hunter2@host:6379",
            "REDIS://admin:hunter2@host",
            "Rediss://:hunter2@host",
            "valkey://u:hunter2@host",
            "valkeys://u:hunter2@host",
            "redis+unix:///run/redis.sock?user=app&pass=hunter2&db=1",
            "valkey+unix:///run/redis.sock?pass=hunter2",
            "unix:///run/redis.sock?pass=hunter2",
            "REDIS+UNIX:///run/redis.sock?PASS=hunter2",
            "redis://host:6379/0?password=hunter2",
            "redis://host?db=1&pass=hunter2&pass=hunter3",
            "redis://host?user=app;pass=hunter2",
            "redis://:hunt@r2@host",
            "redis://:hun%40ter2@host",
            "redis://:hunter2@[::1]:6379",
            "redis://:hunter2@host:notaport",
            "hunter2@host",
            " redis://:hunter2@host",
            "redis://:hunter2@host#frag",
            "redis://host/#pass=hunter2",
            "redis://host/?pass=hunter2#x",
            "redis://host?%70ass=hunter2",
        ] {
            assert_hidden(url);
        }
    }

    #[test]
    fn db_and_protocol_stay_readable() {
        let r = RedactedUrl::new("redis://host/?db=3&protocol=resp3&pass=hunter2");
        assert!(r.as_str().contains("db=3"), "{}", r.as_str());
        assert!(r.as_str().contains("protocol=resp3"), "{}", r.as_str());
        let r = RedactedUrl::new("redis://app:hunter2@host:6380/0");
        assert_eq!(r.as_str(), "redis://***:***@host:6380/0");
        assert_eq!(r.server(), "redis://host:6380/0");
    }

    #[tokio::test]
    async fn the_reconnect_metric_label_carries_no_credentials() {
        let mut server = RedisServer::builder()
            .private()
            .arg("--requirepass")
            .arg(SECRET)
            .start()
            .unwrap();
        let url = server
            .url()
            .replace("redis://", &format!("redis://app:{SECRET}@"));
        let url = url.replace("app:", ":");
        let capture = Capture::new();
        let source = capture
            .scope(
                Multiplexed::builder(&url)
                    .response_timeout(Duration::from_millis(300))
                    .connect(),
            )
            .await
            .unwrap();
        server.restart().unwrap();
        for _ in 0..40 {
            let mut conn = source.connection().await.unwrap();
            let r: redis::RedisResult<String> = capture
                .scope(redis::cmd("PING").query_async(&mut conn))
                .await;
            if r.is_ok() {
                break;
            }
            sleep(Duration::from_millis(50)).await;
        }
        let clean = server.url();
        assert!(capture.counter(REDIS_RECONNECTS.name, &[("server", &clean)]) >= 1);
        assert_eq!(capture.series_count(REDIS_RECONNECTS.name), 1);
        assert!(!format!("{:?}", capture.names()).contains(SECRET));
    }

    #[tokio::test]
    async fn a_huge_number_of_connections_is_refused_or_bounded() {
        let server = RedisServer::start().unwrap();
        let result = std::panic::AssertUnwindSafe(timeout(
            T,
            Multiplexed::builder(&server.url())
                .connections(usize::MAX)
                .connect(),
        ));
        let result = futures_util::FutureExt::catch_unwind(result).await;
        let result = result.expect("connect panicked").expect("connect hung");
        assert!(result.is_err(), "usize::MAX connections opened?");
    }

    #[test]
    fn a_password_with_a_slash_is_still_hidden() {
        // Generated passwords (base64) hold `/`; one that starts with digits makes a URL that
        // parses with the password's head as a port and its tail as the path.
        for url in [
            "redis://default:12/hunter2@cache.internal:6379",
            "redis://:12/hunter2@cache.internal:6379",
            "rediss://app:8080/hunter2@cache.internal",
        ] {
            assert_hidden(url);
        }
    }

    #[test]
    fn control_characters_do_not_unmask() {
        for url in [
            "redis://:hun\tter2@host",
            "redis://:hunter2@host\n",
            "redis://:hun\nter2@host",
        ] {
            let r = RedactedUrl::new(url);
            assert!(!r.as_str().contains("ter2"), "{url:?} → {:?}", r.as_str());
        }
    }

    #[tokio::test]
    async fn an_error_reply_is_a_finished_command_and_the_connection_is_kept() {
        let server = RedisServer::start().unwrap();
        let pool = deadpool_redis::Config::from_url(server.url())
            .builder()
            .unwrap()
            .max_size(1)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .unwrap();
        let pool = Instrumented::builder(pool).name("main").build().unwrap();
        let mut conn = pool.connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("s")
            .arg("text")
            .query_async(&mut conn)
            .await
            .unwrap();
        let r: redis::RedisResult<i64> = redis::cmd("INCR").arg("s").query_async(&mut conn).await;
        assert!(r.is_err());
        drop(conn);
        let status = pool.status();
        assert_eq!((status.size, status.idle), (1, 1), "kept: {status:?}");
    }

    #[tokio::test]
    async fn a_paused_server_times_out_without_a_reconnection() {
        let mut server = RedisServer::builder().private().start().unwrap();
        let capture = Capture::new();
        let source = capture
            .scope(
                Multiplexed::builder(&server.url())
                    .response_timeout(Duration::from_millis(200))
                    .connect(),
            )
            .await
            .unwrap();
        server.pause().unwrap();
        let mut conn = source.connection().await.unwrap();
        let started = Instant::now();
        let r: redis::RedisResult<String> = capture
            .scope(timeout(T, redis::cmd("PING").query_async(&mut conn)))
            .await
            .unwrap();
        let took = started.elapsed();
        server.resume().unwrap();
        assert!(r.is_err());
        assert!(took < Duration::from_millis(500), "{took:?}");
        sleep(Duration::from_millis(100)).await;
        let r: redis::RedisResult<String> = capture
            .scope(timeout(T, redis::cmd("PING").query_async(&mut conn)))
            .await
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
        let url = server.url();
        assert_eq!(
            capture.counter(REDIS_RECONNECTS.name, &[("server", &url)]),
            0,
            "no reconnection"
        );
    }

    #[tokio::test]
    async fn connect_to_a_black_holed_host_is_bounded() {
        let started = Instant::now();
        let result = timeout(
            T,
            Multiplexed::builder("redis://:hunter2@10.255.255.1:6379")
                .connect_timeout(Duration::from_millis(300))
                .connect(),
        )
        .await
        .expect("connect hung");
        assert!(result.is_err());
        assert!(
            started.elapsed() < Duration::from_millis(1_000),
            "{:?}",
            started.elapsed()
        );
        let err = result.map(drop).unwrap_err();
        assert!(!format!("{err} {err:?}").contains(SECRET));
    }

    #[tokio::test]
    async fn a_pipeline_cut_off_is_not_inherited() {
        let server = RedisServer::start().unwrap();
        let pool = deadpool_redis::Config::from_url(server.url())
            .builder()
            .unwrap()
            .max_size(1)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .unwrap();
        let pool = Instrumented::builder(pool).name("main").build().unwrap();
        let cut = timeout(Duration::from_millis(100), async {
            let mut conn = pool.connection().await.unwrap();
            let mut pipe = redis::pipe();
            pipe.cmd("PING").cmd("BLPOP").arg("nothing").arg(3);
            pipe.query_async::<(String, Option<(String, String)>)>(&mut conn)
                .await
        })
        .await;
        assert!(cut.is_err());
        let started = Instant::now();
        let next = timeout(Duration::from_secs(2), async {
            let mut conn = pool.connection().await.unwrap();
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await;
        assert!(matches!(next, Ok(Ok(_))), "{next:?}");
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
    }

    #[cfg(feature = "tls")]
    async fn tls_with_scheme(from: &str) {
        let server = RedisServer::builder().tls().start().unwrap();
        let url = server.url().replacen("rediss://", from, 1);
        let ca = std::fs::read(server.ca_certificate().unwrap()).unwrap();
        let result = std::panic::AssertUnwindSafe(timeout(
            T,
            Multiplexed::builder(&url).root_certificate(ca).connect(),
        ));
        let result = futures_util::FutureExt::catch_unwind(result).await;
        let source = result.expect("connect panicked").expect("hung");
        let source =
            source.unwrap_or_else(|e| panic!("{url}: {e} {:?}", std::error::Error::source(&e)));
        let mut conn = source.connection().await.unwrap();
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!(pong, "PONG");
    }

    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn rediss_in_capitals_installs_the_provider_too() {
        tls_with_scheme("REDISS://").await;
    }

    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn valkeys_in_mixed_case_installs_the_provider_too() {
        tls_with_scheme("VaLkEyS://").await;
    }

    #[tokio::test]
    async fn an_erased_pool_error_keeps_its_words_and_its_source() {
        let (gate, pool) = wrapped(1, Duration::from_secs(1));
        gate.fail.store(true, SeqCst);
        let err = pool.get().await.map(drop).unwrap_err();
        let text = err.to_string();
        let erased = err.erase();
        assert_eq!(erased.to_string(), text);
        let PoolError::Backend(inner) = &erased else {
            panic!("{erased:?}")
        };
        assert!(inner.downcast_ref::<Down>().is_some());
        let err = pool.get().await.map(drop).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.erase().to_string(), text);
    }

    #[tokio::test]
    async fn a_broken_socket_fails_commands_at_once_not_at_the_response_timeout() {
        let mut server = RedisServer::builder().private().start().unwrap();
        let source = Multiplexed::builder(&server.url())
            .response_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        round_trip_ping(&source).await.unwrap();
        server.kill().unwrap();
        sleep(Duration::from_millis(50)).await;
        for i in 0..10 {
            let started = Instant::now();
            let r = timeout(T, round_trip_ping(&source)).await.unwrap();
            assert!(r.is_err(), "{i}");
            assert!(
                started.elapsed() < Duration::from_millis(200),
                "{i}: {:?}",
                started.elapsed()
            );
            sleep(Duration::from_millis(10)).await;
        }
    }

    async fn round_trip_ping(source: &Multiplexed) -> redis::RedisResult<String> {
        let mut conn = source.connection().await.map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Io, "no connection", e.to_string()))
        })?;
        redis::cmd("PING").query_async(&mut conn).await
    }

    #[tokio::test]
    async fn every_connection_of_a_set_comes_back_after_a_restart() {
        let mut server = RedisServer::builder().private().start().unwrap();
        let source = Multiplexed::builder(&server.url())
            .connections(3)
            .response_timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap();
        server.restart().unwrap();
        let started = Instant::now();
        let mut ok_in_a_row = 0;
        while ok_in_a_row < 9 {
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "not all back: {ok_in_a_row} ok in a row"
            );
            match timeout(T, round_trip_ping(&source)).await.unwrap() {
                Ok(_) => ok_in_a_row += 1,
                Err(_) => {
                    ok_in_a_row = 0;
                    sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    #[test]
    fn an_empty_user_reads_as_documented() {
        let r = RedactedUrl::new("rediss://:secret@cache.internal:6380");
        assert_eq!(r.as_str(), "rediss://:***@cache.internal:6380");
        assert_eq!(r.server(), "rediss://cache.internal:6380");
    }

    #[tokio::test]
    async fn multiplexed_build_errors_name_the_setting() {
        let url = "redis://127.0.0.1:1";
        for (builder, setting) in [
            (Multiplexed::builder(url).connections(0), "connections"),
            (
                Multiplexed::builder(url).connect_timeout(Duration::ZERO),
                "connect_timeout",
            ),
            (
                Multiplexed::builder(url).response_timeout(Duration::MAX),
                "response_timeout",
            ),
        ] {
            let err = timeout(T, builder.connect())
                .await
                .unwrap()
                .map(drop)
                .unwrap_err();
            assert!(err.to_string().contains(setting), "{err}");
        }
    }

    /// A command that redis-rs itself gave up on (its response timeout) still runs on the
    /// server: "a query cut off is not inherited" — the next caller must not queue behind it.
    #[tokio::test]
    async fn a_command_timed_out_by_redis_rs_is_not_inherited() {
        let server = RedisServer::start().unwrap();
        let pool = deadpool_redis::Config::from_url(server.url())
            .builder()
            .unwrap()
            .max_size(1)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .unwrap();
        let pool = Instrumented::builder(pool).name("main").build().unwrap();
        let mut conn = pool.connection().await.unwrap();
        let started = Instant::now();
        let r = timeout(
            T,
            redis::cmd("BLPOP")
                .arg("nothing-comes")
                .arg(3)
                .query_async::<Option<(String, String)>>(&mut conn),
        )
        .await
        .unwrap();
        let timed_out_after = started.elapsed();
        drop(conn);
        if r.is_ok() {
            return; // no response timeout on this connection: nothing to attack
        }
        let started = Instant::now();
        let next = timeout(T, async {
            let mut conn = pool.connection().await.unwrap();
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .unwrap();
        assert!(next.is_ok(), "{next:?}");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "the next caller waited {:?} behind a command timed out after {timed_out_after:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connect_errors_never_show_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for url in [
            format!("redis://:{SECRET}@127.0.0.1:{port}"),
            format!("redis://admin:{SECRET}@127.0.0.1:{port}/0"),
            format!("redis://127.0.0.1:{port}/?pass={SECRET}"),
            format!("redis://:{SECRET}@127.0.0.1:notaport"),
            format!("redis://:{SECRET}@"),
            format!("nonsense://:{SECRET}@127.0.0.1:{port}"),
        ] {
            let err = timeout(T, Multiplexed::connect(&url))
                .await
                .unwrap()
                .unwrap_err();
            let mut text = format!("{err} {err:?}");
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                text.push_str(&format!(" {s} {s:?}"));
                source = s.source();
            }
            assert!(!text.contains(SECRET), "{url}: {text}");
            let builder = Multiplexed::builder(&url);
            assert!(!format!("{builder:?}").contains(SECRET));
        }
    }

    #[tokio::test]
    async fn a_wrong_password_error_and_debug_hide_it() {
        let server = RedisServer::builder()
            .private()
            .arg("--requirepass")
            .arg("right")
            .start()
            .unwrap();
        let url = server
            .url()
            .replace("redis://", &format!("redis://:{SECRET}@"));
        let err = timeout(T, Multiplexed::connect(&url))
            .await
            .unwrap()
            .unwrap_err();
        let text = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
        assert!(!text.contains(SECRET), "{text}");
        let good = server.url().replace("redis://", "redis://:right@");
        let source = timeout(T, Multiplexed::connect(&good))
            .await
            .unwrap()
            .unwrap();
        assert!(!format!("{source:?}").contains("right@"), "{source:?}");
        assert!(!source.url().as_str().contains("right"));
    }

    #[tokio::test]
    async fn connect_to_a_paused_server_is_bounded_by_the_connect_timeout() {
        let mut server = RedisServer::builder().private().start().unwrap();
        server.pause().unwrap();
        let started = Instant::now();
        let result = timeout(
            T,
            Multiplexed::builder(&server.url())
                .connect_timeout(Duration::from_millis(300))
                .connect(),
        )
        .await
        .expect("connect hung");
        let took = started.elapsed();
        server.resume().unwrap();
        assert!(
            matches!(result, Err(SourceError::Connect { .. })),
            "{:?}",
            result.map(drop)
        );
        assert!(took < Duration::from_millis(1_000), "{took:?}");
    }

    #[tokio::test]
    async fn multiplexed_settings_at_their_limits() {
        let server = RedisServer::start().unwrap();
        let url = server.url();
        for bad in [
            Multiplexed::builder(&url).connections(0),
            Multiplexed::builder(&url).connect_timeout(Duration::ZERO),
            Multiplexed::builder(&url).connect_timeout(MAX_WAIT + Duration::from_nanos(1)),
            Multiplexed::builder(&url).response_timeout(Duration::ZERO),
            Multiplexed::builder(&url).response_timeout(Duration::MAX),
        ] {
            let err = timeout(T, bad.connect())
                .await
                .unwrap()
                .map(drop)
                .unwrap_err();
            assert!(matches!(err, SourceError::Build(_)), "{err:?}");
        }
        let ok = timeout(
            T,
            Multiplexed::builder(&url)
                .connect_timeout(MAX_WAIT)
                .response_timeout(MAX_WAIT)
                .connect(),
        )
        .await
        .unwrap();
        assert!(ok.is_ok(), "{:?}", ok.map(drop));
    }

    #[tokio::test]
    async fn a_restarted_server_is_served_again_and_failures_are_fast_meanwhile() {
        let mut server = RedisServer::builder().private().start().unwrap();
        let source = Multiplexed::builder(&server.url())
            .response_timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap();
        server.kill().unwrap();
        let mut fails = 0;
        for _ in 0..20 {
            let mut conn = source.connection().await.unwrap();
            let started = Instant::now();
            let r: redis::RedisResult<String> =
                timeout(T, redis::cmd("PING").query_async(&mut conn))
                    .await
                    .unwrap();
            assert!(r.is_err());
            assert!(
                started.elapsed() < Duration::from_millis(350),
                "{:?}",
                started.elapsed()
            );
            fails += 1;
            sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fails, 20);
        server.restart().unwrap();
        let started = Instant::now();
        loop {
            let mut conn = source.connection().await.unwrap();
            let r: redis::RedisResult<String> =
                timeout(T, redis::cmd("PING").query_async(&mut conn))
                    .await
                    .unwrap();
            if r.is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "not back within 3 s: {r:?}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_pool_checkout_while_the_deadline_is_spent_is_a_matchable_deadline() {
        let server = RedisServer::start().unwrap();
        let pool = deadpool_redis::Config::from_url(server.url())
            .builder()
            .unwrap()
            .max_size(1)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .unwrap();
        let pool = Instrumented::builder(pool).name("main").build().unwrap();
        let _held = pool.connection().await.unwrap();
        let err = deadline::scope(
            Instant::now() + Duration::from_millis(50),
            pool.connection(),
        )
        .await
        .map(drop)
        .unwrap_err();
        assert!(
            matches!(err, SourceError::Checkout(PoolError::Deadline { .. })),
            "{err:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL faults

mod postgres_attacks {
    use super::*;
    use brisk_testkit::Postgres;
    use tokio_postgres::NoTls;

    fn deadpool_pg(url: &str, max: usize) -> deadpool_postgres::Pool {
        let config: tokio_postgres::Config = url.parse().unwrap();
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config, NoTls))
            .max_size(max)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_killed_database_fails_fast_and_recovers_after_restart() {
        let mut pg = Postgres::builder().private().start().unwrap();
        let pool = Instrumented::builder(deadpool_pg(&pg.url(), 2))
            .name("main")
            .wait_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        pool.get()
            .await
            .unwrap()
            .simple_query("SELECT 1")
            .await
            .unwrap();
        pg.kill().unwrap();
        // The idle connection is broken; checkouts fail, each within the bound.
        for _ in 0..20 {
            let started = Instant::now();
            let r = timeout(T, async {
                let c = pool.get().await?;
                c.simple_query("SELECT 1")
                    .await
                    .map_err(|_| PoolError::Closed)?;
                Ok::<_, PoolError<_>>(())
            })
            .await
            .unwrap();
            let _ = r;
            assert!(
                started.elapsed() < Duration::from_millis(1_200),
                "{:?}",
                started.elapsed()
            );
            sleep(Duration::from_millis(25)).await;
        }
        let pg = tokio::task::spawn_blocking(move || {
            pg.restart().unwrap();
            pg
        })
        .await
        .unwrap();
        let started = Instant::now();
        loop {
            let ok = match pool.get().await {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "not back within 4 s"
            );
            sleep(Duration::from_millis(50)).await;
        }
        drop(pg);
    }

    async fn measured_bb8(
        url: &str,
        max: u32,
    ) -> brisk_pool::bb8::Pool<brisk_pool::Measured<bb8_postgres::PostgresConnectionManager<NoTls>>>
    {
        let manager =
            bb8_postgres::PostgresConnectionManager::new_from_stringlike(url, NoTls).unwrap();
        brisk_pool::bb8::Pool::builder()
            .max_size(max)
            .build(brisk_pool::Measured::new(manager, "main"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn over_bb8_close_refuses_checkouts_and_closes_connections_as_they_return() {
        let pg = Postgres::start().unwrap();
        let pool = Instrumented::builder(measured_bb8(&pg.url(), 2).await)
            .name("main")
            .wait_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let held = pool.get().await.unwrap();
        let closing = tokio::spawn({
            let pool = pool.clone();
            async move { pool.close(Duration::from_secs(5)).await }
        });
        sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let err = timeout(T, pool.get()).await.unwrap().map(drop).unwrap_err();
        assert!(matches!(err, PoolError::Closed), "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(50));
        held.simple_query("SELECT 1")
            .await
            .expect("connections out keep working");
        drop(held);
        assert!(timeout(T, closing).await.unwrap().unwrap().is_ok());
        sleep(Duration::from_millis(50)).await;
        let status = pool.status();
        assert_eq!(status.size, 0, "closed as it returned: {status:?}");
    }

    #[tokio::test]
    async fn over_bb8_a_closed_pool_warms_up_nothing() {
        let pg = Postgres::start().unwrap();
        let pool = Instrumented::builder(measured_bb8(&pg.url(), 2).await)
            .name("main")
            .build()
            .unwrap();
        pool.close(Duration::from_secs(1)).await.unwrap();
        let _ = timeout(T, pool.warm_up(2)).await.unwrap();
        sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.status().size, 0, "{:?}", pool.status());
    }

    #[tokio::test]
    async fn over_deadpool_a_checkout_cut_off_by_its_deadline_runs_on_discard_once() {
        let pg = Postgres::start().unwrap();
        let hooks = Arc::new(AtomicUsize::new(0));
        let pool = Instrumented::builder(deadpool_pg(&pg.url(), 1))
            .name("main")
            .on_discard({
                let hooks = hooks.clone();
                move |_: &mut deadpool_postgres::Object| {
                    hooks.fetch_add(1, SeqCst);
                }
            })
            .build()
            .unwrap();
        let cut = deadline::scope(Instant::now() + Duration::from_millis(100), async {
            deadline::bounded(Duration::from_secs(5), async {
                let c = pool.get().await.unwrap();
                c.simple_query("SELECT pg_sleep(3)").await.map(drop)
            })
            .await
        })
        .await;
        assert!(cut.is_err());
        assert_eq!(hooks.load(SeqCst), 1);
        assert_eq!(pool.status().size, 0);
        let next = timeout(Duration::from_secs(2), async {
            pool.get()
                .await
                .unwrap()
                .simple_query("SELECT 1")
                .await
                .map(drop)
        })
        .await;
        assert!(matches!(next, Ok(Ok(()))), "{next:?}");
    }

    #[tokio::test]
    async fn over_bb8_a_killed_database_fails_fast_and_recovers() {
        let mut pg = Postgres::builder().private().start().unwrap();
        let manager =
            bb8_postgres::PostgresConnectionManager::new_from_stringlike(pg.url(), NoTls).unwrap();
        let manager = brisk_pool::Measured::new(manager, "main");
        let creations = manager.creations();
        let pool = brisk_pool::bb8::Pool::builder()
            .max_size(2)
            .connection_timeout(Duration::from_secs(2))
            .build(manager)
            .await
            .unwrap();
        let pool = Instrumented::builder(pool)
            .name("main")
            .wait_timeout(Duration::from_secs(2))
            .creations(creations)
            .build()
            .unwrap();
        pool.get()
            .await
            .unwrap()
            .simple_query("SELECT 1")
            .await
            .unwrap();
        pg.kill().unwrap();
        let mut fast = 0;
        for _ in 0..10 {
            let started = Instant::now();
            let r = timeout(T, async {
                let c = pool.get().await.map_err(|e| e.to_string())?;
                c.simple_query("SELECT 1")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap();
            assert!(r.is_err());
            if started.elapsed() < Duration::from_millis(200) {
                fast += 1;
            }
            sleep(Duration::from_millis(30)).await;
        }
        assert!(fast >= 7, "{fast} of 10 failed fast");
        let pg = tokio::task::spawn_blocking(move || {
            pg.restart().unwrap();
            pg
        })
        .await
        .unwrap();
        let started = Instant::now();
        loop {
            let ok = match timeout(T, pool.get()).await.unwrap() {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "not back within 5 s"
            );
            sleep(Duration::from_millis(50)).await;
        }
        drop(pg);
    }

    #[tokio::test]
    async fn over_bb8_a_paused_database_fails_checkouts_within_their_bound() {
        let mut pg = Postgres::builder().private().start().unwrap();
        let pool = Instrumented::builder(measured_bb8(&pg.url(), 2).await)
            .name("main")
            .wait_timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        pg.pause().unwrap();
        let mut took = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let r = timeout(T, pool.get()).await.unwrap();
            took.push(started.elapsed());
            assert!(r.is_err());
        }
        pg.resume().unwrap();
        assert!(
            took.iter().all(|t| *t < Duration::from_millis(700)),
            "{took:?}"
        );
        let started = Instant::now();
        loop {
            if let Ok(c) = timeout(T, pool.get()).await.unwrap()
                && c.simple_query("SELECT 1").await.is_ok()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "not back after resume"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_paused_database_fails_a_new_checkout_within_its_bound() {
        let mut pg = Postgres::builder().private().start().unwrap();
        let pool = Instrumented::builder(deadpool_pg(&pg.url(), 2))
            .name("main")
            .wait_timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        pg.pause().unwrap();
        let started = Instant::now();
        let err = timeout(T, pool.get()).await.unwrap().map(drop).unwrap_err();
        let took = started.elapsed();
        pg.resume().unwrap();
        assert!(matches!(err, PoolError::Exhausted(_)), "{err:?}");
        assert!(took < Duration::from_millis(700), "{took:?}");
        assert!(
            err.to_string().contains("reachable but not answering"),
            "{err}"
        );
        let ok = timeout(T, pool.get()).await.unwrap();
        assert!(
            ok.is_ok() || matches!(ok, Err(PoolError::Unavailable(_))),
            "{:?}",
            ok.map(drop)
        );
    }

    #[tokio::test]
    async fn postgres_credentials_never_show_in_errors() {
        let pg = Postgres::start().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let _ = pg;
        let url = format!("postgres://app:hunter2@127.0.0.1:{port}/none");
        let capture = Capture::new();
        let pool = capture.run(|| {
            Instrumented::builder(deadpool_pg(&url, 1))
                .name("main")
                .wait_timeout(Duration::from_millis(300))
                .build()
                .unwrap()
        });
        let mut text = String::new();
        for _ in 0..3 {
            if let Err(err) = capture.scope(pool.get()).await {
                text.push_str(&format!("{err} {err:?}"));
            }
        }
        assert!(!text.contains("hunter2"), "{text}");
        for name in capture.names() {
            assert!(!name.contains("hunter2"));
        }
    }
}
