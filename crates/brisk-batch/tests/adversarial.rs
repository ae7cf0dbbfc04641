//! Adversarial tests, written from the documentation and public API only.
#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unreachable_pub,
    dead_code
)]

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_batch::{
    Abandoned, BatchFn, BuildError, LoadError, Loader, LoaderBuilder, MissingKey, Setting,
    WeakLoader,
};
use brisk_core::deadline;
use futures_util::FutureExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Aborts the test process if the test is still running after `secs` of real time, so a
/// deadlock (even one blocking the runtime thread) shows as a failure.
struct Watchdog(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

fn watchdog() -> Watchdog {
    watchdog_secs(10)
}

fn watchdog_secs(secs: u64) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            rx.recv_timeout(Duration::from_secs(secs))
        {
            eprintln!("WATCHDOG: the test hung for more than {secs} s of real time");
            std::process::abort();
        }
    });
    Watchdog(tx)
}

const T: Duration = Duration::from_secs(5);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("HANG: {what} did not complete within {T:?}"),
    }
}

async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

async fn turns(n: usize) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// A batch function over `u32` keys answering `v{key}`, recording its batches, optionally gated.
#[derive(Clone, Default)]
struct Rec {
    batches: Arc<Mutex<Vec<Vec<u32>>>>,
    gate: Option<Arc<Semaphore>>,
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    most_running: Arc<AtomicUsize>,
    fail_on: Option<u32>,
    omit: Vec<u32>,
    extra: Vec<u32>,
    sleep: Option<Duration>,
    /// Value version: bumped by tests to model database writes.
    version: Arc<AtomicUsize>,
}

impl Rec {
    fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        (
            Self {
                gate: Some(gate.clone()),
                ..Self::default()
            },
            gate,
        )
    }
    fn batches(&self) -> Vec<Vec<u32>> {
        self.batches.lock().unwrap().clone()
    }
    fn calls(&self) -> usize {
        self.batches.lock().unwrap().len()
    }
}

impl BatchFn<u32, String> for Rec {
    type Error = String;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, String>, String> {
        self.batches.lock().unwrap().push(keys.to_vec());
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        struct Dec(Arc<AtomicUsize>);
        impl Drop for Dec {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _dec = Dec(self.running.clone());
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        if let Some(d) = self.sleep {
            tokio::time::sleep(d).await;
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        if let Some(bad) = self.fail_on {
            if keys.contains(&bad) {
                return Err(format!("no {bad}"));
            }
        }
        let version = self.version.load(Ordering::SeqCst);
        let mut out: HashMap<u32, String> = keys
            .iter()
            .filter(|k| !self.omit.contains(k))
            .map(|k| {
                (
                    *k,
                    if version == 0 {
                        format!("v{k}")
                    } else {
                        format!("v{k}@{version}")
                    },
                )
            })
            .collect();
        for e in &self.extra {
            out.insert(*e, format!("extra{e}"));
        }
        Ok(out)
    }
}

fn v(k: u32) -> Option<String> {
    Some(format!("v{k}"))
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Keys whose `Hash`, `Eq` or `Clone` panic on demand.
#[derive(Default)]
struct Traps {
    bad: u32,
    hash: AtomicBool,
    eq: AtomicBool,
    clone: AtomicBool,
    armed: AtomicBool,
    /// The batch function arms the traps when it returns.
    arm_on_return: AtomicBool,
}

struct PKey {
    id: u32,
    t: Arc<Traps>,
}

impl PKey {
    fn trips(&self, which: &AtomicBool) -> bool {
        self.id == self.t.bad && which.load(Ordering::SeqCst) && self.t.armed.load(Ordering::SeqCst)
    }
}

impl Hash for PKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if self.trips(&self.t.hash) {
            panic!("trap: Hash of key {}", self.id);
        }
        self.id.hash(state);
    }
}

impl PartialEq for PKey {
    fn eq(&self, other: &Self) -> bool {
        if self.trips(&self.t.eq) || other.trips(&other.t.eq) {
            panic!("trap: Eq of key {}", self.id);
        }
        self.id == other.id
    }
}
impl Eq for PKey {}

impl Clone for PKey {
    fn clone(&self) -> Self {
        if self.trips(&self.t.clone) {
            panic!("trap: Clone of key {}", self.id);
        }
        Self {
            id: self.id,
            t: self.t.clone(),
        }
    }
}

impl std::fmt::Debug for PKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PKey({})", self.id)
    }
}

#[derive(Clone)]
struct TrapFn {
    t: Arc<Traps>,
    batches: Arc<Mutex<Vec<Vec<u32>>>>,
}

impl BatchFn<PKey, String> for TrapFn {
    type Error = String;
    async fn load(&self, keys: &[PKey]) -> Result<HashMap<PKey, String>, String> {
        self.t.armed.store(false, Ordering::SeqCst);
        self.batches
            .lock()
            .unwrap()
            .push(keys.iter().map(|k| k.id).collect());
        let out = keys
            .iter()
            .map(|k| (k.clone(), format!("v{}", k.id)))
            .collect();
        if self.t.arm_on_return.load(Ordering::SeqCst) {
            self.t.armed.store(true, Ordering::SeqCst);
        }
        Ok(out)
    }
}

fn trap_loader(
    bad: u32,
) -> (
    Loader<PKey, String, TrapFn>,
    Arc<Traps>,
    Arc<Mutex<Vec<Vec<u32>>>>,
) {
    let t = Arc::new(Traps {
        bad,
        ..Traps::default()
    });
    let batches = Arc::new(Mutex::new(Vec::new()));
    let loader = Loader::new(TrapFn {
        t: t.clone(),
        batches: batches.clone(),
    });
    (loader, t, batches)
}

fn is_panicked<T: std::fmt::Debug, E: std::fmt::Debug>(r: &Result<T, LoadError<E>>) -> bool {
    matches!(r, Err(LoadError::Panicked { .. }))
}

// ---------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------

/// "Dropping any caller at any time never stalls or fails the others."
/// The only caller of a running batch is dropped (the batch is cancelled), and a new load of the
/// same key arrives in the same turn, before the cancelled task had a chance to clean up.
#[tokio::test(start_paused = true)]
async fn a_load_right_after_the_last_caller_left_a_running_batch_is_served() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::new(rec.clone());
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    until("batch started", || rec.started.load(Ordering::SeqCst) == 1).await;
    drop(a); // last caller: the batch is cancelled
    let mut b = loader.load(1);
    assert!(poll_once(&mut b).await.is_pending());
    gate.add_permits(10);
    assert_eq!(bounded("b", b).await.unwrap(), v(1));
}

/// Same, while the batch is still collecting (window).
#[tokio::test(start_paused = true)]
async fn a_load_right_after_the_last_caller_left_a_collecting_batch_is_served() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .window(Duration::from_millis(50))
        .build()
        .unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    drop(a);
    let b = loader.load(1);
    assert_eq!(bounded("b", b).await.unwrap(), v(1));
}

/// Aborting the task of one waiter (at every point of the batch's life) leaves the other waiter
/// of the same key served, on a multi-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_one_waiters_task_never_fails_another_multi_thread() {
    let _w = watchdog();
    let rec = Rec {
        sleep: Some(Duration::from_micros(200)),
        ..Rec::default()
    };
    let loader = Loader::new(rec.clone());
    for round in 0..300u32 {
        let key = round % 4;
        let l1 = loader.clone();
        let victim = tokio::spawn(async move { l1.load(key).await });
        let l2 = loader.clone();
        let keeper = tokio::spawn(async move { l2.load(key).await });
        // Abort after a varying number of turns.
        for _ in 0..(round % 5) {
            tokio::task::yield_now().await;
        }
        victim.abort();
        let got = bounded("keeper", keeper).await.unwrap();
        assert_eq!(got.unwrap(), v(key), "round {round}");
    }
}

/// Random-drop stress on a multi-thread runtime: loads of a few shared keys, half of them
/// dropped after a few polls; every load that is awaited to the end gets its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_drops_never_fail_or_stall_the_others_multi_thread() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::new(rec.clone());
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let loader = loader.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u32 {
                let key = (i + t) % 3;
                let mut f = loader.load(key);
                let polls = (i * 7 + t) % 4;
                let mut done = None;
                for _ in 0..polls {
                    if let Poll::Ready(r) = poll_once(&mut f).await {
                        done = Some(r);
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                if (i + t) % 2 == 0 {
                    drop(f);
                    continue;
                }
                let r = match done {
                    Some(r) => r,
                    None => f.await,
                };
                assert_eq!(r.unwrap(), v(key), "task {t} iteration {i}");
            }
        }));
    }
    for t in tasks {
        bounded("stress task", t).await.unwrap();
    }
}

/// `Abandoned::Finish`: "When the last caller of a batch goes away, the batch is ... left to
/// finish so its results reach the cache". Here the caller leaves while the batch collects.
#[tokio::test(start_paused = true)]
async fn finish_policy_finishes_a_batch_abandoned_while_collecting() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .cache(10)
        .abandoned(Abandoned::Finish)
        .build()
        .unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    drop(a);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(rec.calls(), 1, "the abandoned batch was not run");
    assert_eq!(loader.load(1).await.unwrap(), v(1));
    assert_eq!(
        rec.calls(),
        1,
        "the abandoned batch's result did not reach the cache"
    );
}

/// Cancelling a recursive loader's top-level load cascades into its nested batches (same
/// loader). Nothing may deadlock, and the loader goes on.
#[tokio::test(start_paused = true)]
async fn cancelling_a_recursive_load_mid_recursion_leaves_the_loader_working() {
    let _w = watchdog();
    struct Chain {
        this: WeakLoader<u32, u32, Chain>,
        gate: Arc<Semaphore>,
        started: Arc<AtomicUsize>,
    }
    impl BatchFn<u32, u32> for Chain {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, String> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let this = self.this.upgrade().ok_or("gone")?;
            let mut out = HashMap::new();
            for k in keys {
                if *k >= 5 {
                    self.gate.acquire().await.unwrap().forget();
                    out.insert(*k, *k);
                } else {
                    let below = this
                        .load(k + 1)
                        .await
                        .map_err(|e| e.to_string())?
                        .unwrap_or(0);
                    out.insert(*k, below + 1);
                }
            }
            Ok(out)
        }
    }
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (g, s) = (gate.clone(), started.clone());
    let loader = LoaderBuilder::cyclic()
        .max_concurrent_batches(1)
        .build_cyclic(move |this| Chain {
            this,
            gate: g,
            started: s,
        })
        .unwrap();
    let mut top = loader.load(1);
    assert!(poll_once(&mut top).await.is_pending());
    until("recursion reached the bottom", || {
        started.load(Ordering::SeqCst) == 5
    })
    .await;
    drop(top);
    turns(20).await;
    gate.add_permits(100);
    // 5 -> 5, 4 -> 6, ..., 1 -> 9
    assert_eq!(
        bounded("fresh load", loader.load(1)).await.unwrap(),
        Some(9)
    );
    assert_eq!(
        bounded("fresh load", loader.load(3)).await.unwrap(),
        Some(7)
    );
}

// ---------------------------------------------------------------------------------------------
// Runtime shutdown
// ---------------------------------------------------------------------------------------------

fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// "`Cancelled` (the batch's runtime shut down before it answered)": a waiter on another runtime
/// joined a batch running on a runtime that then shuts down; it must get `Cancelled`, not hang,
/// and the loader must go on (a new load of the key is served).
#[test]
fn a_batch_whose_runtime_shuts_down_answers_cancelled_and_the_loader_goes_on() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::new(rec.clone());
    let rt1 = current_thread_rt();
    let rt2 = current_thread_rt();
    let mut first = rt1.block_on(async {
        let mut f = loader.load(1);
        assert!(poll_once(&mut f).await.is_pending());
        until("batch started", || rec.started.load(Ordering::SeqCst) == 1).await;
        f
    });
    let mut second = rt2.block_on(async {
        let mut f = loader.load(1);
        assert!(poll_once(&mut f).await.is_pending());
        f
    });
    drop(rt1);
    assert_eq!(
        rec.running.load(Ordering::SeqCst),
        0,
        "the batch function's future was not dropped with its runtime"
    );
    gate.add_permits(100);
    rt2.block_on(async {
        let r = bounded("waiter of a batch on a dead runtime", &mut second).await;
        assert!(matches!(r, Err(LoadError::Cancelled)), "got {r:?}");
        let r = bounded("first waiter", &mut first).await;
        assert!(matches!(r, Err(LoadError::Cancelled)), "got {r:?}");
        let r = bounded("a fresh load after the shutdown", loader.load(1)).await;
        assert_eq!(r.unwrap(), v(1));
    });
}

