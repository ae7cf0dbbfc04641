//! An AIMD concurrency limit driven by latency.

use std::time::Duration;

use crate::BuildError;

/// An adaptive concurrency limit: additive increase, multiplicative decrease, on latency.
///
/// Latency is judged per *window* of completed requests (as many as the limit, at least 10):
/// its mean against a baseline, the lowest window mean seen. A window above
/// `tolerance × baseline` is a sign of queueing; below it, and with the limit in use, the limit
/// grows by one. Ten slow windows in a row, through the cuts, mean the service itself became
/// slower (cutting did not help): that latency becomes the baseline.
///
/// Gradient limits are known to collapse to their minimum under a short latency spike: each
/// sample of the spike cuts the limit again. Here a cut needs **two windows in a row** above the
/// tolerance, and then takes `backoff` of the limit once per window (never below `min`): a
/// spike shorter than two windows changes nothing, and a longer one costs 10% a window, not
/// a collapse. Tests under paused time show both: the limit settles near the knee of a service
/// whose latency grows past it, and a spike of five times the latency leaves it above half.
///
/// **Start it low** (the default initial limit is `min`): the baseline is learned from what the
/// service shows, so a limit that starts far above the knee, with the service already queueing,
/// learns a baseline that is too high and settles too high.
///
/// ```
/// use brisk_guard::shed::AdaptiveLimit;
///
/// let adaptive = AdaptiveLimit::new(4, 256).initial(32).tolerance(1.5);
/// # let _ = adaptive;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveLimit {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) initial: Option<usize>,
    pub(crate) tolerance: f64,
    pub(crate) backoff: f64,
}

impl AdaptiveLimit {
    /// A limit that moves between `min` and `max` (starting at `min`), with a tolerance of 1.5
    /// and a backoff of 0.9.
    #[must_use]
    pub fn new(min: usize, max: usize) -> Self {
        Self {
            min,
            max,
            initial: None,
            tolerance: 1.5,
            backoff: 0.9,
        }
    }

    /// Where the limit starts (default: `min`).
    #[must_use]
    pub fn initial(mut self, initial: usize) -> Self {
        self.initial = Some(initial);
        self
    }

    /// How far a window's mean latency may rise above the baseline before the limit is cut
    /// (a factor, above 1; default 1.5).
    #[must_use]
    pub fn tolerance(mut self, factor: f64) -> Self {
        self.tolerance = factor;
        self
    }

    /// What a cut keeps of the limit (between 0 and 1; default 0.9).
    #[must_use]
    pub fn backoff(mut self, factor: f64) -> Self {
        self.backoff = factor;
        self
    }

    pub(crate) fn validate(&self) -> Result<usize, BuildError> {
        let initial = self.initial.unwrap_or(self.min);
        if self.min == 0 || self.min > self.max || !(self.min..=self.max).contains(&initial) {
            return Err(BuildError::setting(
                "adaptive limit",
                format!(
                    "needs 1 ≤ min ≤ initial ≤ max; got min {}, initial {initial}, max {}",
                    self.min, self.max
                ),
            ));
        }
        if !(self.tolerance > 1.0 && self.tolerance.is_finite()) {
            return Err(BuildError::setting(
                "adaptive tolerance",
                format!("{} must be a finite factor above 1", self.tolerance),
            ));
        }
        if !(self.backoff > 0.0 && self.backoff < 1.0) {
            return Err(BuildError::setting(
                "adaptive backoff",
                format!("{} must be between 0 and 1", self.backoff),
            ));
        }
        Ok(initial)
    }
}

/// Slow windows in a row after which their latency is taken as the new baseline.
const RELEARN_AFTER: u32 = 10;

/// The moving state; the layer holds it under a lock taken once per completed request.
#[derive(Debug)]
pub(crate) struct Aimd {
    config: AdaptiveLimit,
    limit: usize,
    baseline: Option<f64>,
    sum: f64,
    samples: usize,
    busiest: usize,
    high_windows: u32,
}

impl Aimd {
    pub(crate) fn new(config: AdaptiveLimit, initial: usize) -> Self {
        Self {
            config,
            limit: initial,
            baseline: None,
            sum: 0.0,
            samples: 0,
            busiest: 0,
            high_windows: 0,
        }
    }

    /// Records one completed request that took `latency` with `in_flight` requests running
    /// (itself included); returns the new limit when it changes.
    pub(crate) fn record(&mut self, latency: Duration, in_flight: usize) -> Option<usize> {
        self.sum += latency.as_secs_f64();
        self.samples += 1;
        self.busiest = self.busiest.max(in_flight);
        if self.samples < self.limit.max(10) {
            return None;
        }
        let mean = self.sum / self.samples as f64;
        let busiest = self.busiest;
        self.sum = 0.0;
        self.samples = 0;
        self.busiest = 0;
        let baseline = self.baseline.map_or(mean, |b| b.min(mean));
        self.baseline = Some(baseline);
        let before = self.limit;
        if mean > baseline * self.config.tolerance {
            self.high_windows += 1;
            if self.high_windows >= RELEARN_AFTER {
                self.baseline = Some(mean);
                self.high_windows = 0;
            } else if self.high_windows >= 2 {
                // Below the limit (backoff < 1), so the cast cannot truncate.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let cut = (self.limit as f64 * self.config.backoff).floor() as usize;
                self.limit = cut.min(self.limit - 1).max(self.config.min);
            }
        } else {
            self.high_windows = 0;
            // Grow only a limit that was reached: an idle service teaches nothing about its knee.
            if busiest * 10 >= self.limit * 9 {
                self.limit = (self.limit + 1).min(self.config.max);
            }
        }
        (self.limit != before).then_some(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            AdaptiveLimit::new(0, 10),
            AdaptiveLimit::new(10, 5),
            AdaptiveLimit::new(1, 10).initial(11),
            AdaptiveLimit::new(1, 10).tolerance(1.0),
            AdaptiveLimit::new(1, 10).tolerance(f64::NAN),
            AdaptiveLimit::new(1, 10).backoff(1.0),
            AdaptiveLimit::new(1, 10).backoff(0.0),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_slow_window_cuts_nothing_two_cut_once() {
        let config = AdaptiveLimit::new(1, 100).initial(20);
        let mut aimd = Aimd::new(config, 20);
        let ms = Duration::from_millis;
        let window = |aimd: &mut Aimd, latency| {
            let mut last = None;
            for _ in 0..aimd.limit.max(10) {
                last = aimd.record(latency, 20).or(last);
            }
            last
        };
        assert_eq!(window(&mut aimd, ms(10)), Some(21));
        assert_eq!(
            window(&mut aimd, ms(100)),
            None,
            "one slow window is a spike"
        );
        assert_eq!(
            window(&mut aimd, ms(100)),
            Some(18),
            "two are a trend: 21 × 0.9"
        );
    }
}
