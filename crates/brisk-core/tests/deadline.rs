//! Deadline propagation under paused time: deterministic, instant.

use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_core::deadline::{self, Bound};
use tokio::time::{Instant, advance, sleep};

const MS: Duration = Duration::from_millis(1);

/// A future that counts its polls and never finishes.
struct CountPolls(Arc<AtomicUsize>);

impl Future for CountPolls {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Poll::Pending
    }
}

#[tokio::test(start_paused = true)]
async fn no_scope_means_no_budget() {
    assert_eq!(deadline::current(), None);
    assert_eq!(deadline::remaining(), None);
}

#[tokio::test(start_paused = true)]
async fn remaining_counts_down_and_stops_at_zero() {
    let end = Instant::now() + 100 * MS;
    deadline::scope(end, async {
        assert_eq!(deadline::current(), Some(end));
        assert_eq!(deadline::remaining(), Some(100 * MS));
        advance(30 * MS).await;
        assert_eq!(deadline::remaining(), Some(70 * MS));
        advance(500 * MS).await;
        assert_eq!(deadline::remaining(), Some(Duration::ZERO));
    })
    .await;
    assert_eq!(
        deadline::remaining(),
        None,
        "the budget ends with its scope"
    );
}

#[tokio::test(start_paused = true)]
async fn nested_scopes_keep_the_earlier_deadline() {
    let now = Instant::now();
    deadline::scope(now + 50 * MS, async {
        deadline::scope(now + 200 * MS, async {
            assert_eq!(
                deadline::remaining(),
                Some(50 * MS),
                "a later inner deadline is ignored"
            );
        })
        .await;
        deadline::scope(now + 10 * MS, async {
            assert_eq!(
                deadline::remaining(),
                Some(10 * MS),
                "an earlier inner deadline wins"
            );
        })
        .await;
        assert_eq!(
            deadline::remaining(),
            Some(50 * MS),
            "the outer budget is back"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn budget_reaches_nested_async_calls() {
    async fn deep() -> Option<Duration> {
        sleep(5 * MS).await;
        deadline::remaining()
    }
    let left = deadline::scope(Instant::now() + 20 * MS, async { deep().await }).await;
    assert_eq!(left, Some(15 * MS));
}

#[tokio::test(start_paused = true)]
async fn spawned_tasks_do_not_inherit_but_can_carry_it() {
    deadline::scope(Instant::now() + 20 * MS, async {
        let lost = tokio::spawn(async { deadline::remaining() }).await.unwrap();
        assert_eq!(lost, None);
        let end = deadline::current().unwrap();
        let carried = tokio::spawn(deadline::scope(end, async { deadline::remaining() }))
            .await
            .unwrap();
        assert_eq!(carried, Some(20 * MS));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn bounded_returns_the_output_in_time() {
    let out = deadline::bounded(10 * MS, async {
        sleep(9 * MS).await;
        7
    })
    .await;
    assert_eq!(out, Ok(7));
}

#[tokio::test(start_paused = true)]
async fn bounded_says_the_timeout_fired() {
    let start = Instant::now();
    let err = deadline::bounded(10 * MS, pending::<()>())
        .await
        .unwrap_err();
    assert_eq!(err.bound(), Bound::Timeout);
    assert!(!err.is_deadline());
    assert_eq!(err.after(), 10 * MS);
    assert_eq!(start.elapsed(), 10 * MS);
    assert_eq!(err.to_string(), "timed out after 10ms");
}

#[tokio::test(start_paused = true)]
async fn bounded_says_the_deadline_fired() {
    let start = Instant::now();
    let err = deadline::scope(start + 5 * MS, async {
        deadline::bounded(Duration::from_secs(1), pending::<()>()).await
    })
    .await
    .unwrap_err();
    assert_eq!(err.bound(), Bound::Deadline);
    assert!(err.is_deadline());
    assert_eq!(start.elapsed(), 5 * MS);
    assert_eq!(
        err.to_string(),
        "request deadline exceeded: the wait was allowed 5ms, what the budget had left"
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_shorter_than_budget_is_reported_as_timeout() {
    let err = deadline::scope(Instant::now() + Duration::from_secs(1), async {
        deadline::bounded(5 * MS, pending::<()>()).await
    })
    .await
    .unwrap_err();
    assert_eq!(err.bound(), Bound::Timeout);
}

#[tokio::test(start_paused = true)]
async fn expired_budget_fails_at_once_without_polling() {
    let polls = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let err = deadline::scope(start + 5 * MS, async {
        advance(10 * MS).await;
        deadline::bounded(Duration::from_secs(1), CountPolls(polls.clone())).await
    })
    .await
    .unwrap_err();
    assert_eq!(err.bound(), Bound::Deadline);
    assert_eq!(err.after(), Duration::ZERO);
    assert_eq!(
        polls.load(Ordering::SeqCst),
        0,
        "an expired budget never polls the future"
    );
    assert_eq!(
        start.elapsed(),
        10 * MS,
        "no waiting beyond what the test advanced"
    );
    assert!(err.to_string().contains("already spent"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn zero_timeout_fails_at_once() {
    let polls = Arc::new(AtomicUsize::new(0));
    let err = deadline::bounded(Duration::ZERO, CountPolls(polls.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.bound(), Bound::Timeout);
    assert_eq!(polls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn huge_timeout_does_not_overflow() {
    let out = deadline::bounded(Duration::MAX, async { 1 }).await;
    assert_eq!(out, Ok(1));
}

#[tokio::test(start_paused = true)]
async fn an_endless_timeout_still_obeys_the_deadline() {
    let start = Instant::now();
    let err = deadline::scope(start + 5 * MS, async {
        deadline::bounded(Duration::MAX, pending::<()>()).await
    })
    .await
    .unwrap_err();
    assert_eq!(err.bound(), Bound::Deadline);
    assert_eq!(start.elapsed(), 5 * MS);
}

#[tokio::test(start_paused = true)]
async fn an_endless_timeout_without_a_deadline_waits_for_the_future() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        sleep(Duration::from_secs(3600)).await;
        tx.send(7).unwrap();
    });
    let out = deadline::bounded(Duration::MAX, rx).await;
    assert_eq!(out.unwrap().unwrap(), 7);
}

#[tokio::test(start_paused = true)]
async fn a_scope_built_before_it_is_awaited_inside_another_still_keeps_the_earlier_deadline() {
    let start = Instant::now();
    // The inner scope is built (as an argument) before the outer one runs.
    let left = deadline::scope(
        start + 100 * MS,
        deadline::scope(start + Duration::from_secs(3), async {
            deadline::remaining()
        }),
    )
    .await;
    assert_eq!(left, Some(100 * MS));
}