/// A batch collecting (window) on a runtime that shuts down: later loads on another runtime must
/// not join the dead batch, nor be refused because it still counts as queued.
#[test]
fn a_collecting_batch_on_a_dead_runtime_does_not_capture_later_loads() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .window(Duration::from_millis(20))
        .build()
        .unwrap();
    let rt1 = current_thread_rt();
    let first = rt1.block_on(async {
        let mut f = loader.load(1);
        assert!(poll_once(&mut f).await.is_pending());
        f
    });
    drop(rt1);
    let rt2 = current_thread_rt();
    rt2.block_on(async {
        let r = bounded("a load after the runtime died", loader.load(2)).await;
        assert_eq!(r.unwrap(), v(2));
        let r = bounded("the same key after the runtime died", loader.load(1)).await;
        assert_eq!(r.unwrap(), v(1));
        drop(first);
    });
}

/// A multi-thread runtime shut down in the background while its batch holds the only slot:
/// the slot must come back.
#[test]
fn a_slot_held_by_a_batch_on_a_dead_runtime_comes_back() {
    let _w = watchdog();
    let (rec, _gate) = Rec::gated();
    let loader = Loader::builder(rec.clone())
        .max_concurrent_batches(1)
        .build()
        .unwrap();
    let rt1 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l1 = loader.clone();
    rt1.spawn(async move { l1.load(1).await });
    let started = rec.started.clone();
    let t0 = std::time::Instant::now();
    while started.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < T, "batch never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    rt1.shutdown_timeout(Duration::from_secs(2));
    // A loader whose batch function no longer waits: reuse the shared state via a new gate-less
    // loader is impossible, so release the gate for later batches.
    let rt2 = current_thread_rt();
    rt2.block_on(async {
        _gate.add_permits(100);
        let r = bounded(
            "a load after the slot holder's runtime died",
            loader.load(2),
        )
        .await;
        assert_eq!(r.unwrap(), v(2));
    });
}

// ---------------------------------------------------------------------------------------------
// Panics in user code
// ---------------------------------------------------------------------------------------------

/// "a panic ... in a key's `Hash`/`Eq`/`Clone` ... fails the loads it touches with
/// `LoadError::Panicked`; the loader keeps working." A key whose `Clone` panics must fail only
/// its own load, not the other keys of the batch.
#[tokio::test(start_paused = true)]
async fn a_key_whose_clone_panics_fails_only_its_own_load() {
    let _w = watchdog();
    let (loader, t, _) = trap_loader(13);
    t.clone.store(true, Ordering::SeqCst);
    t.armed.store(true, Ordering::SeqCst);
    let k = |id| PKey { id, t: t.clone() };
    let (a, b) = bounded("loads", async {
        tokio::join!(loader.load(k(1)), loader.load(k(13)))
    })
    .await;
    assert_eq!(
        a.unwrap(),
        v(1),
        "a good key failed because of another key's Clone"
    );
    assert!(is_panicked(&b), "got {b:?}");
    t.armed.store(false, Ordering::SeqCst);
    assert_eq!(bounded("after", loader.load(k(13))).await.unwrap(), v(13));
}

/// Same for `Hash` at enqueue time.
#[tokio::test(start_paused = true)]
async fn a_key_whose_hash_panics_fails_only_its_own_load() {
    let _w = watchdog();
    let (loader, t, _) = trap_loader(13);
    t.hash.store(true, Ordering::SeqCst);
    t.armed.store(true, Ordering::SeqCst);
    let k = |id| PKey { id, t: t.clone() };
    let (a, b) = bounded("loads", async {
        tokio::join!(loader.load(k(1)), loader.load(k(13)))
    })
    .await;
    assert_eq!(a.unwrap(), v(1));
    assert!(is_panicked(&b), "got {b:?}");
    t.armed.store(true, Ordering::SeqCst);
    let c = bounded("again", loader.load(k(13))).await;
    assert!(is_panicked(&c), "got {c:?}");
    t.armed.store(false, Ordering::SeqCst);
    assert_eq!(bounded("after", loader.load(k(13))).await.unwrap(), v(13));
}

/// `Eq` panicking while results are handed out fails that load; the key is not stuck in flight.
#[tokio::test(start_paused = true)]
async fn a_key_whose_eq_panics_while_results_are_handed_out_fails_alone_and_is_not_stuck() {
    let _w = watchdog();
    let (loader, t, _) = trap_loader(13);
    t.eq.store(true, Ordering::SeqCst);
    t.arm_on_return.store(true, Ordering::SeqCst);
    let k = |id| PKey { id, t: t.clone() };
    let (a, b) = bounded("loads", async {
        tokio::join!(loader.load(k(1)), loader.load(k(13)))
    })
    .await;
    assert_eq!(a.unwrap(), v(1));
    assert!(is_panicked(&b), "got {b:?}");
    t.arm_on_return.store(false, Ordering::SeqCst);
    t.armed.store(false, Ordering::SeqCst);
    assert_eq!(bounded("after", loader.load(k(13))).await.unwrap(), v(13));
    assert_eq!(bounded("after", loader.load(k(1))).await.unwrap(), v(1));
}

/// `Hash` panicking while results are handed out, with the cache on: the loader goes on and the
/// key is neither stuck in flight nor half-cached.
#[tokio::test(start_paused = true)]
async fn a_hash_panic_while_caching_results_leaves_the_cache_consistent() {
    let _w = watchdog();
    let t = Arc::new(Traps {
        bad: 13,
        ..Traps::default()
    });
    let batches = Arc::new(Mutex::new(Vec::new()));
    let loader = Loader::builder(TrapFn {
        t: t.clone(),
        batches: batches.clone(),
    })
    .cache(2)
    .build()
    .unwrap();
    t.hash.store(true, Ordering::SeqCst);
    t.arm_on_return.store(true, Ordering::SeqCst);
    let k = |id| PKey { id, t: t.clone() };
    let (a, b) = bounded("loads", async {
        tokio::join!(loader.load(k(1)), loader.load(k(13)))
    })
    .await;
    assert_eq!(a.unwrap(), v(1));
    assert!(is_panicked(&b), "got {b:?}");
    t.arm_on_return.store(false, Ordering::SeqCst);
    t.armed.store(false, Ordering::SeqCst);
    for id in [13, 1, 2, 3, 13, 4, 1] {
        assert_eq!(
            bounded("after", loader.load(k(id))).await.unwrap(),
            v(id),
            "key {id}"
        );
    }
}

/// A panic in `Hash` during `clear` / `prime` (caller code, on the caller's thread) must not
/// poison the loader: "the loader keeps working".
#[tokio::test(start_paused = true)]
async fn a_hash_panic_inside_clear_or_prime_does_not_break_the_loader() {
    let _w = watchdog();
    let t = Arc::new(Traps {
        bad: 13,
        ..Traps::default()
    });
    let batches = Arc::new(Mutex::new(Vec::new()));
    let loader = Loader::builder(TrapFn {
        t: t.clone(),
        batches: batches.clone(),
    })
    .cache(4)
    .build()
    .unwrap();
    let k = |id| PKey { id, t: t.clone() };
    assert_eq!(loader.load(k(1)).await.unwrap(), v(1));
    t.hash.store(true, Ordering::SeqCst);
    t.armed.store(true, Ordering::SeqCst);
    let bad = k(13);
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loader.clear(&bad)));
    let bad2 = k(13);
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        loader.prime(bad2, "p".into())
    }));
    t.armed.store(false, Ordering::SeqCst);
    assert_eq!(
        bounded("load after a panicking clear", loader.load(k(1)))
            .await
            .unwrap(),
        v(1)
    );
    assert_eq!(
        bounded("load after a panicking clear", loader.load(k(2)))
            .await
            .unwrap(),
        v(2)
    );
    assert!(loader.prime(k(3), "p3".into()));
    assert_eq!(
        bounded("primed", loader.load(k(3))).await.unwrap(),
        Some("p3".into())
    );
    loader.clear_all();
    assert_eq!(bounded("load 13", loader.load(k(13))).await.unwrap(), v(13));
}

/// A batch function that panics with a non-string payload, before returning its future, on a
/// multi-thread runtime: contained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_function_panicking_with_any_payload_is_contained_multi_thread() {
    let _w = watchdog();
    struct Bomb(AtomicUsize);
    impl BatchFn<u32, u32> for Bomb {
        type Error = String;
        fn load(
            &self,
            keys: &[u32],
        ) -> impl Future<Output = Result<HashMap<u32, u32>, String>> + Send {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                std::panic::panic_any(42u64);
            }
            let out: HashMap<u32, u32> = keys.iter().map(|k| (*k, *k)).collect();
            async move {
                if n == 1 {
                    std::panic::panic_any(vec![1u8]);
                }
                Ok(out)
            }
        }
    }
    let loader = Loader::new(Bomb(AtomicUsize::new(0)));
    let r = bounded("first", loader.load(1)).await;
    assert!(is_panicked(&r), "got {r:?}");
    let r = bounded("second", loader.load(1)).await;
    assert!(is_panicked(&r), "got {r:?}");
    assert_eq!(bounded("third", loader.load(1)).await.unwrap(), Some(1));
}

/// A value whose `Clone` panics, handed to repeated keys of a `load_many` with the cache on.
#[tokio::test(start_paused = true)]
async fn a_value_clone_panic_in_load_many_fails_only_that_key() {
    let _w = watchdog();
    static ARMED: AtomicBool = AtomicBool::new(false);
    #[derive(Debug)]
    struct PVal(u32);
    impl Clone for PVal {
        fn clone(&self) -> Self {
            if self.0 == 13 && ARMED.load(Ordering::SeqCst) {
                panic!("trap: value Clone");
            }
            PVal(self.0)
        }
    }
    struct F;
    impl BatchFn<u32, PVal> for F {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, PVal>, String> {
            Ok(keys.iter().map(|k| (*k, PVal(*k))).collect())
        }
    }
    let loader = Loader::builder(F).cache(10).build().unwrap();
    ARMED.store(true, Ordering::SeqCst);
    let out = bounded("load_many", loader.load_many([1, 13, 2, 13])).await;
    assert_eq!(out.len(), 4);
    assert_eq!(out[0].as_ref().unwrap().as_ref().unwrap().0, 1);
    assert_eq!(out[2].as_ref().unwrap().as_ref().unwrap().0, 2);
    assert!(is_panicked(&out[1]), "got {:?}", out[1]);
    ARMED.store(false, Ordering::SeqCst);
    let again = bounded("load 13", loader.load(13)).await;
    assert_eq!(again.unwrap().unwrap().0, 13);
}

/// `load_many` with a key whose `Hash` panics: "one result per key, in the order given, each as
/// `load` would give it (so one key's error does not hide the others' values)".
#[tokio::test(start_paused = true)]
async fn load_many_with_a_panicking_key_hash_answers_the_others() {
    let _w = watchdog();
    let (loader, t, _) = trap_loader(13);
    t.hash.store(true, Ordering::SeqCst);
    t.armed.store(true, Ordering::SeqCst);
    let k = |id| PKey { id, t: t.clone() };
    let keys = vec![k(1), k(13), k(2)];
    let out = bounded(
        "load_many",
        std::panic::AssertUnwindSafe(loader.load_many(keys)).catch_unwind(),
    )
    .await
    .expect("load_many itself panicked instead of failing the key");
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].as_ref().unwrap(), &v(1));
    assert!(is_panicked(&out[1]), "got {:?}", out[1]);
    assert_eq!(out[2].as_ref().unwrap(), &v(2));
}

/// Same, with the key's `Eq` panicking during deduplication of repeated keys.
#[tokio::test(start_paused = true)]
async fn load_many_with_a_panicking_key_eq_answers_the_others() {
    let _w = watchdog();
    let (loader, t, _) = trap_loader(13);
    t.eq.store(true, Ordering::SeqCst);
    t.armed.store(true, Ordering::SeqCst);
    let k = |id| PKey { id, t: t.clone() };
    let keys = vec![k(1), k(13), k(13), k(2)];
    let out = bounded(
        "load_many",
        std::panic::AssertUnwindSafe(loader.load_many(keys)).catch_unwind(),
    )
    .await
    .expect("load_many itself panicked instead of failing the key");
    assert_eq!(out.len(), 4);
    assert_eq!(out[0].as_ref().unwrap(), &v(1));
    assert_eq!(out[3].as_ref().unwrap(), &v(2));
}

