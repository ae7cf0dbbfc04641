//! Guard benches: brisk-guard's layers beside their peers, in the same run (DESIGN §5).
//!
//! - `guard/ratelimit_check`: one rate-limit check that is allowed, on the calling thread
//!   (`*_1t`) and from two threads sharing one limiter (`*_2t`: two std threads doing half the
//!   checks each, the total wall time reported), for one key (`single_*`) and for 10,000 keys
//!   drawn Zipf (s = 1, seeded; `zipf_*`). `brisk` is a `RateLimiter` on the local store, its
//!   check taken with `check_now` (the local store decides at once); its one key is the empty
//!   key `Global` gives, which is kept outside the key map;
//!   `governor` is a direct limiter for one key and a keyed (`DashMap`) limiter for many, with
//!   its default clock (quanta) and hasher. Both run the same GCRA quota (one unit per µs, a
//!   burst of `u32::MAX / 2`), so every check is allowed, and take the same pre-rendered key
//!   `String`s: no formatting is timed.
//! - `guard/redis_ratelimit`: checks per second of one key against a private redis-server, 64
//!   tasks on a two-worker runtime: `brisk` (a `RateLimiter` over brisk-pool's `Multiplexed`,
//!   one `EVALSHA` per check). After the run, `redis-benchmark -c 64` running the same script
//!   (`SCRIPT LOAD` of [`GCRA_SCRIPT`], then `EVALSHA` with the key and arguments brisk sends),
//!   without and with `-P 16`: the physical limit of the server. On a small machine
//!   redis-benchmark competes with the server for the cores, and brisk's one connection
//!   pipelines what its 64 tasks send, so `-P 1` is no upper bound; `-P 16` is closer to one.
//! - `guard/stack`: one request through a trivial `service_fn` (`http::Request<()>` to
//!   `http::Response<()>`), `svc.ready().await?.call(req).await` on a current-thread runtime, a
//!   fresh request per iteration: `brisk` (brisk's HTTP metrics, `TimeoutLayer` and
//!   `RateLimitLayer` on a `Global` key, refusals as responses through `HttpResponses`), `tower`
//!   (tower's own `TimeoutLayer` and `RateLimitLayer` with a rate never reached; no metrics)
//!   and `bare` (the service alone).
//!
//! No metrics recorder is installed: the counters and the HTTP metrics cost what they cost a
//! library without an exporter, as in the pool benches.
//!
//! Run: `cargo bench --bench guard --features guard,http,redis`.
#![allow(clippy::print_stdout)] // the physical-limit report

use std::cell::Cell;
use std::convert::Infallible;
use std::future::ready;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use brisk::guard::HttpResponses;
use brisk::guard::ratelimit::{GCRA_SCRIPT, Global, Outcome, Quota, RateLimitLayer, RateLimiter};
use brisk::guard::timeout::TimeoutLayer;
use brisk_metrics::http::HttpMetricsLayer;
use brisk_pool::redis_source::Multiplexed;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use http::{Request, Response, StatusCode};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

#[allow(dead_code)] // its GET runner: this bench runs the limiter's script instead
#[path = "support/redis_benchmark.rs"]
mod redis_benchmark;
#[path = "support/spread.rs"]
mod spread;
#[path = "support/zipf.rs"]
mod zipf;

use spread::spread;

/// One unit per microsecond: the finest rate brisk accepts.
const PER_SECOND: u32 = 1_000_000;
/// Room for 35 minutes of checks ahead of the clock: every check in a run is allowed.
const BURST: u32 = u32::MAX / 2;
const KEYS: u64 = 10_000;
const DRAWS: usize = 1 << 20;
/// Tasks of `guard/redis_ratelimit`, and redis-benchmark's clients.
const CONCURRENCY: u64 = 64;
/// The key of the single-key scenarios (and of the Redis group).
const KEY: &str = "k";

fn brisk_limiter(name: &str) -> RateLimiter {
    RateLimiter::builder(name)
        .quota(Quota::per_second(PER_SECOND).burst(BURST))
        .build()
        .expect("a valid quota")
}

fn governor_quota() -> governor::Quota {
    let nonzero = |n| NonZeroU32::new(n).expect("not zero");
    governor::Quota::per_second(nonzero(PER_SECOND)).allow_burst(nonzero(BURST))
}

