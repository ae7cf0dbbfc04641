//! Refusals as HTTP responses, and the rate-limit headers (`http` feature).
//!
//! A rate-limited request gets `429 Too Many Requests` with `Retry-After` (whole seconds,
//! rounded up) and the two fields of the IETF draft "`RateLimit` header fields for HTTP"
//! (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy` lists every quota of the tier
//! (`"api-100-per-60s";q=100;w=60`) and `RateLimit` gives each one's state
//! (`"api-100-per-60s";r=0;t=1`): `r` the units left, `t` the seconds until the quota is full
//! again. Both come from one decision, so they agree with each other and with `Retry-After`:
//! on a 429 the quota that refused has `r=0`. A timed-out request gets `504 Gateway Timeout`
//! (or the status you choose) and a shed one `503 Service Unavailable`. Bodies are empty.

use std::fmt::Write as _;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::Refusal;
use crate::ratelimit::{Decision, RateLimiter};
use crate::respond::Respond;

/// The `RateLimit-Policy` header.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` header.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Refusals as HTTP responses; the service keeps its own error type.
///
/// ```
/// use http::StatusCode;
/// use brisk_guard::HttpResponses;
///
/// let responses = HttpResponses::new().timeout_status(StatusCode::SERVICE_UNAVAILABLE);
/// # let _ = responses;
/// ```
#[derive(Debug, Clone)]
pub struct HttpResponses {
    timeout_status: StatusCode,
    headers_when_admitted: bool,
}

impl Default for HttpResponses {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpResponses {
    /// 429, 504 and 503; no rate-limit headers on admitted responses.
    #[must_use]
    pub fn new() -> Self {
        Self {
            timeout_status: StatusCode::GATEWAY_TIMEOUT,
            headers_when_admitted: false,
        }
    }

    /// The status of a timed-out request (default 504).
    #[must_use]
    pub fn timeout_status(mut self, status: StatusCode) -> Self {
        self.timeout_status = status;
        self
    }

    /// Also send `RateLimit-Policy` and `RateLimit` on admitted responses, so clients can slow
    /// down before they are refused (default: only on 429s). Never in shadow mode.
    #[must_use]
    pub fn headers_when_admitted(mut self, yes: bool) -> Self {
        self.headers_when_admitted = yes;
        self
    }
}

impl<B: Default, E> Respond<Response<B>, E> for HttpResponses
where
    B: Send + 'static,
    E: 'static,
{
    type Error = E;

    fn refuse(&self, refusal: Refusal) -> Result<Response<B>, E> {
        let mut response = Response::new(B::default());
        match &refusal {
            Refusal::RateLimited(limited) => {
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                let retry = limited.retry_after();
                let secs = retry.as_secs() + u64::from(retry.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
                let decision = limited.decision();
                if !decision.failed() {
                    insert_fields(
                        response.headers_mut(),
                        limited.limiter.fields(decision.tier()),
                        decision,
                    );
                }
            }
            Refusal::TimedOut(_) => *response.status_mut() = self.timeout_status,
            Refusal::Overloaded(_) => *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE,
        }
        Ok(response)
    }

    fn error(&self, error: E) -> E {
        error
    }

    fn annotates(&self) -> bool {
        self.headers_when_admitted
    }

    fn admitted(&self, response: &mut Response<B>, limiter: &RateLimiter, decision: &Decision) {
        if self.headers_when_admitted
            && !limiter.is_shadow()
            && decision.outcome() == crate::ratelimit::Outcome::Allowed
        {
            insert_fields(
                response.headers_mut(),
                limiter.fields(decision.tier()),
                decision,
            );
        }
    }
}

/// The quota names and sizes of a tier, as `RateLimit-Policy` and as the item names of
/// `RateLimit`, rendered once per tier.
#[derive(Debug)]
pub(crate) struct PolicyFields {
    pub(crate) policy: HeaderValue,
    names: Vec<String>,
}

impl PolicyFields {
    pub(crate) fn new(rules: &[crate::ratelimit::quota::Rule]) -> Self {
        let mut policy = String::new();
        let mut names = Vec::with_capacity(rules.len());
        for rule in rules {
            if !policy.is_empty() {
                policy.push_str(", ");
            }
            let _ = write!(
                policy,
                "\"{}\";q={};w={}",
                rule.name, rule.limit, rule.window
            );
            names.push(format!("\"{}\"", rule.name));
        }
        Self {
            // Names are checked to be visible ASCII without quotes at build.
            policy: HeaderValue::from_str(&policy).expect("quota names are visible ASCII"),
            names,
        }
    }
}

fn insert_fields(headers: &mut http::HeaderMap, fields: &PolicyFields, decision: &Decision) {
    let mut state = String::new();
    for (name, quota) in fields.names.iter().zip(decision.quotas()) {
        if !state.is_empty() {
            state.push_str(", ");
        }
        let reset = quota.reset();
        let secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        let _ = write!(state, "{name};r={};t={secs}", quota.remaining());
    }
    headers.insert(RATELIMIT_POLICY.clone(), fields.policy.clone());
    if let Ok(value) = HeaderValue::from_str(&state)
        && !state.is_empty()
    {
        headers.insert(RATELIMIT.clone(), value);
    }
}