/// `load_many` collects its keys when called: a key `Clone` panic at that point must not escape.
#[tokio::test(start_paused = true)]
async fn load_many_with_a_panicking_key_clone_answers_the_others() {
    let _w = watchdog();
    let (loader, t, _) = trap_loader(13);
    t.clone.store(true, Ordering::SeqCst);
    t.armed.store(true, Ordering::SeqCst);
    let k = |id| PKey { id, t: t.clone() };
    let keys = vec![k(1), k(13), k(2)];
    let out = bounded(
        "load_many",
        std::panic::AssertUnwindSafe(async { loader.load_many(keys).await }).catch_unwind(),
    )
    .await
    .expect("load_many itself panicked instead of failing the key");
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].as_ref().unwrap(), &v(1));
    assert!(is_panicked(&out[1]), "got {:?}", out[1]);
    assert_eq!(out[2].as_ref().unwrap(), &v(2));
}

// ---------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------

const HOUR: Duration = Duration::from_secs(3600);

/// "a waiter whose deadline (`brisk::deadline`) is nearer than the window makes its batch go at
/// once" — also when that waiter asks for a key already in the collecting batch.
#[tokio::test(start_paused = true)]
async fn a_near_deadline_waiter_joining_a_collecting_key_dispatches_the_batch() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).window(HOUR).build().unwrap();
    let start = Instant::now();
    let mut long = loader.load(1);
    assert!(poll_once(&mut long).await.is_pending());
    let short = deadline::scope(Instant::now() + Duration::from_millis(100), loader.load(1));
    let r = bounded("short waiter", short).await;
    assert_eq!(
        r.unwrap(),
        v(1),
        "the near-deadline waiter did not make the batch go"
    );
    assert!(start.elapsed() < Duration::from_millis(100));
    assert_eq!(bounded("long waiter", long).await.unwrap(), v(1));
}

/// Same, for a new key.
#[tokio::test(start_paused = true)]
async fn a_near_deadline_waiter_dispatches_a_windowed_batch_at_once() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).window(HOUR).build().unwrap();
    let start = Instant::now();
    let mut long = loader.load(1);
    assert!(poll_once(&mut long).await.is_pending());
    let r = bounded(
        "short",
        deadline::scope(Instant::now() + Duration::from_millis(100), loader.load(2)),
    )
    .await;
    assert_eq!(r.unwrap(), v(2));
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(bounded("long", long).await.unwrap(), v(1));
    assert_eq!(rec.batches(), vec![vec![1, 2]]);
}

/// `window(Duration::MAX)` combined with a waiter's deadline: no overflow, the deadline wins.
#[tokio::test(start_paused = true)]
async fn a_deadline_with_an_endless_window_dispatches_at_once() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .window(Duration::MAX)
        .build()
        .unwrap();
    let r = bounded(
        "load",
        std::panic::AssertUnwindSafe(deadline::scope(
            Instant::now() + Duration::from_secs(1),
            loader.load(1),
        ))
        .catch_unwind(),
    )
    .await
    .expect("panicked");
    assert_eq!(r.unwrap(), v(1));
}

/// A far-future deadline (30 years) with an endless window: no overflow; flush dispatches it.
#[tokio::test(start_paused = true)]
async fn a_far_deadline_with_an_endless_window_and_flush() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .window(Duration::MAX)
        .build()
        .unwrap();
    let far = Instant::now() + Duration::from_secs(86_400 * 365 * 30);
    let mut f = Box::pin(deadline::scope(far, loader.load(1)));
    let p = std::panic::AssertUnwindSafe(poll_once(&mut f))
        .catch_unwind()
        .await
        .expect("panicked");
    assert!(p.is_pending());
    loader.flush();
    assert_eq!(bounded("flushed", f).await.unwrap(), v(1));
}

/// An already expired budget: the load fails with `Deadline` (it must not hang or panic).
#[tokio::test(start_paused = true)]
async fn an_expired_budget_fails_at_once_with_deadline() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).window(HOUR).build().unwrap();
    let past = Instant::now();
    tokio::time::advance(Duration::from_millis(5)).await;
    let r = bounded("expired load", deadline::scope(past, loader.load(1))).await;
    assert!(matches!(r, Err(LoadError::Deadline(_))), "got {r:?}");
    // and the loader goes on
    let mut other = loader.load(2);
    assert!(poll_once(&mut other).await.is_pending());
    loader.flush();
    assert_eq!(bounded("other", other).await.unwrap(), v(2));
}

/// A waiter with a short deadline joining a batch already running gets `Deadline` at its
/// deadline; the first waiter still gets the value.
#[tokio::test(start_paused = true)]
async fn a_short_deadline_joiner_of_a_running_batch_times_out_alone() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::new(rec.clone());
    let mut long = loader.load(1);
    assert!(poll_once(&mut long).await.is_pending());
    until("started", || rec.started.load(Ordering::SeqCst) == 1).await;
    let start = Instant::now();
    let r = bounded(
        "short",
        deadline::scope(Instant::now() + Duration::from_millis(30), loader.load(1)),
    )
    .await;
    assert!(matches!(r, Err(LoadError::Deadline(_))), "got {r:?}");
    assert!(start.elapsed() <= Duration::from_millis(31));
    gate.add_permits(1);
    assert_eq!(bounded("long", long).await.unwrap(), v(1));
    assert_eq!(rec.calls(), 1);
}

/// "The batch itself runs on its own task under no caller's deadline": the batch function sees
/// no deadline in scope, on both runtime flavors, even for the first caller's batch.
struct Probe;
impl BatchFn<u32, String> for Probe {
    type Error = String;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, String>, String> {
        let seen = format!("{:?}", deadline::remaining());
        Ok(keys.iter().map(|k| (*k, seen.clone())).collect())
    }
}

#[tokio::test(start_paused = true)]
async fn the_batch_function_sees_no_callers_deadline_current_thread() {
    let _w = watchdog();
    let loader = Loader::new(Probe);
    let r = deadline::scope(Instant::now() + Duration::from_secs(2), loader.load(1)).await;
    assert_eq!(r.unwrap().as_deref(), Some("None"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_function_sees_no_callers_deadline_multi_thread() {
    let _w = watchdog();
    let loader = Loader::new(Probe);
    for _ in 0..50 {
        let r = deadline::scope(Instant::now() + Duration::from_secs(2), loader.load(1)).await;
        assert_eq!(r.unwrap().as_deref(), Some("None"));
    }
}

tokio::task_local! {
    static WHO: u32;
}

/// "A batch runs on its own task, under no caller's task-locals".
#[tokio::test(start_paused = true)]
async fn the_batch_function_sees_no_callers_task_locals() {
    let _w = watchdog();
    struct Who;
    impl BatchFn<u32, String> for Who {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, String>, String> {
            let seen = format!("{:?}", WHO.try_with(|w| *w).ok());
            Ok(keys.iter().map(|k| (*k, seen.clone())).collect())
        }
    }
    let loader = Loader::new(Who);
    let r = WHO.scope(7, loader.load(1)).await;
    assert_eq!(r.unwrap().as_deref(), Some("None"));
}

/// "Past the caller's deadline every key still waiting gets `LoadError::Deadline`" (load_many),
/// while keys already answered keep their value.
#[tokio::test(start_paused = true)]
async fn load_many_under_a_deadline_with_a_long_window_dispatches_at_once() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).window(HOUR).build().unwrap();
    let start = Instant::now();
    let out = bounded(
        "load_many",
        deadline::scope(
            Instant::now() + Duration::from_millis(100),
            loader.load_many([1, 2, 3]),
        ),
    )
    .await;
    assert_eq!(
        out.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(),
        vec![v(1), v(2), v(3)]
    );
    assert!(start.elapsed() < Duration::from_millis(100));
}

/// A deadline scope inside the batch function bounds that function's own nested loads.
#[tokio::test(start_paused = true)]
async fn a_deadline_inside_a_batch_function_bounds_its_nested_loads() {
    let _w = watchdog();
    let (inner_rec, inner_gate) = Rec::gated();
    let inner = Loader::new(inner_rec.clone());
    struct Outer(Loader<u32, String, Rec>);
    impl BatchFn<u32, String> for Outer {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, String>, String> {
            let r = deadline::scope(
                Instant::now() + Duration::from_millis(20),
                self.0.load_many(keys.iter().copied()),
            )
            .await;
            Ok(keys
                .iter()
                .zip(r)
                .map(|(k, r)| (*k, format!("{r:?}")))
                .collect())
        }
    }
    let outer = Loader::new(Outer(inner.clone()));
    let r = bounded("outer", outer.load(1)).await.unwrap().unwrap();
    assert!(r.contains("Deadline"), "got {r}");
    inner_gate.add_permits(10);
}

// ---------------------------------------------------------------------------------------------
// Extreme configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn zero_settings_are_build_errors_naming_the_setting() {
    let z = |b: LoaderBuilder<Rec>| b.build::<u32, String>().unwrap_err();
    assert_eq!(
        z(Loader::builder(Rec::default()).max_batch_size(0)),
        BuildError::Zero(Setting::MaxBatchSize)
    );
    assert_eq!(
        z(Loader::builder(Rec::default()).max_concurrent_batches(0)),
        BuildError::Zero(Setting::MaxConcurrentBatches)
    );
    assert_eq!(
        z(Loader::builder(Rec::default()).max_queued_batches(0)),
        BuildError::Zero(Setting::MaxQueuedBatches)
    );
    assert_eq!(
        z(Loader::builder(Rec::default()).window(Duration::ZERO)),
        BuildError::Zero(Setting::Window)
    );
    assert_eq!(
        z(Loader::builder(Rec::default()).cache(0)),
        BuildError::Zero(Setting::CacheCapacity)
    );
}

/// "Large values are fine" / window "up to `Duration::MAX`": every limit at `usize::MAX`.
#[tokio::test(start_paused = true)]
async fn usize_max_limits_work() {
    let _w = watchdog();
    for which in 0..4 {
        let rec = Rec::default();
        let b = Loader::builder(rec.clone());
        let b = match which {
            0 => b.max_batch_size(usize::MAX),
            1 => b.max_concurrent_batches(usize::MAX),
            2 => b.max_queued_batches(usize::MAX),
            _ => b.cache(usize::MAX),
        };
        let loader = b.build().unwrap();
        let r = std::panic::AssertUnwindSafe(async {
            let (a, b) = tokio::join!(loader.load(1), loader.load(2));
            (a.unwrap(), b.unwrap())
        })
        .catch_unwind()
        .await;
        assert_eq!(
            r.expect(&format!("setting #{which} at usize::MAX panicked")),
            (v(1), v(2))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn every_setting_extreme_at_once() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .max_batch_size(usize::MAX)
        .max_concurrent_batches(usize::MAX)
        .max_queued_batches(usize::MAX)
        .cache(usize::MAX)
        .window(Duration::MAX)
        .build()
        .unwrap();
    let mut f = loader.load_many(0..1000);
    assert!(poll_once(&mut f).await.is_pending());
    loader.flush();
    let out = bounded("flushed", f).await;
    assert_eq!(out.len(), 1000);
    assert_eq!(rec.calls(), 1);
}

/// A 1 ns window works like any other.
#[tokio::test(start_paused = true)]
async fn a_one_nanosecond_window_works() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .window(Duration::from_nanos(1))
        .build()
        .unwrap();
    let (a, b) = bounded("loads", async {
        tokio::join!(loader.load(1), loader.load(2))
    })
    .await;
    assert_eq!((a.unwrap(), b.unwrap()), (v(1), v(2)));
}

/// A loader with default settings (no window, no deadline) on a runtime without a time driver.
#[test]
fn a_default_loader_works_on_a_runtime_without_timers() {
    let _w = watchdog();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let loader = Loader::new(Rec::default());
    let r = rt.block_on(async {
        std::panic::AssertUnwindSafe(tokio::time::timeout(Duration::MAX, loader.load(1)))
            .catch_unwind()
            .await
    });
    // tokio::time::timeout with Duration::MAX creates no timer.
    assert_eq!(r.expect("panicked").expect("hang").unwrap(), v(1));
}

// ---------------------------------------------------------------------------------------------
// Overload
// ---------------------------------------------------------------------------------------------

/// Loads that join a batch in flight never start another, so they are not refused even when the
/// queue is full.
#[tokio::test(start_paused = true)]
async fn joining_a_queued_batch_is_not_overloaded() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::builder(rec.clone())
        .max_batch_size(1)
        .max_concurrent_batches(1)
        .max_queued_batches(1)
        .build()
        .unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    until("running", || rec.started.load(Ordering::SeqCst) == 1).await;
    let mut b = loader.load(2);
    assert!(poll_once(&mut b).await.is_pending());
    turns(5).await;
    let c = loader.load(3).now_or_never();
    assert!(matches!(c, Some(Err(LoadError::Overloaded))), "got {c:?}");
    let mut b2 = loader.load(2);
    assert!(
        poll_once(&mut b2).await.is_pending(),
        "joining the queued batch was refused"
    );
    let mut a2 = loader.load(1);
    assert!(
        poll_once(&mut a2).await.is_pending(),
        "joining the running batch was refused"
    );
    gate.add_permits(10);
    for f in [a, b, b2, a2] {
        assert!(bounded("load", f).await.unwrap().is_some());
    }
}

