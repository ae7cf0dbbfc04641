//! How a key becomes a Redis key.
//!
//! Every entry of a cache named `users` lives under
//!
//! ```text
//! {brisk:users:1:<the key's encoding>}
//! ```
//!
//! and the lease of a load of it (see the crate docs) under the same key followed by `:lease`.
//! The braces are a Redis Cluster hash tag: an entry and its lease hash to the same slot, so
//! one script can touch both on a cluster. (An encoding holding a `}` ends the tag early, at
//! the same place in both keys: they still share their slot.)
//!
//! `1` is the format version: a change of the key or envelope format bumps it, so entries of the
//! old format are never read as the new one. A cache name is 1 to 64 characters of
//! `A-Z a-z 0-9 _ - .` (no `:`), so the prefix ends unambiguously, and two caches never share a
//! key. Within a cache, [`CacheKey::encode`] is injective: two different keys never write the same
//! bytes. The encodings brisk provides start with a tag saying which kind of key it is:
//!
//! | key | encoding |
//! |---|---|
//! | `str`, `String`, `Box<str>`, `Arc<str>` | `s:` and the UTF-8 bytes |
//! | every integer type | `i:` and the decimal digits (`i:-42`) |
//! | `bool` | `b:0` or `b:1` |
//! | `char` | `c:` and its UTF-8 bytes |
//! | `[u8]`, `Vec<u8>` | `x:` and the bytes as they are |
//! | tuples of two or three keys | `t:` and each part as `<byte length>:<encoding>` |
//!
//! Redis keys are binary-safe, so any bytes are valid; a key whose encoding exceeds the cache's
//! `max_key_len` (1,024 bytes unless set) is refused with [`KeyError::TooLong`], never cut.

use std::sync::Arc;

/// A key type a cache can store: it writes bytes that no other value of the type writes.
///
/// Implement it for your own key types by delegating to the provided impls, for example a
/// newtype writing its inner value:
///
/// ```
/// use brisk_cache::CacheKey;
///
/// #[derive(Clone, PartialEq, Eq, Hash)]
/// struct UserId(u64);
///
/// impl CacheKey for UserId {
///     fn encode(&self, out: &mut Vec<u8>) {
///         self.0.encode(out);
///     }
///
///     // Lets an invalidation from another instance (backplane or tracking) drop just this key
///     // from the local tier; without it, such an invalidation empties the whole local tier.
///     fn decode(bytes: &[u8]) -> Option<Self> {
///         u64::decode(bytes).map(UserId)
///     }
/// }
/// ```
pub trait CacheKey {
    /// Appends this key's bytes to `out`. Two different keys must never append the same bytes.
    fn encode(&self, out: &mut Vec<u8>);

    /// The key that [`encode`](Self::encode) wrote as `bytes`, or `None` if it cannot tell (the
    /// default). An invalidation that reaches the local tier by key from another instance or
    /// from Redis (see the crate docs on invalidation) names the key only by its bytes: a key
    /// type that decodes loses just that entry, one that does not loses the whole local tier.
    /// Every key type brisk provides decodes.
    fn decode(bytes: &[u8]) -> Option<Self>
    where
        Self: Sized,
    {
        let _ = bytes;
        None
    }
}

/// A key the cache refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key's encoding is longer than the cache's `max_key_len`.
    #[error("the key is {len} bytes long encoded, more than the cache's max_key_len of {max}")]
    TooLong {
        /// The encoded length.
        len: usize,
        /// The cache's limit.
        max: usize,
    },
    /// A `CacheKey` impl wrote no bytes, so every such key would be the same entry.
    #[error("the key's CacheKey::encode wrote no bytes")]
    Empty,
}

impl<T: CacheKey + ?Sized> CacheKey for &T {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }
}

impl CacheKey for str {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"s:");
        out.extend_from_slice(self.as_bytes());
    }
}

/// The text of an `s:` encoding.
fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes.strip_prefix(b"s:")?).ok()
}

impl CacheKey for String {
    fn encode(&self, out: &mut Vec<u8>) {
        self.as_str().encode(out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        text(bytes).map(str::to_owned)
    }
}

impl CacheKey for Box<str> {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        text(bytes).map(Box::from)
    }
}

impl CacheKey for Arc<str> {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        text(bytes).map(Arc::from)
    }
}

impl CacheKey for [u8] {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x:");
        out.extend_from_slice(self);
    }
}

impl CacheKey for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.as_slice().encode(out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        bytes.strip_prefix(b"x:").map(<[u8]>::to_vec)
    }
}

impl CacheKey for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"b:1" } else { b"b:0" });
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes {
            b"b:1" => Some(true),
            b"b:0" => Some(false),
            _ => None,
        }
    }
}

impl CacheKey for char {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"c:");
        out.extend_from_slice(self.encode_utf8(&mut [0; 4]).as_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes.strip_prefix(b"c:")?).ok()?;
        let mut chars = text.chars();
        chars.next().filter(|_| chars.as_str().is_empty())
    }
}

macro_rules! integer_keys {
    ($($t:ty)*) => {$(
        impl CacheKey for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                use std::io::Write as _;
                out.extend_from_slice(b"i:");
                // Writing to a Vec cannot fail.
                let _ = write!(out, "{self}");
            }

            fn decode(bytes: &[u8]) -> Option<Self> {
                std::str::from_utf8(bytes.strip_prefix(b"i:")?).ok()?.parse().ok()
            }
        }
    )*};
}

integer_keys!(u8 u16 u32 u64 u128 usize i8 i16 i32 i64 i128 isize);

