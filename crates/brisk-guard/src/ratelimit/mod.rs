//! Rate limiting: GCRA quotas per key, in tiers, over a local or a Redis store.
//!
//! ```
//! use brisk_guard::ratelimit::{Global, Quota, RateLimitLayer, RateLimiter};
//! use brisk_guard::{BoxError, Refusal};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let limiter = RateLimiter::builder("api").quota(Quota::per_second(2)).build()?;
//! let mut svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(limiter, Global))
//!     .service_fn(|req: &'static str| async move { Ok::<_, BoxError>(req) });
//!
//! assert_eq!(svc.ready().await?.call("one").await?, "one");
//! assert_eq!(svc.ready().await?.call("two").await?, "two");
//! let refused = svc.ready().await?.call("three").await.unwrap_err();
//! assert!(matches!(refused.downcast_ref::<Refusal>(), Some(Refusal::RateLimited(_))));
//! # Ok(())
//! # }
//! ```
//!
//! # How it decides
//!
//! Each quota is a GCRA (generic cell rate algorithm): a key's capacity refills continuously,
//! one unit every `period / limit`, up to its burst; a request takes one unit or is refused
//! with the exact time until one is back. A tier's quotas are checked in one step: a request
//! counts against all of them or none. Admission happens in `call`, not `poll_ready`, and
//! layers share their limiter, so clones and worker threads never multiply a limit.
//!
//! # Stores
//!
//! - **Local** (the default): sharded maps in this process, bounded by
//!   [`RateLimiterBuilder::max_keys`]. A key whose quota has refilled is the same as a key never
//!   seen, so such keys are forgotten first when room is needed, which changes no decision.
//! - **Redis** (`redis` feature, [`RateLimiterBuilder::redis`]): one `EVALSHA` per check, with
//!   the time passed in; every replica shares one limit. If Redis does not answer within its
//!   timeout (and the deadline in scope), the policy decides: [`OnRedisError::Allow`] (default)
//!   or [`OnRedisError::Refuse`].

mod key;
mod limiter;
mod local;
pub(crate) mod quota;
#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

#[cfg(feature = "http")]
pub use self::key::{ClientIp, Header, PeerFn, Route};
pub use self::key::{DefaultTier, Global, KeyFn, TierFn, Tiers};
pub use self::limiter::{Check, Decision, Outcome, QuotaState, RateLimiter, RateLimiterBuilder};
pub use self::quota::{MAX_QUOTAS, Quota, Tier};
#[cfg(feature = "redis")]
#[doc(hidden)]
pub use self::redis::GCRA_SCRIPT;
#[cfg(feature = "redis")]
pub use self::redis::OnRedisError;
use crate::respond::{Errors, Respond, refuse_once};
use crate::{RateLimited, Refusal};

/// Applies a [`RateLimiter`] to a service, keyed by `K`, in the tiers `T` names.
#[derive(Debug, Clone)]
pub struct RateLimitLayer<K, T = DefaultTier, R = Errors> {
    limiter: RateLimiter,
    key: K,
    tiers: T,
    respond: R,
}

impl<K> RateLimitLayer<K> {
    /// Every request is checked under the key `key` finds, in the default tier; refusals are
    /// errors ([`Errors`]).
    pub fn new(limiter: RateLimiter, key: K) -> Self {
        Self {
            limiter,
            key,
            tiers: DefaultTier,
            respond: Errors,
        }
    }
}

impl<K, T, R> RateLimitLayer<K, T, R> {
    /// Picks each request's tier with an async resolver (a lookup of the API key's plan, say).
    /// The future it returns must own what it needs; `None` or an unknown name is the default
    /// tier.
    pub fn tiers<F>(self, resolver: F) -> RateLimitLayer<K, Tiers<F>, R> {
        RateLimitLayer {
            limiter: self.limiter,
            key: self.key,
            tiers: Tiers(resolver),
            respond: self.respond,
        }
    }

    /// How refusals leave the service: [`Errors`], or [`HttpResponses`](crate::HttpResponses).
    pub fn respond<R2>(self, respond: R2) -> RateLimitLayer<K, T, R2> {
        RateLimitLayer {
            limiter: self.limiter,
            key: self.key,
            tiers: self.tiers,
            respond,
        }
    }
}

