//! The envelope every remote value travels in.
//!
//! ```text
//! offset  size  field
//!      0     2  magic "bk"
//!      2     1  format version (1)
//!      3     1  flags: bit 0 = "none" (a cached absence, no payload), bit 1 = LZ4-compressed,
//!                 bit 2 = tagged
//!      4     1  codec (1 JSON, 2 postcard, 3 MessagePack)
//!      5     8  type fingerprint: FNV-1a of the value's Rust type name
//!     13     8  created at (for a load: when it began), Unix microseconds
//!     21     8  fresh until, Unix milliseconds
//!     29     4  how long the load took, microseconds (saturating)
//!     33     4  payload length in bytes
//!     37     …  payload
//!      …     …  tagged only: 2-byte tag count, then each tag as a 2-byte length and its UTF-8
//! ```
//!
//! All integers are little-endian. Anything that does not match — foreign bytes, another format
//! version, another codec or type, a short read — is a [`DecodeError`]: the cache counts it and
//! treats the value as a miss, which the next load overwrites.

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;

/// The version of the key and envelope format; part of every Redis key.
pub(crate) const FORMAT_VERSION: u8 = 1;
const MAGIC: [u8; 2] = *b"bk";
const HEADER: usize = 37;
const NONE: u8 = 1;
#[cfg(feature = "lz4")]
const LZ4: u8 = 2;
const TAGGED: u8 = 4;

/// When a value was made (for a load: when it began), until when it is fresh, and its tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) created_us: u64,
    pub(crate) fresh_until_ms: u64,
    pub(crate) load_micros: u32,
    pub(crate) tags: Vec<String>,
}

/// What the envelope is made for: one value type in one codec.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Format {
    pub(crate) codec: Codec,
    pub(crate) fingerprint: u64,
    /// Compress payloads longer than this (feature `lz4`); `None`: never.
    #[cfg_attr(not(feature = "lz4"), allow(dead_code))]
    pub(crate) compress_above: Option<usize>,
}

/// Why stored bytes were not a value of this cache; the label of the decode-failure metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Not an envelope at all.
    Foreign,
    /// An envelope of another format version.
    Version,
    /// Written by another codec, or compressed when this build cannot decompress.
    Codec,
    /// Written for another value type.
    Type,
    /// Shorter or longer than its header says.
    Truncated,
    /// The payload did not decode (or its deserializer panicked).
    Payload(String),
}

impl DecodeError {
    /// Every reason, in the order of [`Self::index`]: the metric's label values.
    pub(crate) const REASONS: [&'static str; 6] = [
        "foreign",
        "version",
        "codec",
        "type",
        "truncated",
        "payload",
    ];

    pub(crate) fn index(&self) -> usize {
        match self {
            Self::Foreign => 0,
            Self::Version => 1,
            Self::Codec => 2,
            Self::Type => 3,
            Self::Truncated => 4,
            Self::Payload(_) => 5,
        }
    }

