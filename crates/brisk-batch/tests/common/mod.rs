//! A batch function that records every batch it is asked for.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brisk_batch::BatchFn;
use tokio::sync::Semaphore;

/// Answers each key with its text, and records each batch.
pub struct Echo<K> {
    pub batches: Arc<Mutex<Vec<Vec<K>>>>,
    /// Batches containing this key fail.
    pub fail_on: Option<K>,
}

impl<K> Echo<K> {
    pub fn new() -> (Self, Arc<Mutex<Vec<Vec<K>>>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                batches: batches.clone(),
                fail_on: None,
            },
            batches,
        )
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Boom(pub String);

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Boom {}

impl<K> BatchFn<K, String> for Echo<K>
where
    K: Hash + Eq + Clone + Display + Send + Sync + 'static,
{
    type Error = Boom;

    async fn load(&self, keys: &[K]) -> Result<HashMap<K, String>, Boom> {
        self.batches.lock().unwrap().push(keys.to_vec());
        if let Some(bad) = self.fail_on.as_ref().filter(|bad| keys.contains(bad)) {
            return Err(Boom(format!("no {bad}")));
        }
        Ok(keys.iter().map(|k| (k.clone(), k.to_string())).collect())
    }
}

pub fn taken<K: Clone>(batches: &Arc<Mutex<Vec<Vec<K>>>>) -> Vec<Vec<K>> {
    batches.lock().unwrap().clone()
}

/// Polls a future once, from inside the current task.
pub async fn poll_once<F: std::future::Future>(
    mut future: std::pin::Pin<&mut F>,
) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await
}

/// Waits for a permit before answering, so a test decides when a batch finishes; counts
/// batches running at once.
#[derive(Clone)]
pub struct Gated {
    pub gate: Arc<Semaphore>,
    pub batches: Arc<Mutex<Vec<Vec<u32>>>>,
    pub running: Arc<AtomicUsize>,
    pub most_running: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
}

impl Gated {
    pub fn new() -> Self {
        Self {
            gate: Arc::new(Semaphore::new(0)),
            batches: Arc::default(),
            running: Arc::default(),
            most_running: Arc::default(),
            finished: Arc::default(),
        }
    }
}

impl BatchFn<u32, u32> for Gated {
    type Error = Boom;
    async fn load(&self, keys: &[u32]) -> Result<HashMap<u32, u32>, Boom> {
        self.batches.lock().unwrap().push(keys.to_vec());
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(keys.iter().map(|k| (*k, k * 2)).collect())
    }
}

/// Waits until `done`, yielding (and, on a multi-thread runtime, letting other workers run);
/// gives up after ten seconds so a broken test fails instead of hanging.
pub async fn until(mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "condition not reached in 10 s"
        );
        tokio::task::yield_now().await;
    }
}
