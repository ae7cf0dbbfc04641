//! Early refresh: probabilistic early expiration (`XFetch`, from Vattani, Chierichetti and
//! Lowenstein, *Optimal Probabilistic Cache Stampede Prevention*, VLDB 2015).
//!
//! A read of a value that expires at `expiry` and took `delta` to load refreshes it when
//! `now + delta × beta × −ln(r) ≥ expiry`, `r` uniform in (0, 1]: the nearer the expiry, the
//! slower the load and the more reads, the likelier one read refreshes before the expiry.

use std::time::Duration;

use tokio::time::Instant;

/// Reads further than this many `delta × beta` from the expiry never refresh: the chance there
/// is below e⁻¹⁰ (5 in 100,000) per read, and skipping them keeps the random draw and the
/// logarithm off almost every hit.
const WINDOWS: u32 = 10;

/// When a value's reads start drawing, and the scale of the draw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Early {
    pub(crate) from: Instant,
    pub(crate) expiry: Instant,
    pub(crate) scale: Duration,
}

impl Early {
    /// For a value expiring at `expiry` that took `delta` to load; `None` when it is never
    /// refreshed early (no beta, or a value that took nothing to load).
    pub(crate) fn new(expiry: Instant, delta: Duration, beta: Option<f64>) -> Option<Self> {
        let beta = beta?;
        if delta.is_zero() {
            return None;
        }
        let scale = delta.mul_f64(beta);
        let window = scale.saturating_mul(WINDOWS);
        Some(Self {
            from: expiry.checked_sub(window).unwrap_or(expiry),
            expiry,
            scale,
        })
    }

    /// Whether a read at `now` refreshes.
    pub(crate) fn due(&self, now: Instant) -> bool {
        now >= self.from && due(self.expiry.saturating_duration_since(now), self.scale)
    }
}

/// The draw: whether `scale × −ln(r)` reaches `left`.
pub(crate) fn due(left: Duration, scale: Duration) -> bool {
    let r = 1.0 - fastrand::f64(); // in (0, 1]
    -r.ln() * scale.as_secs_f64() >= left.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_draw_follows_the_exponential() {
        fastrand::seed(7);
        let scale = Duration::from_secs(1);
        let hits = (0..10_000)
            .filter(|_| due(Duration::from_secs(1), scale))
            .count();
        // P(−ln r ≥ 1) = e⁻¹ ≈ 0.368.
        assert!((3_400..4_000).contains(&hits), "{hits}");
        assert!(due(Duration::ZERO, scale), "at the expiry, always");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_to_draw_without_beta_or_load_time() {
        let expiry = Instant::now() + Duration::from_secs(10);
        assert!(Early::new(expiry, Duration::from_secs(1), None).is_none());
        assert!(Early::new(expiry, Duration::ZERO, Some(1.0)).is_none());
        let early = Early::new(expiry, Duration::from_millis(100), Some(1.0)).unwrap();
        assert!(!early.due(Instant::now()), "9 s early: outside the window");
        assert_eq!(early.from, expiry - Duration::from_secs(1));
    }
}