/// A queued batch whose every caller left is cancelled; it must stop counting as queued.
#[tokio::test(start_paused = true)]
async fn a_cancelled_queued_batch_frees_its_queue_place() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::builder(rec.clone())
        .max_batch_size(1)
        .max_concurrent_batches(1)
        .max_queued_batches(1)
        .build()
        .unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    until("running", || rec.started.load(Ordering::SeqCst) == 1).await;
    let mut b = loader.load(2);
    assert!(poll_once(&mut b).await.is_pending());
    turns(3).await;
    drop(b);
    turns(10).await;
    let mut c = loader.load(3);
    let p = poll_once(&mut c).await;
    assert!(
        p.is_pending(),
        "the cancelled batch still counts as queued: {p:?}"
    );
    gate.add_permits(10);
    assert_eq!(bounded("a", a).await.unwrap(), v(1));
    assert_eq!(bounded("c", c).await.unwrap(), v(3));
    assert!(!rec.batches().contains(&vec![2]), "the cancelled batch ran");
}

/// After an `Overloaded` burst, the loader recovers completely.
#[tokio::test(start_paused = true)]
async fn overload_is_temporary() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::builder(rec.clone())
        .max_batch_size(2)
        .max_concurrent_batches(1)
        .max_queued_batches(2)
        .build()
        .unwrap();
    let out = {
        let mut f = loader.load_many(0..20);
        assert!(poll_once(&mut f).await.is_pending());
        gate.add_permits(1000);
        bounded("burst", f).await
    };
    let overloaded = out
        .iter()
        .filter(|r| matches!(r, Err(LoadError::Overloaded)))
        .count();
    let ok = out.iter().filter(|r| r.is_ok()).count();
    assert_eq!(overloaded + ok, 20, "{out:?}");
    // Now everything must go through.
    for k in 100..110 {
        assert_eq!(bounded("after", loader.load(k)).await.unwrap(), v(k));
    }
}

/// "a `load_many` of 10,000 keys becomes 20 batches" with the default settings.
#[tokio::test(start_paused = true)]
async fn a_load_many_of_10000_keys_is_20_batches_by_default() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::new(rec.clone());
    let out = bounded("load_many", loader.load_many(0..10_000)).await;
    assert!(
        out.iter()
            .enumerate()
            .all(|(i, r)| r.as_ref().unwrap() == &v(i as u32))
    );
    let b = rec.batches();
    assert_eq!(b.len(), 20);
    assert!(b.iter().all(|b| b.len() == 500));
}

/// `Overloaded`: "`max_queued_batches` batches were already waiting for a slot". An idle loader
/// with 10 free slots and room for 2 queued batches splits a `load_many` of 500 keys into 5
/// batches of 100: no batch has to wait for a slot, so none should be refused.
#[tokio::test(start_paused = true)]
async fn a_load_many_larger_than_the_queue_bound_with_free_slots() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .max_batch_size(100)
        .max_queued_batches(2)
        .build()
        .unwrap();
    let out = bounded("load_many", loader.load_many(0..500)).await;
    let overloaded = out
        .iter()
        .filter(|r| matches!(r, Err(LoadError::Overloaded)))
        .count();
    assert_eq!(
        overloaded, 0,
        "an idle loader with 10 free slots refused {overloaded} of 500 keys"
    );
}

/// `Abandoned::Finish` + `clear`: "a batch already running never writes a cleared key back".
#[tokio::test(start_paused = true)]
async fn a_finishing_abandoned_batch_does_not_write_back_a_cleared_key() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::builder(rec.clone())
        .cache(10)
        .abandoned(Abandoned::Finish)
        .build()
        .unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    until("started", || rec.started.load(Ordering::SeqCst) == 1).await;
    drop(a);
    loader.clear(&1);
    gate.add_permits(1);
    until("finished", || rec.finished.load(Ordering::SeqCst) == 1).await;
    turns(5).await;
    gate.add_permits(10);
    assert_eq!(bounded("after", loader.load(1)).await.unwrap(), v(1));
    assert_eq!(
        rec.calls(),
        2,
        "the abandoned batch wrote the cleared key back"
    );
}

#[tokio::test(start_paused = true)]
async fn load_many_not_found_for_every_position_of_a_missing_key() {
    let _w = watchdog();
    let rec = Rec {
        omit: vec![2],
        ..Rec::default()
    };
    let loader = Loader::builder(rec.clone())
        .missing(MissingKey::Error)
        .build()
        .unwrap();
    let out = loader.load_many([2, 1, 2]).await;
    assert!(matches!(out[0], Err(LoadError::NotFound)));
    assert_eq!(out[1].as_ref().unwrap(), &v(1));
    assert!(matches!(out[2], Err(LoadError::NotFound)));
}

// ---------------------------------------------------------------------------------------------
// Cache operations racing with batches
// ---------------------------------------------------------------------------------------------

/// `clear(&k)` while `k` is in the *collecting* batch: the next load must not add `k` a second
/// time to the same batch ("Loads `keys` (distinct ...)"), and one `flush()` must answer both.
#[tokio::test(start_paused = true)]
async fn clear_of_a_collecting_key_then_load_keeps_keys_distinct_and_flush_answers_all() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).window(HOUR).build().unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    loader.clear(&1);
    let mut b = loader.load(1);
    assert!(poll_once(&mut b).await.is_pending());
    loader.flush();
    let (ra, rb) = bounded("both after one flush", async { tokio::join!(a, b) }).await;
    assert_eq!((ra.unwrap(), rb.unwrap()), (v(1), v(1)));
    for batch in rec.batches() {
        let mut d = batch.clone();
        d.sort();
        d.dedup();
        assert_eq!(
            d.len(),
            batch.len(),
            "the batch function got repeated keys: {batch:?}"
        );
    }
}

/// Same with `clear_all`.
#[tokio::test(start_paused = true)]
async fn clear_all_during_collection_then_load_keeps_keys_distinct_and_flush_answers_all() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .window(HOUR)
        .cache(10)
        .build()
        .unwrap();
    let mut a = loader.load_many([1, 2]);
    assert!(poll_once(&mut a).await.is_pending());
    loader.clear_all();
    let mut b = loader.load_many([2, 1, 3]);
    assert!(poll_once(&mut b).await.is_pending());
    loader.flush();
    let (ra, rb) = bounded("both after one flush", async { tokio::join!(a, b) }).await;
    assert!(
        ra.iter()
            .chain(rb.iter())
            .all(|r| r.as_ref().unwrap().is_some())
    );
    for batch in rec.batches() {
        let mut d = batch.clone();
        d.sort();
        d.dedup();
        assert_eq!(
            d.len(),
            batch.len(),
            "the batch function got repeated keys: {batch:?}"
        );
    }
}

/// `clear` while the batch runs: the running batch must not write the cleared key back, a load
/// after the clear starts a new batch and sees the write made before the clear.
#[tokio::test(start_paused = true)]
async fn clear_during_a_running_batch_then_load_sees_the_write() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::builder(rec.clone()).cache(10).build().unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    until("started", || rec.started.load(Ordering::SeqCst) == 1).await;
    rec.version.store(2, Ordering::SeqCst); // the write (the running batch already read? no: it reads at the end)
    loader.clear(&1);
    let mut b = loader.load(1);
    assert!(poll_once(&mut b).await.is_pending());
    gate.add_permits(10);
    let _ = bounded("a", a).await.unwrap();
    assert_eq!(bounded("b", b).await.unwrap(), Some("v1@2".into()));
    assert_eq!(rec.calls(), 2);
    // the later of the two batches cached; a third load is cached
    assert_eq!(
        bounded("c", loader.load(1)).await.unwrap(),
        Some("v1@2".into())
    );
    assert_eq!(rec.calls(), 2);
}

/// `prime` of a key in the collecting batch: the batch must not overwrite it.
#[tokio::test(start_paused = true)]
async fn prime_during_collection_is_not_overwritten() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .window(Duration::from_millis(10))
        .cache(10)
        .build()
        .unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    assert!(
        loader.prime(1, "primed".into()),
        "prime of an uncached key must store it"
    );
    let _ = bounded("a", a).await.unwrap();
    assert_eq!(
        bounded("after", loader.load(1)).await.unwrap(),
        Some("primed".into())
    );
}

/// "Extra keys in your answer are ignored": not cached either.
#[tokio::test(start_paused = true)]
async fn extra_keys_in_an_answer_are_not_cached() {
    let _w = watchdog();
    let rec = Rec {
        extra: vec![99],
        ..Rec::default()
    };
    let loader = Loader::builder(rec.clone()).cache(10).build().unwrap();
    assert_eq!(loader.load(1).await.unwrap(), v(1));
    let r = loader.load(99).await.unwrap();
    assert_eq!(
        rec.calls(),
        2,
        "key 99 was served from an answer nobody asked for: {r:?}"
    );
}

/// "Errors are never cached: the next load asks again" — also `NotFound`.
#[tokio::test(start_paused = true)]
async fn not_found_is_not_cached() {
    let _w = watchdog();
    let rec = Rec {
        omit: vec![2],
        ..Rec::default()
    };
    let loader = Loader::builder(rec.clone())
        .cache(10)
        .missing(MissingKey::Error)
        .build()
        .unwrap();
    assert!(matches!(loader.load(2).await, Err(LoadError::NotFound)));
    assert!(matches!(loader.load(2).await, Err(LoadError::NotFound)));
    assert_eq!(rec.calls(), 2, "a NotFound error was cached");
}

/// The cache evicts the oldest insertion first; prime counts as an insertion; a cleared key can
/// be primed again.
#[tokio::test(start_paused = true)]
async fn the_cache_evicts_oldest_first() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).cache(2).build().unwrap();
    assert!(loader.prime(1, "p1".into()));
    assert!(loader.prime(2, "p2".into()));
    assert!(!loader.prime(2, "again".into()));
    assert!(loader.prime(3, "p3".into())); // evicts 1
    assert_eq!(loader.load(3).await.unwrap(), Some("p3".into()));
    assert_eq!(loader.load(2).await.unwrap(), Some("p2".into()));
    assert_eq!(rec.calls(), 0);
    assert_eq!(loader.load(1).await.unwrap(), v(1)); // evicted, fetched, evicts 2
    assert_eq!(rec.calls(), 1);
    loader.clear(&3);
    assert!(loader.prime(3, "p3b".into()));
    assert_eq!(loader.load(3).await.unwrap(), Some("p3b".into()));
    // Repeatedly clearing and priming must not grow past the capacity or evict wrongly.
    for i in 0..100 {
        loader.clear(&3);
        assert!(loader.prime(3, format!("x{i}")));
    }
    assert_eq!(loader.load(3).await.unwrap(), Some("x99".into()));
    assert_eq!(
        loader.load(1).await.unwrap(),
        v(1),
        "key 1 was evicted by clear/prime churn of key 3"
    );
    assert_eq!(rec.calls(), 1);
}

/// Without a cache, prime stores nothing and returns false.
#[tokio::test(start_paused = true)]
async fn prime_without_cache_is_false() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::new(rec.clone());
    assert!(!loader.prime(1, "p".into()));
    assert_eq!(loader.load(1).await.unwrap(), v(1));
}