    pub(crate) fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

/// FNV-1a, 64 bits: stable across processes and builds, unlike `std`'s hashers.
pub(crate) fn fingerprint(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Format {
    /// The envelope of `value` (`None`: a cached absence). An error is the serializer's
    /// message (it failed or panicked).
    pub(crate) fn encode<V: Serialize>(
        &self,
        value: Option<&V>,
        meta: &Meta,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(HEADER + 128);
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(if value.is_none() { NONE } else { 0 });
        out.push(self.codec.id());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out.extend_from_slice(&meta.created_us.to_le_bytes());
        out.extend_from_slice(&meta.fresh_until_ms.to_le_bytes());
        out.extend_from_slice(&meta.load_micros.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        if let Some(value) = value {
            let codec = self.codec;
            catch_unwind(AssertUnwindSafe(|| codec.encode(value, &mut out))).map_err(
                |panic| format!("the serializer panicked: {}", panic_message(&*panic)),
            )??;
            self.maybe_compress(&mut out);
        }
        let len =
            u32::try_from(out.len() - HEADER).map_err(|_| "the value is over 4 GiB".to_owned())?;
        out[33..37].copy_from_slice(&len.to_le_bytes());
        if !meta.tags.is_empty() {
            out[3] |= TAGGED;
            // Checked by the caller: at most `MAX_TAGS`, each at most `MAX_TAG_LEN` bytes.
            let count = u16::try_from(meta.tags.len()).map_err(|_| "too many tags".to_owned())?;
            out.extend_from_slice(&count.to_le_bytes());
            for tag in &meta.tags {
                let len = u16::try_from(tag.len()).map_err(|_| "a tag is too long".to_owned())?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(tag.as_bytes());
            }
        }
        Ok(out)
    }

    #[cfg(feature = "lz4")]
    fn maybe_compress(&self, out: &mut Vec<u8>) {
        if self
            .compress_above
            .is_some_and(|above| out.len() - HEADER > above)
        {
            let compressed = lz4_flex::compress_prepend_size(&out[HEADER..]);
            out.truncate(HEADER);
            out.extend_from_slice(&compressed);
            out[3] |= LZ4;
        }
    }

    #[cfg(not(feature = "lz4"))]
    #[allow(clippy::unused_self)]
    fn maybe_compress(&self, _: &mut Vec<u8>) {}

    /// The value in `bytes` (`None`: a cached absence) and its times.
    pub(crate) fn decode<V: DeserializeOwned>(
        &self,
        bytes: &[u8],
    ) -> Result<(Option<V>, Meta), DecodeError> {
        if bytes.len() < 2 || bytes[..2] != MAGIC {
            return Err(DecodeError::Foreign);
        }
        if bytes.len() < 3 {
            return Err(DecodeError::Truncated);
        }
        if bytes[2] != FORMAT_VERSION {
            return Err(DecodeError::Version);
        }
        if bytes.len() < HEADER {
            return Err(DecodeError::Truncated);
        }
        let flags = bytes[3];
        if bytes[4] != self.codec.id() {
            return Err(DecodeError::Codec);
        }
        let u64_at = |at: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        if u64_at(5) != self.fingerprint {
            return Err(DecodeError::Type);
        }
        let rest = &bytes[HEADER..];
        let len = usize::try_from(u32_at(33)).map_err(|_| DecodeError::Truncated)?;
        if len > rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (payload, tagged) = rest.split_at(len);
        let tags = if flags & TAGGED != 0 {
            read_tags(tagged).ok_or(DecodeError::Truncated)?
        } else if tagged.is_empty() {
            Vec::new()
        } else {
            return Err(DecodeError::Truncated);
        };
        let meta = Meta {
            created_us: u64_at(13),
            fresh_until_ms: u64_at(21),
            load_micros: u32_at(29),
            tags,
        };
        if flags & NONE != 0 {
            return if payload.is_empty() {
                Ok((None, meta))
            } else {
                Err(DecodeError::Truncated)
            };
        }
        let payload = Self::decompress(flags, payload)?;
        let codec = self.codec;
        match catch_unwind(AssertUnwindSafe(|| codec.decode::<V>(&payload))) {
            Ok(Ok(value)) => Ok((Some(value), meta)),
            Ok(Err(message)) => Err(DecodeError::Payload(message)),
            Err(panic) => Err(DecodeError::Payload(format!(
                "the deserializer panicked: {}",
                panic_message(&*panic)
            ))),
        }
    }

    #[cfg(feature = "lz4")]
    fn decompress(flags: u8, payload: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
        if flags & LZ4 == 0 {
            return Ok(payload.into());
        }
        lz4_flex::decompress_size_prepended(payload)
            .map(Into::into)
            .map_err(|err| DecodeError::Payload(err.to_string()))
    }

    #[cfg(not(feature = "lz4"))]
    fn decompress(flags: u8, payload: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
        // A compressed value this build cannot read: as good as another codec's.
        if flags & 2 != 0 {
            Err(DecodeError::Codec)
        } else {
            Ok(payload.into())
        }
    }
}

/// The tags section: a count, then each tag length-prefixed; nothing may follow.
fn read_tags(bytes: &[u8]) -> Option<Vec<String>> {
    fn length(bytes: &mut &[u8]) -> Option<usize> {
        let (n, rest) = bytes.split_first_chunk::<2>()?;
        *bytes = rest;
        Some(usize::from(u16::from_le_bytes(*n)))
    }
    let mut bytes = bytes;
    let count = length(&mut bytes)?;
    let mut tags = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let len = length(&mut bytes)?;
        if bytes.len() < len {
            return None;
        }
        let (tag, rest) = bytes.split_at(len);
        tags.push(String::from_utf8(tag.to_vec()).ok()?);
        bytes = rest;
    }
    bytes.is_empty().then_some(tags)
}

/// The text of a panic's payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a payload that is not a string".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: Meta = Meta {
        created_us: 1,
        fresh_until_ms: 2,
        load_micros: 3,
        tags: Vec::new(),
    };

