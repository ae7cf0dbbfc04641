//! What a request is counted as: its key, and the tier whose quotas apply.

use std::future::Future;

/// The key a request's quota is counted under.
///
/// Any `Fn(&Req) -> Option<String>` is one; `None` (no key could be found, say a missing
/// header) counts the request under one shared key for all such requests, so a request cannot
/// escape its limit by leaving the key out. With `http`: [`ClientIp`], [`Header`] and
/// [`Route`]; a pair `(a, b)` counts under both parts together (per client *and* route).
pub trait KeyFn<Req>: Clone + Send + Sync + 'static {
    /// The request's key, if it has one.
    fn key(&self, request: &Req) -> Option<String>;
}

impl<Req, F> KeyFn<Req> for F
where
    F: Fn(&Req) -> Option<String> + Clone + Send + Sync + 'static,
{
    fn key(&self, request: &Req) -> Option<String> {
        self(request)
    }
}

impl<Req, A: KeyFn<Req>, B: KeyFn<Req>> KeyFn<Req> for (A, B) {
    fn key(&self, request: &Req) -> Option<String> {
        // The first part's length goes first, so no two pairs of parts give one key.
        let first = self.0.key(request)?;
        Some(format!("{}:{first}{}", first.len(), self.1.key(request)?))
    }
}

/// One key for every request: a limit on the whole service.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl<Req> KeyFn<Req> for Global {
    fn key(&self, _: &Req) -> Option<String> {
        Some(String::new())
    }
}

/// The key of requests that have none (a NUL cannot come from a header or an address).
pub(crate) const NO_KEY: &str = "\0no-key";

/// Which tier a request is checked in. Made by
/// [`RateLimitLayer::tiers`](super::RateLimitLayer::tiers) from an async closure; the default,
/// [`DefaultTier`], checks every request in the limiter's default tier without awaiting.
pub trait TierFn<Req>: Clone + Send + Sync + 'static + sealed::Sealed {
    #[doc(hidden)]
    type Future: Future<Output = Option<Self::Name>> + Send + 'static;
    #[doc(hidden)]
    type Name: AsRef<str>;
    #[doc(hidden)]
    fn tier(&self, request: &Req) -> Option<Self::Future>;
}

mod sealed {
    pub trait Sealed {}
}

/// Every request in the limiter's default tier.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultTier;

impl sealed::Sealed for DefaultTier {}

impl<Req> TierFn<Req> for DefaultTier {
    type Future = std::future::Pending<Option<&'static str>>;
    type Name = &'static str;

    fn tier(&self, _: &Req) -> Option<Self::Future> {
        None
    }
}

/// Tiers from an async resolver: `Fn(&Req) -> impl Future<Output = Option<impl AsRef<str>>>`.
/// The future must own what it needs (take the header out of the request first); `None` or an
/// unknown tier name is the default tier.
#[derive(Debug, Clone)]
pub struct Tiers<F>(pub(crate) F);

impl<F> sealed::Sealed for Tiers<F> {}