/// Flush racing with loads from many threads: no key is lost (a lost key would wait an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_racing_with_loads_loses_no_key_multi_thread() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).window(HOUR).build().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let flusher = {
        let loader = loader.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                loader.flush();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let loader = loader.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250u32 {
                let k = t * 1000 + i;
                let r = tokio::time::timeout(Duration::from_secs(3), loader.load(k)).await;
                assert_eq!(r.expect("a load was lost by a racing flush").unwrap(), v(k));
            }
        }));
    }
    for t in tasks {
        bounded("loader task", t).await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    flusher.await.unwrap();
    let keys: usize = rec.batches().iter().map(|b| b.len()).sum();
    assert_eq!(keys, 1000);
}

/// "`flush()` dispatches the collecting batch immediately, and its waiters are answered as soon
/// as it finishes, whoever polls": only the second waiter is ever polled again.
#[tokio::test(start_paused = true)]
async fn flush_answers_a_waiter_whoever_polls() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone()).window(HOUR).build().unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    let mut b = loader.load(2);
    assert!(poll_once(&mut b).await.is_pending());
    loader.flush();
    assert_eq!(bounded("b", b).await.unwrap(), v(2));
    assert_eq!(a.now_or_never().expect("a not answered").unwrap(), v(1));
}

/// `flush` from inside a batch function (manual dispatch for nested loads).
#[tokio::test(start_paused = true)]
async fn flush_and_cache_ops_from_inside_a_batch_function() {
    let _w = watchdog();
    struct Selfish(WeakLoader<u32, u32, Selfish>);
    impl BatchFn<u32, u32> for Selfish {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, String> {
            let this = self.0.upgrade().ok_or("gone")?;
            this.flush();
            this.clear_all();
            for k in keys {
                this.clear(k);
                this.prime(*k + 1000, 0);
            }
            let mut out = HashMap::new();
            for k in keys {
                let v = if *k < 3 {
                    let mut f = this.load(k + 1);
                    let _ = poll_once(&mut f).await;
                    this.flush();
                    f.await.map_err(|e| e.to_string())?.unwrap_or(0) + 1
                } else {
                    0
                };
                out.insert(*k, v);
            }
            Ok(out)
        }
    }
    let loader = LoaderBuilder::cyclic()
        .window(HOUR)
        .cache(10)
        .build_cyclic(Selfish)
        .unwrap();
    let mut f = loader.load(0);
    assert!(poll_once(&mut f).await.is_pending());
    loader.flush();
    assert_eq!(bounded("recursion with flush", f).await.unwrap(), Some(3));
}

// ---------------------------------------------------------------------------------------------
// load_many
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn load_many_keeps_order_with_duplicates_and_loads_each_once() {
    let _w = watchdog();
    let rec = Rec {
        omit: vec![4],
        fail_on: None,
        ..Rec::default()
    };
    let loader = Loader::new(rec.clone());
    let out = loader.load_many([3, 1, 3, 4, 2, 1, 3]).await;
    let got: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(got, vec![v(3), v(1), v(3), None, v(2), v(1), v(3)]);
    let b = rec.batches();
    assert_eq!(b.len(), 1);
    let mut keys = b[0].clone();
    keys.sort();
    assert_eq!(keys, vec![1, 2, 3, 4]);
}

/// "an empty list returns at once" — at once, with no runtime and no batch.
#[test]
fn an_empty_load_many_returns_at_once_even_outside_a_runtime() {
    let rec = Rec::default();
    let loader = Loader::new(rec.clone());
    let out = loader
        .load_many(Vec::<u32>::new())
        .now_or_never()
        .expect("an empty load_many was not ready at once");
    assert!(out.is_empty());
    assert_eq!(rec.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn load_many_split_batches_fail_independently() {
    let _w = watchdog();
    let rec = Rec {
        fail_on: Some(3),
        ..Rec::default()
    };
    let loader = Loader::builder(rec.clone())
        .max_batch_size(2)
        .build()
        .unwrap();
    let out = loader.load_many([1, 2, 3, 4, 5]).await;
    assert_eq!(out[0].as_ref().unwrap(), &v(1));
    assert_eq!(out[1].as_ref().unwrap(), &v(2));
    assert!(matches!(out[2], Err(LoadError::Batch(_))));
    assert!(matches!(out[3], Err(LoadError::Batch(_))));
    assert_eq!(out[4].as_ref().unwrap(), &v(5));
    // every batch at most 2 distinct keys
    assert!(rec.batches().iter().all(|b| b.len() <= 2));
}

/// A `load_many` dropped mid-flight leaves a concurrent `load` of one of its keys served.
#[tokio::test(start_paused = true)]
async fn dropping_a_load_many_mid_flight_leaves_the_others_served() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::builder(rec.clone())
        .max_batch_size(2)
        .build()
        .unwrap();
    let mut many = loader.load_many([1, 2, 3, 4]);
    assert!(poll_once(&mut many).await.is_pending());
    until("started", || rec.started.load(Ordering::SeqCst) >= 1).await;
    let mut one = loader.load(3);
    assert!(poll_once(&mut one).await.is_pending());
    drop(many);
    turns(5).await;
    gate.add_permits(100);
    assert_eq!(bounded("one", one).await.unwrap(), v(3));
}

/// The `LoadMany` and `Load` futures can be spawned (they are `Send`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_load_many_futures_are_send() {
    let _w = watchdog();
    let loader = Loader::new(Rec::default());
    let l = loader.clone();
    let h = tokio::spawn(async move {
        let a = l.load_many([1, 2]).await;
        let b = l.load(3).await;
        (a.len(), b.unwrap())
    });
    assert_eq!(bounded("spawned", h).await.unwrap(), (2, v(3)));
}

/// A waiter first polled in one task and then moved to another task must be woken there.
#[tokio::test(start_paused = true)]
async fn a_load_moved_to_another_task_after_its_first_poll_is_woken_there() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader = Loader::new(rec.clone());
    let mut f = loader.load(1);
    assert!(poll_once(&mut f).await.is_pending());
    let mut m = loader.load_many([1, 2]);
    assert!(poll_once(&mut m).await.is_pending());
    until("started", || rec.started.load(Ordering::SeqCst) >= 1).await;
    let l2 = loader.clone();
    let _ = l2;
    // Move both (already registered) futures into a spawned task. They borrow `loader`, so use a
    // scoped approach: a LocalSet-free join in a child task via a channel is not possible with
    // borrows; instead poll them from a *different waker* with a join.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let waiter = async move {
        let r = tokio::join!(f, m);
        let _ = tx.send(());
        r
    };
    let release = async {
        turns(3).await;
        gate.add_permits(10);
        bounded("moved waiter woke", rx).await.unwrap();
    };
    let (r, _) = bounded("moved", async { tokio::join!(waiter, release) }).await;
    assert_eq!(r.0.unwrap(), v(1));
}

/// Same with a real move to another task (owned loader via `'static` leak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_moved_to_a_spawned_task_after_its_first_poll_is_woken_there() {
    let _w = watchdog();
    let (rec, gate) = Rec::gated();
    let loader: &'static Loader<u32, String, Rec> = Box::leak(Box::new(Loader::new(rec.clone())));
    let mut f = loader.load(1);
    assert!(poll_once(&mut f).await.is_pending());
    let mut m = loader.load_many([1, 2]);
    assert!(poll_once(&mut m).await.is_pending());
    let h = tokio::spawn(async move { tokio::join!(f, m) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.add_permits(10);
    let (a, b) = bounded("moved to a spawned task", h).await.unwrap();
    assert_eq!(a.unwrap(), v(1));
    assert_eq!(
        b.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(),
        vec![v(1), v(2)]
    );
}

// ---------------------------------------------------------------------------------------------
// Nested and recursive loaders
// ---------------------------------------------------------------------------------------------

/// The doc example, with one slot and on both runtimes; "one batch per level".
struct ReplyCounts(WeakLoader<u32, u32, ReplyCounts>, Arc<Mutex<Vec<Vec<u32>>>>);

impl BatchFn<u32, u32> for ReplyCounts {
    type Error = String;
    async fn load(&self, ids: &[u32]) -> Result<HashMap<u32, u32>, String> {
        self.1.lock().unwrap().push(ids.to_vec());
        let this = self.0.upgrade().ok_or("the loader was dropped")?;
        let replies: Vec<u32> = ids
            .iter()
            .flat_map(|n| [2 * n, 2 * n + 1])
            .filter(|r| *r < 32)
            .collect();
        let below = this.load_many(replies.iter().copied()).await;
        let mut counts: HashMap<u32, u32> = ids.iter().map(|id| (*id, 0)).collect();
        for (reply, count) in replies.iter().zip(below) {
            *counts.entry(reply / 2).or_default() +=
                1 + count.map_err(|e| e.to_string())?.unwrap_or(0);
        }
        Ok(counts)
    }
}

async fn reply_counts(slots: usize, queued: usize) -> Vec<Vec<u32>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let counts = LoaderBuilder::cyclic()
        .max_concurrent_batches(slots)
        .max_queued_batches(queued)
        .build_cyclic(move |w| ReplyCounts(w, s))
        .unwrap();
    assert_eq!(
        bounded("doc example", counts.load(1)).await.unwrap(),
        Some(30)
    );
    let b = seen.lock().unwrap().clone();
    b
}

#[tokio::test(start_paused = true)]
async fn doc_example_reply_counts_one_slot_current_thread() {
    let _w = watchdog();
    let b = reply_counts(1, 1).await;
    assert_eq!(b.len(), 5, "not one batch per level: {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doc_example_reply_counts_one_slot_multi_thread() {
    let _w = watchdog();
    for _ in 0..20 {
        let b = reply_counts(1, 1).await;
        assert_eq!(b.len(), 5, "not one batch per level: {b:?}");
    }
}

/// A nested load joining a batch that is *queued* behind its own ancestor's slot (deduplication
/// against batches in flight): "a recursion deeper than `max_concurrent_batches` completes
/// instead of waiting for a slot its own ancestors hold".
#[tokio::test(start_paused = true)]
async fn a_nested_load_joining_a_batch_queued_behind_its_ancestor_completes() {
    let _w = watchdog();
    struct Tree {
        this: WeakLoader<u32, u32, Tree>,
        gate: Arc<Semaphore>,
        started: Arc<AtomicUsize>,
    }
    impl BatchFn<u32, u32> for Tree {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, String> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let this = self.this.upgrade().ok_or("gone")?;
            if keys.contains(&1) {
                self.gate.acquire().await.unwrap().forget();
            }
            let children: Vec<u32> = keys
                .iter()
                .flat_map(|k| [2 * k, 2 * k + 1])
                .filter(|c| *c < 8)
                .collect();
            let below = this.load_many(children.iter().copied()).await;
            let mut out: HashMap<u32, u32> = keys.iter().map(|k| (*k, 1)).collect();
            for (c, r) in children.iter().zip(below) {
                *out.get_mut(&(c / 2)).unwrap() += r.map_err(|e| e.to_string())?.unwrap_or(0);
            }
            Ok(out)
        }
    }
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (g, s) = (gate.clone(), started.clone());
    let loader = LoaderBuilder::cyclic()
        .max_concurrent_batches(1)
        .build_cyclic(move |this| Tree {
            this,
            gate: g,
            started: s,
        })
        .unwrap();
    let mut top = loader.load(1);
    assert!(poll_once(&mut top).await.is_pending());
    until("top started", || started.load(Ordering::SeqCst) == 1).await;
    // Another caller asks for 2 at top level: its batch waits for the slot the top batch holds.
    let mut other = loader.load(2);
    assert!(poll_once(&mut other).await.is_pending());
    turns(5).await;
    gate.add_permits(1); // the top batch now loads [2, 3]; 2 is in the queued batch
    let (t, o) = bounded("recursion through a queued batch", async {
        tokio::join!(top, other)
    })
    .await;
    assert_eq!(t.unwrap(), Some(7));
    assert_eq!(o.unwrap(), Some(3));
}

/// Two loaders whose batch functions load key `k - 1` from each other, one slot each. The
/// recursion A(3) -> B(2) -> A(1) -> B(0) is "a cycle through other loaders", deeper than the
/// limit. Alone it completes; with an unrelated `b.load(0)` collecting at the same moment (B(2)
/// joins that caller's batch), A(1) waits for the slot its own ancestor A(3) holds: deadlock.
struct Peer(Arc<Mutex<Option<WeakLoader<u32, u32, Peer>>>>);
impl BatchFn<u32, u32> for Peer {
    type Error = String;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, String> {
        let other = self
            .0
            .lock()
            .unwrap()
            .clone()
            .and_then(|w| w.upgrade())
            .ok_or("gone")?;
        let mut out = HashMap::new();
        for k in keys {
            let v = if *k == 0 {
                0
            } else {
                other
                    .load(k - 1)
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or(0)
                    + 1
            };
            out.insert(*k, v);
        }
        Ok(out)
    }
}

