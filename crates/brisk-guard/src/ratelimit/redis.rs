//! The Redis store: one Lua script per check, so every replica enforces one shared limit.
//!
//! The script is given the time (Unix microseconds, this process's clock) rather than reading
//! Redis's `TIME`, so it runs on managed Redis that forbids `TIME` in scripts, and the math of a
//! decision lives once, in Rust: the script returns the stored times, and [`Rule::step`]
//! recomputes the same decision from them. Every key of one check carries one hash tag
//! (`brisk:rl:{limiter:tier:key}:0`), so a check is one slot and runs on a cluster.

use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use brisk_core::deadline;
use brisk_pool::redis_source::RedisSource;
use foldhash::fast::FixedState;

use super::limiter::{Decision, Policy, RateLimiterBuilder};
use super::quota::{MAX_QUOTAS, Step};
use crate::BuildError;

/// What a check does when Redis cannot answer in time.
///
/// A check that gave up had already sent its script: a Redis that was slow or paused, not down,
/// may still run it later and count that request (the script is given no server time, so it
/// cannot tell it is late). Each such check counts at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnRedisError {
    /// Let the request through (the default): a limiter is a protection, and Redis being down
    /// should not take the service down with it.
    #[default]
    Allow,
    /// Refuse the request, with a `Retry-After` of one second.
    Refuse,
}

const SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local n = #KEYS
local stored = {}
local allowed = 1
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i])) or 0
  stored[i] = tat
  local start = math.max(tat, now)
  if start + tonumber(ARGV[2 * i]) - now > tonumber(ARGV[2 * i + 1]) then allowed = 0 end
end
if allowed == 1 then
  for i = 1, n do
    local next = math.max(stored[i], now) + tonumber(ARGV[2 * i])
    redis.call('SET', KEYS[i], string.format('%.0f', next), 'PX', math.floor((next - now) / 1000) + 1)
  end
end
stored[n + 1] = allowed
return stored
";

/// The Lua source of the check [`RateLimiterBuilder::redis`] runs (`KEYS`: one per quota, `ARGV`:
/// now in Unix microseconds, then each quota's interval and capacity): for benchmarks that run
/// the same script with `redis-benchmark`. Not a stable interface.
#[doc(hidden)]
pub const GCRA_SCRIPT: &str = SCRIPT;

static GCRA: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SCRIPT));

/// Keys longer than this are hashed (128 bits), so a huge header cannot become a huge key.
const MAX_KEY_LEN: usize = 128;

type Run = dyn Fn(
        redis::ScriptInvocation<'static>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<i64>, String>> + Send>>
    + Send
    + Sync;

pub(crate) struct RemoteConfig {
    run: Arc<Run>,
    timeout: Duration,
    on_error: OnRedisError,
}

pub(crate) struct Remote {
    run: Arc<Run>,
    timeout: Duration,
    on_error: OnRedisError,
}

/// Why a check got no answer from Redis.
pub(crate) struct Failure {
    on_error: OnRedisError,
}

impl Failure {
    pub(crate) fn decision(&self, tier: usize) -> Decision {
        Decision::failure(
            tier,
            self.on_error == OnRedisError::Allow,
            Duration::from_secs(1),
        )
    }
}

impl RemoteConfig {
    pub(crate) fn build(self) -> Result<Remote, BuildError> {
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(BuildError::setting(
                "redis_timeout",
                format!("{:?} is outside 1 µs ..= 60 s", self.timeout),
            ));
        }
        Ok(Remote {
            run: self.run,
            timeout: self.timeout,
            on_error: self.on_error,
        })
    }
}

impl RateLimiterBuilder {
    /// Keeps the state in Redis, through any [`RedisSource`] (a `Multiplexed` connection, a
    /// pool, a cluster connection): every replica that uses the same Redis and limiter name
    /// shares one limit. One round trip (`EVALSHA`) per check.
    pub fn redis<S: RedisSource>(self, source: S) -> Self {
        self.redis_with(source, Duration::from_millis(50), OnRedisError::Allow)
    }

    /// [`redis`](Self::redis), with how long a check may wait for Redis (default 50 ms, and
    /// never past the deadline in scope) and what it does when Redis does not answer.
    pub fn redis_with<S: RedisSource>(
        self,
        source: S,
        timeout: Duration,
        on_error: OnRedisError,
    ) -> Self {
        let source = Arc::new(source);
        let run: Arc<Run> = Arc::new(move |invocation: redis::ScriptInvocation<'static>| {
            let source = source.clone();
            Box::pin(async move {
                let mut conn = source.connection().await.map_err(|e| e.to_string())?;
                invocation
                    .invoke_async::<Vec<i64>>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        self.remote(RemoteConfig {
            run,
            timeout,
            on_error,
        })
    }
}

impl Remote {
    pub(crate) fn check(
        &self,
        limiter: &str,
        policy: &Policy,
        key: &str,
    ) -> impl Future<Output = Result<([Step; MAX_QUOTAS], bool), Failure>> + Send + 'static {
        let rules = policy.rules.clone();
        let now = unix_micros();
        let tag = format!("brisk:rl:{{{limiter}:{}:{}}}", policy.name, safe_key(key));
        let mut invocation = GCRA.prepare_invoke();
        invocation.arg(now);
        for (i, rule) in rules.iter().enumerate() {
            invocation.key(format!("{tag}:{i}"));
            invocation.arg(rule.interval).arg(rule.capacity);
        }
        let run = (self.run)(invocation);
        let timeout = self.timeout;
        let on_error = self.on_error;
        async move {
            let failed = |why: String| {
                tracing::debug!(%why, "rate limit check: Redis did not answer");
                Failure { on_error }
            };
            let reply = match deadline::bounded(timeout, run).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(why)) => return Err(failed(why)),
                Err(elapsed) => return Err(failed(elapsed.to_string())),
            };
            if reply.len() != rules.len() + 1 {
                return Err(failed(format!("unexpected reply {reply:?}")));
            }
            let mut steps = [Step::default(); MAX_QUOTAS];
            for ((step, rule), stored) in steps.iter_mut().zip(&rules).zip(&reply) {
                *step = rule.step(u64::try_from(*stored).unwrap_or(0), now);
            }
            Ok((steps, reply[rules.len()] == 1))
        }
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The key as it goes into Redis: as it is if short and visible ASCII, else a 128-bit hash
/// under fixed seeds (every process must name a key alike).
fn safe_key(key: &str) -> std::borrow::Cow<'_, str> {
    if key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic() && b != b'}') {
        return key.into();
    }
    let a = FixedState::with_seed(0x6272_6973_6b5f_726c).hash_one(key);
    let b = FixedState::with_seed(0x726c_5f6b_7369_7262).hash_one(key);
    format!("#{a:016x}{b:016x}").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_or_odd_keys_are_hashed_alike_everywhere() {
        assert_eq!(safe_key("user:42"), "user:42");
        let long = "x".repeat(1_000);
        assert_eq!(safe_key(&long).len(), 33);
        assert_eq!(safe_key(&long), safe_key(&long));
        assert_ne!(safe_key("a b"), "a b");
        assert_ne!(safe_key("a}b"), "a}b");
    }
}