/// Appends one tuple part, prefixed by its length so that parts cannot run into each other.
fn part(key: &impl CacheKey, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let mut bytes = Vec::new();
    key.encode(&mut bytes);
    let _ = write!(out, "{}:", bytes.len());
    out.extend_from_slice(&bytes);
}

/// Reads one tuple part off the front of `bytes`: the part and what follows it.
fn unpart<T: CacheKey>(bytes: &[u8]) -> Option<(T, &[u8])> {
    let colon = bytes.iter().position(|&b| b == b':')?;
    let len: usize = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
    let rest = &bytes[colon + 1..];
    let part = rest.get(..len)?;
    Some((T::decode(part)?, &rest[len..]))
}

impl<A: CacheKey, B: CacheKey> CacheKey for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"t:");
        part(&self.0, out);
        part(&self.1, out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (a, rest) = unpart(bytes.strip_prefix(b"t:")?)?;
        let (b, rest) = unpart(rest)?;
        rest.is_empty().then_some((a, b))
    }
}

impl<A: CacheKey, B: CacheKey, C: CacheKey> CacheKey for (A, B, C) {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"t:");
        part(&self.0, out);
        part(&self.1, out);
        part(&self.2, out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (a, rest) = unpart(bytes.strip_prefix(b"t:")?)?;
        let (b, rest) = unpart(rest)?;
        let (c, rest) = unpart(rest)?;
        rest.is_empty().then_some((a, b, c))
    }
}

/// The Redis key of `key` in the cache whose prefix is `prefix` (`{brisk:<name>:1:`).
pub(crate) fn redis_key(
    prefix: &[u8],
    key: &impl CacheKey,
    max: usize,
) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(prefix.len() + 24);
    out.extend_from_slice(prefix);
    key.encode(&mut out);
    let len = out.len() - prefix.len();
    out.push(b'}');
    if len == 0 {
        return Err(KeyError::Empty);
    }
    if len > max {
        return Err(KeyError::TooLong { len, max });
    }
    Ok(out)
}

/// The prefix of every key of the cache named `name`.
pub(crate) fn prefix(name: &str) -> Vec<u8> {
    format!("{{brisk:{name}:{}:", crate::envelope::FORMAT_VERSION).into_bytes()
}

/// The key of the lease on `rkey` (a key from [`redis_key`]): in the same hash slot.
pub(crate) fn lease_key(rkey: &[u8]) -> Vec<u8> {
    [rkey, b":lease"].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(key: &impl CacheKey) -> Vec<u8> {
        let mut out = Vec::new();
        key.encode(&mut out);
        out
    }

    #[test]
    fn encodings_are_tagged_and_injective() {
        assert_eq!(enc(&"42"), b"s:42");
        assert_eq!(enc(&42_u64), b"i:42");
        assert_eq!(enc(&-42_i32), b"i:-42");
        assert_ne!(enc(&"42"), enc(&42_u8));
        assert_eq!(enc(&true), b"b:1");
        assert_eq!(enc(&'é'), "c:é".as_bytes());
        assert_eq!(enc(&vec![0_u8, 255]), b"x:\x00\xff");
        // Parts are length-prefixed: ("a:b", "c") and ("a", "b:c") differ.
        assert_ne!(enc(&("a:b", "c")), enc(&("a", "b:c")));
        assert_eq!(enc(&("ab", 1_u8)), b"t:4:s:ab3:i:1");
        assert_ne!(enc(&("", "")), enc(&""));
    }

    fn round_trip<K: CacheKey + PartialEq + std::fmt::Debug>(key: K) {
        assert_eq!(K::decode(&enc(&key)), Some(key));
    }

    #[test]
    fn every_provided_key_decodes_what_it_encodes() {
        round_trip(String::from("a:b}c"));
        round_trip(Box::<str>::from(""));
        round_trip(Arc::<str>::from("é"));
        round_trip(u8::MAX);
        round_trip(i128::MIN);
        round_trip(-1_isize);
        round_trip(true);
        round_trip(false);
        round_trip('é');
        round_trip(vec![0_u8, 255, b':']);
        round_trip((String::from("a:b"), 7_u32));
        round_trip((1_u8, (String::new(), false), 'x'));
        // What another type wrote, or nothing sensible, is no key.
        assert_eq!(u8::decode(b"i:256"), None);
        assert_eq!(u64::decode(b"i:-1"), None);
        assert_eq!(String::decode(b"x:abc"), None);
        assert_eq!(char::decode(b"c:ab"), None);
        assert_eq!(<(u8, u8)>::decode(b"t:3:i:13:i:2extra"), None);
        assert_eq!(<(u8, u8)>::decode(b"t:9:i:1"), None);
        struct Opaque;
        impl CacheKey for Opaque {
            fn encode(&self, out: &mut Vec<u8>) {
                out.push(1);
            }
        }
        assert!(Opaque::decode(b"\x01").is_none());
    }

    #[test]
    fn limits_are_errors_not_truncations() {
        let prefix = prefix("users");
        assert_eq!(prefix, b"{brisk:users:1:");
        assert_eq!(
            redis_key(&prefix, &42_u64, 1_024).unwrap(),
            b"{brisk:users:1:i:42}"
        );
        let long = "x".repeat(1_023);
        assert_eq!(
            redis_key(&prefix, &long, 1_024),
            Err(KeyError::TooLong {
                len: 1_025,
                max: 1_024
            })
        );
        assert!(redis_key(&prefix, &"x".repeat(1_022), 1_024).is_ok());
        struct Nothing;
        impl CacheKey for Nothing {
            fn encode(&self, _: &mut Vec<u8>) {}
        }
        assert_eq!(redis_key(&prefix, &Nothing, 1_024), Err(KeyError::Empty));
    }
}
