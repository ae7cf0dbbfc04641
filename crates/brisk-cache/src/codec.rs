//! How values become bytes for the remote tier.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The serde format values are stored in.
///
/// JSON is the default because it round-trips every serde type, whatever its attributes
/// (`#[serde(skip_serializing_if)]`, `flatten`, `untagged` enums, `serde_json::Value`), so a value
/// that can be serialized can always be read back. The compact binary formats are faster and
/// smaller (see `docs/performance.md`, `cache/codec`), but [`Codec::Postcard`] is not
/// self-describing: a type using those attributes serializes, then never decodes, and every read
/// of it becomes a miss (counted as a decode failure, never an error). Pick one by feature when
/// your types are plain structs and enums.
///
/// The codec is recorded in each stored value: a value written by another codec is a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// `serde_json`.
    #[default]
    Json,
    /// `postcard`: compact, fast, not self-describing (feature `postcard`).
    #[cfg(feature = "postcard")]
    Postcard,
    /// MessagePack by `rmp-serde`, with field names (feature `msgpack`).
    #[cfg(feature = "msgpack")]
    MessagePack,
}

impl Codec {
    /// The byte that names this codec in a stored value.
    pub(crate) fn id(self) -> u8 {
        match self {
            Self::Json => 1,
            #[cfg(feature = "postcard")]
            Self::Postcard => 2,
            #[cfg(feature = "msgpack")]
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
            #[cfg(feature = "msgpack")]
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
            #[cfg(feature = "msgpack")]
            Self::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}