/// The keys of a scenario and the order they are checked in.
struct Scenario {
    name: &'static str,
    keys: Vec<String>,
    /// Indices into `keys`; a power of two long.
    draws: Vec<u32>,
}

impl Scenario {
    fn single() -> Self {
        Self {
            name: "single",
            // The empty key is what `Global` gives: one limit, kept outside the key map, as
            // governor's direct limiter keeps one outside any map.
            keys: vec![String::new()],
            draws: vec![0],
        }
    }

    fn zipf() -> Self {
        Self {
            name: "zipf",
            keys: (0..KEYS).map(|k| format!("user:{k}")).collect(),
            draws: zipf::zipf_keys(KEYS, 1.0, DRAWS, 0x5EED)
                .into_iter()
                .map(|k| u32::try_from(k).expect("below 10,000"))
                .collect(),
        }
    }

    /// `n` checks of the keys drawn from position `from` on.
    fn checks(&self, from: usize, n: u64, check: &impl Fn(&String) -> bool) {
        let mask = self.draws.len() - 1;
        let mut i = from & mask;
        for _ in 0..n {
            i = (i + 1) & mask;
            assert!(check(&self.keys[self.draws[i] as usize]), "a check refused");
        }
    }

    /// `iters` checks on `threads` threads sharing `check`, each from its own place in the
    /// draws; the wall time of all of them.
    fn run(
        &self,
        threads: usize,
        iters: u64,
        check: &(impl Fn(&String) -> bool + Sync),
    ) -> Duration {
        if threads == 1 {
            let start = Instant::now();
            self.checks(0, iters, check);
            return start.elapsed();
        }
        let per_thread = iters.div_ceil(threads as u64);
        let barrier = Barrier::new(threads + 1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        self.checks(t * self.draws.len() / threads, per_thread, check);
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            for handle in handles {
                handle.join().expect("a checking thread");
            }
            start.elapsed()
        })
    }
}

fn bench_checks(
    group: &mut BenchmarkGroup<'_, WallTime>,
    contender: &str,
    scenario: &Scenario,
    threads: usize,
    check: &(impl Fn(&String) -> bool + Sync),
) {
    let id = BenchmarkId::new(contender, format!("{}_{threads}t", scenario.name));
    group.bench_function(id, |b| {
        b.iter_custom(|iters| scenario.run(threads, iters, check));
    });
}

fn ratelimit_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("guard/ratelimit_check");
    group.throughput(Throughput::Elements(1));
    let (single, zipf) = (Scenario::single(), Scenario::zipf());
    for threads in [1, 2] {
        // A fresh limiter per benchmark: no run inherits another's theoretical arrival times.
        let brisk = brisk_limiter("bench");
        bench_checks(&mut group, "brisk", &single, threads, &|key: &String| {
            let decision = brisk.check_now(key);
            decision
                .expect("the local store decides at once")
                .is_allowed()
        });
        let governor = governor::RateLimiter::direct(governor_quota());
        bench_checks(&mut group, "governor", &single, threads, &|_: &String| {
            governor.check().is_ok()
        });

        let brisk = brisk_limiter("bench");
        bench_checks(&mut group, "brisk", &zipf, threads, &|key: &String| {
            let decision = brisk.check_now(key);
            decision
                .expect("the local store decides at once")
                .is_allowed()
        });
        let governor = governor::RateLimiter::<String, _, _>::keyed(governor_quota());
        bench_checks(&mut group, "governor", &zipf, threads, &|key: &String| {
            governor.check_key(key).is_ok()
        });
    }
    group.finish();
}

fn redis_ratelimit(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let limiter = rt.block_on(async {
        let source = Multiplexed::connect(url).await.expect("connect");
        RateLimiter::builder("bench")
            .quota(Quota::per_second(PER_SECOND).burst(BURST))
            .redis(source)
            .build()
            .expect("a valid limiter")
    });
    let mut group = c.benchmark_group("guard/redis_ratelimit");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("brisk", CONCURRENCY), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let limiter = limiter.clone();
            spread(iters, CONCURRENCY, move || {
                let limiter = limiter.clone();
                async move {
                    // Allowed, not failed open: a check that timed out would be cheap and wrong.
                    assert_eq!(limiter.check(KEY).await.outcome(), Outcome::Allowed);
                }
            })
        });
    });
    group.finish();
}