impl<S, K: Clone, T: Clone, R: Clone> Layer<S> for RateLimitLayer<K, T, R> {
    type Service = RateLimit<S, K, T, R>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            key: self.key.clone(),
            tiers: self.tiers.clone(),
            respond: self.respond.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S, K, T = DefaultTier, R = Errors> {
    inner: S,
    limiter: RateLimiter,
    key: K,
    tiers: T,
    respond: R,
}

impl<S, K, T, R> RateLimit<S, K, T, R> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, K, T, R> Service<Req> for RateLimit<S, K, T, R>
where
    S: Service<Req> + Clone,
    K: KeyFn<Req>,
    T: TierFn<Req>,
    R: Respond<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = R::Error;
    type Future = ResponseFuture<S, Req, T::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| self.respond.error(error))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = self.key.key(&req).unwrap_or_else(|| key::NO_KEY.to_owned());
        let state = match self.tiers.tier(&req) {
            Some(tier) => State::Resolving {
                tier,
                key,
                req: Some(req),
                inner: Some(self.take_ready()),
            },
            // The local store decides at once: no clone of the service, no await.
            None => match self.limiter.check_now(&key) {
                Some(decision) => self.admit(decision, req),
                None => State::Checking {
                    check: self.limiter.check(&key),
                    req: Some(req),
                    inner: Some(self.take_ready()),
                },
            },
        };
        // The limiter travels with the future only when the future uses it: an Arc shared by
        // every request is a contended counter on a busy multi-core service.
        let uses_limiter = !matches!(state, State::Calling { .. } | State::Refused { .. })
            || self.respond.annotates();
        ResponseFuture {
            state,
            limiter: uses_limiter.then(|| self.limiter.clone()),
            respond: self.respond.clone(),
        }
    }
}

impl<S, K, T, R> RateLimit<S, K, T, R> {
    /// The service `poll_ready` readied, leaving a clone in its place (tower's rule for a call
    /// that awaits before it reaches the inner service).
    fn take_ready(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }

    fn admit<Req, F>(&mut self, decision: Decision, req: Req) -> State<S, Req, F>
    where
        S: Service<Req>,
    {
        if decision.is_allowed() {
            State::Calling {
                future: self.inner.call(req),
                decision: Some(decision),
            }
        } else {
            State::Refused {
                refusal: Some(refusal(&self.limiter, decision)),
            }
        }
    }
}

fn refusal(limiter: &RateLimiter, decision: Decision) -> Refusal {
    Refusal::RateLimited(RateLimited {
        decision,
        limiter: limiter.clone(),
    })
}

pin_project! {
    /// The response future of [`RateLimit`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S: Service<Req>, Req, F, R> {
        #[pin]
        state: State<S, Req, F>,
        // Set when a state needs it (resolving, checking, or headers on admitted responses).
        limiter: Option<RateLimiter>,
        respond: R,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req, F> {
        Resolving {
            #[pin]
            tier: F,
            key: String,
            req: Option<Req>,
            inner: Option<S>,
        },
        Checking {
            check: Check,
            req: Option<Req>,
            inner: Option<S>,
        },
        Calling {
            #[pin]
            future: S::Future,
            decision: Option<Decision>,
        },
        Refused {
            refusal: Option<Refusal>,
        },
    }
}

impl<S, Req, F, N, R> Future for ResponseFuture<S, Req, F, R>
where
    S: Service<Req>,
    F: Future<Output = Option<N>>,
    N: AsRef<str>,
    R: Respond<S::Response, S::Error>,
{
    type Output = Result<S::Response, R::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Resolving {
                    tier,
                    key,
                    req,
                    inner,
                } => {
                    let name = std::task::ready!(tier.poll(cx));
                    let limiter = this.limiter.as_ref().expect("set for a resolving future");
                    let index = match &name {
                        Some(name) => limiter.tier_index(name.as_ref()),
                        None => limiter.default_index(),
                    };
                    let check = limiter.check_in(index, key);
                    let (req, inner) = (req.take(), inner.take());
                    this.state.set(State::Checking { check, req, inner });
                }
                StateProj::Checking { check, req, inner } => {
                    let decision = std::task::ready!(Pin::new(check).poll(cx));
                    let next = match (req.take(), inner.take()) {
                        (Some(req), Some(mut inner)) if decision.is_allowed() => State::Calling {
                            future: inner.call(req),
                            decision: Some(decision),
                        },
                        _ => State::Refused {
                            refusal: Some(refusal(
                                this.limiter.as_ref().expect("set for a checking future"),
                                decision,
                            )),
                        },
                    };
                    this.state.set(next);
                }
                StateProj::Calling { future, decision } => {
                    return Poll::Ready(match std::task::ready!(future.poll(cx)) {
                        Ok(mut response) => {
                            if let (Some(decision), Some(limiter)) = (decision.take(), this.limiter)
                            {
                                this.respond.admitted(&mut response, limiter, &decision);
                            }
                            Ok(response)
                        }
                        Err(error) => Err(this.respond.error(error)),
                    });
                }
                StateProj::Refused { refusal } => {
                    return Poll::Ready(refuse_once(this.respond, refusal));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req, F, R> fmt::Debug for ResponseFuture<S, Req, F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