fn peers() -> (Loader<u32, u32, Peer>, Loader<u32, u32, Peer>) {
    let (pa, pb) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
    let a = Loader::builder(Peer(pa.clone()))
        .max_concurrent_batches(1)
        .build()
        .unwrap();
    let b = Loader::builder(Peer(pb.clone()))
        .max_concurrent_batches(1)
        .build()
        .unwrap();
    *pa.lock().unwrap() = Some(b.downgrade());
    *pb.lock().unwrap() = Some(a.downgrade());
    (a, b)
}

#[tokio::test(start_paused = true)]
async fn a_cycle_through_two_loaders_deeper_than_their_slots_completes_alone() {
    let _w = watchdog();
    let (a, _b) = peers();
    assert_eq!(
        bounded("a.load(3) alone", a.load(3)).await.unwrap(),
        Some(3)
    );
    assert_eq!(
        bounded("a.load(12) alone", a.load(12)).await.unwrap(),
        Some(12)
    );
}

#[tokio::test(start_paused = true)]
async fn a_cycle_through_two_loaders_completes_beside_an_unrelated_load() {
    let _w = watchdog();
    let (a, b) = peers();
    let (x, y) = bounded("a.load(3) with b.load(0) beside it", async {
        tokio::join!(a.load(3), b.load(0))
    })
    .await;
    assert_eq!((x.unwrap(), y.unwrap()), (Some(3), Some(0)));
}

#[tokio::test(start_paused = true)]
async fn a_cycle_through_two_loaders_deeper_than_their_slots_completes() {
    let _w = watchdog();
    let (a, b) = peers();
    let (x, y) = bounded("cycle", async { tokio::join!(a.load(12), b.load(7)) }).await;
    assert_eq!(x.unwrap(), Some(12));
    assert_eq!(y.unwrap(), Some(7));
}

/// Minimal form: two loaders whose batch functions load from each other, one slot each, and one
/// top-level load into each. ("Batches made by loads from inside a batch function of the same
/// loader (directly or through other loaders) take no slot, so a recursive loader cannot
/// deadlock on this bound.")
#[tokio::test(start_paused = true)]
async fn two_mutually_recursive_loaders_with_one_slot_each_and_two_callers() {
    let _w = watchdog();
    let (a, b) = peers();
    // One caller alone: fine.
    assert_eq!(bounded("a alone", a.load(1)).await.unwrap(), Some(1));
    // One caller on each side at once.
    let (x, y) = bounded("a and b at once", async {
        tokio::join!(a.load(1), b.load(1))
    })
    .await;
    assert_eq!((x.unwrap(), y.unwrap()), (Some(1), Some(1)));
}

/// A linear recursion 200 levels deep with one slot and one queued batch.
#[tokio::test(start_paused = true)]
async fn a_deep_linear_recursion_with_minimal_limits_completes() {
    let _w = watchdog();
    struct Deep(WeakLoader<u32, u32, Deep>);
    impl BatchFn<u32, u32> for Deep {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, String> {
            let this = self.0.upgrade().ok_or("gone")?;
            let mut out = HashMap::new();
            for k in keys {
                let v = if *k == 0 {
                    0
                } else {
                    this.load(k - 1)
                        .await
                        .map_err(|e| e.to_string())?
                        .unwrap_or(0)
                        + 1
                };
                out.insert(*k, v);
            }
            Ok(out)
        }
    }
    let loader = LoaderBuilder::cyclic()
        .max_concurrent_batches(1)
        .max_queued_batches(1)
        .build_cyclic(Deep)
        .unwrap();
    assert_eq!(bounded("deep", loader.load(200)).await.unwrap(), Some(200));
}

/// "no reference cycle": dropping the last `Loader` drops the batch function.
#[tokio::test(start_paused = true)]
async fn a_cyclic_loader_is_freed_when_dropped() {
    let _w = watchdog();
    struct Tracked(WeakLoader<u32, u32, Tracked>, Arc<AtomicBool>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.1.store(true, Ordering::SeqCst);
        }
    }
    impl BatchFn<u32, u32> for Tracked {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, String> {
            let _this = self.0.upgrade().ok_or("gone")?;
            Ok(keys.iter().map(|k| (*k, *k)).collect())
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let loader = LoaderBuilder::cyclic()
        .cache(4)
        .build_cyclic(move |w| Tracked(w, d))
        .unwrap();
    assert_eq!(loader.load(1).await.unwrap(), Some(1));
    let weak = loader.downgrade();
    drop(loader);
    turns(5).await;
    assert!(weak.upgrade().is_none());
    assert!(
        dropped.load(Ordering::SeqCst),
        "the batch function was leaked"
    );
}

// ---------------------------------------------------------------------------------------------
// Runtime flavors
// ---------------------------------------------------------------------------------------------

/// "nested loads made by many waiters of one batch in the same task (a join_all of resolvers)
/// go out as one batch" / loads from a worker task join one batch, on a multi-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_joined_in_one_worker_task_form_one_batch_multi_thread() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::new(rec.clone());
    let mut bad = Vec::new();
    for round in 0..200u32 {
        let l = loader.clone();
        let base = round * 10;
        tokio::spawn(async move {
            let futs: Vec<_> = (0..10).map(|i| l.load(base + i)).collect();
            futures_util::future::join_all(futs).await
        })
        .await
        .unwrap();
        let b = rec.batches();
        let last: Vec<_> = b
            .iter()
            .filter(|b| b.iter().any(|k| *k >= base && *k < base + 10))
            .cloned()
            .collect();
        if last.len() != 1 {
            bad.push((round, last));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 200 joins were split: first {:?}",
        bad.len(),
        bad.first()
    );
}

// ---------------------------------------------------------------------------------------------
// No runtime
// ---------------------------------------------------------------------------------------------

#[test]
fn a_load_under_a_deadline_outside_a_runtime_is_no_runtime() {
    let loader = Loader::new(Rec::default());
    let far = Instant::now() + Duration::from_secs(10);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        deadline::scope(far, loader.load(1)).now_or_never()
    }));
    let r = r.expect("panicked instead of NoRuntime");
    assert!(matches!(r, Some(Err(LoadError::NoRuntime))), "got {r:?}");
}

#[test]
fn load_many_outside_a_runtime_is_no_runtime_per_key() {
    let loader = Loader::new(Rec::default());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        loader.load_many([1, 2]).now_or_never()
    }));
    let r = r.expect("panicked").expect("not ready at once");
    assert!(
        r.iter().all(|r| matches!(r, Err(LoadError::NoRuntime))),
        "got {r:?}"
    );
}