/// redis-benchmark running the limiter's script with the key and arguments brisk sends for
/// `KEY` in `guard/redis_ratelimit`.
fn physical_limit(rt: &tokio::runtime::Runtime, url: &str, port: u16) {
    let sha: String = rt.block_on(async {
        let client = redis::Client::open(url).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(GCRA_SCRIPT)
            .query_async(&mut conn)
            .await
            .expect("SCRIPT LOAD")
    });
    // A fixed `now` (redis-benchmark repeats its arguments): the key's time runs ahead by one
    // interval per request, well within the burst, so every request is allowed as brisk's are.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros()
        .to_string();
    // As brisk's rule: the interval in µs, the capacity `burst × interval`.
    let interval = 1_000_000 / u64::from(PER_SECOND);
    let capacity = interval * u64::from(BURST);
    let key = format!("brisk:rl:{{bench:default:{KEY}}}:0");
    let (interval, capacity) = (interval.to_string(), capacity.to_string());
    let clients = CONCURRENCY.to_string();
    // Without pipelining (one request per client in flight, as brisk's tasks) and with 16 per
    // client (brisk's multiplexed connection pipelines the checks of its 64 tasks).
    for pipeline in ["1", "16"] {
        let args = [
            "-n", "200000", "-q", "-c", &clients, "-P", pipeline, "EVALSHA", &sha, "1", &key, &now,
            &interval, &capacity,
        ];
        match redis_benchmark::run(port, &args) {
            Ok(text) => {
                let last = text
                    .split(['\r', '\n'])
                    .rfind(|line| !line.trim().is_empty())
                    .unwrap_or("");
                let figures = last.rsplit(": ").next().unwrap_or(last);
                println!(
                    "redis-benchmark -c {clients} -P {pipeline} EVALSHA (the GCRA script): {}",
                    figures.trim()
                );
            }
            Err(why) => println!("{why}"),
        }
    }
}

fn handler() -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<()>, Infallible>>,
> + Clone {
    service_fn(|_req: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))))
}

/// One request through `svc`, as a server makes it.
async fn one_request<S>(svc: &mut S)
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    let ready = svc.ready().await.expect("ready");
    let response = ready.call(Request::new(())).await.expect("a response");
    assert_eq!(black_box(response).status(), StatusCode::OK);
}

/// Times `iters` requests through the one `svc` (tower's `RateLimit` is not shared by clones,
/// so each contender is built once and lent to every sample).
fn bench_stack<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    svc: S,
) where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    let slot = Cell::new(Some(svc));
    let slot = &slot;
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(move |iters| {
            let mut svc = slot.take().expect("put back after every sample");
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    one_request(&mut svc).await;
                }
                let took = start.elapsed();
                slot.set(Some(svc));
                took
            }
        });
    });
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let timeout = Duration::from_secs(10);
    let brisk = ServiceBuilder::new()
        .layer(HttpMetricsLayer::new())
        .layer(TimeoutLayer::new(timeout).respond(HttpResponses::new()))
        .layer(RateLimitLayer::new(brisk_limiter("stack"), Global).respond(HttpResponses::new()))
        .service(handler());
    // tower's RateLimit makes its sleep when built: inside the runtime.
    let tower = rt.block_on(async {
        ServiceBuilder::new()
            .timeout(timeout)
            .rate_limit(1_000_000_000, Duration::from_secs(1))
            .service(handler())
    });

    let mut group = c.benchmark_group("guard/stack");
    group.throughput(Throughput::Elements(1));
    bench_stack(&mut group, &rt, "brisk", brisk);
    bench_stack(&mut group, &rt, "tower", tower);
    bench_stack(&mut group, &rt, "bare", handler());
    group.finish();
}

fn main() {
    let (server, rt) = redis_benchmark::server_and_runtime();
    let url = server.url();
    let mut criterion = Criterion::default().configure_from_args();
    ratelimit_check(&mut criterion);
    redis_ratelimit(&mut criterion, &rt, &url);
    stack(&mut criterion);
    criterion.final_summary();
    physical_limit(&rt, &url, server.port().expect("TCP"));
}
