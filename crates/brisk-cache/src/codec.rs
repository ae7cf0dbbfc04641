//! How values become bytes for the remote tier.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The serde format values are stored in.
///
/// MessagePack is the default, chosen by measurement (`cache/codec` in `docs/performance.md`:
/// encode + decode of a 1 KiB struct): 1.2–1.9× as fast as JSON and 19% smaller; postcard is
/// faster still (1.3–2.2× MessagePack) but cannot carry every type. MessagePack is
/// self-describing, with field names, so like JSON it round-trips
/// what serde attributes make of a type (`#[serde(skip_serializing_if)]`, `default`, `flatten`,
/// `untagged` enums, fields added later with `#[serde(default)]`), which the tests check.
/// [`Codec::Postcard`] (feature `postcard`) is not self-describing: a type using those attributes
/// either does not serialize (`flatten`: [`set`](crate::Cache::set) returns
/// [`Error::Encode`](crate::Error::Encode), a load's value is served but not stored remotely) or
/// serializes and never decodes (`skip_serializing_if`: every read of it is a miss, counted as a
/// decode failure, never an error); pick it for plain structs and enums only. [`Codec::Json`] is there
/// for values other programs read from Redis.
///
/// The codec is recorded in each stored value: a value written by another codec is a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// MessagePack by `rmp-serde`, with field names: the default.
    #[default]
    MessagePack,
    /// `serde_json`: readable by other programs.
    Json,
    /// `postcard`: compact, fast, not self-describing (feature `postcard`).
    #[cfg(feature = "postcard")]
    Postcard,
}

impl Codec {
    /// The byte that names this codec in a stored value.
    pub(crate) fn id(self) -> u8 {
        match self {
            Self::Json => 1,
            #[cfg(feature = "postcard")]
            Self::Postcard => 2,
            Self::MessagePack => 3,
        }
    }

    pub(crate) fn encode<V: Serialize>(self, value: &V, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Json => serde_json::to_writer(out, value).map_err(|e| e.to_string()),
            #[cfg(feature = "postcard")]
            Self::Postcard => postcard::to_io(value, out)
                .map(drop)
                .map_err(|e| e.to_string()),
            Self::MessagePack => {
                rmp_serde::encode::write_named(out, value).map_err(|e| e.to_string())
            }
        }
    }

    pub(crate) fn decode<V: DeserializeOwned>(self, bytes: &[u8]) -> Result<V, String> {
        match self {
            Self::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            #[cfg(feature = "postcard")]
            Self::Postcard => match postcard::take_from_bytes(bytes) {
                Ok((value, [])) => Ok(value),
                Ok((_, rest)) => Err(format!("{} bytes left over", rest.len())),
                Err(err) => Err(err.to_string()),
            },
            Self::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}