impl<Req, F, Fut, N> TierFn<Req> for Tiers<F>
where
    F: Fn(&Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<N>> + Send + 'static,
    N: AsRef<str>,
{
    type Future = Fut;
    type Name = N;

    fn tier(&self, request: &Req) -> Option<Fut> {
        Some((self.0)(request))
    }
}

#[cfg(feature = "http")]
pub use self::http_keys::{ClientIp, Header, PeerFn, Route};

#[cfg(feature = "http")]
mod http_keys {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};
    use std::sync::Arc;

    use http::{Extensions, HeaderName, Request};

    use super::KeyFn;
    use crate::BuildError;

    /// Finds the peer address of a connection among a request's extensions.
    pub type PeerFn = fn(&Extensions) -> Option<IpAddr>;

    /// The client's IP address: the peer of the connection, or, when that peer is one of your
    /// trusted proxies, the right-most address in the forwarded header that is not a trusted
    /// proxy. A client can put anything at the left of `X-Forwarded-For`; only what your own
    /// proxies appended can be believed, so the left part is never read past an untrusted hop.
    ///
    /// IPv6 clients are keyed by their /64 prefix (what one subscriber is usually given), so
    /// rotating through its own addresses does not give a client more quota.
    ///
    /// ```
    /// use brisk_guard::ratelimit::ClientIp;
    ///
    /// # fn main() -> Result<(), brisk_guard::BuildError> {
    /// // Behind a load balancer in 10.0.0.0/8 that appends to X-Forwarded-For. Under axum, the
    /// // peer is `ConnectInfo<SocketAddr>` (serve with `into_make_service_with_connect_info`).
    /// let key = ClientIp::behind(["10.0.0.0/8"])?
    ///     .peer_from(|ext| ext.get::<std::net::SocketAddr>().map(|addr| addr.ip()));
    /// # let _ = key;
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Debug, Clone)]
    pub struct ClientIp {
        trusted: Arc<[Cidr]>,
        header: HeaderName,
        peer: PeerFn,
        ipv6_prefix: u8,
    }

    fn socket_addr(extensions: &Extensions) -> Option<IpAddr> {
        extensions
            .get::<SocketAddr>()
            .map(SocketAddr::ip)
            .or_else(|| extensions.get::<IpAddr>().copied())
    }

    impl ClientIp {
        /// The peer address only (no proxy in front of the service). The peer is read from a
        /// `SocketAddr` or `IpAddr` extension unless [`peer_from`](Self::peer_from) says where.
        #[must_use]
        pub fn peer() -> Self {
            Self {
                trusted: Arc::new([]),
                header: HeaderName::from_static("x-forwarded-for"),
                peer: socket_addr,
                ipv6_prefix: 64,
            }
        }

        /// Behind the proxies in `trusted` (addresses or CIDR ranges, `"10.0.0.0/8"`,
        /// `"2001:db8::/32"`, `"127.0.0.1"`), which append the address they saw to
        /// `X-Forwarded-For`.
        ///
        /// # Errors
        /// [`BuildError::Setting`] for an entry that is not an address or range.
        pub fn behind<'a>(trusted: impl IntoIterator<Item = &'a str>) -> Result<Self, BuildError> {
            let trusted = trusted
                .into_iter()
                .map(Cidr::parse)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Self {
                trusted: trusted.into(),
                ..Self::peer()
            })
        }

        /// The header your proxies append to (default `x-forwarded-for`); it must hold a
        /// comma-separated list of addresses, as `X-Forwarded-For` and `X-Real-IP` do.
        #[must_use]
        pub fn header(mut self, header: HeaderName) -> Self {
            self.header = header;
            self
        }

        /// Where the peer address is among the request's extensions.
        #[must_use]
        pub fn peer_from(mut self, peer: PeerFn) -> Self {
            self.peer = peer;
            self
        }

        /// The prefix IPv6 clients are keyed by (default 64; 128 keys every address apart).
        #[must_use]
        pub fn ipv6_prefix(mut self, bits: u8) -> Self {
            self.ipv6_prefix = bits.min(128);
            self
        }

        fn trusted(&self, ip: IpAddr) -> bool {
            self.trusted.iter().any(|cidr| cidr.contains(ip))
        }

        /// The client address of a request with peer `peer` and the given forwarded values.
        pub(crate) fn client<'a>(
            &self,
            peer: IpAddr,
            forwarded: impl DoubleEndedIterator<Item = &'a str>,
        ) -> IpAddr {
            let mut client = peer.to_canonical();
            if !self.trusted(client) {
                return client;
            }
            for hop in forwarded.rev() {
                // An entry that does not parse cannot be believed, and neither can anything
                // left of it: the client is the last hop a trusted proxy vouched for.
                let Some(ip) = parse_hop(hop) else {
                    return client;
                };
                client = ip;
                if !self.trusted(ip) {
                    return ip;
                }
            }
            client
        }

        fn render(&self, ip: IpAddr) -> String {
            match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => {
                    let bits = u128::from(v6);
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(self.ipv6_prefix))
                        .unwrap_or(0);
                    format!("{}/{}", Ipv6Addr::from(bits & mask), self.ipv6_prefix)
                }
            }
        }
    }

    impl<B> KeyFn<Request<B>> for ClientIp {
        fn key(&self, request: &Request<B>) -> Option<String> {
            let peer = (self.peer)(request.extensions())?;
            let values: Vec<&str> = request
                .headers()
                .get_all(&self.header)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .collect();
            Some(self.render(self.client(peer, values.into_iter())))
        }
    }

    fn parse_hop(hop: &str) -> Option<IpAddr> {
        let hop = hop.trim();
        hop.parse::<IpAddr>()
            .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
            .ok()
            .map(|ip| ip.to_canonical())
    }

    /// An address range.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Cidr {
        addr: IpAddr,
        prefix: u8,
    }

    impl Cidr {
        pub(crate) fn parse(text: &str) -> Result<Self, BuildError> {
            let refuse = || {
                BuildError::setting(
                    "trusted proxy",
                    format!("{text:?} is not an address or a range like 10.0.0.0/8"),
                )
            };
            let (addr, prefix) = match text.trim().split_once('/') {
                Some((addr, prefix)) => (addr, Some(prefix)),
                None => (text.trim(), None),
            };
            let addr = addr.parse::<IpAddr>().map_err(|_| refuse())?.to_canonical();
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(refuse)?,
            };
            Ok(Self { addr, prefix })
        }

        pub(crate) fn contains(&self, ip: IpAddr) -> bool {
            match (self.addr, ip.to_canonical()) {
                (IpAddr::V4(net), IpAddr::V4(ip)) => {
                    let mask = u32::MAX
                        .checked_shl(32 - u32::from(self.prefix))
                        .unwrap_or(0);
                    u32::from(net) & mask == u32::from(ip) & mask
                }
                (IpAddr::V6(net), IpAddr::V6(ip)) => {
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(self.prefix))
                        .unwrap_or(0);
                    u128::from(net) & mask == u128::from(ip) & mask
                }
                _ => false,
            }
        }
    }

    /// A header's value (an API key, a user id set by your authentication layer). A missing
    /// value, or one that is not visible ASCII, is no key.
    #[derive(Debug, Clone)]
    pub struct Header(HeaderName);

    impl Header {
        /// The value of header `name`.
        #[must_use]
        pub fn new(name: HeaderName) -> Self {
            Self(name)
        }
    }

    impl<B> KeyFn<Request<B>> for Header {
        fn key(&self, request: &Request<B>) -> Option<String> {
            let value = request.headers().get(&self.0)?.to_str().ok()?;
            (!value.is_empty()).then(|| value.to_owned())
        }
    }

    /// The matched route template (`/users/{id}`), read from the request's extensions the way
    /// the HTTP metrics layer reads it; under axum, `Route::using(|ext|
    /// ext.get::<MatchedPath>().map(MatchedPath::as_str))`. No template is no key.
    #[derive(Debug, Clone, Copy)]
    pub struct Route(brisk_metrics::http::RouteFn);

    impl Route {
        /// The template from brisk's [`RouteTemplate`](brisk_metrics::http::RouteTemplate).
        #[must_use]
        pub fn template() -> Self {
            Self(|ext| {
                ext.get::<brisk_metrics::http::RouteTemplate>()
                    .map(brisk_metrics::http::RouteTemplate::as_str)
            })
        }

        /// The template from wherever `route` finds it.
        #[must_use]
        pub fn using(route: brisk_metrics::http::RouteFn) -> Self {
            Self(route)
        }
    }

    impl<B> KeyFn<Request<B>> for Route {
        fn key(&self, request: &Request<B>) -> Option<String> {
            (self.0)(request.extensions()).map(str::to_owned)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn ip(s: &str) -> IpAddr {
            s.parse().unwrap()
        }

        #[test]
        fn ranges_contain_what_they_say() {
            let net = Cidr::parse("10.0.0.0/8").unwrap();
            assert!(net.contains(ip("10.200.1.2")));
            assert!(!net.contains(ip("11.0.0.1")));
            assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
            assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
            assert!(
                Cidr::parse("127.0.0.1")
                    .unwrap()
                    .contains(ip("::ffff:127.0.0.1"))
            );
            for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", ""] {
                assert!(Cidr::parse(bad).is_err(), "{bad}");
            }
        }
    }
}