    #[test]
    fn tags_round_trip_and_a_bad_tag_section_is_truncated() {
        let f = format();
        let meta = Meta {
            tags: vec!["user:42".to_owned(), String::new(), "é".to_owned()],
            ..META
        };
        let bytes = f.encode(Some(&7_u32), &meta).unwrap();
        assert_eq!(f.decode::<u32>(&bytes), Ok((Some(7), meta.clone())));
        let none = f.encode::<u32>(None, &meta).unwrap();
        assert_eq!(f.decode::<u32>(&none), Ok((None, meta)));
        for cut in 1..8 {
            assert_eq!(
                f.decode::<u32>(&bytes[..bytes.len() - cut]),
                Err(DecodeError::Truncated)
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(f.decode::<u32>(&longer), Err(DecodeError::Truncated));
        // Bytes after an untagged payload are no tag section.
        let mut untagged = f.encode(Some(&7_u32), &META).unwrap();
        untagged.extend_from_slice(&[0, 0]);
        assert_eq!(f.decode::<u32>(&untagged), Err(DecodeError::Truncated));
    }

    fn format() -> Format {
        Format {
            codec: Codec::Json,
            fingerprint: fingerprint("u32"),
            compress_above: None,
        }
    }

    #[test]
    fn a_value_and_an_absence_round_trip() {
        let f = format();
        let bytes = f.encode(Some(&7_u32), &META).unwrap();
        assert_eq!(f.decode::<u32>(&bytes), Ok((Some(7), META)));
        let bytes = f.encode::<u32>(None, &META).unwrap();
        assert_eq!(bytes.len(), HEADER);
        assert_eq!(f.decode::<u32>(&bytes), Ok((None, META)));
    }

    #[test]
    fn bad_bytes_are_typed_failures() {
        let f = format();
        let good = f.encode(Some(&7_u32), &META).unwrap();
        assert_eq!(f.decode::<u32>(b"7"), Err(DecodeError::Foreign));
        assert_eq!(f.decode::<u32>(b""), Err(DecodeError::Foreign));
        assert_eq!(
            f.decode::<u32>(&good[..HEADER - 1]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            f.decode::<u32>(&good[..good.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut other = good.clone();
        other[2] = 9;
        assert_eq!(f.decode::<u32>(&other), Err(DecodeError::Version));
        let mut other = good.clone();
        other[4] = 2;
        assert_eq!(f.decode::<u32>(&other), Err(DecodeError::Codec));
        let other_type = Format {
            fingerprint: fingerprint("String"),
            ..f
        };
        assert_eq!(other_type.decode::<u32>(&good), Err(DecodeError::Type));
        let mut garbled = good;
        let last = garbled.len() - 1;
        garbled[last] = b'x';
        assert!(matches!(
            f.decode::<u32>(&garbled),
            Err(DecodeError::Payload(_))
        ));
    }

    #[test]
    fn a_panicking_serializer_is_an_error() {
        struct Boom;
        impl Serialize for Boom {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                panic!("boom")
            }
        }
        let err = format().encode(Some(&Boom), &META).unwrap_err();
        assert!(err.contains("boom"), "{err}");
    }

    #[cfg(feature = "lz4")]
    #[test]
    fn large_values_are_compressed() {
        let f = Format {
            compress_above: Some(64),
            fingerprint: fingerprint("String"),
            ..format()
        };
        let value = "a".repeat(10_000);
        let bytes = f.encode(Some(&value), &META).unwrap();
        assert!(bytes.len() < 1_000, "{}", bytes.len());
        assert_eq!(
            f.decode::<String>(&bytes).unwrap().0.as_deref(),
            Some(value.as_str())
        );
    }
}
