//! Budgets a caller sends in a header (`http` feature).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Request};

use super::BudgetFn;

/// Where a caller's time budget is read from: the first of these headers that is present.
///
/// ```
/// use brisk_guard::timeout::BudgetHeader;
///
/// // gRPC's own header (`grpc-timeout: 250m`), else a plain count of milliseconds.
/// let budget = BudgetHeader::grpc_timeout().or_millis("x-request-timeout-ms");
/// # let _ = budget;
/// ```
///
/// A value that does not parse is ignored (and counted in `brisk_budget_headers_total` as
/// `malformed`): a caller's typo never fails its request.
#[derive(Debug, Clone)]
pub struct BudgetHeader {
    headers: Arc<[(HeaderName, Format)]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Grpc,
    Millis,
}

impl BudgetHeader {
    /// `grpc-timeout`: up to 8 digits and a unit, `H`, `M`, `S`, `m`, `u` or `n`.
    #[must_use]
    pub fn grpc_timeout() -> Self {
        Self::one(HeaderName::from_static("grpc-timeout"), Format::Grpc)
    }

    /// A header of whole milliseconds (`x-request-timeout-ms: 250`).
    ///
    /// # Panics
    /// If `name` is not a valid header name (it is a constant in your code).
    #[must_use]
    pub fn millis(name: &'static str) -> Self {
        Self::one(HeaderName::from_static(name), Format::Millis)
    }

    /// Also `grpc-timeout`, when the headers before it are absent.
    #[must_use]
    pub fn or_grpc_timeout(self) -> Self {
        self.and(HeaderName::from_static("grpc-timeout"), Format::Grpc)
    }

    /// Also a header of milliseconds, when the headers before it are absent.
    ///
    /// # Panics
    /// If `name` is not a valid header name.
    #[must_use]
    pub fn or_millis(self, name: &'static str) -> Self {
        self.and(HeaderName::from_static(name), Format::Millis)
    }

    fn one(name: HeaderName, format: Format) -> Self {
        Self {
            headers: Arc::new([(name, format)]),
        }
    }

    fn and(self, name: HeaderName, format: Format) -> Self {
        let mut headers = self.headers.to_vec();
        headers.push((name, format));
        Self {
            headers: headers.into(),
        }
    }
}

impl<B> BudgetFn<Request<B>> for BudgetHeader {
    fn budget(&self, request: &Request<B>) -> Option<Result<Duration, ()>> {
        self.headers.iter().find_map(|(name, format)| {
            let value = request.headers().get(name)?;
            let parsed = value.to_str().ok().and_then(|v| match format {
                Format::Grpc => parse_grpc_timeout(v),
                Format::Millis => parse_millis(v),
            });
            Some(parsed.ok_or(()))
        })
    }
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    let digits = value.get(..value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match value.as_bytes()[value.len() - 1] {
        b'H' => Duration::from_secs(n * 3_600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

fn parse_millis(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7_200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "-5m", "5x", "5", "1.5S", "５m", "m5"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn millis_are_digits_only() {
        assert_eq!(parse_millis(" 250 "), Some(Duration::from_millis(250)));
        for bad in ["", "-1", "1e3", "250ms", "9999999999999"] {
            assert_eq!(parse_millis(bad), None, "{bad:?}");
        }
    }
}