#[test]
fn cache_ops_and_flush_outside_a_runtime_do_not_panic() {
    let loader = Loader::builder(Rec::default()).cache(4).build().unwrap();
    loader.flush();
    assert!(loader.prime(1, "p".into()));
    loader.clear(&1);
    loader.clear_all();
    // A cached value needs no batch
    assert!(loader.prime(2, "p2".into()));
    let r = loader.load(2).now_or_never();
    assert!(
        matches!(r, Some(Ok(Some(_))) | Some(Err(LoadError::NoRuntime))),
        "got {r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The batch layer
// ---------------------------------------------------------------------------------------------

mod layer {
    use super::*;
    use brisk_batch::layer::{BatchLayer, BatchLayerBuilder};
    use futures_util::future::BoxFuture;
    use tower::{Layer, Service, ServiceExt};

    /// An inner service that honours tower's contract strictly, like `tower::buffer::Buffer`
    /// (which the docs recommend): `call` without a successful `poll_ready` on *this* clone
    /// panics, and a clone does not inherit readiness.
    struct Strict {
        ready: bool,
        calls: Arc<AtomicUsize>,
        clones: Arc<AtomicUsize>,
        /// 0: fine; 1: poll_ready errors; 2: poll_ready panics; 3: call panics before its future;
        /// 4: poll_ready pending on the first poll of each clone; 5: answers one response short;
        /// 6: one too many.
        mode: u8,
        first_poll_done: bool,
    }

    impl Strict {
        fn new(mode: u8) -> Self {
            Self {
                ready: false,
                calls: Default::default(),
                clones: Default::default(),
                mode,
                first_poll_done: false,
            }
        }
    }

    impl Clone for Strict {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Self {
                ready: false,
                calls: self.calls.clone(),
                clones: self.clones.clone(),
                mode: self.mode,
                first_poll_done: false,
            }
        }
    }

    impl Service<Vec<u32>> for Strict {
        type Response = Vec<u32>;
        type Error = String;
        type Future = BoxFuture<'static, Result<Vec<u32>, String>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
            match self.mode {
                1 => return Poll::Ready(Err("inner not ready".into())),
                2 => panic!("trap: inner poll_ready"),
                4 if !self.first_poll_done => {
                    self.first_poll_done = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                _ => {}
            }
            self.ready = true;
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, reqs: Vec<u32>) -> Self::Future {
            assert!(
                std::mem::take(&mut self.ready),
                "call without poll_ready (tower contract; Buffer panics here)"
            );
            if self.mode == 3 {
                panic!("trap: inner call");
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mode = self.mode;
            Box::pin(async move {
                let mut out: Vec<u32> = reqs.iter().map(|r| r * 10).collect();
                match mode {
                    5 => {
                        out.pop();
                    }
                    6 => out.push(0),
                    _ => {}
                }
                Ok(out)
            })
        }
    }

    /// The inner service's `call` must follow a successful `poll_ready` of the same clone
    /// (`Buffer`, `ConcurrencyLimit`, `RateLimit` all panic otherwise).
    #[tokio::test(start_paused = true)]
    async fn the_inner_service_is_polled_ready_before_each_call() {
        let _w = watchdog();
        let svc = BatchLayer::new().layer(Strict::new(0));
        let (a, b) = bounded("calls", async {
            tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2))
        })
        .await;
        assert_eq!((a.unwrap(), b.unwrap()), (10, 20));
    }

    /// "`Batch(Arc<E>)` ... The batch function (or the layer's inner service) returned an error":
    /// an error from the inner `poll_ready` reaches the callers as that error.
    #[tokio::test(start_paused = true)]
    async fn an_inner_poll_ready_error_fails_the_batch_with_that_error() {
        let _w = watchdog();
        let svc = BatchLayer::new().layer(Strict::new(1));
        let (a, b) = bounded("calls", async {
            tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2))
        })
        .await;
        for r in [a, b] {
            match r {
                Err(LoadError::Batch(e)) => assert_eq!(*e, "inner not ready"),
                other => panic!("expected the poll_ready error, got {other:?}"),
            }
        }
    }

    /// "`Panicked`: ... the inner service": a panic in the inner `poll_ready`.
    #[tokio::test(start_paused = true)]
    async fn an_inner_poll_ready_panic_fails_the_batch_as_panicked() {
        let _w = watchdog();
        let svc = BatchLayer::new().layer(Strict::new(2));
        let r = bounded("call", svc.clone().oneshot(1)).await;
        assert!(
            matches!(&r, Err(LoadError::Panicked { message }) if message.contains("poll_ready")),
            "got {r:?}"
        );
    }

    /// A panic in the inner `call` before it returns its future.
    #[tokio::test(start_paused = true)]
    async fn an_inner_call_panicking_before_its_future_is_panicked() {
        let _w = watchdog();
        let inner = Strict::new(3);
        let svc = BatchLayer::new().layer(inner);
        let (a, b) = bounded("calls", async {
            tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2))
        })
        .await;
        assert!(is_panicked(&a) && is_panicked(&b), "got {a:?} {b:?}");
    }

    /// An inner service that is not ready at first (backpressure) is waited for.
    #[tokio::test(start_paused = true)]
    async fn an_inner_service_not_ready_at_first_is_waited_for() {
        let _w = watchdog();
        let svc = BatchLayer::new().layer(Strict::new(4));
        let r = bounded("call", svc.clone().oneshot(3)).await;
        assert_eq!(r.unwrap(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn wrong_lengths_fail_every_request_of_the_batch() {
        let _w = watchdog();
        for (mode, got) in [(5u8, 1usize), (6, 3)] {
            let svc = BatchLayer::new().layer(Strict::new(mode));
            let (a, b) = bounded("calls", async {
                tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2))
            })
            .await;
            for r in [a, b] {
                assert!(
                    matches!(r, Err(LoadError::WrongLength { expected: 2, got: g }) if g == got)
                        || matches!(&r, Err(LoadError::Panicked { message }) if message.contains("poll_ready")),
                    "mode {mode}: got {r:?}"
                );
            }
        }
    }

    /// A plain (non-strict) inner service, for tests about the layer's own promises.
    fn times10(
        calls: Arc<Mutex<Vec<Vec<u32>>>>,
    ) -> impl Service<
        Vec<u32>,
        Response = Vec<u32>,
        Error = String,
        Future = BoxFuture<'static, Result<Vec<u32>, String>>,
    > + Clone
    + Send
    + Sync
    + 'static {
        tower::service_fn(move |reqs: Vec<u32>| {
            calls.lock().unwrap().push(reqs.clone());
            let f: BoxFuture<'static, Result<Vec<u32>, String>> =
                Box::pin(async move { Ok(reqs.iter().map(|r| r * 10).collect()) });
            f
        })
    }

    /// "a waiter whose deadline is nearer than the window makes its batch go at once" — the layer
    /// uses "the engine the Loader uses (... deadlines)".
    #[tokio::test(start_paused = true)]
    async fn a_near_deadline_call_dispatches_a_windowed_layer_batch_at_once() {
        let _w = watchdog();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let layer = BatchLayerBuilder::new()
            .window(HOUR)
            .build::<u32>()
            .unwrap();
        let mut svc = layer.layer(times10(calls.clone()));
        let start = Instant::now();
        let mut first = svc.call(1);
        assert!(poll_once(&mut first).await.is_pending());
        // `call` made inside the caller's scope (as `oneshot` does).
        let second = svc.clone().oneshot(2);
        let r = bounded(
            "near-deadline call",
            deadline::scope(Instant::now() + Duration::from_millis(100), second),
        )
        .await;
        assert_eq!(r.unwrap(), 20);
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "took {:?}",
            start.elapsed()
        );
        assert_eq!(bounded("first", first).await.unwrap(), 10);
    }

    /// `window(Duration::MAX)` on the layer: a full batch still goes, a deadline still wins.
    #[tokio::test(start_paused = true)]
    async fn an_endless_layer_window_with_a_size_cap_and_a_deadline() {
        let _w = watchdog();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let layer = BatchLayerBuilder::new()
            .window(Duration::MAX)
            .max_batch_size(2)
            .build::<u32>()
            .unwrap();
        let svc = layer.layer(times10(calls.clone()));
        let (a, b) = bounded("full batch", async {
            tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2))
        })
        .await;
        assert_eq!((a.unwrap(), b.unwrap()), (10, 20));
        let r = bounded(
            "deadline",
            std::panic::AssertUnwindSafe(deadline::scope(
                Instant::now() + Duration::from_millis(10),
                svc.clone().oneshot(3),
            ))
            .catch_unwind(),
        )
        .await
        .expect("panicked");
        assert_eq!(r.unwrap(), 30);
    }

    /// "every call completes whether or not the others' futures are ever polled" — on a
    /// multi-thread runtime, with only the *last* call polled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_last_call_polled_completes_multi_thread() {
        let _w = watchdog();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut svc = BatchLayer::new().layer(times10(calls.clone()));
        for round in 0..50u32 {
            let unpolled: Vec<_> = (0..5).map(|i| svc.call(round * 10 + i)).collect();
            let last = svc.call(round * 10 + 9);
            assert_eq!(
                bounded("last call", last).await.unwrap(),
                (round * 10 + 9) * 10
            );
            drop(unpolled);
        }
    }

    /// Identical requests are not merged: each gets its own response, in order.
    #[tokio::test(start_paused = true)]
    async fn identical_requests_each_get_their_own_response() {
        let _w = watchdog();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let svc = BatchLayer::new().layer(times10(calls.clone()));
        let (a, b, c) = tokio::join!(
            svc.clone().oneshot(1),
            svc.clone().oneshot(1),
            svc.clone().oneshot(2)
        );
        assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (10, 10, 20));
        assert_eq!(calls.lock().unwrap().clone(), vec![vec![1, 1, 2]]);
    }

    /// The layer's batch on a runtime that shuts down: a call from another runtime that joined it
    /// must end (`Cancelled`), and the service goes on.
    #[test]
    fn a_layer_batch_whose_runtime_shuts_down_answers_cancelled() {
        let _w = watchdog();
        let gate = Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let inner = tower::service_fn(move |reqs: Vec<u32>| {
            let g = g.clone();
            let f: BoxFuture<'static, Result<Vec<u32>, String>> = Box::pin(async move {
                g.acquire().await.unwrap().forget();
                Ok(reqs)
            });
            f
        });
        let layer = BatchLayerBuilder::new()
            .window(Duration::from_millis(10))
            .build::<u32>()
            .unwrap();
        let mut svc = layer.layer(inner);
        let rt1 = current_thread_rt();
        let rt2 = current_thread_rt();
        let (mut first, mut second) = rt1.block_on(async {
            let mut a = svc.call(1);
            assert!(poll_once(&mut a).await.is_pending());
            let b = svc.call(2); // same collecting batch
            (a, b)
        });
        drop(rt1);
        gate.add_permits(100);
        rt2.block_on(async {
            let r = bounded("a call whose batch's runtime died", &mut second).await;
            assert!(matches!(r, Err(LoadError::Cancelled)), "got {r:?}");
            let r = bounded("first", &mut first).await;
            assert!(matches!(r, Err(LoadError::Cancelled)), "got {r:?}");
            let r = bounded("a new call", svc.call(3)).await;
            assert_eq!(r.unwrap(), 3);
        });
    }

    #[test]
    fn a_call_outside_a_runtime_is_no_runtime() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut svc = BatchLayer::new().layer(times10(calls.clone()));
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| svc.call(1).now_or_never()));
        let r = r.expect("panicked");
        assert!(matches!(r, Some(Err(LoadError::NoRuntime))), "got {r:?}");
        let far = Instant::now() + Duration::from_secs(10);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            deadline::scope(far, svc.call(1)).now_or_never()
        }));
        let r = r.expect("panicked under a deadline");
        assert!(matches!(r, Some(Err(LoadError::NoRuntime))), "got {r:?}");
    }

    #[test]
    fn zero_layer_settings_are_build_errors() {
        assert_eq!(
            BatchLayerBuilder::new()
                .max_batch_size(0)
                .build::<u32>()
                .unwrap_err(),
            BuildError::Zero(Setting::MaxBatchSize)
        );
        assert_eq!(
            BatchLayerBuilder::new()
                .max_concurrent_batches(0)
                .build::<u32>()
                .unwrap_err(),
            BuildError::Zero(Setting::MaxConcurrentBatches)
        );
        assert_eq!(
            BatchLayerBuilder::new()
                .max_queued_batches(0)
                .build::<u32>()
                .unwrap_err(),
            BuildError::Zero(Setting::MaxQueuedBatches)
        );
        assert_eq!(
            BatchLayerBuilder::new()
                .window(Duration::ZERO)
                .build::<u32>()
                .unwrap_err(),
            BuildError::Zero(Setting::Window)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn usize_max_layer_limits_work() {
        let _w = watchdog();
        for which in 0..3 {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let b = BatchLayerBuilder::new();
            let b = match which {
                0 => b.max_batch_size(usize::MAX),
                1 => b.max_concurrent_batches(usize::MAX),
                _ => b.max_queued_batches(usize::MAX),
            };
            let svc = b.build::<u32>().unwrap().layer(times10(calls));
            let r = std::panic::AssertUnwindSafe(async {
                tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2))
            })
            .catch_unwind()
            .await
            .expect(&format!("layer setting #{which} at usize::MAX panicked"));
            assert_eq!((r.0.unwrap(), r.1.unwrap()), (10, 20));
        }
    }

    /// A response future first polled by one task and then by another is woken in the second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_response_future_moved_to_another_task_is_woken_there() {
        let _w = watchdog();
        let gate = Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let inner = tower::service_fn(move |reqs: Vec<u32>| {
            let g = g.clone();
            let f: BoxFuture<'static, Result<Vec<u32>, String>> = Box::pin(async move {
                g.acquire().await.unwrap().forget();
                Ok(reqs)
            });
            f
        });
        let mut svc = BatchLayer::new().layer(inner);
        let mut f = svc.call(5);
        assert!(poll_once(&mut f).await.is_pending());
        let h = tokio::spawn(f);
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.add_permits(1);
        assert_eq!(
            bounded("moved response future", h).await.unwrap().unwrap(),
            5
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

mod metrics {
    use super::*;
    use brisk_metrics::catalog::{
        BATCH_BATCHES, BATCH_DURATION, BATCH_FAILURES, BATCH_KEYS, BATCH_QUEUE_WAIT,
        BATCH_SINGLETONS, BATCH_SIZE,
    };
    use brisk_metrics::testing::Capture;

    const L: [(&str, &str); 1] = [("loader", "m")];

    fn keys(c: &Capture, kind: &str) -> u64 {
        c.counter(BATCH_KEYS.name, &[("loader", "m"), ("kind", kind)])
    }

    /// queue wait = "Time from a batch's first key to the call of the batch function (window plus
    /// wait for a free slot)"; duration = "one call of the batch function".
    #[tokio::test(start_paused = true)]
    async fn queue_wait_and_duration_are_recorded() {
        let _w = watchdog();
        let capture = Capture::new();
        let rec = Rec {
            sleep: Some(Duration::from_millis(100)),
            ..Rec::default()
        };
        capture
            .scope(async {
                let loader = Loader::builder(rec.clone())
                    .name("m")
                    .window(Duration::from_millis(50))
                    .build()
                    .unwrap();
                assert_eq!(loader.load(1).await.unwrap(), v(1));
            })
            .await;
        let qw = capture.histogram(BATCH_QUEUE_WAIT.name, &L);
        let du = capture.histogram(BATCH_DURATION.name, &L);
        assert_eq!(qw.len(), 1, "queue wait samples: {qw:?}");
        assert!(qw[0] >= 0.05 && qw[0] < 0.1, "queue wait {qw:?}");
        assert_eq!(du.len(), 1, "duration samples: {du:?}");
        assert!(du[0] >= 0.1 && du[0] < 0.2, "duration {du:?}");
    }

    /// Queue wait includes the wait for a free slot.
    #[tokio::test(start_paused = true)]
    async fn queue_wait_includes_the_wait_for_a_slot() {
        let _w = watchdog();
        let capture = Capture::new();
        let rec = Rec {
            sleep: Some(Duration::from_millis(100)),
            ..Rec::default()
        };
        capture
            .scope(async {
                let loader = Loader::builder(rec.clone())
                    .name("m")
                    .max_concurrent_batches(1)
                    .max_batch_size(1)
                    .build()
                    .unwrap();
                let (a, b) = tokio::join!(loader.load(1), loader.load(2));
                assert_eq!((a.unwrap(), b.unwrap()), (v(1), v(2)));
            })
            .await;
        let mut qw = capture.histogram(BATCH_QUEUE_WAIT.name, &L);
        qw.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(qw.len(), 2, "{qw:?}");
        assert!(
            qw[1] >= 0.1,
            "the second batch waited 100 ms for the slot: {qw:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_by_reason_and_missing_keys() {
        let _w = watchdog();
        struct Mixed(AtomicUsize);
        impl BatchFn<u32, String> for Mixed {
            type Error = String;
            fn load(
                &self,
                keys: &[u32],
            ) -> impl Future<Output = Result<HashMap<u32, String>, String>> + Send {
                let n = self.0.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    panic!("before the future");
                }
                let keys = keys.to_vec();
                async move {
                    match n {
                        1 => panic!("inside the future"),
                        2 => Err("db down".to_owned()),
                        _ => Ok(keys
                            .iter()
                            .filter(|k| **k != 2)
                            .map(|k| (*k, format!("v{k}")))
                            .collect()),
                    }
                }
            }
        }
        let capture = Capture::new();
        capture
            .scope(async {
                let loader = Loader::builder(Mixed(AtomicUsize::new(0)))
                    .name("m")
                    .build()
                    .unwrap();
                assert!(is_panicked(&loader.load(1).await));
                assert!(is_panicked(&loader.load(1).await));
                assert!(matches!(loader.load(1).await, Err(LoadError::Batch(_))));
                let (a, b) = tokio::join!(loader.load(1), loader.load(2));
                assert_eq!((a.unwrap(), b.unwrap()), (v(1), None));
            })
            .await;
        let f =
            |reason| capture.counter(BATCH_FAILURES.name, &[("loader", "m"), ("reason", reason)]);
        assert_eq!((f("panic"), f("error")), (2, 1), "failures by reason");
        assert_eq!(keys(&capture, "missing"), 1);
        assert_eq!(capture.counter(BATCH_BATCHES.name, &L), 4);
    }

    /// Deduplication against a batch *in flight* counts as deduplicated; a cancelled collecting
    /// batch never dispatched is not counted as a batch.
    #[tokio::test(start_paused = true)]
    async fn dedup_in_flight_and_cancelled_batches() {
        let _w = watchdog();
        let capture = Capture::new();
        let (rec, gate) = Rec::gated();
        capture
            .scope(async {
                let loader = Loader::builder(rec.clone()).name("m").build().unwrap();
                let mut a = loader.load(1);
                assert!(poll_once(&mut a).await.is_pending());
                until("started", || rec.started.load(Ordering::SeqCst) == 1).await;
                let mut b = loader.load(1);
                assert!(poll_once(&mut b).await.is_pending());
                gate.add_permits(10);
                let _ = tokio::join!(a, b);
                let w = Loader::builder(rec.clone())
                    .name("m")
                    .window(HOUR)
                    .build()
                    .unwrap();
                let mut c = w.load(5);
                assert!(poll_once(&mut c).await.is_pending());
                drop(c);
                tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
            })
            .await;
        assert_eq!(keys(&capture, "requested"), 3);
        assert_eq!(keys(&capture, "deduplicated"), 1);
        assert_eq!(capture.counter(BATCH_BATCHES.name, &L), 1);
        assert_eq!(capture.histogram(BATCH_SIZE.name, &L), vec![1.0]);
        assert_eq!(capture.counter(BATCH_SINGLETONS.name, &L), 1);
        assert_eq!(rec.calls(), 1, "the cancelled batch ran");
    }

    /// A loader built before the recorder is installed reports to it all the same (here: built
    /// outside any capture, used inside one).
    #[tokio::test(start_paused = true)]
    async fn batch_size_is_recorded_for_split_load_many() {
        let _w = watchdog();
        let capture = Capture::new();
        let rec = Rec::default();
        capture
            .scope(async {
                let loader = Loader::builder(rec.clone())
                    .name("m")
                    .max_batch_size(3)
                    .build()
                    .unwrap();
                let _ = loader.load_many(0..7).await;
            })
            .await;
        let mut s = capture.histogram(BATCH_SIZE.name, &L);
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(s, vec![1.0, 3.0, 3.0]);
        assert_eq!(capture.counter(BATCH_SINGLETONS.name, &L), 1);
        assert_eq!(keys(&capture, "requested"), 7);
    }
}

// ---------------------------------------------------------------------------------------------
// Late additions
// ---------------------------------------------------------------------------------------------

/// A load made in the context of a runtime that has already shut down (a `Handle` kept past
/// its runtime): the batch's task can never run, so the load must end (`Cancelled` or
/// `NoRuntime`), not wait forever.
#[test]
fn a_load_on_an_already_shut_down_runtime_ends() {
    let _w = watchdog();
    let loader = Loader::new(Rec::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.handle().clone();
    drop(rt);
    let _g = h.enter();
    let mut f = loader.load(1);
    let mut result = None;
    for _ in 0..2000 {
        if let Some(r) = (&mut f).now_or_never() {
            result = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = result.expect("HANG: a load on a shut-down runtime never ended (2 s)");
    assert!(
        matches!(r, Err(LoadError::Cancelled) | Err(LoadError::NoRuntime)),
        "got {r:?}"
    );
}

/// `Abandoned::Finish` with the cache on: the value's `Clone` panics while the abandoned batch
/// caches its result (no waiter left). The panic is contained and the key is not stuck.
#[tokio::test(start_paused = true)]
async fn a_value_clone_panic_while_an_abandoned_batch_caches_is_contained() {
    let _w = watchdog();
    static ARMED: AtomicBool = AtomicBool::new(false);
    #[derive(Debug, PartialEq)]
    struct PVal(u32);
    impl Clone for PVal {
        fn clone(&self) -> Self {
            if ARMED.load(Ordering::SeqCst) {
                panic!("trap: value Clone");
            }
            PVal(self.0)
        }
    }
    struct F(Arc<Semaphore>, Arc<AtomicUsize>);
    impl BatchFn<u32, PVal> for F {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, PVal>, String> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.acquire().await.unwrap().forget();
            ARMED.store(self.1.load(Ordering::SeqCst) == 1, Ordering::SeqCst);
            Ok(keys.iter().map(|k| (*k, PVal(*k))).collect())
        }
    }
    let gate = Arc::new(Semaphore::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let loader = Loader::builder(F(gate.clone(), calls.clone()))
        .cache(10)
        .abandoned(Abandoned::Finish)
        .build()
        .unwrap();
    let mut a = loader.load(1);
    assert!(poll_once(&mut a).await.is_pending());
    until("started", || calls.load(Ordering::SeqCst) == 1).await;
    drop(a);
    gate.add_permits(1);
    turns(20).await;
    ARMED.store(false, Ordering::SeqCst);
    gate.add_permits(10);
    let r = bounded("after", loader.load(1)).await;
    assert_eq!(r.unwrap(), Some(PVal(1)));
    let r = bounded("other key", loader.load(2)).await;
    assert_eq!(r.unwrap(), Some(PVal(2)));
}

/// "a load after `clear(&k)` starts a new batch (it sees every write made before the clear)",
/// under races on a multi-thread runtime: a writer bumps the database version, clears the key
/// and publishes the version; a reader that saw the published version must never get an older
/// value. The batch function reads the database when it starts.
struct Snapshot(Arc<AtomicUsize>);
impl BatchFn<u32, usize> for Snapshot {
    type Error = String;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, usize>, String> {
        let version = self.0.load(Ordering::SeqCst);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_micros(50)).await;
        Ok(keys.iter().map(|k| (*k, version)).collect())
    }
}

async fn clear_race(cache: bool) {
    let db = Arc::new(AtomicUsize::new(0));
    let published = Arc::new(AtomicUsize::new(0));
    let b = Loader::builder(Snapshot(db.clone()));
    let loader = if cache {
        b.cache(16).build().unwrap()
    } else {
        b.build().unwrap()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (loader, db, published, stop) =
            (loader.clone(), db.clone(), published.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let v = db.fetch_add(1, Ordering::SeqCst) + 1;
                loader.clear(&1);
                published.store(v, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(30)).await;
            }
        })
    };
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (loader, published) = (loader.clone(), published.clone());
        readers.push(tokio::spawn(async move {
            let mut stale = Vec::new();
            for _ in 0..300 {
                let before = published.load(Ordering::SeqCst);
                let got = loader.load(1).await.unwrap().unwrap();
                if got < before {
                    stale.push((before, got));
                }
            }
            stale
        }));
    }
    let mut stale = Vec::new();
    for r in readers {
        stale.extend(bounded("reader", r).await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(
        stale.is_empty(),
        "{} stale reads (published, got), first {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_racing_with_loads_never_serves_a_stale_value_with_cache() {
    let _w = watchdog();
    clear_race(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_racing_with_loads_never_serves_a_stale_value_without_cache() {
    let _w = watchdog();
    clear_race(false).await;
}

/// "Repeated keys are loaded once", also when the keys are split over several batches.
#[tokio::test(start_paused = true)]
async fn load_many_repeated_keys_across_split_batches_are_loaded_once() {
    let _w = watchdog();
    let rec = Rec::default();
    let loader = Loader::builder(rec.clone())
        .max_batch_size(2)
        .build()
        .unwrap();
    let out = loader.load_many([1, 2, 3, 1, 2, 4, 3, 5, 1]).await;
    let got: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        got,
        vec![v(1), v(2), v(3), v(1), v(2), v(4), v(3), v(5), v(1)]
    );
    let mut all: Vec<u32> = rec.batches().concat();
    all.sort();
    assert_eq!(all, vec![1, 2, 3, 4, 5], "batches: {:?}", rec.batches());
    assert!(rec.batches().iter().all(|b| b.len() <= 2));
}

/// A windowed loader on a runtime built without the time driver: the load must end (value or
/// error), not hang.
#[test]
fn a_windowed_load_on_a_runtime_without_timers_ends() {
    let _w = watchdog();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let loader = Loader::builder(Rec::default())
        .window(Duration::from_millis(1))
        .build()
        .unwrap();
    let r = rt.block_on(async {
        let mut f = loader.load(1);
        for _ in 0..10_000 {
            match std::panic::AssertUnwindSafe(poll_once(&mut f))
                .catch_unwind()
                .await
            {
                Ok(Poll::Ready(r)) => return Some(Ok(r)),
                Ok(Poll::Pending) => tokio::task::yield_now().await,
                Err(_) => return Some(Err("the caller's poll panicked")),
            }
        }
        None
    });
    let r = r
        .expect("HANG: never ended after 10,000 turns")
        .expect("the caller's poll panicked");
    // `Cancelled` is documented as "the batch's runtime shut down before it answered": the
    // runtime is alive here, so that would be a wrong diagnosis.
    assert!(
        !matches!(r, Err(LoadError::Cancelled)),
        "got {r:?} from a live runtime"
    );
}

/// A recursive loader whose batch function fans its next level out over spawned tasks (a
/// `JoinSet`, common to parallelize work): a spawned task inherits no task-local, so the loads
/// it makes are not known to be nested unless the spawned future is wrapped in
/// `brisk_batch::within_batch`, as the docs say; wrapped, with one slot the recursion completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_loader_that_spawns_its_nested_loads_completes_with_one_slot() {
    let _w = watchdog();
    struct Spawny(WeakLoader<u32, u32, Spawny>);
    impl BatchFn<u32, u32> for Spawny {
        type Error = String;
        async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, String> {
            let this = self.0.upgrade().ok_or("gone")?;
            let mut out = HashMap::new();
            for k in keys {
                let v = if *k == 0 {
                    0
                } else {
                    let l = this.clone();
                    let k = *k;
                    tokio::spawn(brisk_batch::within_batch(
                        async move { l.load(k - 1).await },
                    ))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
                    .unwrap_or(0)
                        + 1
                };
                out.insert(*k, v);
            }
            Ok(out)
        }
    }
    let loader = LoaderBuilder::cyclic()
        .max_concurrent_batches(1)
        .build_cyclic(Spawny)
        .unwrap();
    assert_eq!(
        bounded("spawned recursion", loader.load(3)).await.unwrap(),
        Some(3)
    );
}

mod layer_clone {
    use super::*;
    use brisk_batch::layer::BatchLayer;
    use futures_util::future::BoxFuture;
    use tower::{Layer, Service, ServiceExt};

    static ARMED: AtomicBool = AtomicBool::new(false);

    struct CloneBomb;
    impl Clone for CloneBomb {
        fn clone(&self) -> Self {
            if ARMED.load(Ordering::SeqCst) {
                panic!("trap: inner Clone");
            }
            CloneBomb
        }
    }
    impl Service<Vec<u32>> for CloneBomb {
        type Response = Vec<u32>;
        type Error = String;
        type Future = BoxFuture<'static, Result<Vec<u32>, String>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, reqs: Vec<u32>) -> Self::Future {
            Box::pin(async move { Ok(reqs) })
        }
    }

    /// "`Panicked`: User code panicked: ... the inner service": its `Clone` (each batch calls a
    /// clone) panicking must fail that batch, not the caller; clones of the outer service share
    /// state and need no inner clone.
    #[tokio::test(start_paused = true)]
    async fn an_inner_service_clone_panic_is_contained() {
        let _w = watchdog();
        let svc = BatchLayer::new().layer(CloneBomb);
        ARMED.store(true, Ordering::SeqCst);
        let r = std::panic::AssertUnwindSafe(async {
            let s2 = svc.clone();
            s2.oneshot(1).await
        })
        .catch_unwind()
        .await;
        let r = r.expect("the caller panicked");
        assert!(is_panicked(&r), "got {r:?}");
        ARMED.store(false, Ordering::SeqCst);
        assert_eq!(bounded("after", svc.clone().oneshot(2)).await.unwrap(), 2);
    }
}
